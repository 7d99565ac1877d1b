"""Block sizes and launch parameters of the kernels.

The Triton lowering needs every tensor to have a power-of-two size and every dot dimension to be at
least 16 (smaller dots lower but compute garbage on the GPU), so the head dim is padded to a power
of two >= 16 inside the kernels and every block is a power of two >= 16. Short sequences shrink the
blocks (down to 16) so that a single query does not pay for a 128-row tile.

``all_forward_configs`` and ``all_backward_configs`` list every configuration the selectors can
return; the lowering test compiles each of them for an H100.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from flash_attn_jax.kernels.tuning import HOPPER, TuningTable

MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if size < MIN_BLOCK or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {size}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    """The power of two >= 16 the kernels compute with; the padding is masked, never read."""
    return max(MIN_BLOCK, next_power_of_2(head_dim))


PADDED_HEAD_DIMS = (16, 32, 64, 128, 256)

# (itemsize, padded head dim) -> the largest blocks. float32 tiles take twice the registers and
# shared memory of 16-bit ones, hence smaller blocks. The 16-bit d64/d128 entries are the best of a
# sweep on an H100 (benchmarks/bench_dense.py --sweep, benchmarks/RESULTS.md). Hopper entries need
# its 227 KiB of shared memory per block: 16-bit d256 (128, 64, 8, 2) holds a 64 KiB query tile
# and two stages of 32 KiB key and value tiles, 1.9-2.1x the default's speed on an H200.
_FORWARD_DEFAULTS = {
    (2, 16): BlockConfig(128, 64, 4, 3),
    (2, 32): BlockConfig(128, 64, 4, 3),
    (2, 64): BlockConfig(128, 64, 8, 3),
    (2, 128): BlockConfig(128, 128, 8, 3),
    (2, 256): BlockConfig(64, 64, 8, 2),
    (4, 16): BlockConfig(64, 64, 4, 2),
    (4, 32): BlockConfig(64, 64, 4, 2),
    (4, 64): BlockConfig(64, 32, 4, 2),
    (4, 128): BlockConfig(64, 32, 8, 2),
    (4, 256): BlockConfig(32, 32, 8, 2),
}
_FORWARD_TABLE = TuningTable(_FORWARD_DEFAULTS, {HOPPER: {(2, 256): BlockConfig(128, 64, 8, 2)}})


# The backward runs two kernels: dK/dV (a program per key block, looping over query blocks) and dQ
# (a program per query block, looping over key blocks). Each holds two (block, head_dim) float32
# accumulators or one plus the query tile, so blocks are smaller than the forward's. 16-bit d64 and
# d128: the best of an H100 sweep (4 warps beat 8 on 64-row tiles by ~30 %; RESULTS.md). Hopper
# d256: the best pair of an H200 sweep (1.6x the defaults' forward + backward; 192 KiB of shared
# memory each).
_DKDV_TABLE = TuningTable({
    (2, 16): BlockConfig(64, 64, 4, 2),
    (2, 32): BlockConfig(64, 64, 4, 2),
    (2, 64): BlockConfig(64, 64, 4, 2),
    (2, 128): BlockConfig(64, 64, 4, 2),
    (2, 256): BlockConfig(32, 64, 8, 1),
    (4, 16): BlockConfig(32, 64, 4, 2),
    (4, 32): BlockConfig(32, 64, 4, 2),
    (4, 64): BlockConfig(32, 64, 4, 2),
    (4, 128): BlockConfig(32, 32, 8, 1),
    (4, 256): BlockConfig(16, 32, 8, 1),
}, {HOPPER: {(2, 256): BlockConfig(64, 64, 8, 2)}})
_DQ_TABLE = TuningTable({
    (2, 16): BlockConfig(64, 64, 4, 2),
    (2, 32): BlockConfig(64, 64, 4, 2),
    (2, 64): BlockConfig(64, 64, 4, 2),
    (2, 128): BlockConfig(64, 64, 4, 2),
    (2, 256): BlockConfig(64, 32, 8, 1),
    (4, 16): BlockConfig(64, 32, 4, 2),
    (4, 32): BlockConfig(64, 32, 4, 2),
    (4, 64): BlockConfig(64, 32, 4, 2),
    (4, 128): BlockConfig(32, 32, 8, 1),
    (4, 256): BlockConfig(32, 16, 8, 1),
}, {HOPPER: {(2, 256): BlockConfig(64, 64, 4, 2)}})
# The delta = rowsum(dO * O) preprocessing: memory bound, one block of rows per program.
DELTA_BLOCK = 64


def _shrink(block: int, seqlen: int) -> int:
    return min(block, max(MIN_BLOCK, next_power_of_2(seqlen)))


def _shrunk(table, dtype, head_dim_p, seqlen_q, seqlen_k):
    base = table.lookup((jnp.dtype(dtype).itemsize, head_dim_p))
    return dataclasses.replace(base, block_q=_shrink(base.block_q, seqlen_q),
                               block_k=_shrink(base.block_k, seqlen_k))


# With dropout the 16-bit d64 forward is bound by the keep mask's integer work, and one warp group
# per program (more programs per SM) hides more of it: 260 and 199 TFLOP/s against 239 and 162
# with the table's blocks (H200 sweep, S 4096 and causal S 1024; benchmarks/RESULTS.md).
_FORWARD_DROPOUT_TABLE = TuningTable({**_FORWARD_DEFAULTS, (2, 64): BlockConfig(64, 64, 4, 3)},
                                     _FORWARD_TABLE.by_generation)


def forward_config(dtype, head_dim_p: int, seqlen_q: int, seqlen_k: int, *,
                   dropout: bool = False) -> BlockConfig:
    table = _FORWARD_DROPOUT_TABLE if dropout else _FORWARD_TABLE
    return _shrunk(table, dtype, head_dim_p, seqlen_q, seqlen_k)


def backward_configs(dtype, head_dim_p: int, seqlen_q: int, seqlen_k: int):
    """(dK/dV config, dQ config)."""
    return (_shrunk(_DKDV_TABLE, dtype, head_dim_p, seqlen_q, seqlen_k),
            _shrunk(_DQ_TABLE, dtype, head_dim_p, seqlen_q, seqlen_k))


def _block_sizes(largest: int):
    size = MIN_BLOCK
    while size <= largest:
        yield size
        size *= 2


def _all_configs(table):
    for dtype in (jnp.float16, jnp.bfloat16, jnp.float32):
        for head_dim_p in PADDED_HEAD_DIMS:
            seen = set()
            for base in table.values((jnp.dtype(dtype).itemsize, head_dim_p)):  # each generation's
                for block_q in _block_sizes(base.block_q):
                    for block_k in _block_sizes(base.block_k):
                        config = dataclasses.replace(base, block_q=block_q, block_k=block_k)
                        if config not in seen:
                            seen.add(config)
                            yield dtype, head_dim_p, config


def all_forward_configs():
    """Yields (dtype, padded head dim, config) for every block shape forward_config can pick,
    with dropout or without."""
    seen = set()
    for table in (_FORWARD_TABLE, _FORWARD_DROPOUT_TABLE):
        for dtype, head_dim_p, config in _all_configs(table):
            if (jnp.dtype(dtype), head_dim_p, config) not in seen:
                seen.add((jnp.dtype(dtype), head_dim_p, config))
                yield dtype, head_dim_p, config


def all_backward_configs():
    """Yields (kernel, dtype, padded head dim, config), kernel "dkdv" or "dq", for every
    configuration backward_configs can pick."""
    for name, table in (("dkdv", _DKDV_TABLE), ("dq", _DQ_TABLE)):
        for dtype, head_dim_p, config in _all_configs(table):
            yield name, dtype, head_dim_p, config


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiles of the KV-cache attention kernel.

    A program handles ``block_i`` query positions times ``group_p`` query heads (the query heads of
    one kv head, padded to a power of two), so the cache is read once for all of them; its
    ``block_i * group_p`` rows form the matmul's M side, at least 16.
    """

    block_i: int
    group_p: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_i", "group_p", "block_k"):
            size = getattr(self, name)
            if size < 1 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two, got {size}")
        if self.rows < MIN_BLOCK or self.block_k < MIN_BLOCK:
            raise ValueError(f"block_i * group_p and block_k must be >= {MIN_BLOCK}, got "
                             f"{self.rows} and {self.block_k}")

    @property
    def rows(self):
        return self.block_i * self.group_p


