"""A Hugging Face speech model loaded for training: what is trained, how, and its frame grid.

Two families: the wav2vec2 family (WavLM, wav2vec2, HuBERT, data2vec-audio:
waveform in, `Wav2Vec2Backbone`) and Whisper encoders (log-mel in, a fixed 30 s
window, `WhisperBackbone`; the extraction backend's input and grid, see
extract/whisper.py). The model type comes from the checkpoint's config.

Two modes (docs/finetuning.md):
- full (`--full`, the paper): every transformer parameter is trained; the
  convolutional feature encoder is frozen unless `--no-freeze-feature-encoder`
  (freezing it is the usual wav2vec2/WavLM recipe and removes the largest
  activations from the backward pass: the 512-channel conv outputs at 3.2 kHz).
- top-K (default, K = 4): only the top K transformer layers (plus the final
  layer norm of stable-layer-norm models such as WavLM Large, and of Whisper) are trained.
  Everything below runs with `requires_grad=False`, so autograd stores no
  activations for it: memory and backward time scale with K, not the depth.

Regularizers the checkpoint's config carries are kept as they are (SpecAugment:
`mask_time_prob`, `mask_time_length`, `mask_feature_prob`; for WavLM Large
0.05 / 10 / 0). In top-K mode the masked-frame embedding sits below the
trained layers and stays frozen at its pretrained value.

LayerDrop: the checkpoint's `layerdrop` (0.1 for WavLM Large) is used only in a
single process without gradient checkpointing, and forced to 0 otherwise:
- under DDP every rank must produce a gradient for every trainable parameter at
  every step; a dropped layer leaves its parameters unused, which DDP rejects
  unless `find_unused_parameters=True` (an extra graph walk per step), and the
  ranks would drop different layers, so the all-reduce would mix gradients of
  different networks;
- gradient checkpointing is how we fit the paper's batch in memory, and its
  recomputation assumes the forward graph of a step is fixed: HF decides the
  drop outside the checkpointed layer, so a layer skipped in the forward is
  not recomputed, but the memory plan (and the bench figures) assume every
  layer runs. Keeping the graph static keeps one GPU and N GPUs the same model.
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import UserError
from core.frames import FrameGrid, conv_grid
from extract.models import BackendError, first_line, load_error, model_config, model_family
from heads.config import FinetuneSettings

# WavLM mixes a bool padding mask with a float position bias; torch warns on every
# forward (and on every recomputation under gradient checkpointing), the result is right.
warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")


class BackboneError(UserError):
    """A model that cannot be fine-tuned here (not found, not a supported speech model, bad K)."""


@dataclass(frozen=True)
class BackboneSettings:
    model: str  # HF hub id or local folder
    full: bool = False  # True: all transformer layers trained (the paper)
    top_layers: int = 4  # trained transformer layers when not full
    freeze_feature_encoder: bool = True
    grad_checkpointing: bool = True
    distributed: bool = False  # DDP world size > 1

    @property
    def mode(self) -> str:
        return "finetune-full" if self.full else f"finetune-top{self.top_layers}"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, settings: FinetuneSettings, *, distributed: bool = False) -> BackboneSettings:
        """What `cli finetune`'s settings say about the backbone."""
        return cls(model=settings.model, full=settings.full, top_layers=settings.top_layers,
                   freeze_feature_encoder=settings.freeze_feature_encoder,
                   grad_checkpointing=settings.grad_checkpointing, distributed=distributed)


