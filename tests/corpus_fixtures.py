"""Tiny corpus trees in the real on-disk layouts, with every quirk the readers must handle.

Each builder writes under a tmp dir and returns the corpus root. The expected
counts live in the tests (tests/test_readers.py), written out by hand from
the rows below, so a reader bug cannot hide behind a shared computation.
Every WAV is 0.05 s of 16 kHz noise: the readers only read headers.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

GARBAGE = b"this is not audio at all \x00\x01\x02" * 8


def write_wav(path: Path, seconds: float = 0.05, sample_rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    sf.write(str(path), (0.1 * rng.standard_normal(int(seconds * sample_rate))).astype(np.float32),
             sample_rate, subtype="PCM_16")


def write_garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(GARBAGE)


# --- IEMOCAP -----------------------------------------------------------------------------------

IEMOCAP_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


def iemocap_block(utt_id: str, code: str, vad: str = "2.5000, 2.5000, 2.5000", sep: str = "\t") -> str:
    """One summary line plus the annotator lines a reader must ignore."""
    return (
        f"[6.2901 - 8.2357]{sep}{utt_id}{sep}{code}{sep}[{vad}]\n"
        f"C-E1:\tNeutral state;\t()\n"
        f"A-E3:\tval 3; act 2; dom  2;\t()\n\n"
    )


def iemocap_dialog(root: Path, session: int, dialog: str, lines: list[str],
                   no_wav: tuple[str, ...] = (), bad_wav: tuple[str, ...] = ()) -> None:
    """Write `<dialog>.txt` from summary blocks and a wav per utterance id named in them."""
    label_dir = root / f"Session{session}" / "dialog" / "EmoEvaluation"
    label_dir.mkdir(parents=True, exist_ok=True)
    with (label_dir / f"{dialog}.txt").open("a", encoding="utf-8") as fh:
        if fh.tell() == 0:
            fh.write(IEMOCAP_HEADER)
        fh.write("".join(lines))
    for block in lines:
        fields = block.split("\n")[0].split()
        utt_id = next((f for f in fields if f.startswith("Ses")), None)
        if utt_id is None or utt_id in no_wav:
            continue
        wav = root / f"Session{session}" / "sentences" / "wav" / utt_id.rsplit("_", 1)[0] / f"{utt_id}.wav"
        if utt_id in bad_wav:
            write_garbage(wav)
        elif not wav.exists():
            write_wav(wav)


def build_iemocap(tmp: Path) -> Path:
    """IEMOCAP_full_release with 5 sessions, 10 speakers.

    Per session k, dialog Ses0kF_impro01 (marker wearer F): F000 neu, M000 ang
    (speaker M although the dialog says F), F001 exc (-> happy), M001 sad,
    F002 xxx (unlabelled), M002 fru (class_not_selected). Quirks on top:
    Session1 `._` file and Categorical/Attribute/Self-evaluation subfolders
    whose lines would add utterances if read; Session2 oth, a garbage label, a
    malformed line, a duplicate id, extra whitespace; Session3 odd dialog ids
    Ses03M_impro05a / Ses03M_impro08b; Session4 a missing and an unreadable
    wav; Session5 Ses05M_script01_1b with V = 5.5.
    """
    root = tmp / "IEMOCAP_full_release"
    for k in range(1, 6):
        d = f"Ses0{k}F_impro01"
        iemocap_dialog(root, k, d, [
            iemocap_block(f"{d}_F000", "neu"),
            iemocap_block(f"{d}_M000", "ang", "2.0000, 4.0000, 3.5000"),
            iemocap_block(f"{d}_F001", "exc", "4.0000, 3.5000, 3.0000"),
            iemocap_block(f"{d}_M001", "sad", "1.5000, 2.0000, 2.0000"),
            iemocap_block(f"{d}_F002", "xxx"),
            iemocap_block(f"{d}_M002", "fru"),
        ])
    # Session1: files the reader must not read.
    label_dir = root / "Session1" / "dialog" / "EmoEvaluation"
    (label_dir / "._Ses01F_impro01.txt").write_bytes(
        b"\x00\x05\x16\x07 Mac OS X resource fork [1 - 2]\tSes01F_impro01_F009\tang\t[1, 2, 3]")
    for sub in ("Categorical", "Attribute", "Self-evaluation"):
        (label_dir / sub).mkdir()
        (label_dir / sub / "Ses01F_impro01_e1.txt").write_text(
            IEMOCAP_HEADER + iemocap_block("Ses01F_impro01_F000", "ang") + iemocap_block("Ses01F_impro01_M009", "sad"))
    write_wav(root / "Session1" / "sentences" / "wav" / "Ses01F_impro01" / "Ses01F_impro01_M009.wav")
    # Session2: other labels, garbage, a malformed line, a duplicate, odd whitespace.
    iemocap_dialog(root, 2, "Ses02F_impro01", [
        iemocap_block("Ses02F_impro01_F003", "oth"),
        iemocap_block("Ses02F_impro01_M003", "zzz"),
        "[1.0000 - 2.0000]\tSes02F_impro01_F009\tneu\t[2.5000, 2.5000]\n\n",
    ])
    iemocap_dialog(root, 2, "Ses02F_impro02", [
        iemocap_block("Ses02F_impro01_F000", "neu", sep="  \t "),
    ])
    # Session3: dialog ids with a suffix letter; the marker letter M differs from speaker F.
    iemocap_dialog(root, 3, "Ses03M_impro05a", [
        iemocap_block("Ses03M_impro05a_F000", "hap", sep=" \t"),
        iemocap_block("Ses03M_impro05a_M000", "neu"),
    ])
    iemocap_dialog(root, 3, "Ses03M_impro08b", [iemocap_block("Ses03M_impro08b_M003", "sad")])
    # Session4: a line whose wav is missing, one whose wav is garbage.
    iemocap_dialog(root, 4, "Ses04F_impro02", [
        iemocap_block("Ses04F_impro02_F000", "neu"),
        iemocap_block("Ses04F_impro02_M000", "sad"),
    ], no_wav=("Ses04F_impro02_F000",), bad_wav=("Ses04F_impro02_M000",))
    # Session5: a script dialog with an extra field, and a valence above the 1-5 scale.
    iemocap_dialog(root, 5, "Ses05M_script01_1b", [
        iemocap_block("Ses05M_script01_1b_F003", "ang", "5.5000, 4.0000, 0.5000"),
        iemocap_block("Ses05M_script01_1b_M010", "neu"),
    ])
    return root


# --- KEMDy19 -----------------------------------------------------------------------------------

KEMDY19_TOP = ["Numb", "Wav", "", "ECG", "", "E4-EDA", "", "E4-TEMP", "", "Segment ID",
               "Total Evaluation", "", "", "Eval01", "", ""]
KEMDY19_SUB = ["", "start", "end", "start", "end", "start", "end", "start", "end", "",
               "Emotion", "Valence", "Arousal", "Emotion", "Valence", "Arousal"]


def kemdy19_row(n: int, segment: str, emotion: str, valence: str = "3", arousal: str = "3",
                bio: bool = True, extra: bool = False) -> list[str]:
    """A data row; `bio=False` leaves the ECG/EDA/TEMP cells empty, as many real rows do."""
    signals = ["1.0", "2.0"] * 3 if bio else [""] * 6
    extra_cells = ["0.1", "0.2"] if extra else []
    return [str(n), "10.5", "12.5", *signals, *extra_cells, segment, emotion, valence, arousal,
            emotion, valence, arousal]


def write_kemdy19_file(path: Path, rows: list[list[str]], bom: bool = False, extra: bool = False) -> None:
    """`extra=True` adds an E4-BVP group before Segment ID: the reader must go by headers."""
    top, sub = list(KEMDY19_TOP), list(KEMDY19_SUB)
    if extra:
        top[9:9] = ["E4-BVP", ""]
        sub[9:9] = ["start", "end"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(top)
        writer.writerow(sub)
        writer.writerows(rows)


def kemdy19_wav(root: Path, segment: str, garbage: bool = False) -> None:
    num = segment[4:6]
    wav = root / "wav" / f"Session{num}" / segment.rsplit("_", 1)[0] / f"{segment}.wav"
    write_garbage(wav) if garbage else write_wav(wav)
    wav.with_suffix(".txt").write_text("안녕하세요.\n", encoding="utf-8")


def kemdy19_session(root: Path, num: str, own: dict[str, list[tuple[str, str]]],
                    order: list[str], bom: bool = False, extra: bool = False,
                    f_rows: list[list[str]] | None = None, m_rows: list[list[str]] | None = None) -> None:
    """Both files list every segment of `order`; each file rates its own actor's segments.

    `own[g]` maps a segment suffix to its label in the g file; the other
    actor's rows carry a label that would change the counts if a reader took it.
    """
    for gender, rows_out in (("F", f_rows), ("M", m_rows)):
        rows = []
        for n, suffix in enumerate(order, start=1):
            seg = f"Sess{num}_{suffix}"
            label = dict(own[gender]).get(suffix)
            if label is None:  # the other actor's segment, cross-listed
                label = "surprise" if gender == "F" else "angry"
            rows.append(kemdy19_row(n, seg, label, bio=n % 2 == 0, extra=extra))
        rows += rows_out or []
        write_kemdy19_file(root / "annotation" / f"Session{num}_{gender}_res.csv", rows, bom=bom, extra=extra)


def build_kemdy19(tmp: Path) -> Path:
    """KEMDy19 with 3 sessions (6 speakers), both files of a session listing all its segments.

    Session01 (F file with a BOM): F001 neutral (empty bio cells), F002 happy,
    impro01_F001 `neutral;sad`; M001 angry, M002 sad, impro01_M001 neutral,
    script02_M001 sad with a garbage wav.
    Session02 (an extra column group before Segment ID): F001 sad, F002
    `Neutral ` (case, space), impro01_F001 angry, impro02_F001 `surprise;sad`;
    M001 happy, M002 fear, impro01_M001 `xyz`.
    Session03: script01_F001 happy; script01_M001 neutral (listed twice in the
    M file), impro02_M001 angry, impro03_M001 neutral without a wav. The F file
    lists impro02_M001 where impro02_F001 is meant (the slip users reported),
    and the M file has a short row and a row with valence `abc`.
    """
    root = tmp / "KEMDy19"
    (root / "ECG").mkdir(parents=True)
    (root / "EDA").mkdir()
    (root / "TEMP").mkdir()
    s1 = ["script01_F001", "script01_M001", "script01_F002", "script01_M002", "impro01_F001", "impro01_M001",
          "script02_M001"]
    kemdy19_session(root, "01", {
        "F": [("script01_F001", "neutral"), ("script01_F002", "happy"), ("impro01_F001", "neutral;sad")],
        "M": [("script01_M001", "angry"), ("script01_M002", "sad"), ("impro01_M001", "neutral"),
              ("script02_M001", "sad")],
    }, s1, bom=True)
    # Session01's F001 row has empty bio cells (odd row numbers): checked by a test.
    s2 = ["script01_F001", "script01_M001", "script01_F002", "script01_M002", "impro01_F001", "impro01_M001",
          "impro02_F001"]
    kemdy19_session(root, "02", {
        "F": [("script01_F001", "sad"), ("script01_F002", "Neutral "), ("impro01_F001", "angry"),
              ("impro02_F001", "surprise;sad")],
        "M": [("script01_M001", "happy"), ("script01_M002", "fear"), ("impro01_M001", "xyz")],
    }, s2, extra=True)
    # Session03 by hand: the two files disagree at row 3 (F says M001 where F001 is meant).
    f_rows = [kemdy19_row(1, "Sess03_script01_F001", "happy"), kemdy19_row(2, "Sess03_script01_M001", "surprise"),
              kemdy19_row(3, "Sess03_impro02_M001", "happy"), kemdy19_row(4, "Sess03_impro02_M001", "surprise")]
    m_rows = [kemdy19_row(1, "Sess03_script01_F001", "angry"), kemdy19_row(2, "Sess03_script01_M001", "neutral"),
              kemdy19_row(3, "Sess03_impro02_F001", "angry"), kemdy19_row(4, "Sess03_impro02_M001", "angry"),
              kemdy19_row(5, "Sess03_script01_M001", "sad"), kemdy19_row(6, "Sess03_impro03_M001", "neutral"),
              ["7", "10.5", "12.5", "Sess03_impro04_M001"],
              kemdy19_row(8, "Sess03_impro04_M002", "sad", valence="abc")]
    write_kemdy19_file(root / "annotation" / "Session03_F_res.csv", f_rows)
    write_kemdy19_file(root / "annotation" / "Session03_M_res.csv", m_rows)
    for seg in [f"Sess01_{s}" for s in s1] + [f"Sess02_{s}" for s in s2] + [
            "Sess03_script01_F001", "Sess03_script01_M001", "Sess03_impro02_F001", "Sess03_impro02_M001",
            "Sess03_impro04_M001", "Sess03_impro04_M002"]:
        kemdy19_wav(root, seg, garbage=seg == "Sess01_script02_M001")
    return root


# --- KEMDy20 -----------------------------------------------------------------------------------

KEMDY20_TOP = ["Numb", "Wav", " ", "Segment ID", "Total Evaluation", " ", " ", "Eval01F", " ", " ", "비고"]
KEMDY20_SUB = [" ", "start", "end", " ", "Emotion", "Valence", "Arousal", "Emotion", "Valence", "Arousal", " "]


def kemdy20_row(n: int, segment: str, emotion: str, valence: str = "3", arousal: str = "3") -> list[str]:
    return [str(n), "1.5", "3.5", segment, emotion, valence, arousal, emotion, valence, arousal, " "]


def build_kemdy20(tmp: Path) -> Path:
    """KEMDy20 with 2 sessions, 4 speakers; Sess02_eval.csv is cp949 (a Korean header cell).

    Sess01: User001F_001 neutral, User002M_001 `disqust`, User001F_002 happy,
    User002M_002 angry, User002M_003 `neutral;sad`, User001F_003 sad without
    a wav, then a row with a garbage segment id.
    Sess02: User003F_001 sad, User004M_001 neutral, User004M_002 happy,
    User003F_002 angry, User003F_001 again (duplicate), script02_User003F_001
    neutral with a garbage wav.
    """
    root = tmp / "KEMDy20_v1_1"
    sessions = {
        "01": [("Sess01_script01_User001F_001", "neutral"), ("Sess01_script01_User002M_001", "disqust"),
               ("Sess01_script01_User001F_002", "happy"), ("Sess01_script01_User002M_002", "angry"),
               ("Sess01_script01_User002M_003", "neutral;sad"), ("Sess01_script01_User001F_003", "sad"),
               ("Sess01_script01_garbage", "neutral")],
        "02": [("Sess02_script01_User003F_001", "sad"), ("Sess02_script01_User004M_001", "neutral"),
               ("Sess02_script01_User004M_002", "happy"), ("Sess02_script01_User003F_002", "angry"),
               ("Sess02_script01_User003F_001", "neutral"), ("Sess02_script02_User003F_001", "neutral")],
    }
    for num, rows in sessions.items():
        path = root / "annotation" / f"Sess{num}_eval.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8" if num == "01" else "cp949") as fh:
            writer = csv.writer(fh)
            writer.writerow(KEMDY20_TOP)
            writer.writerow(KEMDY20_SUB)
            writer.writerows(kemdy20_row(n, seg, emo) for n, (seg, emo) in enumerate(rows, start=1))
        for seg, _ in rows:
            if seg.endswith(("User001F_003", "garbage")):
                continue
            wav = root / "wav" / f"Session{num}" / f"{seg}.wav"
            write_garbage(wav) if seg == "Sess02_script02_User003F_001" else write_wav(wav)
    return root


# --- manifest ----------------------------------------------------------------------------------

MANIFEST_ROWS = [
    ["path", "speaker", "emotion", "valence", "arousal"],
    ["a/s1_01.wav", "spk1", "angry", "2", "4"],
    ["a/s1_02.wav", "spk1", "Happy", "4", "3"],
    ["b/s2_01.wav", "spk2", "neutral", "3", "2"],
    ["b/s2_02.wav", "spk2", "calm", "3", "1"],
    ["c/s3_01.wav", "spk3", "sad", "", ""],
    ["c/s3_02.wav", "spk3", "", "3.5", "2"],
    ["c/s3_03.wav", "spk3", "", "", ""],
    ["../outside.wav", "spk3", "sad", "", ""],
    ["c/missing.wav", "spk3", "sad", "", ""],
    ["c/bad.wav", "spk1", "sad", "", ""],
    ["a/s1_01.wav", "spk1", "angry", "2", "4"],
    ["c/s3_04.wav", "spk3", "angry", "abc", "4"],
    ["d/short.wav", "spk4"],
]


def build_manifest(tmp: Path, rows: list[list[str]] | None = None, bom: bool = True) -> Path:
    """A manifest (with a UTF-8 BOM, as Excel writes it) and its wavs; returns the CSV path.

    Rows as MANIFEST_ROWS: 3 speakers without sessions; a capitalised emotion;
    `calm` outside the classes; a dimensional-only row; a row with no label;
    a path outside the folder (whose file does exist); a missing and a garbage
    wav; a duplicate path; a valence `abc`; a short row.
    """
    folder = tmp / "mycorpus"
    rows = MANIFEST_ROWS if rows is None else rows
    at = [h.lower() for h in rows[0]].index("path")
    for row in rows[1:]:
        rel = row[at]
        if rel == "c/missing.wav":
            continue
        target = folder / rel
        write_garbage(target) if rel == "c/bad.wav" else (None if target.exists() else write_wav(target))
    path = folder / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path
