"""Variable-length attention against the reference run sequence by sequence.

Each case packs a few sequences of different lengths (empty ones, sq > sk, sq < sk, padding after
the last sequence, overestimated max_seqlen), runs flash_attn_varlen_func forward and backward,
and checks the packed out, softmax_lse (H, total_q), S_dmask (B, H, max_q, max_k) and dq, dk, dv
against the dense reference applied to each sequence alone, with flash-attn's tolerance rule over
the whole packed arrays.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa
from conftest import ON_GPU
from helpers import (DTYPE_IDS, DTYPES, assert_within_tolerance, check_against_reference,
                     references)

# (seqlen_q, seqlen_k) of each sequence, and padding tokens after the last one (q, k).
LENGTHS = {
    "mixed": ([(5, 7), (0, 3), (17, 0), (33, 40)], (3, 2)),
    "long-short": ([(70, 1), (1, 90), (64, 64)], (0, 0)),
    "ragged": ([(13, 29), (41, 23), (2, 2), (0, 0)], (5, 0)),
}
FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(9, 4)),
    "softcap": dict(softcap=20.0, q_scale=20.0),
    "alibi": dict(alibi=True),
    "causal_alibi": dict(causal=True, alibi=True),
    "window_softcap_alibi": dict(window_size=(12, -1), softcap=10.0, q_scale=10.0, alibi=True),
}
HEAD_DIMS = (16, 40, 59, 64, 128)
HEADS = ((4, 4), (4, 2), (4, 1))  # (nheads, nheads_k): MHA, GQA, MQA


def cumulative(lengths, tail):
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return cu, int(cu[-1]) + tail


def make_varlen(seed, seqlens, tail, *, nheads, nheads_k, head_dim, dtype, alibi=False,
                q_scale=1.0):
    """Packed q (total_q, H, D), k, v (total_k, Hk, D), cu_seqlens and (batch, H) slopes."""
    rng = np.random.default_rng(seed)
    cu_q, total_q = cumulative([sq for sq, _ in seqlens], tail[0])
    cu_k, total_k = cumulative([sk for _, sk in seqlens], tail[1])

    def normal(shape, scale=1.0):
        return jnp.asarray((rng.standard_normal(shape, np.float32) * scale).astype(jnp.dtype(dtype)))

    q = normal((total_q, nheads, head_dim), q_scale)
    k, v = normal((total_k, nheads_k, head_dim)), normal((total_k, nheads_k, head_dim))
    slopes = (jnp.asarray(rng.uniform(0.0, 0.3, (len(seqlens), nheads)).astype(np.float32))
              if alibi else None)
    dout = jnp.asarray(rng.standard_normal(q.shape, np.float32).astype(jnp.dtype(dtype)))
    return q, k, v, cu_q, cu_k, slopes, dout


def sequence_references(q, k, v, cu_q, cu_k, slopes, dout, max_q, max_k, keep_mask_of=None,
                        **options):
    """(ref, pt) like helpers.references, assembled in the varlen layouts from the dense
    reference of each sequence alone; tokens outside every sequence: out 0, lse -inf, grads 0.
    ``keep_mask_of(b, seqlen_q, seqlen_k)``: sequence b's dropout keep mask."""
    batch, num_heads = len(cu_q) - 1, q.shape[1]
    assembled = []
    for _ in range(2):
        assembled.append([np.zeros(q.shape), np.full((num_heads, q.shape[0]), -np.inf),
                          np.zeros((batch, num_heads, max_q, max_k)),
                          (np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape))])
    for b in range(batch):
        rows, cols = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        seqlen_q, seqlen_k = rows.stop - rows.start, cols.stop - cols.start
        if seqlen_q == 0:
            continue
        dlse = jnp.zeros((1, num_heads, seqlen_q), jnp.float32)
        if keep_mask_of is not None:
            options["keep_mask"] = keep_mask_of(b, seqlen_q, seqlen_k)
        per_sequence = references(q[None, rows], k[None, cols], v[None, cols],
                                  None if slopes is None else slopes[b:b + 1], dout[None, rows],
                                  dlse, **options)
        for target, (out, lse, probs, (dq, dk, dv)) in zip(assembled, per_sequence):
            target[0][rows], target[1][:, rows] = out[0], lse[0]
            target[2][b, :, :seqlen_q, :seqlen_k] = probs[0]
            target[3][0][rows], target[3][1][cols], target[3][2][cols] = dq[0], dk[0], dv[0]
    return tuple(assembled)


