"""Orchestration: one fold, all folds (optionally in parallel processes), and the GAP/SAP/SR ablation.

A run folder holds one configuration: `RUN/config.json` records every
setting and the cache fingerprint, and a later `--fold K` into the same
folder must use the same settings (otherwise the folds of two different
experiments would be averaged by `cli report`).

Parallel folds (`jobs > 1`): each process opens the cache itself, preloads
within `memory_gb / jobs` and uses `cpu_count // jobs` torch threads, so N
jobs neither oversubscribe the cores nor the RAM budget.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cache.reader import FeatureCache
from extract.errors import UserError
from heads.data import check_vad_mode, fold_count, fold_data, preload, select_layers
from heads.folds import plan_folds
from heads.metrics import json_safe
from heads.trainer import TrainConfig, Trainer, write_fold

# Settings that change how fast a run goes, not what it computes.
NOT_RESULT_SETTINGS = ("memory_gb", "device")


def default_run_dir(cache_path: str | Path, pooling: str) -> Path:
    return Path("runs") / f"{Path(cache_path).stem}-{pooling}"


def open_cache(path: str | Path) -> FeatureCache:
    path = Path(path)
    if not path.exists():
        raise UserError(f"the cache {path} does not exist (make one with `cli extract`)")
    try:
        return FeatureCache(path)
    except UserError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"the cache {path} could not be read ({type(err).__name__}: {err}); it may be corrupted") from None


def run_config(config: TrainConfig, cache: FeatureCache, layers: list[int]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        sapser = version("sapser")
    except PackageNotFoundError:
        sapser = "unknown"
    return {
        "settings": asdict(config),
        "cache": str(Path(cache.path).resolve()),
        "fingerprint": cache.fingerprint,
        "classes": list(cache.classes),
        "layers": layers,
        "hidden_size": int(cache.hidden_size),
        "folds": [asdict(f) for f in plan_folds({str(s): str(x) for s, x in zip(cache.meta["speaker"], cache.meta["session"])})],
        "versions": {"sapser": sapser, "torch": torch.__version__},
    }


def prepare_run_dir(out: Path, config: dict[str, Any]) -> None:
    """Write RUN/config.json, refusing a folder that holds a run with other settings or another cache."""
    path = out / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UserError(f"{path} exists but is not readable JSON; choose another --out or remove it") from None

        def same(a: dict[str, Any]) -> dict[str, Any]:
            settings = {k: v for k, v in a.get("settings", {}).items() if k not in NOT_RESULT_SETTINGS}
            return {"settings": settings, "fingerprint": a.get("fingerprint"), "layers": a.get("layers")}

        if same(old) != same(json_safe(config)):
            raise UserError(f"{out} already holds a run with other settings or another cache; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(config), indent=2) + "\n")


def fold_line(m: dict[str, Any], seconds: float) -> str:
    def pct(x: Any) -> str:
        return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}"

    return (f"fold {m['fold']:02d} {m['test_speaker']} (val {m['val_speaker']})  UA {pct(m['ua'])}%  "
            f"WA {pct(m['wa'])}%  best {m['best_epoch']}/{m['epochs_run']}  "
            f"no-speech {m['no_speech']}/{m['n_test']}  {seconds:.0f} s")


def train_one(cache: FeatureCache, k: int, config: TrainConfig, out: Path, layers: list[int], run_cfg: dict[str, Any],
              on_epoch: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train, test and write fold k of an open (possibly preloaded) cache; returns its metrics."""
    data = fold_data(cache, k)
    try:
        trainer = Trainer(config, data, cache=cache, layers=layers, on_epoch=on_epoch)
        result = trainer.run()
    except OSError as err:  # h5py reports unreadable chunks as OSError
        raise UserError(f"the cache {cache.path} could not be read during training of fold {k} ({err}); "
                        "it may be corrupted") from None
    write_fold(out, result, data.classes, trainer.model, run_cfg)
    return result.metrics


