"""Feature backends: waveforms in, per-frame features `(T, L, D)` out, on a declared frame grid.

Four kinds, chosen by one string (`load_backend`):
- a Hugging Face speech SSL checkpoint (WavLM, wav2vec2, HuBERT, data2vec-audio),
  hub id or local folder, loaded with the ordinary `from_pretrained` and never
  with remote code: all hidden states (L = num_hidden_layers + 1) or a subset
  (`HFBackend`; which models, and how they are named and hashed: extract/models.py);
- a Whisper encoder (extract/whisper.py);
- `fbank`: 80 log-mel energies, torch only, 25 ms window / 10 ms hop (extract/classic_features.py);
- `egemaps`: the 25 eGeMAPSv02 low-level descriptors from openSMILE (optional extra).

Every backend returns float32; the cache writer decides the stored dtype. The
extraction loop (`extract.pipeline`) owns batching, workers and the writer.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from core.devices import autocast_dtype, resolve_device
from core.frames import SAMPLE_RATE, FrameGrid, conv_grid
from extract.classic_features import EgemapsBackend, FbankBackend
from extract.frontend import use_fast_front_end
from extract.models import (BackendError, check_layers, first_line, is_whisper, model_config, model_family,
                            quiet_from_pretrained, state_dict_sha256)

# WavLM mixes a bool padding mask with a float position bias; torch warns, the result is
# right (tested). Filtered once here: warnings.catch_warnings is not safe across threads.
warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")


class Backend(Protocol):
    name: str
    grid: FrameGrid
    layers: tuple[int, ...]  # indices of the stored hidden states (0 = the first)
    n_layers: int  # L = len(layers)
    hidden_size: int  # D

    def describe(self) -> dict:
        """What determines the features, for the cache fingerprint (JSON-able)."""
        ...

    def __call__(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """(N_i,) float32 16 kHz waves -> (T_i, L, D) float32, T_i = grid.n_frames(N_i)."""
        ...


# ----------------------------------------------------------------------------- HF SSL models


def zero_mean_unit_var(wave: np.ndarray) -> np.ndarray:
    """(N,) -> (N,) float32, normalized over the utterance's own samples (HF's formula, eps 1e-7)."""
    wave = wave.astype(np.float32, copy=False)
    return ((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).astype(np.float32)


class HFBackend:
    """A transformers speech SSL model: all hidden states of every frame.

    Hidden state 0 is the transformer's input (convolutional features after
    projection and positional convolution), l = output of layer l, and the last
    one is the model's `last_hidden_state` (after the final layer norm of
    pre-LN models such as WavLM Large). transformers 4.x returned exactly this
    list; 5.x returns the last layer before that layer norm, so the last entry
    is replaced by `last_hidden_state` to keep one meaning across versions.

    Padding: models with layer-norm front ends (feat_extract_norm="layer")
    are batched with zero padding and an attention mask, which leaves every
    real frame as it is alone; this is measured (`_padding_invisible`, on first
    need), not assumed. Group-norm front ends (wav2vec2-base, HuBERT base)
    normalize each channel over the whole time axis, so padding would change
    every frame: they, and any model that fails the measurement, run one
    utterance per forward (equal lengths share one). With `one_per_forward`
    (the extraction loop's CPU policy) every utterance runs alone and nothing
    is measured.

    Calls from several threads at once are safe (`thread_safe`): inference
    mutates no module state, and autocast and inference mode are per thread.
    """

    thread_safe = True

    def __init__(self, model: str, *, layers: Sequence[int] | None = None,
                 device: str = "auto", dtype: str = "auto") -> None:
        from transformers import AutoFeatureExtractor, AutoModel

        self.name = model
        self.device = resolve_device(device, error=BackendError)
        self.autocast_dtype = autocast_dtype(dtype, self.device, error=BackendError)
        config = model_config(model)
        if model_family(config, model) != "wav2vec2":
            raise BackendError(f"{model!r} is a Whisper model: load it with load_backend (extract/whisper.py)")
        if getattr(config, "add_adapter", False):
            raise BackendError(f"{model!r} has an adapter that changes the frame rate; use its base model")
        try:
            fe = AutoFeatureExtractor.from_pretrained(model)
        except Exception as exc:
            raise BackendError(
                f"{model!r} has no usable feature-extractor config (preprocessor_config.json): {first_line(exc)}"
            ) from None
        if getattr(fe, "sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
            raise BackendError(f"{model!r} expects {fe.sampling_rate} Hz audio; only 16 kHz models are supported")
        self.model = quiet_from_pretrained(AutoModel, model).eval()
        self.config = self.model.config
        self.normalize = bool(getattr(fe, "do_normalize", False))
        self.grid = conv_grid(tuple(self.config.conv_kernel), tuple(self.config.conv_stride))
        self.layers = check_layers(layers, self.config.num_hidden_layers + 1, model)
        self.n_layers = len(self.layers)
        self.hidden_size = int(self.config.hidden_size)
        self.weights_sha256 = state_dict_sha256(self.model)  # before .to(device): hashes host memory
        self.model.to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        # CPU: the conv front end without its layout round trips (extract.frontend; measured equal)
        self.fast_front_end = self.device.type == "cpu" and use_fast_front_end(self.model)
        self.one_per_forward = False
        self._pads: bool | None = None

    @property
    def pads(self) -> bool:
        """Whether batches are zero-padded with an attention mask (measured once, on first use)."""
        if self._pads is None:
            # data2vec-audio has no feat_extract_norm: its conv front end is always layer-normed
            self._pads = getattr(self.config, "feat_extract_norm", "layer") == "layer" and self._padding_invisible()
        return self._pads

    def _padding_invisible(self) -> bool:
        """Measured, not assumed: do two utterances padded into one batch give their own frames?

        A layer-norm front end is necessary but not sufficient: data2vec-audio's
        stacked positional convolutions read the padded frames' (non-zero)
        outputs, so its last ~45 frames change. fp32, fixed seed, ~2 s of audio.
        """
        rng = np.random.default_rng(0)
        waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (24000, 9600)]
        if self.normalize:
            waves = [zero_mean_unit_var(w) for w in waves]
        values = np.zeros((2, 24000), dtype=np.float32)  # (B, N)
        values[0], values[1, :9600] = waves
        mask = torch.tensor([[1] * 24000, [1] * 9600 + [0] * 14400], device=self.device)
        # TF32 convolutions (cuDNN's default) differ by ~1e-3 between batch shapes: measure in true fp32
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.inference_mode():
                batched = self.forward(torch.from_numpy(values).to(self.device), mask).float()  # (2, T, L, D)
                for i, w in enumerate(waves):
                    alone = self.forward(torch.from_numpy(w)[None].to(self.device), None).float()[0]  # (T_i, L, D)
                    scale = float(alone.abs().max()) + 1.0
                    if float((batched[i, : alone.shape[0]] - alone).abs().max()) > 1e-4 * scale:
                        return False
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        return True

    def describe(self) -> dict:
        return {
            "backend": "hf",
            "model": self.name,
            "model_type": self.config.model_type,
            "revision": getattr(self.config, "_commit_hash", None) or "",
            "weights_sha256": self.weights_sha256,
            "layers": list(self.layers),
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "normalize": self.normalize,
            "padding": self._padding_policy(),
            "last_layer": "last_hidden_state",
            "compute_dtype": str(self.autocast_dtype or torch.float32).removeprefix("torch."),
            **self.grid.as_dict(),
        }

    def _padding_policy(self) -> str:
        if self.one_per_forward:
            return "none: one utterance per forward"
        return "attention_mask" if self.pads else "none: one utterance (or equal lengths) per forward"

    def n_frames(self, n_samples: Sequence[int]) -> list[int]:
        """The model's own output-length formula (asserted equal to the grid's)."""
        lengths = self.model._get_feat_extract_output_lengths(torch.tensor(list(n_samples)))
        return [max(int(t), 0) for t in lengths]

    def batch_inputs(self, waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Waves -> input_values (B, N_max) zero-padded and attention_mask (B, N_max), on the device.

        The mask is None for a single wave or equal lengths (nothing is padded).
        """
        if self.normalize:
            waves = [zero_mean_unit_var(w) for w in waves]
        lengths = [len(w) for w in waves]
        n_max = max(lengths)
        values = np.zeros((len(waves), n_max), dtype=np.float32)  # (B, N)
        for i, w in enumerate(waves):
            values[i, : len(w)] = w
        x = torch.from_numpy(values).to(self.device, non_blocking=True)
        if min(lengths) == n_max:
            return x, None
        if not self.pads:
            raise ValueError("group-norm models must not be padded; batch equal lengths only")
        mask = torch.arange(n_max)[None, :] < torch.tensor(lengths)[:, None]  # (B, N)
        return x, mask.to(self.device, dtype=torch.long)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, N) -> (B, T_max, L, D) selected hidden states; differentiable, caller sets the mode."""
        out = self.model(input_values, attention_mask=attention_mask, output_hidden_states=True)
        states = list(out.hidden_states)  # L_all x (B, T, D)
        states[-1] = out.last_hidden_state
        return torch.stack([states[i] for i in self.layers], dim=2)  # (B, T, L, D)

    def __call__(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        if not waves:
            return []
        if self.one_per_forward:
            groups = [[i] for i in range(len(waves))]
        elif self.pads:
            groups = [list(range(len(waves)))]
        else:
            by_length: dict[int, list[int]] = {}
            for i, w in enumerate(waves):
                by_length.setdefault(len(w), []).append(i)
            groups = list(by_length.values())
        out: list[np.ndarray | None] = [None] * len(waves)
        for group in groups:
            for i, feats in zip(group, self._run([waves[i] for i in group])):
                out[i] = feats
        return out  # type: ignore[return-value]

    def _run(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        n_samples = [len(w) for w in waves]
        n_frames = self.n_frames(n_samples)
        expected = [self.grid.n_frames(n) for n in n_samples]
        assert n_frames == expected, f"model frames {n_frames} != grid frames {expected}"
        x, mask = self.batch_inputs(waves)
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            feats = self.forward(x, mask)  # (B, T_max, L, D)
        assert feats.shape[1] == max(n_frames), f"model gave {feats.shape[1]} frames, expected {max(n_frames)}"
        feats = feats.float().cpu().numpy()
        return [np.ascontiguousarray(feats[i, :t]) for i, t in enumerate(n_frames)]  # (T_i, L, D)








# ----------------------------------------------------------------------------- fbank








# ----------------------------------------------------------------------------- eGeMAPS




# ----------------------------------------------------------------------------- choosing one


# oneDNN, torch's CPU kernel library, keeps each primitive it creates in a cache keyed by the
# input shape, 1024 entries by default. Utterances have distinct lengths, so every one adds
# entries: with WavLM's 512-channel conv front end, cli extract's peak RSS grew from 771 to
# 1,081 MiB between 50 and 4,000 utterances (766 MiB at 4,000 with the cache off), and a
# single stream over 40 utterances in corpus order added 637 MiB (9 MiB off), with no
# measurable gain in speed (bench/results/extract-memory-cpu.md). 0 turns the cache off.
ONEDNN_CACHE = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")


def bound_onednn_cache() -> None:
    """Turn oneDNN's primitive cache off unless the user set its size. oneDNN reads the variable
    once per process, at its first convolution: load_backend runs before any."""
    os.environ.setdefault(*ONEDNN_CACHE)


def load_backend(model: str, *, layers: Sequence[int] | None = None, device: str = "auto",
                 dtype: str = "auto") -> Backend:
    """`fbank`, `egemaps`, or a Hugging Face hub id / local folder (wav2vec2 family or Whisper).

    `dtype` is the compute precision of SSL models: float32, bfloat16 or
    float16 (autocast), or auto = bfloat16 on CUDA and on CPUs with native bfloat16, else float32
    (core.devices.autocast_dtype).
    `layers` (hidden-state indices) applies to SSL models only.
    """
    bound_onednn_cache()
    if model in ("fbank", "egemaps"):
        if layers is not None and tuple(layers) != (0,):
            raise BackendError(f"--model {model} has one layer (0); --layers does not apply")
        return FbankBackend() if model == "fbank" else EgemapsBackend()
    if is_whisper(model):  # log-mel input and a 30 s window: a backend of its own
        from extract.whisper import WhisperBackend

        return WhisperBackend(model, layers=layers, device=device, dtype=dtype)
    return HFBackend(model, layers=layers, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- a tiny test model


def tiny_wavlm(path: str | Path, *, seed: int = 0) -> Path:
    """Save an untrained 2-layer WavLM (layer-norm front end, pre-LN like Large) and its
    feature-extractor config to `path`, for tests and the offline demo.

    Same frame grid as WavLM Large (conv kernels and strides untouched), hidden
    size 32, so a minute of audio takes well under a second on a CPU.
    """
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    path = Path(path)
    config = WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_buckets=32, max_bucket_distance=64,
    )
    torch.manual_seed(seed)
    WavLMModel(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
        do_normalize=True, return_attention_mask=True,
    ).save_pretrained(path)
    return path


__all__ = ["Backend", "HFBackend", "load_backend", "tiny_wavlm", "zero_mean_unit_var"]
