"""Rows and labels in line (issue 27): wherever a per-utterance table is built, row i is utterance i's.

On the varied corpus (tests/head_fixtures.py: every speaker its own label order, class balance, number and
length of utterances, valence/arousal level) a table shifted by one utterance or one speaker no longer lines
up with its labels, so these tests assert alignment directly, row by row, against the cache:

- a fold's prepared splits (heads/train/fold_inputs.py, both paths): ids, labels, frame counts, SAP frames
  and fixed statistics of each row are that utterance's, and --pooled-norm is fitted on the training rows;
- the stack's table of every fold (heads/train/stack.py) gives each fold's rows back;
- predictions.csv of every fold of a head run and of a baseline run: ids, truth, probabilities recomputed
  from the utterance's own frames, fold sizes;
- the baseline's fit (scikit-learn on the same rows) and the layer probe's scores (recomputed from the cache).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from head_fixtures import make_cache
from safetensors.torch import load_file

from cache.reader import FeatureCache
from core.records import class_indices
from heads.config import BaselineConfig, TrainConfig
from heads.model.input_norm import floor_std
from heads.model.pooling import speech_frames
from heads.runfolder import BASELINE_FILE, read_config, read_predictions, read_run_utterances
from heads.train.baseline import LinearModel, cache_statistics, run_baseline
from heads.train.batches import preload
from heads.train.fold_inputs import (
    build_head,
    cache_moments,
    fixed_columns,
    fixed_statistics,
    prepare_fold,
    prepare_fold_from_moments,
    standardize,
)
from heads.train.fold_loop import train_folds
from heads.train.folds import fold_data, open_cache
from heads.train.layer_probe import probe_scores, speaker_groups
from heads.train.stack import Stack

CPU = torch.device("cpu")
SETTINGS = dict(epochs=1, batch_size=16, lr=3e-3, heads=2, proj_dim=8, device="cpu", min_steps=0, ensemble=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    # every 5th utterance has no speech frame in VAD mode 3 (its other modes add random frames)
    return make_cache(tmp_path_factory.mktemp("aligned") / "v.h5", varied=True, seed=7, per_class=3,
                      no_speech_every=5)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**SETTINGS, **kw})


def sap_mask(fc: FeatureCache, utt_id: str, mode: int) -> np.ndarray:
    """SAP's frames: the speech frames of `mode`, or every frame when there is none."""
    vad = fc.vad(utt_id, mode).astype(bool)
    return vad if vad.any() else np.ones_like(vad)


def prepared(fc: FeatureCache, path: str, mode: int, k: int = 2):
    data = fold_data(fc, k)
    if path == "mix-ram":  # the layers preloaded: the fold reads RAM batches, not the cache's reader
        preload(fc, [0, 1, 2], 1.0)
        path = "mix"
    if path == "mix":
        return data, [0, 1, 2], prepare_fold(fc, data, config(vad_mode=mode), [0, 1, 2], seed=0, device=CPU)
    moments = cache_moments(fc, data.train + data.val, 1, "train", mode, CPU, 2**30)
    return data, [1], prepare_fold_from_moments(moments, fc, data, config(layer=1, vad_mode=mode), CPU)


