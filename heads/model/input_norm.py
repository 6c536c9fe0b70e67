"""Input normalization: what the head does to cached features before the layer mix.

Cached features arrive at their natural scale: eGeMAPS descriptors have
standard deviations from ~0.01 to ~500, and the inner hidden states of
WavLM/Whisper are un-normalized residual streams whose scale differs by
layer (Whisper base: |x| up to ~415 in two layers, <= 19 in the others) with
a few huge outlier dimensions. Fed raw, a few dimensions dominate the
projection and the largest layers dominate a softmax layer mix.

Modes (`--norm`, docs/training.md):
  train      per layer and dimension: (x - mean) / std with the mean and std of
             every real frame of the fold's TRAINING speakers (never validation
             or test); stored as buffers `norm.mean`/`norm.std` (L, D) in
             head.safetensors, so `cli predict` applies the same transform
  utterance  per utterance, layer and dimension over its real frames (CMVN);
             nothing stored. Removes the utterance mean, so GAP of it is 0
  frame      parameter-free LayerNorm of each frame's D-vector, per layer (as
             s3prl's featurizer does before its layer mix); nothing stored
  none       the features as cached

The training statistics are accumulated by heads/train/statistics.py
(`RunningMoments`, real frames of the training split only). Every std is floored at STD_FLOOR_REL x the
median std of its layer (and STD_FLOOR_ABS): a dimension constant in
training would otherwise divide by ~0 and blow up on any frame where it
moves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heads.config import NORMS

STD_FLOOR_REL = 1e-3
STD_FLOOR_ABS = 1e-6
FRAME_EPS = 1e-5  # F.layer_norm's default


def floor_std(std: torch.Tensor) -> torch.Tensor:
    """`std (..., D)` clamped below at STD_FLOOR_REL x its median over D (and STD_FLOOR_ABS)."""
    floor = (STD_FLOOR_REL * std.median(dim=-1, keepdim=True).values).clamp(min=STD_FLOOR_ABS)  # (..., 1)
    return torch.maximum(std, floor)


class InputNorm(nn.Module):
    """`(B, T, L, D)` -> the same shape, normalized per `mode` (see the module docstring)."""

    def __init__(self, mode: str, n_layers: int, hidden_size: int) -> None:
        super().__init__()
        NORMS.check(mode)
        self.mode = mode
        if mode == "train":
            # identity until fitted; `fit` or a loaded head.safetensors sets them
            self.register_buffer("mean", torch.zeros(n_layers, hidden_size))  # (L, D)
            self.register_buffer("std", torch.ones(n_layers, hidden_size))  # (L, D)

    @property
    def per_frame_affine(self) -> bool:
        """True when the transform is the same affine map for every frame (it commutes with means and the mix)."""
        return self.mode in ("train", "none")

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The training split's per-(layer, dimension) mean and floored std, both (L, D)."""
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.to(self.std))

    def affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale (L, D), shift (L, D)) with normalized = x * scale + shift, or None for the identity."""
        if self.mode != "train":
            return None
        scale = 1.0 / self.std
        return scale, -self.mean * scale

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """`features (B, T, L, D)`, `padding_mask (B, T)`; padded positions come out finite but meaningless."""
        if self.mode == "none":
            return features
        if self.mode == "train":
            return (features - self.mean) / self.std
        if self.mode == "frame":
            return F.layer_norm(features, features.shape[-1:], eps=FRAME_EPS)
        return utterance_cmvn(features, padding_mask)


def utterance_cmvn(features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Per utterance, layer and dimension: mean 0, std 1 over the real frames. `(B, T, L, D)` -> same."""
    w = padding_mask.to(features.dtype)[:, :, None, None]  # (B, T, 1, 1)
    n = w.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1, 1, 1)
    mean = (features * w).sum(dim=1, keepdim=True) / n  # (B, 1, L, D)
    centred = features - mean  # (B, T, L, D)
    std = ((centred.square() * w).sum(dim=1, keepdim=True) / n).sqrt()  # (B, 1, L, D)
    return centred / floor_std(std)
