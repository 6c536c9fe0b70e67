"""Many heads as one computation (heads/train/stack.py): each head is the single-head computation.

- the stacked SAP equals `SAP.mean_attention` per head, values and gradients, on both of its formulations;
- a fold trained alone and the same fold trained in a stack of every fold give the same predictions.csv
  and history.csv within float tolerance (so does an ensemble member and the single run of its seed);
- the stacked trainer equals the single-head trainer (heads/train/trainer.py) where both read the
  same frames (`--norm none`: float32 frames, dropout off): same weights, history and predictions;
- the fixed statistics computed once per fold are the head's own pooled statistics.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import heads.model.pooling as pooling
import heads.train.stack as stack_module
from head_fixtures import make_cache
from heads.config import TrainConfig
from heads.model.head import SERHead
from heads.model.pooling import compact, speech_frames
from heads.train.feature_trainer import FeatureTrainer
from heads.train.fold_inputs import cache_moments, fixed_statistics, prepare_fold, prepare_fold_from_moments
from heads.train.fold_loop import train_folds
from heads.train.folds import fold_data, open_cache
from heads.train.stack import GROUP_WASTE, Stack, from_stack, length_groups

SETTINGS = dict(epochs=3, batch_size=8, heads=2, device="cpu", min_steps=0, ensemble=1, proj_dim=8)


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("stack") / "c.h5", per_class=5)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("path", ["flash", "dense", "chunked"])
def test_the_stacked_sap_is_sap_per_head_values_and_gradients(cache_path, monkeypatch, path, layout):
    monkeypatch.setattr(stack_module, "GROUP_WASTE", float("inf") if layout == "padded" else 1.0)
    monkeypatch.setattr(pooling, "FLASH_MAX_DIM_PER_FRAME", float("inf") if path == "flash" else 0.0)
    monkeypatch.setattr(pooling, "DENSE_MAX_ELEMENTS", 2**40 if path == "dense" else 0)
    config = TrainConfig(**{**SETTINGS, "layer": 2})
    with open_cache(cache_path) as cache:
        data = fold_data(cache, 1)
        moments = cache_moments(cache, data.train + data.val, 2, config.norm, config.vad_mode, torch.device("cpu"), 2**30)
        fold = prepare_fold_from_moments(moments, cache, data, config, torch.device("cpu"))
    stack = Stack([fold], [(0, 0), (0, 1), (0, 2)], torch.device("cpu"))
    split = fold.splits["train"]
    picks = [[0, 3, 7], [1, 2, 4, 5, 6], [8, 9]]  # heads with batches of different sizes and lengths
    rows = stack.rows([0, 1, 2], "train", picks)
    out = stack.sap(stack.params, rows["start"], rows["count"], rows["affine"])  # (3, 5, D)
    out.square().sum().backward()
    for h, pick in enumerate(picks):
        head = stack.head(h).train()
        sap = head.pool.sap
        for p in sap.parameters():
            p.requires_grad_(True)
        scale, shift = fold.affine if fold.affine is not None else (1.0, 0.0)  # the fold's input normalization
        frames = [fold.frames[int(split.start[i]) : int(split.start[i] + split.count[i])].float() * scale + shift
                  for i in pick]
        x = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)  # (B, S, D)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(f), dtype=torch.bool) for f in frames], batch_first=True)
        ref = sap.mean_attention(*compact(x, mask))
        torch.testing.assert_close(out[h, : len(pick)], ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[h, len(pick):], torch.zeros_like(out[h, len(pick):]))  # padded rows give 0
        ref.square().sum().backward()
        grads = {n: p.grad[h] for n, p in stack.params.items() if p.grad is not None}
        got = from_stack(grads)["pool.sap.mhsa.in_proj_weight"]
        torch.testing.assert_close(got, sap.mhsa.in_proj_weight.grad, atol=1e-4, rtol=1e-4)


def test_the_fixed_statistics_are_the_heads_own_pooled_statistics():
    torch.manual_seed(0)
    head = SERHead(6, 1, 4, pooling="sr", heads=2, spread=True, speech_stats=True)
    x = torch.randn(3, 9, 6)
    padding = torch.arange(9)[None, :] < torch.tensor([9, 5, 7])[:, None]
    vad = torch.rand(3, 9) < 0.6
    vad[1] = False  # no speech: all real frames instead
    sap, _ = speech_frames(padding, vad)
    pooled = head.pooled(x, padding, vad)  # (B, P) = [GAP | SAP | std | speech mean | speech std]
    fixed = fixed_statistics(head, x, padding, sap)
    torch.testing.assert_close(fixed, torch.cat([pooled[:, :6], pooled[:, 12:]], dim=1))


@pytest.mark.parametrize("norm", ["train", "none", "utterance", "frame"])
def test_a_one_layer_fold_from_the_runs_moments_is_the_fold_read_on_its_own(cache_path, norm):
    """The moments read once per run give each fold what a pass over its own frames gives: the input
    statistics (training speakers only), the standardized fixed statistics and SAP's frames."""
    # per-utterance CMVN leaves every utterance mean at ~0: standardizing that noise would compare noise
    config = TrainConfig(**{**SETTINGS, "layer": 1, "norm": norm, "pooled_norm": "none" if norm == "utterance" else "train"})
    cpu = torch.device("cpu")
    with open_cache(cache_path) as cache:
        data = fold_data(cache, 2)
        own = prepare_fold(cache, data, config, [1], seed=0, device=cpu)
        every = [u for k in range(1, 7) for u in fold_data(cache, k).train]  # the run reads every fold's utterances
        moments = cache_moments(cache, sorted(set(every + data.val)), 1, norm, config.vad_mode, cpu, 2**30)
        shared = prepare_fold_from_moments(moments, cache, data, config, cpu)
    for name, buffer in own.template.state_dict().items():
        if not name.startswith(("norm.", "pooled_norm.", "va_")):
            continue
        torch.testing.assert_close(shared.template.state_dict()[name], buffer, atol=1e-5, rtol=1e-5)
    for split in ("train", "val"):
        a, b = own.splits[split], shared.splits[split]
        assert a.utt_id == b.utt_id and torch.equal(a.count, b.count) and (a.no_speech == b.no_speech).all()
        torch.testing.assert_close(b.fixed, a.fixed, atol=1e-3, rtol=1e-4)  # own's frames went through float16
        scale, shift = shared.affine if shared.affine is not None else (1.0, 0.0)
        for i in range(len(a.utt_id)):
            mine = own.frames[int(a.start[i]) : int(a.start[i] + a.count[i])].float()
            theirs = shared.frames[int(b.start[i]) : int(b.start[i] + b.count[i])].float() * scale + shift
            torch.testing.assert_close(theirs, mine, atol=2e-2, rtol=2e-3)


