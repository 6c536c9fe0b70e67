"""Input normalization (heads/model/input_norm.py): training-split statistics only, real frames only, stored with the head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from cache.reader import FeatureCache
from cli import app
from head_fixtures import LAYERS, D, make_cache
from heads.model.head import SERHead
from heads.model.input_norm import InputNorm, floor_std, utterance_cmvn
from heads.model.layer_mix import LayerMix
from heads.train.fold_loop import train_folds
from heads.train.folds import fold_data
from heads.train.statistics import RunningMoments
from heads.train.trainer import TrainConfig

POISON = 1e4  # validation and test speakers' frames are scaled by this: any leak shows in the statistics


def config(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, lr=3e-3, heads=2, device="cpu", pooling="gap", ensemble=1)  # one head: what
    # these tests compare is the normalization (Predictor.head is member 1 of an ensemble)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> Path:
    """Fold 1 tests S1F and validates on S1M: their frames are huge, the training speakers' are not."""
    def poison(speaker: str, x: np.ndarray) -> np.ndarray:
        return x * POISON if speaker in ("S1F", "S1M") else x

    return make_cache(tmp_path_factory.mktemp("poisoned") / "p.h5", seed=3, transform=poison)


def reference_stats(cache_path: Path, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and population std (floored) over every frame of the fold's training utterances."""
    with FeatureCache(cache_path) as cache:
        train = fold_data(cache, fold).train
        frames = np.concatenate([cache.features(u).astype(np.float64) for u in train])  # (N, L, D)
    std = floor_std(torch.from_numpy(frames.std(axis=0))).numpy()
    return frames.mean(axis=0), std


# RAM batches pad with copies of real frames, disk ones with zeros; slice_values=1: one utterance per slice
@pytest.mark.parametrize("memory_gb, slice_values", [(8.0, 2**26), (0.0, 1)])
def test_statistics_come_from_the_training_speakers_real_frames_only(poisoned, tmp_path, memory_gb, slice_values,
                                                                     monkeypatch):
    monkeypatch.setattr("heads.train.layer_weights.SLICE_VALUES", slice_values)
    run, _ = train_folds(poisoned, config(memory_gb=memory_gb), folds=[1], out=tmp_path / "run", progress=False)
    stored = load_file(run / "fold-01" / "head.safetensors")
    mean, std = reference_stats(poisoned, 1)
    np.testing.assert_allclose(stored["norm.mean"].numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored["norm.std"].numpy(), std, rtol=1e-5)
    assert std.max() < 20  # the poisoned speakers (std ~ POISON) never entered
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert settings["norm"] == "train" and settings["layer_weights"] == "probe"


def test_running_moments_ignore_padding_and_survive_a_mean_far_above_the_spread():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3, 7, 2]
    utts = [400 + 0.5 * torch.randn(t, 2, 3, generator=g) for t in lengths]  # mean 400, std 0.5
    moments = RunningMoments(2, 3)
    for batch in (utts[:2], utts[2:5], utts[5:]):  # uneven batches, padded with garbage
        t = max(len(u) for u in batch)
        x = torch.full((len(batch), t, 2, 3), 1e6)
        mask = torch.zeros(len(batch), t, dtype=torch.bool)
        for i, u in enumerate(batch):
            x[i, : len(u)], mask[i, : len(u)] = u, True
        moments.add(x, mask)
    ref = torch.cat(utts).double()  # (N, L, D)
    assert moments.count == sum(lengths)
    torch.testing.assert_close(moments.mean, ref.mean(0), rtol=1e-7, atol=0.0)  # float32 batch means
    torch.testing.assert_close(moments.std(), ref.std(0, unbiased=False), rtol=1e-5, atol=1e-7)


def test_std_floor_is_relative_to_the_layer_median():
    std = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1e-9, 5e3]], dtype=torch.float64)
    floored = floor_std(std)
    # layer 0: median 2 -> floor 2e-3; layer 1: median 0 -> the absolute floor 1e-6
    torch.testing.assert_close(floored, torch.tensor([[2e-3, 1.0, 2.0, 3.0, 4.0], [1e-6, 1e-6, 1e-6, 1e-6, 5e3]],
                                                     dtype=torch.float64))


