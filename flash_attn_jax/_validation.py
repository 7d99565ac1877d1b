"""Argument checks shared by the public functions and the reference.

Every check runs on static information (shapes, dtypes, Python scalars) at trace time and raises
ValueError for a bad value or shape and TypeError for a bad type or dtype, naming the argument.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from flash_attn_jax.semantics import ScoreSpec

SUPPORTED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
MAX_HEAD_DIM = 256


def array(name, x, ndim=None):
    """Checks that ``x`` is an array (of rank ``ndim``) and returns it."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")) or isinstance(x, (np.generic, jax.ShapeDtypeStruct)):
        raise TypeError(f"{name} must be a jax or numpy array, got {type(x).__name__}")
    if ndim is not None and len(x.shape) != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(x.shape)}")
    return x


def floating_dtype(name, x):
    """Checks that ``x`` has one of the supported floating dtypes."""
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype float16, bfloat16 or float32, got {jnp.dtype(x.dtype)}")


def same_dtype(reference_name, reference, **others):
    """Checks that every array in ``others`` has the dtype of ``reference``."""
    for name, x in others.items():
        if jnp.dtype(x.dtype) != jnp.dtype(reference.dtype):
            raise TypeError(f"{name} must have the dtype of {reference_name} "
                            f"({jnp.dtype(reference.dtype)}), got {jnp.dtype(x.dtype)}")


def static_bool(name, x):
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    raise TypeError(f"{name} must be a Python bool, got {type(x).__name__}")


def static_float(name, x):
    """A Python float from ``x``; traced values are refused because kernels are specialised on it."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python float, got bool")
    if isinstance(x, numbers.Real):
        value = float(x)
    elif isinstance(x, (np.ndarray, jax.Array)) and x.shape == () and not isinstance(x, jax.core.Tracer):
        value = float(x)
    else:
        raise TypeError(f"{name} must be a static Python float, got {type(x).__name__}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def window_size(x):
    """``window_size`` as two Python ints, each -1 (unbounded) or >= 0."""
    try:
        items = list(np.asarray(x).reshape(-1)) if hasattr(x, "shape") else list(x)
    except TypeError:
        raise TypeError(f"window_size must be a pair of ints, got {type(x).__name__}") from None
    if len(items) != 2 or not all(isinstance(w, (numbers.Integral, np.integer)) and not isinstance(w, bool)
                                  for w in items):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {x!r}")
    left, right = (int(w) for w in items)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be -1 (unbounded) or >= 0, got {(left, right)}")
    return left, right


def dropout(dropout_p, dropout_key):
    p = static_float("dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if p > 0.0:
        raise NotImplementedError("dropout_p > 0 is not supported yet; dropout arrives with the "
                                  "in-kernel RNG")
    del dropout_key
    return p


def dense_qkv(q, k, v, *, q_name="q", k_name="k", v_name="v"):
    """Checks (B, Sq, H, D) queries against (B, Sk, Hk, D) keys and values; returns the dims."""
    array(q_name, q, 4)
    array(k_name, k, 4)
    array(v_name, v, 4)
    floating_dtype(q_name, q)
    same_dtype(q_name, q, **{k_name: k, v_name: v})
    batch, seqlen_q, num_heads, head_dim = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"{k_name} and {v_name} must have the same shape (batch, seqlen_k, "
                         f"nheads_k, headdim), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"{k_name} must have shape (batch={batch}, seqlen_k, nheads_k, "
                         f"headdim={head_dim}) to match {q_name}, got {tuple(k.shape)}")
    head_dim_checks(q_name, head_dim)
    heads(num_heads, k.shape[2], k_name)
    return batch, seqlen_q, k.shape[1], num_heads, k.shape[2], head_dim


def head_dim_checks(name, head_dim):
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name} head dim (last axis) must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def heads(num_heads, num_heads_k, k_name="k"):
    if num_heads_k == 0 or num_heads % num_heads_k != 0:
        raise ValueError(f"number of query heads ({num_heads}) must be a multiple of the number of "
                         f"key/value heads in {k_name} ({num_heads_k})")


def alibi_slopes(x, batch, num_heads):
    """None, or the slopes broadcast to float32 (batch, num_heads)."""
    if x is None:
        return None
    array("alibi_slopes", x)
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.float32):
        raise TypeError(f"alibi_slopes must have dtype float32, got {jnp.dtype(x.dtype)}")
    if tuple(x.shape) not in ((num_heads,), (batch, num_heads)):
        raise ValueError(f"alibi_slopes must have shape ({num_heads},) or ({batch}, {num_heads}), "
                         f"got {tuple(x.shape)}")
    return jnp.broadcast_to(jnp.asarray(x), (batch, num_heads))


def score_spec(*, head_dim, softmax_scale, causal, window, softcap, has_alibi):
    """The ScoreSpec of validated arguments; softmax_scale defaults to head_dim ** -0.5."""
    scale = head_dim ** -0.5 if softmax_scale is None else static_float("softmax_scale", softmax_scale)
    return ScoreSpec.create(softmax_scale=scale, causal=static_bool("causal", causal),
                            window_size=window_size(window),
                            softcap=static_float("softcap", softcap), has_alibi=has_alibi)
