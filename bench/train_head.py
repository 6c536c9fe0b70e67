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

It also times SAP's attention alone (forward + backward of
`SAP.mean_attention` on a (B, S, D) batch, B = 64, 8 heads) for its two
formulations and for the dense one they replaced (which held the
(B, heads, S, S) weights), each shape and thread count in a fresh
subprocess so that its peak RSS is its own.

    python bench/train_head.py [--utts 400] [--layers 4] [--dim 1024] [--frames 250]
                               [--dir /tmp/sapser-bench] [--out bench/results/train-head-cpu.md]
                               [--sap-only | --no-sap]

Layer scaling (`--layer-scaling`, issue 13): the all-layer default head on a
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
                               [--epochs 2] [--poolings gap,sr] [--cases one,pooled,joint] [--device cpu|cuda]
                               [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

# Run as a script, bench/ comes first on sys.path and bench/extract.py would shadow the `extract` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cache.reader import FeatureCache  # noqa: E402
from cache.writer import CacheWriter  # noqa: E402
from core.records import CLASSES_4, Utterance  # noqa: E402
from heads.data import fold_data, preload  # noqa: E402
from heads.pooling import SAP, flash_pays  # noqa: E402
from heads.trainer import TrainConfig, Trainer  # noqa: E402

IEMOCAP_UTTS = 5531
IEMOCAP_SECONDS = 7.0 * 3600  # the 4-class subset, ~4.6 s per utterance
FRAMES_PER_SECOND = 50


def build_cache(path: Path, *, utts: int, layers: int, dim: int, frames: int, seed: int = 0) -> Path:
    """10 speakers / 5 sessions, class-dependent means on speech frames; reused when it exists."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 0.5, (4, dim)).astype(np.float32)
    fp = {"model": "bench-synthetic", "layers": list(range(layers)), "classes": list(CLASSES_4),
          "dtype": "float16", "utts": utts, "dim": dim, "frames": frames, "seed": seed}
    speakers = [(f"Ses0{s}{g}", f"Ses0{s}") for s in range(1, 6) for g in "FM"]
    with CacheWriter(path, fp) as writer:
        for i in range(utts):
            speaker, session = speakers[i % len(speakers)]
            c = i % 4
            # log-normal lengths: median `frames`, long tail like IEMOCAP's 1-19 s
            t = int(np.clip(rng.lognormal(math.log(frames), 0.5), 50, 950))
            x = rng.standard_normal((t, layers, dim), dtype=np.float32)
            speech = np.repeat(rng.random(t // 10 + 1) < 0.65, 10)[:t]  # 200 ms runs
            x[speech] += means[c]
            vad = np.tile(speech, (4, 1))
            utt = Utterance(utt_id=f"{speaker}_{i:05d}", path=f"/bench/{i}.wav", speaker=speaker, session=session,
                            emotion=CLASSES_4[c], valence=1.0 + c, arousal=5.0 - c, dataset="bench")
            writer.add(utt, x.astype(np.float16), vad, duration=t / FRAMES_PER_SECOND, truncated=False)
    return path


def drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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
    trainer = Trainer(config, data, cache=cache, layers=layers)
    walls, cpus = [], []
    for epoch in range(1, repeats + 1):
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train_epoch(epoch)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    frames = int(cache.meta.loc[data.train, "n_frames"].sum())
    return min(walls), min(cpus), frames


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


SAP_SECTION = "## SAP's attention alone"
SAP_SHAPES = [(80, 200), (80, 600), (80, 950), (1024, 200), (1024, 600), (1024, 950)]  # (D, S)
SAP_BATCH, SAP_HEADS = 64, 8


def dense_mean_attention(sap: SAP, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SAP.mean_attention as it was before 60c5d0b, kept to measure against: it holds the (B, H, S, S) weights."""
    B, S, D = x.shape
    H, d = sap.heads, D // sap.heads
    w_q, w_k, w_v = sap.mhsa.in_proj_weight.chunk(3)  # (D, D) each
    b_q, b_k, b_v = sap.mhsa.in_proj_bias.chunk(3)  # (D,) each
    q = F.linear(x, w_q, b_q).view(B, S, H, d).transpose(1, 2)  # (B, H, S, d)
    k = F.linear(x, w_k, b_k).view(B, S, H, d).transpose(1, 2)  # (B, H, S, d)
    keys = mask.clone()
    keys[:, 0] |= ~mask.any(dim=1)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, H, S, S)
    attn = logits.masked_fill(~keys[:, None, None, :], float("-inf")).softmax(dim=-1)  # (B, H, S, S)
    weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, S)
    abar = torch.einsum("bhij,bi->bhj", attn, weights)  # (B, H, S)
    z = torch.einsum("bhj,bjd->bhd", abar, x)  # (B, H, D)
    v = torch.einsum("bhd,hed->bhe", z, w_v.view(H, d, D)) + b_v.view(H, d) * abar.sum(-1, keepdim=True)  # (B, H, d)
    out = sap.mhsa.out_proj(v.reshape(B, D))  # (B, D)
    return out * mask.any(dim=1, keepdim=True).to(out.dtype)


