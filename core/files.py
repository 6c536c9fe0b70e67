"""Durable file operations every stage's crash-safe writes share: fsync a file, fsync a folder."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable; a no-op where folders cannot be opened or fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # the filesystem cannot: nothing to do
            raise
    finally:
        os.close(fd)
