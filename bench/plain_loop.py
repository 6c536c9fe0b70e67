"""The loop a user writes by hand, the baseline of bench/extract.py (run as its own process).

For each row of a manifest CSV (path relative to the CSV): soundfile read, mono, soxr to
16 kHz, the checkpoint's own feature extractor, the model at batch 1 with
`output_hidden_states=True`, every hidden state saved as one float16 `.npy` (L, T, D).
Nothing else: no VAD, no cache, default torch threads.

    python bench/plain_loop.py MANIFEST.csv MODEL_DIR OUT_DIR [--device cpu] [--amp none|bf16|fp16]

Prints one JSON line: audio seconds, seconds in the loop (reading to saving), utterances.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from transformers import AutoFeatureExtractor, AutoModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifest", type=Path)
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    extractor = AutoFeatureExtractor.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval().to(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    rows = list(csv.DictReader(args.manifest.open()))
    seconds = 0.0
    start = time.perf_counter()
    for row in rows:
        x, sr = sf.read(args.manifest.parent / row["path"], dtype="float32")
        if x.ndim > 1:
            x = x.mean(axis=1)
        if sr != 16000:
            x = soxr.resample(x, sr, 16000)
        inputs = extractor(x, sampling_rate=16000, return_tensors="pt").to(args.device)
        with torch.inference_mode(), torch.autocast(args.device.split(":")[0], dtype=amp or torch.float32,
                                                    enabled=amp is not None):
            out = model(**inputs, output_hidden_states=True)
        states = torch.stack(out.hidden_states)[:, 0].float().cpu().numpy()  # (L, T, D)
        np.save(args.out / f"{row['utt_id']}.npy", states.astype(np.float16))
        seconds += len(x) / 16000
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    loop = time.perf_counter() - start
    print(json.dumps({"audio_seconds": seconds, "loop_seconds": loop, "utterances": len(rows)}))


if __name__ == "__main__":
    main()
