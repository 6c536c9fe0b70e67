"""Extraction speed and memory: `extract_corpus` against a plain per-utterance loop.

    python bench/extract.py                     # CPU, WavLM-Base-sized random weights, ~2.5 min of audio
    python bench/extract.py --device cuda --arch large --minutes 30 --batch-seconds 400 --workers 8

Both phases run in ONE invocation on the same files and the same saved model,
each in its own subprocess so that each has its own peak RSS:

- plain: what a user writes first. For each utterance: load_audio, the
  checkpoint's feature extractor, the model at batch 1 with
  output_hidden_states, the same (T, L, D) hidden states and the same four
  VAD masks saved as one float16 .npy file per utterance.
- ours: `extract.pipeline.extract_corpus` (length-sorted batches, worker
  processes for audio + VAD, the HDF5 cache writer thread).

Reported: audio seconds per wall second (model loading excluded, writing
included), their ratio, and peak RSS of the main process and of the largest
worker. A third part runs ours on corpora of N and 3N utterances to show
that peak memory does not grow with the corpus; to fit the time budget it
uses a cheaper model of Base's width (2 layers, so 3 x 768 per frame) on
short utterances, because the writer's buffers, not the arithmetic, decide
that figure.

Random weights: speed depends on the architecture, not on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = {
    # WavLM Base dimensions, with Large's layer-norm front end so batches can be padded
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    # Base's width (768) at a fraction of its arithmetic: for the memory-scaling part
    "scale": dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=768,
                  conv_dim=(128,) * 7),
}


# --------------------------------------------------------------------------- set-up (driver)


def save_model(path: Path, arch: str) -> Path:
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    if (path / "config.json").exists():
        return path
    config = WavLMConfig(feat_extract_norm="layer", do_stable_layer_norm=True, **ARCHS[arch])
    torch.manual_seed(0)
    WavLMModel(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return path


def make_corpus(folder: Path, minutes: float, short: bool = False) -> Path:
    """The project's synthetic corpus, about `minutes` long: IEMOCAP-like ~5 s utterances
    (or ~1.5 s ones when `short`, to get many utterances quickly)."""
    from extract.synthetic import generate

    if (folder / "manifest.csv").exists():
        return folder / "manifest.csv"
    mean, speech, silence = (1.5, (0.8, 1.2), (0.1, 0.3)) if short else (5.0, (1.5, 6.0), (0.2, 1.2))
    per_speaker = max(2, round(minutes * 60 / 4 / mean))  # 4 speakers
    return generate(folder, seed=0, n_sessions=2, utts_per_speaker=per_speaker,
                    speech_seconds=speech, silence_seconds=silence)


def subset_manifest(manifest: Path, n: int) -> Path:
    """The first n rows, written beside the manifest so its relative audio paths still hold."""
    lines = manifest.read_text().splitlines()
    out = manifest.with_name(f"first-{n}.csv")
    out.write_text("\n".join(lines[: n + 1]) + "\n")
    return out


# glibc keeps freed heap blocks of a few MB (its mmap threshold rises to 32 MB after the first
# large free), so RSS creeps up with allocation churn; a fixed threshold hands them back.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_phase(args: list[str], env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        sys.exit(f"phase failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the phases (subprocesses)


class ChildRss:
    """Largest resident set of this process's children, sampled from /proc every 0.2 s.

    Not RUSAGE_CHILDREN: Linux carries a child's RSS from before its exec (a
    copy of the parent's) into its ru_maxrss, so a 40 MB audio worker spawned by
    a 1.5 GB parent would read as 1.5 GB.
    """

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChildRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(0.2):
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                except OSError:
                    continue
                if fields.get("PPid", "").strip() == me and "VmRSS" in fields:
                    self.peak_mb = max(self.peak_mb, int(fields["VmRSS"].split()[0]) / 1024)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_ours(opts: argparse.Namespace) -> dict:
    from extract.backends import load_backend
    from extract.corpora import read_corpus
    from extract.pipeline import extract_corpus

    corpus = read_corpus(opts.dataset, opts.corpus)
    backend = load_backend(opts.model, layers=None, device=opts.device, dtype=opts.amp)
    start = time.perf_counter()
    with ChildRss() as workers:
        summary = extract_corpus(corpus, opts.out, backend, max_seconds=0.0, batch_seconds=opts.batch_seconds,
                                 workers=opts.workers, shard=None, progress=False)
    wall = time.perf_counter() - start
    return {"audio_seconds": summary["audio_hours"] * 3600, "wall": wall, "utterances": summary["written"],
            "peak_rss_mb": peak_rss_mb(), "peak_rss_worker_mb": workers.peak_mb, "bytes": summary["size_bytes"]}


def phase_plain(opts: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from transformers import AutoFeatureExtractor, AutoModel

    from extract.audio import load_audio
    from extract.corpora import read_corpus
    from extract.frames import SSL_GRID
    from extract.vad import vad_masks

    corpus = read_corpus(opts.dataset, opts.corpus)
    fe = AutoFeatureExtractor.from_pretrained(opts.model)
    model = AutoModel.from_pretrained(opts.model).eval().to(opts.device)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.amp)
    seconds, n_bytes = 0.0, 0
    start = time.perf_counter()
    for utt in corpus.utterances:
        samples = load_audio(utt.path).samples
        inputs = fe(samples, sampling_rate=16000, return_tensors="pt").to(opts.device)
        with torch.inference_mode(), torch.autocast(opts.device.split(":")[0], dtype=amp or torch.float32,
                                                    enabled=amp is not None):
            result = model(**inputs, output_hidden_states=True)
        states = list(result.hidden_states[:-1]) + [result.last_hidden_state]
        feats = torch.stack(states, dim=2)[0].float().cpu().numpy()  # (T, L, D)
        np.save(out / f"{utt.utt_id}.npy", feats.astype(np.float16))
        np.save(out / f"{utt.utt_id}.vad.npy", vad_masks(samples, SSL_GRID))
        seconds += len(samples) / 16000
        n_bytes += (out / f"{utt.utt_id}.npy").stat().st_size
    wall = time.perf_counter() - start
    return {"audio_seconds": seconds, "wall": wall, "utterances": len(corpus.utterances),
            "peak_rss_mb": peak_rss_mb(), "peak_rss_worker_mb": 0.0, "bytes": n_bytes}


# --------------------------------------------------------------------------- report


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def report(opts, rows: dict, runs: dict, scaling: list[tuple[int, dict]], load: tuple[str, str]) -> str:
    lines = [
        f"# Extraction benchmark ({opts.device})",
        "",
        f"Command: `python bench/extract.py {' '.join(sys.argv[1:])}`",
        "",
        f"- Machine: {machine()}.",
        f"- Load average (1 min) before / after: {load[0]} / {load[1]} (other jobs share this machine).",
        f"- Model: random-weight WavLM, `{opts.arch}` dimensions ({ARCHS[opts.arch]}), layer-norm front end, "
        f"all {ARCHS[opts.arch]['num_hidden_layers'] + 1} hidden states; compute {opts.amp}; storage float16.",
        f"- ours: --batch-seconds {opts.batch_seconds}, --workers {opts.workers}.",
        "",
    ]
    if rows:
        lines += main_table(opts, rows, runs)
    if scaling:
        lines += [
            f"Peak memory against corpus size (ours, model `scale` {ARCHS['scale']}: 3 x 768 per frame, "
            "~1.5 s utterances; a loop that kept features would grow by ~0.45 MB per audio second), with "
            "glibc's default allocator and with `MALLOC_MMAP_THRESHOLD_=1048576`:",
            "",
            "| utterances | audio s | peak RSS main, default (MiB) | x real time | "
            "peak RSS main, fixed threshold (MiB) | x real time | peak RSS audio worker (MiB) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, (d, f) in scaling:
            lines.append(f"| {n} | {d['audio_seconds']:.0f} | {d['peak_rss_mb']:.0f} | "
                         f"{d['audio_seconds'] / d['wall']:.1f} | {f['peak_rss_mb']:.0f} | "
                         f"{f['audio_seconds'] / f['wall']:.1f} | {max(d['peak_rss_worker_mb'], f['peak_rss_worker_mb']):.0f} |")
        lines.append("")
    return "\n".join(lines)


def main_table(opts, rows: dict, runs: dict) -> list[str]:
    plain = rows["plain"]
    rate = {k: r["audio_seconds"] / r["wall"] for k, r in rows.items()}
    lines = [
        f"Audio: the synthetic corpus, {plain['utterances']} utterances, {plain['audio_seconds']:.0f} s "
        f"({plain['audio_seconds'] / plain['utterances']:.1f} s mean).",
        "",
        "| phase | audio s / s (x real time) | wall s | peak RSS main (MiB) | peak RSS audio worker (MiB) | output MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("plain", "ours"):
        r = rows[name]
        lines.append(f"| {name} | {rate[name]:.2f} | {r['wall']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_worker_mb']:.0f} | {r['bytes'] / 2**20:.0f} |")
    every = "; ".join(f"{k} " + ", ".join(f"{r['audio_seconds'] / r['wall']:.2f}" for r in v) for k, v in runs.items())
    lines += ["", f"**ours / plain = {rate['ours'] / rate['plain']:.2f}x** (best of {opts.repeats} runs each, "
              f"in the order plain, ours, ours, plain, ...; every run's x real time: {every})", ""]
    return lines


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=["ours", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default="manifest", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="base")
    parser.add_argument("--minutes", type=float, default=2.5, help="audio in the speed comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="float32", help="float32, bf16 or fp16 (autocast)")
    parser.add_argument("--batch-seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each phase (alternating order)")
    parser.add_argument("--scale", default="100,300,600", help="corpus sizes (utterances) for the memory part; '' = skip")
    parser.add_argument("--work", default=None, help="folder for corpus, model and outputs [default: a temp dir]")
    parser.add_argument("--results", default=None, help="[default: bench/results/extract-<device>.md]")
    opts = parser.parse_args()

    if opts.phase:
        result = phase_ours(opts) if opts.phase == "ours" else phase_plain(opts)
        print(json.dumps(result))
        return

    work = Path(opts.work or tempfile.mkdtemp(prefix="sapser-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    model = save_model(work / f"model-{opts.arch}", opts.arch)
    corpus = make_corpus(work / "corpus", opts.minutes)
    common = ["--model", str(model), "--device", opts.device, "--amp", opts.amp,
              "--batch-seconds", str(opts.batch_seconds), "--workers", str(opts.workers)]
    runs: dict[str, list[dict]] = {"plain": [], "ours": []}
    for rep in range(opts.repeats):  # plain, ours, ours, plain, ...: drift in machine load hits both
        for name in ("plain", "ours") if rep % 2 == 0 else ("ours", "plain"):
            out = work / f"{name}-{rep}{'.h5' if name == 'ours' else '-npy'}"
            runs[name].append(run_phase([name, "--dataset", "manifest", "--corpus", str(corpus), "--out", str(out),
                                         *common]))
            print(name, json.dumps(runs[name][-1]), flush=True)
    rows = {name: max(r, key=lambda x: x["audio_seconds"] / x["wall"]) for name, r in runs.items() if r}
    scaling = []
    if opts.scale:
        scale_model = save_model(work / "model-scale", "scale")
        sizes = [int(x) for x in opts.scale.split(",")]
        big = make_corpus(work / f"corpus-scale-{max(sizes)}", minutes=max(sizes) * 1.5 / 60, short=True)
        for n in sizes:
            csv = subset_manifest(big, n)
            common_scale = [a if a != str(model) else str(scale_model) for a in common]
            pair = []
            for tag, env in (("default", None), ("fixed", FIXED_MMAP_THRESHOLD)):
                pair.append(run_phase(["ours", "--dataset", "manifest", "--corpus", str(csv),
                                       "--out", str(work / f"scale-{n}-{tag}.h5"), *common_scale], env))
                print("scale", n, tag, json.dumps(pair[-1]), flush=True)
            scaling.append((n, pair))
    text = report(opts, rows, runs, scaling, (load_before, load_average()))
    results = Path(opts.results or ROOT / "bench" / "results" / f"extract-{opts.device.split(':')[0]}.md")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
