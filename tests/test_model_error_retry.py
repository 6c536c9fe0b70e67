"""A model error may be transient (out of GPU memory, a driver hiccup): a rerun retries it, and only it."""

from __future__ import annotations

import numpy as np

from cache.reader import FeatureCache
from extract.audio import load_audio
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
