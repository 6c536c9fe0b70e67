"""Pack a cache into one self-contained file: for copying it to another machine, or archiving it.

A finished multi-part cache is `F.h5` (an index of external links) plus `F.data/`; a
copy of `F.h5` alone has no features. `pack_cache(F)` copies every utterance's
features and VAD masks (H5Ocopy, bit for bit) and the index's tables into one file,
one data file at a time, atomically (`F.h5.tmp`, fsynced, renamed), after checking
that the disk can hold it. In place (no `out`), the new F.h5 records the data files
it absorbed (`packed_from`) and only then are they deleted: a kill between the two
leaves a complete F.h5 plus redundant files that the next pack, or the next writer,
deletes (`finish_pack`). Files it did not absorb are never touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py

from cache.contents import LINKED_ATTR, cache_files, read_contents
from cache.format import (PACKED_ATTR, CacheError, data_dir, find_shards, lock_path, parse_shard_name, parts_dir,
                          resolve_paths)
from cache.lock import WriterLock
from cache.merge import consolidate, merge_shards
from cache.parts import PART_GLOB
from core.files import fsync_dir


def pack_cache(path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write the cache at `path` (a file, or the base path of a shard set) as one self-contained
    file at `out` (default: `path` itself, replacing the index and deleting the data files it
    absorbed). Returns what was done: `out`, `utterances`, `bytes`, `removed` (data files)."""
    path = Path(path)
    target = Path(out) if out is not None else path
    if parse_shard_name(path):
        raise CacheError(f"give the base path of the shard set (e.g. {parse_shard_name(path)[0]}.h5), "
                         "or one cache file, not a shard file")
    if not path.exists() and find_shards(path):  # a shard set: merged into one file, the shards kept
        files = resolve_paths(path)
        _refuse_existing(target, path)
        merge_shards(files, target)
        return _done(target, removed=[])
    resolve_paths(path)  # no cache, or an unfinished one: one line saying which
    locks = [WriterLock(lock_path(path), path)]
    try:
        if target.resolve() != path.resolve():
            _refuse_existing(target, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            locks.append(WriterLock(lock_path(target), target))
        if any(parts_dir(path).glob(PART_GLOB)):
            raise CacheError(f"{path} has unfinished parts in {parts_dir(path).name}/ (its writer was interrupted); "
                             "rerun the extract command that made it to finish it, then pack it")
        c = read_contents(path)  # an index without its data folder is refused here, in one line
        files = cache_files(path)
        in_place = target.resolve() == path.resolve()
        if len(files) == 1 and in_place:
            return _done(target, removed=finish_pack(path))  # one file already (a kill may have left copies)
        absorbed = [os.path.relpath(p, target.parent) for p in files[1:]] if in_place else []
        consolidate([path], target, c.fingerprint, attrs={PACKED_ATTR: json.dumps(absorbed)} if absorbed else None)
        return _done(target, removed=finish_pack(target) if in_place else [])
    finally:
        for lock in locks:
            lock.release()


def finish_pack(path: Path) -> list[str]:
    """Delete the data files a self-contained `path` absorbed when it was packed in place (its
    `packed_from` attribute), and their folders once empty; what was deleted, relative to `path`.

    Only files named there, from a file without links, and only when `path` holds everything
    such a file holds: a kill between packing and these deletions leaves redundant copies,
    while a writer may since have put a new part under one of those names (it is kept)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        if LINKED_ATTR in f.attrs or PACKED_ATTR not in f.attrs:
            return []
        names = json.loads(f.attrs[PACKED_ATTR])
    leftovers = [n for n in names if (path.parent / n).is_file()]
    removed: list[str] = []
    packed = read_contents(path) if leftovers else None
    have = set(packed.utt_ids) if packed else set()
    skipped = set(zip(packed.skipped["item"], packed.skipped["reason"])) if packed else set()
    for name in leftovers:
        try:
            c = read_contents(path.parent / name)
        except CacheError:
            continue  # not readable as a cache file: not provably a copy, so not ours to delete
        skips = set(zip(c.skipped["item"], c.skipped["reason"]))
        if set(c.utt_ids) <= have and all(s in skipped or s[0] in have for s in skips):
            (path.parent / name).unlink()
            removed.append(name)
    for folder in sorted({(path.parent / n).parent for n in names}):
        try:
            folder.rmdir()  # only when empty: another file in there is not ours
        except OSError:
            pass
    if removed:
        fsync_dir(path.parent)
    return removed


def _refuse_existing(target: Path, source: Path) -> None:
    if target.exists() or data_dir(target).exists() or (find_shards(target) and target != source):
        raise CacheError(f"{target} already exists; give pack an --out that does not exist yet "
                         f"(or no --out, to pack {source.name} in place)")


def _done(out: Path, removed: list[str]) -> dict[str, Any]:
    c = read_contents(out)
    return {"out": str(out), "utterances": len(c.utt_ids), "bytes": out.stat().st_size, "removed": removed}
