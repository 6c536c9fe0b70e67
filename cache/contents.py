"""What a cache-format file holds (header, metadata, skip list) and which files a cache is made of.

Shared by the reader and the writer: both open files through `read_contents`,
which checks the structure once (cache.format), and both follow an index file's
links to its data files (`cache_files`, `direct_files`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from cache.format import (FEATURES, FINGERPRINT_ATTR, FORMAT_ATTR, FORMAT_VERSION, VAD, CacheDamaged, CacheError,
                          check_header, check_rows, check_shapes, damage_fix, damaged, data_dir, index_fix, parts_dir,
                          read_tables,
                          short_error)
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


class DataMissing(CacheError):
    """An index whose data folder is not beside it (copied or moved alone): nothing is damaged."""


def read_contents(path: Path) -> Contents:
    """Header, metadata and skip list of a cache-format file; CacheError if it is not one.

    The structure is checked here, once, where every reader and writer opens a file
    (cache.format.check_header/check_rows: attributes and dataset shapes, no feature
    data), so a damaged file is one sentence naming the utterance, never a traceback later.
    An index is checked through its data files (`check_index`), and an index without its
    data folder is `DataMissing`: the folder was not copied or moved with it.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise CacheError(f"{path} is not an HDF5 file or is corrupted ({short_error(err)})") from None
    with f:
        index, n_rows = False, None
        try:
            if FORMAT_ATTR not in f.attrs or FINGERPRINT_ATTR not in f.attrs:
                raise CacheError(f"{path} is not a sapser feature cache (no {FORMAT_ATTR!r} attribute)")
            version = int(f.attrs[FORMAT_ATTR])
            if version > FORMAT_VERSION:
                raise CacheError(f"{path} has cache format {version}; this sapser reads up to {FORMAT_VERSION}")
            index = LINKED_ATTR in f.attrs
            fingerprint, hidden_size = check_header(f, path)
            meta, skipped = read_tables(f)
            n_rows = len(meta["utt_id"])
            if index:
                check_index(f, path, fingerprint, hidden_size, meta)
            else:
                check_rows(f, path, fingerprint, hidden_size, meta)
        except CacheDamaged as err:
            if err.path != path:  # a data file of this index: its own message, naming this index
                raise
            if index:
                raise err.refix(index_fix(path, _folders(_linked_names(f)))) from None
            raise err.refix(damage_fix(path, utterances=n_rows)) from None
        except CacheError:
            raise
        except (KeyError, OSError, ValueError, TypeError, RuntimeError) as err:  # h5py's ways to fail on a torn file
            raise damaged(path, f"it cannot be read ({short_error(err)})",
                          index_fix(path, _folders(_linked_names(f))) if index else None) from None
        return Contents(path=path, fingerprint=fingerprint, hidden_size=hidden_size, meta=meta, skipped=skipped)


def check_index(f: Any, path: Path, fp: dict[str, Any], hidden: int, meta: dict[str, list]) -> None:
    """An index: its data files are all beside it (else DataMissing), every utterance links into
    one of them, and each data file, checked as a cache file of its own, holds the utterance
    with the same frame count. Data files are read directly, not through the links (HDF5
    would also try the working directory, where another copy may be)."""
    names = _linked_names(f)
    if names is None:
        raise damaged(path, f"its {LINKED_ATTR!r} attribute is not a JSON list of file names")
    missing = [n for n in names if not (path.parent / n).is_file()]
    if missing:
        raise DataMissing(missing_data_message(path, names, missing))
    check_rows(f, path, fp, hidden, meta, shapes=False)
    linked = set(names)
    owner: dict[str, list[int]] = {}
    for i, key in enumerate(meta["key"]):
        targets = {_link_target(f[group], key, f"/{group}/{key}") for group in (FEATURES, VAD)}
        if len(targets) != 1 or not targets <= linked:
            raise damaged(path, f"utterance {meta['utt_id'][i]!r} does not link its features and VAD masks "
                                "into one of its data files")
        owner.setdefault(targets.pop(), []).append(i)
    for name, rows in owner.items():
        data = path.parent / name
        try:
            try:
                g = h5py.File(data, "r")
            except OSError as err:
                raise damaged(data, f"it is not an HDF5 file or is corrupted ({short_error(err)})") from None
            with g:
                if FEATURES not in g or VAD not in g:
                    raise damaged(data, f"it has no /{FEATURES} or /{VAD} group")
                check_shapes(g, data, fp, hidden, meta, rows)
        except CacheDamaged as err:
            raise err.refix(damage_fix(data, utterances=len(rows), index=path)) from None
        except (KeyError, OSError, ValueError, TypeError, RuntimeError) as err:
            raise damaged(data, f"it cannot be read ({short_error(err)})",
                          damage_fix(data, utterances=len(rows), index=path)) from None


def _link_target(group: Any, key: str, expected: str) -> str | None:
    """The file an external link `key` in `group` points to, None unless it is one to `expected`."""
    links = group.id.links
    name = key.encode("utf-8")
    try:
        if links.get_info(name).type != h5py.h5l.TYPE_EXTERNAL:
            return None
        filename, target = links.get_val(name)
    except (KeyError, ValueError, TypeError):
        return None
    return filename.decode("utf-8") if target.decode("utf-8") == expected else None


def missing_data_message(path: Path, names: list[str], missing: list[str]) -> str:
    """`F.h5: its features live in F.data/ beside it, which is missing: copy or move ...` (one line)."""
    folders = _folders(names)
    where = " and ".join(f"{f}/" for f in folders)
    gone = [f for f in folders if not (path.parent / f).is_dir()]
    if gone:
        state = "which is missing" if len(folders) == 1 else f"of which {' and '.join(g + '/' for g in gone)} missing"
    else:
        state = (f"which is incomplete ({len(missing)} of its {len(names)} data files are not there, "
                 f"e.g. {missing[0]})")
    return (f"{path}: its features live in {where} beside it, {state}: copy or move "
            f"{path.name} together with {where}, or pack it into one file (`cli pack {path.name}`) where both are")


def _linked_names(f: Any) -> list[str] | None:
    """The data files an index names (relative to its folder), None if the attribute is unreadable."""
    try:
        names = json.loads(f.attrs[LINKED_ATTR])
    except (KeyError, TypeError, ValueError, OSError):
        return None
    if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
        return None
    return names


def _folders(names: list[str] | None) -> list[str]:
    """The folders (relative to the index) that hold these data files, in order of first mention."""
    return list(dict.fromkeys(str(Path(n).parent) for n in names or []))


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


def storage(path: str | Path) -> dict[str, Any]:
    """How one cache file is stored: self-contained, or an index plus the data folder(s) it links."""
    files = cache_files(path)
    folders = _folders([os.path.relpath(p, Path(path).parent) for p in files[1:]])
    return {
        "file": str(path),
        "self_contained": len(files) == 1,
        "file_bytes": files[0].stat().st_size,
        "data_folders": folders,
        "data_files": len(files) - 1,
        "data_bytes": sum(p.stat().st_size for p in files[1:] if p.exists()),
    }


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

