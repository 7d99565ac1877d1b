"""Pallas (Triton lowering) forward kernels: attention output + logsumexp, and the probabilities.

Layout is the caller's: dense (batch, seqlen, heads, headdim) or varlen (tokens, heads, headdim)
with cu_seqlens, keys optionally paged (``triton_segments``). One program handles one block of query
rows of one (batch row, query head). Sequence and head-dim edges are handled with masked loads and
stores (the lowering adds no bounds checks of its own), so no input is ever padded in memory.

The key loop is split in three: key blocks the mask cuts on the left, the blocks that every row of
the query block attends in full (no mask arithmetic), and the blocks cut on the right or by the end
of the keys. Blocks outside the union of the rows' windows are never visited.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flash_attn_jax.kernels.blocks import idiv
from flash_attn_jax.kernels.manual_axes import pallas_call
from flash_attn_jax.kernels.triton.config import BlockConfig, padded_head_dim
from flash_attn_jax.kernels.triton.segments import (DENSE, KernelRefs, Layout, key_spec,
                                                    stats_spec, token_spec, whole_spec)
from flash_attn_jax.kernels.triton.tiles import (as_cols, as_rows, block_indices, dropout_tile,
                                                 finish_softmax, initial_softmax_state,
                                                 masked_full_masked_loop, masked_load,
                                                 masked_store, online_softmax_step,
                                                 optional_arrays)
from flash_attn_jax.semantics import ScoreSpec, scores


def _forward_kernel(*refs, layout: Layout, spec: ScoreSpec, head_dim, block_q, block_k,
                    interpret):
    q_block, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    io = KernelRefs(refs, layout=layout, spec=spec, num_inputs=3, batch=batch, head_dim=head_dim,
                    interpret=interpret)
    (q_ref, k_ref, v_ref), (out_ref, lse_ref) = io.inputs, io.outputs
    seg, numerics, d_mask, slopes_ref, seed_ref = (io.seg, io.numerics, io.d_mask, io.slopes_ref,
                                                   io.seed_ref)
    head_dim_p = q_ref.shape[-1]
    row_lo, rows, row_ok = block_indices(q_block, block_q, seg.seqlen_q)

    def attend():
        q = masked_load(q_ref.at[seg.q_slice(row_lo, block_q), :], as_rows(row_ok), d_mask)
        slope = slopes_ref[batch, head] if spec.has_alibi else None
        blocks = seg.key_blocks(row_lo, block_q, block_k, spec)
        dropout_at = dropout_tile(spec, seed_ref, seg.global_batch, seg.global_head(head),
                                  interpret=interpret)
        row_pos = seg.row_positions(rows)

        def body(key_block, carry, *, masked):
            col_lo, cols, col_ok = block_indices(key_block, block_k, seg.seqlen_k,
                                                 check_bounds=masked)
            kv_mask = as_rows(col_ok)
            k = masked_load(seg.keys(k_ref, col_lo, block_k), kv_mask, d_mask)
            v = masked_load(seg.keys(v_ref, col_lo, block_k), kv_mask, d_mask)
            qk = numerics.matmul(q, k, transpose_b=True)
            s = scores(qk, row_pos[:, None], seg.col_positions(cols)[None, :], spec, slope=slope,
                       mul=numerics.mul_exact, apply_mask=masked, **seg.mask_args())
            dropout = (None if dropout_at is None
                       else dropout_at(row_pos, seg.col_positions(col_lo), block_k))
            return online_softmax_step(carry, s, v, numerics=numerics, masked=masked,
                                       dropout=dropout)

        carry = masked_full_masked_loop(body, initial_softmax_state(block_q, head_dim_p), *blocks)
        out, lse = finish_softmax(carry, numerics, spec.keep_scale)
        masked_store(out_ref.at[seg.q_slice(row_lo, block_q), :], out.astype(out_ref.dtype),
                     as_rows(row_ok), d_mask)
        masked_store(lse_ref.at[seg.q_slice(row_lo, block_q)], lse, row_ok)

    seg.run_if_within(row_lo, seg.seqlen_q, attend)
    seg.fill_rows((out_ref, lse_ref), (0.0, -jnp.inf), q_block == pl.num_programs(0) - 1, block_q,
                  col_mask=d_mask)


def _compiler_params(config: BlockConfig):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _operands(layout, seq_arrays, q, kv_arrays, q_stats, optional, head_dim_p):
    """(in_specs, operands) of the forward and probability kernels: the sequence arrays, q, the
    key-side arrays, per-row statistics of q, the ``optional`` arrays (ALiBi slopes, dropout
    key words: those the spec uses)."""
    group = q.shape[-2] // kv_arrays[0].shape[-2]
    seqlen_q = q.shape[0] if layout.varlen else q.shape[1]
    specs = [whole_spec(x) for x in seq_arrays] + [token_spec(layout, seqlen_q, head_dim_p)]
    specs += [key_spec(layout, x, head_dim_p, head=lambda h: idiv(h, group)) for x in kv_arrays]
    specs += [stats_spec(layout, seqlen_q) for _ in q_stats]
    operands = [*seq_arrays, q, *kv_arrays, *q_stats, *optional]
    return specs + [whole_spec(x) for x in optional], operands



def forward(q, k, v, slopes, spec: ScoreSpec, config: BlockConfig, *, seed=None,
            layout: Layout = DENSE, seq_arrays=(), max_seqlen_q=None, max_seqlen_k=None,
            out_dtype=None, interpret: bool, debug: bool = False):
    """out (in ``out_dtype``, default q.dtype) and lse float32 of attention: dense q (B, Sq, H, D)
    -> lse (B, H, Sq); varlen q (T, H, D) with ``seq_arrays`` (cu_q, cu_k[, block_table]) -> lse
    (H, T). ``seq_arrays`` end with the placement words when the layout has them. The key loops
    follow each row's real length, so ``max_seqlen_k`` is not needed."""
    del max_seqlen_k
    num_heads, head_dim = q.shape[-2:]
    head_dim_p = padded_head_dim(head_dim)
    if layout.varlen:
        num_tokens = q.shape[0]
        batch, seqlen_q = seq_arrays[0].shape[0] - 1, num_tokens
        grid_rows, lse_shape = max_seqlen_q, (num_heads, num_tokens)
    else:
        batch, seqlen_q = q.shape[:2]
        grid_rows, lse_shape = seqlen_q, (batch, num_heads, seqlen_q)
    in_specs, operands = _operands(layout, seq_arrays, q, (k, v), (),
                                   optional_arrays(spec, slopes, seed), head_dim_p)
    kernel = functools.partial(_forward_kernel, layout=layout, spec=spec, head_dim=head_dim,
                               block_q=config.block_q, block_k=config.block_k,
                               interpret=interpret)
    return pallas_call(
        kernel,
        grid=(pl.cdiv(grid_rows, config.block_q), batch, num_heads),
        in_specs=in_specs,
        out_specs=[token_spec(layout, seqlen_q, head_dim_p), stats_spec(layout, seqlen_q)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, out_dtype or q.dtype),
                   jax.ShapeDtypeStruct(lse_shape, jnp.float32)],
        compiler_params=_compiler_params(config),
        interpret=interpret,
        debug=debug,  # prints the Triton IR; the lowering tests lint it
        name="flash_attn_varlen_forward" if layout.varlen else "flash_attn_forward",
    )(*operands)


