"""Ring attention: context parallelism over a mesh axis.

The sequence axis of q, k and v is split over the ``n`` devices of a mesh axis. Each device keeps
its queries and passes its keys and values around the ring (``ppermute`` to the next device): at
step t it attends the key chunk of device ``i - t`` while the chunk for step t + 1 is already in
flight, and merges the partial results through their logsumexps. The backward pass is a ring too:
the keys and values travel again, with the float32 gradient accumulators of their owner, which
arrive home after the last step. Memory per device stays O(S / n).

Masks, ALiBi and dropout see global positions: each partial call is placed (``kernels.Placement``)
at the score positions of its query and key chunk, so the result equals ``flash_attn_func`` on the
global arrays. A (query chunk, key chunk) pair that the mask removes entirely is skipped.

Layouts of the global sequence over the devices:

* ``contiguous``: device i holds chunk i of n. Under a causal mask device i attends i + 1 chunks,
  so the work grows along the ring.
* ``zigzag``: the sequence is cut into 2n chunks and device i holds chunks i and 2n - 1 - i (an
  early and a late one), which balances causal work. ``to_ring_layout`` / ``from_ring_layout``
  permute a global array into and out of that order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from flash_attn_jax import _validation as check
from flash_attn_jax import kernels
from flash_attn_jax.kernels.manual_axes import varying_axes
from flash_attn_jax.semantics import ScoreSpec, key_span

LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class Ring:
    """Static description of one ring: the mesh axis (or axes), its size, the layout."""

    axis_name: str | tuple
    num_shards: int
    layout: str = "contiguous"

    @property
    def chunks_per_shard(self) -> int:
        return 2 if self.layout == "zigzag" else 1

    def chunks(self, shard, length):
        """[(local start, chunk length, global position)] of the ``length`` local tokens of
        device ``shard`` (traced)."""
        if self.layout == "contiguous":
            return [(0, length, shard * length)]
        half = length // 2
        return [(0, half, shard * half), (half, half, (2 * self.num_shards - 1 - shard) * half)]

    def send(self, x):
        """x from every device to the next one along the ring."""
        n = self.num_shards
        return lax.ppermute(x, self.axis_name, [(i, (i + 1) % n) for i in range(n)])


def _visible(spec: ScoreSpec, q_pos, q_len, k_pos, k_len, diagonal, seqlen_k):
    """Whether any query of [q_pos, q_pos + q_len) may attend a key of [k_pos, k_pos + k_len)
    (traced); None without a window, where every pair is visible."""
    if not spec.is_masked:
        return None
    lo, hi = key_span(q_pos, q_pos + q_len, spec, offset=diagonal, seqlen_k=seqlen_k)
    return jnp.maximum(lo, k_pos) < jnp.minimum(hi, k_pos + k_len)


def _like(x, template_axes):
    """``x`` typed as varying over ``template_axes`` (inside a checked shard_map, both branches
    of a cond must vary alike)."""
    return lax.pcast(x, tuple(template_axes), to="varying") if template_axes else x


def _maybe(visible, compute, empty, operands):
    """compute(*operands) unless ``visible`` is False (then ``empty()``, typed like it)."""
    if visible is None:
        return compute(*operands)
    axes = varying_axes(operands)
    return lax.cond(visible, compute,
                    lambda *_: jax.tree.map(lambda x: _like(x, axes - varying_axes([x])), empty()),
                    *operands)


def merge(out_a, lse_a, out_b, lse_b):
    """The attention over the union of two disjoint key sets from each one's (out (B, S, H, D)
    float32, lse (B, H, S)). Rows with no key in either keep out 0, lse -inf."""
    top = jnp.maximum(lse_a, lse_b)
    top = jnp.where(top == -jnp.inf, 0.0, top)
    weight_a, weight_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)
    total = weight_a + weight_b
    empty = total == 0.0
    safe_total = jnp.where(empty, 1.0, total)
    lse = jnp.where(empty, -jnp.inf, top + jnp.log(safe_total))
    per_row = lambda w: (w / safe_total).transpose(0, 2, 1)[..., None]
    return out_a * per_row(weight_a) + out_b * per_row(weight_b), lse


def _placement(base, q_pos, k_pos, diagonal):
    batch, head = base
    return kernels.Placement(batch=batch, head=head, query=q_pos, key=k_pos, diagonal=diagonal)


def _geometry(ring: Ring, q, k):
    """(this device's index, the global seqlen_k, the bottom-right offset seqlen_k - seqlen_q)."""
    me = lax.axis_index(ring.axis_name)
    seqlen_q, seqlen_k = ring.num_shards * q.shape[1], ring.num_shards * k.shape[1]
    return me, seqlen_k, seqlen_k - seqlen_q


def forward(q, k, v, slopes, seed, spec: ScoreSpec, ring: Ring, base=(0, 0)):
    """(out (B, Sq_local, H, D) in q.dtype, lse (B, H, Sq_local) float32) of this device's
    queries over the keys of the whole ring. ``base``: the global (batch, head) index of the first
    local batch row and head."""
    me, seqlen_k, diagonal = _geometry(ring, q, k)
    q_chunks = ring.chunks(me, q.shape[1])
    batch, _, num_heads, head_dim = q.shape
    results = [None] * len(q_chunks)
    kv = (k, v)
    for step in range(ring.num_shards):
        source = (me - step) % ring.num_shards
        if step + 1 < ring.num_shards:
            next_kv = ring.send(kv)
        for i, (q_lo, q_len, q_pos) in enumerate(q_chunks):
            for k_lo, k_len, k_pos in ring.chunks(source, k.shape[1]):
                def compute(q_c, k_c, v_c, q_pos=q_pos, k_pos=k_pos):
                    return kernels.forward(q_c, k_c, v_c, slopes, spec, None, seed,
                                           placement=_placement(base, q_pos, k_pos, diagonal),
                                           out_dtype=jnp.float32)

                def empty(q_len=q_len):
                    return (jnp.zeros((batch, q_len, num_heads, head_dim), jnp.float32),
                            jnp.full((batch, num_heads, q_len), -jnp.inf, jnp.float32))

                visible = _visible(spec, q_pos, q_len, k_pos, k_len, diagonal, seqlen_k)
                part = _maybe(visible, compute, empty,
                              (q[:, q_lo:q_lo + q_len], kv[0][:, k_lo:k_lo + k_len],
                               kv[1][:, k_lo:k_lo + k_len]))
                results[i] = part if results[i] is None else merge(*results[i], *part)
        if step + 1 < ring.num_shards:
            kv = next_kv
    out = jnp.concatenate([o for o, _ in results], axis=1).astype(q.dtype)
    lse = jnp.concatenate([l for _, l in results], axis=2)
    return out, lse


def backward(q, k, v, slopes, seed, out, lse, dout, dlse, spec: ScoreSpec, ring: Ring,
             base=(0, 0)):
    """(dq, dk, dv) of ``forward`` from its residuals and the cotangents of (out, lse)."""
    me, seqlen_k, diagonal = _geometry(ring, q, k)
    q_chunks = ring.chunks(me, q.shape[1])
    # Float32 accumulators, one per chunk (no scatter into a slice: XLA's CPU compiler crashes on
    # a scatter-add next to the collective-permutes).
    zeros = lambda x, length: jnp.zeros((x.shape[0], length) + x.shape[2:], jnp.float32)
    dq = [zeros(q, q_len) for _, q_len, _ in q_chunks]
    kv = (k, v)
    k_lens = [k_len for _, k_len, _ in ring.chunks(me, k.shape[1])]
    dkv = tuple((zeros(k, k_len), zeros(v, k_len)) for k_len in k_lens)
    delta = kernels.backward_delta(out, dout, dlse)  # once, not in every step's kernels
    for step in range(ring.num_shards):
        source = (me - step) % ring.num_shards
        if step + 1 < ring.num_shards:
            next_kv = ring.send(kv)
        acc = [list(pair) for pair in dkv]
        for i, (q_lo, q_len, q_pos) in enumerate(q_chunks):
            rows = slice(q_lo, q_lo + q_len)
            for j, (k_lo, k_len, k_pos) in enumerate(ring.chunks(source, k.shape[1])):
                cols = slice(k_lo, k_lo + k_len)

                def compute(q_c, k_c, v_c, lse_c, dout_c, delta_c, q_pos=q_pos, k_pos=k_pos):
                    return kernels.backward(q_c, k_c, v_c, slopes, None, lse_c, dout_c, None,
                                            spec, None, seed,
                                            placement=_placement(base, q_pos, k_pos, diagonal),
                                            grad_dtype=jnp.float32, delta=delta_c)

                def empty(q_len=q_len, k_len=k_len):
                    return zeros(q, q_len), zeros(k, k_len), zeros(v, k_len)

                visible = _visible(spec, q_pos, q_len, k_pos, k_len, diagonal, seqlen_k)
                dq_p, dk_p, dv_p = _maybe(
                    visible, compute, empty,
                    (q[:, rows], kv[0][:, cols], kv[1][:, cols], lse[:, :, rows], dout[:, rows],
                     delta[:, :, rows]))
                dq[i] = dq[i] + dq_p
                acc[j][0] = acc[j][0] + dk_p
                acc[j][1] = acc[j][1] + dv_p
        # The accumulators follow their keys; the last send brings them home.
        dkv = ring.send(tuple(tuple(pair) for pair in acc))
        if step + 1 < ring.num_shards:
            kv = next_kv
    dk = jnp.concatenate([dk_c for dk_c, _ in dkv], axis=1)
    dv = jnp.concatenate([dv_c for _, dv_c in dkv], axis=1)
    return (jnp.concatenate(dq, axis=1).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring_attention(q, k, v, slopes, seed, spec, ring):
    return forward(q, k, v, slopes, seed, spec, ring)


def _ring_attention_fwd(q, k, v, slopes, seed, spec, ring):
    out, lse = forward(q, k, v, slopes, seed, spec, ring)
    return (out, lse), (q, k, v, slopes, seed, out, lse)


def _ring_attention_bwd(spec, ring, residuals, cotangents):
    q, k, v, slopes, seed, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = backward(q, k, v, slopes, seed, out, lse, dout, dlse, spec, ring)
    return dq, dk, dv, None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _axis_size(axis_name):
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or not all(isinstance(name, str) for name in names):
        raise TypeError(f"axis_name must be a mesh axis name or a tuple of them, got {axis_name!r}")
    try:
        return lax.axis_size(axis_name)
    except NameError:
        raise ValueError(f"axis_name {axis_name!r} is not a mesh axis bound here: call "
                         "ring_flash_attn_func inside jax.shard_map over that axis") from None


def chunk_problem(spec: ScoreSpec, ring: Ring, seqlen_q_local: int, seqlen_k_local: int):
    """Why a ring cannot run these local lengths (a message), or None."""
    chunks = ring.chunks_per_shard
    for name, length in (("q", seqlen_q_local), ("k", seqlen_k_local)):
        if length % chunks:
            return (f"layout='zigzag' needs an even local sequence length, got {name} with "
                    f"{length} tokens per device")
    # The dropout hash works on aligned groups of 32 key columns (semantics.py).
    if spec.has_dropout and (seqlen_k_local // chunks) % 32:
        return (f"ring attention with dropout needs key chunks of a multiple of 32 tokens; got "
                f"{seqlen_k_local // chunks} per chunk (layout {ring.layout!r})")
    return None


@overload
def ring_flash_attn_func(
    q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str | tuple[str, ...],
    layout: str = ..., dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ...,
    dropout_key: ArrayLike | None = ..., return_softmax_lse: Literal[False] = ...,
) -> jax.Array: ...
@overload
def ring_flash_attn_func(
    q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str | tuple[str, ...],
    layout: str = ..., dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ...,
    dropout_key: ArrayLike | None = ..., return_softmax_lse: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...
@overload
def ring_flash_attn_func(
    q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str | tuple[str, ...],
    layout: str = ..., dropout_p: float = ..., softmax_scale: float | None = ...,
    causal: bool = ..., window_size: tuple[int, int] = ..., softcap: float = ...,
    alibi_slopes: ArrayLike | None = ..., deterministic: bool = ...,
    dropout_key: ArrayLike | None = ..., return_softmax_lse: bool = ...,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def ring_flash_attn_func(q: jax.Array, k: jax.Array, v: jax.Array, *,
                         axis_name: str | tuple[str, ...], layout: str = "contiguous",
                         dropout_p: float = 0.0, softmax_scale: float | None = None,
                         causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                         softcap: float = 0.0, alibi_slopes: ArrayLike | None = None,
                         deterministic: bool = False, dropout_key: ArrayLike | None = None,
                         return_softmax_lse: bool = False
                         ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Ring attention: ``flash_attn_func`` over a sequence split across a mesh axis.

    Call it inside ``jax.shard_map`` with the sequence axis (axis 1) of q, k and v split over the
    mesh axis ``axis_name`` (a name or a tuple of names). The result equals ``flash_attn_func`` on
    the global arrays, every mask at global positions; keys and values travel around the ring by
    ``ppermute``, overlapped with the attention of the chunk at hand, forward and backward, and
    no device holds more than its share of the sequence (plus the chunk in flight).

    Args:
      q: (batch, seqlen_q / n, nheads, headdim), this device's queries.
      k, v: (batch, seqlen_k / n, nheads_k, headdim), this device's keys and values.
      axis_name: the mesh axis (or tuple of axes) the sequence is split over, n devices.
      layout: "contiguous" (device i holds global chunk i of n) or "zigzag" (device i holds
        chunks i and 2n - 1 - i of 2n, which balances causal work; see ``to_ring_layout``).
      dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
      dropout_key: as for ``flash_attn_func``, on the global sequence (causal is bottom-right
        aligned on the global lengths). The dropout mask hashes global rows and columns, and the
        batch and head indices this device sees: under a shard_map that also splits batch or
        heads, fold the shard's index into ``dropout_key`` for independent masks. Dropout needs
        key chunks (seqlen_k / n, halved for zigzag) of a multiple of 32 tokens.
      return_softmax_lse: also return softmax_lse (batch, nheads, seqlen_q / n) float32.

    Returns:
      out (batch, seqlen_q / n, nheads, headdim), or (out, softmax_lse). Differentiable in q, k
      and v (the lse cotangent included).

    Raises:
      ValueError for bad shapes or values or an unbound ``axis_name``, TypeError for bad types.
    """
    batch, seqlen_q, _, num_heads, _, head_dim = check.dense_qkv(q, k, v)
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a str, one of {LAYOUTS}, got {type(layout).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ring = Ring(axis_name=axis_name, num_shards=_axis_size(axis_name), layout=layout)
    slopes, spec, seed = check.attention_options(
        batch, num_heads, head_dim, dropout_p=dropout_p, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, softcap=softcap, alibi=alibi_slopes,
        deterministic=deterministic, dropout_key=dropout_key,
        longest=ring.num_shards * max(seqlen_q, k.shape[1]))  # the global lengths
    return_lse = check.static_bool("return_softmax_lse", return_softmax_lse)
    problem = chunk_problem(spec, ring, seqlen_q, k.shape[1])
    if problem:
        raise ValueError(problem)
    if q.size == 0 or k.shape[1] == 0:
        out = jnp.zeros(q.shape, q.dtype)
        lse = jnp.full((batch, num_heads, seqlen_q), -jnp.inf, jnp.float32)
    else:
        out, lse = _ring_attention(q, k, v, slopes, seed, spec, ring)
    return (out, lse) if return_lse else out


def _zigzag_order(num_shards: int):
    """The global chunk (of 2n) at each position of the zigzag layout."""
    return [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]


def _permute_chunks(x, num_shards, axis, inverse):
    check.array("x", x)
    num_shards = check.static_int("num_shards", num_shards, 1, 1 << 20)
    axis = check.static_int("axis", axis, -x.ndim, x.ndim - 1) % x.ndim
    length = x.shape[axis]
    if length % (2 * num_shards):
        raise ValueError(f"x's axis {axis} ({length}) must be a multiple of 2 * num_shards "
                         f"({2 * num_shards})")
    order = _zigzag_order(num_shards)
    if inverse:
        order = [order.index(c) for c in range(2 * num_shards)]
    chunks = jnp.split(x, 2 * num_shards, axis=axis)
    return jnp.concatenate([chunks[c] for c in order], axis=axis)


def to_ring_layout(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """``x`` (the sequence on ``axis``; same shape out) permuted into the zigzag order of
    ``ring_flash_attn_func(..., layout="zigzag")``: the axis is cut into 2 * num_shards chunks,
    reordered so that contiguous shard i of num_shards holds chunks i and 2 * num_shards - 1 - i.
    Its length must be a multiple of 2 * num_shards."""
    return _permute_chunks(x, num_shards, axis, inverse=False)


def from_ring_layout(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """The inverse of ``to_ring_layout``: the zigzag order back to the sequence order."""
    return _permute_chunks(x, num_shards, axis, inverse=True)
