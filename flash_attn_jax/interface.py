"""The public functions, with flash-attn's signatures and argument semantics.

Each function validates its arguments (at trace time), reshapes packed inputs into the canonical
(batch, seqlen, heads, headdim) views and calls the one attention core.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, overload

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from flash_attn_jax import _core
from flash_attn_jax import _validation as check
from flash_attn_jax.kernels import Varlen
from flash_attn_jax.semantics import sequence_bounds

_COMMON_ARGS_DOC = """
      dropout_p: dropout probability in [0, 1) (needs dropout_key). The kept probabilities are
        scaled by 1 / (1 - dropout_p); softmax_lse is the pre-dropout logsumexp. The keep mask is
        a pure function of (dropout_key, batch row, head, row, column): the same key gives bitwise
        the same outputs and gradients; vmapped calls with one key share the mask (pass split keys
        for independent masks).
      softmax_scale: multiplies q . k before the softmax; defaults to headdim ** -0.5.
      causal: causal mask aligned to the bottom-right corner of the (seqlen_q, seqlen_k) score
        matrix: query row i attends keys j <= i + seqlen_k - seqlen_q. Same as window
        (window_size[0], 0).
      window_size: (left, right): row i attends keys in
        [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 leaves a side unbounded.
      softcap: > 0 replaces the scaled score x by softcap * tanh(x / softcap); <= 0 disables it.
      alibi_slopes: float32 (nheads,) or (batch, nheads): adds -slope * |i + seqlen_k - seqlen_q - j|
        to the scores of each query head (after softcap).
      deterministic: True makes the backward bitwise reproducible. With False (flash-attn's
        default) the Mosaic GPU backward on Hopper may sum dQ with float32 atomics (equal to
        rounding run to run); every other path is bitwise reproducible either way, and the
        forward always is.
      return_attn_probs: also return the logsumexp and the attention probabilities.
      dropout_key: a jax PRNG key (jax.random.key, or raw uint32[2] key data as from
        jax.random.PRNGKey), required when dropout_p > 0 (keyword only).

    Returns:
      out (batch, seqlen_q, nheads, headdim) in the input dtype, or, with return_attn_probs,
      (out, softmax_lse, S_dmask): softmax_lse (batch, nheads, seqlen_q) float32, the natural-log
      logsumexp of each row's scores; S_dmask (batch, nheads, seqlen_q, seqlen_k) float32, the
      softmax probabilities P, negated where dropout dropped an entry (sign bit set, -0.0 for a
      dropped 0). A query row with no key inside its mask gets out 0 and softmax_lse -inf.

    Raises:
      ValueError for bad shapes or values, TypeError for bad types or dtypes, naming the argument.
    """


@dataclasses.dataclass(frozen=True)
class _Flags:
    """The flags every attention function takes, as the caller gave them."""

    dropout_p: object
    softmax_scale: object
    causal: object
    window_size: object
    softcap: object
    alibi_slopes: object
    deterministic: object
    return_attn_probs: object
    dropout_key: object

    @classmethod
    def of(cls, arguments):
        """From a public function's ``locals()``."""
        return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})

    def checked(self, batch, num_heads, head_dim, longest):
        """(slopes (batch, nheads) or None, ScoreSpec, dropout key words or None,
        return_attn_probs); ``longest`` bounds the sequence lengths (``check.score_spec``)."""
        slopes, spec, seed = check.attention_options(
            batch, num_heads, head_dim, dropout_p=self.dropout_p,
            softmax_scale=self.softmax_scale, causal=self.causal, window_size=self.window_size,
            softcap=self.softcap, alibi=self.alibi_slopes, deterministic=self.deterministic,
            dropout_key=self.dropout_key, longest=longest)
        return slopes, spec, seed, check.static_bool("return_attn_probs", self.return_attn_probs)


def _dense(q, k, v, flags: _Flags, names):
    batch, seqlen_q, seqlen_k, num_heads, _, head_dim = check.dense_qkv(q, k, v, **names)
    slopes, spec, seed, return_attn_probs = flags.checked(batch, num_heads, head_dim,
                                                          max(seqlen_q, seqlen_k))
    out, lse = _core.attention(q, k, v, slopes, spec, seed)
    if not return_attn_probs:
        return out
    return out, lse, _core.attention_probs(q, k, lse, slopes, spec, seed=seed)


