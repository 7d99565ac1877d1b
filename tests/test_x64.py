"""Every public function under jax_enable_x64 gives the results it gives without it.

Many scientific JAX programs turn x64 on globally; the kernels compute in int32 and float32
whatever the mode, and index arrays may then arrive as int64. Each case runs once with x64 off
and once on (the global flag, restored afterwards) and compares bitwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa


@pytest.fixture
def x64():
    """A function that runs ``fn()`` with jax_enable_x64 on (globally, as a user would set it)."""
    def run(fn):
        previous = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        try:
            return jax.tree.map(np.asarray, fn())
        finally:
            jax.config.update("jax_enable_x64", previous)
    return run


def _inputs(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _same(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype, (a.dtype, e.dtype)
        np.testing.assert_array_equal(a, e)


def _dense_case():
    q, k, v, dout = _inputs(0, (2, 40, 4, 32), (2, 56, 2, 32), (2, 56, 2, 32), (2, 40, 4, 32))
    slopes = np.full((4,), 0.2, np.float32)

    def run():
        def attend(q, k, v):
            out, lse, probs = fa.flash_attn_func(
                q, k, v, causal=True, window_size=(20, -1), softcap=10.0, alibi_slopes=slopes,
                dropout_p=0.2, dropout_key=jax.random.key(1), return_attn_probs=True)
            return out, (lse, probs)
        out, vjp, (lse, probs) = jax.vjp(attend, *map(jnp.asarray, (q, k, v)), has_aux=True)
        return out, lse, probs, vjp(jnp.asarray(dout))
    return run


def _varlen_case():
    q, k, dout = _inputs(1, (40, 4, 16), (48, 2, 16), (40, 4, 16))

    def run():
        cu_q = jnp.array([0, 10, 30, 36])  # int64 under x64: accepted
        cu_k = jnp.array([0, 20, 20, 48])

        def attend(q, k):
            return fa.flash_attn_varlen_func(q, k, k, cu_q, cu_k, 20, 28, causal=True)
        out, vjp = jax.vjp(jax.jit(attend), jnp.asarray(q), jnp.asarray(k))
        return out, vjp(jnp.asarray(dout))
    return run


def _cache_case(paged):
    q, k_new, cache = _inputs(2, (3, 2, 4, 16), (3, 2, 2, 16), (6, 32, 2, 16))

    def run():
        extra = dict(block_table=jnp.array([[0, 1], [2, 3], [4, 5]]) if paged else {})
        extra = extra if paged else dict(cache_batch_idx=jnp.array([2, 0, 4]),
                                         rotary_cos=jnp.cos(jnp.ones((32, 4), jnp.float32)),
                                         rotary_sin=jnp.sin(jnp.ones((32, 4), jnp.float32)),
                                         cache_leftpad=jnp.array([0, 1, 2]))
        return fa.flash_attn_with_kvcache(
            jnp.asarray(q), jnp.asarray(cache[:, :16] if paged else cache),
            jnp.asarray(cache[:, :16] if paged else cache), jnp.asarray(k_new), jnp.asarray(k_new),
            cache_seqlens=jnp.array([3, 9, 17]), causal=True, return_softmax_lse=True,
            num_splits=2, **extra)
    return run


def _reference_case():
    q, k = _inputs(3, (1, 24, 2, 16), (1, 24, 2, 16))
    return lambda: fa.attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(k),
                                          causal=True)


@pytest.mark.parametrize("case", ["dense", "varlen", "cache contiguous", "cache paged",
                                  "reference"])
def test_x64_gives_the_same_results(case, x64):
    run = {"dense": _dense_case, "varlen": _varlen_case, "reference": _reference_case,
           "cache contiguous": lambda: _cache_case(False),
           "cache paged": lambda: _cache_case(True)}[case]()
    expected = jax.tree.map(np.asarray, run())
    _same(x64(run), expected)


def test_x64_ring_attention(x64):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    q, k = _inputs(4, (1, 64, 2, 16), (1, 64, 2, 16))
    spec = jax.sharding.PartitionSpec(None, "seq")

    def run():
        fn = jax.shard_map(lambda q, k: fa.ring_flash_attn_func(q, k, k, axis_name="seq",
                                                                layout="zigzag", causal=True),
                           mesh=mesh, in_specs=(spec, spec), out_specs=spec)
        return jax.jit(jax.value_and_grad(lambda q, k: fn(q, k).sum()))(jnp.asarray(q),
                                                                       jnp.asarray(k))
    expected = jax.tree.map(np.asarray, run())
    _same(x64(run), expected)
