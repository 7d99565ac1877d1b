"""One forward call of flash_attn_jax (a backend chosen) and one of cuDNN, for Nsight Compute.

The shape is bench_dense.py's (batch x seqlen = 16384 tokens, nheads x head dim = 2048, bf16).
Both calls are compiled ahead of time and the inputs come from numpy, so that under ncu the only
kernels launched are the two attentions' (and whatever cuDNN's call adds around its kernel):

    ncu --clock-control none --set full -o fwd python benchmarks/profile_forward.py \
        --head-dim 64 --seqlen 1024 --causal [--variant hardware-turns]
    ncu -i fwd.ncu-rep --page details --csv > fwd.csv
    ncu -i fwd.ncu-rep --page raw --csv > fwd.raw.csv
    python benchmarks/profile_forward.py --summarize fwd.csv --stalls fwd.raw.csv

--summarize prints, per kernel, the figures RESULTS.md's profile tables quote, and with --stalls
where its warps wait (Nsight Compute's stall reasons). --source does it instruction by instruction
for one kernel, from the report's SASS page:

    ncu -i fwd.ncu-rep --page source --csv --print-source sass \
        --kernel-name entry_mosaic_gpu_kernel > fwd.sass.csv
    python benchmarks/profile_forward.py --source fwd.sass.csv
"""

from __future__ import annotations

import argparse
import csv
import re
import sys

# Nsight Compute's metric names (the "details" page; first section that has them) -> column.
SUMMARY_METRICS = {
    "Duration": "time",
    "Registers Per Thread": "registers",
    "Compute (SM) Throughput": "SM throughput",
    "Executed Ipc Active": "IPC",
    "Warp Cycles Per Issued Instruction": "warp cycles per instruction",
    "Executed Instructions": "instructions",
    "Achieved Occupancy": "occupancy",
}
# The raw page's stall reasons, each in warp cycles per issued instruction (they sum to the
# "warp cycles per instruction" above).
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"


def _rows(path):
    with open(path, newline="") as handle:
        lines = [line for line in handle if line.startswith('"')]  # skip the program's output
    return list(csv.reader(lines))


