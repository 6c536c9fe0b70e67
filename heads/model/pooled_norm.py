"""Pooled-vector standardization (`--pooled-norm`): the utterance statistics at unit scale before the projection.

The frames are normalized before the layer mix (heads/model/input_norm.py), but the
statistics pooled from them are not at unit scale across utterances: on
real speech the utterance means of normalized frames vary by ~0.2-0.35 per
dimension and the within-utterance standard deviations (`--spread`) by
~0.1-0.25 around ~0.95, so the projection sees the emotion cue as a small
ripple on a constant. scikit-learn's StandardScaler fixes this for a linear
model; here `PooledNorm` does the same inside the head:

    train  (p - mean) / std per dimension of the pooled vector's fixed statistics
           (GAP's mean of all frames, the `--spread` std, the `--speech-stats` mean and
           std of speech frames), with the mean and
           std over the fold's TRAINING utterances, fitted once after the input
           normalization and the layer weights (heads/train/statistics.py `fit_pooled_norm`); buffers
           `pooled_norm.mean`/`pooled_norm.std` (P,) in head.safetensors, so
           `cli predict` applies the same map
    none   the pooled vector as is

SAP's output is learned (its projections set its scale), so its dimensions
keep mean 0 and std 1 (the identity). With `--layer-weights joint` the mix
still moves after the fit; the statistics are those of the initial mix.
Measured on real speech: docs/training.md.
"""

from __future__ import annotations

import torch
from torch import nn

from heads.config import POOLED_NORMS
from heads.model.input_norm import floor_std


class PooledNorm(nn.Module):
    """`(B, P)` -> `(B, P)`: an affine map per dimension, fitted on the fixed statistics dims only."""

    def __init__(self, mode: str, size: int, statistics: torch.Tensor) -> None:
        """`statistics (P,)` bool: which pooled dims are fixed statistics of the frames (the rest stay as is)."""
        super().__init__()
        POOLED_NORMS.check(mode)
        self.mode = mode
        self.statistics = statistics.clone()  # not a buffer: it follows from the head's layout, not from data
        if mode == "train":
            self.register_buffer("mean", torch.zeros(size))  # (P,) identity until fitted
            self.register_buffer("std", torch.ones(size))  # (P,)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return pooled
        return (pooled - self.mean) / self.std

    def set_stats(self, pooled: torch.Tensor) -> None:
        """Fit on the training utterances' pooled vectors `(N, P)` (float64 moments, floored std)."""
        x = pooled.double()[:, self.statistics.to(pooled.device)]  # (N, S)
        if x.shape[1] == 0 or x.shape[0] == 0:
            return
        mean, std = x.mean(dim=0), floor_std(x.std(dim=0, unbiased=False))  # (S,) each
        idx = self.statistics.nonzero().squeeze(1).to(self.mean.device)
        self.mean[idx] = mean.to(self.mean)
        self.std[idx] = std.to(self.std)
