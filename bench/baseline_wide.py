"""`cli baseline` on wide caches: where a fold's time goes, and the fit in the training rows' span against the plain one.

Issue 25, part 4. The baseline's features are every cached layer's mean and
std over the speech frames: 7 x 2 x 512 = 7,168 for Whisper base, 25 x 2 x
1,024 = 51,200 for WavLM Large, against a few hundred (real-speech corpora
here) to ~4,400 (IEMOCAP) training utterances per fold.

    python bench/baseline_wide.py time --cache F.h5 [--folds 1,2] [--method plain|span|both] [--out rows.jsonl]
    python bench/baseline_wide.py synthetic [--utts 5531] [--features 51200] [--folds 1] [--method ...] [--out ...]

`synthetic` times the fits on IEMOCAP-shaped statistics made in memory: 5,531
utterances of 10 speakers, IEMOCAP's 4-class proportions, 51,200 statistics
(WavLM Large's 25 layers x mean and std x 1,024), low rank plus noise. The
fits depend only on the statistics' count and width; the statistics pass
before them is linear in the cache's frames (`time` measures it on a real
cache), so a 64 GB full-length cache is not needed to time them.

`time` runs the baseline's steps on the given folds with timers: the
statistics pass (once per run), the scaler, the Gram matrices (span only),
each C's logistic-regression fit, the Ridge fits, the rest (writing the
fold). `plain` is the fit as it was before the span reduction
(heads.train.baseline.fit_fold with span=False: scikit-learn on the
standardized F-dimensional rows); `span` is the default. Each row records
the load average next to its time (a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# Run as a script, bench/ comes first on sys.path and bench/extract.py would shadow the `extract` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402

from core.records import CLASSES_4  # noqa: E402

FRAMES_PER_SECOND = 50
IEMOCAP_UTTS = 5531
IEMOCAP_CLASS_COUNTS = {"angry": 1103, "happy": 1636, "neutral": 1708, "sad": 1084}  # happy includes excited
LATENT = 32


def synthetic_statistics(utts: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IEMOCAP-shaped per-utterance statistics: (N, F) float32, labels (N, 3) (emotion index, valence, arousal),
    speaker index (N,) over 10 speakers. Low rank plus noise, as SSL statistics are: a 32-dim latent per
    utterance (class mean + speaker offset + noise) mapped to the F statistics by one random matrix."""
    rng = np.random.default_rng(seed)
    p = np.array([IEMOCAP_CLASS_COUNTS[c] for c in CLASSES_4], dtype=float)
    classes = rng.choice(len(CLASSES_4), size=utts, p=p / p.sum())  # (N,)
    speakers = np.arange(utts) % 10  # (N,)
    class_mean = rng.normal(0, 0.35, (len(CLASSES_4), LATENT))  # (4, k)
    speaker_mean = rng.normal(0, 0.5, (10, LATENT))  # (10, k)
    h = rng.standard_normal((utts, LATENT)) + speaker_mean[speakers] + class_mean[classes]  # (N, k)
    stats = np.empty((utts, features), dtype=np.float32)  # (N, F)
    for lo in range(0, features, 4096):  # blocks: (N, 4096) float64 at a time
        hi = min(lo + 4096, features)
        mix = rng.standard_normal((LATENT, hi - lo)) / math.sqrt(LATENT)  # (k, b)
        stats[:, lo:hi] = h @ mix + 0.5 * rng.standard_normal((utts, hi - lo))
    labels = np.column_stack([classes, 1.0 + classes + 0.5 * rng.standard_normal(utts),
                              5.0 - classes + 0.5 * rng.standard_normal(utts)])
    return stats, labels, speakers


def time_synthetic(utts: int, features: int, folds: list[int], methods: list[str]) -> list[dict]:
    """fit_fold on leave-one-speaker-out folds of synthetic_statistics (fold k tests speaker k - 1 and
    validates on speaker k % 10), with the step timers."""
    from heads.config import BaselineConfig
    from heads.train.baseline import fit_fold

    stats, labels, speakers = synthetic_statistics(utts, features)
    rows = []
    for k in folds:
        test, val = k - 1, k % 10
        split = {"train": ~np.isin(speakers, [test, val]), "val": speakers == val, "test": speakers == test}
        for method in methods:
            load0 = load_now()
            with Timers() as timers:
                wall, cpu = time.perf_counter(), time.process_time()
                model, chosen = fit_fold({s: stats[m] for s, m in split.items()},
                                         {s: labels[m] for s, m in split.items()}, 4, BaselineConfig(),
                                         span=method == "span")
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            probs, _ = model.predict(stats[split["test"]])
            acc = float(np.mean(probs.argmax(1) == labels[split["test"], 0]))
            rows.append({"cache": f"synthetic IEMOCAP-shaped statistics {utts} x {features}", "step": "fold",
                         "fold": k, "method": method, "n_train": int(split["train"].sum()), "features": features,
                         "wall": wall, "cpu": cpu, "steps_wall": timers.wall, "steps_cpu": timers.cpu,
                         "iterations": timers.iterations, "test_accuracy": acc, "C": chosen["C"],
                         "load": [load0, load_now()], "threads": blas_threads()})
            print(json.dumps(rows[-1]), flush=True)
    return rows


