"""Utterance pooling of frame features: GAP (eq. 2), SAP (eqs. 3-5) and SR (eq. 6).

All three take the same inputs and return `(B, output_size)`:
  features     (B, T, D) float, zero (or anything) on padding
  padding_mask (B, T) bool, True = real frame
  vad_mask     (B, T) bool, True = voice-active frame (False on padding)

No-speech fallback: when the VAD marks no frame of an utterance as speech,
SAP attends among (and averages) all real frames of that utterance instead,
so its output is finite and well defined; `speech_frames` returns a
per-utterance flag so the trainer counts these utterances (`no_speech`).

Design choices the paper leaves open (see docs/training.md "Defaults"):
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
from torch.autograd.function import once_differentiable

from heads.config import POOLINGS


def speech_frames(padding_mask: torch.Tensor, vad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frames SAP uses and which utterances fell back to all real frames.

    Returns `(mask (B, T) bool, no_speech (B,) bool)`.
    """
    speech = vad_mask & padding_mask  # (B, T)
    no_speech = ~speech.any(dim=1)  # (B,)
    mask = torch.where(no_speech[:, None], padding_mask, speech)  # (B, T)
    return mask, no_speech


def keep_at_most(mask: torch.Tensor, cap: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`mask (B, T)` with at most `cap` True frames per row: rows with more keep `cap` of them drawn
    uniformly without replacement (`--sap-frames` in training); other rows unchanged."""
    if mask.numel() == 0 or int(mask.sum(dim=1).max()) <= cap:
        return mask
    keys = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~mask, 2.0)  # (B, T)
    rank = keys.argsort(dim=1).argsort(dim=1)  # (B, T) each frame's place in its row's random order
    return mask & (rank < cap)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over T of `x (B, T, D)` where `mask (B, T)` is True; 0 for an all-False row."""
    weights = mask.to(x.dtype)  # (B, T)
    # (B, 1, T) @ (B, T, D): a batched mat-vec with no (B, T, D) temporary. einsum("btd,bt->bd")
    # made a transposed copy of x first and was 7x slower (B = 64, T = 400, D = 512, one CPU thread).
    total = torch.bmm(weights[:, None, :], x)[:, 0]  # (B, D)
    return total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


SPREAD_EPS = 1e-6  # added to the variance: the std's gradient stays finite on a dimension constant in an utterance


def masked_std(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Population std over T of `x (B, T, D)` where `mask (B, T)` is True: `(B, D)`, sqrt(var + SPREAD_EPS).

    Centred before squaring (no E[x^2] - E[x]^2 cancellation); an all-False row gives sqrt(SPREAD_EPS).
    `mean (B, D)`: `masked_mean(x, mask)` when the caller has it already.
    """
    centred = x - (masked_mean(x, mask) if mean is None else mean)[:, None, :]  # (B, T, D)
    return (masked_mean(centred.square(), mask) + SPREAD_EPS).sqrt()  # (B, D)


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

    def __init__(self, input_size: int, heads: int = 8) -> None:  # `heads`: every pooling's signature; unused
        super().__init__()
        self.input_size = input_size
        self.output_size = input_size
        self.statistic_dims = input_size  # output dims [0, n) are fixed statistics of the frames (--pooled-norm)

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor, vad_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(features, padding_mask)  # (B, D)


class SAP(nn.Module):
    """Segmental average pooling: MHSA among speech frames only, then their mean (eqs. 3-5).

    Padding and non-speech frames are excluded as keys (masked logits) and
    as queries (compacted away, and weighted 0 in the mean).

    Neither formulation stores the `(B, heads, S, S)` attention weights
    (see `mean_attention`); the parameters are an `nn.MultiheadAttention`'s
    (tested equal to running it and averaging, values and gradients).
    """

    def __init__(self, input_size: int, heads: int = 8) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = input_size
        self.heads = attention_heads(input_size, heads)
        self.mhsa = nn.MultiheadAttention(input_size, self.heads, batch_first=True)
        self.statistic_dims = 0  # learned, so --pooled-norm leaves it alone

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor, vad_mask: torch.Tensor) -> torch.Tensor:
        mask, _ = speech_frames(padding_mask, vad_mask)  # (B, T)
        x, mask = compact(features, mask)  # (B, S, D), (B, S)
        return self.mean_attention(x, mask)  # (B, D)

    def mean_attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mean over the masked frames of MHSA among them: `x (B, S, D)`, `mask (B, S)` -> `(B, D)`.

        Two exact formulations, neither of which holds a `(B, H, S, S)`
        attention matrix; which is faster depends on the shape (see
        `flash_pays`): `mean_attention_flash` or `mean_attention_chunked`.
        """
        if flash_pays(x.shape[1], x.shape[2]):
            return self.mean_attention_flash(x, mask)
        return self.mean_attention_chunked(x, mask)

    def mean_attention_flash(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`mean_attention` with a fused attention kernel: V runs per frame, attention is never stored.

        Costs one more D x D projection per frame than `mean_attention_chunked`
        but the kernel (flash on CPU, memory-efficient on CUDA) keeps its
        score tiles in cache; that wins while D is small next to S.
        """
        B, S, D = x.shape
        H, d = self.heads, D // self.heads
        qkv = F.linear(x, self.mhsa.in_proj_weight, self.mhsa.in_proj_bias)  # (B, S, 3D)
        q, k, v = qkv.view(B, S, 3, H, d).permute(2, 0, 3, 1, 4)  # (B, H, S, d) each
        keys = attendable_keys(mask)  # (B, S)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])  # (B, H, S, d)
        weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, S) mean over queries
        mean = torch.einsum("bhsd,bs->bhd", h, weights)  # (B, H, d)
        out = self.mhsa.out_proj(mean.reshape(B, D))  # (B, D) heads concatenated as in nn.MultiheadAttention
        return out * mask.any(dim=1, keepdim=True).to(out.dtype)

    def mean_attention_chunked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`mean_attention` averaging before the value and output projections.

        The mean is taken before them, which is exact because both are affine
        and each attention row sums to 1:

            mean_i h_i = W_o [ W_v^h (sum_j abar^h_j x_j) + b_v^h ]_h + b_o,   abar^h_j = mean_i A^h_ij

        so only the query and key projections run per frame (half the
        arithmetic of `nn.MultiheadAttention` and a mean), and `abar` comes
        from `mean_softmax`.
        """
        B, S, D = x.shape
        H, d = self.heads, D // self.heads
        w_v, b_v = self.mhsa.in_proj_weight[2 * D :], self.mhsa.in_proj_bias[2 * D :]  # (D, D), (D,)
        qk = F.linear(x, self.mhsa.in_proj_weight[: 2 * D], self.mhsa.in_proj_bias[: 2 * D])  # (B, S, 2D)
        keys = attendable_keys(mask)  # (B, S)
        key_bias = torch.zeros(B, 1, 1, S, dtype=x.dtype, device=x.device)
        key_bias.masked_fill_(~keys[:, None, None, :], float("-inf"))  # (B, 1, 1, S)
        weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, S) mean over queries
        abar = mean_softmax(qk, key_bias, weights, H)  # (B, H, S) mean attention each key gets
        z = torch.einsum("bhj,bjd->bhd", abar, x)  # (B, H, D) attention-weighted speech frames per head
        v = torch.einsum("bhd,hed->bhe", z, w_v.view(H, d, D)) + b_v.view(H, d) * abar.sum(-1, keepdim=True)  # (B, H, d)
        out = self.mhsa.out_proj(v.reshape(B, D))  # (B, D)
        return out * mask.any(dim=1, keepdim=True).to(out.dtype)


def attendable_keys(mask: torch.Tensor) -> torch.Tensor:
    """The key mask `(B, S)` for `mask (B, S)`, with slot 0 opened in rows that have no frame.

    A row with no frame at all would mask every key and give NaN (values and
    gradients); it sees its first slot instead, and SAP zeroes its output.
    """
    keys = mask.clone()
    keys[:, 0] |= ~mask.any(dim=1)
    return keys


def flash_pays(frames: int, dim: int) -> bool:
    """Whether `SAP.mean_attention_flash` is the faster formulation for S = `frames`, D = `dim`."""
    return dim <= FLASH_MAX_DIM_PER_FRAME * frames


# Measured (bench/train_head.py --sap-only, B = 64, 8 heads, CPU): flash wins at D = 80 for S = 200-950
# (2.05 vs 3.23 s at S = 600), chunked at D = 1024 for S = 200-600 (12.3 vs 14.1 s at S = 600), where
# flash's extra V projection outweighs its fused kernel; D = 1024, S = 950 was a draw.
FLASH_MAX_DIM_PER_FRAME = 1.0
QUERY_BLOCK_ELEMENTS = 2**22  # floats in one (B, H, block, S) score block of MeanSoftmax, 16 MiB ...
QUERY_BLOCK_MIN = 64  # ... but never fewer queries: thinner blocks starve the matmuls (D = 1024, S = 600: 13 -> 64 queries, 16.6 -> 12.2 s)


class MeanSoftmax(torch.autograd.Function):
    """abar = sum_i w_i softmax_j(q_i . k_j + bias_j), a block of queries at a time.

    `q (B, H, S, d)` pre-scaled, `k (B, H, S, d)`, `key_bias (B, 1, 1, S)`
    (0 or -inf), `w (B, S)` query weights -> `abar (B, H, S)`. Only one
    `(B, H, block, S)` score block lives at a time, forward and backward;
    backward recomputes each block's softmax A instead of storing it, and uses

        dL/dlogit_ij = w_i A_ij (g_j - sum_k A_ik g_k),   g = dL/dabar.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, key_bias: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Contiguous once: the per-block matmuls would otherwise copy the strided views each block.
        q, k = q.contiguous(), k.contiguous()
        B, H, S, _ = q.shape
        block = query_block(B, H, S)
        abar = q.new_zeros(B, H, 1, S)
        for i in range(0, S, block):
            a = torch.softmax((q[:, :, i : i + block] @ k.transpose(-1, -2)).add_(key_bias), dim=-1)  # (B, H, b, S)
            abar += w[:, None, None, i : i + block] @ a  # (B, H, 1, S)
        ctx.save_for_backward(q, k, key_bias, w)
        return abar.squeeze(2)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        q, k, key_bias, w = ctx.saved_tensors
        B, H, S, _ = q.shape
        block = query_block(B, H, S)
        g = g[:, :, None, :]  # (B, H, 1, S)
        dq, dk = torch.empty_like(q), torch.zeros_like(k)  # (B, H, S, d) each
        for i in range(0, S, block):
            q_i = q[:, :, i : i + block]  # (B, H, b, d)
            a = torch.softmax((q_i @ k.transpose(-1, -2)).add_(key_bias), dim=-1)  # (B, H, b, S)
            dlogit = (g - a @ g.transpose(-1, -2)).mul_(a).mul_(w[:, None, i : i + block, None])  # (B, H, b, S)
            dq[:, :, i : i + block] = dlogit @ k
            dk += dlogit.transpose(-1, -2) @ q_i
        return dq, dk, None, None


DENSE_MAX_ELEMENTS = 2**26  # (B, H, S, S) attention weights up to which mean_softmax keeps them (256 MiB)


class DenseMeanSoftmax(torch.autograd.Function):
    """`MeanSoftmax` for short rows, the (B, H, S, S) weights kept, reading queries and keys as projected.

    `qk (B, S, 2, H, d)` (a view of the projection's `(B, S, 2D)` output), `key_bias (B, 1, 1, S)`, `w (B, S)`,
    `scale` -> `abar (B, H, S)`. One copy puts queries and keys in attention-head order; the scale goes on
    the (B, H, S, S) scores rather than on the queries; backward writes both gradients into one buffer in
    that order, handed back as a view of the projection's layout. (Autograd's form of the same arithmetic
    copied queries and keys again for the backward matmuls and once more to reassemble their gradient.)
    """

    @staticmethod
    def forward(ctx, qk: torch.Tensor, key_bias: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
        heads = qk.permute(2, 0, 3, 1, 4).contiguous()  # (2, B, H, S, d)
        q, k = heads[0], heads[1]
        a = torch.softmax((q @ k.transpose(-1, -2)).mul_(scale).add_(key_bias), dim=-1)  # (B, H, S, S)
        ctx.save_for_backward(heads, a, w)
        ctx.scale = scale
        return (w[:, None, None, :] @ a).squeeze(2)  # (B, H, S)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        heads, a, w = ctx.saved_tensors
        q, k = heads[0], heads[1]
        g = g[:, :, None, :]  # (B, H, 1, S)
        # dL/dlogit_ij = w_i A_ij (g_j - sum_k A_ik g_k), times the scale for the unscaled scores
        dlogit = (g - a @ g.transpose(-1, -2)).mul_(a).mul_(w[:, None, :, None] * ctx.scale)  # (B, H, S, S)
        grad = torch.empty_like(heads)  # (2, B, H, S, d)
        torch.matmul(dlogit, k, out=grad[0])
        torch.matmul(dlogit.transpose(-1, -2), q, out=grad[1])
        return grad.permute(1, 3, 0, 2, 4), None, None, None  # (B, S, 2, H, d)


def mean_softmax(qk: torch.Tensor, key_bias: torch.Tensor, w: torch.Tensor, heads: int) -> torch.Tensor:
    """abar (B, H, S) = sum_i w_i softmax_j(q_i . k_j / sqrt(d) + bias_j) for each attention head.

    `qk (B, S, 2D)`: queries then keys as the in-projection gives them (head h's in columns h*d ...),
    `key_bias (B, 1, 1, S)` 0 or -inf, `w (B, S)` query weights. Short rows (`--sap-frames`: S = 32) keep
    the (B, H, S, S) weights (`DenseMeanSoftmax`); longer ones take `MeanSoftmax`, a block of queries at a time.
    """
    b, s, width = qk.shape
    d = width // 2 // heads
    parts = qk.view(b, s, 2, heads, d)
    if b * heads * s * s <= DENSE_MAX_ELEMENTS:
        return DenseMeanSoftmax.apply(parts, key_bias, w, 1 / math.sqrt(d))
    q, k = parts.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, d) each
    return MeanSoftmax.apply(q / math.sqrt(d), k, key_bias, w)


def query_block(batch: int, heads: int, frames: int) -> int:
    """Queries per MeanSoftmax block: as many as fit QUERY_BLOCK_ELEMENTS, at least QUERY_BLOCK_MIN (or all)."""
    return min(frames, max(QUERY_BLOCK_MIN, QUERY_BLOCK_ELEMENTS // max(1, batch * heads * frames)))


class SR(nn.Module):
    """Speech representation: concat(GAP, SAP) (eq. 6), 2D wide."""

    def __init__(self, input_size: int, heads: int = 8) -> None:
        super().__init__()
        self.gap = GAP(input_size)
        self.sap = SAP(input_size, heads=heads)
        self.input_size = input_size
        self.output_size = self.gap.output_size + self.sap.output_size
        self.statistic_dims = self.gap.output_size  # GAP comes first

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor, vad_mask: torch.Tensor) -> torch.Tensor:
        gap = self.gap(features, padding_mask, vad_mask)  # (B, D)
        sap = self.sap(features, padding_mask, vad_mask)  # (B, D)
        return torch.cat([gap, sap], dim=-1)  # (B, 2D)


def make_pooling(name: str, input_size: int, heads: int = 8) -> nn.Module:
    """The pooling `name` of heads.config.POOLINGS, built as its class(input_size, heads=heads)."""
    import importlib

    module, cls = POOLINGS[POOLINGS.check(name)].module.split(":")
    return getattr(importlib.import_module(module), cls)(input_size, heads=heads)
