"""Corpus readers on fixture trees in the real layouts: exact counts per class, speaker and skip reason."""

import math
from pathlib import Path

import pytest

from core.records import CLASSES_4, CorpusError, write_manifest
from extract import csv_manifest as manifest
from extract import iemocap, kemdy19, kemdy20
from extract.corpora import read_corpus
from extract.corpus_summary import summarize
from tests.corpus_fixtures import MANIFEST_ROWS, build_iemocap, build_kemdy19, build_kemdy20, build_manifest


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpora")
    return {
        "iemocap": build_iemocap(tmp),
        "kemdy19": build_kemdy19(tmp),
        "kemdy20": build_kemdy20(tmp),
        "manifest": build_manifest(tmp),
    }


def by_id(corpus):
    return {u.utt_id: u for u in corpus.utterances}


# --- IEMOCAP -----------------------------------------------------------------------------------

def test_iemocap_counts(trees):
    corpus = read_corpus("iemocap", trees["iemocap"])
    assert corpus.class_counts() == {"angry": 6, "happy": 6, "neutral": 7, "sad": 6}
    assert corpus.speaker_counts() == {
        "Ses01F": 2, "Ses01M": 2, "Ses02F": 2, "Ses02M": 2, "Ses03F": 3,
        "Ses03M": 4, "Ses04F": 2, "Ses04M": 2, "Ses05F": 3, "Ses05M": 3}
    assert corpus.skip_counts() == {
        "class_not_selected": 6, "duplicate_id": 1, "malformed_line": 1, "missing_audio": 1,
        "unknown_label": 1, "unlabelled": 5, "unreadable_audio": 1}
    assert corpus.adjusted == {"valence_clipped": 1}


def test_iemocap_records(trees):
    root = trees["iemocap"]
    corpus = read_corpus("iemocap", root)
    utts = by_id(corpus)
    assert [u.utt_id for u in corpus.utterances] == sorted(utts)
    # The speaker is the LAST field's letter, never the dialog's marker letter.
    assert utts["Ses01F_impro01_M000"].speaker == "Ses01M"
    assert utts["Ses03M_impro05a_F000"].speaker == "Ses03F"
    assert utts["Ses05M_script01_1b_F003"].speaker == "Ses05F"
    assert utts["Ses03M_impro08b_M003"].session == "Ses03"
    assert utts["Ses01F_impro01_F001"].emotion == "happy"  # exc merged
    u = utts["Ses05M_script01_1b_F003"]
    assert (u.valence, u.arousal, u.emotion) == (5.0, 4.0, "angry")  # V = 5.5 clipped
    assert utts["Ses01F_impro01_M000"].valence == 2.0
    assert u.path == str(root / "Session5" / "sentences" / "wav" / "Ses05M_script01_1b" / f"{u.utt_id}.wav")
    assert Path(u.path).is_absolute() and u.dataset == "iemocap"
    # Only top-level EmoEvaluation files: the subfolders' M009 and the `._` file's F009 are not read.
    assert "Ses01F_impro01_M009" not in utts
    assert all(s.item != "Ses01F_impro01_F009" for s in corpus.skipped)
    reasons = {s.item: s.reason for s in corpus.skipped}
    assert reasons["Ses04F_impro02_F000"] == "missing_audio"
    assert reasons["Ses04F_impro02_M000"] == "unreadable_audio"
    assert reasons["Ses02F_impro01_M003"] == "unknown_label"
    assert reasons["Ses02F_impro01_F000"] == "duplicate_id"
    assert reasons["Ses01F_impro01_F002"] == "unlabelled"
    assert reasons["Ses02F_impro01.txt:35"] == "malformed_line"


def test_iemocap_folds(trees):
    summary = summarize(read_corpus("iemocap", trees["iemocap"]))
    assert [(f["fold"], f["test_speaker"], f["val_speaker"], f["n_test"]) for f in summary["folds"]] == [
        (1, "Ses01F", "Ses01M", 2), (2, "Ses01M", "Ses01F", 2), (3, "Ses02F", "Ses02M", 2),
        (4, "Ses02M", "Ses02F", 2), (5, "Ses03F", "Ses03M", 3), (6, "Ses03M", "Ses03F", 4),
        (7, "Ses04F", "Ses04M", 2), (8, "Ses04M", "Ses04F", 2), (9, "Ses05F", "Ses05M", 3),
        (10, "Ses05M", "Ses05F", 3)]
    assert summary["adjusted"] == {"valence_clipped": 1}
    assert summary["utterances"] == 25


