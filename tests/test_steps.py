"""The step plan (heads/train/step_plan.py): a fold gets at least `min_steps` optimizer steps on a small
corpus, by a smaller batch first and more epochs second, and a paper-scale fold is untouched."""

from __future__ import annotations

import math

import pytest

from heads.train.step_plan import MAX_EPOCH_FACTOR, MIN_BATCH, step_plan
from tests.test_head_training import InMemoryTrainer, config, toy


def test_a_paper_scale_fold_trains_exactly_as_configured():
    # IEMOCAP leave-one-speaker-out: ~4,400 training utterances, batch 64, 30 epochs = 2,070 steps
    plan = step_plan(4400, 64, 30, 5, 1000)
    assert (plan.batch_size, plan.epochs, plan.patience, plan.steps_per_epoch) == (64, 30, 5, 69)


@pytest.mark.parametrize("n_train", [40, 100, 288, 700, 1000, 2000])
def test_a_small_fold_gets_its_minimum_by_a_smaller_batch_then_more_epochs(n_train):
    plan = step_plan(n_train, 64, 30, 5, 1000)
    assert MIN_BATCH <= plan.batch_size <= 64
    assert plan.steps_per_epoch == math.ceil(n_train / plan.batch_size)
    assert 30 <= plan.epochs <= MAX_EPOCH_FACTOR * 30
    assert plan.steps >= 1000 or plan.epochs == MAX_EPOCH_FACTOR * 30  # the minimum, unless capped
    assert plan.patience == math.ceil(5 * plan.epochs / 30)  # the same share of the run
    if plan.batch_size > MIN_BATCH:  # the batch alone was enough: no extra epochs
        assert plan.epochs == 30


def test_the_espeak_corpus_fold_shrinks_to_batch_16_and_56_epochs():
    # bench/speech_corpus.py: 288 training utterances per fold (docs/training.md "Defaults")
    plan = step_plan(288, 64, 30, 5, 1000)
    assert (plan.batch_size, plan.epochs, plan.patience, plan.steps) == (16, 56, 10, 1008)


def test_zero_minimum_and_small_user_batches_are_kept():
    assert step_plan(100, 64, 30, 5, 0) == step_plan(100, 64, 30, 5, 0).__class__(64, 30, 5, 2)
    assert step_plan(100, 8, 30, 5, 1000).batch_size == 8  # never larger than asked
    accum = step_plan(288, 16, 30, 5, 1000, grad_accum=3)
    assert accum.steps_per_epoch == math.ceil(math.ceil(288 / accum.batch_size) / 3)


def test_the_trainer_follows_the_plan():
    data, feats = toy()  # 100 training utterances
    trainer = InMemoryTrainer(config(epochs=2, batch_size=64, patience=100, min_steps=50), data, feats)
    plan = trainer.plan
    assert (plan.batch_size, plan.epochs) == (16, MAX_EPOCH_FACTOR * 2)  # 7 steps an epoch, capped at 6 epochs
    assert len(next(iter(trainer.loaders["train"]))["utt_id"]) == 16
    assert len(next(iter(trainer.loaders["val"]))["utt_id"]) == len(data.val)  # validation: the configured batch
    result = trainer.run()
    assert result.metrics["plan"] == plan.as_dict() and result.metrics["epochs_run"] == plan.epochs
    # the warm-up + cosine schedule spans the plan's 42 steps (5 of warm-up, within epoch 1): from
    # epoch 2 on, every epoch starts at a lower rate, never 0 (14 steps would hit 0 at epoch 3)
    rates = [row["lr"] for row in result.history]  # the rate each epoch started at
    assert all(a > b > 0 for a, b in zip(rates[1:], rates[2:])), rates
