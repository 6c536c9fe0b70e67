"""From a FeatureCache to the trainer's batches: RAM preload, length-bucketed batches, resident frames.

Resident batches: frames that sit in one tensor (the cache's RAM preload,
or the frames the pooled layer weights mixed once) are batched with one
vectorized gather on that tensor's device; on CUDA they are placed in GPU
memory once when they fit in GPU_SHARE of what is free, so batches are
built there and nothing crosses the bus per step (`resident_copy`,
`resident_tensor`).

Batches: training batches are bucketed by length (shuffle, sort chunks of
50 batches by frame count, shuffle the batch order), which cuts the padded
frames the layer mix and GAP touch by about half on IEMOCAP-like length
spreads; validation and test batches go in length order. The shuffle is
seeded with `seed + epoch`, so an epoch's order does not depend on what ran
before it (a resumed run sees the same batches).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from cache.reader import FeatureCache
from cache.torch_dataset import CacheDataset, collate
from heads.train.folds import labels_of

GPU_SHARE = 0.5  # of the GPU memory free at the time that resident features may take: the rest is for activations
BUCKET_BATCHES = 50  # batches per length-sorted chunk: enough to group lengths, small enough to stay random


def preload(cache: FeatureCache, layers: Sequence[int], memory_gb: float) -> bool:
    """Copy the selected layers into RAM when they fit `memory_gb`; False (read from disk) otherwise."""
    budget = int(memory_gb * 2**30)
    if cache.preload_bytes(layers) > budget:
        return False
    cache.preload(list(layers), budget)
    return True


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed, seeded batches; `set_epoch` picks the epoch's shuffle."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            yield from (order[i : i + bs].tolist() for i in range(0, n, bs))
            return
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g).numpy()
        chunk = bs * BUCKET_BATCHES
        batches = []
        for start in range(0, n, chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i : i + bs].tolist() for i in range(0, len(part), bs)]
        for i in torch.randperm(len(batches), generator=g).tolist():
            yield batches[i]


class ResidentBatches:
    """Batches gathered from frames that already sit in one tensor (RAM or the training device).

    `features (R, ..., D)` holds the frames of many utterances end to end
    (utterance i is rows starts[i] .. starts[i] + lengths[i]); `vad (R,)` the
    chosen VAD mode on the same rows. One vectorized gather per batch, on the
    tensor's own device: on a GPU the batch is built there, nothing crosses
    the bus. Features stay in their stored dtype (float16: half the bytes to
    move; the trainer widens them on the device) and padded positions hold a
    copy of a real frame instead of zeros: every consumer masks them out
    (tested: pooling ignores padding values). `extra` is merged into every
    batch (e.g. {"mixed": True} for frames that are normalized and mixed).
    """

    def __init__(self, features: torch.Tensor, vad: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                 utt_ids: Sequence[str], labels: pd.DataFrame, *, batch_size: int, shuffle: bool, seed: int,
                 extra: dict | None = None) -> None:
        device = features.device
        self.features = features  # (R, ..., D)
        self.vad = vad.to(device)  # (R,)
        self.starts = starts.to(device)  # (N,)
        self.lengths = lengths.to(device)  # (N,)
        self.utt_ids = list(utt_ids)
        self.emotion = torch.tensor(labels["emotion"].to_numpy(), dtype=torch.long)
        self.valence = torch.tensor(labels["valence"].to_numpy(), dtype=torch.float32)
        self.arousal = torch.tensor(labels["arousal"].to_numpy(), dtype=torch.float32)
        self.extra = dict(extra or {})
        self.batch_sampler = BucketBatchSampler(lengths.tolist(), batch_size, shuffle=shuffle, seed=seed)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict]:
        for idx in self.batch_sampler:
            yield self.batch(torch.tensor(idx, dtype=torch.long))

    def batch(self, idx: torch.Tensor) -> dict:
        dev = self.features.device
        idx_d = idx.to(dev)
        lengths = self.lengths[idx_d]  # (B,)
        t = torch.arange(int(lengths.max()), device=dev)  # (T,)
        padding_mask = t[None, :] < lengths[:, None]  # (B, T)
        starts = self.starts[idx_d][:, None]  # (B, 1)
        rows = torch.where(padding_mask, starts + t[None, :], starts)  # (B, T)
        return {
            "features": self.features[rows],  # (B, T, ..., D) stored dtype
            "padding_mask": padding_mask,
            "vad_mask": self.vad[rows] & padding_mask,  # (B, T)
            "emotion": self.emotion[idx],
            "valence": self.valence[idx],
            "arousal": self.arousal[idx],
            "utt_id": [self.utt_ids[i] for i in idx.tolist()],
            **self.extra,
        }


class RamBatches(ResidentBatches):
    """Batches of the cache's preloaded RAM array (or `features`: that array copied to the training device).

    Avoids a per-utterance float32 conversion and a freshly zeroed
    (B, T, L, D) float32 buffer per batch, which dominated a GAP epoch on CPU.
    """

    def __init__(self, cache: FeatureCache, utt_ids: Sequence[str], *, vad_mode: int, batch_size: int,
                 shuffle: bool, seed: int, features: torch.Tensor | None = None) -> None:
        feats, offsets = cache.preloaded()
        x = torch.from_numpy(feats) if features is None else features  # (T_total, L, D) a view, no copy
        starts = torch.tensor([offsets[u][0] for u in utt_ids], dtype=torch.long)  # (N,)
        lengths = torch.tensor([offsets[u][1] for u in utt_ids], dtype=torch.long)  # (N,)
        vad = np.zeros(len(feats), dtype=bool)  # (T_total,) the chosen mode, aligned with features
        for u in utt_ids:
            start, t = offsets[u]
            vad[start : start + t] = cache.vad(u, vad_mode)
        labels = labels_of(cache.meta.loc[list(utt_ids)], cache.classes)
        super().__init__(x, torch.from_numpy(vad), starts, lengths, utt_ids, labels, batch_size=batch_size,
                         shuffle=shuffle, seed=seed)


def make_loader(cache: FeatureCache, utt_ids: Sequence[str], *, layers: Sequence[int], vad_mode: int,
                batch_size: int, shuffle: bool, seed: int, resident: torch.Tensor | None = None) -> Iterable[dict]:
    """RAM batches when the cache holds exactly these layers preloaded, else `cache.torch_dataset` reads from disk.

    `resident`: the preloaded array already copied to the training device (see `resident_copy`).
    No worker processes: deterministic, and the RAM path has nothing to overlap.
    """
    ram = cache.preloaded()
    # the preload holds exactly these layers iff the reader hands out views of it for them
    if ram is not None and utt_ids and np.shares_memory(cache.features(utt_ids[0], list(layers)), ram[0]):
        return RamBatches(cache, utt_ids, vad_mode=vad_mode, batch_size=batch_size, shuffle=shuffle, seed=seed,
                          features=resident)
    dataset = CacheDataset(cache, list(utt_ids), layers=list(layers), vad_mode=vad_mode)
    lengths = cache.meta.loc[list(utt_ids), "n_frames"].to_numpy()
    sampler = BucketBatchSampler(lengths, batch_size, shuffle=shuffle, seed=seed)
    # A private generator: otherwise each epoch's iterator draws a seed from torch's global RNG,
    # which shifts the dropout masks, and disk and RAM runs would differ.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def resident_copy(cache: FeatureCache | None, device: torch.device) -> torch.Tensor | None:
    """The cache's preloaded array copied once to a CUDA device when it fits there (None: batches come from RAM)."""
    ram = cache.preloaded() if cache is not None and hasattr(cache, "preloaded") else None
    if device.type != "cuda" or ram is None:
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if ram[0].nbytes > GPU_SHARE * free:
        return None
    return torch.from_numpy(ram[0]).to(device)


def resident_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    host_budget: int) -> tuple[torch.Tensor, str]:
    """An empty tensor on the training device if it fits there, else in RAM within budget, else file-backed;
    and where it went ("cuda:0", "ram" or "file")."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= GPU_SHARE * free:
            return torch.empty(shape, dtype=dtype, device=device), str(device)
    if nbytes <= host_budget:
        return torch.empty(shape, dtype=dtype), "ram"
    # over the RAM budget: a file the OS pages in and out; unlinked at once, so it goes when the tensor does
    fd, path = tempfile.mkstemp(prefix="sapser-mixed-", suffix=".bin")
    os.close(fd)
    try:
        array = np.memmap(path, dtype=np.dtype(str(dtype).removeprefix("torch.")), mode="w+", shape=shape)
    finally:
        os.unlink(path)
    return torch.from_numpy(array), "file"
