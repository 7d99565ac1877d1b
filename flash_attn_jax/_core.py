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

from flash_attn_jax import _partitioning, kernels
from flash_attn_jax._validation import CacheLayout
from flash_attn_jax.semantics import (ScoreSpec, cache_append_starts, cache_lengths,
                                      cache_write_slots, kvcache_rotary)


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
_forward = _not_differentiable(
    lambda spec, q, k, v, slopes, varlen, seed: _partitioning.forward(q, k, v, slopes, spec,
                                                                      varlen, seed),
    _SECOND_ORDER)
_backward = _not_differentiable(
    lambda spec, q, k, v, slopes, varlen, seed, out, lse, dout, dlse: _partitioning.backward(
        q, k, v, slopes, out, lse, dout, dlse, spec, varlen, seed), _SECOND_ORDER)
# Paged keys (varlen with a block table) are an inference path, like flash-attn's.
_paged_forward = _not_differentiable(
    lambda spec, q, k, v, slopes, varlen, seed: _partitioning.forward(q, k, v, slopes, spec,
                                                                      varlen, seed),
    "flash_attn_varlen_func with block_table (paged keys) is forward-only; it has no gradient")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, slopes, varlen, seed, spec: ScoreSpec):
    return _partitioning.forward(q, k, v, slopes, spec, varlen, seed)


def _attention_fwd(q, k, v, slopes, varlen, seed, spec):
    out, lse = _forward(spec, q, k, v, slopes, varlen, seed)
    return (out, lse), (q, k, v, slopes, varlen, seed, out, lse)


def _attention_bwd(spec, residuals, cotangents):
    dq, dk, dv = _backward(spec, *residuals, *cotangents)
    return dq, dk, dv, None, None, None  # slopes, sequence bounds and the key: no gradient


_attention.defvjp(_attention_fwd, _attention_bwd)


def _empty_outputs(q, lse_shape):
    """(out 0, lse -inf) without any kernel, for calls where no query row has a key."""
    return jnp.zeros(q.shape, q.dtype), jnp.full(lse_shape, -jnp.inf, jnp.float32)


def attention(q, k, v, slopes, spec: ScoreSpec, seed=None):
    """(out (B, Sq, H, D), lse (B, H, Sq) float32) of dense attention, differentiable in q, k, v.
    ``seed``: the dropout key's uint32 words when ``spec`` has dropout."""
    batch, seqlen_q, num_heads, _ = q.shape
    lse_shape = (batch, num_heads, seqlen_q)
    if q.size == 0 or k.shape[1] == 0:
        return _empty_outputs(q, lse_shape)
    return _attention(q, k, v, slopes, None, seed, spec)


def varlen_attention(q, k, v, slopes, varlen: kernels.Varlen, spec: ScoreSpec, seed=None):
    """(out (T, H, D), lse (H, T) float32) of packed variable-length attention, differentiable in
    q, k, v (not with paged keys). Tokens after the last sequence: out 0, lse -inf, gradient 0."""
    num_tokens, num_heads, _ = q.shape
    lse_shape = (num_heads, num_tokens)
    no_keys = k.shape[0] == 0 or varlen.max_seqlen_k == 0
    if q.size == 0 or no_keys or varlen.max_seqlen_q == 0 or varlen.cu_seqlens_q.shape[0] == 1:
        return _empty_outputs(q, lse_shape)
    if varlen.block_table is not None:
        return _paged_forward(spec, q, k, v, slopes, varlen, seed)
    return _attention(q, k, v, slopes, varlen, seed, spec)


