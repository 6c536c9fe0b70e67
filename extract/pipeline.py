"""The extraction loop: a corpus in, a finished (or resumable) feature cache out.

Three stages run at once:

    audio loaders             model streams              cache writer thread
    decode + resample + VAD ─► backend(batch of waves) ─► float16 + HDF5 part files
    (a thread, or worker      (`streams` threads, each   (bounded queue, see
     processes; look-ahead)    with its torch threads)    cache.writer)

Memory is bounded, never by the corpus size: `--buffer-mb` (ExtractConfig.budget) splits
one budget between the audio decoded ahead, the writer's queue and the part it builds;
the model streams hold their batches; oneDNN's per-shape cache is off (extract.backends).

The policy is per device (`default_policy`, measured in bench/extract.py and the
bench/results/extract-cpu.md): on a CPU, one utterance per forward in one stream per core,
each stream with a single torch thread, and audio loaded by a thread (no processes);
on a GPU, length-sorted padded batches of up to `batch_seconds` of audio in one
stream, with worker processes decoding audio ahead of it.

The batch plan is a function of the corpus (file headers), the shard and the
settings only: utterances of the whole shard are sorted by length, longest first
(ties by corpus order), and cut so that padded length x batch size <= batch_seconds
(0 = one per forward); the longest batch comes first, so a model that runs out of
memory does so at once. A resumed run recomputes the same batches, running (but not
storing again) the utterances of a batch that are already stored, so its features
are bit-identical to an uninterrupted run's.

Bad items never stop a run: an AudioError, an utterance shorter than the
backend's frame window, or a model error on one item (a failed batch is
retried one utterance at a time to find it) becomes a skip with its reason.
`strict=True` turns each of them into an error instead.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, deque
from collections.abc import Generator
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.frames import SAMPLE_RATE
from core.records import Corpus, Utterance
from extract.audio import RESAMPLE_QUALITY
from extract.config import ExtractConfig, ExtractError, parse_shard
from extract.loading import PREFETCH_BATCHES, Failed, Loaded, audio_executor, decoded_bytes, prefetch
from extract.models import model_slug
from extract.planning import (Batch, Policy, default_policy, estimate_samples, plan_corpus, select_shard,
                              select_shard_skips)
from extract.progress import progress_bar
from extract.vad import vad_settings

if TYPE_CHECKING:
    from extract.backends import Backend

# A model that fails on this many utterances before it has produced one set of
# features is broken, not unlucky: stop instead of skipping the whole corpus.
# Utterances that already failed in an earlier run (and are retried) do not count.
MAX_ERRORS_BEFORE_FIRST_SUCCESS = 8


# --------------------------------------------------------------------------- the fingerprint


def fingerprint(corpus: Corpus, backend: Backend, *, max_seconds: float, dtype: str = "float16") -> dict:
    """Everything that decides the cached arrays; a resume with any other value is refused.

    `corpus` (extract.corpora.corpus_identity) keeps a second corpus out of a cache: two
    manifest corpora used to share `dataset: manifest` and so one cache.
    """
    from extract.corpora import corpus_identity

    return {
        "corpus": corpus_identity(corpus),
        **backend.describe(),
        "layers": list(backend.layers),
        "hidden_size": backend.hidden_size,
        "dtype": dtype,
        "sample_rate": SAMPLE_RATE,
        "resample": f"soxr {RESAMPLE_QUALITY}",
        **backend.grid.as_dict(),
        **vad_settings(),
        "max_seconds": float(max_seconds),
        "dataset": corpus.name,
        "classes": list(corpus.classes),
    }


# --------------------------------------------------------------------------- the model streams


@dataclass
class _Outcome:
    """What the model made of one loaded utterance: features, or the error it raised."""

    item: Loaded
    features: np.ndarray | None = None  # (T, L, D) float32
    error: BaseException | None = None


def _stream_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # this thread's OpenMP team (and torch's default for new threads)


def _compute(items: list[Loaded | Failed], backend: Backend) -> list[_Outcome]:
    """Run one planned batch (in a stream thread). A failed batch is retried one utterance
    at a time so that one bad item does not take the others with it."""
    loaded = [it for it in items if isinstance(it, Loaded)]
    if not loaded:
        return []
    try:
        return [_Outcome(it, f) for it, f in zip(loaded, backend([it.samples for it in loaded]))]
    except Exception:
        _free_accelerator_memory()
    out = []
    for it in loaded:
        try:
            out.append(_Outcome(it, backend([it.samples])[0]))
        except Exception as err:  # noqa: BLE001 - judged by the main thread, in plan order
            _free_accelerator_memory()
            out.append(_Outcome(it, error=err))
    return out


# --------------------------------------------------------------------------- the loop


@dataclass
class _Tally:
    written: int = 0
    audio_seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    model_errors_before_success: int = 0
    # model_error skips of an earlier run, retried now: failing again says nothing new about the model
    retried: set[str] = field(default_factory=set)
    in_cache: int = 0  # utterances of this corpus (shard) the cache held before this run






def extract_corpus(corpus: Corpus, out: str | Path, backend: Backend, config: ExtractConfig, *,
                   progress: bool = True, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Extract every utterance of `corpus` (of the config's shard) into the cache at `out`.

    Resumes a cache with the same fingerprint (utterances already stored or skipped
    are not stored again). `batch_seconds`, `workers` and `streams` left None take the
    device's measured policy (`default_policy`; batch_seconds 0 = one utterance per
    forward, workers 0 = audio loaded in a thread); `max_seconds` None takes the
    dataset's. `model`, `layers`, `device` and `amp` are the backend's (`run_extract`
    loads it). Returns a summary (see `summarize`).
    """
    from cache.format import RETRIED_REASONS
    from cache.writer import CacheWriter  # h5py only in the parent, never in the workers

    config.validate()
    env = dict(os.environ) if env is None else env
    max_seconds = resolved_max_seconds(config, corpus.name)
    shard = parse_shard(config.shard, env)
    started = time.perf_counter()
    policy = default_policy(backend, env, batch_seconds=config.batch_seconds, streams=config.streams,
                            workers=config.workers)
    if hasattr(backend, "one_per_forward"):  # the fingerprint says how batches were formed
        backend.one_per_forward = policy.batch_seconds == 0
    tally = _Tally()
    fp = fingerprint(corpus, backend, max_seconds=max_seconds, dtype=config.dtype)
    budget = config.budget()
    with CacheWriter(out, fp, shard=shard, append=config.append, part_bytes=budget.part,
                     queue_bytes=budget.queue) as writer:
        mine = select_shard(corpus.utterances, shard)
        if len(writer.corpora) > 1:  # a cache built from several corpora: an id already there must be the same
            check_existing(mine, writer.stored_rows(), max_seconds, writer.path)  # before anything is written
        already = len(writer.done)
        tally.retried = {s.item for s in writer.skipped if s.reason in RETRIED_REASONS}
        tally.in_cache = sum(u.utt_id in writer.done for u in mine)
        for s in select_shard_skips(corpus, shard):
            if s.item not in writer.stored or s.reason == "duplicate_id":  # else the cache holds it (an earlier
                writer.skip(s.item, s.reason, s.detail)                  # run or corpus): not a skip of the cache
        with ThreadPoolExecutor(max_workers=8) as headers:  # file headers: I/O-bound, threads suffice
            lengths = list(headers.map(lambda u: estimate_samples(u, max_seconds), mine))
        batches = plan_corpus(mine, lengths, policy.batch_seconds, set(writer.done))
        todo = [n for u, n in zip(mine, lengths) if u.utt_id not in writer.done]
        samples = {u.utt_id: n for u, n in zip(mine, lengths)}
        estimate = {u: n / SAMPLE_RATE for u, n in samples.items()}  # the bar's unit
        # closing(): an error in _apply stops the loaders and streams at once, not at garbage collection
        with progress_bar(progress, len(todo), sum(todo) / SAMPLE_RATE) as bar, \
                closing(_run(batches, backend, policy, max_seconds, samples, budget.audio)) as results:
            loop_started = time.perf_counter()
            for batch, outcomes in results:
                written = _apply(batch, outcomes, writer, tally, config.strict)
                bar.advance(len(written), sum(estimate[u] for u in written))
            loop_seconds = time.perf_counter() - loop_started
        path = writer.close()
    # the writer turns non-finite features into model_error skips itself
    tally.written -= writer.n_nonfinite
    if writer.n_nonfinite:
        tally.skipped["model_error"] += writer.n_nonfinite
    return summarize(path, tally, writer, already=already, todo=len(todo), wall=time.perf_counter() - started,
                     loop_seconds=loop_seconds, model=backend.name, policy=policy)


