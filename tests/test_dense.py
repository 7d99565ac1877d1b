"""Dense attention against the reference with flash-attn's tolerance rule, forward and backward.

Each case checks out, softmax_lse, the probabilities and the gradients dq, dk, dv for a random
cotangent of out (flash-attn's test) over the feature grid; test_backward.py adds the cotangent of
softmax_lse. On a GPU the grids are full products with the three dtypes; in interpret mode, where a
case costs seconds of compiling, they cover every value with every dtype and every pair of values
across the other axes (``dtype_grid``), which keeps the CPU suite inside CI's time.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa
from conftest import ON_GPU
from helpers import (check_against_reference, dtype_grid, flash_attn, make_inputs, references,
                     run_case)

SEQLENS = [(1, 239), (113, 203), (203, 113), (128, 128), (97, 97)]
HEAD_DIMS = [16, 40, 59, 64, 96, 128, 256]

FEATURES = {
    "causal": dict(causal=True),
    "window": dict(window_size=(37, 11)),
    "window_left": dict(window_size=(29, -1)),
    "window_right": dict(window_size=(-1, 13)),
    "softcap": dict(softcap=50.0, q_scale=50.0),
    "alibi": dict(alibi=True),
    "causal_alibi": dict(causal=True, alibi=True),
    "window_softcap_alibi": dict(window_size=(23, 40), softcap=10.0, q_scale=10.0, alibi=True),
    "causal_window_softcap_alibi": dict(causal=True, window_size=(31, 5), softcap=50.0,
                                        q_scale=50.0, alibi=True),
}

@pytest.mark.parametrize("dtype,head_dim,seqlens", dtype_grid(HEAD_DIMS, SEQLENS, full=ON_GPU))
def test_dtypes_head_dims_seqlens(dtype, head_dim, seqlens):
    run_case(0, seqlen_q=seqlens[0], seqlen_k=seqlens[1], head_dim=head_dim, dtype=dtype)


@pytest.mark.parametrize("dtype,feature,seqlens", dtype_grid(list(FEATURES), SEQLENS, full=ON_GPU))
def test_features(dtype, feature, seqlens):
    # Head dims and kv-head counts rotate so that every feature meets several of each.
    index = list(FEATURES).index(feature) + SEQLENS.index(seqlens)
    options = dict(FEATURES[feature])
    run_case(index, seqlen_q=seqlens[0], seqlen_k=seqlens[1], head_dim=HEAD_DIMS[index % 7],
             nheads_k=(4, 2, 1)[index % 3], dtype=dtype, **options)


@pytest.mark.parametrize("dtype,kv_heads,seqlens", dtype_grid(["gqa", "mqa"], SEQLENS, full=ON_GPU))
def test_gqa_mqa(dtype, kv_heads, seqlens):
    nheads_k = 2 if kv_heads == "gqa" else 1
    causal = SEQLENS.index(seqlens) % 2 == 0
    run_case(7, seqlen_q=seqlens[0], seqlen_k=seqlens[1], head_dim=(64, 59)[nheads_k - 1],
             nheads=6, nheads_k=nheads_k, dtype=dtype, causal=causal, alibi=not causal)


# (seqlen_q, seqlen_k, options, number of leading query rows that see no key)
EMPTY_ROW_CASES = [
    (203, 113, dict(causal=True), 90),
    (239, 1, dict(causal=True), 238),
    (203, 113, dict(window_size=(5, 0)), 90),
    (64, 16, dict(window_size=(2, 3)), 45),
    (100, 40, dict(window_size=(-1, 7), alibi=True), 53),
    (70, 33, dict(causal=True, softcap=5.0, alibi=True), 37),
]


@pytest.mark.parametrize("dtype,case", dtype_grid(EMPTY_ROW_CASES, full=ON_GPU))
def test_empty_rows_are_zero_with_lse_minus_inf_and_zero_gradient(dtype, case):
    seqlen_q, seqlen_k, options, empty = case
    out, lse, ref, (dq, _, _) = run_case(3, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=40,
                                         dtype=dtype, nheads_k=2, **options)
    out, lse, dq = np.asarray(out, np.float32), np.asarray(lse), np.asarray(dq, np.float32)
    assert np.all(out[:, :empty] == 0.0)
    assert np.all(dq[:, :empty] == 0.0)
    assert np.all(np.isneginf(lse[:, :, :empty]))
    assert np.all(np.isfinite(lse[:, :, empty:]))
    assert np.all(np.isneginf(ref[1]) == np.isneginf(lse))


def test_window_covering_everything_equals_no_window():
    q, k, v, _ = make_inputs(5, seqlen_q=77, seqlen_k=90, head_dim=32, dtype=jnp.bfloat16)
    full = flash_attn(q, k, v)
    wide = flash_attn(q, k, v, window_size=(200, 200))
    np.testing.assert_array_equal(np.asarray(full, np.float32), np.asarray(wide, np.float32))


def test_causal_equals_window_minus_one_zero():
    q, k, v, _ = make_inputs(6, seqlen_q=90, seqlen_k=77, head_dim=32, dtype=jnp.float16)
    np.testing.assert_array_equal(np.asarray(flash_attn(q, k, v, causal=True), np.float32),
                                  np.asarray(flash_attn(q, k, v, window_size=(-1, 0)), np.float32))


def test_softmax_scale_and_default_scale():
    run_case(8, seqlen_q=50, seqlen_k=60, head_dim=59, dtype=jnp.float32, softmax_scale=0.37)
    q, k, v, _ = make_inputs(8, seqlen_q=50, seqlen_k=60, head_dim=59, dtype=jnp.float32)
    # The default is the caller's head dim ** -0.5 (59, not the padded 64).
    np.testing.assert_array_equal(np.asarray(flash_attn(q, k, v)),
                                  np.asarray(flash_attn(q, k, v, softmax_scale=59 ** -0.5)))


def test_softcap_not_positive_disables_it():
    q, k, v, _ = make_inputs(9, seqlen_q=40, seqlen_k=40, head_dim=16, dtype=jnp.float32)
    plain = np.asarray(flash_attn(q, k, v))
    np.testing.assert_array_equal(plain, np.asarray(flash_attn(q, k, v, softcap=-1.0)))
    assert not np.array_equal(plain, np.asarray(flash_attn(q, k, v, softcap=0.5)))


def test_alibi_head_slopes_equal_broadcast_batch_slopes():
    q, k, v, slopes = make_inputs(10, seqlen_q=33, seqlen_k=47, head_dim=64, dtype=jnp.bfloat16,
                                  alibi=True)
    per_head = flash_attn(q, k, v, alibi_slopes=slopes[0], causal=True)
    per_batch = flash_attn(q, k, v, alibi_slopes=jnp.broadcast_to(slopes[0], (2, 4)), causal=True)
    np.testing.assert_array_equal(np.asarray(per_head, np.float32), np.asarray(per_batch, np.float32))


def test_packed_variants_equal_separate_inputs():
    q, k, v, slopes = make_inputs(11, seqlen_q=70, seqlen_k=70, head_dim=40, dtype=jnp.bfloat16,
                                  alibi=True)
    options = dict(causal=True, alibi_slopes=slopes, return_attn_probs=True)
    expected = fa.flash_attn_func(q, k, v, **options)
    qkv = jnp.stack([q, k, v], axis=2)
    packed = fa.flash_attn_qkvpacked_func(qkv, **options)
    kv_packed = fa.flash_attn_kvpacked_func(q, jnp.stack([k, v], axis=2), **options)
    for a, b, c in zip(expected, packed, kv_packed):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(c, np.float32))


def test_kvpacked_gqa_matches_reference():
    q, k, v, _ = make_inputs(12, seqlen_q=65, seqlen_k=130, nheads=6, nheads_k=3, head_dim=96,
                             dtype=jnp.float16)
    out, lse, probs = fa.flash_attn_kvpacked_func(q, jnp.stack([k, v], axis=2), window_size=(40, 8),
                                                  return_attn_probs=True)
    ref, pt = references(q, k, v, window_size=(40, 8))
    check_against_reference(out, lse, probs, ref, pt)


@pytest.mark.parametrize("shape", [(0, 5, 4, 32), (2, 0, 4, 32), (2, 5, 4, 32)])
def test_zero_sized_inputs(shape):
    batch, seqlen_q, nheads, head_dim = shape
    q = jnp.ones(shape, jnp.bfloat16)
    seqlen_k = 0 if seqlen_q == 5 else 7  # the last case has no keys at all
    k = jnp.ones((batch, seqlen_k, nheads, head_dim), jnp.bfloat16)
    out, lse, probs = fa.flash_attn_func(q, k, k, return_attn_probs=True)
    chex.assert_shape([out, lse, probs], [shape, (batch, nheads, seqlen_q),
                                          (batch, nheads, seqlen_q, seqlen_k)])
    assert np.all(np.asarray(out, np.float32) == 0.0)
    assert np.all(np.isneginf(np.asarray(lse)))


def test_eager_equals_jit():
    q, k, v, slopes = make_inputs(13, seqlen_q=45, seqlen_k=80, head_dim=64, dtype=jnp.bfloat16,
                                  alibi=True)
    eager = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    jitted = flash_attn(q, k, v, causal=True, alibi_slopes=slopes)
    np.testing.assert_array_equal(np.asarray(eager, np.float32), np.asarray(jitted, np.float32))


def test_vmap_over_leading_axis_equals_loop():
    keys = range(3)
    inputs = [make_inputs(20 + i, seqlen_q=37, seqlen_k=53, nheads_k=2, head_dim=40,
                          dtype=jnp.float16, alibi=True) for i in keys]
    q, k, v, slopes = (jnp.stack(x) for x in zip(*inputs))

    def attend(q, k, v, slopes):
        return fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, return_attn_probs=True)

    batched = jax.jit(jax.vmap(attend))(q, k, v, slopes)
    for i in keys:
        single = attend(q[i], k[i], v[i], slopes[i])
        for a, b in zip(batched, single):
            np.testing.assert_array_equal(np.asarray(a[i], np.float32), np.asarray(b, np.float32))


def test_vmap_with_shared_keys_and_inner_axis():
    q, k, v, _ = make_inputs(30, seqlen_q=21, seqlen_k=34, head_dim=16, dtype=jnp.float32)
    qs = jnp.stack([q, 2 * q], axis=1)  # the mapped axis in position 1
    batched = jax.vmap(lambda q: fa.flash_attn_func(q, k, v, window_size=(5, 5)), in_axes=1)(qs)
    for i, qi in enumerate([q, 2 * q]):
        np.testing.assert_array_equal(np.asarray(batched[i]),
                                      np.asarray(fa.flash_attn_func(qi, k, v, window_size=(5, 5))))
