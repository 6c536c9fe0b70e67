"""Fake but contract-exact run folders with known numbers, for report and CLI tests.

A run is built from one confusion matrix per fold: predictions.csv holds one
row per matrix cell count, metrics.json is computed from those rows with
heads.evaluate.metrics (so the two files agree), valence/arousal predictions are the
targets plus a fixed per-fold offset (so each fold's MAE is that offset), and
history.csv is a smooth curve whose validation-loss minimum is `best_epoch`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from core.records import CLASSES_4
from heads.evaluate.metrics import classification_metrics, regression_metrics
from heads.runfolder import json_safe

PREDICTION_COLUMNS = ["utt_id", "true", "pred", *(f"prob_{c}" for c in CLASSES_4),
                      "valence", "arousal", "valence_true", "arousal_true"]
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_ua", "val_wa", "lr"]


@dataclass(frozen=True)
class FoldSpec:
    confusion: tuple[tuple[int, ...], ...]  # (C, C) rows = true, cols = pred
    valence_offset: float  # pred - true for every utterance -> MAE = |offset|
    arousal_offset: float
    no_speech: int
    best_epoch: int
    n_epochs: int


# Fold 1: UA 0.75, WA 11/14; fold 2: UA = WA = 0.875; fold 3 has no "sad" test
# utterance: UA 2/3 over the three present classes, WA 10/14.
FOLDS = (
    FoldSpec(((3, 1, 0, 0), (0, 4, 0, 0), (0, 0, 3, 1), (0, 0, 1, 1)), 0.5, -0.25, 1, 4, 8),
    FoldSpec(((4, 0, 0, 0), (1, 3, 0, 0), (0, 1, 3, 0), (0, 0, 0, 4)), -0.25, 0.5, 0, 6, 10),
    FoldSpec(((2, 2, 0, 0), (0, 2, 2, 0), (0, 0, 6, 0), (0, 0, 0, 0)), 0.75, 0.25, 2, 3, 8),
)
SPEAKERS = ("Ses01F", "Ses01M", "Ses02F")
PARTNERS = ("Ses01M", "Ses01F", "Ses02M")


def fold_rows(k: int, spec: FoldSpec, *, dims: bool) -> list[dict]:
    rows = []
    for i, true in enumerate(CLASSES_4):
        for j, pred in enumerate(CLASSES_4):
            for _ in range(spec.confusion[i][j]):
                n = len(rows)
                # Targets spread over 1..5 (the IEMOCAP scale) so CCC is defined.
                v_true = 1.0 + (n % 5) if dims else math.nan
                a_true = 1.0 + ((3 * n) % 5) if dims else math.nan
                probs = {f"prob_{c}": (0.7 if c == pred else 0.1) for c in CLASSES_4}
                rows.append({"utt_id": f"{SPEAKERS[k - 1]}_{n:03d}", "true": true, "pred": pred, **probs,
                             "valence": v_true + spec.valence_offset if dims else 3.0,
                             "arousal": a_true + spec.arousal_offset if dims else 3.0,
                             "valence_true": v_true, "arousal_true": a_true})
    return rows


def fold_metrics(k: int, spec: FoldSpec, rows: list[dict]) -> dict:
    cls = classification_metrics([r["true"] for r in rows], [r["pred"] for r in rows], CLASSES_4)
    val = regression_metrics([r["valence_true"] for r in rows], [r["valence"] for r in rows])
    aro = regression_metrics([r["arousal_true"] for r in rows], [r["arousal"] for r in rows])
    return {"fold": k, "test_speaker": SPEAKERS[k - 1], "val_speaker": PARTNERS[k - 1],
            "labels": list(CLASSES_4), **cls,
            "valence_mae": val["mae"], "arousal_mae": aro["mae"],
            "valence_ccc": val["ccc"], "arousal_ccc": aro["ccc"],
            "best_epoch": spec.best_epoch, "no_speech": spec.no_speech, "n_test": len(rows)}


def history_rows(k: int, spec: FoldSpec) -> list[dict]:
    rows = []
    for e in range(1, spec.n_epochs + 1):
        # Validation loss is a parabola with its minimum at best_epoch.
        rows.append({"epoch": e, "train_loss": 1.5 / e + 0.1 * k,
                     "val_loss": 0.6 + 0.02 * (e - spec.best_epoch) ** 2 + 0.05 * k,
                     "val_ua": 0.25 + (0.4 + 0.05 * k) * (1 - math.exp(-e / 3)),
                     "val_wa": 0.25 + 0.45 * (1 - math.exp(-e / 3)),
                     "lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * (e - 1) / spec.n_epochs))})
    return rows


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: ("" if isinstance(v, float) and math.isnan(v) else v) for c, v in r.items()}
                         for r in rows)


def write_run(run: Path, *, pooling: str = "sr", folds: tuple[FoldSpec, ...] = FOLDS, dims: bool = True) -> Path:
    """Write config.json and fold-KK/{metrics.json,predictions.csv,history.csv,head.safetensors}."""
    run.mkdir(parents=True, exist_ok=True)
    # The shape heads/train/fold_loop.py writes: TrainConfig under "settings", then what the run was built from.
    config = {"settings": {"pooling": pooling, "epochs": 30, "batch_size": 64, "lr": 1e-3, "patience": 5,
                           "seed": 0, "alpha": 0.5, "beta": 0.25, "gamma": 0.25, "vad_mode": 3, "layer": None},
              "cache": "/data/features.h5",
              "fingerprint": {"model": "tiny-wavlm", "layers": [0, 1, 2], "dtype": "float16"},
              "classes": list(CLASSES_4), "layers": [0, 1, 2], "hidden_size": 8,
              "folds": [{"fold": k, "test_speaker": SPEAKERS[k - 1], "val_speaker": PARTNERS[k - 1]}
                        for k in range(1, len(folds) + 1)],
              "versions": {"sapser": "0.1.0"}}
    (run / "config.json").write_text(json.dumps(config, indent=2))
    for k, spec in enumerate(folds, start=1):
        fold_dir = run / f"fold-{k:02d}"
        fold_dir.mkdir(exist_ok=True)
        rows = fold_rows(k, spec, dims=dims)
        metrics = fold_metrics(k, spec, rows)
        (fold_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False))
        write_csv(fold_dir / "predictions.csv", PREDICTION_COLUMNS, rows)
        write_csv(fold_dir / "history.csv", HISTORY_COLUMNS, history_rows(k, spec))
        save_file({"proj.weight": np.zeros((32, 8), dtype=np.float32)}, str(fold_dir / "head.safetensors"))
    return run
