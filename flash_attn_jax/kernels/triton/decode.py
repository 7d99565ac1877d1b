"""Pallas (Triton lowering) kernels of flash_attn_with_kvcache.

Both cache layouts are read as pages: a paged cache (num_blocks, page, Hk, D) through the block
table, a contiguous one (batch_cache, seqlen_cache, Hk, D) as one page per batch row (through
cache_batch_idx). A key block never crosses a page (block_k <= page), so every access is a masked
slice ``cache[page, offset:offset + block, head]``. Page ids and positions are clipped into range
before they form an address, and what they would have reached is masked (reads) or dropped
(writes): out-of-range table entries or lengths never touch memory outside the caches.

* append: writes the new keys and values at ``cache_seqlens[b] + t``, in place (the caches are
  aliased to the outputs), one program per (new token, batch row).
* attention: one program per (row block, split, batch, kv head). Its rows are ``block_i`` query
  positions times all query heads of the kv head (GQA), so each cache block is read once for the
  whole group. The key blocks the row block attends are divided into ``num_splits`` equal
  contiguous parts (flash-decoding); with one split the kernel writes the output, otherwise partial
  outputs and logsumexps that the combine kernel merges.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flash_attn_jax.kernels.blocks import fori_loop, idiv, irem, key_blocks
from flash_attn_jax.kernels.manual_axes import pallas_call
from flash_attn_jax.kernels.triton.config import (COMBINE_ROWS, DecodeConfig, next_power_of_2,
                                                  padded_head_dim)
from flash_attn_jax.kernels.triton.tiles import (Numerics, as_rows, block_indices, bounds_mask,
                                                 finish_softmax, head_dim_mask,
                                                 initial_softmax_state, masked_full_masked_loop,
                                                 masked_load, masked_store, online_softmax_step)
from flash_attn_jax.semantics import ScoreSpec, scores


def _params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _full(shape):
    """A BlockSpec covering a whole (small, integer) array, for scalar reads."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


class _Pages:
    """Where cache position ``position`` of batch row ``batch`` lives: (page, offset, exists)."""

    def __init__(self, *, paged, page_size, num_pages, table_ref=None, batch_idx_ref=None):
        self.paged, self.page_size, self.num_pages = paged, page_size, num_pages
        self.table_ref, self.batch_idx_ref = table_ref, batch_idx_ref

    def locate(self, batch, position):
        """A position below 0 does not exist (a row's new keys before its start: dropped)."""
        exists = position >= 0
        position = jnp.maximum(position, 0)
        if self.paged:
            slot = idiv(position, self.page_size)
            max_slots = self.table_ref.shape[1]
            page = self.table_ref[batch, jnp.minimum(slot, max_slots - 1)]
            exists = exists & (slot < max_slots)
            offset = irem(position, self.page_size)
        else:
            page = batch if self.batch_idx_ref is None else self.batch_idx_ref[batch]
            exists = exists & (position < self.page_size)
            offset = jnp.minimum(position, self.page_size - 1)
        exists = exists & (page >= 0) & (page < self.num_pages)
        return jnp.clip(page, 0, self.num_pages - 1), offset, exists


def _append_kernel(seqlens_ref, *refs, paged, has_batch_idx, has_keep, page_size, num_pages,
                   num_heads_k, head_dim):
    refs = list(refs)
    table_ref = refs.pop(0) if paged else None
    batch_idx_ref = refs.pop(0) if has_batch_idx else None
    keep_ref = refs.pop(0) if has_keep else None
    new_k_ref, new_v_ref, _, _, k_cache_ref, v_cache_ref = refs  # the two inputs alias the outputs
    token, batch = pl.program_id(0), pl.program_id(1)
    pages = _Pages(paged=paged, page_size=page_size, num_pages=num_pages, table_ref=table_ref,
                   batch_idx_ref=batch_idx_ref)
    page, offset, exists = pages.locate(batch, seqlens_ref[batch] + token)
    if keep_ref is not None:  # a slot that an earlier key also writes: only that one does
        exists = exists & (keep_ref[batch, token] != 0)
    heads_p, head_dim_p = new_k_ref.shape[-2:]
    masks = (exists, as_rows(bounds_mask(jnp.arange(heads_p, dtype=jnp.int32), num_heads_k, heads_p)),
             head_dim_mask(head_dim, head_dim_p))
    for new_ref, cache_ref in ((new_k_ref, k_cache_ref), (new_v_ref, v_cache_ref)):
        rows = masked_load(new_ref.at[token, :, :], *masks[1:])
        masked_store(cache_ref.at[page, offset, :, :], rows, *masks)


