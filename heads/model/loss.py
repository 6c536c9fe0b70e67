"""The multi-task loss (eq. 7): alpha * weighted CE + beta * MAE(valence) + gamma * MAE(arousal).

Masking is per sample: an utterance without an emotion (index -1) adds no
CE term, one without valence or arousal (NaN) adds no MAE term. A batch with
no target of a kind contributes 0 for that term, so a corpus without
dimensional labels trains classification only and one with only
dimensional labels trains the regressors only.

Class weights come from the TRAINING split only (the paper's footnote 2;
heads/train/statistics.py `class_weights`). The weighted CE is the weighted
mean sum_i w_{y_i} nll_i / sum_i w_{y_i}, as `F.cross_entropy(weight=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    total: torch.Tensor  # () the value optimized
    ce: torch.Tensor  # () weighted CE (0 when no labels)
    valence: torch.Tensor  # () MAE in standardized units (0 when no labels)
    arousal: torch.Tensor


class MTLLoss(torch.nn.Module):
    def __init__(self, weights: torch.Tensor, alpha: float = 0.5, beta: float = 0.25, gamma: float = 0.25) -> None:
        super().__init__()
        self.register_buffer("weights", weights.float())
        self.alpha, self.beta, self.gamma = alpha, beta, gamma

    def forward(self, logits: torch.Tensor, va: torch.Tensor, emotion: torch.Tensor, va_true: torch.Tensor) -> LossParts:
        """`logits (B, C)`, `va (B, 2)` predictions; `emotion (B,)` long (-1 = none), `va_true (B, 2)` (NaN = none)."""
        ce = self.weighted_ce(logits, emotion)
        mae = masked_mae(va, va_true)  # (2,)
        total = self.alpha * ce + self.beta * mae[0] + self.gamma * mae[1]
        return LossParts(total, ce, mae[0], mae[1])

    def weighted_ce(self, logits: torch.Tensor, emotion: torch.Tensor) -> torch.Tensor:
        has = emotion >= 0  # (B,)
        target = emotion.clamp(min=0)
        nll = F.cross_entropy(logits, target, reduction="none")  # (B,)
        w = self.weights[target] * has.to(logits.dtype)  # (B,)
        # Dividing by at least a tiny positive keeps a batch without any
        # (weighted) label at exactly 0 instead of 0/0.
        return (w * nll).sum() / w.sum().clamp(min=1e-12)


def masked_mae(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(2,) mean |pred - true| per column over finite targets; 0 for a column without any."""
    has = torch.isfinite(true)  # (B, 2)
    diff = (pred - torch.where(has, true, pred.detach())).abs() * has.to(pred.dtype)  # (B, 2), NaN-free
    return diff.sum(dim=0) / has.sum(dim=0).clamp(min=1).to(pred.dtype)
