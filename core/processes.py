"""Worker processes that die with the command that started them.

A SIGKILLed (or out-of-memory-killed) parent runs no cleanup, so pool workers and
DataLoader workers would be re-parented to init and keep going: a killed
`train-head --jobs 2` went on writing folds into the run folder. Every worker we
start calls `die_with_parent(parent_pid)` first (as a pool initializer or a
DataLoader `worker_init_fn`):

- Linux: `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so the kernel kills the worker the
  moment its parent goes;
- everywhere (and as a second line on Linux, where the signal is tied to the
  parent *thread* that started the worker): a daemon thread that checks every
  WATCH_SECONDS whether the parent is still there.

A parent that died before the worker got this far is noticed at once (its pid
is no longer our parent's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_SECONDS = 0.5


def die_with_parent(parent_pid: int) -> None:
    """Make this (child) process end when `parent_pid` ends; call it first thing in the child."""
    if sys.platform.startswith("linux"):
        _pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent is already gone (we were re-parented)
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), name="sapser-watch-parent", daemon=True).start()


def quiet_child(parent_pid: int) -> None:
    """die_with_parent, and leave Ctrl-C to the parent: SIGINT reaches the whole process group,
    and the parent stops the command (one line, no traceback); its workers end with it."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_init(parent_pid: int):
    """A picklable DataLoader `worker_init_fn` that calls quiet_child(parent_pid)."""
    return _WorkerInit(parent_pid)


class _WorkerInit:
    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid

    def __call__(self, worker_id: int) -> None:
        quiet_child(self.parent_pid)


def _pdeathsig(sig: int) -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no libc prctl (e.g. musl without it): the watcher thread still covers it


def _watch(parent_pid: int) -> None:
    while True:
        time.sleep(WATCH_SECONDS)
        if os.getppid() != parent_pid:
            os._exit(1)
