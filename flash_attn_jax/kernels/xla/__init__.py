"""Attention in plain JAX (XLA), no Pallas: blockwise online softmax, O(S * block) memory.

Backend ``xla``. Covers the forward, backward and S_dmask of the dense and varlen layouts
(``varlen``: sequences gathered into padded rows) with every score feature (masks, softcap, ALiBi,
dropout with the kernels' keep mask, GQA/MQA, any dtype and head dim), paged varlen keys, and the
KV cache (append in place under donation, attention over cache rows or pages: ``kvcache``) on any
platform; sequence shards (ring attention's placed calls) go to the next backend. It is the automatic
choice where no kernel compiles (CPU, TPU: after the GPU backends, before Pallas interpret mode,
which stays available as ``FLASH_ATTN_JAX_BACKEND=pallas-interpret``).
"""

from __future__ import annotations

from flash_attn_jax import semantics
from flash_attn_jax.kernels.registry import Backend, Request
from flash_attn_jax.kernels.xla import dense, kvcache, varlen as _varlen


class Xla(Backend):
    """The blockwise jnp/lax attention of ``dense``."""

    name = "xla"

    def supports(self, request: Request) -> str | None:
        if request.positions:
            return "no sequence shards yet"
        return None

    def forward(self, q, k, v, slopes, spec, varlen=None, seed=None, *, placement=None,
                out_dtype=None):
        if varlen is not None:
            return _varlen.forward(q, k, v, slopes, spec, varlen, seed, placement=placement,
                                   out_dtype=out_dtype)
        return dense.forward(q, k, v, slopes, spec, seed, placement=placement,
                             out_dtype=out_dtype)

    def probabilities(self, q, k, lse, slopes, spec, varlen=None, seed=None, *, placement=None):
        if varlen is not None:
            return _varlen.probabilities(q, k, lse, slopes, spec, varlen, seed,
                                         placement=placement)
        return dense.probabilities(q, k, lse, slopes, spec, seed, placement=placement)

    def backward_delta(self, out, dout, dlse):
        return semantics.output_delta(out, dout, dlse)

    def backward(self, q, k, v, slopes, out, lse, dout, dlse, spec, varlen=None, seed=None, *,
                 placement=None, grad_dtype=None, delta=None):
        if varlen is not None:
            return _varlen.backward(q, k, v, slopes, out, lse, dout, dlse, spec, varlen, seed,
                                    placement=placement, grad_dtype=grad_dtype, delta=delta)
        return dense.backward(q, k, v, slopes, out, lse, dout, dlse, spec, seed,
                              placement=placement, grad_dtype=grad_dtype, delta=delta)

    def kvcache_append(self, k_cache, v_cache, k, v, cache_seqlens, batch_idx, table, keep=None):
        return kvcache.append(k_cache, v_cache, k, v, cache_seqlens, batch_idx, table, keep)

    def kvcache_attention(self, q, k_cache, v_cache, lengths, leftpad, batch_idx, table, slopes,
                          spec, num_splits):
        del num_splits  # one pass over the keys: nothing to split
        return kvcache.attention(q, k_cache, v_cache, lengths, leftpad, batch_idx, table, slopes,
                                 spec)
