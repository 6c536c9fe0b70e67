"""The classical baseline (heads/train/baseline.py, `cli baseline`): statistics, folds, metrics against a direct
scikit-learn computation, the run folder, the saved model, the end-of-run summary."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, balanced_accuracy_score, mean_absolute_error
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cache.reader import FeatureCache
from cli_runner import cli
from head_fixtures import make_cache
from heads.config import ALPHA_GRID, C_GRID, BaselineConfig
from heads.evaluate.compare import end_of_run_lines, find_baselines
from heads.evaluate.report import load_run, method_label, summarize
from heads.runfolder import BASELINE_FILE as MODEL_FILE
from heads.train.baseline import LinearModel, cache_statistics, fit_fold, run_baseline, utterance_statistics
from heads.train.folds import fold_data


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # every 7th utterance has no VAD speech frame: the fallback to all frames is exercised
    return make_cache(tmp_path_factory.mktemp("cache") / "synth.h5", no_speech_every=7)


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    out, _ = run_baseline(cache, BaselineConfig(), out=tmp_path_factory.mktemp("runs") / "synth-baseline",
                          progress=False)
    return out


def loop_statistics(cache: FeatureCache, utt_id: str, layers, frames: str, vad_mode: int = 3) -> np.ndarray:
    """Mean and population std per layer and dimension by plain Python sums over frames."""
    x = cache.features(utt_id, layers)  # (T, L, D)
    vad = cache.vad(utt_id, vad_mode)
    rows = [t for t in range(len(x)) if (vad[t] or frames == "all" or not vad.any())]
    out = []
    for layer in range(x.shape[1]):
        means, stds = [], []
        for d in range(x.shape[2]):
            values = [float(x[t, layer, d]) for t in rows]
            m = sum(values) / len(values)
            means.append(m)
            stds.append(math.sqrt(sum((v - m) ** 2 for v in values) / len(values)))
        out += means + stds
    return np.array(out)


# --- statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", ["speech", "all"])
def test_statistics_equal_a_loop_over_frames(cache, frames):
    with FeatureCache(cache) as fc:
        ids = list(fc.meta.index[:9])  # includes utterance 0 and 7, which have no speech frame
        got, no_speech = cache_statistics(fc, ids, [0, 1, 2], statistics="mean+std", frames=frames, vad_mode=3)
        assert got.shape == (9, 3 * 2 * 16) and got.dtype == np.float32
        for i, u in enumerate(ids):
            np.testing.assert_allclose(got[i], loop_statistics(fc, u, [0, 1, 2], frames), rtol=1e-6, atol=1e-6)
            assert no_speech[i] == (not fc.vad(u, 3).any())
        assert no_speech.sum() >= 1
        one, _ = cache_statistics(fc, ids, [2], statistics="mean", frames=frames, vad_mode=3)
        np.testing.assert_allclose(one, got[:, 2 * 32: 2 * 32 + 16], rtol=1e-6)  # layer 2's means


def test_speech_frames_change_the_statistics():
    frames = np.arange(12, dtype=np.float16).reshape(6, 1, 2)  # (T, L, D)
    speech = np.array([0, 1, 1, 0, 0, 0], dtype=bool)
    assert utterance_statistics(frames, speech).tolist() == [3.0, 4.0, 1.0, 1.0]  # mean of frames 1-2, std 1
    assert utterance_statistics(frames, np.ones(6, bool), "mean").tolist() == [5.0, 6.0]


def test_statistics_stream_one_utterance_at_a_time(cache):
    """Never more than one utterance's frames in memory: every read is one utterance, nothing preloaded."""
    with FeatureCache(cache) as fc:
        sizes, read = [], fc.features

        def spy(utt_id, layers=None):
            x = read(utt_id, layers)
            sizes.append((len(x), int(fc.meta.loc[utt_id, "n_frames"])))
            return x

        fc.features = spy
        cache_statistics(fc, list(fc.meta.index), [0, 1, 2], statistics="mean+std", frames="speech", vad_mode=3)
        assert fc.preloaded() is None
        assert len(sizes) == len(fc.meta) and all(t == n for t, n in sizes)


