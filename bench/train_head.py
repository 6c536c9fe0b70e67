"""One head-training epoch against a plain read of the same features from the cache.

Builds an IEMOCAP-shaped synthetic cache with CacheWriter (10 speakers in 5
sessions, utterance lengths log-normal around ~5 s = 250 frames, D = 1024,
a few layers, float16, ~65% speech frames), takes fold 1's training split
(8 speakers) and measures:

  * read cold / warm: `FeatureCache.features` of every training utterance for
    the layers the head uses (cold: pages dropped with posix_fadvise first)
  * preload: the trainer's copy of those layers into RAM (`--memory-gb`)
  * one training epoch from RAM for: SR + learnable mix of all layers (the
    default), GAP + mix, SR on one fixed layer, GAP on one fixed layer

and reports each epoch's time, the ratio epoch / read, the device, torch
threads and the peak RSS; then extrapolates to an all-folds IEMOCAP run
(5531 utterances, ~7.0 h, 10 folds x up to 30 epochs) on this machine, and
gives an arithmetic-and-bandwidth estimate for an H100 (an estimate, not a
measurement).

It also times SAP's attention alone (bench/sap_attention.py) (forward + backward of
`SAP.mean_attention` on a (B, S, D) batch, B = 64, 8 heads) for its two
formulations and for the dense one they replaced (which held the
(B, heads, S, S) weights), each shape and thread count in a fresh
subprocess so that its peak RSS is its own.

    python bench/train_head.py [--utts 400] [--layers 4] [--dim 1024] [--frames 250]
                               [--dir /tmp/sapser-bench] [--out bench/results/train-head-cpu.md]
                               [--sap-only | --no-sap]

Layer scaling (`--layer-scaling`, issue 13, bench/layer_scaling.py): the all-layer default head on a
cache LARGER than `--memory-gb` against the same head on one layer. Each
case runs in a fresh process (its own peak RSS and /proc/self/io): fold 1's
trainer is built (for the default: normalization statistics, layer weights
learned on utterance means, frames mixed once), then `--epochs` epochs
(train + validation pass) are timed, each after dropping the cache file's
pages (posix_fadvise), as when the cache does not fit the page cache
either. Reported: set-up and epoch seconds, bytes read from the cache per
epoch (rchar: what the process read from files; read_bytes: what came from
storage), peak RSS, and on CUDA the peak GPU memory. Cases: one layer,
the default (`--layer-weights pooled`, all layers) and the jointly learned
mix (`--layer-weights joint`, all layers, read from disk every epoch).

    python bench/train_head.py --layer-scaling [--utts 300] [--layers 25] [--dim 512] [--memory-gb 0.5]
                               [--epochs 2] [--poolings gap,sr] [--cases one,probe,pooled,joint] [--device cpu|cuda]
                               [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

# Run as a script, bench/ comes first on sys.path and bench/extract.py would shadow the `extract` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from bench.head_bench import FRAMES_PER_SECOND, build_cache, drop_pages, peak_rss_gb, section, write_section  # noqa: E402
from bench.layer_scaling import SCALING_SECTION, layer_scaling  # noqa: E402
from bench.sap_attention import SAP_SECTION, sap_report, sap_shapes  # noqa: E402
from cache.reader import FeatureCache  # noqa: E402
from heads.config import TrainConfig  # noqa: E402
from heads.train.batches import preload  # noqa: E402
from heads.train.feature_trainer import FeatureTrainer  # noqa: E402
from heads.train.folds import fold_data

IEMOCAP_UTTS = 5531
IEMOCAP_SECONDS = 7.0 * 3600  # the 4-class subset, ~4.6 s per utterance






def plain_read(path: Path, ids: list[str], layers: list[int] | None, *, cold: bool) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and bytes to read `layers` of every id with FeatureCache (float16 as stored)."""
    if cold:
        drop_pages(path)
    with FeatureCache(path) as cache:
        start, cpu = time.perf_counter(), time.process_time()
        nbytes = sum(cache.features(u, layers).nbytes for u in ids)
        return time.perf_counter() - start, time.process_time() - cpu, nbytes


