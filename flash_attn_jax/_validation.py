"""Argument checks shared by the public functions and the reference.

Every check runs on static information (shapes, dtypes, Python scalars) at trace time and raises
ValueError for a bad value or shape and TypeError for a bad type, naming the argument. A bad
dtype raises DtypeError, which is both.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from flash_attn_jax.semantics import ScoreSpec

class DtypeError(TypeError, ValueError):
    """An array with the wrong dtype: a TypeError, and a ValueError as flash-attn's interface
    (and a caller catching ValueError for any bad input) may expect."""


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
        raise DtypeError(f"{name} must have dtype float16, bfloat16 or float32, got {jnp.dtype(x.dtype)}")


def same_dtype(reference_name, reference, **others):
    """Checks that every array in ``others`` has the dtype of ``reference``."""
    for name, x in others.items():
        if jnp.dtype(x.dtype) != jnp.dtype(reference.dtype):
            raise DtypeError(f"{name} must have the dtype of {reference_name} "
                            f"({jnp.dtype(reference.dtype)}), got {jnp.dtype(x.dtype)}")


def static_int(name, x, lo, hi):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {type(x).__name__}")
    if not lo <= int(x) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {x}")
    return int(x)


INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


def concrete(x):
    """The values of ``x`` as a NumPy array when known at trace time (not traced), else None."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # e.g. an array not addressable from this process
        return None


def index_dtype(name, x):
    """Index arrays take any signed integer dtype (int64 under jax_enable_x64); the kernels
    compute in int32."""
    if not jnp.issubdtype(x.dtype, jnp.signedinteger):
        raise DtypeError(f"{name} must have dtype int32 (or another signed integer type), got "
                         f"{jnp.dtype(x.dtype)}")


def as_int32(x):
    """A signed integer array as int32; values beyond int32 (traced int64) saturate."""
    x = jnp.asarray(x)
    if jnp.dtype(x.dtype).itemsize > 4:
        x = jnp.clip(x, -INT32_MAX - 1, INT32_MAX)
    return x.astype(jnp.int32)


def value_range(name, values, lo, hi, what=""):
    """Checks concrete ``values`` (a NumPy array or None when traced) lie in [lo, hi]."""
    if values is None or values.size == 0:
        return
    low, high = values.min(), values.max()
    if low < lo or high > hi:
        bad = low if low < lo else high
        raise ValueError(f"{name} must lie in [{lo}, {hi}]{what}, got {bad}")


def index_array(name, x, shape, *, lo=-INT32_MAX - 1, hi=INT32_MAX, what=""):
    """An integer array of ``shape`` (or None), concrete values checked in [lo, hi], as int32."""
    if x is None:
        return None
    array(name, x, len(shape))
    index_dtype(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    value_range(name, concrete(x), lo, hi, what)
    return as_int32(x)


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


def float32_value(name, x):
    """A static float the kernels use in float32: finite there too."""
    value = static_float(name, x)
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {FLOAT32_MAX:.4g}), got "
                         f"{value}")
    return value


def window_size(x):
    """``window_size`` as two Python ints, each -1 (unbounded) or >= 0."""
    if isinstance(x, jax.core.Tracer) or (isinstance(x, (tuple, list))
                                          and any(isinstance(w, jax.core.Tracer) for w in x)):
        raise TypeError("window_size must be static Python ints (the kernels are specialised on "
                        "it), got a traced value")
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
    """(dropout_p as a Python float, the key's two uint32 words (2,) or None without dropout)."""
    p = static_float("dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if p == 0.0:
        return 0.0, None
    if dropout_key is None:
        raise ValueError("dropout_key (a jax PRNG key) is required when dropout_p > 0")
    array("dropout_key", dropout_key)
    if jnp.issubdtype(dropout_key.dtype, jax.dtypes.prng_key):
        if dropout_key.shape != ():
            raise ValueError(f"dropout_key must be a single key, got shape {tuple(dropout_key.shape)}")
        words = jax.random.key_data(dropout_key)
    else:
        words = dropout_key
    if jnp.dtype(words.dtype) != jnp.dtype(jnp.uint32):
        raise DtypeError(f"dropout_key must be a typed PRNG key or raw uint32 key data, got "
                         f"{jnp.dtype(words.dtype)}")
    if tuple(words.shape) != (2,):
        raise ValueError(f"dropout_key must hold two uint32 words (a threefry key, jax.random.key "
                         f"or PRNGKey), got key data of shape {tuple(words.shape)}")
    return p, jnp.asarray(words)


def array_pair(first_name, first, second_name, second, ndim, like_name, like):
    """Two arrays of rank ``ndim`` with the same shape and the dtype of ``like``."""
    array(first_name, first, ndim)
    array(second_name, second, ndim)
    same_dtype(like_name, like, **{first_name: first, second_name: second})
    if tuple(first.shape) != tuple(second.shape):
        raise ValueError(f"{first_name} and {second_name} must have the same shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")


def dense_qkv(q, k, v, *, q_name="q", k_name="k", v_name="v"):
    """Checks (B, Sq, H, D) queries against (B, Sk, Hk, D) keys and values; returns the dims."""
    array(q_name, q, 4)
    floating_dtype(q_name, q)
    array_pair(k_name, k, v_name, v, 4, q_name, q)
    batch, seqlen_q, num_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"{k_name} must have shape (batch={batch}, seqlen_k, nheads_k, "
                         f"headdim={head_dim}) to match {q_name}, got {tuple(k.shape)}")
    head_dim_checks(q_name, head_dim)
    heads(num_heads, k.shape[2], k_name)
    return batch, seqlen_q, k.shape[1], num_heads, k.shape[2], head_dim


