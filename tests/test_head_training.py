import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from core.folds import Fold
from core.records import CLASSES_4
from heads.config import TrainConfig
from heads.model.loss import MTLLoss, masked_mae
from heads.train.batches import BucketBatchSampler
from heads.train.feature_trainer import FeatureTrainer
from heads.train.folds import FoldData
from heads.train.statistics import class_weights, target_scale
from heads.train.trainer import EarlyStop, TrainingError, lr_factor, warmup_cosine

D, L = 8, 2


class InMemoryTrainer(FeatureTrainer):
    """Features from a dict of tensors instead of a cache: the hooks fine-tuning overrides."""

    def __init__(self, config, data, feats, **kw):
        self.feats = feats  # utt_id -> ((T, L, D) tensor, (T,) vad)
        super().__init__(config, data, **kw)

    def feature_shape(self):
        return L, D

    def make_loader(self, split):
        ids = self.data.split(split)
        bs = self.batch_size(split)
        return [self.batch(ids[i : i + bs]) for i in range(0, len(ids), bs)]

    def batch(self, ids):
        t = max(self.feats[u][0].shape[0] for u in ids)
        x = torch.zeros(len(ids), t, L, D)
        pad = torch.zeros(len(ids), t, dtype=torch.bool)
        vad = torch.zeros(len(ids), t, dtype=torch.bool)
        for i, u in enumerate(ids):
            f, v = self.feats[u]
            x[i, : len(f)], pad[i, : len(f)], vad[i, : len(f)] = f, True, v
        lab = self.data.labels.loc[ids]
        return {"features": x, "padding_mask": pad, "vad_mask": vad, "utt_id": list(ids),
                "emotion": torch.tensor(lab["emotion"].to_numpy()),
                "valence": torch.tensor(lab["valence"].to_numpy(), dtype=torch.float32),
                "arousal": torch.tensor(lab["arousal"].to_numpy(), dtype=torch.float32)}


def toy(counts=(10, 20, 30, 40), n_other=8, seed=0):
    """FoldData + features: training class counts as given, val/test with other counts."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, D, generator=g) * 2
    rows, feats = {}, {}
    spec = [("train", c, n) for c, n in enumerate(counts)] + [(s, c, n_other) for s in ("val", "test") for c in range(4)]
    split_ids = {"train": [], "val": [], "test": []}
    for split, c, n in spec:
        for i in range(n):
            u = f"{split}-{c}-{i:02d}"
            t = int(torch.randint(4, 12, (1,), generator=g))
            x = torch.randn(t, L, D, generator=g) + means[c]
            feats[u] = (x, torch.rand(t, generator=g) < 0.7)
            rows[u] = {"emotion": c, "valence": 1.0 + c, "arousal": 5.0 - c, "speaker": split}  # one per split
            split_ids[split].append(u)
    labels = pd.DataFrame.from_dict(rows, orient="index")
    fold = Fold(1, "test", "val", ("train",))
    return FoldData(fold, split_ids["train"], split_ids["val"], split_ids["test"], labels, CLASSES_4), feats


def config(**kw):
    # min_steps 0, ema 0: these tests pin the loop as configured and its own weights
    # (tests/test_steps.py covers the step plan, tests/test_ema.py the weight average)
    base = dict(epochs=4, batch_size=16, lr=3e-3, patience=10, heads=2, device="cpu", pooling="sr", min_steps=0, ema=0.0)
    base.update(kw)
    return TrainConfig(**base)


def test_class_weights_are_inverse_frequency_from_the_training_split():
    w = class_weights(np.array([0] * 10 + [1] * 20 + [2] * 30 + [3] * 40 + [-1] * 7), 4)
    np.testing.assert_allclose(w.numpy(), [100 / 40, 100 / 80, 100 / 120, 100 / 160], rtol=1e-6)
    # an absent class gets 0, the others are normalized over the classes present
    np.testing.assert_allclose(class_weights(np.array([0, 0, 1, 3, 3, 3]), 4).numpy(), [1.0, 2.0, 0.0, 2 / 3], rtol=1e-6)
    data, feats = toy(counts=(10, 20, 30, 40))
    trainer = InMemoryTrainer(config(), data, feats)  # val/test are balanced: must not count
    np.testing.assert_allclose(trainer.class_weights.numpy(), [2.5, 1.25, 100 / 120, 0.625], rtol=1e-6)


def test_weighted_ce_is_torchs_and_ignores_unlabelled():
    logits = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 1, -1])
    w = torch.tensor([2.0, 0.5, 1.0, 3.0])
    loss = MTLLoss(w, 1.0, 0.0, 0.0)
    got = loss.weighted_ce(logits, y)
    torch.testing.assert_close(got, F.cross_entropy(logits[:5], y[:5], weight=w))
    assert loss.weighted_ce(logits, torch.full((6,), -1)).item() == 0.0


def test_nan_valence_arousal_drop_their_terms():
    pred = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], requires_grad=True)
    true = torch.tensor([[1.0, math.nan], [math.nan, math.nan], [1.0, 7.0]])
    mae = masked_mae(pred, true)
    torch.testing.assert_close(mae, torch.tensor([(1.0 + 3.0) / 2, 2.0]))
    mae.sum().backward()
    assert pred.grad[1].abs().sum() == 0 and torch.isfinite(pred.grad).all()
    none = masked_mae(pred, torch.full((3, 2), math.nan))
    assert none.tolist() == [0.0, 0.0]
    loss = MTLLoss(torch.ones(4))
    logits = torch.randn(3, 4)
    parts = loss(logits, pred, torch.tensor([0, 1, 2]), torch.full((3, 2), math.nan))
    torch.testing.assert_close(parts.total, 0.5 * F.cross_entropy(logits, torch.tensor([0, 1, 2])))
    mean, std = target_scale(np.array([[1.0, math.nan], [3.0, math.nan]]))
    assert mean.tolist() == [2.0, 0.0] and std.tolist() == [1.0, 1.0]


def schedule_factors(total_steps: int, warmup_ratio: float) -> list[float]:
    """The lr factor of each optimizer step of warmup_cosine (and one past the end)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps, warmup_ratio)
    factors = []
    for _ in range(total_steps + 1):
        factors.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return factors


