"""Damaged caches: `cli info`, `cli train-head` and a resuming `cli extract` each say, in one line,
"the cache is damaged: ..." naming the file, the utterance where there is one, and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.format import utt_key
from cli_runner import cli
from fs_fixtures import one_line_error
from tests.test_bad_rows import good_rows, write_manifest

VICTIM = "u005"  # the utterance the damage is done to


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return write_manifest(folder, good_rows(folder, 24))


def extract_args(corpus: Path, out: Path) -> list:
    return ["extract", "--dataset", "manifest", "--root", corpus, "--model", "fbank", "--out", out,
            "--workers", "0", "--quiet", "--json"]


@pytest.fixture(scope="module")
def pristine(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "F.h5"
    code, text = cli(*extract_args(corpus, out))
    assert code == 0, text
    return out


def edit(path: Path, fn) -> None:
    with h5py.File(path, "r+") as f:
        fn(f)


def set_fingerprint(f, change) -> None:
    fp = json.loads(f.attrs["fingerprint"])
    f.attrs["fingerprint"] = json.dumps(change(fp))


def replace_dataset(group, name, data) -> None:
    del group[name]
    group.create_dataset(name, data=data)


def shorter_column(f) -> None:
    speakers = f["meta/speaker"].asstr()[()]
    del f["meta/speaker"]
    f["meta"].create_dataset("speaker", data=np.array(speakers[:-1], dtype=object), dtype=h5py.string_dtype())


def set_meta(column, value):
    """The damage: the victim's /meta/<column> set to `value`."""
    def change(f):
        values = f[f"meta/{column}"][()]
        values[list(f["meta/utt_id"].asstr()[()]).index(VICTIM)] = value
        f[f"meta/{column}"][...] = values
    return change


