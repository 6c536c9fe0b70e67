"""`cli layers`: how well each cached layer alone predicts emotion for unseen speakers, fold by fold.

What a layer scores (the "probe"), per fold of the fold plan (`heads.train.folds`, the
plan train-head uses) and per cached layer l:

1. Utterance statistics, in ONE pass over the cache for every layer at once
   (`layer_means`): per layer, the mean of the utterance's real frames and the
   mean of its speech frames (the VAD mask of `vad_mode`; all frames when the VAD
   found none), `(N, L, 2D)` float32: the utterance means that the head's
   `--layer-weights probe` ranks layers by (heads/train/layer_probe.py).
2. Fitted on the fold's TRAINING speakers only: standardization (each
   statistic's mean and std over the training utterances) and a ridge classifier
   on +-1 targets with class-balanced sample weights, N / (K n_c) over the
   training utterances, as scikit-learn's `StandardScaler` +
   `RidgeClassifier(class_weight="balanced")` (tested equal), in closed form.
3. The validation speaker chooses the ridge penalty alpha = f * (training
   utterances) from f in `PROBE_ALPHA_FACTORS` by UA (ties: the larger alpha,
   the simpler model); the probe fitted on the training speakers with that alpha
   is scored on the TEST speaker: UA and WA. Test utterances enter no fit and no
   choice (tested: making them extreme changes nothing but their own scores).

The figure is UA per layer, the mean over folds with the t-interval of
heads.evaluate.report.mean_ci. With `heads`, the default head (or the given
TrainConfig) is also trained on each single layer (`train_folds` with
`layer=K`, into OUT/layer-KK) and its test UA shown beside the probe's.

Why a ridge classifier and not the baseline's logistic regression: the same
ranking at a fraction of the cost (one Cholesky factorization per alpha of the
smaller of the F x F and N x N systems, where logistic regression iterates), so
a WavLM Large cache (25 layers x 2048 statistics) is scanned in minutes on a
CPU, and it is the classifier the head's layer probe uses. Why means and not
the baseline's mean+std: the probe that sets the head's layer weights sees
means, so the figure shows what those weights are made of.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console

from cache.reader import FeatureCache
from core.errors import UserError
from heads.config import TrainConfig
from heads.evaluate.layers import layers_summary
from heads.evaluate.metrics import classification_metrics
from heads.evaluate.plots import layers_png
from heads.runfolder import LAYERS_JSON, LAYERS_PLOT, layer_run_dir, write_json
from heads.train.baseline import utterance_statistics
from heads.train.folds import FoldData, fold_count, fold_data, open_cache

# alpha = factor * training utterances (sklearn's penalty is on the sum of weighted squared errors, whose
# weights average 1, so alpha / N is the penalty per utterance). 1 is what the head's layer probe uses
# (PROBE_RIDGE); two decades either side let the validation speaker pick a stronger or weaker fit.
PROBE_ALPHA_FACTORS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
STATISTICS_NAME = "per layer: mean of all real frames | mean of speech frames (VAD mode)"


# --- the statistics pass ----------------------------------------------------------------------


def layer_means(cache: FeatureCache, utt_ids: Sequence[str], layers: Sequence[int], vad_mode: int, *,
                on_utterance: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, L, 2D) float32 [mean of all frames | mean of speech frames] per layer, and (N,) bool no-speech.

    One pass, one utterance's (T, L, D) frames at a time; only the result is held (N * L * 2D * 4 bytes:
    about 1 GiB for IEMOCAP's 5,531 utterances at WavLM Large's 25 x 1024).
    """
    d = int(cache.hidden_size)
    out = np.empty((len(utt_ids), len(layers), 2 * d), dtype=np.float32)  # (N, L, 2D)
    no_speech = np.zeros(len(utt_ids), dtype=bool)
    for i, utt_id in enumerate(utt_ids):
        x = cache.features(utt_id, list(layers))  # (T, L, D)
        vad = cache.vad(utt_id, vad_mode)  # (T,)
        no_speech[i] = not vad.any()
        every = np.ones(len(x), dtype=bool)
        out[i, :, :d] = utterance_statistics(x, every, "mean").reshape(len(layers), d)
        out[i, :, d:] = utterance_statistics(x, vad if vad.any() else every, "mean").reshape(len(layers), d)
        if on_utterance:
            on_utterance()
    return out, no_speech


# --- the probe -------------------------------------------------------------------------------


@dataclass
class RidgeProbe:
    """A fitted probe: standardization of the training rows, then a linear score per class seen in training."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    classes: np.ndarray  # (K,) class indices the training rows had
    coef: np.ndarray  # (F, K)
    intercept: np.ndarray  # (K,)
    alpha: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        """(N, F) -> (N, K) scores, as RidgeClassifier.decision_function (for K > 2)."""
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, F) -> (N,) class indices."""
        return self.classes[self.decision(x).argmax(1)]