@functools.partial(jax.jit, static_argnames=("max_q", "max_k", "options"))
def varlen_with_grads(q, k, v, cu_q, cu_k, slopes, dout, *, max_q, max_k, options):
    def attend(q, k, v):
        out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k,
                                                    alibi_slopes=slopes, return_attn_probs=True,
                                                    **dict(options))
        return (out, lse), probs
    (out, lse), vjp, probs = jax.vjp(attend, q, k, v, has_aux=True)
    return out, lse, probs, vjp((dout, jnp.zeros_like(lse)))


def run_varlen_case(seed, seqlens, tail, *, dtype, head_dim, heads=(4, 4), alibi=False,
                    q_scale=1.0, max_extra=0, **options):
    """One packed batch of ``seqlens`` (+ ``tail`` padding tokens) through flash_attn_varlen_func,
    forward and backward, checked against the per-sequence references."""
    q, k, v, cu_q, cu_k, slopes, dout = make_varlen(
        seed, seqlens, tail, nheads=heads[0], nheads_k=heads[1], head_dim=head_dim, dtype=dtype,
        alibi=alibi, q_scale=q_scale)
    max_q = max(sq for sq, _ in seqlens) + max_extra
    max_k = max(sk for _, sk in seqlens) + max_extra
    out, lse, probs, grads = varlen_with_grads(
        q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k), slopes, dout, max_q=max_q, max_k=max_k,
        options=tuple(sorted(options.items())))
    batch = len(seqlens)
    chex.assert_shape([out, lse, probs, *grads], [q.shape, (heads[0], q.shape[0]),
                                                  (batch, heads[0], max_q, max_k), q.shape,
                                                  k.shape, v.shape])
    chex.assert_type([out, lse, probs, *grads], [q.dtype, jnp.float32, jnp.float32] + [q.dtype] * 3)
    ref, pt = sequence_references(q, k, v, cu_q, cu_k, slopes, dout, max_q, max_k, **options)
    check_against_reference(out, lse, probs, ref, pt, grads)
    return out, lse, grads


def _covering_cases():
    """Each feature with one dtype, rotating, and the plain case with every dtype; length sets,
    head dims and head counts rotate (a covering design that keeps the CPU suite's time)."""
    cases = [(i, i % 3, feature) for i, feature in enumerate(FEATURES)]
    cases += [(len(FEATURES) + t, t, "plain") for t in (1, 2)]
    for n, t, feature in cases:
        lengths = list(LENGTHS)[(n + n // 3) % len(LENGTHS)]
        yield pytest.param(DTYPES[t], feature, lengths, HEAD_DIMS[n % len(HEAD_DIMS)],
                           HEADS[n % len(HEADS)], id=f"{DTYPE_IDS[t]}-{feature}-{lengths}")


@pytest.mark.parametrize("dtype,feature,lengths,head_dim,heads", list(_covering_cases()))
def test_features(dtype, feature, lengths, head_dim, heads):
    run_varlen_case(0, *LENGTHS[lengths], dtype=dtype, head_dim=head_dim, heads=heads,
                    max_extra=head_dim % 3, **FEATURES[feature])


def test_empty_sequences_and_padding_tokens():
    out, lse, (dq, dk, dv) = run_varlen_case(1, *LENGTHS["mixed"], dtype=jnp.float32, head_dim=32,
                                             causal=True)
    cu_q, total_q = cumulative([sq for sq, _ in LENGTHS["mixed"][0]], 3)
    cu_k, _ = cumulative([sk for _, sk in LENGTHS["mixed"][0]], 2)
    tail_q, tail_k = slice(cu_q[-1], None), slice(cu_k[-1], None)
    empty_keys = slice(cu_q[2], cu_q[3])  # the sequence with 17 queries and no key
    for rows in (tail_q, empty_keys):
        assert np.all(np.asarray(out[rows]) == 0) and np.all(np.asarray(dq[rows]) == 0)
        assert np.all(np.asarray(lse[:, rows]) == -np.inf)
    assert np.all(np.asarray(dk[tail_k]) == 0) and np.all(np.asarray(dv[tail_k]) == 0)


def test_equal_lengths_match_the_dense_function():
    # A batch of equal-length sequences is the dense layout: the same kernels' numbers.
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 48, 4, 64)).astype(np.float16)) for _ in range(3))
    cu = jnp.asarray([0, 48, 96], jnp.int32)
    dense = fa.flash_attn_func(q, k, v, causal=True)
    packed = fa.flash_attn_varlen_func(q.reshape(96, 4, 64), k.reshape(96, 4, 64),
                                       v.reshape(96, 4, 64), cu, cu, 48, 48, causal=True)
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(dense).reshape(96, 4, 64))


