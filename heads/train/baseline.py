"""A classical baseline on the same folds: utterance statistics of the cached frames + StandardScaler + a linear model.

Every ablation should answer "does the neural head beat the obvious
baseline?". This one uses the same fold plan (core/folds.py through
`heads.train.folds.fold_data`), the same metrics (heads/evaluate/metrics.py) and the same
run-folder format as `cli train-head`, so `cli report` shows it beside
GAP/SAP/SR.

Per utterance, in one streaming pass over the cache (one utterance's
(T, L, D) frames in memory at a time, moments accumulated in float64):

    s = [mean_t c_t, std_t c_t] over the utterance's speech frames (the VAD
        mask of `vad_mode`; all its frames when the VAD found none, counted as
        no_speech like the head does), for each selected layer (every cached
        layer by default, or `layer`), concatenated: (L * 2 * D,),
        layout layer-major, then statistic, then dimension.

Per fold, everything is fitted on the training speakers only:
- StandardScaler on the training split's statistics;
- LogisticRegression(class_weight="balanced") for the emotion, one fit per C
  in `c_grid`; the C with the best UA on the validation speaker is kept
  (ties: the smaller C, i.e. the simpler model);
- Ridge for valence and for arousal, alpha chosen by MAE on the validation
  speaker (ties: the smaller alpha).
The validation speaker only chooses, as early stopping does for the head; the
kept model was trained on the training speakers alone.

The fold's model is stored as plain arrays in the fold folder (heads/runfolder.py)
(scaler, classifier and regressor coefficients; no pickle), and
`LinearModel.predict` is what produced the fold's predictions.csv.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console

from cache.reader import FeatureCache
from heads.config import STATISTICS, BaselineConfig
from heads.evaluate.metrics import classification_metrics, fold_scores
from heads.runfolder import Predictions, prepare_run_dir, run_config, trained_outputs, write_fold
from heads.train import rowspan
from heads.train.folds import (FoldData, cross_corpus, fold_count, fold_data, open_cache, run_name,
                               select_layers)

# LogisticRegression's tolerance: converged, not scikit-learn's 1e-4. At 1e-4 the fit stops early and the
# validation choice of C moves with where it stopped: on Whisper base's 7,168 statistics of a 360-utterance
# corpus, UA 62.8 or 65.6 depending on the coordinates the same objective was solved in; 1e-6 and 1e-8 choose
# the same C on all 10 folds (64.4). Narrow statistics (F <= N) and the span's (N, r) coordinates make a
# converged fit cheap (bench/results/baseline-wide-cpu.md).
TOL = 1e-6

# --- statistics ---------------------------------------------------------------------------


def utterance_statistics(frames: np.ndarray, use: np.ndarray, statistics: str = "mean+std") -> np.ndarray:
    """(T, L, D) frames and a (T,) bool mask of the frames to use -> (L * S * D,) float64, S statistics.

    Population std (ddof=0). Computed one layer at a time so that a long
    utterance of a wide model never needs a float64 copy of all its layers.
    """
    t, n_layers, d = frames.shape
    names = STATISTICS[statistics].parts
    out = np.empty((n_layers, len(names), d), dtype=np.float64)  # (L, S, D)
    for layer in range(n_layers):
        x = frames[use, layer].astype(np.float64)  # (T', D)
        if len(x) == 0:  # a frameless utterance has no statistics; zeros are the scaler's neutral input
            out[layer] = 0.0
            continue
        mean = x.mean(axis=0)  # (D,)
        out[layer, 0] = mean
        if "std" in names:
            out[layer, 1] = np.sqrt(np.mean((x - mean) ** 2, axis=0))
    return out.reshape(-1)


def cache_statistics(cache: FeatureCache, utt_ids: Sequence[str], layers: Sequence[int], *, statistics: str,
                     frames: str, vad_mode: int, on_utterance: Callable[[], None] | None = None,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(N, L * S * D) float32 statistics of `utt_ids` in that order, and (N,) bool: the VAD found no speech.

    One pass, one utterance at a time: a cache larger than RAM is fine (only
    the (N, F) result is held).
    """
    n_features = len(layers) * len(STATISTICS[statistics].parts) * int(cache.hidden_size)
    out = np.empty((len(utt_ids), n_features), dtype=np.float32)  # (N, F)
    no_speech = np.zeros(len(utt_ids), dtype=bool)  # (N,)
    for i, utt_id in enumerate(utt_ids):
        x = cache.features(utt_id, list(layers))  # (T, L, D) stored dtype
        vad = cache.vad(utt_id, vad_mode)  # (T,)
        no_speech[i] = not vad.any()
        use = vad if frames == "speech" and vad.any() else np.ones(len(x), dtype=bool)
        out[i] = utterance_statistics(x, use, statistics)
        if on_utterance:
            on_utterance()
    return out, no_speech


