"""Can dQ be accumulated with atomics? Pallas's float atomic add, measured where a fused backward
would use it.

A backward with one kernel (FlashAttention-2's design) has each dK/dV program add its share of dQ,
a (block_q, D) float32 tile per query block, to a float32 buffer that all key blocks share. That
would evaluate the dropout keep mask once per backward instead of twice (issue 6). Here each of
the (key block, batch x head) programs of the dK/dV grid only adds a tile per query block, with
``plgpu.atomic_add`` (which Pallas lowers to acquire-release atomics, one per element), and for
comparison stores the tile (the same traffic without atomicity, racy) or computes it only. The
time to compare against: the dQ kernel the atomics would replace (bench_dense.py).

    PYTHONPATH=.:benchmarks python benchmarks/bench_dq_atomics.py [--seqlen 4096] [--head-dim 128]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bench_dense import inputs
from timing import seconds_per_call

BLOCK = 64


def _kernel(q_ref, dq_ref, *, mode, num_blocks):
    key_block = pl.program_id(0)
    tile = q_ref[...].astype(jnp.float32) * (key_block + 1).astype(jnp.float32)

    def body(query_block, total):
        rows = pl.ds(pl.multiple_of(query_block * BLOCK, BLOCK), BLOCK)
        value = tile * (query_block + 1).astype(jnp.float32)
        if mode == "atomic":
            plgpu.atomic_add(dq_ref, (rows, slice(None)), value)
        elif mode == "store":
            dq_ref[rows, :] = value
        return total + value  # the compute-only mode keeps the tiles alive through this

    total = lax.fori_loop(0, num_blocks, body, jnp.zeros_like(tile))
    if mode == "compute":
        dq_ref[pl.ds(0, BLOCK), :] = total


def dq_adds(q, mode):
    """(B H, S, D) float32 from every key block adding a tile to every query block."""
    batch, seqlen, heads, head_dim = q.shape
    q = q.transpose(0, 2, 1, 3).reshape(batch * heads, seqlen, head_dim)
    num_blocks = seqlen // BLOCK
    return pl.pallas_call(
        functools.partial(_kernel, mode=mode, num_blocks=num_blocks),
        grid=(num_blocks, batch * heads),
        in_specs=[pl.BlockSpec((None, BLOCK, head_dim), lambda j, bh: (bh, j, 0))],
        out_specs=pl.BlockSpec((None, seqlen, head_dim), lambda j, bh: (bh, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    )(q)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    q, _, _ = inputs(args.head_dim, args.seqlen)
    batch, seqlen, heads, head_dim = q.shape
    tiles = (seqlen // BLOCK) ** 2 * batch * heads
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: B {batch} H {heads} S {seqlen} "
          f"D {head_dim}, {tiles} tiles of {BLOCK} x {head_dim} float32")
    for mode in ("compute", "store", "atomic"):
        seconds = seconds_per_call(jax.jit(functools.partial(dq_adds, mode=mode)), q)
        rate = tiles * BLOCK * head_dim * 4 / seconds / 1e12
        print(f"{mode}: {seconds * 1e3:.2f} ms ({rate:.2f} TB/s of tile data)", flush=True)


if __name__ == "__main__":
    main()
