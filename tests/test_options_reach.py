"""Every option reaches its use (issue 27), tested at a value other than its default, chosen so that falling
back to the default changes the outcome (each test also asserts that it would):

- `--vad-mode` through train-head (test split, SAP), the baseline, and predict (the run's mode, not 3);
- `--frames` of the baseline, in its fit and in predict;
- `--protocol` through predict (which folds trained on a file), the report's baseline pairing and title,
  and the baseline;
- the audio length a head-only run was extracted with (`--max-seconds`) in predict, and `--device`;
- gradient accumulation with the step minimum: the plan, and the schedule the stack follows;
- early stopping's patience as the step plan grows it;
- which checkpoint a resume loads when two complete ones exist.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_runner import cli
from head_fixtures import make_cache
from safetensors.torch import load_file

from cache.reader import FeatureCache
from extract.vad import speech_ratio, vad_masks
from heads.config import BaselineConfig, TrainConfig
from heads.evaluate.compare import find_baselines
from heads.evaluate.report import render_table, summarize
from heads.finetune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from heads.predict import BaselinePredictor, Ensemble, Predictor
from heads.runfolder import BASELINE_FILE, read_predictions
from heads.train.baseline import LinearModel, cache_statistics, run_baseline
from heads.train.fold_inputs import build_head
from heads.train.fold_loop import train_folds
from heads.train.folds import fold_data
from heads.train.step_plan import MAX_EPOCH_FACTOR, MIN_BATCH, step_plan
from heads.train.trainer import EarlyStop, lr_factor

SETTINGS = dict(epochs=1, batch_size=16, lr=3e-3, heads=2, proj_dim=8, device="cpu", min_steps=0, ensemble=1)
GRIDS = dict(c_grid=(0.1,), alpha_grid=(10.0,))  # the baseline's choice on the validation speaker is not under test


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The varied corpus: VAD modes 0-3 each their own mask; every 5th utterance has no speech in mode 3 only."""
    return make_cache(tmp_path_factory.mktemp("options") / "v.h5", varied=True, seed=5, per_class=3,
                      no_speech_every=5)


def no_speech(fc: FeatureCache, ids: list[str], mode: int) -> int:
    return sum(not fc.vad(u, mode).any() for u in ids)


# ---- --vad-mode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [dict(layer=2, pooling="sap"), dict(layer_weights="joint", pooling="sap")],
                         ids=["stack", "single-head"])
def test_train_head_tests_with_the_vad_mode_it_was_given(cache, tmp_path, settings):
    run, (m,) = train_folds(cache, config(vad_mode=1, **settings), folds=[2], out=tmp_path / "run", progress=False)
    fold = run / "fold-02"
    with FeatureCache(cache) as fc:
        test = fold_data(fc, 2).test
        assert m["no_speech"] == no_speech(fc, test, 1) != no_speech(fc, test, 3)
        layers = [2] if "layer" in settings else [0, 1, 2]
        head = build_head(config(**settings), (len(layers), int(fc.hidden_size)), len(fc.classes))
        head.load_state_dict(load_file(str(fold / "head.safetensors")))
        head.eval()
        pred = read_predictions(fold).set_index("utt_id")
        moved = 0.0
        for u in test:  # SAP attends among mode 1's speech frames at test time too
            x = torch.from_numpy(fc.features(u, layers).astype(np.float32))[None]
            pad = torch.ones(1, x.shape[1], dtype=torch.bool)
            with torch.no_grad():
                probs = {mode: torch.softmax(head(x, pad, torch.from_numpy(fc.vad(u, mode))[None]).logits, 1)[0]
                         for mode in (1, 3)}
            row = pred.loc[u, [f"prob_{c}" for c in fc.classes]].to_numpy(np.float64)
            np.testing.assert_allclose(row, probs[1].numpy(), atol=2e-5)
            moved = max(moved, float((probs[3] - probs[1]).abs().max()))
        assert moved > 1e-3  # mode 3's masks would have given other probabilities


def baseline_scaler(run: Path, fold: int = 1) -> np.ndarray:
    return LinearModel.load(run / f"fold-{fold:02d}" / BASELINE_FILE).mean


def training_stats(fc: FeatureCache, *, frames: str, mode: int) -> np.ndarray:
    stats, _ = cache_statistics(fc, fold_data(fc, 1).train, [2], statistics="mean+std", frames=frames,
                                vad_mode=mode)
    return stats.astype(np.float64).mean(axis=0)


