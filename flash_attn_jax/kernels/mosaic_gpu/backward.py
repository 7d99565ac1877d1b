"""Attention backward for Hopper GPUs in Pallas Mosaic GPU. Deterministic (bitwise reproducible)
as two kernels, dK/dV and dQ, without atomics; or, with ``deterministic=False`` (flash-attn's
default), one kernel: the dK/dV kernel also adds each tile's dQ = dS K into a float32 sum by TMA
reductions (five matmuls a tile instead of the two kernels' seven; dQ then reproducible to
rounding only, dK and dV still bitwise).

- dK/dV: one program per (kv head, 2 * block_k keys, batch row). Two compute warpgroups own
  block_k keys each and keep dK and dV in registers; a producer warpgroup streams the query
  blocks (q, dO, lse, delta) of every query head of the kv head's group through ``stages``
  shared-memory slots. Tiles are keys x queries: S^T = K Q^T, P^T, dV += P^T dO,
  dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q. At head dim 256 the two
  accumulators do not fit the registers together: the kernel runs twice (``split_dkdv``), once
  for dV (keys only held) and once for dK (keys and values held, 32-query streams so that the
  shared memory holds them), recomputing S^T.
- dK/dV with dropout (``_query_major_step``, the "dkdv" pass): tiles queries x keys as in the
  forward, S = Q K^T, dP = dO V^T, so that the keep mask (``dropout.py``) takes one hash per 16
  elements; P and dS reach dV += P^T dO and dK += dS^T Q transposed through shared memory, and
  dQ = dS K (when added) from there as they are. At head dim 256 the dV pass does the same (P
  only; dQ then takes its own kernel); the dK pass
  keeps keys x queries tiles (its 32-query streams are below a wgmma's 64 rows) and hashes once
  per 2 elements there.
- dK/dV adding dQ (``_DqAdder``): each step the two warpgroups store their dS^T (with dropout
  dS) tiles to shared memory, meet at a barrier, and each computes one 64 x 64 tile of the query
  block's dQ over both warpgroups' keys (at head dim 64 with 64-query blocks, one tile: the
  warpgroups take turns), which a TMA reduction adds to the sum.
- dQ: one program per (query head, 2 * block_q rows, batch row), the forward's shape: two compute
  warpgroups own block_q rows each with dQ in registers, the producer streams key and value
  blocks. S = Q K^T, P, dP = dO V^T, dS = P (dP - delta), dQ += dS K.

Scores follow ``semantics.py`` (scale, softcap and its derivative, ALiBi, masks) in base-2 units,
P = 2^(s - lse) from the forward's lse; both kernels walk only the blocks some row or key of the
program may attend (``blocks.key_blocks`` / ``query_blocks``) and skip the mask on the blocks a
warpgroup attends in full. ``delta`` = rowsum(dO * O) - dlse (the lse cotangent).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import config as jax_config  # _check_vma, as plgpu.kernel uses it
from jax._src.pallas import mpmd as pallas_mpmd  # input_output_aliases (see _dkdv_dq)
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from flash_attn_jax import semantics
from flash_attn_jax.kernels.blocks import idiv, irem, key_blocks, query_blocks
from flash_attn_jax.kernels.mosaic_gpu import dropout
from flash_attn_jax.kernels.mosaic_gpu.common import (COMPUTE_REGISTERS, COMPUTE_WARPGROUPS,
                                                      TABLE_COLUMNS, BlockConfig, accumulate,
                                                      broadcast, check_owned, interpreting, locate,
                                                      masked_full_masked,
                                                      matmul_transposed, produce, produce_keys,
                                                      run_compute_warpgroups,
                                                      stage_smem, swizzle_for, swizzled_smem,
                                                      wgmma_iota, wgmma_registers,
                                                      zeros_tile)
from flash_attn_jax.semantics import LOG2E, ScoreSpec

_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BackwardConfig(BlockConfig):
    """The dK/dV program takes 2 x block_k keys and streams block_q queries; the dQ program takes
    2 x block_q rows and streams block_k keys. ``split_dkdv``: dV and dK in two passes of the
    dK/dV kernel, each keeping one accumulator in registers (at head dim 256 dK and dV together
    would need 256 registers a thread); the dK pass, which holds keys and values, streams
    ``dk_block_q`` queries (default block_q) to stay within shared memory, and the dQ kernel
    streams ``dq_block_k`` keys (default block_k). ``fuse_dq_from``: see ``fuses_dq``."""

    split_dkdv: bool = False
    dk_block_q: int | None = None
    dq_block_k: int | None = None
    fuse_dq_from: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_owned(self.block_q, "block_q")  # the dQ kernel's rows
        check_owned(self.block_k, "block_k")  # the dK/dV kernel's keys
        for name in ("dk_block_q", "dq_block_k"):
            size = getattr(self, name)
            if size is not None and (size <= 0 or size % 32):
                raise ValueError(f"{name} must be a positive multiple of 32, got {size}")

    @property
    def dkdv_parts(self) -> tuple[tuple[str, int], ...]:
        """(part, streamed query block) of each dK/dV pass: "dkdv" fused, or "dv" then "dk"."""
        if not self.split_dkdv:
            return (("dkdv", self.block_q),)
        return (("dv", self.block_q), ("dk", self.dk_block_q or self.block_q))

    def fuses_dq(self, head_dim: int, seqlen_k: int, *, dropout: bool = False) -> bool:
        """Whether the dK/dV kernel adds dQ too (``backward(deterministic=False)``): one pass,
        dQ's block_q x head_dim in one 64 x 64 tile per compute warpgroup, or one tile that
        the warpgroups take in turns (``_DqAdder``), and at least ``fuse_dq_from`` keys (the
        float32 sum's zeroing and rounding cost the same per query at any length, the matmuls
        saved grow with the keys); with dropout at any length (a dQ kernel would hash the keep
        mask again)."""
        return (not self.split_dkdv and not self.block_q % 64 and not head_dim % 64
                and (self.block_q // 64) * (head_dim // 64) in (1, COMPUTE_WARPGROUPS)
                and (dropout or seqlen_k >= self.fuse_dq_from))

    @property
    def dq_blocks(self) -> BlockConfig:
        """The dQ kernel's blocks."""
        return BlockConfig(self.block_q, self.dq_block_k or self.block_k, self.stages)


