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

import os
import queue
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cache.contents import cache_files, is_index, read_contents
from cache.format import (
    FLOAT16_MAX,
    N_VAD_MODES,
    NOT_DONE_REASONS,
    SKIP_COLUMNS,
    CacheDamaged,
    CacheError,
    data_dir,
    describe_diff,
    corpora,
    fingerprint_diff,
    lock_path,
    normalize_fingerprint,
    parse_shard_name,
    parts_dir,
    shard_path,
    utt_key,
)
from cache.lock import WriterLock
from cache.merge import write_index
from cache.pack import finish_pack
from cache.parts import PART_GLOB, PART_NAME, Part, disk_error, layer_major, write_image
from core.files import fsync_dir, fsync_file
from core.records import Skip, Utterance, storable, unstorable

UNRECORDED = "(not recorded)"  # the corpus of a manifest cache made before fingerprints named it
# What a resuming or appending run may compare an utterance of its corpus with (stored_rows).
ROW_FACTS = ("path", "audio_sha256", "duration", "speaker", "emotion", "valence", "arousal")

PART_UTTERANCES = 64  # a kill loses at most this many finished utterances' work ...
PART_BYTES = 128 << 20  # ... or this many bytes of features, whichever comes first
QUEUE_BYTES = 512 << 20  # add() blocks only when this much is waiting for the disk (with its encoded copies)
# The float32 -> float16 cast is the writer's biggest CPU cost; numpy and torch release
# the GIL while casting, so a few threads scale it (and the model thread never waits).
ENCODE_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))


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
        part_utterances: int | None = None,
        part_bytes: int | None = None,
        queue_bytes: int | None = None,
        encode_threads: int = ENCODE_THREADS,
        append: bool = False,
    ) -> None:
        base = Path(path)
        if parse_shard_name(base):
            raise CacheError(f"give the base path (e.g. {parse_shard_name(base)[0]}.h5) and shard=(i, n), not a shard file")
        self.path = shard_path(base, shard) if shard else base
        fp = normalize_fingerprint(fingerprint)
        if shard:
            fp["shard"] = [shard[0], shard[1]]
        self.fingerprint = fp
        self.append = append
        self.layers: tuple[int, ...] = tuple(int(x) for x in fp["layers"])
        self.dtype = np.dtype(fp["dtype"])
        self.hidden_size = int(fp.get("hidden_size", 0))
        # None: the module's defaults, read now (so a test or a budget can change them)
        self.part_utterances = PART_UTTERANCES if part_utterances is None else part_utterances
        self.part_bytes = PART_BYTES if part_bytes is None else part_bytes
        self.queue_bytes = QUEUE_BYTES if queue_bytes is None else queue_bytes
        self.parts = parts_dir(self.path)
        self.data = data_dir(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(lock_path(self.path), self.path)
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
        if self.path.is_file():
            try:
                finish_pack(self.path)  # a pack in place killed before it deleted what it absorbed
            except (OSError, ValueError, TypeError):
                pass  # not readable: read_contents below says how
        for tmp in self.parts.glob("*.tmp"):
            tmp.unlink()  # torn by a kill before its rename: its utterances are not done
        parts = sorted(self.parts.glob(PART_GLOB))
        data = sorted(self.data.glob(PART_GLOB)) if self.data.is_dir() else []
        for p in data + parts:
            if not PART_NAME.fullmatch(p.name):  # int() of its number would fail below
                raise CacheDamaged(p, "it is not a part this writer made (those are named part-NNNNNN.h5)",
                                   f"move it out of {p.parent} and rerun")
        self._sources: list[Path] = ([self.path] if self.path.exists() else []) + data + parts
        self._next_part = 1 + max((int(p.stem.split("-")[1]) for p in data + parts), default=0)
        self.stored: set[str] = set()
        self._skips: dict[tuple[str, str], str] = {}  # (item, reason) -> detail
        recorded: list[str] = []  # the corpora the cache was built from, in order
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
            recorded += [x for x in corpora(c.fingerprint) if x not in recorded]
            self.stored.update(c.utt_ids)
            for item, reason, detail in zip(*(c.skipped[k] for k in SKIP_COLUMNS)):
                self._skips.setdefault((item, reason), detail)
        self.done: set[str] = set(self.stored) | {i for i, r in self._skips if r not in NOT_DONE_REASONS}
        self.resumed = bool(self._sources)
        self.corpora = self._add_corpus(recorded)
        self.parts.mkdir(exist_ok=True)  # only now: a refused cache is left as it was found

    def stored_rows(self) -> dict[str, dict[str, Any]]:
        """utt_id -> what the cache says of each stored utterance (ROW_FACTS), read from its files
        again on demand (only a cache built from several corpora needs it, see extract.pipeline)."""
        rows: dict[str, dict[str, Any]] = {}
        for src in self._sources:
            c = read_contents(src)
            for i, utt_id in enumerate(c.utt_ids):
                rows.setdefault(utt_id, {k: c.meta[k][i] for k in ROW_FACTS})
        return rows

    def _check_fingerprint(self, theirs: dict[str, Any], where: Path) -> None:
        """The same settings: every fingerprint key equal, except that `corpus` may differ (a cache
        built from several corpora by appending; `_add_corpus` decides)."""
        keys = fingerprint_diff(self.fingerprint, theirs, ignore=("corpus",))
        if keys:
            ours = corpora(self.fingerprint)
            if ours and not set(ours) <= set(corpora(theirs)):
                keys = ["corpus", *keys]
            raise CacheError(
                f"{where} was made with different settings ({describe_diff(keys, self.fingerprint, theirs)}); "
                "use another --out (that cache stays as it is)"
            )

    def _add_corpus(self, recorded: list[str]) -> list[str]:
        """The corpora the cache records once this run is in it. A corpus the cache was not built
        from is refused unless this is an append, which adds it (and its rows) to the list."""
        ours = corpora(self.fingerprint)
        if not ours or not self._sources:  # a writer without corpora, or a new cache
            return ours
        recorded = recorded or [UNRECORDED]  # a manifest cache made before `corpus` was recorded
        new = [x for x in ours if x not in recorded]
        if new and not self.append:
            shown = recorded[0] if len(recorded) == 1 else recorded
            raise CacheError(
                f"{self.path} was made from another corpus (corpus: {shown!r} (cache) vs {new[0]!r} (now)); to add "
                "this corpus's rows to it, rerun with --append (same model and settings), else use another --out"
            )
        mine = recorded + new
        self.fingerprint["corpus"] = mine[0] if len(mine) == 1 else mine
        return mine

    def _check_hidden(self, size: int, where: Any) -> None:
        if self.hidden_size and size != self.hidden_size:
            raise CacheError(f"{where} has hidden size {size}, this run {self.hidden_size}")
        self.hidden_size = size

    # -- the model thread's side ------------------------------------------------------

    def add(self, utt: Utterance, features: np.ndarray, vad: np.ndarray, *, duration: float, truncated: bool,
            audio_sha256: str = "") -> None:
        """Queue one utterance. features (T, L, D) float32/float16, vad (4, T) bool; `audio_sha256`
        identifies the samples the features were computed from (see extract.loading)."""
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
            "audio_sha256": audio_sha256,
        }
        self.stored.add(utt.utt_id)
        self.done.add(utt.utt_id)
        self.n_added += 1
        encoded = self._encoder.submit(self._encode, row, features)
        # the features as given, plus the storage-dtype copy the encoder makes of them
        held = features.nbytes + features.size * self.dtype.itemsize + vad.size
        self._put(("utt", row, encoded, vad.astype(bool)), held)

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
            parts = sorted(self.parts.glob(PART_GLOB))
            data = sorted(self.data.glob(PART_GLOB)) if self.data.is_dir() else []
            linked = self._linked()
            if not self.path.exists() and not data and len(parts) == 1:
                os.replace(parts[0], self.path)  # already a complete cache: no copy
            elif parts or not set(data) <= set(linked):  # new parts, or data files a kill left unlinked
                self._link(parts, linked)
            elif not self.path.exists():
                self._empty_cache()
            try:
                self.parts.rmdir()
            except OSError:
                pass  # someone else's file in there; leave it
            fsync_dir(self.path.parent)
        except OSError as err:
            raise (disk_error(err, self.path) or err) from None
        finally:
            self._lock.release()
        return self.path

    def _linked(self) -> list[Path]:
        """The data files the existing F.h5 links (none for a self-contained file or no file). Usually
        F.data/*, but an index renamed without its folder (G.h5 beside F.data/) links F.data/*."""
        return cache_files(self.path)[1:] if self.path.exists() else []

    def _link(self, parts: list[Path], linked: list[Path]) -> None:
        """Move `parts` into F.data/ (renames) and write F.h5 as the index over every data file
        (those in F.data/ and those the old index linked, wherever they are)."""
        self.data.mkdir(exist_ok=True)
        if self.path.exists() and not is_index(self.path):
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
                    fsync_file(first.with_name(first.name + ".tmp"))
                    os.replace(first.with_name(first.name + ".tmp"), first)
        for p in parts:  # numbered across F.parts and F.data, so never a clash
            os.replace(p, self.data / p.name)
        fsync_dir(self.data)
        fsync_dir(self.parts)
        files = {p.resolve(): p for p in [*linked, *self.data.glob(PART_GLOB)]}
        write_index(sorted(files.values()), self.path, self.fingerprint)

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
        write_image(Part().finish(self.fingerprint, self.hidden_size), self.path)

    # -- the writer thread -------------------------------------------------------------

    def _drain(self) -> None:
        part: Part | None = None
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
                    part = part or Part()
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
                self._error = (disk_error(err, self.parts) if isinstance(err, OSError) else None) or err
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

    def _flush(self, part: Part) -> None:
        final = self.parts / f"part-{self._next_part:06d}.h5"
        self._next_part += 1
        write_image(part.finish(self.fingerprint, self.hidden_size), final)