def cu_seqlens(name, x, total):
    """An integer (batch + 1,) cumulative-lengths array over ``total`` tokens: (batch, its values
    when concrete else None, the array as int32). Concrete ones must start at 0, never decrease
    and end at most at ``total``."""
    array(name, x, 1)
    index_dtype(name, x)
    if x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (batch + 1,) with batch >= 0, got {tuple(x.shape)}")
    values = concrete(x)
    if values is not None:
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        if np.any(np.diff(values) < 0):
            at = int(np.argmax(np.diff(values) < 0))
            raise ValueError(f"{name} must not decrease, got {values[at]} then {values[at + 1]} "
                             f"at {at}")
        if values[-1] > total:
            raise ValueError(f"{name} must end at most at the number of tokens ({total}), got "
                             f"{values[-1]}")
    return x.shape[0] - 1, values, as_int32(x)


def paged_keys(name, page_size, table, batch):
    """Checks a paged ``name`` (num_blocks, page_block_size, ...) and its block_table (batch, n)."""
    array("block_table", table, 2)
    index_dtype("block_table", table)
    if table.shape[0] != batch:
        raise ValueError(f"block_table must have shape ({batch}, max_blocks_per_seq), got "
                         f"{tuple(table.shape)}")
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"paged {name} must have shape (num_blocks, page_block_size, nheads_k, "
                         f"headdim) with page_block_size a power of two >= 16, got {page_size}")


_MAX_SEQLEN = 2**31 - 1


def varlen_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, table, *,
               q_name="q", k_name="k", v_name="v", cu_q_name="cu_seqlens_q",
               cu_k_name="cu_seqlens_k", max_q_name="max_seqlen_q", max_k_name="max_seqlen_k"):
    """Checks packed (total_q, H, D) queries against (total_k, Hk, D) keys and values, or paged
    (num_blocks, page_block_size, Hk, D) ones with ``table``; concrete cu_seqlens, block table and
    max_seqlen against each other. Returns (batch, H, D, max_q, max_k, cu_seqlens_q,
    cu_seqlens_k, table), the index arrays as int32."""
    array(q_name, q, 3)
    floating_dtype(q_name, q)
    is_paged = table is not None
    array_pair(k_name, k, v_name, v, 4 if is_paged else 3, q_name, q)
    _, num_heads, head_dim = q.shape
    num_heads_k, key_head_dim = k.shape[-2:]
    if key_head_dim != head_dim:
        shape = "(num_blocks, page_block_size, nheads_k, headdim" if is_paged else "(total_k, nheads_k, headdim"
        raise ValueError(f"{k_name} must have shape {shape}={head_dim}) to match {q_name}, got "
                         f"{tuple(k.shape)}")
    head_dim_checks(q_name, head_dim)
    heads(num_heads, num_heads_k, k_name)
    total_k = k.shape[0] if not is_paged else INT32_MAX
    batch, cu_q_values, cu_q = cu_seqlens(cu_q_name, cu_seqlens_q, q.shape[0])
    batch_k, cu_k_values, cu_k = cu_seqlens(cu_k_name, cu_seqlens_k, total_k)
    if batch_k != batch:
        raise ValueError(f"{cu_k_name} must have shape ({batch + 1},) like {cu_q_name}, got "
                         f"{tuple(cu_seqlens_k.shape)}")
    max_q = static_int(max_q_name, max_seqlen_q, 0, _MAX_SEQLEN)
    max_k = static_int(max_k_name, max_seqlen_k, 0, _MAX_SEQLEN)
    for name, values, longest, cu_name in ((max_q_name, cu_q_values, max_q, cu_q_name),
                                           (max_k_name, cu_k_values, max_k, cu_k_name)):
        if values is not None and batch and np.diff(values).max() > longest:
            raise ValueError(f"{name} ({longest}) must be >= the longest sequence in {cu_name} "
                             f"({np.diff(values).max()})")
    if is_paged:
        paged_keys(k_name, k.shape[1], table, batch)
        table_values = concrete(table)
        value_range("block_table", table_values, 0, k.shape[0] - 1,
                    f" (the pages of {k_name}, num_blocks={k.shape[0]})")
        capacity = table.shape[1] * k.shape[1]
        if cu_k_values is not None and batch and np.diff(cu_k_values).max() > capacity:
            raise ValueError(f"block_table is too short: its {table.shape[1]} pages of "
                             f"{k.shape[1]} hold {capacity} keys, the longest sequence in "
                             f"{cu_k_name} has {np.diff(cu_k_values).max()}")
        table = as_int32(table)
    return batch, num_heads, head_dim, max_q, max_k, cu_q, cu_k, table