def fit_ridge_probes(x: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> list[RidgeProbe]:
    """One probe per alpha on the rows x (N, F), labels y (N,) class indices (at least two classes).

    As StandardScaler + RidgeClassifier(alpha, class_weight="balanced"): targets +-1 per class, sample
    weights w = N / (K n_c), weighted centring of features and targets, then
    (Z^T W Z + alpha I) b = Z^T W T. When N < F the same solution comes from the N x N dual system,
    b = Z^T W^1/2 (W^1/2 Z Z^T W^1/2 + alpha I)^-1 W^1/2 T.
    """
    from scipy.linalg import cho_factor, cho_solve

    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale == 0] = 1.0  # StandardScaler's rule for a constant statistic
    z = (x - mean) / scale  # (N, F)
    classes, yi = np.unique(y, return_inverse=True)
    n, k = len(y), len(classes)
    w = (n / (k * np.bincount(yi)))[yi]  # (N,)
    targets = -np.ones((n, k))
    targets[np.arange(n), yi] = 1.0
    zm, tm = w @ z / w.sum(), w @ targets / w.sum()  # (F,), (K,) weighted means
    root = np.sqrt(w)[:, None]
    zc, tc = (z - zm) * root, (targets - tm) * root  # (N, F), (N, K) centred, times sqrt(w)
    primal = z.shape[1] <= n
    gram = zc.T @ zc if primal else zc @ zc.T  # (F, F) or (N, N)
    rhs = zc.T @ tc if primal else tc
    probes = []
    for alpha in alphas:
        a = gram.copy()
        a[np.diag_indices_from(a)] += alpha
        sol = cho_solve(cho_factor(a), rhs)
        coef = sol if primal else zc.T @ sol  # (F, K)
        probes.append(RidgeProbe(mean, scale, classes, coef, tm - zm @ coef, float(alpha)))
    return probes


@dataclass
class ProbeResult:
    """One fold and layer: the chosen probe, its test scores and what the validation speaker saw."""

    ua: float
    wa: float
    alpha_factor: float
    val_ua: dict[str, float]  # alpha factor -> validation UA
    probe: RidgeProbe | None

    def as_dict(self) -> dict[str, Any]:
        return {"ua": _finite(self.ua), "wa": _finite(self.wa), "alpha_factor": _finite(self.alpha_factor),
                "val_ua": {f: _finite(v) for f, v in self.val_ua.items()}}


def probe_layer(x: np.ndarray, emotion: np.ndarray, split: dict[str, np.ndarray], n_classes: int,
                factors: Sequence[float] = PROBE_ALPHA_FACTORS) -> ProbeResult:
    """Fit on split["train"] rows, choose alpha on split["val"], score on split["test"].

    `x (N, F)` one layer's statistics; `emotion (N,)` class index, -1 = none; `split` row indices.
    The test rows are read only to be predicted.
    """
    rows = {s: r[emotion[r] >= 0] for s, r in split.items()}  # emotion-labelled rows only
    y = {s: emotion[r] for s, r in rows.items()}
    if len(np.unique(y["train"])) < 2 or not len(y["test"]):
        return ProbeResult(math.nan, math.nan, math.nan, {}, None)
    probes = fit_ridge_probes(x[rows["train"]], y["train"], [f * len(y["train"]) for f in factors])
    labels = [str(c) for c in range(n_classes)]
    val_ua = {f"{f:g}": balanced_accuracy(y["val"], p.predict(x[rows["val"]])) for f, p in zip(factors, probes)}
    scores = [-math.inf if math.isnan(v) else v for v in val_ua.values()]
    # ties: the larger alpha; no validation label: the middle of the grid
    best = max(range(len(probes)), key=lambda i: (scores[i], i)) if max(scores) > -math.inf else len(probes) // 2
    test = classification_metrics(y["test"], probes[best].predict(x[rows["test"]]), labels)
    return ProbeResult(test["ua"], test["wa"], factors[best], val_ua, probes[best])


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """UA as heads.evaluate.metrics computes it (the mean recall over the classes present in y; NaN without
    rows), in numpy: the validation choice makes 5 of these per fold and layer, and scikit-learn's checks
    cost ~0.1 s a call."""
    if not len(y):
        return math.nan
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


# --- all folds and layers -----------------------------------------------------------------------


def default_layers_dir(cache_path: str | Path) -> Path:
    return Path("runs") / f"{Path(cache_path).stem}-layers"


def fold_rows(data: FoldData, row: dict[str, int]) -> dict[str, np.ndarray]:
    return {s: np.array([row[u] for u in data.split(s)], dtype=np.int64) for s in ("train", "val", "test")}