# --- folds and metrics -----------------------------------------------------------------------


def test_folds_are_disjoint_by_speaker_and_the_scaler_saw_only_training_speakers(cache, run):
    with FeatureCache(cache) as fc:
        ids = list(fc.meta.index)
        stats, _ = cache_statistics(fc, ids, [0, 1, 2], statistics="mean+std", frames="speech", vad_mode=3)
        row = {u: i for i, u in enumerate(ids)}
        for k in range(1, 7):
            data = fold_data(fc, k)
            speakers = {s: set(fc.meta.loc[data.split(s), "speaker"]) for s in ("train", "val", "test")}
            assert speakers["test"] == {data.fold.test_speaker} and speakers["val"] == {data.fold.val_speaker}
            assert not (speakers["train"] & (speakers["val"] | speakers["test"]))
            model = LinearModel.load(run / f"fold-{k:02d}" / MODEL_FILE)
            train = stats[[row[u] for u in data.train]].astype(np.float64)
            np.testing.assert_allclose(model.mean, train.mean(axis=0), rtol=1e-10, atol=1e-12)
            with (run / f"fold-{k:02d}" / "predictions.csv").open() as fh:
                assert {r["utt_id"] for r in csv.DictReader(fh)} == set(data.test)


def sklearn_fold(stats, row, data):
    """The same protocol written with scikit-learn's own tools: grid search on the validation speaker
    (PredefinedSplit; ties go to the first, i.e. smallest, value), refit on the training speakers."""
    def part(split, col):
        x = stats[[row[u] for u in data.split(split)]].astype(np.float64)
        y = data.labels.loc[data.split(split), col].to_numpy()
        return x, y

    (xt, yt), (xv, yv), (xs, ys) = (part(s, "emotion") for s in ("train", "val", "test"))
    split = PredefinedSplit([-1] * len(xt) + [0] * len(xv))
    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000, tol=1e-6))
    search = GridSearchCV(clf, {"logisticregression__C": list(C_GRID)}, scoring="balanced_accuracy", cv=split,
                          refit=False).fit(np.vstack([xt, xv]), np.concatenate([yt, yv]))
    clf.set_params(**search.best_params_).fit(xt, yt)
    out = {"ua": balanced_accuracy_score(ys, clf.predict(xs)), "wa": accuracy_score(ys, clf.predict(xs)),
           "C": search.best_params_["logisticregression__C"], "probs": clf.predict_proba(xs)}
    for name in ("valence", "arousal"):
        (xt, yt), (xv, yv), (xs, ys) = (part(s, name) for s in ("train", "val", "test"))
        reg = make_pipeline(StandardScaler(), Ridge())
        search = GridSearchCV(reg, {"ridge__alpha": list(ALPHA_GRID)}, scoring="neg_mean_absolute_error", cv=split,
                              refit=False).fit(np.vstack([xt, xv]), np.concatenate([yt, yv]))
        reg.set_params(**search.best_params_).fit(xt, yt)
        out[f"{name}_mae"] = mean_absolute_error(ys, reg.predict(xs))
    return out


