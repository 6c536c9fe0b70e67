"""A fold's metrics.json says what its predictions.csv says (issue 12).

Every score is recomputed here, from the CSV alone, with scikit-learn and a
plain CCC formula, for a head fold (heads/train/trainer.py) and a baseline fold
(heads/train/baseline.py). A metric built from the wrong column (arousal scored
against the valence predictions, a recall over the wrong rows) cannot agree.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, recall_score

from cache.reader import FeatureCache
from head_fixtures import make_cache
from heads.config import BaselineConfig
from heads.train.baseline import run_baseline
from heads.train.fold_loop import train_folds
from heads.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    # every 5th utterance without a speech frame: the no-speech count is checked too
    return make_cache(tmp_path_factory.mktemp("cache") / "synth.h5", no_speech_every=5)


@pytest.fixture(scope="module")
def head_fold(cache, tmp_path_factory) -> Path:
    config = TrainConfig(epochs=3, batch_size=16, lr=3e-3, heads=2, device="cpu")
    out, _ = train_folds(cache, config, folds=[2], out=tmp_path_factory.mktemp("runs") / "head", progress=False)
    return out / "fold-02"


@pytest.fixture(scope="module")
def baseline_fold(cache, tmp_path_factory) -> Path:
    out, _ = run_baseline(cache, BaselineConfig(), folds=[3], out=tmp_path_factory.mktemp("runs") / "base",
                          progress=False)
    return out / "fold-03"


def ccc(true: np.ndarray, pred: np.ndarray) -> float:
    """Lin's CCC from np.cov (population moments), independent of heads.evaluate.metrics."""
    cov = np.cov(true, pred, bias=True)
    return float(2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (true.mean() - pred.mean()) ** 2))


def recompute(fold_dir: Path) -> dict:
    """Every score of metrics.json from predictions.csv."""
    with (fold_dir / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    labels = json.loads((fold_dir / "metrics.json").read_text())["labels"]
    true = [r["true"] for r in rows]
    pred = [r["pred"] for r in rows]
    for r in rows:  # the predicted class is the most probable one
        assert r["pred"] == labels[int(np.argmax([float(r[f"prob_{c}"]) for c in labels]))]
    present = [c for c in labels if c in true]
    out = {
        "ua": balanced_accuracy_score(true, pred),
        "wa": accuracy_score(true, pred),
        "macro_f1": f1_score(true, pred, labels=sorted(set(true) | set(pred)), average="macro"),
        "confusion": confusion_matrix(true, pred, labels=labels).tolist(),
        "recall": dict(zip(present, recall_score(true, pred, labels=present, average=None))),
        "n_test": len(rows),
    }
    for dim in ("valence", "arousal"):
        t = np.array([float(r[f"{dim}_true"]) for r in rows])
        p = np.array([float(r[dim]) for r in rows])
        out[f"{dim}_mae"] = float(np.mean(np.abs(p - t)))
        out[f"{dim}_ccc"] = ccc(t, p)
    return out


def check_agrees(fold_dir: Path) -> None:
    metrics = json.loads((fold_dir / "metrics.json").read_text())
    ref = recompute(fold_dir)
    assert metrics["n_test"] == ref["n_test"]
    assert metrics["confusion"] == ref["confusion"]
    for key in ("ua", "wa", "macro_f1"):
        assert metrics[key] == pytest.approx(ref[key], abs=1e-12), key
    for c, r in metrics["recall"].items():
        assert (r is None and c not in ref["recall"]) or r == pytest.approx(ref["recall"][c], abs=1e-12), c
    # predictions.csv holds 6 decimals: MAE and CCC agree to that rounding
    for key in ("valence_mae", "arousal_mae", "valence_ccc", "arousal_ccc"):
        assert math.isfinite(metrics[key]) and metrics[key] == pytest.approx(ref[key], abs=2e-6), key
    # the two dimensions differ in this corpus: a metric scored on the other column would be off
    assert abs(ref["valence_mae"] - ref["arousal_mae"]) > 1e-3 or abs(ref["valence_ccc"] - ref["arousal_ccc"]) > 1e-3


def no_speech_count(cache: Path, fold_dir: Path) -> int:
    """Test utterances whose VAD mode 3 mask has no speech frame, counted in the cache."""
    with (fold_dir / "predictions.csv").open() as fh:
        ids = [r["utt_id"] for r in csv.DictReader(fh)]
    with FeatureCache(cache) as fc:
        return sum(not fc.vad(u, 3).any() for u in ids)


def test_head_fold_metrics_are_its_predictions(cache, head_fold):
    check_agrees(head_fold)
    metrics = json.loads((head_fold / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == 144  # 6 speakers x 24 utterances
    assert metrics["no_speech"] == no_speech_count(cache, head_fold) > 0


def test_baseline_fold_metrics_are_its_predictions(cache, baseline_fold):
    check_agrees(baseline_fold)
    assert json.loads((baseline_fold / "metrics.json").read_text())["no_speech"] == no_speech_count(cache, baseline_fold)
