"""The cache's on-disk layout, its fingerprint, and the names every other cache module uses.

A finished cache `F.h5` is one self-contained HDF5 file, readable with plain h5py:

    /                      attributes:
        sapser_format      int, FORMAT_VERSION
        fingerprint        str, JSON object: how the features were made (see below)
        classes            str, JSON list: class names; emotion indices follow this order
        layers             int64 (L,), hidden-state indices stored (0 = conv/embedding output)
        hidden_size        int, D
        dtype              str, "float16" or "float32": the storage dtype asked for
    /features/<key>        (L, T, D) float16 (or float32, see fallback), chunks (1, T, D):
                           one chunk per layer, so reading layer l reads T*D values only
    /vad/<key>             (4, T) uint8 (0/1); row m = WebRTC aggressiveness m
    /meta/<column>         (N,) one row per utterance, sorted by utt_id:
        utt_id, key, speaker, session, emotion ("" = none), path, dataset   UTF-8 strings
        valence, arousal (NaN = none), duration (seconds)                    float64
        n_frames                                                             int64
        truncated, float32_fallback                                          bool
    /skipped/<column>      (S,) item, reason, detail: UTF-8 strings, sorted by (item, reason)

`<key>` is the utt_id with "%" and "/" percent-escaped (and a leading "." escaped), because
HDF5 names cannot hold "/"; `/meta/key` gives it for each row. To read layer 24 of one
utterance with plain h5py:

    f = h5py.File("F.h5", "r"); layers = list(f.attrs["layers"])
    x = f["features"][key][layers.index(24)]          # (T, D)

float16 overflow fallback: float16 cannot hold |x| > 65504. An utterance whose features
would overflow is stored in float32 in the same place and shape, and its
`/meta/float32_fallback` is True; nothing is clipped. Non-finite features are never
stored: the writer records the utterance as skipped (reason `model_error`).

Fingerprint: a JSON object the extractor builds (model id and revision or weight hash,
layers, dtype, sample rate, frame window/stride, VAD settings, max seconds, dataset,
classes, ...); the writer adds `format_version`, and `shard: [i, n]` in a shard file.
Resuming or appending with a different fingerprint is refused, naming the keys that differ.

While a writer runs, finished batches sit in `F.parts/part-NNNNNN.h5` (same layout, written
under a `.tmp` name, fsynced, then renamed), next to the lock file `F.h5.lock` (PID).
`close()` moves the parts into `F.data/` and writes `F.h5` as an index: the attributes,
/meta and /skipped above, and /features/<key>, /vad/<key> as HDF5 external links into the
part files (relative paths; h5py follows them). A run that made a single part renames it
to `F.h5` instead (one self-contained file). Shard i of n is written as
`F.shard-i-of-n.h5` with i counted from 1 in the name, as in `cli extract --shard i/n`
(the API's shard=(i, n) counts from 0), with its own parts, data folder and lock.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from extract.errors import UserError

FORMAT_VERSION = 1

FORMAT_ATTR = "sapser_format"
FINGERPRINT_ATTR = "fingerprint"
ROOT_ATTRS = (FORMAT_ATTR, FINGERPRINT_ATTR, "classes", "layers", "hidden_size", "dtype")

FEATURES = "features"
VAD = "vad"
META = "meta"
SKIPPED = "skipped"

N_VAD_MODES = 4
DTYPES = ("float16", "float32")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_STR = h5py.string_dtype("utf-8")

STR_COLUMNS = ("utt_id", "key", "speaker", "session", "emotion", "path", "dataset")
FLOAT_COLUMNS = ("valence", "arousal", "duration")
INT_COLUMNS = ("n_frames",)
BOOL_COLUMNS = ("truncated", "float32_fallback")
META_COLUMNS = STR_COLUMNS + FLOAT_COLUMNS + INT_COLUMNS + BOOL_COLUMNS
SKIP_COLUMNS = ("item", "reason", "detail")

# A duplicate_id skip names the id of an utterance that IS kept, so it must not mark it done.
NOT_DONE_REASONS = frozenset({"duplicate_id"})


class CacheError(UserError):
    """A cache that cannot be written or read as asked; the message is one sentence."""


def utt_key(utt_id: str) -> str:
    """The HDF5 link name of an utterance: reversible, never contains '/'."""
    key = utt_id.replace("%", "%25").replace("/", "%2F")
    return "%2E" + key[1:] if key.startswith(".") else key


def normalize_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A JSON round trip (tuples become lists) plus the keys the writer owns."""
    try:
        fp = json.loads(json.dumps(fingerprint, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise CacheError(f"the cache fingerprint is not JSON-serializable ({err})") from None
    for key in ("layers", "classes"):
        if key not in fp:
            raise CacheError(f"the cache fingerprint has no {key!r} entry")
    fp.setdefault("dtype", "float16")
    if fp["dtype"] not in DTYPES:
        raise CacheError(f"cache dtype {fp['dtype']!r} is not one of {', '.join(DTYPES)}")
    fp["format_version"] = FORMAT_VERSION
    return fp


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Sorted keys whose values differ between two fingerprints (missing counts as differing)."""
    keys = (set(a) | set(b)) - set(ignore)
    return sorted(k for k in keys if k not in a or k not in b or not _same(a[k], b[k]))


def _same(x: Any, y: Any) -> bool:
    # NaN != NaN would make a fingerprint differ from itself.
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return x == y


def describe_diff(keys: list[str], ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """`model: 'a' (cache) vs 'b' (now)` for the first few keys, for one-line errors."""
    shown = [f"{k}: {theirs.get(k, '<absent>')!r} (cache) vs {ours.get(k, '<absent>')!r} (now)" for k in keys[:4]]
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    return "; ".join(shown) + more


def shard_path(path: str | Path, shard: tuple[int, int]) -> Path:
    """`F.h5` + (i, n), 0 <= i < n -> `F.shard-{i+1}-of-n.h5` (names count from 1, like --shard)."""
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise CacheError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    path = Path(path)
    stem = path.name.removesuffix(".h5")
    return path.with_name(f"{stem}.shard-{i + 1}-of-{n}.h5")


_SHARD_RE = re.compile(r"^(?P<stem>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.h5$")


def parse_shard_name(path: str | Path) -> tuple[str, int, int] | None:
    """`F.shard-i-of-n.h5` -> ("F", i - 1, n) (0-based index); None for a name that is not a shard."""
    m = _SHARD_RE.match(Path(path).name)
    if not m or not 1 <= int(m["i"]) <= int(m["n"]):
        return None
    return m["stem"], int(m["i"]) - 1, int(m["n"])


def find_shards(path: str | Path) -> list[Path]:
    """The shard files written for base path `F.h5` (any n), sorted by shard index."""
    path = Path(path)
    stem = path.name.removesuffix(".h5")
    found = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            parsed = parse_shard_name(p)
            if parsed and parsed[0] == stem:
                found.append((parsed[2], parsed[1], p))
    return [p for _, _, p in sorted(found)]


def resolve_paths(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files that make up a cache: F.h5 itself, or its complete set of shards."""
    if isinstance(path, (str, Path)):
        path = Path(path)
        if path.exists():
            return [path]
        shards = find_shards(path)
        if not shards:
            if parts_dir(path).exists():
                raise CacheError(f"{path} is unfinished (its writer was interrupted); rerun the same extract command to complete it")
            raise CacheError(f"no cache at {path} (and no shard files {path.stem}.shard-*-of-*.h5 beside it)")
        paths = shards
    else:
        paths = [Path(p) for p in path]
        if not paths:
            raise CacheError("no cache files given")
        for p in paths:
            if not p.exists():
                raise CacheError(f"no cache file at {p}")
    if len(paths) == 1 and not parse_shard_name(paths[0]):
        return paths
    named = [parse_shard_name(p) for p in paths]
    if any(n is None for n in named):
        raise CacheError(f"several files given, but {paths[named.index(None)]} is not named like a shard (F.shard-i-of-n.h5)")
    counts = {n for _, _, n in named}
    if len(counts) != 1:
        raise CacheError(f"the shard files come from different splits (of {sorted(counts)})")
    n = counts.pop()
    have = {i for _, i, _ in named}
    missing = sorted(set(range(n)) - have)
    if missing:
        raise CacheError(f"shard(s) {', '.join(str(i + 1) for i in missing)} of {n} missing beside {paths[0]}; finish them or merge what exists")
    by_index = {i: p for p, (_, i, _) in zip(paths, named)}
    return [by_index[i] for i in range(n)]


def shard_of(utt_id: str, n: int) -> int:
    """The shard an utterance belongs to: a stable hash, the same on every machine and run."""
    return zlib.crc32(utt_id.encode("utf-8")) % n


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".h5") + ".parts")


