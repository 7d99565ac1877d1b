"""Backward-specific properties: overflow-prone shapes, the lse cotangent, determinism, and
composition with jit, vmap, remat and value_and_grad."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa
from conftest import ON_GPU
from helpers import (assert_within_tolerance, cotangents, dtype_grid, flash_attn_with_grads,
                     make_inputs, references, run_case, to_f64)


def _overflow_cases():
    """flash-attn's product on a GPU; in interpret mode each (seqlen, head dim) once, causal
    alternating so that every seqlen and every head dim meets both."""
    for i, seqlen in enumerate([1, 2, 5, 17, 128]):
        for j, head_dim in enumerate([16, 32, 64]):
            for causal in (False, True) if ON_GPU else ((i + j) % 2 == 1,):
                yield pytest.param(causal, seqlen, head_dim,
                                   id=f"{'causal' if causal else 'full'}-{seqlen}-d{head_dim}")


@pytest.mark.parametrize("causal,seqlen,head_dim", list(_overflow_cases()))
def test_backward_overflow(causal, seqlen, head_dim):
    # flash-attn's test_flash_attn_bwd_overflow: fp16, logits scaled up (q x5, k x3, v x3); elements
    # past the end must be masked or dQ overflows. Its rule: out <= 2x, grads <= 5x + 1e-3.
    q, k, v, _ = make_inputs(head_dim + seqlen, batch=2, nheads=5, seqlen_q=seqlen, seqlen_k=seqlen,
                             head_dim=head_dim, dtype=jnp.float16, q_scale=5.0)
    k, v = (x * 3 for x in (k, v))
    dout, dlse = cotangents(seqlen, q)
    options = (("causal", causal),)
    out, lse, probs, grads = flash_attn_with_grads(q, k, v, None, dout, dlse, options=options)
    ref, pt = references(q, k, v, None, dout, dlse, causal=causal)
    assert_within_tolerance("out", out, ref[0], pt[0])
    for name, grad, grad_ref, grad_pt in zip(("dq", "dk", "dv"), grads, ref[3], pt[3]):
        assert_within_tolerance(name, grad, grad_ref, grad_pt, factor=5.0, atol=1e-3)


LSE_CASES = {
    "window_alibi_gqa": dict(seqlen_q=77, seqlen_k=91, nheads_k=2, head_dim=64, alibi=True,
                             window_size=(30, 3)),
    "causal_empty_rows": dict(seqlen_q=150, seqlen_k=60, head_dim=40, causal=True),
    "softcap_mqa": dict(seqlen_q=64, seqlen_k=128, nheads_k=1, head_dim=96, q_scale=20.0,
                        softcap=20.0),
}


@pytest.mark.parametrize("dtype,case", dtype_grid(list(LSE_CASES), full=ON_GPU))
def test_lse_cotangent(dtype, case):
    # softmax_lse alone is used downstream (as when partial results are combined): the gradient
    # must follow it. (dS is rounded to the input dtype before the dK/dQ matmuls, as in flash-attn;
    # where one row is a key's only reader, that rounding is the whole error, so these cases keep
    # many rows per key and the tolerance statistic meaningful.)
    run_case(40, dtype=dtype, d_out=False, d_lse=True, **LSE_CASES[case])


def test_lse_and_out_cotangents_together():
    _, _, _, grads = run_case(41, seqlen_q=90, seqlen_k=70, head_dim=32, nheads_k=2,
                              dtype=jnp.bfloat16, d_out=True, d_lse=True, window_size=(20, 20))
    _, _, _, grads_out_only = run_case(41, seqlen_q=90, seqlen_k=70, head_dim=32, nheads_k=2,
                                       dtype=jnp.bfloat16, window_size=(20, 20))
    assert np.abs(to_f64(grads[0]) - to_f64(grads_out_only[0])).max() > 0.1  # the lse term counts


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_bitwise_reproducible(deterministic):
    """deterministic=True: every gradient bitwise the same run to run (on the GPU the real check:
    scheduling varies). False, flash-attn's default: dK and dV still bitwise (each has one
    owner), dQ within rounding (the Mosaic GPU kernels sum it with float32 TMA reductions in
    whatever order the programs run)."""
    # On Hopper, head dim 64 at these lengths takes the Mosaic backward that adds dQ atomically.
    shape = dict(batch=4, seqlen_q=1024, seqlen_k=1024, nheads=8, head_dim=64) if ON_GPU else \
        dict(seqlen_q=100, seqlen_k=130, head_dim=40)
    q, k, v, _ = make_inputs(50, nheads_k=2, dtype=jnp.bfloat16, **shape)
    dout = cotangents(50, q)[0]
    step = jax.jit(lambda q, k, v: jax.vjp(functools.partial(
        fa.flash_attn_func, causal=True, deterministic=deterministic), q, k, v)[1](dout))
    first = [np.asarray(g) for g in step(q, k, v)]
    for _ in range(10 if ON_GPU else 2):
        (dq, *dkdv) = step(q, k, v)
        for a, b in zip(first[1:], dkdv):
            np.testing.assert_array_equal(np.asarray(b).view(np.uint16), a.view(np.uint16))
        if deterministic:
            np.testing.assert_array_equal(np.asarray(dq).view(np.uint16), first[0].view(np.uint16))
        else:  # float32 sums in another order, rounded to bfloat16: one unit in the last place
            expected = to_f64(first[0])
            np.testing.assert_allclose(to_f64(dq), expected, rtol=2.0 ** -7,
                                       atol=1e-6 * np.abs(expected).max())


def _grads(fn, *args):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2)))(*args)


def test_remat_gives_the_same_gradients():
    q, k, v, _ = make_inputs(60, seqlen_q=64, seqlen_k=80, head_dim=32, dtype=jnp.bfloat16)
    attend = functools.partial(fa.flash_attn_func, causal=True)
    for a, b in zip(_grads(attend, q, k, v), _grads(jax.checkpoint(attend), q, k, v)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_vmap_of_grad_equals_loop():
    inputs = [make_inputs(70 + i, seqlen_q=33, seqlen_k=47, nheads_k=1, head_dim=16,
                          dtype=jnp.float32) for i in range(3)]
    q, k, v = (jnp.stack(x) for x in list(zip(*inputs))[:3])
    attend = functools.partial(fa.flash_attn_func, window_size=(9, 4))
    grad = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2))
    batched = jax.jit(jax.vmap(grad))(q, k, v)
    for i in range(3):
        for a, b in zip(batched, grad(q[i], k[i], v[i])):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))


def test_training_step_with_value_and_grad():
    # A one-layer attention model: projections in, flash attention, projection out, squared loss.
    batch, seqlen, width, nheads, head_dim = 2, 48, 32, 4, 8
    keys = jax.random.split(jax.random.PRNGKey(80), 4)
    params = {name: jax.random.normal(key, shape) * 0.2 for name, key, shape in
              zip(("wq", "wkv", "wo"), keys, [(width, width), (width, width), (width, width)])}
    x = jax.random.normal(keys[3], (batch, seqlen, width))
    target = jnp.roll(x, 1, axis=1)

    def loss(params, attend):
        q = (x @ params["wq"]).reshape(batch, seqlen, nheads, head_dim)
        kv = (x @ params["wkv"]).reshape(batch, seqlen, nheads // 2, 2 * head_dim)
        k, v = kv[..., :head_dim], kv[..., head_dim:]
        out = attend(q, k, v).reshape(batch, seqlen, width)
        return jnp.mean((out @ params["wo"] - target) ** 2)

    ours = functools.partial(fa.flash_attn_func, causal=True)
    ref = lambda q, k, v: fa.attention_reference(q, k, v, causal=True, compute_dtype=jnp.float64)[0]

    @jax.jit
    def train_step(params):
        value, grads = jax.value_and_grad(loss)(params, ours)
        return value, grads, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

    value, grads, new_params = train_step(params)
    with jax.enable_x64(True):
        ref_value, ref_grads = jax.value_and_grad(loss)(params, ref)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
    assert train_step(new_params)[0] < value  # a step downhill lowers the loss


def test_packed_gradients_have_packed_shapes():
    q, k, v, _ = make_inputs(90, seqlen_q=40, seqlen_k=40, head_dim=24, dtype=jnp.float32)
    dq, dk, dv = _grads(functools.partial(fa.flash_attn_func, causal=True), q, k, v)
    qkv, kv = jnp.stack([q, k, v], axis=2), jnp.stack([k, v], axis=2)
    dqkv = jax.grad(lambda x: jnp.sum(fa.flash_attn_qkvpacked_func(x, causal=True) ** 2))(qkv)
    dq2, dkv = jax.grad(lambda q, kv: jnp.sum(fa.flash_attn_kvpacked_func(q, kv, causal=True) ** 2),
                        argnums=(0, 1))(q, kv)
    assert dqkv.shape == qkv.shape and dkv.shape == kv.shape
    np.testing.assert_array_equal(dqkv, jnp.stack([dq, dk, dv], axis=2))
    np.testing.assert_array_equal(dkv, jnp.stack([dk, dv], axis=2))
    np.testing.assert_array_equal(dq2, dq)


def test_gqa_gradients_sum_over_the_group():
    # dK/dV of a kv head shared by 3 query heads equal the sum over 3 copies of that head.
    q, k, v, _ = make_inputs(95, seqlen_q=30, seqlen_k=50, nheads=6, nheads_k=2, head_dim=16,
                             dtype=jnp.float32)
    attend = functools.partial(fa.flash_attn_func, window_size=(7, 7))
    _, dk, dv = _grads(attend, q, k, v)
    _, dk_rep, dv_rep = _grads(attend, q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2))
    np.testing.assert_allclose(dk, dk_rep.reshape(2, 50, 2, 3, 16).sum(3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dv, dv_rep.reshape(2, 50, 2, 3, 16).sum(3), rtol=1e-5, atol=1e-6)


def test_second_order_raises_clear_error():
    q = jnp.ones((1, 8, 2, 16), jnp.float32)
    first = jax.grad(lambda q: jnp.sum(fa.flash_attn_func(q, q, q) ** 2))
    with pytest.raises(NotImplementedError, match="second-order"):
        jax.grad(lambda q: jnp.sum(first(q)))(q)


def test_grads_through_run_case_with_all_features():
    run_case(99, seqlen_q=70, seqlen_k=150, head_dim=96, nheads_k=2, dtype=jnp.float16,
             causal=True, window_size=(40, -1), softcap=20.0, q_scale=20.0, alibi=True)
