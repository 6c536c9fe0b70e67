"""A faster CPU forward for the layer-norm convolutional front end of wav2vec2-family models.

Why: on a CPU the seven-layer conv front end (512 channels at 3,200 then 1,600, ...
frames per second) is ~40 % of a WavLM Base-sized forward, and a quarter of that is
not arithmetic: every layer turns (B, C, T) into (B, T, C) and back around its
LayerNorm, and the first layer (one input channel, kernel 10, stride 5) is a poor
shape for oneDNN. Kept in (B, T, C) layout throughout, each layer is a few matrix
products over strided views of its input (tap j of a kernel reads frames j, j + s,
j + 2s, ...), LayerNorm runs on the contiguous last axis, and nothing is transposed
until the model's own `transpose(1, 2)` at the end, which becomes free.

Same weights, same operations, another summation order: outputs equal the model's
own within float rounding (~4e-6 of the largest value, measured at load time by
`use_fast_front_end`, which keeps the original forward if the check fails). Only
layer-norm front ends (feat_extract_norm="layer": WavLM Large and the LN variants of
wav2vec2/HuBERT, data2vec-audio); group-norm ones keep their forward.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TOLERANCE = 1e-4  # of the largest output value, as the padding measurement uses


class FastConvFrontEnd:
    """`forward(input_values (B, N)) -> (B, C, T)` (a transposed view of (B, T, C))."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = list(layers)
        # per layer: (kernel, stride, taps (k, C_in, C_out) contiguous, bias or None)
        self.plan = []
        for layer in self.layers:
            conv = layer.conv
            k, s = conv.kernel_size[0], conv.stride[0]
            taps = conv.weight.detach().permute(2, 1, 0).contiguous()  # (k, C_in, C_out)
            bias = None if conv.bias is None else conv.bias.detach()
            self.plan.append((k, s, taps, bias))

    def __call__(self, input_values: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._one(x) for x in input_values]).transpose(1, 2)  # (B, C, T)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) -> (T, C)."""
        h = None
        for layer, (k, s, taps, bias) in zip(self.layers, self.plan):
            if h is None:  # one input channel: frames (T, k) @ (k, C)
                out = x.unfold(0, k, s) @ taps[:, 0, :]
            else:  # (T', C_out) = sum_j h[j::s][:T'] @ W_j: strided row views, no im2col copy
                t_out = (h.shape[0] - k) // s + 1
                out = h[0: s * (t_out - 1) + 1: s] @ taps[0]
                for j in range(1, k):
                    tap = h[j: j + s * (t_out - 1) + 1: s]
                    # in place in float32; under autocast (bf16 products) out-of-place, which autocast casts
                    out = out.addmm_(tap, taps[j]) if out.dtype == taps.dtype else torch.addmm(out, tap, taps[j])
            if bias is not None:
                out += bias
            h = layer.activation(layer.layer_norm(out))  # (T, C)
        return h


def _eligible(model: nn.Module) -> nn.ModuleList | None:
    encoder = getattr(model, "feature_extractor", None)
    layers = getattr(encoder, "conv_layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    for layer in layers:
        conv = getattr(layer, "conv", None)
        if not (isinstance(conv, nn.Conv1d) and isinstance(getattr(layer, "layer_norm", None), nn.LayerNorm)
                and conv.groups == 1 and conv.dilation == (1,) and conv.padding == (0,)
                and callable(getattr(layer, "activation", None))):
            return None
    return layers if layers[0].conv.in_channels == 1 else None


def use_fast_front_end(model: nn.Module, seed: int = 0) -> bool:
    """Swap the model's conv front-end forward for FastConvFrontEnd if it is a layer-norm
    front end and gives the same output on a test input (else leave it); True if swapped."""
    layers = _eligible(model)
    if layers is None:
        return False
    encoder = model.feature_extractor
    fast = FastConvFrontEnd(layers)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((2, 4000)).astype(np.float32))  # (B, N): 0.25 s, 12 frames
    device = next(model.parameters()).device
    with torch.inference_mode():
        x = x.to(device)
        want, got = encoder(x), fast(x)
    scale = float(want.abs().max()) + 1.0
    if want.shape != got.shape or float((want - got).abs().max()) > TOLERANCE * scale:
        return False
    encoder.forward = fast  # an instance attribute: nn.Module.__call__ finds it first
    return True
