"""Any other corpus: a CSV manifest (`--root` is the CSV file itself).

Columns (header names are case-insensitive): `path,speaker,emotion`, and
optionally `valence,arousal,session,utt_id,start,end,split`; other columns are
ignored, so the normalized manifest that `cli manifest --out` writes reads
back unchanged.

- `path`: relative to the CSV's folder; a relative path that climbs out of
  it (`../x.wav`) is skipped as path_outside_root. Absolute paths are taken
  as written (the normalized manifest uses them).
- `session` missing or empty: the speaker is its own session (the folds then
  validate on the next speaker in sorted order, see core/folds.py).
- `utt_id` missing or empty: the path relative to the CSV's folder without its
  extension (`Actor_01/03-01-05-01`), stable across runs and unique per file.
- `emotion`: lower-cased; outside the class set -> class_not_selected.
  Empty with valence or arousal given -> kept with emotion None (a
  dimensional-only corpus); empty with neither -> unlabelled.
- valence/arousal are kept on the corpus's own scale (not clipped: the
  reader cannot know it).
- `split`: an official split (train, val/dev, test; lower-cased) for
  `--protocol split` (core/folds.py); empty = none.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

from core.records import CLASSES_4, CorpusError, SkipLog, Utterance
from extract.readers import (ReadCorpus, audio_ok, data_rows, finish, inside, parse_csv, parse_float, read_text, record,
                             start)

REQUIRED: tuple[str, ...] = ("path", "speaker", "emotion")
OPTIONAL: tuple[str, ...] = ("valence", "arousal", "session", "utt_id", "start", "end", "split")


def read(
    root: Path,
    *,
    classes: tuple[str, ...] = CLASSES_4,
    strict: bool = False,
    name: str = "manifest",
) -> ReadCorpus:
    """Read a manifest CSV; `name` is the dataset name recorded (the synthetic corpus sets it)."""
    csv_path = _csv_file(Path(root))
    corpus, log = start(name, csv_path, classes, strict, known=set(classes))
    lines = parse_csv(read_text(csv_path))
    if not lines:
        raise CorpusError(f"{csv_path} is empty: a manifest needs a header row with {', '.join(REQUIRED)}")
    if isinstance(lines[0], str):
        raise CorpusError(f"{csv_path}: the header row is unusable: {lines[0]}")
    header = [h.strip().lower() for h in lines[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise CorpusError(f"{csv_path} has no {', '.join(missing)} column; required: {', '.join(REQUIRED)}")
    twice = [c for c in REQUIRED + OPTIONAL if header.count(c) > 1]
    if twice:
        # Which of the two would be meant? Guessing could silently train on the wrong labels.
        raise CorpusError(f"{csv_path} has the column {twice[0]!r} {header.count(twice[0])} times; keep one")
    col = {c: header.index(c) for c in REQUIRED + OPTIONAL if c in header}
    folder = csv_path.parent
    found: list[Utterance] = []
    for where, cells in data_rows(lines[1:], 2, csv_path.name, log):
        if len(cells) != len(header):
            record(log, where, "malformed_line", f"{len(cells)} cells under a {len(header)}-column header")
            continue
        row = {c: cells[i].strip() for c, i in col.items()}
        utt = _utterance(row, where, folder, classes, name, log)
        if utt is not None:
            found.append(utt)
    return finish(corpus, found, log)


def _csv_file(root: Path) -> Path:
    root = Path(os.path.normpath(root.absolute()))
    if root.is_dir():
        hint = f" (e.g. {root / 'manifest.csv'})" if (root / "manifest.csv").is_file() else ""
        raise CorpusError(f"the manifest root must be the CSV file itself, not the folder {root}{hint}")
    if not root.is_file():
        raise CorpusError(f"manifest {root} does not exist")
    return root


def _utterance(
    row: dict[str, str], where: str, folder: Path, classes: tuple[str, ...], name: str, log: SkipLog
) -> Utterance | None:
    if not row["path"] or not row["speaker"]:
        record(log, where, "malformed_line", "empty path or speaker")
        return None
    numbers = {}
    for column in ("valence", "arousal", "start", "end"):
        try:
            numbers[column] = parse_float(row.get(column, ""))
        except ValueError as err:
            record(log, where, "malformed_line", f"{column}: {err}")
            return None
    valence, arousal, end = numbers["valence"], numbers["arousal"], numbers["end"]
    start = 0.0 if math.isnan(numbers["start"]) else numbers["start"]
    written = Path(row["path"])
    path = folder / written
    if not written.is_absolute() and not inside(folder, path):
        record(log, row.get("utt_id") or where, "path_outside_root", row["path"])
        return None
    utt_id = row.get("utt_id") or _derived_id(path, folder)
    emotion: str | None = row["emotion"].lower() or None
    if emotion is None and math.isnan(valence) and math.isnan(arousal):
        record(log, utt_id, "unlabelled", "no emotion, valence or arousal")
        return None
    if emotion is not None and emotion not in classes:
        record(log, utt_id, "class_not_selected", emotion)
        return None
    if not audio_ok(path, utt_id, log):
        return None
    return Utterance(
        utt_id=utt_id,
        path=os.path.normpath(path),
        speaker=row["speaker"],
        session=row.get("session") or row["speaker"],
        emotion=emotion,
        valence=valence,
        arousal=arousal,
        dataset=name,
        start=start,
        end=end,
        split=row.get("split", "").lower(),
    )


def _derived_id(path: Path, folder: Path) -> str:
    """The path relative to the CSV's folder (or absolute, if elsewhere), '/'-separated, no extension."""
    path = Path(os.path.normpath(path))
    rel = path.relative_to(folder) if inside(folder, path) else path
    return str(PurePosixPath(rel.as_posix()).with_suffix(""))
