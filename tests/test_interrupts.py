"""Ctrl-C (SIGINT to the process group) and SIGTERM stop `cli extract`, `cli train-head` and
`cli finetune` with one line and exit code 130 / 143, no traceback, no worker left behind,
and every finished unit of work kept: a rerun continues (issue 11)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from head_fixtures import make_cache
from proc_fixtures import alive, descendants, kill_tree, signal_when, start_cli, wait_until
from tests.test_finetune import corpus, full_run, tiny  # noqa: F401
from tests.test_finetune_kills import resume, same_outputs


def stopped(proc, code: int, message: str) -> None:
    """`proc` ended with `code` and its last output line is `message`, with no traceback before it."""
    out = proc.communicate(timeout=120)[0]
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == code, out
    assert lines[-1] == message and "Traceback" not in out, out


def test_ctrl_c_stops_extract_keeping_every_finished_part(tmp_path):
    rows = ["path,speaker,emotion"]
    for i in range(300):
        sf.write(tmp_path / f"u{i:03d}.wav", 0.1 * np.sin(np.arange(16000 + 40 * i) / 9.0), 16000, subtype="PCM_16")
        rows.append(f"u{i:03d}.wav,S{i % 3},{'angry' if i % 2 else 'sad'}")
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "f.h5"
    args = ["extract", "--dataset", "manifest", "--root", tmp_path / "c.csv", "--model", "fbank",
            "--batch-seconds", "1", "--workers", "2", "--quiet", "--out", out]
    proc = start_cli(*args)
    try:
        workers: set[int] = set()

        def first_part_written() -> bool:
            workers.update(descendants(proc.pid))
            return bool(list(tmp_path.glob("f.parts/part-*.h5")))

        signal_when(proc, first_part_written, signal.SIGINT, timeout=120)
        os.killpg(proc.pid, signal.SIGINT) if proc.poll() is None else None  # Ctrl-C: the whole group
        stopped(proc, 130, "interrupted; rerun the same command to continue")
        assert not out.exists() and list(tmp_path.glob("f.parts/part-*.h5"))
        assert wait_until(lambda: not alive(workers), timeout=5.0), f"still running: {alive(workers)}"
    finally:
        kill_tree(proc)
    rerun = start_cli(*args, "--json")
    summary = json.loads(rerun.communicate(timeout=300)[0])
    assert rerun.returncode == 0 and summary["resumed_from"] > 0
    assert summary["cache_utterances"] == 300 and summary["resumed_from"] + summary["written"] == 300


def test_sigterm_stops_train_head_keeping_its_finished_folds(tmp_path):
    cache = make_cache(tmp_path / "c.h5", per_class=6)
    run = tmp_path / "run"
    args = ["train-head", "--cache", cache, "--all-folds", "--epochs", "30", "--patience", "30", "--batch-size", "8",
            "--heads", "2", "--device", "cpu", "--ensemble", "1", "--out", run, "--quiet"]  # one head: time
    proc = start_cli(*args)
    try:
        signal_when(proc, lambda: (run / "fold-01" / "metrics.json").exists(), signal.SIGTERM, timeout=180)
        stopped(proc, 143, "interrupted; rerun the same command to continue")
    finally:
        kill_tree(proc)
    finished = sorted(p.parent.name for p in run.glob("fold-*/metrics.json"))
    assert finished and len(finished) < 6 and not list(run.rglob("*.tmp"))
    rerun = start_cli(*args)
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out
    assert f"kept {len(finished)} finished fold(s)" in out
    assert len(list(run.glob("fold-*/metrics.json"))) == 6


def test_ctrl_c_stops_finetune_and_resume_equals_the_uninterrupted_run(corpus, tiny, full_run, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ["finetune", "--full", "--dataset", "manifest", "--root", corpus, "--fold", "1", "--model", tiny,
            "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--head-lr", "1e-2", "--step-seconds", "4",
            "--no-grad-checkpointing", "--device", "cpu", "--workers", "2", "--out", out, "--quiet"]
    proc = start_cli(*args)
    try:
        first = out / "fold-01" / "checkpoint" / "epoch-0001"
        signal_when(proc, first.exists, signal.SIGINT, timeout=180)
        os.killpg(proc.pid, signal.SIGINT) if proc.poll() is None else None
        stopped(proc, 130, "interrupted; rerun the same command with --resume to continue")
    finally:
        kill_tree(proc)
    # an epoch of this tiny model is shorter than the interrupt's delivery, so epoch 2 may be saved too
    assert not (out / "fold-01" / "metrics.json").exists() and list((out / "fold-01" / "checkpoint").glob("epoch-*"))
    result = resume(corpus, tiny, out)
    assert result.unfinished == []
    same_outputs(out, full_run)


SWALLOWED = """
import os, signal, sys, time
from core.interrupts import Interrupted, signals_interrupt

class Swallows:  # Python ignores what a __del__ raises: an interrupt landing there is swallowed
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)

try:
    with signals_interrupt():
        Swallows()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pass
    print("ran on")
except Interrupted as err:
    print("interrupted", err.signum, "after", "quiet" if "Exception ignored" not in sys.stderr.getvalue() else "noise")
"""


def test_an_interrupt_python_swallows_is_raised_again(tmp_path):
    """An interrupt raised where Python ignores exceptions (a __del__, an at-fork hook) is delivered
    again a moment later, and the 'Exception ignored' report is not printed."""
    import subprocess
    import sys
    from pathlib import Path

    script = "import io, sys; sys.stderr = io.StringIO()\n" + SWALLOWED
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "interrupted 2 after quiet", done.stdout + done.stderr


THREAD_REPORTS = """
import os, signal, sys, threading, time
from core.interrupts import Interrupted, signals_interrupt

try:
    with signals_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
except Interrupted:
    print("interrupted")

def report():  # as multiprocessing's fd-sharing thread (resource_sharer._serve) reports its errors
    try:
        raise RuntimeError("a helper thread whose peer was ended")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())

helper = threading.Thread(target=report)
helper.start()
helper.join()
try:
    raise ValueError("the main thread's own error")
except ValueError:
    sys.excepthook(*sys.exc_info())
"""


def test_after_an_interrupt_helper_threads_reporting_through_sys_excepthook_stay_quiet(tmp_path):
    """The one-line message stays the last line: a helper thread's report through sys.excepthook is
    dropped once the command was interrupted, while the main thread's own errors still show."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", THREAD_REPORTS], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "interrupted", done.stdout + done.stderr
    assert "RuntimeError" not in done.stderr and "ValueError: the main thread's own error" in done.stderr, done.stderr


@pytest.mark.parametrize("worker", [True, False])
def test_a_spawned_worker_ignores_ctrl_c_from_its_first_import(worker):
    """A multiprocessing spawn child re-imports cli before any of our code runs in it: Ctrl-C, sent to the
    whole process group, is the parent's to handle, so the child must ignore it from the start (else a
    child interrupted while importing prints a traceback beside the parent's one line)."""
    code = "import signal, cli; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"
    args = [sys.executable, "-c", code] + (["--multiprocessing-fork"] if worker else [])
    out = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[1], check=True).stdout.strip()
    assert out == str(worker)
