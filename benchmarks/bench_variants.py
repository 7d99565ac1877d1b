"""A/B of code variants of the Mosaic GPU kernels, against cuDNN in the same process.

Each variant is the package as it is ("current") or with one change of its code patched in
(VARIANTS: a name and a context manager); every variant's call is compiled ahead of time inside
its patch (``registry.fresh_traces`` and ``jax.clear_caches``, so that no trace of another
variant is reused), then all of them and cuDNN are timed interleaved, ``--rounds`` times, the best
round kept (clock and neighbour noise only slow a call down). Shapes and FLOPs are
bench_dense.py's; the Mosaic backend is chosen for the whole run.

    PYTHONPATH=. python benchmarks/bench_variants.py [--phase fwd|fwd_bwd]
        [--variants length-test,scaled-max,hardware-turns,two-warpgroups,three-warpgroups]
        [--head-dims 64,128,256] [--seqlens 2048,8192] [--dropout 0.1] [--out results.md]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp

import flash_attn_jax as fa
from flash_attn_jax import semantics
from flash_attn_jax.kernels import mosaic_gpu, registry, tuning
from flash_attn_jax.kernels.mosaic_gpu import backward, common

sys.path.insert(0, os.path.dirname(__file__))
from bench_dense import SHAPES, flops, inputs, timed  # noqa: E402
from timing import report, seconds_per_call  # noqa: E402


@contextlib.contextmanager
def _length_test_kept():
    """Masks test the key length on every masked tile (before ``Program.mask_span``)."""
    with mock.patch.object(common.Program, "mask_span", lambda self, block: self.span):
        yield


@contextlib.contextmanager
def _scaled_max():
    """The forward's row max of the scaled scores (before ``semantics.linear_logit_factor``)."""
    with mock.patch.object(semantics, "linear_logit_factor", lambda spec, *, unit=1.0: None):
        yield


@contextlib.contextmanager
def _forward_table_with(head_dims, **changes):
    """``mosaic_gpu.FORWARD_TABLE`` with ``changes`` to the Hopper configs of ``head_dims``, one
    config at every query length (the table's first, changed)."""
    table = mosaic_gpu.FORWARD_TABLE
    entries = {head_dim: table.lookup(head_dim, tuning.HOPPER) for head_dim in mosaic_gpu.HEAD_DIMS}
    for head_dim in head_dims:
        entries[head_dim] = ((0, dataclasses.replace(entries[head_dim][0][1], **changes)),)
    with mock.patch.object(mosaic_gpu, "FORWARD_TABLE", tuning.TuningTable(entries)):
        yield


def _hardware_turns():
    """The forward's ping-pong turns handed over on hardware barriers (``ForwardConfig``'s
    ``hardware_turns``), where the tables' meet at a shared-memory one."""
    return _forward_table_with(mosaic_gpu.HEAD_DIMS, hardware_turns=True)


def _two_warpgroups():
    """Two compute warpgroups taking turns at every length (the table's choice below
    ``mosaic_gpu.LONG_QUERIES``)."""
    return _forward_table_with(mosaic_gpu.HEAD_DIMS)


def _three_warpgroups():
    """The head dim 64 and 128 forwards with three compute warpgroups at every length
    (``ForwardConfig``'s ``compute_warpgroups``; programs of 192 rows, no ping-pong turns; the
    table's choice from ``mosaic_gpu.LONG_QUERIES``); head dim 256 as it is (a 64 x 256 float32
    accumulator is 128 of the 160 registers)."""
    return _forward_table_with((64, 128), compute_warpgroups=3, pingpong=False)


def _keys_64():
    """The head dim 64 forward streaming key blocks of 64 (the table's 128) at every length: a
    causal program's diagonal block half as wasted, its first block in sooner."""
    return _forward_table_with((64,), block_k=64)


def _keys_64_three_stages():
    """As ``keys-64``, with three key and value blocks in flight."""
    return _forward_table_with((64,), block_k=64, stages=3)


def _dropout_dq_by_length():
    """With dropout, dQ added by the dK/dV kernel only from the config's ``fuse_dq_from`` keys
    as without (``BackwardConfig.fuses_dq`` before it took ``dropout``; head dim 128: from 4096),
    a dQ kernel below."""
    fuses_dq = backward.BackwardConfig.fuses_dq
    return mock.patch.object(backward.BackwardConfig, "fuses_dq",
                             lambda self, head_dim, seqlen_k, *, dropout=False:
                             fuses_dq(self, head_dim, seqlen_k))