def _run(batches: list[Batch], backend: Backend, policy: Policy, max_seconds: float, samples: dict[str, int],
         audio_budget: int) -> Generator[tuple[Batch, tuple[list[Loaded | Failed], list[_Outcome]]], None, None]:
    """Load and compute the plan; yield each batch's items and outcomes in plan order. The audio
    decoded ahead of the model holds at most `audio_budget` bytes (`samples`: estimated lengths)."""
    import torch

    main_threads = torch.get_num_threads()
    loaders = audio_executor(policy.workers)
    model = ThreadPoolExecutor(policy.streams, thread_name_prefix="sapser-model", initializer=_stream_init,
                               initargs=(policy.threads,))
    running: deque[tuple[Batch, list[Loaded | Failed], Future]] = deque()
    try:
        sizes = [sum(decoded_bytes(samples[u.utt_id]) for u in b.utts) for b in batches]
        loaded = prefetch([b.utts for b in batches], loaders, max_seconds, backend.grid,
                          ahead=PREFETCH_BATCHES * policy.streams, sizes=sizes, budget=audio_budget)
        for batch, items in zip(batches, loaded):
            running.append((batch, items, model.submit(_compute, items, backend)))
            if len(running) > policy.streams:  # every stream busy and one batch waiting
                b, its, future = running.popleft()
                yield b, (its, future.result())
        while running:
            b, its, future = running.popleft()
            yield b, (its, future.result())
    finally:
        model.shutdown(wait=True, cancel_futures=True)
        loaders.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(main_threads)  # the streams changed torch's default for new threads




