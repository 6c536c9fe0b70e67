"""Fine-tuning throughput and memory: optimizer steps of the real FineTuneTrainer on synthetic audio.

Writes `--utts` WAV files of `--seconds` each (noise bursts over silence, so
the VAD finds speech), then trains one fold whose training split is exactly
one optimizer step per epoch (`--utts` = `--batch-size`) and times each step
(= epoch of `Trainer.train_epoch`, so data loading, accumulation over the
audio-budgeted micro-batches, clipping and the optimizer are all in it).

For every gradient-checkpointing setting it reports: seconds per optimizer
step (median of the steps after the first), audio seconds per second
(utterances x seconds / step time), the process's CPU time per step (robust
to other load on a shared CPU when --workers 0), micro-batches per step, the peak GPU
memory (torch.cuda.max_memory_allocated) or, on CPU, the peak RSS; an
out-of-memory step is reported as such.

GPU (the paper's setting: WavLM Large architecture with random weights, 64
utterances of 19 s, bf16 autocast, frozen conv encoder):

    python bench/finetune.py --model large --device cuda --batch-size 64 --seconds 19 \\
        --step-seconds 200 --steps 4 --out bench/results/finetune-gpu.md

CPU (the tiny 2-layer WavLM, so it runs here):

    python bench/finetune.py --model tiny --device cpu --batch-size 16 --seconds 4 \\
        --step-seconds 16 --steps 4 --workers 0 --top-layers 1 --out bench/results/finetune-cpu.md
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The repository ahead of bench/: bench/extract.py would otherwise shadow the extract package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from core.folds import Fold
from core.records import CLASSES_4, Utterance
from extract.backends import tiny_wavlm
from heads.config import FinetuneSettings, finetune_config
from heads.finetune.trainer import FineTuneTrainer
from heads.finetune.waves import build_wave_index
from heads.train.folds import FoldData

SR = 16_000


def wavlm_large(path: Path) -> Path:
    """microsoft/wavlm-large's architecture (config values copied by hand), random weights."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    if (path / "config.json").exists():
        return path
    config = WavLMConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        conv_dim=(512,) * 7, conv_bias=False, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, num_buckets=320, max_bucket_distance=800,
        mask_time_prob=0.05, mask_time_length=10, layerdrop=0.1, feat_proj_dropout=0.1, hidden_dropout=0.1,
        attention_dropout=0.1, activation_dropout=0.0,
    )
    torch.manual_seed(0)
    WavLMModel(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return path


def write_audio(folder: Path, n: int, seconds: float, speaker: str, seed: int = 0) -> list[Utterance]:
    """n WAVs of exactly `seconds`: speech-like noise bursts separated by near-silence."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    utts = []
    for i in range(n):
        t = np.arange(int(seconds * SR)) / SR
        gate = (np.sin(2 * np.pi * 0.7 * t + i) > -0.2).astype(np.float32)  # ~55% "speech"
        wave = (0.2 * rng.standard_normal(len(t)) * gate + 1e-3 * rng.standard_normal(len(t))).astype(np.float32)
        path = folder / f"{speaker}-{i:03d}.wav"
        if not path.exists():
            sf.write(path, np.clip(wave, -1, 1), SR, subtype="PCM_16")
        utts.append(Utterance(utt_id=path.stem, path=str(path), speaker=speaker, session="S1",
                              emotion=CLASSES_4[i % 4], valence=1.0 + i % 5, arousal=1.0 + (2 * i) % 5))
    return utts


def fold_of(train: list[Utterance], held: list[Utterance]) -> FoldData:
    everyone = train + held
    labels = pd.DataFrame({"emotion": [CLASSES_4.index(u.emotion) for u in everyone],
                           "valence": [u.valence for u in everyone], "arousal": [u.arousal for u in everyone],
                           "speaker": [u.speaker for u in everyone]},
                          index=[u.utt_id for u in everyone])
    ids = [u.utt_id for u in held]
    return FoldData(Fold(1, "S1M", "S2F", ("S1F",)), [u.utt_id for u in train], ids, ids, labels, CLASSES_4)


def measure(model: str, args: argparse.Namespace, checkpointing: bool, work: Path, top: int | None = None) -> dict:
    train = write_audio(work / f"audio-{args.seconds:g}s", args.batch_size, args.seconds, "S1F")
    held = write_audio(work / "held", 2, 1.0, "S1M", seed=1)
    index = build_wave_index(train + held, grid_of(model), 0.0)
    settings = FinetuneSettings(model=model, full=top is None, top_layers=top or 1, step_seconds=args.step_seconds,
                                workers=args.workers, grad_checkpointing=checkpointing, amp=args.amp)
    config = finetune_config(epochs=args.steps, batch_size=args.batch_size, device=args.device, patience=args.steps)
    trainer = FineTuneTrainer(config, fold_of(train, held), settings=settings,
                              utterances={u.utt_id: u for u in train + held}, index=index, max_seconds=0.0)
    micro = len(trainer.loaders["train"])
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, status = [], [], "ok"
    for epoch in range(1, args.steps + 1):
        try:
            start, cpu_start = time.perf_counter(), time.process_time()
            trainer.train_epoch(epoch)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        except torch.OutOfMemoryError:
            status = "out of memory"
            break
    steady = times[1:] or times
    step = statistics.median(steady) if steady else float("nan")
    cpu_step = statistics.median(cpu_times[1:] or cpu_times) if cpu_times else float("nan")
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return {"mode": settings.mode, "checkpointing": checkpointing, "status": status, "step_s": step, "cpu_s": cpu_step,
            "audio_per_s": args.batch_size * args.seconds / step if times else float("nan"),
            "micro_batches": micro, "peak_gib": peak, "trainable": trainable, "steps_timed": len(steady)}


def grid_of(model: str):
    from heads.finetune.run import backbone_shape

    return backbone_shape(model)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny",
                    help="tiny, large (WavLM Large architecture, random weights) or a model folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--step-seconds", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--checkpointing", default="both", choices=("both", "on", "off"))
    ap.add_argument("--top-layers", type=int, default=None,
                    help="also measure the cheaper mode training only the top K layers (checkpointing off)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder [default: a temporary one]")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="sapser-ft-bench-"))
    if args.model == "tiny":
        model = str(tiny_wavlm(work / "tiny") if not (work / "tiny" / "config.json").exists() else work / "tiny")
    elif args.model == "large":
        model = str(wavlm_large(work / "wavlm-large-random"))
    else:
        model = args.model
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    rows = [measure(model, args, c, work) for c in modes]
    if args.top_layers:
        rows.append(measure(model, args, False, work, top=args.top_layers))

    if torch.cuda.is_available() and args.device.startswith("cuda"):
        device = torch.cuda.get_device_name()
        memory = "peak GPU memory (GiB, max_memory_allocated)"
    else:
        device = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
        memory = "peak RSS of the process so far (GiB)"
    lines = [
        f"# Fine-tuning benchmark ({args.model})",
        "",
        f"- model: {args.model} ({rows[0]['trainable']:,} trainable parameters in full mode, conv encoder frozen)",
        f"- device: {device}; torch {torch.__version__}; amp {args.amp}",
        f"- optimizer step = {args.batch_size} utterances x {args.seconds:g} s, micro-batches of <= "
        f"{args.step_seconds:g} padded audio seconds; median of {rows[0]['steps_timed']} steps after the first",
        "",
        f"| mode | gradient checkpointing | trainable parameters | status | s / optimizer step | "
        f"CPU s / step (this process) | audio s / s | micro-batches / step | {memory} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {'on' if r['checkpointing'] else 'off'} | {r['trainable']:,} | {r['status']} | "
                     f"{r['step_s']:.2f} | {r['cpu_s']:.2f} | "
                     f"{r['audio_per_s']:.1f} | {r['micro_batches']} | {r['peak_gib']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
