"""Pure-jnp reference attention: the oracle of the tests and a documented slow path.

It materialises the (seqlen_q, seqlen_k) score matrix, so it needs O(seqlen_q * seqlen_k) memory
per head, but it runs anywhere, differentiates with plain autodiff, and implements exactly the
semantics of ``flash_attn_jax.semantics`` (it calls the same functions the kernels call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flash_attn_jax import _validation as check
from flash_attn_jax.semantics import scores


def attention_reference(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, dropout_p=0.0, keep_mask=None,
                        upcast=True, compute_dtype=jnp.float32, return_probs=False):
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
      dropout_p, keep_mask: with a boolean keep_mask (batch, nheads, seqlen_q, seqlen_k) the kept
        probabilities are scaled by 1 / (1 - dropout_p) and the others zeroed. The logsumexp is the
        pre-dropout one.
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
    batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim = check.dense_qkv(q, k, v)
    slopes = check.alibi_slopes(alibi_slopes, batch, num_heads)
    spec = check.score_spec(head_dim=head_dim, softmax_scale=softmax_scale, causal=causal,
                            window=window_size, softcap=softcap, has_alibi=slopes is not None)
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

    rows = jnp.arange(seqlen_q)[:, None]
    cols = jnp.arange(seqlen_k)[None, :]
    slope = None if slopes is None else slopes.reshape(batch, num_heads_k, group, 1, 1).astype(softmax_dtype)
    x = scores(qk, rows, cols, spec, offset=seqlen_k - seqlen_q, seqlen_k=seqlen_k, slope=slope)
    x = x.astype(softmax_dtype)

    row_max = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.exp(x - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    nonempty = total > 0
    safe_total = jnp.where(nonempty, total, 1.0)
    lse = jnp.where(nonempty, row_max + jnp.log(safe_total), -jnp.inf)[..., 0]
    probs = e / safe_total

    p = probs
    if keep_mask is not None:
        if tuple(keep_mask.shape) != (batch, num_heads, seqlen_q, seqlen_k):
            raise ValueError(f"keep_mask must have shape {(batch, num_heads, seqlen_q, seqlen_k)}, "
                             f"got {tuple(keep_mask.shape)}")
        keep = jnp.asarray(keep_mask).reshape(batch, num_heads_k, group, seqlen_q, seqlen_k)
        p = jnp.where(keep, p / (1.0 - dropout_p), 0.0)

    if upcast:
        out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, precision=jax.lax.Precision.HIGHEST)
    else:
        out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(dtype), v, preferred_element_type=jnp.float32)
    out = out.reshape(batch, seqlen_q, num_heads, head_dim).astype(dtype)
    lse = lse.reshape(batch, num_heads, seqlen_q)
    if return_probs:
        return out, lse, probs.reshape(batch, num_heads, seqlen_q, seqlen_k)
    return out, lse