def test_the_baseline_takes_its_frames_and_vad_mode_from_its_options(cache, tmp_path):
    code, out = cli("baseline", "--cache", cache, "--fold", 1, "--layer", 2, "--frames", "all", "--vad-mode", 1,
                    "--out", tmp_path / "all", "--quiet")
    assert code == 0, out
    speech, _ = run_baseline(cache, BaselineConfig(layer=2, vad_mode=1, **GRIDS), folds=[1], out=tmp_path / "speech1",
                             progress=False)
    with FeatureCache(cache) as fc:
        want = {(f, m): training_stats(fc, frames=f, mode=m) for f, m in (("all", 1), ("speech", 1), ("speech", 3))}
        test = fold_data(fc, 1).test
        counts = {mode: no_speech(fc, test, mode) for mode in (1, 3)}
    settings = json.loads((tmp_path / "all" / "config.json").read_text())["settings"]
    assert (settings["frames"], settings["vad_mode"]) == ("all", 1)
    np.testing.assert_allclose(baseline_scaler(tmp_path / "all"), want["all", 1], rtol=1e-9)
    np.testing.assert_allclose(baseline_scaler(speech), want["speech", 1], rtol=1e-9)
    assert not np.allclose(want["speech", 1], want["speech", 3]) and not np.allclose(want["all", 1], want["speech", 1])
    for run in (tmp_path / "all", speech):
        m = json.loads((run / "fold-01" / "metrics.json").read_text())
        assert m["no_speech"] == counts[1] != counts[3]


# ---- predict: the run's VAD mode, --frames, max seconds, --protocol, --device --------------------------


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """A synthetic audio corpus of 3 sessions and its fbank cache, extracted with the first 1.5 s only."""
    from extract.pipeline import run_extract
    from extract.synthetic import generate

    root = tmp_path_factory.mktemp("options-audio")
    manifest = generate(root / "corpus", seed=6, n_sessions=3, utts_per_speaker=3, speech_seconds=(0.6, 1.2),
                        silence_seconds=(0.2, 0.5))
    cache = root / "fbank.h5"
    run_extract("manifest", manifest, out=cache, model="fbank", device="cpu", workers=0, progress=False,
                max_seconds=1.5)
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    files = {r["utt_id"]: manifest.parent / r["path"] for r in rows}
    return cache, files, {r["utt_id"]: r["session"] for r in rows}


def check_predicts_its_csv(predictor, fold: Path, files: dict[str, Path], mode: int, atol: float) -> None:
    pred = read_predictions(fold)
    truncated = 0
    for row in pred.itertuples():
        got = predictor.predict_one(files[row.utt_id])
        assert got.ok, got.error
        np.testing.assert_allclose([got.probs[c] for c in predictor.classes],
                                   [getattr(row, f"prob_{c}") for c in predictor.classes], atol=atol)
        import soundfile as sf

        samples, _ = sf.read(str(files[row.utt_id]), dtype="float32")
        cut = samples[: round(1.5 * 16000)]
        assert got.truncated == (len(samples) > len(cut)) and got.seconds == pytest.approx(len(cut) / 16000)
        assert got.speech_ratio == pytest.approx(speech_ratio(vad_masks(cut, predictor.encoder.grid)[mode]))
        truncated += got.truncated
    assert truncated  # some test files are longer than the 1.5 s the cache kept


def test_predict_uses_the_runs_vad_mode_and_audio_length(audio, tmp_path):
    cache, files, _ = audio
    run, _ = train_folds(cache, config(pooling="sap", vad_mode=0, epochs=2), folds=[1], out=tmp_path / "sap0",
                         progress=False)
    predictor = Predictor(run / "fold-01")
    assert predictor.vad_mode == 0
    check_predicts_its_csv(predictor, run / "fold-01", files, 0, atol=2e-3)
    wav = files[read_predictions(run / "fold-01")["utt_id"][0]]
    zero = predictor.predict_one(wav)
    predictor.vad_mode = 3  # what a fallback to the default would give: another speech ratio and other scores
    three = predictor.predict_one(wav)
    assert zero.speech_ratio != three.speech_ratio
    assert max(abs(zero.probs[c] - three.probs[c]) for c in predictor.classes) > 1e-4


