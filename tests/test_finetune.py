"""End-to-end fine-tuning on a tiny WavLM and a small synthetic corpus: learning, outputs, checkpoints, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.errors import UserError
from core.frames import SSL_GRID
from core.records import SKIP_REASONS, Utterance
from extract.audio import load_audio
from extract.backends import zero_mean_unit_var
from extract.corpora import read_corpus
from extract.synthetic import generate
from extract.vad import vad_masks
from heads.config import FinetuneSettings, finetune_config
from heads.finetune.backbone import BackboneSettings, load_backbone, normalize_waves, trainable_state
from heads.finetune.checkpoint import STATE_FILE, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from heads.finetune.distributed import DistContext
from heads.finetune.run import run_finetune
from heads.finetune.trainer import FineTuneTrainer
from heads.finetune.waves import MicroBatch, StepBatchSampler, build_wave_index, corpus_meta
from heads.model.head import SERHead
from heads.train.folds import fold_split
from heads.train.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """4 speakers (2 sessions) x 6 short utterances: fold 1 trains on 12, validates on 6, tests on 6."""
    root = tmp_path_factory.mktemp("ft-corpus")
    return generate(root, seed=0, n_sessions=2, utts_per_speaker=6, speech_seconds=(0.5, 0.9),
                    silence_seconds=(0.1, 0.4))


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Path:
    return tiny_dir


def settings(tiny: Path, **kw) -> FinetuneSettings:
    base = dict(model=str(tiny), full=True, head_lr=1e-2, step_seconds=4.0, workers=0, grad_checkpointing=False)
    return FinetuneSettings(**{**base, **kw})


def config(**kw):
    return finetune_config(**{**dict(epochs=2, batch_size=4, lr=1e-3, seed=0, device="cpu"), **kw})


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def full_run(corpus, tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    result = run_finetune("manifest", corpus, config(), settings(tiny), folds=[1], out=out, progress=False, log=quiet)
    assert result.unfinished == [] and 1 in result.metrics
    return out


def history(run: Path) -> list[dict]:
    with (run / "fold-01" / "history.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_training_loss_goes_down(full_run):
    rows = history(full_run)
    assert len(rows) == 2
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])


def test_run_folder_has_the_train_head_contract_plus_the_backbone(full_run):
    cfg = json.loads((full_run / "config.json").read_text())
    assert cfg["mode"] == "finetune-full" and cfg["settings"]["lr"] == 1e-3
    assert cfg["layers"] == [2]  # the last hidden state of the 2-layer model
    fold = full_run / "fold-01"
    metrics = json.loads((fold / "metrics.json").read_text())
    for key in ("fold", "test_speaker", "val_speaker", "labels", "ua", "wa", "macro_f1", "recall", "confusion",
                "valence_mae", "arousal_mae", "valence_ccc", "arousal_ccc", "best_epoch", "no_speech", "n_test"):
        assert key in metrics
    assert metrics["n_test"] == 6
    with (fold / "predictions.csv").open() as fh:
        header = next(csv.reader(fh))
    assert header[:3] == ["utt_id", "true", "pred"] and "prob_angry" in header and "valence_true" in header
    # The whole backbone (--full) is saved and loads strictly into the saved architecture.
    rebuilt = load_backbone(BackboneSettings(model=str(fold / "backbone"), full=True, grad_checkpointing=False),
                            from_config_dir=fold / "backbone")
    rebuilt.model.load_state_dict(load_file(str(fold / "model.safetensors")), strict=True)
    head = SERHead(cfg["hidden_size"], 1, 4)
    head.load_state_dict(load_file(str(fold / "head.safetensors")))
    assert not (fold / "checkpoint").exists()  # removed once the fold is done


def test_the_only_statistic_fine_tuning_fits_is_the_training_speakers_target_scale(corpus, full_run):
    """Fine-tuning fits no input or pooled statistics (the backbone moves); its valence/arousal scale (and
    its class weights, heads/train/trainer.py) come from the training speakers alone (issue 27)."""
    cfg = json.loads((full_run / "config.json").read_text())
    train = set(cfg["folds"][0]["train"])
    with corpus.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["speaker"] in train]
    va = np.array([[float(r["valence"]), float(r["arousal"])] for r in rows])  # (N, 2)
    stored = load_file(str(full_run / "fold-01" / "head.safetensors"))
    np.testing.assert_allclose(stored["va_mean"].numpy(), va.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stored["va_std"].numpy(), va.std(axis=0), rtol=1e-6)
    assert not any(k.startswith(("norm.", "pooled_norm.")) for k in stored)  # nothing else was fitted


def test_head_modules_are_the_train_head_classes(corpus, tiny):
    corp = read_corpus("manifest", corpus)
    index = build_wave_index(corp.utterances, load_backbone(BackboneSettings.of(settings(tiny))).grid, 0.0)
    meta = corpus_meta(corp, index)
    data = fold_split(meta, corp.classes, 1, source=str(corpus))
    trainer = FineTuneTrainer(config(), data, settings=settings(tiny), index=index, max_seconds=0.0,
                              utterances={u.utt_id: u for u in corp.utterances})
    assert isinstance(trainer, Trainer)
    head = trainer.head(trainer.model)
    reference = SERHead(head.input_size, 1, 4, pooling="sr")  # what train-head builds for one layer
    assert type(head) is SERHead
    assert [type(m) for m in head.modules()] == [type(m) for m in reference.modules()]
    assert [n for n, _ in head.named_parameters()] == [n for n, _ in reference.named_parameters()]
    groups = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}  # before warm-up scaling
    assert groups == {"backbone": 1e-3, "head": 1e-2}


def test_resume_after_an_interruption_equals_the_uninterrupted_run(corpus, tiny, full_run, tmp_path):
    out = tmp_path / "resumed"
    first = run_finetune("manifest", corpus, config(), settings(tiny), folds=[1], out=out, progress=False, log=quiet,
                         max_epochs_this_run=1)
    assert first.unfinished == [1] and not (out / "fold-01" / "metrics.json").exists()
    ckpt = out / "fold-01" / "checkpoint"
    state = torch.load(ckpt / "epoch-0001" / STATE_FILE, weights_only=True)  # plain data only
    assert state["epoch"] == 1 and "optimizer" in state and "scheduler" in state and "rng_all" in state
    assert load_checkpoint(ckpt).model  # safetensors weights, tagged with the same epoch
    # a kill between renaming a checkpoint into place and deleting the previous one leaves two complete ones:
    # an older one (here: epoch 0, zeroed weights) beside epoch 1 must not be what the run resumes from
    older = load_checkpoint(ckpt)
    older.epoch, older.best, older.best_epoch = 0, None, None
    older.model = {k: torch.zeros_like(v) for k, v in older.model.items()}
    save_checkpoint(tmp_path / "scratch", older).rename(ckpt / "epoch-0000")
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-0000", "epoch-0001"]
    with pytest.raises(UserError, match="--resume"):
        run_finetune("manifest", corpus, config(), settings(tiny), folds=[1], out=out, progress=False, log=quiet)
    second = run_finetune("manifest", corpus, config(), settings(tiny), folds=[1], out=out, progress=False,
                          log=quiet, resume=True)
    assert second.unfinished == []
    for name in ("metrics.json", "predictions.csv", "history.csv"):
        assert (out / "fold-01" / name).read_text() == (full_run / "fold-01" / name).read_text(), name


def test_top_k_mode_trains_only_the_top_layers(tiny):
    backbone = load_backbone(BackboneSettings(model=str(tiny), full=False, top_layers=1))
    trained = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("encoder.layers.1.", "encoder.layer_norm.")) for n in trained)
    assert set(trainable_state(backbone)) == trained
    with pytest.raises(UserError, match="--top-layers"):
        load_backbone(BackboneSettings(model=str(tiny), full=False, top_layers=3))


def test_layerdrop_is_off_under_ddp_and_gradient_checkpointing(tiny):
    def layerdrop(**kw) -> float:
        return load_backbone(BackboneSettings(model=str(tiny), full=True, **kw)).model.config.layerdrop

    assert layerdrop(grad_checkpointing=False, distributed=False) == pytest.approx(0.1)  # the checkpoint's value
    assert layerdrop(grad_checkpointing=True, distributed=False) == 0.0
    assert layerdrop(grad_checkpointing=False, distributed=True) == 0.0


def test_steps_keep_the_batch_and_micro_batches_keep_the_budget():
    rng = np.random.default_rng(0)
    n_samples = rng.integers(8_000, 19 * 16_000, size=150)
    sampler = StepBatchSampler(n_samples, batch_size=64, step_seconds=60.0, shuffle=True, seed=3)
    sampler.set_epoch(1)
    steps = sampler.steps()
    assert [sum(len(mb) for mb in s) for s in steps] == [64, 64, 22]
    for step in steps:
        assert sum(mb.share for mb in step) == pytest.approx(1.0)
        # each micro-batch weighs its share of the step's utterances, not 1 / (micro-batches in the step)
        assert [mb.share for mb in step] == pytest.approx([len(mb) / sum(map(len, step)) for mb in step])
        assert [mb.step_end for mb in step] == [False] * (len(step) - 1) + [True]
        for mb in step:
            assert len(mb) == 1 or n_samples[list(mb)].max() * len(mb) <= 60 * 16_000
    assert sorted(i for s in steps for mb in s for i in mb) == list(range(150))
    assert all(len({len(mb) for mb in s}) > 1 for s in steps)  # so the share check above means something
    again = StepBatchSampler(n_samples, batch_size=64, step_seconds=60.0, shuffle=True, seed=3)
    again.set_epoch(1)
    assert again.steps() == steps  # the epoch alone decides the order (resume at epoch granularity)
    again.set_epoch(2)
    assert again.steps() != steps


def test_ranks_split_each_step_and_together_weigh_one():
    n_samples = np.full(131, 16_000)
    ranks = []
    for r in range(2):
        s = StepBatchSampler(n_samples, batch_size=64, step_seconds=10.0, shuffle=True, seed=0,
                             ctx=DistContext(rank=r, world_size=2))
        ranks.append(s.steps())
    assert len(ranks[0]) == len(ranks[1]) == 3
    for a, b in zip(*ranks):
        ia = {i for mb in a for i in mb}
        ib = {i for mb in b for i in mb}
        assert not ia & ib
        # DDP averages over ranks: (sum of shares on all ranks) / world_size = 1
        assert (sum(mb.share for mb in a) + sum(mb.share for mb in b)) / 2 == pytest.approx(1.0)
    tail = StepBatchSampler(np.full(65, 16_000), batch_size=64, step_seconds=10.0, shuffle=False,
                            ctx=DistContext(rank=1, world_size=2))
    assert tail.n_steps() == 1  # a 1-utterance tail cannot feed 2 ranks: dropped, not hung


def test_on_device_normalization_equals_the_extractors():
    waves = [np.random.default_rng(i).standard_normal(n).astype(np.float32) * 0.1 for i, n in enumerate((900, 1600))]
    batch = torch.zeros(2, 1600)
    mask = torch.zeros(2, 1600, dtype=torch.bool)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
        mask[i, : len(w)] = True
    out = normalize_waves(batch, mask)
    for i, w in enumerate(waves):
        np.testing.assert_allclose(out[i, : len(w)].numpy(), zero_mean_unit_var(w), atol=1e-5)
    assert out[0, 900:].abs().max() == 0


def test_rng_state_survives_weights_only(tmp_path):
    np.random.seed(1)
    torch.manual_seed(2)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn()) == expected


def test_clips_shorter_than_a_specaugment_span_still_train(tiny):
    backbone = load_backbone(BackboneSettings(model=str(tiny), full=True, grad_checkpointing=False)).train()
    waves = torch.randn(2, 2400)  # 7 frames < mask_time_length 10: HF's SpecAugment alone would raise
    hidden, mask = backbone(waves, torch.ones_like(waves, dtype=torch.bool))
    hidden.sum().backward()
    assert hidden.shape[1] == 7 and mask.all()
    assert backbone.model.masked_spec_embed.grad is not None  # still in the graph (DDP needs every parameter)


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_step(corpus, tiny):
    """A step cut into micro-batches (each weighted by its share) must train as its whole batch at once."""
    corp = read_corpus("manifest", corpus)
    index = build_wave_index(corp.utterances, load_backbone(BackboneSettings.of(settings(tiny))).grid, 0.0)
    meta = corpus_meta(corp, index)
    data = fold_split(meta, corp.classes, 1, source=str(corpus))
    trainer = FineTuneTrainer(config(batch_size=8), data, settings=settings(tiny, step_seconds=2.5), index=index,
                              max_seconds=0.0, utterances={u.utt_id: u for u in corp.utterances})
    # With equal class weights the CE is a plain mean, so the equality is exact for every term (a weighted
    # CE normalizes per micro-batch: the documented approximation of heads/finetune/trainer.py's backward).
    trainer.loss_fn.weights.fill_(1.0)
    trainer.model.eval()  # no dropout or SpecAugment: both passes compute the same function
    loader = trainer.loaders["train"]
    loader.batch_sampler.set_epoch(1)
    step = loader.batch_sampler.steps()[0]
    assert len(step) >= 3 and sum(len(mb) for mb in step) == 8  # the budget really cuts the step
    assert len({len(mb) for mb in step}) > 1  # into unequal micro-batches: equal weights would be wrong here

    def gradient(micro_batches) -> list[torch.Tensor]:
        trainer.optimizer.zero_grad(set_to_none=True)
        for mb in micro_batches:
            batch = loader.collate_fn(loader.dataset.__getitems__(mb))
            trainer.backward(trainer.loss(trainer.forward(batch), batch).total, batch)
        return [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]

    accumulated = gradient(step)
    whole = gradient([MicroBatch(tuple(i for mb in step for i in mb), step_end=True, share=1.0)])
    assert len(accumulated) == len(whole) > 0
    for a, w in zip(accumulated, whole):
        torch.testing.assert_close(a, w, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_vad_pre_pass_reads_through_the_extraction_loader(corpus, tmp_path, workers):
    """The index the pre-pass builds (in a thread or in audio processes) holds each utterance's own
    masks and length, in corpus order, and skips what extraction skips, for its reasons."""
    utterances = read_corpus("manifest", corpus).utterances
    missing = Utterance("zz_missing", str(tmp_path / "nope.wav"), "S9", "S9", "angry")
    index = build_wave_index([*utterances, missing], SSL_GRID, 0.0, workers=workers)
    assert index.skipped == {"zz_missing": "missing_audio"} and set(index.skipped.values()) <= set(SKIP_REASONS)
    assert index.utt_ids == [u.utt_id for u in utterances]
    for u in utterances:
        samples = load_audio(u.path).samples
        assert index.samples_of([u.utt_id])[0] == len(samples)
        expected = vad_masks(samples, SSL_GRID)  # (4, T)
        for mode in range(4):
            np.testing.assert_array_equal(index.vad(u.utt_id, mode), expected[mode])
