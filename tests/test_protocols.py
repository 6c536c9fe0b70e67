"""Fold plans beside leave-one-speaker-out: leave-one-session-out and a manifest's official split."""

import csv
import json

import h5py
import pandas as pd
import pytest

from cache.reader import FeatureCache
from cli_runner import cli
from core.folds import FoldError, folds_from_config, plan, plan_session_folds, plan_split_fold
from extract import synthetic
from head_fixtures import make_cache


def iemocap_meta():
    rows = [(f"Ses0{s}{g}_{i}", f"Ses0{s}{g}", f"Ses0{s}") for s in range(1, 6) for g in "FM" for i in range(3)]
    return pd.DataFrame(rows, columns=["utt_id", "speaker", "session"]).set_index("utt_id")


def test_session_folds_test_each_session_once_and_validate_on_the_next():
    meta = iemocap_meta()
    folds = plan(meta, "session")
    assert [(f.fold, f.test, f.val) for f in folds] == [
        (1, "Ses01", "Ses02"), (2, "Ses02", "Ses03"), (3, "Ses03", "Ses04"), (4, "Ses04", "Ses05"),
        (5, "Ses05", "Ses01")]
    for f in folds:
        roles = f.roles(meta["session"])
        assert set(roles) == {"train", "val", "test"}  # every utterance has exactly one role
        assert set(meta.index[roles == "test"]) == set(meta.index[meta["session"] == f.test])
        speakers = {r: set(meta.loc[roles == r, "speaker"]) for r in ("train", "val", "test")}
        assert not speakers["train"] & speakers["test"] and not speakers["train"] & speakers["val"]
        assert len(f.train) == 3 and f.protocol == "session" and f.test_speaker == f.test
    with pytest.raises(FoldError, match="at least 3 sessions"):
        plan_session_folds(["a", "b", "a"])


def test_the_split_fold_reads_train_val_test_and_refuses_other_names():
    meta = iemocap_meta()
    meta["split"] = ["Train"] * 20 + ["dev"] * 5 + ["TEST"] * 3 + [""] * 2
    (fold,) = plan(meta, "split")
    roles = fold.roles(meta["split"])
    assert list(roles.value_counts().sort_index().items()) == [("", 2), ("test", 3), ("train", 20), ("val", 5)]
    with pytest.raises(FoldError, match="'test2'"):
        plan_split_fold(["train", "val", "test2"])
    with pytest.raises(FoldError, match="none in val"):
        plan_split_fold(["train", "test"])
    with pytest.raises(FoldError, match="needs a split column"):
        plan(iemocap_meta(), "split")
    with pytest.raises(FoldError, match="--protocol must be one of"):
        plan(meta, "utterance")


def test_session_folds_through_train_head_are_recorded_and_disjoint(tmp_path):
    cache = make_cache(tmp_path / "c.h5")  # 6 speakers in sessions S1-S3
    run = tmp_path / "run"
    code, out = cli("train-head", "--cache", cache, "--all-folds", "--protocol", "session", "--epochs", "1",
                    "--batch-size", "16", "--out", run, "--quiet")
    assert code == 0, out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["settings"]["protocol"] == "session"
    assert [(f["test"], f["val"], f["train"], f["protocol"]) for f in cfg["folds"]] == [
        ("S1", "S2", ["S3"], "session"), ("S2", "S3", ["S1"], "session"), ("S3", "S1", ["S2"], "session")]
    assert [f.test for f in folds_from_config(cfg)] == ["S1", "S2", "S3"]
    with FeatureCache(cache) as c:
        session = c.meta["session"]
    for k, test in enumerate(["S1", "S2", "S3"], start=1):
        m = json.loads((run / f"fold-{k:02d}" / "metrics.json").read_text())
        assert m["test_speaker"] == test and m["n_test"] == 48 and m["n_train"] == 48 and m["n_val"] == 48
        with (run / f"fold-{k:02d}" / "predictions.csv").open() as fh:
            ids = [r["utt_id"] for r in csv.DictReader(fh)]
        assert len(ids) == 48 and set(session[ids]) == {test}
    used = pd.read_csv(run / "utterances.csv", dtype=str, keep_default_na=False)
    assert len(used) == 144 and list(used.columns) == ["utt_id", "path", "speaker", "session", "split"]
    code, out = cli("train-head", "--cache", cache, "--fold", "1", "--epochs", "1", "--out", run, "--quiet")
    assert code == 2 and "other settings" in out  # a speaker fold never lands in a session run


