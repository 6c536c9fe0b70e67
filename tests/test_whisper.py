"""The Whisper backend on a tiny untrained Whisper: grid, frames = masks, hidden states, padding, long audio."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache.reader import FeatureCache
from cli import app
from core.frames import FrameGrid
from extract import synthetic
from extract.audio import load_audio
from extract.backends import HFBackend, load_backend
from extract.models import BackendError
from extract.vad import vad_masks
from extract.whisper import WhisperBackend, log_mel, tiny_whisper, whisper_grid

SR = 16000
SWEEP = [1, 159, 160, 161, 319, 320, 321, 400, 640, 641, 16000, 16001, 16319, 16320, 16321, 479999, 480000]


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return tiny_whisper(tmp_path_factory.mktemp("tiny-whisper") / "whisper", seed=0)


@pytest.fixture(scope="module")
def backend(whisper_dir):
    return load_backend(str(whisper_dir), device="cpu", dtype="float32")


def noise(n, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def test_load_backend_detects_whisper_from_its_config(backend, whisper_dir, tiny_dir):
    assert isinstance(backend, WhisperBackend)
    assert isinstance(load_backend(str(tiny_dir), device="cpu"), HFBackend)
    assert backend.grid == whisper_grid() == FrameGrid(window=1039, stride=320, offset=-519, count="center")
    assert (backend.n_layers, backend.hidden_size, backend.layers) == (3, 32, (0, 1, 2))
    assert load_backend(str(whisper_dir), layers=[2], device="cpu").layers == (2,)
    with pytest.raises(BackendError, match="hidden states 0 to 2"):
        load_backend(str(whisper_dir), layers=[3], device="cpu")


@pytest.mark.parametrize("n", SWEEP)
def test_frame_count_is_the_models_own(backend, n):
    """ceil(N / 320): the feature extractor's attention mask (every 160th sample) through the conv lengths."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    mel_frames = int(fe(noise(n), sampling_rate=SR, return_attention_mask=True)["attention_mask"].sum())
    model = int(backend.encoder._get_feat_extract_output_lengths(torch.tensor(mel_frames)))
    assert backend.grid.n_frames(n) == model == math.ceil(n / 320) == backend.n_frames([n])[0]
    centers = backend.grid.centers(n)
    assert np.array_equal(centers, 320 * np.arange(len(centers)))  # frame t is centred on sample 320 t
    assert centers[-1] < n <= centers[-1] + 320


def test_frame_t_reads_exactly_the_grid_window(backend):
    """The convolutional receptive field of frame t, found by autograd: samples [320t - 519, 320t + 519]."""
    enc = backend.encoder
    wave = torch.from_numpy(noise(480000, seed=3))[None].requires_grad_(True)  # (1, S)
    mel = log_mel(wave, backend.mel_filters, 400, 160)  # (1, 80, 3000)
    front = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(mel))))  # (1, D, 1500)
    grid = backend.grid
    for t in (3, 700, 1496):
        (g,) = torch.autograd.grad(front[0, :, t].sum(), wave, retain_graph=True)
        reads = torch.nonzero(g[0]).flatten()
        first = grid.offset + grid.stride * t
        assert (int(reads.min()), int(reads.max()), len(reads)) == (first, first + grid.window - 1, grid.window)
        assert grid.centers(480000)[t] == (first + first + grid.window - 1) // 2


@pytest.mark.parametrize("n", [1, 319, 321, 16000, 16321, 2 * 480000 + 5000])
def test_features_and_vad_masks_have_the_same_frames(backend, n):
    wave = noise(n, seed=n % 7)
    (feats,) = backend([wave])
    assert feats.shape == (math.ceil(n / 320), 3, 32) == (vad_masks(wave, backend.grid).shape[1], 3, 32)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()


def test_hidden_states_embedding_then_layers_then_the_final_layer_norm(backend):
    enc = backend.encoder
    mel = log_mel(torch.from_numpy(noise(480000, seed=1))[None], backend.mel_filters, 400, 160)
    with torch.no_grad():
        states = backend.forward(mel)[0]  # (1500, 3, 32)
        x = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(mel)))).permute(0, 2, 1)
        x = x + enc.embed_positions.weight  # hidden state 0
        assert torch.allclose(states[:, 0], x[0], atol=1e-6)
        x = enc.layers[0](x, None)
        assert torch.allclose(states[:, 1], x[0], atol=1e-5)
        x = enc.layers[1](x, None)  # the last layer's raw output is NOT stored ...
        assert not torch.allclose(states[:, 2], x[0], atol=1e-2)
        assert torch.allclose(states[:, 2], enc.layer_norm(x)[0], atol=1e-5)  # ... its layer-normed one is


