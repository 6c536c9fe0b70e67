"""The C heap's policy while a training loop makes and frees the same large tensors every step.

PyTorch's CPU tensors come from the C library's malloc. glibc serves a block
above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh pages
from the kernel and unmaps them on free, so a step that makes and drops
tensors of tens of MiB (the stacked head trainer's projections, their
gradients and copies) pays the kernel's page faults and zeroing for every
one of them, every step: a quarter of a step at D = 512 on the 2-core CPU
(bench/results/head-flops-cpu.md). Inside `kept_heap` malloc serves them
from its heap and keeps what is freed for the next step; on leaving, its
defaults come back and the freed memory is returned to the system. With
another C library (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import platform
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults
KEEP = 2**31 - 1  # free memory kept at the heap's top before it is returned (mallopt takes an int)
_kept = 0  # kept_heap()s entered and not left


def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None under another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep(libc: ctypes.CDLL, on: bool) -> None:
    """Large blocks from the heap and freed memory kept (on), or glibc's defaults with what was kept returned."""
    libc.mallopt(M_MMAP_MAX, 0 if on else DEFAULT_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, KEEP if on else DEFAULT_TRIM_THRESHOLD)
    if not on:
        libc.malloc_trim(0)


@contextmanager
def kept_heap() -> Iterator[None]:
    """Large blocks from the heap, freed memory kept for reuse, while inside; returned on leaving.

    Only for work whose blocks come back in the same sizes step after step: blocks of ever new sizes
    (whole utterances of every length) would each extend the heap. Such work inside goes in
    `ordinary_heap`.
    """
    global _kept
    libc = glibc()
    if libc is None:
        yield
        return
    keep(libc, True)
    _kept += 1
    try:
        yield
    finally:
        _kept -= 1
        if not _kept:
            keep(libc, False)


@contextmanager
def ordinary_heap() -> Iterator[None]:
    """glibc's defaults (and the kept memory returned) inside a `kept_heap`, which resumes on leaving;
    outside one, nothing to do.

    A 25-layer cache's fold test, predicting whole utterances of every length inside the kept heap of
    the head trainer, grew a process to 24 GB in six folds (killed by the kernel's OOM killer).
    """
    libc = glibc()
    if libc is None or not _kept:
        yield
        return
    keep(libc, False)
    try:
        yield
    finally:
        keep(libc, True)
