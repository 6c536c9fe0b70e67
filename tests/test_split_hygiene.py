"""Split hygiene (issue 27): every statistic fitted on data sees the training split only; the layer probe
also the validation speaker, never the test speaker.

Fold 1 (test S1F, validation S1M) is fitted twice: on the varied corpus (tests/head_fixtures.py) and on a
copy whose held-out speakers are poisoned (frames x 300 + 1000, every emotion "sad", valence 40, arousal
-30), every training speaker's data bit for bit the same. A statistic that took in one held-out utterance
moves; each is also compared with its value computed by hand from the training speakers.

| fitted statistic | where | guarded by |
|---|---|---|
| input normalization, several layers | heads/train/layer_weights.py (RunningMoments) | test_fitted_buffers_* |
| input normalization, one layer | heads/train/fold_inputs.py (CacheMoments.combined) | test_fitted_buffers_* |
| pooled normalization | fold_inputs.fit_pooled; statistics.fit_pooled_norm (joint) | test_fitted_buffers_* |
| valence/arousal scale | fold_inputs, Trainer (statistics.target_scale) | test_fitted_buffers_*, test_finetune.py |
| class weights | fold_inputs, Trainer (statistics.class_weights) | test_class_weights_* |
| layer probe (train + val) | heads/train/layer_probe.py | test_nothing_a_head_learns_depends_on_the_test_speaker |
| pooled layer weights (stage 1) | heads/train/layer_weights.py | test_fitted_buffers_* (pooled) |
| ensemble members | heads/train/ensemble.py, stack.py | test_fitted_buffers_* (ensemble) |
| baseline scaler, C, alpha | heads/train/baseline.py | test_the_baseline_* |
| fine-tuning: target scale, class weights (Trainer); nothing else | heads/finetune/ | tests/test_finetune.py |
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from head_fixtures import make_cache
from safetensors.torch import load_file

from cache.reader import FeatureCache
from core.records import CLASSES_4
from heads.config import BaselineConfig, TrainConfig
from heads.model.input_norm import floor_std
from heads.runfolder import BASELINE_FILE
from heads.train.baseline import LinearModel, cache_statistics, run_baseline
from heads.train.feature_trainer import FeatureTrainer
from heads.train.fold_inputs import cache_moments, prepare_fold, prepare_fold_from_moments
from heads.train.fold_loop import train_folds
from heads.train.folds import fold_data, open_cache

SEED = 11
TEST, VAL = "S1F", "S1M"  # fold 1 of the varied corpus
FITTED = ("norm.", "mix.", "pooled_norm.", "va_")  # the head's buffers fitted on data, not trained
CPU = torch.device("cpu")


def poisoner(speakers: tuple[str, ...]):
    def frames(speaker: str, x: np.ndarray) -> np.ndarray:
        return x * 300 + 1000 if speaker in speakers else x  # float16 still holds it (|x| < 20)

    def labels(speaker, emotion, valence, arousal):
        return ("sad", 40.0, -30.0) if speaker in speakers else (emotion, valence, arousal)

    return {"transform": frames, "relabel": labels}


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hygiene")
    return {"clean": make_cache(root / "clean.h5", varied=True, seed=SEED, per_class=3),
            "held_out": make_cache(root / "held.h5", varied=True, seed=SEED, per_class=3, **poisoner((TEST, VAL))),
            "test_only": make_cache(root / "test.h5", varied=True, seed=SEED, per_class=3, **poisoner((TEST,)))}


def config(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=16, lr=3e-3, heads=2, proj_dim=8, device="cpu", min_steps=0, ensemble=1)
    return TrainConfig(**{**base, **kw})


def heads_of(run: Path) -> list[dict[str, torch.Tensor]]:
    fold = run / "fold-01"
    return [load_file(str(p)) for p in sorted(fold.glob("head*.safetensors"))]


def training_frames(cache: Path, layers: list[int]) -> np.ndarray:
    """(N, L, D) float64: every frame of fold 1's training utterances."""
    with FeatureCache(cache) as fc:
        return np.concatenate([fc.features(u, layers).astype(np.float64) for u in fold_data(fc, 1).train])


def training_labels(cache: Path) -> pd.DataFrame:
    with FeatureCache(cache) as fc:
        data = fold_data(fc, 1)
        return data.labels.loc[data.train]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefixes: tuple[str, ...], what: str) -> None:
    names = [n for n in a if n.startswith(prefixes)]
    assert names and set(names) == {n for n in b if n.startswith(prefixes)}
    for n in names:
        assert torch.equal(a[n], b[n]), f"{what}: {n} moved when held-out speakers changed"