# --- the per-fold model --------------------------------------------------------------------


@dataclass
class LinearModel:
    """One fold's fitted baseline as plain arrays: predicts from the statistics, saves without pickle."""

    mean: np.ndarray  # (F,) scaler
    scale: np.ndarray  # (F,)
    class_index: np.ndarray  # (C',) int64: the classes the classifier saw in training, in `classes` order
    coef: np.ndarray  # (C', F) softmax logits = x_scaled @ coef.T + intercept
    intercept: np.ndarray  # (C',)
    va_coef: np.ndarray  # (2, F) valence, arousal; NaN rows: no training target
    va_intercept: np.ndarray  # (2,)
    n_classes: int

    def predict(self, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, F) statistics -> (N, C) class probabilities, (N, 2) valence and arousal (corpus scale)."""
        z = (np.asarray(stats, dtype=np.float64) - self.mean) / self.scale  # (N, F)
        probs = np.zeros((len(z), self.n_classes))  # (N, C) classes never seen in training stay at 0
        if len(self.class_index) == 0:
            probs[:] = 1.0 / self.n_classes
        else:
            logits = z @ self.coef.T + self.intercept  # (N, C')
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            probs[:, self.class_index] = e / e.sum(axis=1, keepdims=True)
        va = z @ self.va_coef.T + self.va_intercept  # (N, 2)
        return probs, va

    def tensors(self) -> dict[str, np.ndarray]:
        return {"scaler.mean": self.mean, "scaler.scale": self.scale, "classifier.class_index": self.class_index,
                "classifier.coef": self.coef, "classifier.intercept": self.intercept,
                "regressor.coef": self.va_coef, "regressor.intercept": self.va_intercept}

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(v) for k, v in self.tensors().items()}
        save_file(tensors, str(path), metadata={**metadata, "n_classes": str(self.n_classes)})

    @classmethod
    def load(cls, path: str | Path) -> LinearModel:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            t = {k: fh.get_tensor(k) for k in fh.keys()}
            n_classes = int(fh.metadata()["n_classes"])
        return cls(t["scaler.mean"], t["scaler.scale"], t["classifier.class_index"], t["classifier.coef"],
                   t["classifier.intercept"], t["regressor.coef"], t["regressor.intercept"], n_classes)


def _fit_classifier(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int,
                    config: BaselineConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(class_index, coef (C', F), intercept (C',), what was chosen) from scaled training rows with a label."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    present = np.unique(y)
    if len(present) < 2:  # nothing to separate: one known class gets every utterance, none: uniform
        return present.astype(np.int64), np.zeros((len(present), x.shape[1])), np.zeros(len(present)), {"C": None}
    # One solver warm-started along the grid from the smallest C: each fit starts from the previous optimum,
    # not from zero (IEMOCAP-shaped statistics: bench/results/baseline-wide-cpu.md); same optima within TOL.
    solver = LogisticRegression(class_weight="balanced", max_iter=config.max_iter, tol=TOL, warm_start=True)
    fitted, val_ua, best = {}, {}, None
    for c in sorted(config.c_grid):
        solver.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded below instead
            solver.fit(x, y)
        fitted[c] = copy.deepcopy(solver)
        ua = classification_metrics(y_val, solver.predict(x_val), range(n_classes))["ua"] if len(y_val) else math.nan
        val_ua[str(c)] = ua
        score = -math.inf if math.isnan(ua) else ua
        if best is None or score > best[0]:  # strict: a tie keeps the smaller C
            best = (score, c)
    middle = sorted(config.c_grid)[len(config.c_grid) // 2]
    clf = fitted[middle if best[0] == -math.inf else best[1]]  # no validation label: the middle of the grid
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # binary: one row w gives p(class 1) = sigmoid(w.x + b) = softmax([-z/2, z/2])
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    chosen = {"C": float(clf.C), "val_ua_by_C": val_ua, "iterations": int(np.max(clf.n_iter_)),
              "converged": bool(np.max(clf.n_iter_) < config.max_iter)}
    return clf.classes_.astype(np.int64), coef, intercept, chosen


def _choose(fits, y_val: np.ndarray, config: BaselineConfig) -> tuple[Any, Any]:
    """The first (smallest) alpha with the lowest validation MAE among `fits`: (alpha, fit) -> (alpha, what it fitted).

    `fits(alpha)` returns (whatever the caller keeps, validation predictions); no validation target: the middle
    of the grid.
    """
    keep_val = ~np.isnan(y_val)
    best: tuple[float, Any, Any] | None = None
    for alpha in config.alpha_grid:
        fitted, pred = fits(alpha)
        mae = float(np.mean(np.abs(pred[keep_val] - y_val[keep_val]))) if keep_val.any() else math.nan
        score = math.inf if math.isnan(mae) else mae
        if best is None or score < best[0]:
            best = (score, alpha, fitted)
    if best[0] == math.inf:
        alpha = sorted(config.alpha_grid)[len(config.alpha_grid) // 2]
        return alpha, fits(alpha)[0]
    return best[1], best[2]


def _fit_regressor(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                   config: BaselineConfig) -> tuple[np.ndarray, float, float | None]:
    """(coef (F,), intercept, alpha) of a Ridge on the rows whose target exists; NaN coefficients if none."""
    from sklearn.linear_model import Ridge

    keep = ~np.isnan(y)
    if not keep.any():
        return np.full(x.shape[1], np.nan), math.nan, None

    def fits(alpha: float) -> tuple[Any, np.ndarray]:
        reg = Ridge(alpha=alpha).fit(x[keep], y[keep])
        return reg, reg.predict(x_val)

    alpha, reg = _choose(fits, y_val, config)
    return reg.coef_.astype(np.float64), float(reg.intercept_), float(alpha)


def _fit_span_regressor(ridge: rowspan.KernelRidge | None, y_val: np.ndarray,
                        config: BaselineConfig) -> tuple[np.ndarray | None, float, float | None]:
    """_fit_regressor in the training rows' span: ((N,) weights on the training rows, intercept, alpha)."""
    if ridge is None:
        return None, math.nan, None

    def fits(alpha: float) -> tuple[Any, np.ndarray]:
        weights, intercept, pred = ridge.fit(alpha)
        return (weights, intercept), pred

    alpha, (weights, intercept) = _choose(fits, y_val, config)
    return weights, intercept, float(alpha)