@pytest.mark.parametrize("total, ratio", [(100, 0.1), (37, 0.1), (5, 0.0), (1, 0.5), (1000, 0.25)])
def test_schedule_is_transformers_cosine_with_warmup_one_step_ahead(total, ratio):
    from transformers import get_cosine_schedule_with_warmup

    warmup = math.ceil(total * ratio)
    scratch = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = get_cosine_schedule_with_warmup(scratch, warmup + 1, total + 1).lr_lambdas[0]
    ours = lr_factor(total, ratio)
    assert [ours(s) for s in range(total + 1)] == pytest.approx([theirs(s + 1) for s in range(total + 1)], abs=1e-12)


def test_schedule_warms_up_then_decays_to_zero():
    f = schedule_factors(100, 0.1).__getitem__
    assert f(0) < f(5) < f(9) <= 1.0 and f(10) == 1.0
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_bucket_sampler_covers_every_item_once_and_depends_only_on_seed_and_epoch():
    lengths = list(np.random.default_rng(0).integers(1, 100, 203))
    s = BucketBatchSampler(lengths, 16, shuffle=True, seed=3)
    s.set_epoch(2)
    a = list(s)
    assert sorted(i for b in a for i in b) == list(range(203)) and len(a) == len(s) == 13
    t = BucketBatchSampler(lengths, 16, shuffle=True, seed=3)
    t.set_epoch(2)
    assert list(t) == a
    t.set_epoch(3)
    assert list(t) != a
    ordered = [i for b in BucketBatchSampler(lengths, 16, shuffle=False) for i in b]
    assert [lengths[i] for i in ordered] == sorted(lengths)


def scripted_fit(val_losses: list[float], **settings) -> tuple[InMemoryTrainer, dict[int, dict]]:
    """A trainer whose validation losses are `val_losses`, fitted; and the weights after each epoch."""
    data, feats = toy()
    script = iter(val_losses)

    class Scripted(InMemoryTrainer):
        def predict(self, split):
            pred = super().predict(split)
            if split == "val":
                pred.loss = next(script)
            return pred

    seen = {}
    trainer = Scripted(config(**settings), data, feats,
                       on_epoch=lambda row: seen.setdefault(row["epoch"], trainer.snapshot()))
    trainer.fit()
    return trainer, seen


def test_early_stopping_stops_and_restores_the_best_weights():
    trainer, seen = scripted_fit([1.0, 0.8, 0.9, 1.2, 0.1, 0.1], epochs=6, patience=2)
    assert [r["epoch"] for r in trainer.history] == [1, 2, 3, 4]  # 0.9, 1.2: two bad epochs after epoch 2
    assert trainer.early.best_epoch == 2 and trainer.early.stopped
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v.cpu(), seen[2][k]), k
    assert not all(torch.equal(seen[4][k], v) for k, v in seen[2].items())
    assert EarlyStop().update(1, 1.0, 1) is True


def test_training_learns_and_is_deterministic():
    data, feats = toy()
    a = InMemoryTrainer(config(epochs=8), data, feats).run()
    b = InMemoryTrainer(config(epochs=8), data, feats).run()
    assert a.metrics["ua"] > 0.6  # chance: 0.25
    assert a.metrics == b.metrics
    np.testing.assert_array_equal(a.test.probs, b.test.probs)