@pytest.fixture(scope="module")
def split_cache(tmp_path_factory):
    """A manifest with a split column -> `cli extract` (fbank) -> a cache that carries the split."""
    root = tmp_path_factory.mktemp("split")
    manifest = synthetic.generate(root / "corpus", seed=1, n_sessions=2, utts_per_speaker=6)
    rows = list(csv.DictReader(manifest.open()))
    split = {"S01F": "train", "S01M": "train", "S02F": "Dev", "S02M": "test"}
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*rows[0], "split"])
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**r, "split": "" if (r["speaker"] == "S01F" and i % 6 == 0) else split[r["speaker"]]})
    cache = root / "f.h5"
    code, out = cli("extract", "--dataset", "manifest", "--root", manifest, "--model", "fbank", "--out", cache,
                    "--workers", "0", "--quiet", "--json")
    assert code == 0, out
    return manifest, cache


def test_the_manifest_split_is_carried_into_the_cache_and_trains_the_split_fold(split_cache, tmp_path):
    manifest, cache = split_cache
    with FeatureCache(cache) as c:
        assert dict(c.meta["split"].value_counts()) == {"train": 11, "dev": 6, "test": 6, "": 1}
    code, out = cli("manifest", "--dataset", "manifest", "--root", manifest, "--protocol", "split", "--json")
    assert code == 0, out
    assert json.loads(out)["folds"] == [{"fold": 1, "test_split": "test", "val_split": "val", "n_test": 6,
                                         "n_val": 6, "n_train": 11}]
    run = tmp_path / "run"
    code, out = cli("train-head", "--cache", cache, "--fold", "1", "--protocol", "split", "--epochs", "1",
                    "--batch-size", "8", "--out", run, "--quiet")
    assert code == 0, out
    m = json.loads((run / "fold-01" / "metrics.json").read_text())
    assert (m["n_train"], m["n_val"], m["n_test"]) == (11, 6, 6)
    with (run / "fold-01" / "predictions.csv").open() as fh:
        assert all(r["utt_id"].startswith("S02M") for r in csv.DictReader(fh))
    code, out = cli("train-head", "--cache", cache, "--fold", "2", "--protocol", "split", "--out", tmp_path / "r2")
    assert code == 2 and "fold 2 is out of range" in out


def test_a_cache_made_before_the_split_column_still_trains_and_says_why_it_cannot_split(tmp_path):
    cache = make_cache(tmp_path / "old.h5", per_class=2)
    with h5py.File(cache, "a") as f:
        del f["meta/split"]  # what a cache written before the column existed looks like
    with FeatureCache(cache) as c:
        assert set(c.meta["split"]) == {""}
    code, out = cli("train-head", "--cache", cache, "--fold", "1", "--epochs", "1", "--out", tmp_path / "r",
                    "--quiet")
    assert code == 0, out
    code, out = cli("train-head", "--cache", cache, "--fold", "1", "--protocol", "split", "--out", tmp_path / "s")
    assert code == 2 and "needs a split column" in out


def test_manifest_shows_the_session_plan(tmp_path):
    manifest = synthetic.generate(tmp_path / "c", seed=0, n_sessions=3, utts_per_speaker=2)
    code, out = cli("manifest", "--dataset", "manifest", "--root", manifest, "--protocol", "session", "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["protocol"] == "session"
    assert [(f["test_session"], f["val_session"], f["n_test"], f["n_train"]) for f in summary["folds"]] == [
        ("S01", "S02", 4, 4), ("S02", "S03", 4, 4), ("S03", "S01", 4, 4)]
    code, out = cli("manifest", "--dataset", "manifest", "--root", manifest, "--protocol", "session")
    assert code == 0 and "leave-one-session-out folds" in out
