"""`--layer-weights probe`: layer weights from how well each layer alone predicts emotion for unseen speakers.

Why: stage 1 of `pooled` fits the layer weights by the training loss, so
it favours the layers that fit the training speakers. On Whisper base
(real speech, 10 leave-one-speaker-out folds) it put 1-3 % on layer 0,
the layer that is best alone for the held-out speaker (GAP 73.9 UA against
69.4 with the pooled mix). A leave-one-speaker-out linear probe per layer,
inside the fold's training and validation speakers, ranked the layers as
GAP per single layer did on the test speakers; with its weights GAP
reached 77.2 UA on those folds (paper's eq. 6 head), and at today's
defaults the SR head 72.8 against 69.4 with pooled weights and 71.9-73.6
on the best single layers (bench/results/real-speech-cpu.md).

Per layer l, on the utterance means that `pooled` also uses, `(N, L, 2D)`
[mean of all frames | mean of speech frames], normalized the same way:
a ridge classifier (scikit-learn's `RidgeClassifier` on `StandardScaler`'d
features, class weights "balanced" over all N, in closed form) is trained
on all but one group of speakers and scored by UA on the group left out;
the score is the mean over groups. The groups are the fold's training and
validation speakers, dealt into at most PROBE_MAX_GROUPS groups; the test
speaker's utterances are never scanned. Utterances without an emotion
label take no part. The weights are softmax((score - best) / PROBE_TEMPERATURE).

Why ridge: on 3 Whisper base folds, logistic regression ranked the top layers
the same way but took about 4 minutes per outer fold on 360 utterances; the ridge
closed form shares the work of the inner folds. Each utterance enters one
weighted scatter, its group's (G, F, F); inner fold g solves with the total
less group g's, so a layer costs one N x F x F pass plus one F x F Cholesky
factorization per inner fold. Measured cost at WavLM Large's shape in
bench/results/train-head-cpu.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

# A layer whose probe UA is 0.05 (5 points) below the best layer's gets e^-1 of the best layer's weight,
# 10 points below e^-2: layers within a few points of each other share the mix, weak ones drop out.
PROBE_TEMPERATURE = 0.05
# Inner folds at most: more speakers than this are dealt into this many groups (sklearn's GroupKFold,
# deterministic), so the cost is bounded by PROBE_MAX_GROUPS Cholesky solves per layer.
PROBE_MAX_GROUPS = 10
# The ridge penalty on standardized features per training row: alpha = PROBE_RIDGE * n_train, so that
# directions carrying less variance than one standardized feature are shrunk by half or more, at any N.
PROBE_RIDGE = 1.0
# float32: 21 s against float64's 49 s at WavLM Large's shape on 2 cores; on 6 of Whisper base's real-speech
# folds the two gave the same scores to 1e-7 (the features are standardized first, so the sums keep their digits)
PROBE_DTYPE = torch.float32


def probe_layer_logits(pooled: torch.Tensor, labels: pd.DataFrame) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The layer logits (L,) from the probes, and what they measured; None when there are under 2 speaker groups.

    `pooled (N, L, 2D)`: the utterances of `labels` (index utt_id; columns emotion (-1 = none) and speaker),
    in the same order: the fold's training and validation utterances only.
    """
    keep = (labels["emotion"] >= 0).to_numpy()
    speakers = labels["speaker"].astype(str).to_numpy()[keep]
    groups = speaker_groups(speakers, PROBE_MAX_GROUPS)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups < 2:
        return None, {"layer_probe": f"{len(set(speakers))} emotion-labelled speaker(s) outside the test: "
                                     "no leave-one-speaker-out probe; the weights were learned as by 'pooled'"}
    rows = torch.from_numpy(np.flatnonzero(keep)).to(pooled.device)
    emotion = torch.as_tensor(labels["emotion"].to_numpy()[keep], dtype=torch.long, device=pooled.device)
    scores = probe_scores(pooled[rows], emotion, torch.as_tensor(groups, device=pooled.device))  # (L,)
    logits = (scores - scores.max()) / PROBE_TEMPERATURE
    return logits.float(), {"layer_probe_scores": [round(float(s), 4) for s in scores],
                            "layer_probe_groups": n_groups}


def speaker_groups(speakers: np.ndarray, max_groups: int) -> np.ndarray:
    """(N,) inner fold index per utterance: one per speaker (sorted), or `max_groups` groups of speakers."""
    names, index = np.unique(speakers, return_inverse=True)
    if len(names) <= max_groups:
        return index
    from sklearn.model_selection import GroupKFold

    groups = np.zeros(len(speakers), dtype=np.int64)
    for g, (_, held) in enumerate(GroupKFold(n_splits=max_groups).split(np.zeros(len(speakers)), groups=index)):
        groups[held] = g
    return groups


