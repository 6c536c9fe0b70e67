"""Classical feature backends: log-mel filterbank energies and openSMILE's eGeMAPS descriptors.

One utterance at a time, one "layer" (L = 1), each on its own frame grid, so
VAD masks align by the shared rule (core.frames). They give the baselines a
head must beat and run offline without any model download.
"""

from __future__ import annotations

import abc
from importlib import metadata

import numpy as np
import torch

from core.frames import SAMPLE_RATE, FrameGrid
from extract.models import BackendError


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
        from transformers.audio_utils import mel_filter_bank

        self.window = torch.hann_window(self.N_FFT, periodic=True)
        # Triangles equally spaced on the HTK mel scale, unnormalized (tests/test_backends.py: equal to
        # the formula bit for bit in float32)
        self.mel = torch.from_numpy(mel_filter_bank(
            num_frequency_bins=self.N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=self.F_MIN,
            max_frequency=self.F_MAX, sampling_rate=SAMPLE_RATE, norm=None, mel_scale="htk").astype(np.float32))  # (F, M)

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

