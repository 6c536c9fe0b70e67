"""Which SSL layer(s) the head sees: a softmax-weighted mix of all cached layers, or one layer.

`(B, T, L, D)` -> `(B, T, D)`. A fixed layer is selected when the cache is
read (`--layer K` loads only that layer), so the head then gets `(B, T, D)`
or `(B, T, 1, D)` and `LayerMix` only applies the input normalization.

The normalization `--norm train` is a per-(layer, dimension) affine map, so
it is folded into the mix: sum_l w_l (x_l - m_l) / s_l = sum_l x_l (w_l / s_l)
- sum_l w_l m_l / s_l, one pass over the frames and no normalized copy.

How the weights are learned (`--layer-weights`, heads/train/layer_weights.py):
`probe` (default) scores a linear probe per layer, leave-one-speaker-out on
per-utterance means of every layer, and `pooled` learns them by a small head
on those means; both then freeze them (`fix`), so the head trains on one
materialized layer's worth of frames. `joint` learns them with the head at
every step (every layer of every frame is read in every epoch).
"""

from __future__ import annotations

import torch
from torch import nn


class LayerMix(nn.Module):
    """softmax(w)-weighted sum over the layer axis; `w` starts at 0 (a uniform mean)."""

    def __init__(self, n_layers: int, hidden_size: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.input_size = hidden_size
        self.output_size = hidden_size
        self.logits = nn.Parameter(torch.zeros(n_layers)) if n_layers > 1 else None

    def weights(self) -> torch.Tensor:
        """(L,) the current layer weights, summing to 1."""
        if self.logits is None:
            return torch.ones(1)
        return torch.softmax(self.logits.detach(), dim=0)

    def fix(self, logits: torch.Tensor) -> None:
        """Set the layer weights' logits and stop training them (`--layer-weights pooled`)."""
        if self.logits is None:
            return
        with torch.no_grad():
            self.logits.copy_(logits)
        self.logits.requires_grad_(False)

    def forward(self, features: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`features (B, T, L, D)` -> `(B, T, D)`; `affine` = (scale (L, D), shift (L, D)) applied per layer first."""
        if features.dim() == 3:  # (B, T, D): one layer already selected
            features = features.unsqueeze(2)
        if features.shape[2] != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers, got features of shape {tuple(features.shape)}")
        w = (torch.ones(1, device=features.device) if self.logits is None
             else torch.softmax(self.logits, dim=0)).to(features.dtype)  # (L,)
        if affine is None:
            if self.logits is None:
                return features[:, :, 0]  # (B, T, D)
            return torch.einsum("btld,l->btd", features, w)  # (B, T, D)
        scale, shift = affine
        weight = w[:, None] * scale.to(features.dtype)  # (L, D)
        bias = (w[:, None] * shift.to(features.dtype)).sum(dim=0)  # (D,)
        if self.logits is None:
            return features[:, :, 0] * weight[0] + bias  # (B, T, D)
        # a broadcast product + sum: einsum("btld,ld->btd") has no BLAS form and was 6x slower on CPU
        return (features * weight).sum(dim=2) + bias  # (B, T, D)
