"""WebRTC voice-activity masks for all four aggressiveness modes, on a feature frame grid.

Alignment rule ("center"): feature frame t covers samples
[stride*t, stride*t + window); it is speech iff the 10 ms WebRTC frame that
contains its centre sample c_t = stride*t + window//2 is speech, i.e.

    mask[m, t] = vad_m[c_t // 160]

For WavLM (window 400, stride 320) c_t = 320t + 200, so frame t reads VAD
frame 2t + 1. The audio is zero-padded to a multiple of 160 samples so the
last partial 10 ms is judged too; c_t < N always, so padding never decides a
frame on its own. The mask has exactly grid.n_frames(N) columns for every N.

Each utterance and each mode gets a fresh `webrtcvad.Vad`: its hangover and
noise estimates adapt over time, and carrying them from one utterance into the
next would make masks depend on extraction order.
"""

from __future__ import annotations

import numpy as np
import webrtcvad

from core.frames import SAMPLE_RATE, VAD_MODES, FrameGrid
from extract.audio import to_int16

VAD_FRAME_MS = 10
VAD_FRAME = SAMPLE_RATE * VAD_FRAME_MS // 1000  # 160 samples
_BYTES_PER_FRAME = 2 * VAD_FRAME  # int16


def vad_settings() -> dict:
    """What determines the masks, for the cache fingerprint.

    No package version: every webrtcvad(-wheels) release wraps the same frozen
    WebRTC C code, and a version bump must not make an old cache unresumable.
    """
    return {
        "vad": "webrtcvad",
        "vad_modes": list(VAD_MODES),
        "vad_frame_ms": VAD_FRAME_MS,
        "vad_rule": "center",
        "vad_input": "int16 = clip(round(x * 32768)), zero-padded to a multiple of 160",
    }


def vad_frames(samples: np.ndarray, mode: int) -> np.ndarray:
    """(ceil(N / 160),) bool: WebRTC's decision for each 10 ms frame of 16 kHz audio."""
    return _run_vad(_padded_pcm(samples), mode)


def vad_masks(samples: np.ndarray, grid: FrameGrid) -> np.ndarray:
    """(4, T) bool speech masks of 16 kHz audio `samples` (N,), T = grid.n_frames(N); row m = mode m."""
    n = len(samples)
    centers = grid.centers(n)  # (T,)
    if len(centers) == 0:
        return np.zeros((len(VAD_MODES), 0), dtype=bool)
    pcm = _padded_pcm(samples)
    speech = np.stack([_run_vad(pcm, mode) for mode in VAD_MODES])  # (4, n_vad)
    return speech[:, centers // VAD_FRAME]  # (4, T)


def speech_ratio(mask: np.ndarray) -> float:
    """Fraction of frames marked speech in a (T,) mask; 0.0 for an empty mask."""
    return float(mask.mean()) if mask.size else 0.0


def _padded_pcm(samples: np.ndarray) -> bytes:
    """(N,) float -> int16 bytes of ceil(N / 160) * 160 samples (zeros appended)."""
    pcm = to_int16(samples)
    pad = -len(pcm) % VAD_FRAME
    if pad:
        pcm = np.concatenate([pcm, np.zeros(pad, dtype=np.int16)])
    return pcm.tobytes()


def _run_vad(pcm: bytes, mode: int) -> np.ndarray:
    """(len(pcm) / 320,) bool for one mode, with a fresh VAD state."""
    vad = webrtcvad.Vad(mode)
    view = memoryview(pcm)  # slices of a memoryview copy nothing
    n = len(pcm) // _BYTES_PER_FRAME
    return np.fromiter(
        (vad.is_speech(view[i : i + _BYTES_PER_FRAME], SAMPLE_RATE)
         for i in range(0, n * _BYTES_PER_FRAME, _BYTES_PER_FRAME)),
        dtype=bool,
        count=n,
    )
