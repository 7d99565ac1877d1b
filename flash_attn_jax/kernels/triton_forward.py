"""Pallas (Triton lowering) forward kernels: attention output + logsumexp, and the probabilities.

Layout is the caller's (batch, seqlen, heads, headdim); one program handles one block of query
rows of one (batch, query head). Sequence and head-dim edges are handled with masked loads and
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

from flash_attn_jax.kernels.config import BlockConfig, padded_head_dim
from flash_attn_jax.kernels.triton_tiles import (Numerics, as_cols, as_rows, block_indices,
                                                 finish_softmax, head_dim_mask,
                                                 initial_softmax_state, key_blocks,
                                                 masked_full_masked_loop, masked_load,
                                                 masked_store, online_softmax_step)
from flash_attn_jax.semantics import ScoreSpec, scores


def _forward_kernel(q_ref, k_ref, v_ref, *refs, spec: ScoreSpec, seqlen_q, seqlen_k, head_dim,
                    block_q, block_k):
    if spec.has_alibi:
        slopes_ref, out_ref, lse_ref = refs
    else:
        out_ref, lse_ref = refs
    q_block, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim_p = q_ref.shape[-1]
    numerics = Numerics(q_ref.dtype)
    offset = seqlen_k - seqlen_q
    d_mask = head_dim_mask(head_dim, head_dim_p)

    row_lo, rows, row_ok = block_indices(q_block, block_q, seqlen_q)
    q = masked_load(q_ref.at[pl.ds(row_lo, block_q), :], as_rows(row_ok), d_mask)
    slope = slopes_ref[batch, head] if spec.has_alibi else None

    blocks = key_blocks(row_lo, block_q, block_k, spec, seqlen_q=seqlen_q, seqlen_k=seqlen_k)

    def body(key_block, carry, *, masked):
        col_lo, cols, col_ok = block_indices(key_block, block_k, seqlen_k, check_bounds=masked)
        kv_mask = as_rows(col_ok)
        k = masked_load(k_ref.at[pl.ds(col_lo, block_k), :], kv_mask, d_mask)
        v = masked_load(v_ref.at[pl.ds(col_lo, block_k), :], kv_mask, d_mask)
        qk = numerics.matmul(q, k, transpose_b=True)
        s = scores(qk, rows[:, None], cols[None, :], spec, slope=slope, unit=numerics.unit,
                   apply_mask=masked, offset=offset, seqlen_k=seqlen_k)
        return online_softmax_step(carry, s, v, numerics=numerics, masked=masked)

    carry = masked_full_masked_loop(body, initial_softmax_state(block_q, head_dim_p), *blocks)
    out, lse = finish_softmax(carry, numerics)
    masked_store(out_ref.at[pl.ds(row_lo, block_q), :], out.astype(out_ref.dtype), as_rows(row_ok),
                 d_mask)
    masked_store(lse_ref.at[pl.ds(row_lo, block_q)], lse, row_ok)


def _compiler_params(config: BlockConfig):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def forward(q, k, v, slopes, spec: ScoreSpec, config: BlockConfig, *, interpret: bool,
            debug: bool = False):
    """out (B, Sq, H, D) in q.dtype and lse (B, H, Sq) float32 of dense attention."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_heads_k = k.shape[1], k.shape[2]
    group = num_heads // num_heads_k
    head_dim_p = padded_head_dim(head_dim)
    kernel = functools.partial(_forward_kernel, spec=spec, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                               head_dim=head_dim, block_q=config.block_q, block_k=config.block_k)
    in_specs = [
        pl.BlockSpec((None, seqlen_q, None, head_dim_p), lambda i, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, seqlen_k, None, head_dim_p), lambda i, b, h: (b, 0, lax.div(h, group), 0)),
        pl.BlockSpec((None, seqlen_k, None, head_dim_p), lambda i, b, h: (b, 0, lax.div(h, group), 0)),
    ]
    operands = [q, k, v]
    if spec.has_alibi:
        in_specs.append(pl.BlockSpec((batch, num_heads), lambda i, b, h: (0, 0)))
        operands.append(slopes)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(seqlen_q, config.block_q), batch, num_heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, seqlen_q, None, head_dim_p), lambda i, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, None, seqlen_q), lambda i, b, h: (b, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, seqlen_q), jnp.float32)],
        compiler_params=_compiler_params(config),
        interpret=interpret,
        debug=debug,  # prints the Triton IR; the lowering tests lint it
        name="flash_attn_forward",
    )(*operands)


def _probs_kernel(q_ref, k_ref, lse_ref, *refs, spec: ScoreSpec, seqlen_q, seqlen_k, head_dim,
                  block_q, block_k):
    if spec.has_alibi:
        slopes_ref, probs_ref = refs
    else:
        (probs_ref,) = refs
    q_block, k_block = pl.program_id(0), pl.program_id(1)
    batch, head = pl.program_id(2), pl.program_id(3)
    d_mask = head_dim_mask(head_dim, q_ref.shape[-1])
    row_lo, rows, row_ok = block_indices(q_block, block_q, seqlen_q)
    col_lo, cols, col_ok = block_indices(k_block, block_k, seqlen_k)
    q = masked_load(q_ref.at[pl.ds(row_lo, block_q), :], as_rows(row_ok), d_mask)
    k = masked_load(k_ref.at[pl.ds(col_lo, block_k), :], as_rows(col_ok), d_mask)
    lse = masked_load(lse_ref.at[pl.ds(row_lo, block_q)], row_ok)
    slope = slopes_ref[batch, head] if spec.has_alibi else None
    numerics = Numerics(q_ref.dtype)
    qk = numerics.matmul(q, k, transpose_b=True)
    s = scores(qk, rows[:, None], cols[None, :], spec, offset=seqlen_k - seqlen_q,
               seqlen_k=seqlen_k, slope=slope, unit=numerics.unit)
    lse = lse * numerics.unit
    probs = jnp.where((lse == -jnp.inf)[:, None], 0.0, numerics.exp(s - lse[:, None]))
    masked_store(probs_ref.at[pl.ds(row_lo, block_q), pl.ds(col_lo, block_k)], probs,
                 as_rows(row_ok), as_cols(col_ok))


def probabilities(q, k, lse, slopes, spec: ScoreSpec, config: BlockConfig, *, interpret: bool,
                  debug: bool = False):
    """The softmax probabilities (B, H, Sq, Sk) float32 from q, k and the forward's lse."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_heads_k = k.shape[1], k.shape[2]
    group = num_heads // num_heads_k
    head_dim_p = padded_head_dim(head_dim)
    kernel = functools.partial(_probs_kernel, spec=spec, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                               head_dim=head_dim, block_q=config.block_q, block_k=config.block_k)
    in_specs = [
        pl.BlockSpec((None, seqlen_q, None, head_dim_p), lambda i, j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, seqlen_k, None, head_dim_p),
                     lambda i, j, b, h: (b, 0, lax.div(h, group), 0)),
        pl.BlockSpec((None, None, seqlen_q), lambda i, j, b, h: (b, h, 0)),
    ]
    operands = [q, k, lse]
    if spec.has_alibi:
        in_specs.append(pl.BlockSpec((batch, num_heads), lambda i, j, b, h: (0, 0)))
        operands.append(slopes)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(seqlen_q, config.block_q), pl.cdiv(seqlen_k, config.block_k), batch, num_heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, seqlen_q, seqlen_k), lambda i, j, b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, num_heads, seqlen_q, seqlen_k), jnp.float32),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        debug=debug,  # prints the Triton IR; the lowering tests lint it
        name="flash_attn_probs",
    )(*operands)
