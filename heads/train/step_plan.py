"""How many optimizer steps a fold gets: a minimum that holds on small corpora too.

At the paper's settings (batch 64, 30 epochs) a leave-one-speaker-out fold of
IEMOCAP (~4,400 training utterances) makes ~2,000 optimizer steps, but a
300-utterance corpus makes 150: after input normalization that head is still
near chance on its own training set (docs/training.md "Defaults").
So a fold is guaranteed `min_steps` optimizer steps (TrainConfig.min_steps):

1. the batch shrinks first, but never below MIN_BATCH (nor grows): a smaller
   batch buys steps for less compute than more epochs of large batches;
2. then the epochs grow to reach `min_steps`, and the patience with them
   (same share of the run), so early stopping judges as many steps as before;
   but to no more than MAX_EPOCH_FACTOR x the configured epochs, so that a
   toy corpus of a few dozen utterances does not train for hundreds of epochs.

A fold that already makes `min_steps` steps trains exactly as configured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

MIN_BATCH = 16  # the smallest batch the plan shrinks to (a user's own smaller --batch-size stays)
MAX_EPOCH_FACTOR = 3  # the most the epochs (and patience) grow


@dataclass(frozen=True)
class StepPlan:
    """The batch size, epochs and patience a fold trains with."""

    batch_size: int
    epochs: int
    patience: int
    steps_per_epoch: int  # optimizer steps (after gradient accumulation)

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": self.steps}


def steps_per_epoch(n_train: int, batch_size: int, grad_accum: int = 1) -> int:
    return math.ceil(math.ceil(n_train / batch_size) / grad_accum)


def step_plan(n_train: int, batch_size: int, epochs: int, patience: int, min_steps: int,
              grad_accum: int = 1) -> StepPlan:
    """The plan for `n_train` training utterances (see the module docstring); `min_steps` 0: as configured."""
    n_train = max(1, n_train)
    per_epoch = steps_per_epoch(n_train, batch_size, grad_accum)
    if min_steps <= 0 or epochs * per_epoch >= min_steps:
        return StepPlan(batch_size, epochs, patience, per_epoch)
    floor = min(batch_size, MIN_BATCH)
    batch = max(floor, min(batch_size, n_train * epochs // (min_steps * grad_accum)))
    per_epoch = steps_per_epoch(n_train, batch, grad_accum)
    longer = max(epochs, min(MAX_EPOCH_FACTOR * epochs, math.ceil(min_steps / per_epoch)))
    return StepPlan(batch, longer, max(patience, math.ceil(patience * longer / epochs)), per_epoch)
