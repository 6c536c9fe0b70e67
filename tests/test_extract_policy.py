"""The extraction policy per device, bit-identical resume of padded SSL batches, and no
process of ours outliving a killed `cli extract`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cache.reader import FeatureCache
from extract.backends import load_backend
from extract.config import ExtractConfig
from extract.corpora import read_corpus
from extract.pipeline import extract_corpus
from extract.planning import Policy, default_policy, plan_batches
from proc_fixtures import signal_when

SR = 16000
REPO = Path(__file__).resolve().parents[1]


def noise_corpus(folder: Path, n: int, seconds=(0.4, 1.4), seed=0) -> Path:
    """n utterances of voiced noise with lengths spread over `seconds` (a manifest CSV)."""
    rng = np.random.default_rng(seed)
    rows = ["path,speaker,emotion,utt_id"]
    for k in range(n):
        t = np.arange(int(rng.uniform(*seconds) * SR)) / SR
        x = 0.2 * np.sign(np.sin(2 * np.pi * (100 + 3 * k) * t)) + 0.02 * rng.standard_normal(len(t))
        sf.write(folder / f"u{k:03d}.wav", x.astype(np.float32), SR, subtype="PCM_16")
        rows.append(f"u{k:03d}.wav,S{k % 4},{['angry', 'happy', 'neutral', 'sad'][k % 4]},u{k:03d}")
    (folder / "corpus.csv").write_text("\n".join(rows) + "\n")
    return folder / "corpus.csv"


@pytest.fixture(scope="module")
def corpus_csv(tmp_path_factory):
    return noise_corpus(tmp_path_factory.mktemp("policy-corpus"), 24)


def stored(path):
    with FeatureCache(path) as c:
        return {u: c.features(u) for u in c.meta.index}, dict(c.fingerprint)


class DiesAfter:
    """A backend that is 'killed' (KeyboardInterrupt, like Ctrl-C) on its n-th call."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0
        for name in ("name", "grid", "layers", "n_layers", "hidden_size", "describe", "device", "one_per_forward",
                     "thread_safe"):  # the same policy as the real backend (threads change bits)
            setattr(self, name, getattr(inner, name))

    def __call__(self, waves):
        self.calls += 1
        if self.calls >= self.n:
            raise KeyboardInterrupt
        return self.inner(waves)


