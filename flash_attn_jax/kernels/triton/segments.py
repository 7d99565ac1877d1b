"""Where each batch row's tokens lie: the dense and the variable-length layouts of the kernels.

The forward and backward kernels are written once against a ``Segment``: the query rows and key
columns of one batch row, at an offset in the kernel's refs, with a length.

* dense: q (B, Sq, H, D), k/v (B, Sk, Hk, D), lse (B, H, Sq). The BlockSpecs hand a program its
  batch row's tokens, so the offsets are 0 and the lengths are the static Sq and Sk.
* varlen: q (total_q, H, D), k/v (total_k, Hk, D), lse (H, total_q). Batch row b holds the tokens
  ``[cu_q[b], cu_q[b + 1])`` and ``[cu_k[b], cu_k[b + 1])``; a program sees all tokens and offsets
  by its row's start. Lengths are traced, so every ragged edge is masked. The grid covers
  ``max_seqlen`` blocks per row and a program past its row's end does nothing, so the work follows
  the real tokens, not ``batch x max_seqlen``; a row longer than max_seqlen is truncated to it and
  the grid's last block fills the rest (``Segment.fill_rows``). Bounds read from cu_seqlens (made
  non-decreasing by the caller) are clipped to the arrays, so no cu_seqlens makes a kernel touch
  memory outside them.
* paged keys (varlen forward): k/v (num_pages, page, Hk, D) through block_table (B, max_pages):
  key j of row b is at page ``block_table[b, j // page]``, row ``j % page``. Key blocks never
  cross a page (block_k <= page); page ids are clipped into range.

Tokens before the first or after the last sequence (``cu[-1] < total``, padding at the end of a
packed batch) belong to no batch row: ``fill_outside`` sets their outputs (out 0, lse -inf, zero
gradients).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flash_attn_jax.kernels.blocks import fori_loop, idiv, irem, key_blocks, query_blocks
from flash_attn_jax.kernels.manual_axes import pallas_call
from flash_attn_jax.kernels.triton.tiles import (Numerics, as_cols, as_rows, block_indices,
                                                 head_dim_mask, masked_store, optional_refs)


# The placement operand (int32 words) of a kernel whose arrays are a shard of a larger attention:
# the global index of its first batch row and first query head (dropout hashes global indices),
# then, for a shard of the sequence, the score positions of its first query row and first key and
# the bottom-right offset of the whole score matrix (masks and ALiBi use global positions).
PLACE_INDICES = 2
PLACE_POSITIONS = 5


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static: dense or varlen, the page size of paged keys (0: contiguous keys), the words of
    the placement operand (0: none; ``PLACE_INDICES``; ``PLACE_POSITIONS``, dense only), and for
    varlen the ``max_seqlen_q``/``max_seqlen_k`` each sequence is truncated to."""

    varlen: bool = False
    page_size: int = 0
    place_words: int = 0
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    def __post_init__(self):
        if self.place_words not in (0, PLACE_INDICES, PLACE_POSITIONS):
            raise ValueError(f"place_words must be 0, {PLACE_INDICES} or {PLACE_POSITIONS}")
        if self.varlen and self.place_words == PLACE_POSITIONS:
            raise ValueError("varlen kernels take no score positions")

    @property
    def num_seq_refs(self) -> int:
        """The int32 refs that lead a kernel's arguments: cu_q, cu_k[, block_table] for varlen,
        then the placement words if any."""
        return (3 if self.page_size else 2) * self.varlen + (self.place_words > 0)


DENSE = Layout()


def _same(h):
    return h


def token_spec(layout: Layout, length, width, *, heads=None, head=_same):
    """BlockSpec (grid (block, batch, head)) of a token-major array: one batch row's ``length``
    tokens (dense (B, S, H, D)) or all ``length`` tokens (varlen (T, H, D)), of the head
    ``head(h)``, or with ``heads`` the ``head(h)``-th block of that many heads."""
    if layout.varlen:
        return pl.BlockSpec((length, heads, width), lambda i, b, h: (0, head(h), 0))
    return pl.BlockSpec((None, length, heads, width), lambda i, b, h: (b, 0, head(h), 0))


