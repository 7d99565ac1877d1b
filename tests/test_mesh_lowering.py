"""The GPU program on a mesh, without a GPU: collectives after XLA's SPMD partitioning.

On CPU the kernels run in interpret mode, which hides what a GPU build does. Here the Triton path
is lowered for CUDA (an abstract H100) on the 8-device CPU mesh, and XLA's partitioner runs on it;
its output (dumped after the spmd-partitioning pass; code generation then fails, as there is no
Triton on a CPU) must hold no all-gather or all-to-all for batch and head sharding, and only
collective-permutes for a sharded sequence (the ring).
"""

from __future__ import annotations

import glob
import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import gpu_info
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flash_attn_jax as fa
from flash_attn_jax.kernels import INTERPRET_ENV

COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)"
                        r"(?:-start)?\(")
TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture
def triton_for_h100(monkeypatch):
    monkeypatch.setenv(INTERPRET_ENV, "0")
    h100 = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: h100)


def mesh_of(shape, names):
    if len(jax.devices()) < 8 or jax.default_backend() != "cpu":
        pytest.skip("lowers for CUDA on the 8-device CPU mesh")
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def partitioned_program(fn, *structs, tmp_path):
    """The HLO text after SPMD partitioning of ``fn`` lowered for CUDA."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the Triton backend's deprecation
        lowered = jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",))
        try:
            lowered.compile(compiler_options={"xla_dump_to": str(tmp_path),
                                              "xla_dump_hlo_pass_re": "spmd-partitioning"})
        except Exception as error:  # no Triton custom call on a CPU: codegen fails after the pass
            assert TRITON_CALL in str(error), error
    [dump] = glob.glob(str(tmp_path / "*after_spmd-partitioning*"))
    with open(dump) as f:
        text = f.read()
    assert TRITON_CALL in text
    return text


def collectives(text):
    return sorted(set(COLLECTIVE.findall(text)))


def struct(mesh, shape, dtype, *entries):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*entries)))


def grads_of(fn, argnums):
    return jax.grad(lambda *a: sum(jnp.sum(x.astype(jnp.float32)) for x in fn(*a)),
                    argnums=argnums)


KEY_DATA = jax.ShapeDtypeStruct((2,), jnp.uint32)


def test_dense_batch_and_heads_have_no_collectives(triton_for_h100, tmp_path):
    mesh = mesh_of((2, 4), ("data", "model"))
    q = struct(mesh, (4, 512, 8, 128), jnp.bfloat16, "data", None, "model")
    kv = struct(mesh, (4, 512, 4, 128), jnp.bfloat16, "data", None, "model")

    def fn(q, k, v, key):
        return (fa.flash_attn_func(q, k, v, causal=True, dropout_p=0.1, dropout_key=key),)

    text = partitioned_program(grads_of(fn, (0, 1, 2)), q, kv, kv, KEY_DATA, tmp_path=tmp_path)
    assert collectives(text) == []
    assert text.count(TRITON_CALL) >= 4  # forward, delta, dK/dV, dQ


def test_varlen_heads_and_kvcache_batch_heads_have_no_collectives(triton_for_h100, tmp_path):
    mesh = mesh_of((2, 4), ("data", "model"))
    q = struct(mesh, (1000, 8, 64), jnp.bfloat16, None, "model")
    kv = struct(mesh, (900, 4, 64), jnp.bfloat16, None, "model")
    cu = jax.ShapeDtypeStruct((5,), jnp.int32)

    def varlen(q, k, v, cu_q, cu_k):
        return (fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 400, 400, causal=True),)

    text = partitioned_program(grads_of(varlen, (0, 1, 2)), q, kv, kv, cu, cu,
                               tmp_path=tmp_path / "varlen")
    assert collectives(text) == []

    rows = ("data", None, "model")
    q = struct(mesh, (8, 1, 16, 128), jnp.bfloat16, *rows)
    cache = struct(mesh, (8, 4096, 4, 128), jnp.bfloat16, *rows)
    new = struct(mesh, (8, 1, 4, 128), jnp.bfloat16, *rows)
    lengths = struct(mesh, (8,), jnp.int32, "data")

    def decode(q, k_cache, v_cache, k, v, lengths):
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                          causal=True)

    text = partitioned_program(decode, q, cache, cache, new, new, lengths,
                               tmp_path=tmp_path / "cache")
    assert collectives(text) == []


def test_sequence_sharding_only_permutes(triton_for_h100, tmp_path):
    mesh = mesh_of((2, 4), ("data", "seq"))
    q = struct(mesh, (2, 4096, 8, 128), jnp.bfloat16, "data", "seq")
    kv = struct(mesh, (2, 4096, 2, 128), jnp.bfloat16, "data", "seq")

    def auto(q, k, v):  # plain jit: the ring runs by itself
        return (fa.flash_attn_func(q, k, v, causal=True),)

    text = partitioned_program(grads_of(auto, (0, 1, 2)), q, kv, kv, tmp_path=tmp_path / "auto")
    assert collectives(text) == ["collective-permute"]

    def explicit(q, k, v):  # ring_flash_attn_func in a shard_map, zigzag layout
        rows = P("data", "seq")
        return (jax.shard_map(
            lambda q, k, v: fa.ring_flash_attn_func(q, k, v, axis_name="seq", layout="zigzag",
                                                    causal=True),
            mesh=mesh, in_specs=(rows,) * 3, out_specs=rows)(q, k, v),)

    text = partitioned_program(grads_of(explicit, (0, 1, 2)), q, kv, kv,
                               tmp_path=tmp_path / "explicit")
    assert collectives(text) == ["collective-permute"]
