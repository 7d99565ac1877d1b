"""Registers and spills of the Mosaic GPU kernels as ptxas compiles them for sm_90a, without a GPU.

Lowers a forward or forward + backward call for an abstract H100 (as the lowering tests do), takes
the serialized Mosaic module out of each ``mosaic_gpu_v2`` custom call, and hands it to
``MosaicGpuCompile``, which the CUDA plugin's library exports: Mosaic's own pipeline (MLIR passes,
NVPTX, ``ptxas -v``), the one the GPU runs. Its only device query, the compute capability, is
answered by scripts/fakecuda.c (built on first use with the C compiler ``cc``), loaded first in
a child process per kernel (a second compile in one process aborts); loading the module then fails
for want of a driver, after MOSAIC_GPU_DUMP_PTX / _PTXAS (and _SASS with --sass) have printed.

The count is ptxas's for the whole kernel (the launch's registers: 168 at 384 threads); the
compute warpgroups raise theirs at run time (``common.COMPUTE_REGISTERS``), and the spills are
what ptxas could not fit under those. A development aid in its own environment, not a dependency:

    python3.12 -m venv /tmp/mgsass && /tmp/mgsass/bin/pip install -c constraints.txt \\
        jax jaxlib "jax-cuda13-plugin[with-cuda]==0.11.2"   # nvidia-cuda-nvdisasm for --sass
    PYTHONPATH=. /tmp/mgsass/bin/python scripts/mosaic_sass_stats.py --head-dims 64,128 \\
        [--seqlen 4096] [--causal] [--dropout 0.1] [--deterministic] [--phase fwd] [--varlen N]
        [--sass DIR] [--variant NAME]
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY_DIR = os.path.join(os.path.expanduser("~"), ".cache", "flash_attn_jax", "fakecuda")
_CHILD = __name__ == "__main__" and sys.argv[1:2] == ["--compile-one"]


def _fake_driver():
    """The path of the stand-in libcuda.so.1, built from fakecuda.c when missing or older."""
    library = os.path.join(LIBRARY_DIR, "libcuda.so.1")
    source = os.path.join(HERE, "fakecuda.c")
    if not os.path.exists(library) or os.path.getmtime(library) < os.path.getmtime(source):
        os.makedirs(LIBRARY_DIR, exist_ok=True)
        subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", library,
                        source], check=True)
    return library


def _compile_one(module_path):
    """Child side: the plugin's compiler on one module, the fake driver loaded first (the
    plugin's dlopen of "libcuda.so.1" then finds it by its soname)."""
    import importlib.util
    ctypes.CDLL(os.environ["FAKECUDA_LIBRARY"], mode=ctypes.RTLD_GLOBAL)
    plugin = importlib.util.find_spec("jax_plugins.xla_cuda13")
    if plugin is None:
        sys.exit("needs the CUDA plugin: pip install 'jax-cuda13-plugin[with-cuda]==0.11.2'")
    compile_ = ctypes.CDLL(os.path.join(os.path.dirname(plugin.origin),
                                        "xla_cuda_plugin.so")).MosaicGpuCompile
    compile_.argtypes = [ctypes.c_char_p, ctypes.c_int]
    compile_.restype = ctypes.c_void_p
    data = open(module_path, "rb").read()
    compile_(data, len(data))  # fails at the module load (no driver), after the dumps
    ctypes.CDLL(None).fflush(None)


def _ptxas_directory():
    """The pip CUDA's bin directory (its ptxas), else None (the ptxas on PATH)."""
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        path = os.path.join(root, "cu13", "bin")
        if os.path.exists(os.path.join(path, "ptxas")):
            return path
    return None


