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

from core.choices import Choice, Choices, spoken
from core.devices import AMP_MODES, DEVICES
from core.errors import UserError
from core.folds import PROTOCOLS
from core.frames import VAD_MODES
from core.settings import setting
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


SAP_FRAMES = 32  # --sap-frames: SAP attends among at most this many frames while training (docs/training.md)


def parse_sap_frames(value: object) -> int | None:
    """`--sap-frames`: a whole number of frames, or "all" (None: every speech frame)."""
    if value is None or str(value).strip().lower() == "all":
        return None
    try:
        return int(str(value))
    except ValueError:
        raise UserError(f"--sap-frames must be a whole number of frames or all, not {value!r}") from None


def heads_for(ensemble: int | str, n_train: int) -> int:
    """Heads trained on a fold with `n_train` training utterances under `--ensemble ensemble`."""
    n = parse_ensemble(ensemble)  # API callers may pass "AUTO" or "3" as the CLI does
    if n == AUTO:
        return AUTO_HEADS if n_train < AUTO_BELOW else 1
    return int(n)


# --- recipes: named sets of settings (`--recipe NAME`); explicit options override a recipe's values ---
#
# "default" is TrainConfig's own defaults: the head this toolkit recommends (docs/training.md, "Defaults").
# "paper" is the SAP paper's head on the last cached layer, as the paper describes it and nothing more:
# eq. 6's SR = [GAP | SAP] (no --spread, no --speech-stats, no --pooled-norm), the 32-d multi-task head, the
# paper's optimizer settings (30 epochs, batch 64, lr 3e-5, warm-up 0.1, cosine, patience 5), one head per
# fold, no step minimum, no input normalization (a fine-tuned WavLM's last layer is layer-normed).
LAST_LAYER = -1  # `--layer -1`: the last cached layer (the paper's head reads WavLM's last hidden state)
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"pooling": "sr", "layer": LAST_LAYER, "norm": "none", "spread": False, "speech_stats": False,
              "pooled_norm": "none", "pooled_dropout": 0.0, "ema": 0.0, "ensemble": 1, "min_steps": 0,
              "sap_frames": None, "epochs": 30, "batch_size": 64, "lr": 3e-5, "warmup_ratio": 0.1, "patience": 5,
              "alpha": 0.5, "beta": 0.25, "gamma": 0.25, "proj_dim": 32},
}


