"""The stacked head trainer's arithmetic rate on wide caches, against this machine's matmul peak.

Where frames are wide (Whisper base's D = 512, WavLM Large's 1,024), SAP's
attention is real arithmetic. A step's arithmetic is counted as what it needs
(`step_flops`, 2 FLOP per multiply-add), forward and backward apart, for a
row of S attended frames (nh attention heads):
- per frame, the query and key projections (D x 2D; 3D with the values in
  the fused-kernel formulation): once forward, once backward for the weights'
  gradient only (the cached frames take no gradient);
- the scores (S^2 x D), and in the fused-kernel formulation the weighted
  values (S^2 x D): once forward, twice backward (both operands' gradients);
- in the chunked formulation, the attention-weighted frames (nh x S x D):
  once forward, once backward (the frames take no gradient);
- per row, the value and output projections (D x D each, both gradients
  backward). The head's projection and classifier (32-d) are not counted.
An earlier version of this bench counted the whole step as three forward
passes, which overstated the projections' backward by half (results before
2026-12-08's second entry).

Builds an IEMOCAP-shaped synthetic cache of one layer (bench/head_bench.py: 10
speakers in 5 sessions, median 250 frames, ~65% speech), prepares every fold as
`cli train-head` does (heads/train/fold_inputs.py), stacks every fold's heads
at the default settings (heads/train/stack.py: `--ensemble auto`, so three per
fold on this small corpus; `--heads 1` for one), times `--steps` training
steps, and reports GFLOP/s achieved against the best of `torch.mm` on 2048 x
2048 float32 matrices with the same threads. It also extrapolates an all-folds
IEMOCAP run (5,531 utterances, 10 folds, ~4,400 training utterances per fold,
one head per fold) from the measured time per utterance-step.

    python bench/head_flops.py [--dim 512] [--dim 1024] [--utts 400] [--steps 6] [--out bench/results/head-flops-cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from bench.head_bench import build_cache  # noqa: E402
from bench.machine import cpu_name  # noqa: E402
from core.heap import kept_heap  # noqa: E402
from heads.config import TrainConfig  # noqa: E402
from heads.model.pooling import flash_pays  # noqa: E402
from heads.train.batches import preload  # noqa: E402
from heads.train.fold_group import seeds_of  # noqa: E402
from heads.train.fold_inputs import cache_moments, prepare_fold_from_moments  # noqa: E402
from heads.train.folds import fold_count, fold_data, open_cache  # noqa: E402
from heads.train.stack import Stack  # noqa: E402

REPO = _HERE.parent


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 20) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def step_flops(stack: Stack, counts: torch.Tensor) -> float:
    """Forward + backward arithmetic (2 FLOP per multiply-add) a training step needs for SAP on rows with
    `counts` attended frames (module docstring)."""
    d, nh = stack.hidden, stack.n_heads
    s = counts[counts > 0].double()
    flash = flash_pays(int(s.mean()), d)
    projections = 2 * s.sum() * d * (3 if flash else 2) * d * 2  # forward + weight gradient
    scores = 2 * (s.square() * d).sum() * (2 if flash else 1) * 3  # forward + both operands' gradients
    weighted = 0.0 if flash else 2 * nh * s.sum() * d * 2  # abar @ frames: forward + abar's gradient
    per_row = 2 * len(s) * d * d * (1 if flash else 2) * 3  # value (chunked) and output projections
    return float(projections + scores + weighted + per_row)


def next_batch(state, step: int) -> list[int]:
    """The head's next training batch, starting another epoch when one runs out (a small --utts)."""
    try:
        return next(state.batches)
    except StopIteration:
        state.sampler.set_epoch(step + 2)
        state.batches = iter(state.sampler)
        return next(state.batches)


