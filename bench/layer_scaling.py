"""All layers vs one layer on a cache larger than the memory budget (`bench/train_head.py --layer-scaling`).

Each case runs in a fresh process (`python -m bench.layer_scaling --case JSON`): its own
peak RSS and /proc/self/io counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.head_bench import build_cache, drop_pages, peak_rss_gb, phases, write_section
from cache.reader import FeatureCache
from heads.config import TrainConfig
from heads.train.batches import preload
from heads.train.feature_trainer import FeatureTrainer
from heads.train.folds import fold_data

REPO = Path(__file__).resolve().parents[1]


SCALING_SECTION = "## All layers vs one layer, cache larger than the memory budget"
SCALING_CASES = {  # name -> (layer_weights, one layer?)
    "one": ("probe", True),
    "probe": ("probe", False),
    "pooled": ("pooled", False),
    "joint": ("joint", False),
}


def io_bytes() -> tuple[int, int]:
    """(rchar, read_bytes) of this process: bytes read from files, and from storage."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"]), int(fields["read_bytes"])


def scaling_case(path: str, case: str, pooling: str, memory_gb: float, epochs: int, device: str,
                 threads: int = 0) -> dict:
    """One case in this (fresh) process: set-up, then `epochs` timed epochs after dropping the cache's pages."""
    if threads:
        torch.set_num_threads(threads)
    weights, one = SCALING_CASES[case]
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with FeatureCache(path) as cache:
        layers = [cache.layers[-1]] if one else list(cache.layers)
        config = TrainConfig(pooling=pooling, layer=layers[0] if one else None, layer_weights=weights,
                             memory_gb=memory_gb, device=device, min_steps=0)  # the epoch at the configured batch
        drop_pages(Path(path))
        io0, start = io_bytes(), time.perf_counter()
        in_ram = preload(cache, layers, memory_gb)
        trainer = FeatureTrainer(config, fold_data(cache, 1), cache=cache, layers=layers)
        sync()
        setup_s, io1 = time.perf_counter() - start, io_bytes()
        walls, cpus, reads = [], [], []
        for epoch in range(1, epochs + 1):
            drop_pages(Path(path))
            before, start, cpu = io_bytes(), time.perf_counter(), time.process_time()
            trainer.train_epoch(epoch)
            trainer.predict("val")
            sync()
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
            after = io_bytes()
            reads.append((after[0] - before[0], after[1] - before[1]))
        train_frames = int(cache.meta.loc[trainer.data.train, "n_frames"].sum())
        return {
            "case": case, "pooling": pooling, "layers": len(layers), "preloaded": in_ram,
            "setup_s": setup_s, "prepare_s": trainer.input_seconds, "setup_read": [io1[0] - io0[0], io1[1] - io0[1]],
            "epoch_s": walls, "epoch_cpu_s": cpus, "epoch_read": reads, "train_frames": train_frames,
            "mixed_in": getattr(trainer, "mixed_frames_in", ""), "peak_rss_gib": peak_rss_gb(),
            "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "cache_gib": Path(path).stat().st_size / 2**30, "threads": torch.get_num_threads(), "device": device,
        }


def layer_scaling(args) -> None:
    path = build_cache(args.dir / f"bench-{args.utts}-{args.layers}-{args.dim}-{args.frames}.h5",
                       utts=args.utts, layers=args.layers, dim=args.dim, frames=args.frames)
    results = []
    for pooling in args.poolings.split(","):
        for case in args.cases.split(","):  # in a fresh process each: its own peak RSS and I/O counters
            spec = json.dumps([str(path), case, pooling, args.memory_gb, args.epochs, args.device, args.threads])
            out = subprocess.run([sys.executable, "-m", "bench.layer_scaling", "--case", spec],
                                 check=True, capture_output=True, text=True, cwd=REPO).stdout
            r = json.loads(out.strip().splitlines()[-1])
            results.append(r)
            print(f"{pooling} {case}: set-up {r['setup_s']:.1f} s, epoch {min(r['epoch_s']):.2f} s, "
                  f"read/epoch {r['epoch_read'][-1][0] / 2**30:.2f} GiB, peak RSS {r['peak_rss_gib']:.2f} GiB",
                  flush=True)
    (args.dir / "scaling-cases.json").write_text(json.dumps(results, indent=1))
    write_section(args.out, SCALING_SECTION, scaling_report(args, path, results))
    print(f"wrote {args.out}")


