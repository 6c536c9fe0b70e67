"""The training loop for one fold: AdamW, warm-up + cosine, early stopping, best checkpoint, fold outputs.

`Trainer` is built to be subclassed. End-to-end fine-tuning changes how
features are produced and which parameters train, not the loop; it
overrides these hooks (everything else is shared):

    feature_shape() -> (n_layers, hidden_size)   what the head's input looks like
    build_model()   -> SERHead                   the head (or a module wrapping backbone + head)
    prepare_inputs()                             fit the input normalization / layer weights on the
                                                 training split (no-op when there is nothing to fit)
    pass_loader(split) -> iterable of batches    what prepare_inputs reads (default: from the cache,
                                                 in memory-bounded groups)
    make_loader(split) -> iterable of batches    "train" | "val" | "test"; each batch a dict
                                                 with "emotion" (B,), "valence"/"arousal" (B,),
                                                 "utt_id" (list) plus whatever encode needs
    encode(batch)   -> (features, padding_mask, vad_mask)
                       features (B, T, L, D) or (B, T, D) on self.device, masks (B, T) bool
    param_groups()  -> list of AdamW parameter groups (e.g. backbone at 3e-5, head at 1e-3)
    head(model)     -> the SERHead inside self.model (identity here)

Gradient accumulation: `TrainConfig.grad_accum = k` steps the optimizer
every k micro-batches (and after the last one of an epoch); the schedule
counts optimizer steps. Fine-tuning overrides `steps_per_epoch`, `ends_step`,
`backward` and `optimizer_step` (variable micro-batches per step, DDP, AMP).

Checkpoints for --resume: `state_dict()` returns plain tensors, numbers,
strings, lists and dicts only (model, optimizer, scheduler, epoch, early
stopping state incl. the best weights, the `--ema` average, history, torch RNG states), so
`torch.save(trainer.state_dict(), p)` and
`trainer.load_state_dict(torch.load(p, weights_only=True))` resume the run
where it stopped. Batch order depends only on `seed + epoch`, not on RNG
state carried between epochs.
"""

from __future__ import annotations

import copy
import math
import os
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from core.devices import resolve_device
from heads.config import TrainConfig
from heads.evaluate.metrics import fold_scores, ua_wa
from heads.model.head import HeadOutput, SERHead
from heads.model.loss import LossParts, MTLLoss
from heads.runfolder import Predictions, trained_outputs
from heads.train.folds import FoldData
from heads.train.statistics import TrainingError, class_weights, target_scale
from heads.train.step_plan import step_plan
from heads.train.weight_average import WeightAverage

__all__ = ["EarlyStop", "FoldResult", "Predictions", "TrainConfig", "Trainer", "TrainingError", "lr_factor",
           "seed_everything", "warmup_cosine"]


def seed_everything(seed: int, device: torch.device) -> None:
    """Same seed, same machine -> same numbers.

    The CPU kernels used here are deterministic for a fixed thread count; on
    CUDA, deterministic algorithms are requested (cuBLAS needs the workspace
    setting). Only then, because the switch imports torch's compiler stack
    (about 3 s per process).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The optimizer's rate times `lr_factor(total_steps, warmup_ratio)` at each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(total_steps, warmup_ratio))


def lr_factor(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """transformers' linear warm-up + cosine decay to 0, one step ahead: step s trains at
    peak * (s + 1) / (warmup + 1) during the warm-up, so the first step uses peak / (warmup + 1),
    not 0 (a step at rate 0 would be wasted), and the peak is reached on step `warmup`; then
    peak * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2.

    It is `get_cosine_schedule_with_warmup`'s factor at step s + 1 with warmup + 1 warm-up and
    total + 1 steps (tests/test_head_training.py), written out: importing transformers for it
    cost every head-training command two seconds.
    """
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


@dataclass
class EarlyStop:
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, epoch: int, loss: float, patience: int) -> bool:
        """Record an epoch's validation loss; True when it is the best so far."""
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
            return True
        self.bad_epochs += 1
        self.stopped = self.bad_epochs >= patience
        return False


