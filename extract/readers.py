"""What every corpus reader shares: label selection, V/A clipping, path and audio checks.

Two kinds of skips exist. Bad input (a missing or unreadable wav, a garbled
line, an unknown label, a duplicate id) is an error under `strict=True`.
Label *selection* (no agreed label such as IEMOCAP's `xxx`, an emotion outside
the chosen classes, a tie under `ties="skip"`) is the documented protocol,
not bad input: it is counted but never raises, or `--strict` could not be used
on IEMOCAP at all (a quarter of its lines are `xxx`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from core.records import Corpus, CorpusError, Skip, SkipLog, Utterance, dedupe

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


# No rating scale or time in seconds comes near this; beyond it a value is a typo or garbage
# (1e300 would overflow the squares of the targets' standard deviation to inf).
MAX_MAGNITUDE = 1e6


def parse_float(text: str) -> float:
    """A rating or time cell: empty or `nan` means absent (NaN); anything else must be a
    finite number of magnitude <= MAX_MAGNITUDE (ValueError otherwise: the caller reports
    a malformed line, so `inf` or `1e300` never reaches training)."""
    text = text.strip()
    if not text or text.lower() == "nan":
        return math.nan
    value = float(text)
    if math.isnan(value):
        return math.nan
    if not abs(value) <= MAX_MAGNITUDE:
        raise ValueError(f"{text[:40]!r} is not a finite number within +-{MAX_MAGNITUDE:g}")
    return value


# Ids, names and paths are far shorter; HDF5 link names (utterance keys) have size limits,
# and a cell this long is a broken file (an unclosed quote swallowing the rest), not data.
MAX_CELL = 4096


def parse_csv(text: str) -> list[list[str] | str]:
    """Every CSV row of `text`: its cells, or a string saying why the row is unusable.

    A row the csv module cannot parse (e.g. a field over its size limit), a row with a
    NUL byte (the cache cannot store one) or a cell over MAX_CELL characters becomes that
    string, so readers skip the row as malformed_line and go on with the next one.
    """
    rows: list[list[str] | str] = []
    reader = csv.reader(io.StringIO(text))
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:  # the reader resumes at the next line
            rows.append(f"the CSV row cannot be parsed ({err})")
            continue
        rows.append(_cell_problem(cells) or cells)


def _cell_problem(cells: list[str]) -> str | None:
    for i, cell in enumerate(cells):
        if "\x00" in cell:
            return f"cell {i + 1} holds a NUL byte"
        if len(cell) > MAX_CELL:
            return f"cell {i + 1} holds {len(cell):,} characters (at most {MAX_CELL:,})"
    return None


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
    if "\x00" in str(path):  # os calls raise ValueError on it; no file can have such a name
        record(log, item, "malformed_line", "a NUL byte in the audio path")
        return False
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


def labelled_utterance(root: Path, path: Path, utt_id: str, *, speaker: str, session: str, emotion: str,
                       valence: float, arousal: float, dataset: str, log: SkipLog,
                       adjusted: dict[str, int]) -> Utterance | None:
    """A named corpus's utterance: its audio under `root` and readable (else a skip, None), and its
    valence/arousal clipped into 1-5 (counted in `adjusted`)."""
    if not inside(root, path):
        record(log, utt_id, "path_outside_root", str(path))
        return None
    if not audio_ok(path, utt_id, log):
        return None
    return Utterance(utt_id=utt_id, path=str(path), speaker=speaker, session=session, emotion=emotion,
                     valence=clip_scale(valence, "valence", adjusted), arousal=clip_scale(arousal, "arousal", adjusted),
                     dataset=dataset)


def start(name: str, root: Path, classes: tuple[str, ...], strict: bool, *, known: set[str],
          ties: str | None = None) -> tuple[ReadCorpus, SkipLog]:
    """An empty corpus of `name` at `root` and the skip log its reader fills, once the class set
    (against the emotions the corpus `known`s) and the ties rule are checked."""
    check_classes(name, classes, known)
    if ties is not None:
        check_ties(ties)
    return ReadCorpus(name=name, root=str(root), classes=classes), SkipLog(strict)


def data_rows(lines: list[list[str] | str], first_line: int, file: str, log: SkipLog) -> Iterator[tuple[str, list[str]]]:
    """(`file:line`, cells) of each CSV data row, numbered from `first_line`; a row that could not be
    parsed (a string from parse_csv) is a malformed_line skip, a blank one is passed over."""
    for lineno, cells in enumerate(lines, start=first_line):
        where = f"{file}:{lineno}"
        if isinstance(cells, str):
            record(log, where, "malformed_line", cells)
        elif any(c.strip() for c in cells):
            yield where, cells


def finish(corpus: ReadCorpus, found: list[Utterance], log: SkipLog) -> ReadCorpus:
    """The corpus with its utterances (the first of each id, sorted by id) and every skip."""
    corpus.utterances = dedupe(found, log)
    corpus.skipped = log.items
    return corpus


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
