"""The jnp reference against a naive float64 NumPy implementation written from the contract.

The kernels share their score semantics with the reference, so this independent implementation is
what checks those semantics themselves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa
from helpers import make_inputs


def naive_attention(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0, slopes=None,
                    keep=None, dropout_p=0.0):
    """Row by row, straight from api_contract.md; float64 throughout."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    left, right = window
    if causal:
        right = 0
    out = np.zeros(q.shape)
    lse = np.full((batch, nheads, seqlen_q), -np.inf)
    for b in range(batch):
        for h in range(nheads):
            kv_head = h // (nheads // nheads_k)
            for i in range(seqlen_q):
                x = scale * (k[b, :, kv_head] @ q[b, i, h])
                if softcap > 0:
                    x = softcap * np.tanh(x / softcap)
                pos = i + seqlen_k - seqlen_q
                if slopes is not None:
                    x = x - slopes[b, h] * np.abs(pos - np.arange(seqlen_k))
                j = np.arange(seqlen_k)
                allowed = np.ones(seqlen_k, bool)
                if left >= 0:
                    allowed &= j >= pos - left
                if right >= 0:
                    allowed &= j <= pos + right
                if not allowed.any():
                    continue
                x = np.where(allowed, x, -np.inf)
                m = x.max()
                lse[b, h, i] = m + np.log(np.exp(x - m).sum())
                p = np.exp(x - lse[b, h, i])
                if keep is not None:
                    p = np.where(keep[b, h, i], p / (1 - dropout_p), 0.0)
                out[b, i, h] = p @ v[b, :, kv_head]
    return out, lse


CASES = [
    dict(),
    dict(causal=True),
    dict(window=(2, 1)),
    dict(window=(-1, 3)),
    dict(window=(4, -1)),
    dict(softcap=2.0),
    dict(slopes=True),
    dict(causal=True, slopes=True, softcap=1.5, window=(3, 5)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("seqlens", [(5, 9), (9, 5), (7, 7), (1, 6), (6, 1)])
@pytest.mark.parametrize("nheads_k", [4, 2, 1])
def test_reference_matches_naive_float64(case, seqlens, nheads_k):
    q, k, v, slopes = make_inputs(1, seqlen_q=seqlens[0], seqlen_k=seqlens[1], nheads_k=nheads_k,
                                  head_dim=8, dtype=jnp.float32, alibi=case.get("slopes", False))
    scale = 0.4
    expected_out, expected_lse = naive_attention(
        q, k, v, scale=scale, causal=case.get("causal", False), window=case.get("window", (-1, -1)),
        softcap=case.get("softcap", 0.0), slopes=None if slopes is None else np.asarray(slopes))
    with jax.enable_x64(True):
        out, lse = fa.attention_reference(
            q, k, v, softmax_scale=scale, causal=case.get("causal", False),
            window_size=case.get("window", (-1, -1)), softcap=case.get("softcap", 0.0),
            alibi_slopes=slopes, compute_dtype=jnp.float64)
        out, lse = np.asarray(out, np.float64), np.asarray(lse)
    np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(lse[finite], expected_lse[finite], rtol=1e-10, atol=1e-10)


def test_reference_dropout_keep_mask_matches_naive():
    q, k, v, _ = make_inputs(2, seqlen_q=6, seqlen_k=7, head_dim=8, dtype=jnp.float32)
    keep = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(3), 0.7, (2, 4, 6, 7)))
    expected_out, expected_lse = naive_attention(q, k, v, scale=0.3, causal=True, keep=keep, dropout_p=0.3)
    out, lse = fa.attention_reference(q, k, v, softmax_scale=0.3, causal=True, keep_mask=keep,
                                      dropout_p=0.3)
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_reference_alibi_head_slopes_broadcast():
    q, k, v, slopes = make_inputs(3, seqlen_q=5, seqlen_k=6, head_dim=8, dtype=jnp.float32, alibi=True)
    per_head = slopes[0]
    a = fa.attention_reference(q, k, v, alibi_slopes=per_head)
    b = fa.attention_reference(q, k, v, alibi_slopes=jnp.broadcast_to(per_head, (2, 4)))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_reference_empty_rows_are_zero_without_nan_in_gradients():
    # sq > sk with causal: the first rows see no key.
    q, k, v, _ = make_inputs(4, seqlen_q=9, seqlen_k=4, head_dim=8, dtype=jnp.float32)

    def loss(q, k, v):
        out, lse = fa.attention_reference(q, k, v, causal=True)
        return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    out, lse = fa.attention_reference(q, k, v, causal=True)
    assert np.all(np.asarray(out)[:, :5] == 0.0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, :5]))
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    assert np.all(np.asarray(grads[0])[:, :5] == 0.0)


def test_reference_probs_sum_to_one_on_nonempty_rows():
    q, k, v, _ = make_inputs(5, seqlen_q=7, seqlen_k=5, head_dim=8, dtype=jnp.float32)
    _, lse, probs = fa.attention_reference(q, k, v, window_size=(1, 0), return_probs=True)
    sums = np.asarray(probs).sum(-1)
    nonempty = np.isfinite(np.asarray(lse))
    np.testing.assert_allclose(sums[nonempty], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(sums[~nonempty], 0.0)
