"""The feature cache: write-then-read, layers, fingerprints, locks, shards, preload, dataset, info."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cache.contents as contents_module
import cache.merge as merge_module
import cache.parts as parts_module
import cache.writer as writer_module
from cache.format import CacheError, shard_of, shard_path, utt_key
from cache.info import cache_info
from cache.merge import merge_shards
from cache.reader import FeatureCache
from cache.torch_dataset import CacheDataset, collate
from cache.writer import CacheWriter
from cli import app
from core.records import CLASSES_4, Utterance

LAYERS = [0, 3, 5]  # hidden-state indices stored: not 0..L-1, so index/position mix-ups show
D = 8
FP = {"model": "tiny", "revision": "abc", "layers": LAYERS, "dtype": "float16", "sample_rate": 16000,
      "frame_window": 400, "frame_stride": 320, "vad": "webrtcvad", "max_seconds": 19.0,
      "dataset": "synthetic", "classes": list(CLASSES_4), "hidden_size": D}


def utterance(i: int) -> Utterance:
    emotion = [*CLASSES_4, None][i % 5]
    return Utterance(utt_id=f"Ses0{i % 3}_u{i:03d}", path=f"/corpus/{i}.wav", speaker=f"spk{i % 3}",
                     session=f"S{i % 3}", emotion=emotion, valence=math.nan if i % 4 == 0 else 1.0 + i / 10,
                     arousal=math.nan if i % 6 == 5 else 4.0 - i / 10, dataset="synthetic")


def arrays(utt_id: str, n_layers: int = len(LAYERS)) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (T, L, D) float32 features and (4, T) VAD for an id: equal on every run."""
    rng = np.random.default_rng(zlib.crc32(utt_id.encode()))
    t = int(rng.integers(3, 12))
    return (rng.normal(size=(t, n_layers, D)) * 3).astype(np.float32), rng.random((4, t)) > 0.4


def write(path: Path, ids: range, fp: dict = FP, **kw) -> Path:
    with CacheWriter(path, fp, **kw) as w:
        for i in ids:
            u = utterance(i)
            x, v = arrays(u.utt_id)
            w.add(u, x, v, duration=x.shape[0] * 0.02, truncated=i % 2 == 1)
        w.skip("broken.wav", "unreadable_audio", "bad header")
    return w.path


def contents(path: Path | list[Path]) -> dict:
    """Everything a cache holds, as comparable Python objects (feature bytes included)."""
    with FeatureCache(path) as c:
        return {
            "meta": c.meta.to_dict(orient="index").__repr__(),
            "skipped": c.skipped.to_dict(orient="records"),
            "features": {u: c.features(u).tobytes() for u in c.meta.index},
            "vad": {u: np.stack([c.vad(u, m) for m in range(4)]).tobytes() for u in c.meta.index},
            "fingerprint": c.fingerprint,
        }


def test_round_trip_features_masks_and_metadata(tmp_path):
    path = write(tmp_path / "c.h5", range(12), part_utterances=5)
    assert not (tmp_path / "c.parts").exists() and not (tmp_path / "c.h5.lock").exists()
    with FeatureCache(path) as c:
        assert c.layers == tuple(LAYERS) and c.hidden_size == D and c.classes == CLASSES_4
        assert c.fingerprint == {**FP, "format_version": 1}
        assert list(c.meta.index) == sorted(utterance(i).utt_id for i in range(12))
        for i in range(12):
            u = utterance(i)
            x, v = arrays(u.utt_id)
            got = c.features(u.utt_id)
            assert got.dtype == np.float16 and got.shape == x.shape
            np.testing.assert_array_equal(got, x.astype(np.float16))
            np.testing.assert_allclose(got, x, rtol=1e-3, atol=1e-3)
            for m in range(4):
                np.testing.assert_array_equal(c.vad(u.utt_id, m), v[m])
            row = c.meta.loc[u.utt_id]
            assert (row.speaker, row.session, row.emotion, row.path, row.dataset) == (
                u.speaker, u.session, u.emotion, u.path, u.dataset)
            assert row.n_frames == x.shape[0] and row.truncated == (i % 2 == 1)
            assert row.duration == pytest.approx(x.shape[0] * 0.02)
            for dim in ("valence", "arousal"):  # each its own column (they differ, NaN at other utterances)
                stored, given = getattr(row, dim), getattr(u, dim)
                assert (math.isnan(stored) and math.isnan(given)) or stored == given, (u.utt_id, dim)
        assert c.skipped.to_dict(orient="records") == [
            {"item": "broken.wav", "reason": "unreadable_audio", "detail": "bad header"}]


