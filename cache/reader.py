"""FeatureCache: random access to a finished cache (one file or a set of shards).

The HDF5 files are opened lazily, once per process: a DataLoader worker (fork or spawn)
opens its own handles on first use, because an HDF5 handle must not cross a fork.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from cache.contents import cache_bytes, direct_files, read_contents
from cache.format import (
    FEATURES,
    N_VAD_MODES,
    RETRIED_REASONS,
    VAD,
    CacheError,
    all_finite,
    damaged,
    fingerprint_diff,
    resolve_paths,
)
from core.choices import spoken
from core.frames import VAD_MODES

PUBLIC_META = ("speaker", "session", "emotion", "valence", "arousal", "n_frames", "duration",
               "truncated", "path", "dataset", "float32_fallback", "split")


class FeatureCache:
    """A read-only view of a cache: metadata in RAM, features read on demand (or preloaded)."""

    def __init__(self, path: str | Path | Sequence[str | Path]) -> None:
        self.paths = resolve_paths(path)
        self.path = Path(path) if isinstance(path, (str, Path)) else self.paths[0]
        contents = [read_contents(p) for p in self.paths]
        fp0 = contents[0].fingerprint
        for c in contents[1:]:
            keys = fingerprint_diff(fp0, c.fingerprint, ignore=("shard",))
            if keys:
                raise CacheError(f"{c.path} was made differently from {self.paths[0]} ({', '.join(keys)} differ)")
        self.fingerprint: dict[str, Any] = {k: v for k, v in fp0.items() if k != "shard" or len(self.paths) == 1}
        self.classes: tuple[str, ...] = tuple(fp0["classes"])
        self.layers: tuple[int, ...] = tuple(int(x) for x in fp0["layers"])
        self.dtype = np.dtype(fp0["dtype"])
        sizes = {c.hidden_size for c in contents if c.utt_ids}
        if len(sizes) > 1:
            raise CacheError(f"the shard files of {self.path} disagree on the hidden size ({sorted(sizes)}); "
                             "they come from different models")
        self.hidden_size = max((c.hidden_size for c in contents), default=0)
        frames = []
        for i, c in enumerate(contents):
            df = pd.DataFrame(c.meta)
            df["_file"] = i
            frames.append(df)
        meta = pd.concat(frames, ignore_index=True)
        dup = meta["utt_id"][meta["utt_id"].duplicated()]
        if len(dup):
            raise CacheError(f"utterance {dup.iloc[0]!r} appears in more than one shard")
        meta = meta.sort_values("utt_id").set_index("utt_id")
        meta["emotion"] = pd.Series([e or None for e in meta["emotion"]], index=meta.index, dtype=object)
        self._file = meta["_file"].to_dict()
        self._key = meta["key"].to_dict()
        # An index file's arrays live in its part files: read them there, not through the
        # external links (a link opens its file on every access: ~0.5 ms per read).
        self._open_paths, self._file = direct_files(self.paths, self._file, self._key)
        self.meta: pd.DataFrame = meta[list(PUBLIC_META)].copy()
        skipped = pd.concat([pd.DataFrame(c.skipped) for c in contents], ignore_index=True)
        # A retried utterance that is stored now is no longer skipped (e.g. a transient model_error).
        retried = skipped["reason"].isin(list(RETRIED_REASONS)) & skipped["item"].isin(meta.index)
        self.skipped: pd.DataFrame = skipped[~retried].drop_duplicates(["item", "reason"]).sort_values(
            ["item", "reason"]).reset_index(drop=True)
        self._pid: int | None = None
        self._handles: list[h5py.File] = []
        self._ram: _Preloaded | None = None

    # -- handles ----------------------------------------------------------------------

    def _files(self) -> list[h5py.File]:
        if self._pid != os.getpid():  # first use, or first use after a fork
            self._handles = []
            for p in self._open_paths:
                try:
                    self._handles.append(h5py.File(p, "r"))
                except OSError as err:
                    raise CacheError(f"{p} is not an HDF5 file or is corrupted ({err})") from None
            self._pid = os.getpid()
        return self._handles

    def _read(self, group: str, utt_id: str, index: Any) -> np.ndarray:
        try:
            f = self._files()[self._file[utt_id]]
        except KeyError:
            raise CacheError(f"utterance {utt_id!r} is not in {self.path}") from None
        try:
            x = f[group][self._key[utt_id]][index]
        except (KeyError, OSError, ValueError) as err:
            raise damaged(Path(f.filename), f"the {group} of utterance {utt_id!r} cannot be read "
                                            f"({' '.join(str(err).split())[:120]})") from None
        if group == FEATURES and not all_finite(x):
            # The writer never stores non-finite features (they become model_error skips), so
            # these were changed afterwards; scoring them would write NaN probabilities.
            raise damaged(Path(f.filename), f"utterance {utt_id!r} has non-finite feature values (NaN or inf)")
        return x

    def close(self) -> None:
        if self._pid == os.getpid():
            for h in self._handles:
                h.close()
        self._handles, self._pid = [], None

    def __enter__(self) -> FeatureCache:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # Pickled into spawn-started workers: never ship open HDF5 handles.
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = [], None
        return state

    def __len__(self) -> int:
        return len(self.meta)

    # -- access -----------------------------------------------------------------------

    def positions(self, layers: Sequence[int] | None) -> list[int]:
        """Stored positions of hidden-state indices; CacheError naming what is available."""
        if layers is None:
            return list(range(len(self.layers)))
        if len(layers) == 0:
            raise CacheError(f"no layers selected; this cache holds layers {_ranges(self.layers)}")
        where = {layer: i for i, layer in enumerate(self.layers)}
        missing = [int(x) for x in layers if int(x) not in where]
        if missing:
            raise CacheError(f"layer(s) {', '.join(map(str, missing))} not in this cache; it holds layers {_ranges(self.layers)}")
        return [where[int(x)] for x in layers]

    def features(self, utt_id: str, layers: Sequence[int] | None = None) -> np.ndarray:
        """(T, L_sel, D) in the stored dtype (a view when preloaded: do not modify)."""
        pos = self.positions(layers)
        if self._ram is not None and utt_id in self._ram.offsets and set(pos) <= set(self._ram.positions):
            start, t = self._ram.offsets[utt_id]
            cols = [self._ram.positions.index(p) for p in pos]
            block = self._ram.features[start:start + t]  # (T, L_ram, D)
            return block if cols == list(range(len(self._ram.positions))) else block[:, cols]
        if pos == list(range(pos[0], pos[-1] + 1)):
            x = self._read(FEATURES, utt_id, np.s_[pos[0]:pos[-1] + 1])  # (L_sel, T, D), one chunk per layer
        else:
            x = np.stack([self._read(FEATURES, utt_id, p) for p in pos])
        return x.transpose(1, 0, 2)  # (T, L_sel, D)

    def vad(self, utt_id: str, mode: int) -> np.ndarray:
        """(T,) bool: WebRTC VAD at aggressiveness `mode` on the feature frames."""
        check_vad_mode(mode)
        if self._ram is not None and utt_id in self._ram.offsets:
            start, t = self._ram.offsets[utt_id]
            return self._ram.vad[mode, start:start + t]
        return self._read(VAD, utt_id, mode).astype(bool)

    def preload(self, layers: Sequence[int] | None, budget_bytes: int) -> None:
        """Copy the chosen layers of every utterance into one RAM array (T_total, L_sel, D).

        float32 when any utterance needed the float32 fallback (else the stored dtype).
        """
        pos = self.positions(layers)
        dtype = self._preload_dtype()
        n_frames = self.meta["n_frames"].to_numpy(np.int64)
        total = int(n_frames.sum())
        need = self.preload_bytes(layers)
        if need > budget_bytes:
            raise CacheError(
                f"preloading {len(pos)} layer(s) needs {need / 2**30:.2f} GiB, over the budget of "
                f"{budget_bytes / 2**30:.2f} GiB; choose fewer layers or raise the budget"
            )
        feats = np.empty((total, len(pos), self.hidden_size), dtype=dtype)  # (T_total, L_sel, D)
        vad = np.empty((N_VAD_MODES, total), dtype=bool)
        offsets: dict[str, tuple[int, int]] = {}
        self._ram = None  # read from disk below
        start = 0
        for utt_id, t in zip(self.meta.index, n_frames):
            feats[start:start + t] = self.features(utt_id, [self.layers[p] for p in pos])
            vad[:, start:start + t] = self._read(VAD, utt_id, np.s_[:]).astype(bool)
            offsets[utt_id] = (start, int(t))
            start += int(t)
        self._ram = _Preloaded(pos, feats, vad, offsets)

    def _preload_dtype(self) -> np.dtype:
        # float32 when any utterance needed the float16-overflow fallback (nothing is rounded)
        return np.dtype(np.float32) if self.meta["float32_fallback"].any() else self.dtype

    def preload_bytes(self, layers: Sequence[int] | None) -> int:
        """RAM that `preload(layers)` fills: the features in their preload dtype plus the 4 VAD masks."""
        frames = int(self.meta["n_frames"].sum())
        return frames * len(self.positions(layers)) * self.hidden_size * self._preload_dtype().itemsize \
            + N_VAD_MODES * frames

    @property
    def preloaded_bytes(self) -> int:
        return 0 if self._ram is None else self._ram.features.nbytes + self._ram.vad.nbytes

    def preloaded(self) -> tuple[np.ndarray, dict[str, tuple[int, int]]] | None:
        """The RAM array (T_total, L_sel, D) and utt_id -> (offset, T), or None."""
        return None if self._ram is None else (self._ram.features, self._ram.offsets)

    def size_on_disk(self) -> int:
        return sum(cache_bytes(p) for p in self.paths)  # an index file plus the parts it links


class _Preloaded:
    def __init__(self, positions: list[int], features: np.ndarray, vad: np.ndarray,
                 offsets: dict[str, tuple[int, int]]) -> None:
        self.positions, self.features, self.vad, self.offsets = positions, features, vad, offsets


def check_vad_mode(mode: int) -> int:
    """`mode` itself, or a CacheError naming the modes every cache holds a mask for."""
    if mode not in VAD_MODES:
        raise CacheError(f"unknown VAD mode {mode!r}; choose {spoken([str(m) for m in VAD_MODES])} "
                         f"({VAD_MODES.note})")
    return mode


def _ranges(values: Sequence[int]) -> str:
    """(0, 1, 2, 5, 7, 8) -> '0-2, 5, 7-8'."""
    out, vals = [], sorted(values)
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ", ".join(out)