def _packed(name, x, count, what, axis=2):
    check.array(name, x, axis + 3)
    if x.shape[axis] != count:
        raise ValueError(f"{name} must have shape {what} with {count} on axis {axis}, got "
                         f"{tuple(x.shape)}")
    return [x[(slice(None),) * axis + (i,)] for i in range(count)]


@overload
def flash_attn_func(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, dropout_p: float = ...,
    softmax_scale: float | None = ..., causal: bool = ..., window_size: tuple[int, int] = ...,
    softcap: float = ..., alibi_slopes: ArrayLike | None = ..., deterministic: bool = ...,
    return_attn_probs: Literal[False] = ..., *, dropout_key: ArrayLike | None = ...,
) -> jax.Array: ...
@overload
def flash_attn_func(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, dropout_p: float = ...,
    softmax_scale: float | None = ..., causal: bool = ..., window_size: tuple[int, int] = ...,
    softcap: float = ..., alibi_slopes: ArrayLike | None = ..., deterministic: bool = ..., *,
    return_attn_probs: Literal[True], dropout_key: ArrayLike | None = ...,
) -> tuple[jax.Array, jax.Array, jax.Array]: ...
@overload
def flash_attn_func(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, dropout_p: float = ...,
    softmax_scale: float | None = ..., causal: bool = ..., window_size: tuple[int, int] = ...,
    softcap: float = ..., alibi_slopes: ArrayLike | None = ..., deterministic: bool = ...,
    return_attn_probs: bool = ..., *, dropout_key: ArrayLike | None = ...,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]: ...


