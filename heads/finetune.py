"""End-to-end fine-tuning: the train-head loop and head on features from a live SSL backbone.

`FineTuneTrainer` subclasses `heads.trainer.Trainer` and overrides hooks only
(STYLE item 8): where features come from (`build_model`, `feature_shape`,
`make_loader`, `encode`, `forward`), what trains at which rate
(`param_groups`), and how micro-batches add up to an optimizer step
(`steps_per_epoch`, `ends_step`, `backward`, `optimizer_step`: a variable
number of audio-budgeted micro-batches per step of 64 utterances, DDP
gradient sync only on a step's last micro-batch, fp16 loss scaling,
gradient clipping). The epoch loop, early stopping, metrics and fold outputs
are the trainer's own.

The head sees the backbone's last hidden state `(B, T, D)` (`last_hidden_state`,
after the final layer norm of pre-LN models: the same tensor `cli extract`
stores as the last layer), i.e. the paper's fine-tuned setting with a fixed
last layer; the head module, pooling and loss are the train-head classes.

Run folder: the train-head contract (`config.json`, `fold-KK/metrics.json`,
`predictions.csv`, `history.csv`, `head.safetensors`) plus
`fold-KK/model.safetensors` (the trained backbone weights: all of them for
--full, the top K layers otherwise) and `fold-KK/backbone/` (the backbone's
config and feature-extractor config, so `cli predict` rebuilds it). Per-epoch
checkpoints go to `fold-KK/checkpoint/` and are deleted when the fold is done.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

from core.devices import resolve_device, training_autocast
from core.errors import UserError
from core.folds import Fold, plan
from core.frames import SAMPLE_RATE
from core.records import CLASSES_4, Utterance
from extract.children import worker_init
from extract.corpora import default_max_seconds, read_corpus
from extract.models import model_slug
from heads.backbone import Backbone, load_backbone, trainable_state
from heads.checkpoint import (Checkpoint, has_checkpoint, load_checkpoint, rng_state, save_checkpoint, save_weights,
                              set_rng_state)
from heads.config import FinetuneSettings
from heads.data import FoldData, fold_split
from heads.distributed import DistContext, barrier, init_distributed, shutdown
from heads.head import HeadOutput, SERHead
from heads.run import fold_line, prepare_run_dir
from heads.trainer import TrainConfig, Trainer, write_fold
from heads.utterances import write_run_utterances
from heads.wave_data import (INDEX_FILE, StepBatchSampler, WaveCollate, WaveDataset, WaveIndex, corpus_meta,
                             load_or_build_index, pack)

CHECKPOINT_DIR = "checkpoint"
BACKBONE_DIR = "backbone"
BACKBONE_FILE = "model.safetensors"


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
        self.backbone = load_backbone(self.settings.backbone(distributed=self.ctx.enabled))
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


# --- orchestration: folds of a corpus into a run folder ---


def backbone_shape(model: str) -> tuple[Any, int, int]:
    """(frame grid, transformer layers, hidden size) from the model's config alone (no weights)."""
    from heads.backbone import model_shape

    return model_shape(model)


def default_out(corpus: Any, settings: FinetuneSettings) -> Path:
    """runs/<corpus>-<model>-<mode>, <corpus> naming the corpus as extract.corpora.corpus_slug does."""
    from extract.corpora import corpus_slug

    return Path("runs") / f"{corpus_slug(corpus)}-{model_slug(settings.model)}-{settings.mode}"