def test_plain_h5py_reads_the_documented_layout(tmp_path):
    path = write(tmp_path / "c.h5", range(4))
    u = utterance(2)
    x, v = arrays(u.utt_id)
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["fingerprint"])["model"] == "tiny"
        layers = list(f.attrs["layers"])
        key = f["meta/key"].asstr()[list(f["meta/utt_id"].asstr()[()]).index(u.utt_id)]
        ds = f["features"][key]
        assert ds.shape == (len(LAYERS), x.shape[0], D) and ds.chunks == (1, x.shape[0], D)
        np.testing.assert_array_equal(ds[layers.index(5)], x[:, 2].astype(np.float16))
        np.testing.assert_array_equal(f["vad"][key][()], v.astype(np.uint8))


def test_layer_selection_and_its_errors(tmp_path):
    path = write(tmp_path / "c.h5", range(3))
    u = utterance(1).utt_id
    x, _ = arrays(u)
    with FeatureCache(path) as c:
        np.testing.assert_array_equal(c.features(u, [5, 0]), x[:, [2, 0]].astype(np.float16))
        np.testing.assert_array_equal(c.features(u, [3, 5]), x[:, [1, 2]].astype(np.float16))
        with pytest.raises(CacheError, match=r"layer\(s\) 1 not in this cache; it holds layers 0, 3, 5"):
            c.features(u, [1])
        with pytest.raises(CacheError, match="unknown VAD mode 4"):
            c.vad(u, 4)
        with pytest.raises(CacheError, match="'nope' is not in"):
            c.features("nope")


def test_mask_length_and_shapes_are_checked_at_write_time(tmp_path):
    with CacheWriter(tmp_path / "c.h5", FP) as w:
        x, v = arrays("a")
        with pytest.raises(ValueError, match=f"VAD mask is \\(4, {x.shape[0] - 1}\\) but features have {x.shape[0]} frames"):
            w.add(utterance(0), x, v[:, :-1], duration=1.0, truncated=False)
        with pytest.raises(ValueError, match="2 layers"):
            w.add(utterance(0), x[:, :2], v, duration=1.0, truncated=False)
        assert not w.done


def test_a_different_fingerprint_is_refused_naming_the_keys(tmp_path):
    path = write(tmp_path / "c.h5", range(3))
    other = {**FP, "model": "other", "max_seconds": 16.0}
    with pytest.raises(CacheError, match=r"different settings \(max_seconds: 19\.0 \(cache\) vs 16\.0 \(now\); model"):
        CacheWriter(path, other)
    # also while only unfinished parts exist
    w = CacheWriter(tmp_path / "d.h5", FP, part_utterances=1)
    w.add(utterance(0), *arrays(utterance(0).utt_id), duration=1.0, truncated=False)
    w.abort()
    with pytest.raises(CacheError, match="model"):
        CacheWriter(tmp_path / "d.h5", other)
    assert "model" in str(pytest.raises(CacheError, CacheWriter, tmp_path / "d.h5", {**FP, "model": "x"}).value)


def test_append_adds_to_a_finished_cache(tmp_path):
    path = write(tmp_path / "c.h5", range(5))
    with CacheWriter(path, FP) as w:
        assert w.done == {utterance(i).utt_id for i in range(5)} | {"broken.wav"}
        for i in range(5, 8):
            w.add(utterance(i), *arrays(utterance(i).utt_id), duration=0.1 * i, truncated=i % 2 == 1)
        w.skip("broken.wav", "unreadable_audio", "bad header")  # recorded again: a no-op
    write(tmp_path / "one.h5", range(8))
    a, b = contents(path), contents(tmp_path / "one.h5")
    assert a["features"] == b["features"] and a["vad"] == b["vad"] and a["skipped"] == b["skipped"]


def test_a_second_live_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    path = tmp_path / "c.h5"
    first = CacheWriter(path, FP)
    with pytest.raises(CacheError, match=f"being written by another process \\(PID {os.getpid()}"):
        CacheWriter(path, FP)
    code = f"from cache.writer import CacheWriter; CacheWriter({str(path)!r}, {FP!r})"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert other.returncode != 0 and "being written by another process" in other.stderr
    first.close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (tmp_path / "c.h5.lock").write_text(dead.stdout)  # a stale lock: its PID is gone
    CacheWriter(path, FP).close()


