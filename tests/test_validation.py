"""Bad input raises ValueError (TypeError for a wrong type or dtype) naming the argument, at trace time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa

Q = jax.ShapeDtypeStruct((2, 16, 4, 32), jnp.bfloat16)
KV = jax.ShapeDtypeStruct((2, 24, 2, 32), jnp.bfloat16)


def _trace(fn, *args, **kwargs):
    """Errors must come while tracing, before any kernel runs."""
    return jax.jit(lambda *a: fn(*a, **kwargs)).trace(*args)


def _s(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


BAD_DENSE = [
    ("q rank", (_s((2, 16, 32)), KV, KV), {}, ValueError, "q must have rank 4"),
    ("k rank", (Q, _s((2, 24, 2)), KV), {}, ValueError, "k must have rank 4"),
    ("k v shapes", (Q, KV, _s((2, 25, 2, 32))), {}, ValueError, "k and v must have the same shape"),
    ("batch", (Q, _s((3, 24, 2, 32)), _s((3, 24, 2, 32))), {}, ValueError, "k must have shape"),
    ("head dim mismatch", (Q, _s((2, 24, 2, 16)), _s((2, 24, 2, 16))), {}, ValueError, "headdim=32"),
    ("heads", (_s((2, 16, 5, 32)), KV, KV), {}, ValueError, "multiple of the number of key/value heads"),
    ("head dim > 256", (_s((2, 16, 4, 264)), _s((2, 24, 2, 264)), _s((2, 24, 2, 264))), {},
     ValueError, r"head dim .* \[1, 256\]"),
    ("dtype mismatch", (Q, _s((2, 24, 2, 32), jnp.float16), _s((2, 24, 2, 32), jnp.float16)), {},
     TypeError, "k must have the dtype of q"),
    ("int dtype", (_s((2, 16, 4, 32), jnp.int32),) * 3, {}, TypeError, "q must have dtype"),
    ("window length", (Q, KV, KV), dict(window_size=(1, 2, 3)), ValueError, "window_size"),
    ("window value", (Q, KV, KV), dict(window_size=(-2, 0)), ValueError, "window_size"),
    ("window float", (Q, KV, KV), dict(window_size=(1.5, 0)), ValueError, "window_size"),
    ("window type", (Q, KV, KV), dict(window_size=3), TypeError, "window_size"),
    ("dropout range", (Q, KV, KV), dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("dropout negative", (Q, KV, KV), dict(dropout_p=-0.1), ValueError, "dropout_p"),
    ("causal type", (Q, KV, KV), dict(causal="yes"), TypeError, "causal"),
    ("scale type", (Q, KV, KV), dict(softmax_scale="big"), TypeError, "softmax_scale"),
    ("scale nan", (Q, KV, KV), dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("softcap type", (Q, KV, KV), dict(softcap=None), TypeError, "softcap"),
    ("probs flag", (Q, KV, KV), dict(return_attn_probs=1), TypeError, "return_attn_probs"),
    ("deterministic flag", (Q, KV, KV), dict(deterministic=None), TypeError, "deterministic"),
]


@pytest.mark.parametrize("args,kwargs,error,match", [c[1:] for c in BAD_DENSE],
                         ids=[c[0] for c in BAD_DENSE])
def test_flash_attn_func_rejects(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        _trace(fa.flash_attn_func, *args, **kwargs)


BAD_ALIBI = [
    (_s((4,), jnp.float16), TypeError, "alibi_slopes must have dtype float32"),
    (_s((3,), jnp.float32), ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
    (_s((4, 2), jnp.float32), ValueError, "alibi_slopes must have shape"),
]


@pytest.mark.parametrize("slopes,error,match", BAD_ALIBI)
def test_alibi_slopes_rejected(slopes, error, match):
    with pytest.raises(error, match=match):
        _trace(lambda q, k, v, s: fa.flash_attn_func(q, k, v, alibi_slopes=s), Q, KV, KV, slopes)


def test_float64_is_type_error():
    with jax.enable_x64(True):
        x = _s((2, 16, 4, 32), jnp.float64)
        with pytest.raises(TypeError, match="q must have dtype float16, bfloat16 or float32"):
            _trace(fa.flash_attn_func, x, x, x)


def test_non_array_input_is_type_error():
    with pytest.raises(TypeError, match="q must be a jax or numpy array"):
        fa.flash_attn_func([[1.0]], jnp.ones((1, 1, 1, 1)), jnp.ones((1, 1, 1, 1)))


def test_traced_softmax_scale_is_type_error():
    q = jnp.ones((1, 4, 1, 16))
    with pytest.raises(TypeError, match="softmax_scale must be a static Python float"):
        jax.jit(lambda s: fa.flash_attn_func(q, q, q, softmax_scale=s))(0.5)


BAD_DROPOUT = [
    ("no key", dict(dropout_p=0.1), ValueError, "dropout_key .* is required"),
    ("key dtype", dict(dropout_p=0.1, dropout_key=np.zeros(2, np.int32)), TypeError,
     "dropout_key must be a typed PRNG key or raw uint32"),
    ("key shape", dict(dropout_p=0.1, dropout_key=np.zeros(3, np.uint32)), ValueError,
     "two uint32 words"),
    ("key batch", dict(dropout_p=0.1, dropout_key=jax.random.split(jax.random.key(0), 2)),
     ValueError, "a single key"),
    ("key type", dict(dropout_p=0.1, dropout_key=7), TypeError, "dropout_key must be a jax"),
]


@pytest.mark.parametrize("kwargs,error,match", [c[1:] for c in BAD_DROPOUT],
                         ids=[c[0] for c in BAD_DROPOUT])
def test_dropout_arguments_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        _trace(lambda q, k, v: fa.flash_attn_func(q, k, v, **kwargs), Q, KV, KV)


def test_packed_layouts_rejected():
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\)"):
        _trace(fa.flash_attn_qkvpacked_func, _s((2, 16, 2, 4, 32)))
    with pytest.raises(ValueError, match="qkv must have rank 5"):
        _trace(fa.flash_attn_qkvpacked_func, _s((2, 16, 4, 32)))
    with pytest.raises(ValueError, match=r"kv must have shape \(batch, seqlen_k, 2, nheads_k, headdim\)"):
        _trace(fa.flash_attn_kvpacked_func, Q, _s((2, 24, 3, 2, 32)))
    with pytest.raises(ValueError, match="multiple of the number of key/value heads in kv"):
        _trace(fa.flash_attn_kvpacked_func, _s((2, 16, 3, 32)), _s((2, 24, 2, 2, 32)))


def test_accepted_argument_forms():
    # numpy window arrays, numpy scalars and numpy bools are accepted like Python values.
    _trace(fa.flash_attn_func, Q, KV, KV, window_size=np.array([3, 4]), softmax_scale=np.float32(0.2),
           causal=np.bool_(True), softcap=np.float64(0.0))
    _trace(fa.flash_attn_func, Q, KV, KV, window_size=[-1, -1], softmax_scale=1)


VQ, VKV, CU = _s((40, 4, 32)), _s((50, 2, 32)), _s((4,), jnp.int32)
PAGES, TABLE = _s((6, 32, 2, 32)), _s((3, 2), jnp.int32)
BAD_VARLEN = [
    ("q rank", (_s((2, 40, 4, 32)), VKV, VKV, CU, CU), {}, ValueError, "q must have rank 3"),
    ("k rank", (VQ, _s((50, 2)), VKV, CU, CU), {}, ValueError, "k must have rank 3"),
    ("kv heads", (VQ, _s((50, 3, 32)), _s((50, 3, 32)), CU, CU), {}, ValueError,
     "multiple of the number of key/value heads"),
    ("head dim", (VQ, _s((50, 2, 16)), _s((50, 2, 16)), CU, CU), {}, ValueError, "headdim=32"),
    ("cu dtype", (VQ, VKV, VKV, _s((4,), jnp.float32), CU), {}, TypeError,
     "cu_seqlens_q must have dtype int32"),
    ("cu rank", (VQ, VKV, VKV, CU, _s((4, 1), jnp.int32)), {}, ValueError,
     "cu_seqlens_k must have rank 1"),
    ("cu empty", (VQ, VKV, VKV, _s((0,), jnp.int32), CU), {}, ValueError, r"batch \+ 1"),
    ("cu lengths differ", (VQ, VKV, VKV, CU, _s((5,), jnp.int32)), {}, ValueError,
     r"cu_seqlens_k must have shape \(4,\)"),
    ("max_seqlen negative", (VQ, VKV, VKV, CU, CU), dict(max_seqlen_q=-1), ValueError,
     "max_seqlen_q"),
    ("max_seqlen float", (VQ, VKV, VKV, CU, CU), dict(max_seqlen_k=2.0), TypeError,
     "max_seqlen_k must be a Python int"),
    ("alibi shape", (VQ, VKV, VKV, CU, CU), dict(alibi_slopes=jnp.ones((2, 4), jnp.float32)),
     ValueError, r"alibi_slopes must have shape \(4,\) or \(3, 4\)"),
    ("paged rank", (VQ, VKV, VKV, CU, CU), dict(block_table=jnp.zeros((3, 2), jnp.int32)),
     ValueError, "k must have rank 4"),
    ("page size", (VQ, _s((6, 24, 2, 32)), _s((6, 24, 2, 32)), CU, CU),
     dict(block_table=jnp.zeros((3, 2), jnp.int32)), ValueError, "power of two >= 16"),
    ("table dtype", (VQ, PAGES, PAGES, CU, CU), dict(block_table=np.zeros((3, 2), np.uint32)),
     TypeError, "block_table must have dtype int32"),
    ("table batch", (VQ, PAGES, PAGES, CU, CU), dict(block_table=jnp.zeros((2, 2), jnp.int32)),
     ValueError, r"block_table must have shape \(3, max_blocks_per_seq\)"),
]


@pytest.mark.parametrize("args,kwargs,error,match", [c[1:] for c in BAD_VARLEN],
                         ids=[c[0] for c in BAD_VARLEN])
def test_flash_attn_varlen_func_rejects(args, kwargs, error, match):
    options = dict(max_seqlen_q=16, max_seqlen_k=16) | kwargs
    with pytest.raises(error, match=match):
        _trace(lambda *a: fa.flash_attn_varlen_func(*a, **options), *args)


def test_varlen_max_seqlen_must_be_static():
    with pytest.raises(TypeError, match="max_seqlen_q must be a Python int"):
        _trace(lambda q, k, v, cu, m: fa.flash_attn_varlen_func(q, k, v, cu, cu, m, 16),
               VQ, VKV, VKV, CU, _s((), jnp.int32))


def test_varlen_packed_shapes_rejected():
    with pytest.raises(ValueError, match=r"qkv must have shape \(total, 3, nheads, headdim\)"):
        _trace(lambda x, cu: fa.flash_attn_varlen_qkvpacked_func(x, cu, 16), _s((40, 2, 4, 32)), CU)
    with pytest.raises(ValueError, match=r"kv must have shape \(total_k, 2, nheads_k, headdim\)"):
        _trace(lambda q, kv, cu: fa.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 16, 16), VQ,
               _s((50, 3, 2, 32)), CU)


def test_dtype_errors_are_value_errors_too():
    # flash-attn's callers may catch ValueError for any bad input, e.g. a cu_seqlens dtype.
    with pytest.raises(ValueError, match="cu_seqlens_q must have dtype int32"):
        _trace(lambda *a: fa.flash_attn_varlen_func(*a, 16, 16), VQ, VKV, VKV,
               _s((4,), jnp.float32), CU)
    assert issubclass(fa.DtypeError, TypeError) and issubclass(fa.DtypeError, ValueError)
