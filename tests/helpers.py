"""Test utilities: random inputs, the two references, and flash-attn's tolerance rule.

The rule (flash-attn's tests, semantics.md section 7): with ``ref`` the reference in high precision
(float32 math for 16-bit inputs, float64 for float32 inputs) and ``pt`` the same reference computed
in the input dtype, an implementation passes when
``max|x - ref| <= factor * max|pt - ref| + atol`` (factor 2 for outputs, 3 for gradients).
"""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa

DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
DTYPE_IDS = ("fp16", "bf16", "fp32")


def rotating_grid(rotating, *axes, full, ids=None):
    """pytest params (r, *values) of a grid over ``axes`` (lists of values) and the values
    ``rotating`` (``ids``: their names in the test ids; default ``str``).

    ``full``: the whole product (on a GPU, where a case costs little). Otherwise (without one,
    where each case costs seconds of compiling) every combination of the axes once, ``rotating``
    rotating with the sum of the value indices: every value of every axis meets every rotating
    value when the other axes have that many values or more between them, and every pair of
    values across axes is tested.
    """
    ids = list(map(str, rotating)) if ids is None else ids
    cases = []
    for combo in itertools.product(*(list(enumerate(axis)) for axis in axes)):
        indices, values = [i for i, _ in combo], [v for _, v in combo]
        chosen = range(len(rotating)) if full else [sum(indices) % len(rotating)]
        for t in chosen:
            case_id = "-".join([ids[t], *map(str, values)])
            cases.append(pytest.param(rotating[t], *values, id=case_id))
    return cases


def dtype_grid(*axes, full):
    """``rotating_grid`` with the three dtypes rotating: params (dtype, *values)."""
    return rotating_grid(DTYPES, *axes, full=full, ids=DTYPE_IDS)


def make_inputs(seed, *, batch=2, seqlen_q, seqlen_k, nheads=4, nheads_k=None, head_dim, dtype,
                alibi=False, q_scale=1.0):
    """Random q, k, v (batch, seqlen, heads, head_dim) and optional (batch, nheads) ALiBi slopes.

    Drawn with NumPy on the host (ml_dtypes gives it bfloat16): no XLA program per shape.
    """
    nheads_k = nheads if nheads_k is None else nheads_k
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0):
        return jnp.asarray((rng.standard_normal(shape, np.float32) * scale).astype(jnp.dtype(dtype)))

    q = normal((batch, seqlen_q, nheads, head_dim), q_scale)
    k = normal((batch, seqlen_k, nheads_k, head_dim))
    v = normal((batch, seqlen_k, nheads_k, head_dim))
    slopes = jnp.asarray(rng.uniform(0.0, 0.3, (batch, nheads)).astype(np.float32)) if alibi else None
    return q, k, v, slopes


def to_f64(x):
    """A host float64 copy (no device program)."""
    return np.asarray(x).astype(np.float64)


def cotangents(seed, q, *, out=True, lse=False):
    """Cotangents for (out, lse): random normal where asked for, zero otherwise."""
    rng = np.random.default_rng(seed + 1000)
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    dout = rng.standard_normal(q.shape, np.float32) if out else np.zeros(q.shape, np.float32)
    dlse = rng.standard_normal(lse_shape, np.float32) if lse else np.zeros(lse_shape, np.float32)
    return jnp.asarray(dout.astype(jnp.dtype(q.dtype))), jnp.asarray(dlse)


def _with_grads(attend, q, k, v, dout, dlse):
    """(out, lse, probs, (dq, dk, dv)) with the gradients for cotangents (dout, dlse)."""
    def outputs(q, k, v):
        out, lse, probs = attend(q, k, v)
        return (out, lse), probs
    (out, lse), vjp, probs = jax.vjp(outputs, q, k, v, has_aux=True)
    return out, lse, probs, vjp((dout, dlse.astype(lse.dtype)))


@functools.partial(jax.jit, static_argnames=("options", "compute_dtype"))
def _references(q, k, v, slopes, dout, dlse, keep_mask, *, options, compute_dtype):
    def reference(upcast, dtype):
        return functools.partial(fa.attention_reference, alibi_slopes=slopes, upcast=upcast,
                                 compute_dtype=dtype, return_probs=True, keep_mask=keep_mask,
                                 **dict(options))
    return (_with_grads(reference(True, compute_dtype), q, k, v, dout, dlse),
            _with_grads(reference(False, jnp.float32), q, k, v, dout, dlse))


