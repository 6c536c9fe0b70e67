"""`cli demo` end to end through the CLI, at a small size."""

import json

from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_demo_runs_the_whole_pipeline_and_the_head_learns(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--sessions", "2", "--utts-per-speaker", "12", "--epochs", "5",  # x3 by the step plan
            "--ensemble", "1"]  # one head per fold (the demo's default, auto, trains 3 here): the test's time
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "NOT emotion-recognition accuracy" in result.output
    for row in ("fbank-gap", "fbank-sap", "fbank-sr", "tiny-wavlm-sr", "Macro-F1", "UA mean"):
        assert row in result.output  # the table, whatever the terminal width

    summary = json.loads((out / "demo.json").read_text())
    by_run = {s["run"]: s for s in summary["summaries"]}
    assert set(by_run) == {"fbank-gap", "fbank-sap", "fbank-sr", "tiny-wavlm-sr"}
    for s in by_run.values():
        assert s["folds"] == 4  # 2 sessions x 2 speakers, leave-one-speaker-out
        assert s["heads_per_fold"] == [1]  # --ensemble 1 reached every run
    # Chance is 25% for 4 balanced classes; the fbank SR head must clearly beat it.
    assert by_run["fbank-sr"]["ua"]["mean"] >= 0.40
    for run in summary["runs"]:
        for k in range(1, 5):
            fold = out / "runs" / run.split("/")[-1] / f"fold-{k:02d}"
            assert (fold / "metrics.json").exists() and (fold / "predictions.csv").exists()
    for png in summary["plots"]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "features" / "fbank.h5").exists() and (out / "features" / "tiny-wavlm.h5").exists()
    assert (out / "tiny-wavlm" / "config.json").exists()

    # A previous demo folder may be replaced ...
    again = runner.invoke(app, args[:-4] + ["--epochs", "1", "--backends", "fbank", "--ensemble", "2"])
    assert again.exit_code == 0, again.output
    summaries = json.loads((out / "demo.json").read_text())["summaries"]
    assert {s["run"] for s in summaries} == {"fbank-gap", "fbank-sap", "fbank-sr"}
    assert all(s["heads_per_fold"] == [2] for s in summaries) and "SR x2" in again.output


def test_demo_refuses_a_folder_that_is_not_a_previous_demo(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "not empty and not a previous demo output" in result.output
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_demo_rejects_unknown_backends(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--backends", "mfcc"])
    assert result.exit_code == 2
    assert "--backends takes a comma-separated subset of" in result.output


def test_demo_rejects_a_bad_ensemble_before_any_work(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--ensemble", "0"])
    assert result.exit_code == 2 and "--ensemble must be auto or a whole number" in result.output
    assert not (tmp_path / "d").exists()