def recipe_of(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, not {name!r}")
    return RECIPES[name]


@dataclass
class TrainConfig:
    """Every training setting; saved in RUN/config.json. Defaults: paper settings + our head choices
    (docs/training.md, "Defaults", gives each one's reason)."""

    recipe: str = setting("default", "a named set of the settings below, which explicit options override: "
                                     "default (this toolkit's head) or paper (the SAP paper's head, nothing added)")
    pooling: str = setting("sr", POOLINGS.help())
    layer: int | None = setting(None, "use this one cached layer (e.g. 24; -1: the last) instead of the learnable "
                                      "mix of all")
    norm: str = setting("train", f"input normalization before the layer mix: {NORMS.help()}")  # heads/model/input_norm.py
    spread: bool = setting(True, "append each dimension's std over the utterance's frames to the pooled vector "
                                 "(not in the paper)")  # heads/model/head.py
    speech_stats: bool = setting(True, "append each dimension's mean and std over the utterance's speech (VAD) frames "
                                       "to the pooled vector (not in the paper)")  # heads/model/head.py
    pooled_norm: str = setting("train", f"before the projection: {POOLED_NORMS.help()}")  # heads/model/pooled_norm.py
    pooled_dropout: float = setting(0.0, "dropout on the pooled vector before the projection (training only; 0: none, "
                                         "as in the paper)")
    layer_weights: str = setting("probe", f"how the layer mix is learned: {LAYER_WEIGHTS.help()}")
    sap_frames: int | None = setting(SAP_FRAMES, "while training, SAP attends among at most this many of an "
                                                 "utterance's speech frames, drawn at random each step (validation: "
                                                 "evenly spaced ones; test: every frame); all: every frame, as in the "
                                                 "paper", metavar="N|all", parse=parse_sap_frames)
    vad_mode: int = setting(3, f"WebRTC VAD aggressiveness {min(VAD_MODES)}-{max(VAD_MODES)} whose mask SAP uses")
    epochs: int = setting(30, "maximum epochs")
    batch_size: int = setting(64, "utterances per batch")
    # the paper's 3e-5 is for 316M fine-tuned parameters; a head on frozen features learns at 1e-3
    lr: float = setting(1e-3, "AdamW peak learning rate (head on frozen features)")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup_ratio: float = setting(0.1, "share of the optimizer steps spent warming up", cli=False)
    patience: int = setting(5, "early stopping: epochs without a better validation loss")
    ema: float = setting(0.0, "validate, keep and save a moving average of the head's weights with this decay per "
                              "optimizer step (0: the weights themselves, as in the paper)")  # heads/train/weight_average.py
    min_steps: int = setting(500, "optimizer steps every fold gets at least: on a small corpus the batch shrinks "
                                   "(not below 16), then epochs and patience grow; 0: exactly as given")
    seed: int = setting(0, "random seed (same seed, same machine: same metrics)")
    ensemble: int | str = setting(AUTO, (
        "heads trained per fold, with seeds SEED, SEED+1, ...; their probabilities and valence/arousal are averaged "
        f"(1: one head, as in the paper; {AUTO}: {AUTO_HEADS} on folds with fewer than {AUTO_BELOW} training "
        "utterances, else 1)"), metavar="N|auto", parse=parse_ensemble)
    alpha: float = setting(0.5, "weight of the weighted cross-entropy")
    beta: float = setting(0.25, "weight of the valence MAE")
    gamma: float = setting(0.25, "weight of the arousal MAE")
    proj_dim: int = setting(32, "projection size before the classifier and regressors")
    heads: int = setting(8, "SAP self-attention heads (a divisor of the feature size is used)")
    dropout: float = setting(0.1, "dropout after the projection", cli=False)
    grad_accum: int = setting(1, "micro-batches per optimizer step", cli=False)
    memory_gb: float = setting(8.0, "RAM budget for preloading features (split over --jobs)")
    device: str = setting("auto", spoken(list(DEVICES)))  # core.devices.DEVICES
    protocol: str = setting("speaker", f"fold plan: {PROTOCOLS.help()}")  # core.folds.PROTOCOLS

    @classmethod
    def from_recipe(cls, recipe: str = "default", **explicit: Any) -> TrainConfig:
        """The recipe's settings, then the explicitly given ones over them."""
        return cls(**{**recipe_of(recipe), **explicit, "recipe": recipe})

    def validate(self) -> None:
        recipe_of(self.recipe)
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
            (self.sap_frames is None or self.sap_frames >= 1, "--sap-frames must be at least 1"),
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

    model: str = setting(DEFAULT_MODEL, "Hugging Face hub id or local folder: a wav2vec2-family model or Whisper")
    full: bool = setting(False, "train the whole backbone end to end (the paper); default: only the top layers",
                         flag="--full")
    top_layers: int = setting(4, "without --full: transformer layers trained (from the top)")
    head_lr: float | None = setting(None, "learning rate of the head [default: --lr, the paper's one rate]")
    step_seconds: float = setting(200.0, "padded audio seconds per micro-batch (the memory bound)")
    max_seconds: float | None = setting(None, "keep the first S seconds [default: the dataset's, 0 = all]")
    freeze_feature_encoder: bool = setting(True, "keep the convolutional front end frozen")
    grad_checkpointing: bool = setting(True, "recompute transformer layers in the backward pass to save memory")
    amp: str = setting("auto", "autocast: auto (bf16 on GPUs that have it), bf16, fp16 or none")
    max_grad_norm: float = setting(1.0, "gradient clipping (transformers Trainer's default; 0 = none)", cli=False)
    workers: int = setting(2, "audio decoding processes per rank")

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

    method: str = setting("baseline", "how `cli report` labels the run", cli=False)
    statistics: str = setting("mean+std", f"per-dimension statistics: {STATISTICS.help()}", flag="--stats")
    frames: str = setting("speech", FRAMES.help())
    layer: int | None = setting(None, "statistics of this one cached layer [default: every cached layer, concatenated]")
    vad_mode: int = setting(3, f"WebRTC VAD aggressiveness {min(VAD_MODES)}-{max(VAD_MODES)} whose mask `--frames "
                               "speech` uses")
    protocol: str = setting("speaker", f"fold plan: {PROTOCOLS.help()}")  # the fold plan, as for the heads
    classifier: str = setting("logreg", "LogisticRegression, class_weight='balanced'", cli=False)
    c_grid: tuple[float, ...] = setting(C_GRID, "the C values tried on the validation speaker", cli=False)
    alpha_grid: tuple[float, ...] = setting(ALPHA_GRID, "the Ridge alphas tried on the validation speaker", cli=False)
    max_iter: int = setting(5000, "LogisticRegression's iteration limit", cli=False)

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
