"""IEMOCAP (`IEMOCAP_full_release/`): labels from the EmoEvaluation summary lines.

Layout: `Session{1..5}/dialog/EmoEvaluation/<dialog>.txt` (top-level files
only; the `Categorical/`, `Attribute/`, `Self-evaluation/` subfolders hold
per-annotator files) and `Session{k}/sentences/wav/<dialog>/<utt>.wav`.
A summary line is `[start - end]<TAB>utt_id<TAB>emo<TAB>[V, A, D]`; the
annotator lines under it are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

from core.records import CLASSES_4, CorpusError, SkipLog, Utterance
from extract.readers import ReadCorpus, finish, labelled_utterance, read_text, record, start

SESSIONS = tuple(f"Session{k}" for k in range(1, 6))

# Annotation code -> emotion name (names shared with KEMDy where they overlap).
LABELS: dict[str, str] = {
    "ang": "angry",
    "hap": "happy",
    "exc": "excited",
    "neu": "neutral",
    "sad": "sad",
    "fru": "frustrated",
    "sur": "surprise",
    "fea": "fear",
    "dis": "disgust",
    "oth": "other",
}
NO_AGREEMENT = "xxx"  # annotators did not agree on a category

# `[6.2901 - 8.2357]  Ses01F_impro01_F000  neu  [2.5000, 2.5000, 2.5000]`, any whitespace.
SUMMARY = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\S+)\s+\[([^\]]*)\]\s*$")
# Session from the first field; the speaker's gender from the LAST field
# (`Ses01F_impro01_M003` -> Ses01M). The letter after `Ses01` names who wore
# the markers, not who speaks; dialog names vary (`Ses05M_script01_1b`).
UTT_ID = re.compile(r"^(Ses0[1-5])[FM]_.+_([FM])\d+$")


def read(root: Path, *, classes: tuple[str, ...] = CLASSES_4, strict: bool = False, merge_exc: bool = True) -> ReadCorpus:
    """Read IEMOCAP; `merge_exc` folds excited into happy, the usual 4-class protocol."""
    root = Path(root).absolute()
    known = set(LABELS.values()) - ({"excited"} if merge_exc else set())
    corpus, log = start("iemocap", root, classes, strict, known=known)
    label_dirs = _label_dirs(root)
    found: list[Utterance] = []
    for session_dir, label_dir in label_dirs:
        for txt in sorted(label_dir.glob("*.txt")):
            if txt.name.startswith("._") or not txt.is_file():
                continue  # macOS resource forks ship in the release
            for lineno, line in enumerate(read_text(txt).splitlines(), start=1):
                if not line.lstrip().startswith("["):
                    continue  # header, blank, or annotator line
                utt = _parse_line(line, f"{txt.name}:{lineno}", session_dir, root, classes,
                                  merge_exc, log, corpus.adjusted)
                if utt is not None:
                    found.append(utt)
    return finish(corpus, found, log)


def _label_dirs(root: Path) -> list[tuple[Path, Path]]:
    dirs = [(root / s, root / s / "dialog" / "EmoEvaluation") for s in SESSIONS]
    missing = [f"{d.relative_to(root)}" for _, d in dirs if not d.is_dir()]
    if len(missing) == len(dirs):
        hint = ""
        if (root / "IEMOCAP_full_release").is_dir():
            hint = f" (did you mean {root / 'IEMOCAP_full_release'}?)"
        raise CorpusError(
            f"{root} does not look like IEMOCAP_full_release: expected "
            f"Session1..Session5/dialog/EmoEvaluation{hint}"
        )
    if missing:
        # A partial copy would silently change the speakers and so the folds.
        raise CorpusError(f"{root} is an incomplete IEMOCAP_full_release: {', '.join(missing)} is missing")
    return dirs


def _parse_line(
    line: str,
    where: str,
    session_dir: Path,
    root: Path,
    classes: tuple[str, ...],
    merge_exc: bool,
    log: SkipLog,
    adjusted: dict[str, int],
) -> Utterance | None:
    match = SUMMARY.match(line.strip())
    if match is None:
        record(log, where, "malformed_line", line.strip()[:80])
        return None
    _, _, utt_id, code, vad_text = match.groups()
    ids = UTT_ID.match(utt_id)
    try:
        valence, arousal, _dominance = (float(v) for v in vad_text.split(","))
    except ValueError:
        ids = None
    if ids is None or ids.group(1) != f"Ses0{session_dir.name[-1]}":
        # An id of another session would point at a wav folder that is not its own.
        record(log, where, "malformed_line", line.strip()[:80])
        return None
    emotion = _emotion(utt_id, code, classes, merge_exc, log)
    if emotion is None:
        return None
    session, gender = ids.groups()
    dialog = utt_id.rsplit("_", 1)[0]
    path = session_dir / "sentences" / "wav" / dialog / f"{utt_id}.wav"
    return labelled_utterance(root, path, utt_id, speaker=session + gender, session=session, emotion=emotion,
                              valence=valence, arousal=arousal, dataset="iemocap", log=log, adjusted=adjusted)


def _emotion(utt_id: str, code: str, classes: tuple[str, ...], merge_exc: bool, log: SkipLog) -> str | None:
    code = code.lower()
    if code == NO_AGREEMENT:
        record(log, utt_id, "unlabelled", code)
        return None
    if code not in LABELS:
        record(log, utt_id, "unknown_label", code)
        return None
    emotion = LABELS[code]
    if merge_exc and emotion == "excited":
        emotion = "happy"
    if emotion not in classes:
        record(log, utt_id, "class_not_selected", emotion)
        return None
    return emotion
