import csv
import json

import h5py
import numpy as np
import pytest
import torch

from cache.reader import FeatureCache
from cli_runner import cli
from head_fixtures import make_cache
from heads.evaluate.report import load_run
from heads.train.batches import RamBatches, make_loader, preload

FOLD_FILES = {"metrics.json", "predictions.csv", "head.safetensors", "history.csv"}
MEMBER_FILES = {"head-2.safetensors", "history-2.csv", "head-3.safetensors", "history-3.csv"}  # --ensemble auto, small folds


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache") / "synth.h5")


def metrics(run, k):
    return json.loads((run / f"fold-{k:02d}" / "metrics.json").read_text())


def assert_same_run(a, b, path="metrics"):
    """Equal metrics up to float32 rounding: folds stacked with other folds (--jobs splits the stack) add
    and multiply in another order; every count, label and choice must still be exactly equal."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_run(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_run(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_all_folds_through_the_cli_learn_and_write_the_run_folder(cache, tmp_path):
    run = tmp_path / "run"
    code, out = cli("train-head", "--cache", cache, "--all-folds", "--epochs", 10, "--out", run, "--quiet")  # x3: the step plan
    assert code == 0, out
    assert "fold 06" in out
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["pooling"] == "sr" and config["settings"]["lr"] == 1e-3 and config["settings"]["min_steps"] == 500 and config["settings"]["sap_frames"] == 32
    assert config["fingerprint"]["model"] == "synthetic-test" and config["layers"] == [0, 1, 2]
    assert config["settings"]["ensemble"] == "auto"
    for k in range(1, 7):
        assert {p.name for p in (run / f"fold-{k:02d}").iterdir()} == FOLD_FILES | MEMBER_FILES
        assert [m["seed"] for m in metrics(run, k)["members"]] == [0, 1, 2]
    loaded = load_run(run)  # the report's own contract check of every metrics.json
    assert len(loaded.folds) == 6
    ua = [m["ua"] for m in loaded.folds]
    assert np.mean(ua) > 0.6, ua  # chance is 0.25
    code, out = cli("report", run, "--json", "--no-plots")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["folds"] == 6 and summary["ua"]["mean"] == pytest.approx(np.mean(ua))
    m = metrics(run, 3)
    assert (m["test_speaker"], m["val_speaker"], m["n_test"], m["no_speech"]) == ("S2F", "S2M", 24, 0)
    assert 1 <= m["best_epoch"] <= m["epochs_run"]
    assert np.mean([f["valence_ccc"] for f in loaded.folds]) > 0.1  # the regressors learn too
    with (run / "fold-03" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["utt_id", "true", "pred", "prob_angry", "prob_happy", "prob_neutral", "prob_sad",
                             "valence", "arousal", "valence_true", "arousal_true"]
    assert len(rows) == 24 and all(r["utt_id"].startswith("S2F_") for r in rows)
    acc = np.mean([r["true"] == r["pred"] for r in rows])
    assert acc == pytest.approx(m["wa"])
    with FeatureCache(cache) as fc:
        assert float(rows[0]["valence_true"]) == pytest.approx(fc.meta.loc[rows[0]["utt_id"], "valence"], abs=1e-6)
    with (run / "fold-03" / "history.csv").open() as fh:
        assert next(csv.reader(fh)) == ["epoch", "train_loss", "val_loss", "val_ua", "val_wa", "lr"]


def test_same_seed_same_metrics_and_parallel_jobs_match(cache, tmp_path):
    args = ("--cache", cache, "--epochs", 4, "--min-steps", 0, "--quiet")
    assert cli("train-head", *args, "--fold", 2, "--out", tmp_path / "a")[0] == 0
    assert cli("train-head", *args, "--fold", 2, "--out", tmp_path / "b")[0] == 0
    assert metrics(tmp_path / "a", 2) == metrics(tmp_path / "b", 2)
    assert cli("train-head", *args, "--fold", 2, "--out", tmp_path / "c", "--seed", 1)[0] == 0
    assert metrics(tmp_path / "c", 2) != metrics(tmp_path / "a", 2)
    # over the memory budget: read from disk every epoch, same numbers as from RAM
    code, out = cli("train-head", *args, "--fold", 2, "--out", tmp_path / "disk", "--memory-gb", 0)
    assert code == 0 and "reading them from disk every epoch" in out, out
    assert metrics(tmp_path / "disk", 2) == metrics(tmp_path / "a", 2)
    # two folds in two processes, each with one thread: the same numbers as in this process
    code, out = cli("train-head", *args, "--all-folds", "--out", tmp_path / "p", "--jobs", 2)
    assert code == 0, out
    assert_same_run(metrics(tmp_path / "p", 2), metrics(tmp_path / "a", 2))


@pytest.mark.parametrize("layers", [[0, 1, 2], [2]])
def test_ram_batches_equal_the_cache_datasets_batches(cache, layers):
    with FeatureCache(cache) as fc:
        ids = list(fc.meta.index[::3])
        from_disk = make_loader(fc, ids, layers=layers, vad_mode=3, batch_size=8, shuffle=True, seed=5)
        assert not isinstance(from_disk, RamBatches)
        assert preload(fc, layers, memory_gb=1)
        from_ram = make_loader(fc, ids, layers=layers, vad_mode=3, batch_size=8, shuffle=True, seed=5)
        assert isinstance(from_ram, RamBatches)
        assert len(from_ram) == len(from_disk)
        for a, b in zip(from_disk, from_ram):
            assert a["utt_id"] == b["utt_id"]
            pad = a["padding_mask"]
            assert torch.equal(pad, b["padding_mask"]) and torch.equal(a["vad_mask"], b["vad_mask"])
            assert torch.equal(a["features"][pad], b["features"][pad].float())
            for key in ("emotion", "valence", "arousal"):
                torch.testing.assert_close(a[key], b[key], equal_nan=True)
        if layers == [2]:  # a preload of other layers is not used for these
            assert not isinstance(make_loader(fc, ids, layers=[1], vad_mode=3, batch_size=8, shuffle=False,
                                              seed=0), RamBatches)


def test_fixed_layer_gap_and_no_speech_counting(tmp_path):
    cache = make_cache(tmp_path / "ns.h5", no_speech_every=5, per_class=3)
    code, out = cli("train-head", "--cache", cache, "--fold", 1, "--layer", 2, "--pooling", "gap", "--epochs", 3,
                    "--out", tmp_path / "run", "--quiet")
    assert code == 0, out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["layers"] == [2]
    with FeatureCache(cache) as fc:
        test_ids = fc.meta.index[fc.meta["speaker"] == "S1F"]
        expected = sum(not fc.vad(u, 3).any() for u in test_ids)
    assert expected > 0 and metrics(tmp_path / "run", 1)["no_speech"] == expected


def test_corpora_with_only_one_kind_of_label(tmp_path):
    dims = make_cache(tmp_path / "dims.h5", emotions=False, per_class=3)
    code, out = cli("train-head", "--cache", dims, "--fold", 1, "--epochs", 3, "--out", tmp_path / "d", "--quiet")
    assert code == 0, out
    m = metrics(tmp_path / "d", 1)
    assert m["ua"] is None and m["valence_mae"] is not None and np.isfinite(m["arousal_ccc"])
    cats = make_cache(tmp_path / "cats.h5", dims=False, per_class=3)
    code, out = cli("train-head", "--cache", cats, "--fold", 1, "--epochs", 3, "--out", tmp_path / "c", "--quiet")
    assert code == 0, out
    m = metrics(tmp_path / "c", 1)
    assert m["ua"] is not None and m["valence_mae"] is None and m["arousal_ccc"] is None


def test_ablate_runs_gap_sap_and_sr_and_prints_them_side_by_side(cache, tmp_path):
    code, out = cli("ablate", "--cache", cache, "--out", tmp_path / "abl", "--epochs", 2, "--min-steps", 0, "--quiet")
    assert code == 0, out
    for pooling in ("gap", "sap", "sr"):
        assert json.loads((tmp_path / "abl" / pooling / "config.json").read_text())["settings"]["pooling"] == pooling
        assert len(load_run(tmp_path / "abl" / pooling).folds) == 6
    assert "GAP" in out and "SAP" in out and "SR" in out


def unlabelled_speaker_cache(path, speaker="S1F"):
    """A copy of the synthetic cache where one speaker's labels are all removed (plain h5py edit)."""
    make_cache(path, per_class=3)
    with h5py.File(path, "r+") as f:
        spk = f["meta/speaker"].asstr()[:]
        emo = f["meta/emotion"].asstr()[:].astype(object)
        emo[spk == speaker] = ""
        del f["meta/emotion"]
        f.create_dataset("meta/emotion", data=emo.astype("S"), dtype=h5py.string_dtype())
        for col in ("valence", "arousal"):
            v = f[f"meta/{col}"][:]
            v[spk == speaker] = np.nan
            f[f"meta/{col}"][:] = v
    return path


