"""Dropout in every dense and varlen function against the reference run with the same keep mask.

The keep mask is a pure function of (key, batch row, head, row, column) (semantics.dropout_keep);
``flash_attn_jax.dropout_mask`` builds it for the reference, so outputs and gradients follow the
usual tolerance rule. S_dmask carries the mask in its sign bits.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa
from helpers import (DTYPE_IDS, DTYPES, check_against_reference, cotangents, make_inputs,
                     references)
from test_varlen import LENGTHS, make_varlen, sequence_references

KEY = jax.random.key(2024)

FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(37, 11)),
    "softcap_alibi": dict(softcap=20.0, q_scale=20.0, alibi=True),
    "causal_window_alibi": dict(causal=True, window_size=(29, 3), alibi=True),
}
SEQLENS = [(113, 203), (203, 113), (128, 128), (97, 97)]


@functools.partial(jax.jit, static_argnames=("options",))
def dropout_with_grads(q, k, v, slopes, key, dout, *, options):
    def attend(q, k, v):
        out, lse, s_dmask = fa.flash_attn_func(q, k, v, alibi_slopes=slopes, return_attn_probs=True,
                                               dropout_key=key, **dict(options))
        return out, (lse, s_dmask)
    out, vjp, (lse, s_dmask) = jax.vjp(attend, q, k, v, has_aux=True)
    return out, lse, s_dmask, vjp(dout)


def run_dropout_case(seed, *, dtype, seqlen_q, seqlen_k, head_dim, dropout_p=0.17, nheads_k=2,
                     alibi=False, q_scale=1.0, key=KEY, **options):
    q, k, v, slopes = make_inputs(seed, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads_k=nheads_k,
                                  head_dim=head_dim, dtype=dtype, alibi=alibi, q_scale=q_scale)
    dout, dlse = cotangents(seed, q)
    options = dict(options, dropout_p=dropout_p)
    out, lse, s_dmask, grads = dropout_with_grads(q, k, v, slopes, key, dout,
                                                  options=tuple(sorted(options.items())))
    keep = fa.dropout_mask(key, dropout_p, q.shape[0], q.shape[2], seqlen_q, seqlen_k)
    reference_options = {n: x for n, x in options.items() if n != "dropout_p"}
    ref, pt = references(q, k, v, slopes, dout, dlse, dropout_p=dropout_p, keep_mask=keep,
                         **reference_options)
    chex.assert_shape(s_dmask, keep.shape)
    # The sign bit of S_dmask is the mask exactly; its magnitude is the pre-dropout P.
    np.testing.assert_array_equal(np.signbit(np.asarray(s_dmask)), ~np.asarray(keep))
    check_against_reference(out, lse, np.abs(np.asarray(s_dmask)), ref, pt, grads)
    return out, lse, s_dmask, grads


def _cases():
    """Each feature with one dtype, rotating, and the plain case with every dtype."""
    cases = [(i, i % 3, feature) for i, feature in enumerate(FEATURES)]
    cases += [(len(FEATURES) + t, t, "plain") for t in (1, 2)]
    for n, t, feature in cases:
        seqlens = SEQLENS[n % len(SEQLENS)]
        yield pytest.param(DTYPES[t], feature, seqlens, (16, 40, 64, 128)[n % 4],
                           id=f"{DTYPE_IDS[t]}-{feature}-{seqlens}")


@pytest.mark.parametrize("dtype,feature,seqlens,head_dim", list(_cases()))
def test_features(dtype, feature, seqlens, head_dim):
    run_dropout_case(0, dtype=dtype, seqlen_q=seqlens[0], seqlen_k=seqlens[1], head_dim=head_dim,
                     **FEATURES[feature])


def test_same_key_is_bitwise_reproducible_and_keys_differ():
    first = run_dropout_case(1, dtype=jnp.bfloat16, seqlen_q=64, seqlen_k=96, head_dim=32,
                             causal=True)
    again = run_dropout_case(1, dtype=jnp.bfloat16, seqlen_q=64, seqlen_k=96, head_dim=32,
                             causal=True)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    other = run_dropout_case(1, dtype=jnp.bfloat16, seqlen_q=64, seqlen_k=96, head_dim=32,
                             causal=True, key=jax.random.key(7))
    assert np.mean(np.signbit(np.asarray(first[2])) != np.signbit(np.asarray(other[2]))) > 0.1


def test_raw_uint32_key_equals_typed_key():
    q, k, v, _ = make_inputs(2, seqlen_q=32, seqlen_k=32, head_dim=16, dtype=jnp.float32)
    typed = fa.flash_attn_func(q, k, v, 0.3, dropout_key=jax.random.key(5))
    raw = fa.flash_attn_func(q, k, v, 0.3, dropout_key=jax.random.PRNGKey(5))
    np.testing.assert_array_equal(np.asarray(typed), np.asarray(raw))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropped_fraction(p):
    q, k, v, _ = make_inputs(3, batch=1, seqlen_q=128, seqlen_k=128, head_dim=16,
                             dtype=jnp.bfloat16)
    _, _, s_dmask = fa.flash_attn_func(q, k, v, p, return_attn_probs=True, dropout_key=KEY)
    assert s_dmask.shape == (1, 4, 128, 128)
    assert abs(float(np.mean(np.signbit(np.asarray(s_dmask)))) - p) <= 0.01


def test_vmap_shares_the_key_unless_keys_are_split():
    # Documented: vmapped calls with one key draw the same mask; split keys give independent ones.
    q, k, v, _ = make_inputs(4, seqlen_q=48, seqlen_k=48, head_dim=16, dtype=jnp.float32)
    stacked = [jnp.stack([x, x]) for x in (q, k, v)]
    probs = lambda q, k, v, key: fa.flash_attn_func(q, k, v, 0.5, return_attn_probs=True,
                                                    dropout_key=key)[2]
    shared = jax.vmap(probs, in_axes=(0, 0, 0, None))(*stacked, KEY)
    np.testing.assert_array_equal(np.asarray(shared[0]), np.asarray(shared[1]))
    np.testing.assert_array_equal(np.asarray(shared[0]), np.asarray(probs(q, k, v, KEY)))
    split = jax.vmap(probs)(*stacked, jax.random.split(KEY, 2))
    assert np.mean(np.signbit(np.asarray(split[0])) != np.signbit(np.asarray(split[1]))) > 0.3


def test_packed_functions_take_dropout():
    q, k, v, _ = make_inputs(5, seqlen_q=40, seqlen_k=40, head_dim=16, dtype=jnp.float32)
    expected = fa.flash_attn_func(q, k, v, 0.25, causal=True, dropout_key=KEY)
    qkv = fa.flash_attn_qkvpacked_func(jnp.stack([q, k, v], axis=2), 0.25, causal=True,
                                       dropout_key=KEY)
    kv = fa.flash_attn_kvpacked_func(q, jnp.stack([k, v], axis=2), 0.25, causal=True,
                                     dropout_key=KEY)
    np.testing.assert_array_equal(np.asarray(qkv), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(kv), np.asarray(expected))


def test_varlen():
    # Sequence b's mask is that of batch row b: positions inside the sequence, its own index.
    seqlens, tail = LENGTHS["mixed"]
    run_varlen_dropout_case(seqlens, tail, head_dim=40, max_seqlen=(33, 40))


def run_varlen_dropout_case(seqlens, tail, *, head_dim, max_seqlen, dtype=jnp.bfloat16, p=0.2):
    """flash_attn_varlen_func with dropout, causal, ALiBi and GQA, forward and backward: S_dmask's
    signs against each sequence's mask and every output against the reference. Returns the
    backends the call's forward and backward ran on. ``max_seqlen``: an int or (q, k)."""
    q, k, v, cu_q, cu_k, slopes, dout = make_varlen(6, seqlens, tail, nheads=4, nheads_k=2,
                                                    head_dim=head_dim, dtype=dtype, alibi=True)
    max_q, max_k = (max_seqlen, max_seqlen) if isinstance(max_seqlen, int) else max_seqlen

    def attend(q, k, v):
        out, lse, s_dmask = fa.flash_attn_varlen_func(
            q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k), max_q, max_k, p, causal=True,
            alibi_slopes=slopes, return_attn_probs=True, dropout_key=KEY)
        return (out, lse), s_dmask

    used = fa.backends_used(jax.grad(lambda *x: attend(*x)[0][0].sum(), argnums=(0, 1, 2)),
                            q, k, v)
    (out, lse), vjp, s_dmask = jax.vjp(attend, q, k, v, has_aux=True)
    grads = vjp((dout, jnp.zeros_like(lse)))
    keep = np.zeros(s_dmask.shape, bool)
    for b, (sq, sk) in enumerate(seqlens):
        keep[b, :, :sq, :sk] = fa.dropout_mask(KEY, p, 1, 4, sq, sk, first_batch=b)[0]
    inside = np.zeros(s_dmask.shape, bool)
    for b, (sq, sk) in enumerate(seqlens):
        inside[b, :, :sq, :sk] = True
    np.testing.assert_array_equal(np.signbit(np.asarray(s_dmask))[inside], ~keep[inside])

    def per_sequence_keep(b, sq, sk):
        return fa.dropout_mask(KEY, p, 1, 4, sq, sk, first_batch=b)

    ref, pt = sequence_references(q, k, v, cu_q, cu_k, slopes, dout, max_q, max_k, causal=True,
                                  dropout_p=p, keep_mask_of=per_sequence_keep)
    check_against_reference(out, lse, np.abs(np.asarray(s_dmask)), ref, pt, grads)
    return used
