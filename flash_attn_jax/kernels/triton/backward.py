"""Pallas (Triton lowering) backward kernels of dense attention.

Dense or varlen (``triton_segments``). Three launches, no atomics (so every run is bitwise reproducible):

1. delta = rowsum(dO * O) - dlse per query row (the lse cotangent enters here: d lse_i / d s_ij
   = P_ij, so it shifts delta).
2. dK, dV: one program per (key block, batch, kv head). It keeps its K and V tiles and both
   accumulators on chip and loops over the query heads of its kv head (GQA) and over the query
   blocks that can see its keys, so per-query-head dK/dV never reach memory.
3. dQ: one program per (query block, batch, query head), looping over key blocks like the forward.

Both recompute P = exp(s - lse) from the residuals q, k, v, out, lse. A row without any key has
lse = -inf; it is read as +inf so that its P is exactly 0. With softcap the score derivative
carries tanh's derivative.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flash_attn_jax.kernels.blocks import fori_loop, idiv
from flash_attn_jax.kernels.manual_axes import pallas_call
from flash_attn_jax.kernels.triton.config import DELTA_BLOCK, BlockConfig, padded_head_dim
from flash_attn_jax.kernels.triton.segments import (DENSE, KernelRefs, Layout, stats_spec,
                                                    token_spec, whole_spec)
from flash_attn_jax.kernels.triton.tiles import (as_rows, block_indices, dropout_tile,
                                                 head_dim_mask, masked_full_masked_loop,
                                                 masked_load, masked_store, optional_arrays)
from flash_attn_jax.semantics import ScoreSpec, bias_and_mask, logits, logits_derivative


def _delta_kernel(out_ref, dout_ref, dlse_ref, delta_ref, *, head_dim, block_q):
    # Per token, so it ignores the batch rows: varlen tokens form one long row.
    row_lo, _, row_ok = block_indices(pl.program_id(0), block_q, out_ref.shape[0])
    d_mask = head_dim_mask(head_dim, out_ref.shape[-1])
    out = masked_load(out_ref.at[pl.ds(row_lo, block_q), :], as_rows(row_ok), d_mask)
    dout = masked_load(dout_ref.at[pl.ds(row_lo, block_q), :], as_rows(row_ok), d_mask)
    dlse = masked_load(dlse_ref.at[pl.ds(row_lo, block_q)], row_ok)
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=1) - dlse
    masked_store(delta_ref.at[pl.ds(row_lo, block_q)], delta, row_ok)


def _row_stats(lse_ref, delta_ref, row_ok, numerics):
    """lse (in the backward's units; +inf for empty and out-of-range rows, so their P is 0) and
    delta."""
    lse = masked_load(lse_ref, row_ok, other=jnp.inf)
    lse = numerics.lse_in_units(jnp.where(lse == -jnp.inf, jnp.inf, lse))
    return lse, masked_load(delta_ref, row_ok)


def _dp_minus_delta(dp, delta, dropout, spec):
    """dP - delta, where the forward's dropout (P * Z / (1 - p)) makes dP = Z * dP / (1 - p)."""
    if dropout is None:
        return dp - delta
    return jnp.where(dropout.keep, dp * spec.keep_scale - delta, -delta)


def _dkdv_kernel(*refs, layout: Layout, spec: ScoreSpec, head_dim, group, block_q, block_k,
                 interpret):
    key_block, batch, head_k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    io = KernelRefs(refs, layout=layout, spec=spec, num_inputs=6, batch=batch, head_dim=head_dim,
                    interpret=interpret)
    (q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref), (dk_ref, dv_ref) = io.inputs, io.outputs
    seg, numerics, d_mask, slopes_ref, seed_ref = (io.seg, io.numerics, io.d_mask, io.slopes_ref,
                                                   io.seed_ref)
    head_dim_p = k_ref.shape[-1]
    unit = numerics.backward_unit
    col_lo, cols, col_ok = block_indices(key_block, block_k, seg.seqlen_k)
    col_pos = seg.col_positions(cols)
    kv_mask = as_rows(col_ok)
    # Tiles are keys x queries (the accumulators' rows), except with dropout: then queries x keys
    # as in the forward, so that the keep mask's layout needs no transpose (dV and dK take
    # transposed operands instead, through shared memory). An H200 measured each orientation the
    # faster one where it is used (benchmarks/RESULTS.md).
    query_major = spec.has_dropout

    def accumulate():
        k = masked_load(k_ref.at[seg.k_slice(col_lo, block_k), :], kv_mask, d_mask)
        v = masked_load(v_ref.at[seg.k_slice(col_lo, block_k), :], kv_mask, d_mask)
        blocks = seg.query_blocks(col_lo, block_k, block_q, spec)

        def head_body(member, carry):
            head = head_k * group + member
            slope = slopes_ref[batch, head] if spec.has_alibi else None
            dropout_at = dropout_tile(spec, seed_ref, seg.global_batch, seg.global_head(head),
                                      interpret=interpret)

            def body(query_block, carry, *, masked):
                dk, dv = carry
                row_lo, rows, row_ok = block_indices(query_block, block_q, seg.seqlen_q,
                                                     check_bounds=masked)
                rows_at = seg.q_slice(row_lo, block_q)
                row_pos = seg.row_positions(rows)
                q = masked_load(q_ref.at[rows_at, member, :], as_rows(row_ok), d_mask)
                dout = masked_load(dout_ref.at[rows_at, member, :], as_rows(row_ok), d_mask)
                lse, delta = _row_stats(lse_ref.at[member, rows_at], delta_ref.at[member, rows_at],
                                        row_ok, numerics)
                if query_major:
                    x = logits(numerics.matmul(q, k, transpose_b=True), spec, unit=unit)
                    row_ids, col_ids = row_pos[:, None], col_pos[None, :]
                    lse, delta = lse[:, None], delta[:, None]
                else:  # keys x queries
                    x = logits(numerics.matmul(k, q, transpose_b=True), spec, unit=unit)
                    row_ids, col_ids = row_pos[None, :], col_pos[:, None]
                    lse, delta = lse[None, :], delta[None, :]
                s = bias_and_mask(x, row_ids, col_ids, spec, slope=slope, unit=unit,
                                  apply_mask=masked, **seg.mask_args())
                p = numerics.probs(s, lse)
                if query_major:
                    dp = numerics.matmul(dout, v, transpose_b=True)
                else:
                    dp = numerics.matmul(v, dout, transpose_b=True)
                # dV sees the forward's mask too; its 1 / (1 - p) is applied once at the end. The
                # booleans, not DropoutTile.apply's pairs: dS needs them anyway, and holding both
                # forms spills registers.
                dropout = (None if dropout_at is None
                           else dropout_at(row_pos, seg.col_positions(col_lo), block_k))
                dropped_p = p if dropout is None else jnp.where(dropout.keep, p, 0.0)
                dv = dv + numerics.matmul(dropped_p.astype(dout.dtype), dout,
                                          transpose_a=query_major)
                ds = (p * _dp_minus_delta(dp, delta, dropout, spec)
                      * logits_derivative(x, spec, unit=unit))
                dk = dk + numerics.matmul(ds.astype(q.dtype), q, transpose_a=query_major)
                return dk, dv

            return masked_full_masked_loop(body, carry, *blocks)

        zeros = jnp.zeros((block_k, head_dim_p), jnp.float32)
        dk, dv = fori_loop(0, group, head_body, (zeros, zeros))
        if spec.has_dropout:
            dv = dv * spec.keep_scale
        for ref, grad in ((dk_ref, dk), (dv_ref, dv)):
            masked_store(ref.at[seg.k_slice(col_lo, block_k), :], grad.astype(ref.dtype), kv_mask,
                         d_mask)

    seg.run_if_within(col_lo, seg.seqlen_k, accumulate)
    seg.fill_rows((dk_ref, dv_ref), (0.0, 0.0), key_block == pl.num_programs(0) - 1, block_k,
                  keys=True, col_mask=d_mask)


def _dq_kernel(*refs, layout: Layout, spec: ScoreSpec, head_dim, block_q, block_k, interpret):
    query_block, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    io = KernelRefs(refs, layout=layout, spec=spec, num_inputs=6, batch=batch, head_dim=head_dim,
                    interpret=interpret)
    (q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref), (dq_ref,) = io.inputs, io.outputs
    seg, numerics, d_mask, slopes_ref, seed_ref = (io.seg, io.numerics, io.d_mask, io.slopes_ref,
                                                   io.seed_ref)
    head_dim_p = q_ref.shape[-1]
    unit = numerics.backward_unit
    row_lo, rows, row_ok = block_indices(query_block, block_q, seg.seqlen_q)
    row_pos = seg.row_positions(rows)
    rows_at = seg.q_slice(row_lo, block_q)

    def accumulate():
        q = masked_load(q_ref.at[rows_at, :], as_rows(row_ok), d_mask)
        dout = masked_load(dout_ref.at[rows_at, :], as_rows(row_ok), d_mask)
        lse, delta = _row_stats(lse_ref.at[rows_at], delta_ref.at[rows_at], row_ok, numerics)
        slope = slopes_ref[batch, head] if spec.has_alibi else None
        dropout_at = dropout_tile(spec, seed_ref, seg.global_batch, seg.global_head(head),
                                  interpret=interpret)

        def body(key_block, dq, *, masked):
            col_lo, cols, col_ok = block_indices(key_block, block_k, seg.seqlen_k,
                                                 check_bounds=masked)
            kv_mask = as_rows(col_ok)
            k = masked_load(k_ref.at[seg.k_slice(col_lo, block_k), :], kv_mask, d_mask)
            v = masked_load(v_ref.at[seg.k_slice(col_lo, block_k), :], kv_mask, d_mask)
            x = logits(numerics.matmul(q, k, transpose_b=True), spec, unit=unit)
            s = bias_and_mask(x, row_pos[:, None], seg.col_positions(cols)[None, :], spec,
                              slope=slope, unit=unit, apply_mask=masked, **seg.mask_args())
            p = numerics.probs(s, lse[:, None])
            dp = numerics.matmul(dout, v, transpose_b=True)
            dropout = (None if dropout_at is None
                       else dropout_at(row_pos, seg.col_positions(col_lo), block_k))
            ds = (p * _dp_minus_delta(dp, delta[:, None], dropout, spec)
                  * logits_derivative(x, spec, unit=unit))
            return dq + numerics.matmul(ds.astype(k.dtype), k)

        blocks = seg.key_blocks(row_lo, block_q, block_k, spec)
        dq = masked_full_masked_loop(body, jnp.zeros((block_q, head_dim_p), jnp.float32), *blocks)
        masked_store(dq_ref.at[rows_at, :], dq.astype(dq_ref.dtype), as_rows(row_ok), d_mask)

    seg.run_if_within(row_lo, seg.seqlen_q, accumulate)
    seg.fill_rows((dq_ref,), (0.0,), query_block == pl.num_programs(0) - 1, block_q,
                  col_mask=d_mask)


def row_delta(out, dout, dlse, *, layout: Layout = DENSE, interpret: bool, debug: bool = False):
    """delta = rowsum(dO * O) - dlse, float32 shaped like lse: dense (B, H, Sq), varlen (H, T)."""
    num_heads, head_dim = out.shape[-2:]
    head_dim_p = padded_head_dim(head_dim)
    seqlen_q = out.shape[0] if layout.varlen else out.shape[1]
    rows_spec = token_spec(layout, seqlen_q, head_dim_p)
    stats = stats_spec(layout, seqlen_q)
    # Per token: a varlen batch is one row of all its tokens.
    return pallas_call(
        functools.partial(_delta_kernel, head_dim=head_dim, block_q=DELTA_BLOCK),
        grid=(pl.cdiv(seqlen_q, DELTA_BLOCK), 1 if layout.varlen else out.shape[0], num_heads),
        in_specs=[rows_spec, rows_spec, stats], out_specs=stats,
        out_shape=jax.ShapeDtypeStruct(dlse.shape, jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, debug=debug,
        name="flash_attn_backward_delta",
    )(out, dout, dlse)


def _params(config: BlockConfig):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def backward(q, k, v, slopes, out, lse, dout, dlse, spec: ScoreSpec, dkdv_config: BlockConfig,
             dq_config: BlockConfig, *, seed=None, layout: Layout = DENSE, seq_arrays=(),
             max_seqlen_q=None, max_seqlen_k=None, grad_dtype=None, delta=None,
             interpret: bool, debug: bool = False):
    """(dq, dk, dv) in ``grad_dtype`` (default the input dtype) from the residuals and the
    cotangents of (out, lse). ``delta``: ``row_delta`` of (out, dout, dlse) when the caller has
    it already (then out and dlse are not read).

    Dense: q (B, Sq, H, D), lse (B, H, Sq). Varlen: q (T, H, D), lse (H, T), ``seq_arrays``
    (cu_q, cu_k) and the static ``max_seqlen_q``/``max_seqlen_k`` that size the grids.
    """
    num_heads, head_dim = q.shape[-2:]
    num_heads_k = k.shape[-2]
    group = num_heads // num_heads_k
    head_dim_p = padded_head_dim(head_dim)
    if layout.varlen:
        batch, seqlen_q, seqlen_k = seq_arrays[0].shape[0] - 1, q.shape[0], k.shape[0]
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        max_seqlen_q, max_seqlen_k = seqlen_q, seqlen_k
    call = functools.partial(pallas_call, interpret=interpret, debug=debug)
    rows_spec = token_spec(layout, seqlen_q, head_dim_p)
    stats = stats_spec(layout, seqlen_q)
    seq_specs = [whole_spec(x) for x in seq_arrays]
    optional = optional_arrays(spec, slopes, seed)
    optional_specs = [whole_spec(x) for x in optional]

    if delta is None:
        delta = row_delta(out, dout, dlse, layout=layout, interpret=interpret, debug=debug)

    # dK/dV: the query-side operands of all `group` query heads of one kv head.
    kv_spec = token_spec(layout, seqlen_k, head_dim_p)
    group_rows_spec = token_spec(layout, seqlen_q, head_dim_p, heads=group)
    group_stats_spec = stats_spec(layout, seqlen_q, heads=group)
    dk, dv = call(
        functools.partial(_dkdv_kernel, layout=layout, spec=spec, head_dim=head_dim, group=group,
                          block_q=dkdv_config.block_q, block_k=dkdv_config.block_k,
                          interpret=interpret),
        grid=(pl.cdiv(max_seqlen_k, dkdv_config.block_k), batch, num_heads_k),
        in_specs=[*seq_specs, group_rows_spec, kv_spec, kv_spec, group_rows_spec, group_stats_spec,
                  group_stats_spec, *optional_specs],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, grad_dtype or k.dtype),
                   jax.ShapeDtypeStruct(v.shape, grad_dtype or v.dtype)],
        compiler_params=_params(dkdv_config),
        name="flash_attn_backward_dkdv",
    )(*seq_arrays, q, k, v, dout, lse, delta, *optional)

    kv_of_query_head = token_spec(layout, seqlen_k, head_dim_p, head=lambda h: idiv(h, group))
    dq = call(
        functools.partial(_dq_kernel, layout=layout, spec=spec, head_dim=head_dim,
                          block_q=dq_config.block_q, block_k=dq_config.block_k,
                          interpret=interpret),
        grid=(pl.cdiv(max_seqlen_q, dq_config.block_q), batch, num_heads),
        in_specs=[*seq_specs, rows_spec, kv_of_query_head, kv_of_query_head, rows_spec, stats,
                  stats, *optional_specs],
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, grad_dtype or q.dtype),
        compiler_params=_params(dq_config),
        name="flash_attn_backward_dq",
    )(*seq_arrays, q, k, v, dout, lse, delta, *optional)
    return dq, dk, dv
