"""Per-fold metrics: UA, WA, macro-F1, per-class recall, confusion; MAE and CCC.

Semantics follow scikit-learn so numbers are comparable with other SER code:
- UA (unweighted accuracy) is `balanced_accuracy_score`: the mean recall over
  the classes PRESENT in `y_true`. A class with no test utterance in a fold
  (possible with leave-one-speaker-out on small corpora) has no recall; it is
  left out of the mean rather than counted as 0 or 1, and its entry in
  `recall` is NaN (written as null in JSON, see `json_safe`).
- WA (weighted accuracy) is plain accuracy.
- macro-F1 is `f1_score(average="macro")`: F1 = 2TP / (2TP + FP + FN)
  averaged over the classes that occur in `y_true` OR `y_pred`; a class only
  predicted (or only true) scores 0, a class in neither is left out.
Utterances without an emotion label (index -1, None or "" as the dataset
collate writes them) are dropped before anything is counted.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def _as_indices(labels: Sequence[Any] | np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Class names or class indices -> (N,) int64 indices; -1 = no label."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        idx = arr.astype(np.int64)
        idx[idx < 0] = -1
    elif arr.dtype.kind == "f":
        # Float indices only come from NaN-holding columns: NaN means unlabelled.
        if np.any(np.isfinite(arr) & (arr != np.round(arr))):
            raise ValueError("float labels must be whole class indices or NaN")
        idx = np.where(np.isfinite(arr) & (arr >= 0), arr, -1).astype(np.int64)
    else:
        position = {c: i for i, c in enumerate(classes)}
        unknown = sorted({str(x) for x in arr if x not in position and x not in (None, "")})
        if unknown:
            raise ValueError(f"labels {unknown} are not in classes {list(classes)}")
        idx = np.array([position.get(x, -1) for x in arr], dtype=np.int64)
    if idx.size and idx.max() >= len(classes):
        raise ValueError(f"class index {int(idx.max())} is out of range for {len(classes)} classes")
    return idx


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts; rows = true class, columns = predicted class."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def classification_metrics(y_true, y_pred, classes: Sequence[str]) -> dict:
    """UA, WA, macro-F1, per-class recall and the confusion matrix, in `classes` order.

    `y_true`/`y_pred` are class names or indices into `classes`. Pairs whose
    true label is missing are dropped; every kept prediction must be a class.
    With no labelled utterance at all, the scores are NaN and the matrix zeros.
    """
    t = _as_indices(y_true, classes)
    p = _as_indices(y_pred, classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.shape[0]} labels but y_pred has {p.shape[0]}")
    keep = t >= 0
    t, p = t[keep], p[keep]
    if np.any(p < 0):
        raise ValueError("a labelled utterance has no prediction")
    cm = confusion(t, p, len(classes))
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true count per class
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = 2 * tp / (2 * tp + (predicted - tp) + (support - tp))
    occurring = (support > 0) | (predicted > 0)
    n = int(support.sum())
    return {
        "ua": float(np.nanmean(recall)) if n else math.nan,
        "wa": float(tp.sum() / n) if n else math.nan,
        "macro_f1": float(f1[occurring].mean()) if n else math.nan,
        "recall": {c: float(r) for c, r in zip(classes, recall)},
        "confusion": cm.tolist(),
    }


def ccc(x, y) -> float:
    """Lin's concordance correlation coefficient with population (ddof=0) moments.

    CCC = 2 cov(x, y) / (var x + var y + (mean x - mean y)^2). NaN for empty
    input, or when both are the same constant (0/0: agreement is undefined).
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ccc needs equal lengths, got {a.shape} and {b.shape}")
    if a.size == 0:
        return math.nan
    ma, mb = a.mean(), b.mean()
    cov = np.mean((a - ma) * (b - mb))
    denom = a.var() + b.var() + (ma - mb) ** 2
    return float(2 * cov / denom) if denom > 0 else math.nan


def regression_metrics(true, pred) -> dict:
    """MAE and CCC of one dimension (valence or arousal), on the targets' own scale.

    Utterances whose target is NaN (no dimensional label) are ignored; with
    no target left both values are NaN.
    """
    t = np.asarray(true, dtype=np.float64).reshape(-1)
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"true has {t.size} values but pred has {p.size}")
    keep = ~np.isnan(t)
    t, p = t[keep], p[keep]
    if t.size == 0:
        return {"mae": math.nan, "ccc": math.nan}
    return {"mae": float(np.mean(np.abs(p - t))), "ccc": ccc(t, p)}


def json_safe(obj: Any) -> Any:
    """A copy that `json.dump` writes as strict JSON: NaN/inf -> null, numpy -> Python."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
