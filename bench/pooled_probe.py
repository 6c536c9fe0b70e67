"""Probe a cache with scikit-learn models on utterance statistics, on the heads' own folds.

Why: when a head trails `cli baseline` on a cache, this tells whether the
pooled statistics or the model class is short: the same utterance features
(mean, or mean and standard deviation, of one layer's real frames) through
logistic regression and through a small MLP shaped like the head's 32-unit
bottleneck, at several L2 strengths, plus utterance duration alone (a cue a
model can pick up through the positional embeddings of some encoders).

Folds: core.folds.plan_folds (leave one speaker out; the validation speaker,
the session partner, is left out of training as in `cli train-head`).
StandardScaler is fitted on the training speakers only. Deterministic.

    python bench/pooled_probe.py CACHE.h5 [--layer N] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Run as a script, bench/ comes first on sys.path and bench/extract.py would shadow the `extract` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
from sklearn.base import ClassifierMixin  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import balanced_accuracy_score  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from cache.reader import FeatureCache  # noqa: E402
from core.folds import Fold, plan_folds  # noqa: E402


def utterance_stats(cache: FeatureCache, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) mean and (N, D) standard deviation over each utterance's real frames of `layer`."""
    means, stds = [], []
    for utt_id in cache.meta.index:
        frames = cache.features(utt_id)[:, layer].astype(np.float64)  # (T, D)
        means.append(frames.mean(axis=0))
        stds.append(frames.std(axis=0))
    return np.stack(means), np.stack(stds)


def loso_ua(x: np.ndarray, y: np.ndarray, speakers: np.ndarray, folds: list[Fold],
            make: Callable[[], ClassifierMixin]) -> list[float]:
    """Per-fold UA of `make()` trained on each fold's training speakers, tested on its test speaker."""
    uas = []
    for fold in folds:
        train, test = np.isin(speakers, fold.train), speakers == fold.test
        scaler = StandardScaler().fit(x[train])
        model = make().fit(scaler.transform(x[train]), y[train])
        uas.append(balanced_accuracy_score(y[test], model.predict(scaler.transform(x[test]))))
    return uas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("--layer", type=int, default=0, help="index into the cache's stored layers")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    with FeatureCache(args.cache) as cache:
        meta = cache.meta.copy()
        mean, std = utterance_stats(cache, args.layer)
    y, speakers = meta["emotion"].to_numpy(), meta["speaker"].to_numpy()
    sessions = meta["session"].astype(str) if "session" in meta else meta["speaker"]
    folds = plan_folds({spk: (ses or spk) for spk, ses in zip(speakers, sessions)})  # as the heads plan them
    features = {"mean": mean, "mean+std": np.hstack([mean, std]),
                "log duration": np.log(meta["duration"].to_numpy(dtype=float))[:, None]}
    models: dict[str, Callable[[], ClassifierMixin]] = {
        "logistic regression (C = 1)": lambda: LogisticRegression(max_iter=5000),
        **{f"MLP, 32 ReLU units, L2 alpha {a:g}": (lambda a=a: MLPClassifier(
            (32,), max_iter=3000, random_state=0, alpha=a)) for a in (0.01, 1.0, 10.0)},
    }
    lines = [f"Cache `{args.cache.name}`, layer index {args.layer}, {len(y)} utterances, "
             f"{len(set(speakers))} leave-one-speaker-out folds (validation speaker left out of training).", "",
             "| features | model | UA % (mean over folds) | UA % per fold |", "|---|---|---:|---|"]
    for fname, x in features.items():
        for mname, make in models.items():
            if fname == "log duration" and not mname.startswith("logistic"):
                continue
            uas = loso_ua(x, y, speakers, folds, make)
            lines.append(f"| {fname} | {mname} | {100 * np.mean(uas):.1f} | "
                         f"{' '.join(f'{100 * u:.0f}' for u in uas)} |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