# mode 1 also checks that --vad-mode reaches the SAP frames and their statistics (its masks differ from mode 3's)
@pytest.mark.parametrize("path, mode", [("mix", 3), ("mix", 1), ("mix-ram", 1), ("one-layer", 3), ("one-layer", 1)])
def test_every_row_of_a_prepared_fold_is_its_utterance(cache, path, mode):
    with open_cache(cache) as fc:
        data, layers, fold = prepared(fc, path, mode)
        head = fold.template
        scale, shift = fold.affine if fold.affine is not None else (1.0, 0.0)
        raw = {}  # split -> each row's fixed statistics before --pooled-norm, computed here
        for split in ("train", "val"):
            s = fold.splits[split]
            ids = data.split(split)
            assert s.utt_id == ids
            meta = fc.meta.loc[ids]
            assert s.emotion.tolist() == class_indices(meta["emotion"], fc.classes).tolist()
            truth = meta[["valence", "arousal"]].to_numpy(np.float64)
            np.testing.assert_array_equal(s.va_raw, truth)
            np.testing.assert_allclose(s.va.numpy(), (truth - head.va_mean.numpy()) / head.va_std.numpy(), rtol=1e-5)
            assert s.frames.tolist() == meta["n_frames"].tolist()
            for i, u in enumerate(ids):
                x = torch.from_numpy(fc.features(u, layers).astype(np.float32))[None]  # (1, T, L, D)
                padding = torch.ones(1, x.shape[1], dtype=torch.bool)
                vad = torch.from_numpy(fc.vad(u, mode))[None]
                sap, no_speech = speech_frames(padding, vad)
                assert sap[0].numpy().tolist() == sap_mask(fc, u, mode).tolist()
                assert int(s.count[i]) == int(sap.sum()) and bool(s.no_speech[i]) == bool(no_speech[0]), u
                with torch.no_grad():
                    mixed = head.mixed(x, padding)  # (1, T, D)
                    raw.setdefault(split, []).append(fixed_statistics(head, mixed, padding, sap)[0].double())
                    want = standardize(head, raw[split][-1][None].float())[0]
                got = fold.frames[int(s.start[i]) : int(s.start[i] + s.count[i])].float() * scale + shift
                torch.testing.assert_close(got, mixed[0][sap[0]], atol=2e-2, rtol=2e-3)  # float16 frames
                torch.testing.assert_close(s.fixed[i], want, atol=5e-3, rtol=1e-3)
        # --pooled-norm: the training rows' mean and (floored) std, nothing of the validation rows
        train = torch.stack(raw["train"])  # (N, F)
        cols = fixed_columns(head)
        torch.testing.assert_close(head.pooled_norm.mean[cols].double(), train.mean(0), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(head.pooled_norm.std[cols].double(), floor_std(train.std(0, unbiased=False)),
                                   atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("path", ["mix", "one-layer"])
def test_the_stacks_table_gives_every_fold_its_own_rows(cache, path):
    """Folds of different sizes in one table (fold after fold): each head reads its fold's rows and frames."""
    with open_cache(cache) as fc:
        ks = [1, 4, 6]  # 14, 17 and 19 test utterances: every fold its own number of rows
        datas = [fold_data(fc, k) for k in ks]
        if path == "mix":
            folds = [prepare_fold(fc, d, config(), [0, 1, 2], seed=0, device=CPU) for d in datas]
        else:
            ids = sorted({u for d in datas for u in d.train + d.val})
            moments = cache_moments(fc, ids, 1, "train", 3, CPU, 2**30)
            folds = [prepare_fold_from_moments(moments, fc, d, config(layer=1), CPU) for d in datas]
    assert len({len(f.splits["train"].utt_id) for f in folds}) == len(folds)
    heads = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]  # ensemble members: a head's index is not its fold's
    stack = Stack(folds, heads, CPU)
    for h, (f, _) in enumerate(heads):
        fold = folds[f]
        for split in ("train", "val"):
            s = fold.splits[split]
            picks = [list(range(len(s.utt_id)))[::-1]]  # every row, in another order than stored
            rows = stack.rows([h], split, picks)
            order = picks[0]
            assert rows["emotion"][0].tolist() == s.emotion[order].tolist()
            torch.testing.assert_close(rows["fixed"][0], s.fixed[order])
            torch.testing.assert_close(rows["va"][0], s.va[order], equal_nan=True)
            assert rows["count"][0].tolist() == s.count[order].tolist()
            for r, i in enumerate(order):
                start, n = int(rows["start"][0, r]), int(rows["count"][0, r])
                lo = int(s.start[i])
                assert torch.equal(stack.frames[start : start + n], fold.frames[lo : lo + n].to(stack.frames.dtype))


@pytest.fixture(scope="module")
def head_run(cache, tmp_path_factory) -> Path:
    # two heads per fold: in the stack a head's index is not its fold's
    run, _ = train_folds(cache, config(layer=2, pooling="sr", ensemble=2), out=tmp_path_factory.mktemp("runs") / "sr",
                         progress=False)
    return run


def assert_truth_columns(fold: Path, fc: FeatureCache, test_ids: list[str]) -> pd.DataFrame:
    """predictions.csv, its rows put in the order of `test_ids` (a head writes them in batch order)."""
    pred = read_predictions(fold)
    assert sorted(pred["utt_id"]) == sorted(test_ids) and pred["utt_id"].is_unique
    pred = pred.set_index("utt_id").loc[test_ids].reset_index()
    meta = fc.meta.loc[test_ids]
    assert pred["true"].tolist() == meta["emotion"].tolist()
    for dim in ("valence", "arousal"):
        np.testing.assert_allclose(pred[f"{dim}_true"], meta[dim], atol=1e-6)
    return pred


def test_head_predictions_csv_rows_are_their_utterances(cache, head_run):
    """Every fold of the run: ids, truth and fold sizes from the cache; each row's probabilities and
    valence/arousal are the saved head applied to that utterance's frames alone."""
    settings = read_config(head_run)["settings"]
    with FeatureCache(cache) as fc:
        sizes = fc.meta.groupby("speaker").size()
        assert sizes.nunique() == len(sizes)  # every fold has its own sizes
        for k in range(1, 7):
            data = fold_data(fc, k)
            fold = head_run / f"fold-{k:02d}"
            pred = assert_truth_columns(fold, fc, data.test)
            m = pd.read_json(fold / "metrics.json", typ="series")
            assert (m["n_train"], m["n_val"], m["n_test"]) == (len(data.train), len(data.val), len(data.test))
            assert m["n_test"] == sizes[data.fold.test] and m["n_val"] == sizes[data.fold.val]
            assert m["no_speech"] == sum(not fc.vad(u, 3).any() for u in data.test)
            members = []
            for name in ("head.safetensors", "head-2.safetensors"):
                head = build_head(TrainConfig(**settings), (1, int(fc.hidden_size)), len(fc.classes))
                head.load_state_dict(load_file(str(fold / name)))
                members.append(head.eval())
            for u, row in zip(data.test, pred.itertuples()):
                x = torch.from_numpy(fc.features(u, [2]).astype(np.float32))[None]
                padding = torch.ones(1, x.shape[1], dtype=torch.bool)
                probs, va = [], []
                with torch.no_grad():
                    for head in members:  # the fold's outputs are its members' mean
                        out = head(x, padding, torch.from_numpy(fc.vad(u, 3))[None])
                        probs.append(torch.softmax(out.logits, 1)[0].numpy())
                        va.append(head.to_corpus_scale(out.va)[0].numpy())
                np.testing.assert_allclose([getattr(row, f"prob_{c}") for c in fc.classes], np.mean(probs, 0),
                                           atol=2e-5)
                np.testing.assert_allclose([row.valence, row.arousal], np.mean(va, 0), atol=2e-4)
    used = read_run_utterances(head_run)
    with FeatureCache(cache) as fc:
        for col in ("speaker", "session"):
            assert used.loc[fc.meta.index, col].tolist() == fc.meta[col].astype(str).tolist()


GRIDS = dict(c_grid=(0.01, 1.0), alpha_grid=(1.0, 100.0))  # a choice to make, at a fraction of the default's cost
BASELINE_FOLDS = (1, 4, 6)  # 14, 17 and 19 test utterances


@pytest.fixture(scope="module")
def baseline_run(cache, tmp_path_factory) -> Path:
    run, _ = run_baseline(cache, BaselineConfig(layer=2, **GRIDS), folds=list(BASELINE_FOLDS),
                          out=tmp_path_factory.mktemp("runs") / "base", progress=False)
    return run


def test_baseline_predictions_csv_rows_are_their_utterances(cache, baseline_run):
    with FeatureCache(cache) as fc:
        for k in BASELINE_FOLDS:
            data = fold_data(fc, k)
            fold = baseline_run / f"fold-{k:02d}"
            pred = assert_truth_columns(fold, fc, data.test)
            m = pd.read_json(fold / "metrics.json", typ="series")
            assert (m["n_train"], m["n_val"], m["n_test"]) == (len(data.train), len(data.val), len(data.test))
            assert m["no_speech"] == sum(not fc.vad(u, 3).any() for u in data.test) > 0
            stats, _ = cache_statistics(fc, data.test, [2], statistics="mean+std", frames="speech", vad_mode=3)
            probs, va = LinearModel.load(fold / BASELINE_FILE).predict(stats)
            np.testing.assert_allclose(pred[[f"prob_{c}" for c in fc.classes]].to_numpy(), probs, atol=2e-6)
            np.testing.assert_allclose(pred[["valence", "arousal"]].to_numpy(), va, atol=2e-5)


def sklearn_fold(stats: np.ndarray, row: dict[str, int], data) -> dict:
    """The baseline's protocol written with scikit-learn's own tools (as tests/test_baseline.py does): C and
    alpha chosen on the validation speaker (PredefinedSplit; ties to the first, smaller, value), refitted on
    the training speakers, scored on the test speaker."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import balanced_accuracy_score, mean_absolute_error
    from sklearn.model_selection import GridSearchCV, PredefinedSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def part(split, col):
        return stats[[row[u] for u in data.split(split)]].astype(np.float64), data.labels.loc[data.split(split), col]

    out = {}
    for col, model, grid, scoring in (
            ("emotion", LogisticRegression(class_weight="balanced", max_iter=5000, tol=1e-6),
             {"logisticregression__C": GRIDS["c_grid"]}, "balanced_accuracy"),
            ("valence", Ridge(), {"ridge__alpha": GRIDS["alpha_grid"]}, "neg_mean_absolute_error")):
        (xt, yt), (xv, yv), (xs, ys) = (part(s, col) for s in ("train", "val", "test"))
        pipe = make_pipeline(StandardScaler(), model)
        split = PredefinedSplit([-1] * len(xt) + [0] * len(xv))
        search = GridSearchCV(pipe, {k: list(v) for k, v in grid.items()}, scoring=scoring, cv=split, refit=False)
        search.fit(np.vstack([xt, xv]), np.concatenate([yt, yv]))
        pipe.set_params(**search.best_params_).fit(xt, yt)
        if col == "emotion":
            out.update(C=search.best_params_["logisticregression__C"], probs=pipe.predict_proba(xs),
                       ua=balanced_accuracy_score(ys, pipe.predict(xs)))
        else:
            out["valence_mae"] = mean_absolute_error(ys, pipe.predict(xs))
    return out


def test_the_baseline_is_fitted_on_its_rows_own_labels(cache, baseline_run):
    """The same protocol written with scikit-learn from the cache, on folds whose speakers differ in label
    order and balance: a row/label shift anywhere in the baseline changes the fit."""
    with FeatureCache(cache) as fc:
        ids = list(fc.meta.index)
        stats, _ = cache_statistics(fc, ids, [2], statistics="mean+std", frames="speech", vad_mode=3)
        row = {u: i for i, u in enumerate(ids)}
        for k in BASELINE_FOLDS[:2]:
            data = fold_data(fc, k)
            ref = sklearn_fold(stats, row, data)
            m = pd.read_json(baseline_run / f"fold-{k:02d}" / "metrics.json", typ="series")
            assert m["baseline"]["C"] == ref["C"]
            assert m["ua"] == pytest.approx(ref["ua"], abs=1e-12)
            assert m["valence_mae"] == pytest.approx(ref["valence_mae"], rel=1e-6)
            pred = read_predictions(baseline_run / f"fold-{k:02d}").set_index("utt_id").loc[data.test]
            np.testing.assert_allclose(pred[[f"prob_{c}" for c in fc.classes]].to_numpy(), ref["probs"], atol=5e-5)  # tol 1e-6 both


def test_the_layer_probe_scores_the_rows_own_labels_and_speakers(cache, tmp_path):
    """The probe's scores in metrics.json, recomputed from the cache: each training and validation
    utterance's [mean | speech mean] per normalized layer, its emotion, its speaker's group."""
    run, (m,) = train_folds(cache, config(pooling="gap"), folds=[3], out=tmp_path / "probe", progress=False)
    stored = load_file(str(run / "fold-03" / "head.safetensors"))
    mean, std = stored["norm.mean"].double().numpy(), stored["norm.std"].double().numpy()  # (L, D)
    with FeatureCache(cache) as fc:
        data = fold_data(fc, 3)
        ids = data.train + data.val
        rows = []
        for u in ids:
            z = (fc.features(u).astype(np.float64) - mean) / std  # (T, L, D)
            rows.append(np.concatenate([z.mean(axis=0), z[sap_mask(fc, u, 3)].mean(axis=0)], axis=-1))  # (L, 2D)
        labels = data.labels.loc[ids]
    assert (labels["emotion"] >= 0).all()
    groups = speaker_groups(labels["speaker"].to_numpy(), 10)
    want = probe_scores(torch.tensor(np.stack(rows), dtype=torch.float32), torch.tensor(labels["emotion"].to_numpy()),
                        torch.from_numpy(groups))
    got = m["inputs"]["layer_probe_scores"]
    assert m["inputs"]["layer_probe_groups"] == 5
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    assert not all(math.isclose(g, got[0]) for g in got)  # the layers score differently: the check has teeth
