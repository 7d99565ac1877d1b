"""Attention on several GPUs, in one run: data / tensor parallel attention under jit, ring
attention, a transformer block under automatic partitioning, and batch-sharded paged decoding.

1. split: batch (data parallel) and heads (tensor parallel) sharding under plain jax.jit: forward
   + backward of B 8, S 4096, H 16, D 128, causal, bf16 on one GPU (the whole batch) and on all
   GPUs of the machine (the batch or the heads split). Peers in the same run: the same library
   call inside a hand-written shard_map, and jax.nn's cuDNN attention (on a GPU). Throughput
   ratio = time on one GPU / time on n GPUs (the target is >= 0.95 n).
2. ring: ring attention (context parallel), the sequence S_total split over the n GPUs
   (``--seqlens``: tokens per device, S_total = n x S_dev; or ``--ring-total``: the totals), B 1,
   ``--heads`` H (16), D 128, bf16, forward + backward, ring_flash_attn_func in a shard_map
   (contiguous and zigzag layouts) and plain jit with the sequence sharded (the automatic ring).
   Against one GPU doing a device's work: its S_dev queries attending all S_total keys (causal
   contiguous: the last device's queries, the busiest device: the layout leaves the others idle
   part of the time); causal zigzag: an equal share of one GPU's causal attention over S_total
   (``--zigzag-baseline full``: 1/n of the whole causal attention timed on one GPU, O(S) memory
   but n times a device's work, minutes at 1M tokens; ``split``: the same FLOPs as one device's
   zigzag share in two calls, its last S_total / 2n queries against every key plus one causal
   chunk of S_total / 2n, i.e. 2n - 1 full chunk pairs and 2 diagonal ones). Efficiency = that
   time / the ring's time (the target is >= 0.9). TFLOP/s per GPU counts the useful FLOPs of the
   whole attention over all GPUs; the 1-GPU TFLOP/s, those of a device's work.
   Exposed exchange: each ring is compiled a second time with its exchange removed: for this
   benchmark only, ``flash_attn_jax.ring.Ring.send`` (the ppermute of K/V forward, of K/V and
   their gradient accumulators backward) is replaced by ``lax.optimization_barrier`` (the data
   stays on its device; the barrier keeps XLA from merging the steps' identical kernel calls).
   Every step then runs the same kernels on the same chunk positions, masks and skipped pairs as
   the ring (the positions come from the device and step index, not the data), so the program is
   the ring's work without the collective-permutes (checked: it has none). Exposed = (ring -
   ring without exchange) / ring: the share of the ring's time the exchange is not hidden; the
   rest of the gap to one GPU (ring without exchange against the 1-GPU time) is the ring's own
   work (float32 partial outputs and merges, the float32 dK/dV accumulators).
3. block: a pre-norm transformer block (benchmarks/mesh_workloads.py: RMSNorm, QKV projection,
   causal GQA flash_attn_func, output projection, RMSNorm, SwiGLU MLP), bf16, loss forward +
   backward (gradients of the parameters and the input) under plain jax.jit with Megatron-style
   NamedShardings: batch over "data", heads and MLP hidden over "model". Meshes (data x model)
   n x 1, 1 x n and n/2 x 2 for n = 1, 2, 4, 8 up to the GPUs there are; the batch is per data
   shard (B 8, S 4096, d_model 4096, 32 heads, 8 kv heads, d_ff 14336). Scaling = tokens/s on the
   mesh / tokens/s on one GPU (the target is >= 0.9 n). The compiled program's all-gathers are
   counted, and those of a tensor shaped like a shard of q, k or v (the attention's operands;
   the goal: none) listed.
4. decode: one decode step (flash_attn_with_kvcache appending one token and attending, paged
   caches of ``--page-size`` 256, 32 q heads, 8 kv heads, D 128, bf16, ``--cache-len`` 8192
   positions per sequence) for ``--decode-batch`` (64) x n_GPUs sequences, the batch, the block
   table and the caches' pages split over all GPUs (each sequence's pages on its device), caches
   donated; on 1, 2, 4, ... GPUs up to all, the same whole batch. Tokens/s = batch / step time;
   speedup against one GPU doing the whole batch. Checked: no collective in the step, both caches
   aliased to the outputs (input_output_alias) and their buffers the same after the step.

    PYTHONPATH=. python benchmarks/bench_mesh.py [--bench split ring block decode]
        [--seqlens 16384 32768 | --ring-total 131072 262144] [--heads 16] [--tiny]
        [--out results.md] [--json results.json]

--tiny: small shapes for a CPU (XLA_FLAGS=--xla_force_host_platform_device_count=8 simulates 8
devices). --json writes the tables' numbers (with the device, date, versions and command) to a
JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import re
import sys
from unittest import mock

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flash_attn_jax as fa
import flash_attn_jax.ring as ring_module
import mesh_workloads as mw
from timing import report, seconds_per_call


def normal(shape, *, sharding=None, seed=0):
    return mw.normal(shape, jnp.bfloat16, sharding, seed=seed)


def fwd_bwd(attend):
    """jit of jax.vjp of ``attend`` (the forward included); q serves as the cotangent."""
    return jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](q))


def flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal):
    forward = 4 * batch * heads * seqlen_q * seqlen_k * head_dim / (2 if causal else 1)
    return 3.5 * forward


def pair_flops(heads, head_dim, pairs):
    """Forward + backward FLOPs of ``pairs`` (query, key) score entries, batch 1."""
    return 3.5 * 4 * heads * head_dim * pairs


def data_parallel(num_devices, shape=(8, 4096, 16, 128), repeats=5):
    batch, seqlen, heads, head_dim = shape
    mesh = jax.make_mesh((num_devices,), ("x",), axis_types=(AxisType.Auto,))
    attend = {"flash_attn_jax (jit)": lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True)}
    if jax.default_backend() == "gpu":
        attend["cuDNN, jax.nn (jit)"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    time = lambda fn, *args: seconds_per_call(fn, *args, repeats=repeats)
    one = [normal(shape, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]), seed=i)
           for i in range(3)]
    single = {name: time(fwd_bwd(fn), *one) for name, fn in attend.items()}
    single["flash_attn_jax (shard_map)"] = single["flash_attn_jax (jit)"]
    total = flops(batch, heads, seqlen, seqlen, head_dim, True)
    rows = []
    for split, spec in (("batch", P("x")), ("heads", P(None, None, "x"))):
        sharded = [normal(shape, sharding=NamedSharding(mesh, spec), seed=i) for i in range(3)]
        cases = dict(attend)
        cases["flash_attn_jax (shard_map)"] = jax.shard_map(
            attend["flash_attn_jax (jit)"], mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
        for name, fn in cases.items():
            multi = time(fwd_bwd(fn), *sharded)
            rows.append((split, name, single[name] * 1e3, multi * 1e3, single[name] / multi,
                         total / multi / num_devices / 1e12))
            print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Ring attention.

@dataclasses.dataclass(frozen=True)
class _RingWithoutExchange(ring_module.Ring):
    """The ring with its exchange removed: what would be sent stays on the device (see the
    module docstring, "Exposed exchange")."""

    def send(self, x):
        return jax.lax.optimization_barrier(x)


def compile_fwd_bwd(attend, *args, exchange=True):
    """The compiled forward + backward of ``attend``; with ``exchange=False``, every ring in it
    (ring_flash_attn_func's and the automatic one of the partitioning, both built as
    ``flash_attn_jax.ring.Ring``) without its exchange."""
    with contextlib.ExitStack() as stack:
        if not exchange:
            stack.enter_context(mock.patch.object(ring_module, "Ring", _RingWithoutExchange))
        return fwd_bwd(attend).lower(*args).compile()


def _ring_cases(mesh, spec, causal):
    """{name: attend} of the ring implementations (fresh functions: nothing traced for one
    variant of the ring is reused for the other)."""
    cases = {}
    layouts = ("contiguous", "zigzag") if causal else ("contiguous",)
    for layout in layouts:
        cases[f"ring_flash_attn_func {layout}"] = jax.shard_map(
            lambda q, k, v, layout=layout: fa.ring_flash_attn_func(
                q, k, v, axis_name="seq", layout=layout, causal=causal),
            mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    cases["flash_attn_func (jit, sequence sharded)"] = (
        lambda q, k, v: fa.flash_attn_func(q, k, v, causal=causal))
    return cases


def ring(num_devices, totals, *, heads=16, head_dim=128, causal_modes=(False, True),
         zigzag_baseline="full", repeats=5):
    mesh = jax.make_mesh((num_devices,), ("seq",), axis_types=(AxisType.Auto,))
    spec = P(None, "seq")
    time = lambda fn, *args: seconds_per_call(fn, *args, repeats=repeats)
    rows = []
    for total in totals:
        if total % (2 * num_devices):
            raise SystemExit(f"S_total {total} is not a multiple of 2 x {num_devices} GPUs")
        seqlen_dev = total // num_devices
        shape = (1, total, heads, head_dim)
        sharded = [normal(shape, sharding=NamedSharding(mesh, spec), seed=i) for i in range(3)]
        zigzag = [jax.device_put(fa.to_ring_layout(x, num_devices), x.sharding) for x in sharded]
        one = [normal(shape, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]), seed=i)
               for i in range(3)]
        for causal in causal_modes:
            attend = lambda q, k, v: fa.flash_attn_func(q, k, v, causal=causal)
            # One GPU doing a device's work: its queries against every key (non-causal; causal
            # contiguous: the last device's, the busiest); causal zigzag: an equal share of one
            # GPU's causal attention over the whole sequence.
            busiest = time(fwd_bwd(attend), one[0][:, -seqlen_dev:], one[1], one[2])
            busiest_pairs = seqlen_dev * (total - seqlen_dev) + seqlen_dev ** 2 / (
                2 if causal else 1)
            if not causal:
                share = busiest
            elif zigzag_baseline == "full":
                share = time(fwd_bwd(attend), *one) / num_devices
            else:  # the last chunk's queries against every key, and a causal chunk
                chunk = total // (2 * num_devices)
                share = (time(fwd_bwd(attend), one[0][:, -chunk:], one[1], one[2])
                         + time(fwd_bwd(attend), *(x[:, :chunk] for x in one)))
            work = flops(1, heads, total, total, head_dim, causal)
            for name, fn in _ring_cases(mesh, spec, causal).items():
                args = zigzag if "zigzag" in name else sharded
                seconds = time(compile_fwd_bwd(fn, *args), *args)
                local = compile_fwd_bwd(_ring_cases(mesh, spec, causal)[name], *args,
                                        exchange=False)
                if mw.collective_counts(local.as_text()):  # the exchange was not removed
                    raise RuntimeError(f"{name}: collectives left without the exchange: "
                                       f"{mw.collective_counts(local.as_text())}")
                without = time(local, *args)
                if "zigzag" in name:
                    baseline, device_work = share, work / num_devices
                else:
                    baseline, device_work = busiest, pair_flops(heads, head_dim, busiest_pairs)
                rows.append((total, seqlen_dev, "y" if causal else "n", name, seconds * 1e3,
                             without * 1e3, max(seconds - without, 0.0) / seconds,
                             baseline * 1e3, baseline / seconds,
                             work / seconds / num_devices / 1e12,
                             device_work / baseline / 1e12))
                print(rows[-1], flush=True)
        del sharded, zigzag, one
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


# ----------------------------------------------------------------------------------------------
# A transformer block under automatic partitioning.

def block_meshes(num_devices, config):
    """(data, model) mesh shapes: n x 1, 1 x n, n/2 x 2 for n = 1, 2, 4, ... <= num_devices,
    those whose model axis divides the kv heads and the MLP hidden units."""
    shapes, n = [], 1
    while n <= num_devices:
        for shape in ((n, 1), (1, n), (n // 2, 2)):
            if shape[0] * shape[1] == n and shape not in shapes:
                shapes.append(shape)
        n *= 2
    return [s for s in shapes if config.kv_heads % s[1] == 0 and config.d_ff % s[1] == 0]


def transformer_block(num_devices, config, repeats=5):
    rows = []
    single = None
    for shape in block_meshes(num_devices, config):
        n = math.prod(shape)
        mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                             devices=jax.devices()[:n])
        params, tokens = mw.init_block(config, jnp.bfloat16, mw.block_shardings(mesh))
        compiled = mw.block_train_step().lower(params, tokens).compile()
        text = compiled.as_text()
        attention_gathers = mw.gathers_of(text, mw.attention_shapes(config, shape[0]))
        counts = mw.collective_counts(text)
        seconds = seconds_per_call(compiled, params, tokens, repeats=repeats)
        tokens_per_s = config.batch * shape[0] * config.seqlen / seconds
        single = tokens_per_s if n == 1 else single
        scaling = tokens_per_s / single
        rows.append(dict(mesh=f"{shape[0]}x{shape[1]}", devices=n, batch=config.batch * shape[0],
                         ms=seconds * 1e3, tokens_per_s=tokens_per_s, scaling=scaling,
                         efficiency=scaling / n,
                         tflops_per_device=config.flops(shape[0]) / seconds / n / 1e12,
                         all_gathers=len(mw.all_gathers(text)),
                         attention_all_gathers=[str(g) for g in attention_gathers],
                         collectives=counts))
        print(rows[-1], flush=True)
        del params, tokens, compiled
    return rows


# ----------------------------------------------------------------------------------------------
# Batch-sharded paged decoding.

def _buffers(arrays):
    return [shard.data.unsafe_buffer_pointer() for x in arrays for shard in x.addressable_shards]


def paged_decode(num_devices, config, repeats=5):
    """``config.batch`` sequences in all, on 1, 2, 4, ... devices."""
    rows = []
    single = None
    n = 1
    while n <= num_devices:
        mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,),
                             devices=jax.devices()[:n])
        args = mw.decode_inputs(config, mesh)
        compiled = mw.decode_step().lower(*args).compile()
        text = compiled.as_text()
        caches, rest = list(args[:2]), args[2:]
        before = _buffers(caches)
        state = [caches]

        def advance():
            state[0], out = compiled(*state[0], *rest)
            return out

        jax.block_until_ready(advance())
        in_place = mw.donated_aliases(text) == 2 and _buffers(state[0]) == before
        cache_gathers = mw.gathers_of(text, mw.decode_shapes(config))
        seconds = seconds_per_call(advance, repeats=repeats)
        tokens_per_s = config.batch / seconds
        single = tokens_per_s if n == 1 else single
        kv_bytes = 2 * config.batch * config.cache_len * config.kv_heads * config.head_dim * 2
        rows.append(dict(devices=n, batch_per_device=config.batch // n, ms=seconds * 1e3,
                         tokens_per_s=tokens_per_s, speedup=tokens_per_s / single,
                         efficiency=tokens_per_s / single / n,
                         kv_tb_per_s_per_device=kv_bytes / seconds / n / 1e12,
                         collectives=mw.collective_counts(text),
                         cache_all_gathers=[str(g) for g in cache_gathers], in_place=in_place))
        print(rows[-1], flush=True)
        del args, caches, state, compiled
        n *= 2
    return rows


# ----------------------------------------------------------------------------------------------

def _rate(x):
    """TFLOP/s: whole numbers on a GPU, three digits for a CPU's small ones."""
    return f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def _collectives_cell(counts):
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", nargs="+", choices=("split", "ring", "block", "decode"),
                        default=["split", "ring", "block", "decode"])
    parser.add_argument("--tiny", action="store_true", help="small shapes, for a CPU")
    parser.add_argument("--seqlens", type=int, nargs="+", default=None,
                        help="tokens per device of the ring benchmark (default 16384 32768)")
    parser.add_argument("--ring-total", type=int, nargs="+", default=None,
                        help="total tokens of the ring benchmark (instead of --seqlens)")
    parser.add_argument("--heads", type=int, default=None, help="heads of the ring (16)")
    parser.add_argument("--ring-causal", choices=("both", "causal", "noncausal"), default="both")
    parser.add_argument("--zigzag-baseline", choices=("full", "split"), default="full",
                        help="zigzag's 1-GPU time: 1/n of the whole causal attention (full) or "
                             "one device's share of it in two calls (split)")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per case")
    parser.add_argument("--block-batch", type=int, default=None, help="per data shard (8)")
    parser.add_argument("--block-seqlen", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--block-heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--d-ff", type=int, default=None)
    parser.add_argument("--decode-batch", type=int, default=None, help="per device (64)")
    parser.add_argument("--cache-len", type=int, default=None)
    parser.add_argument("--page-size", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--schedule", action="store_true",
                        help="print where the ring's exchanges sit among its kernels, and exit")
    args = parser.parse_args()
    num_devices = len(jax.devices())
    if args.schedule:
        print(" -> ".join(ring_schedule(num_devices, 64 if args.tiny else 16384)))
        return
    if num_devices < 2 and {"split", "ring"} & set(args.bench):
        raise SystemExit("split and ring need at least 2 devices")
    device = jax.devices()[0].device_kind
    command = " ".join(["python"] + sys.argv)
    split_shape = (8, 256, 8, 32) if args.tiny else (8, 4096, 16, 128)
    ring_heads = args.heads or (2 if args.tiny else 16)
    ring_head_dim = 32 if args.tiny else 128
    totals = args.ring_total or [num_devices * s for s in
                                 (args.seqlens or ([64] if args.tiny else [16384, 32768]))]
    block_config = mw.TINY_BLOCK if args.tiny else mw.BlockConfig()
    block_config = dataclasses.replace(block_config, **{k: v for k, v in dict(
        batch=args.block_batch, seqlen=args.block_seqlen, d_model=args.d_model,
        heads=args.block_heads, kv_heads=args.kv_heads, d_ff=args.d_ff).items() if v})
    decode_per_device = args.decode_batch or (mw.TINY_DECODE.batch // 8 if args.tiny else 64)
    decode_config = dataclasses.replace(
        mw.TINY_DECODE if args.tiny else mw.DecodeConfig(),
        batch=decode_per_device * num_devices,
        **{k: v for k, v in dict(cache_len=args.cache_len, page_size=args.page_size).items() if v})

    lines = [f"{num_devices} x {device}, jax {jax.__version__}, "
             f"{datetime.date.today().isoformat()}. `PYTHONPATH=. {command}`."]
    results = {"benchmark": "bench_mesh.py", "device": f"{num_devices} x {device}",
               "date": datetime.date.today().isoformat(), "jax": jax.__version__,
               "command": command}
    if "split" in args.bench:
        b, s, h, d = split_shape
        lines += ["", f"Batch / heads split under jit: B {b}, S {s}, H {h}, D {d}, causal, bf16, "
                  f"forward + backward. Ratio = 1-GPU time / {num_devices}-GPU time.", "",
                  "| split | implementation | 1 GPU (ms) | n GPUs (ms) | throughput ratio | "
                  "TFLOP/s per GPU |", "|---|---|---|---|---|---|"]
        split_rows = data_parallel(num_devices, split_shape, args.repeats)
        for split, name, single, multi, ratio, tflops in split_rows:
            lines.append(f"| {split} | {name} | {single:.2f} | {multi:.2f} | **{ratio:.2f}x** | "
                         f"{_rate(tflops)} |")
        keys = ("split", "implementation", "one_gpu_ms", "n_gpus_ms", "throughput_ratio",
                "tflops_per_gpu")
        results["split"] = [dict(zip(keys, row)) for row in split_rows]
    if "ring" in args.bench:
        causal_modes = {"both": (False, True), "causal": (True,),
                        "noncausal": (False,)}[args.ring_causal]
        lines += ["", f"Ring attention: B 1, H {ring_heads}, D {ring_head_dim}, bf16, forward + "
                  f"backward, the sequence split over {num_devices} GPUs. Baseline: one GPU doing "
                  f"a device's work (causal contiguous: the busiest device's; zigzag: the "
                  f"balanced share, {args.zigzag_baseline}). Exposed exchange: (ring - ring "
                  f"without its exchange) / ring.", "",
                  "| S total | S per GPU | causal | implementation | ring (ms) | without exchange "
                  "(ms) | exposed exchange | 1 GPU, a device's work (ms) | efficiency | "
                  "TFLOP/s per GPU | 1-GPU TFLOP/s |", "|---" * 11 + "|"]
        ring_rows = ring(num_devices, totals, heads=ring_heads, head_dim=ring_head_dim,
                         causal_modes=causal_modes, zigzag_baseline=args.zigzag_baseline,
                         repeats=args.repeats)
        for total, dev, causal, name, ms, without, exposed, base, eff, tflops, base_tflops in (
                ring_rows):
            lines.append(f"| {total} | {dev} | {causal} | {name} | {ms:.2f} | {without:.2f} | "
                         f"{exposed:.1%} | {base:.2f} | **{eff:.2f}** | {_rate(tflops)} | "
                         f"{_rate(base_tflops)} |")
        ring_keys = ("S_total", "S_per_gpu", "causal", "implementation", "ring_ms",
                     "without_exchange_ms", "exposed_exchange", "one_gpu_ms", "efficiency",
                     "tflops_per_gpu", "one_gpu_tflops")
        results["ring"] = [dict(zip(ring_keys, row)) for row in ring_rows]
        results["ring_zigzag_baseline"] = args.zigzag_baseline
    if "block" in args.bench:
        c = block_config
        lines += ["", f"Transformer block under jit (data x model mesh, Megatron-style shardings): "
                  f"B {c.batch} per data shard, S {c.seqlen}, d_model {c.d_model}, {c.heads} heads "
                  f"({c.kv_heads} kv) of {c.head_dim}, d_ff {c.d_ff}, bf16, loss forward + "
                  f"backward. Scaling = tokens/s / 1-GPU tokens/s.", "",
                  "| mesh (data x model) | GPUs | global batch | ms per step | tokens/s | "
                  "scaling vs 1 GPU | efficiency | TFLOP/s per GPU | all-gathers (of q/k/v) | "
                  "collectives |", "|---|---|---|---|---|---|---|---|---|---|"]
        block_rows = transformer_block(num_devices, block_config, args.repeats)
        for r in block_rows:
            lines.append(f"| {r['mesh']} | {r['devices']} | {r['batch']} | {r['ms']:.2f} | "
                         f"{r['tokens_per_s']:.0f} | **{r['scaling']:.2f}x** | "
                         f"{r['efficiency']:.2f} | {_rate(r['tflops_per_device'])} | "
                         f"{r['all_gathers']} ({len(r['attention_all_gathers'])}) | "
                         f"{_collectives_cell(r['collectives'])} |")
        results["block"] = dict(config=dataclasses.asdict(block_config), rows=block_rows)
    if "decode" in args.bench:
        c = decode_config
        lines += ["", f"Paged decode step (append 1 token + attend, caches donated): {c.batch} "
                  f"sequences in all, batch, block table and pages split over the GPUs; cache "
                  f"{c.cache_len} positions, pages of {c.page_size}, {c.heads} q heads, "
                  f"{c.kv_heads} kv heads, D {c.head_dim}, bf16.", "",
                  "| GPUs | batch per GPU | ms per step | tokens/s | speedup vs 1 GPU | "
                  "efficiency | K+V TB/s per GPU | collectives | caches in place |",
                  "|---|---|---|---|---|---|---|---|---|"]
        decode_rows = paged_decode(num_devices, decode_config, args.repeats)
        for r in decode_rows:
            lines.append(f"| {r['devices']} | {r['batch_per_device']} | {r['ms']:.3f} | "
                         f"{r['tokens_per_s']:.0f} | **{r['speedup']:.2f}x** | "
                         f"{r['efficiency']:.2f} | {r['kv_tb_per_s_per_device']:.3g} | "
                         f"{_collectives_cell(r['collectives'])} | "
                         f"{'yes' if r['in_place'] else 'NO'} |")
        results["decode"] = dict(config=dataclasses.asdict(decode_config), rows=decode_rows)
    report(lines, args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
