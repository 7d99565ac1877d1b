"""The shared score semantics: block spans agree with the mask, formulas match the contract."""

import itertools

import numpy as np
import pytest

from flash_attn_jax.semantics import (LOG2E, ScoreSpec, alibi_bias, full_key_span, full_query_span,
                                     key_mask, key_span, linear_logit_factor, logits,
                                     logits_derivative, query_span)

WINDOWS = [(-1, -1), (-1, 0), (0, 0), (3, 0), (5, 2), (-1, 4), (7, -1), (0, 9), (40, 40)]
SEQLENS = [(1, 1), (1, 17), (17, 1), (13, 29), (29, 13), (16, 16), (5, 40)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seqlens", SEQLENS)
def test_key_spans_agree_with_mask(window, seqlens):
    seqlen_q, seqlen_k = seqlens
    spec = ScoreSpec(softmax_scale=1.0, window_left=window[0], window_right=window[1])
    rows = np.arange(seqlen_q)[:, None]
    cols = np.arange(seqlen_k)[None, :]
    mask = np.asarray(key_mask(rows, cols, spec, offset=seqlen_k - seqlen_q, seqlen_k=seqlen_k))
    span = dict(offset=seqlen_k - seqlen_q, seqlen_k=seqlen_k)
    for row_lo, row_hi in itertools.combinations(range(seqlen_q + 1), 2):
        block = mask[row_lo:row_hi]
        lo, hi = key_span(row_lo, row_hi, spec, **span)
        attended = np.flatnonzero(block.any(axis=0))
        if attended.size:
            assert lo <= attended[0] and attended[-1] < hi, (row_lo, row_hi, lo, hi)
        full_lo, full_hi = full_key_span(row_lo, row_hi, spec, **span)
        assert block[:, max(full_lo, 0):max(full_hi, 0)].all(), (row_lo, row_hi, full_lo, full_hi)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seqlens", SEQLENS)
def test_key_mask_without_the_length_test_inside_the_keys(window, seqlens):
    """``seqlen_k=None`` (a kernel's tiles of keys only) leaves out only the length test: inside
    the keys it is the mask, and past them it keeps what the window alone keeps."""
    seqlen_q, seqlen_k = seqlens
    spec = ScoreSpec(softmax_scale=1.0, window_left=window[0], window_right=window[1])
    rows = np.arange(seqlen_q)[:, None]
    cols = np.arange(seqlen_k + 8)[None, :]
    offset = seqlen_k - seqlen_q
    shape = (seqlen_q, seqlen_k + 8)
    mask = np.broadcast_to(key_mask(rows, cols, spec, offset=offset, seqlen_k=seqlen_k), shape)
    unbounded = np.broadcast_to(key_mask(rows, cols, spec, offset=offset, seqlen_k=None), shape)
    np.testing.assert_array_equal(unbounded[:, :seqlen_k], mask[:, :seqlen_k])
    past = cols[:, seqlen_k:]
    window_keeps = np.broadcast_to(key_mask(rows, past, spec, offset=offset, seqlen_k=1 << 30),
                                   (seqlen_q, 8))
    np.testing.assert_array_equal(unbounded[:, seqlen_k:], window_keeps)
    assert not mask[:, seqlen_k:].any()


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seqlens", SEQLENS)
def test_query_spans_agree_with_mask(window, seqlens):
    seqlen_q, seqlen_k = seqlens
    spec = ScoreSpec(softmax_scale=1.0, window_left=window[0], window_right=window[1])
    rows = np.arange(seqlen_q)[:, None]
    cols = np.arange(seqlen_k)[None, :]
    mask = np.asarray(key_mask(rows, cols, spec, offset=seqlen_k - seqlen_q, seqlen_k=seqlen_k))
    span = dict(offset=seqlen_k - seqlen_q, seqlen_q=seqlen_q)
    for col_lo, col_hi in itertools.combinations(range(seqlen_k + 1), 2):
        block = mask[:, col_lo:col_hi]
        lo, hi = query_span(col_lo, col_hi, spec, **span)
        attending = np.flatnonzero(block.any(axis=1))
        if attending.size:
            assert lo <= attending[0] and attending[-1] < hi, (col_lo, col_hi, lo, hi)
        full_lo, full_hi = full_query_span(col_lo, col_hi, spec, **span)
        assert block[max(full_lo, 0):max(full_hi, 0)].all(), (col_lo, col_hi, full_lo, full_hi)


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_logits_derivative_matches_autodiff(softcap):
    import jax
    spec = ScoreSpec(softmax_scale=0.7, softcap=softcap)
    qk = np.linspace(-20.0, 20.0, 41)
    expected = jax.vmap(jax.grad(lambda x: logits(x, spec)))(qk)
    derivative = logits_derivative(logits(qk, spec), spec)
    np.testing.assert_allclose(np.broadcast_to(derivative, qk.shape), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [0.125, 0.0883883, 1.7, 1e-3])
def test_linear_logit_factor_gives_the_scaled_row_max_exactly(scale):
    """Where a kernel may take the max of the raw scores: the logits are ``qk * factor`` and the
    raw row max times the factor is the scaled row max, bit for bit (float32 rounding is
    monotone); softcap, ALiBi and a non-positive scale keep the scaled path."""
    spec = ScoreSpec.create(softmax_scale=scale)
    factor = linear_logit_factor(spec, unit=LOG2E)
    assert factor == scale * LOG2E
    qk = np.random.default_rng(7).standard_normal((64, 257)).astype(np.float32) * 30
    qk[:, :5] = -np.inf  # masked columns
    scaled = np.asarray(logits(qk, spec, unit=LOG2E))
    np.testing.assert_array_equal(scaled, qk * np.float32(factor))
    np.testing.assert_array_equal(qk.max(axis=1) * np.float32(factor), scaled.max(axis=1))
    for other in (ScoreSpec.create(softmax_scale=scale, softcap=30.0),
                  ScoreSpec.create(softmax_scale=scale, has_alibi=True),
                  ScoreSpec.create(softmax_scale=-scale), ScoreSpec.create(softmax_scale=0.0)):
        assert linear_logit_factor(other, unit=LOG2E) is None


def test_mask_matches_contract_examples():
    # flash-attn's documented examples: sq=2, sk=5 causal -> 11110 / 11111; sq=5, sk=2 -> 00/00/00/10/11.
    causal = ScoreSpec.create(softmax_scale=1.0, causal=True)
    rows, cols = np.arange(2)[:, None], np.arange(5)[None, :]
    np.testing.assert_array_equal(key_mask(rows, cols, causal, offset=3, seqlen_k=5),
                                  [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    rows, cols = np.arange(5)[:, None], np.arange(2)[None, :]
    np.testing.assert_array_equal(key_mask(rows, cols, causal, offset=-3, seqlen_k=2),
                                  [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]])


def test_causal_is_window_left_zero_right():
    assert ScoreSpec.create(softmax_scale=1.0, causal=True, window_size=(5, 7)) == ScoreSpec(
        softmax_scale=1.0, window_left=5, window_right=0)
    assert ScoreSpec.create(softmax_scale=1.0, causal=True) == ScoreSpec(
        softmax_scale=1.0, window_left=-1, window_right=0)
    assert ScoreSpec.create(softmax_scale=1.0, softcap=-3.0).softcap == 0.0


def test_alibi_bias_formula():
    rows, cols = np.arange(3)[:, None], np.arange(6)[None, :]
    bias = np.asarray(alibi_bias(0.5, rows, cols, offset=3))
    expected = [[-0.5 * abs(i + 3 - j) for j in range(6)] for i in range(3)]
    np.testing.assert_allclose(bias, expected)