def append(k_cache, v_cache, k, v, cache_seqlens, batch_idx, table, keep=None, *, interpret,
           debug=False):
    """The caches with k, v (B, seqlen_new, Hk, D) written at ``cache_seqlens[b] + t``, in place.
    Positions below 0 or past the capacity, and missing pages or rows, are not written; ``keep``
    (B, seqlen_new) int32, if given: only where nonzero."""
    batch, seqlen_new, num_heads_k, head_dim = k.shape
    num_pages, page_size = k_cache.shape[:2]
    heads_p, head_dim_p = next_power_of_2(num_heads_k), padded_head_dim(head_dim)
    new_spec = pl.BlockSpec((None, seqlen_new, heads_p, head_dim_p), lambda t, b: (b, 0, 0, 0))
    cache_spec = pl.BlockSpec((num_pages, page_size, heads_p, head_dim_p), lambda t, b: (0, 0, 0, 0))
    ints = [x for x in (table, batch_idx, keep) if x is not None]
    operands = [cache_seqlens, *ints, k, v, k_cache, v_cache]
    kernel = functools.partial(_append_kernel, paged=table is not None,
                               has_batch_idx=batch_idx is not None, has_keep=keep is not None,
                               page_size=page_size,
                               num_pages=num_pages, num_heads_k=num_heads_k, head_dim=head_dim)
    return pallas_call(
        kernel,
        grid=(seqlen_new, batch),
        in_specs=[_full(x.shape) for x in (cache_seqlens, *ints)] + [new_spec, new_spec, cache_spec,
                                                                     cache_spec],
        out_specs=[cache_spec, cache_spec],
        out_shape=[jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={len(operands) - 2: 0, len(operands) - 1: 1},
        compiler_params=_params(4, 1),
        interpret=interpret,
        debug=debug,
        name="flash_attn_kvcache_append",
    )(*operands)


def _attention_kernel(q_ref, k_ref, v_ref, lengths_ref, *refs, spec: ScoreSpec, config: DecodeConfig,
                      seqlen_q, group, head_dim, paged, has_leftpad, has_batch_idx, page_size,
                      num_pages, num_splits, interpret):
    refs = list(refs)
    leftpad_ref = refs.pop(0) if has_leftpad else None
    table_ref = refs.pop(0) if paged else None
    batch_idx_ref = refs.pop(0) if has_batch_idx else None
    slopes_ref = refs.pop(0) if spec.has_alibi else None
    out_ref, lse_ref = refs
    row_block, split, batch, head_k = (pl.program_id(i) for i in range(4))
    block_i, group_p, block_k = config.block_i, config.group_p, config.block_k
    head_dim_p = q_ref.shape[-1]
    numerics = Numerics(q_ref.dtype, interpret=interpret)
    d_mask = head_dim_mask(head_dim, head_dim_p)
    pages = _Pages(paged=paged, page_size=page_size, num_pages=num_pages, table_ref=table_ref,
                   batch_idx_ref=batch_idx_ref)

    # Rows: block_i query positions x group_p query heads, position-major.
    pos_lo, _, pos_ok = block_indices(row_block, block_i, seqlen_q)
    head_ok = bounds_mask(jnp.arange(group_p, dtype=jnp.int32), group, group_p)
    pos_rows = None if pos_ok is None else pos_ok[:, None]  # (block_i, 1)
    head_cols = None if head_ok is None else head_ok[None, :]  # (1, group_p)
    row_masks = (None if pos_ok is None else pos_rows[:, :, None],
                 None if head_ok is None else head_cols[:, :, None], d_mask)
    q = masked_load(q_ref.at[pl.ds(pos_lo, block_i), :, :], *row_masks).reshape(config.rows, head_dim_p)
    rows = pos_lo + idiv(jnp.arange(config.rows, dtype=jnp.int32), group_p)
    slope = None
    if spec.has_alibi:
        slope = masked_load(slopes_ref.at[batch, pl.ds(head_k * group, group_p)], head_ok)
        slope = jnp.broadcast_to(slope[None, :], (block_i, group_p)).reshape(config.rows)[:, None]

    # Key column j of this row sits at cache position leftpad + j; seqlen_k keys exist.
    leftpad = leftpad_ref[batch] if has_leftpad else 0
    seqlen_k = lengths_ref[batch] - leftpad
    offset = seqlen_k - seqlen_q
    first, inner_first, inner_end, end = key_blocks(
        pos_lo, jnp.minimum(pos_lo + block_i, seqlen_q), block_k, spec, offset=offset,
        seqlen_k=seqlen_k, shift=leftpad)
    # This program's share: an equal part of the blocks the rows really attend (not of the
    # capacity, which may be mostly unused).
    share = idiv(end - first + num_splits - 1, num_splits)
    first = jnp.minimum(first + split * share, end)
    end = jnp.minimum(first + share, end)
    inner_first = jnp.clip(inner_first, first, end)
    inner_end = jnp.clip(inner_end, inner_first, end)

    def body(key_block, carry, *, masked):
        position = key_block * block_k
        page, page_offset, exists = pages.locate(batch, position)
        cols = position + jnp.arange(block_k, dtype=jnp.int32) - leftpad
        # A contiguous cache's length need not be a multiple of block_k: stay inside the row.
        in_page = as_rows(bounds_mask(page_offset + jnp.arange(block_k, dtype=jnp.int32), page_size,
                                      block_k))
        k = masked_load(k_ref.at[page, pl.ds(page_offset, block_k), :], in_page, d_mask)
        v = masked_load(v_ref.at[page, pl.ds(page_offset, block_k), :], in_page, d_mask)
        qk = numerics.matmul(q, k, transpose_b=True)
        s = scores(qk, rows[:, None], cols[None, :], spec, slope=slope, mul=numerics.mul_exact,
                   apply_mask=masked, offset=offset, seqlen_k=seqlen_k)
        if masked and has_leftpad:
            s = jnp.where(cols[None, :] >= 0, s, -jnp.inf)
        if paged or has_batch_idx:  # a page the table or index cannot reach holds no keys
            s = jnp.where(exists, s, -jnp.inf)
        return online_softmax_step(carry, s, v, numerics=numerics,
                                   masked=masked or paged or has_batch_idx)

    carry = initial_softmax_state(config.rows, head_dim_p)
    carry = masked_full_masked_loop(body, carry, first, inner_first, inner_end, end)
    out, lse = finish_softmax(carry, numerics)
    out = out.reshape(block_i, group_p, head_dim_p).astype(out_ref.dtype)
    masked_store(out_ref.at[pl.ds(pos_lo, block_i), :, :], out, *row_masks)
    masked_store(lse_ref.at[pl.ds(pos_lo, block_i), :], lse.reshape(block_i, group_p), pos_rows,
                 head_cols)


def attention(q, k_cache, v_cache, lengths, leftpad, batch_idx, table, slopes, spec: ScoreSpec,
              config: DecodeConfig, num_splits: int, *, interpret, debug=False):
    """(out (B, Sq, H, D), lse (B, Sq, H) float32) of q over the caches; ``lengths`` (B,) are the
    cache positions in use (leftpad included), at most the capacity."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    num_pages, page_size, num_heads_k = k_cache.shape[:3]
    group = num_heads // num_heads_k
    group_p, head_dim_p = config.group_p, padded_head_dim(head_dim)
    # Views that group the query heads of each kv head: (..., Hk, G, D).
    q = q.reshape(batch, seqlen_q, num_heads_k, group, head_dim)
    cache_spec = pl.BlockSpec((num_pages, page_size, None, head_dim_p), lambda r, s, b, h: (0, 0, h, 0))
    ints = [x for x in (leftpad, table, batch_idx) if x is not None]
    in_specs = [pl.BlockSpec((None, seqlen_q, None, group_p, head_dim_p), lambda r, s, b, h: (b, 0, h, 0, 0)),
                cache_spec, cache_spec, _full(lengths.shape)] + [_full(x.shape) for x in ints]
    operands = [q, k_cache, v_cache, lengths, *ints]
    if spec.has_alibi:
        in_specs.append(_full(slopes.shape))
        operands.append(slopes)
    split_dim = () if num_splits == 1 else (num_splits,)
    split_index = (lambda s: ()) if num_splits == 1 else (lambda s: (s,))
    none_if_single = () if num_splits == 1 else (None,)
    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    out_shape = [jax.ShapeDtypeStruct(split_dim + q.shape, out_dtype),
                 jax.ShapeDtypeStruct(split_dim + q.shape[:-1], jnp.float32)]
    out_specs = [
        pl.BlockSpec(none_if_single + (None, seqlen_q, None, group_p, head_dim_p),
                     lambda r, s, b, h: (*split_index(s), b, 0, h, 0, 0)),
        pl.BlockSpec(none_if_single + (None, seqlen_q, None, group_p),
                     lambda r, s, b, h: (*split_index(s), b, 0, h, 0)),
    ]
    kernel = functools.partial(
        _attention_kernel, spec=spec, config=config, seqlen_q=seqlen_q, group=group,
        head_dim=head_dim, paged=table is not None, has_leftpad=leftpad is not None,
        has_batch_idx=batch_idx is not None, page_size=page_size, num_pages=num_pages,
        num_splits=num_splits, interpret=interpret)
    out, lse = pallas_call(
        kernel,
        grid=(pl.cdiv(seqlen_q, config.block_i), num_splits, batch, num_heads_k),
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=_params(config.num_warps, config.num_stages),
        interpret=interpret,
        debug=debug,
        name="flash_attn_kvcache",
    )(*operands)
    if num_splits > 1:
        out, lse = combine(out.reshape(num_splits, -1, head_dim), lse.reshape(num_splits, -1),
                           q.dtype, interpret=interpret, debug=debug)
    return out.reshape(batch, seqlen_q, num_heads, head_dim), lse.reshape(batch, seqlen_q, num_heads)


def _combine_kernel(out_ref, lse_ref, merged_ref, merged_lse_ref, *, num_splits, num_rows, head_dim):
    row_lo, _, row_ok = block_indices(pl.program_id(0), COMBINE_ROWS, num_rows)
    d_mask = head_dim_mask(head_dim, out_ref.shape[-1])

    def split_lse(split):
        return masked_load(lse_ref.at[split, pl.ds(row_lo, COMBINE_ROWS)], row_ok, other=-jnp.inf)

    top = fori_loop(0, num_splits, lambda s, m: jnp.maximum(m, split_lse(s)),
                        jnp.full((COMBINE_ROWS,), -jnp.inf, jnp.float32))
    top = jnp.where(top == -jnp.inf, 0.0, top)

    def body(split, carry):
        acc, total = carry
        weight = jnp.exp(split_lse(split) - top)  # 0 for a split that saw no key
        part = masked_load(out_ref.at[split, pl.ds(row_lo, COMBINE_ROWS), :], as_rows(row_ok), d_mask)
        return acc + weight[:, None] * part, total + weight

    zeros = (jnp.zeros((COMBINE_ROWS, out_ref.shape[-1]), jnp.float32),
             jnp.zeros((COMBINE_ROWS,), jnp.float32))
    acc, total = fori_loop(0, num_splits, body, zeros)
    empty = total == 0.0
    safe_total = jnp.where(empty, 1.0, total)
    masked_store(merged_ref.at[pl.ds(row_lo, COMBINE_ROWS), :],
                 (acc / safe_total[:, None]).astype(merged_ref.dtype), as_rows(row_ok), d_mask)
    masked_store(merged_lse_ref.at[pl.ds(row_lo, COMBINE_ROWS)],
                 jnp.where(empty, -jnp.inf, top + jnp.log(safe_total)), row_ok)


def combine(partial_out, partial_lse, dtype, *, interpret, debug=False):
    """Merges (splits, N, D) partial outputs by their (splits, N) logsumexps."""
    num_splits, num_rows, head_dim = partial_out.shape
    head_dim_p = padded_head_dim(head_dim)
    return pallas_call(
        functools.partial(_combine_kernel, num_splits=num_splits, num_rows=num_rows,
                          head_dim=head_dim),
        grid=(pl.cdiv(num_rows, COMBINE_ROWS),),
        in_specs=[pl.BlockSpec((num_splits, num_rows, head_dim_p), lambda i: (0, 0, 0)),
                  pl.BlockSpec((num_splits, num_rows), lambda i: (0, 0))],
        out_specs=[pl.BlockSpec((num_rows, head_dim_p), lambda i: (0, 0)),
                   pl.BlockSpec((num_rows,), lambda i: (0,))],
        out_shape=[jax.ShapeDtypeStruct((num_rows, head_dim), dtype),
                   jax.ShapeDtypeStruct((num_rows,), jnp.float32)],
        compiler_params=_params(4, 1),
        interpret=interpret,
        debug=debug,
        name="flash_attn_kvcache_combine",
    )(partial_out, partial_lse)
