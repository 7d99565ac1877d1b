"""The adapters (``flash_attn_jax.adapters``) against ``jax.nn.dot_product_attention``'s XLA
implementation, an independent reference with the same conventions (top-left causal mask and
window, padded sequence lengths): flash-attn's tolerance rule, float32 reference computed by
jax.nn on upcast inputs, same-dtype reference by jax.nn in the input dtype."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa
from conftest import ON_GPU
from helpers import assert_within_tolerance, rotating_grid


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    """The references here are XLA's attention (jax.nn's, Flax's), whose float32 matmuls on a GPU
    default to TF32 (10-bit mantissas): in full float32 they are references again."""
    with jax.default_matmul_precision("highest"):
        yield


def _inputs(seed, batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, dtype):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    shapes = [(batch or 1, seqlen_q, heads, head_dim)] + [(batch or 1, seqlen_k, heads_k,
                                                           head_dim)] * 2
    arrays = [jax.random.normal(key, shape, jnp.float32).astype(dtype)
              for key, shape in zip(keys, shapes)]
    return [a[0] for a in arrays] if batch is None else arrays


def _references(q, k, v, **options):
    """jax.nn in float32 (reference) and in the inputs' dtype (same-dtype reference)."""
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)),
                                       implementation="xla", **options)
    same = jax.nn.dot_product_attention(q, k, v, implementation="xla", **options)
    return np.asarray(ref, np.float64), np.asarray(same.astype(jnp.float32), np.float64)


# (batch, Sq, Sk, options): top-left alignment with fewer and more keys than queries.
CASES = [
    (2, 48, 48, dict(is_causal=True)),
    (2, 40, 72, dict(is_causal=True)),
    (2, 72, 40, dict(is_causal=True)),
    (1, 48, 80, dict(local_window_size=(8, 5))),
    (2, 64, 40, dict(local_window_size=12)),  # the last 12 queries see no key
    (1, 72, 24, dict(local_window_size=(30, 2), is_causal=True)),
    (1, 40, 64, dict(local_window_size=(10, 20), is_causal=True)),
    (1, 56, 56, dict(scale=0.3)),
    (None, 40, 56, dict(is_causal=True)),  # one example, rank 3
]


def _rows_with_keys(seqlen_q, seqlen_k, is_causal=False, local_window_size=None, **_):
    """Which query rows jax.nn's top-left mask leaves at least one key (its own definition)."""
    left, right = ((None, None) if local_window_size is None else
                   (local_window_size,) * 2 if isinstance(local_window_size, int) else
                   local_window_size)
    i, j = np.arange(seqlen_q)[:, None], np.arange(seqlen_k)[None, :]
    keep = np.ones((seqlen_q, seqlen_k), bool)
    if is_causal:
        keep &= j <= i
    if left is not None:
        keep &= (j >= i - left) & (j <= i + right)
    return keep.any(1)


# Every case with each dtype on a GPU; on a CPU (CI) each case once, the dtype alternating.
@pytest.mark.parametrize("dtype,case", rotating_grid((jnp.float32, jnp.bfloat16), range(len(CASES)),
                                                     full=ON_GPU, ids=("fp32", "bf16")))
def test_matches_jax_nn(dtype, case):
    """Rows the mask leaves without keys give 0 (jax.nn's XLA path: the values' mean)."""
    batch, seqlen_q, seqlen_k, options = CASES[case]
    q, k, v = _inputs(0, batch, seqlen_q, seqlen_k, 4, 2, 32, dtype)
    out = fa.dot_product_attention(q, k, v, **options)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref, same = _references(q, k, v, **options)
    rows = _rows_with_keys(seqlen_q, seqlen_k, **options)[:, None, None]
    assert_within_tolerance("out", np.where(rows, np.asarray(out, np.float64), 0),
                            np.where(rows, ref, 0), np.where(rows, same, 0))
    assert not np.asarray(out)[..., ~rows[:, 0, 0], :, :].any()  # (rank 3 or 4)


