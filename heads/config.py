"""The settings of every training command and the lists of choices they take, without torch.

`TrainConfig` (train-head, ablate; saved in RUN/config.json under "settings"),
`FinetuneSettings` (what finetune adds), `BaselineConfig` (the classical baseline).
`cli.py` reads its option defaults and help from here, so each default has one home.
Each list of choices is one table (core.choices): `--help`, `validate` and the
reports read it, so a new pooling, norm mode or way to learn the layer weights is
an entry here (plus its implementation, which the entry names or which branches on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.choices import Choice, Choices
from core.devices import AMP_MODES, DEVICES
from core.errors import UserError
from core.folds import PROTOCOLS
from core.frames import VAD_MODES
from extract.models import DEFAULT_MODEL


@dataclass(frozen=True)
class Pooling(Choice):
    """A pooling: `module` names its nn.Module class ("package.module:Class"), built as Class(input_size, heads=)."""

    module: str = ""


# In the order `cli ablate` trains them (the paper's Table 3: GAP, SAP, then their combination SR).
POOLINGS: Choices[Pooling] = Choices("--pooling", {
    "gap": Pooling("all frames", "GAP", "heads.model.pooling:GAP"),  # eq. 2
    "sap": Pooling("self-attention among speech frames", "SAP", "heads.model.pooling:SAP"),  # eqs. 3-5
    "sr": Pooling("GAP+SAP", "SR", "heads.model.pooling:SR"),  # eq. 6
})
NORMS: Choices[Choice] = Choices("--norm", {
    "train": Choice("per layer and dimension, training-split statistics"),
    "utterance": Choice("per-utterance CMVN"),
    "frame": Choice("parameter-free LayerNorm per frame"),
    "none": Choice(),
})
POOLED_NORMS: Choices[Choice] = Choices("--pooled-norm", {
    "train": Choice("standardize the utterance statistics (GAP mean, --spread, --speech-stats) with training-utterance statistics"),
    "none": Choice(),
})
LAYER_WEIGHTS: Choices[Choice] = Choices("--layer-weights", {
    "probe": Choice("from per-layer linear probes, leave-one-speaker-out on the training and validation speakers' "
                    "utterance means (never the test speaker's), then fixed: one layer's cost per epoch"),
    "pooled": Choice("first, learned by a small head on per-utterance layer means, then fixed: one layer's cost "
                     "per epoch"),
    "joint": Choice("with the head at every step: reads every layer every epoch"),
})


# --- `--ensemble N|auto`: how many heads a fold trains (heads/train/ensemble.py averages them) ---
#
# `auto` trains AUTO_HEADS heads on a fold whose training split has fewer than AUTO_BELOW
# utterances and one head otherwise. On the real-speech corpora (288 and 576 training
# utterances per fold) the seed alone moved a single head's UA by up to 3 points and three
# averaged heads were above their seeds' mean for every cache and both corpora, while three
# heads of that size cost far less than one head at paper scale (IEMOCAP: ~4,400 training
# utterances per fold, one head, as in the paper). docs/training.md, "Seeds and ensembles".
AUTO = "auto"
AUTO_HEADS = 3  # heads per fold under `auto` when the training split is small
AUTO_BELOW = 2000  # training utterances per fold from which `auto` trains one head


def parse_ensemble(value: int | str) -> int | str:
    """`--ensemble`'s value: "auto" or a count of heads of at least 1; anything else is refused in one line."""
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UserError(f"--ensemble must be {AUTO} or a whole number of heads per fold of at least 1, not {value!r}")
    return int(text)


def heads_for(ensemble: int | str, n_train: int) -> int:
    """Heads trained on a fold with `n_train` training utterances under `--ensemble ensemble`."""
    n = parse_ensemble(ensemble)  # API callers may pass "AUTO" or "3" as the CLI does
    if n == AUTO:
        return AUTO_HEADS if n_train < AUTO_BELOW else 1
    return int(n)