def epoch_time(cache: FeatureCache, config: TrainConfig, layers: list[int], repeats: int) -> tuple[float, float, int]:
    """Wall and CPU seconds of one training epoch (fold 1) from the preloaded cache, and its frame count.

    CPU seconds (all threads of this process) are what the epoch costs without
    other processes competing; the fastest of `repeats` epochs counts.
    """
    data = fold_data(cache, 1)
    trainer = FeatureTrainer(config, data, cache=cache, layers=layers)
    walls, cpus = [], []
    for epoch in range(1, repeats + 1):
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train_epoch(epoch)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    frames = int(cache.meta.loc[data.train, "n_frames"].sum())
    return min(walls), min(cpus), frames










def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--utts", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2, help="epochs timed per head; the fastest counts")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sapser-bench"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/train-head-cpu.md"))
    ap.add_argument("--sap-repeats", type=int, default=3, help="passes per SAP case; the fastest counts")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--sap-only", action="store_true", help="only SAP's attention; rewrites just that section")
    group.add_argument("--no-sap", action="store_true", help="skip SAP's attention alone")
    ap.add_argument("--sap-reuse", action="store_true", help="report the SAP cases saved in --dir by the last run")
    group.add_argument("--layer-scaling", action="store_true",
                       help="all layers (default head) vs one layer on a cache over --memory-gb; rewrites that section")
    ap.add_argument("--memory-gb", type=float, default=0.5, help="--layer-scaling: the trainer's RAM budget")
    ap.add_argument("--epochs", type=int, default=2, help="--layer-scaling: epochs timed per case; the fastest counts")
    ap.add_argument("--poolings", default="gap,sr", help="--layer-scaling: heads to time")
    ap.add_argument("--cases", default="one,probe,pooled,joint", help="--layer-scaling: one, probe, pooled, joint")
    ap.add_argument("--device", default="cpu", help="--layer-scaling: cpu or cuda")
    ap.add_argument("--threads", type=int, default=0,
                    help="--layer-scaling: torch threads per case (0: torch's default; 1 is steadier on a busy machine)")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.layer_scaling:
        layer_scaling(args)
        return
    saved = args.dir / "sap-cases.json"
    if args.sap_only:
        write_section(args.out, SAP_SECTION, sap_report(sap_shapes(args.sap_repeats, saved, args.sap_reuse), args.sap_repeats))
        print(f"wrote {args.out}")
        return
    path = build_cache(args.dir / f"bench-{args.utts}-{args.layers}-{args.dim}-{args.frames}.h5",
                       utts=args.utts, layers=args.layers, dim=args.dim, frames=args.frames)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    all_layers = list(range(args.layers))
    fixed = [args.layers - 1]

    with FeatureCache(path) as cache:
        train_ids = fold_data(cache, 1).train
        total_frames = int(cache.meta["n_frames"].sum())
    rows = []
    reads = {}
    for name, layers in (("all layers", all_layers), ("one layer", fixed)):
        cold, _, nbytes = plain_read(path, train_ids, layers, cold=True)
        warm, warm_cpu, _ = plain_read(path, train_ids, layers, cold=False)
        reads[name] = (cold, warm, warm_cpu, nbytes)

    configs = [  # min_steps 0: an epoch at the paper's batch 64 (the step plan would shrink it on this small cache)
        ("SR + mix of all layers (default)", TrainConfig(pooling="sr", device=device, min_steps=0), all_layers, "all layers"),
        ("GAP + mix of all layers", TrainConfig(pooling="gap", device=device, min_steps=0), all_layers, "all layers"),
        ("SR, one fixed layer", TrainConfig(pooling="sr", layer=fixed[0], device=device, min_steps=0), fixed, "one layer"),
        ("GAP, one fixed layer", TrainConfig(pooling="gap", layer=fixed[0], device=device, min_steps=0), fixed, "one layer"),
    ]
    preload_s = {}
    for label, config, layers, read_key in configs:
        with FeatureCache(path) as cache:
            start = time.perf_counter()
            if not preload(cache, layers, memory_gb=16):
                raise SystemExit("the bench cache does not fit 16 GB; use fewer --utts or --layers")
            preload_s[read_key] = time.perf_counter() - start
            wall, cpu, frames = epoch_time(cache, config, layers, args.repeats)
        cold, warm, warm_cpu, nbytes = reads[read_key]
        again = plain_read(path, train_ids, layers, cold=False)  # re-measured under the load of the moment
        warm, warm_cpu = min(warm, again[0]), min(warm_cpu, again[1])
        rows.append((label, read_key, wall, cpu, frames, cold, warm, warm_cpu, nbytes))
        print(f"{label}: epoch {wall:.2f} s wall / {cpu:.2f} s CPU, read cold {cold:.2f} s / warm {warm:.2f} s "
              f"({warm_cpu:.2f} s CPU, {nbytes / 2**30:.2f} GiB)", flush=True)

    scaling = section(args.out.read_text() if args.out.exists() else "", SCALING_SECTION)
    write_report(args, path, device, rows, preload_s, total_frames)
    if scaling:  # measured by its own invocation (--layer-scaling): keep it
        write_section(args.out, SCALING_SECTION, scaling.splitlines())
    if not args.no_sap:
        write_section(args.out, SAP_SECTION, sap_report(sap_shapes(args.sap_repeats, saved, args.sap_reuse), args.sap_repeats))