def test_shards_read_as_one_cache_and_merge_equal_a_single_run(tmp_path):
    single = write(tmp_path / "one.h5", range(20))
    n = 3
    for i in range(n):
        write(tmp_path / "c.h5", [k for k in range(20) if shard_of(utterance(k).utt_id, n) == i], shard=(i, n))
    shards = [shard_path(tmp_path / "c.h5", (i, n)) for i in range(n)]
    assert all(p.exists() for p in shards) and not (tmp_path / "c.h5").exists()
    assert [p.name for p in shards] == ["c.shard-1-of-3.h5", "c.shard-2-of-3.h5", "c.shard-3-of-3.h5"]
    want = contents(single)
    assert contents(tmp_path / "c.h5") == want  # base path: the shards are found
    assert contents(shards[::-1]) == want
    merged = merge_shards(shards, tmp_path / "merged.h5")
    assert contents(merged) == want
    with h5py.File(merged, "r") as f:
        assert "shard" not in json.loads(f.attrs["fingerprint"])
    with pytest.raises(CacheError, match="shard\\(s\\) 2 of 3 missing"):
        FeatureCache([shards[0], shards[2]])
    with CacheWriter(tmp_path / "x.h5", {**FP, "model": "other"}, shard=(1, 3)):
        pass
    with pytest.raises(CacheError, match="model differ"):
        FeatureCache([shards[0], tmp_path / "x.shard-2-of-3.h5", shards[2]])


def test_preload_respects_the_budget_and_serves_from_ram(tmp_path):
    path = write(tmp_path / "c.h5", range(6))
    with FeatureCache(path) as c:
        frames = int(c.meta.n_frames.sum())
        need = frames * 2 * D * 2 + 4 * frames
        with pytest.raises(CacheError, match=f"needs {need / 2**30:.2f} GiB, over the budget"):
            c.preload([0, 5], need - 1)
        expected = {u: c.features(u, [5, 0]) for u in c.meta.index}
        c.preload([0, 5], need)
        ram, offsets = c.preloaded()
        assert ram.shape == (frames, 2, D) and ram.flags.c_contiguous and c.preloaded_bytes == need
        c.close()  # the RAM copy needs no file
        c.paths = [tmp_path / "gone.h5"]
        for u, x in expected.items():
            np.testing.assert_array_equal(c.features(u, [5, 0]), x)
            start, t = offsets[u]
            np.testing.assert_array_equal(ram[start:start + t, 1], x[:, 0])


def test_dataset_and_collate_pad_and_label(tmp_path):
    path = write(tmp_path / "c.h5", range(10))
    with FeatureCache(path) as c:
        ids = [utterance(i).utt_id for i in (0, 1, 4)]  # angry, happy, no emotion
        ds = CacheDataset(c, ids, layers=[5, 3], vad_mode=2)
        batch = collate([ds[i] for i in range(3)])
        lengths = [arrays(u)[0].shape[0] for u in ids]
        b, t = 3, max(lengths)
        assert batch["features"].shape == (b, t, 2, D) and batch["features"].dtype == torch.float32
        assert batch["padding_mask"].shape == (b, t) and batch["vad_mask"].shape == (b, t)
        for i, (u, n) in enumerate(zip(ids, lengths)):
            x, v = arrays(u)
            np.testing.assert_array_equal(batch["features"][i, :n].numpy(), x[:, [2, 1]].astype(np.float16).astype(np.float32))
            assert (batch["features"][i, n:] == 0).all()
            assert batch["padding_mask"][i].tolist() == [True] * n + [False] * (t - n)
            assert batch["vad_mask"][i].tolist() == v[2].tolist() + [False] * (t - n)
        assert batch["emotion"].tolist() == [0, 1, -1]
        assert math.isnan(batch["valence"][0]) and batch["valence"][1] == pytest.approx(1.1)
        assert batch["utt_id"] == ids
        loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=2)
        assert [u for bt in loader for u in bt["utt_id"]] == ids  # workers open their own handles
        clone = pickle.loads(pickle.dumps(c))  # what a spawn-started worker gets: no open handles
        np.testing.assert_array_equal(clone.features(ids[0], [5]), c.features(ids[0], [5]))
        with pytest.raises(CacheError, match="not in"):
            CacheDataset(c, ["nope"], layers=None, vad_mode=0)
        with pytest.raises(CacheError, match="unknown VAD mode"):
            CacheDataset(c, ids, layers=None, vad_mode=7)