def assert_training_statistics(head: dict[str, torch.Tensor], cache: Path, layers: list[int]) -> None:
    """The input normalization and the target scale are the training speakers' own, computed here by hand."""
    labels = training_labels(cache)
    va = labels[["valence", "arousal"]].to_numpy()
    np.testing.assert_allclose(head["va_mean"].numpy(), va.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(head["va_std"].numpy(), va.std(axis=0), rtol=1e-5)
    frames = training_frames(cache, layers)
    np.testing.assert_allclose(head["norm.mean"].numpy(), frames.mean(axis=0), rtol=1e-4, atol=1e-5)
    std = floor_std(torch.from_numpy(frames.std(axis=0))).numpy()
    np.testing.assert_allclose(head["norm.std"].numpy(), std, rtol=1e-4)


# (name, settings, poisoned corpus, buffers that must not move). Poisoning the validation speaker legitimately
# moves the probe's layer weights, hence the mixed frames' pooled statistics, and the pooled stage's weights.
CASES = [
    ("one-layer", dict(layer=2), "held_out", ("norm.", "pooled_norm.", "va_")),
    ("mix-probe", dict(), "held_out", ("norm.", "va_")),
    ("mix-pooled", dict(layer_weights="pooled", epochs=2), "held_out", ("norm.", "va_")),
    ("mix-joint", dict(layer_weights="joint"), "held_out", ("norm.", "pooled_norm.", "va_")),
    ("ensemble", dict(layer=2, ensemble=2), "held_out", ("norm.", "pooled_norm.", "va_")),
]


@pytest.mark.parametrize("settings, poisoned, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fitted_buffers_ignore_the_validation_and_test_speakers(caches, tmp_path, settings, poisoned, names):
    runs = {}
    for corpus in ("clean", poisoned):
        runs[corpus], _ = train_folds(caches[corpus], config(**settings), folds=[1], out=tmp_path / corpus,
                                      progress=False)
    clean, dirty = heads_of(runs["clean"]), heads_of(runs[poisoned])
    assert len(clean) == len(dirty) == settings.get("ensemble", 1)
    for member, (a, b) in enumerate(zip(clean, dirty), start=1):
        assert_same(a, b, names, f"member {member}")
        assert_training_statistics(a, caches["clean"], [settings["layer"]] if "layer" in settings else [0, 1, 2])
    if "pooled_norm." in names:  # and the pooled statistics are of training-sized values: none came from x 300
        assert float(clean[0]["pooled_norm.std"].max()) < 50


def test_nothing_a_head_learns_depends_on_the_test_speaker(caches, tmp_path):
    """The default head (every layer, probe weights, ensemble of two): with only the test speaker poisoned, its
    fitted buffers, probe scores, trained weights and training history are the same, bit for bit."""
    runs, metrics = {}, {}
    for corpus in ("clean", "test_only"):
        runs[corpus], (metrics[corpus],) = train_folds(caches[corpus], config(ensemble=2, epochs=2), folds=[1],
                                                       out=tmp_path / corpus, progress=False)
    for member, (a, b) in enumerate(zip(heads_of(runs["clean"]), heads_of(runs["test_only"])), start=1):
        assert_same(a, b, ("",), f"member {member}")  # every tensor, trained weights included
    for name in ("history.csv", "history-2.csv"):
        assert (runs["clean"] / "fold-01" / name).read_text() == (runs["test_only"] / "fold-01" / name).read_text()
    clean, dirty = metrics["clean"], metrics["test_only"]
    assert clean["inputs"] == dirty["inputs"] and len(clean["inputs"]["layer_probe_scores"]) == 3
    assert clean["layer_weights"] == dirty["layer_weights"]
    assert clean["ua"] != dirty["ua"] or clean["test_loss"] != dirty["test_loss"]  # the test speaker did change


def expected_class_weights(cache: Path) -> np.ndarray:
    """N / (C' n_c) over the training speakers' emotions, written out."""
    counts = training_labels(cache)["emotion"].value_counts().reindex(range(len(CLASSES_4)), fill_value=0)
    counts = counts.to_numpy(np.float64)
    assert len(set(counts)) > 1  # unbalanced: a weight from another split would differ
    return counts.sum() / ((counts > 0).sum() * counts)


@pytest.mark.parametrize("path", ["mix", "one-layer", "single-head"])
def test_class_weights_and_target_scale_come_from_the_training_speakers(caches, path):
    """What the stack's folds (prepare_fold, prepare_fold_from_moments) and the single-head trainer fit."""
    fitted = {}
    for corpus in ("clean", "held_out"):
        with open_cache(caches[corpus]) as cache:
            data = fold_data(cache, 1)
            if path == "mix":
                fold = prepare_fold(cache, data, config(), [0, 1, 2], seed=0, device=CPU)
            elif path == "one-layer":
                moments = cache_moments(cache, data.train + data.val, 2, "train", 3, CPU, 2**30)
                fold = prepare_fold_from_moments(moments, cache, data, config(layer=2), CPU)
            else:
                trainer = FeatureTrainer(config(layer_weights="joint"), data, cache=cache, layers=[0, 1, 2])
                fitted[corpus] = (trainer.class_weights, trainer.head(trainer.model).va_mean,
                                  trainer.head(trainer.model).va_std)
                continue
            fitted[corpus] = (fold.class_weights, fold.template.va_mean, fold.template.va_std)
    weights, va_mean, va_std = fitted["clean"]
    np.testing.assert_allclose(weights.numpy(), expected_class_weights(caches["clean"]), rtol=1e-6)
    va = training_labels(caches["clean"])[["valence", "arousal"]].to_numpy()
    np.testing.assert_allclose(va_mean.numpy(), va.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(va_std.numpy(), va.std(axis=0), rtol=1e-5)
    for a, b in zip(fitted["clean"], fitted["held_out"]):
        assert torch.equal(a, b)


def baseline_fold(cache: Path, out: Path) -> tuple[dict[str, np.ndarray], dict]:
    grids = dict(c_grid=(0.01, 1.0), alpha_grid=(1.0, 100.0))  # a choice to make, at a fraction of the cost
    run, (metrics,) = run_baseline(cache, BaselineConfig(layer=2, **grids), folds=[1], out=out, progress=False)
    return LinearModel.load(run / "fold-01" / BASELINE_FILE).tensors(), metrics


def test_the_baseline_scaler_sees_the_training_speakers_and_nothing_sees_the_test_speaker(caches, tmp_path):
    model, metrics = {}, {}
    for corpus in ("clean", "held_out", "test_only"):
        model[corpus], metrics[corpus] = baseline_fold(caches[corpus], tmp_path / corpus)
    with FeatureCache(caches["clean"]) as fc:
        train = fold_data(fc, 1).train
        stats, _ = cache_statistics(fc, train, [2], statistics="mean+std", frames="speech", vad_mode=3)
    stats = stats.astype(np.float64)
    np.testing.assert_allclose(model["clean"]["scaler.mean"], stats.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model["clean"]["scaler.scale"], stats.std(axis=0), rtol=1e-10)
    for name in ("scaler.mean", "scaler.scale"):  # validation and test poisoned: the scaler does not move
        np.testing.assert_array_equal(model["clean"][name], model["held_out"][name])
    for name, array in model["clean"].items():  # only the test speaker poisoned: no array moves, no choice
        np.testing.assert_array_equal(array, model["test_only"][name], err_msg=name)
    assert metrics["clean"]["baseline"] == metrics["test_only"]["baseline"]
    assert metrics["clean"]["ua"] != metrics["test_only"]["ua"]  # the test speaker did change
    # the validation speaker chooses C: poisoned, it may choose another; the recorded choice is its best UA
    for m in metrics.values():
        by_c = m["baseline"]["val_ua_by_C"]
        assert m["baseline"]["C"] == float(max(by_c, key=lambda c: (by_c[c], -float(c))))


def test_the_run_records_only_what_training_speakers_were_labelled_with(tmp_path):
    """metrics.json's outputs (what predict may report) come from the training split: held-out speakers with
    valence/arousal do not make a head that never saw a target report them."""
    def only_held_out_dims(speaker, emotion, valence, arousal):
        return (emotion, valence, arousal) if speaker in (TEST, VAL) else (emotion, float("nan"), float("nan"))

    cache = make_cache(tmp_path / "c.h5", varied=True, seed=SEED, per_class=2, relabel=only_held_out_dims)
    run, (m,) = train_folds(cache, config(layer=2), folds=[1], out=tmp_path / "run", progress=False)
    assert m["outputs"] == ["emotion"]
    head = heads_of(run)[0]
    assert head["va_mean"].tolist() == [0.0, 0.0] and head["va_std"].tolist() == [1.0, 1.0]
    assert "valence" not in (run / "fold-01" / "predictions.csv").read_text().splitlines()[0]
    assert json.loads((run / "fold-01" / "metrics.json").read_text())["outputs"] == ["emotion"]