def test_packed_variants_are_views_of_the_unpacked_call():
    rng = np.random.default_rng(4)
    qkv = jnp.asarray(rng.standard_normal((50, 3, 4, 32)).astype(np.float32))
    cu = jnp.asarray([0, 20, 45], jnp.int32)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]

    def loss(fn, *args):
        return jnp.sum(jnp.sin(fn(*args)))

    unpacked = jax.value_and_grad(
        lambda q, k, v: loss(fa.flash_attn_varlen_func, q, k, v, cu, cu, 25, 25, 0.0, None, True),
        argnums=(0, 1, 2))(q, k, v)
    qkv_packed = jax.value_and_grad(
        lambda qkv: loss(fa.flash_attn_varlen_qkvpacked_func, qkv, cu, 25, 0.0, None, True))(qkv)
    kv_packed = jax.value_and_grad(
        lambda q, kv: loss(fa.flash_attn_varlen_kvpacked_func, q, kv, cu, cu, 25, 25, 0.0, None,
                           True), argnums=(0, 1))(q, qkv[:, 1:])
    chex.assert_shape([qkv_packed[1], kv_packed[1][1]], [qkv.shape, (50, 2, 4, 32)])
    expected = np.stack([np.asarray(g) for g in unpacked[1]], axis=1)
    np.testing.assert_array_equal(np.asarray(qkv_packed[1]), expected)
    np.testing.assert_array_equal(np.asarray(kv_packed[1][1]), expected[:, 1:])
    np.testing.assert_array_equal(np.asarray(kv_packed[1][0]), expected[:, 0])
    assert float(qkv_packed[0]) == float(unpacked[0]) == float(kv_packed[0])


def paged_copy(k, v, cu_k, page_size, seed, num_heads_k):
    """K/V scattered into shuffled pages of a (num_blocks, page, Hk, D) pool, and the table."""
    lengths = np.diff(cu_k)
    max_pages = max(1, int(-(-lengths.max() // page_size)))
    num_blocks = len(lengths) * max_pages + 3
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_blocks)
    table = order[:len(lengths) * max_pages].reshape(len(lengths), max_pages).astype(np.int32)
    pools = []
    for x in (k, v):
        pool = rng.standard_normal((num_blocks, page_size, num_heads_k, x.shape[-1])).astype(np.float32)
        pool = pool.astype(jnp.dtype(x.dtype))
        for b, length in enumerate(lengths):
            for j in range(length):
                pool[table[b, j // page_size], j % page_size] = np.asarray(x[cu_k[b] + j])
        pools.append(jnp.asarray(pool))
    return pools[0], pools[1], jnp.asarray(table)


@pytest.mark.parametrize("page_size,dtype,options", [
    (16, jnp.bfloat16, dict(causal=True)),
    (32, jnp.float16, dict(window_size=(10, 3), alibi=True)),
    (64, jnp.float32, dict(softcap=15.0)),
], ids=["p16-bf16-causal", "p32-fp16-window-alibi", "p64-fp32-softcap"])
def test_paged_keys(page_size, dtype, options):
    alibi = options.pop("alibi", False)
    seqlens, tail = LENGTHS["ragged"]
    q, k, v, cu_q, cu_k, slopes, dout = make_varlen(5, seqlens, tail, nheads=4, nheads_k=2,
                                                    head_dim=40, dtype=dtype, alibi=alibi)
    k_pages, v_pages, table = paged_copy(k, v, cu_k, page_size, 6, 2)
    max_q, max_k = 41, 29
    out, lse, probs = jax.jit(
        lambda q, kp, vp, cu_q, cu_k, t: fa.flash_attn_varlen_func(
            q, kp, vp, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes, return_attn_probs=True,
            block_table=t, **options))(q, k_pages, v_pages, jnp.asarray(cu_q), jnp.asarray(cu_k),
                                       table)
    ref, pt = sequence_references(q, k, v, cu_q, cu_k, slopes, dout, max_q, max_k, **options)
    check_against_reference(out, lse, probs, ref, pt)


def test_paged_keys_have_no_gradient():
    q = jnp.ones((8, 2, 16), jnp.float32)
    pages = jnp.ones((2, 16, 2, 16), jnp.float32)
    cu, table = jnp.asarray([0, 8], jnp.int32), jnp.asarray([[1]], jnp.int32)
    loss = lambda q: jnp.sum(fa.flash_attn_varlen_func(q, pages, pages, cu, cu, 8, 8,
                                                       block_table=table))
    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.grad(loss)(q)


def test_vmap_over_an_outer_axis_equals_a_loop():
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 30, 2, 16)).astype(np.float32)) for _ in range(3))
    cu = jnp.asarray([[0, 10, 30], [0, 25, 30], [0, 0, 30]], jnp.int32)

    def attend(q, k, v, cu):
        return fa.flash_attn_varlen_func(q, k, v, cu, cu, 30, 30, causal=True)

    shared = jax.jit(jax.vmap(attend, in_axes=(0, 0, 0, None)))(q, k, v, cu[0])
    batched = jax.jit(jax.vmap(attend))(q, k, v, cu)
    for i in range(3):
        np.testing.assert_allclose(shared[i], attend(q[i], k[i], v[i], cu[0]), rtol=0, atol=1e-6)
        np.testing.assert_allclose(batched[i], attend(q[i], k[i], v[i], cu[i]), rtol=0, atol=1e-6)


