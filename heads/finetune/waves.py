"""Raw-audio batches for fine-tuning: waveforms, VAD masks on the model's frame grid, labels.

VAD masks are computed ONCE per run, not per epoch or per fold: a pre-pass
(`build_wave_index`) reads every utterance of the corpus (truncated as in
training) through the extraction stage's loader (extract.loading: the same
decoding, VAD on the model's frame grid and skip reasons, `--workers`
processes) and stores the sample counts and masks in `RUN/wave-index.npz`; every fold, epoch,
rank and a `--resume` reuse that file. With `--cache F.h5` the masks the
extractor stored are reused instead, after checking the cache was made on
the same frame grid with the same truncation.

Batches: the paper's batch of 64 utterances per optimizer step is kept
whatever fits the memory. `StepBatchSampler` cuts each step's 64 utterances
(shuffled, seed + epoch) into micro-batches whose padded audio (longest x
count) stays under `step_seconds`; the trainer accumulates gradients over a
step's micro-batches, each weighted by its share of the step's utterances.
Under DDP each rank takes every N-th utterance of a step (`shard_step`),
so the N ranks together still take 64.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from cache.torch_dataset import label_tensors, padded
from core.errors import UserError
from core.frames import SAMPLE_RATE, VAD_MODES, FrameGrid
from core.records import Corpus, Utterance
from extract.audio import AudioError, load_audio
from extract.loading import Failed, load_corpus
from extract.vad import vad_settings
from heads.finetune.distributed import DistContext, shard_step
from heads.runfolder import WAVE_INDEX_FILE


class WaveDataError(UserError):
    """Audio or VAD data that does not match what training expects."""


@dataclass
class WaveIndex:
    """Per utterance of the corpus: samples after truncation, truncated flag, (4, T) VAD masks.

    `skipped` maps utt_id -> reason for utterances whose audio could not be used.
    """

    utt_ids: list[str]
    n_samples: np.ndarray  # (U,) int64
    truncated: np.ndarray  # (U,) bool
    offsets: np.ndarray  # (U + 1,) int64 frame offsets into `masks`
    masks: np.ndarray  # (4, sum T) bool
    settings: dict  # grid, max_seconds, VAD settings: what the masks depend on
    skipped: dict[str, str]

    def __post_init__(self) -> None:
        self.position = {u: i for i, u in enumerate(self.utt_ids)}

    def vad(self, utt_id: str, mode: int) -> np.ndarray:
        """(T,) bool speech mask of one utterance."""
        i = self.position[utt_id]
        return self.masks[mode, self.offsets[i] : self.offsets[i + 1]]

    def samples_of(self, utt_ids: Sequence[str]) -> np.ndarray:
        return self.n_samples[[self.position[u] for u in utt_ids]]

    def save(self, path: Path) -> None:
        # A per-process temporary name: SLURM array tasks of one run may build it at once.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            utt_ids=np.array(self.utt_ids, dtype=str),
            n_samples=self.n_samples,
            truncated=self.truncated,
            offsets=self.offsets,
            masks=self.masks,
            settings=np.array(_settings_text(self.settings)),
            skipped_ids=np.array(list(self.skipped), dtype=str),
            skipped_reasons=np.array(list(self.skipped.values()), dtype=str),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "WaveIndex":
        with np.load(path, allow_pickle=False) as z:
            return cls(
                utt_ids=[str(u) for u in z["utt_ids"]],
                n_samples=z["n_samples"],
                truncated=z["truncated"],
                offsets=z["offsets"],
                masks=z["masks"],
                settings=json.loads(str(z["settings"])),
                skipped=dict(zip((str(u) for u in z["skipped_ids"]), (str(r) for r in z["skipped_reasons"]))),
            )


def _settings_text(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def index_settings(grid: FrameGrid, max_seconds: float) -> dict:
    return {**grid.as_dict(), "max_seconds": float(max_seconds), "sample_rate": SAMPLE_RATE, **vad_settings()}


def _pack(ids: list[str], counts: list[int], truncs: list[bool], masks: list[np.ndarray], settings: dict,
          skipped: dict[str, str]) -> WaveIndex:
    """Per-utterance lists -> one WaveIndex with the (4, T) masks concatenated along frames."""
    frames = [m.shape[1] for m in masks]
    return WaveIndex(
        utt_ids=ids,
        n_samples=np.array(counts, dtype=np.int64),
        truncated=np.array(truncs, dtype=bool),
        offsets=np.concatenate([[0], np.cumsum(frames)]).astype(np.int64),
        masks=np.concatenate(masks, axis=1) if masks else np.zeros((len(VAD_MODES), 0), dtype=bool),  # (4, sum T)
        settings=settings,
        skipped=skipped,
    )


def build_wave_index(utterances: Sequence[Utterance], grid: FrameGrid, max_seconds: float,
                     progress: bool = False, workers: int = 0) -> WaveIndex:
    """Read every utterance once (truncated) and compute its VAD masks on `grid`.

    Through the extraction stage's loader (extract.loading): `workers` processes decode and
    run the VAD ahead (0 = a thread), and an utterance is skipped for the same reasons.
    """
    ids, counts, truncs, masks, skipped = [], [], [], [], {}
    items = load_corpus(utterances, grid, max_seconds, workers=workers)
    for item in _progress(items, len(utterances), "VAD pre-pass (once per run)", progress):
        if isinstance(item, Failed):
            skipped[item.utt.utt_id] = item.reason
            continue
        ids.append(item.utt.utt_id)
        counts.append(len(item.samples))
        truncs.append(item.truncated)
        masks.append(item.vad)  # (4, T)
    return _pack(ids, counts, truncs, masks, index_settings(grid, max_seconds), skipped)


def index_from_cache(cache, utterances: Sequence[Utterance], grid: FrameGrid, max_seconds: float) -> WaveIndex:
    """The VAD masks a feature cache already holds, for the corpus's utterances it has.

    The cache must sit on the same frame grid and truncation as the model
    being fine-tuned, or its masks would describe other frames.
    """
    fp = cache.fingerprint
    cache_grid = {k: v for k, v in fp.items() if k.startswith("frame_")}  # window, stride (+ offset, count)
    if cache_grid != grid.as_dict():
        raise WaveDataError(
            f"the cache's frame grid {cache_grid} differs from the model's "
            f"{grid.as_dict()}; its VAD masks cannot be reused (drop --cache)"
        )
    cache_max = float(fp.get("max_seconds", 0.0) or 0.0)
    if not math.isclose(cache_max, float(max_seconds)):
        raise WaveDataError(
            f"the cache truncates at {cache_max:g} s but fine-tuning at {max_seconds:g} s; "
            "its VAD masks would not cover the same audio (drop --cache or match --max-seconds)"
        )
    meta = cache.meta
    ids, counts, truncs, masks, skipped = [], [], [], [], {}
    for utt in utterances:
        if utt.utt_id not in meta.index:
            skipped[utt.utt_id] = "not_in_cache"
            continue
        rows = np.stack([cache.vad(utt.utt_id, m) for m in VAD_MODES])  # (4, T)
        n_frames = rows.shape[1]
        ids.append(utt.utt_id)
        # The budget needs only an estimate; the exact length is checked when the audio is read.
        counts.append(int(round(float(meta.at[utt.utt_id, "duration"]) * SAMPLE_RATE)) if n_frames else 0)
        truncs.append(bool(meta.at[utt.utt_id, "truncated"]))
        masks.append(rows)
    return _pack(ids, counts, truncs, masks, {**index_settings(grid, max_seconds), "vad_source": str(cache.path)},
                 skipped)


def load_or_build_index(run_dir: Path, corpus: Corpus, grid: FrameGrid, max_seconds: float, *,
                        cache=None, progress: bool = False, workers: int = 0) -> WaveIndex:
    """The run's wave index: reused from RUN/wave-index.npz when its settings match, else built and saved.

    Call it on rank 0 only (the others wait at a barrier, then `WaveIndex.load`).
    """
    path = run_dir / WAVE_INDEX_FILE
    wanted = index_settings(grid, max_seconds)
    if cache is not None:
        wanted["vad_source"] = str(cache.path)
    index = _try_load(path)
    if index is not None:
        covered = set(index.utt_ids) | set(index.skipped)
        if index.settings == wanted and covered >= {u.utt_id for u in corpus.utterances}:
            return index
    if cache is not None:
        index = index_from_cache(cache, corpus.utterances, grid, max_seconds)
    else:
        index = build_wave_index(corpus.utterances, grid, max_seconds, progress=progress, workers=workers)
    run_dir.mkdir(parents=True, exist_ok=True)
    index.save(path)
    return index


def _try_load(path: Path) -> WaveIndex | None:
    """The saved index, or None when there is none or it is damaged (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        return WaveIndex.load(path)
    except (OSError, ValueError, KeyError):
        return None


def _progress(items: Iterator, total: int, label: str, enabled: bool) -> Iterator:
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=label, total=total)


