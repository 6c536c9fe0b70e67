"""Layer weights found first and fixed (heads/train/layer_weights.py, heads/train/layer_probe.py), frames mixed once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import heads.train.layer_weights
from cache.reader import FeatureCache
from cli_runner import cli
from head_fixtures import make_cache
from heads.config import TrainConfig
from heads.train.batches import ResidentBatches, preload
from heads.train.feature_trainer import FeatureTrainer
from heads.train.fold_loop import train_folds
from heads.train.folds import fold_data
from heads.train.layer_probe import probe_layer_logits, probe_scores, speaker_groups


def config(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=16, lr=3e-3, heads=2, device="cpu", pooling="sr", ensemble=1)  # the mix, not seeds
    return TrainConfig(**{**base, **kw})


def loud_noise(speaker: str, x: np.ndarray) -> np.ndarray:
    """Layer 0 (no class information) 300x louder than layer 2 (the informative one)."""
    x = x.copy()
    x[:, 0] *= 300.0
    return x


@pytest.fixture(scope="module")
def loud(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("loud") / "loud.h5", seed=5, transform=loud_noise)


def trainer(cache_path: Path, fc: FeatureCache, **kw) -> FeatureTrainer:
    return FeatureTrainer(config(**kw), fold_data(fc, 1), cache=fc, layers=list(fc.layers))


def test_stage_one_puts_the_weight_on_the_informative_layer_and_training_keeps_it(loud):
    with FeatureCache(loud) as fc:
        preload(fc, fc.layers, 1.0)
        t = trainer(loud, fc, layer_weights="pooled")  # stage 1 of pooled; probe: its own tests below
        mix = t.model.mix
        before = mix.logits.detach().clone()
        assert not mix.logits.requires_grad
        assert all(mix.logits is not p for g in t.optimizer.param_groups for p in g["params"])
        w = mix.weights()
        assert w[2] > 0.6 and w[0] < 0.2, w  # uniform would be 1/3 each
        t.fit()
        assert torch.equal(t.model.mix.logits.detach(), before)


def test_materialized_frames_are_the_heads_own_normalized_mix(loud):
    with FeatureCache(loud) as fc:
        preload(fc, fc.layers, 1.0)
        t = trainer(loud, fc)
        head = t.model
        for split in ("train", "val"):
            loader = t.loaders[split]
            assert isinstance(loader, ResidentBatches) and loader.extra == {"mixed": True}
            assert loader.features.shape[1:] == (fc.hidden_size,)  # one layer's worth
            batch = next(iter(loader))
            for i, u in enumerate(batch["utt_id"]):
                n = int(batch["padding_mask"][i].sum())
                full = torch.from_numpy(fc.features(u).astype(np.float32))[None]  # (1, T, L, D)
                with torch.no_grad():
                    expected = head.mixed(full, torch.ones(1, n, dtype=torch.bool))[0]  # (T, D)
                got = batch["features"][i, :n].float()
                torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)  # float16 storage
                np.testing.assert_array_equal(batch["vad_mask"][i, :n].numpy(), fc.vad(u, 3))
        assert not isinstance(t.loaders["test"], ResidentBatches) or "mixed" not in t.loaders["test"].extra


def test_after_preparation_an_epoch_reads_nothing_from_the_cache(loud, monkeypatch):
    """The all-layer head's epoch costs one layer's worth: the cache is not touched again until the test split."""
    with FeatureCache(loud) as fc:  # not preloaded: every read would go to disk
        t = trainer(loud, fc)
        reads = []
        original = FeatureCache.features
        monkeypatch.setattr(FeatureCache, "features", lambda self, *a, **k: reads.append(a) or original(self, *a, **k))
        t.train_epoch(1)
        t.predict("val")
        assert reads == []
        t.predict("test")  # the test speaker goes through every layer, as `cli predict` does
        assert len(reads) == len(t.data.test)


def test_probe_pooled_and_joint_mixes_all_learn_and_the_run_records_its_method(loud, tmp_path):
    ua = {}
    for method in ("probe", "pooled", "joint"):
        _, (m,) = train_folds(loud, config(epochs=12, layer_weights=method), folds=[1], out=tmp_path / method,
                              progress=False)
        ua[method] = m["ua"]
        assert ("inputs" in m) == (method != "joint")
    assert min(ua.values()) > 0.8, ua


def test_one_layer_runs_skip_the_layer_weights(loud, tmp_path):
    _, (m,) = train_folds(loud, config(layer=2), folds=[1], out=tmp_path / "one", progress=False)
    assert "inputs" not in m and "layer_weights" not in m


# ---- --layer-weights probe (heads/train/layer_probe.py) ----

def noise_but_layer_2(speaker: str, x: np.ndarray) -> np.ndarray:
    """Layers 0 and 1 class-free noise (layer 0 300x louder, layer 1 its frames reversed); layer 2 informative."""
    x = loud_noise(speaker, x)
    x[:, 1] = x[::-1, 0] / 300.0
    return x


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("one") / "one.h5", seed=5, transform=noise_but_layer_2)


def test_probe_puts_the_weight_on_the_informative_layer_and_records_its_scores(one_layer):
    with FeatureCache(one_layer) as fc:
        preload(fc, fc.layers, 1.0)
        t = trainer(one_layer, fc, layer_weights="probe")
        w = t.model.mix.weights()
        assert w[2] > 0.9 and not t.model.mix.logits.requires_grad, w
        info = t.input_info["inputs"]
        scores = info["layer_probe_scores"]
        assert scores[2] > 0.9 and max(scores[:2]) < 0.5, scores  # chance is 0.25
        assert info["layer_probe_groups"] == 5  # fold 1: the 6 speakers less the test speaker
        assert "layer_weight_epochs" not in info  # no stage-1 head was trained


def test_probe_never_sees_the_test_speaker(one_layer, monkeypatch):
    """Neither the scan nor the probe touches the test speaker's utterances before training."""
    probed, read = [], []
    original = heads.train.layer_weights.probe_layer_logits
    monkeypatch.setattr(heads.train.layer_weights, "probe_layer_logits",
                        lambda pooled, labels: probed.append((pooled.shape[0], labels)) or original(pooled, labels))
    features = FeatureCache.features
    monkeypatch.setattr(FeatureCache, "features", lambda self, u, *a, **k: read.append(u) or features(self, u, *a, **k))
    with FeatureCache(one_layer) as fc:  # not preloaded: every utterance scanned is read here
        t = trainer(one_layer, fc, layer_weights="probe")
        fold = t.data.fold
        ((n, labels),) = probed
        assert n == len(labels) == len(t.data.train) + len(t.data.val)
        assert set(labels["speaker"]) == set(fold.train) | {fold.val} and fold.test not in set(labels["speaker"])
        assert read and not set(read) & set(t.data.test)


