"""The workloads of benchmarks/bench_mesh.py's scaling benchmarks, checked on a mesh (8 simulated
devices without a GPU, conftest): a transformer block under plain jit with data + tensor
parallel shardings, and a batch-sharded paged decode step with donated caches.

The workloads and the compiled-program checks are benchmarks/mesh_workloads.py's, the ones the
benchmark times and reports. Each case compares the sharded program with the unsharded one and
checks the compiled program for collectives: the block all-reduces (data-parallel gradients,
tensor-parallel partial sums) and gathers none of the attention's operands; the decode step has
no collective at all and writes both caches where they lie.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import flash_attn_jax as fa
from conftest import ON_GPU
from flash_attn_jax.kernels import use_interpret
from helpers import assert_within_tolerance

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import mesh_workloads as mw  # noqa: E402

NUM_DEVICES = len(jax.devices())


def make_mesh(shape, names):
    if NUM_DEVICES < math.prod(shape):
        pytest.skip(f"needs {math.prod(shape)} devices, {NUM_DEVICES} here")
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:math.prod(shape)])


def on_one_device(tree):
    return jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), tree)


def _normal(mesh, spec):
    """A PartitionSpec without mesh axes of size 1 and trailing Nones."""
    entries = [None if e is None or mesh.shape[e] == 1 else e for e in spec]
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def _dense_causal(q, k, v):
    """Causal GQA attention in plain jnp, in the inputs' dtype (attention_reference takes no
    float64 inputs)."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    causal = jnp.tril(jnp.ones(scores.shape[-2:], bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _reference_loss_and_grads(params, tokens, dtype):
    """The block with dense attention, computed in ``dtype`` (float64: the oracle)."""
    cast = lambda tree: jax.tree.map(lambda x: np.asarray(x).astype(dtype), tree)
    return mw.block_train_step(_dense_causal)(cast(params), cast(tokens))


def test_block_data_and_tensor_parallel():
    mesh = make_mesh((4, 2), ("data", "model"))
    config = mw.TINY_BLOCK
    params, tokens = mw.init_block(config, jnp.float32, mw.block_shardings(mesh))
    step = mw.block_train_step()
    compiled = step.lower(params, tokens).compile()
    loss, grads = compiled(params, tokens)

    # The compiled program: all-reduces only, no all-gather of the attention's operands.
    text = compiled.as_text()
    assert mw.gathers_of(text, mw.attention_shapes(config, data_shards=4)) == []
    assert set(mw.collective_counts(text)) == {"all-reduce"}, mw.collective_counts(text)
    # The gradients keep the parameters' and the input's shardings.
    for name, grad in grads[0].items():
        assert _normal(mesh, grad.sharding.spec) == _normal(mesh, mw.BLOCK_SPECS[name]), name
    assert _normal(mesh, grads[1].sharding.spec) == P("data")

    # The unsharded block, up to float32 rounding (partial sums added in another order)...
    plain_loss, plain_grads = step(*on_one_device((params, tokens)))
    for actual, expected in zip(jax.tree.leaves((loss, grads)),
                                jax.tree.leaves((plain_loss, plain_grads))):
        expected = np.asarray(expected)
        np.testing.assert_allclose(actual, expected, rtol=0,
                                   atol=1e-5 * np.abs(expected).max())
    # ...and, under the repository's rule, the float64 block with the reference attention
    # (the float32 one gives the rounding error allowed).
    with jax.enable_x64(True):
        ref = _reference_loss_and_grads(params, tokens, jnp.float64)
        pt = _reference_loss_and_grads(params, tokens, jnp.float32)
    leaves = zip(jax.tree.leaves((loss, grads)), jax.tree.leaves(ref), jax.tree.leaves(pt))
    for i, (actual, r, p) in enumerate(leaves):  # the loss first, then the gradients
        r = np.asarray(r)
        assert_within_tolerance(f"leaf {i}", actual, r, np.asarray(p),
                                factor=2.0 if i == 0 else 3.0, atol=1e-7 * np.abs(r).max())


def test_block_check_finds_gathered_attention_inputs():
    # The check is not vacuous: with the head dim split over "model" (which the attention never
    # splits), q, k and v are gathered in front of it, and the check lists those gathers.
    mesh = make_mesh((2, 4), ("data", "model"))
    config = mw.TINY_BLOCK
    head_dim_split = dict(wq=P(None, None, "model"), wk=P(None, None, "model"),
                          wv=P(None, None, "model"), wo=P(None, "model", None))
    params, tokens = mw.init_block(config, jnp.float32, mw.block_shardings(mesh, head_dim_split))
    text = mw.block_train_step().lower(params, tokens).compile().as_text()
    found = mw.gathers_of(text, mw.attention_shapes(config, data_shards=2))
    assert found and all(gather.dimensions == (3,) for gather in found), [str(g) for g in found]


@pytest.mark.parametrize("backend", [None, "xla"], ids=["default", "xla"])
def test_paged_decode_batch_sharded_in_place(backend):
    if backend == "xla" and ON_GPU:
        pytest.skip("the xla backend's own case is for a CPU")
    mesh = make_mesh((8,), ("data",))
    config = mw.TINY_DECODE
    args = mw.decode_inputs(config, mesh, jnp.float32)
    # The same values again for the unsharded step: on a CPU, reading an array on the host
    # (as moving it to one device does) keeps a reference to its buffers, and a donated buffer
    # held elsewhere is copied, not written in place.
    plain_args = on_one_device(mw.decode_inputs(config, mesh, jnp.float32))
    with fa.use_backend(backend):  # traced (and so dispatched) inside
        (plain_k, plain_v), plain_out = mw.decode_step()(*plain_args)
        compiled = mw.decode_step().lower(*args).compile()
    text = compiled.as_text()
    assert mw.collective_counts(text) == {}  # no gather of the caches, nor anything else
    assert mw.donated_aliases(text) == 2
    buffers = [s.data.unsafe_buffer_pointer() for x in args[:2] for s in x.addressable_shards]
    (k_cache, v_cache), out = compiled(*args)
    if backend == "xla" or not use_interpret():  # (interpret mode copies its loop carries)
        assert [s.data.unsafe_buffer_pointer() for x in (k_cache, v_cache)
                for s in x.addressable_shards] == buffers  # written where they lie
    for x in (k_cache, v_cache, out):
        assert _normal(mesh, x.sharding.spec) == P("data")
    for actual, expected in ((k_cache, plain_k), (v_cache, plain_v)):
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
    if backend is None:  # the kernels on the local rows: bitwise
        np.testing.assert_array_equal(np.asarray(out), np.asarray(plain_out))
    else:  # XLA's CPU code for another batch size may round differently
        np.testing.assert_allclose(np.asarray(out), np.asarray(plain_out), rtol=0, atol=1e-6)
