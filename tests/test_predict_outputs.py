"""Predict says only what the head learned; all folds of a run as one ensemble; files a fold trained on are flagged."""

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from extract import synthetic
from extract.audio import load_audio
from heads.predict import Ensemble, Predictor, format_line, load_predictor
from heads.runfolder import fold_outputs

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.output


@pytest.fixture(scope="module")
def no_dims_run(tmp_path_factory):
    """A corpus with emotions but no valence/arousal -> fbank cache -> 4 folds of 1 epoch."""
    root = tmp_path_factory.mktemp("nodims")
    manifest = synthetic.generate(root / "corpus", seed=3, n_sessions=2, utts_per_speaker=4)
    rows = list(csv.DictReader(manifest.open()))
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "valence": "", "arousal": ""} for r in rows)
    cache = root / "f.h5"
    code, out, _ = cli("extract", "--dataset", "manifest", "--root", manifest, "--model", "fbank", "--out", cache,
                       "--workers", "0", "--quiet", "--json")
    assert code == 0, out
    run = root / "run"
    code, out, _ = cli("train-head", "--cache", cache, "--all-folds", "--epochs", "1", "--batch-size", "8",
                       "--out", run, "--quiet")
    assert code == 0, out
    files = {r["utt_id"]: manifest.parent / r["path"] for r in rows}
    speakers = {r["utt_id"]: r["speaker"] for r in rows}
    return run, files, speakers


def test_a_fold_without_valence_arousal_labels_writes_none(no_dims_run):
    run, _, _ = no_dims_run
    fold = run / "fold-01"
    assert json.loads((fold / "metrics.json").read_text())["outputs"] == ["emotion"]
    with (fold / "predictions.csv").open() as fh:
        header = next(csv.reader(fh))
    assert header == ["utt_id", "true", "pred", "prob_angry", "prob_happy", "prob_neutral", "prob_sad"]


def test_cli_predict_prints_and_writes_only_the_emotion(no_dims_run):
    run, files, _ = no_dims_run
    wav = files["S02M_001"]
    code, stdout, _ = cli("predict", wav, "--run", run / "fold-01")
    assert code == 0 and "valence" not in stdout and "arousal" not in stdout and "[angry " in stdout
    code, stdout, _ = cli("predict", wav, "--run", run / "fold-01", "--json")
    (row,) = json.loads(stdout)
    assert "valence" not in row and "arousal" not in row and row["outputs"] == ["emotion"]
    assert abs(sum(row["probs"].values()) - 1) < 1e-6


def test_folds_made_before_the_record_are_read_from_the_heads_buffers(no_dims_run, tmp_path):
    import shutil

    run, _, _ = no_dims_run
    old = tmp_path / "old-fold"
    shutil.copytree(run / "fold-01", old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["outputs"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    from heads.runfolder import load_weights

    assert fold_outputs(old, load_weights(old / "head.safetensors")) == ["emotion"]
    assert fold_outputs(old, {"va_mean": np.array([3.1, 0.0]), "va_std": np.array([0.9, 1.0])}) == [
        "emotion", "valence"]


def test_run_folder_predicts_with_the_mean_of_all_folds(no_dims_run):
    run, files, _ = no_dims_run
    ensemble = load_predictor(run)
    assert isinstance(ensemble, Ensemble) and ensemble.folds == [1, 2, 3, 4]
    wav = files["S01F_002"]
    got = ensemble.predict_one(wav)
    singles = [Predictor(run / f"fold-{k:02d}").predict_one(wav) for k in range(1, 5)]
    mean = {c: np.mean([p.probs[c] for p in singles]) for c in ensemble.classes}
    assert got.probs == pytest.approx(mean, abs=1e-6)
    assert got.emotion == max(mean, key=mean.get) and got.outputs == ("emotion",)
    assert "valence" not in format_line(got)


def test_files_a_fold_trained_on_are_flagged(no_dims_run):
    run, files, speakers = no_dims_run
    cfg = json.loads((run / "config.json").read_text())
    wav = files["S01F_002"]  # speaker S01F: fold 1 tests it, fold 2 validates on it (session partner)
    seen_by = [f["fold"] for f in cfg["folds"] if speakers["S01F_002"] in f["train"] + [f["val"]]]
    assert seen_by == [2, 3, 4]
    assert Predictor(run / "fold-01").predict_one(wav).seen_in_training == []  # its test speaker: fair
    p = Predictor(run / "fold-03").predict_one(wav)
    assert p.utt_id == "S01F_002" and p.seen_in_training == [3]
    assert load_predictor(run).predict_one(wav).seen_in_training == seen_by
    code, _, output = cli("predict", wav, "--run", run)
    assert code == 0 and "warning:" in output and "fold 2, 3, 4" in output
    code, stdout, _ = cli("predict", wav, "--run", run / "fold-01", "--json")
    assert json.loads(stdout)[0]["seen_in_training"] == []


def test_an_array_predicts_like_its_file(no_dims_run):
    run, files, _ = no_dims_run
    predictor = Predictor(run / "fold-02")
    wav = files["S02F_003"]
    samples = load_audio(wav).samples
    from_file, from_array = predictor.predict_one(wav), predictor.predict_array(samples)
    assert from_array.ok and from_array.probs == pytest.approx(from_file.probs, abs=1e-6)
    assert from_array.utt_id == "" and "utt_id" not in from_array.as_dict()
    stereo = np.stack([samples, samples], axis=1)  # (N, 2) at 16 kHz: the channel mean is the same wave
    assert predictor.predict_array(stereo).probs == pytest.approx(from_file.probs, abs=1e-6)
    bad = predictor.predict_array(np.zeros(8000, np.float32))
    assert not bad.ok and "silent" in bad.error
