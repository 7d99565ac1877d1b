"""Dense attention speed on the GPU: flash_attn_jax against its peers, in one run.

Shapes follow the FlashAttention benchmark: batch x seqlen = 16384
tokens, nheads x headdim = 2048, bf16, causal and not. Forward FLOPs = 4 * B * H * S * S * D,
halved when causal; forward + backward (timed as jax.vjp of the call, the forward included) counts
3.5x that. Peers: jax.nn.dot_product_attention with the cuDNN and XLA implementations, JAX's
bundled Pallas Triton kernel (jax.experimental.pallas.ops.gpu.attention.mha), and, when torch is
installed, torch's scaled_dot_product_attention with its FlashAttention-2 kernel (same GPU, same
process; torch's own tensors, timed with CUDA events). flash_attn_jax runs three times: with its
automatic backend choice, and with each GPU backend chosen (`pallas-triton`; `mosaic-gpu` on
Hopper, for the shapes it takes), so both backends are compared in the same run.

    PYTHONPATH=. python benchmarks/bench_dense.py [--phase fwd|fwd_bwd] [--head-dims 64,128,256]
        [--sweep] [--out results.md] [--json results.json]

--json writes the table's numbers (TFLOP/s per shape and implementation, with the device, date,
versions and command) for benchmarks/plot_results.py.

--sweep also times alternative block configurations of this package's kernels (to tune
flash_attn_jax/kernels/triton/config.py): the forward kernel for --phase fwd, the dK/dV and dQ kernels
(one varied at a time, at S = 4096) for --phase fwd_bwd; on a Hopper GPU the Mosaic GPU kernels'
blocks too (flash_attn_jax/kernels/mosaic_gpu/__init__.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import warnings

import jax
import jax.numpy as jnp

import flash_attn_jax as fa
from flash_attn_jax.kernels import mosaic_gpu, tuning
from flash_attn_jax.kernels.mosaic_gpu import backward as mosaic_backward
from flash_attn_jax.kernels.mosaic_gpu import forward as mosaic_forward
from flash_attn_jax.kernels.triton import backward as triton_backward
from flash_attn_jax.kernels.triton import forward as triton_forward
from flash_attn_jax.kernels.triton.config import BlockConfig, backward_configs, forward_config, padded_head_dim
from flash_attn_jax.semantics import ScoreSpec
from timing import report, seconds_per_call

TOKENS, WIDTH = 16384, 2048
# Columns of flash_attn_jax with a backend chosen: column -> backend.
CHOSEN = {"flash_attn_jax pallas-triton": "pallas-triton",
          "flash_attn_jax mosaic-gpu": "mosaic-gpu"}
SHAPES = [(d, s, causal) for d in (128, 64) for s in (1024, 4096, 16384) for causal in (False, True)]
SHAPES += [(256, s, causal) for s in (4096, 16384) for causal in (False, True)]
DKDV_SWEEP = [BlockConfig(64, 64, 4, 2), BlockConfig(64, 64, 8, 2), BlockConfig(32, 64, 4, 2),
              BlockConfig(64, 128, 8, 2), BlockConfig(32, 128, 8, 2), BlockConfig(64, 64, 4, 3),
              BlockConfig(64, 128, 8, 1)]
DQ_SWEEP = [BlockConfig(64, 64, 4, 2), BlockConfig(64, 64, 8, 2), BlockConfig(128, 64, 8, 2),
            BlockConfig(64, 32, 4, 2), BlockConfig(128, 32, 8, 2), BlockConfig(128, 64, 8, 3)]
FORWARD_SWEEP = [BlockConfig(128, 64, 4, 3), BlockConfig(128, 64, 8, 3), BlockConfig(128, 128, 8, 3),
         BlockConfig(128, 128, 8, 2), BlockConfig(64, 64, 4, 3), BlockConfig(128, 32, 4, 3),
         BlockConfig(64, 128, 4, 3), BlockConfig(128, 64, 8, 4)]
# Head dim 256: a (128, 256) tile takes 64 KiB of shared memory per 16-bit operand, so fewer
# stages and smaller key blocks.
SWEEPS_256 = {
    "fwd": [BlockConfig(64, 64, 8, 2), BlockConfig(128, 64, 8, 2), BlockConfig(128, 32, 8, 2),
            BlockConfig(128, 64, 8, 1), BlockConfig(64, 64, 4, 2), BlockConfig(64, 32, 4, 3),
            BlockConfig(64, 128, 8, 1), BlockConfig(128, 64, 16, 2), BlockConfig(128, 32, 8, 3),
            BlockConfig(64, 64, 4, 3)],
    "dkdv": [BlockConfig(32, 64, 8, 1), BlockConfig(64, 64, 8, 1), BlockConfig(64, 64, 8, 2),
             BlockConfig(32, 64, 4, 2), BlockConfig(64, 32, 8, 2), BlockConfig(32, 128, 8, 1),
             BlockConfig(64, 128, 8, 1), BlockConfig(16, 64, 4, 2), BlockConfig(32, 64, 8, 2),
             BlockConfig(64, 64, 4, 2)],
    "dq": [BlockConfig(64, 32, 8, 1), BlockConfig(64, 64, 8, 1), BlockConfig(64, 64, 8, 2),
           BlockConfig(128, 32, 8, 1), BlockConfig(64, 32, 4, 2), BlockConfig(128, 64, 8, 1),
           BlockConfig(32, 64, 4, 2), BlockConfig(64, 32, 8, 2), BlockConfig(64, 64, 4, 2)],
}


def peers(head_dim, causal):
    """Forward functions (q, k, v) -> out of each implementation."""
    scale = head_dim ** -0.5
    impls = {
        "flash_attn_jax": lambda q, k, v: fa.flash_attn_func(q, k, v, causal=causal),
        # The same call with a backend chosen (CHOSEN): timed where that backend runs the
        # forward (for mosaic-gpu: a Hopper GPU, shapes it takes; its backward may be another's).
        **{name: lambda q, k, v: fa.flash_attn_func(q, k, v, causal=causal) for name in CHOSEN},
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention
    impls["jax pallas mha"] = lambda q, k, v: pallas_attention.mha(
        q, k, v, segment_ids=None, sm_scale=scale, causal=causal)
    return impls


def timed(attend, phase):
    """The jitted function the benchmark times: the forward, or jax.vjp of it (forward included)."""
    if phase == "fwd":
        return jax.jit(attend)
    return jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](q))  # q serves as the cotangent


def inputs(head_dim, seqlen):
    batch, nheads = TOKENS // seqlen, WIDTH // head_dim
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return [jax.random.normal(key, (batch, seqlen, nheads, head_dim), jnp.bfloat16) for key in keys]


def flops(head_dim, seqlen, causal, phase):
    batch, nheads = TOKENS // seqlen, WIDTH // head_dim
    forward = 4 * batch * nheads * seqlen * seqlen * head_dim / (2 if causal else 1)
    return forward * (1.0 if phase == "fwd" else 3.5)


def _rate(fn, shape, phase, *args):
    try:
        return flops(*shape, phase) / seconds_per_call(fn, *args) / 1e12
    except Exception as error:  # a config may not fit (shared memory, registers): report, go on
        return f"failed: {type(error).__name__}"


def sweep(shape, phase, q, k, v, dropout_p=0.0):
    """{label: TFLOP/s} of alternative block configurations at one shape (with dropout when
    ``dropout_p`` > 0)."""
    head_dim, seqlen, causal = shape
    spec = ScoreSpec.create(softmax_scale=head_dim ** -0.5, causal=causal, dropout_p=dropout_p)
    seed = jnp.asarray([0, 1], jnp.uint32) if dropout_p else None
    fwd_config = forward_config(q.dtype, padded_head_dim(head_dim), seqlen, seqlen,
                                dropout=spec.has_dropout)
    results = {}
    sweeps = SWEEPS_256 if head_dim == 256 else dict(fwd=FORWARD_SWEEP, dkdv=DKDV_SWEEP,
                                                     dq=DQ_SWEEP)
    if phase == "fwd":
        for config in sweeps["fwd"]:
            fn = jax.jit(lambda q, k, v, config=config: triton_forward.forward(
                q, k, v, None, spec, config, seed=seed, interpret=False)[0])
            results[f"fwd {config}"] = _rate(fn, shape, phase, q, k, v)
        return results
    if seqlen != 4096:
        return results
    dkdv_default, dq_default = backward_configs(q.dtype, padded_head_dim(head_dim), seqlen, seqlen)
    candidates = [("dkdv", c, (c, dq_default)) for c in sweeps["dkdv"]]
    candidates += [("dq", c, (dkdv_default, c)) for c in sweeps["dq"]]
    for kernel, config, (dkdv, dq) in candidates:
        def step(q, k, v, dkdv=dkdv, dq=dq):
            out, lse = triton_forward.forward(q, k, v, None, spec, fwd_config, seed=seed,
                                              interpret=False)
            return triton_backward.backward(q, k, v, None, out, lse, q, jnp.zeros_like(lse), spec,
                                            dkdv, dq, seed=seed, interpret=False)
        results[f"{kernel} {config}"] = _rate(jax.jit(step), shape, phase, q, k, v)
    return results


def torch_flash_rate(shape, phase, repeats=20):
    """TFLOP/s of torch's FlashAttention-2 (scaled_dot_product_attention restricted to its flash
    kernel) at ``shape``, or None without torch or a CUDA device."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    head_dim, seqlen, causal = shape
    batch, nheads = TOKENS // seqlen, WIDTH // head_dim
    grad = phase != "fwd"

    def median_seconds():  # its tensors die on return, so empty_cache can hand them back
        q, k, v = (torch.randn(batch, nheads, seqlen, head_dim, dtype=torch.bfloat16,
                               device="cuda", requires_grad=grad) for _ in range(3))

        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                if grad:
                    torch.autograd.grad(out, (q, k, v), out)

        for _ in range(3):
            call()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(5):
            start.record()
            for _ in range(repeats):
                call()
            stop.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3 / repeats)
        return statistics.median(samples)

    try:
        return flops(*shape, phase) / median_seconds() / 1e12
    finally:
        torch.cuda.empty_cache()  # torch's cached blocks back before JAX's next shape


