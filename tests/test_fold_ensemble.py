"""--ensemble N|auto: a fold's N heads are the single-head runs with seeds SEED.. SEED+N-1, averaged, written, kept,
predicted; auto picks N by the size of the fold's training split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import recall_score

from core.errors import UserError
from head_fixtures import make_cache
from heads.config import AUTO, AUTO_BELOW, AUTO_HEADS, TrainConfig, finetune_config, heads_for, parse_ensemble
from heads.predict import PredictError, Predictor
from heads.runfolder import finished_fold, load_weights, run_differences
from heads.train.fold_loop import train_folds

SETTINGS = dict(epochs=2, batch_size=16, heads=2, device="cpu", min_steps=0)  # + ensemble, given by every run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    cache = make_cache(root / "c.h5", seed=1)
    out = {"cache": cache}
    out["ensemble"], _ = train_folds(cache, TrainConfig(**SETTINGS, seed=3, ensemble=2), folds=[1],
                                     out=root / "ensemble", progress=False)
    for seed in (3, 4):
        out[seed], _ = train_folds(cache, TrainConfig(**SETTINGS, seed=seed, ensemble=1), folds=[1],
                                   out=root / f"seed{seed}", progress=False)
    return out


def test_an_ensemble_fold_is_the_average_of_the_single_head_runs_with_consecutive_seeds(runs):
    fold = runs["ensemble"] / "fold-01"
    got = pd.read_csv(fold / "predictions.csv").set_index("utt_id")
    singles = [pd.read_csv(runs[s] / "fold-01" / "predictions.csv").set_index("utt_id").loc[got.index] for s in (3, 4)]
    probs = [c for c in got.columns if c.startswith("prob_")]
    mean = (singles[0][probs].to_numpy() + singles[1][probs].to_numpy()) / 2
    np.testing.assert_allclose(got[probs].to_numpy(), mean, atol=2e-6)  # the CSVs keep 6 decimals
    for dim in ("valence", "arousal"):
        np.testing.assert_allclose(got[dim], (singles[0][dim] + singles[1][dim]) / 2, atol=2e-6)
    classes = [c.removeprefix("prob_") for c in probs]
    assert list(got["pred"]) == [classes[i] for i in got[probs].to_numpy().argmax(1)]
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["ua"] == pytest.approx(recall_score(got["true"], got["pred"], average="macro"))
    # member i is the run with seed 3 + i - 1: same weights, same history, its own UA recorded (the members
    # are heads of one stacked computation, the single runs stacks of one: equal within float tolerance)
    assert [m["seed"] for m in metrics["members"]] == [3, 4]
    for i, seed in enumerate((3, 4), start=1):
        single = runs[seed] / "fold-01"
        name, history = ("head.safetensors", "history.csv") if i == 1 else (f"head-{i}.safetensors", f"history-{i}.csv")
        a, b = load_weights(fold / name), load_weights(single / "head.safetensors")
        assert set(a) == set(b), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(pd.read_csv(fold / history), pd.read_csv(single / "history.csv"), atol=1e-5)
        assert metrics["members"][i - 1]["ua"] == json.loads((single / "metrics.json").read_text())["ua"]
    assert not all(torch.equal(load_weights(fold / "head.safetensors")[k], v)
                   for k, v in load_weights(fold / "head-2.safetensors").items())


def test_predict_averages_the_members_heads(runs):
    fold = runs["ensemble"] / "fold-01"
    unused = object()  # the heads are fed features directly: no encoder is built (the cache's model is synthetic)
    members = [Predictor(runs[s] / "fold-01", encoder=unused) for s in (3, 4)]
    ensemble = Predictor(fold, encoder=unused)
    assert len(ensemble.heads) == 2
    feats = torch.randn(1, 40, 3, 16)  # (1, T, L, D) as the cache's encoder would give
    vad = torch.ones(1, 40, dtype=torch.bool)
    vad[:, :5] = False
    pad = torch.ones(1, 40, dtype=torch.bool)

    def scores(p):
        with torch.no_grad():
            outs = [h(feats, pad, vad) for h in p.heads]
        return (np.mean([torch.softmax(o.logits, 1)[0].numpy() for o in outs], axis=0),
                np.mean([h.to_corpus_scale(o.va)[0].numpy() for h, o in zip(p.heads, outs)], axis=0))

    got, want = scores(ensemble), [scores(m) for m in members]
    np.testing.assert_allclose(got[0], (want[0][0] + want[1][0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(got[1], (want[0][1] + want[1][1]) / 2, rtol=1e-6)


def test_a_fold_missing_a_members_head_is_trained_again_and_predict_names_it(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["ensemble"], run)
    before = (run / "fold-01" / "predictions.csv").read_bytes()
    (run / "fold-01" / "head-2.safetensors").unlink()
    with pytest.raises(PredictError, match="ensemble of 2 heads but head-2.safetensors is missing"):
        Predictor(run / "fold-01", encoder=object())
    assert finished_fold(run, 1) is None
    train_folds(runs["cache"], TrainConfig(**SETTINGS, seed=3, ensemble=2), folds=[1], out=run, progress=False)
    assert (run / "fold-01" / "head-2.safetensors").is_file()
    assert (run / "fold-01" / "predictions.csv").read_bytes() == before


@pytest.mark.parametrize("bad", [0, "0", "-1", "2.5", "two", "", "auto3", True])
def test_ensemble_values_other_than_auto_or_a_count_are_refused_in_one_line(bad):
    with pytest.raises(UserError, match="--ensemble must be auto or a whole number of heads per fold of at least 1"):
        TrainConfig(ensemble=bad).validate()


def test_ensemble_settings_parse_and_old_runs_read_as_one_head():
    assert [parse_ensemble(v) for v in ("auto", " AUTO ", "3", 3, "1")] == ["auto", "auto", 3, 3, 1]
    assert TrainConfig().ensemble == "auto"
    assert finetune_config().ensemble == 1
    old = {"settings": {k: v for k, v in vars(TrainConfig()).items() if k != "ensemble"}}
    assert run_differences(old, {"settings": vars(TrainConfig(ensemble=1))}) == []
    assert run_differences(old, {"settings": vars(TrainConfig(ensemble=3))}) == ["ensemble 1 (run) vs 3 (now)"]
    assert run_differences(old, {"settings": vars(TrainConfig())}) == ["ensemble 1 (run) vs 'auto' (now)"]


def test_auto_trains_three_heads_below_the_threshold_and_one_from_it():
    assert (AUTO, AUTO_HEADS, AUTO_BELOW) == ("auto", 3, 2000)
    assert [heads_for("auto", n) for n in (1, 288, 576, 1999, 2000, 4400)] == [3, 3, 3, 3, 1, 1]
    assert [heads_for(n, 10 ** 6) for n in (1, 2, 5)] == [1, 2, 5]  # a count is taken as given at any size
    assert (heads_for("AUTO", 10), heads_for("2", 10)) == (3, 2)  # as the CLI would parse them


def test_auto_is_the_ensemble_of_three_on_a_small_fold_and_the_single_head_from_the_threshold(runs, tmp_path,
                                                                                                monkeypatch):
    from heads import config
    from heads.train.folds import fold_data, open_cache

    with open_cache(runs["cache"]) as cache:
        n_train = len(fold_data(cache, 1).train)
    assert n_train < AUTO_BELOW  # the test cache is small
    auto, _ = train_folds(runs["cache"], TrainConfig(**SETTINGS, seed=3), folds=[1], out=tmp_path / "auto",
                          progress=False)
    metrics = json.loads((auto / "fold-01" / "metrics.json").read_text())
    assert [m["seed"] for m in metrics["members"]] == [3, 4, 5]
    assert json.loads((auto / "config.json").read_text())["settings"]["ensemble"] == "auto"
    pair = pd.read_csv(runs["ensemble"] / "fold-01" / "predictions.csv")  # seeds 3, 4
    three = pd.read_csv(auto / "fold-01" / "predictions.csv")
    assert not np.allclose(three.filter(like="prob_"), pair.filter(like="prob_"))  # a third head was averaged in
    monkeypatch.setattr(config, "AUTO_BELOW", n_train)  # this fold is now "large": one head
    one, _ = train_folds(runs["cache"], TrainConfig(**SETTINGS, seed=3), folds=[1], out=tmp_path / "one",
                         progress=False)
    assert "members" not in json.loads((one / "fold-01" / "metrics.json").read_text())
    assert not (one / "fold-01" / "head-2.safetensors").exists()
    for name in ("predictions.csv", "history.csv"):
        assert (one / "fold-01" / name).read_bytes() == (runs[3] / "fold-01" / name).read_bytes()


def test_the_report_and_the_fold_line_say_how_many_heads(runs):
    from heads.evaluate.report import method_label, summarize
    from heads.train.fold_loop import fold_line

    assert method_label(summarize(runs["ensemble"])) == "SR x2"
    assert method_label(summarize(runs[3])) == "SR"
    assert summarize(runs["ensemble"])["heads_per_fold"] == [2] and summarize(runs[3])["heads_per_fold"] == [1]
    assert method_label({"pooling": "gap", "heads_per_fold": [1, 3]}) == "GAP x1-3"  # auto near its threshold
    metrics = json.loads((runs["ensemble"] / "fold-01" / "metrics.json").read_text())
    assert f"(+1 heads: best {metrics['members'][1]['best_epoch']})" in fold_line(metrics, None)


def test_fine_tuning_takes_auto_as_its_one_model(tmp_path):
    from heads.config import FinetuneSettings
    from heads.finetune.run import run_finetune

    with pytest.raises(UserError) as err:  # fails later, on the missing corpus, not on the ensemble
        run_finetune("manifest", tmp_path, finetune_config(ensemble="auto"), FinetuneSettings(), out=tmp_path / "run")
    assert "fine-tuning trains one model per fold" not in str(err.value)


@pytest.mark.parametrize("override", [{"ensemble": 2}, {"ema": 0.99}])
def test_fine_tuning_refuses_an_ensemble_or_a_weight_average_in_one_line(override, tmp_path):
    from heads.config import FinetuneSettings
    from heads.finetune.run import run_finetune

    with pytest.raises(UserError, match="fine-tuning trains one model per fold"):
        run_finetune("manifest", tmp_path, finetune_config(**override), FinetuneSettings(), out=tmp_path / "run")


def test_the_cli_stores_a_count_as_a_number_and_auto_as_auto(runs, tmp_path):
    from cli_runner import cli

    for given, stored in (("2", 2), ("auto", "auto")):
        code, out = cli("train-head", "--cache", runs["cache"], "--fold", 1, "--epochs", 1, "--heads", 2,
                        "--min-steps", 0, "--ensemble", given, "--out", tmp_path / given, "--quiet")
        assert code == 0, out
        assert json.loads((tmp_path / given / "config.json").read_text())["settings"]["ensemble"] == stored
