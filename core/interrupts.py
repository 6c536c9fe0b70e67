"""Ctrl-C (SIGINT) and SIGTERM as an exception in the main thread, delivered even where Python swallows it.

A signal handler's exception is raised wherever the main thread happens to be. Where that is a
place whose exceptions Python ignores (an at-fork hook such as logging's `_releaseLock` while a
DataLoader forks its workers, a `__del__`, a weakref callback), it prints "Exception ignored"
and the command would run on. So the handler also arms a short timer that raises the same
interrupt again, unless the first one is already unwinding the stack (then cleanup runs in peace).
Once interrupted, the "Exception ignored" reports (the swallowed interrupt, and the `__del__` of
objects it cut short mid-construction) and the errors of helper threads whose peers just ended
(multiprocessing's fd-sharing thread for DataLoader workers) are not printed: the command ends
with its one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

REDELIVER_SECONDS = 0.1  # how soon a swallowed interrupt is raised again


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: the command stops; the work it finished is on disk."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_pending: list[int] = []  # the signal being delivered, until the command has stopped
_interrupted: list[int] = []  # every signal delivered in this process (it is ending)
_owner = [0]  # the process whose command the handlers stop


def _unwinding() -> bool:
    """True while an interrupt is propagating (this handler runs inside a finally/except/__exit__ of it)."""
    err = sys.exc_info()[1]
    while err is not None:
        if isinstance(err, KeyboardInterrupt):
            return True
        err = err.__context__
    return False


def _raise(signum: int, frame: object) -> None:
    if os.getpid() != _owner[0]:  # a child forked (a DataLoader worker) before its own set-up ran
        if signum == signal.SIGINT:
            return  # Ctrl-C reaches the whole group: the parent stops the command and its workers
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if not _pending:
        _pending.append(signum)
    _interrupted.append(signum)
    signal.setitimer(signal.ITIMER_REAL, REDELIVER_SECONDS)
    raise Interrupted(_pending[0])


def _redeliver(signum: int, frame: object) -> None:
    if not _pending:
        return
    if _unwinding():
        signal.setitimer(signal.ITIMER_REAL, REDELIVER_SECONDS)
        return
    _raise(_pending[0], frame)


def _quiet_once_interrupted(previous, *, threads_only: bool = False):
    """`previous` (an exception hook), silent once the command was interrupted; with `threads_only`,
    silent only when another thread than the main one calls it (the main thread's errors still show)."""
    def hook(*args) -> None:
        if _interrupted and (not threads_only or threading.current_thread() is not threading.main_thread()):
            return
        previous(*args)

    return hook


def stopped() -> None:
    """The interrupt reached the command's top: no more re-delivery."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    _pending.clear()


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise Interrupted in the main thread, so `with` blocks close
    what they opened (the cache writer keeps its parts, worker pools stop) before the command ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _owner[0] = os.getpid()
    handlers = {signal.SIGINT: _raise, signal.SIGTERM: _raise, signal.SIGALRM: _redeliver}
    previous = {s: signal.signal(s, handler) for s, handler in handlers.items()}
    unraisable, thread_hook, excepthook = sys.unraisablehook, threading.excepthook, sys.excepthook
    sys.unraisablehook = _quiet_once_interrupted(unraisable)
    threading.excepthook = _quiet_once_interrupted(thread_hook)
    # multiprocessing's fd-sharing thread (resource_sharer._serve, DataLoader workers) reports its
    # errors through sys.excepthook directly, not threading.excepthook
    sys.excepthook = _quiet_once_interrupted(excepthook, threads_only=True)
    try:
        yield
    finally:
        stopped()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if not _interrupted:  # an interrupted process is ending: half-built objects may still report at exit
            sys.unraisablehook, threading.excepthook, sys.excepthook = unraisable, thread_hook, excepthook
