import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from scipy import stats
from typer.testing import CliRunner

from cli import app
from heads.evaluate.plots import confusion_png, row_labels, write_run_plots
from heads.evaluate.report import (
    ReportError,
    load_run,
    mean_ci,
    pct,
    render_folds,
    render_runs,
    render_tables,
    summarize,
    summarize_runs,
)
from run_fixtures import FOLDS, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UA = [0.75, 0.875, 2 / 3]  # per fold, by hand from run_fixtures.FOLDS
WA = [11 / 14, 14 / 16, 10 / 14]
SUMMED = [[9, 3, 0, 0], [1, 9, 2, 0], [0, 1, 12, 1], [0, 0, 1, 5]]
SUMMARY_KEYS = {"run", "folds", "labels", "ua", "wa", "macro_f1", "recall", "valence_mae", "arousal_mae",
                "valence_ccc", "arousal_ccc", "no_speech", "confusion", "recall_pooled", "pooling", "method",
                "settings", "heads_per_fold", "recipe", "cross_corpus"}


def scipy_ci(values):
    v = np.asarray(values, dtype=float)
    return stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))


def text_of(*renderables, width=300) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    for r in renderables:
        console.print(r)
    return console.export_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"sr": write_run(root / "iemocap-sr"), "gap": write_run(root / "iemocap-gap", pooling="gap", dims=False),
            "one": write_run(root / "one-fold", folds=FOLDS[:1])}


# --- mean and CI ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 10, 40])
def test_mean_ci_matches_scipy(n):
    values = np.random.default_rng(n).uniform(0.5, 0.9, n)
    got = mean_ci(values.tolist())
    assert got["mean"] == pytest.approx(values.mean(), abs=1e-12)
    assert got["ci95"] == pytest.approx(list(scipy_ci(values)), abs=1e-12)


def test_mean_ci_edge_cases():
    assert mean_ci([]) == {"mean": None, "ci95": None}
    assert mean_ci([None, math.nan]) == {"mean": None, "ci95": None}
    assert mean_ci([0.7]) == {"mean": 0.7, "ci95": None}  # one fold: no spread, no interval
    assert mean_ci([0.6, 0.6, 0.6]) == {"mean": pytest.approx(0.6), "ci95": [pytest.approx(0.6)] * 2}
    assert mean_ci([0.5, None, 1.0, math.nan]) == mean_ci([0.5, 1.0])  # absent values are left out


def test_pct_formats_percent_with_two_decimals():
    assert pct({"mean": 0.7557, "ci95": [0.7225, 0.7889]}) == "75.57 (72.25, 78.89)"
    assert pct({"mean": 0.7557, "ci95": None}) == "75.57"
    assert pct({"mean": 0.7557, "ci95": [0.7, 0.8]}, ci=False) == "75.57"
    assert pct({"mean": None, "ci95": None}) == "–"


# --- summarize --------------------------------------------------------------------------


def test_summarize_known_run(runs):
    s = summarize(runs["sr"])
    assert set(s) == SUMMARY_KEYS
    assert s["run"] == "iemocap-sr" and s["folds"] == 3 and s["pooling"] == "sr"
    assert s["cross_corpus"] is None  # one corpus: no "trained on A, tested on B" line
    assert s["labels"] == ["angry", "happy", "neutral", "sad"]
    assert s["ua"]["mean"] == pytest.approx(55 / 72, abs=1e-12)
    assert s["ua"]["ci95"] == pytest.approx(list(scipy_ci(UA)), abs=1e-12)
    assert s["wa"]["mean"] == pytest.approx(np.mean(WA), abs=1e-12)
    assert s["wa"]["ci95"] == pytest.approx(list(scipy_ci(WA)), abs=1e-12)
    # "sad" is absent from fold 3's test speaker: its recall is over folds 1 and 2 only.
    assert s["recall"]["sad"]["mean"] == pytest.approx(0.75)
    assert s["recall"]["sad"]["ci95"] == pytest.approx(list(scipy_ci([0.5, 1.0])))
    assert s["recall"]["neutral"]["mean"] == pytest.approx((0.75 + 0.75 + 1.0) / 3)
    assert s["confusion"] == SUMMED
    assert s["no_speech"] == 3
    assert s["valence_mae"]["mean"] == pytest.approx(0.5)
    assert s["arousal_mae"]["mean"] == pytest.approx(1 / 3)
    assert s["settings"]["pooling"] == "sr" and s["settings"]["epochs"] == 30


def test_pooled_and_fold_mean_recall_are_both_given_and_named(runs):
    """The table's recall is the mean over folds; confusion.png's diagonal pools the folds' counts.
    They differ on this run (neutral: 83.33 vs 85.71), and each output says which one it shows."""
    s = summarize(runs["sr"])
    assert s["recall_pooled"] == pytest.approx({"angry": 9 / 12, "happy": 9 / 12, "neutral": 12 / 14, "sad": 5 / 6})
    assert s["recall"]["neutral"]["mean"] == pytest.approx(5 / 6) and 12 / 14 != pytest.approx(5 / 6)
    labels = row_labels(s["labels"], [12, 12, 14, 6], [s["recall"][c]["mean"] for c in s["labels"]])
    assert labels[2] == "neutral\n(n=14)\nfold mean: 83.3%"
    assert row_labels(["sad"], [0], [None]) == ["sad\n(n=0)\nfold mean: –"]
    text = text_of(*render_tables([s], 100))
    assert "mean over folds (not pooled)" in text and "confusion.png pools the folds' counts" in text