class Timers:
    """Wall and CPU seconds per step, by wrapping the functions the baseline calls (the product code stays as it is)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.iterations: list[tuple[float, int]] = []  # (C, lbfgs iterations) per logistic-regression fit
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                timers.wall[label] = timers.wall.get(label, 0.0) + time.perf_counter() - wall
                timers.cpu[label] = timers.cpu.get(label, 0.0) + time.process_time() - cpu

        self._undo.append((owner, name, original))
        setattr(owner, name, timed)

    def __enter__(self) -> Timers:
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.preprocessing import StandardScaler

        from heads.train import rowspan

        self.wrap(StandardScaler, "fit", "scaler")
        self.wrap(StandardScaler, "transform", "scaler")
        self.wrap(rowspan, "gram", "gram")
        self.wrap(rowspan.Span, "of", "span basis")
        self.wrap(rowspan, "lift", "lift")
        self.wrap(Ridge, "fit", "ridge")
        self.wrap(rowspan.KernelRidge, "fit", "ridge")
        fit = LogisticRegression.fit
        timers = self

        def logreg_fit(clf, *args, **kwargs):
            label = f"logreg C={clf.C:g}"
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fit(clf, *args, **kwargs)
            finally:
                timers.wall[label] = timers.wall.get(label, 0.0) + time.perf_counter() - wall
                timers.cpu[label] = timers.cpu.get(label, 0.0) + time.process_time() - cpu
                timers.iterations.append((float(clf.C), int(np.max(clf.n_iter_))))

        self._undo.append((LogisticRegression, "fit", fit))
        LogisticRegression.fit = logreg_fit
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


def time_folds(cache_path: Path, folds: list[int] | None, methods: list[str], repeats: int) -> list[dict]:
    """One row per (fold, method, repeat): seconds per step, UA, chosen C, iterations, the load average."""
    from heads.config import BaselineConfig
    from heads.train.baseline import cache_statistics, run_fold
    from heads.train.folds import fold_count, fold_data, open_cache, select_layers

    config = BaselineConfig()
    rows = []
    with open_cache(cache_path) as cache:
        layers = select_layers(cache, config.layer)
        ks = folds or list(range(1, fold_count(cache, config.protocol) + 1))
        datas = [fold_data(cache, k, config.protocol) for k in ks]
        ids = sorted({u for d in datas for s in ("train", "val", "test") for u in d.split(s)})
        load0, wall, cpu = load_now(), time.perf_counter(), time.process_time()
        stats, no_speech = cache_statistics(cache, ids, layers, statistics=config.statistics, frames=config.frames,
                                            vad_mode=config.vad_mode)
        frames = int(cache.meta.loc[ids, "n_frames"].sum())
        rows.append({"cache": str(cache_path), "step": "statistics", "utterances": len(ids), "frames": frames,
                     "features": int(stats.shape[1]), "wall": time.perf_counter() - wall,
                     "cpu": time.process_time() - cpu, "load": [load0, load_now()]})
        print(json.dumps(rows[-1]), flush=True)
    row = {u: i for i, u in enumerate(ids)}
    for data in datas:
        for method in methods:
            for repeat in range(repeats):
                load0 = load_now()
                with Timers() as timers:
                    wall, cpu = time.perf_counter(), time.process_time()
                    out = run_fold(data, stats, no_speech, row, config, span=method == "span")
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                m = out.metrics
                rows.append({"cache": str(cache_path), "step": "fold", "fold": m["fold"], "method": method,
                             "repeat": repeat, "n_train": m["n_train"], "features": int(stats.shape[1]),
                             "wall": wall, "cpu": cpu, "steps_wall": timers.wall, "steps_cpu": timers.cpu,
                             "iterations": timers.iterations, "ua": m["ua"], "wa": m["wa"], "C": m["baseline"]["C"],
                             "valence_mae": m["valence_mae"], "arousal_mae": m["arousal_mae"],
                             "load": [load0, load_now()], "threads": blas_threads()})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("synthetic", help="time the fits on IEMOCAP-shaped synthetic statistics")
    f.add_argument("--utts", type=int, default=IEMOCAP_UTTS)
    f.add_argument("--features", type=int, default=25 * 2 * 1024, help="[default: WavLM Large's 25 x 2 x 1,024]")
    f.add_argument("--folds", default="1")
    f.add_argument("--method", default="span", choices=["plain", "span", "both"])
    f.add_argument("--out", type=Path, help="append the rows to this JSON-lines file")
    t = sub.add_parser("time", help="time the baseline's steps on some folds of a cache")
    t.add_argument("--cache", type=Path, required=True)
    t.add_argument("--folds", default="", help="comma-separated fold numbers [default: every fold]")
    t.add_argument("--method", default="both", choices=["plain", "span", "both"])
    t.add_argument("--repeats", type=int, default=1)
    t.add_argument("--out", type=Path, help="append the rows to this JSON-lines file")
    args = ap.parse_args()
    methods = ["plain", "span"] if args.method == "both" else [args.method]
    if args.command == "time":
        methods = ["plain", "span"] if args.method == "both" else [args.method]
        folds = [int(k) for k in args.folds.split(",") if k]
        rows = time_folds(args.cache, folds or None, methods, args.repeats)
        if args.out:
            with args.out.open("a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
    if args.command == "synthetic":
        methods = ["plain", "span"] if args.method == "both" else [args.method]
        rows = time_synthetic(args.utts, args.features, [int(k) for k in args.folds.split(",")], methods)
        if args.out:
            with args.out.open("a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)

if __name__ == "__main__":
    main()
