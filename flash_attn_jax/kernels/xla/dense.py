"""Blockwise attention in plain jnp/lax: the online softmax over key blocks, O(S * block) memory.

The forward scans the key blocks keeping the running max, sum and output of every query row; the
backward scans them again, recomputing each block's probabilities from the forward's lse, and
emits that block's dK and dV while accumulating dQ. Scores, masks, ALiBi and the dropout keep
mask come from ``semantics.py`` (the kernels' definitions, bit for bit for the mask). Query heads
are grouped by their key/value head, so GQA reads each key block once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flash_attn_jax import semantics
from flash_attn_jax.semantics import ScoreSpec

DEFAULT_BLOCK_K = 512  # away from a CPU
# On a CPU a step's (query rows x key block) float32 temporaries should stay in cache: the key
# block is the largest power of two (16..16384) keeping rows x block_k under this many elements
# (forward; the backward holds about twice the temporaries). Measured on 2 cores at S 1-4k; with
# few rows (decoding: B 4, H 8, one query, 4096 keys) one long step takes 30 ms where steps of
# 512 keys took 55 ms.
_CPU_STEP_ELEMENTS = {"forward": 1 << 21, "backward": 1 << 20}
_CPU_MAX_BLOCK_K = 16384


def key_block(rows: int, phase: str) -> int:
    """Keys per scan step for ``rows`` query rows in all (batch x heads x seqlen_q)."""
    if jax.default_backend() != "cpu":
        return DEFAULT_BLOCK_K
    block = max(1, _CPU_STEP_ELEMENTS[phase] // max(rows, 1))
    return min(_CPU_MAX_BLOCK_K, max(16, 1 << (block.bit_length() - 1)))


def _varying_over(*operands) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) any of the operands' arrays varies over."""
    axes = frozenset()
    for leaf in jax.tree.leaves(operands):
        axis_type = getattr(jax.typeof(leaf), "manual_axis_type", None)
        axes |= axis_type.varying if axis_type is not None else frozenset()
    return axes


def _carry(x, axes):
    """A scan's initial carry typed as varying over ``axes``: inside a checked ``shard_map`` the
    body's result varies as its operands do, and a carry must keep its type."""
    missing = axes - _varying_over(x)
    return lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def _compute_dtype(dtype):
    """16-bit inputs compute in float32 on a CPU (its 16-bit matmuls are slow), else natively
    with float32 accumulation."""
    if jnp.dtype(dtype).itemsize < 4 and jax.default_backend() == "cpu":
        return jnp.float32
    return dtype


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class _Blocks:
    """The call's shapes and its key blocks: q grouped (B, Hk, G, Sq, D), keys (n, B, Hk, bk, D)."""

    def __init__(self, q, k, spec: ScoreSpec, placement, block_k, phase, lengths=None):
        self.batch, self.seqlen_q, self.num_heads, self.head_dim = q.shape
        self.seqlen_k, self.num_heads_k = k.shape[1], k.shape[2]
        if lengths is None:  # the bottom-right offset and the number of keys of every row
            self.offset, self.key_limit = self.seqlen_k - self.seqlen_q, self.seqlen_k
        else:  # padded varlen rows: their own lengths, (B,) int32 each
            per_row = lambda x: x.reshape(self.batch, 1, 1, 1, 1)
            self.offset, self.key_limit = per_row(lengths[1] - lengths[0]), per_row(lengths[1])
        if block_k is None:
            block_k = key_block(self.batch * self.num_heads * self.seqlen_q, phase)
        self.group = self.num_heads // self.num_heads_k
        self.block_k = max(1, min(block_k, self.seqlen_k))
        self.num_blocks = -(-self.seqlen_k // self.block_k)
        self.spec = spec
        self.dtype = _compute_dtype(q.dtype)
        self.precision = _precision(self.dtype)
        first_batch = 0 if placement is None else placement.batch
        first_head = 0 if placement is None else placement.head
        batch = first_batch + jnp.arange(self.batch, dtype=jnp.int32)
        heads = first_head + jnp.arange(self.num_heads, dtype=jnp.int32)
        # Global batch rows and query heads of the dropout hash, (B, Hk, G, 1, 1).
        self.batch_ids = batch.reshape(self.batch, 1, 1, 1, 1)
        self.head_ids = heads.reshape(1, self.num_heads_k, self.group, 1, 1)
        self.rows = jnp.arange(self.seqlen_q, dtype=jnp.int32)[:, None]

    def group_queries(self, x):
        """(B, Sq, H, D) -> (B, Hk, G, Sq, D) in the compute dtype."""
        x = x.reshape(self.batch, self.seqlen_q, self.num_heads_k, self.group, x.shape[-1])
        return x.transpose(0, 2, 3, 1, 4).astype(self.dtype)

    def ungroup_queries(self, x):
        """(B, Hk, G, Sq, D) -> (B, Sq, H, D)."""
        return x.transpose(0, 3, 1, 2, 4).reshape(self.batch, self.seqlen_q, self.num_heads,
                                                  x.shape[-1])

    def group_rows(self, x):
        """(B, H, Sq) -> (B, Hk, G, Sq)."""
        return x.reshape(self.batch, self.num_heads_k, self.group, self.seqlen_q)

    def key_blocks(self, x):
        """(B, Sk, Hk, D) -> (n, B, Hk, bk, D), zero-padded past the keys (masked)."""
        pad = self.num_blocks * self.block_k - self.seqlen_k
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))
        x = x.reshape(self.batch, self.num_blocks, self.block_k, self.num_heads_k, x.shape[-1])
        return x.transpose(1, 0, 3, 2, 4)

    def unblock_keys(self, x):
        """(n, B, Hk, bk, D) -> (B, Sk, Hk, D)."""
        x = x.transpose(1, 0, 3, 2, 4).reshape(self.batch, self.num_blocks * self.block_k,
                                               self.num_heads_k, x.shape[-1])
        return x[:, :self.seqlen_k]

    def cols(self, index):
        return index * self.block_k + jnp.arange(self.block_k, dtype=jnp.int32)[None, :]

    def logits(self, q, k_block, index, slopes):
        """(x, s): the logits of a key block (B, Hk, G, Sq, bk) and its masked scores, float32."""
        qk = jnp.einsum("bhgqd,bhkd->bhgqk", q, k_block, precision=self.precision,
                        preferred_element_type=jnp.float32)
        x = semantics.logits(qk, self.spec)
        slope = None if slopes is None else slopes.reshape(
            self.batch, self.num_heads_k, self.group, 1, 1).astype(jnp.float32)
        s = semantics.bias_and_mask(x, self.rows, self.cols(index), self.spec,
                                    offset=self.offset, seqlen_k=self.key_limit, slope=slope)
        return x, s

    def keep(self, seed, index):
        """The dropout keep mask of a key block (B, Hk, G, Sq, bk)."""
        return semantics.dropout_keep(seed, self.batch_ids, self.head_ids, self.rows,
                                      self.cols(index), self.spec.dropout_threshold)