def test_summarize_ccc_agrees_with_predictions_csv(runs):
    per_fold = []
    for k in (1, 2, 3):
        p = pd.read_csv(runs["sr"] / f"fold-{k:02d}" / "predictions.csv")
        x, y = p["valence_true"].to_numpy(), p["valence"].to_numpy()
        per_fold.append(2 * np.cov(x, y, ddof=0)[0, 1] / (x.var() + y.var() + (x.mean() - y.mean()) ** 2))
    s = summarize(runs["sr"])
    assert s["valence_ccc"]["mean"] == pytest.approx(np.mean(per_fold))
    assert s["valence_ccc"]["ci95"] == pytest.approx(list(scipy_ci(per_fold)))


def test_summarize_without_dimensional_labels_gives_nulls(runs):
    s = summarize(runs["gap"])
    for key in ("valence_mae", "arousal_mae", "valence_ccc", "arousal_ccc"):
        assert s[key] == {"mean": None, "ci95": None}
    assert s["pooling"] == "gap"
    assert json.loads(json.dumps(s, allow_nan=False))["valence_ccc"]["mean"] is None


def test_one_fold_has_no_interval(runs):
    s = summarize(runs["one"])
    assert s["folds"] == 1
    assert s["ua"] == {"mean": 0.75, "ci95": None}
    assert s["wa"] == {"mean": pytest.approx(11 / 14), "ci95": None}


def test_compare_keeps_order(runs):
    assert [s["run"] for s in summarize_runs([runs["gap"], runs["sr"]])] == ["iemocap-gap", "iemocap-sr"]


# --- reading errors ---------------------------------------------------------------------


def copy_run(runs, tmp_path, name="run"):
    return shutil.copytree(runs["sr"], tmp_path / name)


def test_not_a_run(tmp_path, runs):
    with pytest.raises(ReportError, match="no such run folder"):
        load_run(tmp_path / "missing")
    with pytest.raises(ReportError, match="is not a run folder: it has no config.json$"):
        load_run(tmp_path)
    with pytest.raises(ReportError, match="this is a fold folder; pass its parent"):
        load_run(runs["sr"] / "fold-01")


def test_no_finished_folds(tmp_path, runs):
    run = copy_run(runs, tmp_path)
    for d in run.glob("fold-*"):
        (d / "metrics.json").unlink()
    with pytest.raises(ReportError, match="has no finished folds"):
        load_run(run)


def test_unfinished_fold_is_listed_not_counted(tmp_path, runs):
    run = copy_run(runs, tmp_path)
    (run / "fold-03" / "metrics.json").unlink()
    loaded = load_run(run)
    assert len(loaded.folds) == 2 and loaded.unfinished == ("fold-03",)


@pytest.mark.parametrize("edit, message", [
    (lambda m: "{not json", "fold-02/metrics.json is not valid JSON"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "no_speech"}), "metrics.json is not a valid fold metrics file: missing no_speech"),
    (lambda m: json.dumps({**m, "ua": 81.25}), r"ua = 81.25 is not a fraction in \[0, 1\]"),
    (lambda m: json.dumps({**m, "confusion": [[1, 2], [3, 4]]}), "confusion must be a 4x4 matrix"),
    (lambda m: json.dumps({**m, "recall": {"angry": 0.5}}), "recall must map every class"),
    (lambda m: json.dumps({**m, "labels": ["a", "b", "c", "d"], "recall": dict.fromkeys("abcd", 0.5)}),
     "fold-02/metrics.json has labels"),
    (lambda m: json.dumps([m]), "expected a JSON object"),
])
def test_corrupt_metrics_names_the_file(tmp_path, runs, edit, message):
    run = copy_run(runs, tmp_path)
    file = run / "fold-02" / "metrics.json"
    file.write_text(edit(json.loads(file.read_text())))
    with pytest.raises(ReportError, match=message) as err:
        load_run(run)
    assert "fold-02" in str(err.value) and "\n" not in str(err.value)


def test_corrupt_config(tmp_path, runs):
    run = copy_run(runs, tmp_path)
    (run / "config.json").write_text("")
    with pytest.raises(ReportError, match="config.json is not valid JSON"):
        load_run(run)


# --- tables -----------------------------------------------------------------------------


def test_table_shows_runs_side_by_side(runs):
    text = text_of(render_runs([runs["sr"], runs["gap"]]))
    lo, hi = scipy_ci(UA)
    ua_cell = f"{100 * np.mean(UA):.2f} ({100 * lo:.2f}, {100 * hi:.2f})"
    sr_line = next(line for line in text.splitlines() if "iemocap-sr" in line)
    gap_line = next(line for line in text.splitlines() if "iemocap-gap" in line)
    assert sr_line.split()[0] == "SR" and gap_line.split()[0] == "GAP"
    assert ua_cell in sr_line and ua_cell in gap_line
    assert "0.500" in sr_line and "0.500" not in gap_line  # valence MAE only where labelled
    for header in ("UA mean (95% CI)", "WA mean (95% CI)", "Macro-F1", "angry", "sad", "V MAE", "A CCC"):
        assert header in text


