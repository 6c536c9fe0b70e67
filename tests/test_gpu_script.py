"""bench/gpu.sh runs in a dry run (tiny sizes, CPU), so the script a GPU session runs once cannot rot."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_script_dry_run_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    out = tmp_path / "results"
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout[done.stdout.index("=== summary"):]
    assert "extract: exit 0" in summary and "finetune: exit 0" in summary, summary
    assert "train-head: exit 0" in summary or "train-head: skipped" in summary, summary
    assert "head-flops: exit 0" in summary and "| 32 |" in (out / "head-flops-gpu.md").read_text(), summary
    assert "head-speed: exit 0" in summary, summary
    assert "| iemocap-shaped-40x1024.h5 | `train-head --all-folds --pooling gap` |" in (out / "head-speed-gpu.md").read_text()
    extract = (out / "extract-gpu.md").read_text()
    assert "| plain |" in extract and "| ours |" in extract and "| b2 |" in extract
    assert "whole process" in extract and "steady state" in extract
    assert (out / "finetune-gpu.md").read_text().startswith("# Fine-tuning benchmark (tiny)")
