"""The fold's input preparation: normalization statistics, layer weights learned cheaply, frames mixed once.

Why: a mix of all L cached layers learned jointly with the head touches
every layer of every frame in every epoch (IEMOCAP, 25 WavLM layers: ~52 GB
per epoch, from disk when it does not fit RAM), while the head's own
arithmetic works on one layer's worth. `--layer-weights probe` (the
default) and `pooled` split the learning in stages:

1. One pass over the fold's training and validation utterances (all
   layers) collects, per utterance, the mean of every layer over its real
   frames and over its speech frames (the VAD mask SAP uses): `(N, L, 2D)`,
   small. The same pass accumulates the `--norm train` statistics from the
   training utterances.
2. A GAP-style head (softmax layer mix -> projection -> classifier and
   regressors, the same loss, early stopping on the validation speaker)
   learns the layer weights on those normalized means: seconds, since it
   never sees a frame.
3. A second pass writes the normalized frames mixed with those (now fixed)
   weights, one layer's worth, float16, where they fit: the training device
   (GPU memory), else RAM within `--memory-gb`, else a temporary file.
   GAP/SAP/SR then train on it exactly as on a one-layer cache; the test
   speaker is predicted through the full path (every layer, `SERHead.forward`),
   which is what `cli predict` runs.

What it changes relative to a jointly learned mix: the layer weights are
chosen by what the layers' utterance means (all frames, speech frames)
predict, not by what helps SAP's attention over frames, and they do not
co-adapt with the pooling during training. bench/results/real-speech-cpu.md reports what that
costs or gains on the corpora at hand. `--layer-weights joint` keeps the
mix learnable at every step.

`--layer-weights probe` (the default) shares steps 1 and 3 and replaces
step 2: the weights come from per-layer linear probes scored
leave-one-speaker-out on the same normalized means (heads/train/layer_probe.py),
i.e. from how well each layer predicts speakers it was not fitted on rather
than from the training loss, which on Whisper base starved the layer that
generalizes best (bench/results/real-speech-cpu.md). With fewer than two labelled speakers outside the test, step 2
runs as for `pooled` and `metrics.json` says so under "inputs".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

import torch

from core.errors import UserError
from heads.config import TrainConfig
from heads.model.head import SERHead
from heads.model.pooling import masked_mean, speech_frames
from heads.train.batches import ResidentBatches, resident_tensor
from heads.train.folds import FoldData
from heads.train.layer_probe import probe_layer_logits
from heads.train.statistics import RunningMoments, check_finite
from heads.train.trainer import Trainer

# The layer logits' rate, as a multiple of the head's (bench/results/real-speech-cpu.md). On Whisper base (real speech, SR) 30x collapsed stage 1 onto two layers: 59.2 UA, 1x
# 63.3, 10x 61.9, a jointly learned mix 64.2; on a cache with one informative layer among noise
# (tests/test_layer_weights.py) 1x stays near uniform (UA 0.58) where 10x and 30x find it (0.96).
MIX_LR_FACTOR = 10.0
STAGE_EPOCHS: int | None = None  # None: the head's --epochs
# float32 values per slice of a batch in the two passes (256 MiB): a batch of 64 utterances x 25
# layers x 1024 is ~3 GB in float32, and the passes need a few temporaries of that size
SLICE_VALUES = 2**26


@dataclass
class Scan:
    """What one pass over a fold's utterances collected."""

    lengths: dict[str, int]  # utt_id -> real frames
    pooled: dict[str, torch.Tensor]  # split -> (N, L, 2D) float32: [mean of all frames | of speech frames]
    moments: RunningMoments | None  # training frames, for --norm train