def test_narrow_consoles_get_split_tables_and_nothing_cut(runs):
    summaries = summarize_runs([runs["sr"], runs["gap"]])
    assert len(render_tables(summaries, 300)) == 1
    narrow = render_tables(summaries, 80)
    assert len(narrow) == 3
    text = text_of(*narrow, width=80)
    assert "…" not in text and "83.33" in text and "0.333" in text


def test_per_fold_table(runs):
    text = text_of(render_folds(runs["sr"]))
    assert "Ses01F" in text and "87.50" in text and "66.67" in text


# --- plots ------------------------------------------------------------------------------


def test_plots_are_written(tmp_path, runs):
    run = copy_run(runs, tmp_path)
    written = write_run_plots(load_run(run))
    assert written == [run / "confusion.png", run / "curves.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_curves_skipped_without_history_and_bad_history_named(tmp_path, runs):
    run = copy_run(runs, tmp_path)
    for d in run.glob("fold-*"):
        (d / "history.csv").unlink()
    assert write_run_plots(load_run(run)) == [run / "confusion.png"]
    (run / "fold-01" / "history.csv").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(ReportError, match="fold-01/history.csv is not a valid training history: missing column"):
        write_run_plots(load_run(run))


def test_confusion_png_with_an_empty_row(tmp_path):
    path = confusion_png([[3, 1], [0, 0]], ["angry", "sad"], tmp_path / "cm.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


# --- cli report -------------------------------------------------------------------------


@pytest.fixture
def cli_runs(tmp_path, runs):
    return copy_run(runs, tmp_path, "sr"), shutil.copytree(runs["gap"], tmp_path / "gap")


def test_cli_report_one_run(cli_runs):
    sr, _ = cli_runs
    result = CliRunner().invoke(app, ["report", str(sr)])
    assert result.exit_code == 0, result.output
    assert f"{100 * 55 / 72:.2f} (" in result.stdout
    assert "per fold" in result.stdout and "Ses01M" in result.stdout
    assert f"wrote {sr / 'confusion.png'}" in result.stdout
    assert ("sr: per-class recall pooled over folds (confusion.png's diagonal), %: angry 75.00, happy 75.00, "
            "neutral 85.71, sad 83.33") in result.stdout
    assert "Per-class recall: mean over folds of each fold's recall" in " ".join(result.stdout.split())
    assert (sr / "confusion.png").read_bytes().startswith(PNG_MAGIC)
    assert (sr / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_report_two_runs_side_by_side(cli_runs):
    sr, gap = cli_runs
    result = CliRunner().invoke(app, ["report", str(sr), str(gap), "--no-plots"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith(("SR", "GAP"))]
    assert [r.split()[:2] for r in rows] == [["SR", "sr"], ["GAP", "gap"]]
    assert not (sr / "confusion.png").exists() and "wrote" not in result.stdout


def test_cli_report_json(cli_runs):
    sr, gap = cli_runs
    one = CliRunner().invoke(app, ["report", str(sr), "--json", "--no-plots"])
    assert one.exit_code == 0
    parsed = json.loads(one.stdout)  # nothing but JSON on stdout
    assert set(parsed) == SUMMARY_KEYS
    assert parsed == json.loads(json.dumps(summarize(sr)))
    assert parsed["ua"]["ci95"] == pytest.approx(list(scipy_ci(UA)))
    both = CliRunner().invoke(app, ["report", str(sr), str(gap), "--json"])
    assert both.exit_code == 0
    parsed = json.loads(both.stdout)
    assert [s["run"] for s in parsed] == ["sr", "gap"] and parsed[1]["valence_mae"]["mean"] is None
    assert (gap / "confusion.png").exists()  # plots are still written; only the printing changes


@pytest.mark.parametrize("breakage, message", [
    ("missing", "error: no such run folder: "),
    ("no_config", "is not a run folder: it has no config.json"),
    ("corrupt", "fold-01/metrics.json is not valid JSON"),
])
def test_cli_report_errors_are_one_line(cli_runs, breakage, message):
    sr, _ = cli_runs
    target = sr
    if breakage == "missing":
        target = sr.parent / "nope"
    elif breakage == "no_config":
        (sr / "config.json").unlink()
    else:
        (sr / "fold-01" / "metrics.json").write_text('{"fold": 1,')
    result = CliRunner().invoke(app, ["report", str(target)])
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_cli_report_notes_unfinished_folds(cli_runs):
    sr, _ = cli_runs
    (sr / "fold-02" / "metrics.json").unlink()
    result = CliRunner().invoke(app, ["report", str(sr), "--json", "--no-plots"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["folds"] == 2
    assert "unfinished folds that are not counted: fold-02" in result.stderr
