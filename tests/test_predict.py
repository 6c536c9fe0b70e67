"""`cli predict` on head-only and fine-tuned folds: probabilities sum to 1 and match the fold's predictions.csv."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cache.reader import FeatureCache
from cli import app
from core.frames import SSL_GRID
from core.records import SKIP_REASONS
from extract.corpora import read_corpus
from extract.synthetic import generate
from heads.config import FinetuneSettings, finetune_config
from heads.finetune.run import run_finetune
from heads.finetune.waves import WaveIndex, build_wave_index, index_from_cache
from heads.predict import Predictor
from heads.train.fold_loop import train_folds
from heads.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict-corpus")
    return generate(root, seed=2, n_sessions=2, utts_per_speaker=4, speech_seconds=(0.6, 1.2),
                    silence_seconds=(0.1, 0.5))


@pytest.fixture(scope="module")
def cache(corpus, tiny_dir, tmp_path_factory) -> Path:
    from extract.pipeline import run_extract

    out = tmp_path_factory.mktemp("cache") / "tiny.h5"
    run_extract("manifest", corpus, out=out, model=str(tiny_dir), device="cpu", workers=0, progress=False)
    return out


def predictions(fold: Path) -> dict[str, dict]:
    with (fold / "predictions.csv").open() as fh:
        return {row["utt_id"]: row for row in csv.DictReader(fh)}


def audio_of(corpus: Path) -> dict[str, Path]:
    with corpus.open() as fh:
        return {row["utt_id"]: corpus.parent / row["path"] for row in csv.DictReader(fh)}


def assert_matches_fold(fold: Path, corpus: Path, atol: float) -> None:
    predictor = Predictor(fold)
    files = audio_of(corpus)
    expected = predictions(fold)
    classes = predictor.classes
    for utt_id in sorted(expected)[:3]:
        got = predictor.predict_one(files[utt_id])
        assert got.ok, got.error
        probs = np.array([got.probs[c] for c in classes])
        assert probs.sum() == pytest.approx(1.0, abs=1e-6)
        row = expected[utt_id]
        np.testing.assert_allclose(probs, [float(row[f"prob_{c}"]) for c in classes], atol=atol)
        assert got.emotion == row["pred"]
        assert got.valence == pytest.approx(float(row["valence"]), abs=10 * atol)
        assert got.arousal == pytest.approx(float(row["arousal"]), abs=10 * atol)
        assert 0.0 <= got.speech_ratio <= 1.0


@pytest.fixture(scope="module")
def head_run(cache, tmp_path_factory) -> Path:
    run, _ = train_folds(cache, TrainConfig(epochs=2, batch_size=8, device="cpu"), folds=[1],
                         out=tmp_path_factory.mktemp("runs") / "head", progress=False)
    return run


def test_an_ensemble_fold_predicts_what_its_predictions_csv_says(cache, corpus, head_run, tmp_path):
    run, _ = train_folds(cache, TrainConfig(epochs=2, batch_size=8, device="cpu", ensemble=2), folds=[1],
                         out=tmp_path / "ensemble", progress=False)
    assert (run / "fold-01" / "head-2.safetensors").is_file()
    assert_matches_fold(run / "fold-01", corpus, atol=2e-3)
    # member 1 alone (head_run: the same settings at seed 0) is far from the mean: predict must average both
    one, both = predictions(head_run / "fold-01"), predictions(run / "fold-01")
    gap = max(abs(float(one[u][k]) - float(both[u][k])) for u in both for k in both[u] if k.startswith("prob_"))
    assert gap > 2e-2, gap


def test_head_only_fold_predicts_what_its_predictions_csv_says(head_run, corpus):
    run = head_run
    # Re-extraction runs one file alone where the cache batched it; fp16 rounding of the
    # cache is reproduced, so only last-bit differences remain.
    assert_matches_fold(run / "fold-01", corpus, atol=2e-3)


def test_fine_tuned_folds_predict_what_their_predictions_csv_says(cache, corpus, tiny_dir, tmp_path):
    config = finetune_config(epochs=1, batch_size=4, lr=1e-3, seed=0, device="cpu")
    full = run_finetune("manifest", corpus, config,
                        FinetuneSettings(model=str(tiny_dir), full=True, step_seconds=4, workers=0,
                                         grad_checkpointing=False),
                        folds=[1], out=tmp_path / "full", cache_path=str(cache), progress=False, log=lambda s: None)
    index = WaveIndex.load(full.out / "wave-index.npz")
    assert index.settings["vad_source"] == str(cache)  # VAD masks reused from the cache, not recomputed
    computed = build_wave_index(read_corpus("manifest", corpus).utterances, SSL_GRID, 0.0)
    assert index.utt_ids == computed.utt_ids
    for utt_id in index.utt_ids:  # ... and they are the masks a fresh pass computes
        for mode in range(4):
            np.testing.assert_array_equal(index.vad(utt_id, mode), computed.vad(utt_id, mode))
    assert_matches_fold(full.out / "fold-01", corpus, atol=1e-4)

    # Top-K mode, truncated at 1.5 s: predict rebuilds the base model + trained layer and truncates alike.
    top = run_finetune("manifest", corpus, config,
                       FinetuneSettings(model=str(tiny_dir), full=False, top_layers=1, max_seconds=1.5,
                                        step_seconds=4, workers=0, grad_checkpointing=False),
                       folds=[1], out=tmp_path / "top", progress=False, log=lambda s: None)
    assert json.loads((top.out / "config.json").read_text())["mode"] == "finetune-top1"
    assert_matches_fold(top.out / "fold-01", corpus, atol=1e-4)
    longest = max(audio_of(corpus).values(), key=lambda p: p.stat().st_size)
    assert Predictor(top.out / "fold-01").predict_one(longest).truncated


def test_cli_reports_bad_files_one_line_each_and_fails_at_the_end(head_run, corpus, tmp_path):
    run = head_run
    good = sorted(audio_of(corpus).values())[:2]
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    files = [str(good[0]), str(tmp_path / "missing.wav"), str(broken), str(good[1])]
    result = CliRunner().invoke(app, ["predict", *files, "--run", str(run / "fold-01"), "--json"])
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert [p["ok"] for p in payload] == [True, False, False, True]
    assert "does not exist" in payload[1]["error"] and "could not be decoded" in payload[2]["error"]
    assert sum(payload[0]["probs"].values()) == pytest.approx(1.0, abs=1e-6)
    text = CliRunner().invoke(app, ["predict", *files, "--run", str(run / "fold-01")])
    assert text.exit_code == 1
    assert len([line for line in text.output.splitlines() if line.startswith(files[0])]) == 1
    assert "2 of 4 files could not be read" in text.output


def test_a_corpus_utterance_missing_from_the_cache_is_a_named_skip(cache, corpus):
    utterances = read_corpus("manifest", corpus).utterances
    extra = replace(utterances[0], utt_id="zz_not_cached")
    with FeatureCache(cache) as c:
        index = index_from_cache(c, [*utterances, extra], SSL_GRID, 0.0)
    assert index.skipped == {"zz_not_cached": "not_in_cache"} and "not_in_cache" in SKIP_REASONS
    assert index.utt_ids == [u.utt_id for u in utterances]
