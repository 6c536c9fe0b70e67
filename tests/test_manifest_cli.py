"""`cli manifest`: JSON on stdout, tables, --out files, and one-line errors."""

import csv
import json

import pytest
from typer.testing import CliRunner

from cli import app
from tests.corpus_fixtures import build_iemocap, build_kemdy19, build_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-corpora")
    return {"iemocap": build_iemocap(tmp), "kemdy19": build_kemdy19(tmp), "manifest": build_manifest(tmp)}


def run(*args):
    return runner.invoke(app, ["manifest", *map(str, args)])


def test_json_is_the_only_stdout(trees):
    result = run("--dataset", "iemocap", "--root", trees["iemocap"], "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # fails on any other text
    assert summary["utterances"] == 25
    assert summary["classes"] == {"angry": 6, "happy": 6, "neutral": 7, "sad": 6}
    assert summary["speakers"]["Ses03M"] == 4 and len(summary["speakers"]) == 10
    assert summary["skipped"] == {
        "class_not_selected": 6, "duplicate_id": 1, "malformed_line": 1, "missing_audio": 1,
        "unknown_label": 1, "unlabelled": 5, "unreadable_audio": 1}
    assert summary["folds"][4] == {"fold": 5, "test_speaker": "Ses03F", "val_speaker": "Ses03M", "n_test": 3}
    assert len(summary["folds"]) == 10


def test_classes_and_ties_options(trees):
    result = run("--dataset", "kemdy19", "--root", trees["kemdy19"], "--json",
                 "--classes", "angry, happy,neutral,sad,surprise", "--ties", "first")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # neutral;sad -> neutral and surprise;sad -> surprise, now a selected class.
    assert summary["classes"] == {"angry": 3, "happy": 3, "neutral": 5, "sad": 2, "surprise": 1}
    assert "tied_label" not in summary["skipped"]
    assert summary["speakers"]["Sess01F"] == 3 and summary["speakers"]["Sess02F"] == 4


def test_tables_and_out_files(trees, tmp_path):
    out = tmp_path / "norm" / "m.csv"
    result = run("--dataset", "manifest", "--root", trees["manifest"], "--out", out)
    assert result.exit_code == 0, result.output
    for text in ("spk3", "leave-one-speaker-out folds", "path_outside_root", "skipped items", "wrote"):
        assert text in result.stdout
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["utt_id"] for r in rows] == ["a/s1_01", "a/s1_02", "b/s2_01", "c/s3_01", "c/s3_02"]
    assert rows[4]["emotion"] == "" and float(rows[4]["valence"]) == 3.5
    with (out.parent / "skipped.csv").open() as fh:
        skipped = list(csv.DictReader(fh))
    assert len(skipped) == 8 and {"item", "reason", "detail"} == set(skipped[0])
    # The normalized manifest is itself a valid manifest.
    again = json.loads(run("--dataset", "manifest", "--root", out, "--json").stdout)
    assert again["utterances"] == 5 and again["skipped"] == {}


@pytest.mark.parametrize("args, message", [
    (["--dataset", "iemocap", "--root", "{kemdy19}"], "does not look like IEMOCAP_full_release: expected"),
    (["--dataset", "kemdy20", "--root", "{iemocap}"], "does not look like KEMDy20"),
    (["--dataset", "iemocap", "--root", "{iemocap}", "--ties", "first"], "--ties applies only to kemdy19 and kemdy20"),
    (["--dataset", "kemdy19", "--root", "{kemdy19}", "--ties", "vote"], "unknown ties rule 'vote'"),
    (["--dataset", "iemocap", "--root", "{iemocap}", "--strict"], "(strict mode)"),
    (["--dataset", "iemocap", "--root", "{iemocap}", "--classes", "angry,calm"], "iemocap has no emotion calm"),
    (["--dataset", "timit", "--root", "{iemocap}"], "unknown dataset 'timit'"),
    (["--dataset", "manifest", "--root", "{iemocap}"], "must be the CSV file itself"),
])
def test_errors_are_one_line(trees, args, message):
    result = run(*[a.format(**trees) for a in args])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
