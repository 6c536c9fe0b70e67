"""RUN/utterances.csv: which utterances a run's folds drew from, with the columns folds group by.

With config.json's fold plan it tells which fold trained on which file: predict
warns when asked about one (heads/predict.py, `TrainingSets`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from core.files import replacing

UTTERANCES_FILE = "utterances.csv"
UTTERANCE_COLUMNS = ("utt_id", "path", "speaker", "session", "split")


def write_run_utterances(run: str | Path, meta: pd.DataFrame) -> Path:
    """RUN/utterances.csv: every utterance the run's folds draw from, with the columns folds group by.

    With config.json's fold plan it tells which fold trained on which file
    (predict warns when asked about one); meta is indexed by utt_id.
    """
    path = Path(run) / UTTERANCES_FILE
    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(UTTERANCE_COLUMNS)
        split = meta["split"] if "split" in meta.columns else pd.Series("", index=meta.index)
        for utt_id, p, spk, ses, spl in zip(meta.index, meta["path"], meta["speaker"], meta["session"], split):
            writer.writerow([utt_id, p, spk, ses, spl or ""])
    return path


def read_run_utterances(run: str | Path) -> pd.DataFrame | None:
    """RUN/utterances.csv indexed by utt_id, or None for runs made before it was written."""
    path = Path(run) / UTTERANCES_FILE
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype=str, keep_default_na=False).set_index("utt_id")