def _worker(cache_path: str, k: int, config: TrainConfig, out: str, layers: list[int], run_cfg: dict[str, Any],
            threads: int, memory_gb: float) -> tuple[dict[str, Any], float]:
    torch.set_num_threads(threads)
    config = replace(config, memory_gb=memory_gb)  # this process's share, also for the frames it mixes once
    start = time.perf_counter()
    with open_cache(cache_path) as cache:
        preload(cache, layers, memory_gb)
        metrics = train_one(cache, k, config, Path(out), layers, run_cfg)
    return metrics, time.perf_counter() - start


def train_folds(cache_path: str | Path, config: TrainConfig, *, folds: Sequence[int] | None = None,
                out: str | Path | None = None, jobs: int = 1, console: Console | None = None,
                progress: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """Train the given folds (None = all) into RUN; returns RUN and the metrics in fold order."""
    config.validate()
    check_vad_mode(config.vad_mode)
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    console = console or Console(stderr=True)
    out = Path(out) if out else default_run_dir(cache_path, config.pooling)
    with open_cache(cache_path) as cache:
        layers = select_layers(cache, config.layer)
        ks = list(folds) if folds else list(range(1, fold_count(cache) + 1))
        for k in ks:  # every fold checked before any training starts
            fold_data(cache, k)
        run_cfg = run_config(config, cache, layers)
        prepare_run_dir(out, run_cfg)
        if jobs == 1 or len(ks) == 1:
            results = _serial(cache, ks, config, out, layers, run_cfg, console, progress)
        else:
            results = None
    if results is None:
        results = _parallel(str(cache_path), ks, config, out, layers, run_cfg, jobs, console, progress)
    return out, [results[k] for k in ks]


def _serial(cache: FeatureCache, ks: list[int], config: TrainConfig, out: Path, layers: list[int],
            run_cfg: dict[str, Any], console: Console, show: bool) -> dict[int, dict[str, Any]]:
    in_ram = preload(cache, layers, config.memory_gb)
    if not in_ram:
        console.print(f"features do not fit --memory-gb {config.memory_gb:g}: reading them from disk every epoch")
    results = {}
    with _progress(console, show) as bar:
        folds_task = bar.add_task("folds", total=len(ks))
        for k in ks:
            epochs_task = bar.add_task(f"fold {k:02d} epochs", total=config.epochs)
            start = time.perf_counter()
            results[k] = train_one(cache, k, config, out, layers, run_cfg,
                                   on_epoch=lambda row, t=epochs_task: bar.update(t, advance=1))
            bar.remove_task(epochs_task)
            bar.console.print(fold_line(results[k], time.perf_counter() - start))
            bar.advance(folds_task)
    return results


def _parallel(cache_path: str, ks: list[int], config: TrainConfig, out: Path, layers: list[int],
              run_cfg: dict[str, Any], jobs: int, console: Console, show: bool) -> dict[int, dict[str, Any]]:
    jobs = min(jobs, len(ks))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results = {}
    with _progress(console, show) as bar, ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        task = bar.add_task(f"folds ({jobs} processes)", total=len(ks))
        futures = {pool.submit(_worker, cache_path, k, config, str(out), layers, run_cfg, threads,
                               config.memory_gb / jobs): k for k in ks}
        for fut in as_completed(futures):
            metrics, seconds = fut.result()
            results[futures[fut]] = metrics
            bar.console.print(fold_line(metrics, seconds))
            bar.advance(task)
    return results


def _progress(console: Console, show: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not show, transient=True)


ABLATION = ("gap", "sap", "sr")


def ablate(cache_path: str | Path, config: TrainConfig, *, out: str | Path | None = None, jobs: int = 1,
           console: Console | None = None, progress: bool = True) -> list[Path]:
    """GAP, SAP and SR over all folds of one cache, into OUT/gap, OUT/sap, OUT/sr (same other settings)."""
    console = console or Console(stderr=True)
    out = Path(out) if out else Path("runs") / f"{Path(cache_path).stem}-ablation"
    runs = []
    for pooling in ABLATION:
        console.print(f"[bold]{pooling.upper()}[/bold] -> {out / pooling}")
        run, _ = train_folds(cache_path, replace(config, pooling=pooling), out=out / pooling, jobs=jobs,
                             console=console, progress=progress)
        runs.append(run)
    return runs