def test_metrics_equal_a_direct_scikit_learn_computation(cache, run):
    with FeatureCache(cache) as fc:
        ids = list(fc.meta.index)
        stats = np.array([loop_statistics(fc, u, [0, 1, 2], "speech") for u in ids], dtype=np.float32)
        row = {u: i for i, u in enumerate(ids)}
        uas = []
        for k in range(1, 7):
            data = fold_data(fc, k)
            ref = sklearn_fold(stats, row, data)
            m = json.loads((run / f"fold-{k:02d}" / "metrics.json").read_text())
            assert m["baseline"]["C"] == ref["C"]
            assert m["ua"] == pytest.approx(ref["ua"], abs=1e-12) and m["wa"] == pytest.approx(ref["wa"], abs=1e-12)
            assert m["valence_mae"] == pytest.approx(ref["valence_mae"], rel=1e-6)
            assert m["arousal_mae"] == pytest.approx(ref["arousal_mae"], rel=1e-6)
            with (run / f"fold-{k:02d}" / "predictions.csv").open() as fh:
                probs = {r["utt_id"]: [float(r[f"prob_{c}"]) for c in data.classes] for r in csv.DictReader(fh)}
            # the baseline warm-starts along the C grid, the reference starts cold: both stop within tol 1e-6
            np.testing.assert_allclose([probs[u] for u in data.test], ref["probs"], atol=5e-5)
            uas.append(m["ua"])
    assert np.mean(uas) > 0.6  # the statistics carry the class (chance 0.25)


def test_saved_model_reproduces_predictions_csv(cache, run):
    with FeatureCache(cache) as fc:
        data = fold_data(fc, 2)
        stats, _ = cache_statistics(fc, data.test, [0, 1, 2], statistics="mean+std", frames="speech", vad_mode=3)
    probs, va = LinearModel.load(run / "fold-02" / MODEL_FILE).predict(stats)
    with (run / "fold-02" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["utt_id"] for r in rows] == data.test
    np.testing.assert_allclose(probs, [[float(r[f"prob_{c}"]) for c in data.classes] for r in rows], atol=1e-6)
    np.testing.assert_allclose(va, [[float(r["valence"]), float(r["arousal"])] for r in rows], atol=1e-5)


def test_binary_and_one_class_models_give_proper_probabilities():
    rng = np.random.default_rng(0)
    y = np.array([0, 2] * 20)
    x = rng.normal(0, 1, (40, 3)) + y[:, None]
    stats = {"train": x.astype(np.float32), "val": x[:10].astype(np.float32)}
    labels = {"train": np.column_stack([y, np.full((40, 2), np.nan)]),
              "val": np.column_stack([y[:10], np.full((10, 2), np.nan)])}
    model, chosen = fit_fold(stats, labels, 4, BaselineConfig())
    probs, va = model.predict(x)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=chosen["C"], class_weight="balanced", max_iter=5000, tol=1e-6))
    ref.fit(x, y)
    np.testing.assert_allclose(probs[:, [0, 2]], ref.predict_proba(x), atol=1e-6)
    assert np.all(probs[:, [1, 3]] == 0) and np.all(np.isnan(va))  # unseen classes 0; no V/A labels: NaN
    labels["train"][:, 0] = 2
    model, chosen = fit_fold(stats, labels, 4, BaselineConfig())
    probs, _ = model.predict(x)
    assert chosen["C"] is None and np.all(probs[:, 2] == 1.0)


# --- run folder, report, summary, CLI --------------------------------------------------------


def test_cli_report_shows_the_baseline_beside_a_head(cache, run, tmp_path):
    code, out = cli("train-head", "--cache", cache, "--all-folds", "--epochs", 1, "--out", run.parent / "synth-sr",
                    "--quiet")
    assert code == 0, out
    # train-head --all-folds ends with its mean and the sibling baseline's on the same folds
    head = load_run(run.parent / "synth-sr")
    base = summarize(run)
    label = method_label(summarize(head))
    assert label == "SR x3"  # the default --ensemble auto on folds this small
    assert f"{label} (" in out and f"UA {100 * summarize(head)['ua']['mean']:.2f}%" in out
    assert f"Baseline ({run}), the same 6 folds: UA {100 * base['ua']['mean']:.2f}%" in out
    diff = np.mean([h["ua"] - b["ua"] for h, b in zip(head.folds, load_run(run).folds)])
    assert f"{label} minus Baseline, paired over folds: UA {100 * diff:+.2f} points" in out
    code, out = cli("report", run, run.parent / "synth-sr", "--no-plots")
    assert code == 0, out
    lines = out.splitlines()
    assert any(line.strip().startswith("Baseline") and "synth-baseline" in line for line in lines)
    assert any(line.strip().startswith("SR") and "synth-sr" in line for line in lines)
    code, out = cli("report", run, "--json", "--no-plots")
    summary = json.loads(out)
    assert summary["method"] == "baseline" and summary["folds"] == 6 and summary["settings"]["frames"] == "speech"
    assert summary["ua"]["mean"] == pytest.approx(np.mean([m["ua"] for m in load_run(run).folds]))


