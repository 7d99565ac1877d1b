"""Varlen calls on the dense kernels: each sequence packed at an offset aligned to whole tiles.

The sequences of a varlen batch (``kernels.Varlen``: tokens packed back to back) are gathered
into one batch row in which every sequence starts at a multiple of ``align`` rows, so that no
program's tile straddles two sequences: its loads past its sequence's end read that sequence's
padding (zeros, which the masks drop or which add nothing), and its TMA stores, which write whole
tiles, stay inside its own sequence. A tile table (one int32 row a program, ``common.locate``)
gives each program its sequence, that sequence's offsets and its traced lengths. The packed rows
number at most the tokens plus ``align`` a sequence (O(tokens)); the results are gathered back
to the tokens. Sequences are clipped to the call's max_seqlen, as everywhere; tokens outside
every sequence get out 0, lse -inf and zero gradients.
"""

from __future__ import annotations

import jax.numpy as jnp

from flash_attn_jax import semantics
from flash_attn_jax.kernels.blocks import gather_rows, i32
from flash_attn_jax.kernels.mosaic_gpu import backward as _backward
from flash_attn_jax.kernels.mosaic_gpu import forward as _forward
from flash_attn_jax.kernels.mosaic_gpu.common import (K_BASE, Q_BASE, SEQLEN_K, SEQLEN_Q,
                                                      SEQUENCE, TABLE_COLUMNS, TABLE_UNIT,
                                                      TILE_LO)


def _count_at_most(bounds, size):
    """For each i in [0, size): how many of ``bounds`` (int32) are <= i; that is
    ``searchsorted(sorted bounds, i, side="right")``, by a histogram and a running sum: O(size +
    len(bounds)) in two fused passes, where a binary search is a loop of small kernels."""
    histogram = jnp.zeros(size, jnp.int32).at[bounds].add(1, mode="drop")
    return jnp.cumsum(histogram, dtype=jnp.int32)


