"""Test utilities: random inputs, the two references, and flash-attn's tolerance rule.

The rule (flash-attn's tests, semantics.md section 7): with ``ref`` the reference in high precision
(float32 math for 16-bit inputs, float64 for float32 inputs) and ``pt`` the same reference computed
in the input dtype, an implementation passes when
``max|x - ref| <= factor * max|pt - ref| + atol`` (factor 2 for outputs, 3 for gradients).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

import flash_attn_jax as fa

DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
DTYPE_IDS = ("fp16", "bf16", "fp32")


def make_inputs(seed, *, batch=2, seqlen_q, seqlen_k, nheads=4, nheads_k=None, head_dim, dtype,
                alibi=False, q_scale=1.0):
    """Random q, k, v (batch, seqlen, heads, head_dim) and optional (batch, nheads) ALiBi slopes."""
    nheads_k = nheads if nheads_k is None else nheads_k
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = (jax.random.normal(keys[0], (batch, seqlen_q, nheads, head_dim)) * q_scale).astype(dtype)
    k = jax.random.normal(keys[1], (batch, seqlen_k, nheads_k, head_dim)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, seqlen_k, nheads_k, head_dim)).astype(dtype)
    slopes = jax.random.uniform(keys[3], (batch, nheads), jnp.float32) * 0.3 if alibi else None
    return q, k, v, slopes


@functools.partial(jax.jit, static_argnames=("options", "upcast", "compute_dtype"))
def _reference(q, k, v, slopes, *, options, upcast, compute_dtype):
    return fa.attention_reference(q, k, v, alibi_slopes=slopes, upcast=upcast,
                                  compute_dtype=compute_dtype, return_probs=True, **dict(options))


def references(q, k, v, slopes=None, **options):
    """(ref, pt), each (out, lse, probs) as float64 numpy arrays."""
    frozen = tuple(sorted(options.items()))
    if q.dtype == jnp.float32:
        with jax.enable_x64(True):
            ref = _reference(q, k, v, slopes, options=frozen, upcast=True, compute_dtype=jnp.float64)
            ref = tuple(np.asarray(x, np.float64) for x in ref)
    else:
        ref = _reference(q, k, v, slopes, options=frozen, upcast=True, compute_dtype=jnp.float32)
    pt = _reference(q, k, v, slopes, options=frozen, upcast=False, compute_dtype=jnp.float32)
    as_np = lambda xs: tuple(np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in xs)
    return as_np(ref), as_np(pt)


def assert_within_tolerance(name, actual, ref, pt, *, factor=2.0, atol=1e-5):
    """flash-attn's rule; infinities must sit exactly where the reference has them."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    assert actual.shape == ref.shape, f"{name}: shape {actual.shape} != {ref.shape}"
    assert not np.isnan(actual).any(), f"{name}: NaN at {np.argwhere(np.isnan(actual))[:5].tolist()}"
    np.testing.assert_array_equal(np.isinf(actual) & (actual < 0), np.isinf(ref) & (ref < 0),
                                  err_msg=f"{name}: -inf pattern differs")
    np.testing.assert_array_equal(np.isinf(actual) & (actual > 0), np.isinf(ref) & (ref > 0),
                                  err_msg=f"{name}: +inf pattern differs")
    finite = np.isfinite(ref)
    err = np.max(np.abs(np.where(finite, actual, 0.0) - np.where(finite, ref, 0.0)), initial=0.0)
    base = np.max(np.abs(np.where(finite, pt, 0.0) - np.where(finite, ref, 0.0)), initial=0.0)
    assert err <= factor * base + atol, (
        f"{name}: max error {err:.3g} > {factor} x same-dtype reference error {base:.3g} + {atol}")
    return err, base


def check_against_reference(out, lse, probs, ref, pt):
    """Output, logsumexp and (if given) probabilities of one call against the references."""
    assert_within_tolerance("out", out, ref[0], pt[0])
    assert_within_tolerance("lse", lse, ref[1], pt[1], atol=1e-4)
    if probs is not None:
        assert_within_tolerance("probs", probs, ref[2], pt[2])


_STATIC = ("softmax_scale", "causal", "window_size", "softcap", "return_attn_probs")
flash_attn = jax.jit(fa.flash_attn_func, static_argnames=_STATIC)


def run_case(seed, *, seqlen_q, seqlen_k, head_dim, dtype, batch=2, nheads=4, nheads_k=None,
             alibi=False, q_scale=1.0, **options):
    """Runs one configuration through flash_attn_func and checks out, lse and P."""
    q, k, v, slopes = make_inputs(seed, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=nheads,
                                  nheads_k=nheads_k, head_dim=head_dim, dtype=dtype, alibi=alibi,
                                  q_scale=q_scale)
    out, lse, probs = flash_attn(q, k, v, alibi_slopes=slopes, return_attn_probs=True, **options)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, q.dtype)
    chex.assert_shape(lse, (batch, nheads, seqlen_q))
    chex.assert_shape(probs, (batch, nheads, seqlen_q, seqlen_k))
    chex.assert_type([lse, probs], jnp.float32)
    ref, pt = references(q, k, v, slopes, **options)
    check_against_reference(out, lse, probs, ref, pt)
    return out, lse, ref