def _probs_kernel(*refs, layout: Layout, spec: ScoreSpec, head_dim, block_q, block_k, interpret):
    q_block, k_block = pl.program_id(0), pl.program_id(1)
    batch, head = pl.program_id(2), pl.program_id(3)
    io = KernelRefs(refs, layout=layout, spec=spec, num_inputs=3, batch=batch, head_dim=head_dim,
                    interpret=interpret)
    (q_ref, k_ref, lse_ref), (probs_ref,) = io.inputs, io.outputs
    seg, numerics, d_mask, slopes_ref, seed_ref = (io.seg, io.numerics, io.d_mask, io.slopes_ref,
                                                   io.seed_ref)
    # The output (S_dmask) is (max_seqlen_q, max_seqlen_k) per (batch row, head); entries past the
    # row's lengths are 0 (the lse of a missing row reads -inf, a missing key's score is -inf).
    max_q, max_k = probs_ref.shape
    row_lo, rows, store_row_ok = block_indices(q_block, block_q, max_q)
    col_lo, cols, store_col_ok = block_indices(k_block, block_k, max_k)
    _, _, row_ok = block_indices(q_block, block_q, seg.seqlen_q)
    _, _, col_ok = block_indices(k_block, block_k, seg.seqlen_k)
    q = masked_load(q_ref.at[seg.q_slice(row_lo, block_q), :], as_rows(row_ok), d_mask)
    k = masked_load(seg.keys(k_ref, col_lo, block_k), as_rows(col_ok), d_mask)
    lse = masked_load(lse_ref.at[seg.q_slice(row_lo, block_q)], row_ok, other=-jnp.inf)
    slope = slopes_ref[batch, head] if spec.has_alibi else None
    qk = numerics.matmul(q, k, transpose_b=True)
    row_pos = seg.row_positions(rows)
    s = scores(qk, row_pos[:, None], seg.col_positions(cols)[None, :], spec, slope=slope,
               mul=numerics.mul_exact, **seg.mask_args())
    # At most 1: the recomputed score may round above the forward's logsumexp (Numerics.probs).
    probs = jnp.where((lse == -jnp.inf)[:, None], 0.0,
                      numerics.exp(jnp.minimum(s - lse[:, None], 0.0)))
    if spec.has_dropout:  # S_dmask: the sign bit marks a dropped entry (-0.0 for a dropped 0)
        dropout_at = dropout_tile(spec, seed_ref, seg.global_batch, seg.global_head(head),
                                  interpret=interpret)
        keep = dropout_at(row_pos, seg.col_positions(col_lo), block_k).keep
        # Set with integer ops: compiled float code may ignore the sign of zero (-0.0 == 0.0).
        sign = jnp.where(keep, jnp.uint32(0), jnp.uint32(0x80000000))
        probs = lax.bitcast_convert_type(lax.bitcast_convert_type(probs, jnp.uint32) | sign,
                                         jnp.float32)
    masked_store(probs_ref.at[pl.ds(row_lo, block_q), pl.ds(col_lo, block_k)], probs,
                 as_rows(store_row_ok), as_cols(store_col_ok))


