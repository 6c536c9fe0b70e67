"""Real SIGKILLs of running commands: no process of ours outlives its command by more than a few
seconds, nothing is written after the kill, and rerunning the same command keeps finished work."""

from __future__ import annotations

import os
import signal
import time

import pytest
from typer.testing import CliRunner

from cli import app
from head_fixtures import make_cache
from proc_fixtures import alive, descendants, kill_tree, start_cli, wait_until

runner = CliRunner()
GRACE = 5.0  # seconds a worker may outlive its killed parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache") / "synth.h5", per_class=6)


def finished(run):
    return {p.parent.name: p.read_bytes() for p in run.glob("fold-*/metrics.json")}


def test_killed_parallel_train_head_leaves_no_fold_process_and_a_rerun_trains_only_missing_folds(cache, tmp_path):
    run = tmp_path / "run"
    args = ["train-head", "--cache", cache, "--all-folds", "--jobs", "2", "--epochs", "8", "--patience", "8",
            "--min-steps", "0", "--out", run, "--quiet"]
    proc = start_cli(*args)
    try:
        workers: set[int] = set()

        def first_fold_done() -> bool:
            workers.update(descendants(proc.pid))
            return bool(finished(run)) or proc.poll() is not None

        assert wait_until(first_fold_done, timeout=120), "no fold finished"
        assert proc.poll() is None, proc.stdout.read()
        workers.update(descendants(proc.pid))
        assert len(workers) >= 2, workers  # the fold processes (and multiprocessing's resource tracker)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_until(lambda: not alive(workers), timeout=GRACE), f"still running: {alive(workers)}"
        done = finished(run)
        time.sleep(1.0)
        assert finished(run) == done, "a fold was written after the command was killed"
        assert len(done) < 6
    finally:
        kill_tree(proc)

    # The same command (in this process and one job: --jobs changes speed, not results).
    rerun = [str(a) for a in args]
    rerun[rerun.index("--jobs") + 1] = "1"
    result = runner.invoke(app, rerun)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert out.count("(kept: trained before with these settings)") == len(done)
    missing = [str(k) for k in range(1, 7) if f"fold-{k:02d}" not in done]
    assert f"training fold(s) {', '.join(missing)}" in out
    after = finished(run)
    assert len(after) == 6 and all(after[name] == text for name, text in done.items())  # kept, not retrained


def test_a_changed_setting_is_still_refused_and_named(cache, tmp_path):
    run = tmp_path / "run"
    base = ["train-head", "--cache", str(cache), "--fold", "1", "--epochs", "1", "--out", str(run), "--quiet"]
    assert runner.invoke(app, base).exit_code == 0
    result = runner.invoke(app, ["train-head", "--cache", str(cache), "--all-folds", "--epochs", "1", "--out", str(run),
                                 "--lr", "0.01", "--seed", "3"])
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "already holds a run with other settings" in line
    assert "lr 0.001 (run) vs 0.01 (now)" in line and "seed 0 (run) vs 3 (now)" in line
    # Settings that change speed, not results, never refuse.
    again = runner.invoke(app, [*base, "--memory-gb", "0", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "kept" in again.output


def test_a_cache_with_other_contents_is_refused_even_with_the_same_fingerprint(tmp_path):
    small = make_cache(tmp_path / "a" / "c.h5", per_class=2)
    run = tmp_path / "run"
    base = ["train-head", "--fold", "1", "--epochs", "1", "--out", str(run), "--quiet"]
    assert runner.invoke(app, [*base, "--cache", str(small)]).exit_code == 0
    bigger = make_cache(tmp_path / "b" / "c.h5", per_class=3)  # same fingerprint, more utterances
    result = runner.invoke(app, [*base, "--cache", str(bigger)])
    assert result.exit_code == 2
    assert "cache contents (48 utterances (run) vs 72 (now)" in " ".join(result.output.split())


def test_a_kill_at_every_step_of_a_serial_run_keeps_what_was_finished_and_reruns_to_the_same_folds(tmp_path):
    import pytest as _pytest

    from heads.train.fold_loop import train_folds
    from heads.train.trainer import TrainConfig
    from kill_points import KillAt, Killed

    cache = make_cache(tmp_path / "c.h5", per_class=2)
    config = TrainConfig(epochs=1, batch_size=8, device="cpu", min_steps=0, ensemble=2)  # kills among member files too
    reference = tmp_path / "reference"
    train_folds(cache, config, folds=[1, 2], out=reference, progress=False)
    with _pytest.MonkeyPatch.context() as mp:
        counter = KillAt(None).install(mp)
        train_folds(cache, config, folds=[1, 2], out=tmp_path / "count", progress=False)
    assert counter.calls >= 10
    for n in range(counter.calls):
        out = tmp_path / f"k{n:02d}"
        with _pytest.MonkeyPatch.context() as mp:
            KillAt(n).install(mp)
            with _pytest.raises(Killed):
                train_folds(cache, config, folds=[1, 2], out=out, progress=False)
        before = finished(out)
        train_folds(cache, config, folds=[1, 2], out=out, progress=False)
        after = finished(out)
        assert all(after[name] == text for name, text in before.items()), n  # finished folds were kept
        assert sorted(after) == sorted(finished(reference)), n
        for k in (1, 2):  # and the rest equals an uninterrupted run, where it was trained in a smaller stack
            same_fold(out / f"fold-0{k}", reference / f"fold-0{k}")  # within float tolerance (heads/train/stack.py)
        assert not list(out.rglob("*.tmp")), n


def same_fold(a, b) -> None:
    """Two fold folders with the same files, texts and predictions; numbers equal within float tolerance."""
    import json

    import numpy as np
    import pandas as pd

    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    same_numbers(json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text()))
    for path in a.glob("*.csv"):
        x, y = pd.read_csv(path), pd.read_csv(b / path.name)
        assert list(x.columns) == list(y.columns)
        assert x.select_dtypes(exclude="number").equals(y.select_dtypes(exclude="number"))
        np.testing.assert_allclose(x.select_dtypes("number"), y.select_dtypes("number"), rtol=1e-5, atol=1e-6)


def same_numbers(x, y) -> None:
    if isinstance(x, dict):
        assert sorted(x) == sorted(y)
        for key in x:
            same_numbers(x[key], y[key])
    elif isinstance(x, list):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            same_numbers(u, v)
    elif isinstance(x, float) and not isinstance(y, str):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
    else:
        assert x == y


def test_a_fold_process_killed_under_a_running_command_is_one_line_and_takes_nothing_with_it(cache, tmp_path):
    run = tmp_path / "run"
    proc = start_cli("train-head", "--cache", cache, "--all-folds", "--jobs", "2", "--epochs", "8", "--patience", "8",
                     "--min-steps", "0", "--out", run, "--quiet")
    try:
        workers: set[int] = set()

        def two_workers() -> bool:
            # fold workers by what they run: a process caught between fork and exec still shows the
            # command's own command line (the resource tracker did, was killed, and the run went on)
            workers.update(p for p in descendants(proc.pid) if "spawn_main" in _cmdline(p))
            return len(workers) >= 2 or proc.poll() is not None

        assert wait_until(two_workers, timeout=120)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)  # e.g. the kernel's out-of-memory killer
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, out
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines[-1].startswith("error: a fold process ended abruptly") and "Traceback" not in out, out
        assert wait_until(lambda: not alive(workers), timeout=GRACE), alive(workers)
    finally:
        kill_tree(proc)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