def test_length_groups_cover_every_row_once_and_keep_lengths_together():
    count = torch.tensor([5, 0, 40, 6, 41, 5, 7, 39, 0, 6])
    rows = count.nonzero().squeeze(1)
    groups = length_groups(count, rows)
    assert sorted(torch.cat(groups).tolist()) == rows.tolist()
    for g in groups:  # a group's padded attention costs at most GROUP_WASTE times its rows' own
        n = count[g].double()
        assert len(g) == 1 or len(g) * float(n.max()) ** 2 <= GROUP_WASTE * float(n.square().sum())
    lengths = [count[g].tolist() for g in groups]
    assert all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:]))  # short rows with short rows
    assert len(groups) < len(rows) and len(length_groups(count, rows[:0])) == 0


def read(run: Path, fold: int, name: str) -> pd.DataFrame:
    return pd.read_csv(run / f"fold-{fold:02d}" / name)


def test_a_fold_alone_and_in_the_stack_of_every_fold_give_the_same_results(cache_path, tmp_path):
    config = TrainConfig(**{**SETTINGS, "ensemble": 2})
    alone, _ = train_folds(cache_path, config, folds=[3], out=tmp_path / "alone", progress=False)
    every, metrics = train_folds(cache_path, config, out=tmp_path / "every", progress=False)
    assert len(metrics) == 6
    for name in ("predictions.csv", "history.csv", "history-2.csv"):
        a, b = read(alone, 3, name), read(every, 3, name)
        assert list(a.columns) == list(b.columns) and a["utt_id" if "utt_id" in a else "epoch"].equals(
            b["utt_id" if "utt_id" in b else "epoch"])
        np.testing.assert_allclose(a.select_dtypes("number"), b.select_dtypes("number"), atol=1e-5)
    # member 2 of the ensemble is the single run of seed + 1
    single, _ = train_folds(cache_path, replace(config, ensemble=1, seed=1), folds=[3], out=tmp_path / "seed1",
                            progress=False)
    np.testing.assert_allclose(read(every, 3, "history-2.csv").select_dtypes("number"),
                               read(single, 3, "history.csv").select_dtypes("number"), atol=1e-5)
    members = json.loads((every / "fold-03" / "metrics.json").read_text())["members"]
    assert [m["seed"] for m in members] == [0, 1]


def test_the_stack_trains_as_the_single_head_trainer(cache_path):
    """Where both read the same frames (float32 under --norm none) and draw no dropout, the stacked
    computation and the single-head trainer give the same history and predictions."""
    config = TrainConfig(**{**SETTINGS, "norm": "none", "dropout": 0.0, "epochs": 4})
    with open_cache(cache_path) as cache:
        layers = list(cache.layers)
        data = fold_data(cache, 2)
        single = FeatureTrainer(config, data, cache=cache, layers=layers).run()
        from heads.train.fold_group import test as test_head

        fold = prepare_fold(cache, data, config, layers, seed=0, device=torch.device("cpu"))
        stack = Stack([fold], [(0, 0)], torch.device("cpu"))
        stack.train()
        result = test_head(stack, 0, stack.head(0), cache, layers, None)
    ours, theirs = pd.DataFrame(result.history), pd.DataFrame(single.history)
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), rtol=1e-4, atol=1e-5)
    assert result.test.utt_id == single.test.utt_id
    np.testing.assert_allclose(result.test.probs, single.test.probs, atol=1e-4)


def test_the_folds_of_a_one_layer_read_share_their_frames_in_the_memory_budget(cache_path):
    """A one-layer read holds every utterance's frames once for all its folds, so folds whose frames fit
    once are one stack; a read of several layers holds a copy per fold and is split at the same budget."""
    from heads.train.fold_group import groups

    with open_cache(cache_path) as cache:
        ks = list(range(1, 7))
        every = {u for k in ks for u in fold_data(cache, k).train + fold_data(cache, k).val}
        once = 2 * int(cache.hidden_size) * int(cache.meta.loc[sorted(every), "n_frames"].sum())  # float16 frames
        config = TrainConfig(**{**SETTINGS, "memory_gb": 1.5 * once / 2**30})
        assert groups(cache, ks, config, [1]) == [ks]
        split = groups(cache, ks, config, [0, 1, 2])  # each fold's mixed frames its own
        assert len(split) > 1 and [k for g in split for k in g] == ks
        tight = TrainConfig(**{**SETTINGS, "memory_gb": 0.5 * once / 2**30})
        assert len(groups(cache, ks, tight, [1])) > 1  # one copy that does not fit still splits