def stats_spec(layout: Layout, length, *, heads=None, head=_same):
    """BlockSpec of per-row statistics: dense (B, H, S), varlen (H, T); ``heads`` as above."""
    if layout.varlen:
        return pl.BlockSpec((heads, length), lambda i, b, h: (head(h), 0))
    return pl.BlockSpec((None, heads, length), lambda i, b, h: (b, head(h), 0))


def key_spec(layout: Layout, k, width, *, head=_same):
    """BlockSpec of the keys (or values) of the kv head ``head(h)``, paged or token-major."""
    if layout.page_size:
        num_pages, page_size = k.shape[:2]
        return pl.BlockSpec((num_pages, page_size, None, width), lambda i, b, h: (0, 0, head(h), 0))
    return token_spec(layout, k.shape[0] if layout.varlen else k.shape[1], width, head=head)


def whole_spec(x):
    """A BlockSpec covering a whole small integer array, for scalar reads."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def split_refs(layout: Layout, refs):
    """(sequence refs, the kernel's other refs)."""
    return refs[:layout.num_seq_refs], refs[layout.num_seq_refs:]


def _token_range(cu_ref, batch, total):
    start = jnp.clip(cu_ref[batch], 0, total)
    return start, jnp.clip(cu_ref[batch + 1], start, total) - start


def _plus(a, b):
    """a + b, folding a Python 0 (no op for a dense or unplaced kernel)."""
    if isinstance(a, int) and a == 0:
        return b
    return b if isinstance(b, int) and b == 0 else a + b


class Segment:
    """One batch row's queries and keys inside a kernel's refs, and where they sit.

    ``seqlen_q`` and ``seqlen_k`` are Python ints (dense) or traced int32 (varlen).
    ``total_q``/``total_k``: the refs' token counts (dense: the row's lengths).
    Local query row r and key column c are the score positions (the semantics' i and j)
    ``q_pos + r`` and ``k_pos + c``, with bottom-right offset ``diagonal``: 0, 0 and
    ``seqlen_k - seqlen_q`` unless the layout places the kernel in a larger attention.
    """

    def __init__(self, layout: Layout, seq_refs, batch, *, total_q, total_k):
        self.layout, self.batch = layout, batch
        place_ref = seq_refs[-1] if layout.place_words else None
        if not layout.varlen:
            self.q_start, self.seqlen_q, self.k_start, self.seqlen_k = 0, total_q, 0, total_k
        else:
            cu_q_ref, cu_k_ref = seq_refs[:2]
            self.q_start, self.full_seqlen_q = _token_range(cu_q_ref, batch, total_q)
            if layout.page_size:
                self.table_ref = seq_refs[2]
                capacity = self.table_ref.shape[1] * layout.page_size
                self.k_start = 0
                self.full_seqlen_k = jnp.clip(cu_k_ref[batch + 1] - cu_k_ref[batch], 0, capacity)
            else:
                self.k_start, self.full_seqlen_k = _token_range(cu_k_ref, batch, total_k)
            # A sequence longer than max_seqlen is truncated to it (the grids cover no more);
            # the rows past it get out 0, lse -inf and zero gradients (``fill_rows``).
            self.seqlen_q = jnp.minimum(self.full_seqlen_q, layout.max_seqlen_q)
            self.seqlen_k = jnp.minimum(self.full_seqlen_k, layout.max_seqlen_k)
        self._batch_offset = self._head_offset = 0
        self.q_pos = self.k_pos = 0
        self.diagonal = self.seqlen_k - self.seqlen_q
        if place_ref is not None:
            self._batch_offset, self._head_offset = place_ref[0], place_ref[1]
        if layout.place_words == PLACE_POSITIONS:
            self.q_pos, self.k_pos, self.diagonal = place_ref[2], place_ref[3], place_ref[4]

    @property
    def global_batch(self):
        """The batch index the dropout hash sees."""
        return _plus(self._batch_offset, self.batch)

    def global_head(self, head):
        """The query head index the dropout hash sees."""
        return _plus(self._head_offset, head)

    def row_positions(self, rows):
        return _plus(self.q_pos, rows)

    def col_positions(self, cols):
        return _plus(self.k_pos, cols)

    def mask_args(self):
        """The keyword arguments of ``semantics.scores`` for score positions."""
        return dict(offset=self.diagonal, seqlen_k=_plus(self.k_pos, self.seqlen_k))

    def key_blocks(self, row_lo, block_q, block_k, spec):
        """The key blocks (``blocks.key_blocks``) of local rows ``[row_lo, row_lo +
        block_q)``, counted in local key blocks."""
        row_hi = jnp.minimum(row_lo + block_q, self.seqlen_q)
        return key_blocks(self.row_positions(row_lo), self.row_positions(row_hi), block_k, spec,
                          shift=-self.k_pos, **self.mask_args())

    def query_blocks(self, col_lo, block_k, block_q, spec):
        """The query blocks (``blocks.query_blocks``) that may attend local key columns
        ``[col_lo, col_lo + block_k)``; a key block cut by the end of the keys is never inner."""
        col_hi = jnp.minimum(col_lo + block_k, self.seqlen_k)
        first, inner_first, inner_end, end = query_blocks(
            self.col_positions(col_lo), self.col_positions(col_hi), block_q, spec,
            offset=self.diagonal, seqlen_q=_plus(self.q_pos, self.seqlen_q),
            shift=-self.q_pos)
        if not isinstance(self.seqlen_k, int) or self.seqlen_k % block_k:
            inner_end = jnp.where(col_lo + block_k > self.seqlen_k, inner_first, inner_end)
        return first, inner_first, inner_end, end

    def q_slice(self, lo, size):
        """The ref slice of this row's query rows ``[lo, lo + size)``."""
        return pl.ds(_plus(self.q_start, lo), size)

    def k_slice(self, lo, size):
        """The ref slice of this row's key columns ``[lo, lo + size)`` (contiguous keys)."""
        return pl.ds(_plus(self.k_start, lo), size)

    def keys(self, ref, lo, size):
        """The ref view of this row's key columns ``[lo, lo + size)``, paged or contiguous."""
        page_size = self.layout.page_size
        if not page_size:
            return ref.at[self.k_slice(lo, size), :]
        num_pages, max_pages = ref.shape[0], self.table_ref.shape[1]
        page = self.table_ref[self.batch, jnp.minimum(idiv(lo, page_size), max_pages - 1)]
        return ref.at[jnp.clip(page, 0, num_pages - 1), pl.ds(irem(lo, page_size), size), :]

    def fill_rows(self, refs, values, is_last_program, block, *, keys=False, col_mask=None):
        """Where a varlen sequence is longer than max_seqlen, its rows past it (queries, or keys
        with ``keys``) hold ``values`` in the token-major ``refs`` (2-D ones masked by
        ``col_mask``): written by the grid's last block along that axis (no other program
        reaches them). Nothing for dense layouts."""
        if not self.layout.varlen:
            return
        full, kept = ((self.full_seqlen_k, self.seqlen_k) if keys
                      else (self.full_seqlen_q, self.seqlen_q))
        row_slice = self.k_slice if keys else self.q_slice

        def chunk(c, carry):
            lo = kept + c * block
            ok = lo + jnp.arange(block, dtype=jnp.int32) < full
            for ref, value in zip(refs, values):
                view = ref.at[row_slice(lo, block)]
                fill = jnp.full(view.shape, value, ref.dtype)
                if view.ndim == 1:
                    masked_store(view, fill, ok)
                else:
                    masked_store(view, fill, as_rows(ok), col_mask)
            return carry

        @pl.when(is_last_program)
        def _():
            fori_loop(0, idiv(full - kept + block - 1, block), chunk, 0)

    def run_if_within(self, lo, length, fn):
        """Runs ``fn()`` when a block starting at ``lo`` overlaps ``[0, length)``; dense grids
        only hold such blocks."""
        if isinstance(length, int):
            fn()
        else:
            pl.when(lo < length)(fn)


class KernelRefs:
    """The prologue of the attention kernels: their refs split into the layout's int32 refs, the
    ``num_inputs`` inputs (queries first, keys second), the optional ALiBi slopes and dropout key
    (``slopes_ref``/``seed_ref``, None when unused) and the ``outputs``; and for the program's
    ``batch`` row its ``seg``, the ``numerics`` of the inputs' dtype and the head-dim mask
    ``d_mask`` (None without padding)."""

    def __init__(self, refs, *, layout: Layout, spec, num_inputs, batch, head_dim, interpret):
        seq_refs, rest = split_refs(layout, refs)
        self.inputs = rest[:num_inputs]
        self.slopes_ref, self.seed_ref, self.outputs = optional_refs(spec, rest[num_inputs:])
        q_ref, k_ref = self.inputs[:2]
        self.seg = Segment(layout, seq_refs, batch, total_q=q_ref.shape[0],
                           total_k=k_ref.shape[0])
        self.numerics = Numerics(q_ref.dtype, interpret=interpret)
        self.d_mask = head_dim_mask(head_dim, q_ref.shape[-1])


# Tokens outside every sequence: tiles of _FILL_TOKENS tokens x _FILL_WIDTH other elements.
_FILL_TOKENS = 64
_FILL_WIDTH = 128


def _fill_outside_kernel(cu_ref, x_ref, out_ref, *, value, token_axis):
    del x_ref  # aliased to out_ref
    total, width = out_ref.shape[token_axis], out_ref.shape[1 - token_axis]
    first = jnp.clip(cu_ref[0], 0, total)
    last = jnp.clip(cu_ref[cu_ref.shape[0] - 1], first, total)
    token_lo, _, token_ok = block_indices(pl.program_id(0), _FILL_TOKENS, total)
    tokens = token_lo + jnp.arange(_FILL_TOKENS, dtype=jnp.int32)
    outside = (tokens < first) | (tokens >= last)
    outside = outside if token_ok is None else outside & token_ok

    @pl.when((token_lo < first) | (token_lo + _FILL_TOKENS > last))
    def _():
        def chunk(c, carry):
            col_lo, _, col_ok = block_indices(c, _FILL_WIDTH, width)
            tile = (_FILL_TOKENS, _FILL_WIDTH) if token_axis == 0 else (_FILL_WIDTH, _FILL_TOKENS)
            fill = jnp.full(tile, value, out_ref.dtype)
            if token_axis == 0:
                masked_store(out_ref.at[pl.ds(token_lo, _FILL_TOKENS), pl.ds(col_lo, _FILL_WIDTH)],
                             fill, as_rows(outside), as_cols(col_ok))
            else:
                masked_store(out_ref.at[pl.ds(col_lo, _FILL_WIDTH), pl.ds(token_lo, _FILL_TOKENS)],
                             fill, as_rows(col_ok), as_cols(outside))
            return carry

        fori_loop(0, pl.cdiv(width, _FILL_WIDTH), chunk, 0)


def fill_outside(x, cu_seqlens, value, *, token_axis=0, interpret, debug=False):
    """``x`` with the tokens before ``cu_seqlens[0]`` and at and after ``cu_seqlens[-1]`` (along
    ``token_axis``; cu_seqlens non-decreasing) set to ``value``; written in place (aliased), so it
    costs a pass over those tokens only."""
    shape = x.shape
    x2 = x.reshape(shape[0], -1) if token_axis == 0 else x.reshape(-1, shape[-1])
    total = x2.shape[token_axis]
    out = pallas_call(
        functools.partial(_fill_outside_kernel, value=value, token_axis=token_axis),
        grid=(pl.cdiv(total, _FILL_TOKENS),),
        in_specs=[whole_spec(cu_seqlens), pl.BlockSpec(x2.shape, lambda i: (0, 0))],
        out_specs=pl.BlockSpec(x2.shape, lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
        input_output_aliases={1: 0},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        debug=debug,
        name="flash_attn_varlen_fill_outside",
    )(cu_seqlens, x2)
    return out.reshape(shape)
