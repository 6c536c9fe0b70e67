"""core/heap.py: inside `kept_heap` freed large blocks stay with the process for the next allocation;
outside (and after leaving it, and inside an `ordinary_heap` within it) glibc returns them at once."""

from __future__ import annotations

import os

import pytest

from core.heap import glibc, kept_heap, ordinary_heap

pytestmark = pytest.mark.skipif(glibc() is None, reason="glibc's malloc policy; other C libraries are left alone")

BLOCK = 64 * 2**20


def resident() -> int:
    """This process's resident memory in bytes (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def touched_then_freed() -> int:
    """Resident memory after a BLOCK was allocated, written and freed, relative to before."""
    import ctypes

    before = resident()
    buf = ctypes.create_string_buffer(BLOCK)  # malloc + every page written
    del buf
    return resident() - before


def test_a_freed_large_block_is_kept_inside_and_returned_outside():
    assert touched_then_freed() < BLOCK // 4  # glibc's default: mmap'd, unmapped on free
    with kept_heap():
        kept = touched_then_freed()
        assert kept > BLOCK * 3 // 4  # from the heap, kept on free
        assert touched_then_freed() < BLOCK // 4  # ... and served again from what was kept
    assert touched_then_freed() < BLOCK // 4  # defaults back: unmapped on free again


def test_leaving_returns_the_kept_memory():
    with kept_heap():
        touched_then_freed()
        inside = resident()
    assert resident() < inside - BLOCK // 2


def test_an_ordinary_heap_inside_a_kept_one_returns_blocks_and_the_kept_one_resumes():
    with kept_heap():
        touched_then_freed()
        kept = resident()
        with ordinary_heap():
            assert resident() < kept - BLOCK // 2  # what was kept went back on entering
            assert touched_then_freed() < BLOCK // 4  # and a block of a new size is returned on free
        assert touched_then_freed() > BLOCK * 3 // 4  # kept again after leaving


def test_an_ordinary_heap_outside_a_kept_one_changes_nothing():
    with ordinary_heap():
        assert touched_then_freed() < BLOCK // 4
    assert touched_then_freed() < BLOCK // 4  # not left in the kept mode