def flash_attn_func(q: ArrayLike, k: ArrayLike, v: ArrayLike, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: ArrayLike | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, dropout_key: ArrayLike | None = None
                    ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Flash attention over separate q, k, v.

    Args:
      q: (batch, seqlen_q, nheads, headdim), float16, bfloat16 or float32; headdim in [1, 256].
      k, v: (batch, seqlen_k, nheads_k, headdim) with q's dtype. nheads must be a multiple of
        nheads_k (GQA/MQA): query head h uses key/value head h // (nheads // nheads_k).
    """
    return _dense(q, k, v, _Flags.of(locals()), {})


@overload
def flash_attn_qkvpacked_func(
    qkv: ArrayLike, dropout_p: float = ..., softmax_scale: float | None = ..., causal: bool = ...,
    window_size: tuple[int, int] = ..., softcap: float = ..., alibi_slopes: ArrayLike | None = ...,
    deterministic: bool = ..., return_attn_probs: Literal[False] = ..., *,
    dropout_key: ArrayLike | None = ...,
) -> jax.Array: ...
@overload
def flash_attn_qkvpacked_func(
    qkv: ArrayLike, dropout_p: float = ..., softmax_scale: float | None = ..., causal: bool = ...,
    window_size: tuple[int, int] = ..., softcap: float = ..., alibi_slopes: ArrayLike | None = ...,
    deterministic: bool = ..., *, return_attn_probs: Literal[True],
    dropout_key: ArrayLike | None = ...,
) -> tuple[jax.Array, jax.Array, jax.Array]: ...
@overload
def flash_attn_qkvpacked_func(
    qkv: ArrayLike, dropout_p: float = ..., softmax_scale: float | None = ..., causal: bool = ...,
    window_size: tuple[int, int] = ..., softcap: float = ..., alibi_slopes: ArrayLike | None = ...,
    deterministic: bool = ..., return_attn_probs: bool = ..., *,
    dropout_key: ArrayLike | None = ...,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]: ...


def flash_attn_qkvpacked_func(qkv: ArrayLike, dropout_p: float = 0.0,
                              softmax_scale: float | None = None, causal: bool = False,
                              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: ArrayLike | None = None, deterministic: bool = False,
                              return_attn_probs: bool = False, *,
                              dropout_key: ArrayLike | None = None
                              ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Flash attention over packed queries, keys and values (self-attention).

    Args:
      qkv: (batch, seqlen, 3, nheads, headdim): qkv[:, :, 0] are the queries, 1 the keys, 2 the
        values.
    """
    q, k, v = _packed("qkv", qkv, 3, "(batch, seqlen, 3, nheads, headdim)")
    return _dense(q, k, v, _Flags.of(locals()), dict(q_name="qkv", k_name="qkv", v_name="qkv"))


@overload
def flash_attn_kvpacked_func(
    q: ArrayLike, kv: ArrayLike, dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ...,
    return_attn_probs: Literal[False] = ..., *, dropout_key: ArrayLike | None = ...,
) -> jax.Array: ...
@overload
def flash_attn_kvpacked_func(
    q: ArrayLike, kv: ArrayLike, dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ..., *,
    return_attn_probs: Literal[True], dropout_key: ArrayLike | None = ...,
) -> tuple[jax.Array, jax.Array, jax.Array]: ...
@overload
def flash_attn_kvpacked_func(
    q: ArrayLike, kv: ArrayLike, dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ..., return_attn_probs: bool = ...,
    *, dropout_key: ArrayLike | None = ...,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]: ...


def flash_attn_kvpacked_func(q: ArrayLike, kv: ArrayLike, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: ArrayLike | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False, *,
                             dropout_key: ArrayLike | None = None
                             ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Flash attention over queries and packed keys and values.

    Args:
      q: (batch, seqlen_q, nheads, headdim).
      kv: (batch, seqlen_k, 2, nheads_k, headdim): kv[:, :, 0] are the keys, 1 the values.
    """
    k, v = _packed("kv", kv, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return _dense(q, k, v, _Flags.of(locals()), dict(k_name="kv", v_name="kv"))


for _fn in (flash_attn_func, flash_attn_qkvpacked_func, flash_attn_kvpacked_func):
    _fn.__doc__ = _fn.__doc__.rstrip() + _COMMON_ARGS_DOC


_VARLEN_ARGS_DOC = """
      cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) (any signed integer dtype), cumulative:
        sequence b holds the query tokens [cu_seqlens_q[b], cu_seqlens_q[b + 1]) and the key
        tokens [cu_seqlens_k[b], cu_seqlens_k[b + 1]). Lengths may be 0. Tokens after
        cu_seqlens[-1] (padding at the end) belong to no sequence: out 0, softmax_lse -inf, zero
        gradients. Concrete values must start at 0, never decrease and end at most at the token
        count; traced ones are read as their running maximum clipped to the tokens.
      max_seqlen_q, max_seqlen_k: Python ints >= every sequence's length (overestimates are fine;
        they size the launch grid and S_dmask, the work follows the real lengths). Checked
        against concrete cu_seqlens; with traced ones a longer sequence is truncated to its first
        max_seqlen tokens, the rest getting out 0, softmax_lse -inf, zero gradients.
      dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
      dropout_key: as for flash_attn_func, per sequence: causal and the window are aligned to the
        bottom-right corner of each sequence's (seqlen_q_b, seqlen_k_b) score matrix.
      return_attn_probs: also return softmax_lse and the probabilities.

    Returns:
      out (total_q, nheads, headdim) in the input dtype, or, with return_attn_probs,
      (out, softmax_lse, S_dmask): softmax_lse (nheads, total_q) float32 (flash-attn's varlen
      layout); S_dmask (batch, nheads, max_seqlen_q, max_seqlen_k) float32, the probabilities of
      sequence b at [b, :, i, j], 0 outside its lengths.

    Composes with jax.jit, jax.grad and jax.vmap: vmapping over an outer axis of the arrays runs
    independent packed batches, with cu_seqlens shared (in_axes None) or batched as well.

    Raises:
      ValueError for bad shapes or values, TypeError for bad types or dtypes, naming the argument.
    """


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
            flags: _Flags, names):
    batch, num_heads, head_dim, max_q, max_k, cu_seqlens_q, cu_seqlens_k, block_table = (
        check.varlen_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         block_table, **names))
    # Each sequence's lengths are at most the tokens (or a paged key's capacity).
    key_room = k.shape[0] if block_table is None else block_table.shape[1] * k.shape[1]
    slopes, spec, seed, return_attn_probs = flags.checked(batch, num_heads, head_dim,
                                                          max(q.shape[0], key_room))
    total_k = check.INT32_MAX if block_table is not None else k.shape[0]
    # No sequence is longer than the tokens (or a paged key's capacity): the grids need no more.
    varlen = Varlen(cu_seqlens_q=sequence_bounds(cu_seqlens_q, q.shape[0]),
                    cu_seqlens_k=sequence_bounds(cu_seqlens_k, total_k), block_table=block_table,
                    max_seqlen_q=min(max_q, q.shape[0]), max_seqlen_k=min(max_k, key_room))
    probs_shape = (batch, num_heads, max_q, max_k)
    out, lse = _core.varlen_attention(q, k, v, slopes, varlen, spec, seed)
    if not return_attn_probs:
        return out
    probs = _core.attention_probs(q, k, lse, slopes, spec, varlen, seed)
    if probs.shape != probs_shape:  # S_dmask keeps the max_seqlen asked for (zeros past them)
        probs = jnp.pad(probs, [(0, want - have) for want, have in zip(probs_shape, probs.shape)])
    return out, lse, probs


@overload
def flash_attn_varlen_func(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ...,
    return_attn_probs: Literal[False] = ..., block_table: ArrayLike | None = ..., *,
    dropout_key: ArrayLike | None = ...,
) -> jax.Array: ...
@overload
def flash_attn_varlen_func(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ..., *,
    return_attn_probs: Literal[True], block_table: ArrayLike | None = ...,
    dropout_key: ArrayLike | None = ...,
) -> tuple[jax.Array, jax.Array, jax.Array]: ...
@overload
def flash_attn_varlen_func(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ..., return_attn_probs: bool = ...,
    block_table: ArrayLike | None = ..., *, dropout_key: ArrayLike | None = ...,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]: ...


def flash_attn_varlen_func(q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike,
                           cu_seqlens_k: ArrayLike, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None,
                           causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, alibi_slopes: ArrayLike | None = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: ArrayLike | None = None, *,
                           dropout_key: ArrayLike | None = None
                           ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Flash attention over variable-length sequences packed along the token axis.

    Args:
      q: (total_q, nheads, headdim), float16, bfloat16 or float32; headdim in [1, 256].
      k, v: (total_k, nheads_k, headdim) with q's dtype, nheads a multiple of nheads_k (GQA/MQA);
        or, with block_table, paged (num_blocks, page_block_size, nheads_k, headdim) with
        page_block_size a power of two >= 16.
      block_table: optional int32 (batch, max_blocks_per_seq): sequence b's key j lies in page
        block_table[b, j // page_block_size] (paged prefill; forward only, no gradient). Its
        length is still cu_seqlens_k[b + 1] - cu_seqlens_k[b]. Entries must lie in
        [0, num_blocks) and hold every sequence's keys (checked when concrete; traced, entries
        are clipped into range and keys past the table's capacity are absent).
    """
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                   _Flags.of(locals()), {})


