"""The SR/MTL head: input normalization -> layer mix -> pooling -> 32-d projection -> classifier + regressors.

Pooled vector: the pooling's output (GAP, SAP or SR = [GAP | SAP]), then,
with `spread` (`--spread`, the default for heads on cached features), each
dimension's standard deviation over the utterance's real frames
(`[... | std]`): mean-like poolings cannot see how much a dimension moves
within an utterance, the prosodic range a classical baseline reads from its
std. With `speech_stats` (`--speech-stats`, also the default on cached
features), each dimension's mean and std over the utterance's speech frames
(the VAD mask SAP uses; all real frames when the VAD found none):
`[... | speech mean | speech std]`. GAP averages pauses and background into
its mean, and SAP's speech-frame summary is learned and never standardized;
on log-mel frames the speech-frame statistics are what a linear baseline
wins with (bench/results/real-speech-cpu.md). `pooled_norm`
(`--pooled-norm train`, heads/model/pooled_norm.py) then puts the fixed
statistics (GAP's mean, the stds, the speech mean) at unit scale with
training-utterance statistics. None of these is in the paper; `--no-spread
--no-speech-stats --pooled-norm none` is its eq. 6 exactly (bench/results/real-speech-cpu.md).

Projection: Linear(pool -> proj_dim) -> GELU -> Dropout(0.1). The paper only
says "projected into 32 dimensions"; the non-linearity lets the three tasks
share a non-linear bottleneck (without it proj + classifier is just a
rank-32 linear map), and dropout because a head on ~4k utterances overfits
the training speakers quickly.
`pooled_dropout` (`--pooled-dropout`, default 0) drops entries of the
standardized pooled vector before the projection, in training only: a
dropped statistic reads as its training mean (0 after `pooled_norm`).
Measured in bench/results/real-speech-cpu.md: no consistent
effect on either real-speech corpus (its sign flips with the seed), so it is off.

Input normalization (`norm`, heads/model/input_norm.py) comes before the layer mix;
with `--norm train` its statistics are buffers of this module (`norm.mean`,
`norm.std`), saved in head.safetensors with the weights.

`forward` = `from_mixed(mixed(features))`: the trainer calls `from_mixed`
directly on frames it materialized once with `mixed` (fixed layer weights,
`--layer-weights pooled`), and `cli predict` calls `forward`, so both see
the same function.

Valence/arousal are predicted in standardized units (training-split mean
and std, kept as buffers `va_mean`/`va_std`, saved with the weights);
`to_corpus_scale` inverts them for predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from heads.model.input_norm import InputNorm
from heads.model.layer_mix import LayerMix
from heads.model.pooled_norm import PooledNorm
from heads.model.pooling import GAP, make_pooling, masked_mean, masked_std, speech_frames


@dataclass
class HeadOutput:
    logits: torch.Tensor  # (B, C)
    va: torch.Tensor  # (B, 2) valence, arousal in standardized units
    no_speech: torch.Tensor  # (B,) bool: VAD found no speech frame, SAP used all frames


class SERHead(nn.Module):
    """Layer mix + pooling + shared projection + 4-way classifier + two regressors."""

    def __init__(self, hidden_size: int, n_layers: int, n_classes: int, *, pooling: str = "sr",
                 proj_dim: int = 32, heads: int = 8, dropout: float = 0.1, norm: str = "none",
                 spread: bool = False, speech_stats: bool = False, pooled_norm: str = "none",
                 pooled_dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = InputNorm(norm, n_layers, hidden_size)
        self.mix = LayerMix(n_layers, hidden_size)
        self.pool = make_pooling(pooling, hidden_size, heads=heads)
        self.spread = spread
        self.speech_stats = speech_stats
        pooled_size = self.pool.output_size + (hidden_size if spread else 0) + (2 * hidden_size if speech_stats else 0)
        statistics = torch.zeros(pooled_size, dtype=torch.bool)  # (P,) the dims that are fixed frame statistics
        statistics[: self.pool.statistic_dims] = True
        statistics[self.pool.output_size :] = True
        self.pooled_norm = PooledNorm(pooled_norm, pooled_size, statistics)
        self.pooled_dropout = nn.Dropout(pooled_dropout)  # no parameters: head.safetensors keeps its keys
        self.proj = nn.Sequential(nn.Linear(pooled_size, proj_dim), nn.GELU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(proj_dim, n_classes)
        self.regressor = nn.Linear(proj_dim, 2)  # two regressors (valence, arousal) as one 2-output layer
        self.register_buffer("va_mean", torch.zeros(2))
        self.register_buffer("va_std", torch.ones(2))
        self.input_size = hidden_size
        self.output_size = n_classes + 2

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor, vad_mask: torch.Tensor,
                sap_mask: torch.Tensor | None = None) -> HeadOutput:
        """`features (B, T, L, D)` or `(B, T, D)`, masks `(B, T)` bool; `sap_mask (B, T)`: the frames SAP
        attends among instead of the speech frames (`--sap-frames` in training), the rest unchanged."""
        if isinstance(self.pool, GAP) and self.norm.per_frame_affine and not (self.spread or self.speech_stats):
            # GAP, the normalization and the mix are all linear: pool each layer, then normalize and
            # mix (B, L, D), so neither touches every frame (one pass over the features).
            x = features if features.dim() == 4 else features.unsqueeze(2)  # (B, T, L, D)
            w = padding_mask.to(x.dtype)  # (B, T)
            per_layer = torch.einsum("btld,bt->bld", x, w) / w.sum(dim=1).clamp(min=1)[:, None, None]  # (B, L, D)
            pooled = self.mix(per_layer.unsqueeze(1), self.norm.affine()).squeeze(1)  # (B, D)
            return self.outputs(pooled, padding_mask, vad_mask)
        return self.from_mixed(self.mixed(features, padding_mask), padding_mask, vad_mask, sap_mask)

    def mixed(self, features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Normalized and mixed frames: `(B, T, L, D)` or `(B, T, D)` -> `(B, T, D)`."""
        if self.norm.per_frame_affine:
            return self.mix(features, self.norm.affine())  # normalization folded into the mix
        x = features if features.dim() == 4 else features.unsqueeze(2)  # (B, T, L, D)
        return self.mix(self.norm(x, padding_mask))

    def from_mixed(self, x: torch.Tensor, padding_mask: torch.Tensor, vad_mask: torch.Tensor,
                   sap_mask: torch.Tensor | None = None) -> HeadOutput:
        """Pooling and the task layers on already normalized and mixed frames `x (B, T, D)`."""
        return self.outputs(self.pooled(x, padding_mask, vad_mask, sap_mask), padding_mask, vad_mask)

    def pooled(self, x: torch.Tensor, padding_mask: torch.Tensor, vad_mask: torch.Tensor,
               sap_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled vector of mixed frames `x (B, T, D)`: `(B, P)`, before `pooled_norm`."""
        # the pooling reads the VAD mask for SAP only (GAP takes every real frame)
        parts = [self.pool(x, padding_mask, vad_mask if sap_mask is None else sap_mask)]  # (B, pool.output_size)
        if self.spread:
            parts.append(masked_std(x, padding_mask))  # (B, D)
        if self.speech_stats:
            speech, _ = speech_frames(padding_mask, vad_mask)  # (B, T)
            mean = masked_mean(x, speech)  # (B, D)
            parts += [mean, masked_std(x, speech, mean)]  # (B, D) each
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (B, P)

    def outputs(self, pooled: torch.Tensor, padding_mask: torch.Tensor, vad_mask: torch.Tensor) -> HeadOutput:
        z = self.proj(self.pooled_dropout(self.pooled_norm(pooled)))  # (B, proj_dim)
        _, no_speech = speech_frames(padding_mask, vad_mask)
        return HeadOutput(self.classifier(z), self.regressor(z), no_speech)

    def set_target_scale(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.va_mean.copy_(mean)
        self.va_std.copy_(std)

    def scale_targets(self, va: torch.Tensor) -> torch.Tensor:
        """(B, 2) corpus-scale valence/arousal -> standardized units (NaN stays NaN)."""
        return (va - self.va_mean) / self.va_std

    def to_corpus_scale(self, va: torch.Tensor) -> torch.Tensor:
        """(B, 2) standardized predictions -> the corpus's own scale (e.g. 1-5)."""
        return va * self.va_std + self.va_mean