def _lse_in_base2(lse):
    """The forward's lse (natural) in base-2 units, +inf for rows without keys (P = 0 there)."""
    scaled = jnp.minimum(jnp.maximum(lse * LOG2E, -_FLOAT32_MAX), _FLOAT32_MAX)
    return jnp.where(lse == -jnp.inf, jnp.inf, scaled)


def _probs_and_dlogits_factor(qk, rows, cols, lse2, spec, span, slope, masked, lse_dim):
    """P = 2^(s - lse) and d logits / d qk for a tile of raw dot products; ``lse2`` lies along
    ``lse_dim`` (0: the tile's rows are queries)."""
    x = semantics.logits(qk, spec, unit=LOG2E)
    s = semantics.bias_and_mask(x, rows, cols, spec, slope=slope, unit=LOG2E, apply_mask=masked,
                                **span)
    p = jnp.exp2(jnp.minimum(s - broadcast(lse2, s.shape, lse_dim), 0.0))
    return p, semantics.logits_derivative(x, spec, unit=LOG2E)


def _dkdv_kernel(q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, slopes_ref, tiles_ref,
                 dropout_ref, dk_ref, dv_ref, dq_sum_ref, scoped, *, spec: ScoreSpec,
                 config: BackwardConfig, part: str, block_q: int, group: int, seqlen_q: int,
                 seqlen_k: int):
    """``part``: "dkdv" (both), "dv" or "dk"; ``block_q``: the streamed query block. Buffers and
    outputs a part does not use are None. With ``dq_sum_ref`` (float32, q's shape; "dkdv" only)
    each step also adds its dQ = dS K to it (``_DqAdder``). With dropout the "dkdv" part works on
    queries x keys tiles (``_query_major``)."""
    ((k_smem, v_smem, q_smem, dout_smem, lse_smem, delta_smem, stage, ds_smem, dq_smem,
      transposed), (k_ready, v_ready), (q_ready, dout_ready, lse_ready, delta_ready), free,
     pair) = scoped
    with_dv, with_dk = part in ("dkdv", "dv"), part in ("dkdv", "dk")
    block_k, stages = config.block_k, config.stages
    dtype = k_smem.dtype
    head_dim = k_smem.shape[-1]
    head_k, tile = lax.axis_index("heads"), lax.axis_index("k_tiles")
    batch = lax.axis_index("batch")
    warpgroup = lax.axis_index("wg")
    program = locate(tiles_ref, tile, batch, tile_size=config.keys_per_program,
                     seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    span = program.span
    mask_span = program.mask_span(config.keys_per_program)
    offset, seqlen_q = span["offset"], program.seqlen_q
    program_lo = program.lo
    first, _, _, end = query_blocks(program_lo, program_lo + config.keys_per_program,
                                    block_q, spec, offset=offset, seqlen_q=seqlen_q)
    blocks_per_head = end - first
    # Step t: query block first + t % blocks_per_head of the group's query head t // that.
    num_steps = group * blocks_per_head

    def _compute(warpgroup):
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        col_lo = program_lo + warpgroup * block_k
        # With dq_sum_ref: a step's dS (or dS^T) tiles stored (both warpgroups', at the step's
        # parity), the meeting that lets each read the other's, then dQ = dS K added to the sum.
        add_dq = None if dq_sum_ref is None else _DqAdder(
            dq_sum_ref, k_smem, dq_smem.at[warpgroup], warpgroup, pair, batch,
            queries_major=transposed is not None)
        keys = (batch, pl.ds(program.k_base + col_lo, block_k), head_k)
        own_k = k_smem.at[warpgroup]
        own_v = v_smem.at[warpgroup] if with_dk else None
        own_stage = stage.at[warpgroup] if stage is not None else None
        plgpu.copy_gmem_to_smem(k_ref.at[keys], own_k, k_ready.at[warpgroup])
        if with_dk:
            plgpu.copy_gmem_to_smem(v_ref.at[keys], own_v, v_ready.at[warpgroup])
        _, inner_first, inner_end, _ = query_blocks(col_lo, col_lo + block_k, block_q, spec,
                                                    offset=offset, seqlen_q=seqlen_q)
        plgpu.barrier_wait(k_ready.at[warpgroup])
        if with_dk:
            plgpu.barrier_wait(v_ready.at[warpgroup])

        def head_body(member, carry):
            head = head_k * group + member
            slope = slopes_ref[program.sequence, head] if spec.has_alibi else None

            def step_body(query_block, carry, *, masked):
                dk, dv = carry
                slot = irem(member * blocks_per_head + query_block - first, stages)
                for ready in (q_ready, lse_ready):
                    plgpu.barrier_wait(ready.at[slot])
                q = q_smem.at[slot]

                qk_t = matmul_transposed(own_k, q, (block_k, block_q))
                lse2 = _lse_in_base2(plgpu.load(lse_smem.at[slot],
                                                layout=plgpu.Layout.WGMMA.reduce(0)))
                rows = wgmma_iota(qk_t.shape, 1, query_block * block_q)  # queries along dim 1
                cols = wgmma_iota(qk_t.shape, 0, col_lo)
                p_t, dlogits = _probs_and_dlogits_factor(qk_t, rows, cols, lse2, spec,
                                                         mask_span, slope, masked, lse_dim=1)
                # Dropout (the split passes only: the "dkdv" pass takes _query_major_step): P^T's
                # kept entries times 1 / (1 - p) (dV's operand), and dP^T's.
                keep = (dropout.keep_factor(dropout_ref, p_t.shape, batch=program.sequence,
                                            head=head, row0=col_lo, col0=query_block * block_q,
                                            spec=spec, rows_are_queries=False,
                                            kept=spec.keep_scale)
                        if spec.has_dropout else None)
                dropped_p_t = p_t if keep is None else p_t * keep
                plgpu.barrier_wait(dout_ready.at[slot])
                if with_dk:
                    plgpu.barrier_wait(delta_ready.at[slot])
                dout = dout_smem.at[slot]

                if part == "dkdv":
                    def dv_and_dp(refs):  # both wgmmas issued before one wait
                        dv_ref, dp_ref = refs
                        wgmma_registers(dv_ref, dropped_p_t.astype(dtype), dout, own_stage)
                        plgpu.wgmma(dp_ref, own_v, dout.T)

                    dv, dp_t = accumulate((dv, zeros_tile((block_k, block_q))), dv_and_dp)
                elif part == "dv":
                    def dv_matmul(acc_ref):
                        wgmma_registers(acc_ref, dropped_p_t.astype(dtype), dout, own_stage)

                    dv = accumulate(dv, dv_matmul)
                else:
                    dp_t = matmul_transposed(own_v, dout, (block_k, block_q))
                if with_dk:
                    delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    if keep is not None:
                        dp_t = dp_t * keep
                    ds_t = p_t * (dp_t - broadcast(delta, dp_t.shape, 1)) * dlogits

                    def dk_matmul(acc_ref):
                        wgmma_registers(acc_ref, ds_t.astype(dtype), q, own_stage)

                    if add_dq is not None:
                        # Both warpgroups' dS^T tiles in shared memory (two buffers: the other
                        # warpgroup may still read the last step's).
                        parity = irem(member * blocks_per_head + query_block - first, 2)
                        ds_smem.at[parity, warpgroup][...] = ds_t.astype(dtype)
                        plgpu.commit_smem()
                        add_dq.stored(parity)
                    dk = accumulate(dk, dk_matmul)
                    if add_dq is not None:
                        add_dq.add(ds_smem.at[parity], parity,
                                   row_lo=program.q_base + query_block * block_q, head=head)
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            body = step_body if transposed is None else functools.partial(
                _query_major_step, head=head, slope=slope, first=first,
                blocks_per_head=blocks_per_head, member=member, own=(own_k, own_v),
                tiles=transposed,
                buffers=(q_smem, dout_smem, lse_smem, delta_smem),
                barriers=(q_ready, dout_ready, lse_ready, delta_ready, free),
                dropout_ref=dropout_ref, program=program, col_lo=col_lo, block_q=block_q,
                block_k=block_k, stages=stages, spec=spec, warpgroup=warpgroup, add_dq=add_dq)
            return masked_full_masked(body, first, inner_first, inner_end, end, carry)

        zeros = zeros_tile((block_k, head_dim))
        dk, dv = lax.fori_loop(0, group, head_body, (zeros if with_dk else None,
                                                      zeros if with_dv else None))
        if add_dq is not None:  # until the other warpgroup's last dQ has read our keys
            plgpu.barrier_arrive(pair.at[2])
            plgpu.barrier_wait(pair.at[2])
        # The keys and values are no longer read: their buffers stage the gradients' stores.
        stores = [(dk, own_k, dk_ref)] if with_dk else []
        if with_dv:
            stores.append((dv, own_v if with_dk else own_k, dv_ref))
        for grad, buffer, _ in stores:
            buffer[...] = grad.astype(dtype)
        plgpu.commit_smem()
        for _, buffer, out_ref in stores:
            plgpu.copy_smem_to_gmem(buffer, out_ref.at[keys])
        plgpu.wait_smem_to_gmem(0)

    # Not in the packed layout, whose traced tile-table values the copies double (head dim 64
    # varlen spilled more: 1008 -> 1540 bytes).
    run_compute_warpgroups(_compute, warpgroup, copies=tiles_ref is None)

    @pl.when(warpgroup == COMPUTE_WARPGROUPS)
    def _produce():
        def load(step, slot):
            blocks = jnp.maximum(blocks_per_head, 1)
            head = head_k * group + idiv(step, blocks)
            row_lo = program.q_base + (first + irem(step, blocks)) * block_q
            rows = (batch, pl.ds(row_lo, block_q), head)
            stats = (batch, head, pl.ds(row_lo, block_q))
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[stats], lse_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(dout_ref.at[rows], dout_smem.at[slot], dout_ready.at[slot])
            if with_dk:
                plgpu.copy_gmem_to_smem(delta_ref.at[stats], delta_smem.at[slot],
                                        delta_ready.at[slot])

        produce(0, num_steps, stages, load, (free,))


def _query_major_step(query_block, carry, *, masked, head, slope, first, blocks_per_head, member,
                      own, tiles, buffers, barriers, dropout_ref, program, col_lo, block_q,
                      block_k, stages, spec, warpgroup, add_dq):
    """One step of the dK/dV kernel's "dkdv" part, or of the "dv" pass, with dropout, on queries
    x keys tiles as in the forward: S = Q K^T, dP = dO V^T, so that the keep mask takes one hash
    per 16 elements (on keys x queries tiles a thread's bytes need one per 2). dV += P^T dO and
    dK += dS^T Q then take P and dS transposed from shared memory (``tiles``: the warpgroups'
    block_q x block_k buffers for P and, with dK, dS, separate refs: slices of one by a constant
    index inside the wgmmas' ``run_state`` do not lower) instead of from registers. The "dv"
    pass (``own[1]``, the values, None) computes neither dP nor dS. With ``add_dq`` the dS
    buffers are twice the warpgroups' (by the step's parity: the other warpgroup reads this
    one's in its dQ = dS K)."""
    dk, dv = carry
    own_k, own_v = own
    with_dk = own_v is not None
    q_smem, dout_smem, lse_smem, delta_smem = buffers
    q_ready, dout_ready, lse_ready, delta_ready, free = barriers
    dtype = own_k.dtype
    step = member * blocks_per_head + query_block - first
    slot, parity = irem(step, stages), irem(step, 2)
    for ready in (q_ready, lse_ready):
        plgpu.barrier_wait(ready.at[slot])
    q = q_smem.at[slot]
    query_lo = query_block * block_q
    qk = matmul_transposed(q, own_k, (block_q, block_k))
    lse2 = _lse_in_base2(plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(1)))
    rows, cols = wgmma_iota(qk.shape, 0, query_lo), wgmma_iota(qk.shape, 1, col_lo)
    mask_span = program.mask_span(COMPUTE_WARPGROUPS * block_k)  # the program's keys
    p, dlogits = _probs_and_dlogits_factor(qk, rows, cols, lse2, spec, mask_span, slope, masked,
                                           lse_dim=0)
    keep = dropout.keep_factor(dropout_ref, p.shape, batch=program.sequence, head=head,
                               row0=query_lo, col0=col_lo, spec=spec, rows_are_queries=True,
                               kept=spec.keep_scale)
    plgpu.barrier_wait(dout_ready.at[slot])
    dout = dout_smem.at[slot]
    p_tile = tiles[0].at[warpgroup]
    p_tile[...] = (p * keep).astype(dtype)  # the last step's wgmmas have read it
    if with_dk:
        plgpu.barrier_wait(delta_ready.at[slot])
        dp = matmul_transposed(dout, own_v, (block_q, block_k))
        delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(1))
        ds = p * (dp * keep - broadcast(delta, dp.shape, 0)) * dlogits
        ds_tiles = tiles[1] if add_dq is None else tiles[1].at[parity]
        ds_tile = ds_tiles.at[warpgroup]
        ds_tile[...] = ds.astype(dtype)
    plgpu.commit_smem()
    if add_dq is not None:
        add_dq.stored(parity)

    if with_dk:
        def dv_and_dk(refs):
            dv_ref, dk_ref = refs
            plgpu.wgmma(dv_ref, p_tile.T, dout)
            plgpu.wgmma(dk_ref, ds_tile.T, q)

        dv, dk = accumulate((dv, dk), dv_and_dk)
    else:
        dv = accumulate(dv, lambda dv_ref: plgpu.wgmma(dv_ref, p_tile.T, dout))
    plgpu.barrier_arrive(free.at[slot])
    if add_dq is not None:
        add_dq.add(ds_tiles, parity, row_lo=program.q_base + query_lo, head=head)
    return dk, dv