def finetune_run_config(dataset: str, root: str | Path, config: TrainConfig, settings: FinetuneSettings,
                        max_seconds: float, grid: Any, n_layers: int, hidden: int, classes: Sequence[str],
                        fold_plan: list[Fold], cache_path: str | None, ctx: DistContext) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from extract.vad import vad_settings

    try:
        sapser = version("sapser")
    except PackageNotFoundError:
        sapser = "unknown"
    ft = {**asdict(settings), "max_seconds": max_seconds}
    return {
        "mode": settings.mode,
        "model": settings.model,
        "dataset": dataset,
        # Result-affecting fine-tuning options sit in "settings" so a later --fold into
        # the same folder with other values is refused (heads.run.prepare_run_dir).
        "settings": {**asdict(config), **{k: ft[k] for k in ("head_lr", "step_seconds", "amp", "max_grad_norm")}},
        "finetune": ft,
        "fingerprint": {
            "backend": "finetune", "model": settings.model, "mode": settings.mode,
            "freeze_feature_encoder": settings.freeze_feature_encoder, "dataset": dataset,
            "root": str(Path(root).resolve()), "max_seconds": max_seconds, "sample_rate": SAMPLE_RATE,
            **grid.as_dict(), "vad": vad_settings(), "vad_source": cache_path or "audio",
        },
        "classes": list(classes),
        "layers": [n_layers],  # the last hidden state
        "hidden_size": hidden,
        "folds": [asdict(f) for f in fold_plan],
        "world_size": ctx.world_size,
        "versions": {"sapser": sapser, "torch": torch.__version__},
    }


@dataclass
class FinetuneResult:
    out: Path
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    unfinished: list[int] = field(default_factory=list)  # folds stopped by max_epochs_this_run
    is_main: bool = True  # rank 0 (or a single process): the one that reports


def run_finetune(dataset: str, root: str | Path, config: TrainConfig, settings: FinetuneSettings, *,
                 folds: Sequence[int] | None = None, out: str | Path | None = None, cache_path: str | None = None,
                 resume: bool = False, max_epochs_this_run: int | None = None,
                 classes: Sequence[str] = CLASSES_4, progress: bool = True, log: Callable[[str], None] = print,
                 ) -> FinetuneResult:
    """Fine-tune the given folds (None = all) of a corpus into RUN; torchrun-aware."""
    config.validate()
    settings.validate()
    if max_epochs_this_run is not None and max_epochs_this_run < 1:
        raise UserError("--max-epochs-this-run must be at least 1")
    training_autocast(settings.amp, resolve_device(config.device))  # a bad --amp fails before the VAD pass
    ctx = init_distributed(config.device)
    try:
        return _run(dataset, root, config, settings, folds, out, cache_path, resume, max_epochs_this_run,
                    tuple(classes), progress, log, ctx)
    finally:
        shutdown(ctx)


def _run(dataset: str, root: str | Path, config: TrainConfig, settings: FinetuneSettings,
         folds: Sequence[int] | None, out: str | Path | None, cache_path: str | None, resume: bool,
         max_epochs_this_run: int | None, classes: tuple[str, ...], progress: bool,
         log: Callable[[str], None], ctx: DistContext) -> FinetuneResult:
    corpus = read_corpus(dataset, root, classes)
    max_seconds = settings.max_seconds if settings.max_seconds is not None else default_max_seconds(dataset)
    grid, n_layers, hidden = backbone_shape(settings.model)
    config = TrainConfig(**{**asdict(config), "layer": n_layers})
    out = Path(out) if out else default_out(corpus, settings)
    from core.folds import corpus_groups

    fold_plan = plan(corpus_groups(corpus), config.protocol)
    ks = list(folds) if folds else list(range(1, len(fold_plan) + 1))
    run_cfg = finetune_run_config(dataset, root, config, settings, max_seconds, grid, n_layers, hidden, classes,
                                  fold_plan, cache_path, ctx)
    if ctx.is_main:
        prepare_run_dir(out, run_cfg)
        cache = _open_cache(cache_path) if cache_path else None
        try:
            index = load_or_build_index(out, corpus, grid, max_seconds, cache=cache, progress=progress,
                                        workers=settings.workers)
        finally:
            if cache is not None:
                cache.close()
        if index.skipped:
            log(f"{len(index.skipped)} utterances skipped (unusable audio); the rest train")
    barrier(ctx)
    if not ctx.is_main:
        index = WaveIndex.load(out / INDEX_FILE)
    meta = corpus_meta(corpus, index)
    if ctx.is_main:
        write_run_utterances(out, meta)  # which files each fold saw: predict warns about them
    datas = {k: fold_split(meta, classes, k, config.protocol, source=f"the corpus {root}")
             for k in ks}  # every fold checked before any training
    utterances = {u.utt_id: u for u in corpus.utterances}
    result = FinetuneResult(out, is_main=ctx.is_main)
    for k in ks:
        start = time.perf_counter()
        metrics = _run_fold(k, datas[k], config, settings, utterances, index, max_seconds, out, run_cfg, resume,
                            max_epochs_this_run, ctx, log)
        if metrics is None:
            result.unfinished.append(k)
            continue
        result.metrics[k] = metrics
        if ctx.is_main:
            log(fold_line(metrics, time.perf_counter() - start))
    return result


