"""Machine-code statistics of the attention kernels, without a GPU.

Lowers the kernels for an abstract H100 (as tests/test_lowering.py does), captures the Triton IR
that Pallas hands to XLA, compiles it with upstream Triton for sm_90 (the triton wheel carries
ptxas and cuobjdump) and counts the SASS instructions: all of them, barriers, shared-memory loads
and stores, local-memory spills. XLA compiles the same IR with its own Triton, so this is a proxy,
not what runs; it serves to compare kernel variants when no GPU is at hand (the dropout keep
mask's cost, whether a tile moves between threads through shared memory, register spills).

    pip install triton==3.6.0   # a development aid only, not a dependency of the package
    PYTHONPATH=.:tests python scripts/sass_stats.py [--dtype bf16] [--head-dim 128]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import jax.numpy as jnp
from jax._src.pallas.triton import pallas_call_registration

from flash_attn_jax.kernels.triton.config import backward_configs, forward_config

COUNTED = ("BAR", "LDS", "STS", "LDL", "STL", "HGMMA", "MUFU", "IMAD", "LOP3")
_captured = []


def _capture_modules():
    """Make Pallas's Triton lowering record each module's IR text (a private hook: a dev tool)."""
    lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module

    def recording(*args, **kwargs):
        result = lower(*args, **kwargs)
        _captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = recording


def _run_ttir_passes_first():
    """triton.compile skips the passes of an IR file's own stage, but XLA runs Triton's TTIR
    passes on the IR Pallas hands it; without them a dot and the add of its result stay apart
    (no accumulating dot, which changes wgmma pipelining). Run them before the TTGIR stage."""
    from triton.backends.nvidia import compiler as nvidia

    make_ttgir = nvidia.CUDABackend.make_ttgir

    def ttir_then_ttgir(mod, metadata, options, capability):
        mod = nvidia.CUDABackend.make_ttir(mod, metadata, options, capability)
        return make_ttgir(mod, metadata, options, capability)

    nvidia.CUDABackend.make_ttgir = staticmethod(ttir_then_ttgir)


def sass_counts(ttir: str, num_warps: int, num_stages: int):
    """Instruction counts of ``ttir`` compiled for sm_90 by upstream Triton."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], check=True,
                              capture_output=True, text=True).stdout
    ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+([A-Z0-9_]+)", sass, flags=re.M))
    return {"total": sum(ops.values()), **{name: ops[name] for name in COUNTED},
            "shared bytes": kernel.metadata.shared}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--head-dim", type=int, choices=(16, 32, 64, 128, 256), default=128)
    args = parser.parse_args()
    dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[args.dtype]
    _capture_modules()
    _run_ttir_passes_first()
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel may predate the passes above
    from test_lowering import _lower_backward, _lower_forward

    rows = []
    for variant in ("all-features-ragged", "dropout-all-features-ragged"):
        dropout = variant.startswith("dropout")
        forward = forward_config(dtype, args.head_dim, 1 << 20, 1 << 20, dropout=dropout)
        dkdv, dq = backward_configs(dtype, args.head_dim, 1 << 20, 1 << 20)
        _captured.clear()
        _lower_forward(dtype, args.head_dim, forward, variant)
        _lower_backward(dtype, args.head_dim, dkdv, dq, variant)
        # Captured in order: forward, probabilities, delta, dK/dV, dQ.
        for name, index, config in (("forward", 0, forward), ("dkdv", 3, dkdv), ("dq", 4, dq)):
            counts = sass_counts(_captured[index], config.num_warps, config.num_stages)
            rows.append((name, "dropout" if dropout else "-", counts))
    columns = list(rows[0][2])
    print("| kernel | dropout | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, dropout, counts in sorted(rows, key=lambda row: row[0]):
        print(f"| {name} | {dropout} | " + " | ".join(str(counts[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