@dataclasses.dataclass(frozen=True)
class _DqAdder:
    """The dK/dV kernel's dQ (``backward(deterministic=False)``): each step the warpgroups store
    their dS tiles (``queries_major``: block_q x keys, else dS^T, keys x block_q) at the step's
    parity (``stored``: this warpgroup's arrival), then ``add`` waits for the other's and adds
    the streamed query block's dQ = dS K, over both warpgroups' keys, to ``dq_sum_ref``
    (float32) by TMA reductions. dQ's block_q x head_dim splits into one 64 x 64 tile per
    warpgroup; a single tile (block_q and head dim 64) is taken by the warpgroups in turns, the
    step's parity's."""

    dq_sum_ref: object
    k_smem: object  # (warpgroups, keys, head_dim)
    dq_tile: object  # this warpgroup's float32 staging tile
    warpgroup: object
    pair: object  # barriers [parity]: both warpgroups' tiles stored
    batch: object
    queries_major: bool

    def stored(self, parity):
        plgpu.barrier_arrive(self.pair.at[parity])

    def add(self, ds_tiles, parity, *, row_lo, head):
        """``ds_tiles``: the step's (warpgroups, ...) dS tiles."""
        plgpu.barrier_wait(self.pair.at[parity])
        block_q = ds_tiles.shape[-2 if self.queries_major else -1]
        col_tiles = self.k_smem.shape[-1] // 64
        # The tile at traced offsets: one copy of the code (a branch per warpgroup doubled its
        # wgmma descriptors, which the compiler hoists out of the loop and spills).
        add = lambda tile: self._add_tile(ds_tiles, idiv(tile, col_tiles) * 64,
                                          irem(tile, col_tiles) * 64, row_lo, head)
        if (block_q // 64) * col_tiles == 1:
            pl.when(self.warpgroup == parity)(lambda: add(0))
        else:
            add(self.warpgroup)

    def _add_tile(self, ds_tiles, row, col, row_lo, head):

        def dq_matmul(acc_ref):
            for keys in range(COMPUTE_WARPGROUPS):  # contract over each warpgroup's keys
                ds = (ds_tiles.at[keys, pl.ds(row, 64), :] if self.queries_major
                      else ds_tiles.at[keys, :, pl.ds(row, 64)].T)
                plgpu.wgmma(acc_ref, ds, self.k_smem.at[keys, :, pl.ds(col, 64)])
            return acc_ref[...]

        dq = pl.run_scoped(dq_matmul, plgpu.ACC((64, 64), jnp.float32))
        target = self.dq_sum_ref.at[self.batch, pl.ds(row_lo + row, 64), head, pl.ds(col, 64)]
        if interpreting():  # no TMA reductions there; the programs run one at a time
            target[...] = target[...] + dq
            return
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last reduction read dq_tile
        self.dq_tile[...] = dq
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(self.dq_tile, target, reduction_op="add")


def _dq_kernel(q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, slopes_ref, tiles_ref,
               dropout_ref, dq_ref, scoped, *,
               spec: ScoreSpec, config: BlockConfig, group: int, seqlen_q: int,
               seqlen_k: int):
    ((q_smem, dout_smem, lse_smem, delta_smem, k_smem, v_smem, stage),
     (q_ready, dout_ready, lse_ready, delta_ready), (k_ready, v_ready), (k_free, v_free)) = scoped
    block_q, block_k, stages = config.block_q, config.block_k, config.stages
    dtype = q_smem.dtype
    head_dim = q_smem.shape[-1]
    head, tile, batch = lax.axis_index("heads"), lax.axis_index("q_tiles"), lax.axis_index("batch")
    warpgroup = lax.axis_index("wg")
    program = locate(tiles_ref, tile, batch, tile_size=config.rows_per_program,
                     seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    span = program.span
    mask_span = program.mask_span(block_k)
    program_lo = program.lo
    first, _, _, end = key_blocks(program_lo, program_lo + config.rows_per_program, block_k,
                                  spec, **span)

    @pl.when(warpgroup < COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        row_lo = program_lo + warpgroup * block_q
        rows_at = (batch, pl.ds(program.q_base + row_lo, block_q), head)
        stats_at = (batch, head, pl.ds(program.q_base + row_lo, block_q))
        own = [buffer.at[warpgroup] for buffer in (q_smem, dout_smem, lse_smem, delta_smem)]
        sources = (q_ref.at[rows_at], dout_ref.at[rows_at], lse_ref.at[stats_at],
                   delta_ref.at[stats_at])
        barriers = (q_ready, dout_ready, lse_ready, delta_ready)
        for source, buffer, ready in zip(sources, own, barriers):
            plgpu.copy_gmem_to_smem(source, buffer, ready.at[warpgroup])
        for ready in barriers:
            plgpu.barrier_wait(ready.at[warpgroup])
        q, dout, lse_buffer, delta_buffer = own
        lse2 = _lse_in_base2(plgpu.load(lse_buffer, layout=plgpu.Layout.WGMMA.reduce(1)))
        delta = plgpu.load(delta_buffer, layout=plgpu.Layout.WGMMA.reduce(1))
        _, inner_first, inner_end, _ = key_blocks(row_lo, row_lo + block_q, block_k, spec, **span)
        slope = slopes_ref[program.sequence, head] if spec.has_alibi else None

        def step_body(step, dq, *, masked):
            slot = irem(step - first, stages)
            plgpu.barrier_wait(k_ready.at[slot])
            keys = k_smem.at[slot]

            qk = matmul_transposed(q, keys, (block_q, block_k))
            rows = wgmma_iota(qk.shape, 0, row_lo)
            cols = wgmma_iota(qk.shape, 1, step * block_k)
            p, dlogits = _probs_and_dlogits_factor(qk, rows, cols, lse2, spec, mask_span, slope,
                                                   masked, lse_dim=0)
            plgpu.barrier_wait(v_ready.at[slot])

            dp = matmul_transposed(dout, v_smem.at[slot], (block_q, block_k))
            plgpu.barrier_arrive(v_free.at[slot])
            if spec.has_dropout:  # dP of the kept entries, times 1 / (1 - p)
                dp = dp * dropout.keep_factor(dropout_ref, dp.shape, batch=program.sequence,
                                              head=head, row0=row_lo, col0=step * block_k,
                                              spec=spec, rows_are_queries=True,
                                              kept=spec.keep_scale)
            ds = p * (dp - broadcast(delta, dp.shape, 0)) * dlogits

            def dq_matmul(acc_ref):
                wgmma_registers(acc_ref, ds.astype(dtype), keys,
                                stage.at[warpgroup] if stage is not None else None)

            dq = accumulate(dq, dq_matmul)
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        dq = masked_full_masked(step_body, first, inner_first, inner_end, end,
                                zeros_tile((block_q, head_dim)))
        q[...] = dq.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q, dq_ref.at[rows_at])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(warpgroup == COMPUTE_WARPGROUPS)
    def _produce():
        produce_keys(k_ref, v_ref, k_smem, v_smem, (k_ready, v_ready), (k_free, v_free),
                     batch=batch, head_k=idiv(head, group), first=first, end=end,
                     block_k=block_k, stages=stages, key_base=program.k_base)


def backward(q, k, v, slopes, out, lse, dout, dlse, spec: ScoreSpec, config: BackwardConfig, *,
             delta=None, deterministic: bool = True, tiles=None, max_seqlen_k=None,
             dropout_words=None):
    """(dq, dk, dv) in the inputs' dtype. q, out, dout (B, Sq, H, D), k, v (B, Sk, H_k, D),
    16-bit; lse and dlse (B, H, Sq) float32; lengths in 8s (read past the ends of partial tiles
    as zeros, writes clipped, as in the forward). ``delta``: rowsum(dout * out) - dlse when
    the caller has it. ``deterministic=False`` lets the dK/dV kernel add dQ into a float32 sum by
    TMA reductions (``config.fuses_dq``), in whatever order the programs run: one kernel of
    five matmuls a tile instead of two kernels of seven, with dQ reproducible only to rounding.

    ``tiles``: a packed layout (``varlen``, as in ``forward``): the tile tables of the
    dK/dV kernel's key tiles (keys_per_program) and the dQ kernel's query tiles (its
    rows_per_program); ``max_seqlen_k`` then stands for the key length in ``fuses_dq``.
    ``dropout_words``: the forward's (``dropout.words``) when ``spec`` has dropout."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_heads_k = k.shape[1], k.shape[2]
    if delta is None:
        delta = semantics.output_delta(out, dout, dlse)
    # lse and delta in whole program tiles: TMA rows start 16-byte aligned. The padding rows have
    # zero queries and output gradients, so they add nothing to dK and dV.
    padding = [(0, 0), (0, 0), (0, -seqlen_q % config.rows_per_program)]
    lse, delta = jnp.pad(lse, padding), jnp.pad(delta, padding)
    if slopes is None:
        slopes = jnp.zeros((batch, num_heads), jnp.float32)  # unread: keeps one signature
    slopes = slopes.astype(jnp.float32)
    statics = dict(spec=spec, group=num_heads // num_heads_k, seqlen_q=seqlen_q,
                   seqlen_k=seqlen_k, packed=tiles is not None)
    if tiles is None:
        tiles = (jnp.zeros((1, TABLE_COLUMNS), jnp.int32),) * 2  # unread: keeps one signature
    operands = (q, k, v, dout, lse, delta, slopes, *tiles,
                dropout.check_words(spec, dropout_words))
    if not deterministic and config.fuses_dq(head_dim, max_seqlen_k or seqlen_k,
                                             dropout=spec.has_dropout):
        dk, dv, dq_sum = _dkdv_dq(*operands, config=config, **statics)
        return dq_sum[:, :seqlen_q].astype(q.dtype), dk, dv
    grads = {}
    for part, block_q in config.dkdv_parts:
        outputs = tuple(name for name in ("dk", "dv") if name in part)
        grads.update(zip(outputs, plgpu.kernel(
            functools.partial(_dkdv_entry, outputs=outputs, part=part, block_q=block_q,
                              config=config, statics=statics),
            out_type=tuple(jax.ShapeDtypeStruct(k.shape, k.dtype) for _ in outputs),
            **_dkdv_grid(k.shape, config))(*operands)))
    dq = plgpu.kernel(
        functools.partial(_dq_entry, config=config.dq_blocks, statics=statics),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(num_heads, pl.cdiv(seqlen_q, config.dq_blocks.rows_per_program), batch),
        grid_names=("heads", "q_tiles", "batch"), **_LAUNCH)(*operands)
    return dq, grads["dk"], grads["dv"]


_LAUNCH = dict(compiler_params=plgpu.CompilerParams(approx_math=True),
               num_threads=COMPUTE_WARPGROUPS + 1, thread_name="wg")


def _dkdv_grid(k_shape, config):
    batch, seqlen_k, num_heads_k, _ = k_shape
    return dict(grid=(num_heads_k, pl.cdiv(seqlen_k, config.keys_per_program), batch),
                grid_names=("heads", "k_tiles", "batch"), **_LAUNCH)


def _query_major(spec: ScoreSpec, part: str, block_q: int) -> bool:
    """Whether the dK/dV pass works on queries x keys tiles (``_query_major_step``): with dropout,
    in the pass holding both gradients and in the "dv" pass, where the streamed query blocks fill
    a wgmma's 64 rows (the "dk" pass of ``split_dkdv`` streams 32 and hashes the mask on keys x
    queries tiles)."""
    return spec.has_dropout and part in ("dkdv", "dv") and not block_q % 64


def _dkdv_entry(q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, slopes_ref, k_tiles_ref,
                q_tiles_ref, dropout_ref, *out_refs, outputs, part, block_q, config, statics,
                dq_sum_ref=None):
    """One dK/dV pass: its shared memory and barriers around ``_dkdv_kernel``; ``outputs``
    names ``out_refs`` ("dk", "dv"). The key tiles' table is read when ``statics["packed"]``."""
    statics = dict(statics)
    tiles_ref = k_tiles_ref if statics.pop("packed") else None
    named = dict(zip(outputs, out_refs))
    with_dk = part in ("dkdv", "dk")
    block_k, stages = config.block_k, config.stages
    q_dtype, head_dim = q_ref.dtype, q_ref.shape[-1]
    swizzle = swizzle_for(block_q, q_dtype)  # dK += dS^T Q contracts over block_q
    fused = dq_sum_ref is not None
    query_major = _query_major(statics["spec"], part, block_q)
    buffers = (swizzled_smem((COMPUTE_WARPGROUPS, block_k, head_dim), q_dtype, swizzle),
               swizzled_smem((COMPUTE_WARPGROUPS, block_k, head_dim), q_dtype, swizzle)
               if with_dk else None,
               swizzled_smem((stages, block_q, head_dim), q_dtype, swizzle),
               swizzled_smem((stages, block_q, head_dim), q_dtype, swizzle),
               plgpu.SMEM((stages, block_q), jnp.float32),
               plgpu.SMEM((stages, block_q), jnp.float32) if with_dk else None,
               stage_smem((block_k, block_q), q_dtype),
               # dS^T of both warpgroups, twice (the other warpgroup may read the last step's)
               swizzled_smem((2, COMPUTE_WARPGROUPS, block_k, block_q), q_dtype, swizzle)
               if fused and not query_major else None,
               plgpu.SMEM((COMPUTE_WARPGROUPS, 64, 64), jnp.float32) if fused else None,
               # with dropout: each warpgroup's P and (with dK) dS of a step (_query_major_step;
               # adding dQ, dS at the step's parity: the other warpgroup reads it)
               (swizzled_smem((COMPUTE_WARPGROUPS, block_q, block_k), q_dtype, swizzle),
                swizzled_smem((2, COMPUTE_WARPGROUPS, block_q, block_k) if fused
                              else (COMPUTE_WARPGROUPS, block_q, block_k), q_dtype, swizzle)
                )[:2 if with_dk else 1] if query_major else None)
    own = (plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),
           plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS) if with_dk else None)
    ready = (plgpu.Barrier(num_barriers=stages),) * 3 + (
        plgpu.Barrier(num_barriers=stages) if with_dk else None,)
    free = plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages)
    # The compute warpgroups' meetings: [parity] both dS^T tiles of a step stored, [2] both done.
    pair = plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=3) if fused else None
    pl.run_scoped(
        lambda *scoped: _dkdv_kernel(
            q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, slopes_ref, tiles_ref, dropout_ref,
            named.get("dk"), named.get("dv"), dq_sum_ref, scoped, config=config, part=part,
            block_q=block_q,
            **statics),
        buffers, own, ready, free, pair, collective_axes="wg")


