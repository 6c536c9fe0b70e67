"""Orchestration: one fold, all folds (optionally in parallel processes), and the GAP/SAP/SR ablation.

A run folder holds one configuration (heads/runfolder.py): a later run into
the same folder must use the same settings and cache (otherwise the folds of
two different experiments would be averaged by `cli report`); a refusal names
what differs. Because they are the same computation, folds already finished
in that folder are kept, not trained again: rerunning a killed `--all-folds`
trains only the missing folds.

Parallel folds (`jobs > 1`): each process opens the cache itself, preloads
within `memory_gb / jobs` and uses `cpu_count // jobs` torch threads, so N
jobs neither oversubscribe the cores nor the RAM budget. Fold processes die
with the command (core.processes), so a killed run leaves none behind
writing folds.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cache.reader import FeatureCache
from core.errors import UserError
from core.processes import quiet_child
from heads.config import POOLINGS, TrainConfig
from heads.runfolder import finished_fold, prepare_run_dir, run_config, write_fold, write_run_utterances
from heads.train.batches import preload
from heads.train.fold_group import groups, planned_epochs, train_group
from heads.train.folds import FoldData, cross_corpus, fold_count, fold_data, open_cache, run_name, select_layers
from heads.train.trainer import FoldResult


def default_run_dir(cache_path: str | Path | Sequence[str | Path], pooling: str,
                    test_caches: Sequence[str | Path] = ()) -> Path:
    return Path("runs") / f"{run_name(cache_path, test_caches)}-{pooling}"


def fold_line(m: dict[str, Any], seconds: float | None) -> str:
    def pct(x: Any) -> str:
        return "  n/a" if not isinstance(x, (int, float)) or math.isnan(x) else f"{100 * x:5.1f}"

    took = "" if seconds is None else f"  {seconds:.0f} s"
    return (f"fold {m.get('fold', 0):02d} {m.get('test_speaker')} (val {m.get('val_speaker')})  UA {pct(m.get('ua'))}%  "
            f"WA {pct(m.get('wa'))}%  best {m.get('best_epoch')}/{m.get('epochs_run')}{_members(m)}  "
            f"no-speech {m.get('no_speech')}/{m.get('n_test')}{took}")


def _members(m: dict[str, Any]) -> str:
    """' (+2 heads: best 12, 30)' for an --ensemble fold (the line's best/epochs are member 1's)."""
    members = m.get("members")
    if not isinstance(members, list) or len(members) < 2:
        return ""
    return f" (+{len(members) - 1} heads: best " + ", ".join(str(x.get("best_epoch")) for x in members[1:]) + ")"


def write_result(out: Path, run_cfg: dict[str, Any], cache: FeatureCache, k: int, result: FoldResult,
                 data: FoldData, models: list[torch.nn.Module], histories: list[list[dict]]) -> dict[str, Any]:
    """Fold k's folder from its (ensemble-averaged) result, its heads and their histories; returns its metrics."""
    _check_scored(result.test.utt_id, result.test.probs, cache, k)
    write_fold(out, result.metrics, result.test, data.classes, run_cfg, heads=[m.state_dict() for m in models],
               histories=histories)
    return result.metrics


def _check_scored(utt_ids: list[str], probs: Any, cache: FeatureCache, k: int) -> None:
    """A test utterance whose scores are not finite must not be written as a result."""
    import numpy as np

    bad = [u for u, row in zip(utt_ids, probs) if not np.isfinite(row).all()]
    if bad:
        raise UserError(f"fold {k}: the head's outputs for test utterance(s) {', '.join(map(repr, bad[:3]))} are not "
                        f"finite numbers (non-finite features in {cache.path}?); nothing was written for this fold")


def _worker(source: tuple, ks: list[int], config: TrainConfig, out: str, layers: list[int],
            run_cfg: dict[str, Any], threads: int, memory_gb: float) -> list[tuple[dict[str, Any], float]]:
    """A process's folds, trained as one stack: (metrics, seconds since the process started) per fold."""
    torch.set_num_threads(threads)
    config = replace(config, memory_gb=memory_gb)  # this process's share, also for the frames it prepares
    start = time.perf_counter()
    done = []
    with open_cache(*source) as cache:
        preload(cache, layers, memory_gb)

        def write(k, result, data, models, histories):
            done.append((write_result(Path(out), run_cfg, cache, k, result, data, models, histories),
                         time.perf_counter() - start))

        for group in groups(cache, ks, config, layers):
            train_group(cache, group, config, layers, write=write)
    return done


