"""Does reading one layer avoid reading the others? Bytes read from storage and time, cold.

Builds a realistic synthetic cache with CacheWriter (default 200 utterances x 25 layers x
~150 frames x 1024 dims, float16: ~1.5 GB), then reads it with FeatureCache:

  * one layer of every utterance      (what a single-layer head touches per epoch)
  * all layers of every utterance     (what a learnable layer mix touches)
  * preload(one layer)                (the trainer's RAM path)

and, for comparison, one layer from the same data stored frame-major (one (T, L, D)
chunk per utterance, the obvious alternative layout), and one layer of every utterance
from the finished cache as the writer leaves it (F.h5 an index of external links into its
part files) against a self-contained copy of it (`merge_shards`, what close() used to
write), alternated, --repeats times each. The copy's time is what close() no longer spends.

Cold reads: before each measurement the file is fsynced and its pages are dropped from
the page cache with posix_fadvise(POSIX_FADV_DONTNEED) (works without root), plus
/proc/sys/vm/drop_caches when writable. Bytes read from storage come from the process's
/proc/self/io `read_bytes` (block-device reads, not page-cache hits).

    python bench/cache_layout.py [--utts 200] [--layers 25] [--frames 150] [--dim 1024] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and bench/extract.py would shadow
# the `extract` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import h5py
import numpy as np

from cache.contents import cache_bytes, cache_files
from cache.merge import merge_shards
from cache.reader import FeatureCache
from cache.writer import CacheWriter
from core.records import Utterance


def _is_cache(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return "sapser_format" in f.attrs


def read_bytes() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("read_bytes"))


def drop_cache(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return "fadvise+drop_caches"
    except OSError:
        return "fadvise"


def measure(name: str, path: Path, fn) -> dict:
    method = drop_cache(path)
    for linked in cache_files(path)[1:] if _is_cache(path) else []:  # an index: its parts too
        drop_cache(linked)
    before, t0 = read_bytes(), time.perf_counter()
    fn()
    seconds, nbytes = time.perf_counter() - t0, read_bytes() - before
    row = {"case": name, "seconds": round(seconds, 3), "read_MB": round(nbytes / 1e6, 1),
           "MB_per_s": round(nbytes / 1e6 / seconds, 1), "cold": method}
    print(json.dumps(row), flush=True)
    return row


def build(path: Path, n_utts: int, n_layers: int, frames: int, dim: int, seed: int) -> tuple[float, float, dict]:
    """Write the synthetic cache; return (total seconds, seconds add() blocked, lengths)."""
    rng = np.random.default_rng(seed)
    t_max = int(frames * 1.5)
    pool = rng.standard_normal((t_max + n_utts, n_layers, dim), dtype=np.float32)  # reused, shifted per utt
    lengths = {f"utt{i:04d}": int(rng.integers(frames // 2, t_max)) for i in range(n_utts)}
    fp = {"model": "synthetic-bench", "layers": list(range(n_layers)), "classes": ["angry", "happy", "neutral", "sad"],
          "hidden_size": dim, "dtype": "float16"}
    blocked = 0.0
    t0 = time.perf_counter()
    with CacheWriter(path, fp) as w:
        for i, (uid, t) in enumerate(lengths.items()):
            x = pool[i:i + t].copy()  # the writer takes ownership, like a backend's fresh output
            v = rng.random((4, t)) > 0.5
            a = time.perf_counter()
            w.add(Utterance(uid, f"/bench/{uid}.wav", f"s{i % 10}", f"S{i % 5}", "neutral"), x, v,
                  duration=t * 0.02, truncated=False)
            blocked += time.perf_counter() - a
    return time.perf_counter() - t0, blocked, lengths


def frame_major_copy(src: Path, dst: Path) -> None:
    """The same features with one (T, L, D) chunk per utterance: every layer read reads all."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for key in f["features"]:
            x = f["features"][key][()].transpose(1, 0, 2)  # (T, L, D)
            g.create_dataset(key, data=x, chunks=x.shape)


def linked_vs_copy(path: Path, copy: Path, ids: list[str], layer: int, repeats: int) -> None:
    """One layer of every utterance, cold: the index + parts the writer leaves vs one merged file."""
    t0 = time.perf_counter()
    merge_shards([path], copy)
    print(json.dumps({"case": "self-contained copy (what close() used to write)",
                      "seconds": round(time.perf_counter() - t0, 2), "GB": round(copy.stat().st_size / 1e9, 3)}))
    best: dict[str, float] = {}
    for r in range(repeats):
        for name, p in (("linked", path), ("copy", copy)) if r % 2 == 0 else (("copy", copy), ("linked", path)):
            with FeatureCache(p) as c:
                row = measure(f"1 layer, per utterance, {name}", p, lambda: [c.features(u, [layer]) for u in ids])
            best[name] = min(best.get(name, 1e9), row["seconds"])
    print(json.dumps({"best_s": {k: round(v, 3) for k, v in best.items()},
                      "linked_over_copy": round(best["linked"] / best["copy"], 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utts", type=int, default=200)
    ap.add_argument("--layers", type=int, default=25)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="cold reads of each layout in the linked vs copy case")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sapser-bench-", dir=args.dir))
    path = work / "bench.h5"
    try:
        total, blocked, lengths = build(path, args.utts, args.layers, args.frames, args.dim, 0)
        size = cache_bytes(path)
        frames = sum(lengths.values())
        print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "load_1min": round(os.getloadavg()[0], 1),
                          "utterances": args.utts, "layers": args.layers, "frames": frames, "dim": args.dim,
                          "file_GB": round(size / 1e9, 3), "index_KB": round(path.stat().st_size / 1e3, 1),
                          "data_files": len(cache_files(path)) - 1, "write_s": round(total, 2),
                          "write_MB_per_s": round(size / 1e6 / total, 1), "add_blocked_s": round(blocked, 2)}))
        ids = list(lengths)
        one = args.layers - 1
        rows = []
        with FeatureCache(path) as c:
            rows.append(measure("1 layer, per utterance", path, lambda: [c.features(u, [one]) for u in ids]))
            rows.append(measure(f"all {args.layers} layers, per utterance", path, lambda: [c.features(u) for u in ids]))
            rows.append(measure("preload(1 layer)", path, lambda: c.preload([one], 1 << 40)))
        fm = work / "frame_major.h5"
        frame_major_copy(path, fm)
        with h5py.File(fm, "r") as g:
            rows.append(measure("1 layer, frame-major chunks (T, L, D)", fm, lambda: [g[k][:, one] for k in g]))
        print(json.dumps({"ratio_all_over_one_layer_bytes": round(rows[1]["read_MB"] / max(rows[0]["read_MB"], 1e-9), 1)}))
        linked_vs_copy(path, work / "copy.h5", ids, one, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