def test_float16_overflow_falls_back_to_float32_and_non_finite_is_skipped(tmp_path):
    big, _ = arrays("big")
    big[0, 1, 2] = 1.0e5  # beyond float16's 65504
    nan, _ = arrays("nan")
    nan[1, 0, 0] = np.nan
    with CacheWriter(tmp_path / "c.h5", FP) as w:
        for i, x in ((0, big), (1, arrays(utterance(1).utt_id)[0]), (2, nan)):
            w.add(utterance(i), x, np.ones((4, x.shape[0]), bool), duration=1.0, truncated=False)
    assert w.n_fallback == 1 and w.n_nonfinite == 1
    with FeatureCache(w.path) as c:
        ids = [utterance(i).utt_id for i in range(3)]
        assert list(c.meta.index) == ids[:2]
        assert c.meta.float32_fallback.tolist() == [True, False]
        got = c.features(ids[0])
        assert got.dtype == np.float32 and np.array_equal(got, big)
        assert c.features(ids[1]).dtype == np.float16
        assert c.skipped.to_dict(orient="records") == [{"item": ids[2], "reason": "model_error",
                                                        "detail": "non-finite feature values"}]
        c.preload(None, 10**6)
        assert c.preloaded()[0].dtype == np.float32 and np.array_equal(c.features(ids[0]), big)


def test_out_of_disk_space_is_a_clear_error_and_a_rerun_completes(tmp_path, monkeypatch):
    real = parts_module.write_file
    calls = {"n": 0}

    def full_disk(path, data):
        calls["n"] += 1
        if calls["n"] == 2:  # the second part hits a full disk halfway
            real(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(parts_module, "write_file", full_disk)
    with pytest.raises(CacheError, match="out of disk space .* rerun the same command"):
        write(tmp_path / "c.h5", range(9), part_utterances=3)
    monkeypatch.setattr(parts_module, "write_file", real)
    assert not list((tmp_path / "c.parts").glob("*.tmp")) and not (tmp_path / "c.h5.lock").exists()
    with CacheWriter(tmp_path / "c.h5", FP) as w:
        assert w.resumed and len(w.done) == 3  # the first part survived
        for i in range(9):
            if utterance(i).utt_id not in w.done:
                w.add(utterance(i), *arrays(utterance(i).utt_id), duration=arrays(utterance(i).utt_id)[0].shape[0] * 0.02,
                      truncated=i % 2 == 1)
        w.skip("broken.wav", "unreadable_audio", "bad header")
    assert contents(w.path) == contents(write(tmp_path / "one.h5", range(9)))


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB filesystem (tmpfs), where mounting is allowed (root); skipped elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)], capture_output=True,
                           check=False) if os.geteuid() == 0 and shutil.which("mount") else None
    if mount is None or mount.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_really_full_disk_is_a_clear_error_and_a_rerun_completes(small_disk, tmp_path):
    big = {**FP, "hidden_size": 256}

    def run(path):
        with CacheWriter(path, big, part_utterances=2) as w:
            for i in range(12):
                u = utterance(i)
                if u.utt_id not in w.done:
                    x = np.full((60, len(LAYERS), 256), i, np.float32)
                    w.add(u, x, np.ones((4, 60), bool), duration=1.2, truncated=False)
        return w.path

    with pytest.raises(CacheError, match="out of disk space"):
        run(small_disk / "c.h5")
    assert list((small_disk / "c.parts").glob("part-*.h5")) and not list(small_disk.glob("**/*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=8M", str(small_disk)], check=True)  # space freed
    assert contents(run(small_disk / "c.h5")) == contents(run(tmp_path / "one.h5"))


def _record_part_inodes(monkeypatch) -> list[int]:
    """Inodes of every part file the writer writes (the data a finished cache must reuse)."""
    inodes: list[int] = []
    real = writer_module.write_image

    def recording(image, final):
        real(image, final)
        if final.name.startswith("part-"):
            inodes.append(final.stat().st_ino)

    monkeypatch.setattr(writer_module, "write_image", recording)
    return inodes