SAP_FORMULATIONS = {
    "dense (before)": dense_mean_attention,
    "chunked": SAP.mean_attention_chunked,
    "flash": SAP.mean_attention_flash,
}


def sap_case(name: str, frames: int, dim: int, threads: int, repeats: int) -> dict:
    """Forward + backward seconds of one formulation (each repeat) and this process's peak RSS (run in a child)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sap = SAP(dim, SAP_HEADS)
    x = torch.randn(SAP_BATCH, frames, dim)  # (B, S, D)
    lengths = torch.randint(int(0.8 * frames), frames + 1, (SAP_BATCH,))  # a length-bucketed batch
    lengths[0] = frames
    mask = torch.arange(frames)[None, :] < lengths[:, None]  # (B, S)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB
    seconds = []
    for _ in range(repeats):
        xg = x.clone().requires_grad_(True)  # the layer mix upstream needs dL/dx
        start = time.perf_counter()
        SAP_FORMULATIONS[name](sap, xg, mask).square().sum().backward()
        seconds.append(time.perf_counter() - start)
        sap.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return {"name": name, "frames": frames, "dim": dim, "threads": threads, "seconds": seconds,
            "rss_before_mib": before, "peak_rss_mib": peak}


def sap_shapes(repeats: int, saved: Path, reuse: bool) -> list[dict]:
    """Every formulation x shape x thread count, each in a fresh process (so ru_maxrss is that case's peak).

    The raw results go to `saved`; with `reuse` they are read back from there instead of measured again.
    """
    if reuse and saved.exists():
        return json.loads(saved.read_text())
    results = []
    for threads in (1, 2):
        for dim, frames in SAP_SHAPES:
            for name in SAP_FORMULATIONS:  # interleaved, so load changes on the shared machine hit all alike
                reps = repeats if dim < 512 else max(2, repeats - 1)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--sap-case",
                       json.dumps([name, frames, dim, threads, reps])]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
                r = results[-1]
                print(f"SAP {name:15s} D={dim:5d} S={frames:4d} threads={threads}: min {min(r['seconds']):.2f} s, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    saved.write_text(json.dumps(results, indent=1))
    return results


def sap_report(results: list[dict], repeats: int) -> list[str]:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    names = list(SAP_FORMULATIONS)
    lines = [
        SAP_SECTION, "",
        f"Forward + backward (dL/dx included, as the layer mix needs it) of `SAP.mean_attention` on a batch of "
        f"B = {SAP_BATCH} utterances x S speech frames (lengths 0.8 S - S, as length bucketing gives), D features, "
        f"{SAP_HEADS} heads; float32. Time: the fastest of {repeats} passes (D = 1024: of {max(2, repeats - 1)}); "
        "peak RSS of a fresh process per case (about 0.25 GiB of it is torch and the inputs). Formulations: "
        "**dense (before)** held the (B, heads, S, S) weights; **chunked** averages before V and the output "
        "projection with a query-blocked softmax that recomputes in backward; **flash** runs V per frame and "
        "`scaled_dot_product_attention` (CPU flash kernel). `mean_attention` (auto) picks flash when "
        "D <= S (`heads/pooling.py: flash_pays`). Load average when it finished: " + load + ".", "",
        "| D | S | threads | " + " | ".join(f"{n} s" for n in names) + " | " + " | ".join(f"{n} GiB" for n in names)
        + " | auto picks | auto / dense, time | auto / dense, peak RSS |",
        "|---:|---:|---:|" + "---:|" * (2 * len(names)) + "---|---:|---:|",
    ]
    by_key = {(r["name"], r["dim"], r["frames"], r["threads"]): r for r in results}
    for threads in (1, 2):
        for dim, frames in SAP_SHAPES:
            rs = [by_key[(n, dim, frames, threads)] for n in names]
            times = [min(r["seconds"]) for r in rs]
            peaks = [r["peak_rss_mib"] / 2**10 for r in rs]
            auto = "flash" if flash_pays(frames, dim) else "chunked"
            a = names.index(auto)
            lines.append(f"| {dim} | {frames} | {threads} | " + " | ".join(f"{t:.2f}" for t in times) + " | "
                         + " | ".join(f"{m:.2f}" for m in peaks)
                         + f" | {auto} | {times[a] / times[0]:.2f} | {peaks[a] / peaks[0]:.2f} |")
    return lines + [""]


SCALING_SECTION = "## All layers vs one layer, cache larger than the memory budget"
SCALING_CASES = {  # name -> (layer_weights, one layer?)
    "one": ("pooled", True),
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
                             memory_gb=memory_gb, device=device)
        drop_pages(Path(path))
        io0, start = io_bytes(), time.perf_counter()
        in_ram = preload(cache, layers, memory_gb)
        trainer = Trainer(config, fold_data(cache, 1), cache=cache, layers=layers)
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
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--scaling-case", spec],
                                 check=True, capture_output=True, text=True).stdout
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
        label = {"one": "one layer", "pooled": "all layers, default (pooled weights)",
                 "joint": "all layers, joint weights"}[r["case"]]
        lines.append(
            f"| {r['pooling'].upper()} | {label} | {r['layers']} | {r['setup_s']:.1f} | {phases(r['prepare_s'])} | "
            f"{epoch:.2f} | "
            f"{min(r['epoch_cpu_s']):.2f} | **{ratio:.2f}x** | {rchar / 2**30:.2f} / {stor / 2**30:.2f} | "
            f"{r['setup_read'][0] / 2**30:.2f} | {total:.2f}x | {r['peak_rss_gib']:.2f} | {r['mixed_in'] or '-'} |"
            + (f" {r['peak_gpu_gib']:.2f} |" if args.device.startswith("cuda") else ""))
    return lines + [""]


def section(text: str, title: str) -> str:
    """The section `title` of a report (its heading up to the next "## " heading), or ""."""
    if title not in text:
        return ""
    body = text[text.index(title):]
    end = body.find("\n## ", len(title))
    return body if end < 0 else body[: end + 1]


def phases(seconds: dict | float) -> str:
    """prepare_inputs' phases as 'scan / weights / mix' seconds ('-' where a phase did not run)."""
    if not isinstance(seconds, dict):
        return "-"
    return " / ".join(f"{seconds[k]:.1f}" if k in seconds else "-" for k in ("scan", "weights", "materialize"))


def write_section(out: Path, title: str, lines: list[str]) -> None:
    """Replace (or append) the section `title` of an existing report, leaving the rest as it was."""
    text = out.read_text() if out.exists() else ""
    head, _, tail = text.partition(title)
    rest = tail[tail.find("\n## ") + 1 :] if "\n## " in tail else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head.rstrip("\n") + "\n\n" + "\n".join(lines) + ("\n" + rest if rest else ""))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--sap-case":  # a child of sap_shapes
        print(json.dumps(sap_case(*json.loads(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--scaling-case":  # a child of layer_scaling
        print(json.dumps(scaling_case(*json.loads(sys.argv[2]))))
        return
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
    ap.add_argument("--cases", default="one,pooled,joint", help="--layer-scaling: one, pooled, joint")
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

    configs = [
        ("SR + mix of all layers (default)", TrainConfig(pooling="sr", device=device), all_layers, "all layers"),
        ("GAP + mix of all layers", TrainConfig(pooling="gap", device=device), all_layers, "all layers"),
        ("SR, one fixed layer", TrainConfig(pooling="sr", layer=fixed[0], device=device), fixed, "one layer"),
        ("GAP, one fixed layer", TrainConfig(pooling="gap", layer=fixed[0], device=device), fixed, "one layer"),
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
    # per utterance, see heads/pooling.py), attention logits and their mean ~4 S D (S ~ 160 speech
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
