"""The one seam between the attention core and the kernel backends.

Everything above this module (the public API, custom_vjp, partitioning, ring attention, the
reference, the tests) calls only the functions defined here; each asks the registry
(``registry.select``) for the backend that runs it and nothing above knows which one did.
Backends: ``mosaic_gpu/`` (Pallas Mosaic GPU kernels for Hopper), ``triton/`` (the Pallas kernels
compiled by Triton on a GPU, or interpreted anywhere), ``xla/`` (blockwise attention in plain JAX).
Backend-neutral pieces: ``blocks`` (block ranges, int32 index helpers), ``manual_axes`` (Pallas
calls inside a checked shard_map or under x64), and the data below (``Varlen``, ``Placement``).

Choosing a backend by hand and asking which one runs a call: ``registry``'s docstring.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flash_attn_jax.kernels import registry
from flash_attn_jax.kernels.registry import (BACKEND_ENV, INTERPRET_ENV, Request, backends_used,
                                             set_backend, use_backend)
from flash_attn_jax.kernels.mosaic_gpu import MosaicGPU
from flash_attn_jax.kernels.triton import PallasTriton
from flash_attn_jax.kernels.xla import Xla

__all__ = ["BACKEND_ENV", "INTERPRET_ENV", "Placement", "Request", "Varlen", "backend_name",
           "backends_used", "backward", "backward_delta", "forward", "kvcache_append",
           "kvcache_attention", "probabilities", "set_backend", "use_backend", "use_interpret"]

# In order of preference: Hopper's own kernels, then compiled where the platform allows it, plain
# XLA, interpreted anywhere.
registry.register(MosaicGPU())
registry.register(PallasTriton(interpret=False))
registry.register(Xla())
registry.register(PallasTriton(interpret=True))


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


def _request(op, q, spec=None, *, k=None, varlen=None, paged=False, placement=None,
             out_dtype=None):
    return Request(op=op, platform=jax.default_backend(), dtype=jnp.dtype(q.dtype),
                   head_dim=q.shape[-1], varlen=varlen is not None,
                   paged=paged or (varlen is not None and varlen.block_table is not None),
                   spec=spec, placed=placement is not None,
                   positions=placement is not None and placement.has_positions,
                   q_shape=tuple(q.shape), k_shape=() if k is None else tuple(k.shape),
                   out_dtype=None if out_dtype is None else jnp.dtype(out_dtype))


def backend_name() -> str:
    """The backend a plain dense forward runs on, on the default platform: float16, 1024 tokens
    of 8 heads of 128 (``backends_used`` answers for given arguments)."""
    shape = (1, 1024, 8, 128)
    return registry.select(Request(op="forward", platform=jax.default_backend(),
                                   dtype=jnp.dtype(jnp.float16), head_dim=128, q_shape=shape,
                                   k_shape=shape)).name


def use_interpret() -> bool:
    """Whether that backend interprets the kernels (Pallas interpret mode)."""
    return backend_name() == "pallas-interpret"


def forward(q, k, v, slopes, spec, varlen: Varlen | None = None, seed=None, *,
            placement: Placement | None = None, out_dtype=None):
    """Attention: out (``out_dtype``, default q's), lse float32. Dense: q (B, Sq, H, D), lse
    (B, H, Sq). Varlen: q (T, H, D), lse (H, T); tokens outside every sequence get out 0 and lse
    -inf. ``seed``: the dropout key's two uint32 words when ``spec`` has dropout."""
    backend = registry.select(_request("forward", q, spec, k=k, varlen=varlen,
                                       placement=placement, out_dtype=out_dtype))
    return backend.forward(q, k, v, slopes, spec, varlen, seed, placement=placement,
                           out_dtype=out_dtype)


def probabilities(q, k, lse, slopes, spec, varlen: Varlen | None = None, seed=None, *,
                  placement: Placement | None = None):
    """Softmax probabilities (B, H, Sq, Sk) float32 given the forward's lse (varlen:
    (B, H, max_seqlen_q, max_seqlen_k), zero outside each row's lengths)."""
    backend = registry.select(_request("probabilities", q, spec, k=k, varlen=varlen,
                                       placement=placement))
    return backend.probabilities(q, k, lse, slopes, spec, varlen, seed, placement=placement)


def backward_delta(out, dout, dlse):
    """delta = rowsum(dout * out) - dlse (dense (B, H, Sq) float32), the backward's first pass:
    for callers that run several backward calls over one set of query rows (ring attention)."""
    return registry.select(_request("backward", out)).backward_delta(out, dout, dlse)


def backward(q, k, v, slopes, out, lse, dout, dlse, spec, varlen: Varlen | None = None,
             seed=None, *, placement: Placement | None = None, grad_dtype=None, delta=None):
    """(dq, dk, dv) (``grad_dtype``, default the inputs') from the residuals and the cotangents
    of (out, lse); layouts as ``forward`` (contiguous keys only), tokens outside every sequence
    get zero gradients. ``delta``: ``backward_delta(out, dout, dlse)`` if the caller has it (then
    out and dlse are not read)."""
    backend = registry.select(_request("backward", q, spec, k=k, varlen=varlen,
                                       placement=placement, out_dtype=grad_dtype))
    return backend.backward(q, k, v, slopes, out, lse, dout, dlse, spec, varlen, seed,
                            placement=placement, grad_dtype=grad_dtype, delta=delta)


def kvcache_append(k_cache, v_cache, k, v, cache_seqlens, batch_idx, table, keep=None):
    """The caches with k, v written at cache_seqlens (in place when the caches are donated);
    ``keep`` (B, seqlen_new): write only where nonzero (each slot's first writer)."""
    backend = registry.select(_request("kvcache_append", k, k=k_cache, paged=table is not None))
    return backend.kvcache_append(k_cache, v_cache, k, v, cache_seqlens, batch_idx, table, keep)


def kvcache_attention(q, k_cache, v_cache, lengths, leftpad, batch_idx, table, slopes, spec,
                      num_splits):
    """(out (B, Sq, H, D), lse (B, H, Sq)) of q over the caches' first ``lengths`` positions.

    ``num_splits`` 0 picks the split of the key range by a heuristic that fills the GPU.
    """
    backend = registry.select(_request("kvcache_attention", q, spec, k=k_cache,
                                       paged=table is not None))
    return backend.kvcache_attention(q, k_cache, v_cache, lengths, leftpad, batch_idx, table,
                                     slopes, spec, num_splits)
