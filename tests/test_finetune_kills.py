"""Fine-tuning killed at any moment resumes (`--resume`) to exactly the uninterrupted run's outputs:
during a checkpoint save (tests/test_checkpoint_kills.py has every step of it), while a finished
fold's outputs are written, and a real SIGKILL mid-run with DataLoader workers, which die with it."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch

import heads.finetune.run as ft
from heads.finetune.run import run_finetune
from kill_points import KillAt, Killed
from proc_fixtures import alive, descendants, kill_tree, start_cli, wait_until
from tests.test_finetune import config, corpus, full_run, quiet, settings, tiny  # noqa: F401

OUTPUTS = ("metrics.json", "predictions.csv", "history.csv", "head.safetensors", "model.safetensors")


def safetensors_content(path):
    """Tensors and metadata (the file's bytes are not stable: safetensors orders metadata keys by a
    randomly seeded hash map)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}


def same_outputs(run, reference) -> None:
    for name in OUTPUTS:
        mine, theirs = run / "fold-01" / name, reference / "fold-01" / name
        if name.endswith(".safetensors"):
            (meta_a, a), (meta_b, b) = safetensors_content(mine), safetensors_content(theirs)
            assert meta_a == meta_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        else:
            assert mine.read_bytes() == theirs.read_bytes(), name
    assert (run / "fold-01" / "backbone" / "config.json").is_file()
    assert not (run / "fold-01" / "checkpoint").exists()
    assert not list(run.rglob("*.tmp"))


def resume(corpus, tiny, out):  # noqa: F811
    return run_finetune("manifest", corpus, config(), settings(tiny), folds=[1], out=out, progress=False, log=quiet,
                        resume=True)


@pytest.fixture(scope="module")
def trained_not_written(corpus, tiny, tmp_path_factory):  # noqa: F811
    """A run killed the moment training ended: a complete last checkpoint, no fold outputs yet."""
    out = tmp_path_factory.mktemp("snap") / "run"

    def killed(*args, **kwargs):
        raise Killed("save_backbone")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "save_backbone", killed)
        with pytest.raises(Killed):
            run_finetune("manifest", corpus, config(), settings(tiny), folds=[1], out=out, progress=False, log=quiet)
    assert (out / "fold-01" / "checkpoint" / "epoch-0002").is_dir() and not (out / "fold-01" / "metrics.json").exists()
    return out


def test_a_kill_at_every_step_of_writing_a_finished_fold_resumes_to_the_same_outputs(
        corpus, tiny, full_run, trained_not_written, tmp_path):  # noqa: F811
    count_dir = tmp_path / "count"
    shutil.copytree(trained_not_written, count_dir)
    with pytest.MonkeyPatch.context() as mp:
        counter = KillAt(None).install(mp)
        resume(corpus, tiny, count_dir)
    same_outputs(count_dir, full_run)
    assert counter.calls > 15
    for n in range(counter.calls):
        out = tmp_path / f"k{n:02d}"
        shutil.copytree(trained_not_written, out)
        with pytest.MonkeyPatch.context() as mp:
            KillAt(n).install(mp)
            with pytest.raises(Killed):
                resume(corpus, tiny, out)
        result = resume(corpus, tiny, out)  # never "delete the checkpoint folder"
        assert result.unfinished == [] and 1 in result.metrics, n
        same_outputs(out, full_run)
        shutil.rmtree(out)


def test_a_real_sigkill_mid_run_kills_the_data_workers_and_resumes_to_the_same_outputs(corpus, tiny, full_run,
                                                                                       tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ["finetune", "--full", "--dataset", "manifest", "--root", corpus, "--fold", "1", "--model", tiny,
            "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--head-lr", "1e-2", "--step-seconds", "4",
            "--no-grad-checkpointing", "--device", "cpu", "--out", out, "--quiet"]
    proc = start_cli(*args, "--workers", "2")
    try:
        workers: set[int] = set()

        def saving_epoch_two() -> bool:  # kill while the second checkpoint is being written, or just after
            workers.update(descendants(proc.pid))
            ckpt = out / "fold-01" / "checkpoint"
            return proc.poll() is not None or (ckpt / "epoch-0002.tmp").exists() or (ckpt / "epoch-0002").exists()

        assert wait_until(saving_epoch_two, timeout=180, step=0.01)
        assert proc.poll() is None, proc.stdout.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(workers) >= 2, workers  # DataLoader workers were running
        assert wait_until(lambda: not alive(workers), timeout=2.0), f"still running: {alive(workers)}"
    finally:
        kill_tree(proc)
    assert not (out / "fold-01" / "metrics.json").exists()
    result = resume(corpus, tiny, out)
    assert result.unfinished == []
    same_outputs(out, full_run)
