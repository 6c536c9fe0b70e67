"""What a fold's heads read, computed once per fold and shared by every head trained on it.

Everything that no trainable weight changes is done here, not per epoch and not
per ensemble member (heads/train/stack.py trains the members and the folds
together):

1. the input normalization statistics and the fixed layer weights (probe or
   pooled) with the fold's training (and, for the probe, validation) speakers,
   through `FeatureTrainer`'s preparation (heads/train/layer_weights.py);
2. one pass over the training and validation utterances through the fitted
   normalization and mix, which keeps per utterance
   - the fixed statistics of the pooled vector: GAP's mean of all real frames,
     `--spread`'s std, `--speech-stats`' mean and std of the speech frames
     (the affine input normalization and the fixed mix commute with none of
     the stds, so they are taken from the mixed frames, once), standardized by
     `--pooled-norm train` fitted on the training rows;
   - the frames SAP attends to (its speech frames, or all real frames where the
     VAD found none), float16 (float32 under `--norm none`: raw frames can exceed
     float16's range), one layer's worth, where they fit: the training device,
     else RAM within `--memory-gb`, else a temporary file.

A cache read one layer at a time (one cached layer, or `--layer K`) needs no
pass per fold at all: `CacheMoments` reads every utterance once per run (its
count, mean and spread over real frames and over SAP's frames, and SAP's frames
themselves, as stored), and a fold's normalization statistics, standardized
statistics and frames follow from those by the fold's affine input
normalization (a per-dimension scale and shift, applied to the shared frames as
SAP reads them).

The test speaker is never read here: the test split is predicted through the
trained head's full path (every cached layer, `SERHead.forward`), which is what
`cli predict` runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from heads.config import TrainConfig
from heads.model.head import SERHead
from heads.model.input_norm import InputNorm, floor_std
from heads.model.pooling import SPREAD_EPS, masked_mean, masked_std, speech_frames
from heads.train.batches import resident_tensor
from heads.train.feature_trainer import FeatureTrainer
from heads.train.folds import FoldData
from heads.train.layer_weights import SLICE_VALUES
from heads.train.statistics import check_finite, class_weights, target_scale
from heads.train.step_plan import StepPlan, step_plan

SPLITS = ("train", "val")


@dataclass
class Split:
    """One split's utterances as a fold's heads read them (N utterances, in `utt_id` order)."""

    utt_id: list[str]
    frames: np.ndarray  # (N,) real frames: what training batches are bucketed by (heads/train/batches.py)
    start: torch.Tensor  # (N,) long: first row of the utterance's SAP frames in FoldInputs.frames
    count: torch.Tensor  # (N,) long: its SAP frames (>= 1)
    fixed: torch.Tensor  # (N, F) float32: the pooled vector's fixed statistics, standardized (F may be 0)
    emotion: torch.Tensor  # (N,) long, -1 = none
    va: torch.Tensor  # (N, 2) float32 standardized valence/arousal, NaN = none
    va_raw: np.ndarray  # (N, 2) float64 on the corpus scale, NaN = none
    no_speech: np.ndarray  # (N,) bool: the VAD found no speech frame


@dataclass
class CacheMoments:
    """Every labelled utterance of a one-layer read, once per run: moments over its real frames and over the
    frames SAP attends to (its speech frames, or all real ones where the VAD found none), and those frames."""

    row: dict[str, int]  # utt_id -> row
    n: torch.Tensor  # (N,) float64 real frames
    mean: torch.Tensor  # (N, D) float64 over real frames (after a per-utterance or per-frame --norm)
    m2: torch.Tensor  # (N, D) float64 sum of squared deviations from it
    sap_n: torch.Tensor  # (N,) float64
    sap_mean: torch.Tensor  # (N, D) float64 over SAP's frames
    sap_m2: torch.Tensor  # (N, D) float64
    no_speech: np.ndarray  # (N,) bool
    frames: torch.Tensor  # (R, D) SAP's frames, as stored (float16 from a float16 cache)
    start: torch.Tensor  # (N,) long: first row of each utterance's SAP frames
    seconds: float

    def combined(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (D,), population std (D,), floored) over every real frame of `ids`, in float64 (Chan's merge)."""
        rows = torch.tensor([self.row[u] for u in ids])
        n, mean, m2 = self.n[rows], self.mean[rows], self.m2[rows]  # (N,), (N, D), (N, D)
        total = n.sum()
        grand = (n[:, None] * mean).sum(0) / total  # (D,)
        spread = m2.sum(0) + (n[:, None] * (mean - grand).square()).sum(0)  # (D,)
        return grand, floor_std((spread / total).sqrt())