def test_lse_cotangent_reaches_the_inputs():
    # softmax_lse (H, total_q) is differentiable like the dense one.
    seqlens, tail = LENGTHS["long-short"]
    q, k, v, cu_q, cu_k, _, _ = make_varlen(8, seqlens, tail, nheads=2, nheads_k=2, head_dim=16,
                                            dtype=jnp.float32)

    def total_lse(attention, q, k, v):
        return jnp.sum(jnp.where(jnp.isfinite(attention(q, k, v)), attention(q, k, v), 0.0))

    kernel = lambda q, k, v: fa.flash_attn_varlen_func(
        q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k), 70, 90, return_attn_probs=True)[1]

    def reference(q, k, v):
        parts = [fa.attention_reference(q[None, cu_q[b]:cu_q[b + 1]], k[None, cu_k[b]:cu_k[b + 1]],
                                        v[None, cu_k[b]:cu_k[b + 1]])[1][0] for b in range(3)]
        return jnp.concatenate(parts, axis=1)

    grads = jax.grad(functools.partial(total_lse, kernel), argnums=(0, 1))(q, k, v)
    expected = jax.grad(functools.partial(total_lse, reference), argnums=(0, 1))(q, k, v)
    for name, got, want in zip(("dq", "dk"), grads, expected):
        assert_within_tolerance(name, got, np.asarray(want, np.float64), np.asarray(want, np.float64),
                                atol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_bitwise_reproducible(deterministic):
    """As test_backward's: deterministic=True every gradient bitwise run to run (the real check is
    on the GPU, where scheduling varies); False: dK and dV bitwise, dQ within rounding (on Hopper,
    head dim 64 takes the Mosaic backward that adds dQ by float32 TMA reductions)."""
    seqlens = [(700, 900), (1024, 1024), (1, 300), (513, 129)] if ON_GPU else LENGTHS["ragged"][0]
    q, k, v, cu_q, cu_k, _, dout = make_varlen(9, seqlens, (0, 0), nheads=8, nheads_k=2,
                                               head_dim=64 if ON_GPU else 40, dtype=jnp.bfloat16)
    max_q, max_k = (max(s[i] for s in seqlens) for i in (0, 1))
    attend = functools.partial(fa.flash_attn_varlen_func, cu_seqlens_q=jnp.asarray(cu_q),
                               cu_seqlens_k=jnp.asarray(cu_k), max_seqlen_q=max_q,
                               max_seqlen_k=max_k, causal=True, deterministic=deterministic)
    step = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](dout))
    first = [np.asarray(g) for g in step(q, k, v)]
    for _ in range(10 if ON_GPU else 2):
        (dq, *dkdv) = step(q, k, v)
        for a, b in zip(first[1:], dkdv):
            np.testing.assert_array_equal(np.asarray(b).view(np.uint16), a.view(np.uint16))
        if deterministic:
            np.testing.assert_array_equal(np.asarray(dq).view(np.uint16), first[0].view(np.uint16))
        else:  # float32 sums in another order, rounded to bfloat16: one unit in the last place
            expected = np.asarray(first[0], np.float64)
            np.testing.assert_allclose(np.asarray(dq, np.float64), expected, rtol=2.0 ** -7,
                                       atol=1e-6 * np.abs(expected).max())