def fit_fold(stats: dict[str, np.ndarray], labels: dict[str, np.ndarray], n_classes: int,
             config: BaselineConfig, *, span: bool | None = None) -> tuple[LinearModel, dict[str, Any]]:
    """Fit one fold from `stats["train"|"val"]` (N, F) and `labels[...]` (N, 3): emotion index, valence, arousal.

    `span`: fit in the span of the standardized training rows (heads/train/rowspan.py): the same models,
    computed on (N, r) coordinates instead of the (N, F) rows. None: when the statistics outnumber the
    training utterances, where it is the cheaper way (every cached layer of an SSL model).
    """
    from sklearn.preprocessing import StandardScaler

    train, val = stats["train"], stats["val"]
    # float64 from here on: the statistics are stored as float32, the fits and predict() run in float64
    scaler = StandardScaler().fit(train.astype(np.float64))
    mean, scale = scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)
    y, y_val = labels["train"], labels["val"]
    has, has_val = y[:, 0] >= 0, y_val[:, 0] >= 0
    emotion, emotion_val = y[has, 0].astype(np.int64), y_val[has_val, 0].astype(np.int64)
    va_coef, va_intercept = np.empty((2, train.shape[1])), np.empty(2)
    if not (train.shape[1] > len(train) if span is None else span):
        x, x_val = (scaler.transform(s.astype(np.float64)) for s in (train, val))
        class_index, coef, intercept, chosen = _fit_classifier(x[has], emotion, x_val[has_val], emotion_val,
                                                               n_classes, config)
        for j, name in ((0, "valence"), (1, "arousal")):
            va_coef[j], va_intercept[j], chosen[f"{name}_alpha"] = _fit_regressor(x, y[:, 1 + j], x_val,
                                                                                   y_val[:, 1 + j], config)
        chosen["span_rank"] = None
    else:
        k, cross = rowspan.gram(train, val, mean, scale)  # (N, N), (N_val, N)
        span_ = rowspan.Span.of(k)
        class_index, coef, intercept, chosen = _fit_classifier(span_.train[has], emotion,
                                                               span_.coordinates(cross)[has_val], emotion_val,
                                                               n_classes, config)
        weights = span_.row_weights(coef)  # (C', N)
        rows = [weights]
        for j, name in ((0, "valence"), (1, "arousal")):
            target = y[:, 1 + j]
            keep = ~np.isnan(target)
            ridge = rowspan.KernelRidge(k, cross, target, keep) if keep.any() else None
            w, va_intercept[j], chosen[f"{name}_alpha"] = _fit_span_regressor(ridge, y_val[:, 1 + j], config)
            rows.append(np.full((1, len(train)), np.nan) if w is None else w[None])
        lifted = rowspan.lift(np.vstack(rows), train, mean, scale)  # (C' + 2, F)
        coef, va_coef = lifted[: len(weights)], lifted[len(weights):]
        chosen["span_rank"] = len(span_.pivots)
    model = LinearModel(mean, scale, class_index, coef, intercept, va_coef, va_intercept, n_classes)
    return model, chosen


