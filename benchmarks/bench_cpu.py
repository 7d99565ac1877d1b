"""Attention on a CPU: the ``xla`` backend against jax.nn.dot_product_attention (XLA) and the
Pallas kernels in interpret mode, in one run.

    PYTHONPATH=.:benchmarks python benchmarks/bench_cpu.py [--out results.md] [--json results.json]

float32, B 1, H 8, D 64, causal and not, S 1024-4096; forward, and forward + backward (jax.vjp of
the call, forward included). Milliseconds per call and the ratio to jax.nn's time. Also the
temporary memory XLA reserves for the compiled forward + backward at S 16k (no run), the time
to compile that forward + backward at S 2048, and one decoding step of flash_attn_with_kvcache
(B 4, one new token, cache of 4096, caches donated) on each of this package's backends. --json
writes the table's numbers (with the machine, date, versions and command) to a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp

import flash_attn_jax as fa
from timing import report, seconds_per_call

SEQLENS = (1024, 2048, 4096)
BATCH, HEADS, HEAD_DIM = 1, 8, 64


def implementations(causal):
    def ours(backend):
        def attend(q, k, v):
            return fa.flash_attn_func(q, k, v, causal=causal)
        attend.backend = backend
        return attend

    def jax_nn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

    return {"jax.nn (xla)": jax_nn, "flash_attn_jax xla": ours("xla"),
            "flash_attn_jax pallas-interpret": ours("pallas-interpret")}


def timed(attend, phase):
    if phase == "fwd":
        return jax.jit(attend)
    return jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](q))


def run(attend, phase, *args):
    backend = getattr(attend, "backend", None)
    if backend is None:
        return seconds_per_call(timed(attend, phase), *args, min_time=1.0, repeats=3)
    with fa.use_backend(backend):  # the choice is part of the jit cache key: call inside it
        return seconds_per_call(timed(attend, phase), *args, min_time=1.0, repeats=3)


def temp_memory(attend, seqlen):
    shape = jax.ShapeDtypeStruct((BATCH, seqlen, HEADS, HEAD_DIM), jnp.float32)
    loss = lambda q, k, v: attend(q, k, v).sum()
    backend = getattr(attend, "backend", None)
    lower = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower
    if backend is None:
        compiled = lower(shape, shape, shape).compile()
    else:
        with fa.use_backend(backend):
            compiled = lower(shape, shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def compile_seconds(attend, seqlen):
    """Seconds to lower and compile the forward + backward (median of 3, caches cleared)."""
    shape = jax.ShapeDtypeStruct((BATCH, seqlen, HEADS, HEAD_DIM), jnp.float32)
    backend = getattr(attend, "backend", None)
    samples = []
    for _ in range(3):
        jax.clear_caches()
        start = time.perf_counter()
        with fa.use_backend(backend):  # None: the automatic choice (unused by jax.nn)
            timed(attend, "fwd_bwd").lower(shape, shape, shape).compile()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[1]


def decode_step_seconds(backend, capacity=4096, batch=4):
    """One jitted decoding step (a token appended to donated caches, attention over them)."""
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(key, (batch, 1, HEADS, HEAD_DIM), jnp.float32) for key in keys)
    caches = [jnp.zeros((batch, capacity, HEADS, HEAD_DIM), jnp.float32) for _ in range(2)]
    lengths = jnp.full((batch,), capacity - 1, jnp.int32)
    with fa.use_backend(backend):
        step = jax.jit(lambda q, kc, vc, k, v, n: fa.flash_attn_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=n), donate_argnums=(1, 2))
        out, k_cache, v_cache = step(q, *caches, k, v, lengths)  # compile
        jax.block_until_ready(out)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            calls = 0
            while time.perf_counter() - start < 0.5:
                out, k_cache, v_cache = step(q, k_cache, v_cache, k, v, lengths)
                calls += 1
            jax.block_until_ready(out)
            samples.append((time.perf_counter() - start) / calls)
    return sorted(samples)[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--skip-interpret", action="store_true")
    args = parser.parse_args()
    names = list(implementations(False))
    if args.skip_interpret:
        names.remove("flash_attn_jax pallas-interpret")
    lines = [f"CPU ({platform.processor() or platform.machine()}, {jax.device_count()} device, "
             f"{jax.devices()[0].device_kind}), jax {jax.__version__}, "
             f"{datetime.date.today().isoformat()}; float32, B {BATCH}, H {HEADS}, D {HEAD_DIM}; "
             "ms per call (ratio to jax.nn)", "",
             "| phase | S | causal | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    rows = []
    for phase in ("fwd", "fwd_bwd"):
        for seqlen in SEQLENS:
            keys = jax.random.split(jax.random.PRNGKey(0), 3)
            q, k, v = (jax.random.normal(key, (BATCH, seqlen, HEADS, HEAD_DIM), jnp.float32)
                       for key in keys)
            for causal in (False, True):
                impls = implementations(causal)
                times = {name: run(impls[name], phase, q, k, v) for name in names}
                base = times["jax.nn (xla)"]
                rows.append({"phase": phase, "S": seqlen, "causal": causal,
                             "ms": {n: times[n] * 1e3 for n in names}})
                cells = [f"{times[n] * 1e3:.1f} ({times[n] / base:.2f})" for n in names]
                lines.append(f"| {phase} | {seqlen} | {'y' if causal else 'n'} | "
                             + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    impls = implementations(True)
    memory = {name: temp_memory(impls[name], 16384) for name in ("jax.nn (xla)",
                                                                 "flash_attn_jax xla")}
    lines += ["", "Temporary memory of the compiled forward + backward, S 16384, causal: "
              + ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in memory.items())]
    compile_names = [n for n in names if n != "jax.nn (xla)"] + ["jax.nn (xla)"]
    compiled = {name: compile_seconds(impls[name], 2048) for name in compile_names}
    lines += ["", "Compile time of the forward + backward, S 2048, causal: "
              + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in compiled.items())]
    decode_backends = ["xla"] + ([] if args.skip_interpret else ["pallas-interpret"])
    decode = {name: decode_step_seconds(name) for name in decode_backends}
    lines += ["", "One decoding step of flash_attn_with_kvcache (B 4, 1 token, cache 4096, H 8, "
              "D 64, float32, donated caches): "
              + ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in decode.items())]
    report(lines, args.out)
    if args.json:
        machine = platform.processor() or platform.machine()
        with open(args.json, "w") as f:
            json.dump({"benchmark": "bench_cpu.py",
                       "device": f"CPU ({machine}, {jax.device_count()} device)",
                       "date": datetime.date.today().isoformat(), "jax": jax.__version__,
                       "command": " ".join(["python"] + sys.argv), "unit": "ms", "rows": rows,
                       "temp_memory_mib": {n: size / 2**20 for n, size in memory.items()},
                       "compile_seconds_fwd_bwd_s2048": compiled,
                       "decode_step_ms": {n: t * 1e3 for n, t in decode.items()}},
                      f, indent=1)


if __name__ == "__main__":
    main()