def head_dim_checks(name, head_dim):
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name} head dim (last axis) must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def heads(num_heads, num_heads_k, k_name="k"):
    if num_heads_k == 0:
        raise ValueError(f"{k_name} must have at least one key/value head, got nheads_k = 0")
    if num_heads % num_heads_k != 0:
        raise ValueError(f"number of query heads ({num_heads}) must be a multiple of the number of "
                         f"key/value heads in {k_name} ({num_heads_k})")


def alibi_slopes(x, batch, num_heads):
    """None, or the slopes broadcast to float32 (batch, num_heads). float64 slopes (the default
    under jax_enable_x64) are taken as float32."""
    if x is None:
        return None
    array("alibi_slopes", x)
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(np.float64)):
        raise DtypeError(f"alibi_slopes must have dtype float32 (or float64), got "
                         f"{jnp.dtype(x.dtype)}")
    if tuple(x.shape) not in ((num_heads,), (batch, num_heads)):
        raise ValueError(f"alibi_slopes must have shape ({num_heads},) or ({batch}, {num_heads}), "
                         f"got {tuple(x.shape)}")
    values = concrete(x)
    if values is not None and not np.all(np.isfinite(values)):
        raise ValueError("alibi_slopes must be finite")
    return jnp.broadcast_to(jnp.asarray(x).astype(jnp.float32), (batch, num_heads))


def score_spec(*, head_dim, softmax_scale, causal, window, softcap, has_alibi, dropout_p=0.0,
               longest=None, deterministic=False):
    """The ScoreSpec of validated arguments; softmax_scale defaults to head_dim ** -0.5.

    ``longest``: a bound on both sequence lengths (on the score positions). A window side of at
    least that masks nothing, so it becomes -1 (unbounded): the same scores, and no int32
    overflow for windows near 2**31 in the kernels' position arithmetic.
    """
    scale = (head_dim ** -0.5 if softmax_scale is None
             else float32_value("softmax_scale", softmax_scale))
    cap = float32_value("softcap", softcap)
    if cap > 0 and abs(scale / cap) > FLOAT32_MAX:
        raise ValueError(f"softcap ({cap}) is too small for softmax_scale ({scale}): "
                         f"softmax_scale / softcap must be finite in float32")
    left, right = window_size(window)
    if longest is not None:
        left, right = (-1 if w >= longest else w for w in (left, right))
    return ScoreSpec.create(softmax_scale=scale, causal=static_bool("causal", causal),
                            window_size=(left, right), softcap=cap, has_alibi=has_alibi,
                            dropout_p=dropout_p, deterministic=deterministic)