# --- labels and folds from a corpus (same rules as heads.data for a cache) ---


def corpus_meta(corpus: Corpus, index: WaveIndex) -> pd.DataFrame:
    """utterances with usable audio as a meta table like FeatureCache.meta (index utt_id)."""
    rows = [u for u in corpus.utterances if u.utt_id in index.position]
    return pd.DataFrame(
        {
            "speaker": [u.speaker for u in rows],
            "session": [u.session for u in rows],
            "emotion": [u.emotion for u in rows],
            "valence": [u.valence for u in rows],
            "arousal": [u.arousal for u in rows],
            "path": [u.path for u in rows],
            "split": [u.split for u in rows],
        },
        index=pd.Index([u.utt_id for u in rows], name="utt_id"),
    )


# --- dataset, micro-batches, collate ---


@dataclass(frozen=True)
class MicroBatch:
    """Indices of one micro-batch, whether it ends its optimizer step, and its share of the step."""

    indices: tuple[int, ...]
    step_end: bool
    share: float  # len(indices) * world_size / utterances in the whole step (all ranks)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class WaveDataset(Dataset):
    """Utterance i -> dict(wave (N,), vad (T,), emotion, valence, arousal, utt_id)."""

    def __init__(self, utterances: Sequence[Utterance], index: WaveIndex, labels: pd.DataFrame, *,
                 grid: FrameGrid, max_seconds: float, vad_mode: int) -> None:
        self.utterances = list(utterances)
        self.index = index
        self.labels = labels  # index utt_id: emotion (int, -1 = none), valence, arousal
        self.grid = grid
        self.max_seconds = max_seconds
        self.vad_mode = vad_mode
        self.n_samples = index.samples_of([u.utt_id for u in self.utterances])  # (U,)

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, i: int) -> dict:
        utt = self.utterances[i]
        try:
            audio = load_audio(utt.path, start=utt.start, end=utt.end, max_seconds=self.max_seconds)
        except AudioError as err:
            raise WaveDataError(f"{utt.utt_id}: audio became unusable during training ({err})") from None
        vad = self.index.vad(utt.utt_id, self.vad_mode)  # (T,)
        n_frames = self.grid.n_frames(len(audio.samples))
        if n_frames != len(vad):
            raise WaveDataError(
                f"{utt.utt_id}: {n_frames} frames from the audio but {len(vad)} in the VAD mask "
                "(the cache or wave index was made from other audio or another truncation)"
            )
        row = self.labels.loc[utt.utt_id]
        return {
            "wave": audio.samples,
            "vad": vad,
            "emotion": int(row["emotion"]),
            "valence": float(row["valence"]),
            "arousal": float(row["arousal"]),
            "utt_id": utt.utt_id,
        }

    def __getitems__(self, batch) -> list[dict]:
        """DataLoader hands the whole MicroBatch here, so its step flags reach `collate_waves`."""
        items = [self[i] for i in batch]
        if isinstance(batch, MicroBatch) and items:
            items[0] = dict(items[0], step_end=batch.step_end, share=batch.share)
        return items


