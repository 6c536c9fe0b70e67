"""One writer per cache file: an flock'ed lock file that names its holder's PID.

Why not `filelock` (installed with torch): its flock lock records no holder (the
PID in our refusal, "held by PID 1234", is what tells a user which process to
wait for or stop), it leaves the lock file behind on release by design, and
filelock 3.x truncated the file on every attempt, which would erase the holder's
PID as soon as a second writer tried. The kernel releases an flock when its
process dies, so a dead writer's lock is taken over with no stale-lock logic.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cache.format import CacheError


class WriterLock:
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
