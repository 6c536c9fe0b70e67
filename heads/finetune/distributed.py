"""torchrun / DDP plumbing: who am I, which device, which share of a step, and who writes.

`torchrun --nproc-per-node N cli.py finetune ...` sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous variables; without them the run is a single
process and every function here is a no-op. Backend: NCCL when the device is
a GPU, gloo on CPU (the tests run 2 CPU processes).

Rules the trainer follows:
- each optimizer step's utterances are split across ranks (`shard_step`), so N
  ranks together still take the same effective batch (64) per step;
- evaluation (validation, test) runs the whole split on every rank on the
  unwrapped model: every rank then takes the same early-stopping decision
  without any collective, and rank 0 alone writes files;
- only rank 0 writes run folders and checkpoints; the others wait at `barrier`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from core.devices import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group if launched by it; pin this rank's GPU."""
    device = str(resolve_device(device))
    if not launched_by_torchrun():
        return DistContext(device=device)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        # A long timeout: rank 0 may spend minutes on the once-per-run VAD pass
        # while the others wait at a barrier.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        if ctx.device.startswith("cuda"):
            dist.barrier(device_ids=[ctx.local_rank])
        else:
            dist.barrier()


def shard_step(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share of one optimizer step: items r, r + N, r + 2N, ... (sizes differ by <= 1)."""
    return list(items[ctx.rank :: ctx.world_size])
