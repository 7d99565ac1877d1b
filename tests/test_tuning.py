"""Tuning tables keyed by GPU generation: which generation a trace targets, and the lookup."""

import jax
import jax.numpy as jnp
import pytest

from flash_attn_jax.kernels import tuning
from flash_attn_jax.kernels.triton import config


def _abstract_mesh(device_kind):
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="cuda")
    return jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                     abstract_device=device)


@pytest.mark.parametrize("kind,capability,expected", [
    ("NVIDIA H100 80GB HBM3", None, tuning.HOPPER),
    ("NVIDIA H200", None, tuning.HOPPER),
    ("NVIDIA GH200 480GB", None, tuning.HOPPER),
    ("NVIDIA H20", None, tuning.HOPPER),
    ("NVIDIA A100-SXM4-80GB", None, tuning.DEFAULT),
    ("NVIDIA L4", None, tuning.DEFAULT),
    ("NVIDIA B200", None, tuning.DEFAULT),
    ("cpu", None, tuning.DEFAULT),
    (None, None, tuning.DEFAULT),
    ("some future name", "9.0", tuning.HOPPER),  # the capability decides when known
    ("NVIDIA H100", "8.0", tuning.DEFAULT),
    ("NVIDIA B200", "10.0", tuning.DEFAULT),
])
def test_generation_of(kind, capability, expected):
    assert tuning.generation_of(kind, capability) == expected


def test_generation_of_the_traced_for_device():
    with jax.sharding.use_abstract_mesh(_abstract_mesh("NVIDIA H100")):
        assert tuning.gpu_generation() == tuning.HOPPER
    with jax.sharding.use_abstract_mesh(_abstract_mesh("NVIDIA A100-SXM4-40GB")):
        assert tuning.gpu_generation() == tuning.DEFAULT
    device = jax.devices()[0]
    expected = tuning.generation_of(device.device_kind, getattr(device, "compute_capability", None))
    if jax.default_backend() != "gpu":
        expected = tuning.DEFAULT
    assert tuning.gpu_generation() == expected


def test_table_lookup_falls_back_to_the_default():
    table = tuning.TuningTable({"a": 1, "b": 2}, {tuning.HOPPER: {"b": 3}})
    assert table.lookup("a", tuning.HOPPER) == 1
    assert table.lookup("b", tuning.HOPPER) == 3
    assert table.lookup("b", tuning.DEFAULT) == 2
    assert list(table.values("b")) == [2, 3] and list(table.values("a")) == [1]
    with jax.sharding.use_abstract_mesh(_abstract_mesh("NVIDIA H200")):
        assert table.lookup("b") == 3
    merged = table.with_entries(tuning.HOPPER, {"a": 4})
    assert (merged.lookup("a", tuning.HOPPER), merged.lookup("b", tuning.HOPPER)) == (4, 3)
    with pytest.raises(KeyError):
        table.lookup("c", tuning.HOPPER)


def test_bad_tables():
    with pytest.raises(ValueError, match="unknown generation 'volta'"):
        tuning.TuningTable({"a": 1}, {"volta": {"a": 2}})
    with pytest.raises(ValueError, match="entries without a default"):
        tuning.TuningTable({"a": 1}, {tuning.HOPPER: {"b": 2}})


def test_triton_blocks_follow_the_generation():
    """Head dim 256's large blocks need Hopper's shared memory; elsewhere the default ones run,
    and the lowering test compiles both (they are among all_*_configs)."""
    with jax.sharding.use_abstract_mesh(_abstract_mesh("NVIDIA A100-SXM4-80GB")):
        default_forward = config.forward_config(jnp.bfloat16, 256, 4096, 4096)
        default_backward = config.backward_configs(jnp.bfloat16, 256, 4096, 4096)
    with jax.sharding.use_abstract_mesh(_abstract_mesh("NVIDIA H100")):
        hopper_forward = config.forward_config(jnp.bfloat16, 256, 4096, 4096)
        hopper_backward = config.backward_configs(jnp.bfloat16, 256, 4096, 4096)
        assert config.forward_config(jnp.bfloat16, 256, 40, 40).block_q == 64  # still shrinks
    assert (default_forward.block_q, default_forward.block_k) == (64, 64)
    assert (hopper_forward.block_q, hopper_forward.block_k) == (128, 64)
    assert hopper_backward != default_backward
    lowered = {(jnp.dtype(d), h, c) for d, h, c in config.all_forward_configs()}
    lowered_backward = {(k, jnp.dtype(d), h, c) for k, d, h, c in config.all_backward_configs()}
    for dtype in (jnp.float16, jnp.bfloat16):
        assert (jnp.dtype(dtype), 256, hopper_forward) in lowered
        for kernel, chosen in zip(("dkdv", "dq"), hopper_backward):
            assert (kernel, jnp.dtype(dtype), 256, chosen) in lowered_backward
    # Other head dims and float32 are the same on every generation.
    with jax.sharding.use_abstract_mesh(_abstract_mesh("NVIDIA H100")):
        hopper_float32 = config.forward_config(jnp.float32, 256, 4096, 4096)
    assert hopper_float32 == config._FORWARD_TABLE.lookup((4, 256), tuning.DEFAULT)