def scaling_report(args, path: Path, results: list[dict]) -> list[str]:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    r0 = results[0]
    lines = [
        SCALING_SECTION, "",
        f"`python bench/train_head.py --layer-scaling --utts {args.utts} --layers {args.layers} --dim {args.dim} "
        f"--frames {args.frames} --memory-gb {args.memory_gb:g} --epochs {args.epochs} --device {args.device}"
        + (f" --threads {args.threads}" if args.threads else "") + "`. "
        f"IEMOCAP-shaped synthetic cache (10 speakers / 5 sessions, median {args.frames} frames, log-normal "
        f"50-950): {args.utts} utterances x {args.layers} layers x D = {args.dim}, float16, "
        f"{r0['cache_gib']:.2f} GiB on disk against `--memory-gb {args.memory_gb:g}`, so all layers are read "
        "from disk and one layer is preloaded. Fold 1 (8 training speakers), batch 64, default settings. "
        "Each case in a fresh process; every epoch (training + validation pass) starts after the cache "
        "file's pages are dropped. Set-up = preload + the trainer's construction (for the default: "
        "normalization statistics and utterance means in one pass, layer weights learned on the means, "
        "the mixed frames written once); epoch = the fastest of "
        f"{args.epochs}. Device `{args.device}`, {r0['threads']} torch threads, load average when it finished: "
        f"{load} (shared machine: compare within a row).", "",
        "| head | case | layers | set-up (s) | of which: scan / weights / mix (s) | epoch wall (s) | epoch CPU (s) | epoch / one-layer epoch | "
        "read per epoch (GiB, rchar / storage) | set-up read (GiB) | 30 epochs incl. set-up / one layer's | "
        "peak RSS (GiB) | mixed frames in |" + (" peak GPU (GiB) |" if args.device.startswith("cuda") else ""),
        "|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---|" + ("---:|" if args.device.startswith("cuda") else ""),
    ]
    by = {(r["pooling"], r["case"]): r for r in results}
    for r in results:
        base = by.get((r["pooling"], "one"))
        epoch = min(r["epoch_s"])
        ratio = epoch / min(base["epoch_s"]) if base else float("nan")
        total = (r["setup_s"] + 30 * epoch) / (base["setup_s"] + 30 * min(base["epoch_s"])) if base else float("nan")
        rchar, stor = r["epoch_read"][-1]
        label = {"one": "one layer", "probe": "all layers, default (probe weights)", "pooled": "all layers, pooled weights",
                 "joint": "all layers, joint weights"}[r["case"]]
        lines.append(
            f"| {r['pooling'].upper()} | {label} | {r['layers']} | {r['setup_s']:.1f} | {phases(r['prepare_s'])} | "
            f"{epoch:.2f} | "
            f"{min(r['epoch_cpu_s']):.2f} | **{ratio:.2f}x** | {rchar / 2**30:.2f} / {stor / 2**30:.2f} | "
            f"{r['setup_read'][0] / 2**30:.2f} | {total:.2f}x | {r['peak_rss_gib']:.2f} | {r['mixed_in'] or '-'} |"
            + (f" {r['peak_gpu_gib']:.2f} |" if args.device.startswith("cuda") else ""))
    return lines + [""]


if __name__ == "__main__" and sys.argv[1:2] == ["--case"]:  # one case, in this fresh process
    print(json.dumps(scaling_case(*json.loads(sys.argv[2]))))