@torch.no_grad()
def cache_moments(cache: Any, ids: list[str], layer: int, norm: str, vad_mode: int, device: torch.device,
                  host_budget: int) -> CacheMoments:
    """One pass over the utterances `ids` of one cached layer (see CacheMoments)."""
    start = time.perf_counter()
    d = int(cache.hidden_size)
    shape = (len(ids), d)
    out = {k: torch.zeros(shape, dtype=torch.float64) for k in ("mean", "m2", "sap_mean", "sap_m2")}
    n, sap_n = torch.zeros(len(ids), dtype=torch.float64), torch.zeros(len(ids), dtype=torch.float64)
    no_speech = np.zeros(len(ids), dtype=bool)
    bound = int(cache.meta.loc[ids, "n_frames"].sum())
    stored = torch.float16 if str(cache.fingerprint.get("dtype", "float16")) == "float16" else torch.float32
    frames, _ = resident_tensor((bound, d), stored, device, host_budget)  # (R, D)
    starts = torch.zeros(len(ids), dtype=torch.long)
    norm_module = InputNorm(norm if norm in ("utterance", "frame") else "none", 1, d)
    row = 0
    for i, utt in enumerate(ids):
        raw = torch.from_numpy(np.ascontiguousarray(cache.features(utt, [layer])))  # (T, 1, D) stored dtype
        vad = torch.from_numpy(cache.vad(utt, vad_mode))[None]  # (1, T)
        padding = torch.ones_like(vad)
        x = norm_module(raw[None].float(), padding)[0, :, 0]  # (T, D) a per-utterance/per-frame norm, else raw
        sap, flag = speech_frames(padding, vad & padding)
        picked = x[sap[0]]  # (S, D)
        for name, part in (("", x), ("sap_", picked)):
            mean = part.double().mean(0)
            out[name + "mean"][i] = mean
            out[name + "m2"][i] = (part.double() - mean).square().sum(0)
        n[i], sap_n[i], no_speech[i] = len(x), len(picked), bool(flag[0])
        check_finite(out["mean"][i : i + 1], x[None, :, None], padding, [utt])
        stored_frames = picked if norm in ("utterance", "frame") else raw[:, 0][sap[0]]
        frames[row : row + len(picked)] = stored_frames.to(device=frames.device, dtype=frames.dtype)
        starts[i] = row
        row += len(picked)
    return CacheMoments({u: i for i, u in enumerate(ids)}, n, out["mean"], out["m2"], sap_n, out["sap_mean"],
                        out["sap_m2"], no_speech, frames[:row], starts, time.perf_counter() - start)


@dataclass
class FoldInputs:
    """A fold prepared for its heads: the fitted template head, the splits' fixed statistics and SAP frames."""

    data: FoldData
    config: TrainConfig  # the run's settings; members differ only in the seed
    template: SERHead  # buffers fitted on the training split (input norm, fixed layer mix, pooled norm, target scale)
    frames: torch.Tensor  # (R, D) SAP frames of the train and val utterances, float16 (float32 under --norm none)
    splits: dict[str, Split]
    affine: tuple[torch.Tensor, torch.Tensor] | None  # (scale (D,), shift (D,)) SAP's frames still need, or None
    class_weights: torch.Tensor  # (C,) from the training split
    plan: StepPlan
    info: dict[str, Any]  # what metrics.json records about the inputs (layer probe scores, ...)
    seconds: dict[str, float]  # set-up phases, for benchmarks
    frames_in: str  # where the SAP frames went ("ram", "cuda:0", "file")

    @property
    def fold(self) -> int:
        return self.data.fold.fold


