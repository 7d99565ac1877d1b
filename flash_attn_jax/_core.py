"""The differentiable attention core that every public variant is a view onto.

``attention`` takes canonical dense inputs (B, S, H, D) and a static ScoreSpec and returns
(out, lse); the packed variants slice their inputs into it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flash_attn_jax import kernels
from flash_attn_jax.semantics import ScoreSpec


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, slopes, spec: ScoreSpec):
    return kernels.forward(q, k, v, slopes, spec)


def _attention_fwd(q, k, v, slopes, spec):
    out, lse = kernels.forward(q, k, v, slopes, spec)
    return (out, lse), (q, k, v, slopes, out, lse)


def _attention_bwd(spec, residuals, cotangents):
    del spec, residuals, cotangents
    raise NotImplementedError(
        "flash_attn_jax: the backward pass (gradients of q, k, v) is not implemented yet; "
        "use flash_attn_jax.attention_reference for a differentiable slow path")


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, slopes, spec: ScoreSpec):
    """(out (B, Sq, H, D), lse (B, H, Sq) float32) of dense attention, differentiable in q, k, v."""
    batch, seqlen_q, num_heads, _ = q.shape
    lse_shape = (batch, num_heads, seqlen_q)
    if q.size == 0:
        return jnp.zeros(q.shape, q.dtype), jnp.zeros(lse_shape, jnp.float32)
    if k.shape[1] == 0:  # no keys at all: every row is empty
        return jnp.zeros(q.shape, q.dtype), jnp.full(lse_shape, -jnp.inf, jnp.float32)
    return _attention(q, k, v, slopes, spec)


def attention_probs(q, k, lse, slopes, spec: ScoreSpec):
    """Softmax probabilities (B, H, Sq, Sk) float32; not differentiable (a diagnostic output)."""
    batch, seqlen_q, num_heads, _ = q.shape
    shape = (batch, num_heads, seqlen_q, k.shape[1])
    if q.size == 0 or k.shape[1] == 0:
        return jnp.zeros(shape, jnp.float32)
    q, k, lse = (jax.lax.stop_gradient(x) for x in (q, k, lse))
    return kernels.probabilities(q, k, lse, slopes, spec)