def scan_layers(cache_path: str | Path, config: TrainConfig | None = None, *, heads: bool = False,
                folds: Sequence[int] | None = None, out: str | Path | None = None,
                console: Console | None = None, progress: bool = True) -> dict[str, Any]:
    """UA per cached layer: the linear probe on every fold (and, with `heads`, the head trained on that
    layer alone), mean and 95% CI over folds. Writes OUT/layers.json and OUT/layers.png; returns the summary.

    `config` gives the fold plan (`protocol`), the VAD mode, and the head's settings for `heads`
    (its `layer` is set per layer).
    """
    config = config or TrainConfig()
    config.validate()
    console = console or Console(stderr=True)
    out = Path(out) if out else default_layers_dir(cache_path)
    start = time.perf_counter()
    with open_cache(cache_path) as cache:
        if not cache.meta["emotion"].notna().any():
            raise UserError(f"the cache {cache_path} has no emotion labels: a layer's UA needs them")
        layers = list(cache.layers)
        ks = list(folds) if folds else list(range(1, fold_count(cache, config.protocol) + 1))
        datas = [fold_data(cache, k, config.protocol) for k in ks]  # every fold checked before any work
        ids = sorted({u for d in datas for s in ("train", "val", "test") for u in d.split(s)})
        model = (cache.fingerprint or {}).get("model", "")
        classes = list(cache.classes)
        stats = _statistics(cache, ids, layers, config.vad_mode, console, progress)
    row = {u: i for i, u in enumerate(ids)}
    emotion = datas[0].labels.loc[ids, "emotion"].to_numpy(np.int64)  # (N,)
    per_fold = []
    for data in datas:
        split = fold_rows(data, row)
        results = {layer: probe_layer(stats[:, j], emotion, split, len(data.classes))
                   for j, layer in enumerate(layers)}
        per_fold.append({"fold": data.fold.fold, "test_speaker": data.fold.test_speaker,
                         "val_speaker": data.fold.val_speaker, "n_train": len(data.train), "n_val": len(data.val),
                         "n_test": len(data.test),
                         "probe": {str(layer): r.as_dict() for layer, r in results.items()}})
        console.print(f"fold {data.fold.fold:02d} {data.fold.test_speaker}: probe UA %  "
                      + "  ".join(f"L{layer} {_pct(r.ua)}" for layer, r in results.items()), highlight=False,
                      soft_wrap=True)  # one line per fold at any width (25 layers of WavLM Large)
    about = {"cache": str(cache_path), "model": str(model), "classes": classes, "protocol": config.protocol,
             "vad_mode": config.vad_mode, "probe": {"statistics": STATISTICS_NAME,
                                                    "classifier": "standardized ridge classifier, class-balanced",
                                                    "alpha_factors": list(PROBE_ALPHA_FACTORS)}}
    title = (f"{Path(cache_path).name} ({Path(str(model)).name or '?'}): test UA per layer, mean and 95% CI over "
             f"{len(per_fold)} folds")
    # the probe's figure first: training a head per layer takes hours on a CPU, and a rerun continues it
    summary = _write(out, per_fold, layers, {**about, "heads": None}, title, start)
    if heads:
        from heads.train.fold_loop import train_folds

        head_runs: dict[str, str] = {}
        for layer in layers:
            run, metrics = train_folds(cache_path, replace(config, layer=layer), folds=ks,
                                       out=layer_run_dir(out, layer), console=console, progress=progress)
            head_runs[str(layer)] = str(run)
            by_fold = {m["fold"]: m for m in metrics}
            for f in per_fold:
                m = by_fold[f["fold"]]
                f.setdefault("head", {})[str(layer)] = {"ua": _finite(m["ua"]), "wa": _finite(m["wa"])}
        summary = _write(out, per_fold, layers, {**about, "heads": {"settings": _head_settings(config),
                                                                     "runs": head_runs}}, title, start)
    return summary


def _write(out: Path, per_fold: list[dict[str, Any]], layers: list[int], about: dict[str, Any], title: str,
           start: float) -> dict[str, Any]:
    """OUT/layers.json and OUT/layers.png from the per-fold scores so far; the summary, with the files."""
    summary = layers_summary(per_fold, layers, **about)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / LAYERS_JSON, summary)
    layers_png(summary, out / LAYERS_PLOT, title=title)
    return {**summary, "files": [str(out / LAYERS_JSON), str(out / LAYERS_PLOT)]}


def _statistics(cache: FeatureCache, ids: list[str], layers: list[int], vad_mode: int, console: Console,
                progress: bool) -> np.ndarray:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("utterance means per layer", total=len(ids))
        stats, _ = layer_means(cache, ids, layers, vad_mode, on_utterance=lambda: bar.advance(task))
    return stats


def _head_settings(config: TrainConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: v for k, v in asdict(config).items() if k != "layer"}


def _pct(v: float) -> str:
    return "  n/a" if not math.isfinite(v) else f"{100 * v:5.1f}"

