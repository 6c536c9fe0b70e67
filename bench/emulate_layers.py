"""A multi-layer cache with an SSL encoder's scale problem, built from a real single-layer cache.

No pretrained speech encoder is usable here yet, but issue 9 measured what
Whisper base's 7 hidden states look like: six un-normalized residual streams
(two of them reaching |x| ~ 415, the others <= 19) and a layer-normed last
one, with the emotion best read from the top. This script turns a real
cache (e.g. `--model fbank` of the eSpeak corpus) into such a cache, so the
layer mix can be judged on real speech frames with the scale problem:

    h_l(t) = s_l * (a_l * R_l z(t) + b_l * (u_l + e_l(t))) [+ outliers]   l = 0 .. L-2
    h_last(t) = LayerNorm(R_last z(t) + 0.3 e(t))

z = the source frame standardized with the whole corpus's mean and std (a
fixed preprocessing of the emulation, not a head setting), R_l a random
rotation, u_l a per-utterance nuisance vector, e_l per-frame noise, a_l the
signal weight (rising with depth, as emotion information does in SSL
stacks), s_l the layer's scale. Layers 4 and 5 are "loud": a larger scale
plus three dimensions with an offset of ~300 and a spread unrelated to the
label (the "massive activations" of transformer residual streams), so they
reach |x| ~ 415 while the others stay near 20, as issue 9 measured.

    python bench/emulate_layers.py SRC.h5 OUT.h5 [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402

from cache.reader import FeatureCache  # noqa: E402
from cache.writer import CacheWriter  # noqa: E402
from core.records import Utterance  # noqa: E402

# per residual layer 0..5: scale s_l, signal a_l, nuisance b_l (the 7th layer is layer-normed)
SCALES = (3.0, 3.5, 4.0, 4.5, 12.0, 12.0)
SIGNAL = (0.2, 0.35, 0.5, 0.7, 0.6, 0.8)
NUISANCE = (1.0, 1.0, 1.0, 0.9, 1.2, 1.0)
LOUD = (4, 5)
OUTLIER_DIMS = 3
OUTLIER_MEAN, OUTLIER_SD = 300.0, 30.0  # |x| up to ~415 in the loud layers, <= ~20 elsewhere


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with FeatureCache(args.src) as src:
        ids = list(src.meta.index)
        frames = np.concatenate([src.features(u, [src.layers[-1]])[:, 0].astype(np.float64) for u in ids])
        mu, sd = frames.mean(0), frames.std(0) + 1e-6
        d = src.hidden_size
        n_layers = len(SCALES) + 1
        rot = [np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(n_layers)]
        outlier = rng.choice(d, OUTLIER_DIMS, replace=False)
        fp = {"model": f"emulated-ssl-from-{src.fingerprint.get('model')}", "layers": list(range(n_layers)),
              "classes": list(src.classes), "dtype": "float16", "source": str(args.src), "seed": args.seed}
        with CacheWriter(args.out, fp) as writer:
            for u in ids:
                m = src.meta.loc[u]
                z = (src.features(u, [src.layers[-1]])[:, 0] - mu) / sd  # (T, D)
                t = len(z)
                layers = []
                for l, (s, a, b) in enumerate(zip(SCALES, SIGNAL, NUISANCE)):
                    noise = rng.standard_normal(d) + rng.standard_normal((t, d))  # utterance nuisance + frame noise
                    h = s * (a * z @ rot[l] + b * noise)
                    if l in LOUD:
                        h[:, outlier] += OUTLIER_MEAN + OUTLIER_SD * rng.standard_normal((t, OUTLIER_DIMS))
                    layers.append(h)
                top = z @ rot[-1] + 0.3 * rng.standard_normal((t, d))
                layers.append((top - top.mean(1, keepdims=True)) / (top.std(1, keepdims=True) + 1e-5))
                x = np.stack(layers, axis=1).astype(np.float32)  # (T, L, D)
                vad = np.stack([src.vad(u, k) for k in range(4)])  # (4, T)
                utt = Utterance(utt_id=u, path=str(m["path"]), speaker=str(m["speaker"]), session=str(m["session"]),
                                emotion=m["emotion"], valence=float(m["valence"]), arousal=float(m["arousal"]),
                                dataset=str(m["dataset"]))
                writer.add(utt, x, vad, duration=float(m["duration"]), truncated=bool(m["truncated"]))
    print(f"wrote {args.out}: {len(ids)} utterances, {n_layers} layers x {d}")


if __name__ == "__main__":
    main()