def _open_cache(path: str):
    from heads.run import open_cache

    return open_cache(path)


def _run_fold(k: int, data: FoldData, config: TrainConfig, settings: FinetuneSettings,
              utterances: dict[str, Utterance], index: WaveIndex, max_seconds: float, out: Path,
              run_cfg: dict[str, Any], resume: bool, max_epochs_this_run: int | None, ctx: DistContext,
              log: Callable[[str], None]) -> dict[str, Any] | None:
    """Train, test and write fold k; None when stopped early by max_epochs_this_run."""
    fold_dir = out / f"fold-{k:02d}"
    ckpt_dir = fold_dir / CHECKPOINT_DIR
    done = fold_dir / "metrics.json"
    if done.is_file():  # written last: the fold is complete
        if resume:
            if ctx.is_main:
                shutil.rmtree(ckpt_dir, ignore_errors=True)  # a kill while it was being deleted
            return json.loads(done.read_text())
        raise UserError(f"{fold_dir} is already trained; pass --resume to skip finished folds or choose another --out")
    if has_checkpoint(ckpt_dir) and not resume:
        raise UserError(f"{fold_dir} holds the checkpoint of an interrupted run; pass --resume to continue it "
                        "or delete that folder to start over")
    trainer = FineTuneTrainer(config, data, settings=settings, utterances=utterances, index=index,
                              max_seconds=max_seconds, ctx=ctx, checkpoint_dir=ckpt_dir,
                              max_epochs_this_run=max_epochs_this_run)
    if resume and has_checkpoint(ckpt_dir):
        trainer.load_state_dict(from_checkpoint(load_checkpoint(ckpt_dir)))
        if ctx.is_main:
            log(f"fold {k:02d}: resuming after epoch {trainer.epoch}")
    try:
        result = trainer.run()
    except FoldInterrupted as stop:
        if ctx.is_main:
            log(f"fold {k:02d}: stopped after epoch {stop.args[0]} as asked; rerun with --resume to continue")
        return None
    if ctx.is_main:
        model = unwrap(trainer.model)
        # The backbone first: write_fold writes metrics.json last, and a fold with metrics.json is
        # finished, so a kill between the two must not leave a finished fold without its backbone.
        save_backbone(fold_dir, model.backbone, run_cfg)
        write_fold(out, result, data.classes, model.head, run_cfg)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # ~3x the model size; the fold's outputs replace it
    barrier(ctx)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next fold loads a fresh backbone
    return result.metrics


def save_backbone(fold_dir: Path, backbone: Backbone, run_cfg: dict[str, Any]) -> None:
    """fold-KK/model.safetensors (trained backbone weights) + fold-KK/backbone/ (configs to rebuild it)."""
    save_weights(fold_dir / BACKBONE_FILE, trainable_state(backbone),
                 metadata={"mode": run_cfg["mode"], "model": run_cfg["model"]})
    cfg_dir = fold_dir / BACKBONE_DIR
    backbone.model.config.save_pretrained(cfg_dir)
    try:
        from transformers import AutoFeatureExtractor

        AutoFeatureExtractor.from_pretrained(run_cfg["model"]).save_pretrained(cfg_dir)
    except (OSError, ValueError):
        pass  # no preprocessor config: predict falls back to the same defaults as training