def summarize(details_path, raw_path=None, min_stall=0.1):
    """Prints a Markdown table of SUMMARY_METRICS per profiled kernel from ncu's details CSV,
    and, given the raw CSV, one of the stall reasons above ``min_stall`` cycles."""
    header, *rows = _rows(details_path)
    column = {name: header.index(name) for name in header}
    kernels = {}
    for row in rows:
        key = (row[column["ID"]], row[column["Kernel Name"]][:60], row[column["Grid Size"]],
               row[column["Block Size"]])
        name = SUMMARY_METRICS.get(row[column["Metric Name"]])
        unit = row[column["Metric Unit"]]
        values = kernels.setdefault(key, {})
        if name and name not in values:
            values[name] = f"{row[column['Metric Value']]} {unit}".strip()
    names = list(SUMMARY_METRICS.values())
    print("| kernel | grid x threads | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for (_, kernel, grid, block), values in kernels.items():
        print(f"| {kernel} | {grid} x {block} | " + " | ".join(values.get(n, "") for n in names)
              + " |")
    if raw_path is None:
        return
    header, _units, *rows = _rows(raw_path)
    kernel_column = header.index("Kernel Name")
    stalls = {header[i][len(STALL_PREFIX):-len(STALL_SUFFIX)]: i for i in range(len(header))
              if header[i].startswith(STALL_PREFIX) and header[i].endswith(STALL_SUFFIX)}

    def cycles(row, i):
        return float(row[i].replace(",", "") or 0)

    shown = [reason for reason, i in stalls.items()
             if max(cycles(row, i) for row in rows) >= min_stall]
    shown.sort(key=lambda reason: -max(cycles(row, stalls[reason]) for row in rows))
    print("\n| kernel (stall cycles per issued instruction) | " + " | ".join(shown) + " |")
    print("|---|" + "---|" * len(shown))
    for row in rows:
        if max(cycles(row, stalls[reason]) for reason in shown) >= min_stall:
            print(f"| {row[kernel_column][:60]} | "
                  + " | ".join(f"{cycles(row, stalls[reason]):.2f}" for reason in shown) + " |")


def _sass_category(source, stalls):
    """Which kind of waiting (or working) an instruction's warp samples are."""
    if "DEPBAR" in source:
        return "wgmma waits (WARPGROUP.DEPBAR)"
    if re.search(r"\bBAR\.(SYNC|ARV|RED)", source):
        return "named barriers (BAR)"
    if "HGMMA" in source:
        return "wgmma issue (HGMMA)"
    # A try-wait loop on a shared-memory barrier spins on a branch stalled on the long scoreboard.
    if "BRA" in source and stalls.get("stall_long_sb", 0) > 0.8 * sum(stalls.values()):
        return "mbarrier waits (try-wait loops)"
    return "other instructions"


def summarize_source(path):
    """Shares of warp-state samples by instruction kind, from ncu's source page of one kernel
    (``--page source --csv --print-source sass``); the mbarrier waits also one by one with their
    executions (a loop run by one warp a step is the producer's, by every consumer warp a
    consumer's)."""
    rows = _rows(path)
    header = next(row for row in rows if "Source" in row)
    column = {name: header.index(name) for name in header}
    samples_column = column["Warp Stall Sampling (All Samples)"]
    stall_columns = {name: i for name, i in column.items()
                     if name.startswith("stall_") and "Not Issued" not in name}
    shares, waits, total = {}, [], 0

    def count(text):
        return int(text.replace(",", "")) if text.replace(",", "").isdigit() else 0

    for row in rows[rows.index(header) + 1:]:
        if len(row) < len(header):
            continue
        samples = count(row[samples_column])
        total += samples
        stalls = {name: count(row[i]) for name, i in stall_columns.items()}
        category = _sass_category(row[column["Source"]], stalls)
        shares[category] = shares.get(category, 0) + samples
        if category.startswith("mbarrier"):
            waits.append((samples, count(row[column["Instructions Executed"]])))
    print("| instructions | share of warp samples |\n|---|---|")
    for category, samples in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"| {category} | {100 * samples / total:.1f} % |")
    for samples, executed in sorted(waits, reverse=True)[:4]:
        print(f"| - one try-wait loop, {executed:,} executions | {100 * samples / total:.1f} % |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backend", default="mosaic-gpu")
    parser.add_argument("--variant", help="one of bench_variants.py's code variants, patched in")
    parser.add_argument("--summarize", metavar="DETAILS_CSV",
                        help="summarize ncu's --page details CSV instead of running")
    parser.add_argument("--stalls", metavar="RAW_CSV",
                        help="with --summarize: ncu's --page raw CSV, for the stall reasons")
    parser.add_argument("--source", metavar="SOURCE_CSV",
                        help="summarize ncu's --page source --print-source sass CSV of one kernel")
    args = parser.parse_args()
    if args.source:
        summarize_source(args.source)
        return
    if args.summarize:
        summarize(args.summarize, args.stalls)
        return

    import contextlib
    import os

    import jax
    import numpy as np

    import flash_attn_jax as fa

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_variants import VARIANTS
    patch = VARIANTS[args.variant] if args.variant else contextlib.nullcontext

    batch, nheads = 16384 // args.seqlen, 2048 // args.head_dim
    rng = np.random.default_rng(0)
    q, k, v = (jax.device_put(rng.standard_normal(
        (batch, args.seqlen, nheads, args.head_dim), np.float32).astype(jax.numpy.bfloat16))
        for _ in range(3))
    calls = {
        args.backend: lambda q, k, v: fa.flash_attn_func(q, k, v, causal=args.causal),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=args.causal, implementation="cudnn"),
    }
    with patch(), fa.use_backend(args.backend):
        compiled = {name: jax.jit(call).lower(q, k, v).compile() for name, call in calls.items()}
    for name, call in compiled.items():
        jax.block_until_ready(call(q, k, v))
        print(f"ran {name}", file=sys.stderr)


if __name__ == "__main__":
    main()
