"""Pure-jnp reference attention: the oracle of the tests and a documented slow path.

It materialises the (seqlen_q, seqlen_k) score matrix, so it needs O(seqlen_q * seqlen_k) memory
per head, but it runs anywhere, differentiates with plain autodiff, and implements exactly the
semantics of ``flash_attn_jax.semantics`` (it calls the same functions the kernels call).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flash_attn_jax import _validation as check
from flash_attn_jax.semantics import (cache_append_starts, cache_lengths, cache_locations,
                                      cache_write_slots, cache_written,
                                      dropout_keep, dropout_threshold, kvcache_rotary, scores)


def dropout_mask(dropout_key, dropout_p, batch, num_heads, seqlen_q, seqlen_k, *, first_batch=0):
    """(batch, num_heads, seqlen_q, seqlen_k) bool: the keep mask of the kernels' dropout for
    batch rows ``first_batch ..`` (a varlen sequence b alone: ``first_batch=b``, batch 1)."""
    p, words = check.dropout(dropout_p, dropout_key)
    return _keep_mask(words, first_batch, threshold=dropout_threshold(p), batch=batch,
                      num_heads=num_heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k)


@functools.partial(jax.jit, static_argnames=("threshold", "batch", "num_heads", "seqlen_q",
                                             "seqlen_k"))
def _keep_mask(words, first_batch, *, threshold, batch, num_heads, seqlen_q, seqlen_k):
    # One program rather than op-by-op dispatch: the hash is a few hundred small ops.
    rows = jnp.arange(seqlen_q, dtype=jnp.int32)[:, None]
    cols = jnp.arange(seqlen_k, dtype=jnp.int32)[None, :]

    def one(b, h):
        return dropout_keep(words, b, h, rows, cols, threshold)

    b, h = jnp.meshgrid(first_batch + jnp.arange(batch), jnp.arange(num_heads), indexing="ij")
    return jax.vmap(jax.vmap(one))(b, h)


def attention_reference(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_key=None,
                        keep_mask=None, upcast=True, compute_dtype=jnp.float32,
                        return_probs=False):
    """Dense attention in plain jnp with flash-attn's semantics.

    Args:
      q: (batch, seqlen_q, nheads, headdim).
      k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0 (GQA/MQA: query head h
        uses key/value head h // (nheads // nheads_k)).
      softmax_scale: defaults to headdim ** -0.5.
      causal: bottom-right aligned causal mask, the same as window (window_size[0], 0).
      window_size: (left, right), -1 leaves a side unbounded.
      softcap: > 0 applies softcap * tanh(x / softcap) to the scaled scores.
      alibi_slopes: float32 (nheads,) or (batch, nheads); adds -slope * |i + seqlen_k - seqlen_q - j|.
      dropout_p, dropout_key, keep_mask: dropout with the kernels' keep mask for ``dropout_key``
        (``dropout_mask``), or with an explicit boolean keep_mask (batch, nheads, seqlen_q,
        seqlen_k): the kept probabilities are scaled by 1 / (1 - dropout_p) and the others zeroed.
        The logsumexp is the pre-dropout one.
      upcast: True computes in ``compute_dtype`` (float32, or float64 under ``jax.enable_x64``).
        False mirrors a low-precision implementation: matmuls take the input dtype (float32
        accumulation) and round their results to it, the softmax runs in float32 and its
        probabilities are rounded to the input dtype. The tests use it to measure the error that
        the input dtype itself causes.

      return_probs: also return the pre-dropout probabilities P.

    Returns:
      (out, lse), or (out, lse, probs) with return_probs: out (batch, seqlen_q, nheads, headdim)
      in q.dtype; lse (batch, nheads, seqlen_q) in float32 (the compute dtype when that is wider);
      probs (batch, nheads, seqlen_q, seqlen_k) like lse. Rows with no key in their mask have
      out 0, lse -inf and probs 0.
    """
    batch, seqlen_q, seqlen_k, num_heads, _, head_dim = check.dense_qkv(q, k, v)
    slopes = check.alibi_slopes(alibi_slopes, batch, num_heads)
    spec = check.score_spec(head_dim=head_dim, softmax_scale=softmax_scale, causal=causal,
                            window=window_size, softcap=softcap, has_alibi=slopes is not None,
                            longest=max(seqlen_q, seqlen_k))
    if keep_mask is None and dropout_p != 0.0:
        keep_mask = dropout_mask(dropout_key, dropout_p, batch, num_heads, seqlen_q, seqlen_k)
    if keep_mask is not None and tuple(keep_mask.shape) != (batch, num_heads, seqlen_q, seqlen_k):
        raise ValueError(f"keep_mask must have shape {(batch, num_heads, seqlen_q, seqlen_k)}, "
                         f"got {tuple(keep_mask.shape)}")
    results = attend(q, k, v, slopes, spec, cols=jnp.arange(seqlen_k), seqlen_k=seqlen_k,
                     keep_mask=keep_mask, dropout_p=dropout_p, upcast=upcast,
                     compute_dtype=compute_dtype)
    return results if return_probs else results[:2]


def attend(q, k, v, slopes, spec, *, cols, seqlen_k, key_valid=None, keep_mask=None,
           dropout_p=0.0, upcast=True, compute_dtype=jnp.float32):
    """The reference's core: (out, lse, probs) of q (B, Sq, H, D) over k, v (B, Sk, Hk, D).

    ``cols`` (Sk,) or (B, Sk) are the key columns j of the semantics (the rows of k, or positions
    relative to a cache's left padding); ``seqlen_k`` an int or (B,) the number of keys, so the
    bottom-right offset is ``seqlen_k - Sq``; ``key_valid`` (B, Sk) removes further keys.
    """
    batch, seqlen_q, num_heads, head_dim = q.shape
    num_heads_k = k.shape[2]
    group = num_heads // num_heads_k
    dtype = q.dtype
    softmax_dtype = jnp.promote_types(compute_dtype, jnp.float32) if upcast else jnp.float32

    # Query heads grouped by their key/value head: (B, Sq, Hk, G, D).
    qg = q.reshape(batch, seqlen_q, num_heads_k, group, head_dim)
    if upcast:
        qg, k, v = (x.astype(compute_dtype) for x in (qg, k, v))
        qk = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, precision=jax.lax.Precision.HIGHEST)
    else:
        qk = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32).astype(dtype)

    def per_batch(x):  # (B,) or (B, Sk) -> broadcastable against (B, Hk, G, Sq, Sk)
        x = jnp.asarray(x)
        return x.reshape(x.shape[:1] + (1,) * (5 - x.ndim)) if x.ndim == 1 else x[:, None, None, None, :]

    rows = jnp.arange(seqlen_q)[:, None]
    cols = jnp.asarray(cols)
    cols = cols[None, :] if cols.ndim == 1 else per_batch(cols)
    seqlen_k = seqlen_k if isinstance(seqlen_k, int) else per_batch(seqlen_k)
    slope = None if slopes is None else slopes.reshape(batch, num_heads_k, group, 1, 1).astype(softmax_dtype)
    x = scores(qk, rows, cols, spec, offset=seqlen_k - seqlen_q, seqlen_k=seqlen_k, slope=slope)
    if key_valid is not None:
        x = jnp.where(per_batch(key_valid), x, -jnp.inf)
    x = x.astype(softmax_dtype)

    row_max = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True, initial=-jnp.inf))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.exp(x - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    nonempty = total > 0
    safe_total = jnp.where(nonempty, total, 1.0)
    lse = jnp.where(nonempty, row_max + jnp.log(safe_total), -jnp.inf)[..., 0]
    probs = e / safe_total

    p = probs
    if keep_mask is not None:
        keep = jnp.asarray(keep_mask).reshape(probs.shape)
        p = jnp.where(keep, p / (1.0 - dropout_p), 0.0)

    if upcast:
        out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, precision=jax.lax.Precision.HIGHEST)
    else:
        out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(dtype), v, preferred_element_type=jnp.float32)
    out = out.reshape(batch, seqlen_q, num_heads, head_dim).astype(dtype)
    probs = probs.reshape(batch, num_heads, seqlen_q, probs.shape[-1])
    return out, lse.reshape(batch, num_heads, seqlen_q), probs


def kvcache_reference(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                      cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                      softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                      rotary_interleaved=True, alibi_slopes=None, upcast=True,
                      compute_dtype=jnp.float32):
    """flash_attn_with_kvcache in plain jnp: returns (out, lse, k_cache, v_cache).

    The arguments mean what they mean for ``flash_attn_with_kvcache``; ``upcast`` and
    ``compute_dtype`` as for ``attention_reference``. The cache update is a scatter, the attention
    gathers each batch row's whole cache (O(batch x capacity) memory).
    """
    layout, indices = check.kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin,
                                    cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
    cache_seqlens, cache_batch_idx = indices.cache_seqlens, indices.cache_batch_idx
    cache_leftpad, block_table = indices.cache_leftpad, indices.block_table
    batch, capacity = layout.batch, layout.capacity
    slopes = check.alibi_slopes(alibi_slopes, batch, layout.num_heads)
    spec = check.score_spec(head_dim=layout.head_dim, softmax_scale=softmax_scale, causal=causal,
                            window=window_size, softcap=softcap, has_alibi=slopes is not None,
                            longest=max(capacity, layout.seqlen_q))
    if rotary_cos is not None:
        q, k = kvcache_rotary(q, k, rotary_cos, rotary_sin, cache_seqlens, spec,
                              interleaved=check.static_bool("rotary_interleaved", rotary_interleaved))

    num_rows, page_size = k_cache.shape[:2]
    if min(num_rows, page_size, capacity, batch) == 0:  # no storage: no write, no key
        out = jnp.zeros(q.shape, q.dtype)
        lse = jnp.full((batch, layout.num_heads, layout.seqlen_q), -jnp.inf, jnp.float32)
        return out, lse, k_cache, v_cache
    if k is not None and layout.seqlen_new > 0:
        starts = cache_append_starts(cache_seqlens, layout.seqlen_new, capacity)
        slots = cache_write_slots(starts, layout.seqlen_new, capacity, page_size=page_size,
                                  num_rows=num_rows, block_table=block_table,
                                  batch_idx=cache_batch_idx)
        k_cache, v_cache = cache_written(k_cache, k, slots), cache_written(v_cache, v, slots)

    # Every batch row's keys at absolute positions 0 .. capacity - 1, and which of them exist.
    positions = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))
    rows, offsets, exists = cache_locations(positions, page_size=page_size, num_rows=num_rows,
                                            block_table=block_table, batch_idx=cache_batch_idx)
    keys, values = k_cache[rows, offsets], v_cache[rows, offsets]

    length = (jnp.full((batch,), capacity, jnp.int32) if cache_seqlens is None
              else cache_lengths(cache_seqlens, layout.seqlen_new, capacity))
    leftpad = (jnp.zeros((batch,), jnp.int32) if cache_leftpad is None
               else jnp.clip(cache_leftpad, 0, capacity))
    cols = positions - leftpad[:, None]  # key column j is relative to the left padding
    out, lse, _ = attend(q, keys, values, slopes, spec, cols=cols, seqlen_k=length - leftpad,
                         key_valid=exists & (cols >= 0), upcast=upcast, compute_dtype=compute_dtype)
    return out, lse, k_cache, v_cache
