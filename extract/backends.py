"""Feature backends: waveforms in, per-frame features `(T, L, D)` out, on a declared frame grid.

Three kinds, chosen by one string (`load_backend`):
- a Hugging Face speech SSL checkpoint (WavLM, wav2vec2, HuBERT, data2vec-audio),
  hub id or local folder, loaded with the ordinary `from_pretrained` and never
  with remote code: all hidden states (L = num_hidden_layers + 1) or a subset;
- `fbank`: 80 log-mel energies, torch only, 25 ms window / 10 ms hop;
- `egemaps`: the 25 eGeMAPSv02 low-level descriptors from openSMILE (optional extra).

Every backend returns float32; the cache writer decides the stored dtype. The
extraction loop (`extract.pipeline`) owns batching, workers and the writer.
"""

from __future__ import annotations

import abc

import hashlib
import warnings
from importlib import metadata
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from core.errors import UserError
from core.frames import SAMPLE_RATE, FrameGrid, conv_grid
from extract.frontend import use_fast_front_end


# WavLM mixes a bool padding mask with a float position bias; torch warns, the result is
# right (tested). Filtered once here: warnings.catch_warnings is not safe across threads.
warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")


class BackendError(UserError):
    """A model that cannot be loaded or used as a feature backend."""


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


# ----------------------------------------------------------------------------- layers


def parse_layers(spec: str) -> tuple[int, ...] | None:
    """`all` -> None (every hidden state); `24`, `12-24`, `0,6,12` or `0,10-12` -> sorted indices."""
    spec = spec.strip().lower()
    if spec in ("", "all"):
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, sep, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if sep else int(lo)
            if first < 0 or last < first:
                raise ValueError(part)
            out.update(range(first, last + 1))
    except ValueError:
        raise BackendError(
            f"--layers {spec!r} is not 'all', a layer (24), a range (12-24) or a list (0,6,12)"
        ) from None
    return tuple(sorted(out))


def _check_layers(layers: Sequence[int] | None, available: int, model: str) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(available))
    chosen = tuple(sorted(set(int(i) for i in layers)))
    if not chosen or chosen[0] < 0 or chosen[-1] >= available:
        raise BackendError(
            f"{model} has hidden states 0 to {available - 1}; layers {list(chosen)} are out of range"
        )
    return chosen


# ----------------------------------------------------------------------------- HF SSL models


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} was asked for but torch sees no CUDA GPU")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise BackendError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


