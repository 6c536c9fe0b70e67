"""Cross-corpus runs (`--cache A --test-cache B`, or leave one corpus out of several): cache/corpus_set.py,
core/folds.py `--protocol corpus`, and the same trainer, baseline, run folder and report."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import cache.corpus_set as corpus_set
from cache.format import CacheError
from cli_runner import cli
from core.folds import Fold
from head_fixtures import make_cache
from heads.config import TrainConfig
from heads.evaluate.report import summarize
from heads.train.fold_loop import train_folds
from heads.train.folds import fold_data, open_cache

SETTINGS = dict(epochs=2, batch_size=8, heads=2, device="cpu", min_steps=0, ensemble=1, proj_dim=8)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("xc")
    return {name: make_cache(folder / f"{name}.h5", seed=seed, per_class=3)
            for name, seed in (("alpha", 0), ("beta", 1), ("gamma", 2))}


def test_a_train_corpus_and_a_test_corpus_make_one_fold_that_never_mixes_them(caches):
    with open_cache([caches["alpha"]], [caches["beta"]]) as both:
        meta = both.meta
        assert set(meta["corpus"]) == {"alpha", "beta"} and all(":" in u for u in meta.index)
        data = fold_data(both, 1, "corpus")
        corpus_of = meta["corpus"]
        assert set(corpus_of[data.test]) == {"beta"} and len(data.test) == (corpus_of == "beta").sum()
        assert set(corpus_of[data.train]) == set(corpus_of[data.val]) == {"alpha"}
        # alpha's validation speakers are its last session's (S3), and they never train
        assert set(meta.loc[data.val, "session"]) == {"alpha:S3"}
        assert not set(data.val) & set(data.train)
        with pytest.raises(Exception, match="fold 2 is out of range"):
            fold_data(both, 2, "corpus")


def test_leave_one_corpus_out_tests_each_corpus_once(caches):
    with open_cache([caches[n] for n in ("alpha", "beta", "gamma")]) as three:
        for k, name in enumerate(("alpha", "beta", "gamma"), start=1):
            data = fold_data(three, k, "corpus")
            corpus_of = three.meta["corpus"]
            assert set(corpus_of[data.test]) == {name}
            assert name not in set(corpus_of[data.train]) | set(corpus_of[data.val])
            assert set(corpus_of[data.train]) == {"alpha", "beta", "gamma"} - {name}


def test_the_run_trains_on_one_corpus_tests_on_another_and_says_so(caches, tmp_path):
    run, (m,) = train_folds(caches["alpha"], TrainConfig(**SETTINGS), test_caches=[caches["beta"]],
                            out=tmp_path / "run", progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["protocol"] == "corpus" and len(config["cache"]) == 2
    assert config["fingerprint"]["cross_corpus"] == {"train": ["alpha"], "test": ["beta"]}
    assert m["test_speaker"] == "beta" and m["n_test"] == 6 * 4 * 3  # all of beta: 6 speakers x 4 classes x 3
    predicted = pd.read_csv(run / "fold-01" / "predictions.csv")
    assert predicted["utt_id"].str.startswith("beta:").all()
    assert summarize(run)["cross_corpus"] == "alpha -> beta"
    code, out = cli("report", run, "--no-plots")
    assert code == 0 and "cross-corpus, alpha -> beta" in out


def test_the_cli_takes_several_caches_and_test_caches(caches, tmp_path):
    code, out = cli("train-head", "--cache", caches["alpha"], "--cache", caches["beta"], "--test-cache",
                    caches["gamma"], "--all-folds", "--epochs", 1, "--ensemble", 1, "--out", tmp_path / "x", "--quiet")
    assert code == 0, out
    assert "fold 01 gamma (val last sessions)" in out
    code, out = cli("baseline", "--cache", caches["alpha"], "--test-cache", caches["beta"], "--out",
                    tmp_path / "b", "--quiet")
    assert code == 0, out
    assert json.loads((tmp_path / "b" / "fold-01" / "metrics.json").read_text())["test_speaker"] == "beta"


def fake(fingerprint: dict, classes=("angry", "happy", "neutral", "sad"), hidden=16):
    meta = pd.DataFrame({"speaker": ["s1"], "session": ["S1"]}, index=pd.Index(["u1"], name="utt_id"))
    return SimpleNamespace(fingerprint={"model": "m", "layers": [0, 1], "dtype": "float16", **fingerprint},
                           classes=tuple(classes), hidden_size=hidden, meta=meta, path=Path("x.h5"), layers=(0, 1),
                           dtype="float16", skipped=pd.DataFrame(), close=lambda: None)


@pytest.mark.parametrize("other, words", [
    (fake({"model": "other"}), "different features (model"),
    (fake({"layers": [0]}), "different features (layers"),
    (fake({}, classes=("angry", "sad")), "different emotion classes (angry, happy, neutral, sad vs angry, sad)"),
    (fake({}, hidden=32), "differ in hidden size (16 vs 32)"),
])
def test_caches_of_other_features_or_classes_are_refused_by_name(monkeypatch, tmp_path, other, words):
    made = iter([fake({}), other])
    monkeypatch.setattr(corpus_set, "FeatureCache", lambda p: next(made))
    with pytest.raises(CacheError, match=words.replace("(", r"\(").replace(")", r"\)")):
        corpus_set.CorpusSet([tmp_path / "one.h5"], [tmp_path / "two.h5"])


def test_a_plain_cache_has_no_corpus_folds(caches):
    with open_cache(caches["alpha"]) as one, pytest.raises(Exception, match="--protocol corpus needs several caches"):
        fold_data(one, 1, "corpus")


def test_a_corpus_fold_roles():
    fold = Fold(1, "gamma", "last sessions", ("alpha", "beta"), "corpus")
    assert [fold.role(g) for g in ("gamma", "gamma#val", "alpha", "alpha#val", "delta")] == \
        ["test", "test", "train", "val", ""]