def test_baselines_are_found_only_for_the_same_cache_and_folds(cache, tmp_path):
    a, _ = run_baseline(cache, BaselineConfig(), out=tmp_path / "a-baseline", folds=[1, 2], progress=False)
    b, _ = run_baseline(cache, BaselineConfig(frames="all"), out=tmp_path / "b-baseline", folds=[2], progress=False)
    other = make_cache(tmp_path / "other.h5", seed=5, per_class=2)  # another fingerprint
    run_baseline(other, BaselineConfig(), out=tmp_path / "c-baseline", folds=[1], progress=False)
    (tmp_path / "d-broken").mkdir()
    (tmp_path / "d-broken" / "config.json").write_text("{not json")
    assert [r.path.name for r in find_baselines(a)] == ["b-baseline"]
    assert end_of_run_lines(a, baselines=False) == end_of_run_lines(a)[:1]
    lines = end_of_run_lines(a)
    assert "mean over 2 folds" in lines[0]
    assert f"Baseline ({b}), the 1 fold in common: UA" in lines[1]  # only fold 2 is in both
    ua_a = load_run(a).folds[1]["ua"]
    assert f"paired over folds: UA {100 * (ua_a - load_run(b).folds[0]['ua']):+.2f} points" in lines[2]


def test_ablate_adds_the_baseline_row(tmp_path):
    cache = make_cache(tmp_path / "small.h5", per_class=2)
    code, out = cli("ablate", "--cache", cache, "--out", tmp_path / "abl", "--epochs", 1, "--quiet")
    assert code == 0, out
    assert len(load_run(tmp_path / "abl" / "baseline").folds) == 6
    rows = re.findall(r"^\W*(Baseline|GAP x3|SAP x3|SR x3)\s+(baseline|gap|sap|sr)\b", out, flags=re.M)
    assert rows == [("Baseline", "baseline"), ("GAP x3", "gap"), ("SAP x3", "sap"), ("SR x3", "sr")]  # --ensemble auto
    for head in ("GAP x3", "SAP x3", "SR x3"):
        assert f"{head} minus Baseline, paired over folds: UA " in out
    code, out = cli("ablate", "--cache", cache, "--out", tmp_path / "abl2", "--epochs", 1, "--quiet", "--no-baseline")
    assert code == 0 and not (tmp_path / "abl2" / "baseline").exists()


@pytest.mark.parametrize("args, expected", [
    (["--frames", "voiced"], "--frames must be speech or all"),
    (["--stats", "median"], "--stats must be mean or mean+std"),
    (["--layer", 9], "layer 9 is not among them"),
    (["--fold", 9], "fold 9 is out of range"),
    (["--vad-mode", 5], "--vad-mode must be one of 0, 1, 2, 3"),
])
def test_bad_options_are_one_line(cache, tmp_path, args, expected):
    code, out = cli("baseline", "--cache", cache, "--out", tmp_path / "b", "--quiet", *args)
    assert code == 2, out
    lines = [x for x in out.strip().splitlines() if x]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out


def test_a_folder_with_other_settings_is_refused_and_one_layer_works(cache, tmp_path):
    code, out = cli("baseline", "--cache", cache, "--out", tmp_path / "b", "--fold", 1, "--layer", 2, "--quiet")
    assert code == 0, out
    assert json.loads((tmp_path / "b" / "config.json").read_text())["layers"] == [2]
    assert LinearModel.load(tmp_path / "b" / "fold-01" / MODEL_FILE).mean.shape == (2 * 16,)
    code, out = cli("baseline", "--cache", cache, "--out", tmp_path / "b", "--fold", 2, "--quiet")
    assert code == 2 and "already holds a run with other settings" in out