@overload
def flash_attn_varlen_qkvpacked_func(
    qkv: ArrayLike, cu_seqlens: ArrayLike, max_seqlen: int, dropout_p: float = ...,
    softmax_scale: float | None = ..., causal: bool = ..., window_size: tuple[int, int] = ...,
    softcap: float = ..., alibi_slopes: ArrayLike | None = ..., deterministic: bool = ...,
    return_attn_probs: Literal[False] = ..., *, dropout_key: ArrayLike | None = ...,
) -> jax.Array: ...
@overload
def flash_attn_varlen_qkvpacked_func(
    qkv: ArrayLike, cu_seqlens: ArrayLike, max_seqlen: int, dropout_p: float = ...,
    softmax_scale: float | None = ..., causal: bool = ..., window_size: tuple[int, int] = ...,
    softcap: float = ..., alibi_slopes: ArrayLike | None = ..., deterministic: bool = ..., *,
    return_attn_probs: Literal[True], dropout_key: ArrayLike | None = ...,
) -> tuple[jax.Array, jax.Array, jax.Array]: ...
@overload
def flash_attn_varlen_qkvpacked_func(
    qkv: ArrayLike, cu_seqlens: ArrayLike, max_seqlen: int, dropout_p: float = ...,
    softmax_scale: float | None = ..., causal: bool = ..., window_size: tuple[int, int] = ...,
    softcap: float = ..., alibi_slopes: ArrayLike | None = ..., deterministic: bool = ...,
    return_attn_probs: bool = ..., *, dropout_key: ArrayLike | None = ...,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]: ...