def _no_copy(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("a finishing writer must not copy features")

    monkeypatch.setattr(merge_module, "consolidate", refuse)
    monkeypatch.setattr(h5py.Group, "copy", refuse)


def test_a_finished_cache_links_its_parts_instead_of_copying_them(tmp_path, monkeypatch):
    """close() needs no second copy: the part files ARE the cache's data (same inodes),
    F.h5 is a small index, and finishing works with next to no free space."""
    inodes = _record_part_inodes(monkeypatch)
    _no_copy(monkeypatch)
    real = writer_module.shutil.disk_usage
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    path = write(tmp_path / "c.h5", range(9), part_utterances=3)
    data = sorted((tmp_path / "c.data").glob("part-*.h5"))
    assert len(data) == len(inodes) == 4  # 3 parts of 3 + the skip
    assert sorted(p.stat().st_ino for p in data) == sorted(inodes)
    assert not (tmp_path / "c.parts").exists() and not (tmp_path / "c.h5.lock").exists()
    assert path.stat().st_size < 64 << 10 < sum(p.stat().st_size for p in data)
    assert contents_module.cache_files(path) == [path] + data
    with FeatureCache(path) as c:
        assert c.size_on_disk() == sum(p.stat().st_size for p in [path, *data])
    monkeypatch.undo()
    assert contents(path) == contents(write(tmp_path / "one.h5", range(9)))  # one part: self-contained
    assert contents_module.cache_files(tmp_path / "one.h5") == [tmp_path / "one.h5"]


def test_plain_h5py_follows_the_links_from_any_folder(tmp_path, monkeypatch):
    path = write(tmp_path / "c.h5", range(7), part_utterances=2)
    monkeypatch.chdir("/")  # links are relative to F.h5's folder, not to the working directory
    u = utterance(5)
    x, v = arrays(u.utt_id)
    with h5py.File(path, "r") as f:
        key = f["meta/key"].asstr()[list(f["meta/utt_id"].asstr()[()]).index(u.utt_id)]
        assert f["features"].get(key, getlink=True).__class__ is h5py.ExternalLink
        ds = f["features"][key]
        assert ds.shape == (len(LAYERS), x.shape[0], D) and ds.chunks == (1, x.shape[0], D)
        np.testing.assert_array_equal(ds[list(f.attrs["layers"]).index(5)], x[:, 2].astype(np.float16))
        np.testing.assert_array_equal(f["vad"][key][()].astype(bool), v)
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("c.h5", "c.data"):  # the cache moves as F.h5 plus F.data/
        (tmp_path / name).rename(moved / name)
    assert contents(moved / "c.h5") == contents(write(tmp_path / "one.h5", range(7)))


def test_appending_to_a_self_contained_cache_keeps_its_bytes_and_old_readers(tmp_path, monkeypatch):
    """A one-part (or pre-links) F.h5 becomes a data file by a hard link; a reader that has
    the old F.h5 open keeps reading it while the writer replaces F.h5 with an index."""
    path = write(tmp_path / "c.h5", range(4))
    assert contents_module.cache_files(path) == [path]
    inode = path.stat().st_ino
    reader = FeatureCache(path)
    before = {u: reader.features(u) for u in reader.meta.index}
    _no_copy(monkeypatch)
    with CacheWriter(path, FP) as w:
        for i in range(4, 9):
            w.add(utterance(i), *arrays(utterance(i).utt_id), duration=arrays(utterance(i).utt_id)[0].shape[0] * 0.02,
                  truncated=i % 2 == 1)
    assert (tmp_path / "c.data" / "part-000000.h5").stat().st_ino == inode
    assert {u: reader.features(u) for u in reader.meta.index}.keys() == before.keys()
    assert all(np.array_equal(reader.features(u), x) for u, x in before.items())
    reader.close()
    monkeypatch.undo()
    assert contents(path) == contents(write(tmp_path / "one.h5", range(9)))


@pytest.mark.parametrize("kill_at", ["after_hard_link", "after_moves"])
def test_a_kill_inside_close_loses_nothing(tmp_path, monkeypatch, kill_at):
    """The states a kill inside close() leaves (parts moved or F.h5 hard-linked, no new
    index yet): the next writer finds every utterance, and its close() links them all."""
    path = write(tmp_path / "c.h5", range(3))  # self-contained: the hard-link path is taken
    real_link, real_index = writer_module.os.link, writer_module.write_index

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands for the kill: nothing after this point runs

    if kill_at == "after_hard_link":
        monkeypatch.setattr(writer_module.os, "link", lambda a, b: (real_link(a, b), killed())[1])
    else:
        monkeypatch.setattr(writer_module, "write_index", killed)

    def append(**kw):
        with CacheWriter(path, FP, **kw) as w:
            for i in range(9):
                u = utterance(i)
                if u.utt_id not in w.done:
                    w.add(u, *arrays(u.utt_id), duration=arrays(u.utt_id)[0].shape[0] * 0.02, truncated=i % 2 == 1)
        return w

    with pytest.raises(KeyboardInterrupt):
        append(part_utterances=2)
    monkeypatch.setattr(writer_module.os, "link", real_link)
    monkeypatch.setattr(writer_module, "write_index", real_index)
    assert append().n_added == 0  # everything was already done
    assert contents(path) == contents(write(tmp_path / "one.h5", range(9)))
    assert len(list((tmp_path / "c.data").glob("part-*.h5"))) == 1 + 3


def test_the_torch_cast_rounds_exactly_like_numpy():
    rng = np.random.default_rng(0)
    scales = (1e-8, 1e-6, 1e-4, 1.0, 100.0, 3e4, 6.5e4)  # float16 subnormals up to its max
    x = np.concatenate([rng.standard_normal(20_000).astype(np.float32) * s for s in scales])
    x = np.concatenate([x, np.array([65504, 65519.99, -65504, 5.96e-8, 2.98e-8, 1e-45, -0.0], np.float32)])
    x = x[: len(x) // 6 * 6].reshape(-1, 2, 3)  # (T, L, D)
    assert "torch" in sys.modules  # so layer_major takes the torch path
    fast = parts_module.layer_major(x, np.dtype(np.float16))
    with np.errstate(over="ignore"):
        slow = np.ascontiguousarray(x.transpose(1, 0, 2), dtype=np.float16)
    assert fast.flags.c_contiguous and np.array_equal(fast.view(np.uint16), slow.view(np.uint16))


def test_not_a_cache_and_damaged_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(CacheError, match="is not an HDF5 file or is corrupted"):
        FeatureCache(junk)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="is not a sapser feature cache"):
        FeatureCache(tmp_path / "plain.h5")
    path = write(tmp_path / "c.h5", range(6))
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="cut.h5"), FeatureCache(cut) as c:
        for u in c.meta.index:
            c.features(u)
    with pytest.raises(CacheError, match="no cache at"):
        FeatureCache(tmp_path / "missing.h5")


