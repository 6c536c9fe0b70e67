"""The utterance record every corpus reader yields, and the bookkeeping of what it skipped.

Readers are strict about what they understand and loud about what they skip:
a bad item never crashes a read, it becomes a `Skip` with a reason from
`SKIP_REASONS` (or `strict=True` turns the first one into `CorpusError`).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

import numpy as np

from core.errors import UserError

# The paper's four classes, in the order used for class indices everywhere.
CLASSES_4: tuple[str, ...] = ("angry", "happy", "neutral", "sad")


def parse_classes(classes: str | tuple[str, ...]) -> tuple[str, ...]:
    """`--classes "Angry, happy"` -> ("angry", "happy"); the readers check the names."""
    if not isinstance(classes, str):
        return tuple(classes)
    return tuple(c.strip().lower() for c in classes.split(",") if c.strip())

# Every reason a reader or the extractor may give for skipping an item.
SKIP_REASONS: dict[str, str] = {
    "missing_audio": "the audio file named by the annotation does not exist",
    "unreadable_audio": "the audio file could not be decoded",
    "empty_audio": "the audio has no samples",
    "too_short": "fewer than 400 samples at 16 kHz (no feature frame)",
    "non_finite_audio": "the audio contains NaN or inf",
    "silent_audio": "every sample is zero",
    "unlabelled": "the annotation gives no usable emotion (e.g. xxx)",
    "class_not_selected": "the emotion is outside the chosen class set",
    "tied_label": "raters tied between emotions (see --ties)",
    "unknown_label": "the emotion label is not one the reader knows",
    "malformed_line": "an annotation line or row could not be parsed",
    "wrong_speaker_file": "a segment listed in the other actor's annotation file",
    "duplicate_id": "an utterance id seen before",
    "path_outside_root": "the audio path points outside the corpus root",
    "model_error": "the feature model failed on this utterance",
    "not_in_cache": "the feature cache whose VAD masks fine-tuning reuses (--cache) does not hold it",
}


def class_indices(emotions: Iterable[str | None], classes: Iterable[str]) -> np.ndarray:
    """(N,) int64 index of each emotion in `classes` (the order of class indices everywhere);
    -1 for an utterance without one (None, "", NaN) or outside the class set."""
    position = {c: i for i, c in enumerate(classes)}
    return np.array([position.get(e, -1) if isinstance(e, str) else -1 for e in emotions], dtype=np.int64)


class CorpusError(UserError):
    """A corpus root that cannot be read at all, or the first bad item under strict=True.

    The message is one sentence meant for the user, never a traceback.
    """


@dataclass(frozen=True)
class Utterance:
    """One labelled utterance, the same for every corpus.

    `emotion` is a class name from the chosen class set, or None for a corpus
    with only dimensional labels. `valence`/`arousal` are on the corpus's own
    scale (1-5 for IEMOCAP and KEMDy) or NaN when absent.
    """

    utt_id: str
    path: str  # absolute path of the audio file
    speaker: str
    session: str  # speakers of one session validate each other's folds
    emotion: str | None
    valence: float = math.nan
    arousal: float = math.nan
    dataset: str = ""
    start: float = 0.0  # seconds into the file where the utterance starts
    end: float = math.nan  # seconds; NaN = to the end of the file
    split: str = ""  # official split (train/val/test) from a manifest's split column; "" = none


# Skip items and details are stored in the cache as HDF5 strings, which cannot hold a NUL,
# and a detail quoting a multi-megabyte cell would bloat every skip list that names it.
MAX_DETAIL = 300


def storable(text: str) -> str:
    """`text` with NUL bytes written as the two characters `\\0` (HDF5 strings end at a NUL)."""
    return text.replace("\x00", "\\0")


def unstorable(utt: Utterance) -> str | None:
    """The first field of `utt` the cache cannot store as a string (it holds a NUL), or None."""
    for name in ("utt_id", "path", "speaker", "session", "emotion", "dataset"):
        value = getattr(utt, name)
        if isinstance(value, str) and "\x00" in value:
            return name
    return None


@dataclass(frozen=True)
class Skip:
    """One item a reader or extractor did not take, and why.

    `item` and `detail` are made storable (a NUL becomes `\\0`; a detail is cut at
    MAX_DETAIL characters), so a bad id can always be recorded as skipped.
    """

    item: str  # utterance id, or file/line when no id could be read
    reason: str  # a key of SKIP_REASONS
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}")
        detail = storable(str(self.detail))
        if len(detail) > MAX_DETAIL:
            detail = detail[:MAX_DETAIL] + f"... ({len(detail):,} characters)"
        object.__setattr__(self, "item", storable(str(self.item)))
        object.__setattr__(self, "detail", detail)


@dataclass
class Corpus:
    """What a reader returns: the kept utterances (sorted by id) and the skips."""

    name: str
    root: str
    classes: tuple[str, ...]
    utterances: list[Utterance] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(u.emotion for u in self.utterances if u.emotion is not None)
        return {c: counts.get(c, 0) for c in self.classes}

    def speaker_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(u.speaker for u in self.utterances).items()))

    def skip_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))

    def speaker_sessions(self) -> dict[str, str]:
        return {u.speaker: u.session for u in self.utterances}


class SkipLog:
    """Collects skips for a reader; raises at the first one when strict."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.items: list[Skip] = []

    def add(self, item: str, reason: str, detail: str = "") -> None:
        skip = Skip(item, reason, detail)
        if self.strict:
            tail = f": {skip.detail}" if skip.detail else ""
            raise CorpusError(f"{skip.item}: {SKIP_REASONS[reason]}{tail} (strict mode)")
        self.items.append(skip)


def dedupe(utterances: Iterable[Utterance], log: SkipLog) -> list[Utterance]:
    """Keep the first utterance of each id (sorted by id); later ones are skipped."""
    seen: dict[str, Utterance] = {}
    for utt in utterances:
        if utt.utt_id in seen:
            log.add(utt.utt_id, "duplicate_id", f"also {seen[utt.utt_id].path}")
        else:
            seen[utt.utt_id] = utt
    return [seen[k] for k in sorted(seen)]


MANIFEST_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Utterance))


def write_manifest(corpus: Corpus, out: str | Path) -> tuple[Path, Path]:
    """Write the normalized manifest and its companion `skipped.csv` beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for utt in corpus.utterances:
            writer.writerow(asdict(utt))
    skipped = out.with_name("skipped.csv")
    with skipped.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item", "reason", "detail"])
        for s in corpus.skipped:
            writer.writerow([s.item, s.reason, s.detail])
    return out, skipped
