"""What every corpus reader shares: label selection, V/A clipping, path and audio checks.

Two kinds of skips exist. Bad input (a missing or unreadable wav, a garbled
line, an unknown label, a duplicate id) is an error under `strict=True`.
Label *selection* (no agreed label such as IEMOCAP's `xxx`, an emotion outside
the chosen classes, a tie under `ties="skip"`) is the documented protocol,
not bad input: it is counted but never raises, or `--strict` could not be used
on IEMOCAP at all (a quarter of its lines are `xxx`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from extract.records import Corpus, CorpusError, Skip, SkipLog

# Skips that follow from the chosen protocol rather than from broken input.
SELECTION_REASONS: frozenset[str] = frozenset({"unlabelled", "class_not_selected", "tied_label"})

# How a tied label such as `neutral;sad` becomes a class (KEMDy19/20 `--ties`).
#   skip:     drop the utterance (counted as tied_label); the default, since a
#             tie means the raters did not agree.
#   first:    take the first listed emotion.
#   selected: keep it when exactly one of the tied emotions is in the class set.
TIES: tuple[str, ...] = ("skip", "first", "selected")

# IEMOCAP and KEMDy rate valence/arousal on 1-5.
SCALE_1_5: tuple[float, float] = (1.0, 5.0)


@dataclass
class ReadCorpus(Corpus):
    """A Corpus plus counts of values a reader changed instead of skipping.

    `adjusted` holds e.g. {"valence_clipped": 1}: labels moved into their
    nominal scale. They are kept (the emotion is fine), but the user sees how many.
    """

    adjusted: dict[str, int] = field(default_factory=dict)


def record(log: SkipLog, item: str, reason: str, detail: str = "") -> None:
    """Add a skip; only bad input (not label selection) raises under strict."""
    if reason in SELECTION_REASONS:
        log.items.append(Skip(item, reason, detail))
    else:
        log.add(item, reason, detail)


def check_classes(dataset: str, classes: tuple[str, ...], known: set[str]) -> None:
    """A class the corpus cannot have would leave a class with no examples: refuse it."""
    if not classes:
        raise CorpusError("the class set is empty; name at least one emotion")
    if len(set(classes)) != len(classes):
        raise CorpusError(f"the class set {','.join(classes)} names a class twice")
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise CorpusError(
            f"{dataset} has no emotion {', '.join(unknown)}; its emotions are: {', '.join(sorted(known))}"
        )


def check_ties(ties: str) -> str:
    if ties not in TIES:
        raise CorpusError(f"unknown ties rule {ties!r}; choose one of: {', '.join(TIES)}")
    return ties


def resolve_tie(labels: list[str], classes: tuple[str, ...], ties: str) -> str | None:
    """The class a tie (two or more distinct emotions) becomes, or None to skip it."""
    if ties == "first":
        return labels[0]
    if ties == "selected":
        chosen = [lab for lab in labels if lab in classes]
        return chosen[0] if len(chosen) == 1 else None
    return None


def parse_float(text: str) -> float:
    """A rating cell: empty means absent (NaN); anything else must be a number."""
    text = text.strip()
    if not text or text.lower() == "nan":
        return math.nan
    return float(text)  # ValueError -> the caller reports a malformed line


def clip_scale(value: float, name: str, adjusted: dict[str, int], scale=SCALE_1_5) -> float:
    """Clip a rating into its nominal scale and count it (a few IEMOCAP lines have V = 5.5)."""
    if math.isnan(value):
        return value
    clipped = min(max(value, scale[0]), scale[1])
    if clipped != value:
        adjusted[f"{name}_clipped"] = adjusted.get(f"{name}_clipped", 0) + 1
    return clipped


def inside(root: Path, path: Path) -> bool:
    """Whether `path` lies under `root`, judged on the written path (`..` folded away).

    Symlinks are not followed: a corpus whose wav/ folder is a link to another
    disk is common and fine; what this rejects is a path that *names* a place
    outside the root.
    """
    root_n = os.path.normpath(os.path.abspath(root))
    path_n = os.path.normpath(os.path.abspath(path))
    return os.path.commonpath([root_n, path_n]) == root_n


def audio_ok(path: Path, item: str, log: SkipLog) -> bool:
    """Cheap audio check: the file exists and soundfile can read its header (no decoding)."""
    if not path.is_file():
        record(log, item, "missing_audio", str(path))
        return False
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError) as err:
        record(log, item, "unreadable_audio", f"{path}: {str(err).splitlines()[0]}")
        return False
    if info.frames == 0:
        record(log, item, "empty_audio", str(path))
        return False
    return True


def read_text(path: Path) -> str:
    """Annotation text: UTF-8 (a BOM is dropped), else cp949 (KEMDy20's Korean Windows files)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp949")
    except UnicodeDecodeError:
        raise CorpusError(f"{path} is neither UTF-8 nor cp949 text") from None
