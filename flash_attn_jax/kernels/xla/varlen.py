"""Varlen calls on the blockwise attention of ``dense``: each sequence gathered (from its tokens, or
its keys from the pages its block table lists) into a row padded to the call's max_seqlen, attended with its own lengths (masks and ALiBi per row, bottom-right
aligned), the results scattered back to its tokens. Tokens outside every sequence (and past a row's
max_seqlen) get out 0, lse -inf and zero gradients."""

from __future__ import annotations

import jax.numpy as jnp

from flash_attn_jax.kernels.blocks import gather_rows
from flash_attn_jax.kernels.xla import dense


def _rows(cu_seqlens, max_len, total):
    """(index (B, max_len) int32, lengths (B,) int32): row b's tokens, ``total`` (a pad slot) past
    its length."""
    lengths = jnp.clip(cu_seqlens[1:] - cu_seqlens[:-1], 0, max_len).astype(jnp.int32)
    positions = jnp.arange(max_len, dtype=jnp.int32)
    index = jnp.where(positions[None, :] < lengths[:, None],
                      cu_seqlens[:-1, None].astype(jnp.int32) + positions[None, :], total)
    return index, lengths


def _scatter(x, index, total, fill=0.0):
    """(B, max_len, ...) -> (T, ...), ``fill`` where no row has the token (rows are disjoint)."""
    tokens = jnp.full((total + 1,) + x.shape[2:], fill, x.dtype)
    return tokens.at[index].set(x)[:total]


def _paged_rows(cu_seqlens, table, max_len, page_size, num_pages):
    """(pages, offsets (B, max_len) int32, lengths (B,)): row b's key j sits in page
    ``table[b, j // page_size]`` (entries clipped into range, as the kernels read them), row
    ``j % page_size``; a row holds at most the table's capacity."""
    capacity = table.shape[1] * page_size
    lengths = jnp.clip(cu_seqlens[1:] - cu_seqlens[:-1], 0, min(max_len, capacity))
    positions = jnp.arange(max_len, dtype=jnp.int32)
    slots = jnp.minimum(positions // page_size, table.shape[1] - 1)
    pages = jnp.clip(table[:, slots], 0, num_pages - 1)
    return pages, jnp.broadcast_to(positions % page_size, pages.shape), lengths.astype(jnp.int32)


class _Layout:
    def __init__(self, q, k, varlen):
        self.total_q, self.total_k = q.shape[0], k.shape[0]
        self.index_q, lengths_q = _rows(varlen.cu_seqlens_q, varlen.max_seqlen_q, self.total_q)
        self.paged = varlen.block_table is not None
        if self.paged:
            self.pages, self.offsets, lengths_k = _paged_rows(
                varlen.cu_seqlens_k, varlen.block_table, varlen.max_seqlen_k, k.shape[1],
                k.shape[0])
        else:
            self.index_k, lengths_k = _rows(varlen.cu_seqlens_k, varlen.max_seqlen_k,
                                            self.total_k)
        self.lengths = (lengths_q, lengths_k)

    def keys(self, x):
        """Keys or values (Tk, Hk, D), or pages (num_pages, page, Hk, D) -> (B, max_len, Hk, D)."""
        return x[self.pages, self.offsets] if self.paged else gather_rows(x, self.index_k)

    def rows_stat(self, x, fill):
        """(H, T) -> (B, H, max_seqlen_q)."""
        return gather_rows(x.T, self.index_q, fill).transpose(0, 2, 1)


def forward(q, k, v, slopes, spec, varlen, seed=None, *, placement=None, out_dtype=None):
    """out (T, H, D), lse (H, T) of the packed sequences."""
    layout = _Layout(q, k, varlen)
    out, lse = dense.forward(gather_rows(q, layout.index_q), layout.keys(k), layout.keys(v), slopes,
                             spec, seed, placement=placement, out_dtype=out_dtype,
                             lengths=layout.lengths)
    lse = _scatter(lse.transpose(0, 2, 1), layout.index_q, layout.total_q, -jnp.inf)
    return _scatter(out, layout.index_q, layout.total_q), lse.T


def probabilities(q, k, lse, slopes, spec, varlen, seed=None, *, placement=None):
    """(B, H, max_seqlen_q, max_seqlen_k) float32, zero outside each row's lengths."""
    layout = _Layout(q, k, varlen)
    probs = dense.probabilities(gather_rows(q, layout.index_q), layout.keys(k),
                                layout.rows_stat(lse, -jnp.inf), slopes, spec, seed,
                                placement=placement, lengths=layout.lengths)
    lengths_q, lengths_k = layout.lengths
    inside = ((jnp.arange(probs.shape[2])[:, None] < lengths_q[:, None, None, None])
              & (jnp.arange(probs.shape[3])[None, :] < lengths_k[:, None, None, None]))
    return jnp.where(inside, probs, 0.0)


def backward(q, k, v, slopes, out, lse, dout, dlse, spec, varlen, seed=None, *, placement=None,
             grad_dtype=None, delta=None):
    """(dq (T, H, D), dk, dv (Tk, Hk, D)); lse, dlse (and delta) in the (H, T) layout
    (contiguous keys: paged ones have no gradient)."""
    layout = _Layout(q, k, varlen)
    gathered_q = lambda x: None if x is None else gather_rows(x, layout.index_q)
    dq, dk, dv = dense.backward(
        gathered_q(q), gather_rows(k, layout.index_k), gather_rows(v, layout.index_k), slopes,
        gathered_q(out), layout.rows_stat(lse, -jnp.inf), gathered_q(dout),
        layout.rows_stat(dlse, 0.0), spec, seed, placement=placement, grad_dtype=grad_dtype,
        delta=None if delta is None else layout.rows_stat(delta, 0.0), lengths=layout.lengths)
    return (_scatter(dq, layout.index_q, layout.total_q),
            _scatter(dk, layout.index_k, layout.total_k),
            _scatter(dv, layout.index_k, layout.total_k))