def _dq_entry(*refs, config, statics):
    statics = dict(statics)
    # refs: the seven operands, the two tile tables (the query tiles' read when packed), the
    # dropout words, dQ.
    refs = (*refs[:7], refs[8] if statics.pop("packed") else None, *refs[9:11])
    q_ref, dout_ref = refs[0], refs[3]
    q_dtype, head_dim = q_ref.dtype, q_ref.shape[-1]
    stages = config.stages
    swizzle = swizzle_for(config.block_k, q_dtype)  # dQ += dS K contracts over block_k
    rows, keys = config.block_q, config.block_k
    buffers = (swizzled_smem((COMPUTE_WARPGROUPS, rows, head_dim), q_dtype, swizzle),
               swizzled_smem((COMPUTE_WARPGROUPS, rows, head_dim), dout_ref.dtype, swizzle),
               plgpu.SMEM((COMPUTE_WARPGROUPS, rows), jnp.float32),
               plgpu.SMEM((COMPUTE_WARPGROUPS, rows), jnp.float32),
               swizzled_smem((stages, keys, head_dim), q_dtype, swizzle),
               swizzled_smem((stages, keys, head_dim), q_dtype, swizzle),
               stage_smem((rows, keys), q_dtype))
    own = (plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),) * 4
    ready = (plgpu.Barrier(num_barriers=stages),) * 2
    free = (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2
    pl.run_scoped(lambda *scoped: _dq_kernel(*refs, scoped, config=config, **statics),
                  buffers, own, ready, free, collective_axes="wg")


def _dkdv_dq(q, k, v, dout, lse, delta, slopes, k_tiles, q_tiles, dropout_words, *, config,
             **statics):
    """(dk, dv, dq_sum float32, query rows in whole blocks): the fused pass, dQ added into a
    zeroed float32 array aliased to the kernel's output."""

    @jax.custom_batching.custom_vmap
    def run(*operands):
        # In whole query blocks: the interpret-mode stand-in for the TMA reductions reads it.
        q_shape = operands[0].shape
        dq_sum = jnp.zeros((q_shape[0], pl.cdiv(q_shape[1], config.block_q) * config.block_q,
                            *q_shape[2:]), jnp.float32)
        entry = functools.partial(_dkdv_entry, outputs=("dk", "dv"), part="dkdv",
                                  block_q=config.block_q, config=config, statics=statics)
        k_like = jax.ShapeDtypeStruct(operands[1].shape, operands[1].dtype)
        launch = _dkdv_grid(operands[1].shape, config)
        params = launch.pop("compiler_params")
        # JAX's kernel launcher with an input aliased to an output (the zeroed sum), which
        # plgpu.kernel does not expose (nor a mutable reference inside a custom_vjp); the
        # varying-axes check off as plgpu.kernel has it, for calls in the partitioner's shard_map.
        with jax_config._check_vma(False):
            dq_sum, dk, dv = pallas_mpmd._mpmd_map(
                [(plgpu.Mesh(**launch),
                  lambda *refs: entry(*refs[:10], refs[12], refs[13], dq_sum_ref=refs[11]))],
                (jax.ShapeDtypeStruct(dq_sum.shape, jnp.float32), k_like, k_like),
                input_output_aliases={10: 0}, compiler_params=params,
                interpret=jax_config.pallas_tpu_interpret_mode_context_manager.value or False,
                name="dkdv_dq")(*operands, dq_sum)
        return dk, dv, dq_sum

    @run.def_vmap
    def _vmapped(axis_size, in_batched, *operands):
        stacked = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                   for x, batched in zip(operands, in_batched)]
        # One call after another when packed (the slopes' rows are sequences) or with dropout
        # (the keep mask hashes the batch row: the vmapped axis must not join it).
        if statics["packed"] or statics["spec"].has_dropout:
            return lax.map(lambda xs: _dkdv_dq(*xs, config=config, **statics), stacked), (True,) * 3
        # The vmapped axis joins the batch axis (every array leads with the batch; the tables
        # are the unread placeholders).
        merged = [x.reshape(-1, *x.shape[2:]) for x in stacked[:7]]
        outs = _dkdv_dq(*merged, *operands[7:], config=config, **statics)
        return tuple(x.reshape(axis_size, -1, *x.shape[1:]) for x in outs), (True,) * 3

    return run(q, k, v, dout, lse, delta, slopes, k_tiles, q_tiles, dropout_words)