def flash_attn_varlen_qkvpacked_func(qkv: ArrayLike, cu_seqlens: ArrayLike, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: float | None = None,
                                     causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: ArrayLike | None = None,
                                     deterministic: bool = False, return_attn_probs: bool = False,
                                     *, dropout_key: ArrayLike | None = None
                                     ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Variable-length self-attention over packed queries, keys and values.

    Args:
      qkv: (total, 3, nheads, headdim): qkv[:, 0] are the queries, 1 the keys, 2 the values.
      cu_seqlens: int32 (batch + 1,), the sequences of both queries and keys.
      max_seqlen: Python int >= every sequence's length.
    """
    q, k, v = _packed("qkv", qkv, 3, "(total, 3, nheads, headdim)", axis=1)
    names = dict(q_name="qkv", k_name="qkv", v_name="qkv", cu_q_name="cu_seqlens",
                 cu_k_name="cu_seqlens", max_q_name="max_seqlen", max_k_name="max_seqlen")
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, None,
                   _Flags.of(locals()), names)


@overload
def flash_attn_varlen_kvpacked_func(
    q: ArrayLike, kv: ArrayLike, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ...,
    return_attn_probs: Literal[False] = ..., *, dropout_key: ArrayLike | None = ...,
) -> jax.Array: ...
@overload
def flash_attn_varlen_kvpacked_func(
    q: ArrayLike, kv: ArrayLike, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ..., *,
    return_attn_probs: Literal[True], dropout_key: ArrayLike | None = ...,
) -> tuple[jax.Array, jax.Array, jax.Array]: ...
@overload
def flash_attn_varlen_kvpacked_func(
    q: ArrayLike, kv: ArrayLike, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ..., return_attn_probs: bool = ...,
    *, dropout_key: ArrayLike | None = ...,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]: ...


def flash_attn_varlen_kvpacked_func(q: ArrayLike, kv: ArrayLike, cu_seqlens_q: ArrayLike,
                                    cu_seqlens_k: ArrayLike, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: float | None = None,
                                    causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: ArrayLike | None = None,
                                    deterministic: bool = False, return_attn_probs: bool = False, *,
                                    dropout_key: ArrayLike | None = None
                                    ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Variable-length attention over queries and packed keys and values.

    Args:
      q: (total_q, nheads, headdim).
      kv: (total_k, 2, nheads_k, headdim): kv[:, 0] are the keys, 1 the values.
    """
    k, v = _packed("kv", kv, 2, "(total_k, 2, nheads_k, headdim)", axis=1)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None,
                   _Flags.of(locals()), dict(k_name="kv", v_name="kv"))


for _fn in (flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func,
            flash_attn_varlen_kvpacked_func):
    _fn.__doc__ = _fn.__doc__.rstrip() + _VARLEN_ARGS_DOC


