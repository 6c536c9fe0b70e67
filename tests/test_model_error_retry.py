"""A model error may be transient (out of GPU memory, a driver hiccup): a rerun retries it, and only it."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from cache.reader import FeatureCache
from extract.audio import load_audio
from extract.backends import load_backend
from extract.corpora import read_corpus
from extract.pipeline import ExtractError
from tests.test_extract import FailsOn, cache_arrays, corpus, corpus_csv, run, single_run, tiny  # noqa: F401


def test_a_rerun_retries_model_errors_and_only_them(tmp_path, corpus, tiny, single_run):  # noqa: F811
    bad = next(u for u in corpus.utterances if u.utt_id == "c1")
    out = tmp_path / "m.h5"
    first = run(corpus, out, FailsOn(tiny, len(load_audio(bad.path).samples)), batch_seconds=10.0)
    assert first["skipped"] == {"model_error": 1, "non_finite_audio": 1, "silent_audio": 1, "too_short": 2}

    # Still failing: retried (the model saw it again), still one skip, nothing else redone.
    still = FailsOn(tiny, len(load_audio(bad.path).samples))
    again = run(corpus, out, still, batch_seconds=10.0)
    assert again["planned"] == 1 and again["skipped"] == {"model_error": 1}
    assert still.calls  # the model was asked again
    with FeatureCache(out) as cache:
        assert list(cache.skipped["item"]).count("c1") == 1

    # The error is gone: the utterance is stored and no longer listed as skipped.
    healed = run(corpus, out, tiny, batch_seconds=10.0)
    assert healed["planned"] == 1 and healed["written"] == 1 and healed["skipped"] == {}
    assert healed["cache_skipped"] == {"missing_audio": 1, "non_finite_audio": 1, "silent_audio": 1, "too_short": 2}
    with FeatureCache(out) as cache:
        assert "c1" in cache.meta.index and "c1" not in set(cache.skipped["item"])
    feats, vads, meta, skipped, _ = cache_arrays(out)
    ref_feats, ref_vads, ref_meta, ref_skipped, _ = single_run[2]
    assert set(feats) == set(ref_feats)
    # Equal up to float16 rounding: the retried utterance ran in another batch (other padding);
    # bit-identical batches on resume are the extraction loop's business (tests/test_extract.py).
    assert all(np.allclose(feats[u], ref_feats[u], rtol=2e-3, atol=2e-3) for u in feats)
    assert all(np.array_equal(vads[u], ref_vads[u]) for u in vads)
    assert skipped.equals(ref_skipped)

    # A finished cache: nothing left to plan.
    assert run(corpus, out, tiny)["planned"] == 0


class FailsOnLengths:
    """A backend that raises on every utterance of the given sample counts."""

    def __init__(self, inner, bad_lengths):
        self.inner, self.bad = inner, set(bad_lengths)
        for name in ("name", "grid", "layers", "n_layers", "hidden_size", "describe"):
            setattr(self, name, getattr(inner, name))

    def __call__(self, waves):
        if any(len(w) in self.bad for w in waves):
            raise RuntimeError("still broken on this input")
        return self.inner(waves)


def test_a_rerun_retrying_many_persistent_model_errors_finishes(tmp_path):
    """8 utterances failed before: a rerun retries them (and they fail again) without taking that for
    a model that works on nothing; a new cache whose model fails on its first 8 still stops."""
    rows = ["path,speaker,emotion"]
    for i in range(12):  # distinct lengths: the plan runs the longest first
        sf.write(tmp_path / f"u{i:02d}.wav", 0.1 * np.sin(np.arange(8000 + 800 * i) / 7.0), 16000, subtype="PCM_16")
        rows.append(f"u{i:02d}.wav,S{i % 3},{'angry' if i % 2 else 'sad'}")
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    corpus = read_corpus("manifest", tmp_path / "c.csv")
    fbank = load_backend("fbank")
    broken = FailsOnLengths(fbank, [8000 + 800 * i for i in range(8)])  # the 8 shortest
    first = run(corpus, tmp_path / "m.h5", broken, batch_seconds=0.0)
    assert first["written"] == 4 and first["skipped"] == {"model_error": 8}
    again = run(corpus, tmp_path / "m.h5", broken, batch_seconds=0.0)
    assert again["planned"] == 8 and again["written"] == 0 and again["skipped"] == {"model_error": 8}
    with pytest.raises(ExtractError, match="failed on the first 8 utterances"):
        run(corpus, tmp_path / "fresh.h5", FailsOnLengths(fbank, [8000 + 800 * i for i in range(12)]),
            batch_seconds=0.0)
