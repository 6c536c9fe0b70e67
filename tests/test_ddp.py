"""`torchrun --nproc-per-node 2 cli.py finetune ...` on CPU (gloo): one epoch, outputs once, written by rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from extract.backends import tiny_wavlm
from extract.synthetic import generate

REPO = Path(__file__).resolve().parents[1]

# Runs cli.py's app with every writing function of the fine-tuning run wrapped to
# log which rank called it, so the test can see who wrote what.
SPY = """
import os, sys
sys.path.insert(0, {repo!r})
import heads.finetune.run as ft
import heads.finetune.trainer as ftt

def spy(name, fn):
    def wrapped(*args, **kwargs):
        with open(os.environ["WRITE_LOG"], "a") as fh:
            fh.write(os.environ["RANK"] + " " + name + "\\n")
        return fn(*args, **kwargs)
    return wrapped

for module, name in ((ft, "prepare_run_dir"), (ft, "load_or_build_index"), (ftt, "save_checkpoint"),
                     (ft, "write_fold"), (ft, "save_backbone")):
    setattr(module, name, spy(name, getattr(module, name)))

from cli import app
sys.argv = ["cli"] + sys.argv[1:]
app()
"""


def test_torchrun_two_cpu_processes_finish_an_epoch_and_only_rank_0_writes(tmp_path):
    manifest = generate(tmp_path / "corpus", seed=1, n_sessions=2, utts_per_speaker=4, speech_seconds=(0.5, 0.8),
                        silence_seconds=(0.1, 0.3))
    model = tiny_wavlm(tmp_path / "tiny")
    spy = tmp_path / "spy_cli.py"
    spy.write_text(SPY.format(repo=str(REPO)))
    log = tmp_path / "writes.log"
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WRITE_LOG": str(log)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(spy),
           "finetune", "--full", "--dataset", "manifest", "--root", str(manifest), "--fold", "1",
           "--model", str(model), "--epochs", "1", "--batch-size", "4", "--step-seconds", "4", "--workers", "0",
           "--no-grad-checkpointing", "--device", "cpu", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    fold = out / "fold-01"
    for name in ("metrics.json", "predictions.csv", "history.csv", "head.safetensors", "model.safetensors"):
        assert (fold / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert len((fold / "history.csv").read_text().splitlines()) == 2  # header + one epoch
    calls = [line.split() for line in log.read_text().splitlines()]
    assert {rank for rank, _ in calls} == {"0"}, calls
    assert {name for _, name in calls} == {"prepare_run_dir", "load_or_build_index", "save_checkpoint",
                                          "write_fold", "save_backbone"}
