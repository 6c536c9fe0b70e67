import numpy as np
import pytest
import torch

import heads.model.pooling
from heads.model.head import SERHead
from heads.model.layer_mix import LayerMix
from heads.model.pooling import GAP, SAP, SR, attention_heads, compact, flash_pays, speech_frames

D = 16


@pytest.fixture(params=["flash", "chunked", "dense"])
def sap_path(request, monkeypatch):
    """Run the test with SAP forced onto one of its formulations.

    chunked: MeanSoftmax in blocks of 5 queries, so most batches take several
    blocks, the last one partial; dense: mean_softmax's autograd form.
    """
    monkeypatch.setattr(heads.model.pooling, "FLASH_MAX_DIM_PER_FRAME", float("inf") if request.param == "flash" else 0.0)
    monkeypatch.setattr(heads.model.pooling, "query_block", lambda batch, heads, frames: 5)
    monkeypatch.setattr(heads.model.pooling, "DENSE_MAX_ELEMENTS", 2**40 if request.param == "dense" else 0)
    return request.param


def batch(seed=0, lengths=(7, 12, 3, 9), speech_p=0.6):
    """(B, T, D) features with garbage in the padding, masks, and per-row lengths."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    x = torch.randn(B, T, D, generator=g)
    pad = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    vad = (torch.rand(B, T, generator=g) < speech_p) & pad
    vad[:, 0] |= pad[:, 0]  # at least one speech frame per row
    x[~pad] = 1e3  # padding values must never matter
    return x, pad, vad


def test_gap_is_the_numpy_mean_of_real_frames():
    x, pad, vad = batch()
    got = GAP(D)(x, pad, vad).numpy()
    for b in range(x.shape[0]):
        real = x[b].numpy()[pad[b].numpy()]
        np.testing.assert_allclose(got[b], real.mean(axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [SAP, SR])
def test_sap_ignores_non_speech_and_padding_values(cls, sap_path):
    torch.manual_seed(0)
    pool = cls(D, heads=4).eval()
    x, pad, vad = batch(1)
    ref = pool(x, pad, vad)
    y = x.clone()
    y[pad & ~vad] = torch.randn(int((pad & ~vad).sum()), D) * 5  # non-speech frames change
    y[~pad] = -7.0  # padding changes
    out = pool(y, pad, vad)
    if cls is SAP:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    else:  # GAP half sees non-speech frames (by design), the SAP half must not
        torch.testing.assert_close(out[:, D:], ref[:, D:], atol=1e-5, rtol=0)
        assert not torch.allclose(out[:, :D], ref[:, :D])
    # ... but speech frames do matter
    z = x.clone()
    z[vad] += 1.0
    assert not torch.allclose(pool(z, pad, vad)[:, -D:], ref[:, -D:])


@pytest.mark.parametrize("cls", [GAP, SAP, SR])
def test_padded_batch_equals_one_utterance_at_a_time(cls, sap_path):
    torch.manual_seed(0)
    pool = cls(D) if cls is GAP else cls(D, heads=4)
    pool.eval()
    x, pad, vad = batch(2, lengths=(5, 17, 1, 11, 8))
    together = pool(x, pad, vad)
    for b in range(x.shape[0]):
        n = int(pad[b].sum())
        alone = pool(x[b : b + 1, :n], pad[b : b + 1, :n], vad[b : b + 1, :n])
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=0)


def test_sap_matches_explicit_attention_over_speech_frames(sap_path):
    torch.manual_seed(0)
    pool = SAP(D, heads=4).eval()
    with torch.no_grad():  # biases start at 0 in torch: make them count
        for p in pool.parameters():
            p.normal_(0, 0.5)
    x, pad, vad = batch(3)
    got = pool(x, pad, vad)
    for b in range(x.shape[0]):
        speech = x[b][vad[b]].unsqueeze(0)  # (1, S, D): g(X), eq. 4
        h, _ = pool.mhsa(speech, speech, speech, need_weights=False)
        torch.testing.assert_close(got[b], h[0].mean(0), atol=1e-5, rtol=0)


def test_no_speech_falls_back_to_all_real_frames_and_is_flagged(sap_path):
    torch.manual_seed(0)
    pool = SR(D, heads=4)
    x, pad, vad = batch(4)
    vad[1] = False  # VAD found nothing in utterance 1
    x.requires_grad_(True)
    out = pool(x, pad, vad)
    mask, flags = speech_frames(pad, vad)
    assert flags.tolist() == [False, True, False, False]
    assert torch.equal(mask[1], pad[1])
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # the fallback equals SAP over a VAD mask that marks every real frame
    alone = pool.sap(x[1:2].detach(), pad[1:2], pad[1:2])
    torch.testing.assert_close(out[1:2, D:].detach(), alone, atol=1e-5, rtol=0)


def test_a_row_without_any_frame_stays_finite(sap_path):
    pool = SAP(D, heads=4)
    x = torch.randn(2, 4, D, requires_grad=True)
    pad = torch.tensor([[True, True, False, False], [False] * 4])
    out = pool(x, pad, pad.clone())
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.equal(out[1], torch.zeros(D))


def test_sap_gradients_match_explicit_attention(sap_path):
    """Values and gradients (features and every parameter) of both formulations against
    nn.MultiheadAttention over each utterance's speech frames, then the mean; the batch
    holds padding, a no-speech row (falls back to all real frames) and a row with no frame."""
    torch.manual_seed(0)
    pool = SAP(D, heads=4)
    with torch.no_grad():
        for p in pool.parameters():
            p.normal_(0, 0.5)
    x, pad, vad = batch(6, lengths=(7, 12, 3, 0, 9, 10))
    vad[5] = False
    r = torch.randn(x.shape[0], D)  # a loss that weighs every output

    x.requires_grad_(True)
    got = pool(x, pad, vad)
    (got * r).sum().backward()
    got_grads = [x.grad.clone()] + [p.grad.clone() for p in pool.parameters()]

    x.grad, mask = None, speech_frames(pad, vad)[0]
    pool.zero_grad()
    expected = torch.zeros(x.shape[0], D)
    for b in range(x.shape[0]):
        if mask[b].any():
            speech = x[b][mask[b]].unsqueeze(0)  # (1, S, D)
            expected[b] = pool.mhsa(speech, speech, speech, need_weights=False)[0][0].mean(0)
    (expected * r).sum().backward()
    want_grads = [x.grad] + [p.grad for p in pool.parameters()]

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[3], torch.zeros(D))
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_sap_picks_the_fused_kernel_only_while_features_are_narrow_next_to_frames():
    assert flash_pays(600, 80) and not flash_pays(200, 1024)


def test_compact_keeps_selected_frames_in_order():
    x = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)
    mask = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    xc, mc = compact(x, mask)
    assert xc[..., 0].tolist() == [[1, 3, 4], [5, 6, 7]]
    assert mc.tolist() == [[True, True, True], [True, False, False]]


def test_sizes_and_head_counts():
    assert (GAP(D).output_size, SAP(D).output_size, SR(D).output_size) == (D, D, 2 * D)
    assert attention_heads(1024, 8) == 8 and attention_heads(768, 5) == 4 and attention_heads(30, 8) == 6
    assert SAP(30, heads=8).heads == 6
    head = SERHead(D, 3, 4, pooling="sr", proj_dim=32)
    assert (head.input_size, head.output_size) == (D, 6)


def test_layer_mix_is_a_softmax_weighted_sum():
    mix = LayerMix(3, D)
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([0.0, 1.0, 2.0]))
    x = torch.randn(2, 5, 3, D)
    w = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    expected = (x * w[None, None, :, None]).sum(2)
    torch.testing.assert_close(mix(x), expected)
    assert torch.equal(LayerMix(1, D)(x[:, :, :1]), x[:, :, 0])
    with pytest.raises(ValueError):
        mix(torch.randn(2, 5, 4, D))


def test_gap_head_pools_each_layer_before_mixing_with_the_same_result():
    torch.manual_seed(0)
    head = SERHead(D, 3, 4, pooling="gap").eval()
    with torch.no_grad():
        head.mix.logits.copy_(torch.tensor([0.3, -1.0, 2.0]))
    x, pad, vad = batch(5)
    feats = torch.stack([x, 2 * x, -x], dim=2)  # (B, T, L, D)
    mixed = head.mix(feats)  # (B, T, D): mix every frame, then GAP
    expected = head.classifier(head.proj(head.pool(mixed, pad, vad)))
    torch.testing.assert_close(head(feats, pad, vad).logits, expected, atol=1e-5, rtol=0)


def test_keep_at_most_keeps_cap_frames_of_the_mask_and_leaves_shorter_rows_alone():
    from heads.model.pooling import keep_at_most

    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 50, dtype=torch.bool)
    mask[0, ::2] = True  # 25 frames
    mask[1, :3] = True  # 3 frames: under the cap
    mask[3, 10:40] = True  # 30 frames
    kept = keep_at_most(mask, 8, g)
    assert kept.sum(dim=1).tolist() == [8, 3, 0, 8]
    assert not (kept & ~mask).any() and torch.equal(kept[1], mask[1])
    again = keep_at_most(mask, 8, g)
    assert not torch.equal(again, kept)  # drawn anew each call
    # every frame of a row can be drawn: uniform over the row's frames
    counts = sum(keep_at_most(mask, 8, g)[3].long() for _ in range(300))
    assert counts[10:40].min() > 40 and counts[:10].sum() == 0  # expected 300 * 8 / 30 = 80 per frame
