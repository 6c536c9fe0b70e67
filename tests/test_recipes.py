"""`--recipe NAME`: a named set of settings (heads/config.py RECIPES); explicit options override it."""

from __future__ import annotations

import json

import pytest

from cli_runner import cli
from core.errors import UserError
from head_fixtures import make_cache
from heads.config import RECIPES, TrainConfig
from heads.evaluate.report import method_label, summarize


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("recipes") / "c.h5", per_class=3)


def test_the_paper_recipe_is_the_papers_head_and_nothing_added():
    paper = TrainConfig.from_recipe("paper")
    assert (paper.recipe, paper.pooling, paper.layer, paper.proj_dim) == ("paper", "sr", -1, 32)
    assert (paper.epochs, paper.batch_size, paper.lr, paper.warmup_ratio, paper.patience) == (30, 64, 3e-5, 0.1, 5)
    assert (paper.alpha, paper.beta, paper.gamma) == (0.5, 0.25, 0.25)
    assert not paper.spread and not paper.speech_stats and paper.pooled_norm == "none" and paper.norm == "none"
    assert paper.ensemble == 1 and paper.min_steps == 0 and paper.ema == 0.0 and paper.sap_frames is None
    assert TrainConfig.from_recipe("default") == TrainConfig()  # the default recipe is the defaults
    assert TrainConfig.from_recipe("paper", epochs=3).epochs == 3  # what is given overrides the recipe
    assert set(RECIPES) == {"default", "paper"}
    with pytest.raises(UserError, match="--recipe must be one of default, paper"):
        TrainConfig(recipe="papr").validate()


def test_the_cli_applies_the_recipe_under_explicit_options_and_the_run_says_so(cache, tmp_path):
    run = tmp_path / "paper"
    code, out = cli("train-head", "--cache", cache, "--fold", 1, "--recipe", "paper", "--epochs", 2, "--lr", 1e-3,
                    "--out", run, "--quiet")
    assert code == 0, out
    config = json.loads((run / "config.json").read_text())
    settings = config["settings"]
    assert settings["recipe"] == "paper" and settings["epochs"] == 2 and settings["lr"] == 1e-3  # given: kept
    assert settings["batch_size"] == 64 and settings["spread"] is False and settings["norm"] == "none"  # the recipe's
    assert settings["ensemble"] == 1 and config["layers"] == [2]  # one head on the last cached layer
    assert method_label(summarize(run)) == "SR (paper)"
    default = tmp_path / "default"
    code, out = cli("train-head", "--cache", cache, "--fold", 1, "--epochs", 2, "--ensemble", 1, "--out", default,
                    "--quiet")
    assert code == 0, out
    assert json.loads((default / "config.json").read_text())["settings"]["recipe"] == "default"
    assert method_label(summarize(default)) == "SR"


def test_an_unknown_recipe_is_one_line(cache, tmp_path):
    code, out = cli("train-head", "--cache", cache, "--fold", 1, "--recipe", "fast", "--out", tmp_path / "x")
    assert code == 2 and out.strip() == "error: --recipe must be one of default, paper, not 'fast'"


def test_sap_frames_takes_a_count_or_all():
    from core.errors import UserError
    from heads.config import SAP_FRAMES, parse_sap_frames

    assert TrainConfig().sap_frames == SAP_FRAMES == 32
    assert parse_sap_frames("all") is None and parse_sap_frames("ALL") is None and parse_sap_frames("8") == 8
    with pytest.raises(UserError, match="--sap-frames must be a whole number of frames or all"):
        parse_sap_frames("many")
    with pytest.raises(UserError, match="--sap-frames must be at least 1"):
        TrainConfig(sap_frames=0).validate()
