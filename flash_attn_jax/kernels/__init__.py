"""The one seam between the attention core and the kernel implementations.

Everything above this module (the public API, custom_vjp, the reference, the tests) calls only the
functions defined here. Today they dispatch to the Pallas kernels lowered through Triton
(``triton_forward``, ``triton_backward``, ``triton_decode``); another backend (Mosaic GPU, say) would be selected here without touching
anything else.

Backend selection: on a GPU the kernels are compiled by Triton; on any other backend they run in
Pallas interpret mode (slow, for testing and debugging). The environment variable
``FLASH_ATTN_JAX_INTERPRET`` overrides that: ``1`` forces interpret mode even on a GPU (to debug a
kernel with plain JAX semantics), ``0`` forces the Triton lowering even without a GPU (only useful
to lower kernels for an abstract GPU, as the lowering tests do). It is read at trace time.
"""

from __future__ import annotations

import os

import jax

from flash_attn_jax.kernels import triton_backward, triton_decode, triton_forward
from flash_attn_jax.kernels.config import (backward_configs, decode_config, forward_config,
                                           num_splits_heuristic, padded_head_dim)

INTERPRET_ENV = "FLASH_ATTN_JAX_INTERPRET"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def use_interpret() -> bool:
    """Whether the kernels run in Pallas interpret mode (see the module docstring)."""
    value = os.environ.get(INTERPRET_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value:
        raise ValueError(f"{INTERPRET_ENV} must be one of {_TRUE + _FALSE} or unset, got {value!r}")
    return jax.default_backend() != "gpu"


def backend_name() -> str:
    return "pallas-interpret" if use_interpret() else "pallas-triton"


def _config(q, k):
    return forward_config(q.dtype, padded_head_dim(q.shape[-1]), q.shape[1], k.shape[1])


def forward(q, k, v, slopes, spec):
    """Dense attention: out (B, Sq, H, D) and lse (B, H, Sq) float32."""
    return triton_forward.forward(q, k, v, slopes, spec, _config(q, k), interpret=use_interpret())


def probabilities(q, k, lse, slopes, spec):
    """Softmax probabilities (B, H, Sq, Sk) float32 given the forward's lse."""
    return triton_forward.probabilities(q, k, lse, slopes, spec, _config(q, k),
                                        interpret=use_interpret())


def backward(q, k, v, slopes, out, lse, dout, dlse, spec):
    """(dq, dk, dv) of dense attention from its residuals and the cotangents of (out, lse)."""
    dkdv_config, dq_config = backward_configs(q.dtype, padded_head_dim(q.shape[-1]), q.shape[1],
                                              k.shape[1])
    return triton_backward.backward(q, k, v, slopes, out, lse, dout, dlse, spec, dkdv_config,
                                    dq_config, interpret=use_interpret())


def _num_sms():
    """Streaming multiprocessors of the GPU (an H100's 132 when there is none, for the heuristic)."""
    device = jax.devices()[0]
    return (getattr(device, "core_count", None) if device.platform == "gpu" else None) or 132


def kvcache_append(k_cache, v_cache, k, v, cache_seqlens, batch_idx, table):
    """The caches with k, v written at cache_seqlens (in place when the caches are donated)."""
    return triton_decode.append(k_cache, v_cache, k, v, cache_seqlens, batch_idx, table,
                                interpret=use_interpret())


def kvcache_attention(q, k_cache, v_cache, lengths, leftpad, batch_idx, table, slopes, spec,
                      num_splits):
    """(out (B, Sq, H, D), lse (B, H, Sq)) of q over the caches' first ``lengths`` positions.

    ``num_splits`` 0 picks the split of the key range by a heuristic that fills the GPU.
    """
    batch, seqlen_q, num_heads, head_dim = q.shape
    page_size, num_heads_k = k_cache.shape[1], k_cache.shape[2]
    capacity = page_size if table is None else table.shape[1] * page_size
    config = decode_config(q.dtype, padded_head_dim(head_dim), seqlen_q, num_heads // num_heads_k,
                           capacity, None if table is None else page_size)
    if num_splits == 0:
        programs = batch * num_heads_k * -(-seqlen_q // config.block_i)
        num_splits = num_splits_heuristic(programs, -(-capacity // config.block_k), _num_sms())
    out, lse = triton_decode.attention(q, k_cache, v_cache, lengths, leftpad, batch_idx, table,
                                       slopes, spec, config, num_splits, interpret=use_interpret())
    return out, lse.transpose(0, 2, 1)