def test_log_mel_is_the_feature_extractors(backend):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    waves = [noise(24000, seed=4), noise(480000, seed=5), np.zeros(5, np.float32)]
    for w in waves:
        ref = fe(w, sampling_rate=SR, return_tensors="np")["input_features"][0]  # (80, 3000)
        padded = torch.zeros(1, 480000)
        padded[0, : len(w)] = torch.from_numpy(w)
        ours = log_mel(padded, backend.mel_filters, 400, 160)[0].numpy()
        assert ours.shape == ref.shape == (80, 3000)
        assert np.abs(ours - ref).max() < 1e-5


def test_a_padded_batch_gives_each_utterance_what_it_gets_alone(whisper_dir):
    """Every window is zero-padded to 30 s anyway; four windows per forward must change nothing."""
    batched = WhisperBackend(str(whisper_dir), device="cpu", dtype="float32", windows_per_forward=4)
    alone = WhisperBackend(str(whisper_dir), device="cpu", dtype="float32", windows_per_forward=1)
    waves = [noise(n, seed=i) for i, n in enumerate((16000, 117000, 3200, 500000))]
    together = batched(waves)
    for w, f in zip(waves, together):
        (single,) = alone([w])
        assert f.shape == single.shape == (math.ceil(len(w) / 320), 3, 32)
        assert np.abs(f - single).max() <= 1e-5 * (1 + np.abs(single).max())


def test_audio_over_30_s_is_encoded_in_consecutive_30_s_windows(backend):
    wave = noise(480000 + 160000 + 77, seed=6)  # 40 s
    (whole,) = backend([wave])
    (first,) = backend([wave[:480000]])
    (rest,) = backend([wave[480000:]])
    assert whole.shape[0] == 1500 + math.ceil((160000 + 77) / 320) == backend.grid.n_frames(len(wave))
    assert np.array_equal(whole, np.concatenate([first, rest]))


def test_the_fingerprint_names_the_encoder_weights_and_the_grid(backend, whisper_dir, tmp_path):
    fp = backend.describe()
    assert fp["backend"] == "whisper" and fp["model_type"] == "whisper" and len(fp["weights_sha256"]) == 64
    assert (fp["frame_window"], fp["frame_stride"], fp["frame_offset"], fp["frame_count"]) == (1039, 320, -519,
                                                                                              "center")
    assert fp["last_layer"].startswith("last_hidden_state") and fp["window_seconds"] == 30.0
    other = load_backend(str(tiny_whisper(tmp_path / "other", seed=1)), device="cpu")
    assert other.describe()["weights_sha256"] != fp["weights_sha256"]
    broken = tmp_path / "no-weights"
    shutil.copytree(whisper_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(BackendError, match="cannot load model"):
        load_backend(str(broken), device="cpu")
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(BackendError, match="feature-extractor config"):
        load_backend(str(broken), device="cpu")


def test_extract_then_train_head_end_to_end(whisper_dir, backend, tmp_path):
    """`cli extract --model <whisper folder>` then `cli train-head`: frames = masks exactly, padding not stored."""
    manifest = synthetic.generate(tmp_path / "corpus", seed=0, n_sessions=2, utts_per_speaker=8)
    cache = tmp_path / "w.h5"
    runner = CliRunner()
    result = runner.invoke(app, ["extract", "--dataset", "manifest", "--root", str(manifest), "--model",
                                 str(whisper_dir), "--out", str(cache), "--workers", "0", "--device", "cpu",
                                 "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    with FeatureCache(cache) as c:
        assert len(c.meta) == 32 and c.layers == (0, 1, 2) and c.hidden_size == 32
        assert c.fingerprint["backend"] == "whisper" and c.fingerprint["frame_count"] == "center"
        for utt_id in c.meta.index[::5]:
            samples = load_audio(c.meta.at[utt_id, "path"]).samples
            feats = c.features(utt_id)
            assert feats.shape == (math.ceil(len(samples) / 320), 3, 32) == (c.meta.at[utt_id, "n_frames"], 3, 32)
            masks = np.stack([c.vad(utt_id, m) for m in range(4)])
            assert np.array_equal(masks, vad_masks(samples, backend.grid))
            (expected,) = backend([samples])
            assert np.abs(feats.astype(np.float32) - expected).max() <= 2e-3 * (1 + np.abs(expected).max())
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-head", "--cache", str(cache), "--fold", "1", "--out", str(run),
                                 "--epochs", "2", "--batch-size", "8", "--min-steps", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "fold-01" / "metrics.json").read_text())
    assert metrics["n_test"] == 8 and metrics["epochs_run"] == 2
    # predict re-extracts with the Whisper backend the fingerprint names: the fold's own numbers come back
    import csv

    from heads.predict import Predictor

    with (run / "fold-01" / "predictions.csv").open() as fh:
        row = next(csv.DictReader(fh))
    with FeatureCache(cache) as c:
        wav = c.meta.at[row["utt_id"], "path"]
    got = Predictor(run / "fold-01").predict_one(wav)
    # the fold tested float16 cached frames, predict extracts afresh; --pooled-norm divides the pooled
    # statistics by their spread over 24 training utterances of a random tiny encoder (small), which
    # magnifies that rounding to ~3e-4 here; a wrong or missing transform moves probabilities by >> 1e-3
    assert got.ok and abs(got.probs["sad"] - float(row["prob_sad"])) < 1e-3


# --- fine-tuning a Whisper encoder ---------------------------------------------------------------


def test_finetune_backbone_gives_the_extractors_last_hidden_state_per_utterance(whisper_dir, backend):
    from heads.finetune.backbone import BackboneSettings, WhisperBackbone, load_backbone

    bb = load_backbone(BackboneSettings(model=str(whisper_dir), full=True, grad_checkpointing=False)).eval()
    assert isinstance(bb, WhisperBackbone) and bb.grid == backend.grid and bb.n_layers == 2
    waves = [noise(n, seed=i) for i, n in enumerate((16000, 7001, 480000 + 9000))]
    n = max(len(w) for w in waves)
    x = torch.zeros(3, n)
    mask = torch.zeros(3, n, dtype=torch.bool)
    for i, w in enumerate(waves):
        x[i, : len(w)] = torch.from_numpy(w)
        mask[i, : len(w)] = True
    with torch.no_grad():
        hidden, frame_mask = bb(x, mask)  # (3, T_max, 32), (3, T_max)
    assert hidden.shape == (3, math.ceil(n / 320), 32)
    for i, w in enumerate(waves):
        (alone,) = backend([w])  # (T_i, 3, 32); the last hidden state is index 2
        t = alone.shape[0]
        assert int(frame_mask[i].sum()) == t and bool(frame_mask[i, :t].all())
        assert torch.allclose(hidden[i, :t], torch.from_numpy(alone[:, 2]), atol=1e-5)
    assert list(bb.cost_samples(np.array([1, 480000, 480001]))) == [480000, 480000, 960000]


def test_top_k_trains_the_top_layers_and_the_final_norm_never_the_front_end(whisper_dir):
    from heads.finetune.backbone import BackboneSettings, load_backbone

    def trainable(**kw):
        bb = load_backbone(BackboneSettings(model=str(whisper_dir), grad_checkpointing=False, **kw))
        return {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("layers.") else "")
                for n, p in bb.model.named_parameters() if p.requires_grad}

    assert trainable(top_layers=1) == {"layers.1", "layer_norm"}
    assert trainable(full=True) == {"layers.0", "layers.1", "layer_norm"}  # conv front end frozen by default
    assert trainable(full=True, freeze_feature_encoder=False) == {"conv1", "conv2", "layers.0", "layers.1",
                                                                  "layer_norm"}  # positions: never