def _apply(batch: Batch, result: tuple[list[Loaded | Failed], list[_Outcome]], writer: Any, tally: _Tally,
           strict: bool) -> list[str]:
    """Store (or skip) the utterances of `batch.write`, in plan order; returns the ids handled."""
    items, outcomes = result
    handled = []
    for it in items:
        if isinstance(it, Failed) and it.utt.utt_id in batch.write:
            if strict:
                raise ExtractError(f"{it.message} (strict mode)")
            _skip(writer, tally, it.utt.utt_id, it.reason, it.detail)
            handled.append(it.utt.utt_id)
    for o in outcomes:
        it = o.item
        if it.utt.utt_id not in batch.write:
            continue  # already stored: run only so that its batch is the planned one
        handled.append(it.utt.utt_id)
        if o.error is not None:
            detail = f"{type(o.error).__name__}: {_first_line(o.error)}"
            if strict:
                raise ExtractError(f"{it.utt.utt_id}: the model failed ({detail}) (strict mode)") from o.error
            tally.model_errors_before_success += tally.written == 0 and it.utt.utt_id not in tally.retried
            if tally.model_errors_before_success >= MAX_ERRORS_BEFORE_FIRST_SUCCESS:
                raise ExtractError(
                    f"the model failed on the first {tally.model_errors_before_success} utterances "
                    f"and worked on none ({detail}); check the model and --device"
                ) from o.error
            _skip(writer, tally, it.utt.utt_id, "model_error", detail)
            continue
        # the backend's grid and the VAD's grid are the same object; a mismatch is a bug, not bad input
        f = o.features
        assert f.shape[0] == it.vad.shape[1], f"{it.utt.utt_id}: {f.shape[0]} frames vs VAD {it.vad.shape[1]}"
        writer.add(it.utt, f, it.vad, duration=it.seconds, truncated=it.truncated, audio_sha256=it.sha256)
        tally.written += 1
        tally.audio_seconds += it.seconds
    return handled


def _skip(writer: Any, tally: _Tally, item: str, reason: str, detail: str) -> None:
    writer.skip(item, reason, detail)
    tally.skipped[reason] += 1


# --------------------------------------------------------------------------- appending