class Packing:
    """One side (queries or keys) of a packed layout: sequence b's tokens
    ``[cu_seqlens[b], cu_seqlens[b] + lengths[b])`` at packed rows from ``starts[b]``, a multiple
    of ``align``; ``size`` (static) rows in all."""

    def __init__(self, cu_seqlens, max_seqlen: int, total: int, align: int):
        assert align % TABLE_UNIT == 0, align
        cu = i32(cu_seqlens)
        self.num_sequences = cu.shape[0] - 1
        self.align = align
        self.lengths = jnp.clip(cu[1:] - cu[:-1], 0, max_seqlen)
        padded = (self.lengths + align - 1) // align * align
        self.ends = jnp.cumsum(padded, dtype=jnp.int32)
        self.starts = self.ends - padded
        # Every token inside [0, total) of a sequence fits: the sequences before it hold at most
        # its start's tokens plus a tile's padding each.
        self.size = align * (-(-total // align) + self.num_sequences)
        self._sequences_before = _count_at_most(self.ends, self.size)  # of each packed row
        rows = jnp.arange(self.size, dtype=jnp.int32)
        sequence, offset, inside = self.sequence_at(rows)
        source = cu[sequence] + offset
        self._source = jnp.where(inside & (source < total), source, total)
        tokens = jnp.arange(total, dtype=jnp.int32)
        owner = jnp.minimum(_count_at_most(cu[1:], total), self.num_sequences - 1)
        offset = tokens - cu[owner]
        target = self.starts[owner] + offset
        owned = (offset >= 0) & (offset < self.lengths[owner]) & (target < self.size)
        self._target = jnp.where(owned, target, self.size)

    def sequence_at(self, rows):
        """(sequence, offset in it, whether the row holds one of its tokens) of packed ``rows``;
        rows past every sequence get the last sequence and inside False."""
        found = self._sequences_before[rows]
        sequence = jnp.minimum(found, self.num_sequences - 1)
        offset = rows - self.starts[sequence]
        return sequence, offset, (found < self.num_sequences) & (offset < self.lengths[sequence])

    def pack(self, x, fill=0.0):
        """(total, ...) -> (size, ...), ``fill`` in the rows no token holds."""
        return gather_rows(x, self._source, fill)

    def unpack(self, x, fill=0.0):
        """(size, ...) -> (total, ...), ``fill`` for the tokens outside every sequence."""
        return gather_rows(x, self._target, fill)


def tile_table(tiled: Packing, other: Packing, tile: int, *, queries: bool, causal: bool):
    """The tile table (``common.locate``) of programs that each take ``tile`` packed rows of
    ``tiled`` (the queries when ``queries``, else the keys), ``other`` being the other side.
    A tile past every sequence gets empty lengths and its own rows as base (its stores write
    zeros there); a tile past its sequence's end gets no work. Under a causal mask the tiles
    with the most work come first (as the dense forward orders its grid)."""
    assert tiled.align % tile == 0, (tiled.align, tile)
    first_rows = jnp.arange(tiled.size // tile, dtype=jnp.int32) * tile
    sequence, lo, inside = tiled.sequence_at(first_rows)
    found = first_rows < tiled.ends[-1]
    base = jnp.where(found, tiled.starts[sequence], first_rows)
    lo = jnp.where(found, lo, 0)
    own_len = jnp.where(found, tiled.lengths[sequence], 0)
    other_len = jnp.where(inside, other.lengths[sequence], 0)
    seqlen_q, seqlen_k = (own_len, other_len) if queries else (other_len, own_len)
    q_base, k_base = (base, other.starts[sequence]) if queries else (other.starts[sequence], base)
    unit = lambda rows: rows // TABLE_UNIT  # whole units: every alignment is a multiple
    columns = {SEQUENCE: sequence, Q_BASE: unit(q_base), K_BASE: unit(k_base), SEQLEN_Q: seqlen_q,
               SEQLEN_K: seqlen_k, TILE_LO: unit(lo)}
    table = jnp.stack([columns[c] for c in range(TABLE_COLUMNS)], axis=1).astype(jnp.int32)
    if not causal:
        return table
    offset = seqlen_k - seqlen_q
    if queries:  # keys a tile's last row sees
        work = jnp.clip(lo + tile + offset, 0, seqlen_k)
    else:  # queries that see a tile's first key
        work = jnp.clip(seqlen_q - jnp.maximum(lo - offset, 0), 0, seqlen_q)
    return table[jnp.argsort(-work, stable=True)]


def forward(q, k, v, slopes, spec, varlen, config: _forward.ForwardConfig, dropout_words=None):
    """out (T, H, D), lse (H, T) float32 of the varlen layout's q (T, H, D), k, v (Tk, Hk, D);
    ``slopes`` (B, H) when ALiBi; ``dropout_words`` as ``_forward.forward``'s (the mask hashes
    the sequence as the batch row)."""
    if varlen.cu_seqlens_q.shape[0] < 2:  # no sequence: nothing attends
        return jnp.zeros_like(q), jnp.full(q.shape[1::-1], -jnp.inf, jnp.float32)
    rows = Packing(varlen.cu_seqlens_q, varlen.max_seqlen_q, q.shape[0], config.rows_per_program)
    keys = Packing(varlen.cu_seqlens_k, varlen.max_seqlen_k, k.shape[0], config.block_k)
    tiles = tile_table(rows, keys, config.rows_per_program, queries=True,
                       causal=spec.is_causal_like)
    out, lse = _forward.forward(rows.pack(q)[None], keys.pack(k)[None], keys.pack(v)[None],
                                slopes, spec, config, tiles=tiles, dropout_words=dropout_words)
    return rows.unpack(out[0]), rows.unpack(lse[0].T, -jnp.inf).T


def backward(q, k, v, slopes, out, lse, dout, dlse, spec, varlen,
             config: _backward.BackwardConfig, *, delta=None, deterministic=True,
             dropout_words=None):
    """(dq (T, H, D), dk, dv (Tk, Hk, D)); lse, dlse (and delta) (H, T) float32."""
    if varlen.cu_seqlens_q.shape[0] < 2:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
    dq_rows = config.dq_blocks.rows_per_program  # the streamed query blocks divide it
    rows = Packing(varlen.cu_seqlens_q, varlen.max_seqlen_q, q.shape[0], dq_rows)
    keys = Packing(varlen.cu_seqlens_k, varlen.max_seqlen_k, k.shape[0], config.keys_per_program)
    causal = spec.is_causal_like
    tiles = (tile_table(keys, rows, config.keys_per_program, queries=False, causal=causal),
             tile_table(rows, keys, dq_rows, queries=True, causal=causal))
    if delta is None:  # from the tokens: the output need not be packed
        delta = semantics.output_delta(out[None], dout[None], dlse[None])[0]
    # Rows no token holds: lse -inf (no probability), zero output gradient and delta.
    packed_stats = lambda x, fill: rows.pack(x.T, fill).T[None]
    dq, dk, dv = _backward.backward(
        rows.pack(q)[None], keys.pack(k)[None], keys.pack(v)[None], slopes, None,
        packed_stats(lse, -jnp.inf), rows.pack(dout)[None], None, spec, config,
        delta=packed_stats(delta, 0.0), deterministic=deterministic, tiles=tiles,
        max_seqlen_k=varlen.max_seqlen_k, dropout_words=dropout_words)
    return rows.unpack(dq[0]), keys.unpack(dk[0]), keys.unpack(dv[0])
