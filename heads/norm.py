"""Input normalization: what the head does to cached features before the layer mix.

Cached features arrive at their natural scale: eGeMAPS descriptors have
standard deviations from ~0.01 to ~500, and the inner hidden states of
WavLM/Whisper are un-normalized residual streams whose scale differs by
layer (Whisper base: |x| up to ~415 in two layers, <= 19 in the others) with
a few huge outlier dimensions. Fed raw, a few dimensions dominate the
projection and the largest layers dominate a softmax layer mix.

Modes (`--norm`, README "Training heads"):
  train      per layer and dimension: (x - mean) / std with the mean and std of
             every real frame of the fold's TRAINING speakers (never validation
             or test); stored as buffers `norm.mean`/`norm.std` (L, D) in
             head.safetensors, so `cli predict` applies the same transform
  utterance  per utterance, layer and dimension over its real frames (CMVN);
             nothing stored. Removes the utterance mean, so GAP of it is 0
  frame      parameter-free LayerNorm of each frame's D-vector, per layer (as
             s3prl's featurizer does before its layer mix); nothing stored
  none       the features as cached

The training statistics are accumulated batch by batch in float64 with
Chan et al.'s pairwise update (no E[x^2] - E[x]^2 cancellation on dimensions
whose mean dwarfs their spread) over real frames only: padded positions are
excluded by the padding mask. Every std is floored at STD_FLOOR_REL x the
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

    def set_stats(self, moments: RunningMoments) -> None:
        self.mean.copy_(moments.mean.to(self.mean))
        self.std.copy_(moments.std().to(self.std))

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
