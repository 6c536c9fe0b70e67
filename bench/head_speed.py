"""Whole commands as users run them: `cli train-head --all-folds` and `cli ablate` against `cli baseline`.

For each cache: `cli baseline`, `cli train-head --all-folds` with GAP, with SR (one head) and at the
defaults (SR, its default `--ensemble`), and `cli ablate` (baseline, GAP, SAP, SR), each a fresh
process into a fresh run folder (start-up included), the commands alternated over `--rounds` rounds,
best wall time kept. Wall and CPU time (the child's user + system), the UA the run reports, and the
ratio of each command's wall time to `cli baseline`'s on the same cache.

    python bench/head_speed.py --cache A.h5 [--cache B.h5 ...] [--rounds 2] [--out bench/results/head-speed-cpu.md]
        [--only baseline,gap,sr1,default,ablate] [-- TRAIN-HEAD OPTIONS]
    python bench/head_speed.py --synthetic 5531 --rounds 1 --only baseline,gap,default -- --epochs 2 --min-steps 0

`--synthetic N` adds an IEMOCAP-shaped synthetic cache of N utterances (bench/head_bench.py: 10 speakers
in 5 sessions, median 250 frames, one layer of D = 1,024, float16), built in `--work` (reused there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # bench/extract.py shadows `extract`
sys.path.insert(0, str(_HERE.parent))

from bench.machine import cpu_name  # noqa: E402

REPO = _HERE.parent
CLI = [sys.executable, str(REPO / "cli.py")]
COMMANDS = {
    "baseline": ["baseline"],
    "gap": ["train-head", "--all-folds", "--pooling", "gap"],
    "sr1": ["train-head", "--all-folds", "--ensemble", "1"],
    "default": ["train-head", "--all-folds"],
    "ablate": ["ablate"],
}
LABELS = {"baseline": "`cli baseline`", "gap": "`train-head --all-folds --pooling gap`",
          "sr1": "`train-head --all-folds --ensemble 1` (SR)", "default": "`train-head --all-folds` (SR, default ensemble)",
          "ablate": "`cli ablate` (baseline, GAP, SAP, SR)"}


def run(name: str, cache: Path, work: Path, extra: list[str]) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    args = CLI + COMMANDS[name] + ["--cache", str(cache), "--out", str(out), "--quiet"] + extra
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": load, "ua": ua_of(out, name)}


def ua_of(out: Path, name: str) -> str:
    from heads.evaluate.report import summarize

    runs = [out] if name != "ablate" else [out / n for n in ("baseline", "gap", "sap", "sr")]
    return " / ".join(f"{100 * summarize(r)['ua']['mean']:.1f}" for r in runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, action="append", default=[])
    ap.add_argument("--synthetic", type=int, default=0, help="also an IEMOCAP-shaped cache of this many utterances")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default=",".join(COMMANDS))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "head-speed-cpu.md")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("extra", nargs="*", help="options after -- go to every train-head/ablate run")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="sapser-head-speed-"))
    if args.synthetic:
        from bench.head_bench import build_cache

        work.mkdir(parents=True, exist_ok=True)
        args.cache.append(build_cache(work / f"iemocap-shaped-{args.synthetic}x1024.h5", utts=args.synthetic,
                                      layers=1, dim=1024, frames=250))
    if not args.cache:
        ap.error("give --cache, --synthetic or both")
    rows = []
    for cache in args.cache:
        best: dict[str, dict] = {}
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):  # alternated: drift hits every command alike
                extra = [] if name == "baseline" else args.extra
                got = run(name, cache, work / cache.stem, extra)
                print(f"{cache.name} round {r + 1} {name}: {got['wall']:.1f} s wall, {got['cpu']:.1f} s CPU, "
                      f"UA {got['ua']}, load {got['load']:.1f}", flush=True)
                if name not in best or got["wall"] < best[name]["wall"]:
                    best[name] = got
        base = best.get("baseline", {}).get("wall")
        for name in names:
            b = best[name]
            ratio = f"{b['wall'] / base:.1f}x" if base else "-"
            rows.append(f"| {cache.name} | {LABELS[name]} | {b['wall']:.1f} | {b['cpu']:.1f} | {ratio} | {b['ua']} | "
                        f"{b['load']:.1f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    header = [
        f"## {datetime.date.today().isoformat()}, commit {commit}",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch threads = cores. Command: "
        f"`python bench/head_speed.py {' '.join(sys.argv[1:])}`. Each cell: the best of {args.rounds} rounds "
        "(commands alternated), a fresh process each (start-up included); CPU = the child's user + system time; "
        "load = the 1-minute load average when the best run started (other processes share the cores when > 2).",
        "",
        "| cache | command | wall (s) | CPU (s) | wall / baseline | UA % | load |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    text = "\n".join(header + rows) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = args.out.read_text() if args.out.exists() else "# Head training speed: whole commands against `cli baseline`\n"
    args.out.write_text(previous.rstrip() + "\n\n" + text)
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