def collate_waves(items: list[dict], grid: FrameGrid) -> dict:
    """Pad to the longest utterance; keys as cache.torch_dataset.collate, `waves` instead of `features`.

    "waves" (B, N) float32 zero-padded, "wave_mask" (B, N) bool, "padding_mask" (B, T) bool,
    "vad_mask" (B, T) bool (False on padding), "emotion" (B,) long, "valence"/"arousal" (B,)
    float32, "utt_id" list[str], "step_end" bool, "share" float.
    """
    waves, wave_mask = padded([x["wave"] for x in items])  # (B, N)
    vad, padding = padded([np.asarray(x["vad"], dtype=bool) for x in items], length=grid.n_frames(waves.shape[1]),
                          dtype=torch.bool)  # (B, T): the grid's frames of the longest wave
    return {
        "waves": waves,
        "wave_mask": wave_mask,
        "padding_mask": padding,
        "vad_mask": vad,
        **label_tensors(items),
        "step_end": bool(items[0].get("step_end", True)),
        "share": float(items[0].get("share", 1.0)),
    }


class WaveCollate:
    """Picklable collate bound to a grid (DataLoader workers need a top-level callable)."""

    def __init__(self, grid: FrameGrid) -> None:
        self.grid = grid

    def __call__(self, items: list[dict]) -> dict:
        return collate_waves(items, self.grid)