def prepare_fold(cache: Any, data: FoldData, config: TrainConfig, layers: list[int], *, seed: int,
                 device: torch.device) -> FoldInputs:
    """Fit and compute what fold `data`'s heads share (see the module docstring).

    `seed` matters only to `--layer-weights pooled`, whose layer weights are learned by a seeded
    stage (heads/train/layer_weights.py); the probe, the statistics and the frames depend on none.
    """
    start = time.perf_counter()
    # The layer-weight stage and the materialized frames, without a pooled norm (fitted below, from the
    # fixed statistics, instead of from a pass of the whole head over the frames).
    prep = FeatureTrainer(replace(config, seed=seed, pooled_norm="none", ema=0.0), data, cache=cache, layers=layers)
    with torch.random.fork_rng(devices=[]):
        template = build_head(config, prep.feature_shape(), len(data.classes))
    state = {k: v for k, v in prep.head(prep.model).state_dict().items() if k.startswith(("norm.", "mix."))}
    template.load_state_dict(state, strict=False)
    if template.mix.logits is not None:  # the fitted weights stay fixed (`joint` never comes here)
        template.mix.fix(template.mix.logits.detach().clone())
    template.to(device).eval()
    train = data.labels.loc[data.train]
    va_mean, va_std = target_scale(train[["valence", "arousal"]].to_numpy())
    template.set_target_scale(va_mean.to(device), va_std.to(device))
    fixed_names = fixed_parts(template)
    ids = {split: data.split(split) for split in SPLITS}
    # One pass over the frames; the SAP frames are at most the real ones, so that bounds their rows.
    bound = int(sum(int(cache.meta.loc[ids[s], "n_frames"].sum()) for s in SPLITS))
    dtype = torch.float32 if template.norm.mode == "none" else torch.float16
    frames, place = resident_tensor((bound, template.input_size), dtype, device, prep.host_budget())  # (R, D)
    mark = time.perf_counter()
    row = 0
    found: dict[str, dict[str, tuple[int, int, torch.Tensor, bool]]] = {s: {} for s in SPLITS}
    for split in SPLITS:
        for features, padding, vad, names in _batches(prep, split):
            x = features if features.dim() == 3 else template.mixed(features, padding)  # (B, T, D)
            sap, flag = speech_frames(padding, vad)  # (B, T) SAP's frames, (B,) no speech
            stats = fixed_statistics(template, x, padding, sap)  # (B, F)
            check_finite(masked_mean(x, padding), x, padding, names)
            counts = sap.sum(dim=1).tolist()
            picked = x[sap]  # (n_sap, D) utterance after utterance, frames in order
            frames[row : row + len(picked)] = picked.to(device=frames.device, dtype=dtype)
            for name, n_sap, st, f in zip(names, counts, stats.cpu(), flag.tolist()):
                found[split][name] = (row, n_sap, st, f)
                row += n_sap
    seconds = {**prep.input_seconds, "fixed_and_frames": time.perf_counter() - mark}
    frames = frames[:row]
    fixed_all = {s: torch.stack([found[s][u][2] for u in ids[s]]) if ids[s] else torch.zeros(0, 0) for s in SPLITS}
    if template.pooled_norm.mode == "train" and fixed_names:
        fit_pooled(template, fixed_all["train"].to(device))
    splits = {}
    for split in SPLITS:
        labels = data.labels.loc[ids[split]]
        raw = labels[["valence", "arousal"]].to_numpy(np.float64)
        va = (torch.tensor(raw, dtype=torch.float32, device=device) - template.va_mean) / template.va_std
        fixed = fixed_all[split].to(device)
        if template.pooled_norm.mode == "train" and fixed_names:
            fixed = standardize(template, fixed)
        starts, counts = (torch.tensor([found[split][u][i] for u in ids[split]], dtype=torch.long, device=device)
                          for i in (0, 1))
        splits[split] = Split(ids[split], cache.meta.loc[ids[split], "n_frames"].to_numpy(np.int64), starts, counts,
                              fixed,
                              torch.tensor(labels["emotion"].to_numpy(), dtype=torch.long, device=device), va, raw,
                              np.array([found[split][u][3] for u in ids[split]], dtype=bool))
    plan = step_plan(len(data.train), config.batch_size, config.epochs, config.patience, config.min_steps,
                     config.grad_accum)
    seconds["total"] = time.perf_counter() - start
    return FoldInputs(data, config, template, frames, splits, None,
                      class_weights(train["emotion"].to_numpy(), len(data.classes)).to(device), plan,
                      dict(prep.input_info), seconds, place)


