"""Timing shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def seconds_per_call(fn, *args, min_time=0.25, repeats=5):
    """Median over ``repeats`` of the mean time of back-to-back calls (dispatch overlaps the GPU)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / repeats or calls >= 1 << 14:
            break
        calls *= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def report(lines, out=None):
    """Prints a benchmark's markdown lines and writes them to ``out`` when given."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
