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


def _first_order_only(kernel):
    """``kernel(spec, *arrays)`` that raises a clear error when differentiated itself.

    Reverse mode only needs the kernels evaluated; differentiating them (a gradient of a gradient)
    would reach the raw pallas_calls, which cannot be differentiated.
    """
    guarded = jax.custom_jvp(kernel, nondiff_argnums=(0,))

    @guarded.defjvp
    def _jvp(spec, primals, tangents):
        del spec, primals, tangents
        raise NotImplementedError(
            "flash_attn_jax: second-order differentiation (a gradient of the gradient) is not "
            "supported; use flash_attn_jax.attention_reference where it is needed")

    return guarded


_forward = _first_order_only(lambda spec, q, k, v, slopes: kernels.forward(q, k, v, slopes, spec))
_backward = _first_order_only(lambda spec, *arrays: kernels.backward(*arrays, spec))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, slopes, spec: ScoreSpec):
    return kernels.forward(q, k, v, slopes, spec)


def _attention_fwd(q, k, v, slopes, spec):
    out, lse = _forward(spec, q, k, v, slopes)
    return (out, lse), (q, k, v, slopes, out, lse)


def _attention_bwd(spec, residuals, cotangents):
    dq, dk, dv = _backward(spec, *residuals, *cotangents)
    return dq, dk, dv, None  # ALiBi slopes get no gradient


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
