"""Per-fold metrics: UA, WA, macro-F1, per-class recall, confusion; MAE and CCC.

The classification scores are scikit-learn's (imported on first use), so numbers are comparable with other SER code:
- UA (unweighted accuracy) is `balanced_accuracy_score`: the mean recall over
  the classes PRESENT in `y_true`. A class with no test utterance in a fold
  (possible with leave-one-speaker-out on small corpora) has no recall; it is
  left out of the mean rather than counted as 0 or 1, and its entry in
  `recall` is NaN (written as null in JSON, see heads.runfolder.json_safe).
- WA (weighted accuracy) is plain accuracy.
- macro-F1 is `f1_score(average="macro")`: F1 = 2TP / (2TP + FP + FN)
  averaged over the classes that occur in `y_true` OR `y_pred`; a class only
  predicted (or only true) scores 0, a class in neither is left out.
Utterances without an emotion label (index -1, None or "" as the dataset
collate writes them) are dropped before anything is counted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from core.choices import Choice, Choices


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


def classification_metrics(y_true, y_pred, classes: Sequence[str]) -> dict:
    """UA, WA, macro-F1, per-class recall and the confusion matrix, in `classes` order (scikit-learn).

    `y_true`/`y_pred` are class names or indices into `classes`. Pairs whose
    true label is missing are dropped; every kept prediction must be a class.
    With no labelled utterance at all, the scores are NaN and the matrix zeros.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, recall_score

    t = _as_indices(y_true, classes)
    p = _as_indices(y_pred, classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.shape[0]} labels but y_pred has {p.shape[0]}")
    keep = t >= 0
    t, p = t[keep], p[keep]
    if np.any(p < 0):
        raise ValueError("a labelled utterance has no prediction")
    every = list(range(len(classes)))
    if not len(t):
        return {"ua": math.nan, "wa": math.nan, "macro_f1": math.nan, "recall": {c: math.nan for c in classes},
                "confusion": np.zeros((len(classes), len(classes)), dtype=np.int64).tolist()}
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected on a fold whose test speaker lacks a class
        warnings.simplefilter("ignore", UserWarning)
        ua = balanced_accuracy_score(t, p)
    recall = recall_score(t, p, labels=every, average=None, zero_division=np.nan)  # NaN: no true utterance
    return {
        "ua": float(ua),
        "wa": float(accuracy_score(t, p)),
        "macro_f1": float(f1_score(t, p, average="macro", zero_division=0.0)),  # over classes in t or p
        "recall": {c: float(r) for c, r in zip(classes, recall)},
        "confusion": confusion_matrix(t, p, labels=every).astype(np.int64).tolist(),
    }


def ua_wa(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[float, float]:
    """(UA, WA) of class indices (-1 = no label, dropped) from one confusion count: what
    `classification_metrics` gives (tested against it), without scikit-learn's input checks, for the
    per-epoch validation scores of many heads."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    keep = t >= 0
    t, p = t[keep], p[keep]
    if not len(t):
        return math.nan, math.nan
    counts = np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    totals = counts.sum(axis=1)
    present = totals > 0
    recall = np.diag(counts)[present] / totals[present]
    return float(recall.mean()), float(np.trace(counts) / len(t))


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


@dataclass(frozen=True)
class Score(Choice):
    """A per-fold score of metrics.json that reports summarize over folds (mean and 95% CI).

    `label` heads its column; a "fraction" prints in percent, a "number" (MAE on the
    label scale, CCC in [-1, 1]) with 3 decimals; `part` is the table it belongs to.
    """

    kind: str = "fraction"  # fraction | number
    part: str = "main"  # main (the paper's Table 1) | dims (valence and arousal)
    ci: bool = True  # print the 95% CI beside the mean
    short: str = ""  # the per-fold table's column ("UA %"); fractions only


# Every score a fold records, in metrics.json's order; `fold_scores` computes them.
SCORES: Choices[Score] = Choices("score", {
    "ua": Score("unweighted accuracy: the mean recall over the classes present", "UA mean (95% CI)", short="UA"),
    "wa": Score("weighted accuracy: plain accuracy", "WA mean (95% CI)", short="WA"),
    "macro_f1": Score("macro-F1 over the classes true or predicted", "Macro-F1", ci=False, short="F1"),
    "valence_mae": Score("mean absolute error of valence", "V MAE", "number", "dims"),
    "arousal_mae": Score("mean absolute error of arousal", "A MAE", "number", "dims"),
    "valence_ccc": Score("concordance correlation of valence", "V CCC", "number", "dims"),
    "arousal_ccc": Score("concordance correlation of arousal", "A CCC", "number", "dims"),
})
DIMENSIONS = ("valence", "arousal")  # the columns of every (N, 2) valence/arousal array


def fold_scores(emotion: np.ndarray, probs: np.ndarray, va_true: np.ndarray, va_pred: np.ndarray,
                classes: Sequence[str]) -> dict:
    """Every score of SCORES plus per-class recall and confusion, from a fold's test predictions.

    `emotion` (N,) true class index (-1 = none), `probs` (N, C), `va_true`/`va_pred` (N, 2)
    valence and arousal on the corpus scale (NaN = no label). One function for the head
    (heads/train/trainer.py) and the baseline (heads/train/baseline.py), so both score alike.
    """
    scores = classification_metrics(emotion, np.asarray(probs).argmax(1), classes)
    dims = {dim: regression_metrics(va_true[:, j], va_pred[:, j]) for j, dim in enumerate(DIMENSIONS)}
    for kind in ("mae", "ccc"):
        scores.update({f"{dim}_{kind}": dims[dim][kind] for dim in DIMENSIONS})
    missing = [k for k in SCORES if k not in scores]
    assert not missing, f"SCORES lists {missing} but fold_scores does not compute them"
    return scores
