"""CacheWriter: append utterances to a cache, crash-safe and off the model's critical path.

Why parts: an HDF5 file being written is not safe to kill (a SIGKILL mid-write can leave
its B-trees or superblock inconsistent). So nothing is ever written in place: a background
thread builds batches of utterances as HDF5 images in RAM, writes each to
`F.parts/part-NNNNNN.h5.tmp`, fsyncs it and renames it to `part-NNNNNN.h5`. A part that has
its final name is complete; a `.tmp` is garbage from a kill and is deleted on the next open.

Why links, not a merged copy: `close()` keeps the parts. It moves them (renames, no copy)
into `F.data/` and writes `F.h5` as a small index: the root attributes, `/meta`, `/skipped`
and, for every utterance, HDF5 external links `/features/<key>` and `/vad/<key>` to its
datasets in a part file (relative paths, which HDF5 resolves from F.h5's own folder, so
plain h5py reads it from any working directory). Copying every part into one file needed
twice the cache's size on disk at the end of a run and a full extra write. A run that fits
in one part, with nothing before it, still ends as one self-contained `F.h5` (a rename).

Crash safety: files in `F.data/` are never modified or deleted, and `F.h5` is replaced
atomically (written as `F.h5.tmp`, fsynced, renamed), so a reader of an old index keeps
working and a kill at any moment leaves: the old `F.h5` (or none), data files, and parts.
A rerun treats every data file and part as finished work (an old self-contained `F.h5` too)
and de-duplicates utterances by id, so it loses only the utterances not yet in a renamed
part and stores each one once.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import queue
import re
import shutil
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache.format import (
    FEATURES,
    FINGERPRINT_ATTR,
    FLOAT16_MAX,
    FORMAT_ATTR,
    FORMAT_VERSION,
    META,
    META_COLUMNS,
    N_VAD_MODES,
    NOT_DONE_REASONS,
    SKIP_COLUMNS,
    SKIPPED,
    STR_COLUMNS,
    VAD,
    CacheDamaged,
    CacheError,
    check_header,
    check_rows,
    damaged,
    describe_diff,
    fingerprint_diff,
    fsync_dir,
    live_skips,
    lock_path,
    normalize_fingerprint,
    data_dir,
    parse_shard_name,
    parts_dir,
    read_columns,
    resolve_paths,
    shard_path,
    utt_key,
    write_columns,
)
from extract.records import Skip, Utterance, storable, unstorable

PART_UTTERANCES = 64  # a kill loses at most this many finished utterances' work ...
PART_BYTES = 128 << 20  # ... or this many bytes of features, whichever comes first
QUEUE_BYTES = 512 << 20  # add() blocks only when this much is waiting for the disk
# The float32 -> float16 cast is the writer's biggest CPU cost; numpy and torch release
# the GIL while casting, so a few threads scale it (and the model thread never waits).
ENCODE_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))
_PART_GLOB = "part-*.h5"
_PART_NAME = re.compile(r"part-\d+\.h5")
# Root attribute of an index file (JSON list of the data files it links, relative to its
# folder); a self-contained cache file has none.
LINKED_ATTR = "data_files"


# --- the lock -------------------------------------------------------------------------


class _Lock:
    """An flock'ed file holding the writer's PID: released by the kernel when the PID dies,
    so a lock file left by a killed writer is simply taken over."""

    def __init__(self, path: Path, cache: Path) -> None:
        self.path = path
        for _ in range(5):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CacheError(
                    f"{cache} is being written by another process (PID {holder}, lock file {path}); "
                    "wait for it to finish or stop it"
                ) from None
            # A finishing writer unlinks the file while holding the lock; if we locked that
            # unlinked inode, try again on the new file.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd: int | None = fd
                return
            os.close(fd)
        raise CacheError(f"could not take the lock file {path}; another writer keeps replacing it")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see the inode check above
        finally:
            os.close(self.fd)
            self.fd = None


# --- what a part or a cache file holds ------------------------------------------------


@dataclass
class _Contents:
    """The rows of one cache or part file (no feature arrays)."""

    path: Path
    fingerprint: dict[str, Any]
    hidden_size: int
    meta: dict[str, list] = field(default_factory=dict)
    skipped: dict[str, list] = field(default_factory=dict)

    @property
    def utt_ids(self) -> list[str]:
        return self.meta.get("utt_id", [])


def read_contents(path: Path) -> _Contents:
    """Header, metadata and skip list of a cache-format file; CacheError if it is not one.

    The structure is checked here, once, where every reader and writer opens a file
    (cache.format.check_header/check_rows: attributes and dataset shapes, no feature
    data), so a damaged file is one sentence naming the utterance, never a traceback later.
    """
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise CacheError(f"{path} is not an HDF5 file or is corrupted ({_short(err)})") from None
    with f:
        try:
            if FORMAT_ATTR not in f.attrs or FINGERPRINT_ATTR not in f.attrs:
                raise CacheError(f"{path} is not a sapser feature cache (no {FORMAT_ATTR!r} attribute)")
            version = int(f.attrs[FORMAT_ATTR])
            if version > FORMAT_VERSION:
                raise CacheError(f"{path} has cache format {version}; this sapser reads up to {FORMAT_VERSION}")
            fingerprint, hidden_size = check_header(f, path)
            meta = read_columns(f[META], META_COLUMNS, STR_COLUMNS)
            skipped = read_columns(f[SKIPPED], SKIP_COLUMNS, SKIP_COLUMNS)
            check_rows(f, path, fingerprint, hidden_size, meta)
        except CacheError:
            raise
        except (KeyError, OSError, ValueError, TypeError, RuntimeError) as err:  # h5py's ways to fail on a torn file
            raise damaged(path, f"it cannot be read ({_short(err)})") from None
        return _Contents(path=path, fingerprint=fingerprint, hidden_size=hidden_size, meta=meta, skipped=skipped)


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:160]


def _root_attrs(f: h5py.File, fingerprint: dict[str, Any], hidden_size: int) -> None:
    f.attrs[FORMAT_ATTR] = FORMAT_VERSION
    f.attrs[FINGERPRINT_ATTR] = json.dumps(fingerprint, sort_keys=True)
    f.attrs["classes"] = json.dumps(list(fingerprint["classes"]))
    f.attrs["layers"] = np.asarray(fingerprint["layers"], dtype=np.int64)
    f.attrs["hidden_size"] = int(hidden_size)
    f.attrs["dtype"] = fingerprint["dtype"]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(err: OSError, path: Path) -> CacheError | None:
    """ENOSPC (h5py sometimes only says so in the message) -> the user-facing error."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err):
        return CacheError(
            f"out of disk space while writing {path}; free some space and rerun the same command "
            "to complete the cache (finished parts are kept)"
        )
    return None