def references(q, k, v, slopes=None, dout=None, dlse=None, keep_mask=None, **options):
    """(ref, pt), each (out, lse, probs, (dq, dk, dv)) as float64 numpy arrays, from one program.

    Without cotangents the gradients are those of zero cotangents. ``keep_mask``: a dropout keep
    mask (with ``dropout_p`` in the options).
    """
    if dout is None:
        dout, dlse = jnp.zeros_like(q), jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)
    options.pop("deterministic", None)  # how the kernels may sum, not what
    frozen = tuple(sorted(options.items()))
    if q.dtype == jnp.float32:
        with jax.enable_x64(True):  # float64 oracle; the same-dtype reference stays float32
            ref, pt = _references(q, k, v, slopes, dout, dlse, keep_mask, options=frozen,
                                  compute_dtype=jnp.float64)
    else:
        ref, pt = _references(q, k, v, slopes, dout, dlse, keep_mask, options=frozen,
                              compute_dtype=jnp.float32)
    as_f64 = lambda result: (*map(to_f64, result[:3]), tuple(map(to_f64, result[3])))
    return as_f64(ref), as_f64(pt)


def assert_within_tolerance(name, actual, ref, pt, *, factor=2.0, atol=1e-5):
    """flash-attn's rule; infinities must sit exactly where the reference has them."""
    actual = to_f64(actual)
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


def check_against_reference(out, lse, probs, ref, pt, grads=None):
    """Output, logsumexp, probabilities and gradients (those given) against the references."""
    assert_within_tolerance("out", out, ref[0], pt[0])
    assert_within_tolerance("lse", lse, ref[1], pt[1], atol=1e-4)
    if probs is not None:
        assert_within_tolerance("probs", probs, ref[2], pt[2])
    for name, grad, grad_ref, grad_pt in zip(("dq", "dk", "dv"), grads or (), ref[3], pt[3]):
        assert_within_tolerance(name, grad, grad_ref, grad_pt, factor=3.0, atol=2e-4)


_STATIC = ("softmax_scale", "causal", "window_size", "softcap", "return_attn_probs")
flash_attn = jax.jit(fa.flash_attn_func, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=("options",))
def flash_attn_with_grads(q, k, v, slopes, dout, dlse, *, options):
    attend = functools.partial(fa.flash_attn_func, alibi_slopes=slopes, return_attn_probs=True,
                               **dict(options))
    return _with_grads(attend, q, k, v, dout, dlse)


def run_case(seed, *, seqlen_q, seqlen_k, head_dim, dtype, batch=2, nheads=4, nheads_k=None,
             alibi=False, q_scale=1.0, d_out=True, d_lse=False, **options):
    """One configuration through flash_attn_func, forward and backward, checked against the
    references: out, lse, P, and dq, dk, dv for random cotangents of out (``d_out``, flash-attn's
    test) and/or of softmax_lse (``d_lse``)."""
    q, k, v, slopes = make_inputs(seed, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                                  nheads=nheads, nheads_k=nheads_k, head_dim=head_dim, dtype=dtype,
                                  alibi=alibi, q_scale=q_scale)
    dout, dlse = cotangents(seed, q, out=d_out, lse=d_lse)
    out, lse, probs, grads = flash_attn_with_grads(q, k, v, slopes, dout, dlse,
                                                    options=tuple(sorted(options.items())))
    chex.assert_shape([out, lse, probs, *grads], [q.shape, (batch, nheads, seqlen_q),
                                                  (batch, nheads, seqlen_q, seqlen_k),
                                                  q.shape, k.shape, v.shape])
    chex.assert_type([out, lse, probs, *grads], [q.dtype, jnp.float32, jnp.float32] + [q.dtype] * 3)
    ref, pt = references(q, k, v, slopes, dout, dlse, **options)
    check_against_reference(out, lse, probs, ref, pt, grads)
    return out, lse, ref, grads
