"""Simulated kills at every filesystem step of a piece of code, in-process and fast.

`KillAt(n)` patches the operations that change what is on disk (rename, replace, link,
unlink, rmtree, fsync, mkdir, torch.save, safetensors' save_file) and raises `Killed` (a
BaseException, so no `except Exception` swallows it) before the n-th of them. After that
every patched operation raises at once without doing anything, so clean-up code in
`finally` blocks cannot tidy up either: what is on disk is what a SIGKILL at that moment
would leave (up to unflushed buffers of files already open).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch


class Killed(BaseException):
    pass


OS_OPS = ("rename", "replace", "link", "unlink", "fsync", "mkdir", "rmdir")


class KillAt:
    def __init__(self, n: int | None) -> None:
        self.n = n  # None: count only
        self.calls = 0
        self.fired = False
        self.log: list[str] = []

    def _wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            if self.fired:
                raise Killed(name)
            if self.n is not None and self.calls == self.n:
                self.fired = True
                raise Killed(name)
            self.calls += 1
            self.log.append(f"{name} {args[0] if args and isinstance(args[0], (str, os.PathLike)) else ''}")
            return fn(*args, **kwargs)
        return wrapped

    def install(self, monkeypatch: pytest.MonkeyPatch) -> KillAt:
        for name in OS_OPS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        monkeypatch.setattr(shutil, "rmtree", self._wrap("rmtree", shutil.rmtree))
        monkeypatch.setattr(torch, "save", self._wrap("torch.save", torch.save))
        # heads.runfolder imports save_file when it writes, so patching the module is enough
        monkeypatch.setattr(safetensors.torch, "save_file", self._wrap("save_file", safetensors.torch.save_file))
        return self


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to compare folders)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
