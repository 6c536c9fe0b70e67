"""Pooled layer weights (heads/layer_weights.py): learned on utterance means, fixed, frames mixed once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache.reader import FeatureCache
from head_fixtures import make_cache
from heads.data import ResidentBatches, fold_data, preload
from heads.run import train_folds
from heads.trainer import TrainConfig, Trainer


def config(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=16, lr=3e-3, heads=2, device="cpu", pooling="sr")
    return TrainConfig(**{**base, **kw})


def loud_noise(speaker: str, x: np.ndarray) -> np.ndarray:
    """Layer 0 (no class information) 300x louder than layer 2 (the informative one)."""
    x = x.copy()
    x[:, 0] *= 300.0
    return x


@pytest.fixture(scope="module")
def loud(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("loud") / "loud.h5", seed=5, transform=loud_noise)


def trainer(cache_path: Path, fc: FeatureCache, **kw) -> Trainer:
    return Trainer(config(**kw), fold_data(fc, 1), cache=fc, layers=list(fc.layers))


def test_stage_one_puts_the_weight_on_the_informative_layer_and_training_keeps_it(loud):
    with FeatureCache(loud) as fc:
        preload(fc, fc.layers, 1.0)
        t = trainer(loud, fc)
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


def test_pooled_and_joint_mixes_both_learn_and_the_run_records_its_method(loud, tmp_path):
    ua = {}
    for method in ("pooled", "joint"):
        _, (m,) = train_folds(loud, config(epochs=12, layer_weights=method), folds=[1], out=tmp_path / method,
                              progress=False)
        ua[method] = m["ua"]
        assert ("inputs" in m) == (method == "pooled")
    assert min(ua.values()) > 0.8, ua


def test_one_layer_runs_skip_the_layer_weights(loud, tmp_path):
    _, (m,) = train_folds(loud, config(layer=2), folds=[1], out=tmp_path / "one", progress=False)
    assert "inputs" not in m and "layer_weights" not in m