K = utt_key(VICTIM)
DAMAGE = {  # name -> (edit, words the error must contain besides "the cache is damaged")
    "features_deleted": (lambda f: f["features"].__delitem__(K), [VICTIM, "features", "missing"]),
    "vad_deleted": (lambda f: f["vad"].__delitem__(K), [VICTIM, "VAD", "missing"]),
    "features_a_group": (lambda f: (f["features"].__delitem__(K), f["features"].create_group(K)), [VICTIM, "missing"]),
    "column_lengths": (shorter_column, ["columns have different lengths", "speaker 23"]),
    "frame_count": (set_meta("n_frames", 3), [VICTIM, "frames of features, but its n_frames is 3"]),
    "zero_frames": (set_meta("n_frames", 0), [VICTIM, "0 frames"]),
    "mask_length": (lambda f: replace_dataset(f["vad"], K, np.ones((4, 2), np.uint8)), [VICTIM, "VAD masks of shape"]),
    "hidden_size": (lambda f: f.attrs.__setitem__("hidden_size", 40), ["u000", "hidden size 80", "is 40"]),
    "fingerprint_no_layers": (lambda f: set_fingerprint(f, lambda fp: {k: v for k, v in fp.items() if k != "layers"}),
                              ["fingerprint has no 'layers'"]),
    "fingerprint_a_list": (lambda f: f.attrs.__setitem__("fingerprint", json.dumps([1, 2])), ["JSON list"]),
    "fingerprint_not_json": (lambda f: f.attrs.__setitem__("fingerprint", "{oops"), ["not JSON"]),
    "fingerprint_more_layers": (
        lambda f: (set_fingerprint(f, lambda fp: {**fp, "layers": [0, 1]}),
                   f.attrs.__setitem__("layers", np.array([0, 1]))), ["u000", "fingerprint names 2 (layers [0, 1])"]),
    "layers_attr_disagrees": (lambda f: f.attrs.__setitem__("layers", np.array([3])), ["layers attribute"]),
    "valence_inf": (set_meta("valence", np.inf), [VICTIM, "valence inf"]),
    "key_mismatch": (lambda f: f["meta/key"].__setitem__(0, "elsewhere"), ["the key 'elsewhere'"]),
    "meta_group_gone": (lambda f: f.__delitem__("meta"), ["no /meta group"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_caches_are_one_line_for_info_train_head_and_a_resuming_extract(case, corpus, pristine, tmp_path):
    cache = tmp_path / "F.h5"
    shutil.copy(pristine, cache)
    damage, words = DAMAGE[case]
    edit(cache, damage)
    for command in (["info", cache],
                    ["train-head", "--cache", cache, "--fold", "1", "--epochs", "1", "--out", tmp_path / "run",
                     "--quiet"],
                    extract_args(corpus, cache)):
        code, out = cli(*command)
        assert code == 2, (command[0], out)
        line = " ".join(one_line_error(out).split())
        assert "the cache is damaged" in line and str(cache) in line, (command[0], line)
        assert "rerun the extract command that made it" in line, line
        for w in words:
            assert w in line, (command[0], w, line)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_a_cache_truncated_mid_way_is_one_line(pristine, tmp_path, fraction):
    cache = tmp_path / "F.h5"
    data = pristine.read_bytes()
    cache.write_bytes(data[: int(len(data) * fraction)])
    for command in (["info", cache], ["train-head", "--cache", cache, "--fold", "1", "--epochs", "1", "--quiet",
                                      "--out", tmp_path / "run"]):
        code, out = cli(*command)
        assert code == 2, out
        line = one_line_error(out)
        assert str(cache) in " ".join(line.split())


def test_a_cache_with_garbage_in_the_middle_is_one_line_or_works(pristine, tmp_path):
    cache = tmp_path / "F.h5"
    data = bytearray(pristine.read_bytes())
    rng = np.random.default_rng(0)
    start = len(data) // 2
    data[start:start + 4096] = rng.bytes(4096)
    cache.write_bytes(bytes(data))
    code, out = cli("train-head", "--cache", cache, "--fold", "1", "--epochs", "1", "--quiet", "--out", tmp_path / "r")
    # Whatever the bytes hit (a feature chunk or metadata), never a traceback.
    assert code in (0, 2), out
    if code == 2:
        one_line_error(out)


def test_nan_features_of_an_utterance_are_refused_naming_it(pristine, tmp_path):
    cache = tmp_path / "F.h5"
    shutil.copy(pristine, cache)
    with h5py.File(cache, "r+") as f:
        utts = list(f["meta/utt_id"].asstr()[()])
        speakers = list(f["meta/speaker"].asstr()[()])
        victim = next(u for u, s in zip(utts, speakers) if s == "spk0")  # fold 1 tests speaker spk0
        x = f["features"][utt_key(victim)]
        x[0, 0, 0] = np.nan
    for memory in ("8", "0"):  # preloaded into RAM, and read from disk every epoch
        code, out = cli("train-head", "--cache", cache, "--fold", "1", "--epochs", "1", "--memory-gb", memory,
                        "--quiet", "--out", tmp_path / f"run{memory}")
        assert code == 2, out
        line = " ".join(one_line_error(out).split())
        assert "the cache is damaged" in line and victim in line and "non-finite" in line, line
        assert not (tmp_path / f"run{memory}" / "fold-01" / "metrics.json").exists()


def test_a_foreign_part_file_is_named_not_a_traceback(corpus, pristine, tmp_path):
    cache = tmp_path / "F.h5"
    shutil.copy(pristine, cache)
    parts = tmp_path / "F.parts"
    parts.mkdir()
    shutil.copy(pristine, parts / "part-abc.h5")
    code, out = cli(*extract_args(corpus, cache))
    assert code == 2, out
    line = " ".join(one_line_error(out).split())
    assert "the cache is damaged" in line and "part-abc.h5" in line and "move it out" in line
    (parts / "part-abc.h5").unlink()
    code, out = cli(*extract_args(corpus, cache))
    assert code == 0, out


def test_a_damaged_part_names_the_part_and_its_fix(corpus, pristine, tmp_path):
    cache = tmp_path / "F.h5"
    parts = tmp_path / "F.parts"
    parts.mkdir()
    shutil.copy(pristine, parts / "part-000001.h5")
    edit(parts / "part-000001.h5", DAMAGE["features_deleted"][0])
    code, out = cli(*extract_args(corpus, cache))
    assert code == 2, out
    line = " ".join(one_line_error(out).split())
    assert "part-000001.h5" in line and VICTIM in line and "delete that part and rerun" in line


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_finds_every_nan_and_inf_and_takes_the_largest_finite_value(dtype):
    from cache.format import all_finite

    x = np.ones((3, 4, 5), dtype)
    assert all_finite(x) and all_finite(x[:, :0])
    big = x.copy()
    big[0, 0, 0] = np.finfo(dtype).max
    assert all_finite(big) and all_finite(-big)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[1, 2, 3] = bad
        assert not all_finite(y) and not all_finite(y.transpose(1, 0, 2))