def test_cli_predict_on_a_baseline_fold_equals_its_predictions_csv(tmp_path):
    """A baseline fold predicts new audio like `cli predict` on a head: re-extract, same statistics, saved model."""
    from extract.pipeline import run_extract
    from extract.synthetic import generate

    corpus = generate(tmp_path / "corpus", seed=3, n_sessions=2, utts_per_speaker=6, speech_seconds=(0.6, 1.2),
                      silence_seconds=(0.1, 0.5))
    cache = tmp_path / "fbank.h5"
    run_extract("manifest", corpus, out=cache, model="fbank", device="cpu", workers=0, progress=False)
    out, _ = run_baseline(cache, BaselineConfig(), out=tmp_path / "b", folds=[1], progress=False)
    with (out / "fold-01" / "predictions.csv").open() as fh:
        expected = {r["utt_id"]: r for r in csv.DictReader(fh)}
    with corpus.open() as fh:
        files = {r["utt_id"]: corpus.parent / r["path"] for r in csv.DictReader(fh)}
    ids = sorted(expected)[:3]
    code, text = cli("predict", *[files[u] for u in ids], "--run", out / "fold-01", "--json")
    assert code == 0, text
    got = json.loads(text)
    classes = json.loads((out / "config.json").read_text())["classes"]
    for u, p in zip(ids, got):
        row = expected[u]
        np.testing.assert_allclose([p["probs"][c] for c in classes], [float(row[f"prob_{c}"]) for c in classes],
                                   atol=1e-5)
        assert p["emotion"] == row["pred"]
        assert p["valence"] == pytest.approx(float(row["valence"]), abs=1e-4)


@pytest.mark.parametrize("missing_va", [False, True])
def test_fit_in_the_training_rows_span_equals_the_plain_fit(missing_va):
    """Wide statistics (F > N, as every cached layer of an SSL model): the span fit is the same model.

    Rows of rank < N (duplicates, as frameless utterances' zero statistics) and V/A labels missing on
    some rows included."""
    rng = np.random.default_rng(1)
    n, f = 60, 300
    y = np.arange(n) % 4
    x = rng.normal(0, 1, (n, 80)) @ rng.normal(0, 1, (80, f)) + 0.5 * y[:, None] * rng.normal(0, 1, f)
    x[5] = x[6]  # an exactly dependent row
    va = np.column_stack([x[:, 0] * 0.1 + y, -x[:, 1] * 0.05 + y]) + rng.normal(0, 0.1, (n, 2))
    if missing_va:
        va[::3, 0] = np.nan
    labels = np.column_stack([y, va])
    stats = {"train": x[:45].astype(np.float32), "val": x[45:].astype(np.float32)}
    split_labels = {"train": labels[:45], "val": labels[45:]}
    plain, chosen_plain = fit_fold(stats, split_labels, 4, BaselineConfig(), span=False)
    span, chosen_span = fit_fold(stats, split_labels, 4, BaselineConfig(), span=True)
    assert chosen_span["span_rank"] == 43 and chosen_plain["span_rank"] is None  # 45 rows, centered, one duplicate
    assert {k: v for k, v in chosen_span.items() if k not in ("span_rank", "iterations")} == \
        {k: v for k, v in chosen_plain.items() if k not in ("span_rank", "iterations")}
    test = rng.normal(0, 1, (20, f))
    p_plain, va_plain = plain.predict(test)
    p_span, va_span = span.predict(test)
    np.testing.assert_allclose(p_span, p_plain, atol=1e-5)
    np.testing.assert_allclose(va_span, va_plain, rtol=1e-6, atol=1e-6)
    # the default chooses the span exactly when the statistics outnumber the training rows
    _, chosen_default = fit_fold(stats, split_labels, 4, BaselineConfig())
    assert chosen_default["span_rank"] == 43
