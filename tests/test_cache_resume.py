"""Crash safety with a real SIGKILL: a killed writer loses only utterances in flight, and
reruns complete the cache with every utterance once, bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from cache.reader import FeatureCache

N = 40

# The child is an extraction run in miniature: it stores every utterance not yet done,
# slowly; part writes pause halfway and the final merge is slowed, so kills land inside them.
CHILD = r"""
import sys, time, zlib
import numpy as np
import h5py
import cache.parts as cw
from cache.writer import CacheWriter
from core.records import Utterance

out, n, slow = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
if slow:
    real_write, real_copy = cw.write_file, h5py.Group.copy
    cw.write_file = lambda p, data: (real_write(p, data[:len(data) // 2]), time.sleep(slow), real_write(p, data))
    h5py.Group.copy = lambda self, *a, **k: (time.sleep(slow / 4), real_copy(self, *a, **k))[1]
fp = {"model": "child", "layers": [0, 1], "classes": ["angry", "happy", "neutral", "sad"], "hidden_size": 16}
with CacheWriter(out, fp, part_utterances=4) as w:
    print("open", len(w.done), flush=True)
    for i in range(n):
        uid = f"utt{i:03d}"
        if uid in w.done:
            continue
        if i % 13 == 5:
            w.skip(uid, "too_short", "300 samples")
            continue
        rng = np.random.default_rng(zlib.crc32(uid.encode()))
        t = int(rng.integers(5, 30))
        x = (rng.normal(size=(t, 2, 16)) * 10).astype(np.float32)
        w.add(Utterance(uid, f"/a/{uid}.wav", f"s{i % 4}", f"S{i % 2}", "happy", 3.0, 2.0),
              x, rng.random((4, t)) > 0.5, duration=t * 0.02, truncated=False)
        time.sleep(slow)
    print("closing", flush=True)
print("done", flush=True)
"""


def run_child(script: Path, out: Path, slow: float, kill_after: float | None, kill_on: str = "open") -> tuple[int, int]:
    """Run the child (killing it `kill_after` s after it prints `kill_on`); (exit code, done at open)."""
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(N), str(slow)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    seen = []
    if kill_after is not None:
        for line in proc.stdout:  # wait until the child has reached the phase we aim at
            seen.append(line)
            if line.startswith(kill_on):
                break
        time.sleep(kill_after)
        os.kill(proc.pid, signal.SIGKILL)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), err
    done = [int(line.split()[1]) for line in seen + rest.splitlines() if line.startswith("open")]
    return proc.returncode, done[0] if done else -1


def snapshot(path: Path) -> dict:
    with FeatureCache(path) as c:
        return {"meta": repr(c.meta.to_dict(orient="index")), "skipped": c.skipped.to_dict(orient="records"),
                "features": {u: c.features(u).tobytes() for u in c.meta.index},
                "vad": {u: np.stack([c.vad(u, m) for m in range(4)]).tobytes() for u in c.meta.index},
                "fingerprint": c.fingerprint}


def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    assert run_child(script, tmp_path / "clean.h5", 0.0, None)[0] == 0
    reference = snapshot(tmp_path / "clean.h5")
    total = len(reference["features"]) + len(reference["skipped"])

    out = tmp_path / "killed.h5"
    rng = random.Random(1234)
    codes, done = [], []
    for kill_on in ("open", "open", "open", "open", "closing", "closing"):
        # 'closing' kills land inside the final merge into killed.h5.tmp (or just after it).
        delay = rng.uniform(0.0, 0.5) if kill_on == "open" else rng.uniform(0.0, 0.15)
        code, n_done = run_child(script, out, 0.02, delay, kill_on)
        codes.append(code)
        done.append(n_done)
    assert codes.count(-signal.SIGKILL) >= 3  # most runs really died mid-write
    # finished parts survive every kill: a rerun starts where the last one stopped
    assert done == sorted(done) and max(done) > 0 and done[-1] <= total
    assert run_child(script, out, 0.0, None)[0] == 0

    with h5py.File(out, "r") as f:
        ids = list(f["meta/utt_id"].asstr()[()])
    assert len(ids) == len(set(ids)) == len(reference["features"])  # each utterance exactly once
    assert snapshot(out) == reference  # same rows, same skips, bit-identical features and masks
    assert not (tmp_path / "killed.parts").exists() and not (tmp_path / "killed.h5.lock").exists()


def test_leftovers_of_every_kill_point_are_handled(tmp_path):
    """The states a kill can leave, built on purpose: a torn part .tmp, a torn index .tmp,
    part files moved into F.data/ that the (old) index does not link yet, and a
    self-contained F.h5 from before links plus already-merged parts beside it."""
    from cache.merge import merge_shards, write_index

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    assert run_child(script, tmp_path / "clean.h5", 0.0, None)[0] == 0
    reference = snapshot(tmp_path / "clean.h5")
    total = len(reference["features"]) + len(reference["skipped"])

    out, parts, data = tmp_path / "c.h5", tmp_path / "c.parts", tmp_path / "c.data"
    assert run_child(script, out, 0.0, None)[0] == 0
    files = sorted(data.glob("part-*.h5"))
    fp = FeatureCache(out).fingerprint
    write_index(files[:-3], out, fp)  # as if the last 3 parts had just been moved in when the kill came
    assert len(FeatureCache(out)) < len(reference["features"])
    parts.mkdir()
    (parts / "part-000099.h5.tmp").write_bytes(b"\x89HDF\r\n torn")
    (tmp_path / "c.h5.tmp").write_bytes(b"torn index")
    assert run_child(script, out, 0.0, None) == (0, total)
    assert snapshot(out) == reference
    assert not parts.exists() and not (tmp_path / "c.h5.tmp").exists()

    # a self-contained cache (the layout before links), killed after its merge but before
    # its merged parts were deleted: the rerun links both and keeps each utterance once
    legacy, lparts = tmp_path / "l.h5", tmp_path / "l.parts"
    merge_shards([tmp_path / "clean.h5"], legacy)
    lparts.mkdir()
    shutil.copy(legacy, lparts / "part-000001.h5")
    assert run_child(script, legacy, 0.0, None) == (0, total)
    assert snapshot(legacy) == reference
    assert not lparts.exists() and len(list((tmp_path / "l.data").glob("part-*.h5"))) == 2