def prepare_inputs(trainer: Trainer) -> None:
    """Fit `--norm train` statistics and, for `--layer-weights pooled|probe` with several layers, the layer weights."""
    head = trainer.head(trainer.model)
    config = trainer.config
    fit_norm = head.norm.mode == "train"
    fixed = config.layer_weights in ("pooled", "probe") and head.mix.n_layers > 1  # weights found first, then fixed
    if not (fit_norm or fixed):
        return
    start = time.perf_counter()
    scan = scan_splits(trainer, head, ("train", "val") if fixed else ("train",), fit_norm=fit_norm, pool=fixed)
    if fit_norm:
        head.norm.set_stats(scan.moments.mean, scan.moments.std())
    info: dict[str, Any] = {}
    seconds = {"scan": time.perf_counter() - start}  # for benchmarks; metrics.json stays deterministic
    if fixed:
        affine = head.norm.affine()
        if affine is not None:  # a mean of affinely normalized frames = the normalized mean
            scale, shift = (torch.cat([a, a], dim=-1).to(scan.pooled["train"].device) for a in affine)  # (L, 2D)
            scan.pooled = {k: v * scale + shift for k, v in scan.pooled.items()}
        mark = time.perf_counter()
        logits, info = find_layer_weights(trainer, scan.pooled)
        head.mix.fix(logits.to(head.mix.logits.device))
        seconds["weights"], mark = time.perf_counter() - mark, time.perf_counter()
        where = set()
        for split in ("train", "val"):
            trainer.loaders[split], place = materialize(trainer, head, split, scan.lengths)
            where.add(place)
        seconds["materialize"] = time.perf_counter() - mark
        trainer.mixed_frames_in = ", ".join(sorted(where))  # a speed matter, so not in metrics.json
    trainer.input_seconds = seconds
    trainer.input_info = {"inputs": info} if info else {}


@torch.no_grad()
def scan_splits(trainer: Trainer, head: SERHead, splits: tuple[str, ...], *, fit_norm: bool, pool: bool) -> Scan:
    """One pass over the splits' batches: lengths, per-utterance layer means (`pool`), training moments (`fit_norm`)."""
    n_layers, hidden = head.mix.n_layers, head.input_size
    moments = RunningMoments(n_layers, hidden, trainer.device) if fit_norm else None
    lengths: dict[str, int] = {}
    pooled: dict[str, torch.Tensor] = {}
    for split in splits:
        ids = trainer.data.split(split)
        row = {u: i for i, u in enumerate(ids)}
        out = torch.zeros(len(ids), n_layers, 2 * hidden, device=trainer.device) if pool else None  # (N, L, 2D)
        for batch in sliced(trainer.pass_loader(split)):
            features, padding, vad = trainer.encode(batch)
            if features.dim() not in (3, 4):
                raise UserError("fitting --norm train or pooled layer weights needs frame features (B, T, [L,] D)")
            x = features if features.dim() == 4 else features.unsqueeze(2)  # (B, T, L, D)
            b, t, l, d = x.shape
            flat = x.reshape(b, t, l * d)  # (B, T, L*D)
            all_frames = masked_mean(flat, padding)  # (B, L*D)
            check_finite(all_frames, x, padding, batch["utt_id"])
            if moments is not None and split == "train":
                moments.add(x, padding)
            lengths.update(zip(batch["utt_id"], (int(n) for n in padding.sum(dim=1).tolist())))
            if out is not None:
                if not head.norm.per_frame_affine:  # affine norms are applied to the means afterwards
                    flat = head.norm(x, padding).reshape(b, t, l * d)
                    all_frames = masked_mean(flat, padding)
                speech, _ = speech_frames(padding, vad)  # (B, T) SAP's frames (all real ones if none is speech)
                means = torch.cat([all_frames.view(b, l, d), masked_mean(flat, speech).view(b, l, d)], dim=-1)
                out[torch.tensor([row[u] for u in batch["utt_id"]], device=out.device)] = means  # (B, L, 2D)
        if out is not None:
            pooled[split] = out
    return Scan(lengths, pooled, moments)