@overload
def flash_attn_with_kvcache(
    q: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike, k: None = ..., v: None = ...,
    rotary_cos: ArrayLike | None = ..., rotary_sin: ArrayLike | None = ...,
    cache_seqlens: ArrayLike | None = ..., cache_batch_idx: ArrayLike | None = ...,
    cache_leftpad: ArrayLike | None = ..., block_table: ArrayLike | None = ...,
    softmax_scale: float | None = ..., causal: bool = ..., window_size: tuple[int, int] = ...,
    softcap: float = ..., rotary_interleaved: bool = ..., alibi_slopes: ArrayLike | None = ...,
    num_splits: int = ..., return_softmax_lse: Literal[False] = ...,
) -> jax.Array: ...
@overload
def flash_attn_with_kvcache(
    q: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike, k: None = ..., v: None = ...,
    rotary_cos: ArrayLike | None = ..., rotary_sin: ArrayLike | None = ...,
    cache_seqlens: ArrayLike | None = ..., cache_batch_idx: ArrayLike | None = ...,
    cache_leftpad: ArrayLike | None = ..., block_table: ArrayLike | None = ...,
    softmax_scale: float | None = ..., causal: bool = ..., window_size: tuple[int, int] = ...,
    softcap: float = ..., rotary_interleaved: bool = ..., alibi_slopes: ArrayLike | None = ...,
    num_splits: int = ..., *, return_softmax_lse: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...
@overload
def flash_attn_with_kvcache(
    q: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike, k: ArrayLike, v: ArrayLike,
    rotary_cos: ArrayLike | None = ..., rotary_sin: ArrayLike | None = ...,
    cache_seqlens: ArrayLike | None = ..., cache_batch_idx: ArrayLike | None = ...,
    cache_leftpad: ArrayLike | None = ..., block_table: ArrayLike | None = ...,
    softmax_scale: float | None = ..., causal: bool = ..., window_size: tuple[int, int] = ...,
    softcap: float = ..., rotary_interleaved: bool = ..., alibi_slopes: ArrayLike | None = ...,
    num_splits: int = ..., return_softmax_lse: Literal[False] = ...,
) -> tuple[jax.Array, jax.Array, jax.Array]: ...
@overload
def flash_attn_with_kvcache(
    q: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike, k: ArrayLike, v: ArrayLike,
    rotary_cos: ArrayLike | None = ..., rotary_sin: ArrayLike | None = ...,
    cache_seqlens: ArrayLike | None = ..., cache_batch_idx: ArrayLike | None = ...,
    cache_leftpad: ArrayLike | None = ..., block_table: ArrayLike | None = ...,
    softmax_scale: float | None = ..., causal: bool = ..., window_size: tuple[int, int] = ...,
    softcap: float = ..., rotary_interleaved: bool = ..., alibi_slopes: ArrayLike | None = ...,
    num_splits: int = ..., *, return_softmax_lse: Literal[True],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]: ...
@overload
def flash_attn_with_kvcache(
    q: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike, k: ArrayLike | None = ...,
    v: ArrayLike | None = ..., rotary_cos: ArrayLike | None = ...,
    rotary_sin: ArrayLike | None = ..., cache_seqlens: ArrayLike | None = ...,
    cache_batch_idx: ArrayLike | None = ..., cache_leftpad: ArrayLike | None = ...,
    block_table: ArrayLike | None = ..., softmax_scale: float | None = ..., causal: bool = ...,
    window_size: tuple[int, int] = ..., softcap: float = ..., rotary_interleaved: bool = ...,
    alibi_slopes: ArrayLike | None = ..., num_splits: int = ..., return_softmax_lse: bool = ...,
) -> (jax.Array | tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array]
      | tuple[jax.Array, jax.Array, jax.Array, jax.Array]): ...


