"""Train a group of folds of one cache as one computation and write each fold when its heads are done.

Per fold: its inputs are prepared once (heads/train/fold_inputs.py), its
`--ensemble` members are heads of the stack (heads/train/stack.py) beside every
other fold's, and as soon as a fold's heads have all stopped, each is tested on
the test speaker through its full path (`SERHead.forward` on every cached
layer, what `cli predict` runs), the members are averaged
(heads/train/ensemble.py) and the fold folder is written (heads/runfolder.py).
A killed run therefore keeps every fold written before the kill.

Folds are grouped so that their SAP frames fit the memory budget together
(`groups`); `--layer-weights joint`, which learns the layer mix at every step
from every layer of every frame, trains one head at a time
(heads/train/feature_trainer.py) instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from cache.reader import FeatureCache
from core.devices import resolve_device
from core.errors import UserError
from core.heap import ordinary_heap
from heads.config import TrainConfig, heads_for
from heads.evaluate.metrics import fold_scores
from heads.model.head import SERHead
from heads.model.loss import MTLLoss
from heads.runfolder import Predictions, trained_outputs
from heads.train.batches import make_loader, resident_copy
from heads.train.ensemble import combine
from heads.train.feature_trainer import FeatureTrainer
from heads.train.fold_inputs import FoldInputs, cache_moments, prepare_fold, prepare_fold_from_moments
from heads.train.folds import FoldData, fold_data
from heads.train.stack import Stack
from heads.train.trainer import FoldResult


def seeds_of(config: TrainConfig, data: FoldData) -> list[int]:
    """The seeds of a fold's heads: `config.seed` upwards, as many as `--ensemble` gives the fold."""
    return [config.seed + i for i in range(heads_for(config.ensemble, len(data.train)))]


def stacked(config: TrainConfig, layers: list[int]) -> bool:
    """Whether these settings train as a stack (every setting but a layer mix learned at every step)."""
    return not (config.layer_weights == "joint" and len(layers) > 1)


def groups(cache: FeatureCache, ks: list[int], config: TrainConfig, layers: list[int]) -> list[list[int]]:
    """The folds in groups whose SAP frames fit `--memory-gb` beside the preloaded features (at least one fold each).

    A fold's frames are at most its training and validation frames, 2 bytes each (4 under `--norm none`).
    The folds of a one-layer read share one copy of the frames (heads/train/fold_inputs.py `cache_moments`),
    so a group holds each of its utterances once; a read of several layers holds a copy per fold (per seed
    under `--layer-weights pooled`), each mixed by the fold's own layer weights.
    """
    width = 4 if config.norm == "none" else 2
    budget = max(0, int(config.memory_gb * 2**30) - (getattr(cache, "preloaded_bytes", 0) or 0))
    frames = cache.meta["n_frames"]
    shared = len(layers) == 1
    out: list[list[int]] = [[]]
    held: set[str] = set()
    used = 0
    for k in ks:
        data = fold_data(cache, k, config.protocol)
        ids = data.train + data.val

        def need() -> int:
            if shared:
                return width * int(cache.hidden_size) * int(frames.loc[[u for u in ids if u not in held]].sum())
            copies = len(seeds_of(config, data)) if config.layer_weights == "pooled" and len(layers) > 1 else 1
            return copies * width * int(cache.hidden_size) * int(frames.loc[ids].sum())

        more = need()
        if out[-1] and used + more > budget:
            out.append([])
            held, used = set(), 0
            more = need()
        out[-1].append(k)
        held.update(ids)
        used += more
    return out


def train_group(cache: FeatureCache, ks: list[int], config: TrainConfig, layers: list[int], *,
                write: Callable[[int, FoldResult, FoldData, list[SERHead], list[list[dict]]], None],
                on_epoch: Callable[[int], None] | None = None) -> None:
    """Train folds `ks` of an open (possibly preloaded) cache together; `write(k, result, data, heads, histories)` each fold
    as soon as it is done. `on_epoch(n)`: n head-epochs done (run or skipped by early stopping)."""
    device = resolve_device(config.device)
    datas = {k: fold_data(cache, k, config.protocol) for k in ks}
    try:
        if not stacked(config, layers):
            for k in ks:
                write(k, *_one_at_a_time(cache, datas[k], config, layers, on_epoch))
            return
        inputs: list[FoldInputs] = []
        heads: list[tuple[int, int]] = []
        fold_of: list[int] = []
        moments = None
        if len(layers) == 1:  # read every utterance once for all folds (heads/train/fold_inputs.py)
            ids = sorted({u for d in datas.values() for u in d.train + d.val})
            budget = max(0, int(config.memory_gb * 2**30) - (getattr(cache, "preloaded_bytes", 0) or 0))
            moments = cache_moments(cache, ids, layers[0], config.norm, config.vad_mode, device, budget)
        for k in ks:
            seeds = seeds_of(config, datas[k])
            per_seed = config.layer_weights == "pooled" and len(layers) > 1  # a seeded stage finds the weights
            for i, seed in enumerate(seeds):
                if moments is not None and i == 0:
                    inputs.append(prepare_fold_from_moments(moments, cache, datas[k], config, device))
                elif per_seed or i == 0:
                    inputs.append(prepare_fold(cache, datas[k], config, layers, seed=seed, device=device))
                heads.append((len(inputs) - 1, seed))
                fold_of.append(k)
        stack = Stack(inputs, heads, device)
        written: set[int] = set()
        resident = resident_copy(cache, device)

        def finished(h: int) -> None:
            k = fold_of[h]
            mine = [i for i, f in enumerate(fold_of) if f == k]
            if k in written or not all(stack.states[i].done for i in mine):
                return
            models = [stack.head(i) for i in mine]
            with ordinary_heap():  # whole utterances of every length: core/heap.py
                results = [test(stack, i, models[j], cache, layers, resident) for j, i in enumerate(mine)]
            seeds = [stack.states[i].seed for i in mine]
            write(k, combine(results, seeds, datas[k].classes), datas[k], models, [r.history for r in results])
            written.add(k)

        def epoch_done(h: int, row: dict[str, float]) -> None:
            s = stack.states[h]
            if on_epoch:
                on_epoch(1 + (row["epochs"] - s.epoch if s.done else 0))
            if s.done:
                finished(h)

        stack.train(on_epoch=epoch_done)
    except OSError as err:  # h5py reports unreadable chunks as OSError
        raise UserError(f"the cache {cache.path} could not be read during training of fold(s) "
                        f"{', '.join(map(str, ks))} ({err}); it may be corrupted") from None


