"""Attention in plain JAX (XLA), no Pallas: blockwise online softmax, O(S * block) memory.

Backend ``xla``. Covers the dense forward, backward and S_dmask with every score feature (masks,
softcap, ALiBi, dropout with the kernels' keep mask, GQA/MQA, any dtype and head dim) on any
platform; varlen, the KV cache and sequence shards go to the next backend. It is the automatic
choice where no kernel compiles (CPU, TPU: after the GPU backends, before Pallas interpret mode,
which stays available as ``FLASH_ATTN_JAX_BACKEND=pallas-interpret``).
"""

from __future__ import annotations

from flash_attn_jax.kernels.registry import Backend, Request
from flash_attn_jax.kernels.xla import dense


class Xla(Backend):
    """The blockwise jnp/lax attention of ``dense``."""

    name = "xla"

    def supports(self, request: Request) -> str | None:
        if request.op not in ("forward", "backward", "probabilities"):
            return f"no {request.op} yet"
        if request.varlen or request.paged:
            return "the dense layout only"
        if request.positions:
            return "no sequence shards yet"
        return None

    def forward(self, q, k, v, slopes, spec, varlen=None, seed=None, *, placement=None,
                out_dtype=None):
        return dense.forward(q, k, v, slopes, spec, seed, placement=placement,
                             out_dtype=out_dtype)

    def probabilities(self, q, k, lse, slopes, spec, varlen=None, seed=None, *, placement=None):
        return dense.probabilities(q, k, lse, slopes, spec, seed, placement=placement)

    def backward_delta(self, out, dout, dlse):
        return dense.row_delta(out, dout, dlse)

    def backward(self, q, k, v, slopes, out, lse, dout, dlse, spec, varlen=None, seed=None, *,
                 placement=None, grad_dtype=None, delta=None):
        return dense.backward(q, k, v, slopes, out, lse, dout, dlse, spec, seed,
                              placement=placement, grad_dtype=grad_dtype, delta=delta)
