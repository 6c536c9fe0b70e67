"""bench/real_speech.py end to end on a tiny synthetic manifest corpus (no espeak-ng needed: the harness
reuses a corpus already in its work folder): baseline and head rows, pass-through options, failures and
missing backends recorded in the table instead of stopping the run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from extract.synthetic import generate
from heads.evaluate.report import load_run, summarize

BENCH = Path(__file__).resolve().parent.parent / "bench" / "real_speech.py"


def load_harness():
    spec = importlib.util.spec_from_file_location("real_speech_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| features")]


def test_harness_runs_the_baseline_and_heads_through_the_cli(tmp_path):
    work = tmp_path / "work"
    generate(work / "corpus", seed=1, n_sessions=2, utts_per_speaker=8, speech_seconds=(0.5, 1.0),
             silence_seconds=(0.1, 0.3))
    out = tmp_path / "result.md"
    load_harness().main(["--work", str(work), "--backend", "fbank", "--model", str(tmp_path / "no-such-model"),
                         "--heads", "gap", "--variant", "one=--epochs 1", "--variant", "bad=--no-such-option",
                         "--no-reference", "--out", str(out), "--", "--batch-size", "8"])
    text = out.read_text()
    rows = {(r[0], r[1], r[2]): r for r in table_rows(text)}
    base = rows[("fbank", "baseline", "(defaults)")]
    s = summarize(load_run(work / "runs" / "fbank-baseline"))
    assert base[3] == "4" and base[4].startswith(f"{100 * s['ua']['mean']:.1f} (")
    gap = rows[("fbank", "GAP", "--epochs 1 --batch-size 8")]
    settings = json.loads((work / "runs" / "fbank-gap-one" / "config.json").read_text())["settings"]
    assert (settings["epochs"], settings["batch_size"], settings["pooling"]) == (1, 8, "gap")  # passed through
    g = load_run(work / "runs" / "fbank-gap-one")
    diff = sum(m["ua"] - b["ua"] for m, b in zip(g.folds, load_run(work / "runs" / "fbank-baseline").folds)) / 4
    assert gap[3] == "4" and gap[7].startswith(f"{100 * diff:+.1f} (")
    bad = rows[("fbank", "GAP", "--no-such-option --batch-size 8")]
    assert bad[-1].startswith("failed (exit 2)") and bad[4] == "–"
    assert "| no-such-model | – | – | – | skipped: no model folder" in text
    assert "python bench/real_speech.py --work" in text and "Machine:" in text


def test_a_corpus_made_with_other_options_is_refused_not_reused(tmp_path):
    harness = load_harness()
    corpus = tmp_path / "work" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "manifest.csv").write_text("path,speaker,emotion,session,utt_id\n")
    assert harness.make_corpus(tmp_path / "work", 10, 9, 1) == corpus / "manifest.csv"  # no corpus.json: as is
    (corpus / "corpus.json").write_text(json.dumps({"sessions": 5, "per_class": 9, "seed": 0}))
    assert harness.make_corpus(tmp_path / "work", 5, 9, 0) == corpus / "manifest.csv"
    with pytest.raises(SystemExit, match=r"made with --sessions 5 --seed 0, not --sessions 10 --seed 1: give another"):
        harness.make_corpus(tmp_path / "work", 10, 9, 1)