@torch.no_grad()
def test(stack: Stack, h: int, head: SERHead, cache: FeatureCache, layers: list[int],
         resident: torch.Tensor | None) -> FoldResult:
    """Head h on its fold's test speaker through the full path, with the metrics a fold records."""
    s = stack.states[h]
    fold = stack.folds[s.fold]
    data, config, device = fold.data, fold.config, stack.device
    loader = make_loader(cache, data.test, layers=layers, vad_mode=config.vad_mode, batch_size=config.batch_size,
                         shuffle=False, seed=config.seed, resident=resident)
    pred = predict_split(head, loader, MTLLoss(fold.class_weights, config.alpha, config.beta, config.gamma), device)
    metrics = {
        "fold": data.fold.fold, "test_speaker": data.fold.test_speaker, "val_speaker": data.fold.val_speaker,
        "labels": list(data.classes), **fold_scores(pred.emotion, pred.probs, pred.va_true, pred.va, data.classes),
        "best_epoch": s.early.best_epoch, "epochs_run": s.epoch, "plan": fold.plan.as_dict(),
        "no_speech": int(pred.no_speech.sum()), "n_test": len(pred.utt_id),
        "n_train": len(data.train), "n_val": len(data.val), "test_loss": pred.loss,
        "outputs": trained_outputs(data.labels.loc[data.train]),  # what predict may report
    }
    if head.mix.logits is not None:
        metrics["layer_weights"] = dict(zip([str(x) for x in layers], head.mix.weights().tolist()))
    metrics.update(fold.info)
    return FoldResult(metrics, list(s.history), pred)


def predict_split(head: SERHead, loader: Any, loss_fn: MTLLoss, device: torch.device) -> Predictions:
    """A split's outputs through `SERHead.forward`, and its total loss over all of it at once."""
    loss_fn = loss_fn.to(device)
    ids, logits, va, emo, va_true, raw, flags = [], [], [], [], [], [], []
    for batch in loader:
        out = head(batch["features"].to(device).float(), batch["padding_mask"].to(device), batch["vad_mask"].to(device))
        truth = torch.stack([batch["valence"], batch["arousal"]], dim=1).float()
        ids += list(batch["utt_id"])
        logits.append(out.logits.float())
        va.append(out.va.float())
        emo.append(batch["emotion"].to(device))
        va_true.append(head.scale_targets(truth.to(device)))
        raw.append(truth.double())
        flags.append(out.no_speech)
    logits_t, va_t, emo_t, va_true_t = (torch.cat(x) for x in (logits, va, emo, va_true))
    return Predictions(utt_id=ids, probs=torch.softmax(logits_t, dim=1).cpu().numpy(),
                       va=head.to_corpus_scale(va_t).cpu().numpy(), emotion=emo_t.cpu().numpy(),
                       va_true=torch.cat(raw).numpy(), no_speech=torch.cat(flags).cpu().numpy(),
                       loss=loss_fn(logits_t, va_t, emo_t, va_true_t).total.item())


def _one_at_a_time(cache: FeatureCache, data: FoldData, config: TrainConfig, layers: list[int],
                   on_epoch: Callable[[int], None] | None
                   ) -> tuple[FoldResult, FoldData, list[SERHead], list[list[dict]]]:
    """`--layer-weights joint`: each member trained by the single-head trainer, then averaged."""
    seeds = seeds_of(config, data)
    results, models = [], []
    for seed in seeds:
        trainer = FeatureTrainer(replace(config, seed=seed), data, cache=cache, layers=layers,
                                 on_epoch=None if on_epoch is None else (lambda row: on_epoch(1)))
        results.append(trainer.run())
        if on_epoch:
            on_epoch(trainer.plan.epochs - trainer.epoch)  # the epochs early stopping skipped
        models.append(trainer.model)
        del trainer
    return combine(results, seeds, data.classes), data, models, [r.history for r in results]


def planned_epochs(cache: FeatureCache, ks: list[int], config: TrainConfig) -> int:
    """Head-epochs the folds plan (their members' planned epochs added up): the progress bar's total."""
    from heads.train.step_plan import step_plan

    total = 0
    for k in ks:
        data = fold_data(cache, k, config.protocol)
        plan = step_plan(len(data.train), config.batch_size, config.epochs, config.patience, config.min_steps,
                         config.grad_accum)
        total += plan.epochs * len(seeds_of(config, data))
    return total

