"""--pooled-dropout: dropout on the standardized pooled vector, in training only; stored, legacy-safe, off for fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch

from cache.reader import FeatureCache
from core.errors import UserError
from head_fixtures import D, make_cache
from heads.config import TrainConfig, finetune_config
from heads.model.head import SERHead
from heads.runfolder import run_differences
from heads.train.feature_trainer import FeatureTrainer
from heads.train.fold_loop import train_folds
from heads.train.folds import fold_data


def pooled_inputs(head: SERHead, x: torch.Tensor, pad: torch.Tensor, vad: torch.Tensor) -> torch.Tensor:
    """What the projection's Linear receives for `x (B, T, D)`: `(B, P)`."""
    seen: list[torch.Tensor] = []
    hook = head.proj[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        head(x, pad, vad)
    finally:
        hook.remove()
    return seen[0]


def head_and_batch(p: float) -> tuple[SERHead, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = SERHead(D, 1, 4, pooling="sr", heads=2, spread=True, speech_stats=True, pooled_norm="train",
                   pooled_dropout=p)
    x = torch.randn(256, 9, D) * 3 + 1  # (B, T, D)
    pad = torch.ones(256, 9, dtype=torch.bool)
    vad = pad.clone()
    vad[:, :2] = False
    with torch.no_grad():
        head.pooled_norm.set_stats(head.pooled(x, pad, vad))
    return head, x, pad, vad


def test_training_zeroes_a_share_p_of_the_standardized_pooled_vector_and_rescales_the_rest():
    p = 0.3
    head, x, pad, vad = head_and_batch(p)
    with torch.no_grad():
        want = head.pooled_norm(head.pooled(x, pad, vad))  # (B, P) standardized, before dropout
        head.train()
        got = pooled_inputs(head, x, pad, vad)
    dropped = got == 0
    assert abs(dropped.float().mean().item() - p) < 0.02  # 256 x 5D entries
    torch.testing.assert_close(got[~dropped], want[~dropped] / (1 - p))


def test_evaluation_sees_the_whole_pooled_vector_and_equals_a_head_without_dropout():
    head, x, pad, vad = head_and_batch(0.5)
    plain = SERHead(D, 1, 4, pooling="sr", heads=2, spread=True, speech_stats=True, pooled_norm="train")
    assert set(plain.state_dict()) == set(head.state_dict())  # no new weights: every head.safetensors still loads
    plain.load_state_dict(head.state_dict())
    head.eval(), plain.eval()
    with torch.no_grad():
        a, b = head(x, pad, vad), plain(x, pad, vad)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.va, b.va, rtol=0, atol=0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_a_dropout_outside_0_to_1_is_refused(p):
    with pytest.raises(UserError, match="--pooled-dropout"):
        TrainConfig(pooled_dropout=p).validate()


def test_fine_tuning_and_runs_written_before_the_option_have_no_pooled_dropout():
    assert finetune_config().pooled_dropout == 0.0
    old = {"settings": {k: v for k, v in vars(TrainConfig(pooled_dropout=0.0)).items() if k != "pooled_dropout"}}
    assert run_differences(old, {"settings": vars(TrainConfig(pooled_dropout=0.0))}) == []
    changed = run_differences(old, {"settings": vars(TrainConfig(pooled_dropout=0.3))})
    assert changed == ["pooled_dropout 0.0 (run) vs 0.3 (now)"]


def test_train_head_stores_the_dropout_and_trains_with_it(tmp_path):
    cache = make_cache(tmp_path / "c.h5", seed=1)
    config = TrainConfig(epochs=1, batch_size=16, heads=2, device="cpu", layer=0, min_steps=0, pooled_dropout=0.4)
    run, _ = train_folds(cache, config, folds=[1], out=tmp_path / "run", progress=False)
    assert json.loads((run / "config.json").read_text())["settings"]["pooled_dropout"] == 0.4
    with FeatureCache(cache) as c:  # the trainer builds its head with it
        model = FeatureTrainer(config, fold_data(c, 1), cache=c, layers=[0]).build_model()
    assert model.pooled_dropout.p == 0.4
