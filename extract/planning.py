"""How `cli extract` cuts a corpus into model batches, and how it runs them on each device.

The batch plan is a function of the corpus (file headers), the shard and the settings
only, never of what is already stored, so a resumed run forms the same batches; the
policy per device is measured (bench/extract.py, the bench/results/extract-cpu.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import soundfile as sf

from core.frames import SAMPLE_RATE
from core.records import Corpus, Skip, Utterance

if TYPE_CHECKING:
    from extract.backends import Backend


# --------------------------------------------------------------------------- planning


def estimate_samples(utt: Utterance, max_seconds: float) -> int:
    """16 kHz samples the utterance will have, from the file header only (0 if unreadable).

    Only for ordering and batching: the real length comes from load_audio.
    """
    try:
        info = sf.info(utt.path)
    except Exception:  # the loader reports the real reason later
        return 0
    seconds = info.frames / info.samplerate if info.samplerate else 0.0
    end = seconds if math.isnan(utt.end) else min(seconds, utt.end)
    span = max(end - utt.start, 0.0)
    if max_seconds > 0:
        span = min(span, max_seconds)
    return int(span * SAMPLE_RATE)


def plan_batches(lengths: Sequence[int], batch_seconds: float) -> list[list[int]]:
    """Indices into `lengths`, longest first, cut so max length x count <= batch_seconds.

    Every batch holds at least one utterance (a longer one runs alone).
    Ties are broken by index, so a plan is deterministic.
    """
    budget = batch_seconds * SAMPLE_RATE
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and longest * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def select_shard(utts: Sequence[Utterance], shard: tuple[int, int] | None) -> list[Utterance]:
    """The utterances of shard (i, n), 0 <= i < n: a stable hash of the utt_id, as the cache uses."""
    if shard is None:
        return list(utts)
    from cache.format import shard_of

    i, n = shard
    return [u for u in utts if shard_of(u.utt_id, n) == i]


def select_shard_skips(corpus: Corpus, shard: tuple[int, int] | None) -> list[Skip]:
    """The reader's skips that belong in this shard's skip list (each in exactly one shard)."""
    if shard is None:
        return list(corpus.skipped)
    from cache.format import shard_of

    i, n = shard
    return [s for s in corpus.skipped if shard_of(s.item, n) == i]


@dataclass
class Batch:
    """One batch of the plan: every utterance is run, only those in `write` are stored."""

    utts: list[Utterance]
    write: set[str]


def plan_corpus(utts: Sequence[Utterance], lengths: Sequence[int], batch_seconds: float,
                done: set[str]) -> list[Batch]:
    """The plan over ALL utterances of the shard (so it never depends on what is done),
    keeping the batches that hold at least one utterance not done yet."""
    batches = []
    for b in plan_batches(lengths, batch_seconds):
        write = {utts[i].utt_id for i in b} - done
        if write:
            batches.append(Batch([utts[i] for i in b], write))
    return batches


# --------------------------------------------------------------------------- the policy per device


@dataclass(frozen=True)
class Policy:
    """How the loop runs: every field is measured per device (bench/results/extract-cpu.md)."""

    batch_seconds: float  # padded audio seconds per forward; 0 = one utterance per forward
    streams: int  # model calls running at once (threads of this process)
    threads: int  # torch intra-op threads of each stream
    workers: int  # audio processes; 0 = a loader thread in this process

    def describe(self) -> str:
        per = "one utterance" if self.batch_seconds == 0 else f"<= {self.batch_seconds:g} s padded"
        loader = f"{self.workers} audio processes" if self.workers else "audio in a thread"
        return f"{per} per forward, {self.streams} stream(s) x {self.threads} torch thread(s), {loader}"


DEFAULT_BATCH_SECONDS = {"cuda": 100.0, "cpu": 0.0}
MAX_STREAMS = 8  # each holds one batch's activations; more cores go to each stream's threads


def usable_cores(env: dict[str, str]) -> int:
    """Cores this process may use (affinity, e.g. a container or taskset), split over local torchrun ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(int(env.get("LOCAL_WORLD_SIZE", "1") or 1), 1))


def default_policy(backend: Backend, env: dict[str, str], *, batch_seconds: float | None = None,
                   streams: int | None = None, workers: int | None = None) -> Policy:
    """The measured defaults for the backend's device; any argument given overrides its part.

    CPU: two model calls with one torch thread each beat one call with two threads on
    two cores (OpenMP's threads meet at a barrier after every operation, and a core
    lent to anything else stalls its partner), and one utterance per forward beats padded
    batches (larger activations leave the caches; no padding to compute); audio needs
    ~1 % of a core, so a thread loads it. GPU: padded batches in one stream, audio
    decoded by worker processes (at thousands of times real time the GPU outruns one
    core). Backends that do not declare `thread_safe = True` run in one stream.
    """
    cores = usable_cores(env)
    device = getattr(getattr(backend, "device", None), "type", "cpu")
    if device == "cuda":
        batch = DEFAULT_BATCH_SECONDS["cuda"] if batch_seconds is None else batch_seconds
        n = 1 if streams is None else streams
        return Policy(batch, n, max(1, cores // n), default_workers(env) if workers is None else workers)
    batch = DEFAULT_BATCH_SECONDS["cpu"] if batch_seconds is None else batch_seconds
    if streams is None:
        streams = min(cores, MAX_STREAMS) if getattr(backend, "thread_safe", False) else 1
    return Policy(batch, streams, max(1, cores // streams), 0 if workers is None else workers)


def default_workers(env: dict[str, str]) -> int:
    """Audio worker processes on a GPU: the cores not driving the model (1..8), per local torchrun rank."""
    return max(1, min(8, usable_cores(env) - 1))