@dataclass
class FoldResult:
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    test: Predictions
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Train, validate and test one fold. See the module docstring for the hooks."""

    def __init__(self, config: TrainConfig, data: FoldData, *, layers: list[int] | None = None,
                 on_epoch: Callable[[dict[str, float]], None] | None = None) -> None:
        config.validate()
        self.config = config
        self.data = data
        self.layers = layers
        self.on_epoch = on_epoch
        self.classes = data.classes
        self.device = resolve_device(config.device)
        seed_everything(config.seed, self.device)
        train = data.labels.loc[data.train]
        self.class_weights = class_weights(train["emotion"].to_numpy(), len(self.classes))
        self.va_mean, self.va_std = target_scale(train[["valence", "arousal"]].to_numpy())
        self.plan = step_plan(len(data.train), config.batch_size, config.epochs, config.patience,
                              config.min_steps, config.grad_accum)
        self.model = self.build_model().to(self.device)
        self.head(self.model).set_target_scale(self.va_mean.to(self.device), self.va_std.to(self.device))
        self.loss_fn = MTLLoss(self.class_weights, config.alpha, config.beta, config.gamma).to(self.device)
        self.loaders = {name: self.make_loader(name) for name in ("train", "val", "test")}
        self.input_info: dict[str, Any] = {}  # what prepare_inputs did, for metrics.json
        self.input_seconds: dict[str, float] = {}  # prepare_inputs' phases (scan, weights, materialize)
        self.prepare_inputs()
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, self.plan.epochs * self.steps_per_epoch(),
                                      config.warmup_ratio)
        self.average = WeightAverage(config.ema) if config.ema > 0 else None  # --ema (heads/train/weight_average.py)
        self.epoch = 0
        self.early = EarlyStop()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []

    # ---- hooks (override for end-to-end fine-tuning) ----

    def feature_shape(self) -> tuple[int, int]:
        """(n_layers the head mixes, hidden size D); subclasses know their features."""
        raise TypeError(f"{type(self).__name__} does not say what its features look like (feature_shape)")

    def build_model(self) -> torch.nn.Module:
        n_layers, hidden = self.feature_shape()
        c = self.config
        return SERHead(hidden, n_layers, len(self.classes), pooling=c.pooling, proj_dim=c.proj_dim,
                       heads=c.heads, dropout=c.dropout, norm=c.norm, spread=c.spread,
                       speech_stats=c.speech_stats, pooled_norm=c.pooled_norm, pooled_dropout=c.pooled_dropout)

    def head(self, model: torch.nn.Module) -> SERHead:
        return model  # type: ignore[return-value]

    def make_loader(self, split: str) -> Iterable[dict]:
        """Batches of "train" | "val" | "test" (see the module docstring); subclasses say where features come from."""
        raise TypeError(f"{type(self).__name__} does not say where its batches come from (make_loader)")

    def batch_size(self, split: str) -> int:
        """Training batches follow the step plan (heads/train/step_plan.py); validation and test the configured size."""
        return self.plan.batch_size if split == "train" else self.config.batch_size

    def prepare_inputs(self) -> None:
        """Fit what the head's input needs from the training split before training (nothing by default)."""

    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        # RAM batches arrive in the stored float16: move, then widen on the device
        features = batch["features"].to(dev, non_blocking=True).float()  # (B, T, L, D)
        return features, batch["padding_mask"].to(dev), batch["vad_mask"].to(dev)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def forward(self, batch: dict) -> HeadOutput:
        if batch.get("mixed"):  # frames normalized and mixed once by prepare_inputs
            return self.head(self.model).from_mixed(*self.encode(batch))
        return self.model(*self.encode(batch))

    # Accumulation hooks: fine-tuning packs a variable number of micro-batches
    # per optimizer step (an audio-seconds budget) and needs DDP/AMP-aware steps.

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch (sizes the warm-up + cosine schedule)."""
        return math.ceil(len(self.loaders["train"]) / self.config.grad_accum)

    def ends_step(self, i: int, n: int, batch: dict) -> bool:
        """Whether the optimizer steps after micro-batch i (0-based) of the epoch's n."""
        return (i + 1) % self.config.grad_accum == 0 or i + 1 == n

    def backward(self, loss: torch.Tensor, batch: dict) -> None:
        """Accumulate one micro-batch's gradient."""
        (loss / self.config.grad_accum).backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- the loop ----

    def targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) emotion index and (B, 2) standardized valence/arousal on the device."""
        emotion = batch["emotion"].to(self.device)
        va = torch.stack([batch["valence"], batch["arousal"]], dim=1).float().to(self.device)
        return emotion, self.head(self.model).scale_targets(va)

    def loss(self, out: HeadOutput, batch: dict) -> LossParts:
        emotion, va = self.targets(batch)
        return self.loss_fn(out.logits, out.va, emotion, va)

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training split; the mean total loss over micro-batches."""
        self.model.train()
        loader = self.loaders["train"]
        sampler = getattr(loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        n = len(loader)
        total, count = 0.0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            parts = self.loss(self.forward(batch), batch)
            if not torch.isfinite(parts.total):
                ids = ", ".join(batch["utt_id"][:5]) + (" ..." if len(batch["utt_id"]) > 5 else "")
                raise TrainingError(f"the loss became {parts.total.item()} at epoch {epoch}, batch {i + 1} "
                                    f"(utterances {ids}); stopping this fold")
            self.backward(parts.total, batch)
            if self.ends_step(i, n, batch):
                self.optimizer_step()
                if self.average is not None:
                    self.average.update(self.model)
            total += parts.total.item()
            count += 1
        return total / max(count, 1)

    @torch.no_grad()
    def predict(self, split: str) -> Predictions:
        """Outputs for a whole split, and its total loss computed over all of it at once."""
        self.model.eval()
        head = self.head(self.model)
        ids, logits, va, emo, va_true, flags, raw = [], [], [], [], [], [], []
        for batch in self.loaders[split]:
            out = self.forward(batch)
            e, v = self.targets(batch)
            ids += list(batch["utt_id"])
            logits.append(out.logits.float())
            va.append(out.va.float())
            emo.append(e)
            va_true.append(v)
            raw.append(torch.stack([batch["valence"], batch["arousal"]], dim=1).double())
            flags.append(out.no_speech)
        logits_t, va_t, emo_t, va_true_t = (torch.cat(x) for x in (logits, va, emo, va_true))
        loss = self.loss_fn(logits_t, va_t, emo_t, va_true_t).total.item()
        return Predictions(
            utt_id=ids,
            probs=torch.softmax(logits_t, dim=1).cpu().numpy(),
            va=head.to_corpus_scale(va_t).cpu().numpy(),
            emotion=emo_t.cpu().numpy(),
            va_true=torch.cat(raw).numpy(),
            no_speech=torch.cat(flags).cpu().numpy(),
            loss=loss,
        )

    def fit(self) -> None:
        """Train until the epochs run out or validation loss stops improving; restore the best weights."""
        while self.epoch < self.plan.epochs and not self.early.stopped:
            epoch = self.epoch + 1
            lr = self.optimizer.param_groups[-1]["lr"]
            train_loss = self.train_epoch(epoch)
            with self.evaluated_weights():  # validated, and kept when best: the averaged weights under --ema
                val = self.predict("val")
                if not math.isfinite(val.loss):
                    raise TrainingError(f"the validation loss became {val.loss} at epoch {epoch}; stopping this fold")
                ua, wa = ua_wa(val.emotion, val.probs.argmax(1), len(self.classes))
                row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val.loss, "val_ua": ua, "val_wa": wa,
                       "lr": lr}
                self.history.append(row)
                if self.early.update(epoch, val.loss, self.plan.patience):
                    self.best_state = self.snapshot()
            self.epoch = epoch
            if self.on_epoch:
                self.on_epoch({**row, "epochs": self.plan.epochs})
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def evaluated_weights(self):
        """Inside it the model holds the weights that are validated and kept: the moving average (`--ema`), or its own."""
        return self.average.applied(self.model) if self.average is not None else nullcontext()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable model's weights (the best checkpoint is kept in RAM)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def test(self) -> FoldResult:
        """Metrics and predictions of the (restored best) model on the test speaker."""
        pred = self.predict("test")
        fold = self.data.fold
        metrics = {
            "fold": fold.fold, "test_speaker": fold.test_speaker, "val_speaker": fold.val_speaker,
            "labels": list(self.classes), **fold_scores(pred.emotion, pred.probs, pred.va_true, pred.va, self.classes),
            "best_epoch": self.early.best_epoch, "epochs_run": self.epoch, "plan": self.plan.as_dict(),
            "no_speech": int(pred.no_speech.sum()), "n_test": len(pred.utt_id),
            "n_train": len(self.data.train), "n_val": len(self.data.val), "test_loss": pred.loss,
            "outputs": trained_outputs(self.data.labels.loc[self.data.train]),  # what predict may report
        }
        mix = getattr(self.head(self.model), "mix", None)
        if mix is not None and getattr(mix, "logits", None) is not None:
            metrics["layer_weights"] = dict(zip([str(x) for x in self.layers or []], mix.weights().tolist()))
        metrics.update(self.input_info)
        return FoldResult(metrics, list(self.history), pred)

    def run(self) -> FoldResult:
        self.fit()
        return self.test()

    # ---- checkpoint state (for --resume in subclasses) ----

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "early": asdict(self.early),
            "best_state": self.best_state,
            "ema": self.average.state_dict() if self.average is not None else None,
            "history": copy.deepcopy(self.history),
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.early = EarlyStop(**state["early"])
        self.best_state = state["best_state"]
        if self.average is not None and state.get("ema") is not None:
            self.average.load_state_dict(state["ema"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