def measure(dim: int, utts: int, steps: int, device: torch.device, work: Path, heads: str) -> dict:
    path = build_cache(work / f"flops-{utts}x{dim}.h5", utts=utts, layers=1, dim=dim, frames=250)
    config = TrainConfig(device=str(device), ensemble=heads)
    cache = open_cache(path)
    preload(cache, [0], config.memory_gb)
    ks = list(range(1, fold_count(cache) + 1))
    datas = [fold_data(cache, k) for k in ks]
    ids = sorted({u for d in datas for u in d.train + d.val})
    start = time.perf_counter()
    moments = cache_moments(cache, ids, 0, config.norm, config.vad_mode, device, 2**34)
    folds = [prepare_fold_from_moments(moments, cache, d, config, device) for d in datas]
    prep = time.perf_counter() - start
    stack = Stack(folds, [(i, s) for i, d in enumerate(datas) for s in seeds_of(config, d)], device)
    active = list(range(len(stack.states)))
    for h in active:
        stack.states[h].sampler.set_epoch(1)
        stack.states[h].batches = iter(stack.states[h].sampler)
    flops, seconds, rows = 0.0, 0.0, 0
    with kept_heap() if device.type == "cpu" else nullcontext():  # as Stack.train runs its steps
        for i in range(steps + 1):
            step = timed_step(stack, active, config, device, i)
            if i:  # the first step warms the kernels up
                flops, seconds, rows = flops + step[0], seconds + step[1], rows + step[2]
    return {"dim": dim, "utts": utts, "heads": len(active), "prep": prep, "step": seconds / steps,
            "gflops": flops / seconds / 1e9, "per_utt_step": seconds / rows, "sap_frames": config.sap_frames}


def timed_step(stack: Stack, active: list[int], config: TrainConfig, device: torch.device,
               i: int) -> tuple[float, float, int]:
    """Step i of every head: (its arithmetic, its seconds, the rows it trained on)."""
    picks = [next_batch(stack.states[h], i) for h in active]
    table = stack.rows(active, "train", picks)
    counts = table["count"].clamp(max=config.sap_frames) if config.sap_frames else table["count"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    stack.step(active, picks)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return step_flops(stack, counts), time.perf_counter() - start, int((table["count"] > 0).sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, action="append")
    ap.add_argument("--utts", type=int, default=400)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--heads", default="auto", help="--ensemble of the stacked run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sapser-bench")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "head-flops-cpu.md")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    peak = matmul_peak(device)
    rows = []
    for dim in args.dim or [512, 1024]:
        m = measure(dim, args.utts, args.steps, device, args.work, args.heads)
        epoch_s = m["per_utt_step"] * 4400  # one head, one IEMOCAP fold's training utterances
        rows.append(f"| {dim} | {m['utts']} | {m['heads']} | {m['sap_frames'] or 'all'} | {m['step']:.2f} | "
                    f"{m['gflops']:.1f} | {peak:.1f} | {m['gflops'] / peak:.0%} | {1000 * m['per_utt_step']:.2f} | "
                    f"{epoch_s:.0f} s | {epoch_s * 30 * 10 / 3600:.1f} h |")
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    text = "\n".join([
        f"## {datetime.date.today().isoformat()}, commit {commit}",
        "",
        f"Machine: {cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, device `{device}`, load average "
        f"{os.getloadavg()[0]:.1f} at the end. Command: `python bench/head_flops.py {' '.join(sys.argv[1:])}`. "
        "Peak: the best `torch.mm` of 2048 x 2048 float32 matrices. IEMOCAP columns: one head per fold on ~4,400 "
        "training utterances, extrapolated from the measured time per utterance-step (30 epochs x 10 folds is the "
        "paper's plan without early stopping).",
        "",
        "| D | utterances | heads stacked | SAP frames in training | step (s) | GFLOP/s | matmul peak | share of peak "
        "| ms per utterance-step | IEMOCAP epoch | IEMOCAP 10 folds x 30 epochs |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]) + "\n"
    print(text)
    previous = args.out.read_text() if args.out.exists() else "# Head training arithmetic on wide caches\n"
    args.out.write_text(previous.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