def test_gradients_match_jax_nn():
    q, k, v = _inputs(1, 2, 40, 64, 4, 1, 32, jnp.float32)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    def loss(attend, q, k, v):
        return (attend(q, k, v, is_causal=True, local_window_size=(16, 0)) * cotangent).sum()

    got = jax.grad(functools.partial(loss, fa.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(functools.partial(loss, functools.partial(
        jax.nn.dot_product_attention, implementation="xla")), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_within_tolerance(name, g, np.asarray(w, np.float64), np.asarray(w, np.float64),
                                atol=2e-5)


@pytest.mark.parametrize("options", [dict(), dict(is_causal=True),
                                     dict(is_causal=True, local_window_size=(6, 0))])
def test_sequence_lengths_of_a_padded_batch(options):
    """Equal query and key lengths per row (padded self-attention): the real rows match jax.nn,
    padding rows are 0, and the padding never reaches the real rows."""
    q, k, v = _inputs(2, 3, 40, 40, 4, 2, 32, jnp.float32)
    lengths = jnp.array([40, 17, 0], jnp.int32)
    out = jax.jit(lambda q, k, v, n: fa.dot_product_attention(
        q, k, v, query_seq_lengths=n, key_value_seq_lengths=n, **options))(q, k, v, lengths)
    ref, _ = _references(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                         **options)
    valid = (np.arange(40)[None, :] < np.asarray(lengths)[:, None])[..., None, None]
    assert_within_tolerance("out", np.where(valid, out, 0), np.where(valid, ref, 0),
                            np.where(valid, ref, 0))
    assert not np.asarray(out)[~np.broadcast_to(valid, out.shape)].any()
    garbage = jnp.where(valid, k, 1e4), jnp.where(valid, v, -1e4)
    again = fa.dot_product_attention(q, *garbage, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, **options)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))


def test_key_lengths_for_cross_attention():
    q, k, v = _inputs(3, 2, 24, 56, 2, 2, 16, jnp.float32)
    key_lengths = jnp.array([56, 9], jnp.int32)
    out = fa.dot_product_attention(q, k, v, key_value_seq_lengths=key_lengths)
    ref, same = _references(q, k, v, key_value_seq_lengths=key_lengths)
    assert_within_tolerance("out", out, ref, same)


def test_vmapped_examples_equal_the_batched_call():
    """Equinox-style code: rank-3 calls vmapped over the batch."""
    q, k, v = _inputs(4, 3, 32, 48, 4, 2, 16, jnp.float32)
    attend = functools.partial(fa.dot_product_attention, is_causal=True)
    np.testing.assert_allclose(np.asarray(jax.vmap(attend)(q, k, v)),
                               np.asarray(attend(q, k, v)), rtol=1e-6, atol=1e-6)


def test_implementation_chooses_a_backend():
    q, k, v = _inputs(5, 1, 16, 16, 2, 2, 16, jnp.float32)
    used = fa.backends_used(lambda q, k, v: fa.dot_product_attention(
        q, k, v, implementation="xla"), q, k, v)
    assert used == {"forward": "xla"}


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: fa.dot_product_attention(q, k, v, bias=jnp.zeros((2, 4, 16, 16))),
     ValueError, "bias is not supported"),
    (lambda q, k, v: fa.dot_product_attention(q, k, v, mask=jnp.ones((16, 16), bool)),
     ValueError, "mask is not supported"),
    (lambda q, k, v: fa.dot_product_attention(q[0, 0], k[0, 0], v[0, 0]),
     ValueError, "query must have rank 3"),
    (lambda q, k, v: fa.dot_product_attention(q, k[0], v[0]), ValueError, "key must have"),
    (lambda q, k, v: fa.dot_product_attention(q, k, v, local_window_size=(-2, 3)),
     ValueError, "local_window_size must be non-negative"),
    (lambda q, k, v: fa.dot_product_attention(q, k, v, local_window_size=(1.5, 3)),
     TypeError, "local_window_size must be an int"),
    (lambda q, k, v: fa.dot_product_attention(q, k, v, is_causal=1), TypeError, "is_causal"),
    (lambda q, k, v: fa.dot_product_attention(q, k, v, implementation="cudnn"),
     ValueError, "implementation must be None or one of"),
    (lambda q, k, v: fa.dot_product_attention(q, k, v, query_seq_lengths=jnp.array([3])),
     ValueError, r"query_seq_lengths must have shape \(2,\)"),
    (lambda q, k, v: fa.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([3., 4.])),
     TypeError, "key_value_seq_lengths must have dtype int32"),
    (lambda q, k, v: fa.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=jnp.array([9, 9]),
        key_value_seq_lengths=jnp.array([9, 5])),
     ValueError, "row 1 has 5 keys and 9 queries"),
    (lambda q, k, v: fa.dot_product_attention(q, k, v, dropout_rate=0.1),
     ValueError, "dropout_key"),
])
def test_errors_name_the_argument(call, error, match):
    q, k, v = _inputs(6, 2, 16, 16, 4, 2, 16, jnp.float32)
    with pytest.raises(error, match=match):
        call(q, k, v)


def test_flax_nnx_multi_head_attention():
    """``attention_fn=flax_attention_fn(is_causal=True)`` equals Flax's own attention with a
    causal mask; dropout follows Flax's rate, rng and ``deterministic``."""
    nnx = pytest.importorskip("flax.nnx")
    layer = nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=64, decode=False,
                                   rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 24, 32))
    want = layer(x, mask=nnx.make_causal_mask(jnp.ones((2, 24))))
    layer.attention_fn = fa.flax_attention_fn(is_causal=True)
    got = layer(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    layer.attention_fn = fa.flax_attention_fn()  # causal given at the call, as Flax allows
    np.testing.assert_allclose(np.asarray(layer(x, is_causal=True)), np.asarray(want),
                               rtol=2e-5, atol=2e-5)
    # Dropout: the key comes from Flax's rng stream; deterministic turns it off.
    dropped = nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=64, decode=False,
                                     dropout_rate=0.5, rngs=nnx.Rngs(0),
                                     attention_fn=fa.flax_attention_fn(is_causal=True))
    plain = dropped(x, deterministic=True)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(got), rtol=2e-5, atol=2e-5)
    noisy = dropped(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    assert np.abs(np.asarray(noisy) - np.asarray(plain)).max() > 1e-2
    with pytest.raises(ValueError, match="sow_weights"):
        fa.flax_attention_fn()(x[..., None, :], x[..., None, :], x[..., None, :],
                               module=object())


def test_flax_linen_multi_head_attention():
    nn = pytest.importorskip("flax.linen")
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 3, 20, 16))  # two leading batch axes
    own = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=32)
    params = own.init(jax.random.PRNGKey(0), x, mask=nn.make_causal_mask(jnp.ones((2, 3, 20))))
    want = own.apply(params, x, mask=nn.make_causal_mask(jnp.ones((2, 3, 20))))
    flash = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=32,
                                            attention_fn=fa.flax_attention_fn(is_causal=True))
    np.testing.assert_allclose(np.asarray(flash.apply(params, x)), np.asarray(want),
                               rtol=2e-5, atol=2e-5)
