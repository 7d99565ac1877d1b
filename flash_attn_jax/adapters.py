"""Adapters: flash attention behind the signatures other JAX code already calls.

- ``dot_product_attention``: ``jax.nn.dot_product_attention``'s signature and conventions (rank 3
  or 4 inputs, ``is_causal`` and ``local_window_size`` aligned at the top left, sequence lengths
  of a padded batch), so code written for ``jax.nn`` switches by changing the import.
- ``flax_attention_fn``: a function with Flax's ``attention_fn`` signature, for
  ``flax.nnx.MultiHeadAttention`` and ``flax.linen.MultiHeadDotProductAttention``.

Both run the public functions (``flash_attn_func``, or ``flash_attn_varlen_func`` for sequence
lengths), so they differentiate, jit, vmap and shard as those do. What they cannot express they
refuse at trace time with a ValueError naming the argument: an additive ``bias``, a boolean
``mask`` (use ``is_causal``, ``local_window_size`` and the sequence lengths instead).

Alignment: ``jax.nn`` aligns the causal mask and the window at the top left (query i attends
keys j <= i, and i - left <= j <= i + right); flash-attn aligns them at the bottom right. The
adapter translates: keys no query can attend and queries that attend no key are sliced away and
the window shifted, all from static shapes. With sequence lengths each padded row is a sequence of its own; there the top-left
mask equals flash-attn's varlen mask when every key length is at least the query length (plus
the right window when one is given; equal lengths when only a left window is given), which
holds for the padded self-attention these arguments are for. Concrete lengths are checked;
traced ones that break it get flash-attn's bottom-right alignment for those rows.

Padding query rows (at or past ``query_seq_lengths``) give 0, as do rows that attend no key
(``jax.nn``'s XLA implementation gives an average of the values there).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from flash_attn_jax import _validation as check
from flash_attn_jax import interface
from flash_attn_jax.kernels import registry

__all__ = ["dot_product_attention", "flax_attention_fn"]


def _window_sides(local_window_size) -> tuple[int | None, int | None]:
    """(left, right) from jax.nn's ``local_window_size`` (None: unbounded)."""
    if local_window_size is None:
        return None, None
    if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
        sides = (int(local_window_size),) * 2
    elif (isinstance(local_window_size, tuple) and len(local_window_size) == 2
          and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                  for x in local_window_size)):
        sides = tuple(int(x) for x in local_window_size)
    else:
        raise TypeError(f"local_window_size must be an int or a tuple of two ints, got "
                        f"{local_window_size!r}")
    if min(sides) < 0:
        raise ValueError(f"local_window_size must be non-negative, got {local_window_size!r}")
    return sides


def _lengths(name, lengths, batch, rank):
    """int32 (batch,) from jax.nn's sequence lengths (rank 3: a scalar or shape (1,))."""
    if lengths is None:
        return None
    if not hasattr(lengths, "shape"):
        lengths = np.asarray(lengths)
    if rank == 3 and tuple(lengths.shape) in ((), (1,)):
        lengths = lengths.reshape(1)
    return check.index_array(name, lengths, (batch,))


def _shifted_window(seqlen_q, seqlen_k, left, right):
    """Queries and keys kept, and flash-attn's window, for jax.nn's top-left window.

    Keys past ``seqlen_q + right`` are visible to no query, and queries past ``keys + left`` see
    no key (their output is 0): both are sliced away. The bottom-right offset of what is kept is
    ``keys - queries``, and the window shifts by it (both sides stay >= 0)."""
    keys = seqlen_k if right is None else min(seqlen_k, seqlen_q + right)
    queries = seqlen_q if left is None else min(seqlen_q, keys + left)
    shift = keys - queries
    window = (-1 if left is None else left + shift, -1 if right is None else right - shift)
    return queries, keys, window