def pack(indices: Sequence[int], n_samples: np.ndarray, budget_samples: int) -> list[list[int]]:
    """Cut indices (sorted longest first) into micro-batches with longest x count <= budget.

    An utterance longer than the budget on its own gets a micro-batch of one.
    """
    order = sorted(indices, key=lambda i: (-int(n_samples[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and int(n_samples[batches[-1][0]]) * (len(batches[-1]) + 1) <= budget_samples:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class StepBatchSampler(Sampler[MicroBatch]):
    """Micro-batches of this rank, step after step; a step is `batch_size` utterances of all ranks.

    Deterministic in (seed, epoch): a run resumed at epoch e draws epoch e's
    order without replaying earlier epochs ("sampler position at epoch granularity").
    """

    def __init__(self, n_samples: np.ndarray, *, batch_size: int, step_seconds: float, shuffle: bool,
                 seed: int = 0, ctx: DistContext | None = None) -> None:
        if batch_size < 1:
            raise WaveDataError(f"--batch-size must be at least 1, got {batch_size}")
        if step_seconds <= 0:
            raise WaveDataError(f"--step-seconds must be positive, got {step_seconds}")
        self.n_samples = np.asarray(n_samples, dtype=np.int64)
        self.batch_size = batch_size
        self.budget = int(step_seconds * SAMPLE_RATE)
        self.shuffle = shuffle
        self.seed = seed
        self.ctx = ctx or DistContext()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> list[list[MicroBatch]]:
        n = len(self.n_samples)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        out = []
        for start in range(0, n, self.batch_size):
            step = order[start : start + self.batch_size]
            if len(step) < self.ctx.world_size:
                # A rank without utterances would skip the step's all-reduce and hang
                # the others: drop this tail (at most world_size - 1 utterances an epoch).
                continue
            mine = shard_step(step, self.ctx)
            parts = pack(mine, self.n_samples, self.budget) if mine else []
            out.append([
                MicroBatch(tuple(p), step_end=j == len(parts) - 1, share=len(p) * self.ctx.world_size / len(step))
                for j, p in enumerate(parts)
            ])
        return out

    def __iter__(self) -> Iterator[MicroBatch]:
        for step in self.steps():
            yield from step

    def __len__(self) -> int:
        return sum(len(s) for s in self.steps())

    def n_steps(self) -> int:
        return len(self.steps())