# --- one fold, all folds -------------------------------------------------------------------


@dataclass
class FoldOutput:
    metrics: dict[str, Any]
    model: LinearModel
    predictions: Predictions


def _label_matrix(data: FoldData, ids: Sequence[str]) -> np.ndarray:
    """(N, 3) float64: emotion index (-1 none), valence, arousal (NaN none)."""
    return data.labels.loc[list(ids), ["emotion", "valence", "arousal"]].to_numpy(np.float64)


def run_fold(data: FoldData, stats: np.ndarray, no_speech: np.ndarray, row: dict[str, int],
             config: BaselineConfig, *, span: bool | None = None) -> FoldOutput:
    """Fit on the training speakers, choose on the validation speaker, test on the test speaker (`span`: fit_fold's)."""
    split_stats = {s: stats[[row[u] for u in data.split(s)]] for s in ("train", "val", "test")}
    split_labels = {s: _label_matrix(data, data.split(s)) for s in ("train", "val", "test")}
    model, chosen = fit_fold(split_stats, split_labels, len(data.classes), config, span=span)
    probs, va = model.predict(split_stats["test"])
    truth = split_labels["test"]
    emotion = truth[:, 0].astype(np.int64)
    test_no_speech = no_speech[[row[u] for u in data.test]]
    fold = data.fold
    metrics = {
        "fold": fold.fold, "test_speaker": fold.test_speaker, "val_speaker": fold.val_speaker,
        "labels": list(data.classes), **fold_scores(emotion, probs, truth[:, 1:], va, data.classes),
        "best_epoch": None, "no_speech": int(test_no_speech.sum()), "n_test": len(data.test),
        "n_train": len(data.train), "n_val": len(data.val), "baseline": chosen,
        "outputs": trained_outputs(data.labels.loc[data.train]),  # what predict may report
    }
    pred = Predictions(utt_id=list(data.test), probs=probs, va=va, emotion=emotion, va_true=truth[:, 1:],
                       no_speech=test_no_speech, loss=math.nan)
    return FoldOutput(metrics, model, pred)


def baseline_line(m: dict[str, Any], seconds: float) -> str:
    def pct(x: Any) -> str:
        return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}"

    c = m["baseline"].get("C")
    return (f"fold {m['fold']:02d} {m['test_speaker']} (val {m['val_speaker']})  UA {pct(m['ua'])}%  "
            f"WA {pct(m['wa'])}%  C {'-' if c is None else f'{c:g}'}  "
            f"no-speech {m['no_speech']}/{m['n_test']}  {seconds:.1f} s")


def run_baseline(cache_path: str | Path | Sequence[str | Path], config: BaselineConfig, *,
                 folds: Sequence[int] | None = None, out: str | Path | None = None, console: Console | None = None,
                 progress: bool = True, test_caches: Sequence[str | Path] = ()) -> tuple[Path, list[dict[str, Any]]]:
    """The baseline on the given folds (None = all) of a cache into RUN; returns RUN and the metrics in fold order.
    Several caches, or `test_caches`: cross-corpus folds, as `train_folds` makes them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    config.validate()
    console = console or Console(stderr=True)
    out = Path(out) if out else Path("runs") / f"{run_name(cache_path, test_caches)}-baseline"
    with open_cache(cache_path, test_caches) as cache:
        if cross_corpus(cache):
            config = replace(config, protocol="corpus")
        layers = select_layers(cache, config.layer)
        ks = list(folds) if folds else list(range(1, fold_count(cache, config.protocol) + 1))
        datas = [fold_data(cache, k, config.protocol) for k in ks]  # every fold checked before any work
        run_cfg = {**run_config(config, cache, layers), "mode": "baseline"}
        prepare_run_dir(out, run_cfg)
        ids = sorted({u for d in datas for s in ("train", "val", "test") for u in d.split(s)})
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, disable=not progress, transient=True) as bar:
            task = bar.add_task("utterance statistics", total=len(ids))
            stats, no_speech = cache_statistics(cache, ids, layers, statistics=config.statistics,
                                                frames=config.frames, vad_mode=config.vad_mode,
                                                on_utterance=lambda: bar.advance(task))
    row = {u: i for i, u in enumerate(ids)}
    results = []
    for data in datas:
        start = time.perf_counter()
        result = run_fold(data, stats, no_speech, row, config)
        write_fold(out, result.metrics, result.predictions, data.classes, run_cfg, baseline=result.model)
        console.print(baseline_line(result.metrics, time.perf_counter() - start), highlight=False)
        results.append(result.metrics)
    return out, results