def check_existing(utts: list[Utterance], rows: dict[str, dict[str, Any]], max_seconds: float, path: Path) -> None:
    """Refuse (ExtractError, before anything is written) utterances whose utt_id the cache holds
    as a different utterance: other labels, or other audio. The same file path counts as the same
    audio (as a resume assumes); another path is decoded and compared by the SHA-256 of its
    samples (by its length in samples for rows stored before the digest was recorded)."""
    from extract.audio import AudioError, load_audio
    from extract.loading import audio_sha256

    conflicts: list[tuple[str, str]] = []
    to_decode = []
    for u in utts:
        row = rows.get(u.utt_id)
        if row is None:
            continue
        labels = _label_difference(u, row)
        if labels:
            conflicts.append((u.utt_id, f"other labels ({labels})"))
        elif str(u.path) != row["path"]:
            to_decode.append((u, row))

    def same_audio(item: tuple[Utterance, dict[str, Any]]) -> str | None:
        u, row = item
        try:
            samples = load_audio(u.path, start=u.start, end=u.end, max_seconds=max_seconds).samples
        except AudioError as err:
            return f"audio that cannot be compared ({err.reason})"
        if row["audio_sha256"]:
            same = audio_sha256(samples) == row["audio_sha256"]
        else:  # stored before digests were: the sample count is what is left to compare
            same = len(samples) / SAMPLE_RATE == row["duration"]
        return None if same else f"other audio ({u.path} vs {row['path']} in the cache)"

    with ThreadPoolExecutor(max_workers=4) as pool:  # decoding: soundfile and soxr release the GIL
        for (u, _), problem in zip(to_decode, pool.map(same_audio, to_decode)):
            if problem:
                conflicts.append((u.utt_id, problem))
    if conflicts:
        utt_id, problem = sorted(conflicts)[0]
        raise ExtractError(
            f"{len(conflicts)} utterance(s) of this corpus are already in {path} as different utterances "
            f"(e.g. {utt_id!r}: {problem}); give them other utt_ids, or use another --out"
        )


def _label_difference(u: Utterance, row: dict[str, Any]) -> str:
    """`emotion 'sad' (cache) vs 'angry' (now)` for the first label that differs, else ""."""
    ours = {"speaker": u.speaker, "emotion": u.emotion or "", "valence": float(u.valence), "arousal": float(u.arousal)}
    for name, value in ours.items():
        theirs = row[name]
        if isinstance(value, float):
            if not (value == theirs or (math.isnan(value) and math.isnan(theirs))):
                return f"{name} {theirs!r} (cache) vs {value!r} (now)"
        elif value != theirs:
            return f"{name} {theirs!r} (cache) vs {value!r} (now)"
    return ""


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else "")[:160]


# --------------------------------------------------------------------------- the summary


def summarize(path: Path, tally: _Tally, writer: Any, *, already: int, todo: int, wall: float,
              loop_seconds: float, model: str, policy: Policy) -> dict[str, Any]:
    """What this run did, and what the cache (or shard) file now holds, read back from it."""
    from cache.contents import cache_bytes, read_contents  # reads one file, shard or not
    from cache.format import corpora

    contents = read_contents(path)
    return {
        "out": str(path),
        "size_bytes": cache_bytes(path) if path.exists() else 0,
        "model": model,
        "written": tally.written,
        "resumed_from": already,
        "planned": todo,
        "skipped": dict(sorted(tally.skipped.items())),
        "audio_hours": tally.audio_seconds / 3600.0,
        "seconds": wall,  # the whole call: planning, extraction, finishing the file
        "x_real_time": tally.audio_seconds / loop_seconds if loop_seconds > 0 else 0.0,
        "float32_fallback": writer.n_fallback,
        "policy": policy.describe(),
        "compute_dtype": str(contents.fingerprint.get("compute_dtype", "float32")),
        "cache_utterances": len(contents.utt_ids),
        "corpora": corpora(contents.fingerprint),
        "corpus_in_cache_before": tally.in_cache,
        "cache_skipped": dict(sorted(Counter(contents.skipped["reason"]).items())),
    }


# --------------------------------------------------------------------------- the `cli extract` entry