def test_default_policy_per_device(monkeypatch, tiny_dir):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    tiny = load_backend(str(tiny_dir), layers=None, device="cpu", dtype="float32")
    assert default_policy(tiny, {}) == Policy(batch_seconds=0.0, streams=4, threads=1, workers=0)
    assert default_policy(tiny, {"LOCAL_WORLD_SIZE": "2"}) == Policy(0.0, 2, 1, 0)  # two ranks share the cores
    assert default_policy(tiny, {}, streams=1, batch_seconds=30) == Policy(30.0, 1, 4, 0)
    egemaps_like = type("OneThreadOnly", (), {})()  # no thread_safe: never called from two threads
    assert default_policy(egemaps_like, {}) == Policy(0.0, 1, 4, 0)
    gpu = type("Gpu", (), {"device": type("D", (), {"type": "cuda"})(), "thread_safe": True})()
    assert default_policy(gpu, {}) == Policy(100.0, 1, 4, 3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert default_policy(tiny, {}) == Policy(0.0, 8, 4, 0)
    assert default_policy(gpu, {}).workers == 8


def test_the_cpu_default_runs_each_utterance_alone_without_measuring_padding(tmp_path, corpus_csv, tiny_dir):
    corpus = read_corpus("manifest", corpus_csv)
    tiny = load_backend(str(tiny_dir), layers=None, device="cpu", dtype="float32")
    calls = []
    real_run = tiny._run
    tiny._run = lambda waves: (calls.append(len(waves)), real_run(waves))[1]  # one forward
    summary = extract_corpus(corpus, tmp_path / "c.h5", tiny, ExtractConfig(max_seconds=0.0), progress=False,
                             env={})
    assert tiny._pads is None  # the padding measurement never ran: nothing is padded
    assert set(calls) == {1} and len(calls) == 24
    assert summary["policy"].startswith("one utterance per forward")
    _, fp = stored(tmp_path / "c.h5")
    assert fp["padding"] == "none: one utterance per forward"


def test_two_streams_are_deterministic(tmp_path, corpus_csv, tiny_dir):
    corpus = read_corpus("manifest", corpus_csv)
    tiny = load_backend(str(tiny_dir), layers=None, device="cpu", dtype="float32")
    runs = []
    for k in range(2):
        extract_corpus(corpus, tmp_path / f"{k}.h5", tiny, ExtractConfig(max_seconds=0.0, streams=2, dtype="float32"),
                       progress=False)
        runs.append(stored(tmp_path / f"{k}.h5")[0])
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 24
    assert all(np.array_equal(runs[0][u], runs[1][u]) for u in runs[0])


def test_a_resumed_padded_run_is_bit_identical(tmp_path, corpus_csv, tiny_dir):
    """The batch plan covers the whole corpus, so a resumed run pads each remaining utterance
    exactly as an uninterrupted run would (float32 storage: any other padding shows)."""
    corpus = read_corpus("manifest", corpus_csv)
    tiny = load_backend(str(tiny_dir), layers=None, device="cpu", dtype="float32")
    opts = dict(config=ExtractConfig(max_seconds=0.0, batch_seconds=4.0, dtype="float32"), progress=False)
    extract_corpus(corpus, tmp_path / "whole.h5", tiny, **opts)
    whole, _ = stored(tmp_path / "whole.h5")

    out = tmp_path / "killed.h5"
    with pytest.raises(KeyboardInterrupt):
        extract_corpus(corpus, out, DiesAfter(tiny, 3), **opts)
    summary = extract_corpus(corpus, out, tiny, **opts)
    assert 0 < summary["resumed_from"] < 24 and summary["written"] == 24 - summary["resumed_from"]
    resumed, _ = stored(out)
    assert resumed.keys() == whole.keys()
    assert all(np.array_equal(resumed[u], whole[u]) for u in whole)

    # the test can fail: re-planning only what is left (what a resume used to do) pads the
    # remaining utterances differently, and float32 shows it
    from extract.audio import load_audio

    waves = {u.utt_id: load_audio(u.path).samples for u in corpus.utterances}
    ids = list(waves)
    plan = plan_batches([len(waves[u]) for u in ids], 4.0)
    done = plan[0] + plan[1][:1]  # a part boundary falls inside a batch
    rest = [u for i, u in enumerate(ids) if i not in done]
    tiny.one_per_forward = False
    replanned = {}
    for batch in plan_batches([len(waves[u]) for u in rest], 4.0):
        replanned.update(zip([rest[i] for i in batch], tiny([waves[rest[i]] for i in batch])))
    assert any(not np.array_equal(replanned[u], whole[u]) for u in replanned)


def cli(*args) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "extract", *map(str, args)]


def test_sigkill_of_a_padded_ssl_run_then_rerun_is_bit_identical(tmp_path, tiny_dir):
    """A real kill -9 of `cli extract` on an SSL model with padded batches, then the same command."""
    csv = noise_corpus(tmp_path, 200, seconds=(0.3, 0.9), seed=1)
    args = ["--dataset", "manifest", "--root", csv, "--model", tiny_dir, "--batch-seconds", "3",
            "--dtype", "float32", "--quiet"]
    killed, whole = tmp_path / "killed.h5", tmp_path / "whole.h5"
    proc = subprocess.Popen(cli(*args, "--out", killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.parts"
    signal_when(proc, lambda: list(parts.glob("part-*.h5")), signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "the run finished before the kill; make the corpus bigger"
    done = subprocess.run(cli(*args, "--out", killed, "--json"), capture_output=True, text=True, check=True)
    assert 0 < json.loads(done.stdout)["resumed_from"] < 200
    subprocess.run(cli(*args, "--out", whole), capture_output=True, check=True)
    a, fa = stored(killed)
    b, fb = stored(whole)
    assert a.keys() == b.keys() and len(a) == 200 and fa == fb
    assert all(np.array_equal(a[u], b[u]) for u in a)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
            if state != "Z":
                children.setdefault(int(ppid), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            out.add(p)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the Linux process table")
def test_sigkill_leaves_no_audio_worker_or_resource_tracker(tmp_path):
    csv = noise_corpus(tmp_path, 300, seconds=(0.5, 1.0), seed=2)
    proc = subprocess.Popen(cli("--dataset", "manifest", "--root", csv, "--model", "fbank", "--workers", "2",
                                "--batch-seconds", "1", "--quiet", "--out", tmp_path / "c.h5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        kids: set[int] = set()
        while proc.poll() is None and time.monotonic() < deadline:
            kids = _descendants(proc.pid)
            if len(kids) >= 3:  # two audio workers and multiprocessing's resource tracker
                break
            time.sleep(0.05)
        assert len(kids) >= 3, f"expected workers and a resource tracker, saw {kids}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while _alive(kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(kids), f"processes outlived the killed command: {_alive(kids)}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only our own test's process group
        except ProcessLookupError:
            pass