def attention_options(batch, num_heads, head_dim, *, dropout_p, softmax_scale, causal,
                      window_size, softcap, alibi, deterministic, dropout_key, longest):
    """The flags shared by flash_attn_func, its variants and ring_flash_attn_func, checked:
    (slopes (batch, nheads) or None, ScoreSpec, the dropout key's words or None). ``alibi``: the
    alibi_slopes argument; ``longest`` as for ``score_spec``."""
    dropout_p, seed = dropout(dropout_p, dropout_key)
    deterministic = static_bool("deterministic", deterministic)
    slopes = alibi_slopes(alibi, batch, num_heads)
    spec = score_spec(head_dim=head_dim, softmax_scale=softmax_scale, causal=causal,
                      window=window_size, softcap=softcap, has_alibi=slopes is not None,
                      dropout_p=dropout_p, longest=longest, deterministic=deterministic)
    return slopes, spec, seed


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Static facts of a flash_attn_with_kvcache call, validated."""

    batch: int
    seqlen_q: int
    seqlen_new: int  # 0 without new k/v
    num_heads: int
    num_heads_k: int
    head_dim: int
    paged: bool
    page_size: int  # the rows of one cache page; a contiguous cache is one page per batch row
    capacity: int  # key positions one batch row can hold
    rotary_dim: int  # 0 without rotary


@dataclasses.dataclass(frozen=True)
class CacheIndices:
    """flash_attn_with_kvcache's index arrays, checked, as int32 (None where not given);
    cache_seqlens (B,) even when given as one int."""

    cache_seqlens: jax.Array | None
    cache_batch_idx: jax.Array | None
    cache_leftpad: jax.Array | None
    block_table: jax.Array | None


def kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
            cache_leftpad, block_table):
    """Checks flash_attn_with_kvcache's arrays; returns (layout, CacheIndices). Concrete index
    values are checked: cache_seqlens >= 0, cache_batch_idx within the cache's rows,
    cache_leftpad within the capacity."""
    array("q", q, 4)
    floating_dtype("q", q)
    batch, seqlen_q, num_heads, head_dim = q.shape
    head_dim_checks("q", head_dim)
    array_pair("k_cache", k_cache, "v_cache", v_cache, 4, "q", q)
    rows, page_size, num_heads_k, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache head dim (last axis) must be {head_dim} like q's, got {cache_head_dim}")
    heads(num_heads, num_heads_k, "k_cache")
    paged = block_table is not None
    if paged:
        paged_keys("k_cache", page_size, block_table, batch)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (the block table "
                             "already maps each batch row to its pages)")
        capacity = block_table.shape[1] * page_size
    else:
        if cache_batch_idx is None and rows != batch:
            raise ValueError(f"k_cache must have shape (batch={batch}, seqlen_cache, nheads_k, headdim) "
                             f"without cache_batch_idx, got {tuple(k_cache.shape)}")
        capacity = page_size
    cache_batch_idx = index_array("cache_batch_idx", cache_batch_idx, (batch,), lo=0,
                                  hi=rows - 1, what=f" (rows of k_cache, {rows})")
    cache_leftpad = index_array("cache_leftpad", cache_leftpad, (batch,), lo=0, hi=capacity,
                                what=f" (the cache capacity, {capacity})")
    if paged:
        block_table = as_int32(block_table)  # entries outside [0, num_blocks): missing pages

    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    seqlen_new = 0
    if k is not None:
        array_pair("k", k, "v", v, 4, "q", q)
        seqlen_new = k.shape[1]
        expected = (batch, seqlen_new, num_heads_k, head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"k and v must have shape (batch={batch}, seqlen_new, nheads_k="
                             f"{num_heads_k}, headdim={head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when k and v are appended")
        if seqlen_q > capacity:
            raise ValueError(f"q's seqlen ({seqlen_q}) must not exceed the cache capacity ({capacity}) "
                             "when k and v are appended")
    if cache_seqlens is not None:
        # Positions cache_seqlens + t of the new tokens stay within int32.
        hi = INT32_MAX - seqlen_new
        if isinstance(cache_seqlens, (numbers.Integral, np.integer)) and not isinstance(cache_seqlens, bool):
            value_range("cache_seqlens", np.asarray(int(cache_seqlens)), 0, hi)
            cache_seqlens = jnp.full((batch,), int(cache_seqlens), jnp.int32)
        elif hasattr(cache_seqlens, "shape") and cache_seqlens.shape == ():  # one int for all rows
            cache_seqlens = jnp.full((batch,), index_array("cache_seqlens", cache_seqlens, (),
                                                          lo=0, hi=hi), jnp.int32)
        else:
            cache_seqlens = index_array("cache_seqlens", cache_seqlens, (batch,), lo=0, hi=hi)

    rotary_dim = 0
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need new k and v (rotary applies to appended keys)")
        array_pair("rotary_cos", rotary_cos, "rotary_sin", rotary_sin, 2, "q", q)
        rotary_dim = 2 * rotary_cos.shape[1]
        if not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_cos must have shape (seqlen_ro, rotary_dim / 2) with rotary_dim "
                             f"in [2, headdim={head_dim}], got {tuple(rotary_cos.shape)}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos must cover every cache position: seqlen_ro "
                             f"({rotary_cos.shape[0]}) must be >= the cache capacity ({capacity})")
    layout = CacheLayout(batch=batch, seqlen_q=seqlen_q, seqlen_new=seqlen_new, num_heads=num_heads,
                         num_heads_k=num_heads_k, head_dim=head_dim, paged=paged,
                         page_size=page_size, capacity=capacity, rotary_dim=rotary_dim)
    return layout, CacheIndices(cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                                cache_leftpad=cache_leftpad, block_table=block_table)