class Backbone(nn.Module, metaclass=abc.ABCMeta):
    """Waveforms (B, N) -> last hidden state (B, T, D) and its (B, T) frame mask; what each family shares."""

    grid: FrameGrid
    hidden_size: int
    n_layers: int  # transformer layers; hidden state n_layers is the last one (after the final norm)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.settings: BackboneSettings | None = None  # set by load_backbone

    def frame_counts(self, n_samples: torch.Tensor) -> torch.Tensor:
        """(B,) samples -> (B,) frames, the grid's formula (equal to the model's own, tested)."""
        g = self.grid
        if g.count == "center":
            c0 = g.first_center
            return torch.where(n_samples <= c0, torch.zeros_like(n_samples), (n_samples - 1 - c0) // g.stride + 1)
        n = n_samples - g.offset
        return torch.where(n < g.window, torch.zeros_like(n), (n - g.window) // g.stride + 1)

    def cost_samples(self, n_samples: np.ndarray) -> np.ndarray:
        """(U,) samples -> (U,) the padded samples an utterance costs in a forward (micro-batch budgets)."""
        return np.asarray(n_samples)

    @abc.abstractmethod
    def transformer_layers(self) -> nn.ModuleList:
        """The transformer blocks, in order (top-K fine-tuning unfreezes the last K)."""

    @abc.abstractmethod
    def final_norm(self) -> nn.Module | None:
        """The layer norm applied after the last transformer layer, if the model has one."""

    @abc.abstractmethod
    def freeze_front_end(self) -> None:
        """Freeze what turns the input into the transformer's input (conv feature encoder)."""


class Wav2Vec2Backbone(Backbone):
    """The wav2vec2 family: raw waveform through the conv feature encoder and the transformer."""

    def __init__(self, model: nn.Module, normalize: bool, use_attention_mask: bool) -> None:
        super().__init__(model)
        self.normalize = normalize  # zero-mean unit-variance per utterance (feature-extractor config)
        self.use_attention_mask = use_attention_mask
        config = model.config
        self.grid = conv_grid(tuple(config.conv_kernel), tuple(config.conv_stride))
        self.hidden_size = int(config.hidden_size)
        self.n_layers = int(config.num_hidden_layers)

    def forward(self, waves: torch.Tensor, wave_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waves (B, N) float32 zero-padded, wave_mask (B, N) bool -> (B, T, D), (B, T) bool."""
        if self.normalize:
            waves = normalize_waves(waves, wave_mask)
        attention_mask = wave_mask.long() if self.use_attention_mask else None
        lengths = wave_mask.sum(dim=1)  # (B,)
        frames = self.frame_counts(lengths)  # (B,)
        kwargs = {}
        config = self.model.config
        t_max = self.grid.n_frames(waves.shape[1])
        if self.training and getattr(config, "mask_time_prob", 0) > 0 and t_max < config.mask_time_length:
            # HF's SpecAugment refuses sequences shorter than one mask span (a micro-batch of
            # clips under ~0.2 s): mask nothing there, but still through the mask embedding,
            # so under DDP it takes part in every step.
            kwargs["mask_time_indices"] = torch.zeros(waves.shape[0], t_max, dtype=torch.bool, device=waves.device)
        hidden = self.model(waves, attention_mask=attention_mask, **kwargs).last_hidden_state  # (B, T, D)
        t = torch.arange(hidden.shape[1], device=hidden.device)
        frame_mask = t[None, :] < frames[:, None]  # (B, T)
        return hidden, frame_mask

    def transformer_layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def final_norm(self) -> nn.Module | None:
        # Stable-layer-norm models (WavLM Large) apply encoder.layer_norm after the last layer.
        return self.model.encoder.layer_norm if getattr(self.model.config, "do_stable_layer_norm", False) else None

    def freeze_front_end(self) -> None:
        # The model's own method, not just requires_grad: it also stops the encoder from
        # marking its output as requiring grad, which would run the conv backward anyway.
        self.model.freeze_feature_encoder()


class WhisperBackbone(Backbone):
    """A Whisper encoder: log-mel of zero-padded 30 s windows -> last_hidden_state (after the final layer norm).

    A padded batch gives each utterance exactly its input alone (every window is
    padded to 30 s anyway). Utterances over 30 s run as consecutive 30 s windows
    whose frames are concatenated, as in extraction. No SpecAugment: Whisper's
    config switches it off and the encoder alone does not apply it.
    """

    def __init__(self, encoder: nn.Module, feature_extractor) -> None:
        from extract.whisper import whisper_grid

        super().__init__(encoder)
        fe = feature_extractor
        self.n_fft, self.hop, self.window_samples = int(fe.n_fft), int(fe.hop_length), int(fe.n_samples)
        self.register_buffer("mel_filters", torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32)),
                             persistent=False)  # (F, M): from the feature extractor, not a trained weight
        self.grid = whisper_grid(self.n_fft, self.hop)
        self.hidden_size = int(encoder.config.d_model)
        self.n_layers = int(encoder.config.encoder_layers)

    def forward(self, waves: torch.Tensor, wave_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waves (B, N) float32 zero-padded, wave_mask (B, N) bool -> (B, T, D), (B, T) bool."""
        from extract.whisper import log_mel

        b, n = waves.shape
        s = self.window_samples
        k = -(-n // s)  # windows per utterance
        x = torch.nn.functional.pad(waves * wave_mask, (0, k * s - n))  # (B, k*S): zeros after each utterance
        with torch.autocast(waves.device.type, enabled=False):  # the STFT and log in float32
            mel = log_mel(x.reshape(b * k, s), self.mel_filters, self.n_fft, self.hop)  # (B*k, M, S / hop)
        hidden = self.model(mel).last_hidden_state  # (B*k, S / stride, D)
        t_max = self.grid.n_frames(n)
        hidden = hidden.reshape(b, -1, hidden.shape[-1])[:, :t_max]  # (B, T, D)
        frames = self.frame_counts(wave_mask.sum(dim=1))  # (B,)
        frame_mask = torch.arange(t_max, device=hidden.device)[None, :] < frames[:, None]  # (B, T)
        return hidden, frame_mask

    def cost_samples(self, n_samples: np.ndarray) -> np.ndarray:
        s = self.window_samples
        return -(-np.asarray(n_samples) // s) * s  # every started window costs 30 s

    def transformer_layers(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self) -> nn.Module | None:
        return self.model.layer_norm

    def freeze_front_end(self) -> None:
        for conv in (self.model.conv1, self.model.conv2):
            conv.requires_grad_(False)


def normalize_waves(waves: torch.Tensor, wave_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N): per-utterance zero mean, unit variance over real samples; padding stays 0.

    The same rule as Wav2Vec2FeatureExtractor(do_normalize=True), which the
    checkpoints were pretrained with, done on the device in one pass.
    """
    m = wave_mask.to(waves.dtype)  # (B, N)
    n = m.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
    mean = (waves * m).sum(dim=1, keepdim=True) / n
    var = (((waves - mean) * m) ** 2).sum(dim=1, keepdim=True) / n
    return (waves - mean) / torch.sqrt(var + 1e-7) * m


def load_backbone(settings: BackboneSettings, *, from_config_dir: str | Path | None = None) -> Backbone:
    """Load `settings.model` for training (or, with `from_config_dir`, its architecture only).

    `from_config_dir` rebuilds a fine-tuned model's architecture from its saved
    config without downloading the base weights (predict on a --full run).
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per fold's load clutters the training progress
    source = str(from_config_dir) if from_config_dir is not None else settings.model
    keep_layerdrop = not (settings.distributed or settings.grad_checkpointing)
    config = model_config(source, error=BackboneError)
    if model_family(config, source, error=BackboneError) == "whisper":
        backbone: Backbone = _load_whisper(source, weights=from_config_dir is None, keep_layerdrop=keep_layerdrop)
    else:
        try:
            if not keep_layerdrop and hasattr(config, "layerdrop"):
                config.layerdrop = 0.0
            if from_config_dir is not None:
                model = AutoModel.from_config(config)
            else:
                model = AutoModel.from_pretrained(source, config=config)
        except Exception as exc:  # noqa: BLE001 - any refusal of the weights is the user's folder, one line
            raise BackboneError(load_error(source, exc)) from None
        normalize, use_mask = _feature_extractor_flags(source)
        backbone = Wav2Vec2Backbone(model, normalize=normalize, use_attention_mask=use_mask)
    backbone.settings = settings
    configure_training(backbone, settings)
    return backbone


def _load_whisper(source: str, *, weights: bool, keep_layerdrop: bool) -> WhisperBackbone:
    from extract.whisper import load_encoder

    try:
        encoder, fe = load_encoder(source, weights=weights)
    except BackendError as err:
        raise BackboneError(str(err)) from None
    if not keep_layerdrop:
        encoder.layerdrop = 0.0
        encoder.config.encoder_layerdrop = 0.0
    return WhisperBackbone(encoder, fe)


def model_shape(model: str) -> tuple[FrameGrid, int, int]:
    """(frame grid, transformer layers, hidden size) from the model's config alone (no weights)."""
    config = model_config(model, error=BackboneError)
    if model_family(config, model, error=BackboneError) == "whisper":
        from transformers import WhisperFeatureExtractor

        from extract.whisper import whisper_grid

        try:
            fe = WhisperFeatureExtractor.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise BackboneError(f"{model!r} has no usable feature-extractor config: {first_line(exc)}") from None
        return whisper_grid(int(fe.n_fft), int(fe.hop_length)), int(config.encoder_layers), int(config.d_model)
    grid = conv_grid(tuple(config.conv_kernel), tuple(config.conv_stride))
    return grid, int(config.num_hidden_layers), int(config.hidden_size)


def _feature_extractor_flags(source: str) -> tuple[bool, bool]:
    """(do_normalize, return_attention_mask) from the checkpoint's preprocessor config.

    Group-norm models (wav2vec2-base) were trained without attention masks and
    say so here; we follow the checkpoint rather than guess from the architecture.
    """
    from transformers import AutoFeatureExtractor

    try:
        fe = AutoFeatureExtractor.from_pretrained(source)
    except (OSError, ValueError):
        return True, True
    return bool(getattr(fe, "do_normalize", True)), bool(getattr(fe, "return_attention_mask", True))


def configure_training(backbone: Backbone, settings: BackboneSettings) -> None:
    """Set requires_grad for the mode, freeze the front end, enable checkpointing."""
    model = backbone.model
    layers = backbone.transformer_layers()
    if not settings.full and not 1 <= settings.top_layers <= len(layers):
        raise BackboneError(
            f"--top-layers must be between 1 and {len(layers)} for this model, got {settings.top_layers}")
    if settings.full:
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        for layer in layers[len(layers) - settings.top_layers :]:
            layer.requires_grad_(True)
        norm = backbone.final_norm()
        if norm is not None:  # it sits on top of the trained layers
            norm.requires_grad_(True)
    if settings.freeze_feature_encoder or not settings.full:
        backbone.freeze_front_end()
    for p in getattr(getattr(model, "embed_positions", None), "parameters", lambda: [])():
        p.requires_grad_(False)  # Whisper's sinusoidal positions are fixed, never trained
    if settings.grad_checkpointing:
        # Non-reentrant: works with frozen inputs (top-K) and with DDP.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Parameters that were trained plus every buffer, keyed as in `model.state_dict()`.

    Full mode saves the whole model (self-contained); top-K saves only what
    differs from the base checkpoint, which predict loads first.
    """
    model = backbone.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    if backbone.settings.full:
        return {k: v.detach() for k, v in state.items()}
    return {k: v.detach() for k, v in state.items() if k in trained}


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
