"""KEMDy19 (`KEMDy19/`): Korean acted dialogues, one female and one male actor per session.

Labels: `annotation/SessionNN_F_res.csv` and `SessionNN_M_res.csv`. Two
header rows: row 1 names column groups (`Numb, Wav, , ECG, , …, Segment ID,
Total Evaluation, , , Eval01, …`), row 2 the sub-columns (`start, end`,
`Emotion, Valence, Arousal`). Columns are found from these headers, not by
position. Only audio and the Total Evaluation matter: empty ECG/EDA/TEMP
cells never drop a segment.

Each file lists the whole session, but a segment's own ratings are in its
actor's file: F segments come from the F file, M segments from the M file.
A row of the other actor's gender is the normal cross-listing when that
segment is also in its own file (and listed once); otherwise it is an
annotation slip (e.g. `Sess03_impro02_M001` in the F file where `F001` is
meant), skipped as `wrong_speaker_file` so the user sees it.

Audio: `wav/SessionNN/<dialog>/<segment>.wav`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.records import CLASSES_4, CorpusError, SkipLog, Utterance
from extract.readers import (ReadCorpus, data_rows, finish, labelled_utterance, parse_csv, parse_float, read_text,
                             record, resolve_tie, start)

# The emotions KEMDy19/20 raters use; `disqust` is a spelling slip in KEMDy20.
EMOTIONS: frozenset[str] = frozenset({"angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"})
SPELLING: dict[str, str] = {"disqust": "disgust"}

ANNOTATION = re.compile(r"^Session(\d{2})_([FM])_res\.csv$")
SEGMENT = re.compile(r"^Sess(\d{2})_(.+)_([FM])\d+$")  # Sess01_script01_F001


@dataclass(frozen=True)
class Row:
    """One annotation row, before deciding whether it is kept."""

    where: str  # file:line, for reports
    segment: str
    emotion: str
    valence: str
    arousal: str


def read(root: Path, *, classes: tuple[str, ...] = CLASSES_4, strict: bool = False, ties: str = "skip") -> ReadCorpus:
    root = Path(root).absolute()
    corpus, log = start("kemdy19", root, classes, strict, known=set(EMOTIONS), ties=ties)
    pairs = _annotation_pairs(root)
    found: list[Utterance] = []
    for num, files in sorted(pairs.items()):
        rows = {gender: _read_rows(path, log) for gender, path in files.items()}
        for row in _own_rows(num, rows, files, log):
            utt = _utterance(row, root, classes, ties, log, corpus.adjusted)
            if utt is not None:
                found.append(utt)
    return finish(corpus, found, log)


def _annotation_pairs(root: Path) -> dict[str, dict[str, Path]]:
    """Session number -> {"F": path, "M": path}; both files of a session are required."""
    expected = (f"{root} does not look like KEMDy19: "
                "expected annotation/SessionNN_F_res.csv, SessionNN_M_res.csv and wav/")
    ann = root / "annotation"
    if not ann.is_dir() or not (root / "wav").is_dir():
        raise CorpusError(expected)
    pairs: dict[str, dict[str, Path]] = {}
    for path in sorted(ann.iterdir()):
        match = ANNOTATION.match(path.name)
        if match and path.is_file():
            pairs.setdefault(match.group(1), {})[match.group(2)] = path
    if not pairs:
        raise CorpusError(expected)
    for num, files in sorted(pairs.items()):
        if len(files) != 2:
            have = next(iter(files))
            lacking = "M" if have == "F" else "F"
            raise CorpusError(
                f"annotation/Session{num}_{lacking}_res.csv is missing (its {have} file is there): "
                f"a session without both actors would change the folds"
            )
    return pairs


def _columns(header1: list[str], header2: list[str], name: str) -> tuple[int, int, int, int]:
    """(segment, emotion, valence, arousal) column indices from the two header rows."""
    top = [c.strip().lower() for c in header1]
    sub = [c.strip().lower() for c in header2] + [""] * max(0, len(header1) - len(header2))
    if "segment id" not in top or "total evaluation" not in top:
        raise CorpusError(f"{name} has no 'Segment ID' and 'Total Evaluation' columns in its first header row")
    seg = top.index("segment id")
    start = top.index("total evaluation")
    # The Total Evaluation group runs until the next named group in row 1.
    end = next((i for i in range(start + 1, len(top)) if top[i]), len(top))
    group = {sub[i]: i for i in range(start, end)}
    try:
        return seg, group["emotion"], group["valence"], group["arousal"]
    except KeyError:
        raise CorpusError(
            f"{name}: the second header row does not name Emotion, Valence and Arousal under Total Evaluation"
        ) from None


def _read_rows(path: Path, log: SkipLog) -> list[Row]:
    lines = parse_csv(read_text(path))
    if len(lines) < 2:
        raise CorpusError(f"{path.name} has fewer than its two header rows")
    for header in lines[:2]:
        if isinstance(header, str):
            raise CorpusError(f"{path.name}: a header row is unusable: {header}")
    seg, emo, val, aro = _columns(lines[0], lines[1], path.name)
    need = max(seg, emo, val, aro)
    rows = []
    for where, cells in data_rows(lines[2:], 3, path.name, log):  # rows 1-2: the headers
        if len(cells) <= need or not SEGMENT.match(cells[seg].strip()):
            record(log, where, "malformed_line", ",".join(cells)[:80])
            continue
        rows.append(Row(where, cells[seg].strip(), cells[emo], cells[val], cells[aro]))
    return rows


def _own_rows(num: str, rows: dict[str, list[Row]], files: dict[str, Path], log: SkipLog) -> list[Row]:
    """Rows of each actor's own segments; other-gender rows are cross-listings or slips."""
    own = {g: {r.segment for r in rs if _gender(r.segment) == g} for g, rs in rows.items()}
    kept: list[Row] = []
    for gender, file_rows in rows.items():
        seen: Counter[str] = Counter()
        for row in file_rows:
            session = SEGMENT.match(row.segment).group(1)
            if session != num:
                record(log, row.where, "malformed_line", f"{row.segment} is not a segment of Session{num}")
                continue
            other = _gender(row.segment)
            if other == gender:
                kept.append(row)
                continue
            seen[row.segment] += 1
            if row.segment in own[other] and seen[row.segment] == 1:
                continue  # the normal whole-session listing; its ratings come from its own file
            record(
                log,
                row.segment,
                "wrong_speaker_file",
                f"{row.where}: a {other} segment in the {gender} actor's file "
                + ("listed again" if row.segment in own[other] else f"and absent from {files[other].name}"),
            )
    return kept


