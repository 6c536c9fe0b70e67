"""Could a Whisper encoder run on a window shorter than 30 s? What it would save and what it would change.

Whisper's encoder was trained only on zero-padded 30 s windows (1500 frames,
sinusoidal positions 0-1499) and has no attention mask: every frame attends
to the padding too. The extraction backend (extract/whisper.py) therefore
always pads to 30 s, so a 3 s utterance costs 30 s of encoder compute. This
bench runs the same encoder modules on a shorter window (the utterance padded
to the next multiple of `--round` seconds, positions 0..T-1: how "shorter
window" speedups are usually done) and compares every hidden state of the
real frames against the 30 s window, and the time of both.

    python bench/whisper_window.py --model /tmp/whisper-base --manifest CORPUS/manifest.csv [--n 20] [--round 1]

Prints, per hidden state, the median over utterances of the frames' cosine
similarity and of the relative error ||short - full|| / ||full||, plus the
encoder time per utterance of both windows.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]  # bench/extract.py

from extract.audio import load_audio  # noqa: E402
from extract.whisper import load_encoder, log_mel  # noqa: E402


@torch.inference_mode()
def hidden_states(encoder, mel: torch.Tensor) -> torch.Tensor:
    """(1, M, F) log-mel of any even length F <= 3000 -> (L, F / 2, D): the encoder's modules, positions 0..F/2-1."""
    x = torch.nn.functional.gelu(encoder.conv1(mel))
    x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)  # (1, T, D)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    states = [x]
    for layer in encoder.layers:
        x = layer(x, None)
        states.append(x)
    states[-1] = encoder.layer_norm(x)  # the last one after the final layer norm, as the backend stores it
    return torch.cat(states)  # (L, T, D)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face Whisper folder or hub id")
    ap.add_argument("--manifest", required=True, type=Path, help="a manifest CSV (path column) of real speech")
    ap.add_argument("--n", type=int, default=20, help="utterances (the first n rows)")
    ap.add_argument("--round", type=float, default=1.0, help="the short window: length rounded up to this many s")
    args = ap.parse_args(argv)

    encoder, fe = load_encoder(args.model)
    encoder.eval()
    filters = torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32))
    with args.manifest.open() as fh:
        paths = [args.manifest.parent / r["path"] for r in csv.DictReader(fh)][: args.n]
    cos, rel, t_full, t_short, seconds = [], [], [], [], []
    for path in paths:
        wave = torch.from_numpy(load_audio(path, max_seconds=30.0).samples)
        n = len(wave)
        frames = math.ceil(n / 320)
        step = int(args.round * 16000)
        short_len = min(480000, math.ceil(n / step) * step)
        timings = []
        outs = []
        for length in (480000, short_len):
            x = torch.zeros(1, length)
            x[0, :n] = wave
            start = time.perf_counter()
            states = hidden_states(encoder, log_mel(x, filters, 400, 160))[:, :frames]  # (L, T, D)
            timings.append(time.perf_counter() - start)
            outs.append(states)
        full, short = outs
        cos.append(torch.nn.functional.cosine_similarity(full, short, dim=-1).mean(dim=1).numpy())  # (L,)
        rel.append((torch.linalg.vector_norm(full - short, dim=(1, 2))
                    / torch.linalg.vector_norm(full, dim=(1, 2))).numpy())
        t_full.append(timings[0])
        t_short.append(timings[1])
        seconds.append(n / 16000)
    cos_m, rel_m = np.median(np.stack(cos), axis=0), np.median(np.stack(rel), axis=0)
    print(f"{len(paths)} utterances, {np.mean(seconds):.2f} s on average; short window = length rounded up to "
          f"{args.round:g} s")
    # Alternated per utterance; the median ratio and the fastest of each resist a machine shared with other jobs.
    ratio = np.median(np.array(t_full) / np.array(t_short))
    print(f"encoder time per utterance (fastest of {len(paths)}): 30 s window {min(t_full):.2f} s, "
          f"short window {min(t_short):.2f} s; median ratio {ratio:.1f}x")
    print("| hidden state | median cosine (short vs 30 s) | median relative error |")
    print("|---|---|---|")
    for layer, (c, r) in enumerate(zip(cos_m, rel_m)):
        print(f"| {layer} | {c:.4f} | {r:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
