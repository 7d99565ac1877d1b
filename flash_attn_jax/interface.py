"""The public functions, with flash-attn's signatures and argument semantics.

Each function validates its arguments (at trace time), reshapes packed inputs into the canonical
(batch, seqlen, heads, headdim) views and calls the one attention core.
"""

from __future__ import annotations

from flash_attn_jax import _core
from flash_attn_jax import _validation as check

_COMMON_ARGS_DOC = """
      dropout_p: dropout probability in [0, 1). Only 0.0 is supported so far.
      softmax_scale: multiplies q . k before the softmax; defaults to headdim ** -0.5.
      causal: causal mask aligned to the bottom-right corner of the (seqlen_q, seqlen_k) score
        matrix: query row i attends keys j <= i + seqlen_k - seqlen_q. Same as window
        (window_size[0], 0).
      window_size: (left, right): row i attends keys in
        [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 leaves a side unbounded.
      softcap: > 0 replaces the scaled score x by softcap * tanh(x / softcap); <= 0 disables it.
      alibi_slopes: float32 (nheads,) or (batch, nheads): adds -slope * |i + seqlen_k - seqlen_q - j|
        to the scores of each query head (after softcap).
      deterministic: accepted for compatibility; the forward pass is always deterministic.
      return_attn_probs: also return the logsumexp and the attention probabilities.
      dropout_key: a jax PRNG key, required when dropout_p > 0 (keyword only).

    Returns:
      out (batch, seqlen_q, nheads, headdim) in the input dtype, or, with return_attn_probs,
      (out, softmax_lse, S_dmask): softmax_lse (batch, nheads, seqlen_q) float32, the natural-log
      logsumexp of each row's scores; S_dmask (batch, nheads, seqlen_q, seqlen_k) float32, the
      softmax probabilities P. A query row with no key inside its mask gets out 0 and
      softmax_lse -inf.

    Raises:
      ValueError for bad shapes or values, TypeError for bad types or dtypes, naming the argument.
    """


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
           deterministic, return_attn_probs, dropout_key, names):
    batch, _, _, num_heads, _, head_dim = check.dense_qkv(q, k, v, **names)
    check.dropout(dropout_p, dropout_key)
    check.static_bool("deterministic", deterministic)
    return_attn_probs = check.static_bool("return_attn_probs", return_attn_probs)
    slopes = check.alibi_slopes(alibi_slopes, batch, num_heads)
    spec = check.score_spec(head_dim=head_dim, softmax_scale=softmax_scale, causal=causal,
                            window=window_size, softcap=softcap, has_alibi=slopes is not None)
    out, lse = _core.attention(q, k, v, slopes, spec)
    if not return_attn_probs:
        return out
    return out, lse, _core.attention_probs(q, k, lse, slopes, spec)


def _packed(name, x, count, what):
    check.array(name, x, 5)
    if x.shape[2] != count:
        raise ValueError(f"{name} must have shape {what} with {count} on axis 2, got {tuple(x.shape)}")
    return [x[:, :, i] for i in range(count)]


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                    *, dropout_key=None):
    """Flash attention over separate q, k, v.

    Args:
      q: (batch, seqlen_q, nheads, headdim), float16, bfloat16 or float32; headdim in [1, 256].
      k, v: (batch, seqlen_k, nheads_k, headdim) with q's dtype. nheads must be a multiple of
        nheads_k (GQA/MQA): query head h uses key/value head h // (nheads // nheads_k).
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, dropout_key, {})


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False, *, dropout_key=None):
    """Flash attention over packed queries, keys and values (self-attention).

    Args:
      qkv: (batch, seqlen, 3, nheads, headdim): qkv[:, :, 0] are the queries, 1 the keys, 2 the
        values.
    """
    q, k, v = _packed("qkv", qkv, 3, "(batch, seqlen, 3, nheads, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, dropout_key,
                  dict(q_name="qkv", k_name="qkv", v_name="qkv"))


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False, *, dropout_key=None):
    """Flash attention over queries and packed keys and values.

    Args:
      q: (batch, seqlen_q, nheads, headdim).
      kv: (batch, seqlen_k, 2, nheads_k, headdim): kv[:, :, 0] are the keys, 1 the values.
    """
    k, v = _packed("kv", kv, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, dropout_key, dict(k_name="kv", v_name="kv"))


for _fn in (flash_attn_func, flash_attn_qkvpacked_func, flash_attn_kvpacked_func):
    _fn.__doc__ = _fn.__doc__.rstrip() + _COMMON_ARGS_DOC