def _gender(segment: str) -> str:
    return SEGMENT.match(segment).group(3)


def normalize_label(text: str) -> list[str]:
    """The emotions named in a label cell: `neutral;sad` -> ['neutral', 'sad']; spelling fixed."""
    parts = [p.strip().lower() for p in text.split(";") if p.strip()]
    parts = [SPELLING.get(p, p) for p in parts]
    return list(dict.fromkeys(parts))  # `sad;sad` is no tie


def select_emotion(item: str, text: str, classes: tuple[str, ...], ties: str, log: SkipLog) -> str | None:
    """The class of a label cell, or None after recording why it is skipped."""
    labels = normalize_label(text)
    if not labels:
        record(log, item, "unlabelled", "empty emotion cell")
        return None
    strange = [lab for lab in labels if lab not in EMOTIONS]
    if strange:
        record(log, item, "unknown_label", text.strip())
        return None
    emotion = labels[0] if len(labels) == 1 else resolve_tie(labels, classes, ties)
    if emotion is None:
        record(log, item, "tied_label", text.strip())
        return None
    if emotion not in classes:
        record(log, item, "class_not_selected", emotion)
        return None
    return emotion


def _utterance(
    row: Row, root: Path, classes: tuple[str, ...], ties: str, log: SkipLog, adjusted: dict[str, int]
) -> Utterance | None:
    try:
        valence, arousal = parse_float(row.valence), parse_float(row.arousal)
    except ValueError:
        record(log, row.where, "malformed_line", f"{row.segment}: valence/arousal {row.valence!r}, {row.arousal!r}")
        return None
    emotion = select_emotion(row.segment, row.emotion, classes, ties, log)
    if emotion is None:
        return None
    num, _, gender = SEGMENT.match(row.segment).groups()
    session = f"Sess{num}"
    dialog = row.segment.rsplit("_", 1)[0]
    path = root / "wav" / f"Session{num}" / dialog / f"{row.segment}.wav"
    return labelled_utterance(root, path, row.segment, speaker=session + gender, session=session, emotion=emotion,
                              valence=valence, arousal=arousal, dataset="kemdy19", log=log, adjusted=adjusted)
