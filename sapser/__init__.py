"""sapser: Segmental Average Pooling for speech emotion recognition, as a Python API.

One importable name over the repository's libraries (extract/, cache/, heads/);
the `cli` commands are thin wrappers over these same functions:

    extract(dataset, root, ExtractConfig(...))     cli extract      features + VAD masks into a cache
    FeatureCache(path)                             cli info         read a cache (features, masks, meta)
    train_folds(cache, TrainConfig(...), folds=)   cli train-head   train and test folds into a run folder
    ablate(cache, TrainConfig(...))                cli ablate       GAP, SAP and SR over all folds
    summarize_run(run)                             cli report       UA/WA mean and 95 % CI over folds
    load_predictor(fold_or_run)                    cli predict      .predict_one(path), .predict_array(x, sr)
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
from heads.config import FinetuneSettings
from heads.evaluate.report import load_run
from heads.evaluate.report import summarize as summarize_run
from heads.finetune.run import run_finetune
from heads.predict import Ensemble, Prediction, Predictor, load_predictor
from heads.train.fold_loop import ablate, train_folds
from heads.train.trainer import TrainConfig

try:
    __version__ = version("sapser")
except PackageNotFoundError:  # a source checkout without `pip install -e .`
    __version__ = "unknown"

__all__ = [
    "PROTOCOLS", "Ensemble", "ExtractConfig", "FeatureCache", "FinetuneSettings", "Fold", "Prediction", "Predictor",
    "TrainConfig", "UserError", "ablate", "extract", "load_predictor", "load_run", "plan_folds", "read_corpus", "run_finetune",
    "summarize_run", "train_folds",
]
