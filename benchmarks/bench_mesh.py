"""Attention on several GPUs: data and tensor parallel under jit, and ring attention, in one run.

1. Batch (data parallel) and heads (tensor parallel) sharding under plain jax.jit: forward +
   backward of B 8, S 4096, H 16, D 128, causal, bf16 on one GPU (the whole batch) and on all
   GPUs of the machine (the batch or the heads split). Peers in the same run: the same library
   call inside a hand-written shard_map, and jax.nn's cuDNN attention. Throughput ratio = time on
   one GPU / time on n GPUs (the target is >= 0.95 n).
2. Ring attention (context parallel): the sequence S_total = n x S_dev split over the n GPUs,
   B 1, H 16, D 128, bf16, forward + backward, ring_flash_attn_func in a shard_map (contiguous and
   zigzag layouts) and plain jit with the sequence sharded (the automatic ring). Against one GPU
   doing a device's work: its S_dev queries attending all S_total keys (causal contiguous: the
   last device's queries, the busiest device: the layout leaves the others idle part of the
   time); causal zigzag: 1/n of one GPU's causal attention over S_total (the balanced share).
   Efficiency = that time / the ring's time (the target is >= 0.9). TFLOP/s per GPU counts the
   useful FLOPs of the whole attention over all GPUs.

    PYTHONPATH=. python benchmarks/bench_mesh.py [--seqlens 16384 32768] [--out results.md]
        [--json results.json]

--json writes the tables' numbers (with the device, date, versions and command) to a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flash_attn_jax as fa
from timing import report, seconds_per_call


def normal(shape, *, sharding=None, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.bfloat16)
    return jax.device_put(x, sharding) if sharding is not None else x


def fwd_bwd(attend):
    """jit of jax.vjp of ``attend`` (the forward included); q serves as the cotangent."""
    return jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](q))


def flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal):
    forward = 4 * batch * heads * seqlen_q * seqlen_k * head_dim / (2 if causal else 1)
    return 3.5 * forward


def data_parallel(num_devices):
    batch, seqlen, heads, head_dim = 8, 4096, 16, 128
    mesh = jax.make_mesh((num_devices,), ("x",), axis_types=(AxisType.Auto,))
    shape = (batch, seqlen, heads, head_dim)
    attend = {
        "flash_attn_jax (jit)": lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True),
        "cuDNN, jax.nn (jit)": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"),
    }
    one = [jax.device_put(normal(shape, seed=i), jax.devices()[0]) for i in range(3)]
    single = {name: seconds_per_call(fwd_bwd(fn), *one) for name, fn in attend.items()}
    single["flash_attn_jax (shard_map)"] = single["flash_attn_jax (jit)"]
    total = flops(batch, heads, seqlen, seqlen, head_dim, True)
    rows = []
    for split, spec in (("batch", P("x")), ("heads", P(None, None, "x"))):
        sharded = [normal(shape, sharding=NamedSharding(mesh, spec), seed=i) for i in range(3)]
        cases = dict(attend)
        cases["flash_attn_jax (shard_map)"] = jax.shard_map(
            attend["flash_attn_jax (jit)"], mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
        for name, fn in cases.items():
            multi = seconds_per_call(fwd_bwd(fn), *sharded)
            rows.append((split, name, single[name] * 1e3, multi * 1e3, single[name] / multi,
                         total / multi / num_devices / 1e12))
            print(rows[-1], flush=True)
    return rows


def ring(num_devices, seqlens):
    heads, head_dim = 16, 128
    mesh = jax.make_mesh((num_devices,), ("seq",), axis_types=(AxisType.Auto,))
    spec = P(None, "seq")
    rows = []
    for seqlen_dev in seqlens:
        total = num_devices * seqlen_dev
        shape = (1, total, heads, head_dim)
        sharded = [normal(shape, sharding=NamedSharding(mesh, spec), seed=i) for i in range(3)]
        one = [jax.device_put(normal(shape, seed=i), jax.devices()[0]) for i in range(3)]
        for causal in (False, True):
            attend = lambda q, k, v: fa.flash_attn_func(q, k, v, causal=causal)
            # One GPU doing a device's work: its queries against every key (non-causal; causal
            # contiguous: the last device's, the busiest); causal zigzag: an equal share of one
            # GPU's causal attention over the whole sequence.
            busiest = seconds_per_call(fwd_bwd(attend), one[0][:, -seqlen_dev:], one[1], one[2])
            share = (seconds_per_call(fwd_bwd(attend), *one) / num_devices) if causal else busiest
            work = flops(1, heads, total, total, head_dim, causal)
            layouts = ("contiguous", "zigzag") if causal else ("contiguous",)
            cases = {}
            for layout in layouts:
                cases[f"ring_flash_attn_func {layout}"] = jax.shard_map(
                    lambda q, k, v, layout=layout: fa.ring_flash_attn_func(
                        q, k, v, axis_name="seq", layout=layout, causal=causal),
                    mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
            cases["flash_attn_func (jit, sequence sharded)"] = (
                lambda q, k, v: fa.flash_attn_func(q, k, v, causal=causal))
            for name, fn in cases.items():
                args = sharded
                if "zigzag" in name:
                    args = [jax.device_put(fa.to_ring_layout(x, num_devices), x.sharding)
                            for x in sharded]
                seconds = seconds_per_call(fwd_bwd(fn), *args)
                baseline = share if "zigzag" in name else busiest
                rows.append((total, "y" if causal else "n", name, seconds * 1e3, baseline * 1e3,
                             baseline / seconds, work / seconds / num_devices / 1e12))
                print(rows[-1], flush=True)
    return rows


def ring_schedule(num_devices, seqlen_dev=16384):
    """The order of the K/V exchange and the kernels in the compiled ring forward + backward
    (causal, zigzag): overlap shows as kernels between a collective-permute's start and done."""
    mesh = jax.make_mesh((num_devices,), ("seq",), axis_types=(AxisType.Auto,))
    spec = P(None, "seq")
    x = jax.ShapeDtypeStruct((1, num_devices * seqlen_dev, 16, 128), jnp.bfloat16,
                             sharding=NamedSharding(mesh, spec))
    fn = jax.shard_map(lambda q, k, v: fa.ring_flash_attn_func(q, k, v, axis_name="seq",
                                                               layout="zigzag", causal=True),
                       mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    text = fwd_bwd(fn).lower(x, x, x).compile().as_text()
    # The entry computation's schedule; kernels skipped by the mask sit in conditionals.
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    events = []
    for line in entry.splitlines():
        if "collective-permute-start" in line and "=" in line:
            events.append("permute-start")
        elif "collective-permute-done" in line and "=" in line:
            events.append("permute-done")
        elif " conditional(" in line:
            events.append("conditional")
        elif "custom-call(" in line:
            name = re.search(r"flash_attn_[a-z_]+", line)
            events.append(name.group(0) if name else "custom-call")
    return events


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[16384, 32768],
                        help="tokens per device of the ring benchmark")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--schedule", action="store_true",
                        help="print where the ring's exchanges sit among its kernels, and exit")
    args = parser.parse_args()
    if args.schedule:
        print(" -> ".join(ring_schedule(len(jax.devices()))))
        return
    num_devices = len(jax.devices())
    if num_devices < 2:
        raise SystemExit("needs at least 2 GPUs")
    device = jax.devices()[0].device_kind
    lines = [f"{num_devices} x {device}, jax {jax.__version__}, "
             f"{datetime.date.today().isoformat()}. `PYTHONPATH=. python "
             f"benchmarks/bench_mesh.py`.", "",
             f"Batch / heads split under jit: B 8, S 4096, H 16, D 128, causal, bf16, forward + "
             f"backward. Ratio = 1-GPU time / {num_devices}-GPU time.", "",
             "| split | implementation | 1 GPU (ms) | n GPUs (ms) | throughput ratio | "
             "TFLOP/s per GPU |", "|---|---|---|---|---|---|"]
    split_rows = data_parallel(num_devices)
    for split, name, single, multi, ratio, tflops in split_rows:
        lines.append(f"| {split} | {name} | {single:.2f} | {multi:.2f} | **{ratio:.2f}x** | "
                     f"{tflops:.0f} |")
    lines += ["", f"Ring attention: B 1, H 16, D 128, bf16, forward + backward, the sequence split "
              f"over {num_devices} GPUs. Baseline: one GPU doing a device's work (causal contiguous: "
              f"the busiest device's; zigzag: the balanced share).", "",
              "| S total | causal | implementation | ring (ms) | 1-GPU per-device work (ms) | "
              "efficiency | TFLOP/s per GPU |", "|---|---|---|---|---|---|---|"]
    ring_rows = ring(num_devices, args.seqlens)
    for total, causal, name, ms, base, eff, tflops in ring_rows:
        lines.append(f"| {total} | {causal} | {name} | {ms:.2f} | {base:.2f} | **{eff:.2f}** | "
                     f"{tflops:.0f} |")
    report(lines, args.out)
    if args.json:
        keys = ("split", "implementation", "one_gpu_ms", "n_gpus_ms", "throughput_ratio",
                "tflops_per_gpu")
        ring_keys = ("S_total", "causal", "implementation", "ring_ms", "one_gpu_ms", "efficiency",
                     "tflops_per_gpu")
        with open(args.json, "w") as f:
            json.dump({"benchmark": "bench_mesh.py", "device": f"{num_devices} x {device}",
                       "date": datetime.date.today().isoformat(), "jax": jax.__version__,
                       "command": " ".join(["python"] + sys.argv),
                       "split": [dict(zip(keys, row)) for row in split_rows],
                       "ring": [dict(zip(ring_keys, row)) for row in ring_rows]}, f, indent=1)


if __name__ == "__main__":
    main()