def test_utt_ids_with_slashes_get_escaped_keys(tmp_path):
    u = Utterance(utt_id="spk/a%b", path="/x.wav", speaker="s", session="s", emotion="sad")
    x, v = arrays(u.utt_id)
    with CacheWriter(tmp_path / "c.h5", FP) as w:
        w.add(u, x, v, duration=1.0, truncated=False)
    assert utt_key(u.utt_id) == "spk%2Fa%25b"
    with FeatureCache(w.path) as c:
        np.testing.assert_array_equal(c.features(u.utt_id), x.astype(np.float16))


def test_cli_info_table_and_json(tmp_path):
    path = write(tmp_path / "c.h5", range(10))
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info == json.loads(json.dumps(cache_info(path)))
    assert info["utterances"] == 10 and info["layers"] == LAYERS and info["hidden_size"] == D
    assert info["classes"] == {"angry": 2, "happy": 2, "neutral": 2, "sad": 2} and info["no_emotion"] == 2
    assert info["speakers"] == {"spk0": 4, "spk1": 3, "spk2": 3}
    assert info["skipped"] == {"unreadable_audio": 1} and info["model"] == "tiny"
    assert info["frames"] == sum(arrays(utterance(i).utt_id)[0].shape[0] for i in range(10))
    assert info["hours"] == pytest.approx(info["frames"] * 0.02 / 3600)
    table = runner.invoke(app, ["info", str(path)])
    assert table.exit_code == 0 and "spk2" in table.stdout
    assert "unreadable_audio" in table.stdout and "broken.wav (bad header)" in table.stdout
    bad = runner.invoke(app, ["info", str(tmp_path / "missing.h5")])
    assert bad.exit_code == 2 and "no cache at" in bad.output
