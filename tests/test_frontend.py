"""The CPU conv front end kept in (B, T, C) layout computes what the model's own forward does."""

import numpy as np
import pytest
import torch
from transformers import Data2VecAudioConfig, Data2VecAudioModel, WavLMConfig, WavLMModel

import extract.frontend as frontend
from extract.frontend import FastConvFrontEnd, use_fast_front_end

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7)


def model(cls=WavLMModel, config=WavLMConfig, **kw):
    torch.manual_seed(0)
    return cls(config(**{**SMALL, **kw})).eval()


@pytest.mark.parametrize("make", [
    lambda: model(feat_extract_norm="layer"),
    lambda: model(feat_extract_norm="layer", conv_bias=True),
    lambda: model(Data2VecAudioModel, Data2VecAudioConfig, conv_bias=True),
], ids=["wavlm-layer-norm", "with-conv-bias", "data2vec-audio"])
def test_fast_front_end_equals_the_models_own(make):
    m = make()
    encoder = m.feature_extractor
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 23456)).astype(np.float32))  # (B, N)
    x[1, 15000:] = 0  # a padded row
    with torch.inference_mode():
        want = encoder(x)
        assert use_fast_front_end(m) is True
        got = encoder(x)  # now the fast forward
        full = m(x[:1], output_hidden_states=True).last_hidden_state
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5 * (1 + float(want.abs().max()))
    assert not torch.equal(got, want)  # really another computation, not the same forward again
    assert full.shape[1] == got.shape[2]


def test_group_norm_front_ends_keep_their_forward():
    m = model(feat_extract_norm="group")
    before = m.feature_extractor.forward
    assert use_fast_front_end(m) is False
    assert m.feature_extractor.forward == before


def test_a_fast_forward_that_disagrees_is_not_used(monkeypatch):
    m = model(feat_extract_norm="layer")

    class Off(FastConvFrontEnd):
        def __call__(self, x):
            return super().__call__(x) * 1.01

    monkeypatch.setattr(frontend, "FastConvFrontEnd", Off)
    assert use_fast_front_end(m) is False
    assert "forward" not in vars(m.feature_extractor)


def test_the_cpu_backend_uses_it(tiny):
    assert tiny.fast_front_end is True


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from extract.backends import load_backend

    return load_backend(str(tiny_dir), layers=None, device="cpu", dtype="float32")
