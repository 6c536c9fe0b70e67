"""`cli predict --segments`: long recordings streamed, cut into speech segments by a documented rule, each predicted
as `predict_array` predicts the same samples, in memory that does not grow with the recording."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from cli import app
from core.errors import UserError
from extract import synthetic
from extract.audio import AudioStream, load_audio
from extract.segments import Segmenter, SegmentRule, SpanCutter, segments
from extract.vad import vad_frames
from heads.predict import load_predictor, segment_columns

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cut(frames: list[tuple[bool, int]], rule: SegmentRule | None = None) -> list[tuple[int, int, bool, bool]]:
    """The rule (default: SegmentRule()) on frame decisions given as (speech?, how many 10 ms frames) pieces."""
    cutter = SpanCutter(rule or SegmentRule())
    spans = [s for speech, n in frames for _ in range(n) for s in cutter.push(speech)] + cutter.finish()
    return [(s.start, s.end, s.pad_before, s.pad_after) for s in spans]


# --- the rule, on frame decisions ---------------------------------------------------------------


def test_a_pause_just_under_the_merge_gap_joins_and_one_at_it_splits():
    assert cut([(False, 50), (True, 150), (False, 49), (True, 150), (False, 100)]) == [(50, 399, True, True)]
    assert cut([(False, 50), (True, 150), (False, 50), (True, 150), (False, 100)]) == [
        (50, 200, True, True), (250, 400, True, True)]


def test_a_burst_under_the_minimum_is_dropped_and_one_at_it_kept():
    assert cut([(False, 10), (True, 99), (False, 60)]) == []
    assert cut([(False, 10), (True, 100), (False, 60)]) == [(10, 110, True, True)]
    # short bursts closer than the merge gap add up (the pauses count): 3 x 40 + 2 x 10 frames
    assert cut([(True, 40), (False, 10), (True, 40), (False, 10), (True, 40), (False, 60)]) == [(0, 140, True, True)]


@pytest.mark.parametrize("n, parts", [
    (1000, [(0, 1000)]),  # exactly the maximum: one segment
    (1001, [(0, 500), (500, 1001)]),  # just over: two halves
    (2500, [(0, 1000), (1000, 1750), (1750, 2500)]),  # max-second parts while > 2 max is open, then halves
    (4000, [(0, 1000), (1000, 2000), (2000, 3000), (3000, 4000)]),  # a rest of exactly 2 max: two halves of max
])
def test_speech_longer_than_the_maximum_is_split_into_parts_between_half_and_all_of_it(n, parts):
    spans = cut([(False, 20), (True, n), (False, 60)])
    assert [(a - 20, b - 20) for a, b, _, _ in spans] == parts
    assert [(before, after) for _, _, before, after in spans] == [(i == 0, i == len(parts) - 1)
                                                                   for i in range(len(parts))]
    assert all(500 <= b - a <= 1000 for a, b, _, _ in spans)


def test_the_end_of_the_stream_closes_the_open_run():
    assert cut([(False, 5), (True, 300)]) == [(5, 305, True, True)]
    assert cut([(True, 300), (False, 10)]) == [(0, 300, True, True)]  # in a short pause at the end
    assert cut([(False, 5)]) == []


@pytest.mark.parametrize("options, message", [
    ({"pad": 0.3}, "at most half of --merge-gap"),
    ({"min_segment": 12.0}, "must not exceed --max-segment"),
    ({"max_segment": 0.0, "min_segment": 0.0}, "at least 0.1 s"),
    ({"merge_gap": -1.0}, "must not be negative"),
])
def test_a_bad_rule_is_one_line(options, message):
    with pytest.raises(UserError, match=message):
        SegmentRule(**options).validate()


# --- audio: the stream and the VAD --------------------------------------------------------------


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> tuple[Path, list[tuple[float, float, str]]]:
    """100 s of room noise with spoken chunks at known places (16 kHz)."""
    speech = [(3.0, 6.0), (6.2, 8.0), (12.0, 12.5), (20.0, 44.0), (50.0, 51.4), (60.0, 61.0), (61.4, 63.0),
              (90.0, 99.5)]
    path = tmp_path_factory.mktemp("long") / "long.wav"
    return path, synthetic.write_recording(path, 100.0, speech, seed=3)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_the_streamed_vad_is_extract_vads_on_the_whole_file(recording, tmp_path, rate):
    """With a rule that keeps every frame run as it is, the segments are exactly the runs of extract.vad's
    frames on the whole decoded file, and their samples are that file's: the stream changes nothing."""
    path, _ = recording
    if rate != 16_000:
        import soxr

        x, _ = sf.read(path, dtype="float32")
        path = tmp_path / "44k.flac"
        sf.write(path, soxr.resample(x, 16_000, rate), rate)
    whole = load_audio(path).samples
    keep_all = SegmentRule(min_segment=0.0, max_segment=1000.0, merge_gap=0.0, pad=0.0)
    got = list(segments(iter(AudioStream(path, block_seconds=0.37)), keep_all, 3))
    expected = runs(vad_frames(whole, 3))
    assert [(s.start // 160, -(-s.end // 160)) for s in got] == expected and len(expected) > 5
    for s in got:
        np.testing.assert_array_equal(s.samples, whole[s.start:s.end])


def test_segments_lie_where_the_speech_was_written(recording):
    path, _ = recording
    found = [s.seconds for s in segments(iter(AudioStream(path)), SegmentRule(), 3)]
    # (3-6)+(6.2-8) and (60-61)+(61.4-63) merge (pauses of 0.2 and 0.4 s); 12-12.5 is too short; 20-44 is 24 s:
    # parts of 10, 7, 7; the VAD's onset and hangover move edges by a few frames, the pad by 0.25 s
    expected = [(3.0, 8.0), (20.0, 30.0), (30.0, 37.0), (37.0, 44.0), (50.0, 51.4), (60.0, 63.0), (90.0, 99.5)]
    assert len(found) == len(expected), found
    for (a, b), (ea, eb) in zip(found, expected):
        assert ea - 0.35 <= a <= ea + 0.1 and eb - 0.1 <= b <= eb + 0.4, (a, b, ea, eb)


def test_the_held_audio_is_bounded_by_the_rule_not_the_recording(recording):
    path, _ = recording
    rule = SegmentRule(max_segment=4.0)
    segmenter = Segmenter(rule, 3)
    for block in AudioStream(path):
        segmenter.feed(block)
    segmenter.finish()
    bound = (2 * rule.max_segment + rule.merge_gap + rule.pad + 1.0) * 16_000  # + one decoded block
    assert 0.5 * bound < segmenter.peak_buffer <= bound  # the 24 s run was held only in 8 s pieces


# --- predictions -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fold(tmp_path_factory) -> Path:
    """An fbank run on a small synthetic corpus, one fold of one epoch: what predict re-extracts exactly."""
    from extract.pipeline import run_extract
    from heads.train.fold_loop import train_folds
    from heads.train.trainer import TrainConfig

    root = tmp_path_factory.mktemp("segments-run")
    manifest = synthetic.generate(root / "corpus", seed=2, n_sessions=2, utts_per_speaker=4)
    cache = root / "fbank.h5"
    run_extract("manifest", manifest, out=cache, model="fbank", workers=0, progress=False)
    run, _ = train_folds(cache, TrainConfig(epochs=1, batch_size=8, ensemble=1, min_steps=0, device="cpu"),
                         folds=[1], out=root / "run", progress=False)
    return run / "fold-01"


def test_each_segment_is_predicted_as_predict_array_predicts_its_samples(fold, recording):
    path, _ = recording
    predictor = load_predictor(fold)
    x, rate = sf.read(path, dtype="float32")
    got = list(predictor.predict_segments(path))
    assert len(got) == 7 and all(s.prediction.ok for s in got)
    for s in got:
        alone = predictor.predict_array(x[round(s.start * rate):round(s.end * rate)], rate)
        assert s.prediction.probs == alone.probs and s.prediction.emotion == alone.emotion
        assert s.prediction.valence == alone.valence and s.prediction.speech_ratio == alone.speech_ratio
        assert s.prediction.seconds == pytest.approx(s.end - s.start)


def test_a_baseline_fold_predicts_segments_too(fold, recording):
    from heads.config import BaselineConfig
    from heads.train.baseline import run_baseline

    path, _ = recording
    run, _ = run_baseline(fold.parent.parent / "fbank.h5", BaselineConfig(), folds=[1],
                          out=fold.parent.parent / "baseline", progress=False)
    predictor = load_predictor(run / "fold-01")
    x, rate = sf.read(path, dtype="float32")
    got = list(predictor.predict_segments(path))
    assert len(got) == 7
    for s in got[:3]:
        assert s.prediction.probs == predictor.predict_array(x[round(s.start * rate):round(s.end * rate)], rate).probs


def test_cli_writes_segments_csv_and_the_timeline(fold, recording, tmp_path):
    path, _ = recording
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(path), "--run", str(fold.parent), "--segments", "--out", str(out),
                                 "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert done["segments"] == 7 and done["failed"] == 0 and done["seconds"] == pytest.approx(100.0)
    assert done["rule"] == {"min_segment": 1.0, "max_segment": 10.0, "merge_gap": 0.5, "pad": 0.25}
    with (out / "segments.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["start", "end", "emotion", "prob_angry", "prob_happy", "prob_neutral", "prob_sad",
                             "valence", "arousal", "speech_ratio"]
    assert len(rows) == 7 and all(abs(sum(float(r[f"prob_{c}"]) for c in ("angry", "happy", "neutral", "sad")) - 1)
                                  < 1e-5 for r in rows)
    assert (out / "timeline.png").read_bytes().startswith(b"\x89PNG")

    lines = runner.invoke(app, ["predict", str(path), "--run", str(fold), "--segments", "--out", str(out),
                                "--max-segment", "4", "--min-segment", "0.5"])
    with (out / "segments.csv").open() as fh:
        starts = [float(r["start"]) for r in csv.DictReader(fh)]
    assert lines.exit_code == 0 and lines.stdout.count(" s: ") == len(starts) > 7
    assert f"{len(starts)} segments" in lines.stdout
    assert any(11.6 <= a <= 12.0 for a in starts)  # the 0.5 s burst at 12 s is kept now


def test_only_what_the_head_learned_is_a_column():
    assert segment_columns(["a", "b"], ["emotion"]) == ["start", "end", "emotion", "prob_a", "prob_b", "speech_ratio"]
    assert segment_columns(["a", "b"], ["valence", "arousal"]) == ["start", "end", "valence", "arousal",
                                                                    "speech_ratio"]


@pytest.mark.parametrize("args, message", [
    (["--pad", "0.5"], "at most half of --merge-gap"),
    (["EXTRA"], "one recording at a time"),
])
def test_cli_refuses_in_one_line(fold, recording, tmp_path, args, message):
    path, _ = recording
    extra = [str(path)] if args == ["EXTRA"] else args
    result = runner.invoke(app, ["predict", str(path), "--run", str(fold), "--segments", "--out",
                                 str(tmp_path / "o"), *extra])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output


def test_a_missing_recording_is_one_line(fold, tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path / "nope.wav"), "--run", str(fold), "--segments",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "nope.wav" in result.output
    assert not (tmp_path / "o").exists()  # refused before anything was written


# --- memory ------------------------------------------------------------------------------------

PEAK = textwrap.dedent("""
    import resource, sys
    from heads.predict import load_predictor, write_segments
    done = write_segments(load_predictor(sys.argv[1]), sys.argv[2], sys.argv[3])
    print(done["segments"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def long_file(path: Path, minutes: int) -> Path:
    """Speech of 2-12 s every ~15 s, streamed to disk (never held whole)."""
    rng = np.random.default_rng(minutes)
    starts = np.arange(5.0, minutes * 60 - 15, 15.0)
    synthetic.write_recording(path, minutes * 60, [(a, a + rng.uniform(2, 12)) for a in starts], seed=minutes)
    return path


def test_peak_memory_does_not_grow_with_the_recording(fold, tmp_path):
    """A 10-minute file's samples alone are 38 MB as float32: predicting it must take no more memory than a
    1-minute file (peak RSS of a fresh process each)."""
    peaks = {}
    for minutes in (1, 10):
        audio = long_file(tmp_path / f"{minutes}.wav", minutes)
        out = subprocess.run([sys.executable, "-c", PEAK, str(fold), str(audio), str(tmp_path / f"o{minutes}")],
                             capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        n, peak_kib = map(int, out.stdout.split())
        assert n >= 3 * minutes
        peaks[minutes] = peak_kib / 1024
    assert peaks[10] - peaks[1] < 8, peaks  # MiB
