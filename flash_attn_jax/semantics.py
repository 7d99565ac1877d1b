"""The score semantics of flash attention, defined once.

Every implementation in this package (the Pallas kernels and the jnp reference) builds its attention
scores from the functions in this module, so the two cannot drift apart. For one (batch, query head),
query row ``i`` and key column ``j``, with ``offset = seqlen_k - seqlen_q`` (bottom-right alignment:
row ``i`` sits at key position ``i + offset``):

1. ``x = softmax_scale * <q_i, k_j>``
2. softcap ``c > 0``: ``x = c * tanh(x / c)`` (the scale is inside the tanh)
3. ALiBi: ``x += -slope * |i + offset - j|`` (after softcap, never scaled)
4. mask: ``x = -inf`` unless ``0 <= j < seqlen_k`` and, for a window ``(L, R)``,
   ``i + offset - L <= j <= i + offset + R`` where ``-1`` leaves that side unbounded.
   ``causal`` is the window ``(L, 0)``.
5. softmax in float32 over ``j``; a row with no key left has output 0 and logsumexp ``-inf``.

The functions take arrays of any shape that broadcast (``rows[:, None]`` against ``cols[None, :]``)
and work on traced values, so they run unchanged inside a Pallas kernel and in plain jnp. Logits
are in natural units everywhere; a kernel passes ``logits`` a ``mul`` whose product the compiler
cannot fuse into the softmax's later subtraction of the row maximum (``Numerics.mul_exact``).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import jax.numpy as jnp
import numpy as np
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """Static description of the score function of one attention call.

    Attributes:
      softmax_scale: multiplies ``q . k``.
      softcap: ``c > 0`` applies ``c * tanh(x / c)``; ``0`` disables it.
      window_left: ``L >= 0`` keeps keys ``j >= i + offset - L``; ``-1`` leaves the left side open.
      window_right: ``R >= 0`` keeps keys ``j <= i + offset + R``; ``-1`` leaves the right side open.
        ``causal=True`` is ``window_right = 0``.
      has_alibi: an ALiBi bias with per-(batch, head) slopes is added.
      dropout_p: after the softmax, probabilities are dropped with this probability (the keep mask
        of ``dropout_keep``) and the kept ones scaled by 1 / (1 - dropout_p); 0 disables it.
      deterministic: the backward must be bitwise reproducible (flash-attn's flag). Not part of
        the scores: with False a kernel may sum dQ in any order (float32 atomics), within
        rounding of the deterministic result.
    """

    softmax_scale: float
    softcap: float = 0.0
    window_left: int = -1
    window_right: int = -1
    has_alibi: bool = False
    dropout_p: float = 0.0
    deterministic: bool = False

    @classmethod
    def create(cls, *, softmax_scale, causal=False, window_size=(-1, -1), softcap=0.0,
               has_alibi=False, dropout_p=0.0, deterministic=False):
        """Builds a spec from the flash-attn arguments (already validated)."""
        left, right = (int(w) for w in window_size)
        if causal:
            right = 0
        return cls(softmax_scale=float(softmax_scale),
                   softcap=float(softcap) if softcap > 0 else 0.0,
                   window_left=left, window_right=right, has_alibi=bool(has_alibi),
                   dropout_p=float(dropout_p), deterministic=bool(deterministic))

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0

    @property
    def dropout_threshold(self) -> int:
        return dropout_threshold(self.dropout_p)

    @property
    def keep_scale(self) -> float:
        """The factor of kept probabilities: 1 / (1 - dropout_p)."""
        return 1.0 / (1.0 - self.dropout_p)

    @property
    def is_causal_like(self) -> bool:
        """Whether later query rows see more keys (causal, or a window open on the left and
        bounded on the right): the kernels take such tiles heaviest first."""
        return self.window_left < 0 <= self.window_right

    @property
    def is_masked(self) -> bool:
        """Whether any window bound exists (causal included)."""
        return self.window_left >= 0 or self.window_right >= 0


def logits(qk, spec: ScoreSpec, *, mul=operator.mul, unit=1.0):
    """Steps 1-2: the raw dot products ``qk`` (float32) to logits, times ``unit`` (a kernel's
    backward works in base 2, ``unit = log2(e)``). ``mul(x, constant)`` forms the rounded
    product (a kernel's exactly rounded multiply; see the module docstring)."""
    if spec.softcap > 0:
        return mul(jnp.tanh(qk * (spec.softmax_scale / spec.softcap)), spec.softcap * unit)
    return mul(qk, spec.softmax_scale * unit)


def linear_logit_factor(spec: ScoreSpec, *, unit=1.0):
    """The constant ``c`` with ``logits(qk, spec, unit=unit) == qk * c`` when steps 1-3 are one
    positive scaling (no softcap, no ALiBi), else None.

    Rounding is monotone, so the row max of the raw masked ``qk`` times ``c`` is exactly the max
    of the scaled scores: a kernel can take the max before scaling and fold the scaling into the
    exponent's one fused multiply-add, ``exp2(qk * c - max)``."""
    factor = spec.softmax_scale * unit
    if spec.softcap > 0 or spec.has_alibi or not factor > 0:
        return None
    return factor


def alibi_bias(slope, rows, cols, offset):
    """Step 3: ``-slope * |row + offset - col|`` (``slope`` may carry a unit), computed in the
    slope's precision (float32 at least)."""
    distance = jnp.abs(rows + offset - cols)
    return -slope * distance.astype(jnp.result_type(slope, jnp.float32))


def key_mask(rows, cols, spec: ScoreSpec, *, offset, seqlen_k):
    """Step 4: True where query ``rows`` may attend key ``cols`` (``cols`` >= 0 assumed).

    ``seqlen_k`` None: the caller knows every column is a key (``cols < seqlen_k``), and the
    length test is left out (a kernel's whole key tiles of a length that fills them)."""
    keep = True if seqlen_k is None else cols < seqlen_k
    if spec.window_left >= 0:
        keep = keep & (cols >= rows + offset - spec.window_left)
    if spec.window_right >= 0:
        keep = keep & (cols <= rows + offset + spec.window_right)
    return keep


def bias_and_mask(x, rows, cols, spec: ScoreSpec, *, offset, seqlen_k, slope=None, unit=1.0,
                  apply_mask=True):
    """Steps 3-4 on logits ``x`` (times ``unit``): ALiBi, then ``-inf`` where masked.

    ``apply_mask=False`` is for tiles known to lie inside the mask (see ``full_key_span``).
    """
    if spec.has_alibi:
        x = x + alibi_bias(slope * unit, rows, cols, offset)
    if apply_mask:
        keep = key_mask(rows, cols, spec, offset=offset, seqlen_k=seqlen_k)
        if keep is not True:  # True: no window and no length test (a tile of keys only)
            x = jnp.where(keep, x, -jnp.inf)
    return x


def scores(qk, rows, cols, spec: ScoreSpec, *, mul=operator.mul, unit=1.0, **kwargs):
    """Steps 1-4 in one: masked logits (``-inf`` where masked), times ``unit``."""
    return bias_and_mask(logits(qk, spec, mul=mul, unit=unit), rows, cols, spec, unit=unit,
                         **kwargs)


def logits_derivative(x, spec: ScoreSpec, *, unit=1.0):
    """d logits / d qk given ``x = logits(qk, spec, unit=unit)`` (tanh's derivative)."""
    if spec.softcap > 0:
        tanh = x * (1.0 / (spec.softcap * unit))
        return spec.softmax_scale * (1.0 - tanh * tanh)
    return spec.softmax_scale


def output_delta(out, dout, dlse):
    """The backward's delta, rowsum(dO * O) - dlse: dense (B, Sq, H, D) -> (B, H, Sq) float32
    (the lse cotangent ``dlse`` enters here, since d lse / d s = P)."""
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
    return delta - dlse


def _max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def key_span(row_lo, row_hi, spec: ScoreSpec, *, offset, seqlen_k):
    """Key columns ``[lo, hi)`` that at least one row of ``[row_lo, row_hi)`` may attend.

    Keys outside are masked for every row, so a kernel skips them. ``hi <= lo`` means none.
    """
    lo = 0 if spec.window_left < 0 else _max(0, row_lo + offset - spec.window_left)
    hi = seqlen_k if spec.window_right < 0 else _min(seqlen_k, row_hi + offset + spec.window_right)
    return lo, hi


def full_key_span(row_lo, row_hi, spec: ScoreSpec, *, offset, seqlen_k):
    """Key columns ``[lo, hi)`` that every row of ``[row_lo, row_hi)`` attends (no mask needed)."""
    lo = 0 if spec.window_left < 0 else _max(0, row_hi - 1 + offset - spec.window_left)
    hi = seqlen_k if spec.window_right < 0 else _min(seqlen_k, row_lo + 1 + offset + spec.window_right)
    return lo, hi


def query_span(col_lo, col_hi, spec: ScoreSpec, *, offset, seqlen_q):
    """Query rows ``[lo, hi)`` that may attend at least one key column of ``[col_lo, col_hi)``."""
    lo = 0 if spec.window_right < 0 else _max(0, col_lo - offset - spec.window_right)
    hi = seqlen_q if spec.window_left < 0 else _min(seqlen_q, col_hi - offset + spec.window_left)
    return lo, hi


def full_query_span(col_lo, col_hi, spec: ScoreSpec, *, offset, seqlen_q):
    """Query rows ``[lo, hi)`` that attend every key column of ``[col_lo, col_hi)``.

    The caller checks that the columns are inside the keys (``col_hi <= seqlen_k``).
    """
    lo = 0 if spec.window_right < 0 else _max(0, col_hi - 1 - offset - spec.window_right)
    hi = seqlen_q if spec.window_left < 0 else _min(seqlen_q, col_lo + 1 - offset + spec.window_left)
    return lo, hi


def apply_rotary(x, cos, sin, positions, *, interleaved):
    """Rotary embedding of ``x`` (B, S, H, D) at integer ``positions`` (B, S).

    ``cos``/``sin`` are (seqlen_ro, rotary_dim / 2); the first ``rotary_dim`` features rotate and
    the rest pass through. ``interleaved`` rotates the pairs (2m, 2m+1) (GPT-J), otherwise the
    halves (m, m + rotary_dim / 2) (GPT-NeoX). Computed in float32, returned in ``x.dtype``.
    """
    half = cos.shape[1]
    rotary_dim = 2 * half
    # Positions beyond the table (traced cache_seqlens past the capacity, or negative) take its
    # first or last row.
    c = jnp.take(cos, positions, axis=0, mode="clip").astype(jnp.float32)[:, :, None, :]
    s = jnp.take(sin, positions, axis=0, mode="clip").astype(jnp.float32)[:, :, None, :]
    xr = x[..., :rotary_dim].astype(jnp.float32)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(xr.shape)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rotated = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)


def sequence_bounds(cu_seqlens, total):
    """The varlen functions' sequence boundaries as computed: ``cu_seqlens`` clipped to
    [0, total] and made non-decreasing (a running maximum), so that sequences never overlap.
    Sequence b holds the tokens [bounds[b], bounds[b + 1]), truncated to max_seqlen; every other
    token belongs to no sequence."""
    return lax.cummax(jnp.clip(cu_seqlens, 0, total))


def cache_append_starts(cache_seqlens, seqlen_new, capacity):
    """Where each row's new keys start, clipped to [-seqlen_new, capacity]: the same writes
    (positions below 0 or from the capacity on are dropped) and no int32 overflow."""
    return jnp.clip(cache_seqlens, -seqlen_new, capacity)


def cache_lengths(cache_seqlens, seqlen_new, capacity):
    """The key positions in use in each row after the append: cache_seqlens + seqlen_new within
    [0, capacity] (int32, no overflow)."""
    return jnp.clip(cache_append_starts(cache_seqlens, seqlen_new, capacity) + seqlen_new, 0,
                    capacity)


def cache_locations(positions, *, page_size, num_rows, block_table=None, batch_idx=None):
    """Where each batch row's cache positions (B, P) (within its capacity) live: (rows, offsets,
    exists), the cache row (or page) clipped into [0, num_rows) and the position inside it;
    ``exists`` is False at a missing page (a block-table entry outside [0, num_rows)) or row (a
    cache_batch_idx outside it)."""
    if block_table is not None:
        slot = jnp.minimum(positions // page_size, block_table.shape[1] - 1)
        rows = jnp.take_along_axis(block_table, slot, axis=1)
        offsets = positions % page_size
    else:
        batch = positions.shape[0]
        rows = jnp.arange(batch, dtype=jnp.int32) if batch_idx is None else batch_idx
        rows, offsets = jnp.broadcast_to(rows[:, None], positions.shape), positions
    exists = (rows >= 0) & (rows < num_rows)
    return jnp.clip(rows, 0, num_rows - 1), offsets, exists


def cache_write_slots(starts, seqlen_new, capacity, *, page_size, num_rows, block_table=None,
                      batch_idx=None):
    """The slot each new key (b, t) of flash_attn_with_kvcache is written to, as a flat index
    ``row * page_size + offset`` into the cache's (rows or pages) x page_size positions, or -1
    where it is dropped: a position outside [0, capacity), a missing page or row
    (``cache_locations``), or a slot an earlier key (lower b, then lower t) already writes, so
    that no two writes meet. ``starts``: the (B,) clipped ``cache_append_starts``."""
    batch = starts.shape[0]
    positions = starts[:, None] + jnp.arange(seqlen_new, dtype=jnp.int32)[None, :]
    valid = (positions >= 0) & (positions < capacity)
    positions = jnp.clip(positions, 0, max(capacity - 1, 0))
    rows, offsets, exists = cache_locations(positions, page_size=page_size, num_rows=num_rows,
                                            block_table=block_table, batch_idx=batch_idx)
    flat = jnp.where(valid & exists, rows * page_size + offsets, -1).reshape(-1)
    # The first writer of each slot keeps it: a stable sort groups equal slots in (b, t) order.
    order = jnp.argsort(flat, stable=True)
    ordered = flat[order]
    repeated = jnp.concatenate([jnp.zeros((1,), bool), ordered[1:] == ordered[:-1]])
    keep = jnp.zeros_like(repeated).at[order].set(~repeated)
    return jnp.where(keep, flat, -1).reshape(batch, seqlen_new)


def cache_written(cache, new, slots):
    """``cache`` (rows or pages, page_size, ...) with ``new`` (B, seqlen_new, ...) at the
    ``cache_write_slots`` (-1: dropped): one scatter, in place when the cache is donated."""
    num_rows, page_size = cache.shape[:2]
    slots = jnp.where(slots >= 0, slots, num_rows * page_size).reshape(-1)  # past the end: dropped
    flat = cache.reshape((num_rows * page_size,) + cache.shape[2:])
    new = new.reshape((-1,) + new.shape[2:]).astype(cache.dtype)
    return flat.at[slots].set(new, mode="drop").reshape(cache.shape)


def kvcache_rotary(q, k, cos, sin, cache_seqlens, spec: ScoreSpec, *, interleaved):
    """flash_attn_with_kvcache's rotary positions: new key t of row b sits at
    ``cache_seqlens[b] + t``; query i at ``cache_seqlens[b] + i`` when a mask (causal or a window)
    applies, else every query at ``cache_seqlens[b]``. Returns (q, k) rotated."""
    k_positions = cache_seqlens[:, None] + jnp.arange(k.shape[1], dtype=jnp.int32)
    q_offsets = jnp.arange(q.shape[1], dtype=jnp.int32) if spec.is_masked else jnp.zeros(
        (q.shape[1],), jnp.int32)
    q_positions = cache_seqlens[:, None] + q_offsets
    return (apply_rotary(q, cos, sin, q_positions, interleaved=interleaved),
            apply_rotary(k, cos, sin, k_positions, interleaved=interleaved))


# Dropout (step 6, after the softmax): a keep mask that is a pure function of (key, batch row,
# query head, query row, key column), computed from uint32 operations only so that the kernels
# (where jax.random does not lower) and the reference produce the same bits.
#
# Bits: Philox-4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) with
# PHILOX_ROUNDS rounds (flash-attn's choice), keyed by the dropout key's two words. Key columns
# come in groups of 64; column j = 64 g + 8 c + 2 t + h (c < 8, t < 4, h < 2) of query row i in
# (batch row b, query head h') takes 8 bits of the counter (b, i, h', 4 g + t): byte 2 (c % 2) + h
# of word c // 2. A column is kept when its byte is >= round(p * 256): keep probability 1 - p to
# 1/256, the resolution flash-attn's own mask has (it compares a byte per element too).
#
# Why this order: one hash serves the 16 columns 8 c + 2 t + h of a 64-column group, which is how
# the tensor cores' accumulator tile spreads one row's columns over threads (a thread holds
# column pairs 8 apart). So each thread computes the hashes of its own elements and no mask
# crosses threads (``dropout_keep_tile``; the Triton compiler turns the joins and transposes into
# register renaming), and a pair of columns (2 t, 2 t + 1) is two adjacent bytes of one word. Batch
# and head sit in the two words the first round multiplies, the row and the column group in the
# two it only XORs, so the first round works on scalars and rows meet columns only in the third
# round's XORs: a tile pays its full width from there on.

_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 7
DROPOUT_BITS = 8
_GROUP = 64  # key columns of 4 counters


def mulhi_u32(a, b: int):
    """The high 32 bits of the 64-bit product of uint32 ``a`` and the constant ``b``, from 16-bit
    halves (no uint64 without jax_enable_x64). Exact; the kernels use one instruction instead."""
    a_lo, a_hi = a & np.uint32(0xFFFF), a >> np.uint32(16)
    b_lo, b_hi = np.uint32(b & 0xFFFF), np.uint32(b >> 16)
    lo_hi, hi_lo = a_lo * b_hi, a_hi * b_lo
    carry = ((a_lo * b_lo) >> np.uint32(16)) + (lo_hi & np.uint32(0xFFFF)) + (hi_lo & np.uint32(0xFFFF))
    return a_hi * b_hi + (lo_hi >> np.uint32(16)) + (hi_lo >> np.uint32(16)) + (carry >> np.uint32(16))


def mul_wide_u32(a, b: int):
    """(high, low) 32-bit words of the 64-bit product of uint32 ``a`` and the constant ``b``."""
    return mulhi_u32(a, b), a * np.uint32(b)


def philox4x32(counter, key, *, rounds=PHILOX_ROUNDS, mul_wide=mul_wide_u32):
    """Philox-4x32 of ``counter`` (four uint32 values that broadcast) under ``key`` (two uint32
    scalars); returns the four uint32 output words. ``mul_wide(a, m)``: the (high, low) words of
    a * m."""
    x0, x1, x2, x3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = k0 + np.uint32(_PHILOX_KEY_STEPS[0]), k1 + np.uint32(_PHILOX_KEY_STEPS[1])
        m0, m1 = _PHILOX_MULTIPLIERS
        hi0, lo0 = mul_wide(x0, m0)
        hi1, lo1 = mul_wide(x2, m1)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


def dropout_threshold(dropout_p: float) -> int:
    """The 8-bit threshold under which a column is dropped (at most 0xFF: a ``dropout_p`` within
    2**-9 of 1 keeps 1 column in 256)."""
    return min(int(round(dropout_p * (1 << DROPOUT_BITS))), (1 << DROPOUT_BITS) - 1)


def _u32(x):
    return jnp.asarray(x).astype(jnp.uint32)


def dropout_words(key, batch, head, rows, lanes, *, mul_wide=mul_wide_u32, cast=_u32):
    """The four hash words of the counters (batch row, rows, query head, ``lanes``), ``lanes``
    from ``dropout_lane``. ``cast`` makes each input a uint32 value (a kernel passes its own
    register type)."""
    counter = (cast(batch), cast(rows), cast(head), cast(lanes))
    return philox4x32(counter, (cast(key[0]), cast(key[1])), mul_wide=mul_wide)


def dropout_lane(cols):
    """The counter's last word for key columns ``cols``: 4 g + t of column 64 g + 8 c + 2 t + h."""
    return (cols // _GROUP) * 4 + (cols // 2) % 4


def dropout_word_index(cols):
    """Which of the four hash words holds key column ``cols``'s byte: c // 2 of
    64 g + 8 c + 2 t + h."""
    return (cols // 16) % 4


def dropout_byte_index(cols):
    """Which byte of its word is key column ``cols``'s: 2 (c % 2) + h of 64 g + 8 c + 2 t + h (a
    column pair 2 t, 2 t + 1 is two adjacent bytes)."""
    return (cols // 8) % 2 * 2 + cols % 2


def byte_keeps(word, threshold):
    """(byte 0 kept, ..., byte 3 kept) of a uint32 word: byte >= threshold, each compared as the
    word's top byte (shifted up; no masking)."""
    shifted = np.uint32(threshold << 24)
    return tuple((word << np.uint32(24 - 8 * byte)) >= shifted for byte in range(4))


def _pick_word(words, index):
    """``words[index]`` for (traced) indices in [0, 4) that broadcast against the words."""
    return jnp.where(index < 2, jnp.where(index == 0, words[0], words[1]),
                     jnp.where(index == 2, words[2], words[3]))


def dropout_keep(key, batch, head, rows, cols, threshold):
    """True where (rows, cols) (int arrays that broadcast, positions inside the sequence) of
    (batch row, query head) are kept; ``key``: the dropout key's two uint32 words. One hash per
    element: the reference's form."""
    rows, cols = jnp.asarray(rows), jnp.asarray(cols)
    words = dropout_words(key, batch, head, rows, dropout_lane(cols))
    word = _pick_word(words, dropout_word_index(cols))
    shift = (24 - 8 * dropout_byte_index(cols)).astype(jnp.uint32)
    return (word << shift) >= np.uint32(threshold << 24)


def _interleave(parts):
    """Equal arrays (2**n of them) -> one with n more axes of size 2, whose row-major flattening
    of the new axes holds part c at c. Built from pairwise stacks on a new last axis (what the
    Triton lowering supports: a join, which keeps the pair in one thread)."""
    if len(parts) == 1:
        return parts[0]
    return jnp.stack([_interleave(parts[0::2]), _interleave(parts[1::2])], axis=-1)


def dropout_tile_words(key, batch, head, rows, col_lo, block_k, *, mul_wide=mul_wide_u32):
    """The hash words behind the tile rows (R,) x columns [col_lo, col_lo + block_k), ``block_k``
    a power of two >= 16 and ``col_lo`` a multiple of it: a list of (R, 4 groups) arrays, word
    c // 2 of the tile's 8-column chunks c at column 4 g + t (all four words, or the 1 or 2 a
    16- or 32-column tile uses). One hash per 16 elements (per 8 or 4 below 64 columns).
    ``mul_wide`` as in ``philox4x32`` (a kernel passes its one-instruction form)."""
    groups = max(1, block_k // _GROUP)
    lanes = (col_lo // _GROUP) * 4 + jnp.arange(4 * groups, dtype=jnp.int32)
    words = dropout_words(key, batch, head, rows[:, None], lanes[None, :], mul_wide=mul_wide)
    if block_k < _GROUP:  # chunks c0 .. c0 + block_k / 8 of the group: words from c0 // 2 on
        count = block_k // 16
        first = dropout_word_index(col_lo)  # a multiple of count
        words = [_pick_word(words, first + i) for i in range(count)]
    return words


def column_tile(parts, block_k):
    """(R, block_k) from ``parts[2 c + h]`` (R, 4 groups), c the tile's 8-column chunks of a
    group: column 64 g + 8 c + 2 t + h holds ``parts[2 c + h][:, 4 g + t]``, the layout of
    ``dropout_tile_words``' bytes."""
    num_rows, num_chunks = parts[0].shape[0], len(parts) // 2
    x = _interleave(parts)  # (R, 4 groups, c bits..., h): axes row, group x t, c, h
    x = x.reshape(num_rows, max(1, block_k // _GROUP), 4, num_chunks, 2)
    return x.transpose(0, 1, 3, 2, 4).reshape(num_rows, block_k)


def keep_tile(words, block_k, threshold):
    """The keep mask (R, block_k) of a tile from its ``dropout_tile_words``: byte b of word w is
    part 4 w + b = 2 c + h."""
    return column_tile([keep for word in words for keep in byte_keeps(word, threshold)], block_k)


def dropout_keep_tile(key, batch, head, rows, col_lo, block_k, threshold, *,
                      mul_wide=mul_wide_u32):
    """``dropout_keep`` of a tile (see ``dropout_tile_words``): the kernels' form."""
    words = dropout_tile_words(key, batch, head, rows, col_lo, block_k, mul_wide=mul_wide)
    return keep_tile(words, block_k, threshold)