def test_probe_weights_are_deterministic(one_layer):
    with FeatureCache(one_layer) as fc:
        preload(fc, fc.layers, 1.0)
        a, b = (trainer(one_layer, fc, layer_weights="probe").model.mix.logits.detach().clone() for _ in range(2))
    assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_probe_scores_equal_refitted_scikit_learn_ridge_classifiers():
    """The closed form = StandardScaler + RidgeClassifier refitted per inner fold, scored by UA."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    n, layers, f, ridge = 90, 2, 12, 0.5
    y = rng.integers(0, 3, n)
    groups = np.repeat(np.arange(4), [20, 25, 20, 25])
    y[(groups == 0) & (y == 1)] = 0  # class 1 absent from group 0
    x = rng.normal(0, 1, (n, layers, f)) * rng.uniform(0.1, 10, f) + rng.normal(0, 5, f)  # (N, L, F)
    x[:, 1] += 0.8 * y[:, None] * rng.normal(0, 1, f)
    x[:, 0, 3] = 2.0  # a constant feature
    balanced = n / (3 * np.bincount(y))  # over all rows, fixed across the inner folds
    expected = []
    for layer in range(layers):
        ua = []
        for g in range(4):
            train, held = groups != g, groups == g
            scaler = StandardScaler().fit(x[train, layer])
            model = RidgeClassifier(alpha=ridge * train.sum())
            model.fit(scaler.transform(x[train, layer]), y[train], sample_weight=balanced[y[train]])
            ua.append(balanced_accuracy_score(y[held], model.predict(scaler.transform(x[held, layer]))))
        expected.append(np.mean(ua))
    args = torch.tensor(x, dtype=torch.float32), torch.tensor(y), torch.tensor(groups)
    np.testing.assert_allclose(probe_scores(*args, ridge=ridge, dtype=torch.float64).numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(probe_scores(*args, ridge=ridge).numpy(), expected, atol=1e-6)  # float32, the default


def test_probe_groups_many_speakers_and_needs_two_labelled_ones():
    speakers = np.array([f"spk{i % 25:02d}" for i in range(200)])
    groups = speaker_groups(speakers, 10)
    assert groups.max() == 9 and all(len(set(groups[speakers == s])) == 1 for s in set(speakers))
    assert np.array_equal(groups, speaker_groups(speakers, 10))
    labels = pd.DataFrame({"emotion": [0, 1, 2, -1], "speaker": ["a", "a", "a", "b"]}, index=list("wxyz"))
    logits, info = probe_layer_logits(torch.zeros(4, 2, 6), labels)  # b has no emotion label: one speaker left
    assert logits is None and "1 emotion-labelled speaker" in info["layer_probe"]


def test_the_cli_trains_with_probe_weights(one_layer, tmp_path):
    code, out = cli("train-head", "--cache", one_layer, "--fold", 2, "--epochs", 1, "--min-steps", 0,
                    "--layer-weights", "probe", "--out", tmp_path / "run", "--quiet")
    assert code == 0, out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["layer_weights"] == "probe"
    m = json.loads((tmp_path / "run" / "fold-02" / "metrics.json").read_text())
    assert len(m["inputs"]["layer_probe_scores"]) == 3 and m["layer_weights"]["2"] > 0.9
