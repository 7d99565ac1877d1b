"""Runs every kernel over the edge cases that stress bounds, for a memory checker on the GPU.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/edge_cases.py

Ragged edges (lengths and head dims that are no multiple of the blocks), rows with no key in
their mask, varlen padding before and after the sequences, truncation to max_seqlen and
non-monotone traced cu_seqlens, paged caches with missing and repeated pages, negative and
oversized cache_seqlens, split-KV decoding, zero sizes; forward and backward. Each result is
checked for NaN, so an unwritten output also shows without the checker.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import flash_attn_jax as fa


def normal(rng, *shape, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def check(name, *results):
    for x in jax.tree.leaves(results):
        x = np.asarray(x, np.float32)
        if np.isnan(x).any():
            sys.exit(f"{name}: NaN in an output")
    print(f"{name}: ok", flush=True)


def dense(rng):
    for dtype in (jnp.bfloat16, jnp.float32):
        q = normal(rng, 2, 97, 4, 72, dtype=dtype)
        k, v = normal(rng, 2, 113, 2, 72, dtype=dtype), normal(rng, 2, 113, 2, 72, dtype=dtype)
        for options in (dict(causal=True), dict(window_size=(3, 0)),
                        dict(window_size=(0, 0), softcap=5.0, dropout_p=0.3,
                             dropout_key=jax.random.key(0)),
                        dict(alibi_slopes=jnp.full((4,), 0.3, jnp.float32), causal=True)):
            def loss(q, k, v):
                out, lse, probs = fa.flash_attn_func(q, k, v, return_attn_probs=True, **options)
                return (out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0).sum()
                        + probs.sum())
            check(f"dense {jnp.dtype(dtype).name} {sorted(options)}",
                  jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v))


def varlen(rng):
    q, k, v = normal(rng, 130, 4, 40), normal(rng, 150, 2, 40), normal(rng, 150, 2, 40)

    @jax.jit
    def run(q, k, v, cu_q, cu_k):
        def loss(q, k, v):
            out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 48, 40, causal=True,
                                                        return_attn_probs=True)
            return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0).sum()
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    for cu_q, cu_k in (([0, 17, 17, 90, 121], [0, 30, 61, 61, 140]),  # padding after
                       ([5, 40, 20, 100, 128], [7, 50, 60, 140, 160]),  # before, decreasing
                       ([0, 100, 110, 120, 130], [0, 80, 100, 140, 150])):  # past max_seqlen
        check(f"varlen {cu_q}", run(q, k, v, jnp.array(cu_q, jnp.int32),
                                    jnp.array(cu_k, jnp.int32)))
    pages = normal(rng, 9, 16, 2, 40)
    table = jnp.array([[0, 3, 8], [1, 2, -4], [5, 5, 7], [6, 4, 100]], jnp.int32)
    out = jax.jit(lambda q, p, t, cu_q, cu_k: fa.flash_attn_varlen_func(
        q, p, p, cu_q, cu_k, 48, 48, block_table=t, causal=True))(
        q, pages, table, jnp.array([0, 17, 17, 90, 121], jnp.int32),
        jnp.array([0, 30, 61, 61, 140], jnp.int32))
    check("varlen paged", out)


def kvcache(rng):
    q, new = normal(rng, 4, 3, 8, 64), normal(rng, 4, 3, 2, 64)
    step = jax.jit(lambda q, kc, vc, k, v, **i: fa.flash_attn_with_kvcache(
        q, kc, vc, k, v, causal=True, return_softmax_lse=True, **i),
        static_argnames=("num_splits",))
    contiguous = normal(rng, 5, 100, 2, 64)
    for indices in (dict(cache_seqlens=jnp.array([-2, 50, 98, 2**31 - 10], jnp.int32)),
                    dict(cache_seqlens=jnp.array([3, 3, 97, 0], jnp.int32),
                         cache_batch_idx=jnp.array([1, 1, 9, -3], jnp.int32)),
                    dict(cache_seqlens=jnp.array([10, 0, 40, 99], jnp.int32),
                         cache_leftpad=jnp.array([-5, 0, 60, 200], jnp.int32), num_splits=7)):
        rows = 5 if "cache_batch_idx" in indices else 4
        check(f"cache {sorted(indices)}", step(q, contiguous[:rows], contiguous[:rows], new, new,
                                              **indices))
    pool = normal(rng, 12, 16, 2, 64)
    table = jnp.array([[0, 1, 2, 3], [3, 4, -1, 40], [5, 5, 6, 7], [8, 9, 10, 11]], jnp.int32)
    for seqlens in ([0, 14, 31, 63], [-1, 62, 20, 64]):
        check(f"cache paged {seqlens}", step(q, pool, pool, new, new,
                                             cache_seqlens=jnp.array(seqlens, jnp.int32),
                                             block_table=table, num_splits=3))
    check("cache zero capacity", fa.flash_attn_with_kvcache(q, contiguous[:4, :0],
                                                            contiguous[:4, :0]))


def main():
    rng = np.random.default_rng(0)
    dense(rng)
    varlen(rng)
    kvcache(rng)
    print("all edge cases ran")


if __name__ == "__main__":
    main()