def sliced(batches: Iterable[dict]) -> Iterator[dict]:
    """The batches cut into slices of at most SLICE_VALUES feature values (at least one utterance each)."""
    for batch in batches:
        features = batch["features"]
        b = features.shape[0]
        step = max(1, SLICE_VALUES // max(1, features[0].numel()))
        if step >= b:
            yield batch
            continue
        for i in range(0, b, step):
            yield {k: v[i : i + step] if (torch.is_tensor(v) or isinstance(v, list)) and len(v) == b else v
                   for k, v in batch.items()}


def find_layer_weights(trainer: Trainer, pooled: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The layer logits (L,) by `--layer-weights` (pooled or probe), and what was done to find them."""
    info: dict[str, Any] = {}
    if trainer.config.layer_weights == "probe":
        data = trainer.data
        logits, info = probe_layer_logits(torch.cat([pooled["train"], pooled["val"]]),
                                          data.labels.loc[data.train + data.val])
        if logits is not None:
            return logits, info
    logits, learned = learn_layer_weights(trainer, pooled)
    return logits, {**info, **learned}


def learn_layer_weights(trainer: Trainer, pooled: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Stage 1: the layer logits (L,) of a GAP-style head trained on the pooled layers, and what it did."""
    config = replace(trainer.config, pooling="gap", norm="none", layer_weights="joint", layer=None,
                     spread=False, speech_stats=False, pooled_norm="none", pooled_dropout=0.0, ema=0.0,
                     epochs=STAGE_EPOCHS or trainer.config.epochs)
    stage = PooledTrainer(config, trainer.data, pooled, layers=trainer.layers)
    stage.fit()
    mix = stage.model.mix
    return mix.logits.detach().clone(), {
        "layer_weight_epochs": stage.epoch, "layer_weight_best_epoch": stage.early.best_epoch,
        "layer_weight_val_loss": stage.early.best_loss,
    }


class PooledTrainer(Trainer):
    """Stage 1: a Trainer whose 'frames' are each utterance's pooled layers, features (B, 1, L, 2D)."""

    def __init__(self, config: TrainConfig, data: FoldData, pooled: dict[str, torch.Tensor], *,
                 layers: list[int] | None) -> None:
        self.pooled = pooled
        super().__init__(config, data, layers=layers)

    def feature_shape(self) -> tuple[int, int]:
        _, n_layers, width = self.pooled["train"].shape
        return n_layers, width

    def make_loader(self, split: str) -> ResidentBatches:
        split = "val" if split == "test" else split  # stage 1 never tests; the loader only has to exist
        x = self.pooled[split]  # (N, L, 2D): one row per utterance, i.e. a one-frame "utterance"
        n = x.shape[0]
        ids = self.data.split(split)
        return ResidentBatches(x, torch.ones(n, dtype=torch.bool), torch.arange(n), torch.ones(n, dtype=torch.long),
                               ids, self.data.labels.loc[ids], batch_size=self.batch_size(split),
                               shuffle=split == "train", seed=self.config.seed)

    def param_groups(self) -> list[dict]:
        rest = [p for name, p in self.model.named_parameters() if name != "mix.logits"]
        return [{"params": rest},
                {"params": [self.model.mix.logits], "lr": self.config.lr * MIX_LR_FACTOR, "weight_decay": 0.0}]


@torch.no_grad()
def materialize(trainer: Trainer, head: SERHead, split: str,
                lengths: dict[str, int]) -> tuple[ResidentBatches, str]:
    """Stage 3: the split's frames normalized and mixed with the fixed weights, as resident batches; and where."""
    ids = trainer.data.split(split)
    n = torch.tensor([lengths[u] for u in ids], dtype=torch.long)  # (N,)
    starts = torch.cumsum(n, 0) - n  # (N,)
    rows_total, hidden = int(n.sum()), head.input_size
    # float16 (one layer's worth, half of float32); raw frames (--norm none) can exceed its range
    dtype = torch.float32 if head.norm.mode == "none" else torch.float16
    dest, place = resident_tensor((rows_total, hidden), dtype, trainer.device, trainer.host_budget())  # (R, D)
    vad = torch.zeros(rows_total, dtype=torch.bool, device=dest.device)  # (R,)
    start_of = dict(zip(ids, starts.tolist()))
    for batch in sliced(trainer.pass_loader(split)):
        features, padding, vad_mask = trainer.encode(batch)
        y = head.mixed(features, padding)  # (B, T, D)
        t = torch.arange(padding.shape[1], device=padding.device)  # (T,)
        first = torch.tensor([start_of[u] for u in batch["utt_id"]], device=padding.device)  # (B,)
        rows = (first[:, None] + t[None, :])[padding].to(dest.device)  # (n_real,)
        dest[rows] = y[padding].to(device=dest.device, dtype=dtype)
        vad[rows] = vad_mask[padding].to(dest.device)
    batches = ResidentBatches(dest, vad, starts, n, ids, trainer.data.labels.loc[ids],
                              batch_size=trainer.batch_size(split), shuffle=split == "train", seed=trainer.config.seed,
                              extra={"mixed": True})
    return batches, place
