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

import dataclasses
import os

import jax
import jax.numpy as jnp

from flash_attn_jax.kernels import triton_backward, triton_decode, triton_forward, triton_segments
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Varlen:
    """Variable-length batch rows packed along the token axis (the varlen functions' layout).

    Batch row b holds query tokens ``[cu_seqlens_q[b], cu_seqlens_q[b + 1])`` and key tokens
    ``[cu_seqlens_k[b], cu_seqlens_k[b + 1])``, or, with ``block_table`` (B, max_pages) int32, its
    ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` keys in the pages the table lists. The static
    ``max_seqlen_q``/``max_seqlen_k`` size the grids; a longer row is truncated to them. The
    cu_seqlens are the non-decreasing ``semantics.sequence_bounds``.
    """

    cu_seqlens_q: jax.Array
    cu_seqlens_k: jax.Array
    block_table: jax.Array | None
    max_seqlen_q: int = dataclasses.field(metadata=dict(static=True))
    max_seqlen_k: int = dataclasses.field(metadata=dict(static=True))

    @property
    def arrays(self):
        """(cu_seqlens_q, cu_seqlens_k[, block_table])."""
        table = () if self.block_table is None else (self.block_table,)
        return (self.cu_seqlens_q, self.cu_seqlens_k) + table

    def kernel_args(self, k, place_words=None):
        """Keyword arguments of the Triton kernels for keys ``k``, with the placement words."""
        paged = self.block_table is not None
        layout = triton_segments.Layout(varlen=True, page_size=k.shape[1] if paged else 0,
                                        place_words=0 if place_words is None else place_words.size,
                                        max_seqlen_q=self.max_seqlen_q,
                                        max_seqlen_k=self.max_seqlen_k)
        return dict(layout=layout, seq_arrays=self.arrays + _words(place_words),
                    max_seqlen_q=self.max_seqlen_q, max_seqlen_k=self.max_seqlen_k)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a call's arrays sit inside a larger attention they are a shard of (a mesh partition,
    a step of ring attention): int32 scalars.

    ``batch`` and ``head`` are the global indices of the first batch row and query head (the
    dropout mask hashes global indices). For a shard of the sequence (dense layout only),
    ``query`` and ``key`` are the score positions (the semantics' i and j) of the first query
    row and key, and ``diagonal`` the bottom-right offset of the whole score matrix (its
    seqlen_k - seqlen_q): masks and ALiBi then see global positions. None keeps the local ones.
    """

    batch: jax.Array
    head: jax.Array
    query: jax.Array | None = None
    key: jax.Array | None = None
    diagonal: jax.Array | None = None

    @property
    def has_positions(self) -> bool:
        return self.query is not None

    def words(self):
        """The kernels' placement operand: int32 (2,) or, with positions, (5,)."""
        parts = (self.batch, self.head)
        if self.has_positions:
            parts += (self.query, self.key, self.diagonal)
        return jnp.stack([jnp.asarray(x).astype(jnp.int32) for x in parts])


def _words(place_words):
    return () if place_words is None else (place_words,)


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


def _layout_args(k, varlen, placement):
    words = None if placement is None else placement.words()
    if varlen is not None:
        if placement is not None and placement.has_positions:
            raise ValueError("varlen kernels take no score positions")
        return varlen.kernel_args(k, words)
    if words is None:
        return {}
    return dict(layout=triton_segments.Layout(place_words=words.size), seq_arrays=(words,))


def _fill_outside(x, cu_seqlens, value, token_axis=0):
    return triton_segments.fill_outside(x, cu_seqlens, value, token_axis=token_axis,
                                     interpret=use_interpret())


def forward(q, k, v, slopes, spec, varlen: Varlen | None = None, seed=None, *,
            placement: Placement | None = None, out_dtype=None):
    """Attention: out (``out_dtype``, default q's), lse float32. Dense: q (B, Sq, H, D), lse
    (B, H, Sq). Varlen: q (T, H, D), lse (H, T); tokens after the last row get out 0 and lse
    -inf. ``seed``: the dropout key's two uint32 words when ``spec`` has dropout."""
    out, lse = triton_forward.forward(q, k, v, slopes, spec, _forward_config(q, k, spec, varlen),
                                      seed=seed, out_dtype=out_dtype, interpret=use_interpret(),
                                      **_layout_args(k, varlen, placement))
    if varlen is not None:
        out = _fill_outside(out, varlen.cu_seqlens_q, 0.0)
        lse = _fill_outside(lse, varlen.cu_seqlens_q, -jnp.inf, token_axis=1)
    return out, lse


def probabilities(q, k, lse, slopes, spec, varlen: Varlen | None = None, seed=None, *,
                  placement: Placement | None = None):
    """Softmax probabilities (B, H, Sq, Sk) float32 given the forward's lse (varlen:
    (B, H, max_seqlen_q, max_seqlen_k), zero outside each row's lengths)."""
    config = _forward_config(q, k, spec, varlen)
    return triton_forward.probabilities(q, k, lse, slopes, spec, config, seed=seed,
                                        interpret=use_interpret(),
                                        **_layout_args(k, varlen, placement))


def backward_delta(out, dout, dlse):
    """delta = rowsum(dout * out) - dlse (dense (B, H, Sq) float32), the backward's first pass:
    for callers that run several backward calls over one set of query rows (ring attention)."""
    return triton_backward.row_delta(out, dout, dlse, interpret=use_interpret())


def backward(q, k, v, slopes, out, lse, dout, dlse, spec, varlen: Varlen | None = None,
             seed=None, *, placement: Placement | None = None, grad_dtype=None, delta=None):
    """(dq, dk, dv) (``grad_dtype``, default the inputs') from the residuals and the cotangents
    of (out, lse); layouts as ``forward`` (contiguous keys only), tokens after the last row get
    zero gradients. ``delta``: ``backward_delta(out, dout, dlse)`` if the caller has it (then
    out and dlse are not read)."""
    dkdv_config, dq_config = backward_configs(q.dtype, padded_head_dim(q.shape[-1]),
                                              *_lengths(q, k, varlen))
    dq, dk, dv = triton_backward.backward(q, k, v, slopes, out, lse, dout, dlse, spec, dkdv_config,
                                          dq_config, seed=seed, grad_dtype=grad_dtype,
                                          delta=delta, interpret=use_interpret(),
                                          **_layout_args(k, varlen, placement))
    if varlen is not None:
        dq = _fill_outside(dq, varlen.cu_seqlens_q, 0.0)
        dk = _fill_outside(dk, varlen.cu_seqlens_k, 0.0)
        dv = _fill_outside(dv, varlen.cu_seqlens_k, 0.0)
    return dq, dk, dv


def _num_sms():
    """Streaming multiprocessors of the GPU (an H100's 132 when there is none, for the heuristic)."""
    device = jax.devices()[0]
    return (getattr(device, "core_count", None) if device.platform == "gpu" else None) or 132


def kvcache_append(k_cache, v_cache, k, v, cache_seqlens, batch_idx, table, keep=None):
    """The caches with k, v written at cache_seqlens (in place when the caches are donated);
    ``keep`` (B, seqlen_new): write only where nonzero (each slot's first writer)."""
    return triton_decode.append(k_cache, v_cache, k, v, cache_seqlens, batch_idx, table, keep,
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
