"""bench/pooled_probe.py: utterance statistics equal numpy's, the heads' folds (validation speaker left out of
training), an informative layer probes well above chance and an uninformative one near it, and the CLI table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression

from cache.reader import FeatureCache
from core.folds import plan_folds
from head_fixtures import make_cache

PROBE = Path(__file__).resolve().parent.parent / "bench" / "pooled_probe.py"


def load_probe():
    # Loaded by path: putting bench/ on sys.path would let bench/extract.py shadow the extract package.
    spec = importlib.util.spec_from_file_location("pooled_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_statistics_folds_and_table(tmp_path):
    probe = load_probe()
    cache_path = make_cache(tmp_path / "c.h5", per_class=6)
    with FeatureCache(cache_path) as cache:
        meta = cache.meta.copy()
        mean, std = probe.utterance_stats(cache, 2)
        frames = cache.features(meta.index[3])[:, 2].astype(np.float64)  # (T, D)
    np.testing.assert_allclose(mean[3], frames.mean(axis=0))
    np.testing.assert_allclose(std[3], frames.std(axis=0))

    y, speakers = meta["emotion"].to_numpy(), meta["speaker"].to_numpy()
    folds = plan_folds(dict(zip(speakers, meta["session"])))
    seen = []

    class Counting(DummyClassifier):
        def fit(self, x, labels):
            seen.append(len(x))
            return super().fit(x, labels)

    probe.loso_ua(mean, y, speakers, folds, Counting)
    per_speaker = len(y) // len(set(speakers))
    assert seen == [per_speaker * (len(set(speakers)) - 2)] * len(folds)  # neither test nor validation speaker

    informative = np.mean(probe.loso_ua(mean, y, speakers, folds, lambda: LogisticRegression(max_iter=2000)))
    with FeatureCache(cache_path) as cache:
        noise, _ = probe.utterance_stats(cache, 0)  # layer 0 carries no class information
    chance = np.mean(probe.loso_ua(noise, y, speakers, folds, lambda: LogisticRegression(max_iter=2000)))
    assert informative > 0.8 and chance < 0.5

    out = tmp_path / "probe.md"
    done = subprocess.run([sys.executable, str(PROBE), str(cache_path), "--layer", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "UA %" not in line]
    assert len(rows) == 9 and rows[-1].startswith("| log duration | logistic regression")
    assert all(len(row.split("|")[4].split()) == len(folds) for row in rows)  # one UA per fold