@pytest.mark.parametrize("frames, mode", [("speech", 0), ("all", 0)])
def test_baseline_predict_uses_the_runs_frames_and_vad_mode(audio, tmp_path, frames, mode):
    cache, files, _ = audio
    run, _ = run_baseline(cache, BaselineConfig(frames=frames, vad_mode=mode, **GRIDS), folds=[1], out=tmp_path / "b",
                          progress=False)
    predictor = BaselinePredictor(run / "fold-01")
    assert (predictor.frames, predictor.vad_mode) == (frames, mode)
    check_predicts_its_csv(predictor, run / "fold-01", files, mode, atol=1e-5)
    swapped = BaselineConfig(frames="all" if frames == "speech" else "speech", vad_mode=3, **GRIDS)
    other, _ = run_baseline(cache, swapped, folds=[1], out=tmp_path / "other", progress=False)
    assert not np.allclose(read_predictions(run / "fold-01")["prob_angry"],
                           read_predictions(other / "fold-01")["prob_angry"])  # the options change the scores


def test_predict_and_report_follow_the_runs_fold_plan(audio, tmp_path):
    """A leave-one-session-out run: predict flags the files of the folds' training and validation sessions, the
    report titles it and pairs it only with a baseline on the same plan."""
    cache, files, session = audio
    runs = tmp_path / "runs"
    head, _ = train_folds(cache, config(protocol="session"), folds=[1, 2], out=runs / "sr", progress=False)
    same, _ = run_baseline(cache, BaselineConfig(protocol="session", **GRIDS), folds=[1, 2], out=runs / "base-session",
                           progress=False)
    run_baseline(cache, BaselineConfig(**GRIDS), folds=[1, 2], out=runs / "base-speaker", progress=False)
    assert [b.path.name for b in find_baselines(head)] == ["base-session"]
    m = json.loads((same / "fold-01" / "metrics.json").read_text())
    assert (m["test_speaker"], m["val_speaker"]) == ("S01", "S02")
    assert set(read_predictions(same / "fold-01")["utt_id"].map(session)) == {"S01"}
    table = render_table([summarize(head)])
    assert str(table.title).startswith("Leave-one-session-out")
    assert str(render_table([summarize(runs / "base-speaker")]).title).startswith("Leave-one-speaker-out")
    # fold 1 tests S01, validates on S02, trains on S03; fold 2 tests S02, validates on S03, trains on S01
    pick = {s: next(u for u in sorted(files) if session[u] == s) for s in ("S01", "S02", "S03")}
    assert Predictor(head / "fold-01").predict_one(files[pick["S01"]]).seen_in_training == []
    assert Predictor(head / "fold-01").predict_one(files[pick["S03"]]).seen_in_training == [1]
    both = Ensemble(head)
    assert {s: both.predict_one(files[u]).seen_in_training for s, u in pick.items()} == {
        "S01": [2], "S02": [1], "S03": [1, 2]}


def test_cli_predict_runs_on_the_device_it_is_given(audio, tmp_path):
    cache, files, _ = audio
    run, _ = train_folds(cache, config(), folds=[1], out=tmp_path / "r", progress=False)
    wav = files[sorted(files)[0]]
    code, out = cli("predict", wav, "--run", run / "fold-01", "--device", "cuda", "--json")
    if torch.cuda.is_available():
        assert code == 0, out
    else:  # the device reached the loader: asked for a GPU this machine lacks, it says so in one line
        assert code == 2 and "--device cuda" in out and "no CUDA GPU" in out


# ---- gradient accumulation and the step minimum -----------------------------------------------------


@pytest.mark.parametrize("grad_accum", [2, 3])
@pytest.mark.parametrize("n_train", [100, 288, 700])
def test_with_gradient_accumulation_the_minimum_counts_optimizer_steps(n_train, grad_accum):
    plan = step_plan(n_train, 64, 30, 5, 1000, grad_accum)
    micro = math.ceil(n_train / plan.batch_size)
    assert plan.steps_per_epoch == math.ceil(micro / grad_accum)
    assert plan.steps >= 1000 or plan.epochs == MAX_EPOCH_FACTOR * 30
    assert MIN_BATCH <= plan.batch_size <= 64 and plan.patience == math.ceil(5 * plan.epochs / 30)
    if plan.batch_size > MIN_BATCH:  # the smaller micro-batch alone reached the minimum: no extra epochs
        assert plan.epochs == 30
    single = step_plan(n_train, 64, 30, 5, 1000)
    assert plan.batch_size <= single.batch_size  # accumulating k batches per step needs k times the batches