# --- merging finished files into one cache --------------------------------------------


def cache_files(path: str | Path) -> list[Path]:
    """The files one cache file needs: itself, plus the data files an index links to."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        linked = json.loads(f.attrs[LINKED_ATTR]) if LINKED_ATTR in f.attrs else []
    return [path] + [path.parent / name for name in linked]


def cache_bytes(path: str | Path) -> int:
    """Bytes on disk of one cache file with everything it links to."""
    return sum(p.stat().st_size for p in cache_files(path) if p.exists())


def direct_files(paths: Sequence[Path], file_of: dict[str, int],
                 key_of: dict[str, str]) -> tuple[list[Path], dict[str, int]]:
    """Where each utterance's arrays really are: `paths` plus the part files of any index
    among them, and utt_id -> index into that list (the same /features/<key> there)."""
    files, where = list(paths), dict(file_of)
    for i, path in enumerate(paths):
        with h5py.File(path, "r") as f:
            if LINKED_ATTR not in f.attrs:
                continue
            group, slot = f[FEATURES], {}
            for utt_id in [u for u, j in file_of.items() if j == i]:
                link = group.get(key_of[utt_id], getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    target = (path.parent / link.filename).resolve()
                    if target not in slot:
                        slot[target] = len(files)
                        files.append(target)
                    where[utt_id] = slot[target]
    return files, where


def _is_index(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return LINKED_ATTR in f.attrs


def _is_self_contained(path: Path) -> bool:
    return not _is_index(path)


def _merge_rows(contents: Sequence[_Contents]) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str, str]]]:
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


def _hidden_size(contents: Sequence[_Contents], fingerprint: dict[str, Any]) -> int:
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
    hidden_size = _hidden_size(contents, fingerprint)
    owner, skips = _merge_rows(contents)
    names = [os.path.relpath(p, out.parent) for p in sources]
    part = _Part()
    f = part.file
    for utt_id in sorted(owner):
        s, r = owner[utt_id]
        key = contents[s].meta["key"][r]
        part.features[key] = h5py.ExternalLink(names[s], f"/{FEATURES}/{key}")
        part.vad[key] = h5py.ExternalLink(names[s], f"/{VAD}/{key}")
        part.rows.append({k: contents[s].meta[k][r] for k in META_COLUMNS})
    part.skips = skips
    f.attrs[LINKED_ATTR] = json.dumps(names)  # every file it was built from belongs to the cache
    _write_image(part.finish(fingerprint, hidden_size), out)
    return out


def consolidate(sources: Sequence[Path], out: Path, fingerprint: dict[str, Any]) -> Path:
    """Write every utterance and skip of `sources` once into `out`, one self-contained file, atomically.

    Rows are sorted by utt_id and skips by (item, reason), so any split of the same work
    (parts, resumes, shards) gives a file with the same content. Features are copied chunk
    by chunk with H5Ocopy (no decode/encode), so they stay bit-identical; a source that is
    an index is read through its links. Used by `merge_shards` (a real copy is the point
    there); a writer's `close()` links instead.
    """
    contents = [read_contents(p) for p in sources]
    hidden_size = _hidden_size(contents, fingerprint)
    need = sum(cache_bytes(p) for p in sources)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise CacheError(
            f"out of disk space: writing {out} needs about {need / 1e9:.2f} GB and {free / 1e9:.2f} GB "
            "is free; free some space and rerun"
        )
    owner, skips = _merge_rows(contents)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as dst:
            _root_attrs(dst, fingerprint, hidden_size)
            feats, vads = dst.create_group(FEATURES), dst.create_group(VAD)
            handles = [h5py.File(p, "r") for p in sources]
            try:
                for utt_id in sorted(owner):
                    s, r = owner[utt_id]
                    key = contents[s].meta["key"][r]
                    handles[s].copy(handles[s][FEATURES][key], feats, name=key)
                    handles[s].copy(handles[s][VAD][key], vads, name=key)
            finally:
                for h in handles:
                    h.close()
            meta = {k: [contents[owner[u][0]].meta[k][owner[u][1]] for u in sorted(owner)] for k in META_COLUMNS}
            write_columns(dst.create_group(META), meta, STR_COLUMNS)
            write_columns(dst.create_group(SKIPPED), {k: [row[i] for row in skips] for i, k in enumerate(SKIP_COLUMNS)},
                          SKIP_COLUMNS)
        _fsync_file(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise (_disk_error(err, out) or err) from None
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
    lock = _Lock(lock_path(out), out)
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


# --- the writer -----------------------------------------------------------------------


class CacheWriter:
    """Append utterances to a cache; resume it after a kill; one writer per file.

    `add()` only checks shapes and queues the arrays (it takes ownership: do not modify
    them afterwards); a background thread converts to the storage dtype and writes parts.
    Errors from that thread (e.g. out of disk space) are raised by the next add/skip/close.
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any],
        *,
        shard: tuple[int, int] | None = None,
        part_utterances: int = PART_UTTERANCES,
        part_bytes: int = PART_BYTES,
        queue_bytes: int = QUEUE_BYTES,
        encode_threads: int = ENCODE_THREADS,
    ) -> None:
        base = Path(path)
        if parse_shard_name(base):
            raise CacheError(f"give the base path (e.g. {parse_shard_name(base)[0]}.h5) and shard=(i, n), not a shard file")
        self.path = shard_path(base, shard) if shard else base
        fp = normalize_fingerprint(fingerprint)
        if shard:
            fp["shard"] = [shard[0], shard[1]]
        self.fingerprint = fp
        self.layers: tuple[int, ...] = tuple(int(x) for x in fp["layers"])
        self.dtype = np.dtype(fp["dtype"])
        self.hidden_size = int(fp.get("hidden_size", 0))
        self.part_utterances, self.part_bytes, self.queue_bytes = part_utterances, part_bytes, queue_bytes
        self.parts = parts_dir(self.path)
        self.data = data_dir(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(lock_path(self.path), self.path)
        try:
            self._recover()
        except BaseException:
            self._lock.release()
            raise
        self.n_added = 0  # utterances queued in this session
        self.n_fallback = 0  # utterances stored in float32 because float16 would overflow
        self.n_nonfinite = 0  # utterances turned into model_error skips
        self._queue: queue.Queue = queue.Queue()
        self._encoder = ThreadPoolExecutor(max(1, encode_threads), thread_name_prefix="sapser-cache-encode")
        self._queued_bytes = 0
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="sapser-cache-writer", daemon=True)
        self._thread.start()
        self._closed = False

    # -- resume -----------------------------------------------------------------------

    def _recover(self) -> None:
        """Check every existing piece against our fingerprint; fill `done` from them.

        Pieces: `F.h5` (an index, or a self-contained file that is then a source itself),
        every data file in `F.data/` (linked or, after a kill inside close(), not yet) and
        every part in `F.parts/`.
        """
        self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)
        self.parts.mkdir(exist_ok=True)
        for tmp in self.parts.glob("*.tmp"):
            tmp.unlink()  # torn by a kill before its rename: its utterances are not done
        parts = sorted(self.parts.glob(_PART_GLOB))
        data = sorted(self.data.glob(_PART_GLOB)) if self.data.is_dir() else []
        for p in data + parts:
            if not _PART_NAME.fullmatch(p.name):  # int() of its number would fail below
                raise CacheDamaged(f"the cache is damaged: {p} is not a part this writer made (those are named "
                                   f"part-NNNNNN.h5); move it out of {p.parent} and rerun")
        self._sources: list[Path] = ([self.path] if self.path.exists() else []) + data + parts
        self._next_part = 1 + max((int(p.stem.split("-")[1]) for p in data + parts), default=0)
        self.stored: set[str] = set()
        self._skips: dict[tuple[str, str], str] = {}  # (item, reason) -> detail
        for src in self._sources:
            try:
                c = read_contents(src)
            except CacheError as err:
                if src == self.path or isinstance(err, CacheDamaged):  # that message names the fix already
                    raise
                # Only a storage failure can damage a renamed (fsynced) part.
                raise CacheError(f"{err}; delete that part and rerun: its utterances will be extracted again") from None
            self._check_fingerprint(c.fingerprint, src)
            if c.hidden_size:
                self._check_hidden(c.hidden_size, src)
            self.stored.update(c.utt_ids)
            for item, reason, detail in zip(*(c.skipped[k] for k in SKIP_COLUMNS)):
                self._skips.setdefault((item, reason), detail)
        self.done: set[str] = set(self.stored) | {i for i, r in self._skips if r not in NOT_DONE_REASONS}
        self.resumed = bool(self._sources)

    def _check_fingerprint(self, theirs: dict[str, Any], where: Path) -> None:
        keys = fingerprint_diff(self.fingerprint, theirs)
        if keys:
            raise CacheError(
                f"{where} was made with different settings ({describe_diff(keys, self.fingerprint, theirs)}); "
                f"use another --out or delete it"
            )

    def _check_hidden(self, size: int, where: Any) -> None:
        if self.hidden_size and size != self.hidden_size:
            raise CacheError(f"{where} has hidden size {size}, this run {self.hidden_size}")
        self.hidden_size = size

    # -- the model thread's side ------------------------------------------------------

    def add(self, utt: Utterance, features: np.ndarray, vad: np.ndarray, *, duration: float, truncated: bool) -> None:
        """Queue one utterance. features (T, L, D) float32/float16, vad (4, T) bool."""
        self._raise_pending()
        if not utt.utt_id:
            raise ValueError(f"an utterance without an id cannot be stored ({utt.path})")
        bad = unstorable(utt)
        if bad is not None:  # the readers skip these; HDF5 strings cannot hold a NUL
            raise CacheError(f"utterance {storable(utt.utt_id)!r} has a NUL byte in its {bad}; it cannot be stored")
        if utt.utt_id in self.stored:
            raise ValueError(f"utterance {utt.utt_id!r} is already in the cache (check writer.done first)")
        features, vad = np.asarray(features), np.asarray(vad)
        if features.ndim != 3 or features.shape[0] < 1:
            raise ValueError(f"{utt.utt_id}: features must be (T, L, D) with T >= 1, got {features.shape}")
        t, n_layers, d = features.shape
        if n_layers != len(self.layers):
            raise ValueError(f"{utt.utt_id}: features have {n_layers} layers, the fingerprint lists {len(self.layers)}")
        if features.dtype not in (np.float16, np.float32):
            raise ValueError(f"{utt.utt_id}: features must be float16 or float32, got {features.dtype}")
        if vad.shape != (N_VAD_MODES, t):
            raise ValueError(f"{utt.utt_id}: VAD mask is {vad.shape} but features have {t} frames; expected ({N_VAD_MODES}, {t})")
        self._check_hidden(d, utt.utt_id)
        row = {
            "utt_id": utt.utt_id, "key": utt_key(utt.utt_id), "speaker": utt.speaker, "session": utt.session,
            "emotion": utt.emotion or "", "path": str(utt.path), "dataset": utt.dataset, "split": utt.split,
            "valence": float(utt.valence), "arousal": float(utt.arousal), "duration": float(duration),
            "n_frames": int(t), "truncated": bool(truncated), "float32_fallback": False,
        }
        self.stored.add(utt.utt_id)
        self.done.add(utt.utt_id)
        self.n_added += 1
        encoded = self._encoder.submit(self._encode, row, features)
        self._put(("utt", row, encoded, vad.astype(bool)), features.nbytes)

    def skip(self, item: str, reason: str, detail: str = "") -> None:
        """Record an item not stored, with a SKIP_REASONS key; recording it twice is a no-op."""
        self._raise_pending()
        skip = Skip(item, reason, detail)  # validates the reason; a NUL becomes storable
        key = (skip.item, reason)
        if key in self._skips:
            return  # e.g. a reader's skips, recorded again by a resumed run
        self._skips[key] = skip.detail
        if reason not in NOT_DONE_REASONS:
            self.done.add(key[0])
        self._put(("skip", (key[0], reason, skip.detail)), 0)

    def _put(self, msg: tuple, nbytes: int) -> None:
        with self._room:
            # Block only when the disk is this far behind; one item always fits.
            while self._queued_bytes and self._queued_bytes + nbytes > self.queue_bytes and self._error is None:
                self._room.wait()
            self._queued_bytes += nbytes
        self._queue.put((msg, nbytes))
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._stop_thread()
            self._closed = True
            self._lock.release()
            raise err

    @property
    def skipped(self) -> list[Skip]:
        return [Skip(item, reason, detail) for (item, reason), detail in sorted(self._skips.items())]

    def close(self) -> Path:
        """Write what is queued, link every part into the index `F.h5`, release the lock.

        No feature is copied: parts are renamed into `F.data/` and F.h5 is rewritten as a
        small index (see the module docstring). A run that made one part and found nothing
        before it renames that part to F.h5 (one self-contained file).
        """
        if self._closed:
            return self.path
        self._closed = True
        try:
            self._stop_thread()
            if self._error is not None:
                raise self._error
            parts = sorted(self.parts.glob(_PART_GLOB))
            data = sorted(self.data.glob(_PART_GLOB)) if self.data.is_dir() else []
            linked = set(cache_files(self.path)[1:]) if self.path.exists() else set()
            if not self.path.exists() and not data and len(parts) == 1:
                os.replace(parts[0], self.path)  # already a complete cache: no copy
            elif parts or set(data) != linked:  # new parts, or data files a kill left unlinked
                self._link(parts)
            elif not self.path.exists():
                self._empty_cache()
            try:
                self.parts.rmdir()
            except OSError:
                pass  # someone else's file in there; leave it
            fsync_dir(self.path.parent)
        except OSError as err:
            raise (_disk_error(err, self.path) or err) from None
        finally:
            self._lock.release()
        return self.path

    def _link(self, parts: list[Path]) -> None:
        """Move `parts` into F.data/ (renames) and write F.h5 as the index over every data file."""
        self.data.mkdir(exist_ok=True)
        if self.path.exists() and _is_self_contained(self.path):
            # A self-contained F.h5 (a one-part run, or a cache from before links) becomes a
            # data file by a hard link, so the new index can replace F.h5 without a copy.
            first = self.data / "part-000000.h5"
            if not (first.exists() and os.path.samefile(first, self.path)):
                if first.exists():
                    first = self.data / f"part-{self._next_part:06d}.h5"
                    self._next_part += 1
                try:
                    os.link(self.path, first)
                except OSError:  # no hard links on this filesystem: copy it once
                    shutil.copyfile(self.path, first.with_name(first.name + ".tmp"))
                    _fsync_file(first.with_name(first.name + ".tmp"))
                    os.replace(first.with_name(first.name + ".tmp"), first)
        for p in parts:  # numbered across F.parts and F.data, so never a clash
            os.replace(p, self.data / p.name)
        fsync_dir(self.data)
        fsync_dir(self.parts)
        write_index(sorted(self.data.glob(_PART_GLOB)), self.path, self.fingerprint)

    def abort(self) -> None:
        """Keep every finished utterance in parts (a rerun completes the cache); no merge."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_thread()
        finally:
            self._lock.release()

    def __enter__(self) -> CacheWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _stop_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put((None, 0))
            self._thread.join()
        self._encoder.shutdown(wait=True, cancel_futures=True)

    def _empty_cache(self) -> None:
        """A run where nothing was added or skipped still leaves a valid (empty) cache."""
        _write_image(_Part().finish(self.fingerprint, self.hidden_size), self.path)

    # -- the writer thread -------------------------------------------------------------

    def _drain(self) -> None:
        part: _Part | None = None
        while True:
            msg, nbytes = self._queue.get()
            with self._room:
                self._queued_bytes -= nbytes
                self._room.notify_all()
            if self._error is not None:
                if msg is None:
                    return
                continue  # drain without writing so add() never blocks forever
            try:
                if msg is not None:
                    part = part or _Part()
                if msg is not None and msg[0] == "utt":
                    _, row, encoded, vad = msg
                    stored = encoded.result()  # written in add() order, encoded in parallel
                    self.n_fallback += row["float32_fallback"]
                    if stored is None:
                        self.n_nonfinite += 1
                        part.skips.append((row["utt_id"], "model_error", "non-finite feature values"))
                    else:
                        part.add(row, stored, vad)
                elif msg is not None:
                    part.skips.append(msg[1])
                full = part is not None and (len(part.rows) >= self.part_utterances or part.nbytes >= self.part_bytes)
                if part is not None and (msg is None or full):
                    self._flush(part)
                    part = None
                if msg is None:
                    return
            except BaseException as err:  # noqa: BLE001 - handed to the model thread
                part = None
                self._error = (_disk_error(err, self.parts) if isinstance(err, OSError) else None) or err
                with self._room:
                    self._room.notify_all()
                if msg is None:
                    return

    def _encode(self, row: dict, features: np.ndarray) -> np.ndarray | None:
        """(T, L, D) -> (L, T, D) in the storage dtype; float32 when float16 would overflow."""
        peak = max(-float(features.min()), float(features.max()))  # NaN propagates, inf is inf
        if not np.isfinite(peak):
            return None
        dtype = self.dtype
        if dtype == np.float16 and peak > FLOAT16_MAX:
            dtype = np.dtype(np.float32)
            row["float32_fallback"] = True
        return layer_major(features, dtype)

    def _flush(self, part: _Part) -> None:
        final = self.parts / f"part-{self._next_part:06d}.h5"
        self._next_part += 1
        _write_image(part.finish(self.fingerprint, self.hidden_size), final)


def layer_major(features: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(T, L, D) -> contiguous (L, T, D) in `dtype`.

    torch's float32->float16 cast rounds like numpy's (to nearest even; tested bit for
    bit) and is several times faster per core, so it is used when the process already
    has torch loaded (extraction always does); nothing here imports it.
    """
    torch = sys.modules.get("torch")
    if torch is not None and features.dtype != dtype and features.flags.writeable:
        x = torch.from_numpy(features).permute(1, 0, 2)  # (L, T, D) view
        return x.to(getattr(torch, dtype.name), memory_format=torch.contiguous_format).numpy()
    return np.ascontiguousarray(features.transpose(1, 0, 2), dtype=dtype)


