"""Attention forward for Hopper GPUs in Pallas Mosaic GPU.

One program (CTA) per (query head, 2 * block_q query rows, batch row) runs three warpgroups:
two compute warpgroups, each owning block_q of the rows, and a producer warpgroup that streams
the key and value blocks into ``stages`` shared-memory slots with TMA, as far ahead as the slots
allow. Each compute step is a wgmma for S = Q K^T, the score semantics of ``semantics.py``
(scale, softcap, ALiBi, masks, in base-2 units), the online softmax, and a wgmma for P V. The two
compute warpgroups take turns on the tensor cores: while one runs its softmax the other's matmuls
run (FlashAttention-3's ping-pong schedule; ``ForwardConfig`` says whether, on which barriers, and
the other scheduling choices). Under a causal mask the tiles are taken from the last
(the most keys) to the first.

Both compute warpgroups walk the same key blocks (those any of the program's rows may attend,
``blocks.key_blocks``), so the producer and the turn barrier stay in step; a block that lies
outside a warpgroup's own rows' span is masked for it. Blocks every row of a warpgroup attends in
full skip the mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from flash_attn_jax import semantics
from flash_attn_jax.kernels.blocks import idiv, irem, key_blocks
from flash_attn_jax.kernels.mosaic_gpu import dropout
from flash_attn_jax.kernels.mosaic_gpu.common import (COMPUTE_THREADS, COMPUTE_WARPGROUPS,
                                                      TABLE_COLUMNS, TURN_BARRIERS, BlockConfig,
                                                      accumulate, broadcast, check_owned,
                                                      compute_registers, interpreting, locate,
                                                      masked_full_masked, named_barrier,
                                                      produce_keys, row_vector, stage_smem,
                                                      swizzled_smem, wgmma_iota, wgmma_registers,
                                                      zeros_tile)
from flash_attn_jax.semantics import LN2, LOG2E, ScoreSpec


@dataclasses.dataclass(frozen=True)
class ForwardConfig(BlockConfig):
    """block_q: rows per compute warpgroup; block_k: keys per step; ``compute_warpgroups``: 2, or
    3 (FlashAttention-3's choice at head dim 64: while one computes its softmax two keep the
    tensor cores fed; 160 registers a thread instead of 240; no ping-pong turns, which are
    between two; the tables' choice from ``mosaic_gpu.LONG_QUERIES`` queries at head dims 64 and
    128, up to 13 % faster there on the H200, slower at 1024). How two compute warpgroups share
    the tensor cores: ``pingpong`` takes strict turns (one warpgroup's softmax runs while the
    other's matmuls do; FlashAttention-3's schedule, which serialises the two softmaxes),
    otherwise they run unsynchronised.
    ``key_wait_under_pv``: wait for the next key block while the P V wgmma runs rather than at
    the top of the step. ``pin_softmax``: an optimisation barrier keeps the softmax's results
    computed before the turn is handed over.
    ``hardware_turns``: the turns handed over on hardware (named) barriers (``_HandOver``) rather
    than met at a shared-memory one (``_Rendezvous``); as fast on the H200 (0.997x the
    rendezvous over the 16 benchmark shapes, benchmarks/RESULTS.md section 1), so off."""

    pingpong: bool = True
    hardware_turns: bool = False
    key_wait_under_pv: bool = False
    pin_softmax: bool = False
    compute_warpgroups: int = COMPUTE_WARPGROUPS

    def __post_init__(self):
        super().__post_init__()
        check_owned(self.block_q, "block_q")
        if self.compute_warpgroups not in (2, 3):
            raise ValueError(f"compute_warpgroups must be 2 or 3, got {self.compute_warpgroups}")
        if self.pingpong and self.compute_warpgroups != 2:
            raise ValueError("pingpong turns are between two compute warpgroups; "
                             f"compute_warpgroups={self.compute_warpgroups} needs pingpong=False")

    @property
    def rows_per_program(self) -> int:
        """Query rows of a program: one block per compute warpgroup."""
        return self.compute_warpgroups * self.block_q


@dataclasses.dataclass(frozen=True)
class _Rendezvous:
    """Ping-pong turns on one shared-memory barrier of two arrivals, ``barriers.at[0]``, where
    the two warpgroups meet twice a step: after issuing the first matmul (so the other's matmuls
    start), and at the second, which a warpgroup issues once both have arrived (one when its
    softmax is done). Each arrival is an atomic on the barrier from every thread, each wait a
    try-wait loop reading it.
    Warpgroup 1 meets once first (``start``: half a step behind), warpgroup 0 once last."""

    warpgroup: object
    barriers: object

    def _meet(self):
        plgpu.barrier_arrive(self.barriers.at[0])
        plgpu.barrier_wait(self.barriers.at[0])

    def first_matmul_issued(self):
        self._meet()

    def softmax_done(self):
        plgpu.barrier_arrive(self.barriers.at[0])

    def wait(self):
        plgpu.barrier_wait(self.barriers.at[0])

    def start(self):
        pl.when(self.warpgroup == 1)(self._meet)

    def finish(self):
        pl.when(self.warpgroup == 0)(self._meet)


@dataclasses.dataclass(frozen=True)
class _HandOver:
    """FlashAttention-3's hand-over: warpgroup w waits for turn w (``wait``) before its second
    matmul and hands turn 1 - w to the other once its first is issued. Turn w is the hardware
    barrier ``TURN_BARRIERS + w`` over both warpgroups' threads (``bar.sync`` / ``bar.arrive``:
    one instruction each); in interpret mode, which has no rule for those, the shared-memory
    barrier ``barriers.at[w]``, which counts the same arrivals. Warpgroup 0's wait before step
    j's second matmul is met by warpgroup 1's hand-over after step j's first; warpgroup 1's by
    warpgroup 0's after step j + 1's first, the last one by its hand-over at the end
    (``finish``), and warpgroup 1's wait at the start (``start``) by warpgroup 0's after step
    0's first. No hand-over can come before the wait it is for has been met by the previous one
    (each follows a wait of its own warpgroup that needed the other's), so no turn counts two
    arrivals of one warpgroup."""

    warpgroup: object
    barriers: object

    def _arrive(self, turn, *, wait: bool):
        if interpreting():
            plgpu.barrier_arrive(self.barriers.at[turn])
            if wait:
                plgpu.barrier_wait(self.barriers.at[turn])
        else:
            named_barrier("sync" if wait else "arrive", TURN_BARRIERS + turn, COMPUTE_THREADS)

    def first_matmul_issued(self):
        self._arrive(1 - self.warpgroup, wait=False)

    def softmax_done(self):
        pass

    def wait(self):
        self._arrive(self.warpgroup, wait=True)

    def start(self):
        pl.when(self.warpgroup == 1)(self.wait)

    def finish(self):
        pl.when(self.warpgroup == 0)(self.first_matmul_issued)


def _kernel(q_ref, k_ref, v_ref, slopes_ref, tiles_ref, dropout_ref, out_ref, lse_ref, scoped, *,
            spec: ScoreSpec, config: ForwardConfig, group: int, seqlen_q: int, seqlen_k: int):
    ((q_smem, k_smem, v_smem, lse_smem, stage_p), (k_ready, v_ready, q_ready), (k_free, v_free),
     turn) = scoped
    block_q, block_k, stages = config.block_q, config.block_k, config.stages
    dtype = q_smem.dtype
    head_dim = q_smem.shape[-1]
    head, tile, batch = lax.axis_index("heads"), lax.axis_index("q_tiles"), lax.axis_index("batch")
    if tiles_ref is None and spec.is_causal_like:
        # Causal-like: later rows see more keys. The heaviest tiles first, the light ones last
        # (a packed layout's table lists its tiles in that order).
        tile = pl.cdiv(seqlen_q, config.rows_per_program) - 1 - tile
    warpgroup = lax.axis_index("wg")
    program = locate(tiles_ref, tile, batch, tile_size=config.rows_per_program,
                     seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    span = program.span
    mask_span = program.mask_span(block_k)
    program_lo = program.lo
    first, _, _, end = key_blocks(program_lo, program_lo + config.rows_per_program, block_k, spec,
                                  **span)

    def slot_of(step):
        return irem(step - first, stages)

    def wait_for_keys(step):
        plgpu.barrier_wait(k_ready.at[slot_of(step)])

    @pl.when(warpgroup < config.compute_warpgroups)
    def _compute():
        plgpu.set_max_registers(compute_registers(config.compute_warpgroups), action="increase")
        turns = None
        if config.pingpong:
            turns = (_HandOver if config.hardware_turns else _Rendezvous)(warpgroup, turn)
        row_lo = program_lo + warpgroup * block_q
        rows_q = q_smem.at[warpgroup]
        rows_at = (batch, pl.ds(program.q_base + row_lo, block_q), head)
        plgpu.copy_gmem_to_smem(q_ref.at[rows_at], rows_q, q_ready.at[warpgroup])
        _, inner_first, inner_end, _ = key_blocks(row_lo, row_lo + block_q, block_k, spec, **span)
        slope = slopes_ref[program.sequence, head] if spec.has_alibi else None
        drop = functools.partial(dropout.drop, words_ref=dropout_ref, batch=program.sequence,
                                 head=head, row0=row_lo, spec=spec)
        plgpu.barrier_wait(q_ready.at[warpgroup])
        factor = semantics.linear_logit_factor(spec, unit=LOG2E)

        def step_body(step, carry, *, masked):
            acc, row_max, row_sum = carry
            slot = slot_of(step)
            if not config.key_wait_under_pv:
                wait_for_keys(step)

            def qk_matmul(acc_ref):
                plgpu.wgmma(acc_ref, rows_q, k_smem.at[slot].T)
                if turns is not None:  # the other's matmuls start under this one's softmax
                    turns.first_matmul_issued()
                return acc_ref[...]

            qk = pl.run_scoped(qk_matmul, plgpu.ACC((block_q, block_k), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            rows, cols = wgmma_iota(qk.shape, 0, row_lo), wgmma_iota(qk.shape, 1, step * block_k)
            if factor is None:
                s = semantics.scores(qk, rows, cols, spec, unit=LOG2E, slope=slope,
                                     apply_mask=masked, **mask_span)
                new_max = jnp.maximum(row_max, s.max(axis=1))
            else:  # max of the raw scores; the scaling rides in the exponent's FMA
                s = semantics.bias_and_mask(qk, rows, cols, spec, apply_mask=masked,
                                            **mask_span)
                new_max = jnp.maximum(row_max, s.max(axis=1) * factor)
            # A row with no key so far keeps max -inf; its exponentials are taken from 0.
            base = jnp.where(new_max == -jnp.inf, 0.0, new_max)
            alpha = jnp.exp2(row_max - base)
            scaled = s if factor is None else s * factor
            p = jnp.exp2(scaled - broadcast(base, s.shape, 0))
            row_sum = row_sum * alpha + p.sum(axis=1)  # before dropout: the softmax's sum
            acc = acc * broadcast(alpha, acc.shape, 0)
            p16 = p.astype(dtype)
            if spec.has_dropout:  # the kept probabilities; 1 / (1 - p) at the end
                p16 = drop(p16, col0=step * block_k)
            if config.pin_softmax:
                acc, row_sum, new_max, p16 = lax.optimization_barrier((acc, row_sum, new_max, p16))
            if turns is not None:
                turns.softmax_done()
            plgpu.barrier_wait(v_ready.at[slot])
            if turns is not None:
                turns.wait()  # the tensor cores are this warpgroup's again

            def pv_matmul(acc_ref):
                wgmma_registers(acc_ref, p16, v_smem.at[slot],
                                stage_p.at[warpgroup] if stage_p is not None else None)
                if config.key_wait_under_pv:
                    pl.when(step + 1 < end)(functools.partial(wait_for_keys, step + 1))

            acc = accumulate(acc, pv_matmul)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, new_max, row_sum

        carry = (zeros_tile((block_q, head_dim)), row_vector(-jnp.inf, block_q, 0),
                 row_vector(0.0, block_q, 0))
        if turns is not None:
            turns.start()
        if config.key_wait_under_pv:
            pl.when(first < end)(functools.partial(wait_for_keys, first))
        acc, row_max, row_sum = masked_full_masked(step_body, first, inner_first, inner_end, end,
                                                   carry)
        if turns is not None:
            turns.finish()

        # Rows that attended no key: out 0 (acc is 0), lse -inf.
        has_keys = row_sum > 0.0
        inverse = jnp.where(has_keys, spec.keep_scale / jnp.where(has_keys, row_sum, 1.0), 0.0)
        rows_q[...] = (acc * broadcast(inverse, acc.shape, 0)).astype(dtype)
        lse = jnp.where(has_keys, (row_max + jnp.log2(jnp.where(has_keys, row_sum, 1.0))) * LN2,
                        -jnp.inf)
        lse_smem.at[warpgroup][...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(rows_q, out_ref.at[rows_at])
        plgpu.copy_smem_to_gmem(lse_smem.at[warpgroup],
                                lse_ref.at[batch, head, pl.ds(program.q_base + row_lo, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(warpgroup == config.compute_warpgroups)
    def _produce():
        produce_keys(k_ref, v_ref, k_smem, v_smem, (k_ready, v_ready), (k_free, v_free),
                     batch=batch, head_k=idiv(head, group), first=first, end=end,
                     block_k=block_k, stages=stages, key_base=program.k_base)


def forward(q, k, v, slopes, spec: ScoreSpec, config: ForwardConfig, tiles=None,
            dropout_words=None):
    """out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) float32 (natural log; -inf for rows with
    no key). q (B, Sq, H, D), k and v (B, Sk, H_k, D), 16-bit, lengths in 8s (whole rows of the
    shared memory's tiles; the backend checks): the TMA
    reads the rows and keys past the ends of a last, partial tile as zeros (the masks drop those
    keys) and clips its writes. ``slopes`` (B, H) float32 when ``spec.has_alibi``.

    ``tiles``: a packed layout (``varlen``): B is 1, Sq and Sk hold sequences at offsets
    aligned to whole tiles, and ``tiles`` (Sq / rows_per_program, TABLE_COLUMNS) int32 says each
    program's sequence (``common.locate``); ``slopes`` then has a row per sequence.

    ``dropout_words``: ``dropout.words`` when ``spec`` has dropout."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_heads_k = k.shape[1], k.shape[2]
    if slopes is None:
        slopes = jnp.zeros((batch, num_heads), jnp.float32)  # unread: keeps one signature
    kernel = functools.partial(_kernel, spec=spec, config=config, group=num_heads // num_heads_k,
                               seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    stages = config.stages
    packed = tiles is not None
    if not packed:
        tiles = jnp.zeros((1, TABLE_COLUMNS), jnp.int32)  # unread: keeps one signature
    dropout_words = dropout.check_words(spec, dropout_words)

    consumers = config.compute_warpgroups

    def entry(q_ref, k_ref, v_ref, slopes_ref, tiles_ref, dropout_ref, out_ref, lse_ref):
        buffers = (swizzled_smem((consumers, config.block_q, head_dim), q.dtype),
                   swizzled_smem((stages, config.block_k, head_dim), k.dtype),
                   swizzled_smem((stages, config.block_k, head_dim), v.dtype),
                   plgpu.SMEM((consumers, config.block_q), jnp.float32),
                   stage_smem((config.block_q, config.block_k), q.dtype, consumers))
        ready = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                 plgpu.Barrier(num_barriers=consumers))
        free = (plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),) * 2
        # the turns' barriers (_Rendezvous's one; _HandOver's stand-ins in interpret mode), for
        # the two warpgroups that take turns
        turn = plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS,
                             num_barriers=COMPUTE_WARPGROUPS if config.hardware_turns else 1)
        pl.run_scoped(lambda *scoped: kernel(q_ref, k_ref, v_ref, slopes_ref,
                                             tiles_ref if packed else None, dropout_ref,
                                             out_ref, lse_ref, scoped),
                      buffers, ready, free, turn, collective_axes="wg")

    num_tiles = pl.cdiv(seqlen_q, config.rows_per_program)
    # lse in whole tiles: a TMA row must start 16-byte aligned, which Sq float32s may not.
    out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, num_heads, num_tiles * config.rows_per_program),
                                     jnp.float32))
    out, lse = plgpu.kernel(
        entry, out_type=out_type,
        grid=(num_heads, num_tiles, batch),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=consumers + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, slopes.astype(jnp.float32), tiles, dropout_words)
    return out, lse[..., :seqlen_q]
