"""Hostile corpus rows: each is skipped with a reason (or refused in one line), the rest of the
corpus goes through extraction and training, and a rerun never trips over them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from core.records import Skip
from extract.corpora import read_corpus
from extract.readers import parse_csv, parse_float
from tests.corpus_fixtures import (
    build_iemocap,
    build_kemdy19,
    build_kemdy20,
    iemocap_block,
    iemocap_dialog,
    kemdy19_row,
    write_wav,
)

runner = CliRunner()
EMOTIONS = ("angry", "happy", "neutral", "sad")


def write_manifest(folder: Path, rows: list[list[str]], header=("path", "speaker", "emotion", "valence",
                                                                "arousal", "utt_id")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "manifest.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return csv_path


def good_rows(folder: Path, n: int, speakers: int = 4) -> list[list[str]]:
    """n utterances of 0.1 s over `speakers` speakers, classes cycling, valence/arousal 1-5."""
    rows = []
    for i in range(n):
        wav = folder / "wav" / f"u{i:03d}.wav"
        if not wav.exists():
            write_wav(wav, seconds=0.1)
        rows.append([f"wav/u{i:03d}.wav", f"spk{i % speakers}", EMOTIONS[(i // speakers) % 4],
                     str(1 + i % 5), str(1 + (i * 3) % 5), f"u{i:03d}"])
    return rows


def skips(corpus) -> dict[str, tuple[str, str]]:
    return {s.item: (s.reason, s.detail) for s in corpus.skipped}


def test_a_nul_byte_anywhere_in_a_row_skips_only_that_row(tmp_path):
    rows = good_rows(tmp_path, 8)
    rows[1][5] = "u\x00001"  # in the utt_id
    rows[2][1] = "spk\x002"  # in the speaker
    rows[3][0] = "wav/u003.wav\x00.wav"  # in the path (os calls would raise ValueError)
    rows[4][2] = "ang\x00ry"  # in the emotion
    corpus = read_corpus("manifest", write_manifest(tmp_path, rows))
    assert [u.utt_id for u in corpus.utterances] == ["u000", "u005", "u006", "u007"]
    found = skips(corpus)
    for line in (3, 4, 5, 6):
        reason, detail = found[f"manifest.csv:{line}"]
        assert reason == "malformed_line" and "NUL" in detail


def test_a_nul_byte_in_an_annotation_line_is_skipped_not_a_traceback(tmp_path):
    # IEMOCAP's id pattern accepts any middle part, so a NUL can reach an utterance id and the
    # wav path built from it (where os calls would raise ValueError).
    root = build_iemocap(tmp_path)
    before = len(read_corpus("iemocap", root).utterances)
    iemocap_dialog(root, 1, "Ses01F_impro01", [iemocap_block("Ses01F_imp\x00ro01_F009", "ang")],
                   no_wav=("Ses01F_imp\x00ro01_F009",))
    corpus = read_corpus("iemocap", root)
    assert len(corpus.utterances) == before
    assert skips(corpus)["Ses01F_imp\\0ro01_F009"][0] == "malformed_line"


def test_a_nul_byte_that_a_reader_lets_through_is_skipped_by_read_corpus(monkeypatch, tmp_path):
    from core.records import Corpus, Utterance
    from extract import corpora

    good = Utterance("a", "/x/a.wav", "s1", "s1", "sad")
    bad = Utterance("b", "/x/b.wav", "s\x001", "s1", "sad")
    corpus = corpora.screen_text(Corpus("manifest", "/x", EMOTIONS, [good, bad]), strict=False)
    assert corpus.utterances == [good]
    assert corpus.skipped == [Skip("b", "malformed_line", "a NUL byte in its speaker")]
    with pytest.raises(corpora.CorpusError, match="NUL byte in its speaker"):
        corpora.screen_text(Corpus("manifest", "/x", EMOTIONS, [good, bad]), strict=True)


def test_skips_are_always_storable():
    s = Skip("id\x00x", "malformed_line", "y" * 5_000_000 + "\x00")
    assert s.item == "id\\0x" and "\x00" not in s.detail and len(s.detail) < 400


def test_csv_rows_that_cannot_be_parsed_are_reported_and_the_next_rows_read():
    text = "a,b\n1,2\n" + "z" * 3_000_000 + ",4\n5,6\n" + "q" * 5000 + ",7\n"
    rows = parse_csv(text)
    assert rows[0] == ["a", "b"] and rows[1] == ["1", "2"] and rows[3] == ["5", "6"]
    assert isinstance(rows[2], str) and "cannot be parsed" in rows[2]
    assert isinstance(rows[4], str) and "5,000 characters" in rows[4]


def test_a_field_of_several_megabytes_skips_its_row(tmp_path):
    rows = good_rows(tmp_path, 6)
    rows[2][1] = "s" * 3_000_000
    corpus = read_corpus("manifest", write_manifest(tmp_path, rows))
    assert len(corpus.utterances) == 5
    reason, detail = skips(corpus)["manifest.csv:4"]
    assert reason == "malformed_line" and len(detail) < 400


@pytest.mark.parametrize("text, value", [("", math.nan), ("nan", math.nan), ("NaN", math.nan), (" 3.5 ", 3.5),
                                         ("-2", -2.0), ("1e6", 1e6)])
def test_ratings_that_parse(text, value):
    got = parse_float(text)
    assert (math.isnan(got) and math.isnan(value)) or got == value


@pytest.mark.parametrize("text", ["inf", "-inf", "Infinity", "1e300", "-1e7", "abc"])
def test_ratings_that_are_refused(text):
    with pytest.raises(ValueError):
        parse_float(text)


@pytest.mark.parametrize("cell", ["inf", "-inf", "1e300", "infinity"])
def test_a_non_finite_or_absurd_rating_skips_its_row_with_the_column_named(tmp_path, cell):
    rows = good_rows(tmp_path, 4)
    rows[1][3] = cell
    rows[2][4] = "NaN"  # absent: the utterance stays, without arousal
    corpus = read_corpus("manifest", write_manifest(tmp_path, rows))
    assert [u.utt_id for u in corpus.utterances] == ["u000", "u002", "u003"]
    assert math.isnan(corpus.utterances[1].arousal)
    reason, detail = skips(corpus)["manifest.csv:3"]
    assert reason == "malformed_line" and detail.startswith("valence:")


def test_kemdy_ratings_of_inf_are_malformed_not_clipped(tmp_path):
    root = build_kemdy20(tmp_path)
    ann = root / "annotation" / "Sess01_eval.csv"
    lines = ann.read_text(encoding="utf-8").splitlines()
    cells = next(csv.reader([lines[2]]))
    cells[5] = "inf"
    lines[2] = ",".join(cells)
    ann.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = read_corpus("kemdy20", root)
    assert skips(corpus)["Sess01_eval.csv:3"][0] == "malformed_line"
    assert all(math.isfinite(u.valence) for u in corpus.utterances if not math.isnan(u.valence))


def test_kemdy19_row_with_a_huge_cell_is_skipped(tmp_path):
    root = build_kemdy19(tmp_path)
    ann = root / "annotation" / "Session01_M_res.csv"
    before = len(read_corpus("kemdy19", root).utterances)
    row = kemdy19_row(99, "Sess01_script01_M001", "angry")
    row[-1] = "x" * 2_000_000
    with ann.open("a", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerow(row)
    corpus = read_corpus("kemdy19", root)
    assert len(corpus.utterances) == before
    assert any(s.item.startswith("Session01_M_res.csv:") and s.reason == "malformed_line"
               and "cannot be parsed" in s.detail for s in corpus.skipped)


def test_duplicate_header_columns_are_refused_in_one_line(tmp_path):
    csv_path = write_manifest(tmp_path, good_rows(tmp_path, 2), header=("path", "speaker", "emotion", "valence",
                                                                          "emotion", "utt_id"))
    result = runner.invoke(app, ["manifest", "--dataset", "manifest", "--root", str(csv_path)])
    assert result.exit_code == 2
    assert "'emotion' 2 times" in result.output and len(result.output.strip().splitlines()) == 1


def test_audio_paths_that_are_folders_or_symlink_loops_are_skipped(tmp_path):
    rows = good_rows(tmp_path, 4)
    (tmp_path / "wav" / "folder.wav").mkdir()
    (tmp_path / "wav" / "loop.wav").symlink_to(tmp_path / "wav" / "loop.wav")
    rows[1][0], rows[2][0] = "wav/folder.wav", "wav/loop.wav"
    corpus = read_corpus("manifest", write_manifest(tmp_path, rows))
    assert [u.utt_id for u in corpus.utterances] == ["u000", "u003"]
    assert skips(corpus)["u001"][0] == skips(corpus)["u002"][0] == "missing_audio"


def test_a_200_utterance_corpus_with_bad_rows_extracts_completely_and_reruns(tmp_path):
    rows = good_rows(tmp_path, 200)
    rows[17][5] = "u\x00017"
    rows[42][1] = "s" * 2_000_000
    rows[99][3] = "inf"
    rows[150][3] = "1e300"
    csv_path = write_manifest(tmp_path, rows)
    out = tmp_path / "F.h5"
    args = ["extract", "--dataset", "manifest", "--root", str(csv_path), "--model", "fbank", "--out", str(out),
            "--workers", "0", "--quiet", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["cache_utterances"] == 196 and summary["reader_skipped"] == {"malformed_line": 4}
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["planned"] == 0
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["skipped"] == {"malformed_line": 4}

    # Training on what remains: no NaN metric comes from the refused ratings.
    run = tmp_path / "run"
    trained = runner.invoke(app, ["train-head", "--cache", str(out), "--fold", "1", "--epochs", "2", "--batch-size",
                                  "16", "--out", str(run), "--quiet"])
    assert trained.exit_code == 0, trained.output
    metrics = json.loads((run / "fold-01" / "metrics.json").read_text())
    for key in ("ua", "wa", "valence_mae", "arousal_mae", "valence_ccc", "arousal_ccc"):
        assert metrics[key] is not None and math.isfinite(metrics[key]), key
