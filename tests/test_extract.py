"""The extraction loop and `cli extract`: what lands in the cache, resume, shards, bad input."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from cache.format import CacheError
from cache.reader import FeatureCache
from cli import app
from core import devices
from core.devices import autocast_dtype, cpu_has_native_bf16
from core.frames import FrameGrid
from extract.audio import load_audio
from extract.backends import load_backend
from extract.config import ExtractConfig
from extract.corpora import read_corpus
from extract.pipeline import ExtractError, compute_dtype, extract_corpus, parse_shard, run_extract
from extract.planning import plan_batches, select_shard
from extract.vad import vad_masks
from proc_fixtures import signal_when

SR = 16000
GOOD = {  # utt_id -> (speaker, emotion, seconds)
    "a1": ("A", "angry", 1.3), "a2": ("A", "sad", 0.4), "a3": ("A", "happy", 2.1),
    "b1": ("B", "neutral", 0.9), "b2": ("B", "angry", 1.7), "b3": ("B", "sad", 0.02),
    "c1": ("C", "happy", 1.1), "c2": ("C", "neutral", 2.6), "c3": ("C", "angry", 0.7),
}
BAD = {"z_silent": "silent_audio", "z_short": "too_short", "z_nan": "non_finite_audio"}


def voiced(seconds, seed):
    """A buzzy vowel-ish tone in noise: something for the VAD and the model to chew on."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 110 + 40 * seed % 90
    x = 0.3 * np.sign(np.sin(2 * np.pi * f0 * t)) * np.sin(2 * np.pi * 3 * t) ** 2
    return (x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def corpus_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rows = ["path,speaker,emotion,utt_id,valence,arousal"]
    for k, (utt_id, (spk, emo, secs)) in enumerate(GOOD.items()):
        sf.write(root / f"{utt_id}.wav", voiced(secs, k), SR, subtype="PCM_16")
        rows.append(f"{utt_id}.wav,{spk},{emo},{utt_id},{2 + k % 3},{3 + k % 2}")
    sf.write(root / "z_silent.wav", np.zeros(8000, np.float32), SR, subtype="PCM_16")
    sf.write(root / "z_short.wav", voiced(0.01, 9), SR, subtype="PCM_16")
    nan = voiced(0.5, 10)
    nan[100] = np.nan
    sf.write(root / "z_nan.wav", nan, SR, subtype="FLOAT")
    for utt_id in BAD:
        rows.append(f"{utt_id}.wav,C,sad,{utt_id},,")
    rows.append("missing.wav,C,sad,z_missing,,")  # the reader itself skips this one
    (root / "corpus.csv").write_text("\n".join(rows) + "\n")
    return root / "corpus.csv"


@pytest.fixture(scope="module")
def corpus(corpus_csv):
    return read_corpus("manifest", corpus_csv)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_backend(str(tiny_dir), layers=None, device="cpu", dtype="float32")


def run(corpus, out, backend, **kw):
    options = dict(max_seconds=0.0, batch_seconds=3.0, workers=0, shard=None)
    options.update(kw)
    shard = options.pop("shard")  # (i, n) counted from 0, as the writer's
    config = ExtractConfig(**options, shard=None if shard is None else f"{shard[0] + 1}/{shard[1]}")
    return extract_corpus(corpus, out, backend, config, progress=False)


def cache_arrays(path):
    with FeatureCache(path) as cache:
        feats = {u: cache.features(u) for u in cache.meta.index}
        vads = {u: np.stack([cache.vad(u, m) for m in range(4)]) for u in cache.meta.index}
        return feats, vads, cache.meta.copy(), cache.skipped.copy(), dict(cache.fingerprint)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, corpus, tiny):
    out = tmp_path_factory.mktemp("single") / "c.h5"
    summary = run(corpus, out, tiny)
    return out, summary, cache_arrays(out)