def train_folds(cache_path: str | Path | Sequence[str | Path], config: TrainConfig, *,
                folds: Sequence[int] | None = None, out: str | Path | None = None, jobs: int = 1,
                console: Console | None = None, progress: bool = True,
                test_caches: Sequence[str | Path] = ()) -> tuple[Path, list[dict[str, Any]]]:
    """Train the given folds (None = all) into RUN; returns RUN and the metrics in fold order.

    Several caches, or `test_caches`, make a cross-corpus run (`--protocol corpus`, core/folds.py): fold K
    tests test cache K (or, without test caches, leaves out cache K) and trains on the others.
    """
    config.validate()
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    console = console or Console(stderr=True)
    out = Path(out) if out else default_run_dir(cache_path, config.pooling, test_caches)
    source = (cache_path if isinstance(cache_path, (str, Path)) else [str(p) for p in cache_path],
              [str(p) for p in test_caches])
    with open_cache(*source) as cache:
        if cross_corpus(cache):
            config = replace(config, protocol="corpus")
        layers = select_layers(cache, config.layer)
        ks = list(folds) if folds else list(range(1, fold_count(cache, config.protocol) + 1))
        for k in ks:  # every fold checked before any training starts
            fold_data(cache, k, config.protocol)
        run_cfg = run_config(config, cache, layers)
        prepare_run_dir(out, run_cfg)
        write_run_utterances(out, cache.meta)  # which files each fold saw: predict warns about them
        kept = {k: m for k in ks if (m := finished_fold(out, k)) is not None}
        todo = [k for k in ks if k not in kept]
        for m in kept.values():
            console.print(f"{fold_line(m, None)}  (kept: trained before with these settings)", highlight=False,
                          soft_wrap=True)
        if kept:
            console.print(f"kept {len(kept)} finished fold(s) of {out}; "
                          + (f"training fold(s) {', '.join(map(str, todo))}" if todo else "nothing left to train")
                          + " (delete a fold-KK folder to train that fold again)", highlight=False, soft_wrap=True)
        results = dict(kept)
        if jobs == 1 or len(todo) <= 1:
            results.update(_serial(cache, todo, config, out, layers, run_cfg, console, progress) if todo else {})
            todo = []
    if todo:
        results.update(_parallel(source, todo, config, out, layers, run_cfg, jobs, console, progress))
    return out, [results[k] for k in ks]


def _serial(cache: FeatureCache, ks: list[int], config: TrainConfig, out: Path, layers: list[int],
            run_cfg: dict[str, Any], console: Console, show: bool) -> dict[int, dict[str, Any]]:
    in_ram = preload(cache, layers, config.memory_gb)
    if not in_ram:
        console.print(f"features do not fit --memory-gb {config.memory_gb:g}: reading them from disk every epoch")
    results = {}
    start = time.perf_counter()
    with _progress(console, show) as bar:
        task = bar.add_task(f"{len(ks)} folds, head epochs", total=planned_epochs(cache, ks, config))

        def write(k, result, data, models, histories):
            results[k] = write_result(out, run_cfg, cache, k, result, data, models, histories)
            bar.console.print(fold_line(results[k], time.perf_counter() - start))

        for group in groups(cache, ks, config, layers):
            train_group(cache, group, config, layers, write=write, on_epoch=lambda n: bar.advance(task, n))
    return results


def _parallel(source: tuple, ks: list[int], config: TrainConfig, out: Path, layers: list[int],
              run_cfg: dict[str, Any], jobs: int, console: Console, show: bool) -> dict[int, dict[str, Any]]:
    """`--jobs N`: the folds dealt to N processes, each training its share as one stack with cores / N threads."""
    jobs = min(jobs, len(ks))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    shares = [ks[i::jobs] for i in range(jobs)]
    results = {}
    with _progress(console, show) as bar, ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                                                              initializer=quiet_child,
                                                              initargs=(os.getpid(),)) as pool:
        task = bar.add_task(f"folds ({jobs} processes)", total=len(ks))
        futures = [pool.submit(_worker, source, share, config, str(out), layers, run_cfg, threads,
                               config.memory_gb / jobs) for share in shares]
        try:
            for fut in as_completed(futures):
                try:
                    done = fut.result()
                except BrokenProcessPool:
                    raise UserError("a fold process ended abruptly (killed, or out of memory?); the folds finished "
                                    "so far are kept: rerun the same command to train the rest") from None
                for metrics, seconds in done:
                    results[metrics["fold"]] = metrics
                    bar.console.print(fold_line(metrics, seconds))
                    bar.advance(task)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the fold processes ignore SIGINT, so end them here
            _stop_workers(pool)
            raise
    return results


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the fold processes now (folds in progress are lost; finished ones are on disk), so leaving
    the pool does not wait for them to finish their folds."""
    if hasattr(pool, "terminate_workers"):  # Python >= 3.14
        pool.terminate_workers()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # no public way before 3.14
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _progress(console: Console, show: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not show, transient=True)


def ablate(cache_path: str | Path | Sequence[str | Path], config: TrainConfig, *, out: str | Path | None = None,
           jobs: int = 1, console: Console | None = None, progress: bool = True, baseline: bool = True,
           test_caches: Sequence[str | Path] = ()) -> list[Path]:
    """GAP, SAP and SR over all folds of one cache, into OUT/gap, OUT/sap, OUT/sr (same other settings),
    after the classical baseline (heads/train/baseline.py, same layer and VAD mode) into OUT/baseline."""
    console = console or Console(stderr=True)
    out = Path(out) if out else Path("runs") / f"{run_name(cache_path, test_caches)}-ablation"
    runs = []
    if baseline:
        from heads.config import BaselineConfig
        from heads.train.baseline import run_baseline

        console.print(f"[bold]Baseline[/bold] -> {out / 'baseline'}")
        run, _ = run_baseline(cache_path, BaselineConfig(layer=config.layer, vad_mode=config.vad_mode,
                                                         protocol=config.protocol),
                              out=out / "baseline", console=console, progress=progress, test_caches=test_caches)
        runs.append(run)
    for pooling in POOLINGS:  # in the table's order: GAP, SAP, SR
        console.print(f"[bold]{POOLINGS.label(pooling)}[/bold] -> {out / pooling}")
        run, _ = train_folds(cache_path, replace(config, pooling=pooling), out=out / pooling, jobs=jobs,
                             console=console, progress=progress, test_caches=test_caches)
        runs.append(run)
    return runs
