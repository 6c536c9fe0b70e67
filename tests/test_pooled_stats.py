"""--spread (the frames' std beside the pooling), --speech-stats (mean and std of the speech frames) and --pooled-norm (heads/model/pooled_norm.py): exact, training-only, stored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cache.reader import FeatureCache
from head_fixtures import LAYERS, D, make_cache
from heads.model.head import SERHead
from heads.model.input_norm import floor_std
from heads.model.pooling import SPREAD_EPS, masked_std
from heads.train.fold_loop import train_folds
from heads.train.folds import fold_data
from heads.train.trainer import TrainConfig

POISON = 1e4  # the validation and test speakers' frames are scaled by this: a leak shows in the statistics


def config(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, lr=3e-3, heads=2, device="cpu", pooling="sr", layer=0)
    return TrainConfig(**{**base, **kw})


def test_masked_std_is_the_population_std_of_the_real_frames_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 8, 3]
    utts = [3 + 2 * torch.randn(t, 6, generator=g) for t in lengths]
    x = torch.full((4, 8, 6), 1e6)  # padding values that would dominate if they leaked in
    pad = torch.zeros(4, 8, dtype=torch.bool)
    for i, u in enumerate(utts):
        x[i, : len(u)], pad[i, : len(u)] = u, True
    got = masked_std(x, pad)
    for i, u in enumerate(utts):
        want = np.sqrt(u.double().numpy().var(axis=0) + SPREAD_EPS)
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-5)
        torch.testing.assert_close(masked_std(u[None], torch.ones(1, len(u), dtype=torch.bool))[0], got[i])


def test_the_std_of_a_constant_dimension_has_a_finite_gradient():
    x = torch.ones(1, 4, 3, requires_grad=True)
    masked_std(x, torch.ones(1, 4, dtype=torch.bool)).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("speech_stats", [False, True])
@pytest.mark.parametrize("pooling", ["gap", "sap", "sr"])
def test_the_pooled_vector_is_the_pooling_then_the_stds_and_only_statistics_are_standardized(pooling, speech_stats):
    torch.manual_seed(0)
    head = SERHead(D, 1, 4, pooling=pooling, heads=2, spread=True, speech_stats=speech_stats,
                   pooled_norm="train").eval()
    x = torch.randn(3, 7, D) * 4 + 2
    pad = torch.ones(3, 7, dtype=torch.bool)
    pad[0, 5:] = False
    vad = pad.clone()
    vad[0, :2] = vad[1, 3:] = False  # pauses; utterance 2 has no speech at all: its speech stats use every frame
    vad[2] = False
    with torch.no_grad():
        pooled = head.pooled(x, pad, vad)
    out = head.pool.output_size
    assert pooled.shape == (3, out + (3 if speech_stats else 1) * D)
    torch.testing.assert_close(pooled[:, :out], head.pool(x, pad, vad))
    torch.testing.assert_close(pooled[:, out : out + D], masked_std(x, pad))
    if speech_stats:
        for i, frames in enumerate([x[0, 2:5], x[1, :3], x[2]]):  # each utterance's speech frames, by hand
            f = frames.double().numpy()
            np.testing.assert_allclose(pooled[i, out + D : out + 2 * D].numpy(), f.mean(axis=0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(pooled[i, out + 2 * D :].numpy(), np.sqrt(f.var(axis=0) + SPREAD_EPS), rtol=1e-5)
    head.pooled_norm.set_stats(pooled)
    fitted = head.pooled_norm.statistics
    sap_dims = {"gap": 0, "sap": D, "sr": D}[pooling]  # SAP's learned output is left as it is
    assert int((~fitted).sum()) == sap_dims
    assert torch.all(head.pooled_norm.mean[~fitted] == 0) and torch.all(head.pooled_norm.std[~fitted] == 1)
    z = head.pooled_norm(pooled)[:, fitted].double()  # (B, S)
    np.testing.assert_allclose(z.mean(dim=0).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(dim=0, unbiased=False).numpy(), 1, rtol=1e-4)


def test_without_spread_and_pooled_norm_the_head_is_the_papers_eq_6():
    head = SERHead(D, 1, 4, pooling="sr", heads=2)  # the constructor's defaults: what old runs and fine-tuning use
    assert head.proj[0].in_features == 2 * D and head.pooled_norm.mode == "none"
    assert not head.spread and not head.speech_stats


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> Path:
    """Fold 1 tests S1F and validates on S1M: their frames are huge, the training speakers' are not."""
    def poison(speaker: str, x: np.ndarray) -> np.ndarray:
        return x * POISON if speaker in ("S1F", "S1M") else x

    return make_cache(tmp_path_factory.mktemp("poisoned") / "p.h5", seed=3, transform=poison)


