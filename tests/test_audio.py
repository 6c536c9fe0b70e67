import math

import numpy as np
import pytest
import soundfile as sf

from core.errors import UserError
from core.records import SKIP_REASONS
from extract.audio import Audio, AudioError, load_audio, to_int16

F0 = 440.0  # below every tested Nyquist (4 kHz at 8 kHz)


def sine(sr: int, seconds: float, freq: float = F0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path, data: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = None):
    sf.write(str(path), data, sr, format=fmt, subtype=subtype)
    return path


def peak_hz(x: np.ndarray, sr: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


# (container, subtype, rate, channels, tolerance of the waveform against the ideal 16 kHz sine)
MATRIX = [
    ("WAV", "PCM_U8", 16000, 1, 2e-2),  # 8-bit WAV is unsigned
    ("WAV", "PCM_16", 16000, 1, 1e-3),
    ("WAV", "PCM_24", 16000, 1, 1e-3),
    ("WAV", "PCM_32", 16000, 1, 1e-3),
    ("WAV", "FLOAT", 16000, 1, 1e-3),
    ("WAV", "PCM_16", 8000, 1, 1e-3),
    ("WAV", "PCM_16", 22050, 1, 1e-3),
    ("WAV", "PCM_16", 44100, 1, 1e-3),
    ("WAV", "PCM_16", 48000, 1, 1e-3),
    ("WAV", "PCM_24", 48000, 2, 1e-3),
    ("WAV", "FLOAT", 22050, 2, 1e-3),
    ("FLAC", "PCM_16", 44100, 1, 1e-3),
    ("FLAC", "PCM_24", 48000, 2, 1e-3),
    ("OGG", "VORBIS", 48000, 1, None),  # lossy: checked by frequency and level only
]


@pytest.mark.parametrize("fmt,subtype,sr,channels,tol", MATRIX)
def test_format_matrix_gives_16k_mono_float32(tmp_path, fmt, subtype, sr, channels, tol):
    seconds = 1.0
    mono = sine(sr, seconds)
    if channels == 2:
        # L and R differ; their mean is the reference sine: (1.5 s + 0.5 s) / 2 = s.
        data = np.stack([1.5 * mono, 0.5 * mono], axis=1)
    else:
        data = mono
    path = write(tmp_path / f"x.{fmt.lower()}", data, sr, fmt, subtype)
    audio = load_audio(path)
    assert isinstance(audio, Audio)
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(len(audio.samples) - 16000 * seconds) <= 1
    assert audio.orig_sample_rate == sr
    assert audio.orig_seconds == pytest.approx(seconds, abs=1 / sr)
    assert not audio.truncated
    assert abs(peak_hz(audio.samples) - F0) <= 2.0
    rms = float(np.sqrt(np.mean(audio.samples[800:-800] ** 2)))
    assert rms == pytest.approx(0.5 / math.sqrt(2), rel=0.03)
    if tol is not None:
        ideal = sine(16000, seconds)[: len(audio.samples)]
        # The resampler's edge transients are allowed 50 ms at each end.
        inner = slice(800, len(ideal) - 800)
        assert np.max(np.abs(audio.samples[inner] - ideal[inner])) < tol


def test_stereo_is_the_channel_average(tmp_path):
    rng = np.random.default_rng(0)
    left, right = (rng.uniform(-0.5, 0.5, 8000).astype(np.float32) for _ in range(2))
    path = write(tmp_path / "st.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path).samples, (left + right) / 2, atol=1e-7)


def test_16k_int16_is_read_exactly(tmp_path):
    pcm = np.random.default_rng(1).integers(-32768, 32767, 4000, dtype=np.int16)
    path = write(tmp_path / "x.wav", pcm, 16000, subtype="PCM_16")
    samples = load_audio(path).samples
    np.testing.assert_array_equal(samples, pcm.astype(np.float32) / 32768)
    np.testing.assert_array_equal(to_int16(samples), pcm)


def test_to_int16_clips_instead_of_wrapping():
    out = to_int16(np.array([1.0, -1.0, 1.7, -3.0, 0.5, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(out, [32767, -32768, 32767, -32768, 16384, 0])
    assert out.dtype == np.int16


def test_float_file_over_full_scale_is_clipped(tmp_path):
    path = write(tmp_path / "loud.wav", 3.0 * sine(16000, 0.5), 16000, subtype="FLOAT")
    samples = load_audio(path).samples
    assert samples.max() == 1.0 and samples.min() == -1.0


def test_span_selects_exact_samples_at_16k(tmp_path):
    x = np.random.default_rng(2).uniform(-0.9, 0.9, 48000).astype(np.float32)
    path = write(tmp_path / "x.wav", x, 16000, subtype="FLOAT")
    audio = load_audio(path, start=0.5, end=1.25)
    np.testing.assert_array_equal(audio.samples, x[8000:20000])
    assert audio.orig_seconds == pytest.approx(0.75)
    # An end past the file is clamped; NaN means "to the end".
    assert len(load_audio(path, start=2.0, end=99.0).samples) == 16000
    assert len(load_audio(path, start=2.0).samples) == 16000


def test_span_at_48k_matches_resampled_whole_file(tmp_path):
    # A 1 kHz sine at 48 kHz; the span [0.5, 1.5) s must be the same sine, in phase.
    path = write(tmp_path / "x.wav", sine(48000, 2.0, freq=1000.0), 48000, subtype="PCM_24")
    audio = load_audio(path, start=0.5, end=1.5)
    assert abs(len(audio.samples) - 16000) <= 1
    ideal = sine(16000, 2.0, freq=1000.0)[8000 : 8000 + len(audio.samples)]
    np.testing.assert_allclose(audio.samples[800:-800], ideal[800:-800], atol=1e-3)


@pytest.mark.parametrize("sr", [16000, 44100])
def test_truncation_keeps_the_first_max_seconds(tmp_path, sr):
    path = write(tmp_path / "x.wav", sine(sr, 3.0, freq=300.0), sr, subtype="FLOAT")
    full = load_audio(path)
    cut = load_audio(path, max_seconds=1.0)
    assert cut.truncated and not full.truncated
    assert len(cut.samples) == 16000
    assert cut.orig_seconds == pytest.approx(3.0)
    # Reading only the needed part gives the same samples as cutting the whole.
    np.testing.assert_allclose(cut.samples, full.samples[:16000], atol=1e-5)
    # Truncation applies after the span is selected.
    span = load_audio(path, start=1.0, end=2.5, max_seconds=0.5)
    assert span.truncated and len(span.samples) == 8000 and span.orig_seconds == pytest.approx(1.5)
    # A limit at or beyond the length truncates nothing.
    same = load_audio(path, max_seconds=3.0)
    assert not same.truncated and len(same.samples) == len(full.samples)


def test_negative_max_seconds_is_a_programming_error(tmp_path):
    path = write(tmp_path / "x.wav", sine(16000, 0.1), 16000)
    with pytest.raises(ValueError):
        load_audio(path, max_seconds=-1.0)


def reason_of(path, **kwargs) -> AudioError:
    with pytest.raises(AudioError) as info:
        load_audio(path, **kwargs)
    err = info.value
    assert isinstance(err, UserError) and err.reason in SKIP_REASONS
    assert str(path) in str(err) and "\n" not in str(err)
    return err


def test_missing_audio(tmp_path):
    assert reason_of(tmp_path / "nope.wav").reason == "missing_audio"
    assert reason_of(tmp_path).reason == "missing_audio"  # a folder is not a file


def test_unreadable_audio(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    assert reason_of(bad).reason == "unreadable_audio"
    text = tmp_path / "notes.flac"
    text.write_text("not audio at all")
    assert reason_of(text).reason == "unreadable_audio"


def test_empty_audio(tmp_path):
    empty = write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    assert reason_of(empty).reason == "empty_audio"
    one_second = write(tmp_path / "x.wav", sine(16000, 1.0), 16000)
    assert reason_of(one_second, start=2.0).reason == "empty_audio"
    assert reason_of(one_second, start=0.5, end=0.5).reason == "empty_audio"


def test_too_short(tmp_path):
    assert reason_of(write(tmp_path / "a.wav", sine(16000, 399 / 16000), 16000)).reason == "too_short"
    # 180 samples at 8 kHz are 360 at 16 kHz: still no frame.
    assert reason_of(write(tmp_path / "b.wav", sine(8000, 180 / 8000), 8000)).reason == "too_short"
    assert len(load_audio(write(tmp_path / "c.wav", sine(16000, 400 / 16000), 16000)).samples) == 400
    # Truncation can make audio too short, too.
    long = write(tmp_path / "d.wav", sine(16000, 1.0), 16000)
    assert reason_of(long, max_seconds=0.01).reason == "too_short"


def test_non_finite_audio(tmp_path):
    x = sine(16000, 0.5)
    x[100] = np.nan
    assert reason_of(write(tmp_path / "nan.wav", x, 16000, subtype="FLOAT")).reason == "non_finite_audio"
    x[100] = np.inf
    assert reason_of(write(tmp_path / "inf.wav", x, 16000, subtype="FLOAT")).reason == "non_finite_audio"


def test_silent_audio(tmp_path):
    zeros = write(tmp_path / "z.wav", np.zeros(16000, dtype=np.int16), 16000, subtype="PCM_16")
    assert reason_of(zeros).reason == "silent_audio"
    # Opposite-phase channels average to digital silence, too.
    s = sine(16000, 0.5)
    anti = write(tmp_path / "anti.wav", np.stack([s, -s], axis=1), 16000, subtype="FLOAT")
    assert reason_of(anti).reason == "silent_audio"
    # One non-zero sample is not silence.
    x = np.zeros(16000, dtype=np.float32)
    x[5] = 1e-3
    assert len(load_audio(write(tmp_path / "tick.wav", x, 16000, subtype="FLOAT")).samples) == 16000


def test_audio_error_rejects_unknown_reasons():
    with pytest.raises(ValueError):
        AudioError("x.wav", "no_such_reason")