def compile_module(module_bytes, sass=False):
    """(ptx and SASS text, ptxas log) of one serialized Mosaic module."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MOSAIC_GPU_DUMP")}
    env.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1",
               FAKECUDA_LIBRARY=_fake_driver())
    if sass:
        env["MOSAIC_GPU_DUMP_SASS"] = "1"
    if (bin_dir := _ptxas_directory()) is not None:
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    with tempfile.NamedTemporaryFile(suffix=".mlirbc") as module_file:
        module_file.write(module_bytes)
        module_file.flush()
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-one",
                                module_file.name], env=env, capture_output=True, text=True,
                               errors="replace")
    start = child.stdout.find("ptxas ")
    if start < 0:
        raise RuntimeError("Mosaic GPU's compiler printed no ptxas log (rc "
                           f"{child.returncode}):\n{(child.stdout + child.stderr)[-4000:]}")
    return child.stdout[:start], child.stdout[start:]


def parse_ptxas(log):
    """[{function, registers, spill_stores, spill_loads, stack}] of a ``ptxas -v`` log."""
    entries = []
    for line in log.splitlines():
        if match := re.search(r"Compiling entry function '([^']+)'", line):
            entries.append(dict(function=match[1]))
        elif entries and (match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill "
                                             r"stores, (\d+) bytes spill loads", line)):
            entries[-1].update(stack=int(match[1]), spill_stores=int(match[2]),
                               spill_loads=int(match[3]))
        elif entries and (match := re.search(r"Used (\d+) registers", line)):
            entries[-1]["registers"] = int(match[1])
    return entries


def mosaic_modules(fn, *args):
    """The serialized modules of ``fn``'s Mosaic GPU kernels, in program order."""
    import jax
    from jaxlib.mlir import ir
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=1, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                     abstract_device=h100)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    modules = []

    def visit(op):
        attributes = op.operation.attributes
        if (op.operation.name == "stablehlo.custom_call"
                and ir.StringAttr(attributes["call_target_name"]).value == "mosaic_gpu_v2"):
            config = ir.DictAttr(attributes["mhlo.backend_config"])
            modules.append(ir.StringAttr(config["module"]).value_bytes)
        for region in op.operation.regions:
            for block in region.blocks:
                for inner in block.operations:
                    visit(inner)

    for op in lowered.compiler_ir("stablehlo").body.operations:
        visit(op)
    return modules


def attention_call(head_dim, seqlen, *, causal, dropout, deterministic, phase, varlen=0):
    """(fn, abstract args): the benchmark's call (bf16, H x D = 2048) at one batch row, or with
    ``varlen`` sequences sharing ``seqlen`` tokens (flash_attn_varlen_func, equal lengths but the
    last)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import flash_attn_jax as fa
    heads = 2048 // head_dim
    key = jax.random.key(0) if dropout else None
    options = dict(causal=causal, deterministic=deterministic, dropout_key=key)
    if varlen:
        q = jax.ShapeDtypeStruct((seqlen, heads, head_dim), jnp.bfloat16)
        bounds = np.minimum(np.arange(varlen + 1) * -(-seqlen // varlen), seqlen)
        cu_seqlens = jnp.asarray(bounds, jnp.int32)
        longest = int(np.diff(bounds).max())

        def attend(q, k, v):
            return fa.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest,
                                             dropout, **options)
    else:
        q = jax.ShapeDtypeStruct((1, seqlen, heads, head_dim), jnp.bfloat16)

        def attend(q, k, v):
            return fa.flash_attn_func(q, k, v, dropout, **options)

    if phase == "fwd":
        return attend, (q, q, q)
    return jax.grad(lambda *x: attend(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2)), (q, q, q)


def main():
    import argparse
    import flash_attn_jax as fa
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--phase", choices=("fwd", "fwd_bwd"), default="fwd_bwd")
    parser.add_argument("--varlen", type=int, default=0, metavar="N",
                        help="flash_attn_varlen_func with N sequences in the --seqlen tokens")
    parser.add_argument("--sass", metavar="DIR", help="also write each kernel's PTX and SASS here")
    parser.add_argument("--variant", help="one of benchmarks/bench_variants.py's code variants")
    args = parser.parse_args()
    patch = contextlib.nullcontext
    if args.variant:
        sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
        from bench_variants import VARIANTS
        patch = VARIANTS[args.variant]
    print("| D | kernel | registers | spill stores (B) | spill loads (B) | stack (B) |")
    print("|---|---|---|---|---|---|")
    for head_dim in map(int, args.head_dims.split(",")):
        fn, inputs = attention_call(head_dim, args.seqlen, causal=args.causal,
                                    dropout=args.dropout, deterministic=args.deterministic,
                                    phase=args.phase, varlen=args.varlen)
        with patch(), fa.use_backend("mosaic-gpu"):  # the backward is traced in the lowering
            modules = mosaic_modules(fn, *inputs)
        for index, module in enumerate(modules):
            text, log = compile_module(module, sass=args.sass is not None)
            if args.sass:
                os.makedirs(args.sass, exist_ok=True)
                with open(os.path.join(args.sass, f"d{head_dim}_kernel{index}.txt"), "w") as f:
                    f.write(text + log)
            for entry in parse_ptxas(log):
                print(f"| {head_dim} | {index}: {entry['function']} | {entry.get('registers')} | "
                      f"{entry.get('spill_stores')} | {entry.get('spill_loads')} | "
                      f"{entry.get('stack')} |", flush=True)


if __name__ == "__main__":
    if _CHILD:
        _compile_one(sys.argv[2])
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no CUDA client: lowering only
        main()
