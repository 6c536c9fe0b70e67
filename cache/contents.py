"""What a cache-format file holds (header, metadata, skip list) and which files a cache is made of.

Shared by the reader and the writer: both open files through `read_contents`,
which checks the structure once (cache.format), and both follow an index file's
links to its data files (`cache_files`, `direct_files`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from cache.format import (FEATURES, FINGERPRINT_ATTR, FORMAT_ATTR, FORMAT_VERSION, CacheError, check_header,
                          check_rows, damaged, data_dir, parts_dir, read_tables, short_error)
from cache.parts import PART_GLOB

# Root attribute of an index file (JSON list of the data files it links, relative to its
# folder); a self-contained cache file has none.
LINKED_ATTR = "data_files"


@dataclass
class Contents:
    """The rows of one cache or part file (no feature arrays)."""

    path: Path
    fingerprint: dict[str, Any]
    hidden_size: int
    meta: dict[str, list] = field(default_factory=dict)
    skipped: dict[str, list] = field(default_factory=dict)

    @property
    def utt_ids(self) -> list[str]:
        return self.meta.get("utt_id", [])


def read_contents(path: Path) -> Contents:
    """Header, metadata and skip list of a cache-format file; CacheError if it is not one.

    The structure is checked here, once, where every reader and writer opens a file
    (cache.format.check_header/check_rows: attributes and dataset shapes, no feature
    data), so a damaged file is one sentence naming the utterance, never a traceback later.
    """
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise CacheError(f"{path} is not an HDF5 file or is corrupted ({short_error(err)})") from None
    with f:
        try:
            if FORMAT_ATTR not in f.attrs or FINGERPRINT_ATTR not in f.attrs:
                raise CacheError(f"{path} is not a sapser feature cache (no {FORMAT_ATTR!r} attribute)")
            version = int(f.attrs[FORMAT_ATTR])
            if version > FORMAT_VERSION:
                raise CacheError(f"{path} has cache format {version}; this sapser reads up to {FORMAT_VERSION}")
            fingerprint, hidden_size = check_header(f, path)
            meta, skipped = read_tables(f)
            check_rows(f, path, fingerprint, hidden_size, meta)
        except CacheError:
            raise
        except (KeyError, OSError, ValueError, TypeError, RuntimeError) as err:  # h5py's ways to fail on a torn file
            raise damaged(path, f"it cannot be read ({short_error(err)})") from None
        return Contents(path=path, fingerprint=fingerprint, hidden_size=hidden_size, meta=meta, skipped=skipped)


def stored_fingerprint(path: str | Path) -> dict[str, Any] | None:
    """The fingerprint of the cache being written at `path` (the file, else its first data file or
    part), or None when there is none yet or it cannot be read (the writer then says why)."""
    path = Path(path)
    candidates = [path] + sorted(data_dir(path).glob(PART_GLOB)) + sorted(parts_dir(path).glob(PART_GLOB))
    for candidate in candidates:
        if candidate.is_file():
            try:
                return read_contents(candidate).fingerprint
            except CacheError:
                return None
    return None


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


def is_index(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return LINKED_ATTR in f.attrs