# Mosaic GPU blocks (block_q per compute warpgroup, block_k, stages), swept with --sweep on a
# Hopper GPU; flash_attn_jax/kernels/mosaic_gpu/__init__.py holds the chosen ones.
# The forward's blocks, then its schedules (mosaic_gpu.forward.ForwardConfig) at the 128-key blocks.
_Forward = mosaic_forward.ForwardConfig
MOSAIC_FORWARD_SWEEP = [_Forward(64, 64, 2), _Forward(64, 128, 2), _Forward(64, 128, 3),
                        _Forward(64, 64, 4), _Forward(64, 128, 4), _Forward(128, 64, 2),
                        _Forward(128, 128, 2), _Forward(64, 128, 2, pingpong=False),
                        _Forward(64, 128, 3, pingpong=False),
                        _Forward(64, 128, 2, key_wait_under_pv=True),
                        _Forward(64, 128, 2, pin_softmax=True),
                        _Forward(64, 128, 2, pingpong=False, key_wait_under_pv=True),
                        _Forward(64, 128, 2, pingpong=False, key_wait_under_pv=True,
                                 pin_softmax=True)]
_Backward = mosaic_backward.BackwardConfig
MOSAIC_BACKWARD_SWEEP = [_Backward(64, 64, 2), _Backward(64, 64, 3), _Backward(64, 128, 2),
                         _Backward(128, 64, 2)]


