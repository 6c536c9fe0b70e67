"""The extraction loop's first stage: decode, resample and compute the VAD masks of utterances,
ahead of whoever consumes them, in a thread or in worker processes that die with the command.

`cli extract` feeds its model streams from here (extract.pipeline); fine-tuning's once-per-run
VAD pre-pass reads the corpus through the same loader (heads.finetune.waves). Nothing here imports
torch or h5py: spawned workers import only what decoding needs.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from core.frames import SAMPLE_RATE, FrameGrid
from core.records import SKIP_REASONS, Utterance
from extract.audio import AudioError, load_audio
from core.processes import quiet_child
from extract.vad import vad_masks

PREFETCH_BATCHES = 3  # batches of audio decoded ahead of each model stream


@dataclass
class Loaded:
    utt: Utterance
    samples: np.ndarray  # (N,) float32, 16 kHz
    vad: np.ndarray  # (4, T) bool on the backend's grid
    truncated: bool
    sha256: str = ""  # of the samples' float32 bytes: what an appended row is compared by (cache.writer)

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass
class Failed:
    utt: Utterance
    reason: str  # a SKIP_REASONS key
    detail: str
    message: str  # one sentence, for strict mode


def load_item(utt: Utterance, max_seconds: float, grid: FrameGrid) -> Loaded | Failed:
    """Decode, resample and compute the VAD masks of one utterance (runs in a worker process)."""
    try:
        audio = load_audio(utt.path, start=utt.start, end=utt.end, max_seconds=max_seconds)
    except AudioError as err:
        return Failed(utt, err.reason, err.detail, str(err))
    n = len(audio.samples)
    if grid.n_frames(n) == 0:
        detail = f"{n} samples, the backend's frame needs {grid.window}"
        return Failed(utt, "too_short", detail, f"{utt.path}: {SKIP_REASONS['too_short']} ({detail})")
    return Loaded(utt, audio.samples, vad_masks(audio.samples, grid), audio.truncated, audio_sha256(audio.samples))


def audio_sha256(samples: np.ndarray) -> str:
    """SHA-256 of the samples the model sees (16 kHz float32, after truncation): the same audio in
    another file or format gives the same digest; a few ms per minute of audio."""
    return hashlib.sha256(np.ascontiguousarray(samples, dtype=np.float32).tobytes()).hexdigest()


class _Threads(ThreadPoolExecutor):
    """workers=0: audio loaded by threads of this process (soundfile, soxr and numpy release
    the GIL). On a CPU the model needs every core and audio is ~1 % of the work, so a
    process that imports its own libraries would cost more than it saves."""


def audio_executor(workers: int) -> Executor:
    """workers > 0: spawned processes, so a script that calls extract_corpus needs the usual
    `if __name__ == "__main__":` guard (the CLI has it). They die with this process."""
    if workers <= 0:
        return _Threads(max_workers=1, thread_name_prefix="sapser-audio")
    # spawn, not fork: the parent holds torch and writer threads, which a fork would copy mid-lock
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=quiet_child, initargs=(os.getpid(),))


def prefetch(batches: list[list[Utterance]], executor: Executor, max_seconds: float, grid: FrameGrid,
             ahead: int = PREFETCH_BATCHES, sizes: Sequence[int] | None = None,
             budget: int | None = None) -> Iterator[list[Loaded | Failed]]:
    """Yield each batch's loaded items in order while up to `ahead` next batches load.

    With `sizes` (each batch's decoded bytes, estimated) and `budget`, the batches loaded or
    loading beyond the one being consumed hold at most `budget` bytes (at least one batch is
    always ahead, however large), so long batches do not multiply the audio held in RAM.
    """
    pending: deque[tuple[list[Future], int]] = deque()
    upcoming = iter(zip(batches, sizes if sizes is not None else [0] * len(batches)))
    held = 0  # bytes of the batches in `pending`
    waiting: tuple[list[Utterance], int] | None = None

    def fill() -> None:
        nonlocal held, waiting
        while len(pending) <= ahead:
            waiting = waiting or next(upcoming, None)
            if waiting is None:
                return
            batch, size = waiting
            if pending and budget is not None and held + size > budget:
                return  # the budget is full: load it once a batch ahead of it is consumed
            pending.append(([executor.submit(load_item, u, max_seconds, grid) for u in batch], size))
            held += size
            waiting = None

    fill()
    while pending:
        futures, size = pending.popleft()
        held -= size
        fill()
        yield [f.result() for f in futures]


def decoded_bytes(samples: int) -> int:
    """RAM one loaded utterance of `samples` 16 kHz samples holds: float32 samples + 4 VAD masks."""
    return 4 * samples + samples // 80 + 1024


def load_corpus(utterances: Sequence[Utterance], grid: FrameGrid, max_seconds: float, *, workers: int = 0,
                batch: int = 16) -> Iterator[Loaded | Failed]:
    """Every utterance loaded (or failed) in order, `batch` at a time, the next batches loading meanwhile."""
    batches = [list(utterances[i : i + batch]) for i in range(0, len(utterances), batch)]
    with audio_executor(workers) as executor:
        for items in prefetch(batches, executor, max_seconds, grid, ahead=max(2, workers)):
            yield from items
