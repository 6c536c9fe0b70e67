"""Extraction speed: `cli extract` at its defaults against the loop a user writes by hand.

    python bench/extract.py                                  # CPU: ~5 and ~30 min of speech, WavLM Base dims
    python bench/extract.py --minutes 5 --repeats 3          # the short corpus only
    python bench/extract.py --device cuda --arch large --amp bf16 --minutes 30   # GPU (bench/gpu.sh)
    python bench/extract.py --dry-run --results /tmp/x.md    # tiny model and corpus, seconds (tests)

Two commands, each a fresh process, alternated (plain, ours, ours, plain, ...) on the
same files and the same saved model, best of --repeats each:

- plain: `bench/plain_loop.py` (soundfile, soxr, the checkpoint's feature extractor,
  the model at batch 1 with all hidden states, one float16 .npy per file);
- ours: `python cli.py extract --dataset manifest --root CSV --model DIR --out F.h5 --json`
  at its DEFAULT settings (plus --device/--amp when given), which also computes the
  four VAD masks and writes the resumable HDF5 cache. Its default precision is
  `--amp auto` (bf16 on a GPU and on a CPU with native bfloat16, else float32); the
  plain loop computes in float32 unless --amp says otherwise. Each table says which
  precision each command ran in.

Reported per corpus: whole-process wall time (start-up, imports, model loading,
finishing the file: what a user waits for), the steady-state rate (audio seconds per
second inside each program's own loop), the time outside the loop, peak RSS (wait4)
and, with nvidia-smi, peak GPU memory used (sampled every 0.2 s); the 1-minute load
average before each run, since this is meant to be rerun on a quiet machine.

Audio: real speech from espeak-ng (Debian package), plain neutral sentences in several
voices, 1-4 sentences per utterance (IEMOCAP-like spread of lengths, ~5 s mean), with
room noise (bench/speech_corpus.py's `speak` and `room`). Without espeak-ng the
project's synthetic corpus is used and the report says so. Model: random weights with
a WavLM architecture (speed depends on the architecture, not on the values), saved
locally with its feature-extractor config.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # the repository ahead of bench/: this file would shadow the extract package

ARCHS = {
    # WavLM Base dimensions with Large's layer-norm front end (as in issue 10's measurement)
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    # microsoft/wavlm-large's architecture
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


# --------------------------------------------------------------------------- inputs


def save_model(path: Path, arch: str) -> Path:
    """A random-weight WavLM of `arch` (or the tests' tiny one) saved with from_pretrained's layout."""
    if (path / "config.json").exists():
        return path
    if arch == "tiny":
        from extract.backends import tiny_wavlm

        return tiny_wavlm(path)
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    config = WavLMConfig(feat_extract_norm="layer", do_stable_layer_norm=True, **ARCHS[arch])
    torch.manual_seed(0)
    WavLMModel(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return path


def speech_corpus(folder: Path, minutes: float, seed: int = 0) -> tuple[Path, str]:
    """About `minutes` of espeak-ng speech as a manifest corpus; (manifest, description)."""
    import numpy as np
    import soundfile as sf

    sys.path.insert(1, str(BENCH))
    from speech_corpus import ACCENTS, SENTENCES, VARIANTS, room, speak

    manifest = folder / "manifest.csv"
    if not manifest.exists():
        rng = np.random.default_rng(seed)
        voices = [f"{a}+{v}" for a in ACCENTS for v in VARIANTS["F"][:2] + VARIANTS["M"][:2]]
        jobs, total = [], 0.0
        while total < minutes * 60:  # ~3 s per sentence: plan lengths first, render in parallel
            k = int(rng.choice([1, 1, 1, 2, 2, 3, 4]))
            text = " ".join(SENTENCES[int(i)] for i in rng.integers(len(SENTENCES), size=k))
            jobs.append((len(jobs), voices[int(rng.integers(len(voices)))], text, int(rng.integers(2**31))))
            total += 2.6 * k + 0.7

        def render(job):
            i, voice, text, noise_seed = job
            x = room(speak(voice, f"<speak>{text}</speak>"), np.random.default_rng(noise_seed))
            path = Path("wav") / f"u{i:05d}.wav"
            sf.write(folder / path, x, 16000, subtype="PCM_16")
            return {"path": path.as_posix(), "speaker": f"spk{i % 8}", "emotion": "neutral",
                    "utt_id": f"u{i:05d}", "seconds": len(x) / 16000}

        (folder / "wav").mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            rows = list(pool.map(render, jobs))
        with manifest.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["path", "speaker", "emotion", "utt_id"])
            w.writeheader()
            w.writerows([{k: r[k] for k in w.fieldnames} for r in rows])
    return manifest, "espeak-ng speech (neutral sentences, 1-4 per utterance, several voices, room noise)"


def synthetic_corpus(folder: Path, minutes: float) -> tuple[Path, str]:
    from extract.synthetic import generate

    manifest = folder / "manifest.csv"
    if not manifest.exists():
        per_speaker = max(2, round(minutes * 60 / 4 / 5.0))
        manifest = generate(folder, seed=0, n_sessions=2, utts_per_speaker=per_speaker,
                            speech_seconds=(1.5, 6.0), silence_seconds=(0.2, 1.2))
    return manifest, "the project's synthetic corpus (a dry run, or espeak-ng is not installed)"


def corpus_stats(manifest: Path) -> tuple[int, float]:
    import soundfile as sf

    rows = list(csv.DictReader(manifest.open()))
    return len(rows), sum(sf.info(manifest.parent / r["path"]).duration for r in rows)


# --------------------------------------------------------------------------- running one command


class GpuMemory:
    """Peak memory used on GPU 0 by anything (nvidia-smi, every 0.2 s): the same meter for both commands."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.peak_mb = max(self.peak_mb or 0.0, float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return


def timed(cmd: list[str]) -> dict:
    """Run `cmd` to the end: wall seconds from start to exit, peak RSS of its largest process
    (wait4: the command and the children it reaped), peak GPU memory, its JSON output."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, GpuMemory() as gpu:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        text, errors = out.read().strip(), err.read()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{errors[-3000:]}")
    result = json.loads(text) if text.startswith("{") else json.loads(text.splitlines()[-1])
    return {"wall": wall, "result": result, "load": load, "gpu_peak_mb": gpu.peak_mb,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def run_plain(manifest: Path, model: Path, out: Path, opts) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(BENCH / "plain_loop.py"), str(manifest), str(model), str(out),
           "--device", opts.device, "--amp", opts.amp]
    r = timed(cmd)
    res = r.pop("result")
    compute = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}[opts.amp]
    return {**r, "audio_seconds": res["audio_seconds"], "loop_seconds": res["loop_seconds"], "compute": compute}


def run_ours(manifest: Path, model: Path, out: Path, opts, extra: list[str]) -> dict:
    for p in (out, out.with_suffix(".parts"), out.with_suffix(".data"), out.with_name(out.name + ".lock")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", "--dataset", "manifest", "--root", str(manifest),
           "--model", str(model), "--out", str(out), "--json", *extra]
    if opts.device != "cpu":
        cmd += ["--device", opts.device]
    if opts.amp != "none":
        cmd += ["--amp", opts.amp]
    r = timed(cmd)
    res = r.pop("result")
    audio = res["audio_hours"] * 3600
    return {**r, "audio_seconds": audio, "loop_seconds": audio / res["x_real_time"], "policy": res["policy"],
            "compute": res.get("compute_dtype", "float32")}


# --------------------------------------------------------------------------- the report


def machine() -> str:
    import torch

    from bench.machine import cpu_name

    cpu = cpu_name()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads by default")


def corpus_table(name: str, desc: str, n: int, seconds: float, runs: dict[str, list[dict]], repeats: int) -> list[str]:
    best = {k: min(v, key=lambda r: r["wall"]) for k, v in runs.items()}
    steady = {k: max(r["audio_seconds"] / r["loop_seconds"] for r in v) for k, v in runs.items()}
    lines = [
        f"### {name}: {n} utterances, {seconds / 60:.1f} min ({seconds / n:.1f} s mean)",
        "",
        f"Audio: {desc}.",
        "",
        "| command | compute | whole process, best (s) | x real time, whole | steady state, best (x real time) | "
        "outside the loop (s) | peak RSS MiB | peak GPU MiB | every run: wall s (steady x) @ load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k, b in best.items():
        every = ", ".join(f"{r['wall']:.1f} ({r['audio_seconds'] / r['loop_seconds']:.2f}x) @ {r['load']:.1f}"
                          for r in runs[k])
        gpu = f"{b['gpu_peak_mb']:.0f}" if b.get("gpu_peak_mb") else "-"
        lines.append(f"| {k} | {b.get('compute', '?')} | {b['wall']:.1f} | {seconds / b['wall']:.2f} | {steady[k]:.2f} | "
                     f"{b['wall'] - b['loop_seconds']:.1f} | {b['peak_rss_mb']:.0f} | {gpu} | {every} |")
    lines.append("")
    for k in best:
        if k != "plain":
            lines.append(f"**{k} / plain: {best['plain']['wall'] / best[k]['wall']:.2f}x whole process, "
                         f"{steady[k] / steady['plain']:.2f}x steady state** (best of {repeats} each).")
    policy = next((r["policy"] for r in runs.get("ours", []) if "policy" in r), None)
    if policy:
        lines += ["", f"ours ran with its default policy: {policy}."]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=[*ARCHS, "tiny"], default="base")
    ap.add_argument("--minutes", default="5,30", help="corpus sizes in minutes, comma-separated")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each command per corpus (alternating)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                    help="autocast of the plain loop [default: none, float32], and of ours when not none "
                         "(without it ours runs at its default, --amp auto)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="also run `cli extract` with these extra options, e.g. 'old=--batch-seconds 100 --streams 1 --workers 1'")
    ap.add_argument("--work", type=Path, default=None, help="folder for corpora, model and outputs [default: a temp dir]")
    ap.add_argument("--results", type=Path, default=None, help="[default: bench/results/extract-<device>.md]")
    ap.add_argument("--dry-run", action="store_true", help="tiny model, tiny synthetic corpus, one run each (tests)")
    opts = ap.parse_args()
    if opts.dry_run:
        opts.arch, opts.minutes, opts.repeats = "tiny", "0.1", 1

    work = opts.work or Path(tempfile.mkdtemp(prefix="sapser-bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    model = save_model(work / f"model-{opts.arch}", opts.arch)
    variants = {"ours": []}
    for spec in opts.variant:
        name, _, args = spec.partition("=")
        variants[name] = args.split()
    sections = []
    for minutes in [float(m) for m in opts.minutes.split(",")]:
        folder = work / f"corpus-{minutes:g}min"
        folder.mkdir(exist_ok=True)
        speech = shutil.which("espeak-ng") and not opts.dry_run
        manifest, desc = speech_corpus(folder, minutes) if speech else synthetic_corpus(folder, minutes)
        n, seconds = corpus_stats(manifest)
        runs: dict[str, list[dict]] = {"plain": [], **{k: [] for k in variants}}
        names = ["plain", *variants]
        for rep in range(opts.repeats):  # plain, ours, ..., then reversed: drifting load hits both
            for name in names if rep % 2 == 0 else names[::-1]:
                if name == "plain":
                    r = run_plain(manifest, model, work / "plain-out", opts)
                else:
                    r = run_ours(manifest, model, work / f"{name}.h5", opts, variants[name])
                runs[name].append(r)
                print(f"{minutes:g} min {name}: wall {r['wall']:.1f} s, steady "
                      f"{r['audio_seconds'] / r['loop_seconds']:.2f}x, load {r['load']:.1f}", flush=True)
        sections += corpus_table(f"{minutes:g}-minute corpus", desc, n, seconds, runs, opts.repeats)
    device = opts.device.split(":")[0]
    lines = [
        f"# Extraction: `cli extract` at its defaults vs the plain loop ({device})",
        "",
        f"Command: `python bench/extract.py {' '.join(sys.argv[1:])}`",
        "",
        f"- Machine: {machine()}.",
        f"- Model: random-weight WavLM, `{opts.arch}` architecture "
        f"({ARCHS.get(opts.arch, 'tiny: 2 layers, 32 wide')}), layer-norm front end, every hidden state kept; "
        "compute precision per command in the tables (ours: what `--amp auto` chose); stored as float16 by both.",
        "- plain = bench/plain_loop.py; ours = `cli extract` at its defaults (it also computes four VAD masks).",
        "- Whole process: from starting the command to its exit. Steady state: audio seconds per second in "
        "each program's own loop (reading audio to writing features). Best of the runs; the load is the "
        "1-minute load average when each run started.",
        "",
        *sections,
    ]
    text = "\n".join(lines)
    results = opts.results or ROOT / "bench" / "results" / f"extract-{device}.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    print(text)
    if opts.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
