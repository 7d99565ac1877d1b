"""The Pallas kernels lowered through Triton, and the same kernels in Pallas interpret mode.

Two backends of the registry: ``pallas-triton`` compiles the kernels for an NVIDIA or AMD GPU
(every feature, every dtype), ``pallas-interpret`` runs them as plain JAX programs on any platform
(slow: for CPU tests and debugging). Kernels: ``forward`` (attention and S_dmask), ``backward``,
``decode`` (the KV cache), written once for the layouts of ``segments``; block configurations in
``config``; tile helpers in ``tiles``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flash_attn_jax.kernels.registry import Backend, Request
from flash_attn_jax.kernels.triton import backward as _backward
from flash_attn_jax.kernels.triton import decode as _decode
from flash_attn_jax.kernels.triton import forward as _forward
from flash_attn_jax.kernels.triton import segments
from flash_attn_jax.kernels.triton.config import (backward_configs, decode_config, forward_config,
                                                  num_splits_heuristic, padded_head_dim)

_MAX_HEAD_DIM = 256


def _lengths(q, k, varlen):
    """(max query length, max key length) of a batch row."""
    if varlen is None:
        return q.shape[1], k.shape[1]
    return varlen.max_seqlen_q, varlen.max_seqlen_k


def _forward_config(q, k, spec, varlen):
    config = forward_config(q.dtype, padded_head_dim(q.shape[-1]), *_lengths(q, k, varlen),
                            dropout=spec.has_dropout)
    if varlen is not None and varlen.block_table is not None:  # key blocks stay within a page
        config = dataclasses.replace(config, block_k=min(config.block_k, k.shape[1]))
    return config


def layout_args(k, varlen, placement):
    """The kernels' layout keywords: the segment layout and its leading int32 arrays."""
    words = None if placement is None else placement.words()
    words = () if words is None else (words,)
    if varlen is None:
        if not words:
            return {}
        return dict(layout=segments.Layout(place_words=words[0].size), seq_arrays=words)
    if placement is not None and placement.has_positions:
        raise ValueError("varlen kernels take no score positions")
    paged = varlen.block_table is not None
    layout = segments.Layout(varlen=True, page_size=k.shape[1] if paged else 0,
                             place_words=words[0].size if words else 0,
                             max_seqlen_q=varlen.max_seqlen_q, max_seqlen_k=varlen.max_seqlen_k)
    return dict(layout=layout, seq_arrays=varlen.arrays + words,
                max_seqlen_q=varlen.max_seqlen_q, max_seqlen_k=varlen.max_seqlen_k)


def _num_sms():
    """Streaming multiprocessors of the GPU (an H100's 132 when there is none, for the heuristic)."""
    device = jax.devices()[0]
    return (getattr(device, "core_count", None) if device.platform == "gpu" else None) or 132


class PallasTriton(Backend):
    """The Pallas kernels, compiled by Triton (``interpret=False``) or interpreted."""

    def __init__(self, *, interpret: bool):
        self.interpret = interpret
        self.name = "pallas-interpret" if interpret else "pallas-triton"

    def supports(self, request: Request) -> str | None:
        if request.head_dim > _MAX_HEAD_DIM:
            return f"head dims up to {_MAX_HEAD_DIM}"
        if not self.interpret and request.platform not in (None, "gpu"):
            return "it compiles for GPUs only"
        return None

    def _fill_outside(self, x, cu_seqlens, value, token_axis=0):
        return segments.fill_outside(x, cu_seqlens, value, token_axis=token_axis,
                                     interpret=self.interpret)

    def forward(self, q, k, v, slopes, spec, varlen=None, seed=None, *, placement=None,
                out_dtype=None):
        out, lse = _forward.forward(q, k, v, slopes, spec, _forward_config(q, k, spec, varlen),
                                    seed=seed, out_dtype=out_dtype, interpret=self.interpret,
                                    **layout_args(k, varlen, placement))
        if varlen is not None:
            out = self._fill_outside(out, varlen.cu_seqlens_q, 0.0)
            lse = self._fill_outside(lse, varlen.cu_seqlens_q, -jnp.inf, token_axis=1)
        return out, lse

    def probabilities(self, q, k, lse, slopes, spec, varlen=None, seed=None, *, placement=None):
        config = _forward_config(q, k, spec, varlen)
        return _forward.probabilities(q, k, lse, slopes, spec, config, seed=seed,
                                      interpret=self.interpret,
                                      **layout_args(k, varlen, placement))

    def backward_delta(self, out, dout, dlse):
        return _backward.row_delta(out, dout, dlse, interpret=self.interpret)

    def backward(self, q, k, v, slopes, out, lse, dout, dlse, spec, varlen=None, seed=None, *,
                 placement=None, grad_dtype=None, delta=None):
        dkdv_config, dq_config = backward_configs(q.dtype, padded_head_dim(q.shape[-1]),
                                                  *_lengths(q, k, varlen))
        dq, dk, dv = _backward.backward(q, k, v, slopes, out, lse, dout, dlse, spec,
                                        dkdv_config, dq_config, seed=seed, grad_dtype=grad_dtype,
                                        delta=delta, interpret=self.interpret,
                                        **layout_args(k, varlen, placement))
        if varlen is not None:
            dq = self._fill_outside(dq, varlen.cu_seqlens_q, 0.0)
            dk = self._fill_outside(dk, varlen.cu_seqlens_k, 0.0)
            dv = self._fill_outside(dv, varlen.cu_seqlens_k, 0.0)
        return dq, dk, dv

    def kvcache_append(self, k_cache, v_cache, k, v, cache_seqlens, batch_idx, table, keep=None):
        return _decode.append(k_cache, v_cache, k, v, cache_seqlens, batch_idx, table, keep,
                              interpret=self.interpret)

    def kvcache_attention(self, q, k_cache, v_cache, lengths, leftpad, batch_idx, table, slopes,
                          spec, num_splits):
        batch, seqlen_q, num_heads, head_dim = q.shape
        page_size, num_heads_k = k_cache.shape[1], k_cache.shape[2]
        capacity = page_size if table is None else table.shape[1] * page_size
        config = decode_config(q.dtype, padded_head_dim(head_dim), seqlen_q,
                               num_heads // num_heads_k, capacity,
                               None if table is None else page_size)
        if num_splits == 0:
            programs = batch * num_heads_k * -(-seqlen_q // config.block_i)
            num_splits = num_splits_heuristic(programs, -(-capacity // config.block_k),
                                              _num_sms())
        out, lse = _decode.attention(q, k_cache, v_cache, lengths, leftpad, batch_idx, table,
                                     slopes, spec, config, num_splits, interpret=self.interpret)
        return out, lse.transpose(0, 2, 1)
