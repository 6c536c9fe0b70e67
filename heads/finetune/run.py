"""End-to-end fine-tuning: the folds of a corpus into a run folder, each trained on a live backbone.

The training itself is the train-head loop with a few hooks overridden
(heads/finetune/trainer.py, `FineTuneTrainer`); this module reads the corpus,
plans the folds, builds the once-per-run VAD index (heads/finetune/waves.py), and
writes, resumes or skips each fold. torchrun-aware: rank 0 writes, every rank trains.

Run folder (heads/runfolder.py): the train-head files plus, per fold, the
trained backbone weights (all of them for --full, the top K layers otherwise)
and the backbone's config and feature-extractor config, so `cli predict`
rebuilds it. Per-epoch checkpoints go to the fold's checkpoint folder and are
deleted when the fold is done.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from core.devices import resolve_device, training_autocast
from core.errors import UserError
from core.folds import Fold, plan
from core.frames import SAMPLE_RATE
from core.records import CLASSES_4, Utterance
from extract.corpora import default_max_seconds, read_corpus
from extract.models import model_slug
from heads.config import AUTO, FinetuneSettings, TrainConfig, parse_ensemble
from heads.finetune.backbone import Backbone, trainable_state
from heads.finetune.checkpoint import has_checkpoint, load_checkpoint
from heads.finetune.distributed import DistContext, barrier, init_distributed, shutdown
from heads.finetune.trainer import FineTuneTrainer, FoldInterrupted, from_checkpoint, unwrap
from heads.finetune.waves import WaveIndex, corpus_meta, load_or_build_index
from heads.runfolder import (
    BACKBONE_DIR,
    BACKBONE_FILE,
    CHECKPOINT_DIR,
    WAVE_INDEX_FILE,
    fold_dir,
    prepare_run_dir,
    read_metrics,
    sapser_version,
    save_weights,
    write_fold,
    write_run_utterances,
)
from heads.train.fold_loop import fold_line
from heads.train.folds import FoldData, fold_split, open_cache


def backbone_shape(model: str) -> tuple[Any, int, int]:
    """(frame grid, transformer layers, hidden size) from the model's config alone (no weights)."""
    from heads.finetune.backbone import model_shape

    return model_shape(model)


def default_out(corpus: Any, settings: FinetuneSettings) -> Path:
    """runs/<corpus>-<model>-<mode>, <corpus> naming the corpus as extract.corpora.corpus_slug does."""
    from extract.corpora import corpus_slug

    return Path("runs") / f"{corpus_slug(corpus)}-{model_slug(settings.model)}-{settings.mode}"


def finetune_run_config(dataset: str, root: str | Path, config: TrainConfig, settings: FinetuneSettings,
                        max_seconds: float, grid: Any, n_layers: int, hidden: int, classes: Sequence[str],
                        fold_plan: list[Fold], cache_path: str | None, ctx: DistContext) -> dict[str, Any]:
    from extract.vad import vad_settings

    ft = {**asdict(settings), "max_seconds": max_seconds}
    return {
        "mode": settings.mode,
        "model": settings.model,
        "dataset": dataset,
        # Result-affecting fine-tuning options sit in "settings" so a later --fold into
        # the same folder with other values is refused (heads.runfolder.prepare_run_dir).
        "settings": {**asdict(config), **{k: ft[k] for k in ("head_lr", "step_seconds", "amp", "max_grad_norm")}},
        "finetune": ft,
        "fingerprint": {
            "backend": "finetune", "model": settings.model, "mode": settings.mode,
            "freeze_feature_encoder": settings.freeze_feature_encoder, "dataset": dataset,
            "root": str(Path(root).resolve()), "max_seconds": max_seconds, "sample_rate": SAMPLE_RATE,
            **grid.as_dict(), "vad": vad_settings(), "vad_source": cache_path or "audio",
        },
        "classes": list(classes),
        "layers": [n_layers],  # the last hidden state
        "hidden_size": hidden,
        "folds": [asdict(f) for f in fold_plan],
        "world_size": ctx.world_size,
        "versions": {"sapser": sapser_version(), "torch": torch.__version__},
    }


@dataclass
class FinetuneResult:
    out: Path
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    unfinished: list[int] = field(default_factory=list)  # folds stopped by max_epochs_this_run
    is_main: bool = True  # rank 0 (or a single process): the one that reports


def run_finetune(dataset: str, root: str | Path, config: TrainConfig, settings: FinetuneSettings, *,
                 folds: Sequence[int] | None = None, out: str | Path | None = None, cache_path: str | None = None,
                 resume: bool = False, max_epochs_this_run: int | None = None,
                 classes: Sequence[str] = CLASSES_4, progress: bool = True, log: Callable[[str], None] = print,
                 ) -> FinetuneResult:
    """Fine-tune the given folds (None = all) of a corpus into RUN; torchrun-aware."""
    config.validate()
    settings.validate()
    if parse_ensemble(config.ensemble) not in (1, AUTO) or config.ema:  # auto: one model, the corpus's size aside
        raise UserError("fine-tuning trains one model per fold with its own weights: --ensemble and --ema are "
                        "for heads on a cache (cli train-head)")
    if max_epochs_this_run is not None and max_epochs_this_run < 1:
        raise UserError("--max-epochs-this-run must be at least 1")
    training_autocast(settings.amp, resolve_device(config.device))  # a bad --amp fails before the VAD pass
    ctx = init_distributed(config.device)
    try:
        return _run(dataset, root, config, settings, folds, out, cache_path, resume, max_epochs_this_run,
                    tuple(classes), progress, log, ctx)
    finally:
        shutdown(ctx)