def prepare_fold_from_moments(moments: CacheMoments, cache: Any, data: FoldData, config: TrainConfig,
                              device: torch.device) -> FoldInputs:
    """`prepare_fold` for a one-layer read, from the run's CacheMoments: no pass over the frames."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        template = build_head(config, (1, int(cache.hidden_size)), len(data.classes))
    d = template.input_size
    scale, shift = torch.ones(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    if template.norm.mode == "train":
        mean, std = moments.combined(data.train)  # the training speakers' frames only
        template.norm.set_stats(mean, std)
        std, mean = template.norm.std.double().reshape(-1), template.norm.mean.double().reshape(-1)  # (D,) each
        scale, shift = 1.0 / std, -mean / std
    train = data.labels.loc[data.train]
    va_mean, va_std = target_scale(train[["valence", "arousal"]].to_numpy())
    template.set_target_scale(va_mean, va_std)
    parts = fixed_parts(template)
    fixed_all = {}
    for split in SPLITS:
        rows = torch.tensor([moments.row[u] for u in data.split(split)])
        stats = {
            "mean": moments.mean[rows] * scale + shift,  # an affine map commutes with the mean ...
            "spread": masked_std_of(moments.m2[rows], moments.n[rows], scale),  # ... and scales the spread
            "speech_mean": moments.sap_mean[rows] * scale + shift,
            "speech_std": masked_std_of(moments.sap_m2[rows], moments.sap_n[rows], scale),
        }
        fixed_all[split] = torch.cat([stats[p] for p in parts], dim=1).float() if parts else torch.zeros(len(rows), 0)
    if template.pooled_norm.mode == "train" and parts:
        fit_pooled(template, fixed_all["train"])
    template.to(device).eval()
    splits = {}
    for split in SPLITS:
        ids = data.split(split)
        rows = torch.tensor([moments.row[u] for u in ids])
        labels = data.labels.loc[ids]
        raw = labels[["valence", "arousal"]].to_numpy(np.float64)
        fixed = fixed_all[split].to(device)
        if template.pooled_norm.mode == "train" and parts:
            fixed = standardize(template, fixed)
        va = (torch.tensor(raw, dtype=torch.float32, device=device) - template.va_mean) / template.va_std
        splits[split] = Split(ids, cache.meta.loc[ids, "n_frames"].to_numpy(np.int64), moments.start[rows].to(device),
                              moments.sap_n[rows].long().to(device), fixed,
                              torch.tensor(labels["emotion"].to_numpy(), dtype=torch.long, device=device), va, raw,
                              moments.no_speech[rows.numpy()])
    plan = step_plan(len(data.train), config.batch_size, config.epochs, config.patience, config.min_steps,
                     config.grad_accum)
    affine = None if template.norm.mode != "train" else (scale.float().to(device), shift.float().to(device))
    return FoldInputs(data, config, template, moments.frames, splits, affine,
                      class_weights(train["emotion"].to_numpy(), len(data.classes)).to(device), plan, {},
                      {"total": time.perf_counter() - start}, str(moments.frames.device))


def masked_std_of(m2: torch.Tensor, n: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`masked_std` of frames scaled by `scale (D,)`, from their sum of squared deviations `m2 (N, D)` over `n (N,)`."""
    return ((scale.square() * m2 / n[:, None].clamp(min=1)) + SPREAD_EPS).sqrt()


