"""The cost of dropout on the GPU: flash_attn_jax forward + backward with dropout_p 0.1 against
dropout_p 0, at the FlashAttention benchmark shapes (bench_dense.py), in one run.

    PYTHONPATH=.:benchmarks python benchmarks/bench_dropout.py [--phase fwd|fwd_bwd] [--out results.md]
        [--shapes 128:4096:n,64:1024:c,...] [--sweep] [--json results.json]

--sweep also times alternative block configurations with dropout (bench_dense.py's sweeps: the
forward kernel for --phase fwd; the dK/dV and dQ kernels, one at a time, at S = 4096 for fwd_bwd).

Also reports the seconds of the first call with dropout (tracing, compiling the kernels, running).
--json writes the table's numbers (with the device, date, versions and command) to a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
import warnings

import jax

import flash_attn_jax as fa
from bench_dense import SHAPES, flops, inputs, print_sweep, timed, write_json
from timing import report, seconds_per_call

DROPOUT_P = 0.1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("fwd", "fwd_bwd"), default="fwd_bwd")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated head_dim:seqlen:n|c (default: all of bench_dense)")
    args = parser.parse_args()
    shapes = SHAPES if args.shapes is None else [
        (int(d), int(s), c == "c") for d, s, c in (x.split(":") for x in args.shapes.split(","))]
    warnings.simplefilter("ignore", DeprecationWarning)
    key = jax.random.key(0)
    lines = [f"Dropout {DROPOUT_P} vs none, {args.phase}, bf16, {jax.devices()[0].device_kind}, "
             f"jax {jax.__version__}, {datetime.date.today().isoformat()}; TFLOP/s (of the "
             "attention FLOPs) and slowdown", "",
             "| D | S | causal | no dropout | dropout 0.1 | slowdown | first call with dropout (s) |",
             "|---|---|---|---|---|---|---|"]
    slowdowns = []
    rows = []
    for head_dim, seqlen, causal in shapes:
        q, k, v = inputs(head_dim, seqlen)
        rates = []
        for p in (0.0, DROPOUT_P):
            attend = lambda q, k, v, p=p: fa.flash_attn_func(q, k, v, p, causal=causal,
                                                             dropout_key=key)
            fn = timed(attend, args.phase)
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            first_call = time.perf_counter() - start
            seconds = seconds_per_call(fn, q, k, v)
            rates.append(flops(head_dim, seqlen, causal, args.phase) / seconds / 1e12)
        slowdowns.append(rates[0] / rates[1])
        rows.append({"D": head_dim, "S": seqlen, "causal": causal, "no_dropout": rates[0],
                     "dropout": rates[1], "first_call_s": first_call})
        lines.append(f"| {head_dim} | {seqlen} | {'y' if causal else 'n'} | {rates[0]:.0f} | "
                     f"{rates[1]:.0f} | {100 * (slowdowns[-1] - 1):+.1f} % | {first_call:.1f} |")
        print(lines[-1], flush=True)
        if args.sweep:
            print_sweep((head_dim, seqlen, causal), args.phase, q, k, v, dropout_p=DROPOUT_P)
    geomean = math.exp(statistics.fmean(math.log(s) for s in slowdowns))
    lines.append(f"| geomean | | | | | {100 * (geomean - 1):+.1f} % | |")
    report(lines, args.out)
    if args.json:
        write_json(args.json, phase=args.phase, dropout_p=DROPOUT_P, unit="TFLOP/s", rows=rows,
                   geomean_slowdown=geomean)


if __name__ == "__main__":
    main()