# (itemsize, padded head dim) -> (block_k, num_warps, num_stages); block_k shrinks to the page size.
_DECODE_TABLE = {
    (2, 16): (128, 4, 3), (2, 32): (128, 4, 3), (2, 64): (128, 4, 3), (2, 128): (128, 4, 3),
    (2, 256): (64, 4, 3),
    (4, 16): (64, 4, 2), (4, 32): (64, 4, 2), (4, 64): (64, 4, 2), (4, 128): (64, 4, 2),
    (4, 256): (32, 8, 2),
}
_DECODE_ROWS = (16, 64)  # rows per program: decode pads up to 16, chunked prefill takes up to 64


def decode_config(dtype, head_dim_p: int, seqlen_q: int, group: int, capacity: int,
                  page_size: int | None) -> DecodeConfig:
    """``page_size`` None for a contiguous cache; a paged cache's blocks stay within a page."""
    block_k, num_warps, num_stages = _DECODE_TABLE[(jnp.dtype(dtype).itemsize, head_dim_p)]
    block_k = _shrink(block_k, capacity) if page_size is None else min(block_k, page_size)
    group_p = next_power_of_2(group)
    lo, hi = (max(1, rows // group_p) for rows in _DECODE_ROWS)
    block_i = min(max(next_power_of_2(seqlen_q), lo), hi)
    return DecodeConfig(block_i, group_p, block_k, num_warps, num_stages)


def num_splits_heuristic(programs: int, key_blocks: int, num_sms: int) -> int:
    """Splits of the key range so that ``programs`` (batch x kv heads x row blocks) fill the GPU.

    None when they already make most of a wave. Otherwise, as flash-attn does, the smallest count
    whose wave efficiency (work / whole waves launched) is within 85 % of the best, among counts
    that change the number of key blocks per split, at most 128.
    """
    if programs >= 0.8 * num_sms:
        return 1
    candidates = [1]
    for splits in range(2, min(num_sms, key_blocks, 128) + 1):
        if -(-key_blocks // splits) != -(-key_blocks // candidates[-1]):
            candidates.append(splits)

    def efficiency(splits):
        waves = programs * splits / num_sms
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in candidates)
    return next(s for s in candidates if efficiency(s) >= 0.85 * best)


COMBINE_ROWS = 64  # rows of the split-combine kernel's tile


def all_decode_configs():
    """Yields (dtype, padded head dim, config) covering what decode_config can pick: every block_k
    (each page size) at decode's row shape, and every row shape at the largest block_k."""
    for dtype in (jnp.float16, jnp.bfloat16, jnp.float32):
        for head_dim_p in PADDED_HEAD_DIMS:
            block_k, num_warps, num_stages = _DECODE_TABLE[(jnp.dtype(dtype).itemsize, head_dim_p)]
            for size in _block_sizes(block_k):
                yield dtype, head_dim_p, DecodeConfig(4, 4, size, num_warps, num_stages)
            for group_p in (1, 2, 4, 8, 16, 32, 64):
                for rows in _DECODE_ROWS:
                    block_i = max(1, rows // group_p)
                    if block_i * group_p >= MIN_BLOCK:
                        yield dtype, head_dim_p, DecodeConfig(block_i, group_p, block_k, num_warps,
                                                              num_stages)
