"""Block ranges and index arithmetic shared by the kernel backends.

Which key blocks a block of query rows may attend (and which it attends in full, with no mask),
and the converse for a block of keys, from the score semantics' spans; and int32 index helpers
that stay int32 under jax_enable_x64.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from flash_attn_jax.semantics import (ScoreSpec, full_key_span, full_query_span, key_span,
                                      query_span)


def i32(x):
    """``x`` as int32: Python ints in kernel index arithmetic would be int64 under
    jax_enable_x64, which lax's integer ops refuse to mix with the int32 program ids."""
    return jnp.asarray(x, jnp.int32)


def idiv(a, b):
    """a // b for nonnegative int32 operands (lax.div truncates)."""
    return lax.div(i32(a), i32(b))


def irem(a, b):
    """a % b for nonnegative int32 operands."""
    return lax.rem(i32(a), i32(b))


def gather_rows(x, index, fill=0.0):
    """``x[index]`` along the leading axis, where ``index == len(x)`` names a row of ``fill``
    (the varlen layouts' slot for "no token")."""
    return jnp.concatenate([x, jnp.full((1, *x.shape[1:]), fill, x.dtype)])[index]


def fori_loop(lower, upper, body, carry):
    """lax.fori_loop with an int32 index whatever the bounds' types (see ``i32``)."""
    return lax.fori_loop(i32(lower), i32(upper), body, carry)


def _block_range(lo, hi, block):
    """Blocks ``[first, end)`` of size ``block`` that overlap ``[lo, hi)``."""
    first = idiv(jnp.maximum(lo, 0), block)
    end = jnp.maximum(idiv(jnp.maximum(hi, 0) + block - 1, block), first)
    return first, end


def _inner_block_range(lo, hi, block, first, end):
    """Blocks inside ``[first, end)`` that lie entirely within ``[lo, hi)``."""
    inner_first = jnp.clip(idiv(jnp.maximum(lo, 0) + block - 1, block), first, end)
    inner_end = jnp.clip(idiv(jnp.maximum(hi, 0), block), inner_first, end)
    return inner_first, inner_end


def key_blocks(row_lo, row_hi, block_k, spec: ScoreSpec, *, offset, seqlen_k, shift=0):
    """(first, inner_first, inner_end, end): the key blocks that query rows ``[row_lo, row_hi)``
    may attend; the inner ones they attend in full (no mask).

    Rows and key columns are score positions (the semantics' i and j) with bottom-right
    ``offset``; keys exist below ``seqlen_k``. Block b holds the key columns j with
    ``b * block_k <= j + shift < (b + 1) * block_k`` (a cache's left padding, or minus the
    position of a shard's first key).
    """
    span = dict(offset=offset, seqlen_k=seqlen_k)
    lo, hi = key_span(row_lo, row_hi, spec, **span)
    first, end = _block_range(lo + shift, hi + shift, block_k)
    full_lo, full_hi = full_key_span(row_lo, row_hi, spec, **span)
    inner = _inner_block_range(full_lo + shift, full_hi + shift, block_k, first, end)
    return first, *inner, end


def query_blocks(col_lo, col_hi, block_q, spec: ScoreSpec, *, offset, seqlen_q, shift=0):
    """(first, inner_first, inner_end, end): the query blocks that may attend the key columns
    ``[col_lo, col_hi)``; the inner ones attend all of them (no mask). Positions as in
    ``key_blocks``: block b holds the rows i with ``b * block_q <= i + shift < (b + 1) * block_q``,
    query rows exist below ``seqlen_q``. The caller masks a key block that is cut by the end of the
    keys."""
    span = dict(offset=offset, seqlen_q=seqlen_q)
    lo, hi = query_span(col_lo, col_hi, spec, **span)
    first, end = _block_range(lo + shift, hi + shift, block_q)
    full_lo, full_hi = full_query_span(col_lo, col_hi, spec, **span)
    inner_first, inner_end = _inner_block_range(full_lo + shift, full_hi + shift, block_q, first,
                                                end)
    return first, inner_first, inner_end, end
