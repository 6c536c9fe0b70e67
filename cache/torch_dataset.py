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
    features, padding_mask = padded([it["features"] for it in items])  # (B, T, L, D), (B, T) True = real frame
    vad_mask, _ = padded([np.asarray(it["vad"], dtype=bool) for it in items], dtype=torch.bool)  # (B, T) speech
    return {"features": features, "padding_mask": padding_mask, "vad_mask": vad_mask, **label_tensors(items)}


def padded(rows: Sequence[np.ndarray], length: int | None = None,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n_i, ...) -> (B, T, ...) zero-padded in `dtype` and its (B, T) mask, True on real rows.

    T = `length`, or the longest row. float16 rows widen in torch's copy, with no temporary.
    """
    t = max(len(r) for r in rows) if length is None else length
    out = torch.zeros(len(rows), t, *rows[0].shape[1:], dtype=dtype)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = True
    return out, mask


def label_tensors(items: Sequence[dict]) -> dict:
    """emotion (B,) long (-1 = none), valence/arousal (B,) float32 (NaN = none), utt_id: the batch's labels."""
    return {
        "emotion": torch.tensor([it["emotion"] for it in items], dtype=torch.long),
        "valence": torch.tensor([_nan(it["valence"]) for it in items], dtype=torch.float32),
        "arousal": torch.tensor([_nan(it["arousal"]) for it in items], dtype=torch.float32),
        "utt_id": [it["utt_id"] for it in items],
    }


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)
