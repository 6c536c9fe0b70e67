"""A fold's outputs: which ones its head learned, and the files of RUN/fold-KK that hold them.

Which outputs a head learned: the classifier and each regressor train only where the training split had labels.

A fold trained on a corpus without valence/arousal (most manifest corpora) has
regressors that never saw a target: their outputs are noise on no scale, so
predictions.csv, `cli predict` and its JSON leave them out. A dimensional-only
corpus likewise leaves out the emotion. Recorded per fold as
metrics.json["outputs"]; folds made before that record are read from the
head's target-scale buffers (mean exactly 0 and std exactly 1 is what a
regressor without a single training label keeps).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pandas as pd
import torch

from core.files import replacing
from heads.checkpoint import write_safetensors
from heads.metrics import json_safe

if TYPE_CHECKING:
    from heads.trainer import FoldResult, Predictions

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


# --- the fold folder: RUN/fold-KK/{predictions.csv, history.csv, head.safetensors, metrics.json} ---


def write_fold(out_dir: str | Path, result: FoldResult, classes: tuple[str, ...],
               model: torch.nn.Module | Sequence[torch.nn.Module], config: dict[str, Any],
               histories: Sequence[list[dict[str, float]]] | None = None) -> Path:
    """RUN/fold-KK/{predictions.csv, history.csv, head.safetensors, metrics.json}; returns the folder.

    `model` may be an `--ensemble`'s members, with `histories` theirs: member i > 1
    adds head-i.safetensors and history-i.csv (heads/fold_ensemble.py).
    Each file is written under a temporary name and renamed, and metrics.json goes last:
    a fold folder with metrics.json is complete (a kill or a full disk mid-way leaves none,
    so a rerun trains that fold again instead of keeping half of it).
    """
    from heads.fold_ensemble import head_file, history_file

    models = [model] if isinstance(model, torch.nn.Module) else list(model)
    histories = list(histories) if histories is not None else [result.history]
    fold_dir = Path(out_dir) / f"fold-{result.metrics['fold']:02d}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    with replacing(fold_dir / "predictions.csv") as tmp:
        write_predictions(tmp, result.test, classes, result.metrics.get("outputs", OUTPUTS))
    for i, history in enumerate(histories, start=1):
        with replacing(fold_dir / history_file(i)) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["epoch", "train_loss", "val_loss", "val_ua", "val_wa", "lr"])
            writer.writeheader()
            writer.writerows(history)
    for i, member in enumerate(models, start=1):
        tensors = {k: v.detach().cpu().contiguous() for k, v in member.state_dict().items()}
        with replacing(fold_dir / head_file(i)) as tmp:
            write_safetensors(tensors, tmp,
                              metadata={"config": json.dumps(json_safe(config)), "classes": json.dumps(list(classes))})
    with replacing(fold_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(json_safe(result.metrics), indent=2) + "\n")
    return fold_dir


def write_predictions(path: Path, pred: Predictions, classes: tuple[str, ...],
                      outputs: tuple[str, ...] | list[str] = OUTPUTS) -> None:
    """One row per utterance; columns of outputs the head did not learn (heads.outputs) are left out."""
    emo = "emotion" in outputs
    dims = [j for j, d in enumerate(("valence", "arousal")) if d in outputs]
    names = ("valence", "arousal")
    cols = ["utt_id", *(["true", "pred", *[f"prob_{c}" for c in classes]] if emo else []),
            *[names[j] for j in dims], *[f"{names[j]}_true" for j in dims]]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for i, utt in enumerate(pred.utt_id):
            true = classes[pred.emotion[i]] if pred.emotion[i] >= 0 else ""
            row = [utt, true, classes[int(pred.probs[i].argmax())], *[f"{p:.6f}" for p in pred.probs[i]]] if emo \
                else [utt]
            writer.writerow([*row, *[_num(pred.va[i][j]) for j in dims], *[_num(pred.va_true[i][j]) for j in dims]])


def _num(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.6f}"