def probabilities(q, k, lse, slopes, spec: ScoreSpec, config: BlockConfig, *, seed=None,
                  layout: Layout = DENSE, seq_arrays=(), max_seqlen_q=None, max_seqlen_k=None,
                  interpret: bool, debug: bool = False):
    """The softmax probabilities (B, H, Sq, Sk) float32 from q, k and the forward's lse; varlen:
    (B, H, max_seqlen_q, max_seqlen_k), zero outside each row's lengths."""
    num_heads, head_dim = q.shape[-2:]
    head_dim_p = padded_head_dim(head_dim)
    if layout.varlen:
        batch = seq_arrays[0].shape[0] - 1
    else:
        batch, max_seqlen_q, max_seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    in_specs, operands = _operands(layout, seq_arrays, q, (k,), (lse,),
                                   optional_arrays(spec, slopes, seed), head_dim_p)
    in_specs = [_with_key_block_axis(s) for s in in_specs]
    kernel = functools.partial(_probs_kernel, layout=layout, spec=spec, head_dim=head_dim,
                               block_q=config.block_q, block_k=config.block_k,
                               interpret=interpret)
    shape = (batch, num_heads, max_seqlen_q, max_seqlen_k)
    return pallas_call(
        kernel,
        grid=(pl.cdiv(max_seqlen_q, config.block_q), pl.cdiv(max_seqlen_k, config.block_k), batch,
              num_heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, max_seqlen_q, max_seqlen_k),
                               lambda i, j, b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        debug=debug,  # prints the Triton IR; the lowering tests lint it
        name="flash_attn_probs",
    )(*operands)


def _with_key_block_axis(block_spec):
    """The (block, batch, head) BlockSpec for the probability kernel's (block, key block, batch,
    head) grid."""
    index_map = block_spec.index_map
    return pl.BlockSpec(block_spec.block_shape, lambda i, j, b, h: index_map(i, b, h))
