"""`cli layers`: UA per layer from a linear probe on every fold (and a head per layer), as a table, JSON and PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from head_fixtures import make_cache
from typer.testing import CliRunner

from cache.reader import FeatureCache
from cli import app
from core.errors import UserError
from heads.config import TrainConfig
from heads.train.folds import fold_data
from heads.train.layer_scan import (
    PROBE_ALPHA_FACTORS,
    fit_ridge_probes,
    fold_rows,
    layer_means,
    probe_layer,
    scan_layers,
)

runner = CliRunner()


def noisy(seed: int = 1):
    """Utterance-level noise on every layer: layer 2's strong class signal survives it, layer 1's weak one
    only partly, so the probe ranks 2 > 1 > 0 instead of tying near 100 %."""
    rng = np.random.default_rng(seed)

    def transform(speaker: str, x: np.ndarray) -> np.ndarray:
        return x + rng.normal(0, 1.5, (1, x.shape[1], x.shape[2])).astype(np.float32)

    return transform


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("layers") / "c.h5", transform=noisy())


def test_the_figure_ranks_the_layer_that_carries_the_label_first(cache, tmp_path):
    result = runner.invoke(app, ["layers", "--cache", str(cache), "--out", str(tmp_path / "out"), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"cache", "model", "classes", "protocol", "vad_mode", "probe", "heads", "folds", "layers", "best",
            "per_fold"} <= set(summary)
    assert summary["folds"] == 6 and summary["heads"] is None and summary["best"] == {"probe": 2}
    ua = [row["probe_ua"]["mean"] for row in summary["layers"]]
    assert [row["layer"] for row in summary["layers"]] == [0, 1, 2]
    assert ua[2] > ua[1] > ua[0] and ua[2] > 0.9 and ua[0] < 0.4, ua
    assert set(summary["layers"][0]) == {"layer", "probe_ua", "probe_wa"}
    assert len(summary["layers"][0]["probe_ua"]["ci95"]) == 2
    fold = summary["per_fold"][0]
    assert {"fold", "test_speaker", "val_speaker", "n_train", "n_val", "n_test", "probe"} <= set(fold)
    assert set(fold["probe"]["2"]) == {"ua", "wa", "alpha_factor", "val_ua"}
    assert fold["probe"]["2"]["alpha_factor"] in PROBE_ALPHA_FACTORS
    assert json.loads((tmp_path / "out" / "layers.json").read_text())["layers"] == summary["layers"]
    png = (tmp_path / "out" / "layers.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    table = runner.invoke(app, ["layers", "--cache", str(cache), "--out", str(tmp_path / "out"), "--quiet"])
    assert table.exit_code == 0 and "Probe UA % (95% CI)" in table.stdout and "layers.png" in table.stdout


def test_test_speakers_enter_no_fit(tmp_path):
    """Fold 1 tests S1F: making S1F's frames extreme must leave fold 1's fitted probes and validation choice
    exactly as they were (only its test scores may move), while the folds that train on S1F change."""
    base = noisy()  # the same draws as the plain cache's, in the same order

    def extreme(speaker, x):
        x = base(speaker, x)
        return x * 40 + 300 if speaker == "S1F" else x

    plain, wild = make_cache(tmp_path / "plain.h5", transform=noisy()), make_cache(tmp_path / "wild.h5",
                                                                                    transform=extreme)
    fits = {}
    for name, path in (("plain", plain), ("wild", wild)):
        with FeatureCache(path) as c:
            ids = list(c.meta.index)
            stats, _ = layer_means(c, ids, list(c.layers), 3)
            row = {u: i for i, u in enumerate(ids)}
            datas = [fold_data(c, k) for k in (1, 3)]
        emotion = datas[0].labels.loc[ids, "emotion"].to_numpy(np.int64)
        fits[name] = [[probe_layer(stats[:, j], emotion, fold_rows(d, row), 4) for j in range(3)] for d in datas]
    assert datas[0].fold.test_speaker == "S1F" and "S1F" in datas[1].fold.train_speakers
    for a, b in zip(fits["plain"][0], fits["wild"][0]):  # fold 1: S1F is its test speaker
        assert a.val_ua == b.val_ua and a.alpha_factor == b.alpha_factor
        for key in ("mean", "scale", "coef", "intercept"):
            np.testing.assert_array_equal(getattr(a.probe, key), getattr(b.probe, key))
    changed = [not np.array_equal(a.probe.coef, b.probe.coef) for a, b in zip(fits["plain"][1], fits["wild"][1])]
    assert all(changed)  # fold 3 trains on S1F: the extreme frames reach its fit


@pytest.mark.parametrize("n, f", [(60, 12), (20, 50)])  # the primal (F x F) and the dual (N x N) systems
def test_the_probe_is_sklearns_ridge_classifier(n, f):
    from sklearn.linear_model import RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (n, f)) * rng.uniform(0.1, 20, f) + rng.normal(0, 5, f)
    y = rng.choice([0, 2, 3], n, p=[0.5, 0.3, 0.2])
    x_new = rng.normal(0, 1, (15, f)) * 10
    alphas = [0.3, 3.0, 30.0]
    scaler = StandardScaler().fit(x)
    for alpha, probe in zip(alphas, fit_ridge_probes(x, y, alphas)):
        ref = RidgeClassifier(alpha=alpha, class_weight="balanced").fit(scaler.transform(x), y)
        np.testing.assert_allclose(probe.decision(x_new), ref.decision_function(scaler.transform(x_new)),
                                   rtol=1e-7, atol=1e-9)
        np.testing.assert_array_equal(probe.predict(x_new), ref.predict(scaler.transform(x_new)))


def test_heads_per_layer_beside_the_probe(cache, tmp_path):
    config = TrainConfig(epochs=1, batch_size=8, ensemble=1, min_steps=0, device="cpu")
    summary = scan_layers(cache, config, heads=True, folds=[1, 2], out=tmp_path / "out", progress=False)
    assert summary["folds"] == 2 and set(summary["best"]) == {"probe", "head"}
    assert set(summary["layers"][0]) == {"layer", "probe_ua", "probe_wa", "head_ua", "head_wa"}
    for layer in (0, 1, 2):
        run = tmp_path / "out" / f"layer-{layer:02d}"
        assert json.loads((run / "config.json").read_text())["layers"] == [layer]
        ua = [json.loads((run / f"fold-0{k}" / "metrics.json").read_text())["ua"] for k in (1, 2)]
        assert summary["layers"][layer]["head_ua"]["mean"] == pytest.approx(np.mean(ua))
    assert summary["heads"]["runs"]["2"].endswith("layer-02")
    assert (tmp_path / "out" / "layers.png").is_file()


def test_a_cache_without_emotions_is_one_line(tmp_path):
    path = make_cache(tmp_path / "dims.h5", emotions=False)
    with pytest.raises(UserError, match="no emotion labels"):
        scan_layers(path, out=tmp_path / "out", progress=False)
    result = runner.invoke(app, ["layers", "--cache", str(tmp_path / "nope.h5")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "does not exist" in result.output


def test_the_validation_ua_is_the_reported_ua():
    from heads.evaluate.metrics import classification_metrics
    from heads.train.layer_scan import balanced_accuracy

    rng = np.random.default_rng(1)
    for _ in range(20):
        y, pred = rng.integers(0, 4, 30), rng.integers(0, 4, 30)
        y[y == 3] = 2  # a class absent from the truth is left out of both
        assert balanced_accuracy(y, pred) == pytest.approx(classification_metrics(y, pred, list("abcd"))["ua"])
