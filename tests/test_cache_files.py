"""A finished cache is copied, moved, renamed and packed (issue 29): an index without its data
folder is one line that never advises deleting anything, an index moved with its folder keeps
working, truly damaged files name what is lost, and `cli pack` makes one self-contained file whose
contents equal the linked cache's, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import cache.writer
from cache.contents import cache_files
from cache.reader import FeatureCache
from cli_runner import cli
from fs_fixtures import one_line_error, small_disk
from tests.test_bad_rows import good_rows, write_manifest

N = 24
PART = 8  # utterances per part: the fixture cache is an index plus 3 data files
ODD = "a folder with spaces/ünïcødé 目录"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return write_manifest(folder, good_rows(folder, N))


def extract_args(corpus: Path, out: Path, *extra) -> list:
    return ["extract", "--dataset", "manifest", "--root", corpus, "--model", "fbank", "--out", out,
            "--workers", "0", "--quiet", "--json", *extra]


def extract(corpus: Path, out: Path, *extra) -> tuple[int, str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache.writer, "PART_UTTERANCES", PART)
        return cli(*extract_args(corpus, out, *extra))


@pytest.fixture(scope="module")
def linked(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("linked") / "F.h5"
    code, text = extract(corpus, out)
    assert code == 0, text
    assert [p.relative_to(out.parent).as_posix() for p in cache_files(out)] == [
        "F.h5", "F.data/part-000001.h5", "F.data/part-000002.h5", "F.data/part-000003.h5"]
    return out


@pytest.fixture(scope="module")
def reference(linked):
    return snapshot(linked)


def snapshot(path: Path) -> dict:
    """Everything a reader sees, through FeatureCache: rows, skips, fingerprint, features and masks as bytes."""
    with FeatureCache(path) as c:
        return {"meta": repr(c.meta.to_dict(orient="index")), "skipped": c.skipped.to_dict(orient="records"),
                "fingerprint": c.fingerprint,
                "features": {u: (c.features(u).dtype.str, c.features(u).tobytes()) for u in c.meta.index},
                "vad": {u: np.stack([c.vad(u, m) for m in range(4)]).tobytes() for u in c.meta.index}}


def plain(path: Path) -> dict:
    """Everything plain h5py reads through the file (following links where there are any)."""
    with h5py.File(path, "r") as f:
        keys = list(f["meta/key"].asstr()[()])
        return {"fingerprint": json.loads(f.attrs["fingerprint"]),
                "attrs": {k: str(f.attrs[k]) for k in ("classes", "layers", "hidden_size", "dtype", "sapser_format")},
                "meta": {k: f["meta"][k][()].tolist() for k in f["meta"]},
                "skipped": {k: f["skipped"][k][()].tolist() for k in f["skipped"]},
                "features": {k: (f["features"][k].dtype.str, f["features"][k][()].tobytes()) for k in keys},
                "vad": {k: f["vad"][k][()].tobytes() for k in keys}}


def copy_cache(src: Path, folder: Path, *, data: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, folder / src.name)
    if data:
        shutil.copytree(src.with_suffix(".data"), folder / src.with_suffix(".data").name)
    return folder / src.name


def commands(cache: Path, corpus: Path, run: Path) -> list[list]:
    """Every command that reads a cache: info, train-head, and extract resuming it."""
    return [["info", cache],
            ["train-head", "--cache", cache, "--fold", "1", "--epochs", "1", "--out", run, "--quiet"],
            extract_args(corpus, cache)]


# --- copied or moved without its folder: one line, nothing advised that loses work


def test_an_index_copied_without_its_folder_says_so_and_never_advises_deleting(linked, reference, corpus,
                                                                              tmp_path, monkeypatch):
    alone = copy_cache(linked, tmp_path / "elsewhere", data=False)
    before = alone.read_bytes()
    # from the original folder, where HDF5 itself would find F.data/ through the working directory
    monkeypatch.chdir(linked.parent)
    for command in commands(alone, corpus, tmp_path / "run"):
        code, out = cli(*command)
        assert code == 2, (command[0], out)
        line = " ".join(one_line_error(out).split())
        assert f"{alone}: its features live in F.data/ beside it, which is missing" in line, line
        assert "copy or move F.h5 together with F.data/, or pack it into one file (`cli pack F.h5`)" in line, line
        assert "delete" not in line.lower() and "damaged" not in line, line
    assert alone.read_bytes() == before and not (tmp_path / "run").exists()
    assert sorted(p.name for p in alone.parent.iterdir()) == ["F.h5"]  # nothing written beside it
    assert snapshot(linked) == reference  # the original untouched


def test_an_index_with_part_of_its_folder_says_incomplete_and_names_a_missing_file(linked, tmp_path):
    partial = copy_cache(linked, tmp_path / "partial")
    (partial.parent / "F.data" / "part-000002.h5").unlink()  # an interrupted copy
    code, out = cli("info", partial)
    line = " ".join(one_line_error(out).split())
    assert code == 2 and "which is incomplete (1 of its 3 data files are not there, e.g. F.data/part-000002.h5)" in line
    assert "copy or move F.h5 together with F.data/" in line and "delete" not in line.lower()


def test_an_index_moved_with_its_folder_works_from_anywhere(linked, reference, corpus, tmp_path, monkeypatch):
    copied = copy_cache(linked, tmp_path / "copy")
    moved_dir = tmp_path / ODD
    moved_dir.parent.mkdir(parents=True)
    os.rename(copied.parent, moved_dir)  # index and folder moved together, to spaces and unicode
    moved = moved_dir / "F.h5"
    monkeypatch.chdir(tmp_path)  # another working directory: links resolve from the index's folder
    assert snapshot(moved) == reference
    assert plain(moved) == plain(linked)
    code, out = cli("info", moved, "--json")
    assert code == 0, out
    stored = json.loads(out)["storage"]
    assert stored == [{"file": str(moved), "self_contained": False, "file_bytes": moved.stat().st_size,
                       "data_folders": ["F.data"], "data_files": 3, "data_bytes": stored[0]["data_bytes"]}]
    code, out = cli(*extract_args(corpus, moved))  # a resume finds everything done
    assert code == 0 and json.loads(out)["planned"] == 0 and json.loads(out)["resumed_from"] == N
    assert snapshot(moved) == reference


def test_a_renamed_index_keeps_its_folder_when_a_writer_adds_to_it(linked, reference, tmp_path):
    copied = copy_cache(linked, tmp_path / "renamed")
    renamed = copied.with_name("G.h5")
    os.rename(copied, renamed)  # G.h5 still links F.data/
    assert snapshot(renamed) == reference
    fp = FeatureCache(renamed).fingerprint
    from core.records import Utterance

    x = np.arange(3 * 80, dtype=np.float32).reshape(3, 1, 80) / 7
    with cache.writer.CacheWriter(renamed, fp) as w:
        w.add(Utterance("z_new", "/z.wav", "spk9", "S9", "sad"), x, np.ones((4, 3), bool), duration=0.1,
              truncated=False)
    after = snapshot(renamed)
    assert set(after["features"]) == set(reference["features"]) | {"z_new"}
    assert all(after["features"][u] == reference["features"][u] for u in reference["features"])
    assert {p.parent.name for p in cache_files(renamed)[1:]} == {"F.data", "G.data"}


# --- truly damaged: the message names what is lost, and its advice restores the cache


def test_a_damaged_data_file_names_what_is_lost_and_its_advice_restores_the_cache(linked, reference, corpus,
                                                                                 tmp_path):
    cache_ = copy_cache(linked, tmp_path / "c")
    victim = cache_.parent / "F.data" / "part-000002.h5"
    victim.write_bytes(victim.read_bytes()[:2000])  # truncated by a failing disk
    code, out = cli("info", cache_)
    line = " ".join(one_line_error(out).split())
    assert code == 2 and line.startswith(f"error: the cache is damaged: {victim}: "), line
    assert f"the features of its {PART} utterance(s) are lost: move part-000002.h5 out of F.data/, delete the " \
           "index F.h5 (it holds no features) and rerun the extract command that made it" in line, line
    victim.rename(tmp_path / "part-000002.h5")  # following the advice
    cache_.unlink()
    code, out = cli(*extract_args(corpus, cache_))
    assert code == 0, out
    assert json.loads(out)["written"] == PART and json.loads(out)["resumed_from"] == N - PART
    assert snapshot(cache_) == reference


def test_a_damaged_index_is_rebuilt_from_its_folder_without_extracting_again(linked, reference, corpus, tmp_path):
    cache_ = copy_cache(linked, tmp_path / "c")
    with h5py.File(cache_, "r+") as f:
        del f["meta/speaker"]
    code, out = cli("info", cache_)
    line = " ".join(one_line_error(out).split())
    assert code == 2 and "the cache is damaged" in line and "speaker" in line, line
    assert "F.h5 is only an index and the features in F.data/ are intact: delete F.h5 and rerun the extract " \
           "command that made it to rebuild the index (nothing is extracted again)" in line, line
    cache_.unlink()
    code, out = cli("info", cache_)  # the folder without its index
    assert code == 2 and "F.data/ beside it holds finished features" in one_line_error(out)
    code, out = cli(*extract_args(corpus, cache_))
    assert code == 0 and json.loads(out)["written"] == 0, out
    assert snapshot(cache_) == reference


# --- pack: one self-contained file with the same contents


def external_links(path: Path) -> list[str]:
    found = []
    with h5py.File(path, "r") as f:
        for group in ("features", "vad"):
            found += [k for k in f[group] if not isinstance(f[group].get(k, getlink=True), h5py.HardLink)]
    return found


def test_pack_out_writes_one_file_equal_to_the_linked_cache_that_every_command_reads(linked, reference, corpus,
                                                                                     tmp_path, monkeypatch):
    packed = tmp_path / "packed" / "P.h5"
    code, out = cli("pack", linked, "--out", packed)
    assert code == 0 and f"one self-contained file, {N} utterances" in out, out
    assert snapshot(linked) == reference and len(cache_files(linked)) == 4  # the source is kept as it was
    assert external_links(packed) == [] and cache_files(packed) == [packed]
    alone = tmp_path / "machine 2" / "P.h5"  # copied alone, as any HDF5 file
    alone.parent.mkdir()
    shutil.copy(packed, alone)
    monkeypatch.chdir(alone.parent)
    assert snapshot(alone) == reference
    assert plain(alone) == plain(linked)
    code, out = cli("info", alone, "--json")
    assert code == 0 and json.loads(out)["storage"][0]["self_contained"] is True
    for command in commands(alone, corpus, tmp_path / "run"):
        code, out = cli(*command)
        assert code == 0, (command[0], out)
    assert (tmp_path / "run" / "fold-01" / "metrics.json").is_file()
    assert snapshot(alone) == reference  # the resume found nothing to do and changed nothing


def test_pack_in_place_survives_a_kill_at_every_step(linked, reference, tmp_path):
    from cache.pack import pack_cache
    from kill_points import KillAt, Killed

    counted = copy_cache(linked, tmp_path / "count")
    with pytest.MonkeyPatch.context() as mp:
        counter = KillAt(None).install(mp)
        pack_cache(counted)
    assert counter.calls >= 6, counter.log
    for n in range(counter.calls):
        cache_ = copy_cache(linked, tmp_path / f"k{n:02d}")
        with pytest.MonkeyPatch.context() as mp:
            KillAt(n).install(mp)
            with pytest.raises(Killed):
                pack_cache(cache_)
        assert snapshot(cache_) == reference, n  # readable at every moment: the old index or the packed file
        done = pack_cache(cache_)  # rerun: finishes (or redoes) the pack
        assert snapshot(cache_) == reference, n
        assert cache_files(cache_) == [cache_] and external_links(cache_) == [], n
        assert sorted(p.name for p in cache_.parent.iterdir()) == ["F.h5"], (n, done)


def test_after_a_pack_in_place_a_new_part_under_an_absorbed_name_is_never_deleted(linked, reference, tmp_path):
    """A writer extending a packed F.h5 numbers its parts from 1 again; killed before it wrote the
    index, its new part sits where an absorbed file was named. Tidying up must keep it."""
    from cache.pack import finish_pack, pack_cache
    from core.records import Utterance

    cache_ = copy_cache(linked, tmp_path / "c")
    pack_cache(cache_)
    fp = FeatureCache(cache_).fingerprint
    other = tmp_path / "new" / "N.h5"  # one new utterance, as a writer's part would hold it
    with cache.writer.CacheWriter(other, fp) as w:
        w.add(Utterance("z_new", "/z.wav", "spk9", "S9", "sad"), np.ones((3, 1, 80), np.float32),
              np.ones((4, 3), bool), duration=0.1, truncated=False)
    (cache_.parent / "F.data").mkdir()
    shutil.copy(other, cache_.parent / "F.data" / "part-000001.h5")
    assert finish_pack(cache_) == [] and (cache_.parent / "F.data" / "part-000001.h5").exists()
    with cache.writer.CacheWriter(cache_, fp):  # the rerun links it
        pass
    after = snapshot(cache_)
    assert set(after["features"]) == set(reference["features"]) | {"z_new"}


def test_pack_in_place_then_copying_the_file_alone_works(linked, reference, tmp_path):
    cache_ = copy_cache(linked, tmp_path / "c")
    code, out = cli("pack", cache_)
    assert code == 0 and "deleted the 3 data file(s) it absorbed" in out, out
    assert sorted(p.name for p in cache_.parent.iterdir()) == ["F.h5"]
    code, out = cli("pack", cache_)  # already one file: nothing to do, nothing lost
    assert code == 0 and snapshot(cache_) == reference
    elsewhere = tmp_path / "usb" / "F.h5"
    elsewhere.parent.mkdir()
    shutil.move(cache_, elsewhere)
    assert snapshot(elsewhere) == reference and plain(elsewhere) == plain(linked)


def test_pack_is_refused_in_one_line_when_the_disk_cannot_hold_it(linked, reference, tmp_path):
    with small_disk(tmp_path / "small", "64k") as disk:
        code, out = cli("pack", linked, "--out", disk / "P.h5")
        line = one_line_error(out)
        assert code == 2 and "out of disk space: writing" in line and "needs about" in line, line
        assert list(disk.iterdir()) == []  # no torn or temporary file
    assert snapshot(linked) == reference


def test_pack_refusals_are_one_line(linked, corpus, tmp_path):
    code, out = cli("pack", tmp_path / "none.h5")
    assert code == 2 and "no cache at" in one_line_error(out)
    cache_ = copy_cache(linked, tmp_path / "c")
    other = copy_cache(linked, tmp_path / "d")
    code, out = cli("pack", cache_, "--out", other)
    assert code == 2 and "already exists" in one_line_error(out)
    (cache_.parent / "F.parts").mkdir()
    shutil.copy(cache_.parent / "F.data" / "part-000001.h5", cache_.parent / "F.parts" / "part-000009.h5")
    code, out = cli("pack", cache_)
    assert code == 2 and "unfinished parts" in one_line_error(out)


def test_pack_merges_a_shard_set_into_one_file_equal_to_a_single_run(corpus, reference, tmp_path):
    base = tmp_path / "S.h5"
    for i in (1, 2):
        code, out = extract(corpus, base, "--shard", f"{i}/2")
        assert code == 0, out
    code, out = cli("pack", base)
    assert code == 0, out
    single = snapshot(base)
    assert {k: v for k, v in single.items() if k != "fingerprint"} == \
        {k: v for k, v in reference.items() if k != "fingerprint"}
    assert single["fingerprint"] == reference["fingerprint"]
    assert base.with_name("S.shard-1-of-2.h5").exists()  # the shards are kept
