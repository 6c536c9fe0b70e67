"""Which outputs a head learned: the classifier and each regressor train only where the training split had labels.

A fold trained on a corpus without valence/arousal (most manifest corpora) has
regressors that never saw a target: their outputs are noise on no scale, so
predictions.csv, `cli predict` and its JSON leave them out. A dimensional-only
corpus likewise leaves out the emotion. Recorded per fold as
metrics.json["outputs"]; folds made before that record are read from the
head's target-scale buffers (mean exactly 0 and std exactly 1 is what a
regressor without a single training label keeps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import pandas as pd
import torch

OUTPUTS: tuple[str, ...] = ("emotion", "valence", "arousal")


def trained_outputs(train_labels: pd.DataFrame) -> list[str]:
    """The outputs with at least one label in the training split (emotion -1 / NaN = no label)."""
    out = ["emotion"] if (train_labels["emotion"] >= 0).any() else []
    return out + [d for d in ("valence", "arousal") if train_labels[d].notna().any()]


def fold_outputs(fold_dir: str | Path, head_state: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """What a trained fold predicts: metrics.json's record, or (older folds) what its buffers show."""
    path = Path(fold_dir) / "metrics.json"
    try:
        recorded = json.loads(path.read_text()).get("outputs")
    except (OSError, ValueError):
        recorded = None
    if recorded is not None:
        return [o for o in OUTPUTS if o in recorded]
    if head_state is None or "va_mean" not in head_state:
        return list(OUTPUTS)
    mean, std = head_state["va_mean"].tolist(), head_state["va_std"].tolist()
    untrained = {d for d, m, s in zip(("valence", "arousal"), mean, std) if m == 0.0 and s == 1.0}
    return [o for o in OUTPUTS if o not in untrained]
