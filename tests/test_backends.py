"""Feature backends: frame counts, padding invariance, normalization, layer choice, offline baselines."""

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    Data2VecAudioConfig,
    Data2VecAudioModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)

from core.frames import SSL_GRID, FrameGrid
from extract.backends import HFBackend, load_backend, tiny_wavlm
from extract.models import BackendError, model_slug, parse_layers
from extract.vad import vad_masks

LENGTHS = [400, 401, 719, 720, 1040, 7999, 16000, 16001, 24321]


def waves_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    # a DC offset and a scale far from 1 make normalization visible in the features
    return [(0.05 * rng.standard_normal(n) + 0.02).astype(np.float32) for n in lengths]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_backend(str(tiny_dir), layers=None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def group_norm_dir(tmp_path_factory):
    """A tiny wav2vec2-base-like model: group-norm front end, no attention mask in its config."""
    path = tmp_path_factory.mktemp("w2v") / "group"
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(32,) * 7, feat_extract_norm="group", do_stable_layer_norm=False,
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(1)
    Wav2Vec2Model(cfg).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(path)
    return path


def test_tiny_wavlm_loads_through_from_pretrained_with_all_hidden_states(tiny, tiny_dir):
    assert isinstance(tiny, HFBackend)
    assert tiny.grid == SSL_GRID
    assert tiny.layers == (0, 1, 2) and tiny.n_layers == 3 and tiny.hidden_size == 32
    assert tiny.config.feat_extract_norm == "layer" and tiny.config.do_stable_layer_norm
    d = tiny.describe()
    assert d["model"] == str(tiny_dir) and d["normalize"] is True and d["padding"] == "attention_mask"
    assert len(d["weights_sha256"]) == 64 and d["layers"] == [0, 1, 2]
    assert d["frame_window"] == 400 and d["frame_stride"] == 320


def test_weight_hash_identifies_the_weights(tmp_path, tiny):
    same = load_backend(str(tiny_wavlm(tmp_path / "a", seed=0)), layers=None, device="cpu", dtype="float32")
    other = load_backend(str(tiny_wavlm(tmp_path / "b", seed=1)), layers=None, device="cpu", dtype="float32")
    assert same.weights_sha256 == tiny.weights_sha256
    assert other.weights_sha256 != tiny.weights_sha256


def test_padded_batch_equals_one_utterance_at_a_time(tiny):
    waves = waves_of(LENGTHS)
    batched = tiny(waves)
    for wave, feats in zip(waves, batched):
        (alone,) = tiny([wave])
        assert feats.shape == alone.shape == (SSL_GRID.n_frames(len(wave)), 3, 32)
        assert feats.dtype == np.float32
        assert np.abs(feats - alone).max() <= 1e-4


@pytest.mark.parametrize("n", LENGTHS)
def test_frames_equal_the_model_formula_and_the_vad_mask(tiny, n):
    (wave,) = waves_of([n])
    (feats,) = tiny([wave])
    formula = int(tiny.model._get_feat_extract_output_lengths(torch.tensor([n]))[0])
    assert feats.shape[0] == formula == tiny.grid.n_frames(n) == vad_masks(wave, tiny.grid).shape[1]


def hf_reference(model_dir, wave, fe_kwargs):
    """What a user of plain transformers gets: the feature extractor, then the model."""
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                  return_attention_mask=True, **fe_kwargs)
    inputs = fe(wave, sampling_rate=16000, return_tensors="pt")
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        out = model(inputs["input_values"], output_hidden_states=True)
    states = list(out.hidden_states[:-1]) + [out.last_hidden_state]
    return torch.stack(states, dim=2)[0].numpy()  # (T, L, D)


def test_normalization_follows_the_feature_extractor_config(tmp_path, tiny, tiny_dir):
    (wave,) = waves_of([12345])
    (ours,) = tiny([wave])
    assert np.abs(ours - hf_reference(tiny_dir, wave, {"do_normalize": True})).max() <= 1e-4

    raw_dir = tiny_wavlm(tmp_path / "raw", seed=0)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                             return_attention_mask=True).save_pretrained(raw_dir)
    raw = load_backend(str(raw_dir), layers=None, device="cpu", dtype="float32")
    assert raw.normalize is False and raw.describe()["normalize"] is False
    (unnormalized,) = raw([wave])
    assert np.abs(unnormalized - hf_reference(raw_dir, wave, {"do_normalize": False})).max() <= 1e-4
    assert np.abs(unnormalized - ours).max() > 1e-2  # the switch matters for this input


