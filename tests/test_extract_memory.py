"""Extraction's memory budget (issue 29): --buffer-mb bounds the audio decoded ahead of the model,
the features waiting for the disk and the part being built; oneDNN's per-shape cache is off."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future

import numpy as np

import cache.parts
import extract.loading
from cache.reader import FeatureCache
from cache.writer import CacheWriter
from core.records import Utterance
from extract.config import ExtractConfig
from extract.loading import prefetch


class Immediate:
    """An executor that runs each job when it is submitted, and remembers the order."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, fn, utt, *args):
        self.submitted.append(utt)
        f: Future = Future()
        f.set_result(utt)
        return f


def test_the_audio_ahead_of_the_model_stays_within_its_budget(monkeypatch):
    monkeypatch.setattr(extract.loading, "load_item", lambda utt, *a: utt)
    sizes = [10, 10, 30, 10, 10, 10, 50, 10]
    batches = [[f"b{i}"] for i in range(len(sizes))]
    ex = Immediate()
    consumed = []
    for items in prefetch(batches, ex, 0.0, None, ahead=3, sizes=sizes, budget=25):
        consumed.append(items[0])
        ahead = [b for b in ex.submitted if b not in consumed]  # loaded, not yet handed to the model
        held = sum(sizes[int(b[1:])] for b in ahead)
        assert held <= 25 or len(ahead) == 1, (consumed, ahead)  # a batch larger than the budget goes alone
        assert len(ahead) <= 3
    assert consumed == [b[0] for b in batches]  # every batch, in order
    unbounded = Immediate()
    list(prefetch(batches, unbounded, 0.0, None, ahead=3))
    assert unbounded.submitted == ex.submitted  # same order: the budget changes when, not what


def test_the_budget_is_split_between_the_stages():
    b = ExtractConfig(buffer_mb=64).budget()
    assert (b.audio, b.queue, b.part) == (16 << 20, 32 << 20, 16 << 20)
    assert b.audio + b.queue + b.part == 64 << 20


def test_features_waiting_for_the_disk_and_each_part_stay_within_their_bytes(tmp_path, monkeypatch):
    real_write = cache.parts.write_file

    def slow_write(path, data):  # a slow disk: the queue fills up
        time.sleep(0.05)
        real_write(path, data)

    monkeypatch.setattr(cache.parts, "write_file", slow_write)
    t, layers, d = 50, 3, 64
    item = t * layers * d * 4  # one utterance as the model returns it (float32)
    queue_bytes, part_bytes = 5 * item, 3 * item
    fp = {"model": "m", "layers": list(range(layers)), "classes": ["sad"], "hidden_size": d}
    peak = [0]
    with CacheWriter(tmp_path / "F.h5", fp, queue_bytes=queue_bytes, part_bytes=part_bytes) as w:
        real_put = w._put

        def put(msg, nbytes):
            real_put(msg, nbytes)
            with w._room:
                peak[0] = max(peak[0], w._queued_bytes)

        w._put = put
        rng = np.random.default_rng(0)
        for i in range(24):
            x = rng.standard_normal((t, layers, d)).astype(np.float32)
            w.add(Utterance(f"u{i:02d}", "/a.wav", "s", "S", "sad"), x, np.ones((4, t), bool), duration=1.0,
                  truncated=False)
    assert 0 < peak[0] <= queue_bytes
    parts = sorted((tmp_path / "F.data").glob("part-*.h5"))
    stored_item = t * layers * d * 2  # float16
    assert len(parts) == 24 // (part_bytes // stored_item)  # cut by bytes (6 utterances each), not by count (64)
    with FeatureCache(tmp_path / "F.h5") as c:
        assert len(c) == 24
    for p in parts:
        with FeatureCache(p) as c:
            stored = sum(c.features(u).nbytes for u in c.meta.index)
        assert stored <= part_bytes + stored_item  # the budget, or one utterance beyond it


def test_loading_a_backend_turns_onednns_per_shape_cache_off_unless_the_user_sized_it(monkeypatch):
    from extract.backends import load_backend

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    load_backend("fbank")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    load_backend("fbank")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