def attention_probs(q, k, lse, slopes, spec: ScoreSpec, varlen: kernels.Varlen | None = None,
                    seed=None):
    """Softmax probabilities float32, not differentiable (a diagnostic output): dense
    (B, H, Sq, Sk), varlen (B, H, max_seqlen_q, max_seqlen_k) zero outside each row; with
    dropout the dropped entries negated (sign bit set)."""
    if varlen is None:
        batch, seqlen_q, num_heads, _ = q.shape
        shape, no_keys = (batch, num_heads, seqlen_q, k.shape[1]), k.shape[1] == 0
    else:
        shape = (varlen.cu_seqlens_q.shape[0] - 1, q.shape[1], varlen.max_seqlen_q,
                 varlen.max_seqlen_k)
        no_keys = k.shape[0] == 0
    if q.size == 0 or no_keys or 0 in shape:
        return jnp.zeros(shape, jnp.float32)
    q, k, lse = (jax.lax.stop_gradient(x) for x in (q, k, lse))
    return _partitioning.probabilities(q, k, lse, slopes, spec, varlen, seed)


@dataclasses.dataclass(frozen=True)
class CacheCall:
    """The static arguments of one flash_attn_with_kvcache call."""

    spec: ScoreSpec
    layout: CacheLayout
    rotary_interleaved: bool
    num_splits: int


CACHE_ARGS = ("q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens",
              "cache_batch_idx", "cache_leftpad", "block_table", "alibi_slopes")


def _kvcache_local(call: CacheCall, q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                   rotary_sin=None, cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                   block_table=None, alibi_slopes=None):
    """(out, lse[, k_cache, v_cache]) of one call on (local) arrays; the caches come back when
    k and v are appended."""
    layout = call.layout
    if rotary_cos is not None:
        q, k = kvcache_rotary(q, k, rotary_cos, rotary_sin, cache_seqlens, call.spec,
                              interleaved=call.rotary_interleaved)
    appends = k is not None
    batch, seqlen_q, num_heads, _ = q.shape
    # No storage (no rows, pages or positions): nothing to write, no key to attend.
    has_storage = min(k_cache.shape[0], k_cache.shape[1], layout.capacity, batch) > 0
    if appends and layout.seqlen_new > 0 and has_storage:
        starts = cache_append_starts(cache_seqlens, layout.seqlen_new, layout.capacity)
        keep = None
        if block_table is not None or cache_batch_idx is not None:  # two keys may meet
            slots = cache_write_slots(starts, layout.seqlen_new, layout.capacity,
                                      page_size=layout.page_size, num_rows=k_cache.shape[0],
                                      block_table=block_table, batch_idx=cache_batch_idx)
            keep = (slots >= 0).astype(jnp.int32)
        k_cache, v_cache = kernels.kvcache_append(k_cache, v_cache, k, v, starts,
                                                  cache_batch_idx, block_table, keep)
    if cache_seqlens is None:
        lengths = jnp.full((batch,), layout.capacity, jnp.int32)
    else:
        lengths = cache_lengths(cache_seqlens, layout.seqlen_new, layout.capacity)
    if cache_leftpad is not None:
        cache_leftpad = jnp.clip(cache_leftpad, 0, layout.capacity)
    if q.size == 0 or not has_storage:
        out = jnp.zeros(q.shape, q.dtype)
        lse = jnp.full((batch, num_heads, seqlen_q), -jnp.inf, jnp.float32)
    else:
        out, lse = kernels.kvcache_attention(q, k_cache, v_cache, lengths, cache_leftpad,
                                             cache_batch_idx, block_table, alibi_slopes,
                                             call.spec, call.num_splits)
    return (out, lse, k_cache, v_cache) if appends else (out, lse)


def _kvcache(call: CacheCall, *arrays):
    named = dict(zip(CACHE_ARGS, arrays))
    given = tuple(name for name in CACHE_ARGS if named[name] is not None)
    op = _partitioning.KvCache(compute=_kvcache_local, call=call, names=given)
    results = _partitioning.call(op, *(named[name] for name in given))
    if named["k"] is None:
        return (*results, named["k_cache"], named["v_cache"])
    return results


kvcache = _not_differentiable(
    _kvcache, "flash_attn_with_kvcache is forward-only (inference); it has no gradient. Use "
    "flash_attn_func (or flash_attn_jax.kvcache_reference) to differentiate attention")