def test_group_norm_models_are_never_padded(group_norm_dir):
    backend = load_backend(str(group_norm_dir), layers=None, device="cpu", dtype="float32")
    assert backend.pads is False and backend.describe()["padding"].startswith("none")
    waves = waves_of([16000, 9000, 16000, 4000])
    batched = backend(waves)
    for wave, feats in zip(waves, batched):
        (alone,) = backend([wave])
        assert np.abs(feats - alone).max() <= 1e-5
    # the test can fail: zero padding does change a group-norm model's frames
    x, _ = backend.batch_inputs([waves[1]])
    padded = torch.nn.functional.pad(x, (0, 7000))
    with torch.inference_mode():
        got = backend.forward(padded, None)[0, : batched[1].shape[0]].numpy()
    assert np.abs(got - batched[1]).max() > 1e-3
    with pytest.raises(ValueError, match="must not be padded"):
        backend.batch_inputs(waves[:2])


def test_padding_is_measured_not_assumed(tmp_path, tiny):
    """data2vec-audio has a layer-norm front end, but its stacked positional convolutions
    read the padded frames: the load-time measurement sends it down the unpadded path."""
    path = tmp_path / "d2v"
    torch.manual_seed(2)
    Data2VecAudioModel(Data2VecAudioConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
        num_conv_pos_embeddings=3, num_conv_pos_embedding_groups=4)).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    d2v = load_backend(str(path), layers=None, device="cpu", dtype="float32")
    assert tiny.pads is True and d2v.pads is False
    waves = waves_of([16000, 6000])
    for wave, feats in zip(waves, d2v(waves)):
        assert np.abs(feats - d2v([wave])[0]).max() <= 1e-5
    first, second = (d2v.batch_inputs([w])[0][0] for w in waves)  # normalized (N,)
    values = torch.zeros(2, 16000)  # (B, N)
    values[0], values[1, :6000] = first, second
    mask = torch.tensor([[1] * 16000, [1] * 6000 + [0] * 10000])
    with torch.inference_mode():
        padded = d2v.forward(values, mask)[1, : d2v.grid.n_frames(6000)].numpy()
    assert np.abs(padded - d2v([waves[1]])[0]).max() > 1e-3


def test_a_layer_subset_is_the_same_columns_of_all_layers(tiny, tiny_dir):
    waves = waves_of([9000, 16000])
    every = tiny(waves)
    last = load_backend(str(tiny_dir), layers=[2], device="cpu", dtype="float32")
    ends = load_backend(str(tiny_dir), layers=parse_layers("0,2"), device="cpu", dtype="float32")
    assert last.layers == (2,) and last.n_layers == 1 and ends.layers == (0, 2)
    for full, one, two in zip(every, last(waves), ends(waves)):
        assert np.abs(one - full[:, [2]]).max() <= 1e-5
        assert np.abs(two - full[:, [0, 2]]).max() <= 1e-5
    with pytest.raises(BackendError, match="hidden states 0 to 2"):
        load_backend(str(tiny_dir), layers=[3], device="cpu", dtype="float32")


def test_last_layer_is_the_models_last_hidden_state(tiny):
    (wave,) = waves_of([8000])
    x, _ = tiny.batch_inputs([wave])
    with torch.inference_mode():
        out = tiny.model(x, output_hidden_states=True)
    (feats,) = tiny([wave])
    assert np.abs(feats[:, -1] - out.last_hidden_state[0].numpy()).max() <= 1e-5
    assert len(out.hidden_states) == tiny.config.num_hidden_layers + 1


def test_bf16_autocast_runs_and_stays_close(tiny_dir, tiny):
    bf16 = load_backend(str(tiny_dir), layers=None, device="cpu", dtype="bf16")
    assert bf16.describe()["compute_dtype"] == "bfloat16"
    (wave,) = waves_of([16000])
    (low,) = bf16([wave])
    (high,) = tiny([wave])
    assert low.dtype == np.float32 and low.shape == high.shape
    assert np.abs(low - high).max() < 0.25 * np.abs(high).max()


