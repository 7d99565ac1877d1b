"""Hardening: every input gives a correct result or a clear error.

Concrete inputs that cannot be right raise at trace time (ValueError, TypeError for types, naming
the argument). Traced inputs the library cannot check give the documented defined output, the
kernels and the reference agreeing on it: no NaN, no row left unwritten (interpret mode starts
outputs as NaN, so an unwritten row shows), no two writes to one cache slot. Finite inputs whose
exact softmax is finite give finite results at any logit scale the float32 reference handles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa
from flash_attn_jax.semantics import sequence_bounds
from helpers import cotangents, make_inputs

F32 = jnp.float32


def _normal(rng, *shape, scale=1.0):
    return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32))


def _no_nan(*arrays):
    for x in jax.tree.leaves(arrays):
        assert not np.isnan(np.asarray(x, np.float32)).any(), "NaN in the output"


# ----------------------------------------------------------------------------------------------
# Clear errors for concrete inputs.

Q = jnp.zeros((2, 8, 4, 16), F32)
KV = jnp.zeros((2, 8, 2, 16), F32)
VQ = jnp.zeros((20, 4, 16), F32)
VKV = jnp.zeros((24, 2, 16), F32)
CU = np.array([0, 8, 20], np.int32)
CU_K = np.array([0, 12, 24], np.int32)


def _varlen(**changes):
    args = dict(q=VQ, k=VKV, v=VKV, cu_seqlens_q=CU, cu_seqlens_k=CU_K, max_seqlen_q=12,
                max_seqlen_k=12) | changes
    return fa.flash_attn_varlen_func(**args)


def _cache(**changes):
    rows = 3 if "cache_batch_idx" in changes else 2
    args = dict(q=jnp.zeros((2, 1, 4, 16), F32), k_cache=jnp.zeros((rows, 32, 2, 16), F32),
                v_cache=jnp.zeros((rows, 32, 2, 16), F32), k=jnp.zeros((2, 1, 2, 16), F32),
                v=jnp.zeros((2, 1, 2, 16), F32), cache_seqlens=np.array([3, 5], np.int32)) | changes
    return fa.flash_attn_with_kvcache(**args)


ERRORS = [
    ("scale past float32", lambda: fa.flash_attn_func(Q, KV, KV, softmax_scale=1e39),
     ValueError, "softmax_scale must be finite in float32"),
    ("softcap past float32", lambda: fa.flash_attn_func(Q, KV, KV, softcap=-1e300),
     ValueError, "softcap must be finite in float32"),
    ("scale / softcap past float32", lambda: fa.flash_attn_func(Q, KV, KV, softcap=1e-40),
     ValueError, "softcap .* too small"),
    ("no kv heads", lambda: fa.flash_attn_func(Q, KV[:, :, :0], KV[:, :, :0]), ValueError,
     "k must have at least one key/value head"),
    ("alibi nan", lambda: fa.flash_attn_func(Q, KV, KV, alibi_slopes=jnp.full((4,), jnp.nan)),
     ValueError, "alibi_slopes must be finite"),
    ("cu start", lambda: _varlen(cu_seqlens_q=np.array([1, 8, 20], np.int32)), ValueError,
     "cu_seqlens_q must start at 0"),
    ("cu decreasing", lambda: _varlen(cu_seqlens_k=np.array([0, 12, 10], np.int32)), ValueError,
     "cu_seqlens_k must not decrease"),
    ("cu past the tokens", lambda: _varlen(cu_seqlens_q=np.array([0, 8, 21], np.int32)),
     ValueError, "cu_seqlens_q must end at most at the number of tokens"),
    ("cu float", lambda: _varlen(cu_seqlens_q=CU.astype(np.float32)), TypeError,
     "cu_seqlens_q must have dtype int32"),
    ("cu unsigned", lambda: _varlen(cu_seqlens_q=CU.astype(np.uint32)), TypeError,
     "cu_seqlens_q must have dtype int32"),
    ("max_seqlen_q short", lambda: _varlen(max_seqlen_q=11), ValueError,
     r"max_seqlen_q \(11\) must be >= the longest sequence in cu_seqlens_q \(12\)"),
    ("max_seqlen_k short", lambda: _varlen(max_seqlen_k=5), ValueError, "max_seqlen_k"),
    ("block table short", lambda: _varlen(k=jnp.zeros((4, 16, 2, 16), F32),
                                          v=jnp.zeros((4, 16, 2, 16), F32),
                                          cu_seqlens_k=np.array([0, 12, 40], np.int32),
                                          max_seqlen_k=28,
                                          block_table=np.array([[0], [1]], np.int32)),
     ValueError, "block_table is too short"),
    ("varlen page out of range", lambda: _varlen(k=jnp.zeros((4, 16, 2, 16), F32),
                                                v=jnp.zeros((4, 16, 2, 16), F32),
                                                block_table=np.array([[0], [7]], np.int32)),
     ValueError, "block_table must lie in"),
    ("cache_seqlens past int32", lambda: _cache(cache_seqlens=2**31), ValueError,
     "cache_seqlens must lie in"),
    ("cache_seqlens negative int", lambda: _cache(cache_seqlens=-1), ValueError,
     "cache_seqlens must lie in"),
    ("cache_seqlens negative array", lambda: _cache(cache_seqlens=np.array([3, -2], np.int32)),
     ValueError, "cache_seqlens must lie in"),
    ("cache_batch_idx out of rows", lambda: _cache(cache_batch_idx=np.array([0, 3], np.int32)),
     ValueError, r"cache_batch_idx must lie in \[0, 2\]"),
    ("cache_batch_idx negative", lambda: _cache(cache_batch_idx=np.array([-1, 0], np.int32)),
     ValueError, "cache_batch_idx must lie in"),
    ("cache_leftpad past capacity", lambda: _cache(cache_leftpad=np.array([0, 33], np.int32)),
     ValueError, "cache_leftpad must lie in"),
    ("cache_seqlens float", lambda: _cache(cache_seqlens=np.array([3.0, 5.0], np.float32)),
     TypeError, "cache_seqlens must have dtype int32"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_concrete_inputs_are_checked(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_traced_window_is_a_type_error():
    with pytest.raises(TypeError, match="window_size must be static Python ints"):
        jax.jit(lambda q, w: fa.flash_attn_func(q, q, q, window_size=(w, 0))).trace(Q, 3)


def test_wider_integer_index_arrays_give_the_int32_results():
    args = dict(cu_seqlens_q=CU.astype(np.int64), cu_seqlens_k=CU_K.astype(np.int16))
    rng = np.random.default_rng(0)
    q, k = _normal(rng, 20, 4, 16), _normal(rng, 24, 2, 16)
    wide = fa.flash_attn_varlen_func(q, k, k, max_seqlen_q=12, max_seqlen_k=12, **args)
    narrow = fa.flash_attn_varlen_func(q, k, k, CU, CU_K, 12, 12)
    np.testing.assert_array_equal(wide, narrow)


# ----------------------------------------------------------------------------------------------
# Integer ranges: a window at least the sequence length is unbounded, up to and past 2**31.

@pytest.mark.parametrize("window", [(2**31 - 1, 0), (2**31, 2**40), (64, 2**31 - 1)])
def test_huge_windows_equal_unbounded(window):
    q, k, v, _ = make_inputs(0, seqlen_q=40, seqlen_k=64, head_dim=16, dtype=F32)
    unbounded = tuple(-1 if w >= 64 else w for w in window)
    grad = jax.jit(jax.grad(lambda q, w: fa.flash_attn_func(q, k, v, window_size=w).sum(),
                            argnums=0), static_argnums=1)
    np.testing.assert_array_equal(fa.flash_attn_func(q, k, v, window_size=window),
                                  fa.flash_attn_func(q, k, v, window_size=unbounded))
    np.testing.assert_array_equal(grad(q, window), grad(q, unbounded))
    cache = fa.flash_attn_with_kvcache(q[:, :1], k, v, cache_seqlens=30, window_size=window)
    np.testing.assert_array_equal(
        cache, fa.flash_attn_with_kvcache(q[:, :1], k, v, cache_seqlens=30, window_size=unbounded))


# ----------------------------------------------------------------------------------------------
# Varlen with traced boundaries the library cannot check: defined, kernels = the definition.

def _expected_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dout, **options):
    """out, lse, (dq, dk, dv) by the definition: bounds = sequence_bounds(cu) (running maximum,
    clipped), each sequence truncated to max_seqlen, every other token out 0 / lse -inf / grad 0;
    per sequence the dense reference (float32)."""
    bounds_q = np.asarray(sequence_bounds(jnp.asarray(cu_q), q.shape[0]))
    bounds_k = np.asarray(sequence_bounds(jnp.asarray(cu_k), k.shape[0]))
    out, lse = np.zeros(q.shape), np.full((q.shape[1], q.shape[0]), -np.inf)
    grads = [np.zeros(x.shape) for x in (q, k, v)]
    for b in range(len(cu_q) - 1):
        q0, k0 = bounds_q[b], bounds_k[b]
        sq = min(bounds_q[b + 1] - q0, max_q)
        sk = min(bounds_k[b + 1] - k0, max_k)
        if sq == 0:
            continue
        rows, cols = slice(q0, q0 + sq), slice(k0, k0 + sk)

        def attend(q, k, v):
            return fa.attention_reference(q[None], k[None], v[None], **options)
        (o, l), vjp = jax.vjp(attend, q[rows], k[cols], v[cols])
        out[rows], lse[:, rows] = o[0], l[0]
        dq, dk, dv = vjp((dout[None, rows], jnp.zeros_like(l)))
        grads[0][rows] += dq
        grads[1][cols] += dk
        grads[2][cols] += dv
    return out, lse, grads


@pytest.mark.parametrize("cu_q,cu_k,max_q,max_k", [
    ([0, 10, 6, 30], [0, 12, 30, 40], 24, 20),   # decreasing cu_seqlens_q
    ([4, 10, 30, 30], [3, 12, 30, 45], 20, 18),  # cu[0] > 0; cu_k past the keys
    ([0, 14, 30, 31], [0, 20, 36, 40], 9, 7),    # max_seqlen below the longest sequence
])
def test_varlen_traced_boundaries_are_defined(cu_q, cu_k, max_q, max_k):
    rng = np.random.default_rng(1)
    q, k, v = _normal(rng, 32, 4, 16), _normal(rng, 40, 2, 16), _normal(rng, 40, 2, 16)
    dout = _normal(rng, 32, 4, 16)

    @jax.jit
    def run(q, k, v, cu_q, cu_k):
        def attend(q, k, v):
            out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k,
                                                    causal=True, return_attn_probs=True)
            return out, lse
        (out, lse), vjp = jax.vjp(attend, q, k, v)
        return out, lse, vjp((dout, jnp.zeros_like(lse)))

    out, lse, grads = run(q, k, v, jnp.asarray(cu_q, jnp.int32), jnp.asarray(cu_k, jnp.int32))
    _no_nan(out, grads)
    expected = _expected_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dout, causal=True)
    np.testing.assert_allclose(out, expected[0], atol=2e-5)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(expected[1]))
    np.testing.assert_allclose(np.where(np.isinf(lse), 0, lse),
                               np.where(np.isinf(expected[1]), 0, expected[1]), atol=2e-5)
    for grad, want in zip(grads, expected[2]):
        np.testing.assert_allclose(grad, want, atol=5e-5)


# ----------------------------------------------------------------------------------------------
# KV cache with traced indices: kernels = kvcache_reference, and no two writes meet.

CACHE_CASES = {
    "negative seqlens": dict(cache_seqlens=[-1, -5, 3]),
    "seqlens past capacity": dict(cache_seqlens=[2**31 - 3, 39, 38]),
    "duplicate batch_idx": dict(cache_seqlens=[3, 3, 5], cache_batch_idx=[1, 1, 0]),
    "batch_idx out of range": dict(cache_seqlens=[3, 3, 5], cache_batch_idx=[5, -1, 0]),
    "pages shared": dict(cache_seqlens=[0, 0, 17], block_table=[[0, 1, 2], [0, 3, 4], [5, 1, 6]]),
    "pages missing or repeated": dict(cache_seqlens=[10, 20, 30],
                                      block_table=[[0, -1, 2], [9, 3, 3], [5, 1, 6]]),
    "leftpad out of range": dict(cache_seqlens=[3, 10, 20], cache_leftpad=[5, 50, -3]),
}


@pytest.mark.parametrize("name", list(CACHE_CASES))
def test_kvcache_traced_indices_are_defined(name):
    rng = np.random.default_rng(2)
    indices = {n: jnp.asarray(x, jnp.int32) for n, x in CACHE_CASES[name].items()}
    paged = "block_table" in indices
    cache_shape = (7, 16, 2, 16) if paged else (3, 40, 2, 16)
    q, new_k, new_v = _normal(rng, 3, 1, 4, 16), _normal(rng, 3, 2, 2, 16), _normal(rng, 3, 2, 2, 16)
    k_cache, v_cache = _normal(rng, *cache_shape), _normal(rng, *cache_shape)
    kernel = jax.jit(lambda *a, **i: fa.flash_attn_with_kvcache(*a, causal=True,
                                                                return_softmax_lse=True, **i))
    reference = jax.jit(lambda *a, **i: fa.kvcache_reference(*a, causal=True, **i))
    out, lse, k_new, v_new = kernel(q, k_cache, v_cache, new_k, new_v, **indices)
    want = reference(q, k_cache, v_cache, new_k, new_v, **indices)
    _no_nan(out, k_new, v_new)
    np.testing.assert_array_equal(k_new, want[2])
    np.testing.assert_array_equal(v_new, want[3])
    np.testing.assert_allclose(out, want[0], atol=1e-5)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want[1]))
    if name == "duplicate batch_idx":  # batch rows 0 and 1 both write row 1: row 0 wins
        np.testing.assert_array_equal(k_new[1, 3:5], new_k[0])
    if name == "negative seqlens":  # new keys before position 0 are dropped, none collapse
        np.testing.assert_array_equal(k_new[1], k_cache[1])  # positions -5, -4
        np.testing.assert_array_equal(k_new[0, 0], new_k[0, 1])  # position 0 of -1, 0
        np.testing.assert_array_equal(k_new[0, 1:], k_cache[0, 1:])


@pytest.mark.parametrize("case", ["batch 0", "capacity 0", "no pages", "empty table",
                                  "no new tokens"])
def test_kvcache_zero_sizes_are_computed(case):
    rng = np.random.default_rng(3)
    batch = 0 if case == "batch 0" else 2
    q = _normal(rng, batch, 1, 4, 16)
    new = _normal(rng, batch, 0 if case == "no new tokens" else 1, 2, 16)
    args = dict(cache_seqlens=jnp.zeros((batch,), jnp.int32))
    cache = _normal(rng, batch, 0 if case == "capacity 0" else 8, 2, 16)
    if case in ("no pages", "empty table"):
        cache = _normal(rng, 0 if case == "no pages" else 3, 16, 2, 16)
        args["block_table"] = jnp.zeros((batch, 0 if case == "empty table" else 2), jnp.int32)
    with_new = case not in ("capacity 0", "empty table")  # appends need room for q's tokens
    out, lse, *caches = fa.flash_attn_with_kvcache(
        q, cache, cache, *((new, new) if with_new else ()), return_softmax_lse=True,
        **(args if with_new or "block_table" in args else {}))
    assert out.shape == q.shape and lse.shape == (batch, 4, 1)
    has_keys = case == "no new tokens"
    if not has_keys:
        np.testing.assert_array_equal(out, 0)
        assert np.all(np.asarray(lse) == -np.inf)
    for c in caches:
        assert c.shape == cache.shape


def test_kvcache_append_to_a_zero_capacity_cache_is_refused():
    with pytest.raises(ValueError, match="must not exceed the cache capacity"):
        fa.flash_attn_with_kvcache(jnp.zeros((2, 1, 4, 16)), jnp.zeros((2, 0, 2, 16)),
                                   jnp.zeros((2, 0, 2, 16)), jnp.zeros((2, 1, 2, 16)),
                                   jnp.zeros((2, 1, 2, 16)), cache_seqlens=0)


def test_zero_sizes_of_the_dense_and_varlen_functions():
    z = lambda *s: jnp.zeros(s, F32)
    grad = jax.grad(lambda q, k: fa.flash_attn_func(q, k, k, causal=True).sum(), argnums=(0, 1))
    for q_shape, k_shape in (((0, 8, 4, 16), (0, 8, 2, 16)), ((1, 0, 4, 16), (1, 8, 2, 16)),
                             ((1, 8, 4, 16), (1, 0, 2, 16))):
        out, lse, probs = fa.flash_attn_func(z(*q_shape), z(*k_shape), z(*k_shape),
                                             return_attn_probs=True)
        assert out.shape == q_shape and probs.shape == (q_shape[0], 4, q_shape[1], k_shape[1])
        assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) == -np.inf)
        dq, dk = grad(z(*q_shape), z(*k_shape))
        assert dq.shape == q_shape and dk.shape == k_shape
    out = fa.flash_attn_varlen_func(z(5, 4, 16), z(5, 2, 16), z(5, 2, 16),
                                    jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32), 4, 4)
    np.testing.assert_array_equal(out, 0)


# ----------------------------------------------------------------------------------------------
# Logit scales: finite and within tolerance wherever the float32 reference is.

@pytest.mark.parametrize("dtype,q_scale", [(F32, 1e9), (F32, 1e30), (jnp.bfloat16, 1e9),
                                           (jnp.float16, 3e3), (F32, 1e-30)])
def test_large_logits_stay_finite_and_accurate(dtype, q_scale):
    # At such scales the same-dtype reference of the tolerance rule overflows (float16) or loses
    # the maximum to XLA's own multiply-add contraction (float32 math), so the oracle is the
    # float64 reference: the output within a few roundings of the values, the logsumexp within
    # float32's relative precision.
    q, k, v, slopes = make_inputs(4, seqlen_q=40, seqlen_k=72, head_dim=32, dtype=dtype,
                                  q_scale=q_scale, alibi=True)
    dout, dlse = cotangents(4, q, lse=True)

    @jax.jit
    def run(q, k, v):
        def attend(q, k, v):
            out, lse, _ = fa.flash_attn_func(q, k, v, alibi_slopes=slopes, causal=True,
                                             return_attn_probs=True)
            return out, lse
        (out, lse), vjp = jax.vjp(attend, q, k, v)
        return out, lse, vjp((dout, dlse))

    out, lse, grads = run(q, k, v)
    cache_out = fa.flash_attn_with_kvcache(q[:, -1:], k, v, cache_seqlens=72,
                                           alibi_slopes=slopes)
    with jax.enable_x64(True):
        want, want_lse = (np.asarray(x) for x in fa.attention_reference(
            *(jnp.asarray(x, F32) for x in (q, k, v)), alibi_slopes=slopes, causal=True,
            compute_dtype=jnp.float64))
    _no_nan(out, lse, grads, cache_out)
    for x in (out, lse, *grads, cache_out):
        assert np.all(np.isfinite(np.asarray(x, np.float32)))
    atol = 4 * float(jnp.finfo(dtype).eps) * float(np.abs(np.asarray(v, np.float32)).max())
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=atol, rtol=0)
    np.testing.assert_allclose(np.asarray(cache_out, np.float64), want[:, -1:], atol=atol, rtol=0)
    np.testing.assert_allclose(np.asarray(lse, np.float64), want_lse, rtol=2e-6,
                               atol=1e-5)


def test_float64_slopes_and_huge_max_seqlen():
    # float64 slopes (jnp's default under x64) are taken as float32; a max_seqlen far past the
    # tokens launches no more than the tokens need and changes nothing.
    rng = np.random.default_rng(5)
    q, k = _normal(rng, 20, 4, 16), _normal(rng, 24, 2, 16)
    slopes = np.array([0.1, 0.2, 0.3, 0.4])
    want = fa.flash_attn_varlen_func(q, k, k, CU, CU_K, 12, 12, causal=True,
                                     alibi_slopes=slopes.astype(np.float32))
    got = fa.flash_attn_varlen_func(q, k, k, CU, CU_K, 12, 12, causal=True, alibi_slopes=slopes)
    np.testing.assert_array_equal(got, want)
    huge = fa.flash_attn_varlen_func(q, k, k, CU, CU_K, 2**31 - 1, 2**31 - 1, causal=True,
                                     alibi_slopes=slopes)  # other blocks: other roundings
    np.testing.assert_allclose(huge, want, atol=2e-6, rtol=0)
    _, _, probs = fa.flash_attn_varlen_func(q, k, k, CU, CU_K, 30, 13, return_attn_probs=True)
    assert probs.shape == (2, 4, 30, 13) and np.all(np.asarray(probs)[:, :, 20:] == 0)