def forward(q, k, v, slopes, spec: ScoreSpec, seed=None, *, placement=None, out_dtype=None,
            block_k=None, lengths=None, key_valid=None):
    """(out (B, Sq, H, D), lse (B, H, Sq) float32): rows without a key get out 0, lse -inf.
    ``block_k``: keys per scan step (default ``key_block``); ``lengths``: (query lengths, key
    lengths) (B,) of padded rows (varlen), whose rows past their length are not defined;
    ``key_valid``: (B, Sk) bool, False for keys that do not exist (a KV cache's missing pages)."""
    blocks = _Blocks(q, k, spec, placement, block_k, "forward", lengths)
    qg = blocks.group_queries(q)
    shape = (blocks.batch, blocks.num_heads_k, blocks.group, blocks.seqlen_q)
    valid_blocks = None  # every key exists
    if key_valid is not None:
        pad = blocks.num_blocks * blocks.block_k - blocks.seqlen_k
        valid_blocks = jnp.pad(key_valid, ((0, 0), (0, pad))).reshape(
            blocks.batch, blocks.num_blocks, blocks.block_k).transpose(1, 0, 2)  # (n, B, bk)

    def step(carry, block):
        acc, row_max, row_sum = carry
        index, k_block, v_block, valid = block
        _, s = blocks.logits(qg, k_block, index, slopes)
        if valid is not None:
            s = jnp.where(valid[:, None, None, None, :], s, -jnp.inf)
        new_max = jnp.maximum(row_max, s.max(axis=-1))
        base = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        alpha = jnp.exp(row_max - base)
        p = jnp.exp(s - base[..., None])
        row_sum = row_sum * alpha + p.sum(axis=-1)
        if spec.has_dropout:
            p = jnp.where(blocks.keep(seed, index), p * spec.keep_scale, 0.0)
        pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(blocks.dtype), v_block,
                        precision=blocks.precision, preferred_element_type=jnp.float32)
        return (acc * alpha[..., None] + pv, new_max, row_sum), None

    axes = _varying_over(q, k, v, slopes, seed, placement, lengths, key_valid)
    init = tuple(_carry(x, axes) for x in (jnp.zeros(shape + (v.shape[-1],), jnp.float32),
                                           jnp.full(shape, -jnp.inf), jnp.zeros(shape, jnp.float32)))
    indices = jnp.arange(blocks.num_blocks, dtype=jnp.int32)
    (acc, row_max, row_sum), _ = lax.scan(step, init, (indices, blocks.key_blocks(k),
                                                       blocks.key_blocks(v), valid_blocks))
    has_keys = row_sum > 0.0
    safe_sum = jnp.where(has_keys, row_sum, 1.0)
    out = acc / safe_sum[..., None]
    lse = jnp.where(has_keys, row_max + jnp.log(safe_sum), -jnp.inf)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    return (blocks.ungroup_queries(out).astype(out_dtype),
            lse.reshape(blocks.batch, blocks.num_heads, blocks.seqlen_q))