def compute_dtype(amp: str, out: Path) -> str:
    """The backend's `dtype` for `--amp`: as asked, except that `auto` keeps the precision of a cache
    already begun at `out`, so a resume after a change of default (or of machine) goes on instead of
    being refused for a different `compute_dtype`."""
    from cache.contents import stored_fingerprint

    if amp != "auto":
        return {"none": "float32"}.get(amp, amp)
    earlier = stored_fingerprint(out)
    return str(earlier.get("compute_dtype", "auto")) if earlier else "auto"


def default_out(corpus: Corpus, model: str) -> Path:
    """features/<corpus>-<model>.h5, <corpus> naming the corpus (not just `manifest`)."""
    from extract.corpora import corpus_slug

    return Path("features") / f"{corpus_slug(corpus)}-{model_slug(model)}.h5"


def resolved_max_seconds(config: ExtractConfig, dataset: str) -> float:
    """The config's --max-seconds, or the dataset's default truncation when it gives none."""
    from extract.corpora import default_max_seconds

    return default_max_seconds(dataset) if config.max_seconds is None else float(config.max_seconds)


def run_extract(dataset: str, root: str | Path, config: ExtractConfig | None = None, *,
                out: str | Path | None = None, progress: bool = True, env: dict[str, str] | None = None,
                **settings: Any) -> dict[str, Any]:
    """`cli extract`: read the corpus, load the backend, extract; returns the summary.

    `settings` are ExtractConfig fields given by name, a shorthand for (or changes to)
    `config`: `run_extract("manifest", csv, out=F, model="fbank", workers=0)`.
    """
    from cache.format import shard_path
    from extract.backends import load_backend
    from extract.corpora import read_corpus
    from extract.models import parse_layers

    config = replace(config or ExtractConfig(), **settings).validate()
    env = dict(os.environ) if env is None else env
    shard = parse_shard(config.shard, env)
    device = config.device
    if device == "auto" and "LOCAL_RANK" in env:
        import torch

        if torch.cuda.is_available():  # one GPU per torchrun rank
            device = f"cuda:{int(env['LOCAL_RANK'])}"
    resolved_max_seconds(config, dataset)  # an unknown dataset is named before the corpus is read
    corpus = read_corpus(dataset, root, classes=tuple(config.classes), strict=config.strict)
    out_path = Path(out) if out is not None else default_out(corpus, config.model)
    written = shard_path(out_path, shard) if shard else out_path  # the file CacheWriter resumes
    backend = load_backend(config.model, layers=parse_layers(config.layers), device=device,
                           dtype=compute_dtype(config.amp, written))
    summary = extract_corpus(corpus, out_path, backend, config, progress=progress, env=env)
    summary["reader_skipped"] = corpus.skip_counts()
    return summary


def precision_line(compute_dtype: str) -> str:
    """The summary's precision row: the compute dtype, and how to change it."""
    if compute_dtype == "float32":
        return "float32"
    return f"{compute_dtype} autocast (--amp none for float32)"


def summary_table(summary: dict[str, Any]):
    """The end-of-run summary as a rich table."""
    from rich.table import Table

    table = Table(title="extraction", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    skipped = summary["skipped"]
    rows = [
        ("written", f"{summary['written']:,} utterances, {summary['audio_hours']:.3f} h of audio"),
        ("skipped", ", ".join(f"{r} {n}" for r, n in skipped.items()) if skipped else "none"),
        ("reader skipped", ", ".join(f"{r} {n}" for r, n in summary.get("reader_skipped", {}).items()) or "none"),
        ("already in cache", f"{summary['resumed_from']:,}"),
        *([("corpora", ", ".join(summary["corpora"]) + f" ({summary['corpus_in_cache_before']:,} utterances of this "
                                                         "one were in the cache before)")]
          if len(summary.get("corpora", ())) > 1 else []),
        ("speed", f"{summary['x_real_time']:.1f}x real time ({summary['seconds']:.1f} s in all)"),
        ("policy", summary["policy"]),
        ("precision", precision_line(summary.get("compute_dtype", "float32"))),
        ("cache", f"{summary['out']} ({summary['size_bytes'] / 2**20:.1f} MiB, "
                  f"{summary['cache_utterances']:,} utterances)"),
    ]
    if summary.get("float32_fallback"):
        rows.append(("float32 fallback", f"{summary['float32_fallback']} utterances overflowed float16"))
    for name, value in rows:
        table.add_row(name, value)
    return table