def mosaic_sweep(shape, phase, q, k, v):
    """{label: TFLOP/s} of Mosaic GPU block configurations at one shape (forward; forward +
    backward at S 4096, the forward at its chosen blocks)."""
    head_dim, seqlen, causal = shape
    spec = ScoreSpec.create(softmax_scale=head_dim ** -0.5, causal=causal)
    results = {}
    if phase == "fwd":
        for config in MOSAIC_FORWARD_SWEEP:
            fn = jax.jit(lambda q, k, v, config=config: mosaic_forward.forward(
                q, k, v, None, spec, config)[0])
            results[f"mosaic fwd {config}"] = _rate(fn, shape, phase, q, k, v)
        return results
    if seqlen != 4096:
        return results
    # Head dim 256 takes only its own kind of blocks (dV and dK in passes, 32-row streams).
    for config in MOSAIC_BACKWARD_SWEEP if head_dim <= 128 else mosaic_gpu.backward_configs(head_dim):
        def step(q, k, v, config=config):
            out, lse = mosaic_forward.forward(q, k, v, None, spec,
                                              mosaic_gpu.forward_config(head_dim))
            return mosaic_backward.backward(q, k, v, None, out, lse, q, jnp.zeros_like(lse), spec,
                                            config)
        results[f"mosaic bwd {config}"] = _rate(jax.jit(step), shape, phase, q, k, v)
    return results