def _run(dataset: str, root: str | Path, config: TrainConfig, settings: FinetuneSettings,
         folds: Sequence[int] | None, out: str | Path | None, cache_path: str | None, resume: bool,
         max_epochs_this_run: int | None, classes: tuple[str, ...], progress: bool,
         log: Callable[[str], None], ctx: DistContext) -> FinetuneResult:
    corpus = read_corpus(dataset, root, classes)
    max_seconds = settings.max_seconds if settings.max_seconds is not None else default_max_seconds(dataset)
    grid, n_layers, hidden = backbone_shape(settings.model)
    config = TrainConfig(**{**asdict(config), "layer": n_layers})
    out = Path(out) if out else default_out(corpus, settings)
    from core.folds import corpus_groups

    fold_plan = plan(corpus_groups(corpus), config.protocol)
    ks = list(folds) if folds else list(range(1, len(fold_plan) + 1))
    run_cfg = finetune_run_config(dataset, root, config, settings, max_seconds, grid, n_layers, hidden, classes,
                                  fold_plan, cache_path, ctx)
    if ctx.is_main:
        prepare_run_dir(out, run_cfg)
        cache = open_cache(cache_path) if cache_path else None
        try:
            index = load_or_build_index(out, corpus, grid, max_seconds, cache=cache, progress=progress,
                                        workers=settings.workers)
        finally:
            if cache is not None:
                cache.close()
        if index.skipped:
            log(f"{len(index.skipped)} utterances skipped (unusable audio); the rest train")
    barrier(ctx)
    if not ctx.is_main:
        index = WaveIndex.load(out / WAVE_INDEX_FILE)
    meta = corpus_meta(corpus, index)
    if ctx.is_main:
        write_run_utterances(out, meta)  # which files each fold saw: predict warns about them
    datas = {k: fold_split(meta, classes, k, config.protocol, source=f"the corpus {root}")
             for k in ks}  # every fold checked before any training
    utterances = {u.utt_id: u for u in corpus.utterances}
    result = FinetuneResult(out, is_main=ctx.is_main)
    for k in ks:
        start = time.perf_counter()
        metrics = _run_fold(k, datas[k], config, settings, utterances, index, max_seconds, out, run_cfg, resume,
                            max_epochs_this_run, ctx, log)
        if metrics is None:
            result.unfinished.append(k)
            continue
        result.metrics[k] = metrics
        if ctx.is_main:
            log(fold_line(metrics, time.perf_counter() - start))
    return result


def _run_fold(k: int, data: FoldData, config: TrainConfig, settings: FinetuneSettings,
              utterances: dict[str, Utterance], index: WaveIndex, max_seconds: float, out: Path,
              run_cfg: dict[str, Any], resume: bool, max_epochs_this_run: int | None, ctx: DistContext,
              log: Callable[[str], None]) -> dict[str, Any] | None:
    """Train, test and write fold k; None when stopped early by max_epochs_this_run."""
    folder = fold_dir(out, k)
    ckpt_dir = folder / CHECKPOINT_DIR
    done = read_metrics(folder)
    if done is not None:  # written last: the fold is complete
        if resume:
            if ctx.is_main:
                shutil.rmtree(ckpt_dir, ignore_errors=True)  # a kill while it was being deleted
            return done
        raise UserError(f"{folder} is already trained; pass --resume to skip finished folds or choose another --out")
    if has_checkpoint(ckpt_dir) and not resume:
        raise UserError(f"{folder} holds the checkpoint of an interrupted run; pass --resume to continue it "
                        "or delete that folder to start over")
    trainer = FineTuneTrainer(config, data, settings=settings, utterances=utterances, index=index,
                              max_seconds=max_seconds, ctx=ctx, checkpoint_dir=ckpt_dir,
                              max_epochs_this_run=max_epochs_this_run)
    if resume and has_checkpoint(ckpt_dir):
        trainer.load_state_dict(from_checkpoint(load_checkpoint(ckpt_dir)))
        if ctx.is_main:
            log(f"fold {k:02d}: resuming after epoch {trainer.epoch}")
    try:
        result = trainer.run()
    except FoldInterrupted as stop:
        if ctx.is_main:
            log(f"fold {k:02d}: stopped after epoch {stop.args[0]} as asked; rerun with --resume to continue")
        return None
    if ctx.is_main:
        model = unwrap(trainer.model)
        # The backbone first: write_fold writes metrics.json last, and a fold with metrics.json is
        # finished, so a kill between the two must not leave a finished fold without its backbone.
        save_backbone(folder, model.backbone, run_cfg)
        write_fold(out, result.metrics, result.test, data.classes, run_cfg, heads=[model.head.state_dict()],
                   histories=[result.history])
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # ~3x the model size; the fold's outputs replace it
    barrier(ctx)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next fold loads a fresh backbone
    return result.metrics


def save_backbone(folder: Path, backbone: Backbone, run_cfg: dict[str, Any]) -> None:
    """The fold's trained backbone weights and the configs to rebuild it."""
    save_weights(folder / BACKBONE_FILE, trainable_state(backbone),
                 metadata={"mode": run_cfg["mode"], "model": run_cfg["model"]})
    cfg_dir = folder / BACKBONE_DIR
    backbone.model.config.save_pretrained(cfg_dir)
    try:
        from transformers import AutoFeatureExtractor

        AutoFeatureExtractor.from_pretrained(run_cfg["model"]).save_pretrained(cfg_dir)
    except (OSError, ValueError):
        pass  # no preprocessor config: predict falls back to the same defaults as training
