"""Audio loading: any file soundfile reads -> 16 kHz mono float32, or a reason why not.

Every failure is an `AudioError` whose `reason` is a key of `SKIP_REASONS`, so the
extractor can skip the utterance and say why instead of crashing a long run.

Choices (also in docs/audio-vad.md):
- channels are averaged (a dual-mono file stays itself; a two-microphone file
  becomes their mean);
- resampling is soxr at quality "HQ" (20-bit precision, ~96 % pass band): far
  below anything an SSL model or a VAD can hear, and 2-3x cheaper than "VHQ";
- samples are clipped to [-1, 1] after resampling, because float files and the
  resampler's ringing may overshoot full scale and int16 VAD input must not wrap;
- `start`/`end` select a span, read with a seek so a long session file is not
  decoded whole; `max_seconds > 0` then keeps the first `max_seconds` of that span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from core.errors import UserError
from core.frames import SAMPLE_RATE
from core.records import SKIP_REASONS

RESAMPLE_QUALITY = "HQ"
# 25 ms: the receptive field of one SSL frame (400 samples at 16 kHz).
MIN_SECONDS = 0.025
# Extra input read past a truncation point so the resampler's edge does not
# fall inside the kept part: truncating after loading or while loading gives
# the same samples.
_TRUNCATION_MARGIN_SECONDS = 0.05


class AudioError(UserError):
    """An utterance whose audio cannot be used; `reason` is a SKIP_REASONS key."""

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown audio error reason {reason!r}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        tail = f" ({detail})" if detail else ""
        super().__init__(f"{self.path}: {SKIP_REASONS[reason]}{tail}")


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # (N,) float32, mono, at the requested rate (16 kHz), in [-1, 1]
    orig_sample_rate: int
    orig_seconds: float  # duration of the selected span before truncation
    truncated: bool


def load_audio(
    path: str | Path,
    *,
    start: float = 0.0,
    end: float = math.nan,
    max_seconds: float = 0.0,
    sample_rate: int = SAMPLE_RATE,
) -> Audio:
    """Read `[start, end)` seconds of `path` as mono float32 at `sample_rate`.

    `end` NaN means the end of the file; `max_seconds > 0` keeps only the first
    `max_seconds` of the span and sets `truncated`. Raises `AudioError`.
    """
    if max_seconds < 0 or not math.isfinite(max_seconds):
        raise ValueError(f"max_seconds must be >= 0 and finite, got {max_seconds}")
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing_audio")
    try:
        with sf.SoundFile(str(path)) as fh:
            orig_sr = int(fh.samplerate)
            first, stop = _span_frames(path, fh.frames, orig_sr, start, end)
            span = stop - first
            keep = span
            if max_seconds > 0:
                keep = min(span, math.ceil(max_seconds * orig_sr))
            n_read = min(span, keep + math.ceil(_TRUNCATION_MARGIN_SECONDS * orig_sr))
            if first:
                fh.seek(first)
            raw = fh.read(n_read, dtype="float32", always_2d=True)  # (N, C)
    except AudioError:
        raise
    except Exception as exc:  # libsndfile reports corrupt or unknown files in many ways
        raise AudioError(path, "unreadable_audio", _short(exc)) from None
    if raw.shape[0] == 0:
        raise AudioError(path, "empty_audio")
    if not np.isfinite(raw).all():
        raise AudioError(path, "non_finite_audio")
    mono = raw.mean(axis=1, dtype=np.float32)  # (N,)
    samples = _resample(mono, orig_sr, sample_rate)
    truncated = keep < span
    if truncated:
        samples = samples[: round(max_seconds * sample_rate)]
    samples = np.clip(samples, -1.0, 1.0)
    min_samples = math.ceil(MIN_SECONDS * sample_rate)
    if len(samples) < min_samples:
        raise AudioError(path, "too_short", f"{len(samples)} samples at {sample_rate} Hz")
    if not samples.any():
        raise AudioError(path, "silent_audio")
    return Audio(
        samples=np.ascontiguousarray(samples, dtype=np.float32),
        orig_sample_rate=orig_sr,
        orig_seconds=span / orig_sr,
        truncated=truncated,
    )


def _span_frames(path: Path, n_frames: int, sr: int, start: float, end: float) -> tuple[int, int]:
    """[first, stop) frame indices of the requested span, clamped to the file."""
    if n_frames <= 0:
        raise AudioError(path, "empty_audio")
    if not math.isfinite(start) or start < 0:
        raise AudioError(path, "empty_audio", f"bad start time {start}")
    first = round(start * sr)
    stop = n_frames if math.isnan(end) else min(n_frames, round(end * sr))
    if first >= n_frames:
        raise AudioError(path, "empty_audio", f"starts at {start:.3f} s, after the file's end")
    if stop <= first:
        raise AudioError(path, "empty_audio", f"empty span [{start:.3f}, {end:.3f}) s")
    return first, stop


def _resample(x: np.ndarray, orig_sr: int, sr: int) -> np.ndarray:
    """(N,) -> (round(N * sr / orig_sr),) float32."""
    if orig_sr == sr:
        return x
    return soxr.resample(x, orig_sr, sr, quality=RESAMPLE_QUALITY).astype(np.float32, copy=False)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def to_int16(samples: np.ndarray) -> np.ndarray:
    """(N,) float in [-1, 1] -> (N,) int16, the scale soundfile uses (x * 32768), clipped.

    Clipping matters: +1.0 * 32768 would wrap to -32768 and turn a loud peak
    into a click the VAD would hear.
    """
    scaled = np.rint(np.asarray(samples, dtype=np.float32) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


# --- streaming: a long recording in bounded memory ------------------------------------------

STREAM_BLOCK_SECONDS = 1.0  # decoded and resampled at a time: ~64 KiB of float32 at 16 kHz


class AudioStream:
    """A file as consecutive blocks of 16 kHz mono float32 in [-1, 1], never held whole.

    The same treatment as `load_audio` (channels averaged, soxr at RESAMPLE_QUALITY, clipped after
    resampling), block by block: soundfile reads `block_seconds` of the file, soxr's `ResampleStream`
    carries the filter state across blocks, so the samples equal `load_audio`'s exactly (tested at 8,
    16 and 44.1 kHz with blocks that end mid-way through the filter). Opening raises `AudioError` for a missing, unreadable or empty file; a NaN/inf
    block raises it while streaming.
    """

    def __init__(self, path: str | Path, *, block_seconds: float = STREAM_BLOCK_SECONDS) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise AudioError(self.path, "missing_audio")
        try:
            info = sf.info(str(self.path))
        except Exception as exc:  # libsndfile reports corrupt or unknown files in many ways
            raise AudioError(self.path, "unreadable_audio", _short(exc)) from None
        if info.frames <= 0:
            raise AudioError(self.path, "empty_audio")
        self.orig_sample_rate = int(info.samplerate)
        self.seconds = info.frames / info.samplerate  # from the header
        self.block = max(1, round(block_seconds * self.orig_sample_rate))

    def __iter__(self):
        """Yield (n,) float32 blocks at 16 kHz; their total length is the resampled file's."""
        resampler = None
        if self.orig_sample_rate != SAMPLE_RATE:
            resampler = soxr.ResampleStream(self.orig_sample_rate, SAMPLE_RATE, 1, dtype="float32",
                                            quality=RESAMPLE_QUALITY)
        try:
            with sf.SoundFile(str(self.path)) as fh:
                while True:
                    raw = fh.read(self.block, dtype="float32", always_2d=True)  # (n, C)
                    last = len(raw) < self.block
                    if not np.isfinite(raw).all():
                        raise AudioError(self.path, "non_finite_audio")
                    mono = raw.mean(axis=1, dtype=np.float32)  # (n,)
                    out = mono if resampler is None else resampler.resample_chunk(mono, last=last)
                    if len(out):
                        yield np.clip(out, -1.0, 1.0)
                    if last:
                        return
        except AudioError:
            raise
        except Exception as exc:  # a file that breaks off mid-stream
            raise AudioError(self.path, "unreadable_audio", _short(exc)) from None