def test_iemocap_class_options(trees):
    corpus = iemocap.read(trees["iemocap"], classes=("angry", "happy", "neutral", "sad", "excited", "frustrated"),
                          strict=False, merge_exc=False)
    assert corpus.class_counts() == {"angry": 6, "happy": 1, "neutral": 7, "sad": 6, "excited": 5, "frustrated": 5}
    assert corpus.skip_counts()["class_not_selected"] == 1  # oth
    with pytest.raises(CorpusError, match="iemocap has no emotion calm"):
        iemocap.read(trees["iemocap"], classes=("angry", "calm"), strict=False)
    with pytest.raises(CorpusError, match="iemocap has no emotion excited"):
        iemocap.read(trees["iemocap"], classes=("excited",), strict=False)  # merged into happy


def test_iemocap_strict_stops_at_the_first_bad_item_but_not_at_label_selection(trees):
    # Session1's xxx and fru lines come first: selection must not stop a strict read.
    message = r"^Ses02F_impro01_M003: the emotion label is not one the reader knows: zzz \(strict mode\)$"
    with pytest.raises(CorpusError, match=message):
        read_corpus("iemocap", trees["iemocap"], strict=True)


def test_iemocap_wrong_root(tmp_path, trees):
    with pytest.raises(CorpusError, match="does not look like IEMOCAP_full_release: expected "
                                          "Session1..Session5/dialog/EmoEvaluation"):
        read_corpus("iemocap", tmp_path)
    with pytest.raises(CorpusError, match="did you mean .*IEMOCAP_full_release"):
        read_corpus("iemocap", trees["iemocap"].parent)