@pytest.mark.parametrize("ema", [0.0, 0.9])  # 0.9: the weight average (tests/test_ema.py) is resumed too
def test_resume_from_state_dict_continues_exactly(tmp_path, ema):
    data, feats = toy()
    full = InMemoryTrainer(config(epochs=4, ema=ema), data, feats)
    full.fit()

    class Killed(Exception):
        pass

    def save_then_die(row):
        if row["epoch"] == 2:
            torch.save(first.state_dict(), tmp_path / "state.pt")
            raise Killed

    first = InMemoryTrainer(config(epochs=4, ema=ema), data, feats, on_epoch=save_then_die)
    with pytest.raises(Killed):
        first.fit()
    resumed = InMemoryTrainer(config(epochs=4, ema=ema), data, feats)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    if ema:
        assert resumed.average.steps == first.average.steps > 0
    resumed.fit()
    assert resumed.history == full.history
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_gradient_accumulation_steps_every_k_batches():
    data, feats = toy()
    t = InMemoryTrainer(config(epochs=1, batch_size=8, grad_accum=3), data, feats)
    n = len(t.loaders["train"])  # 100 / 8 -> 13 micro-batches
    t.train_epoch(1)
    assert n == 13 and t.scheduler.last_epoch == math.ceil(13 / 3)


def test_a_nan_loss_names_the_epoch_and_batch():
    data, feats = toy()
    bad = data.train[20]
    feats[bad][0][0, 0, 0] = float("inf")
    with pytest.raises(TrainingError, match=rf"epoch 1, batch 2 \(utterances .*{bad}"):
        InMemoryTrainer(config(norm="none", pooled_norm="none", layer_weights="joint"), data, feats).fit()


def test_a_nan_frame_is_named_before_the_pooled_statistics_are_fitted():
    data, feats = toy()
    bad = data.train[20]
    feats[bad][0][0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match=rf"utterance\(s\) {bad} have NaN/inf features"):
        InMemoryTrainer(config(norm="none", pooled_norm="train", layer_weights="joint"), data, feats)


def test_an_inf_feature_is_named_before_it_poisons_the_normalization_statistics():
    data, feats = toy()
    bad = data.train[20]
    feats[bad][0][0, 0, 0] = float("inf")
    with pytest.raises(TrainingError, match=rf"utterance\(s\) {bad} have NaN/inf features"):
        InMemoryTrainer(config(), data, feats)


def test_a_tie_in_validation_loss_keeps_the_earlier_epoch():
    trainer, seen = scripted_fit([1.0, 0.8, 0.8, 0.9], epochs=4, patience=2)
    # epoch 3 only equals epoch 2: not better, so it counts as a bad epoch and epoch 4 is the second
    assert trainer.early.best_epoch == 2 and trainer.early.stopped and len(trainer.history) == 4
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v.cpu(), seen[2][k]), k
    assert not all(torch.equal(seen[3][k], v) for k, v in seen[2].items())


def test_early_stopping_waits_exactly_patience_epochs():
    stop = EarlyStop()
    losses = [1.0, 0.5, 0.6, 0.7, 0.4, 0.45, 0.5, 0.6]
    flags = []
    for epoch, loss in enumerate(losses, start=1):
        stop.update(epoch, loss, patience=3)
        flags.append(stop.stopped)
    # best at 2, two bad epochs, better at 5, then three bad epochs: stopped after epoch 8, not before
    assert flags == [False] * 7 + [True] and stop.best_epoch == 5 and stop.best_loss == 0.4


def step_rates(trainer, epochs: int) -> list[float]:
    """The learning rate each optimizer step used, over `epochs` training epochs."""
    rates = []
    step = trainer.optimizer_step

    def recording_step():
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        step()

    trainer.optimizer_step = recording_step
    for epoch in range(1, epochs + 1):
        trainer.train_epoch(epoch)
    return rates


def test_the_first_step_trains_at_a_fraction_of_the_peak_rate_not_zero():
    data, feats = toy()
    peak = 3e-3
    trainer = InMemoryTrainer(config(epochs=4, batch_size=16, lr=peak), data, feats)
    rates = step_rates(trainer, 4)
    total = 4 * math.ceil(100 / 16)  # 28 steps
    warmup = math.ceil(0.1 * total)  # 3
    assert len(rates) == total
    # linear warm-up from peak / (warmup + 1): a step at rate 0 would be a wasted step
    assert rates[: warmup + 1] == pytest.approx([peak * (s + 1) / (warmup + 1) for s in range(warmup)] + [peak])
    assert rates[0] == pytest.approx(peak / 4) and rates[0] > 0
    # then cosine down to (nearly) 0 at the last step
    for s in range(warmup, total):
        progress = (s - warmup) / (total - warmup)
        assert rates[s] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * progress))), s
    assert rates[-1] < 0.01 * peak
    assert trainer.history == [] and InMemoryTrainer(config(epochs=4, batch_size=16, lr=peak), data, feats) \
        .optimizer.param_groups[0]["lr"] == pytest.approx(peak / 4)  # what history's first "lr" shows


def test_accumulated_steps_follow_the_schedule_per_optimizer_step():
    data, feats = toy()
    trainer = InMemoryTrainer(config(epochs=2, batch_size=8, grad_accum=3, lr=1e-3), data, feats)
    rates = step_rates(trainer, 2)
    assert len(rates) == 2 * math.ceil(13 / 3)  # 13 micro-batches an epoch, a step every 3 (and the last)
    warmup = math.ceil(0.1 * len(rates))
    assert rates[0] == pytest.approx(1e-3 / (warmup + 1))
