import pytest
import torch
from transformers import WavLMConfig, WavLMModel

from core.folds import FoldError, get_fold, plan_folds
from core.frames import SSL_GRID, FrameGrid, conv_grid

SWEEP = [0, 1, 399, 400, 401, 719, 720, 721, 1040, 16000, 16001, 16319, 16320, 48000 + 123]


def test_ssl_grid_is_the_wavlm_conv_stack():
    cfg = WavLMConfig()
    assert conv_grid(tuple(cfg.conv_kernel), tuple(cfg.conv_stride)) == SSL_GRID == FrameGrid(400, 320)


@pytest.mark.parametrize("n", SWEEP)
def test_n_frames_matches_the_model_formula(n):
    model = WavLMModel(WavLMConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                   intermediate_size=16, conv_dim=(8,) * 7))
    expected = int(model._get_feat_extract_output_lengths(torch.tensor([n]))[0]) if n else 0
    assert SSL_GRID.n_frames(n) == max(expected, 0)
    assert SSL_GRID.n_frames(n) == (0 if n < 400 else (n - 400) // 320 + 1)
    centers = SSL_GRID.centers(n)
    assert len(centers) == SSL_GRID.n_frames(n)
    if len(centers):
        assert centers[-1] + 200 <= n


def iemocap_like():
    return {f"Ses0{s}{g}": f"Ses0{s}" for s in range(1, 6) for g in "FM"}


def test_folds_are_disjoint_and_validate_on_the_session_partner():
    sessions = iemocap_like()
    folds = plan_folds(sessions)
    assert [f.fold for f in folds] == list(range(1, 11))
    assert [f.test_speaker for f in folds] == sorted(sessions)
    for f in folds:
        assert f.val_speaker != f.test_speaker
        assert sessions[f.val_speaker] == sessions[f.test_speaker]
        assert f.test_speaker not in f.train_speakers and f.val_speaker not in f.train_speakers
        assert len(f.train_speakers) == 8
        assert set(f.train_speakers) | {f.test_speaker, f.val_speaker} == set(sessions)
    assert get_fold(sessions, 5).test_speaker == "Ses03F"
    assert get_fold(sessions, 5).val_speaker == "Ses03M"


def test_speakers_without_a_partner_validate_on_the_next_speaker():
    sessions = {"a": "s1", "b": "s2", "c": "s3", "d": "s3", "e": "s3"}
    folds = plan_folds(sessions)
    assert [(f.test_speaker, f.val_speaker) for f in folds] == [
        ("a", "b"), ("b", "c"), ("c", "d"), ("d", "e"), ("e", "a")]


def test_fold_out_of_range_is_one_sentence():
    with pytest.raises(FoldError, match="fold 11 is out of range: this corpus has folds 1 to 10"):
        get_fold(iemocap_like(), 11)
    with pytest.raises(FoldError, match="at least 3 speakers"):
        plan_folds({"a": "s", "b": "s"})


def test_center_counted_grid_counts_frames_whose_centre_is_in_the_audio():
    grid = FrameGrid(window=1039, stride=320, offset=-519, count="center")
    for n in SWEEP:
        expected = sum(1 for t in range(n // 320 + 2) if 320 * t < n)
        assert grid.n_frames(n) == expected
        assert len(grid.centers(n)) == expected and all(c < n for c in grid.centers(n))
    # default grids keep their old fingerprint entries (old caches stay resumable)
    assert SSL_GRID.as_dict() == {"frame_window": 400, "frame_stride": 320}
    assert grid.as_dict() == {"frame_window": 1039, "frame_stride": 320, "frame_offset": -519, "frame_count": "center"}
    with pytest.raises(ValueError, match="count"):
        FrameGrid(400, 320, count="middle")
