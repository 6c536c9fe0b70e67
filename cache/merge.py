"""Finished files into one cache: an index that links them (a writer's close) or a merged copy (shards).

Both list every utterance and skip of their sources once (first source wins),
rows sorted by utt_id and skips by (item, reason), so any split of the same work
(parts, resumes, shards) gives a cache with the same content.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py

from cache.contents import LINKED_ATTR, Contents, cache_bytes, direct_files, read_contents
from cache.format import (FEATURES, META_COLUMNS, SKIP_COLUMNS, VAD, CacheError, fingerprint_diff, live_skips,
                          lock_path, resolve_paths, write_header, write_tables)
from cache.lock import WriterLock
from cache.parts import Part, disk_error, write_image
from core.files import fsync_dir, fsync_file


def merge_rows(contents: Sequence[Contents]) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str, str]]]:
    """utt_id -> (source index, row), first source wins; skips (item, reason, detail) sorted, first detail wins."""
    owner: dict[str, tuple[int, int]] = {}
    for s, c in enumerate(contents):
        for r, utt_id in enumerate(c.utt_ids):
            owner.setdefault(utt_id, (s, r))
    first_skip: dict[tuple[str, str], str] = {}
    for c in contents:
        for item, reason, detail in zip(*(c.skipped[k] for k in SKIP_COLUMNS)):
            first_skip.setdefault((item, reason), detail)
    # a model_error skip whose utterance a rerun stored is no longer a skip
    skips = live_skips([(item, reason, first_skip[item, reason]) for item, reason in sorted(first_skip)], set(owner))
    return owner, skips


def merged_hidden_size(contents: Sequence[Contents], fingerprint: dict[str, Any]) -> int:
    sizes = {c.hidden_size for c in contents if c.hidden_size}
    if len(sizes) > 1:
        raise CacheError(f"the files to merge disagree on the hidden size ({sorted(sizes)})")
    return sizes.pop() if sizes else int(fingerprint.get("hidden_size", 0))


def write_index(sources: Sequence[Path], out: Path, fingerprint: dict[str, Any]) -> Path:
    """Write `out` atomically as an index over `sources` (files in out's folder or below it).

    Every utterance and skip of `sources` appears once (first source wins), rows sorted by
    utt_id like a consolidated file; features and VAD masks stay where they are and are
    reached through relative external links. No feature byte is read or written.
    """
    contents = [read_contents(p) for p in sources]
    hidden_size = merged_hidden_size(contents, fingerprint)
    owner, skips = merge_rows(contents)
    names = [os.path.relpath(p, out.parent) for p in sources]
    part = Part()
    f = part.file
    for utt_id in sorted(owner):
        s, r = owner[utt_id]
        key = contents[s].meta["key"][r]
        part.features[key] = h5py.ExternalLink(names[s], f"/{FEATURES}/{key}")
        part.vad[key] = h5py.ExternalLink(names[s], f"/{VAD}/{key}")
        part.rows.append(_row(contents, s, r))
    part.skips = skips
    f.attrs[LINKED_ATTR] = json.dumps(names)  # every file it was built from belongs to the cache
    write_image(part.finish(fingerprint, hidden_size), out)
    return out


def consolidate(sources: Sequence[Path], out: Path, fingerprint: dict[str, Any],
                attrs: dict[str, str] | None = None) -> Path:
    """Write every utterance and skip of `sources` once into `out`, one self-contained file, atomically.

    Rows are sorted by utt_id and skips by (item, reason), so any split of the same work
    (parts, resumes, shards) gives a file with the same content. Features are copied with
    H5Ocopy (no decode/encode), so they stay bit-identical, one source file at a time: an
    index's data files are read directly (not through its links), each opened once and
    closed before the next, so memory and open files stay bounded however large the cache.
    Refused up front when the disk cannot hold the copy. `attrs`: extra root attributes.
    Used by `merge_shards` and `cache.pack`; a writer's `close()` links instead.
    """
    contents = [read_contents(p) for p in sources]
    hidden_size = merged_hidden_size(contents, fingerprint)
    need = sum(cache_bytes(p) for p in sources)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise CacheError(
            f"out of disk space: writing {out} needs about {need / 1e9:.2f} GB and {free / 1e9:.2f} GB "
            "is free; free some space and rerun"
        )
    owner, skips = merge_rows(contents)
    key_of = {u: contents[s].meta["key"][r] for u, (s, r) in owner.items()}
    files, where = direct_files(sources, {u: s for u, (s, _) in owner.items()}, key_of)
    by_file: dict[int, list[str]] = {}
    for utt_id in sorted(owner):
        by_file.setdefault(where[utt_id], []).append(utt_id)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as dst:
            write_header(dst, fingerprint, hidden_size)
            for name, value in (attrs or {}).items():
                dst.attrs[name] = value
            feats, vads = dst.create_group(FEATURES), dst.create_group(VAD)
            for i, utt_ids in sorted(by_file.items()):
                with h5py.File(files[i], "r") as src:
                    for utt_id in utt_ids:
                        key = key_of[utt_id]
                        src.copy(src[FEATURES][key], feats, name=key)
                        src.copy(src[VAD][key], vads, name=key)
            write_tables(dst, [_row(contents, *owner[u]) for u in sorted(owner)], skips)
        fsync_file(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if disk_error(err, out):
            raise CacheError(f"out of disk space while writing {out}; free some space and rerun "
                             "(the sources are unchanged)") from None
        raise
    except BaseException:  # Ctrl-C: no torn copy left beside the cache
        tmp.unlink(missing_ok=True)
        raise
    return out


def merge_shards(paths: Iterable[str | Path], out: str | Path) -> Path:
    """Merge shard files into one cache equal in content to a single (unsharded) run."""
    files = resolve_paths([Path(p) for p in paths] if not isinstance(paths, (str, Path)) else paths)
    contents = [read_contents(p) for p in files]
    first = contents[0].fingerprint
    for c in contents[1:]:
        keys = fingerprint_diff(first, c.fingerprint, ignore=("shard",))
        if keys:
            raise CacheError(f"{c.path} was made differently from {files[0]} ({', '.join(keys)} differ)")
    fp = {k: v for k, v in first.items() if k != "shard"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(lock_path(out), out)
    try:
        seen: dict[str, Path] = {}
        for c in contents:
            for u in c.utt_ids:
                if u in seen:
                    raise CacheError(f"utterance {u!r} is in two shards ({seen[u]} and {c.path})")
                seen[u] = c.path
        return consolidate(files, out, fp)
    finally:
        lock.release()


def _row(contents: Sequence[Contents], source: int, row: int) -> dict:
    """Row `row` of source `source`'s /meta as a dict of META_COLUMNS."""
    return {k: contents[source].meta[k][row] for k in META_COLUMNS}
