import json
from pathlib import Path

import numpy as np
import pytest

from core.frames import SSL_GRID, FrameGrid
from extract.audio import load_audio
from extract.vad import VAD_FRAME, VAD_MODES, speech_ratio, vad_frames, vad_masks, vad_settings

DATA = Path(__file__).parent / "data"
SPEECH = sorted(DATA.glob("speech_*.wav"))
SWEEP = [0, 1, 159, 160, 399, 400, 401, 559, 560, 719, 720, 721, 1039, 1040, 1041,
         16000, 16001, 16319, 16320, 16321, 48000 + 123, 10 * 16000 + 77]
GRIDS = [SSL_GRID, FrameGrid(window=400, stride=160), FrameGrid(window=320, stride=320), FrameGrid(window=1, stride=1)]
# WebRTC keeps saying "speech" for a short hangover after speech stops (measured:
# up to 15 frames of 10 ms in modes 0-1); frames later than this are judged strictly.
HANGOVER_SECONDS = 0.2


def noise(n: int, seed: int = 0, level: float = 0.3) -> np.ndarray:
    return (level * np.random.default_rng(seed).standard_normal(n)).clip(-1, 1).astype(np.float32)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g.window}s{g.stride}")
def test_mask_length_equals_frame_count(grid):
    for n in SWEEP:
        masks = vad_masks(noise(n), grid)
        assert masks.dtype == bool
        assert masks.shape == (len(VAD_MODES), grid.n_frames(n)), n


def test_short_audio_gives_an_empty_mask():
    assert vad_masks(noise(399), SSL_GRID).shape == (4, 0)
    assert vad_masks(np.zeros(0, dtype=np.float32), SSL_GRID).shape == (4, 0)
    assert vad_masks(noise(400), SSL_GRID).shape == (4, 1)


def padded_speech(path: Path, pad_seconds: float = 1.0) -> tuple[np.ndarray, int, int]:
    """(N,) audio = zeros + speech + zeros, and the speech's [first, stop) samples."""
    speech = load_audio(path).samples
    pad = np.zeros(round(pad_seconds * 16000), dtype=np.float32)
    return np.concatenate([pad, speech, pad]), len(pad), len(pad) + len(speech)


@pytest.mark.parametrize("path", SPEECH, ids=lambda p: p.stem)
def test_real_speech_is_speech_and_digital_silence_is_not(path):
    audio, first, stop = padded_speech(path)
    masks = vad_masks(audio, SSL_GRID)  # (4, T)
    centers = SSL_GRID.centers(len(audio))
    spoken = (centers >= first) & (centers < stop)
    before = centers < first
    after = centers >= stop + HANGOVER_SECONDS * 16000
    for mode in VAD_MODES:
        assert masks[mode, spoken].mean() >= 0.8, (mode, masks[mode, spoken].mean())
        assert not masks[mode, before].any(), mode
        assert not masks[mode, after].any(), mode


def test_mask_follows_the_centre_sample_rule():
    # Speech, silence and speech again, so the masks have both values and edges.
    speech = load_audio(SPEECH[0]).samples
    gap = np.zeros(7919, dtype=np.float32)  # not a multiple of 160 or 320
    audio = np.concatenate([speech, gap, speech, gap[:333]])
    for grid in GRIDS[:3]:
        masks = vad_masks(audio, grid)
        for mode in VAD_MODES:
            per_10ms = vad_frames(audio, mode)
            assert len(per_10ms) == -(-len(audio) // VAD_FRAME)
            expected = [per_10ms[(grid.stride * t + grid.window // 2) // VAD_FRAME]
                        for t in range(grid.n_frames(len(audio)))]
            np.testing.assert_array_equal(masks[mode], expected)
            assert masks[mode].any() and not masks[mode].all()


def test_each_utterance_gets_a_fresh_vad_state():
    # The same utterance gives the same masks whatever was processed before it.
    speech = load_audio(SPEECH[1]).samples
    alone = vad_masks(speech, SSL_GRID)
    vad_masks(noise(32000, seed=3, level=0.9), SSL_GRID)
    np.testing.assert_array_equal(vad_masks(speech, SSL_GRID), alone)


def test_speech_ratio():
    assert speech_ratio(np.array([True, False, True, True])) == 0.75
    assert speech_ratio(np.zeros(0, dtype=bool)) == 0.0


def test_vad_settings_are_json_for_the_fingerprint():
    settings = vad_settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["vad_rule"] == "center" and settings["vad_frame_ms"] == 10