def _probs(s, lse):
    """P = e^(s - lse) from recomputed scores: 0 where masked or the row has no key."""
    return jnp.where(lse[..., None] == -jnp.inf, 0.0, jnp.exp(jnp.minimum(s - lse[..., None], 0.0)))


def probabilities(q, k, lse, slopes, spec: ScoreSpec, seed=None, *, placement=None,
                  block_k=None, lengths=None):
    """S_dmask (B, H, Sq, Sk) float32: the probabilities, a dropped one with its sign bit set."""
    blocks = _Blocks(q, k, spec, placement, block_k, "forward", lengths)
    qg, lse = blocks.group_queries(q), blocks.group_rows(lse)

    def step(_, block):
        index, k_block = block
        p = _probs(blocks.logits(qg, k_block, index, slopes)[1], lse)
        if spec.has_dropout:
            p = jnp.where(blocks.keep(seed, index), p, -p)
        return None, p

    indices = jnp.arange(blocks.num_blocks, dtype=jnp.int32)
    _, probs = lax.scan(step, None, (indices, blocks.key_blocks(k)))  # (n, B, Hk, G, Sq, bk)
    probs = probs.transpose(1, 2, 3, 4, 0, 5).reshape(
        blocks.batch, blocks.num_heads, blocks.seqlen_q, blocks.num_blocks * blocks.block_k)
    return probs[..., :blocks.seqlen_k]


def backward(q, k, v, slopes, out, lse, dout, dlse, spec: ScoreSpec, seed=None, *,
             placement=None, grad_dtype=None, delta=None, block_k=None, lengths=None):
    """(dq, dk, dv) from the residuals and the cotangents of (out, lse)."""
    blocks = _Blocks(q, k, spec, placement, block_k, "backward", lengths)
    if delta is None:
        delta = semantics.output_delta(out, dout, dlse)
    qg, dog = blocks.group_queries(q), blocks.group_queries(dout)
    lse, delta = blocks.group_rows(lse), blocks.group_rows(delta)

    def step(dq, block):
        index, k_block, v_block = block
        x, s = blocks.logits(qg, k_block, index, slopes)
        p = _probs(s, lse)
        dp = jnp.einsum("bhgqd,bhkd->bhgqk", dog, v_block, precision=blocks.precision,
                        preferred_element_type=jnp.float32)
        if spec.has_dropout:
            keep = blocks.keep(seed, index)
            dropped_p = jnp.where(keep, p * spec.keep_scale, 0.0)
            dp = jnp.where(keep, dp * spec.keep_scale, 0.0)
        else:
            dropped_p = p
        dv = jnp.einsum("bhgqk,bhgqd->bhkd", dropped_p.astype(blocks.dtype), dog,
                        precision=blocks.precision, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * semantics.logits_derivative(x, spec)).astype(
            blocks.dtype)
        dq = dq + jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_block, precision=blocks.precision,
                             preferred_element_type=jnp.float32)
        dk = jnp.einsum("bhgqk,bhgqd->bhkd", ds, qg, precision=blocks.precision,
                        preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    indices = jnp.arange(blocks.num_blocks, dtype=jnp.int32)
    axes = _varying_over(q, k, v, slopes, out, lse, dout, dlse, seed, placement, delta, lengths)
    dq, (dk, dv) = lax.scan(step, _carry(jnp.zeros(qg.shape, jnp.float32), axes),
                            (indices, blocks.key_blocks(k), blocks.key_blocks(v)))
    grad_dtype = q.dtype if grad_dtype is None else grad_dtype
    return (blocks.ungroup_queries(dq).astype(grad_dtype),
            blocks.unblock_keys(dk).astype(grad_dtype),
            blocks.unblock_keys(dv).astype(grad_dtype))