def build_head(config: TrainConfig, shape: tuple[int, int], n_classes: int) -> SERHead:
    n_layers, hidden = shape
    c = config
    return SERHead(hidden, n_layers, n_classes, pooling=c.pooling, proj_dim=c.proj_dim, heads=c.heads,
                   dropout=c.dropout, norm=c.norm, spread=c.spread, speech_stats=c.speech_stats,
                   pooled_norm=c.pooled_norm, pooled_dropout=c.pooled_dropout)


def fixed_parts(head: SERHead) -> list[str]:
    """The fixed statistics of the head's pooled vector, in its order: GAP's mean, then --spread, --speech-stats."""
    parts = ["mean"] if head.pool.statistic_dims else []
    parts += ["spread"] if head.spread else []
    return parts + (["speech_mean", "speech_std"] if head.speech_stats else [])


def fixed_statistics(head: SERHead, x: torch.Tensor, padding: torch.Tensor, sap: torch.Tensor) -> torch.Tensor:
    """`(B, F)`: the fixed statistics of mixed frames `x (B, T, D)`, as `SERHead.pooled` computes them."""
    out = []
    for part in fixed_parts(head):
        if part == "mean":
            out.append(masked_mean(x, padding))
        elif part == "spread":
            out.append(masked_std(x, padding))
        elif part == "speech_mean":
            out.append(masked_mean(x, sap))
        else:
            out.append(masked_std(x, sap, out[-1]))
    return torch.cat(out, dim=1) if out else x.new_zeros(x.shape[0], 0)


def fixed_columns(head: SERHead) -> torch.Tensor:
    """(F,) the pooled vector's columns that hold the fixed statistics, in `fixed_statistics`' order."""
    return head.pooled_norm.statistics.nonzero().squeeze(1)


def fit_pooled(head: SERHead, fixed: torch.Tensor) -> None:
    """`--pooled-norm train` from the training rows' fixed statistics `(N, F)` (SAP's columns stay the identity)."""
    pooled = fixed.new_zeros(fixed.shape[0], head.pooled_norm.statistics.numel())  # (N, P)
    pooled[:, fixed_columns(head).to(fixed.device)] = fixed
    head.pooled_norm.set_stats(pooled)


def standardize(head: SERHead, fixed: torch.Tensor) -> torch.Tensor:
    cols = fixed_columns(head).to(fixed.device)
    return (fixed - head.pooled_norm.mean[cols]) / head.pooled_norm.std[cols]


def _batches(prep: FeatureTrainer, split: str):
    """(features, padding_mask, vad_mask, utt_ids) of a split in order, in slices of about SLICE_VALUES values."""
    from heads.train.layer_weights import sliced

    loader = prep.loaders[split]
    if hasattr(loader, "batch"):  # frames in one tensor (the materialized mix, or the RAM preload): utterance order
        ids = torch.arange(len(loader.utt_ids))
        per = max(1, SLICE_VALUES // max(1, int(loader.lengths.max()) * loader.features[0].numel()))
        batches = (loader.batch(ids[i : i + per]) for i in range(0, len(ids), per))
    else:
        batches = sliced(prep.pass_loader(split))
    for batch in batches:
        features, padding, vad = prep.encode(batch)
        yield features, padding, vad, list(batch["utt_id"])