def test_finetune_a_whisper_fold_then_predict_gives_its_predictions(whisper_dir, tmp_path):
    import csv

    from heads.config import FinetuneSettings, finetune_config
    from heads.finetune.run import run_finetune
    from heads.predict import Predictor

    manifest = synthetic.generate(tmp_path / "corpus", seed=0, n_sessions=2, utts_per_speaker=4,
                                  speech_seconds=(0.5, 0.9), silence_seconds=(0.1, 0.3))
    config = finetune_config(epochs=1, batch_size=4, lr=1e-3, seed=0, device="cpu")
    settings = FinetuneSettings(model=str(whisper_dir), full=False, top_layers=1, head_lr=1e-2, step_seconds=60.0,
                                workers=0, grad_checkpointing=False)
    out = tmp_path / "run"
    result = run_finetune("manifest", manifest, config, settings, folds=[1], out=out, progress=False,
                          log=lambda line: None)
    assert result.metrics[1]["n_test"] == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layers"] == [2] and cfg["fingerprint"]["frame_count"] == "center"
    with (out / "fold-01" / "predictions.csv").open() as fh:
        rows = {r["utt_id"]: r for r in csv.DictReader(fh)}
    predictor = Predictor(out / "fold-01")
    with open(manifest) as fh:
        paths = {r["utt_id"]: r["path"] for r in csv.DictReader(fh)}
    for utt_id, row in list(rows.items())[:2]:
        p = predictor.predict_one(Path(manifest).parent / paths[utt_id])
        assert p.ok and p.emotion == row["pred"]
        assert abs(p.probs["angry"] - float(row["prob_angry"])) < 1e-4


def test_a_cache_on_another_grid_cannot_lend_its_vad_masks_to_whisper_finetuning():
    from types import SimpleNamespace

    from heads.finetune.waves import WaveDataError, index_from_cache

    wavlm_cache = SimpleNamespace(fingerprint={"frame_window": 400, "frame_stride": 320, "max_seconds": 0.0})
    with pytest.raises(WaveDataError, match="frame grid"):
        index_from_cache(wavlm_cache, [], whisper_grid(), 0.0)
    same = SimpleNamespace(fingerprint={**whisper_grid().as_dict(), "max_seconds": 0.0}, meta=None, path="c.h5")
    assert index_from_cache(same, [], whisper_grid(), 0.0).utt_ids == []
