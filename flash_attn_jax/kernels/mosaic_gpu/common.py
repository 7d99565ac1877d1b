"""Pieces shared by the Mosaic GPU kernels: shared-memory buffers, broadcasts in the wgmma
register layout, and the producer warpgroup's streaming loop."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax._src import config as jax_config  # the interpret-mode setting (no public getter)
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import llvm

from flash_attn_jax.kernels.blocks import irem

COMPUTE_WARPGROUPS = 2
_SWIZZLE_BYTES = 128
WARPGROUP_THREADS = 128
_REGISTER_FILE = 64 * 1024  # 32-bit registers of an SM
PRODUCER_REGISTERS = 24


def compute_registers(compute_warpgroups: int) -> int:
    """Registers per thread of each compute warpgroup, what the producer's 128 threads x
    PRODUCER_REGISTERS leave of an SM's 64 Ki to ``compute_warpgroups`` x 128 threads, in the
    8s that ``setmaxnreg`` takes: 240 for two (FlashAttention-3's split; at 232 / 40 the dK/dV
    kernel spilled more), 160 for three."""
    share = ((_REGISTER_FILE - WARPGROUP_THREADS * PRODUCER_REGISTERS)
             // (compute_warpgroups * WARPGROUP_THREADS))
    return min(share // 8 * 8, 240)


COMPUTE_REGISTERS = compute_registers(COMPUTE_WARPGROUPS)
COMPUTE_THREADS = COMPUTE_WARPGROUPS * WARPGROUP_THREADS
# Named (hardware) barriers of a program: Mosaic GPU uses 0 (the whole block's) and
# 1 + warpgroup (a warpgroup's own), so the kernels' own start above those.
TURN_BARRIERS = 8


def swizzled_smem(shape, dtype, swizzle=_SWIZZLE_BYTES):
    """A shared-memory buffer tiled and swizzled for TMA and wgmma (16-bit, minor dim >= 64)."""
    itemsize = jnp.dtype(dtype).itemsize
    tiling = plgpu.TilingTransform((8, swizzle // itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def swizzle_for(contraction, dtype):
    """The widest swizzle (bytes) whose row of elements divides ``contraction``: a wgmma whose
    B operand is read along its rows (dQ += dS K) contracts over whole swizzle rows, and both
    operands of a wgmma from shared memory share one swizzle."""
    itemsize = jnp.dtype(dtype).itemsize
    return next(swizzle for swizzle in (_SWIZZLE_BYTES, 64, 32)
                if not contraction % (swizzle // itemsize))


def broadcast(vector, shape, dim):
    """A vector laid along ``dim`` of a wgmma tile (0: one value per row) broadcast to ``shape``."""
    return lax.broadcast_in_dim(vector, shape, [dim])


def wgmma_iota(shape, dim, start):
    """``start`` + the index along ``dim`` of each element of a wgmma-layout tile (int32)."""
    return start + plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def zeros_tile(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def row_vector(value, size, dim):
    """A (size,) float32 vector filled with ``value``, laid out along ``dim`` of a wgmma tile."""
    return plgpu.layout_cast(jnp.full((size,), value, jnp.float32),
                             plgpu.Layout.WGMMA.reduce(1 - dim))


def check_owned(size, name):
    """A warpgroup's own rows (wgmma's M) come in 64s."""
    if size % 64:
        raise ValueError(f"{name} is a warpgroup's rows here and must be a multiple of 64, got {size}")


def produce(first, end, stages, load, free_barriers):
    """The producer warpgroup's body: ``load(step, slot)`` for the steps ``[first, end)``, step
    ``s`` into slot ``(s - first) % stages``, refilling a slot once every consumer has arrived
    at its ``free_barriers``. It hands its registers to the compute warpgroups first."""
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
    for i in range(stages):  # fill the slots
        pl.when(first + i < end)(functools.partial(load, first + i, i))

    @pl.loop(first + stages, jnp.maximum(end, first + stages))
    def _refill(step):
        slot = irem(step - first, stages)
        for barrier in free_barriers:
            plgpu.barrier_wait(barrier.at[slot])
        load(step, slot)

    if interpreting():  # it checks that every completed phase was awaited; a GPU need not
        @pl.loop(jnp.maximum(end - stages, first), end)
        def _drain(step):
            for barrier in free_barriers:
                plgpu.barrier_wait(barrier.at[irem(step - first, stages)])


def produce_keys(k_ref, v_ref, k_smem, v_smem, ready, free, *, batch, head_k, first, end,
                 block_k, stages, key_base=0):
    """The producer of a kernel that walks key blocks ``[first, end)`` (the forward, dQ): each
    block's keys and values by TMA into their slots, ``ready`` and ``free`` each a (keys, values)
    pair of barriers. Key 0 is row ``key_base`` of the arrays."""
    (k_ready, v_ready), (k_free, v_free) = ready, free

    def load(step, slot):
        keys = (batch, pl.ds(key_base + step * block_k, block_k), head_k)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

    produce(first, end, stages, load, (k_free, v_free))


def run_compute_warpgroups(compute, warpgroup, *, copies: bool):
    """``compute(index)`` on each compute warpgroup. ``copies``: one copy of the code per
    warpgroup, its index a constant (written ``warpgroup * 0 + i``, which the compiler folds:
    constant indices do not lower inside ``run_state``), so that the wgmma descriptors of the
    warpgroups' own buffers fold instead of being hoisted out of the step loops into registers
    that spill (ptxas, S 4096, the dK/dV kernel adding dQ: 244 -> 0 bytes at head dim 128);
    else one copy, the index traced."""
    if not copies:
        pl.when(warpgroup < COMPUTE_WARPGROUPS)(functools.partial(compute, warpgroup))
        return
    for index in range(COMPUTE_WARPGROUPS):
        pl.when(warpgroup == index)(functools.partial(compute, warpgroup * 0 + index))


def masked_full_masked(step_body, first, inner_first, inner_end, end, carry):
    """``step_body(step, carry, masked=...)`` over the blocks ``[first, end)``: masked outside
    ``[inner_first, inner_end)`` (clipped into the range), unmasked inside."""
    inner_first = jnp.clip(inner_first, first, end)
    inner_end = jnp.clip(inner_end, inner_first, end)
    masked_step = functools.partial(step_body, masked=True)
    carry = lax.fori_loop(first, inner_first, masked_step, carry)
    carry = lax.fori_loop(inner_first, inner_end, functools.partial(step_body, masked=False),
                          carry)
    return lax.fori_loop(inner_end, end, masked_step, carry)


def named_barrier(operation: str, barrier_id, num_threads: int):
    """``bar.arrive`` (``operation`` "arrive": count this warpgroup in and go on) or ``bar.sync``
    ("sync": count it in and wait until ``num_threads`` threads have) on the hardware barrier
    ``barrier_id`` (an int32 scalar, the same in every thread of the warpgroup): one instruction,
    where meeting at a shared-memory ``plgpu.Barrier`` takes an atomic arrive on it from every
    thread and a try-wait loop reading it. GPU only (interpret mode has no rule for it)."""
    if operation not in ("arrive", "sync"):
        raise ValueError(f"operation must be 'arrive' or 'sync', got {operation!r}")
    if num_threads % WARPGROUP_THREADS:
        raise ValueError(f"num_threads must be whole warpgroups, got {num_threads}")

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT(()),))
    def emit(_, barrier_id):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [barrier_id.registers.item()],
                        f"bar.{operation} $0, {num_threads};", "r", has_side_effects=True)

    emit(jnp.asarray(barrier_id, jnp.int32))


def interpreting() -> bool:
    """Whether the kernels are being traced for JAX's GPU interpret mode (CPU tests), which has
    no rule for ``pl.run_state`` (see ``accumulate``)."""
    return isinstance(jax_config.pallas_tpu_interpret_mode_context_manager.value,
                      plgpu.InterpretGPUParams)


def accumulate(accs, issue):
    """``issue(acc_refs)`` issues wgmmas into accumulators that start at ``accs`` (an array or a
    tuple of them); returns their values once the wgmmas are done. On the GPU one
    ``pl.run_state``; in interpret mode, which has no rules for it nor for storing into an
    accumulator, the wgmmas go into zeroed scoped accumulators and ``accs`` is added after."""
    many = isinstance(accs, tuple)
    accs_tuple = accs if many else (accs,)
    if not interpreting():
        init = tuple(plgpu.ACC.init(acc) for acc in accs_tuple)
        return pl.run_state(issue)(init if many else init[0])

    def scoped(*refs):
        issue(refs if many else refs[0])
        return tuple(ref[...] for ref in refs)

    products = pl.run_scoped(scoped, *[plgpu.ACC(acc.shape, jnp.float32) for acc in accs_tuple])
    sums = tuple(acc + product for acc, product in zip(accs_tuple, products))
    return sums if many else sums[0]


def wgmma_registers(acc_ref, a, b, stage=None):
    """``plgpu.wgmma(acc_ref, a, b)`` with ``a`` in registers. Interpret mode takes A from shared
    memory only: there ``a`` is written to ``stage`` (a buffer of its shape from ``stage_smem``,
    one per warpgroup; its wgmmas run synchronously, so one buffer serves them all) first."""
    if stage is None:
        plgpu.wgmma(acc_ref, a, b)
        return
    stage[...] = a
    plgpu.commit_smem()
    plgpu.wgmma(acc_ref, stage, b)


def stage_smem(shape, dtype, compute_warpgroups=COMPUTE_WARPGROUPS):
    """The compute warpgroups' ``wgmma_registers`` buffers for A operands of ``shape``: in
    interpret mode only (None on a GPU)."""
    return plgpu.SMEM((compute_warpgroups, *shape), dtype) if interpreting() else None


def matmul_transposed(a, b, shape):
    """``a @ b.T`` in float32 (one wgmma) of shared-memory tiles, as a wgmma-layout array."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b.T)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """block_q: query rows per tile (a compute warpgroup's rows in the forward and dQ kernels,
    the streamed query block in the dK/dV kernel), block_k: keys per tile (a compute warpgroup's
    keys in the dK/dV kernel, the streamed key block in the forward and dQ kernels); multiples of
    32, and of 64 (wgmma's M) where a warpgroup owns them (the kernels check); stages: blocks in
    flight through shared memory."""

    block_q: int
    block_k: int
    stages: int

    def __post_init__(self):
        if self.block_q % 32 or self.block_k % 32 or self.block_q <= 0 or self.block_k <= 0:
            raise ValueError(f"block_q and block_k must be positive multiples of 32 (wgmma "
                             f"tiles), got {self.block_q}, {self.block_k}")
        if self.stages < 2:
            raise ValueError(f"stages must be at least 2, got {self.stages}")

    @property
    def rows_per_program(self) -> int:
        """Query rows of a forward or dQ program (one block per compute warpgroup)."""
        return COMPUTE_WARPGROUPS * self.block_q

    @property
    def keys_per_program(self) -> int:
        """Keys of a dK/dV program."""
        return COMPUTE_WARPGROUPS * self.block_k


# Columns of a packed layout's tile table (``varlen.tile_table``), one row per program. The
# rows it names (Q_BASE, K_BASE, TILE_LO) are in units of TABLE_UNIT rows, so that the compiler
# sees the TMA copies' offsets as multiples of the shared memory's tiles.
SEQUENCE, Q_BASE, K_BASE, SEQLEN_Q, SEQLEN_K, TILE_LO = range(6)
TABLE_COLUMNS = 6
TABLE_UNIT = 64


@dataclasses.dataclass(frozen=True)
class Program:
    """Where a program's tile lies. ``batch``: the arrays' batch row; ``sequence``: the ALiBi
    slopes' row; ``q_base``/``k_base``: the array rows of the sequence's query 0 and key 0;
    ``seqlen_q``/``seqlen_k``: its lengths (Python ints for the dense layout, traced for a packed
    one); ``lo``: the score position (query row, or key column for the dK/dV kernel) of the tile's
    first row within the sequence."""

    batch: object
    sequence: object
    q_base: object
    k_base: object
    seqlen_q: object
    seqlen_k: object
    lo: object

    @property
    def span(self):
        """The semantics' bottom-right ``offset`` and ``seqlen_k`` of the sequence."""
        return dict(offset=self.seqlen_k - self.seqlen_q, seqlen_k=self.seqlen_k)

    def mask_span(self, block):
        """``span`` for the masks of tiles of ``block`` keys at multiples of ``block``: where
        every such tile holds keys only (the dense layout with a length that is a multiple of
        ``block``) ``seqlen_k`` is None, and the masks leave out the length test
        (``semantics.key_mask``): a compare and an and per score on a causal diagonal."""
        span = self.span
        if isinstance(self.seqlen_k, int) and self.seqlen_k % block == 0:
            span["seqlen_k"] = None
        return span


def locate(tiles_ref, tile, batch, *, tile_size, seqlen_q, seqlen_k):
    """The ``Program`` of grid tile ``tile`` (of ``tile_size`` rows or keys) in batch row
    ``batch``: in the dense layout (``tiles_ref`` None) the batch row holds one sequence of the
    arrays' lengths; in a packed layout (one batch row of sequences at aligned offsets) the
    tile's row of ``tiles_ref`` (int32, ``TABLE_COLUMNS`` wide) says which sequence and where."""
    if tiles_ref is None:
        return Program(batch, batch, 0, 0, seqlen_q, seqlen_k, tile * tile_size)
    entry = [tiles_ref[tile, column] for column in range(TABLE_COLUMNS)]
    return Program(batch, entry[SEQUENCE], entry[Q_BASE] * TABLE_UNIT,
                   entry[K_BASE] * TABLE_UNIT, entry[SEQLEN_Q], entry[SEQLEN_K],
                   entry[TILE_LO] * TABLE_UNIT)
