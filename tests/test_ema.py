"""--ema: a bias-corrected moving average of the head's weights is validated, kept, restored and saved
(resumed: tests/test_head_training.py::test_resume_from_state_dict_continues_exactly)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import UserError
from head_fixtures import make_cache
from heads.config import TrainConfig, finetune_config
from heads.runfolder import load_weights, run_differences
from heads.train import layer_weights
from heads.train.fold_loop import train_folds
from heads.train.weight_average import WeightAverage
from tests.test_head_training import InMemoryTrainer, config, toy


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("stat", torch.zeros(2))


def test_the_average_is_the_bias_corrected_exponential_mean_of_the_weights_after_each_step():
    torch.manual_seed(0)
    d = 0.9
    model, avg = Tiny(), WeightAverage(d)
    seen = []
    for t in range(5):
        with torch.no_grad():
            model.a.weight.copy_(torch.randn(2, 3) * (t + 1))
            model.a.bias.copy_(torch.randn(2))
            model.stat.add_(1.0)
        seen.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
        avg.update(model)
        if t == 0:  # one step: the weights themselves, not (1 - d) of them
            torch.testing.assert_close(avg.averaged()["a.weight"], model.a.weight)
    weights = np.array([d ** (len(seen) - 1 - i) for i in range(len(seen))])
    for name in ("a.weight", "a.bias"):
        want = sum(w * s[name] for w, s in zip(weights, seen)) / weights.sum()
        torch.testing.assert_close(avg.averaged()[name].double(), want, rtol=1e-5, atol=1e-5)  # float32 sums
    assert set(avg.averaged()) == {"a.weight", "a.bias"}  # neither the frozen parameter nor the buffer


def test_applied_swaps_the_average_in_and_puts_the_weights_back_even_after_an_error():
    model, avg = Tiny(), WeightAverage(0.5)
    avg.update(model)
    with torch.no_grad():
        model.a.weight.add_(1.0)
    avg.update(model)
    own = model.a.weight.detach().clone()
    with avg.applied(model):
        torch.testing.assert_close(model.a.weight, own - 1 / 3)  # (0.5 * w + 1 * (w + 1)) / 1.5
    assert torch.equal(model.a.weight, own)
    with pytest.raises(RuntimeError), avg.applied(model):
        raise RuntimeError("validation failed")
    assert torch.equal(model.a.weight, own)


class Recording(InMemoryTrainer):
    """Validation losses from a script (so the best epoch is known); the weights after every optimizer step."""

    def __init__(self, *args, script, **kw):
        self.script, self.steps, self.step_epoch = list(script), [], []
        super().__init__(*args, **kw)

    def optimizer_step(self):
        super().optimizer_step()
        self.steps.append({k: v.detach().double().clone() for k, v in self.model.named_parameters()})
        self.step_epoch.append(len(self.history) + 1)

    def predict(self, split):
        pred = super().predict(split)
        if split == "val":
            pred.loss = self.script[len(self.history)]
        return pred


def test_the_trainer_keeps_and_restores_the_average_of_its_own_steps_at_the_best_epoch():
    data, feats = toy()
    script = [1.0, 0.5, 0.7, 0.9]  # epoch 2 is the best
    plain = Recording(config(epochs=4, patience=10), data, feats, script=script)
    plain.fit()
    d = 0.9
    averaged = Recording(config(epochs=4, patience=10, ema=d), data, feats, script=script)
    averaged.fit()
    assert averaged.early.best_epoch == 2
    # the raw weights trained identically: the average does not feed back into training
    for a, b in zip(plain.steps, averaged.steps):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    upto = [s for s, e in zip(plain.steps, plain.step_epoch) if e <= 2]
    weights = np.array([d ** (len(upto) - 1 - i) for i in range(len(upto))])
    restored = dict(averaged.model.named_parameters())
    for k in upto[-1]:
        want = sum(w * s[k] for w, s in zip(weights, upto)) / weights.sum()
        torch.testing.assert_close(restored[k].detach().double(), want, rtol=1e-5, atol=1e-6)
    moved = [k for k in upto[-1] if not torch.allclose(restored[k].detach().double(), upto[-1][k])]
    assert "proj.0.weight" in moved  # not the raw weights of epoch 2
    # and the validation loss is the averaged weights' (same script, other weights: other UA is allowed)
    assert [r["epoch"] for r in averaged.history] == [1, 2, 3, 4]


def test_validation_runs_on_the_averaged_weights():
    data, feats = toy()
    trainer = InMemoryTrainer(config(epochs=1, ema=0.9), data, feats)
    trainer.fit()  # one epoch: the kept weights are the average after its last step
    kept = trainer.predict("val").loss
    assert trainer.history[0]["val_loss"] == pytest.approx(kept, rel=1e-6)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_a_decay_outside_0_to_1_is_refused_in_one_line(decay):
    with pytest.raises(UserError, match=r"--ema must be in \[0, 1\)"):
        TrainConfig(ema=decay).validate()


def test_fine_tuning_the_layer_weight_stage_and_runs_written_before_the_option_do_not_average(monkeypatch):
    assert finetune_config().ema == 0.0
    old = {"settings": {k: v for k, v in vars(TrainConfig()).items() if k != "ema"}}
    assert run_differences(old, {"settings": vars(TrainConfig(ema=0.0))}) == []
    assert run_differences(old, {"settings": vars(TrainConfig())}) == []  # off by default
    assert run_differences(old, {"settings": vars(TrainConfig(ema=0.99))}) == ["ema 0.0 (run) vs 0.99 (now)"]

    seen = []

    class Stage(layer_weights.PooledTrainer):
        def __init__(self, config, *args, **kw):
            seen.append(config.ema)
            super().__init__(config, *args, **kw)

    monkeypatch.setattr(layer_weights, "PooledTrainer", Stage)
    data, feats = toy()
    trainer = InMemoryTrainer(config(layer_weights="pooled", ema=0.99, epochs=1), data, feats)
    assert seen == [0.0] and trainer.average is not None


def test_train_head_saves_the_averaged_weights_and_stores_the_decay(tmp_path):
    cache = make_cache(tmp_path / "c.h5", seed=1)
    settings = dict(epochs=2, batch_size=16, heads=2, device="cpu", layer=0, min_steps=0)
    run, _ = train_folds(cache, TrainConfig(**settings, ema=0.8), folds=[1], out=tmp_path / "ema", progress=False)
    plain, _ = train_folds(cache, TrainConfig(**settings, ema=0.0), folds=[1], out=tmp_path / "plain", progress=False)
    assert json.loads((run / "config.json").read_text())["settings"]["ema"] == 0.8
    a, b = load_weights(run / "fold-01" / "head.safetensors"), load_weights(plain / "fold-01" / "head.safetensors")
    assert set(a) == set(b)  # the same head: `cli predict` reads it unchanged
    assert not torch.equal(a["proj.0.weight"], b["proj.0.weight"])