VARIANTS = {"length-test": _length_test_kept, "scaled-max": _scaled_max,
            "hardware-turns": _hardware_turns, "two-warpgroups": _two_warpgroups,
            "three-warpgroups": _three_warpgroups, "keys-64": _keys_64,
            "keys-64-three-stages": _keys_64_three_stages,
            "dropout-dq-by-length": _dropout_dq_by_length}


def compiled(phase, causal, q, k, v, patch, dropout_p=0.0):
    """The Mosaic backend's call compiled under ``patch``."""
    attend = timed(lambda q, k, v: fa.flash_attn_func(
        q, k, v, dropout_p, causal=causal, dropout_key=jax.random.key(0)), phase)
    jax.clear_caches()
    with patch(), fa.use_backend("mosaic-gpu"), registry.fresh_traces():
        return attend.lower(q, k, v).compile()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("fwd", "fwd_bwd"), default="fwd")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--seqlens", default=None,
                        help="comma-separated lengths instead of bench_dense.py's (same widths)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="the variants' dropout_p (cuDNN's column has none)")
    parser.add_argument("--out")
    args = parser.parse_args()
    names = [name for name in args.variants.split(",") if name]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    head_dims = {int(d) for d in args.head_dims.split(",")}
    columns = ["current", *names, "cudnn"]
    lines = [f"# Variants of the Mosaic GPU kernels, {args.phase}, dropout_p {args.dropout}, "
             f"TFLOP/s (best of {args.rounds})",
             "", f"{jax.devices()[0].device_kind}, jax {jax.__version__}, "
             f"{datetime.date.today().isoformat()}: `{' '.join(sys.argv)}`", "",
             "| head dim | seqlen | causal | " + " | ".join(columns)
             + " | current / cudnn | " + " | ".join(f"current / {n}" for n in names) + " |",
             "|---" * (3 + len(columns) + 1 + len(names)) + "|"]
    ratios = {column: [] for column in ["cudnn", *names]}
    gaps = dict.fromkeys(names, 0.0)
    shapes = SHAPES
    if args.seqlens:
        shapes = [(d, int(s), causal) for d in sorted({d for d, _, _ in SHAPES}, reverse=True)
                  for s in args.seqlens.split(",") for causal in (False, True)]
    for shape in [s for s in shapes if s[0] in head_dims]:
        head_dim, seqlen, causal = shape
        q, k, v = inputs(head_dim, seqlen)
        fns = {"current": compiled(args.phase, causal, q, k, v, contextlib.nullcontext,
                                   args.dropout)}
        for name in names:
            fns[name] = compiled(args.phase, causal, q, k, v, VARIANTS[name], args.dropout)
        fns["cudnn"] = timed(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"), args.phase)
        # A variant changes speed, not results: its outputs against the current code's.
        results = {column: jax.tree.leaves(fns[column](q, k, v)) for column in ["current", *names]}
        for name in names:
            gap = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                      for a, b in zip(results[name], results["current"]))
            gaps[name] = max(gaps[name], gap)
        best = dict.fromkeys(columns, math.inf)
        for _ in range(args.rounds):
            for column in columns:
                best[column] = min(best[column], seconds_per_call(fns[column], q, k, v))
        rates = {column: flops(*shape, args.phase) / best[column] / 1e12 for column in columns}
        for column in ratios:
            ratios[column].append(rates["current"] / rates[column])
        lines.append(f"| {head_dim} | {seqlen} | {causal} | "
                     + " | ".join(f"{rates[c]:.0f}" for c in columns) + " | "
                     + " | ".join(f"{ratios[c][-1]:.3f}" for c in ratios) + " |")
        print(lines[-1], flush=True)
    geomean = {c: math.exp(sum(map(math.log, r)) / len(r)) for c, r in ratios.items()}
    lines += ["", "Geometric means: " + ", ".join(
        f"current / {c} {g:.3f} (min {min(ratios[c]):.3f})" for c, g in geomean.items()),
              "", "Largest difference from the current code's results: " + ", ".join(
        f"{name} {gap:.3g}" for name, gap in gaps.items())]
    report(lines, args.out)


if __name__ == "__main__":
    main()