@pytest.mark.parametrize("spec, expected", [
    ("all", None), ("24", (24,)), ("12-14", (12, 13, 14)), ("0,6,12", (0, 6, 12)), ("3, 0-1", (0, 1, 3)),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec) == expected


@pytest.mark.parametrize("spec", ["x", "5-3", "-1", "1,,2"])
def test_parse_layers_rejects_nonsense(spec):
    with pytest.raises(BackendError, match="--layers"):
        parse_layers(spec)


def test_unloadable_models_are_user_errors(tmp_path):
    with pytest.raises(BackendError, match="cannot load model"):
        load_backend(str(tmp_path / "nowhere"), layers=None, device="cpu", dtype="float32")
    with pytest.raises(BackendError, match="device"):
        HFBackend(str(tmp_path), device="tpu")
    with pytest.raises(BackendError, match="one layer"):
        load_backend("fbank", layers=[3], device="cpu", dtype="float32")


def test_model_slug():
    assert model_slug("microsoft/wavlm-large") == "wavlm-large"
    assert model_slug("/data/models/my model/") == "my-model"
    assert model_slug("fbank") == "fbank"


@pytest.mark.parametrize("n", [400, 401, 559, 560, 16000, 16001])
def test_fbank_frames_on_its_grid(n):
    fbank = load_backend("fbank", layers=None, device="cpu", dtype="float32")
    assert fbank.grid == FrameGrid(400, 160)
    (wave,) = waves_of([n])
    (feats,) = fbank([wave])
    assert feats.shape == ((n - 400) // 160 + 1, 1, 80) == (fbank.grid.n_frames(n), 1, 80)
    assert feats.shape[0] == vad_masks(wave, fbank.grid).shape[1]
    assert np.isfinite(feats).all() and feats.dtype == np.float32


def test_fbank_puts_a_tone_in_the_right_band():
    fbank = load_backend("fbank", layers=None, device="cpu", dtype="float32")
    tone = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)).astype(np.float32)
    (feats,) = fbank([tone])
    band = int(feats[:, 0].mean(axis=0).argmax())
    weights = fbank.mel[:, band].numpy()  # (F,)
    peak_hz = weights.argmax() * 16000 / 400
    assert abs(peak_hz - 1000) <= 80
    assert fbank.describe()["backend"] == "fbank"


def test_egemaps_rows_on_a_60ms_10ms_grid():
    pytest.importorskip("opensmile", reason="the egemaps extra (opensmile) is not installed")
    egemaps = load_backend("egemaps", layers=None, device="cpu", dtype="float32")
    assert egemaps.grid == FrameGrid(960, 160) and egemaps.hidden_size == 25
    lengths = [959, 960, 1119, 1120, 16000, 16161]
    waves = waves_of(lengths)
    for n, wave, feats in zip(lengths, waves, egemaps(waves)):
        t = egemaps.grid.n_frames(n)
        assert feats.shape == (t, 1, 25) and np.isfinite(feats).all()
        if t:
            raw = egemaps._smile.process_signal(wave, 16000)
            assert len(raw) == t + 1  # openSMILE's extra end-of-input row is the one dropped
            assert np.array_equal(feats[:, 0], raw.to_numpy(np.float32)[:t])
        assert feats.shape[0] == vad_masks(wave, egemaps.grid).shape[1]
    assert "Loudness_sma3" in egemaps.describe()["columns"]


def test_the_fbank_filters_are_htk_triangles():
    """The filterbank (now transformers' mel_filter_bank) equals the HTK-scale formula it replaced, bit for bit."""
    def to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    edges = 700.0 * (10.0 ** (np.linspace(to_mel(20.0), to_mel(7600.0), 80 + 2) / 2595.0) - 1.0)  # (82,) Hz
    bins = np.linspace(0.0, 8000.0, 201)  # (F,) Hz of each STFT bin
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (80, 1)
    rising, falling = (bins - lower) / (centre - lower), (upper - bins) / (upper - centre)  # (80, F)
    reference = np.clip(np.minimum(rising, falling), 0.0, None).T.astype(np.float32)  # (F, 80)
    mel = load_backend("fbank", layers=None, device="cpu", dtype="float32").mel.numpy()
    assert mel.shape == (201, 80) and np.array_equal(mel, reference)
