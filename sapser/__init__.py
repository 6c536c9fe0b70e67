"""sapser: Segmental Average Pooling for speech emotion recognition, as a Python API.

One importable name over the repository's libraries (extract/, cache/, heads/);
the `cli` commands are thin wrappers over these same functions:

    extract(dataset, root, ExtractConfig(...))     cli extract      features + VAD masks into a cache
    FeatureCache(path)                             cli info         read a cache (features, masks, meta)
    train_folds(cache, TrainConfig(...), folds=)   cli train-head   train and test folds into a run folder
    ablate(cache, TrainConfig(...))                cli ablate       GAP, SAP and SR over all folds
    summarize_run(run)                             cli report       UA/WA mean and 95 % CI over folds
    load_predictor(fold_or_run)                    cli predict      .predict_one(path), .predict_array(x, sr)
      .predict_segments(path, SegmentRule(...))    cli predict --segments   a long recording, segment by segment
    write_segments(predictor, path, out)           cli predict --segments   ... into segments.csv + timeline.png
    scan_layers(cache, TrainConfig(...))           cli layers       UA per layer: a linear probe on every fold
    run_finetune(dataset, root, config, settings)  cli finetune     end-to-end fine-tuning
    read_corpus(dataset, root) + plan_folds(...)   cli manifest     a corpus and its fold plan

`extract` takes the cache path as `out=`, and ExtractConfig's fields by name as well:
`extract(dataset, root, out=..., model=...)`.
Everything a user can get wrong raises `UserError` (one-sentence message).
In a script, call `extract` (which starts worker processes) under
`if __name__ == "__main__":`, or pass `workers=0`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from cache.reader import FeatureCache
from core.errors import UserError
from core.folds import PROTOCOLS, Fold
from core.folds import plan as plan_folds
from extract.config import ExtractConfig
from extract.corpora import read_corpus
from extract.pipeline import run_extract as extract
from extract.segments import SegmentRule
from heads.config import FinetuneSettings
from heads.evaluate.report import load_run
from heads.evaluate.report import summarize as summarize_run
from heads.finetune.run import run_finetune
from heads.predict import (
    Ensemble,
    Prediction,
    Predictor,
    SegmentPrediction,
    load_predictor,
    write_segments,
)
from heads.train.fold_loop import ablate, train_folds
from heads.train.layer_scan import scan_layers
from heads.train.trainer import TrainConfig

try:
    __version__ = version("sapser")
except PackageNotFoundError:  # a source checkout without `pip install -e .`
    __version__ = "unknown"

__all__ = [
    "PROTOCOLS", "Ensemble", "ExtractConfig", "FeatureCache", "FinetuneSettings", "Fold", "Prediction", "Predictor",
    "SegmentPrediction", "SegmentRule", "TrainConfig", "UserError", "ablate", "extract", "load_predictor", "load_run",
    "plan_folds", "read_corpus", "run_finetune", "scan_layers", "summarize_run", "train_folds", "write_segments",
]
