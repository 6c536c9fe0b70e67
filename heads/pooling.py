"""Utterance pooling of frame features: GAP (eq. 2), SAP (eqs. 3-5) and SR (eq. 6).

All three take the same inputs and return `(B, output_size)`:
  features     (B, T, D) float, zero (or anything) on padding
  padding_mask (B, T) bool, True = real frame
  vad_mask     (B, T) bool, True = voice-active frame (False on padding)

No-speech fallback: when the VAD marks no frame of an utterance as speech,
SAP attends among (and averages) all real frames of that utterance instead,
so its output is finite and well defined; `speech_frames` returns a
per-utterance flag so the trainer counts these utterances (`no_speech`).

Design choices the paper leaves open (see README "Defaults the paper left open"):
- MHSA head count: 8 by default (head dim 128 for WavLM Large's D = 1024);
  if D is not divisible by the requested count, the largest divisor of D
  below it is used (`attention_heads`).
- No residual connection and no LayerNorm around the MHSA: eq. 4 defines
  h(X) = MHSA(g(X)) and SAP its mean. A residual would add the plain mean of
  the speech frames, which SR already nearly carries through GAP, and SSL
  hidden states are layer-normed already.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def speech_frames(padding_mask: torch.Tensor, vad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frames SAP uses and which utterances fell back to all real frames.

    Returns `(mask (B, T) bool, no_speech (B,) bool)`.
    """
    speech = vad_mask & padding_mask  # (B, T)
    no_speech = ~speech.any(dim=1)  # (B,)
    mask = torch.where(no_speech[:, None], padding_mask, speech)  # (B, T)
    return mask, no_speech


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over T of `x (B, T, D)` where `mask (B, T)` is True; 0 for an all-False row."""
    weights = mask.to(x.dtype)  # (B, T)
    total = torch.einsum("btd,bt->bd", x, weights)  # (B, D) a batched mat-vec: no (B, T, D) temporary
    return total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


def compact(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the selected frames of each row to the front and cut the batch to the longest row.

    `x (B, T, D)`, `mask (B, T)` -> `(B, S, D)`, `(B, S)` with S = max selected
    count. Attention without positional encoding is permutation-equivariant
    and the mean is permutation-invariant, so SAP on the compacted batch is
    the same function; it just skips the non-speech and padding frames'
    arithmetic (about a third of the frames of a typical corpus).
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # (B, T) selected first
    s = max(int(mask.sum(dim=1).max()), 1)
    idx = order[:, :s]  # (B, S)
    x_c = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, S, D)
    return x_c, mask.gather(1, idx)  # (B, S, D), (B, S)


def attention_heads(dim: int, requested: int) -> int:
    """The largest head count <= requested that divides dim."""
    for h in range(max(1, min(requested, dim)), 0, -1):
        if dim % h == 0:
            return h
    return 1


class GAP(nn.Module):
    """Global average pooling over all real (non-padded) frames, speech or not (eq. 2)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = input_size

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor, vad_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(features, padding_mask)  # (B, D)


class SAP(nn.Module):
    """Segmental average pooling: MHSA among speech frames only, then their mean (eqs. 3-5).

    Padding and non-speech frames are excluded as keys (masked logits) and
    as queries (compacted away, and weighted 0 in the mean).

    The mean is taken before the value and output projections, which is
    exact because both are affine and each attention row sums to 1:

        mean_i h_i = W_o [ W_v^h (sum_j abar^h_j x_j) + b_v^h ]_h + b_o,   abar^h_j = mean_i A^h_ij

    so only the query and key projections run per frame: half the
    arithmetic of running `nn.MultiheadAttention` and averaging its output
    (tested equal to that). The parameters are an `nn.MultiheadAttention`'s.
    """

    def __init__(self, input_size: int, heads: int = 8) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = input_size
        self.heads = attention_heads(input_size, heads)
        self.mhsa = nn.MultiheadAttention(input_size, self.heads, batch_first=True)

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor, vad_mask: torch.Tensor) -> torch.Tensor:
        mask, _ = speech_frames(padding_mask, vad_mask)  # (B, T)
        x, mask = compact(features, mask)  # (B, S, D), (B, S)
        return self.mean_attention(x, mask)  # (B, D)

    def mean_attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mean over the masked frames of MHSA among them: `x (B, S, D)`, `mask (B, S)` -> `(B, D)`."""
        B, S, D = x.shape
        H, d = self.heads, D // self.heads
        w_q, w_k, w_v = self.mhsa.in_proj_weight.chunk(3)  # (D, D) each
        b_q, b_k, b_v = self.mhsa.in_proj_bias.chunk(3)  # (D,) each
        q = F.linear(x, w_q, b_q).view(B, S, H, d).transpose(1, 2)  # (B, H, S, d)
        k = F.linear(x, w_k, b_k).view(B, S, H, d).transpose(1, 2)  # (B, H, S, d)
        # A row with no frame at all would mask every key and give NaN;
        # let it see its first slot instead. Its output is zeroed below.
        keys = mask.clone()
        keys[:, 0] |= ~mask.any(dim=1)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, H, S, S) queries x keys
        attn = logits.masked_fill(~keys[:, None, None, :], float("-inf")).softmax(dim=-1)  # (B, H, S, S)
        weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, S) mean over queries
        abar = torch.einsum("bhij,bi->bhj", attn, weights)  # (B, H, S) mean attention each key gets
        z = torch.einsum("bhj,bjd->bhd", abar, x)  # (B, H, D) attention-weighted speech frames per head
        v = torch.einsum("bhd,hed->bhe", z, w_v.view(H, d, D)) + b_v.view(H, d) * abar.sum(-1, keepdim=True)  # (B, H, d)
        out = self.mhsa.out_proj(v.reshape(B, D))  # (B, D)
        return out * mask.any(dim=1, keepdim=True).to(out.dtype)


class SR(nn.Module):
    """Speech representation: concat(GAP, SAP) (eq. 6), 2D wide."""

    def __init__(self, input_size: int, heads: int = 8) -> None:
        super().__init__()
        self.gap = GAP(input_size)
        self.sap = SAP(input_size, heads=heads)
        self.input_size = input_size
        self.output_size = self.gap.output_size + self.sap.output_size

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor, vad_mask: torch.Tensor) -> torch.Tensor:
        gap = self.gap(features, padding_mask, vad_mask)  # (B, D)
        sap = self.sap(features, padding_mask, vad_mask)  # (B, D)
        return torch.cat([gap, sap], dim=-1)  # (B, 2D)


POOLINGS = ("sr", "gap", "sap")


def make_pooling(name: str, input_size: int, heads: int = 8) -> nn.Module:
    if name == "gap":
        return GAP(input_size)
    if name == "sap":
        return SAP(input_size, heads=heads)
    if name == "sr":
        return SR(input_size, heads=heads)
    raise ValueError(f"unknown pooling {name!r}; choose one of {', '.join(POOLINGS)}")