def flash_attn_with_kvcache(q: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike,
                            k: ArrayLike | None = None, v: ArrayLike | None = None,
                            rotary_cos: ArrayLike | None = None,
                            rotary_sin: ArrayLike | None = None,
                            cache_seqlens: ArrayLike | None = None,
                            cache_batch_idx: ArrayLike | None = None,
                            cache_leftpad: ArrayLike | None = None,
                            block_table: ArrayLike | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: ArrayLike | None = None,
                            num_splits: int = 0, return_softmax_lse: bool = False
                            ) -> (jax.Array | tuple[jax.Array, jax.Array]
                                  | tuple[jax.Array, jax.Array, jax.Array]
                                  | tuple[jax.Array, jax.Array, jax.Array, jax.Array]):
    """Attention of new queries over a KV cache, appending new keys and values first (inference).

    Functional: instead of mutating the caches the call returns them updated. Under ``jax.jit``
    with ``k_cache`` and ``v_cache`` donated (``donate_argnums``), the update happens in place:
    only the new rows are written, the caches are never copied. Forward only (no gradient).

    Args:
      q: (batch, seqlen_q, nheads, headdim), float16, bfloat16 or float32; headdim in [1, 256].
      k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), batch_cache == batch unless
        cache_batch_idx is given; or, with block_table, paged (num_blocks, page_block_size,
        nheads_k, headdim) with page_block_size a power of two >= 16. Same dtype as q.
      k, v: optional (batch, seqlen_new, nheads_k, headdim) new keys and values, written at cache
        positions [cache_seqlens[b], cache_seqlens[b] + seqlen_new) of each row before attending.
        Positions past the capacity are dropped.
      rotary_cos, rotary_sin: optional (seqlen_ro >= capacity, rotary_dim / 2) in q's dtype (needs
        k): the first rotary_dim features of the new keys are rotated at their cache positions,
        those of q at cache_seqlens + i when causal or a window applies, else at cache_seqlens.
      cache_seqlens: int or int32 (batch,): the positions already in use in each row (None: the
        whole capacity, only without k). Concrete values must be >= 0; traced negative ones drop
        the new keys that would land before position 0.
      cache_batch_idx: optional int32 (batch,): the cache row of each batch row (concrete: a row
        of the cache; traced, an index outside marks a missing row). Where two batch rows (or
        pages shared between rows) would write one cache slot, the first row writes it.
      cache_leftpad: optional int32 (batch,): each row's keys start at this cache position
        (within [0, capacity]; traced values are clipped into it).
      block_table: optional int32 (batch, max_blocks_per_seq): the cache pages of each row; the
        capacity is max_blocks_per_seq * page_block_size. Entries outside [0, num_blocks) mark
        missing pages: nothing is read from or written to them.
      softmax_scale, causal, window_size, softcap, alibi_slopes: as for flash_attn_func, with
        seqlen_k = cache_seqlens[b] + seqlen_new - cache_leftpad[b] keys in row b (key column j at
        cache position cache_leftpad[b] + j).
      rotary_interleaved: rotate feature pairs (2m, 2m + 1) (GPT-J; the default) rather than
        halves (GPT-NeoX).
      num_splits: 0 picks how many parts the cache length is split into (to fill the GPU when
        batch x nheads_k is small), 1 does not split, n > 1 splits into n (at most 128). Results
        agree up to floating-point rounding.
      return_softmax_lse: also return softmax_lse (batch, nheads, seqlen_q) float32.

    Returns:
      ``out`` or ``(out, softmax_lse)`` without k and v; ``(out, k_cache, v_cache)`` or
      ``(out, softmax_lse, k_cache, v_cache)`` with them. out is (batch, seqlen_q, nheads,
      headdim) in q's dtype; rows without any key get out 0 and softmax_lse -inf.

    Raises:
      ValueError for bad shapes or values, TypeError for bad types or dtypes, naming the argument.
    """
    layout, indices = check.kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin,
                                    cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
    slopes = check.alibi_slopes(alibi_slopes, layout.batch, layout.num_heads)
    spec = check.score_spec(head_dim=layout.head_dim, softmax_scale=softmax_scale, causal=causal,
                            window=window_size, softcap=softcap, has_alibi=slopes is not None,
                            longest=max(layout.capacity, layout.seqlen_q))
    call = _core.CacheCall(spec=spec, layout=layout,
                           rotary_interleaved=check.static_bool("rotary_interleaved", rotary_interleaved),
                           num_splits=check.static_int("num_splits", num_splits, 0, 128))
    return_lse = check.static_bool("return_softmax_lse", return_softmax_lse)
    out, lse, k_cache, v_cache = _core.kvcache(
        call, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, indices.cache_seqlens,
        indices.cache_batch_idx, indices.cache_leftpad, indices.block_table, slopes)
    results = (out, lse) if return_lse else (out,)
    if k is not None:
        results += (k_cache, v_cache)
    return results[0] if len(results) == 1 else results
