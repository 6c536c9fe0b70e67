"""The train-head loop on features from a live SSL backbone: `FineTuneTrainer` overrides hooks only.

`FineTuneTrainer` subclasses `heads.trainer.Trainer` and overrides hooks only
(STYLE item 8): where features come from (`build_model`, `feature_shape`,
`make_loader`, `encode`, `forward`), what trains at which rate
(`param_groups`), and how micro-batches add up to an optimizer step
(`steps_per_epoch`, `ends_step`, `backward`, `optimizer_step`: a variable
number of audio-budgeted micro-batches per step of 64 utterances, DDP
gradient sync only on a step's last micro-batch, fp16 loss scaling,
gradient clipping). The epoch loop, early stopping, metrics and fold outputs
are the trainer's own; heads/finetune/run.py runs it over the folds of a corpus.

The head sees the backbone's last hidden state `(B, T, D)` (`last_hidden_state`,
after the final layer norm of pre-LN models: the same tensor `cli extract`
stores as the last layer), i.e. the paper's fine-tuned setting with a fixed
last layer; the head module, pooling and loss are the train-head classes.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

from core.devices import resolve_device, training_autocast
from core.frames import SAMPLE_RATE
from core.processes import worker_init
from core.records import Utterance
from heads.config import FinetuneSettings, TrainConfig
from heads.finetune.backbone import Backbone, BackboneSettings, load_backbone
from heads.finetune.checkpoint import Checkpoint, rng_state, save_checkpoint, set_rng_state
from heads.finetune.distributed import DistContext, barrier
from heads.finetune.waves import StepBatchSampler, WaveCollate, WaveDataset, WaveIndex, pack
from heads.model.head import HeadOutput, SERHead
from heads.train.folds import FoldData
from heads.train.trainer import Trainer

# torch >= 2.12 renamed DDP's broadcast_buffers to forward_sync_buffers.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                   else {"broadcast_buffers": False})


class FineTuneModel(nn.Module):
    """Backbone + the train-head SERHead: waves (B, N) -> HeadOutput."""

    def __init__(self, backbone: Backbone, head: SERHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, waves: torch.Tensor, wave_mask: torch.Tensor, vad_mask: torch.Tensor) -> HeadOutput:
        hidden, frame_mask = self.backbone(waves, wave_mask)  # (B, T, D), (B, T)
        if hidden.shape[1] != vad_mask.shape[1]:
            raise RuntimeError(f"backbone gave {hidden.shape[1]} frames, the VAD masks have {vad_mask.shape[1]}")
        return self.head(hidden, frame_mask, vad_mask & frame_mask)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


class EvalBatchSampler(Sampler[list[int]]):
    """Validation/test micro-batches: length-sorted, packed under the same audio budget."""

    def __init__(self, n_samples: np.ndarray, step_seconds: float) -> None:
        self.batches = pack(range(len(n_samples)), np.asarray(n_samples), int(step_seconds * SAMPLE_RATE))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FoldInterrupted(Exception):
    """Raised after the per-run epoch limit; the checkpoint on disk resumes the fold."""


class FineTuneTrainer(Trainer):
    """Trainer whose features come from a live backbone trained together with the head."""

    def __init__(self, config: TrainConfig, data: FoldData, *, settings: FinetuneSettings,
                 utterances: dict[str, Utterance], index: WaveIndex, max_seconds: float,
                 ctx: DistContext | None = None, checkpoint_dir: Path | None = None,
                 max_epochs_this_run: int | None = None,
                 on_epoch: Callable[[dict[str, float]], None] | None = None) -> None:
        settings.validate()
        self.settings = settings
        self.ctx = ctx or DistContext()
        self.utterances = utterances
        self.index = index
        self.max_seconds = max_seconds
        self.checkpoint_dir = checkpoint_dir
        self.max_epochs_this_run = max_epochs_this_run
        self.epochs_this_run = 0
        self._user_on_epoch = on_epoch
        self.amp_dtype = training_autocast(settings.amp, resolve_device(config.device))  # before the model loads
        super().__init__(config, data, on_epoch=self._end_of_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    # ---- where features come from ----

    def feature_shape(self) -> tuple[int, int]:
        return 1, self.backbone.hidden_size  # one layer: the last hidden state

    def build_model(self) -> nn.Module:
        self.backbone = load_backbone(BackboneSettings.of(self.settings, distributed=self.ctx.enabled))
        model = FineTuneModel(self.backbone, super().build_model())
        if self.ctx.enabled:
            model = model.to(self.device)
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            # No buffer broadcast: WavLM has no running statistics, and it would make
            # every eval forward a collective.
            model = DDP(model, device_ids=ids, **_NO_BUFFER_SYNC)
        return model

    def head(self, model: nn.Module) -> SERHead:
        return unwrap(model).head

    def make_loader(self, split: str) -> DataLoader:
        c, s = self.config, self.settings
        utts = [self.utterances[u] for u in self.data.split(split)]
        dataset = WaveDataset(utts, self.index, self.data.labels, grid=self.backbone.grid,
                              max_seconds=self.max_seconds, vad_mode=c.vad_mode)
        cost = self.backbone.cost_samples(dataset.n_samples)  # Whisper: every utterance costs whole 30 s windows
        if split == "train":
            sampler: Sampler = StepBatchSampler(cost, batch_size=c.batch_size,
                                                step_seconds=s.step_seconds, shuffle=True, seed=c.seed, ctx=self.ctx)
        else:
            sampler = EvalBatchSampler(cost, s.step_seconds)
        # Workers die with this process: a killed fine-tuning run must not leave decoders behind.
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=WaveCollate(self.backbone.grid),
                          num_workers=s.workers, pin_memory=self.device.type == "cuda",
                          worker_init_fn=worker_init(os.getpid()) if s.workers > 0 else None)

    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live model's inputs: waves (B, N), wave mask (B, N), VAD mask (B, T) on the device."""
        dev = self.device
        return (batch["waves"].to(dev, non_blocking=True), batch["wave_mask"].to(dev, non_blocking=True),
                batch["vad_mask"].to(dev, non_blocking=True))

    def forward(self, batch: dict) -> HeadOutput:
        model = self.model
        if isinstance(model, DDP):
            if torch.is_grad_enabled():
                # DDP all-reduces during backward only on a step's last micro-batch
                # (what `no_sync()` does, set here because the loop owns the backward).
                model.require_backward_grad_sync = bool(batch.get("step_end", True))
            else:
                model = model.module  # evaluation: every rank runs the whole split, no collectives
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = model(*self.encode(batch))
        return HeadOutput(out.logits.float(), out.va.float(), out.no_speech)

    def param_groups(self) -> list[dict]:
        m = unwrap(self.model)
        head_lr = self.settings.head_lr or self.config.lr
        backbone = [p for p in m.backbone.parameters() if p.requires_grad]
        head = [p for p in m.head.parameters() if p.requires_grad]
        return [{"params": backbone, "lr": self.config.lr, "name": "backbone"},
                {"params": head, "lr": head_lr, "name": "head"}]

    # ---- micro-batches -> optimizer steps ----

    def steps_per_epoch(self) -> int:
        return self.loaders["train"].batch_sampler.n_steps()

    def ends_step(self, i: int, n: int, batch: dict) -> bool:
        return bool(batch["step_end"])

    def backward(self, loss: torch.Tensor, batch: dict) -> None:
        # Weighted by the micro-batch's share of the step's utterances (x world size:
        # DDP averages over ranks), so a step's gradient is that of its 64-utterance
        # loss (exact for the MAE terms; the weighted CE normalizes per micro-batch).
        loss = loss * batch["share"]
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.settings.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- checkpoints ----

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # Keys of the unwrapped model, so a checkpoint resumes on any number of ranks.
        state["model"] = _unprefixed(state["model"])
        state["best_state"] = _unprefixed(state["best_state"]) if state["best_state"] is not None else None
        state["rng_all"] = rng_state()  # + NumPy (SpecAugment) and Python RNGs
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prefix = "module." if isinstance(self.model, DDP) else ""
        best = state["best_state"]
        super().load_state_dict({
            **state,
            "model": {prefix + k: v for k, v in state["model"].items()},
            "best_state": {prefix + k: v for k, v in best.items()} if best is not None else None,
        })
        set_rng_state(state["rng_all"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def _end_of_epoch(self, row: dict[str, float]) -> None:
        if self.checkpoint_dir is not None:
            if self.ctx.is_main:
                save_checkpoint(self.checkpoint_dir, to_checkpoint(self.state_dict()))
            barrier(self.ctx)
        if self._user_on_epoch:
            self._user_on_epoch(row)
        self.epochs_this_run += 1
        done = self.epoch >= self.config.epochs or self.early.stopped
        if not done and self.max_epochs_this_run is not None and self.epochs_this_run >= self.max_epochs_this_run:
            raise FoldInterrupted(self.epoch)


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def to_checkpoint(state: dict[str, Any]) -> Checkpoint:
    """Trainer state -> weights (safetensors) + the rest (weights_only torch.save)."""
    rest = {k: v for k, v in state.items() if k not in ("model", "best_state")}
    return Checkpoint(epoch=int(state["epoch"]), model=state["model"], best=state["best_state"], state=rest,
                      best_epoch=int(state["early"]["best_epoch"]) if state["best_state"] is not None else None)


def from_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    return {**ckpt.state, "model": ckpt.model, "best_state": ckpt.best}
