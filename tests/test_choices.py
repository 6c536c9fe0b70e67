"""One home per list of choices (issue 12): every table is what --help, validation and reports use,
every entry has its implementation, and every command's defaults are its config's."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer.main

from cli import app
from core.choices import Choice, Choices, spoken
from core.devices import AMP_MODES, DEVICES, resolve_device
from core.errors import UserError
from core.folds import PROTOCOLS, FoldError, plan
from core.frames import VAD_MODES
from extract.corpora import DATASETS
from heads.config import (
    FRAMES,
    LAYER_WEIGHTS,
    NORMS,
    POOLINGS,
    STATISTICS,
    BaselineConfig,
    FinetuneSettings,
    TrainConfig,
    finetune_config,
)
from heads.evaluate.report import method_label
from heads.model.input_norm import InputNorm
from heads.model.pooling import make_pooling

COMMANDS = typer.main.get_command(app).commands


def test_a_table_checks_helps_and_labels():
    t = Choices("--colour", {"red": Choice("warm", "Red"), "blue": Choice()}, note="paint")
    assert t.check("red") == "red" and list(t) == ["red", "blue"] and len(t) == 2
    with pytest.raises(UserError, match=r"^--colour must be red or blue \(paint\); got 'green'$"):
        t.check("green")
    three = Choices("--n", {1: Choice(), 2: Choice(), 3: Choice()}, error=FoldError)
    with pytest.raises(FoldError, match="^--n must be one of 1, 2, 3; got 4$"):
        three.check(4)
    assert t.help() == "red (warm) or blue" and t.label("red") == "Red" and t.label("blue") == "blue"
    assert t.label("other") == "other" and spoken(["a", "b", "c"]) == "a, b or c"


def test_every_pooling_builds_and_reports_under_its_label():
    for name, entry in POOLINGS.items():
        pool = make_pooling(name, 8, heads=2)
        x, pad = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
        assert pool(x, pad, pad).shape == (2, pool.output_size)
        assert method_label({"pooling": name}) == entry.label
    assert list(POOLINGS) == ["gap", "sap", "sr"]  # the order `cli ablate` trains and shows them


def test_every_norm_mode_builds_and_anything_else_is_refused():
    for mode in NORMS:
        assert InputNorm(mode, 2, 4)(torch.randn(1, 3, 2, 4), torch.ones(1, 3, dtype=torch.bool)).shape == (1, 3, 2, 4)
    with pytest.raises(UserError, match="--norm must be one of"):
        InputNorm("batch", 2, 4)


def test_every_protocol_plans_folds():
    meta = pd.DataFrame({"speaker": [f"S{i}{g}" for i in range(3) for g in "FM"],
                         "session": [f"S{i}" for i in range(3) for _ in "FM"],
                         "split": ["train", "train", "train", "val", "test", "test"]},
                        index=[f"u{i}" for i in range(6)])
    # three corpora of two utterances each, the last one test-only: one cross-corpus fold
    meta["corpus"] = [f"C{i}" for i in range(3) for _ in "FM"]
    meta["corpus_role"] = ["train"] * 4 + ["test"] * 2
    counts = {name: len(plan(meta, name)) for name in PROTOCOLS}
    assert counts == {"speaker": 6, "session": 3, "split": 1, "corpus": 1}


def test_every_dataset_has_a_reader():
    import importlib

    for name, entry in DATASETS.items():
        assert callable(importlib.import_module(entry.module).read), name


def test_devices_resolve_in_one_place():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device must be auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="torch sees no CUDA GPU"):
            resolve_device("cuda:1")
    assert list(DEVICES) == ["auto", "cpu", "cuda"] and list(AMP_MODES) == ["auto", "bf16", "fp16", "none"]
    assert list(VAD_MODES) == [0, 1, 2, 3]


def defaults(command: str) -> dict[str, object]:
    return {p.name: p.default for p in COMMANDS[command].params if p.param_type_name == "option"}


@pytest.mark.parametrize("command, config", [
    ("train-head", TrainConfig()), ("ablate", TrainConfig()), ("finetune", finetune_config()),
    ("finetune", FinetuneSettings()), ("baseline", BaselineConfig()),
])
def test_every_command_shows_its_configs_defaults(command, config):
    shown = defaults(command)
    shared = [f for f in fields(config) if f.name in shown]
    assert len(shared) >= 5
    for f in shared:
        parse = f.metadata.get("parse") or (lambda text: text)  # options typed as text show the text
        assert parse(shown[f.name]) == getattr(config, f.name), (command, f.name)


@pytest.mark.parametrize("command, option, table", [
    ("train-head", "pooling", POOLINGS), ("finetune", "pooling", POOLINGS), ("train-head", "norm", NORMS),
    ("ablate", "layer_weights", LAYER_WEIGHTS), ("baseline", "frames", FRAMES), ("baseline", "statistics", STATISTICS),
    ("train-head", "protocol", PROTOCOLS), ("extract", "dataset", DATASETS), ("extract", "amp", AMP_MODES),
])
def test_option_help_names_every_choice(command, option, table):
    (param,) = [p for p in COMMANDS[command].params if p.name == option]
    assert all(str(name) in param.help for name in table), param.help


def test_cli_help_needs_no_torch():
    code = "import sys, cli; print(sorted(m for m in ('torch', 'h5py', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"


def test_audio_workers_import_neither_torch_nor_h5py():
    code = ("import sys, extract.pipeline, extract.vad, extract.audio; "
            "print(sorted(m for m in ('torch', 'h5py', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
