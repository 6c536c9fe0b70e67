"""Peak memory and speed of `cli predict --segments` on long recordings: 1 minute against 60.

    python bench/predict_segments.py --run runs/x-sr/fold-01                 # 1 and 60 minutes
    python bench/predict_segments.py --minutes 1,10 --whole 1,10             # and `cli predict` on the whole file
    python bench/predict_segments.py --minutes 1 --results /tmp/x.md         # a quick look

Each case runs `heads.predict.write_segments` (what `cli predict --segments` calls) in a fresh
process on a recording made by `extract.synthetic.write_recording`: room noise with a synthetic
voice speaking 2-12 s every 15 s (about half the time), 16 kHz 16-bit, written piece by piece.
Reported: the process's peak RSS (getrusage), wall time, x real time, segments. `--whole M`
adds `predict_one` on the whole M-minute file, what predicting it without --segments costs
(the run's truncation aside: manifest runs keep the whole file). Without `--run`, a small fbank
run is trained first on the synthetic corpus (one fold, one epoch): memory depends on the
feature model and the head's shapes, not on how well it was trained.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository ahead of bench/

CASE = """
import json, resource, sys, time
from heads.predict import load_predictor, write_segments
fold, audio, out, mode = sys.argv[1:5]
predictor = load_predictor(fold)
start = time.perf_counter()
if mode == "segments":
    done = write_segments(predictor, audio, out)
    n = done["segments"]
else:
    p = predictor.predict_one(audio)
    assert p.ok, p.error
    n = 1
wall = time.perf_counter() - start
print(json.dumps({"segments": n, "wall": wall, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def recording(work: Path, minutes: int) -> Path:
    import numpy as np

    from extract.synthetic import write_recording

    path = work / f"recording-{minutes}min.wav"
    if not path.exists():
        rng = np.random.default_rng(minutes)
        starts = np.arange(5.0, minutes * 60 - 15, 15.0)
        write_recording(path, minutes * 60, [(a, a + rng.uniform(2, 12)) for a in starts], seed=minutes)
    return path


def small_run(work: Path) -> Path:
    from extract.pipeline import run_extract
    from extract.synthetic import generate
    from heads.train.fold_loop import train_folds
    from heads.train.trainer import TrainConfig

    fold = work / "run" / "fold-01"
    if not (fold / "metrics.json").exists():
        manifest = generate(work / "corpus", seed=2, n_sessions=2, utts_per_speaker=4)
        run_extract("manifest", manifest, out=work / "fbank.h5", model="fbank", workers=0, progress=False)
        train_folds(work / "fbank.h5", TrainConfig(epochs=1, batch_size=8, ensemble=1, min_steps=0, device="cpu"),
                    folds=[1], out=work / "run", progress=False)
    return fold


def case(fold: Path, audio: Path, out: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CASE, str(fold), str(audio), str(out), mode], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    if done.returncode:
        raise SystemExit(f"{mode} on {audio} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained fold RUN/fold-KK [default: a small fbank fold]")
    parser.add_argument("--minutes", default="1,60", help="recording lengths for --segments")
    parser.add_argument("--whole", default="", help="lengths also predicted whole, without --segments")
    parser.add_argument("--work", type=Path, help="folder for recordings and outputs [default: a temporary one]")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "predict-segments-cpu.md")
    args = parser.parse_args()
    from bench.machine import cpu_name

    work = args.work or Path(tempfile.mkdtemp(prefix="segments-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    fold = args.run or small_run(work)
    rows = []
    cases = [(int(m), "segments") for m in args.minutes.split(",") if m] + \
            [(int(m), "whole") for m in args.whole.split(",") if m]
    for minutes, mode in cases:
        audio = recording(work, minutes)
        r = case(fold, audio, work / f"out-{minutes}", mode)
        r.update(minutes=minutes, mode=mode, realtime=minutes * 60 / r["wall"])
        print(json.dumps(r), flush=True)
        rows.append(r)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    import torch

    from extract.segments import SegmentRule

    rule = SegmentRule()
    lines = [
        "# `cli predict --segments`: peak memory and speed by recording length (cpu)", "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Commit: {commit.strip()}",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__};"
        f" load average {os.getloadavg()[0]:.1f} at the end (a shared machine: times are noisy, RSS is not)",
        f"- Command: `python bench/predict_segments.py {' '.join(sys.argv[1:])}`",
        f"- Fold: `{fold}`; recordings: extract.synthetic.write_recording, a synthetic voice speaking 2-12 s every "
        f"15 s in room noise, 16 kHz; default rule (min {rule.min_segment:g} s, max {rule.max_segment:g} s, merge gap "
        f"{rule.merge_gap:g} s, pad {rule.pad:g} s)",
        "- Each case in a fresh process; peak RSS = getrusage(RUSAGE_SELF).ru_maxrss, model loading included", "",
        "| recording | how | segments | peak RSS MiB | wall s | x real time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        how = "`--segments`" if r["mode"] == "segments" else "whole file (`predict_one`)"
        lines.append(f"| {r['minutes']} min | {how} | {r['segments']} | {r['peak_mib']:.0f} | {r['wall']:.1f} | "
                     f"{r['realtime']:.0f}x |")
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