def print_sweep(shape, phase, q, k, v, dropout_p=0.0):
    """Prints ``sweep``'s rates, one configuration per line."""
    head_dim, seqlen, causal = shape
    tag = f"causal={causal}" + (f" dropout {dropout_p}" if dropout_p else "")
    results = sweep(shape, phase, q, k, v, dropout_p)
    if not dropout_p and tuning.gpu_generation() == tuning.HOPPER:
        results.update(mosaic_sweep(shape, phase, q, k, v))
    for label, rate in results.items():
        shown = f"{rate:.0f}" if isinstance(rate, float) else rate
        print(f"    sweep D={head_dim} S={seqlen} {tag} {label}: {shown}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("fwd", "fwd_bwd"), default="fwd")
    parser.add_argument("--head-dims", default="64,128,256",
                        help="comma-separated head dims of SHAPES to run")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    head_dims = {int(d) for d in args.head_dims.split(",")}
    warnings.simplefilter("ignore", DeprecationWarning)

    device = jax.devices()[0].device_kind
    phase_name = "Forward" if args.phase == "fwd" else "Forward + backward"
    header = (f"{phase_name}, bf16, {device}, jax {jax.__version__}, "
              f"{datetime.date.today().isoformat()}; TFLOP/s (ratio to cuDNN)")
    names = list(peers(64, False)) + ["torch FA2"]
    lines = [header, "", "| D | S | causal | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    ratios = {name: [] for name in names}
    rows = []
    for shape in [shape for shape in SHAPES if shape[0] in head_dims]:
        head_dim, seqlen, causal = shape
        q, k, v = inputs(head_dim, seqlen)
        rates = {}
        for name, attend in peers(head_dim, causal).items():
            if name == "xla" and seqlen > 4096:
                continue  # O(S^2) memory
            if name in CHOSEN:
                with fa.use_backend(CHOSEN[name]):  # the choice is part of the jit cache key
                    if fa.backends_used(attend, q, k, v) != {"forward": CHOSEN[name]}:
                        continue
                    rate = _rate(timed(attend, args.phase), shape, args.phase, q, k, v)
            else:
                rate = _rate(timed(attend, args.phase), shape, args.phase, q, k, v)
            if isinstance(rate, str):
                print(f"{name} D={head_dim} S={seqlen} causal={causal}: {rate}")
            else:
                rates[name] = rate
        try:
            rate = torch_flash_rate(shape, args.phase)
        except Exception as error:  # torch missing a kernel for the shape: report, go on
            print(f"torch FA2 D={head_dim} S={seqlen} causal={causal}: {type(error).__name__}")
            rate = None
        if rate is not None:
            rates["torch FA2"] = rate
        rows.append({"D": head_dim, "S": seqlen, "causal": causal, "tflops": dict(rates)})
        cells = []
        for name in names:
            if name not in rates:
                cells.append("-")
                continue
            ratio = rates[name] / rates["cudnn"] if "cudnn" in rates else float("nan")
            ratios[name].append(ratio)
            cells.append(f"{rates[name]:.0f} ({ratio:.2f})")
        lines.append(f"| {head_dim} | {seqlen} | {'y' if causal else 'n'} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        if args.sweep:
            print_sweep(shape, args.phase, q, k, v)
    geomeans = [math.exp(statistics.fmean(math.log(r) for r in ratios[name])) if ratios[name] else
                float("nan") for name in names]
    lines.append("| geomean ratio to cuDNN | | | " + " | ".join(f"{g:.2f}" for g in geomeans) + " |")
    report(lines, args.out)
    if args.json:
        write_json(args.json, phase=args.phase, unit="TFLOP/s", rows=rows)


def write_json(path, **results):
    """``results`` with the device, date, versions and command of this run, as JSON."""
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    meta = {"benchmark": os.path.basename(sys.argv[0]), "device": jax.devices()[0].device_kind,
            "date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "torch": torch_version, "command": " ".join(["python"] + sys.argv)}
    with open(path, "w") as f:
        json.dump({**meta, **results}, f, indent=1)


if __name__ == "__main__":
    main()