class _Part:
    """One batch of utterances, built as an HDF5 image in RAM and written to disk in one go.

    HDF5 never writes to the disk here. A full disk then fails a plain write() with a
    clean ENOSPC; inside HDF5 (sec2 driver) the same failure left the library in a state
    that crashed the process when the file objects were freed.
    """

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.file = h5py.File(self.buffer, "w")
        self.features, self.vad = self.file.create_group(FEATURES), self.file.create_group(VAD)
        self.rows: list[dict] = []
        self.skips: list[tuple[str, str, str]] = []
        self.nbytes = 0

    def add(self, row: dict, features: np.ndarray, vad: np.ndarray) -> None:
        """features (L, T, D) in the storage dtype, vad (4, T) bool."""
        # One chunk per layer: reading layer l touches only (T, D) values on disk.
        self.features.create_dataset(row["key"], data=features, chunks=(1,) + features.shape[1:])
        self.vad.create_dataset(row["key"], data=vad.astype(np.uint8))
        self.rows.append(row)
        self.nbytes += features.nbytes

    def finish(self, fingerprint: dict[str, Any], hidden_size: int) -> memoryview:
        """The complete file image; rows sorted like a finished cache (a lone part is renamed to F.h5)."""
        rows, skips = sorted(self.rows, key=lambda r: r["utt_id"]), sorted(self.skips)
        with self.file as f:
            _root_attrs(f, fingerprint, hidden_size)
            write_columns(f.create_group(META), {k: [r[k] for r in rows] for k in META_COLUMNS}, STR_COLUMNS)
            write_columns(f.create_group(SKIPPED), {k: [s[i] for s in skips] for i, k in enumerate(SKIP_COLUMNS)},
                          SKIP_COLUMNS)
        return self.buffer.getbuffer()


def _write_image(image: memoryview, final: Path) -> None:
    """Write `final` atomically: to `final.tmp`, fsync, rename, fsync the folder."""
    tmp = final.with_name(final.name + ".tmp")
    try:
        _write_file(tmp, image)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a torn temp file is never mistaken for a part
        raise


def _write_file(path: Path, data: memoryview) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
