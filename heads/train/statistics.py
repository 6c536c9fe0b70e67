"""Everything fitted on a fold's training split before or for training, and nothing else fits on data.

Every statistic here sees the TRAINING utterances only (never the validation or
test speaker's):
- `RunningMoments`: the `--norm train` input statistics, per layer and dimension over
  the real frames, accumulated batch by batch in float64 with Chan et al.'s pairwise
  update (no E[x^2] - E[x]^2 cancellation on dimensions whose mean dwarfs their spread);
  padded positions are excluded by the padding mask;
- `fit_pooled_norm`: the `--pooled-norm train` mean and std of the pooled statistics;
- `class_weights`: the weighted cross-entropy's class weights (the paper's footnote 2):
      w_c = N / (C' * n_c)  for classes with n_c > 0, and 0 for absent classes,
  with N the labelled training utterances and C' the number of classes present:
  inverse frequency normalized so a balanced split gets all ones (scikit-learn's "balanced");
- `target_scale`: the mean and std that standardize valence and arousal.
The layer probes (heads/train/layer_probe.py) score layers on the training and
validation speakers (never the test speaker); the classical baseline
(heads/train/baseline.py) fits its scaler on the training split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from core.errors import UserError
from heads.model.input_norm import floor_std

if TYPE_CHECKING:
    from heads.model.head import SERHead


class TrainingError(UserError):
    """Training cannot go on (NaN/inf features, a NaN loss); the message names the utterances or the epoch."""


class RunningMoments:
    """Count, mean and M2 per (L, D) over the real frames of padded batches, merged in float64."""

    def __init__(self, n_layers: int, hidden_size: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.mean = torch.zeros(n_layers, hidden_size, dtype=torch.float64, device=device)  # (L, D)
        self.m2 = torch.zeros(n_layers, hidden_size, dtype=torch.float64, device=device)  # (L, D)

    def add(self, features: torch.Tensor, padding_mask: torch.Tensor) -> None:
        """`features (B, T, L, D)`, `padding_mask (B, T)` True = real frame: only real frames count.

        Padded positions are weighted by 0 (they must be finite, as every loader here pads with
        zeros or copies of real frames), so no gathered copy of the real frames is made.
        """
        b, t, n_layers, d = features.shape
        w = padding_mask.to(torch.float32)[:, None, :]  # (B, 1, T)
        n = int(padding_mask.sum())
        if n == 0:
            return
        x = features.reshape(b, t, n_layers * d).float()  # (B, T, L*D)
        # the batch's own moments in float32 (centred first), then a float64 merge
        mean_b = torch.bmm(w, x).sum(dim=0)[0] / n  # (L*D,)
        centred = x - mean_b  # (B, T, L*D)
        m2_b = torch.bmm(w, centred.square_()).sum(dim=0)[0]  # (L*D,)
        self.merge(n, mean_b.view(n_layers, d).double(), m2_b.view(n_layers, d).double())

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + n
        delta = mean.to(self.mean.device) - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2.to(self.m2.device) + delta.square() * (self.count * n / total)
        self.count = total

    def std(self) -> torch.Tensor:
        """(L, D) population std (floored), float64."""
        if self.count == 0:
            raise ValueError("no frames were added")
        return floor_std((self.m2 / self.count).sqrt())


def class_weights(emotions: np.ndarray, n_classes: int) -> torch.Tensor:
    """(C,) float32 weights from training class indices (-1 = unlabelled, ignored)."""
    labels = np.asarray(emotions)
    labels = labels[labels >= 0]
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    if present.any():
        w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def target_scale(va: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-split mean and std of `va (N, 2)` per column, ignoring NaN; (0, 1) when absent."""
    mean, std = np.zeros(2), np.ones(2)
    for j in range(2):
        col = va[:, j][np.isfinite(va[:, j])]
        if len(col):
            mean[j] = col.mean()
            if len(col) > 1 and col.std() > 1e-8:
                std[j] = col.std()
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


@torch.no_grad()
def fit_pooled_norm(trainer: Any, head: SERHead) -> int:
    """Fit `head.pooled_norm` on the fold's training utterances as the head will pool them; returns N.

    Reads the training split once, through the frames the head trains on:
    the materialized mixed frames when prepare_inputs made them, else the
    cache's frames through the fitted normalization and the mix. The head is
    in eval mode for the pass (no dropout; nothing here has any).
    """
    mode = head.training
    head.eval()
    loader = trainer.loaders["train"]
    mixed = bool(getattr(loader, "extra", {}).get("mixed"))
    rows = []
    for batch in (loader if mixed else trainer.pass_loader("train")):
        features, padding, vad = trainer.encode(batch)
        x = features if batch.get("mixed") else head.mixed(features, padding)  # (B, T, D)
        pooled = head.pooled(x, padding, vad).float()  # (B, P)
        check_finite(pooled, x, padding, batch["utt_id"])  # one NaN/inf frame would poison every row's statistics
        rows.append(pooled)
    head.train(mode)
    pooled = torch.cat(rows)  # (N, P)
    head.pooled_norm.set_stats(pooled)
    return pooled.shape[0]


def check_finite(means: torch.Tensor, x: torch.Tensor, padding: torch.Tensor, utt_ids: list[str]) -> None:
    """A NaN/inf frame would poison the statistics of every utterance: name the culprits instead.

    `means (B, L*D)`, the utterances' frame means, are non-finite iff a real frame is (a
    float32 sum of cached values cannot overflow), so only then are the frames `x` searched.
    """
    if bool(torch.isfinite(means).all()):
        return
    bad = ((~torch.isfinite(x)).flatten(2).any(dim=2) & padding).any(dim=1)  # (B,)
    names = [u for u, b in zip(utt_ids, bad.tolist()) if b] or utt_ids  # else: non-finite padding, blame the batch
    raise TrainingError(f"utterance(s) {', '.join(names[:5])} have NaN/inf features in the cache; "
                        "re-extract them or leave them out")