def _check_lengths_align(query_lengths, key_lengths, left, right, seqlen_q, seqlen_k):
    """Concrete lengths: the top-left mask equals flash-attn's per-sequence one (module doc)."""
    if right is None and left is None:
        return
    batch = (query_lengths if key_lengths is None else key_lengths).shape[0]
    q_len = np.full(batch, seqlen_q) if query_lengths is None else np.clip(
        np.asarray(query_lengths), 0, seqlen_q)
    k_len = np.full(batch, seqlen_k) if key_lengths is None else np.clip(
        np.asarray(key_lengths), 0, seqlen_k)
    if right is None:
        bad = k_len != q_len
        need = "equal to its query length (a left window only)"
    else:
        bad = k_len < q_len + right
        need = f"at least its query length + {right}"
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"key_value_seq_lengths: row {row} has {int(k_len[row])} keys and "
            f"{int(q_len[row])} queries; with is_causal / local_window_size the adapter needs "
            f"each row's key length {need} (jax.nn's top-left alignment otherwise differs "
            "from flash-attn's varlen one); flash_attn_varlen_func aligns at the bottom right")


def _padded_varlen(q, k, v, query_lengths, key_lengths, window, flags):
    """Each padded batch row as three varlen sequences: its real queries with their keys, its
    padding queries without keys (out 0), its padding keys without queries.

    jax.nn's top-left window (left, right) with per-row lengths: keys past ``q_len + right``
    are visible to no query and are left out, which makes the row's bottom-right offset
    ``right`` whenever ``k_len >= q_len + right`` (module docstring), and flash-attn's window
    (left + right, 0)."""
    left, right = window
    batch, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    rows = jnp.arange(batch, dtype=jnp.int32)
    q_len = (jnp.full((batch,), seqlen_q, jnp.int32) if query_lengths is None
             else jnp.clip(query_lengths, 0, seqlen_q))
    k_len = (jnp.full((batch,), seqlen_k, jnp.int32) if key_lengths is None
             else jnp.clip(key_lengths, 0, seqlen_k))
    if right is None:
        flash_window = (-1 if left is None else left, -1)
    else:
        k_len = jnp.minimum(k_len, q_len + right)
        flash_window = (-1 if left is None else left + right, 0)
    cu_q = jnp.stack([rows * seqlen_q, rows * seqlen_q + q_len, (rows + 1) * seqlen_q], 1)
    cu_k = jnp.stack([rows * seqlen_k, rows * seqlen_k + k_len, rows * seqlen_k + k_len], 1)
    cu_q = jnp.append(cu_q.reshape(-1), batch * seqlen_q)
    cu_k = jnp.append(cu_k.reshape(-1), batch * seqlen_k)
    out = interface.flash_attn_varlen_func(
        q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]),
        cu_q, cu_k, seqlen_q, seqlen_k, window_size=flash_window, **flags)
    return out.reshape(q.shape)


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Flash attention with ``jax.nn.dot_product_attention``'s signature and conventions.

    Args:
      query: (B, T, N, H) or one example (T, N, H); float16, bfloat16 or float32, H <= 256.
      key, value: (B, S, K, H) or (S, K, H), query's dtype; N a multiple of K (GQA/MQA).
      bias, mask: must be None (flash attention takes no dense bias or mask; the masks it
        supports are ``is_causal``, ``local_window_size`` and the sequence lengths).
      scale: the logits' scale; default 1/sqrt(H).
      is_causal: query i attends keys j <= i (top-left aligned, as jax.nn).
      query_seq_lengths, key_value_seq_lengths: int (B,) valid lengths of a padded batch (a
        scalar or (1,) for rank-3 inputs); padding query rows give 0.
      local_window_size: ``w`` or ``(left, right)``: query i attends keys i - left <= j <=
        i + right (top-left aligned; combined with ``is_causal`` the right side is 0).
      implementation: None for the automatic backend, or a flash_attn_jax backend name (e.g.
        ``"pallas-triton"``, ``"xla"``); jax.nn's ``"cudnn"``/``"xla"`` meanings do not apply.
      dropout_rate, dropout_key: attention dropout (not in jax.nn): flash_attn_func's
        ``dropout_p`` and ``dropout_key``.

    Returns:
      (B, T, N, H) or (T, N, H) in query's dtype.
    """
    if bias is not None:
        raise ValueError("bias is not supported: flash attention adds no dense bias (ALiBi "
                         "slopes: flash_attn_func(alibi_slopes=...))")
    if mask is not None:
        raise ValueError("mask is not supported: flash attention takes no dense mask; use "
                         "is_causal, local_window_size, query_seq_lengths and "
                         "key_value_seq_lengths")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if implementation is not None and implementation not in registry.names():
        raise ValueError(f"implementation must be None or one of flash_attn_jax's backends "
                         f"{registry.names()}, got {implementation!r}")
    rank = check.array("query", query).ndim
    if rank not in (3, 4):
        raise ValueError(f"query must have rank 3 (T, N, H) or 4 (B, T, N, H), got shape "
                         f"{tuple(query.shape)}")
    check.array("key", key, rank)
    check.array("value", value, rank)
    q, k, v = (x if rank == 4 else x[None] for x in (query, key, value))
    batch, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    left, right = _window_sides(local_window_size)
    if is_causal:
        right = 0 if right is None else min(right, 0)
    query_lengths = _lengths("query_seq_lengths", query_seq_lengths, batch, rank)
    key_lengths = _lengths("key_value_seq_lengths", key_value_seq_lengths, batch, rank)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    flags = dict(softmax_scale=scale, dropout_p=dropout_rate, dropout_key=dropout_key)
    chosen = (contextlib.nullcontext() if implementation is None
              else registry.use_backend(implementation))
    with chosen:
        if query_lengths is None and key_lengths is None:
            queries, keys, window = _shifted_window(seqlen_q, seqlen_k, left, right)
            out = interface.flash_attn_func(q[:, :queries], k[:, :keys], v[:, :keys],
                                            window_size=window, **flags)
            out = jnp.pad(out, ((0, 0), (0, seqlen_q - queries), (0, 0), (0, 0)))
        else:
            given = (query_seq_lengths, key_value_seq_lengths)
            known = [None if x is None else check.concrete(x) for x in given]
            if all(value is not None or x is None for value, x in zip(known, given)):
                _check_lengths_align(*(None if value is None else value.reshape(-1)
                                       for value in known), left, right, seqlen_q, seqlen_k)
            out = _padded_varlen(q, k, v, query_lengths, key_lengths, (left, right), flags)
    return out if rank == 4 else out[0]


def flax_attention_fn(*, is_causal: bool = False,
                      local_window_size: int | tuple[int, int] | None = None) -> Callable:
    """A function with Flax's ``attention_fn`` signature that runs flash attention.

    For ``flax.nnx.MultiHeadAttention(..., attention_fn=flax_attention_fn(is_causal=True))`` and
    ``flax.linen.MultiHeadDotProductAttention`` (call them without ``mask``: causality and
    windows are given here, top-left aligned as in ``dot_product_attention``). Inputs
    (..., length, heads, head_dim) with any leading batch axes. Dropout: Flax's
    ``dropout_rate`` and ``dropout_rng`` become flash_attn_func's ``dropout_p`` and
    ``dropout_key`` (a mask drawn per batch row and head, never broadcast: ``broadcast_dropout``
    is ignored). ``precision`` is ignored (the kernels choose theirs); ``dtype`` casts the
    output; ``module`` (Flax's ``sow_weights``) is refused: the weights are never formed.
    ``is_causal`` given by Flax at the call (``nnx.MultiHeadAttention.__call__(is_causal=True)``)
    adds to the one given here.
    """
    causal = is_causal

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                     dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                     precision=None, module=None, promote_dtype=None, is_causal=None,
                     input_positions=None):
        del broadcast_dropout, precision, promote_dtype
        if module is not None:
            raise ValueError("module (Flax's sow_weights) is not supported: flash attention "
                             "never forms the attention weights")
        if input_positions is not None:
            raise ValueError("input_positions is not supported: apply rotary embeddings to the "
                             "queries and keys before the attention function")
        lead = query.shape[:-3]
        q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (query, key, value))
        rate = 0.0 if deterministic else dropout_rate
        out = dot_product_attention(q, k, v, bias, mask, is_causal=bool(causal or is_causal),
                                    local_window_size=local_window_size, dropout_rate=rate,
                                    dropout_key=dropout_rng if rate > 0 else None)
        out = out.reshape(*lead, *out.shape[-3:])
        return out if dtype is None else out.astype(dtype)

    return attention_fn