def speech_stats(z: np.ndarray, cache: FeatureCache, utt_id: str) -> list[np.ndarray]:
    """Mean and std (T, D) -> 2 x (D,) over the frames the VAD (mode 3, the default) calls speech; all if none."""
    speech = cache.vad(utt_id, 3).astype(bool)
    s = z[speech] if speech.any() else z
    return [s.mean(axis=0), np.sqrt(s.var(axis=0) + SPREAD_EPS)]


def reference(cache_path: Path, fold: int, stored: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and floored population std over the fold's TRAINING utterances of [mean | std | speech mean |
    speech std] of their normalized frames (layer 0), from the stored input normalization."""
    mean_n, std_n = stored["norm.mean"].double().numpy()[0], stored["norm.std"].double().numpy()[0]
    with FeatureCache(cache_path) as cache:
        train = fold_data(cache, fold).train
        rows = []
        for u in train:
            z = (cache.features(u)[:, 0].astype(np.float64) - mean_n) / std_n  # (T, D)
            rows.append(np.concatenate([z.mean(axis=0), np.sqrt(z.var(axis=0) + SPREAD_EPS), *speech_stats(z, cache, u)]))
    rows = np.stack(rows)  # (N, 4D)
    return rows.mean(axis=0), floor_std(torch.from_numpy(rows.std(axis=0))).numpy()


@pytest.mark.parametrize("memory_gb", [8.0, 0.0])  # frames from RAM, and from disk
def test_pooled_statistics_come_from_the_training_utterances_only(poisoned, tmp_path, memory_gb):
    run, _ = train_folds(poisoned, config(memory_gb=memory_gb), folds=[1], out=tmp_path / "run", progress=False)
    stored = load_file(run / "fold-01" / "head.safetensors")
    mean, std = reference(poisoned, 1, stored)
    # SR = [GAP (D) | SAP (D) | std (D) | speech mean (D) | speech std (D)]: all but SAP are fitted, SAP stays the identity
    got_mean, got_std = stored["pooled_norm.mean"].numpy(), stored["pooled_norm.std"].numpy()
    np.testing.assert_allclose(got_mean[:D], mean[:D], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_mean[2 * D :], mean[D:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_std[:D], std[:D], rtol=1e-4)
    np.testing.assert_allclose(got_std[2 * D :], std[D:], rtol=1e-4)
    assert np.all(got_mean[D : 2 * D] == 0) and np.all(got_std[D : 2 * D] == 1)
    assert got_std.max() < 100  # the poisoned speakers (x 1e4) never entered
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert settings["spread"] is True and settings["speech_stats"] is True and settings["pooled_norm"] == "train"


def test_the_pooled_layer_mix_fits_the_pooled_norm_on_the_mixed_frames(tmp_path):
    """Several layers, --layer-weights pooled: the statistics are those of the frames the head trains on."""
    cache = make_cache(tmp_path / "c.h5", seed=1)
    run, _ = train_folds(cache, config(layer=None, pooling="gap"), folds=[1], out=tmp_path / "run", progress=False)
    stored = load_file(run / "fold-01" / "head.safetensors")
    w = torch.softmax(stored["mix.logits"].double(), dim=0).numpy()  # (L,)
    scale, shift = 1 / stored["norm.std"].double().numpy(), -stored["norm.mean"].double().numpy() / stored["norm.std"].double().numpy()
    with FeatureCache(cache) as c:
        rows = []
        for u in fold_data(c, 1).train:
            y = np.einsum("tld,l->td", c.features(u).astype(np.float64) * scale + shift, w)  # (T, D) mixed
            rows.append(np.concatenate([y.mean(axis=0), np.sqrt(y.var(axis=0) + SPREAD_EPS), *speech_stats(y, c, u)]))
    rows = np.stack(rows)
    # the mixed frames are stored in float16 before pooling: a relative tolerance of that size
    np.testing.assert_allclose(stored["pooled_norm.mean"].numpy(), rows.mean(axis=0), rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(stored["pooled_norm.std"].numpy(), rows.std(axis=0), rtol=2e-2, atol=2e-3)
    assert len(LAYERS) > 1
