"""KEMDy20 (`KEMDy20_v1_1/`): Korean free conversation, 40 sessions, 80 speakers.

Labels: `annotation/SessNN_eval.csv`, one per session, columns by position:
Numb, wav start, wav end, Segment ID, emotion, valence, arousal, then rater
triplets. Row 1 is the header (blank cells are a single space), row 2 a
second header that is skipped. Files may be UTF-8 or cp949. `disqust` means
disgust. Ties (`neutral;sad`) follow `ties` as in KEMDy19.

Audio is flat per session: `wav/SessionNN/<segment>.wav`; the speaker is the
`UserNNN[FM]` field of the segment id (`Sess01_script01_User002M_001`).
"""

from __future__ import annotations

import re
from pathlib import Path

from core.records import CLASSES_4, CorpusError, SkipLog, Utterance
from extract.kemdy19 import EMOTIONS, select_emotion
from extract.readers import (ReadCorpus, data_rows, finish, labelled_utterance, parse_csv, parse_float, read_text,
                             record, start)

ANNOTATION = re.compile(r"^Sess(\d{2})_eval\.csv$")
SEGMENT = re.compile(r"^Sess(\d{2})_[^_]+_(User\d+[FM])_\d+$")
SEG, EMOTION, VALENCE, AROUSAL = 3, 4, 5, 6  # column positions


def read(root: Path, *, classes: tuple[str, ...] = CLASSES_4, strict: bool = False, ties: str = "skip") -> ReadCorpus:
    root = Path(root).absolute()
    corpus, log = start("kemdy20", root, classes, strict, known=set(EMOTIONS), ties=ties)
    files = _annotation_files(root)
    found: list[Utterance] = []
    for num, path in sorted(files.items()):
        lines = parse_csv(read_text(path))
        # Row 1 is the header, row 2 its sub-header: data starts on row 3.
        for where, cells in data_rows(lines[2:], 3, path.name, log):
            utt = _utterance(num, cells, where, root, classes, ties, log, corpus.adjusted)
            if utt is not None:
                found.append(utt)
    return finish(corpus, found, log)


def _annotation_files(root: Path) -> dict[str, Path]:
    ann = root / "annotation"
    files = {}
    if ann.is_dir() and (root / "wav").is_dir():
        for path in sorted(ann.iterdir()):
            match = ANNOTATION.match(path.name)
            if match and path.is_file():
                files[match.group(1)] = path
    if not files:
        raise CorpusError(f"{root} does not look like KEMDy20: expected annotation/SessNN_eval.csv and wav/SessionNN/")
    return files


def _utterance(
    num: str,
    cells: list[str],
    where: str,
    root: Path,
    classes: tuple[str, ...],
    ties: str,
    log: SkipLog,
    adjusted: dict[str, int],
) -> Utterance | None:
    segment = cells[SEG].strip() if len(cells) > AROUSAL else ""
    match = SEGMENT.match(segment)
    if match is None or match.group(1) != num:
        record(log, where, "malformed_line", ",".join(cells)[:80])
        return None
    try:
        valence, arousal = parse_float(cells[VALENCE]), parse_float(cells[AROUSAL])
    except ValueError:
        record(log, where, "malformed_line", f"{segment}: valence/arousal {cells[VALENCE]!r}, {cells[AROUSAL]!r}")
        return None
    emotion = select_emotion(segment, cells[EMOTION], classes, ties, log)
    if emotion is None:
        return None
    path = root / "wav" / f"Session{num}" / f"{segment}.wav"
    return labelled_utterance(root, path, segment, speaker=match.group(2), session=f"Sess{num}", emotion=emotion,
                              valence=valence, arousal=arousal, dataset="kemdy20", log=log, adjusted=adjusted)