def data_dir(path: Path) -> Path:
    """Where a finished cache's part files live; F.h5 links to them (see cache.writer)."""
    return path.with_name(path.name.removesuffix(".h5") + ".data")


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_columns(group: Any, columns: dict[str, list], str_names: tuple[str, ...]) -> None:
    """One (N,) dataset per column; strings as variable-length UTF-8 (plain h5py: `.asstr()`)."""
    for name, values in columns.items():
        if name in str_names:
            group.create_dataset(name, data=np.array(values, dtype=object), dtype=_STR,
                                 shape=(len(values),))
        elif name in BOOL_COLUMNS:
            group.create_dataset(name, data=np.asarray(values, dtype=bool), shape=(len(values),))
        elif name in INT_COLUMNS:
            group.create_dataset(name, data=np.asarray(values, dtype=np.int64), shape=(len(values),))
        else:
            group.create_dataset(name, data=np.asarray(values, dtype=np.float64), shape=(len(values),))


def read_columns(group: Any, names: tuple[str, ...], str_names: tuple[str, ...]) -> dict[str, list]:
    """The inverse of write_columns: plain Python lists per column."""
    out: dict[str, list] = {}
    for name in names:
        ds = group[name]
        out[name] = list(ds.asstr()[()]) if name in str_names else ds[()].tolist()
    return out