@pytest.mark.parametrize("settings", [dict(layer=2), dict(layer_weights="joint")], ids=["stack", "single-head"])
def test_train_head_steps_the_optimizer_every_grad_accum_batches_along_the_plan(cache, tmp_path, settings):
    cfg = config(epochs=2, batch_size=64, min_steps=25, grad_accum=3, lr=1e-2, warmup_ratio=0.3, **settings)
    run, (m,) = train_folds(cache, cfg, folds=[1], out=tmp_path / "run", progress=False)
    with FeatureCache(cache) as fc:
        n_train = len(fold_data(fc, 1).train)
    plan = step_plan(n_train, 64, 2, cfg.patience, 25, 3)
    assert m["plan"] == plan.as_dict() and plan.epochs > 2  # the minimum grew the run
    factor = lr_factor(plan.steps, 0.3)
    rates = pd.read_csv(run / "fold-01" / "history.csv")["lr"].tolist()  # the rate each epoch started at
    assert len(rates) == m["epochs_run"] == plan.epochs
    np.testing.assert_allclose(rates, [cfg.lr * factor(e * plan.steps_per_epoch) for e in range(plan.epochs)],
                               rtol=1e-6)


# ---- the options the stack and the single-head trainer share --------------------------------------------


def test_the_stack_and_the_single_head_trainer_agree_away_from_every_shared_default(cache, tmp_path):
    """Two implementations of one head, each reading the options itself: train-head's stack (a one-layer read:
    the run's moments, heads/train/fold_group.py) and the single-head trainer, at values other than every
    default they share (loss weights, rate, warm-up, weight decay, accumulation, batch, patience, the weight
    average, pooling, layer, VAD mode, seed): an option one of them drops shows as a disagreement. Dropout is
    off and frames float32 (--norm none) so that both compute the same numbers (tests/test_stack.py)."""
    from heads.train.feature_trainer import FeatureTrainer
    from heads.train.folds import open_cache

    cfg = config(pooling="gap", layer=1, vad_mode=2, norm="none", dropout=0.0, epochs=4, batch_size=8, lr=5e-3,
                 warmup_ratio=0.3, weight_decay=0.2, grad_accum=2, patience=2, ema=0.5, alpha=0.7, beta=0.1,
                 gamma=0.2, min_steps=30, spread=False, speech_stats=True, seed=3)
    run, (m,) = train_folds(cache, cfg, folds=[3], out=tmp_path / "run", progress=False)
    with open_cache(cache) as fc:
        single = FeatureTrainer(cfg, fold_data(fc, 3), cache=fc, layers=[1]).run()
    assert single.metrics["plan"] == m["plan"] and m["plan"]["epochs"] > cfg.epochs
    ours = pd.read_csv(run / "fold-03" / "history.csv")
    np.testing.assert_allclose(ours.to_numpy(), pd.DataFrame(single.history)[list(ours.columns)].to_numpy(),
                               rtol=1e-4, atol=1e-5)
    pred = read_predictions(run / "fold-03").set_index("utt_id").loc[single.test.utt_id]
    np.testing.assert_allclose(pred[[f"prob_{c}" for c in single.metrics["labels"]]].to_numpy(), single.test.probs,
                               atol=1e-4)
    assert m["test_loss"] == pytest.approx(single.test.loss, rel=1e-4)
    assert (m["no_speech"], m["best_epoch"]) == (single.metrics["no_speech"], single.metrics["best_epoch"])


def test_sap_frames_caps_what_the_stack_attends_to_in_training_only(cache, tmp_path):
    base = config(pooling="sap", layer=2, epochs=2, dropout=0.0)
    runs = {}
    for cap in (None, 3):
        runs[cap], _ = train_folds(cache, config(**{**vars(base), "sap_frames": cap}), folds=[1],
                                   out=tmp_path / f"cap{cap}", progress=False)
    loss = {cap: pd.read_csv(run / "fold-01" / "history.csv")["train_loss"] for cap, run in runs.items()}
    assert not np.allclose(loss[None], loss[3])  # three frames per utterance: another training
    settings = json.loads((runs[3] / "config.json").read_text())["settings"]
    assert settings["sap_frames"] == 3
    with FeatureCache(cache) as fc:  # at test, every speech frame: predictions.csv is the head on all of them
        head = build_head(config(**settings), (1, int(fc.hidden_size)), len(fc.classes))
        head.load_state_dict(load_file(str(runs[3] / "fold-01" / "head.safetensors")))
        head.eval()
        pred = read_predictions(runs[3] / "fold-01").set_index("utt_id")
        for u in pred.index[:5]:
            x = torch.from_numpy(fc.features(u, [2]).astype(np.float32))[None]
            with torch.no_grad():
                out = head(x, torch.ones(1, x.shape[1], dtype=torch.bool), torch.from_numpy(fc.vad(u, 3))[None])
            np.testing.assert_allclose(pred.loc[u, [f"prob_{c}" for c in fc.classes]].to_numpy(np.float64),
                                       torch.softmax(out.logits, 1)[0].numpy(), atol=2e-5)