def test_utterance_cmvn_and_frame_norm_match_a_per_utterance_loop_and_ignore_padding():
    g = torch.Generator().manual_seed(1)
    lengths = [4, 7, 2]
    x = torch.randn(3, 7, 2, 5, generator=g) * 30 + 7
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    x_padded = torch.where(mask[:, :, None, None], x, torch.tensor(1e5))
    got = utterance_cmvn(x_padded, mask)
    frame = InputNorm("frame", 2, 5)(x_padded, mask)
    for i, t in enumerate(lengths):
        u = x[i, :t].double()  # (T, L, D)
        expected = (u - u.mean(0)) / floor_std(u.std(0, unbiased=False))
        torch.testing.assert_close(got[i, :t].double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(frame[i, :t], F.layer_norm(x[i, :t], (5,)), rtol=1e-5, atol=1e-5)


def test_normalization_folded_into_the_mix_equals_normalizing_then_mixing():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 3, 4, generator=g) * 50
    norm = InputNorm("train", 3, 4)
    norm.mean.copy_(torch.randn(3, 4, generator=g) * 10)
    norm.std.copy_(torch.rand(3, 4, generator=g) * 5 + 0.1)
    mix = LayerMix(3, 4)
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([0.3, -1.0, 2.0]))
    w = torch.softmax(mix.logits.detach(), 0)
    expected = torch.einsum("btld,l->btd", (x - norm.mean) / norm.std, w)
    torch.testing.assert_close(mix(x, norm.affine()), expected, rtol=1e-5, atol=1e-5)
    one = LayerMix(1, 4)
    torch.testing.assert_close(one(x[:, :, :1], (norm.affine()[0][:1], norm.affine()[1][:1])),
                               (x[:, :, 0] - norm.mean[0]) / norm.std[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["train", "utterance", "frame", "none"])
def test_the_head_gives_the_same_outputs_through_the_gap_shortcut_and_the_frame_path(norm):
    torch.manual_seed(0)
    head = SERHead(4, 3, 4, pooling="gap", norm=norm).eval()
    if norm == "train":
        head.norm.mean.normal_().mul_(5)
        head.norm.std.uniform_(0.5, 3)
    x = torch.randn(2, 5, 3, 4) * 8
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    vad = pad.clone()
    fast = head(x, pad, vad).logits
    slow = head.from_mixed(head.mixed(x, pad), pad, vad).logits
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_wildly_scaled_features_train_as_well_as_their_standardized_copy(tmp_path):
    rng = np.random.default_rng(7)
    scale = (10.0 ** rng.uniform(-3, 3, (len(LAYERS), D))).astype(np.float32)  # 6 orders of magnitude
    offset = (rng.normal(0, 5, (len(LAYERS), D)) * scale).astype(np.float32)
    plain = make_cache(tmp_path / "plain.h5", seed=0)
    wild = make_cache(tmp_path / "wild.h5", seed=0, transform=lambda s, x: x * scale + offset)
    # pooled layer weights: on this fixture layers 1 and 2 both reach UA 1.0 in the leave-one-speaker-out
    # probes, so --layer-weights probe splits the mix between them (0.46 / 0.54, plain UA 0.79) where
    # pooled's loss finds layer 2's larger margin; this test is about the input normalization
    cfg = config(epochs=15, layer_weights="pooled")
    ua = {}
    for name, cache, norm in (("plain", plain, "train"), ("wild", wild, "train"), ("wild raw", wild, "none")):
        # raw = no normalization anywhere: --pooled-norm would rescale GAP's half of the pooled vector too
        pooled_norm = "none" if norm == "none" else cfg.pooled_norm
        scores = []  # how raw features fare depends on the seed (0.25 to 0.92 on one fold): a mean of four runs
        for seed in (0, 1):
            _, ms = train_folds(cache, TrainConfig(**{**cfg.__dict__, "norm": norm, "pooled_norm": pooled_norm,
                                                      "seed": seed}), folds=[1, 2], out=tmp_path / f"{name}{seed}",
                                progress=False)
            scores += [m["ua"] for m in ms]
        ua[name] = float(np.mean(scores))
    assert ua["plain"] > 0.85
    assert abs(ua["wild"] - ua["plain"]) <= 0.05, ua
    assert ua["wild raw"] < ua["plain"] - 0.2, ua  # without it the same features fail: the test has teeth


def test_cli_refuses_an_unknown_normalization(tmp_path):
    cache = make_cache(tmp_path / "c.h5", per_class=2)
    result = CliRunner().invoke(app, ["train-head", "--cache", str(cache), "--fold", "1", "--norm", "zscore",
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--norm must be one of train, utterance, frame, none" in result.output


@pytest.fixture(scope="module")
def audio_corpus(tmp_path_factory) -> Path:
    from extract.synthetic import generate

    return generate(tmp_path_factory.mktemp("norm-corpus"), seed=4, n_sessions=2, utts_per_speaker=5,
                    speech_seconds=(0.6, 1.2), silence_seconds=(0.1, 0.4))


def extracted(corpus: Path, model: str, out: Path) -> Path:
    from extract.pipeline import run_extract

    run_extract("manifest", corpus, out=out, model=model, device="cpu", workers=0, progress=False)
    return out


def predictions_csv(fold: Path) -> dict[str, np.ndarray]:
    import csv

    with (fold / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    classes = [k.removeprefix("prob_") for k in rows[0] if k.startswith("prob_")]
    return {r["utt_id"]: np.array([float(r[f"prob_{c}"]) for c in classes] + [float(r["valence"]),
                                                                              float(r["arousal"])]) for r in rows}


def test_predict_applies_the_stored_normalization_exactly(audio_corpus, tmp_path):
    """fbank re-extracts each file exactly as the cache holds it, so predict must give predictions.csv's numbers."""
    import csv

    from heads.predict import Predictor

    cache = extracted(audio_corpus, "fbank", tmp_path / "fbank.h5")
    run, _ = train_folds(cache, config(pooling="sr", epochs=3), folds=[1], out=tmp_path / "run", progress=False)
    fold = run / "fold-01"
    expected = predictions_csv(fold)
    with (audio_corpus).open() as fh:
        audio = {r["utt_id"]: audio_corpus.parent / r["path"] for r in csv.DictReader(fh)}
    predictor = Predictor(fold)
    assert predictor.head.norm.mode == "train" and float(predictor.head.norm.std.std()) > 0.1  # fitted, not identity
    for utt_id, row in expected.items():
        p = predictor.predict_one(audio[utt_id])
        got = np.array([p.probs[c] for c in predictor.classes] + [p.valence, p.arousal])
        np.testing.assert_allclose(got, row, atol=2e-5)
    # the same head without its statistics predicts something else: the comparison above has teeth
    predictor.head.norm.mean.zero_()
    predictor.head.norm.std.fill_(1.0)
    moved = [np.abs(np.array(list(predictor.predict_one(audio[u]).probs.values())) - row[:4]).max()
             for u, row in expected.items()]
    assert max(moved) > 1e-2


def test_the_fixed_layer_mix_tests_through_the_head_that_predict_rebuilds(audio_corpus, tiny_dir, tmp_path):
    """Multi-layer cache, default (probe) weights: train/val run on frames mixed once, the test split through
    SERHead.forward."""
    from heads.predict import Predictor

    cache = extracted(audio_corpus, str(tiny_dir), tmp_path / "tiny.h5")
    run, _ = train_folds(cache, config(pooling="sr", epochs=3), folds=[1], out=tmp_path / "run", progress=False)
    fold = run / "fold-01"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert len(metrics["inputs"]["layer_probe_scores"]) == len(metrics["layer_weights"])  # found by the probes
    head = Predictor(fold).head  # built from config.json + head.safetensors, as `cli predict` does
    with FeatureCache(cache) as fc:
        for utt_id, row in predictions_csv(fold).items():
            x = torch.from_numpy(fc.features(utt_id).astype(np.float32))[None]  # (1, T, L, D)
            pad = torch.ones(1, x.shape[1], dtype=torch.bool)
            vad = torch.from_numpy(fc.vad(utt_id, 3))[None]
            with torch.no_grad():
                out = head(x, pad, vad)
            got = np.concatenate([torch.softmax(out.logits, 1)[0].numpy(), head.to_corpus_scale(out.va)[0].numpy()])
            np.testing.assert_allclose(got, row, atol=2e-5)
    # the weights predict uses are the ones metrics.json reports
    weights = torch.softmax(head.mix.logits, 0).tolist()
    assert weights == pytest.approx(list(metrics["layer_weights"].values()), abs=1e-6)
