"""Which SSL layer(s) the head sees: a learnable softmax-weighted mix of all cached layers, or one layer.

`(B, T, L, D)` -> `(B, T, D)`. A fixed layer is selected when the cache is
read (`--layer K` loads only that layer), so the head then gets `(B, T, D)`
or `(B, T, 1, D)` and `LayerMix` is the identity.

Traffic: the mix touches every layer of every frame once per epoch; the
trainer therefore preloads the selected layers into RAM within
`--memory-gb` and computes the mix on the training device.
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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 3:  # (B, T, D): one layer already selected
            return features
        if features.shape[2] != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers, got features of shape {tuple(features.shape)}")
        if self.logits is None:
            return features[:, :, 0]  # (B, T, D)
        w = torch.softmax(self.logits, dim=0).to(features.dtype)  # (L,)
        return torch.einsum("btld,l->btd", features, w)  # (B, T, D)
