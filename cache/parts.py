"""A part file: a batch of utterances built as an HDF5 image in RAM, then written atomically.

HDF5 never writes to the disk here: a full disk then fails a plain write() with a
clean ENOSPC (inside HDF5 the same failure left the library in a state that crashed
the process when its objects were freed), and a kill leaves either the finished
file or a `.tmp` that the next writer deletes.
"""

from __future__ import annotations

import errno
import io
import os
import re
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache.format import FEATURES, VAD, CacheError, write_header, write_tables
from core.files import fsync_dir

PART_GLOB = "part-*.h5"
PART_NAME = re.compile(r"part-\d+\.h5")


class Part:
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
            write_header(f, fingerprint, hidden_size)
            write_tables(f, rows, skips)
        return self.buffer.getbuffer()


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


def write_image(image: memoryview, final: Path) -> None:
    """Write `final` atomically: to `final.tmp`, fsync, rename, fsync the folder."""
    tmp = final.with_name(final.name + ".tmp")
    try:
        write_file(tmp, image)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a torn temp file is never mistaken for a part
        raise


def write_file(path: Path, data: memoryview) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def disk_error(err: OSError, path: Path) -> CacheError | None:
    """ENOSPC (h5py sometimes only says so in the message) -> the user-facing error."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err):
        return CacheError(
            f"out of disk space while writing {path}; free some space and rerun the same command "
            "to complete the cache (finished parts are kept)"
        )
    return None

