"""Damaged run folders and hostile model folders: `cli predict`, `cli report`, `cli train-head`,
`cli extract` and `cli finetune` answer in one line (or recover), never with a traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cli_runner import cli
from extract.backends import tiny_wavlm
from fs_fixtures import one_line_error
from tests.test_bad_rows import good_rows, write_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return write_manifest(folder, good_rows(folder, 24))


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A head-only fbank run, folds 1 and 2."""
    tmp = tmp_path_factory.mktemp("run")
    code, out = cli("extract", "--dataset", "manifest", "--root", corpus, "--model", "fbank", "--out", tmp / "F.h5",
                    "--workers", "0", "--quiet")
    assert code == 0, out
    for k in (1, 2):
        code, out = cli("train-head", "--cache", tmp / "F.h5", "--fold", k, "--epochs", "1", "--batch-size", "8",
                        "--out", tmp / "run", "--quiet")
        assert code == 0, out
    return tmp / "run"


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def predict(fold: Path, corpus: Path):
    return cli("predict", corpus.parent / "wav" / "u000.wav", "--run", fold)


def test_the_intact_run_predicts(copy, corpus):
    code, out = predict(copy / "fold-01", corpus)
    assert code == 0, out


@pytest.mark.parametrize("content, words", [
    ("", "is not valid JSON"),
    ("{\"settings\": ", "is not valid JSON"),
    ("{}", "no 'settings'"),
    ("[1, 2]", "a JSON list"),
    (None, "classes is None"),  # the real config without its classes
    ("hidden", "hidden_size is 'x'"),
])
def test_predict_with_a_damaged_config_json(copy, corpus, content, words):
    path = copy / "config.json"
    if content is None:
        cfg = json.loads(path.read_text())
        del cfg["classes"]
        content = json.dumps(cfg)
    elif content == "hidden":
        content = json.dumps({**json.loads(path.read_text()), "hidden_size": "x"})
    path.write_text(content)
    code, out = predict(copy / "fold-01", corpus)
    assert code == 2 and words in one_line_error(out), out


def test_predict_with_a_truncated_garbage_or_foreign_head(copy, corpus, run):
    head = copy / "fold-01" / "head.safetensors"
    data = head.read_bytes()
    for damage in (data[: len(data) // 2], data[:5], os.urandom(4096), b""):
        head.write_bytes(damage)
        code, out = predict(copy / "fold-01", corpus)
        assert code == 2, out
        assert "head.safetensors cannot be read" in " ".join(one_line_error(out).split())
    save_file({"proj.0.weight": np.zeros((7, 3), np.float32)}, str(head))  # a head of other shapes
    code, out = predict(copy / "fold-01", corpus)
    assert code == 2 and "does not fit the head" in " ".join(one_line_error(out).split()), out


def test_train_head_retrains_a_fold_whose_metrics_are_garbage_and_keeps_the_good_one(copy, run):
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "fold-02" / "metrics.json").write_text("{not json")
    good = (copy / "fold-01" / "metrics.json").read_bytes()
    code, out = cli("train-head", "--cache", cfg["cache"], "--fold", "2", "--epochs", "1", "--batch-size", "8",
                    "--out", copy, "--quiet")
    assert code == 0, out
    assert json.loads((copy / "fold-02" / "metrics.json").read_text())["fold"] == 2
    code, out = cli("train-head", "--cache", cfg["cache"], "--fold", "1", "--epochs", "1", "--batch-size", "8",
                    "--out", copy, "--quiet")
    assert code == 0 and "kept" in out, out
    assert (copy / "fold-01" / "metrics.json").read_bytes() == good


@pytest.mark.parametrize("content", ["", "{oops", "[]"])
def test_train_head_into_a_folder_with_a_garbage_config_json(copy, content):
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(content)
    code, out = cli("train-head", "--cache", cfg["cache"], "--fold", "1", "--epochs", "1", "--out", copy, "--quiet")
    assert code == 2 and "config.json" in one_line_error(out), out


@pytest.mark.parametrize("content", ["", "{oops", "[]", "{\"fold\": \"x\"}"])
def test_report_of_a_run_whose_fold_metrics_are_garbage(copy, content):
    (copy / "fold-02" / "metrics.json").write_text(content)
    code, out = cli("report", copy, "--no-plots")
    assert code in (0, 2), out  # heads/evaluate/report.py decides: skip the fold with a note, or refuse
    assert "Traceback" not in out
    if code == 2:
        one_line_error(out)


@pytest.fixture(scope="module")
def evil_model(tmp_path_factory):
    """A tiny WavLM folder whose weights are a pickle that would run a command when unpickled."""
    folder = tiny_wavlm(tmp_path_factory.mktemp("evil") / "wavlm")
    (folder / "model.safetensors").unlink()
    marker = folder.parent / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"weight": Payload()}, fh)
    return folder, marker


@pytest.mark.parametrize("command", ["extract", "finetune", "predict"])
def test_a_pickle_payload_in_a_model_folder_is_refused_in_one_line(evil_model, corpus, run, tmp_path, command):
    folder, marker = evil_model
    if command == "extract":
        args = ["extract", "--dataset", "manifest", "--root", corpus, "--model", folder, "--out", tmp_path / "F.h5",
                "--workers", "0", "--quiet"]
    elif command == "finetune":
        args = ["finetune", "--dataset", "manifest", "--root", corpus, "--fold", "1", "--model", folder, "--epochs",
                "1", "--workers", "0", "--out", tmp_path / "ft", "--quiet"]
    else:  # a head-only run whose cache was made with that model
        shutil.copytree(run, tmp_path / "run")
        cfg = json.loads((tmp_path / "run" / "config.json").read_text())
        cfg["fingerprint"]["model"] = str(folder)
        (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
        args = ["predict", corpus.parent / "wav" / "u000.wav", "--run", tmp_path / "run" / "fold-01"]
    code, out = cli(*args)
    assert code == 2, out
    line = one_line_error(out)
    assert "pickle" in line.lower(), line
    assert "weights_only" not in line  # torch's advice on loading it unsafely is not repeated
    assert not marker.exists()