def test_iemocap_partial_copy_is_refused(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    (root / "Session1" / "dialog" / "EmoEvaluation").mkdir(parents=True)
    with pytest.raises(CorpusError, match="incomplete IEMOCAP_full_release: Session2/dialog/EmoEvaluation"):
        read_corpus("iemocap", root)


# --- KEMDy19 -----------------------------------------------------------------------------------

def test_kemdy19_counts(trees):
    corpus = read_corpus("kemdy19", trees["kemdy19"])
    assert corpus.class_counts() == {"angry": 3, "happy": 3, "neutral": 4, "sad": 2}
    assert corpus.speaker_counts() == {
        "Sess01F": 2, "Sess01M": 3, "Sess02F": 3, "Sess02M": 1, "Sess03F": 1, "Sess03M": 2}
    assert corpus.skip_counts() == {
        "class_not_selected": 1, "duplicate_id": 1, "malformed_line": 2, "missing_audio": 1,
        "tied_label": 2, "unknown_label": 1, "unreadable_audio": 1, "wrong_speaker_file": 2}


def test_kemdy19_records(trees):
    root = trees["kemdy19"]
    corpus = read_corpus("kemdy19", root)
    utts = by_id(corpus)
    # Own file only: the cross-listed rows carry other labels that must not leak in.
    assert utts["Sess01_script01_F001"].emotion == "neutral"  # its row has empty bio-signal cells
    assert utts["Sess01_script01_M001"].emotion == "angry"
    assert utts["Sess02_script01_F002"].emotion == "neutral"  # `Neutral ` normalised
    assert utts["Sess03_script01_M001"].emotion == "neutral"  # the first of the two listings
    u = utts["Sess02_impro01_F001"]
    assert (u.speaker, u.session, u.valence, u.arousal) == ("Sess02F", "Sess02", 3.0, 3.0)
    assert u.path == str(root / "wav" / "Session02" / "Sess02_impro01" / "Sess02_impro01_F001.wav")
    wrong = sorted((s.item, s.detail.split(":")[0]) for s in corpus.skipped if s.reason == "wrong_speaker_file")
    assert wrong == [("Sess03_impro02_F001", "Session03_M_res.csv"), ("Sess03_impro02_M001", "Session03_F_res.csv")]
    assert "Sess03_impro02_F001" not in utts
    malformed = sorted(s.item for s in corpus.skipped if s.reason == "malformed_line")
    assert malformed == ["Session03_M_res.csv:10", "Session03_M_res.csv:9"]


@pytest.mark.parametrize("ties, extra, tied", [
    ("first", {"Sess01F": 3}, 0),   # neutral;sad -> neutral, surprise;sad -> surprise (not selected)
    ("selected", {"Sess02F": 4}, 1),  # surprise;sad -> sad, neutral;sad stays tied
])
def test_kemdy19_ties(trees, ties, extra, tied):
    corpus = kemdy19.read(trees["kemdy19"], classes=CLASSES_4, strict=False, ties=ties)
    expected = {"Sess01F": 2, "Sess01M": 3, "Sess02F": 3, "Sess02M": 1, "Sess03F": 1, "Sess03M": 2} | extra
    assert corpus.speaker_counts() == expected
    assert corpus.skip_counts().get("tied_label", 0) == tied
    with pytest.raises(CorpusError, match="unknown ties rule 'vote'"):
        kemdy19.read(trees["kemdy19"], classes=CLASSES_4, strict=False, ties="vote")


def test_kemdy19_strict_and_wrong_root(tmp_path, trees):
    with pytest.raises(CorpusError, match="strict mode"):
        read_corpus("kemdy19", trees["kemdy19"], strict=True)
    with pytest.raises(CorpusError, match="does not look like KEMDy19: expected annotation/SessionNN_F_res.csv"):
        read_corpus("kemdy19", trees["iemocap"])
    (tmp_path / "annotation").mkdir()
    (tmp_path / "wav").mkdir()
    (tmp_path / "annotation" / "Session05_F_res.csv").write_text("Numb\n")
    with pytest.raises(CorpusError, match="Session05_M_res.csv is missing"):
        read_corpus("kemdy19", tmp_path)


def test_kemdy19_folds(trees):
    folds = summarize(read_corpus("kemdy19", trees["kemdy19"]))["folds"]
    assert [(f["test_speaker"], f["val_speaker"]) for f in folds] == [
        ("Sess01F", "Sess01M"), ("Sess01M", "Sess01F"), ("Sess02F", "Sess02M"),
        ("Sess02M", "Sess02F"), ("Sess03F", "Sess03M"), ("Sess03M", "Sess03F")]


# --- KEMDy20 -----------------------------------------------------------------------------------

def test_kemdy20_counts(trees):
    root = trees["kemdy20"]
    corpus = read_corpus("kemdy20", root)
    assert corpus.class_counts() == {"angry": 2, "happy": 2, "neutral": 2, "sad": 1}
    assert corpus.speaker_counts() == {"User001F": 2, "User002M": 1, "User003F": 2, "User004M": 2}
    assert corpus.skip_counts() == {
        "class_not_selected": 1, "duplicate_id": 1, "malformed_line": 1, "missing_audio": 1,
        "tied_label": 1, "unreadable_audio": 1}
    u = by_id(corpus)["Sess02_script01_User003F_001"]  # from the cp949 file
    assert (u.speaker, u.session, u.emotion) == ("User003F", "Sess02", "sad")
    assert u.path == str(root / "wav" / "Session02" / "Sess02_script01_User003F_001.wav")
    folds = summarize(corpus)["folds"]
    assert [(f["test_speaker"], f["val_speaker"]) for f in folds] == [
        ("User001F", "User002M"), ("User002M", "User001F"), ("User003F", "User004M"), ("User004M", "User003F")]


def test_kemdy20_disqust_is_disgust(trees):
    corpus = kemdy20.read(trees["kemdy20"], classes=("disgust", "sad"), strict=False)
    assert corpus.class_counts() == {"disgust": 1, "sad": 1}
    assert by_id(corpus)["Sess01_script01_User002M_001"].emotion == "disgust"


def test_kemdy20_wrong_root(trees):
    with pytest.raises(CorpusError, match="does not look like KEMDy20: expected annotation/SessNN_eval.csv"):
        read_corpus("kemdy20", trees["kemdy19"])


# --- manifest ----------------------------------------------------------------------------------

def test_manifest_counts(trees):
    csv_path = trees["manifest"]
    corpus = read_corpus("manifest", csv_path)
    assert corpus.class_counts() == {"angry": 1, "happy": 1, "neutral": 1, "sad": 1}
    assert corpus.speaker_counts() == {"spk1": 2, "spk2": 1, "spk3": 2}
    assert corpus.skip_counts() == {
        "class_not_selected": 1, "duplicate_id": 1, "malformed_line": 2, "missing_audio": 1,
        "path_outside_root": 1, "unlabelled": 1, "unreadable_audio": 1}
    utts = by_id(corpus)
    assert sorted(utts) == ["a/s1_01", "a/s1_02", "b/s2_01", "c/s3_01", "c/s3_02"]
    assert utts["a/s1_02"].emotion == "happy"
    dim = utts["c/s3_02"]
    assert dim.emotion is None and (dim.valence, dim.arousal) == (3.5, 2.0)
    assert math.isnan(utts["c/s3_01"].valence)
    assert utts["b/s2_01"].session == "spk2"  # no session column: one session per speaker
    assert utts["a/s1_01"].path == str(csv_path.parent / "a" / "s1_01.wav")
    assert [s.item for s in corpus.skipped if s.reason == "path_outside_root"] == ["manifest.csv:9"]
    summary = summarize(corpus)
    assert summary["no_emotion"] == 1
    assert [(f["test_speaker"], f["val_speaker"]) for f in summary["folds"]] == [
        ("spk1", "spk2"), ("spk2", "spk3"), ("spk3", "spk1")]


def test_manifest_optional_columns(tmp_path):
    rows = [["utt_id", "Path", "SPEAKER", "emotion", "session"],
            ["x1", "w/1.wav", "a", "sad", "s1"], ["x2", "w/2.wav", "b", "angry", "s1"],
            ["", "w/3.wav", "c", "angry", "s2"]]
    corpus = read_corpus("manifest", build_manifest(tmp_path, rows, bom=False))
    assert [(u.utt_id, u.speaker, u.session) for u in corpus.utterances] == [
        ("w/3", "c", "s2"), ("x1", "a", "s1"), ("x2", "b", "s1")]
    assert corpus.skipped == []


def test_manifest_round_trip(tmp_path, trees):
    """The normalized manifest `--out` writes (absolute paths, extra columns) reads back the same."""
    corpus = read_corpus("manifest", trees["manifest"])
    out, skipped = write_manifest(corpus, tmp_path / "out" / "m.csv")
    again = read_corpus("manifest", out)
    assert again.utterances == [u for u in corpus.utterances]
    assert again.skipped == []
    assert skipped.read_text().count("\n") == 1 + len(corpus.skipped)


def test_manifest_errors(tmp_path, trees):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,emotion\na.wav,sad\n")
    with pytest.raises(CorpusError, match="has no speaker column; required: path, speaker, emotion"):
        read_corpus("manifest", bad)
    bad.write_text("")
    with pytest.raises(CorpusError, match="is empty"):
        read_corpus("manifest", bad)
    with pytest.raises(CorpusError, match="must be the CSV file itself, not the folder .*manifest.csv"):
        read_corpus("manifest", trees["manifest"].parent)
    with pytest.raises(CorpusError, match="names a class twice"):
        manifest.read(trees["manifest"], classes=("sad", "sad"), strict=False)
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus("manifest", tmp_path / "nope.csv")


def test_manifest_strict_raises_on_the_first_bad_row(trees):
    with pytest.raises(CorpusError, match=r"^manifest.csv:9: the audio path points outside the corpus root"):
        read_corpus("manifest", trees["manifest"], strict=True)


def test_summary_with_too_few_speakers(tmp_path):
    rows = [MANIFEST_ROWS[0], ["a/s1_01.wav", "spk1", "angry", "2", "4"], ["b/s2_01.wav", "spk2", "sad", "", ""]]
    summary = summarize(read_corpus("manifest", build_manifest(tmp_path, rows)))
    assert summary["folds"] == []
    assert "at least 3 speakers" in summary["folds_note"]
    assert summary["speakers"] == {"spk1": 1, "spk2": 1}


def test_iemocap_line_of_another_session_is_malformed(tmp_path):
    root = build_iemocap(tmp_path)
    txt = root / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    txt.write_text(txt.read_text() + "[1.0 - 2.0]\tSes02F_impro01_F000\tneu\t[2.5, 2.5, 2.5]\n")
    corpus = read_corpus("iemocap", root)
    assert corpus.skip_counts()["malformed_line"] == 2
    assert corpus.speaker_counts()["Ses02F"] == 2
