"""A moving average of the head's weights (`--ema D`): what validation, early stopping and the saved head use.

After every optimizer step each trainable parameter's running sum is updated,
`s <- D * s + (1 - D) * w` (s starts at 0), and the averaged weights are
`s / (1 - D ** t)` after t steps: Adam's bias correction, so the average is
a proper weighted mean of the weights seen so far (weights 1, D, D^2, ...
from the newest step back), not pulled towards zero or towards the untrained
start on a short run. At D = 0.99 the newest 100 steps carry 63 % of the
weight, a tenth of the 1,000 optimizer steps a fold makes at least
(heads/train/step_plan.py).

The raw weights keep training; at the end of each epoch the averaged ones
are swapped in for validation, and when that epoch is the best so far they
are what the trainer keeps, restores and saves (head.safetensors, so
`cli predict` reads them with no change). Buffers (the fitted input and
pooled normalization, the target scale) are fixed during training and are
not averaged. Off by default (measured on real speech, it did not move a
head's UA beyond the seed's spread: docs/training.md, "Defaults");
fine-tuning never uses it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


class WeightAverage:
    """The bias-corrected exponential moving average of a model's trainable parameters."""

    def __init__(self, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.steps = 0
        self.sums: dict[str, torch.Tensor] = {}  # parameter name -> running sum, same device and dtype

    def update(self, model: nn.Module) -> None:
        """Fold in the weights after one optimizer step."""
        d = self.decay
        with torch.no_grad():
            for name, p in trainable(model):
                s = self.sums.get(name)
                if s is None or s.device != p.device:  # first step, or resumed from a CPU checkpoint
                    s = self.sums[name] = torch.zeros_like(p) if s is None else s.to(p.device)
                s.mul_(d).add_(p.detach(), alpha=1 - d)
        self.steps += 1

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averaged weights (name -> tensor); {} before the first step."""
        scale = 1 - self.decay ** self.steps
        return {name: s / scale for name, s in self.sums.items()}

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in `model` inside the block, its own weights back after it (also on an error)."""
        average = self.averaged()
        params = [(p, average[name]) for name, p in trainable(model) if name in average]
        with torch.no_grad():
            saved = [p.detach().clone() for p, _ in params]
            for p, a in params:
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), raw in zip(params, saved):
                    p.copy_(raw)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "steps": self.steps, "sums": dict(self.sums)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.steps = float(state["decay"]), int(state["steps"])
        self.sums = {k: v.clone() for k, v in state["sums"].items()}


def trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)