# compute precision names -> autocast dtype (None = plain float32)
_COMPUTE_DTYPES: dict[str, torch.dtype | None] = {
    "float32": None, "fp32": None, "none": None,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def _compute_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if dtype not in _COMPUTE_DTYPES:
        raise BackendError(f"compute dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return _COMPUTE_DTYPES[dtype]


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order.

    Independent of the file format (safetensors or .bin) and of where the
    weights came from; 0.7 s for WavLM Large's 316M parameters on this CPU.
    Call it before moving the model to a GPU.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # the bytes in place (a buffer), not a copy of them
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


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
        from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

        self.name = model
        self.device = _resolve_device(device)
        self.autocast_dtype = _compute_dtype(dtype, self.device)
        try:
            config = AutoConfig.from_pretrained(model)
        except Exception as exc:  # hub offline, typo, not a model folder: all user-facing
            raise BackendError(f"cannot load model {model!r}: {_first_line(exc)}") from None
        if not hasattr(config, "conv_kernel") or not hasattr(config, "conv_stride"):
            raise BackendError(f"{model!r} ({config.model_type}) is neither a wav2vec2-style speech SSL model nor Whisper")
        if getattr(config, "add_adapter", False):
            raise BackendError(f"{model!r} has an adapter that changes the frame rate; use its base model")
        try:
            fe = AutoFeatureExtractor.from_pretrained(model)
        except Exception as exc:
            raise BackendError(
                f"{model!r} has no usable feature-extractor config (preprocessor_config.json): {_first_line(exc)}"
            ) from None
        if getattr(fe, "sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
            raise BackendError(f"{model!r} expects {fe.sampling_rate} Hz audio; only 16 kHz models are supported")
        self.model = _quiet_from_pretrained(AutoModel, model).eval()
        self.config = self.model.config
        self.normalize = bool(getattr(fe, "do_normalize", False))
        self.grid = conv_grid(tuple(self.config.conv_kernel), tuple(self.config.conv_stride))
        self.layers = _check_layers(layers, self.config.num_hidden_layers + 1, model)
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


def _quiet_from_pretrained(auto_class, model: str) -> torch.nn.Module:
    """from_pretrained without transformers' own progress bar (the extractor draws one)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return auto_class.from_pretrained(model)
    except Exception as exc:
        raise BackendError(load_error(model, exc)) from None
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_error(model: str, exc: BaseException) -> str:
    """One line for a model folder or hub id that from_pretrained refused.

    A pickled checkpoint refused by torch.load(weights_only=True) gets its own sentence:
    torch's message goes on to explain how to load it unsafely, which is not our advice.
    """
    import pickle

    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return (f"cannot load model {model!r}: its weights are a pickle that is not plain tensors, and loading it "
                "could run code, so it was not loaded; use a checkpoint saved as safetensors")
    return f"cannot load model {model!r}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


# ----------------------------------------------------------------------------- fbank


def mel_filterbank(n_mels: int, n_fft: int, f_min: float, f_max: float,
                   sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters, equally spaced on the HTK mel scale."""
    def to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = to_hz(np.linspace(to_mel(np.array(f_min)), to_mel(np.array(f_max)), n_mels + 2))  # (n_mels + 2,)
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # (F,)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1)
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    weights = np.clip(np.minimum(rising, falling), 0.0, None)  # (n_mels, F)
    return torch.from_numpy(weights.T.astype(np.float32))  # (F, n_mels)


class _OneLayerBackend(abc.ABC):
    """A classic feature extractor: one utterance at a time, one "layer", its own grid."""

    grid: FrameGrid
    hidden_size: int

    def __call__(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        return [self._one(w) for w in waves]

    def _one(self, wave: np.ndarray) -> np.ndarray:
        t = self.grid.n_frames(len(wave))
        if t == 0:
            return np.zeros((0, 1, self.hidden_size), dtype=np.float32)  # (T=0, L=1, D)
        return self._frames(wave, t)

    @abc.abstractmethod
    def _frames(self, wave: np.ndarray, t: int) -> np.ndarray:
        """(t, 1, D) float32 features of a wave with t >= 1 frames on self.grid."""


class FbankBackend(_OneLayerBackend):
    """Log-mel energies: Hann window 25 ms, hop 10 ms, no centre padding, HTK mel 20-7600 Hz.

    Plain on purpose (no dither, pre-emphasis or normalization, which heads
    can do on the cache): frame t covers samples [160 t, 160 t + 400), so the
    grid is FrameGrid(400, 160) and VAD masks align by the shared rule.
    """

    name = "fbank"
    thread_safe = True  # stateless torch ops: the loop may call it from several threads
    N_FFT = 400
    HOP = 160
    F_MIN, F_MAX = 20.0, 7600.0
    LOG_FLOOR = 1e-10  # power floor: -23 in log units, below 16-bit quantization noise

    def __init__(self, n_mels: int = 80) -> None:
        self.grid = FrameGrid(window=self.N_FFT, stride=self.HOP)
        self.layers = (0,)
        self.n_layers = 1
        self.hidden_size = n_mels
        self.window = torch.hann_window(self.N_FFT, periodic=True)
        self.mel = mel_filterbank(n_mels, self.N_FFT, self.F_MIN, self.F_MAX)  # (F, M)

    def describe(self) -> dict:
        return {
            "backend": "fbank", "model": "fbank", "n_mels": self.hidden_size, "n_fft": self.N_FFT,
            "window_fn": "hann", "mel_scale": "htk", "f_min": self.F_MIN, "f_max": self.F_MAX,
            "log": "natural", "log_floor": self.LOG_FLOOR, "layers": [0], "n_layers": 1,
            "hidden_size": self.hidden_size, **self.grid.as_dict(),
        }

    def _frames(self, wave: np.ndarray, t: int) -> np.ndarray:
        spec = torch.stft(torch.from_numpy(np.asarray(wave, dtype=np.float32)), n_fft=self.N_FFT,
                          hop_length=self.HOP, window=self.window, center=False,
                          return_complex=True)  # (F, T)
        power = spec.abs().square().T  # (T, F)
        logmel = torch.log(torch.clamp(power @ self.mel, min=self.LOG_FLOOR))  # (T, M)
        assert logmel.shape[0] == t, (logmel.shape, t)
        return logmel[:, None, :].numpy()  # (T, 1, M)


# ----------------------------------------------------------------------------- eGeMAPS


class EgemapsBackend(_OneLayerBackend):
    """The 25 eGeMAPSv02 low-level descriptors from openSMILE, one row per 10 ms.

    openSMILE frames start at 0 every 10 ms ("left" framing): energy and
    spectral descriptors use 20 ms windows, pitch, jitter, shimmer and formants
    60 ms windows, then a 3-frame moving average. Row t therefore reads samples
    [160 t, 160 t + 960) at most, and the grid is FrameGrid(960, 160): only
    rows whose longest window lies inside the audio are kept. openSMILE emits
    one more row at the end of the input (measured: rows = T + 1 for every
    N >= 960, tested); it is dropped. Audio shorter than 960 samples has no
    frame (the extractor skips it as too short).
    """

    name = "egemaps"

    def __init__(self) -> None:
        try:
            import opensmile
        except ImportError:
            raise BackendError(
                "--model egemaps needs the opensmile package: pip install 'sapser[egemaps]'"
            ) from None
        self._smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                      feature_level=opensmile.FeatureLevel.LowLevelDescriptors)
        self.columns: list[str] = list(self._smile.feature_names)
        self.version = metadata.version("opensmile")
        self.grid = FrameGrid(window=960, stride=160)
        self.layers = (0,)
        self.n_layers = 1
        self.hidden_size = len(self.columns)

    def describe(self) -> dict:
        return {
            "backend": "egemaps", "model": "egemaps", "feature_set": "eGeMAPSv02",
            "feature_level": "LowLevelDescriptors", "opensmile": self.version, "columns": self.columns,
            "alignment": "row t starts at 10 ms * t; rows beyond grid.n_frames dropped",
            "layers": [0], "n_layers": 1, "hidden_size": self.hidden_size, **self.grid.as_dict(),
        }

    def _frames(self, wave: np.ndarray, t: int) -> np.ndarray:
        rows = self._smile.process_signal(np.asarray(wave, dtype=np.float32), SAMPLE_RATE).to_numpy(np.float32)
        if rows.shape[0] < t:
            raise RuntimeError(f"openSMILE gave {rows.shape[0]} rows for {t} frames")
        feats = rows[:t]  # (T, 25)
        if not np.isfinite(feats).all():
            raise RuntimeError("openSMILE returned non-finite descriptors")
        return np.ascontiguousarray(feats[:, None, :])  # (T, 1, 25)


# ----------------------------------------------------------------------------- choosing one


def load_backend(model: str, *, layers: Sequence[int] | None = None, device: str = "auto",
                 dtype: str = "auto") -> Backend:
    """`fbank`, `egemaps`, or a Hugging Face hub id / local folder (wav2vec2 family or Whisper).

    `dtype` is the compute precision of SSL models: float32, bfloat16 or
    float16 (autocast), or auto = bfloat16 on CUDA and float32 on CPU.
    `layers` (hidden-state indices) applies to SSL models only.
    """
    if model in ("fbank", "egemaps"):
        if layers is not None and tuple(layers) != (0,):
            raise BackendError(f"--model {model} has one layer (0); --layers does not apply")
        return FbankBackend() if model == "fbank" else EgemapsBackend()
    from extract.whisper import WhisperBackend, is_whisper

    if is_whisper(model):  # log-mel input and a 30 s window: a backend of its own
        return WhisperBackend(model, layers=layers, device=device, dtype=dtype)
    return HFBackend(model, layers=layers, device=device, dtype=dtype)


def model_slug(model: str) -> str:
    """A file-name-safe short name: microsoft/wavlm-large -> wavlm-large, /x/my_model/ -> my_model."""
    tail = Path(model.rstrip("/\\")).name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in tail)


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


__all__ = [
    "Backend", "BackendError", "EgemapsBackend", "FbankBackend", "HFBackend", "load_backend",
    "mel_filterbank", "model_slug", "parse_layers", "state_dict_sha256", "tiny_wavlm",
    "zero_mean_unit_var",
]