def test_sap_frames_reaches_the_single_head_trainer_or_is_refused(cache, tmp_path):
    from core.errors import UserError

    base = config(pooling="sap", layer_weights="joint", epochs=1, dropout=0.0)
    try:
        capped, _ = train_folds(cache, config(**{**vars(base), "sap_frames": 3}), folds=[1], out=tmp_path / "cap",
                                progress=False)
    except UserError as err:  # refusing the combination in one line is as good
        assert "--sap-frames" in str(err)
        return
    full, _ = train_folds(cache, base, folds=[1], out=tmp_path / "full", progress=False)
    a, b = (pd.read_csv(run / "fold-01" / "history.csv")["train_loss"] for run in (capped, full))
    assert not np.allclose(a, b)


def test_the_baseline_offers_no_option_it_does_not_use(cache, tmp_path):
    code, out = cli("baseline", "--cache", cache, "--fold", 1, "--layer", 2, "--sap-frames", 4, "--out",
                    tmp_path / "b", "--quiet")
    assert code == 2, out


# ---- patience as the step plan sets it ---------------------------------------------------------------


def stopping_epoch(val_loss: list[float], patience: int, epochs: int) -> int:
    early = EarlyStop()
    for epoch, loss in enumerate(val_loss, start=1):
        early.update(epoch, loss, patience)
        if early.stopped:
            return epoch
    return epochs


def test_early_stopping_waits_the_patience_the_step_plan_grew(cache, tmp_path):
    cfg = config(epochs=3, batch_size=64, min_steps=40, patience=1, lr=3e-2, layer=2)
    run, (m,) = train_folds(cache, cfg, folds=[1], out=tmp_path / "run", progress=False)
    plan = m["plan"]
    assert plan["patience"] > cfg.patience  # the plan tripled the epochs and the patience with them
    val_loss = pd.read_csv(run / "fold-01" / "history.csv")["val_loss"].tolist()
    assert m["epochs_run"] == len(val_loss) == stopping_epoch(val_loss, plan["patience"], plan["epochs"])
    assert stopping_epoch(val_loss, cfg.patience, plan["epochs"]) != m["epochs_run"]  # the configured one differs
    assert m["best_epoch"] == int(np.argmin(val_loss)) + 1


# ---- resume: which checkpoint ----------------------------------------------------------------------------


def checkpoint(epoch: int) -> Checkpoint:
    weights = {"w": torch.full((3,), float(epoch))}
    return Checkpoint(epoch=epoch, model=weights, best=weights, state={"note": f"epoch {epoch}"}, best_epoch=epoch)


@pytest.mark.parametrize("older, newer", [(2, 3), (9999, 10000)])
def test_a_resume_loads_the_newest_of_two_complete_checkpoints(tmp_path, older, newer):
    """A kill after the newer checkpoint was renamed into place but before the older one was deleted leaves
    two complete ones: the newer is loaded (by epoch number, not by name) and the older removed."""
    folder = tmp_path / "checkpoint"
    kept = save_checkpoint(tmp_path / "scratch", checkpoint(older))
    save_checkpoint(folder, checkpoint(newer))
    kept.rename(folder / kept.name)  # the older one, complete, beside it
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"epoch-{older:04d}", f"epoch-{newer:04d}"])
    ckpt = load_checkpoint(folder)
    assert ckpt.epoch == newer and ckpt.state["note"] == f"epoch {newer}"
    assert torch.equal(ckpt.model["w"], torch.full((3,), float(newer))) and ckpt.best_epoch == newer
    assert [p.name for p in folder.iterdir()] == [f"epoch-{newer:04d}"]