@torch.no_grad()
def probe_scores(x: torch.Tensor, emotion: torch.Tensor, groups: torch.Tensor, *,
                 ridge: float = PROBE_RIDGE, dtype: torch.dtype = PROBE_DTYPE) -> torch.Tensor:
    """(L,) per layer, the mean over groups of the UA on a group of a ridge probe trained on the others.

    `x (N, L, F)`, `emotion (N,)` class indices, `groups (N,)` inner fold indices 0..G-1. Equal to
    StandardScaler + RidgeClassifier(alpha=ridge * n_train) refitted per inner fold with the sample
    weights N / (K n_c) of all N rows (scikit-learn's "balanced", tests/test_layer_weights.py).
    """
    _, y = torch.unique(emotion, return_inverse=True)  # (N,) in 0..K-1
    scores = []
    for layer in range(x.shape[1]):
        # centred and scaled once (each fold's own scaling undoes it), so the scatter sums keep their digits
        xl = x[:, layer].to(dtype)  # (N, F)
        xl = (xl - xl.mean(0)) / xl.std(0).clamp(min=1e-12)
        probe = GroupScatter(xl, y, groups)
        scores.append(torch.stack([probe.held_out_ua(g, ridge) for g in range(len(probe.scatter))]).mean())
    return torch.stack(scores)


class GroupScatter:
    """One layer's weighted sums per group, from which every inner fold's ridge system is assembled.

    Each row enters one (F, F) product once: its group's weighted scatter. Fold g trains on the
    total less group g's share, so a fold costs one Cholesky factorization, not a pass over the rows.
    The class weights are fixed over the folds (computed on all rows), which keeps the scatters
    shareable: with per-fold weights every class would need its own.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> None:
        n_groups, n_classes = int(groups.max()) + 1, int(y.max()) + 1
        # a product with the one-hot cells, not index_add_ (atomic adds on CUDA): the same sums every run
        cells = torch.nn.functional.one_hot(groups * n_classes + y, n_groups * n_classes).to(x.dtype).T  # (GK, N)
        self.counts = cells.sum(1).view(n_groups, n_classes)  # (G, K)
        self.sums = (cells @ x).view(n_groups, n_classes, -1)  # (G, K, F)
        self.squares = (cells @ x.square()).view(n_groups, n_classes, -1)  # (G, K, F)
        n = self.counts.sum(0)  # (K,)
        self.class_weight = len(y) / (n_classes * n)  # (K,) "balanced" over all rows
        w = self.class_weight[y]  # (N,)
        self.scatter = torch.stack([(x[groups == g] * w[groups == g, None]).T @ x[groups == g]
                                    for g in range(n_groups)])  # (G, F, F): sum of w x x^T per group
        self.total = self.scatter.sum(0)  # (F, F)
        self.x, self.y, self.groups = x, y, groups

    def held_out_ua(self, g: int, ridge: float) -> torch.Tensor:
        """UA on group g of a ridge classifier fitted on the standardized rows of the other groups.

        As RidgeClassifier: targets +-1 per class, sample weights w, weighted centering of features and
        targets, (Z^T W Z + ridge n I) b = Z^T W Y with Z the rows divided by their std.
        """
        x, dtype = self.x, self.x.dtype
        n = self.counts.sum(0) - self.counts[g]  # (K,) training rows per class
        s = self.sums.sum(0) - self.sums[g]  # (K, F)
        n_train = n.sum()
        mean = s.sum(0) / n_train  # (F,) StandardScaler's mean and std of the training rows
        std = ((self.squares.sum(0) - self.squares[g]).sum(0) / n_train - mean.square()).clamp(min=0).sqrt()
        # a feature (nearly) constant in training, relative to its unit spread over all rows: scale 1, as
        # StandardScaler does for a constant one (float32 cannot tell a spread below ~1e-3 from rounding)
        std = torch.where(std > 1e-3, std, 1.0)
        w = self.class_weight * n  # (K,) each class's total weight in training
        w_train = w.sum()
        m = (self.class_weight @ s) / w_train  # (F,) weighted mean
        # in place: at F = 2048 each (F, F) temporary costs a good part of what the Cholesky factorization does
        a = (self.total - self.scatter[g]).addr_(m, m, alpha=-w_train)  # (F, F) weighted centred scatter
        a.div_(std[:, None]).div_(std[None, :]).diagonal().add_(ridge * n_train)
        present = n > 0
        targets = 2 * torch.eye(len(n), dtype=dtype, device=x.device)[:, present] - 1  # (K, K') +-1 per class
        y_mean = w @ targets / w_train  # (K',)
        b = (self.class_weight[:, None] * s).T @ targets - w_train * torch.outer(m, y_mean)  # (F, K')
        coef = torch.cholesky_solve(b / std[:, None], torch.linalg.cholesky(a))  # (F, K')
        rows = self.groups == g
        yh = self.y[rows]
        scores = ((x[rows] - m) / std) @ coef + y_mean  # (H, K')
        pred = present.nonzero()[:, 0][scores.argmax(1)]  # (H,) class indices
        return torch.stack([(pred[yh == c] == c).to(dtype).mean() for c in torch.unique(yh)]).mean()