@dataclass
class TrainConfig:
    """Every training setting; saved in RUN/config.json. Defaults: paper settings + our head choices."""

    pooling: str = "sr"  # POOLINGS
    layer: int | None = None  # None: learnable softmax mix of every cached layer
    norm: str = "train"  # NORMS (heads/model/input_norm.py)
    spread: bool = True  # append each dimension's std over the real frames to the pooled vector (heads/model/pooling.py)
    speech_stats: bool = True  # append each dimension's mean and std over the speech (VAD) frames (heads/model/head.py)
    pooled_norm: str = "train"  # POOLED_NORMS (heads/model/pooled_norm.py)
    pooled_dropout: float = 0.0  # dropout on the (standardized) pooled vector before the projection (heads/model/head.py); off: README
    layer_weights: str = "probe"  # LAYER_WEIGHTS: how the mix is found (heads/train/layer_weights.py, heads/train/layer_probe.py)
    vad_mode: int = 3  # WebRTC aggressiveness whose mask SAP uses
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3  # head on frozen features (README "Defaults the paper left open"); the paper's 3e-5 is for 316M fine-tuned parameters
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    patience: int = 5
    ema: float = 0.0  # validate, keep and save a moving average of the weights, this decay per step (heads/train/weight_average.py); off: README
    min_steps: int = 1000  # at least this many optimizer steps per fold (heads/train/step_plan.py); 0: exactly as configured
    seed: int = 0
    ensemble: int | str = "auto"  # heads per fold, seeds seed, seed + 1, ..., outputs averaged; auto: 3 on small folds, 1 (the paper's) at scale (heads/train/ensemble.py)
    alpha: float = 0.5
    beta: float = 0.25
    gamma: float = 0.25
    proj_dim: int = 32
    heads: int = 8
    dropout: float = 0.1
    grad_accum: int = 1
    memory_gb: float = 8.0
    device: str = "auto"  # core.devices.DEVICES
    protocol: str = "speaker"  # fold plan: core.folds.PROTOCOLS

    def validate(self) -> None:
        for choices, value in ((POOLINGS, self.pooling), (NORMS, self.norm), (LAYER_WEIGHTS, self.layer_weights),
                               (POOLED_NORMS, self.pooled_norm)):
            choices.check(value)
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (self.patience >= 1, "--patience must be at least 1"),
            (0 <= self.ema < 1, "--ema must be in [0, 1) (0: no weight averaging)"),
            (self.min_steps >= 0, "--min-steps must not be negative"),
            (0 <= self.warmup_ratio < 1, "the warm-up ratio must be in [0, 1)"),
            (min(self.alpha, self.beta, self.gamma) >= 0, "--alpha, --beta and --gamma must not be negative"),
            (self.proj_dim >= 1 and self.heads >= 1, "--proj-dim and --heads must be at least 1"),
            (0 <= self.pooled_dropout < 1, "--pooled-dropout must be in [0, 1)"),
            (self.grad_accum >= 1, "gradient accumulation must be at least 1"),
            (self.memory_gb >= 0, "--memory-gb must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        parse_ensemble(self.ensemble)  # "auto" or a count of at least 1
        for choices, value in ((DEVICES, self.device), (PROTOCOLS, self.protocol), (VAD_MODES, self.vad_mode)):
            choices.check(value)


@dataclass
class FinetuneSettings:
    """Everything fine-tuning adds to TrainConfig; saved in RUN/config.json under "finetune"."""

    model: str = DEFAULT_MODEL
    full: bool = False  # False: the cheaper top-K mode
    top_layers: int = 4
    head_lr: float | None = None  # None: the backbone's --lr (the paper used one rate)
    step_seconds: float = 200.0  # padded audio seconds per micro-batch (memory bound)
    max_seconds: float | None = None  # None: the dataset's truncation (19 s IEMOCAP, 16 s KEMDy19)
    freeze_feature_encoder: bool = True
    grad_checkpointing: bool = True
    amp: str = "auto"  # auto = bf16 on GPUs that support it, else none
    max_grad_norm: float = 1.0  # transformers Trainer's default; 0 = no clipping
    workers: int = 2  # DataLoader processes decoding audio

    def validate(self) -> None:
        checks = [
            (self.step_seconds > 0, "--step-seconds must be positive"),
            (self.full or self.top_layers >= 1, "--top-layers must be at least 1"),
            (self.head_lr is None or self.head_lr > 0, "--head-lr must be positive"),
            (self.max_seconds is None or self.max_seconds >= 0, "--max-seconds must not be negative"),
            (self.max_grad_norm >= 0, "the gradient-clipping norm must not be negative"),
            (self.workers >= 0, "--workers must not be negative"),
        ]
        AMP_MODES.check(self.amp)
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def mode(self) -> str:
        return "finetune-full" if self.full else f"finetune-top{self.top_layers}"


def finetune_config(**overrides: Any) -> TrainConfig:
    """TrainConfig with the paper's fine-tuning rate (3e-5) unless overridden, no input normalization, the paper's SR.

    The head sees the live backbone's last hidden state, which WavLM/HuBERT
    (and Whisper) put through a final LayerNorm; statistics fitted before
    training would go stale as soon as the backbone moves (so no
    `--pooled-norm` either), and the pooled vector is the paper's eq. 6
    (no `--spread`, no `--speech-stats`), without `--ema` (the paper's weights; an
    average of 316M parameters would also cost another copy of them). No step minimum
    (`min_steps` 0): fine-tuning's steps are the paper's audio-budget batches.
    """
    return TrainConfig(**{"lr": 3e-5, "norm": "none", "spread": False, "speech_stats": False, "pooled_norm": "none",
                          "pooled_dropout": 0.0, "ema": 0.0, "ensemble": 1, "min_steps": 0,
                          **overrides})


# --- the classical baseline (heads/train/baseline.py) -------------------------------------------


@dataclass(frozen=True)
class Statistics(Choice):
    """Per-dimension statistics of an utterance's frames, in the order they are concatenated."""

    parts: tuple[str, ...] = ()


STATISTICS: Choices[Statistics] = Choices("--stats", {
    "mean": Statistics(parts=("mean",)),
    "mean+std": Statistics("population std", parts=("mean", "std")),
})
FRAMES: Choices[Choice] = Choices("--frames", {
    "speech": Choice("the VAD mask of --vad-mode"),
    "all": Choice("every frame"),
})
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
ALPHA_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


@dataclass
class BaselineConfig:
    """Every baseline setting; saved in RUN/config.json under "settings"."""

    method: str = "baseline"  # how `cli report` labels the run
    statistics: str = "mean+std"  # mean | mean+std, per dimension over the chosen frames
    frames: str = "speech"  # speech (VAD mask of vad_mode) | all
    layer: int | None = None  # None: every cached layer, concatenated
    vad_mode: int = 3
    protocol: str = "speaker"  # the fold plan, as for the heads (core/folds.py)
    classifier: str = "logreg"  # LogisticRegression, class_weight="balanced"
    c_grid: tuple[float, ...] = C_GRID
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    max_iter: int = 5000

    def validate(self) -> None:
        STATISTICS.check(self.statistics)
        FRAMES.check(self.frames)
        checks = [
            (self.classifier == "logreg", f"the classifier must be logreg; got {self.classifier!r}"),
            (len(self.c_grid) > 0 and min(self.c_grid) > 0, "every C in the grid must be positive"),
            (len(self.alpha_grid) > 0 and min(self.alpha_grid) > 0, "every alpha in the grid must be positive"),
            (self.max_iter >= 1, "max_iter must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        VAD_MODES.check(self.vad_mode)
        PROTOCOLS.check(self.protocol)
