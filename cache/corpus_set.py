"""Several caches read as one, for cross-corpus runs: train on some corpora, test on another.

A `CorpusSet` has a FeatureCache's reading interface (meta, features, vad,
classes, layers, ...), so the fold plans, the head trainer and the baseline
read it as they read one cache. Utterances are named `CORPUS:utt_id` and
speakers and sessions `CORPUS:name` (two corpora may both have a speaker
"M01"); `meta` gains `corpus` (the corpus's name: its cache file's stem),
`corpus_role` (train, or test for `--test-cache` corpora) and `corpus_group`
(core/folds.py `cross_corpus_groups`: the fold plan's groups).

The caches must hold the same features: the same model, layers, hidden size
and storage dtype (refused naming what differs), and the same set of emotion
classes (matched by name; the first cache's order is the run's). Valence and
arousal are scored only where a test corpus has them; a head trained on
corpora without them predicts none (heads/runfolder.py `trained_outputs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cache.format import CacheError
from cache.reader import FeatureCache
from core.folds import cross_corpus_groups

SEPARATOR = ":"
SAME = ("model", "layers", "dtype")  # fingerprint keys the caches must share


class CorpusSet:
    """Training caches and test-only caches as one read-only cache (see the module docstring)."""

    def __init__(self, train: Sequence[str | Path], test: Sequence[str | Path] = ()) -> None:
        paths = [(Path(p), "train") for p in train] + [(Path(p), "test") for p in test]
        names = [p.stem for p, _ in paths]
        if len(set(names)) < len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise CacheError(f"two caches share the name {twice[0]!r} (their file stem); rename one of them")
        self.caches: dict[str, FeatureCache] = {}
        try:
            for (p, _), name in zip(paths, names):
                self.caches[name] = FeatureCache(p)
        except Exception:
            self.close()
            raise
        self.roles = {name: role for (_, role), name in zip(paths, names)}
        first_name, first = next(iter(self.caches.items()))
        for name, cache in self.caches.items():
            for key in SAME:
                if cache.fingerprint.get(key) != first.fingerprint.get(key):
                    raise CacheError(f"the caches {first_name} and {name} hold different features ({key} "
                                     f"{first.fingerprint.get(key)!r} vs {cache.fingerprint.get(key)!r}): "
                                     "cross-corpus runs need the same model and layers")
            if cache.hidden_size != first.hidden_size:
                raise CacheError(f"the caches {first_name} and {name} differ in hidden size "
                                 f"({first.hidden_size} vs {cache.hidden_size})")
            if set(cache.classes) != set(first.classes):
                raise CacheError(f"the caches {first_name} and {name} have different emotion classes "
                                 f"({', '.join(first.classes)} vs {', '.join(cache.classes)}); extract both with "
                                 "the same --classes")
        self.path = first.path
        self.paths = [c.path for c in self.caches.values()]
        self.classes: tuple[str, ...] = first.classes
        self.layers: tuple[int, ...] = first.layers
        self.hidden_size = first.hidden_size
        self.dtype = first.dtype
        self.fingerprint: dict[str, Any] = {
            **first.fingerprint,
            "corpus": [c.fingerprint.get("corpus") for c in self.caches.values()],
            "cross_corpus": {"train": [n for n in self.caches if self.roles[n] == "train"],
                             "test": [n for n in self.caches if self.roles[n] == "test"]},
        }
        tables = []
        for name, cache in self.caches.items():
            m = cache.meta.copy()
            m.index = [f"{name}{SEPARATOR}{u}" for u in m.index]
            for column in ("speaker", "session"):
                m[column] = [f"{name}{SEPARATOR}{x}" for x in m[column].astype(str)]
            m["corpus"] = name
            m["corpus_role"] = self.roles[name]
            tables.append(m)
        meta = pd.concat(tables)
        meta.index.name = "utt_id"
        meta["corpus_group"] = cross_corpus_groups(meta)
        self.meta: pd.DataFrame = meta
        self.skipped = pd.concat([c.skipped for c in self.caches.values()], ignore_index=True)

    def _split(self, utt_id: str) -> tuple[FeatureCache, str]:
        name, _, utt = utt_id.partition(SEPARATOR)
        try:
            return self.caches[name], utt
        except KeyError:
            raise CacheError(f"utterance {utt_id!r} is not in any of the caches {', '.join(self.caches)}") from None

    def features(self, utt_id: str, layers: Sequence[int] | None = None) -> np.ndarray:
        cache, utt = self._split(utt_id)
        return cache.features(utt, layers)

    def vad(self, utt_id: str, mode: int) -> np.ndarray:
        cache, utt = self._split(utt_id)
        return cache.vad(utt, mode)

    def positions(self, layers: Sequence[int] | None) -> list[int]:
        return next(iter(self.caches.values())).positions(layers)

    def preload(self, layers: Sequence[int] | None, budget_bytes: int) -> None:
        """Each cache preloads its own layers; together within the budget."""
        need = self.preload_bytes(layers)
        if need > budget_bytes:
            raise CacheError(f"preloading the caches needs {need / 2**30:.2f} GiB, over the budget of "
                             f"{budget_bytes / 2**30:.2f} GiB")
        for cache in self.caches.values():
            cache.preload(layers, budget_bytes)

    def preload_bytes(self, layers: Sequence[int] | None) -> int:
        return sum(c.preload_bytes(layers) for c in self.caches.values())

    @property
    def preloaded_bytes(self) -> int:
        return sum(c.preloaded_bytes for c in self.caches.values())

    def preloaded(self) -> None:
        """No one array holds every corpus's frames: batches are read utterance by utterance (from each RAM copy)."""
        return None

    def __len__(self) -> int:
        return len(self.meta)

    def close(self) -> None:
        for cache in self.caches.values():
            cache.close()

    def __enter__(self) -> CorpusSet:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