def write_report(args, path: Path, device: str, rows, preload_s, total_frames: int) -> None:
    threads = torch.get_num_threads()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Head training: one epoch vs a plain read of the same features",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {threads} torch threads, "
        f"device `{device}`. Cache: {args.utts} synthetic utterances, 10 speakers / 5 sessions, median "
        f"{args.frames} frames (log-normal, 50-950), {total_frames} frames in all, {args.layers} layers x "
        f"D = {args.dim}, float16, ~65% speech frames; {path.stat().st_size / 2**30:.2f} GiB on disk. "
        "Fold 1's training split (8 of 10 speakers); batch 64; length-bucketed batches; features "
        "preloaded into RAM before the epoch (the trainer's default when they fit `--memory-gb`). "
        "Read = `FeatureCache.features` of the same utterances and layers (cold: pages dropped with "
        "posix_fadvise; warm: from the page cache). Epochs: the fastest of "
        f"{args.repeats}. Load average when it finished: {load} (the machine is shared; expect noise).",
        "",
        "| head | layers read | epoch wall (s) | epoch CPU (s) | frames/s (wall) | read cold (s) | read warm (s) | read warm CPU (s) | GiB | epoch / cold read (wall) | epoch / warm read (CPU time) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, key, wall, cpu, frames, cold, warm, warm_cpu, nbytes in rows:
        lines.append(f"| {label} | {key} | {wall:.2f} | {cpu:.2f} | {frames / wall:,.0f} | {cold:.2f} | {warm:.2f} | "
                     f"{warm_cpu:.2f} | {nbytes / 2**30:.2f} | {wall / cold:.1f}x | {cpu / max(warm_cpu, 1e-9):.1f}x |")
    lines += ["", f"Preload into RAM: all layers {preload_s['all layers']:.2f} s, one layer "
                  f"{preload_s['one layer']:.2f} s. Peak RSS of the whole benchmark: {peak_rss_gb():.2f} GiB.", ""]
    # Extrapolation: cost per training frame x IEMOCAP's training frames per fold x epochs x folds.
    iemocap_frames = IEMOCAP_SECONDS * FRAMES_PER_SECOND
    train_frames = 0.8 * iemocap_frames  # 8 of 10 speakers
    lines += ["## All folds on IEMOCAP (extrapolated)", "",
              f"IEMOCAP's 4 classes: {IEMOCAP_UTTS} utterances, ~7.0 h = {iemocap_frames / 1e6:.2f} M frames; "
              "a fold trains on ~80% of them. Per fold: up to 30 epochs (early stopping usually ends "
              "earlier) plus a validation pass per epoch (~10% of the frames, forward only, ~1/3 of a "
              "training frame's cost).", "",
              "| head | one epoch | one fold, 30 epochs | 10 folds, 30 epochs | 10 folds, ~15 epochs (early stop) |",
              "|---|---:|---:|---:|---:|"]
    for label, _, wall, cpu, frames, *_ in rows:
        # wall time as measured on this (shared) machine, and CPU time / threads: the same epoch uncontended
        scale = train_frames * (1 + 0.1 / 0.8 / 3) / frames
        measured, quiet = wall * scale, cpu / threads * scale
        lines.append(f"| {label} | {_fmt(measured)} ({_fmt(quiet)}) | {_fmt(30 * measured)} ({_fmt(30 * quiet)}) | "
                     f"{_fmt(300 * measured)} ({_fmt(300 * quiet)}) | {_fmt(150 * measured)} ({_fmt(150 * quiet)}) |")
    lines += ["", "Each cell: from the measured wall time (in parentheses: from CPU time / torch threads, what the "
              "same work takes when no other process competes for the cores)."]
    lines += ["", "Memory: IEMOCAP's 1.26 M frames x 1024 x 2 bytes = 2.6 GB per layer in float16, 64 GB for all "
              "25 layers: one layer (or a few) preloads into this machine's RAM, all 25 do not, and the "
              "trainer then reads from disk every epoch (the table's cold read per layer, x25).", ""]
    lines += gpu_estimate(args.dim)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def gpu_estimate(dim: int) -> list[str]:
    """Arithmetic and bandwidth bounds for an H100 (estimate only, nothing was run on one)."""
    frames = IEMOCAP_SECONDS * FRAMES_PER_SECOND * 0.8
    speech = 0.65
    # SAP: Q and K projections 4 D^2 FLOP per speech frame forward (V and the output projection run once
    # per utterance, see heads/model/pooling.py), attention logits and their mean ~4 S D (S ~ 160 speech
    # frames); backward ~2x forward. GAP/mix/projection are negligible next to it.
    flop = frames * speech * 3 * (4 * dim * dim + 4 * 160 * dim)
    tflops = 100e12  # a realistic TF32 rate for these shapes, about a quarter of the dense peak
    mix_bytes = frames * 25 * dim * 2  # every layer of every frame once per epoch
    hbm, pcie = 3.0e12, 25e9
    compute_s = flop / tflops
    return [
        "## On a GPU (an estimate, not a measurement)", "",
        f"SR's cost is the SAP self-attention: ~{flop / 1e12:.0f} TFLOP per IEMOCAP training epoch "
        f"(Q/K projections 4·D² FLOP per speech frame forward, x3 with backward). At a realistic ~100 TFLOP/s "
        f"(TF32) on an H100 that is ~{compute_s:.1f} s per epoch. The learnable mix of 25 layers reads "
        f"{mix_bytes / 1e9:.0f} GB per epoch: ~{mix_bytes / hbm:.2f} s if the features sit in GPU memory "
        f"(fits an H200's 141 GB; an H100's 80 GB only with fewer layers), ~{mix_bytes / pcie:.0f} s over "
        f"PCIe from host RAM. So an all-folds IEMOCAP run (10 folds x up to 30 epochs) is roughly "
        f"{300 * (compute_s + mix_bytes / hbm) / 60:.0f}-{300 * (compute_s + mix_bytes / pcie) / 60:.0f} "
        "minutes with all 25 layers mixed and a few minutes with one layer, before Python and "
        "data-loading overheads; `--jobs` lets several folds share one GPU.",
    ]


def _fmt(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    main()
