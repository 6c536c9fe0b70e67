"""CacheDataset and collate: cached utterances as padded torch batches for the head trainer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from cache.format import CacheError
from cache.reader import FeatureCache, check_vad_mode
from core.records import class_indices


class CacheDataset(torch.utils.data.Dataset):
    """One item per utterance id: its (T, L, D) features, (T,) VAD mask and labels."""

    def __init__(self, cache: FeatureCache, utt_ids: Sequence[str], *, layers: Sequence[int] | None,
                 vad_mode: int) -> None:
        unknown = [u for u in utt_ids if u not in cache.meta.index]
        if unknown:
            raise CacheError(f"{len(unknown)} utterance id(s) not in {cache.path}, e.g. {unknown[0]!r}")
        cache.positions(layers)  # fail now, not in a worker, on a layer the cache lacks
        self.cache = cache
        self.utt_ids = list(utt_ids)
        self.layers = None if layers is None else [int(x) for x in layers]
        self.vad_mode = check_vad_mode(vad_mode)
        rows = cache.meta.loc[self.utt_ids]
        self.emotion = class_indices(rows["emotion"], cache.classes).tolist()
        self.valence = rows["valence"].to_numpy(np.float32)
        self.arousal = rows["arousal"].to_numpy(np.float32)

    def __len__(self) -> int:
        return len(self.utt_ids)

    def __getitem__(self, i: int) -> dict:
        utt_id = self.utt_ids[i]
        return {
            "features": self.cache.features(utt_id, self.layers),  # (T, L, D) stored dtype
            "vad": self.cache.vad(utt_id, self.vad_mode),  # (T,) bool
            "emotion": self.emotion[i],
            "valence": float(self.valence[i]),
            "arousal": float(self.arousal[i]),
            "utt_id": utt_id,
        }


def collate(items: Sequence[dict]) -> dict:
    """Pad to the longest item: features (B, T, L, D) float32 zeros, masks (B, T) False on padding."""
    lengths = [it["features"].shape[0] for it in items]
    _, n_layers, d = items[0]["features"].shape
    b, t = len(items), max(lengths)
    features = torch.zeros(b, t, n_layers, d, dtype=torch.float32)  # (B, T, L, D)
    padding_mask = torch.zeros(b, t, dtype=torch.bool)  # (B, T) True = real frame
    vad_mask = torch.zeros(b, t, dtype=torch.bool)  # (B, T) True = speech frame
    for i, (it, n) in enumerate(zip(items, lengths)):
        features[i, :n] = torch.as_tensor(it["features"])  # float16 -> float32 in torch's copy, no temporary
        padding_mask[i, :n] = True
        vad_mask[i, :n] = torch.from_numpy(np.asarray(it["vad"], dtype=bool))
    return {
        "features": features,
        "padding_mask": padding_mask,
        "vad_mask": vad_mask,
        "emotion": torch.tensor([it["emotion"] for it in items], dtype=torch.long),
        "valence": torch.tensor([_nan(it["valence"]) for it in items], dtype=torch.float32),
        "arousal": torch.tensor([_nan(it["arousal"]) for it in items], dtype=torch.float32),
        "utt_id": [it["utt_id"] for it in items],
    }


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)
