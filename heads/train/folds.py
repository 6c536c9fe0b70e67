"""A fold of a cache (or of a corpus, for fine-tuning): its train/val/test utterances and their labels.

Only utterances with some label (an emotion, a valence or an arousal) take
part; the fold plan (core/folds.py) is built from every speaker in the cache,
so a speaker whose utterances are all unlabelled yields a clear error for its
folds. Also the cache layers a run reads (`select_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cache.reader import FeatureCache
from core.errors import UserError
from core.folds import Fold, pick, plan
from core.records import class_indices


@dataclass(frozen=True)
class FoldData:
    """The utterances of one fold and their labels.

    `labels` index utt_id: emotion (int, -1 = none), valence, arousal (NaN = none), speaker (str; the
    probe of `--layer-weights probe` holds speakers out).
    """

    fold: Fold
    train: list[str]
    val: list[str]
    test: list[str]
    labels: pd.DataFrame
    classes: tuple[str, ...]

    def split(self, name: str) -> list[str]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def labels_of(meta: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """emotion index (-1 = none), valence, arousal (NaN = none) per utterance, meta's order."""
    return pd.DataFrame(
        {
            "emotion": class_indices(meta["emotion"], classes),
            "valence": meta["valence"].astype(np.float64).to_numpy(),
            "arousal": meta["arousal"].astype(np.float64).to_numpy(),
            "speaker": meta["speaker"].astype(str).to_numpy(),
        },
        index=meta.index,
    )


def usable(labels: pd.DataFrame) -> pd.Series:
    return (labels["emotion"] >= 0) | labels["valence"].notna() | labels["arousal"].notna()


def speaker_sessions(meta: pd.DataFrame) -> dict[str, str]:
    return {str(s): str(x) for s, x in zip(meta["speaker"], meta["session"])}


def fold_count(cache: FeatureCache, protocol: str = "speaker") -> int:
    return len(plan(cache.meta, protocol))


def fold_data(cache: FeatureCache, k: int, protocol: str = "speaker") -> FoldData:
    """Fold k of a cache's utterances (see `fold_split`)."""
    return fold_split(cache.meta, cache.classes, k, protocol, source=f"the cache {cache.path}")


def fold_split(meta: pd.DataFrame, classes: Sequence[str], k: int, protocol: str = "speaker", *,
               source: str) -> FoldData:
    """Fold k's train/val/test utterance ids (sorted), or a UserError saying why it cannot be trained.

    `meta` (index utt_id) has the columns of FeatureCache.meta that folds and labels need
    (speaker, session, split, emotion, valence, arousal); `source` names it in errors.
    Fine-tuning passes its corpus's table, train-head its cache's.
    """
    labels = labels_of(meta, classes)
    if len(labels) == 0:
        raise UserError(f"{source} holds no utterances")
    keep = usable(labels)
    if not keep.any():
        raise UserError(f"{source} has no labels at all (no emotion, valence or arousal on any utterance)")
    fold = pick(plan(meta, protocol), k)
    labels = labels[keep]
    role = fold.roles(meta.loc[labels.index, fold.column])  # (N,) train / val / test / ""
    test, val, train = (sorted(labels.index[role == r]) for r in ("test", "val", "train"))
    for name, ids, who in (("test", test, fold.test), ("validation", val, fold.val)):
        if not ids:
            raise UserError(f"fold {k} cannot be trained: its {name} {fold.column} {who} has no labelled utterances")
    if not train:
        raise UserError(f"fold {k} cannot be trained: its training {fold.column}s have no labelled utterances")
    return FoldData(fold, train, val, test, labels, tuple(classes))


def select_layers(cache: FeatureCache, layer: int | None) -> list[int]:
    """The cache layers to read: all of them for the learnable mix, or the one asked for (-1: the last)."""
    if layer is None:
        return list(cache.layers)
    if layer == -1:
        return [list(cache.layers)[-1]]
    if layer not in cache.layers:
        held = ", ".join(str(x) for x in cache.layers)
        raise UserError(f"the cache holds layers {held}; layer {layer} is not among them (choose --layer from these)")
    return [layer]


def open_cache(path: str | Path | Sequence[str | Path], test: Sequence[str | Path] = ()) -> Any:
    """A cache (a FeatureCache), or for a cross-corpus run several as one (cache/corpus_set.py: the training
    caches `path`, several of them, and the test-only caches `test`)."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    for p in [*paths, *map(Path, test)]:
        if not p.exists():
            raise UserError(f"the cache {p} does not exist (make one with `cli extract`)")
    try:
        if len(paths) == 1 and not test:
            return FeatureCache(paths[0])
        from cache.corpus_set import CorpusSet

        return CorpusSet(paths, test)
    except UserError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"the cache {paths[0]} could not be read ({type(err).__name__}: {err}); "
                        "it may be corrupted") from None


def cross_corpus(cache: Any) -> bool:
    return "corpus_role" in cache.meta.columns


def run_name(path: str | Path | Sequence[str | Path], test: Sequence[str | Path] = ()) -> str:
    """A run's default folder name: the cache's stem, or for cross-corpus `A+B-to-C` (leave-one-out: `A+B+C`)."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    name = "+".join(p.stem for p in paths)
    return name + ("-to-" + "+".join(Path(p).stem for p in test) if test else "")