@pytest.mark.parametrize("case, expected", [
    ("layer", "the cache holds layers 0, 1, 2; layer 24 is not among them"),
    ("vad", "--vad-mode must be one of 0, 1, 2, 3"),
    ("ensemble", "--ensemble must be auto or a whole number of heads per fold of at least 1, not 'three'"),
    ("fold", "fold 7 is out of range: this corpus has folds 1 to 6"),
    ("neither", "give exactly one of --fold K or --all-folds"),
    ("missing", "does not exist"),
    ("garbage", "is not an HDF5 file or is corrupted"),
    ("truncated", "is not an HDF5 file or is corrupted"),
    ("no_labels", "has no labels at all"),
    ("empty_test_speaker", "fold 1 cannot be trained: its test speaker S1F has no labelled utterances"),
    ("empty_val_speaker", "fold 1 cannot be trained: its validation speaker S1M has no labelled utterances"),
    ("other_settings", "already holds a run with other settings"),
])
def test_bad_input_is_one_sentence(cache, tmp_path, case, expected):
    target, extra = cache, []
    if case == "layer":
        extra = ["--layer", 24]
    elif case == "vad":
        extra = ["--vad-mode", 4]
    elif case == "ensemble":
        extra = ["--ensemble", "three"]
    elif case == "fold":
        extra = ["--fold", 7]
    elif case == "missing":
        target = tmp_path / "nope.h5"
    elif case == "garbage":
        target = tmp_path / "garbage.h5"
        target.write_bytes(np.random.default_rng(0).bytes(4000))
    elif case == "truncated":
        target = tmp_path / "cut.h5"
        target.write_bytes(cache.read_bytes()[:6000])
    elif case == "no_labels":
        target = make_cache(tmp_path / "none.h5", emotions=False, dims=False, per_class=1)
    elif case == "empty_test_speaker":
        target = unlabelled_speaker_cache(tmp_path / "u.h5", "S1F")
    elif case == "empty_val_speaker":
        target = unlabelled_speaker_cache(tmp_path / "u.h5", "S1M")
    elif case == "other_settings":
        assert cli("train-head", "--cache", cache, "--fold", 1, "--epochs", 1, "--out", tmp_path / "r", "--quiet")[0] == 0
        extra = ["--pooling", "gap"]
    fold = [] if case in ("neither", "fold") else ["--fold", 1]
    code, out = cli("train-head", "--cache", target, *fold, *extra, "--epochs", 1, "--out", tmp_path / "r", "--quiet")
    assert code == 2, out
    lines = [x for x in out.strip().splitlines() if x]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out
    assert "Traceback" not in out
