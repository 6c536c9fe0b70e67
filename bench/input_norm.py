"""Input normalization and layer-weight methods compared by measurement, all folds of real caches.

For every cache x variant x pooling it trains all leave-one-speaker-out
folds with `heads.run.train_folds` (default settings otherwise) into
RUNS/<cache stem>/<variant>-<pooling>/ and writes one table: UA and WA
(mean and 95% CI over folds), how many folds kept their last allowed epoch
(a sign of under-training), the mean kept epoch, and the run's wall time.
Finished runs (every fold has metrics.json) are read back, not retrained,
so the script can be stopped and rerun.

Variants are `NAME=option:value,...`, e.g. `train=norm:train`,
`joint=norm:train,layer_weights:joint`, `l6=layer:6,norm:none`.

    python bench/input_norm.py --cache A.h5 [--cache B.h5] --variants none=norm:none train=norm:train ...
        [--poolings sr,gap] [--runs /tmp/norm-runs] [--out bench/results/input-norm-cpu.md] [--jobs 1]
        [--set epochs=60] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from heads.report import load_run, summarize  # noqa: E402
from heads.run import train_folds  # noqa: E402
from heads.trainer import TrainConfig  # noqa: E402


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None if text == "None" else text


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, opts = spec.partition("=")
    settings = {}
    for part in filter(None, opts.split(",")):
        key, _, value = part.partition(":")
        settings[key] = parse_value(value)
    return name, settings


def finished(run: Path) -> bool:
    folds = sorted(run.glob("fold-*/metrics.json"))
    return (run / "config.json").exists() and len(folds) > 0 and (run / ".done").exists()


def run_variant(cache: Path, base: TrainConfig, name: str, settings: dict, pooling: str, runs: Path,
                jobs: int) -> tuple[Path, float | None]:
    out = runs / cache.stem / f"{name}-{pooling}"
    if finished(out):
        return out, float((out / ".done").read_text() or "nan")
    config = replace(base, pooling=pooling, **settings)
    start = time.perf_counter()
    train_folds(cache, config, out=out, jobs=jobs, progress=False)
    seconds = time.perf_counter() - start
    (out / ".done").write_text(f"{seconds:.1f}")
    return out, seconds


def row(cache: Path, name: str, settings: dict, pooling: str, run: Path, seconds: float | None) -> str:
    s = summarize(run)
    folds = load_run(run).folds
    last = sum(m["best_epoch"] == m["epochs_run"] and m["epochs_run"] == s["settings"]["epochs"] for m in folds)
    kept = sum(m["best_epoch"] for m in folds) / len(folds)

    def pct(stat: dict) -> str:
        if stat["mean"] is None:
            return "n/a"
        ci = stat["ci95"]
        return f"{100 * stat['mean']:.1f}" + (f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else "")

    opts = ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
    return (f"| {cache.stem} | {name} ({opts}) | {pooling.upper()} | {pct(s['ua'])} | {pct(s['wa'])} | "
            f"{last}/{len(folds)} | {kept:.1f} | {seconds or float('nan'):.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, action="append", required=True)
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--poolings", default="sr,gap")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/sapser-norm-runs"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/input-norm-cpu.md"))
    ap.add_argument("--title", default="Input normalization on real-speech caches")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides for every run, e.g. epochs=60")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine spinning threads cost more than they give)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    known = {f.name for f in fields(TrainConfig)}
    base_opts = dict(parse_variant("x=" + ",".join(s.replace("=", ":", 1) for s in args.set))[1])
    unknown = set(base_opts) - known
    if unknown:
        raise SystemExit(f"unknown settings {sorted(unknown)}")
    base = TrainConfig(device="cpu", **base_opts)
    variants = [parse_variant(v) for v in args.variants]
    lines = [f"# {args.title}", "",
             f"Each row: all leave-one-speaker-out folds, default settings except those named "
             f"(and for every row: {', '.join(args.set) or 'none'}); UA/WA mean over folds (95% CI); "
             "'last' = folds whose kept (best-validation) epoch was the last allowed one; 'kept' = mean kept epoch; "
             f"time = wall seconds of the run. Machine: {os.cpu_count()} CPU cores, shared (load when written: "
             + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + ").", "",
             "| cache | variant | head | UA % | WA % | last | kept | time (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for cache in args.cache:
        for pooling in args.poolings.split(","):
            for name, settings in variants:
                run, seconds = run_variant(cache, base, name, settings, pooling, args.runs, args.jobs)
                lines.append(row(cache, name, settings, pooling, run, seconds))
                print(lines[-1], flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
