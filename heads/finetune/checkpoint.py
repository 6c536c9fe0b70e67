"""Per-epoch training checkpoints: weights as safetensors, the rest loadable with weights_only=True.

A checkpoint folder (`RUN/fold-KK/checkpoint/`) holds one folder per saved
epoch, `epoch-NNNN/`, with
- `model.safetensors`: the weights being trained (backbone + head), tagged
  with the epoch;
- `best.safetensors`: the weights of the best validation epoch so far (early
  stopping restores them for the test), tagged with that best epoch;
- `state.pt`: `torch.save` of a dict of tensors, numbers, strings, lists and
  dicts only (optimizer and scheduler state dicts, epoch, early-stopping
  counters, RNG states as tensors), so `torch.load(weights_only=True)` reads it.

Kill-safe at every moment: a checkpoint is written into `epoch-NNNN.tmp/`,
every file fsynced, then the folder is renamed to `epoch-NNNN/` in one step;
only after that are older epoch folders deleted. The newest `epoch-NNNN/` is
therefore always complete, and loading takes it (leftover `.tmp` folders and
older epochs are garbage and removed). A best.safetensors that did not change
since the previous checkpoint is hard-linked from it instead of rewritten
(the best weights of WavLM Large are 1.3 GB). Checkpoints in the earlier flat
layout (the three files directly in `checkpoint/`) still load.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from core.files import fsync_dir, fsync_file
from heads.runfolder import load_weights, write_safetensors

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
STATE_FILE = "state.pt"


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or from another run."""


@dataclass
class Checkpoint:
    epoch: int  # epochs completed (the next run starts at this index)
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    state: dict[str, Any] = field(default_factory=dict)  # optimizer, scheduler, early stopping, rng, ...
    best_epoch: int | None = None  # the epoch `best` comes from (None: unknown, tagged with `epoch`)


EPOCH_DIR = re.compile(r"epoch-(\d+)")


def save_checkpoint(folder: str | Path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` as folder/epoch-NNNN/ (atomically, see the module docstring); returns that folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{ckpt.epoch:04d}"
    final, tmp = folder / name, folder / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a kill's leftover
    tmp.mkdir()
    previous = _epoch_dirs(folder)
    _write_file(tmp / MODEL_FILE, lambda p: write_safetensors(_plain(ckpt.model), p, {"epoch": str(ckpt.epoch)}))
    if ckpt.best is not None:
        best_tag = {"epoch": str(ckpt.epoch) if ckpt.best_epoch is None else str(ckpt.best_epoch)}
        if not (ckpt.best_epoch is not None and previous and _link_best(previous[-1] / BEST_FILE, tmp / BEST_FILE,
                                                                        best_tag["epoch"])):
            _write_file(tmp / BEST_FILE, lambda p: write_safetensors(_plain(ckpt.best), p, best_tag))
    state = dict(ckpt.state, epoch=ckpt.epoch, has_best=ckpt.best is not None, best_epoch=ckpt.best_epoch)
    _write_file(tmp / STATE_FILE, lambda p: torch.save(state, p))
    fsync_dir(tmp)
    if final.exists():  # the same epoch saved again (a resumed run repeating it): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)  # the commit point
    fsync_dir(folder)
    for old in previous:  # now garbage; a kill while deleting leaves folders load_checkpoint ignores
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for legacy in (MODEL_FILE, BEST_FILE, STATE_FILE):
        (folder / legacy).unlink(missing_ok=True)
    return final


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _write_file(path: Path, write) -> None:
    write(path)
    fsync_file(path)


def _link_best(old: Path, new: Path, tag: str) -> bool:
    """Hard-link the previous checkpoint's best weights when they are the same epoch's."""
    from safetensors import safe_open

    try:
        with safe_open(str(old), framework="pt") as fh:
            if (fh.metadata() or {}).get("epoch") != tag:
                return False
        os.link(old, new)
        return True
    except Exception:  # noqa: BLE001 - no such file, unreadable, no hard links here: write it instead
        return False


def _epoch_dirs(folder: Path) -> list[Path]:
    """Complete epoch folders (renamed into place, holding a state file), oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = EPOCH_DIR.fullmatch(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def has_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return bool(_epoch_dirs(folder)) or (folder / STATE_FILE).is_file()


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """The newest complete checkpoint in `folder` (weights_only / safetensors only); removes the
    garbage a kill can leave (unfinished `.tmp` folders, older epochs)."""
    folder = Path(folder)
    dirs = _epoch_dirs(folder)
    if not dirs:
        if (folder / STATE_FILE).is_file():
            return _load_dir(folder)  # the earlier flat layout
        raise CheckpointError(f"no checkpoint in {folder} to resume from")
    problems = []
    for d in reversed(dirs):  # the newest first; an older one only if the newest cannot be read
        try:
            ckpt = _load_dir(d)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        for other in folder.iterdir():
            if other != d and other.is_dir() and (EPOCH_DIR.fullmatch(other.name) or other.name.endswith(".tmp")):
                shutil.rmtree(other, ignore_errors=True)
        return ckpt
    raise CheckpointError(f"{problems[0]}; delete {folder} to start the fold over")


def _load_dir(folder: Path) -> Checkpoint:
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file fails in many ways inside the unpickler
        raise CheckpointError(f"checkpoint {folder / STATE_FILE} cannot be read ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise CheckpointError(f"checkpoint {folder / STATE_FILE} is not a training state")
    epoch = int(state["epoch"])
    best_epoch = state.get("best_epoch")
    model = _load_tagged(folder / MODEL_FILE, epoch)
    best = (_load_tagged(folder / BEST_FILE, epoch if best_epoch is None else int(best_epoch))
            if state.get("has_best") else None)
    return Checkpoint(epoch=epoch, model=model, best=best, state=state,
                      best_epoch=None if best_epoch is None else int(best_epoch))


def _load_tagged(path: Path, epoch: int) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; delete the checkpoint folder to start the fold over")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tagged = (fh.metadata() or {}).get("epoch")
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(exc).__name__})") from None
    if tagged != str(epoch):
        raise CheckpointError(
            f"{path} belongs to epoch {tagged}, the checkpoint state to epoch {epoch} (interrupted save); "
            "delete the checkpoint folder to start the fold over"
        )
    return load_weights(path)


# --- RNG state as tensors, so it survives torch.load(weights_only=True) ---


def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG training touches: torch CPU (+ CUDA), NumPy (HF SpecAugment draws masks with
    np.random), and Python's `random`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor(gauss, dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor(float("nan") if py_gauss is None else py_gauss, dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss = (int(x) for x in state["numpy_pos"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"])))
    py = [int(x) for x in state["python"]]
    gauss = float(state["python_gauss"])
    random.setstate((py[0], tuple(py[1:]), None if np.isnan(gauss) else gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
