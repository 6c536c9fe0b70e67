"""Per-epoch training checkpoints: weights as safetensors, the rest loadable with weights_only=True.

A checkpoint folder (`RUN/fold-KK/checkpoint/`) holds
- `model.safetensors`: the weights being trained (backbone + head), current epoch;
- `best.safetensors`: the weights of the best validation epoch so far (early
  stopping restores them for the test);
- `state.pt`: `torch.save` of a dict of tensors, numbers, strings, lists and
  dicts only (optimizer and scheduler state dicts, epoch, early-stopping
  counters, RNG states as tensors), so `torch.load(weights_only=True)` reads it.

Every file is written to a temporary name and renamed, and `state.pt` goes
last and names the epoch the weights belong to: a crash mid-save leaves the
previous checkpoint readable, or a mismatch that `load_checkpoint` reports.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from extract.errors import UserError

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


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """safetensors file of `tensors` (copied to contiguous CPU memory), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_safetensors(plain, tmp, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its I/O failures (full disk, read-only folder) as OSError.

    safetensors reports them as SafetensorError("... No space left on device (os error 28)"),
    which callers could not tell from a bug.
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - SafetensorError; anything but I/O is re-raised as is
        match = re.search(r"os error (\d+)", str(err))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    return load_file(str(path))


def save_checkpoint(folder: str | Path, ckpt: Checkpoint) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tag = {"epoch": str(ckpt.epoch)}
    save_weights(folder / MODEL_FILE, ckpt.model, tag)
    if ckpt.best is not None:
        save_weights(folder / BEST_FILE, ckpt.best, tag)
    state = dict(ckpt.state, epoch=ckpt.epoch, has_best=ckpt.best is not None)
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)


def has_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / STATE_FILE).is_file()


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Read a checkpoint folder back (weights_only / safetensors only) and check it is complete."""
    folder = Path(folder)
    if not has_checkpoint(folder):
        raise CheckpointError(f"no checkpoint in {folder} to resume from")
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file fails in many ways inside the unpickler
        raise CheckpointError(f"checkpoint {folder / STATE_FILE} cannot be read ({type(exc).__name__})") from None
    epoch = int(state["epoch"])
    model = _load_tagged(folder / MODEL_FILE, epoch)
    best = _load_tagged(folder / BEST_FILE, epoch) if state.get("has_best") else None
    return Checkpoint(epoch=epoch, model=model, best=best, state=state)


def _load_tagged(path: Path, epoch: int) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; delete the checkpoint folder to start the fold over")
    with safe_open(str(path), framework="pt") as fh:
        tagged = (fh.metadata() or {}).get("epoch")
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