def test_plan_batches_bounds_padded_seconds_and_sorts_longest_first():
    lengths = [16000, 48000, 8000, 200000, 32000, 32000, 4000]
    batches = plan_batches(lengths, batch_seconds=5.0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [3]  # 12.5 s alone: over budget, but every batch runs
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 5.0 * 16000


def test_cache_holds_the_backends_features_and_the_vad_masks(single_run, corpus, tiny):
    out, summary, (feats, vads, meta, skipped, fp) = single_run
    kept = set(GOOD) - {"b3"}  # b3 is 20 ms: under the 400-sample minimum
    assert set(meta.index) == kept
    for utt_id in ["a1", "c2", "a2"]:
        utt = next(u for u in corpus.utterances if u.utt_id == utt_id)
        samples = load_audio(utt.path).samples
        (expected,) = tiny([samples])
        assert feats[utt_id].shape == expected.shape == (tiny.grid.n_frames(len(samples)), 3, 32)
        assert feats[utt_id].dtype == np.float16
        assert np.abs(feats[utt_id].astype(np.float32) - expected).max() <= 2e-3 * max(1, np.abs(expected).max())
        assert np.array_equal(vads[utt_id], vad_masks(samples, tiny.grid))
        assert meta.loc[utt_id, "n_frames"] == expected.shape[0]
        assert math.isclose(meta.loc[utt_id, "duration"], len(samples) / SR)
    assert meta.loc["a1", "speaker"] == "A" and meta.loc["a1", "emotion"] == "angry"
    assert meta.loc["a1", "valence"] == 2 and not meta["truncated"].any()
    reasons = dict(zip(skipped["item"], skipped["reason"]))
    assert reasons == {**BAD, "b3": "too_short", "z_missing": "missing_audio"}
    assert summary["written"] == len(kept) and summary["cache_utterances"] == len(kept)
    assert summary["skipped"] == {"non_finite_audio": 1, "silent_audio": 1, "too_short": 2}
    assert fp["model"] == tiny.name and fp["weights_sha256"] == tiny.weights_sha256
    assert fp["layers"] == [0, 1, 2] and fp["dtype"] == "float16" and fp["dataset"] == "manifest"
    assert fp["frame_window"] == 400 and fp["frame_stride"] == 320 and fp["vad"] == "webrtcvad"


def test_batch_size_does_not_change_the_cache(tmp_path, single_run, corpus, tiny):
    out = tmp_path / "one.h5"
    run(corpus, out, tiny, batch_seconds=0.01)  # one utterance per forward
    feats, vads, meta, _, _ = cache_arrays(out)
    ref_feats, ref_vads, ref_meta, _, _ = single_run[2]
    assert list(meta.index) == list(ref_meta.index)
    for u in meta.index:
        diff = np.abs(feats[u].astype(np.float32) - ref_feats[u].astype(np.float32)).max()
        assert diff <= 1e-2 * max(1.0, float(np.abs(ref_feats[u]).max()))  # fp16 rounding of ~1e-5 diffs
        assert np.array_equal(vads[u], ref_vads[u])


class DiesAfterTwoBatches:
    """A backend that stops the run like Ctrl-C (not an item error) on its third batch."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        for name in ("name", "grid", "layers", "n_layers", "hidden_size", "describe"):
            setattr(self, name, getattr(inner, name))

    def __call__(self, waves):
        self.calls += 1
        if self.calls > 2:
            raise KeyboardInterrupt
        return self.inner(waves)

    @property
    def one_per_forward(self):  # the policy sets it; the inner backend's describe() reports it
        return self.inner.one_per_forward

    @one_per_forward.setter
    def one_per_forward(self, value):
        self.inner.one_per_forward = value


def test_an_interrupted_run_resumes_to_the_same_cache(tmp_path, single_run, corpus, tiny):
    out = tmp_path / "r.h5"
    with pytest.raises(KeyboardInterrupt):
        run(corpus, out, DiesAfterTwoBatches(tiny), batch_seconds=2.0)
    assert not out.exists() and out.with_suffix(".parts").is_dir()
    summary = run(corpus, out, tiny, batch_seconds=2.0)
    assert 0 < summary["resumed_from"] and summary["written"] < len(GOOD) - 1
    feats, vads, meta, skipped, _ = cache_arrays(out)
    ref_feats, ref_vads, ref_meta, ref_skipped, _ = single_run[2]
    assert list(meta.index) == list(ref_meta.index)  # each utterance exactly once
    for u in meta.index:
        assert np.abs(feats[u].astype(np.float32) - ref_feats[u].astype(np.float32)).max() <= 1e-2
    assert skipped.to_dict("records") == ref_skipped.to_dict("records")
    again = run(corpus, out, tiny)  # a finished cache: nothing left to do
    assert again["written"] == 0 and again["planned"] == 0


# --- compute precision: what --amp auto means, and that a cache keeps the one it began with


def cpu_flags():
    """This CPU's feature flags from /proc/cpuinfo (Linux), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return set(lines[0].split(":", 1)[1].split()) if lines else None


def test_native_bf16_detection_agrees_with_the_cpu_flags():
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no x86 flags in /proc/cpuinfo on this machine")
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_on_cuda_and_on_a_cpu_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("float32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def max_relative_gap(feats, ref):
    """Largest |a - b| over all utterances, relative to the largest |b|."""
    gap = max(float(np.abs(feats[u].astype(np.float32) - ref[u].astype(np.float32)).max()) for u in ref)
    return gap / max(float(np.abs(ref[u].astype(np.float32)).max()) for u in ref)


def test_auto_keeps_the_precision_of_a_cache_already_begun(tmp_path, monkeypatch, corpus_csv, corpus,
                                                           tiny_dir, single_run):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    ref = single_run[2][0]  # float32 compute
    options = dict(model=str(tiny_dir), workers=0, progress=False)

    fresh = tmp_path / "fresh.h5"
    summary = run_extract("manifest", corpus_csv, out=fresh, **options)
    assert summary["compute_dtype"] == "bfloat16" and compute_dtype("auto", fresh) == "bfloat16"
    assert 1e-3 < max_relative_gap(cache_arrays(fresh)[0], ref) < 0.05  # bf16 really ran, and stayed close

    begun = tmp_path / "begun.h5"  # begun in float32 (by an older default, or --amp none), then interrupted
    with pytest.raises(KeyboardInterrupt):
        own = load_backend(str(tiny_dir), layers=None, device="cpu", dtype="float32")
        run(corpus, begun, DiesAfterTwoBatches(own), batch_seconds=0)  # the CPU default: one per forward
    assert compute_dtype("auto", begun) == "float32" and compute_dtype("none", begun) == "float32"
    with pytest.raises(CacheError, match="compute_dtype"):  # asked for explicitly: refused, as any other change
        run_extract("manifest", corpus_csv, out=begun, amp="bf16", **options)
    summary = run_extract("manifest", corpus_csv, out=begun, **options)  # auto goes on in float32
    assert summary["compute_dtype"] == "float32" and summary["resumed_from"] > 0
    assert max_relative_gap(cache_arrays(begun)[0], ref) < 1e-3

    sharded = tmp_path / "sharded.h5"  # a shard keeps its own file's precision too
    run_extract("manifest", corpus_csv, out=sharded, amp="none", shard="1/2", **options)
    again = run_extract("manifest", corpus_csv, out=sharded, shard="1/2", **options)
    assert again["compute_dtype"] == "float32" and again["planned"] == 0


def test_shards_together_equal_a_single_run(tmp_path, single_run, corpus, tiny):
    out = tmp_path / "s.h5"
    parts = [set(u.utt_id for u in select_shard(corpus.utterances, (i, 2))) for i in range(2)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    for i in range(2):
        run(corpus, out, tiny, shard=(i, 2))
    assert not out.exists()  # two shard files, read as one cache
    feats, vads, meta, skipped, _ = cache_arrays(out)
    ref_feats, ref_vads, ref_meta, ref_skipped, _ = single_run[2]
    assert list(meta.index) == list(ref_meta.index)
    for u in meta.index:  # other batches, so other padding: equal up to float16 rounding
        assert np.abs(feats[u].astype(np.float32) - ref_feats[u].astype(np.float32)).max() <= 1e-2
        assert np.array_equal(vads[u], ref_vads[u])
    assert skipped.to_dict("records") == ref_skipped.to_dict("records")


def test_a_different_fingerprint_is_refused(tmp_path, corpus, tiny_dir, single_run):
    out = single_run[0]
    subset = load_backend(str(tiny_dir), layers=[2], device="cpu", dtype="float32")
    with pytest.raises(CacheError, match="different settings"):
        run(corpus, out, subset)
    with pytest.raises(CacheError, match="different settings"):
        run(corpus, out, load_backend(str(tiny_dir), layers=None, device="cpu", dtype="float32"), max_seconds=1.0)


def test_strict_stops_at_the_first_bad_utterance(tmp_path, corpus, tiny):
    with pytest.raises(ExtractError, match="strict mode"):
        run(corpus, tmp_path / "strict.h5", tiny, strict=True)


class FailsOn:
    """A backend that raises on one utterance length, as a model may on one odd input."""

    def __init__(self, inner, bad_length):
        self.inner, self.bad_length, self.calls = inner, bad_length, []
        for name in ("name", "grid", "layers", "n_layers", "hidden_size", "describe"):
            setattr(self, name, getattr(inner, name))

    def __call__(self, waves):
        self.calls.append(len(waves))
        if any(len(w) == self.bad_length for w in waves):
            raise RuntimeError("boom\nsecond line")
        return self.inner(waves)


def test_a_model_error_skips_only_its_utterance(tmp_path, corpus, tiny):
    bad = next(u for u in corpus.utterances if u.utt_id == "c1")
    backend = FailsOn(tiny, len(load_audio(bad.path).samples))
    summary = run(corpus, tmp_path / "m.h5", backend, batch_seconds=10.0)
    assert summary["skipped"]["model_error"] == 1
    with FeatureCache(tmp_path / "m.h5") as cache:
        assert "c1" not in cache.meta.index and "c2" in cache.meta.index
        row = cache.skipped[cache.skipped["item"] == "c1"].iloc[0]
        assert row["reason"] == "model_error" and row["detail"] == "RuntimeError: boom"
    assert max(backend.calls) > 1 and backend.calls.count(1) >= 2  # a batch, then one by one


def test_a_model_that_always_fails_stops_the_run(tmp_path, corpus, tiny):
    class Broken(FailsOn):
        def __call__(self, waves):
            raise RuntimeError("CUDA error: no kernel image")

    with pytest.raises(ExtractError, match="failed on the first 8 utterances"):
        run(corpus, tmp_path / "b.h5", Broken(tiny, 0), batch_seconds=1.0)


class Zeros:
    """A backend with 1 s frames: utterances that load fine can still be too short for it."""

    name, layers, n_layers, hidden_size = "zeros", (0,), 1, 4
    grid = FrameGrid(window=16000, stride=160)

    def describe(self):
        return {"model": self.name, **self.grid.as_dict()}

    def __call__(self, waves):
        return [np.zeros((self.grid.n_frames(len(w)), 1, 4), np.float32) for w in waves]


def test_audio_shorter_than_the_backends_frame_is_skipped(tmp_path, corpus):
    summary = run(corpus, tmp_path / "w.h5", Zeros())
    with FeatureCache(tmp_path / "w.h5") as cache:
        assert set(cache.meta.index) == {"a1", "a3", "b2", "c1", "c2"}
        details = dict(zip(cache.skipped["item"], cache.skipped["detail"]))
    assert "the backend's frame needs 16000" in details["a2"]
    assert summary["skipped"]["too_short"] == 5


def test_fbank_goes_through_the_same_writer(tmp_path, corpus):
    fbank = load_backend("fbank", layers=None, device="cpu", dtype="float32")
    run(corpus, tmp_path / "f.h5", fbank, workers=1)  # also the worker-process path
    feats, vads, meta, _, fp = cache_arrays(tmp_path / "f.h5")
    assert fp["backend"] == "fbank" and fp["frame_window"] == 400 and fp["frame_stride"] == 160
    for u in meta.index:
        assert feats[u].shape == (meta.loc[u, "n_frames"], 1, 80) == (vads[u].shape[1], 1, 80)
        n = round(meta.loc[u, "duration"] * SR)
        assert meta.loc[u, "n_frames"] == (n - 400) // 160 + 1


def test_truncation_is_recorded(tmp_path, corpus):
    fbank = load_backend("fbank", layers=None, device="cpu", dtype="float32")
    run(corpus, tmp_path / "t.h5", fbank, max_seconds=1.0)
    _, _, meta, _, fp = cache_arrays(tmp_path / "t.h5")
    assert fp["max_seconds"] == 1.0
    assert set(meta.index[meta["truncated"]]) == {"a1", "a3", "b2", "c1", "c2"}
    assert meta["duration"].max() == 1.0 and meta.loc["a1", "n_frames"] == (16000 - 400) // 160 + 1


@pytest.mark.parametrize("spec, env, expected", [
    ("1/2", {}, (0, 2)), ("2/2", {}, (1, 2)), ("1/1", {}, None), (None, {}, None),
    (None, {"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)), ("1/4", {"RANK": "3", "WORLD_SIZE": "4"}, (0, 4)),
])
def test_parse_shard(spec, env, expected):
    assert parse_shard(spec, env) == expected


@pytest.mark.parametrize("spec", ["0/2", "3/2", "x", "1-2"])
def test_parse_shard_rejects_nonsense(spec):
    with pytest.raises(ExtractError, match="--shard"):
        parse_shard(spec, {})


def cli_args(corpus_csv, model, out, *extra):
    return ["extract", "--dataset", "manifest", "--root", str(corpus_csv), "--model", str(model),
            "--out", str(out), "--workers", "0", "--batch-seconds", "3", "--quiet", *extra]


def test_cli_extract_end_to_end(tmp_path, corpus_csv, tiny_dir, single_run):
    out = tmp_path / "cli.h5"
    runner = CliRunner()
    result = runner.invoke(app, cli_args(corpus_csv, tiny_dir, out, "--dtype", "float16", "--amp", "none", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["written"] == 8 and summary["out"] == str(out)
    assert summary["skipped"] == {"non_finite_audio": 1, "silent_audio": 1, "too_short": 2}
    assert summary["reader_skipped"] == {"missing_audio": 1}
    feats, _, meta, _, fp = cache_arrays(out)
    ref = single_run[2]
    assert list(meta.index) == list(ref[2].index) and fp == ref[4]
    assert all(np.array_equal(feats[u], ref[0][u]) for u in meta.index)  # same batches: bit-identical

    sharded = tmp_path / "sh.h5"
    for i in (1, 2):
        r = runner.invoke(app, cli_args(corpus_csv, tiny_dir, sharded, "--shard", f"{i}/2", "--layers", "0,2",
                                        "--amp", "none"))
        assert r.exit_code == 0, r.output
        assert "extraction" in r.stdout and sharded.with_name(f"sh.shard-{i}-of-2.h5").exists()
    with h5py.File(sharded.with_name("sh.shard-1-of-2.h5"), "r") as f:  # plain h5py reads a shard
        assert list(f.attrs["layers"]) == [0, 2]
    with FeatureCache(sharded) as cache:
        assert list(cache.meta.index) == list(meta.index) and cache.layers == (0, 2)
        assert np.abs(cache.features("a1").astype(np.float32) - feats["a1"][:, [0, 2]]).max() <= 1e-2


@pytest.mark.parametrize("extra, message", [
    (["--shard", "3/2"], "--shard 3/2"),
    (["--layers", "7"], "hidden states 0 to 2"),
    (["--dtype", "int8"], "storage dtype"),
    (["--amp", "fp8"], "--amp"),
    (["--batch-seconds", "-1"], "--batch-seconds"),
    (["--streams", "0"], "--streams"),
])
def test_cli_extract_user_errors_are_one_line(tmp_path, corpus_csv, tiny_dir, extra, message):
    result = CliRunner().invoke(app, cli_args(corpus_csv, tiny_dir, tmp_path / "e.h5", *extra))
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_cli_extract_unknown_model_is_one_line(tmp_path, corpus_csv):
    result = CliRunner().invoke(app, cli_args(corpus_csv, tmp_path / "no-such-model", tmp_path / "e.h5"))
    assert result.exit_code == 2 and "cannot load model" in result.stderr


def test_sigkill_mid_run_then_the_same_command_completes_the_cache(tmp_path):
    """A real kill -9 of `cli extract` after its first part file, then a rerun: every utterance
    once, bit-identical to an uninterrupted run (fbank: per-utterance arithmetic, deterministic)."""
    rows = ["path,speaker,emotion,utt_id"]
    for k in range(400):
        sf.write(tmp_path / f"u{k:03d}.wav", voiced(0.25 + 0.001 * k, k), SR, subtype="PCM_16")
        rows.append(f"u{k:03d}.wav,S{k % 4},angry,u{k:03d}")
    csv = tmp_path / "many.csv"
    csv.write_text("\n".join(rows) + "\n")
    killed, whole = tmp_path / "killed.h5", tmp_path / "whole.h5"
    args = ["extract", "--dataset", "manifest", "--root", str(csv), "--model", "fbank", "--workers", "0",
            "--batch-seconds", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "cli.py"), *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = killed.with_suffix(".parts")
    signal_when(proc, lambda: list(parts.glob("part-*.h5")), signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "the run finished before the kill; make the corpus bigger"
    assert list(parts.glob("part-*.h5"))
    runner = CliRunner()
    resumed = runner.invoke(app, [*args, "--out", str(killed), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert 0 < json.loads(resumed.stdout)["resumed_from"] < 400
    assert runner.invoke(app, [*args, "--out", str(whole)]).exit_code == 0
    feats, vads, meta, _, fp = cache_arrays(killed)
    ref_feats, ref_vads, ref_meta, _, ref_fp = cache_arrays(whole)
    assert list(meta.index) == list(ref_meta.index) and len(meta) == 400 and fp == ref_fp
    assert all(np.array_equal(feats[u], ref_feats[u]) and np.array_equal(vads[u], ref_vads[u]) for u in meta.index)
