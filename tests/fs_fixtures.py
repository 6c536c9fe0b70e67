"""Real filesystem faults for tests: folders the process cannot write, disks that fill up.

As a normal user a folder with mode 0o555 is enough (EACCES). root writes through
permissions, so for root the folder becomes a read-only tmpfs mount (EROFS); where
neither works the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# What the one-line error says for either kind of read-only folder.
READ_ONLY_WORDS = ("Read-only file system", "Permission denied")


def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """Make the existing folder `path` (and what it holds) unwritable for the duration."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield path
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    # root: a bind mount of the folder onto itself, remounted read-only
    if not _mount("--bind", str(path), str(path)):
        pytest.skip("root here cannot bind-mount a folder read-only")
    try:
        if not _mount("-o", "remount,bind,ro", str(path)):
            pytest.skip("root here cannot remount a folder read-only")
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of `size` (tmpfs, e.g. "64k") at `path`; grow it with `grow_disk`."""
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "sapser-test", str(path)):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        _umount(path)


def grow_disk(path: Path, size: str) -> None:
    """Free space on a small_disk: its files stay, its size becomes `size`."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


def one_line_error(output: str) -> str:
    """The CLI's error line; fails unless the output ends in exactly one `error: ...` line and
    holds no traceback (progress lines printed before it are fine)."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    assert "Traceback" not in output
    return errors[0]
