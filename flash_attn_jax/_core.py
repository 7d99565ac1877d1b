"""The differentiable attention core that every public variant is a view onto.

``attention`` takes canonical dense inputs (B, S, H, D) and a static ScoreSpec and returns
(out, lse); the packed variants slice their inputs into it. ``kvcache`` is the forward-only path
of flash_attn_with_kvcache: rotary, the in-place cache append, then attention over the cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from flash_attn_jax import kernels
from flash_attn_jax._validation import CacheLayout
from flash_attn_jax.semantics import ScoreSpec, kvcache_rotary


def _not_differentiable(fn, message):
    """``fn(static, *arrays)`` that raises NotImplementedError(message) when differentiated.

    Without it, differentiating would reach the raw pallas_calls and fail with an obscure error.
    """
    guarded = jax.custom_jvp(fn, nondiff_argnums=(0,))

    @guarded.defjvp
    def _jvp(static, primals, tangents):
        del static, primals, tangents
        raise NotImplementedError(f"flash_attn_jax: {message}")

    return guarded


# Reverse mode only evaluates these; a gradient of the gradient would differentiate them.
_SECOND_ORDER = ("second-order differentiation (a gradient of the gradient) is not supported; "
                 "use flash_attn_jax.attention_reference where it is needed")
_forward = _not_differentiable(lambda spec, q, k, v, slopes: kernels.forward(q, k, v, slopes, spec),
                               _SECOND_ORDER)
_backward = _not_differentiable(lambda spec, *arrays: kernels.backward(*arrays, spec), _SECOND_ORDER)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, slopes, spec: ScoreSpec):
    return kernels.forward(q, k, v, slopes, spec)


def _attention_fwd(q, k, v, slopes, spec):
    out, lse = _forward(spec, q, k, v, slopes)
    return (out, lse), (q, k, v, slopes, out, lse)


def _attention_bwd(spec, residuals, cotangents):
    dq, dk, dv = _backward(spec, *residuals, *cotangents)
    return dq, dk, dv, None  # ALiBi slopes get no gradient


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, slopes, spec: ScoreSpec):
    """(out (B, Sq, H, D), lse (B, H, Sq) float32) of dense attention, differentiable in q, k, v."""
    batch, seqlen_q, num_heads, _ = q.shape
    lse_shape = (batch, num_heads, seqlen_q)
    if q.size == 0:
        return jnp.zeros(q.shape, q.dtype), jnp.zeros(lse_shape, jnp.float32)
    if k.shape[1] == 0:  # no keys at all: every row is empty
        return jnp.zeros(q.shape, q.dtype), jnp.full(lse_shape, -jnp.inf, jnp.float32)
    return _attention(q, k, v, slopes, spec)


def attention_probs(q, k, lse, slopes, spec: ScoreSpec):
    """Softmax probabilities (B, H, Sq, Sk) float32; not differentiable (a diagnostic output)."""
    batch, seqlen_q, num_heads, _ = q.shape
    shape = (batch, num_heads, seqlen_q, k.shape[1])
    if q.size == 0 or k.shape[1] == 0:
        return jnp.zeros(shape, jnp.float32)
    q, k, lse = (jax.lax.stop_gradient(x) for x in (q, k, lse))
    return kernels.probabilities(q, k, lse, slopes, spec)


@dataclasses.dataclass(frozen=True)
class CacheCall:
    """The static arguments of one flash_attn_with_kvcache call."""

    spec: ScoreSpec
    layout: CacheLayout
    rotary_interleaved: bool
    num_splits: int


def _kvcache(call: CacheCall, q, k_cache, v_cache, k, v, cos, sin, cache_seqlens, batch_idx,
             leftpad, table, slopes):
    layout = call.layout
    if cos is not None:
        q, k = kvcache_rotary(q, k, cos, sin, cache_seqlens, call.spec,
                              interleaved=call.rotary_interleaved)
    if k is not None and layout.seqlen_new > 0:
        k_cache, v_cache = kernels.kvcache_append(k_cache, v_cache, k, v, cache_seqlens, batch_idx,
                                                  table)
    if cache_seqlens is None:
        lengths = jnp.full((layout.batch,), layout.capacity, jnp.int32)
    else:
        lengths = jnp.minimum(cache_seqlens + layout.seqlen_new, layout.capacity)
    if q.size == 0:
        out = jnp.zeros(q.shape, q.dtype)
        lse = jnp.zeros((layout.batch, layout.num_heads, layout.seqlen_q), jnp.float32)
    else:
        out, lse = kernels.kvcache_attention(q, k_cache, v_cache, lengths, leftpad, batch_idx, table,
                                             slopes, call.spec, call.num_splits)
    return out, lse, k_cache, v_cache


kvcache = _not_differentiable(
    _kvcache, "flash_attn_with_kvcache is forward-only (inference); it has no gradient. Use "
    "flash_attn_func (or flash_attn_jax.kvcache_reference) to differentiate attention")
