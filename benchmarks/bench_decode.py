"""Decode speed on the GPU: flash_attn_with_kvcache against its peers, in one run.

Shapes: one query token, 32 query heads, 8 kv heads, head dim
128, bf16, batch 8 or 64, cache length 4k or 32k (the whole cache in use). Effective bandwidth =
bytes of K and V read / time. Peers: JAX's bundled Pallas Triton kernels
(decode_attention.gqa, paged_attention.paged_attention with pages of 64) and an XLA einsum.

Then the in-place check: a jitted decode step (append one token + attend, caches donated) with
4k positions in use, in a cache of capacity 4k and of 64k: the same time means no cache copy.

    PYTHONPATH=. python benchmarks/bench_decode.py [--sweep] [--out results.md] [--json results.json]

--json writes the table's numbers (with the device, date, versions and command) to a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import flash_attn_jax as fa
from flash_attn_jax.kernels.triton import decode as triton_decode
from flash_attn_jax.kernels.triton.config import DecodeConfig
from flash_attn_jax.semantics import ScoreSpec
from timing import report, seconds_per_call

SHAPES = [(8, 4096), (64, 4096), (8, 32768), (64, 32768)]
NUM_HEADS, NUM_HEADS_K, HEAD_DIM = 32, 8, 128
SCALE = HEAD_DIM ** -0.5


def make_inputs(batch, length, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (batch, 1, NUM_HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, length, NUM_HEADS_K, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, length, NUM_HEADS_K, HEAD_DIM), jnp.bfloat16)
    return q, k, v


def paged(k, v, page_size, seed=1):
    """The caches cut into pages stored in a random order, and the block table."""
    batch, length = k.shape[:2]
    pages_per_row = length // page_size
    order = np.random.default_rng(seed).permutation(batch * pages_per_row)
    table = jnp.asarray(order.reshape(batch, pages_per_row).astype(np.int32))
    inverse = jnp.asarray(np.argsort(order))

    def pages(x):  # logical page l = b * pages_per_row + j is stored at order[l]
        return x.reshape(batch * pages_per_row, page_size, NUM_HEADS_K, HEAD_DIM)[inverse]
    return pages(k), pages(v), table


def implementations(batch, length):
    """{name: (fn, args)}: each attends one query over the full cache."""
    q, k, v = make_inputs(batch, length)
    lengths = jnp.full((batch,), length, jnp.int32)
    impls = {"flash_attn_jax": (jax.jit(lambda q, k, v, n: fa.flash_attn_with_kvcache(
        q, k, v, cache_seqlens=n)), (q, k, v, lengths))}
    for page_size in (64, 256):
        k_pages, v_pages, table = paged(k, v, page_size)
        impls[f"flash_attn_jax paged {page_size}"] = (jax.jit(
            lambda q, k, v, n, t: fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=n, block_table=t)),
            (q, k_pages, v_pages, lengths, table))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention, paged_attention
    impls["jax pallas gqa"] = (jax.jit(lambda q, k, v, n: decode_attention.gqa(
        q[:, 0], k, v, kv_seq_len=n, sm_scale=SCALE)), (q, k, v, lengths))
    k_pages, v_pages, table = paged(k, v, 64)
    head_major = lambda x: jnp.transpose(x, (2, 0, 1, 3))  # (Hk, pages, page, D), its layout
    impls["jax pallas paged 64"] = (jax.jit(lambda q, k, v, t, n: paged_attention.paged_attention(
        q[:, 0] * SCALE, k, v, t, n)), (q, head_major(k_pages), head_major(v_pages), table, lengths))

    def xla(q, k, v):
        qg = q[:, 0].reshape(batch, NUM_HEADS_K, NUM_HEADS // NUM_HEADS_K, HEAD_DIM)
        s = jnp.einsum("bhgd,bkhd->bhgk", qg, k, preferred_element_type=jnp.float32) * SCALE
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bhgk,bkhd->bhgd", p, v)
    impls["xla einsum"] = (jax.jit(xla), (q, k, v))
    return impls


def check_agreement(impls):
    """Every implementation's output against flash_attn_jax's, so a fast wrong one cannot hide."""
    fn, args = impls["flash_attn_jax"]
    expected = np.asarray(fn(*args), np.float32).reshape(-1, HEAD_DIM)
    for name, (fn, args) in impls.items():
        try:
            got = np.asarray(fn(*args), np.float32).reshape(-1, HEAD_DIM)
        except Exception:  # reported in the table
            continue
        error = float(np.abs(got - expected).max())
        if error > 2e-2:
            print(f"WARNING: {name} differs from flash_attn_jax by {error:.3g}")


def sweep(batch, length):
    q, k, v = make_inputs(batch, length)
    lengths = jnp.full((batch,), length, jnp.int32)
    spec = ScoreSpec(softmax_scale=SCALE)
    for block_k in (64, 128, 256):
        for num_warps in (4, 8):
            for num_stages in (2, 3, 4):
                config = DecodeConfig(4, 4, block_k, num_warps, num_stages)
                for splits in sorted({1, 2, 4}):
                    fn = jax.jit(lambda q, k, v, n, config=config, splits=splits: triton_decode.attention(
                        q, k, v, n, None, None, None, None, spec, config, splits, interpret=False)[0])
                    try:
                        rate = bandwidth(batch, length, seconds_per_call(fn, q, k, v, lengths))
                        print(f"    sweep B={batch} L={length} {config} splits={splits}: {rate:.2f} TB/s",
                              flush=True)
                    except Exception as error:
                        print(f"    sweep B={batch} L={length} {config} splits={splits}: "
                              f"failed {type(error).__name__}", flush=True)


def bandwidth(batch, length, seconds):
    return 2 * batch * length * NUM_HEADS_K * HEAD_DIM * 2 / seconds / 1e12


def capacity_check(batch=8, used=4096):
    """Decode step time (append + attend, donated caches) against the cache's capacity."""
    rows = []
    for capacity in (used, 16 * used):
        q, k_new, v_new = make_inputs(batch, 1, seed=2)
        k_cache = jnp.zeros((batch, capacity, NUM_HEADS_K, HEAD_DIM), jnp.bfloat16)
        v_cache = jnp.zeros((batch, capacity, NUM_HEADS_K, HEAD_DIM), jnp.bfloat16)
        step = jax.jit(functools.partial(fa.flash_attn_with_kvcache), donate_argnums=(1, 2))
        lengths = jnp.full((batch,), used - 1, jnp.int32)
        state = [k_cache, v_cache]

        def run():
            out, state[0], state[1] = step(q, state[0], state[1], k_new, v_new, cache_seqlens=lengths)
            return out
        for _ in range(3):
            jax.block_until_ready(run())
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(50):
                out = run()
            jax.block_until_ready(out)
            samples.append((time.perf_counter() - start) / 50)
        rows.append((capacity, statistics.median(samples)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    device = jax.devices()[0].device_kind
    lines = [f"Decode, bf16, 1 query x {NUM_HEADS} heads, {NUM_HEADS_K} kv heads, d {HEAD_DIM}, "
             f"{device}, jax {jax.__version__}, {datetime.date.today().isoformat()}; TB/s of K+V read",
             ""]
    header = None
    rows = []
    for batch, length in SHAPES:
        impls = implementations(batch, length)
        check_agreement(impls)
        if header is None:
            header = list(impls)
            lines += ["| B | cache | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
        cells = []
        rows.append({"B": batch, "cache": length, "tb_per_s": {}, "errors": {}})
        for name in header:
            fn, fn_args = impls[name]
            try:
                rows[-1]["tb_per_s"][name] = bandwidth(batch, length, seconds_per_call(fn, *fn_args))
                cells.append(f"{rows[-1]['tb_per_s'][name]:.2f}")
            except Exception as error:  # e.g. a peer out of shared memory
                cells.append(f"fails ({type(error).__name__})")
                rows[-1]["errors"][name] = cells[-1]
        lines.append(f"| {batch} | {length} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        if args.sweep and length == 32768:
            sweep(batch, length)
    lines += ["", "Decode step (append 1 token + attend, caches donated), batch 8, 4096 positions in use:",
              "", "| capacity | ms per step |", "|---|---|"]
    steps = capacity_check()
    for capacity, seconds in steps:
        lines.append(f"| {capacity} | {seconds * 1e3:.3f} |")
    report(lines, args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "bench_decode.py", "device": device,
                       "date": datetime.date.today().isoformat(), "jax": jax.__version__,
                       "command": " ".join(["python"] + sys.argv), "unit": "TB/s", "rows": rows,
                       "decode_step_ms": {str(c): s * 1e3 for c, s in steps}}, f, indent=1)


if __name__ == "__main__":
    main()
