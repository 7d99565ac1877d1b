"""Tile-level helpers shared by the Pallas Triton kernels.

Everything a kernel needs to stay within what the Triton lowering accepts and computes correctly:
float32 accumulation and full-precision float32 dots, masked loads and stores at ragged edges
(the lowering adds no bounds checks), and the block ranges and loops that skip masked-out blocks.
"""

from __future__ import annotations

import functools
import struct

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from flash_attn_jax.kernels.blocks import fori_loop
from flash_attn_jax.kernels.dropout_ptx import keep_bytes_ptx
from flash_attn_jax.semantics import (LOG2E, column_tile, dropout_tile_words, keep_tile,
                                      mul_wide_u32)


class Numerics:
    """How a kernel computes for its input dtype.

    Dots accumulate in float32; float32 inputs get full-precision dots (the default precision would
    silently be TF32). Logits are in natural units. The softmax exponentials take arguments of at
    most 0 (scores minus their row maximum), so they never overflow: 16-bit inputs use
    ``exp2(x * log2(e))`` (one instruction after the multiply), float32 inputs ``exp``.

    ``mul_exact`` forms the logits' last product rounded on its own. Compilers contract a
    multiply followed by a subtraction into a fused multiply-add; with ``s = qk * scale`` and the
    row maximum ``m`` taken over the rounded ``s``, ``exp(fma(qk, scale, -m))`` of the maximum's
    own element is then exp(rounding error of s), which at logits near 1e9 is e**30 and more: the
    output overflows. Compiled, the product is one ``mul.rn.f32`` (which PTX never contracts);
    interpreted, an optimization barrier keeps XLA from fusing it.
    """

    def __init__(self, dtype, *, interpret=False):
        full_f32 = jnp.dtype(dtype) == jnp.float32
        self.precision = lax.Precision.HIGHEST if full_f32 else None
        self.base2 = not full_f32
        self.interpret = interpret

    def matmul(self, a, b, *, transpose_a=False, transpose_b=False):
        """2-D a @ b (a.T, b.T where asked) accumulated in float32."""
        contract_a, contract_b = (0 if transpose_a else 1), (1 if transpose_b else 0)
        return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32, precision=self.precision)

    def exp(self, x):
        """e**x for x <= 0 (a score minus its row's maximum or logsumexp)."""
        return jnp.exp2(x * LOG2E) if self.base2 else jnp.exp(x)

    @property
    def backward_unit(self):
        """The backward recomputes P = e**(s - lse) in base 2 for 16-bit inputs (logits times
        log2(e)), one fused multiply-add and an exp2 an element; its logits are not rounded
        apart (``mul_exact``): the fusion only rounds the difference."""
        return LOG2E if self.base2 else 1.0

    def lse_in_units(self, lse):
        """The backward's lse (natural; +inf for rows without a key) times ``backward_unit``,
        finite where it was (a logsumexp past float32 / log2(e) saturates instead)."""
        if not self.base2:
            return lse
        scaled = jnp.clip(lse * LOG2E, -FLOAT32_MAX, FLOAT32_MAX)
        return jnp.where(lse == jnp.inf, jnp.inf, scaled)

    def probs(self, s, lse):
        """P = e**(s - lse) from recomputed scores (both in ``backward_unit``): at most 1. The
        recomputation may round a score differently from the forward (another summation order),
        which at logits near 1e9 puts it above the logsumexp by more than float32 exponentials
        take."""
        return (jnp.exp2 if self.base2 else jnp.exp)(jnp.minimum(s - lse, 0.0))

    def lse(self, row_max, row_sum):
        """Logsumexp from the running max and sum."""
        return row_max + jnp.log(row_sum)

    def mul_exact(self, x, constant: float):
        """float32 ``x * constant``, rounded before any later use (see the class docstring)."""
        if self.interpret:
            return lax.optimization_barrier(x * constant)
        bits = struct.unpack("<I", struct.pack("<f", constant))[0]
        [product] = plgpu.elementwise_inline_asm(
            f"mul.rn.f32 $0, $1, 0f{bits:08X};", args=[x], constraints="=f,f", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
        return product


FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


def _conjunction(masks, shape):
    mask = None
    for m in masks:
        if m is not None:
            mask = m if mask is None else mask & m
    return None if mask is None else jnp.broadcast_to(mask, shape)


def masked_load(ref, *masks, other=0):
    """Loads ``ref`` with the conjunction of the non-None ``masks``; masked lanes read ``other``."""
    mask = _conjunction(masks, ref.shape)
    if mask is None:
        return plgpu.load(ref)
    return plgpu.load(ref, mask=mask, other=other)


def masked_store(ref, value, *masks):
    mask = _conjunction(masks, ref.shape)
    if mask is None:
        plgpu.store(ref, value)
    else:
        plgpu.store(ref, value, mask=mask)


def bounds_mask(index, size, block):
    """``index < size`` (1-D), or None when ``size`` is a static multiple of ``block`` (no ragged
    edge). A traced ``size`` (a variable-length sequence) always gets the mask."""
    return None if isinstance(size, int) and size % block == 0 else index < size


def block_indices(block_id, block, size, *, check_bounds=True):
    """(start, indices, in_bounds) of block ``block_id`` of a ``size``-long axis. ``in_bounds`` is
    None when no block of the axis is ragged (or when the caller knows this one is not)."""
    start = block_id * block
    indices = start + jnp.arange(block, dtype=jnp.int32)
    return start, indices, bounds_mask(indices, size, block) if check_bounds else None


def as_rows(mask):
    return None if mask is None else mask[:, None]


def as_cols(mask):
    return None if mask is None else mask[None, :]


def head_dim_mask(head_dim, head_dim_p):
    """(1, head_dim_p) mask of the real features, None without padding."""
    return as_cols(bounds_mask(jnp.arange(head_dim_p, dtype=jnp.int32), head_dim, head_dim_p))


def masked_full_masked_loop(body, carry, first, inner_first, inner_end, end):
    """Runs ``carry = body(i, carry, masked=...)`` for i in ``[first, end)``: masked outside
    ``[inner_first, inner_end)``, unmasked inside."""
    carry = fori_loop(first, inner_first, functools.partial(body, masked=True), carry)
    carry = fori_loop(inner_first, inner_end, functools.partial(body, masked=False), carry)
    return fori_loop(inner_end, end, functools.partial(body, masked=True), carry)


def online_softmax_step(carry, s, v, *, numerics, masked, dropout=None):
    """One key block of the streaming softmax: ``carry`` = (acc, row_max, row_sum) updated with
    scores ``s`` (-inf where masked) and values ``v``. ``dropout``: the tile's
    ``DropoutTile``; the dropped probabilities still count in the sum (the softmax is taken
    before dropout)."""
    acc, row_max, row_sum = carry
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    # A row that has seen only masked keys keeps max -inf; exponentiate against 0 instead.
    ref_max = jnp.where(new_max == -jnp.inf, 0.0, new_max) if masked else new_max
    correction = numerics.exp(row_max - ref_max)
    p = numerics.exp(s - ref_max[:, None])
    row_sum = row_sum * correction + jnp.sum(p, axis=1)
    p = p.astype(v.dtype)
    if dropout is not None:
        p = dropout.apply(p)
    acc = acc * correction[:, None] + numerics.matmul(p, v)
    return acc, new_max, row_sum


def initial_softmax_state(rows, head_dim_p):
    return (jnp.zeros((rows, head_dim_p), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def finish_softmax(carry, numerics, scale=1.0):
    """(out float32, lse natural log) from the final state, out times ``scale`` (dropout's
    1 / (1 - p)); rows that saw no key: out 0, lse -inf."""
    acc, row_max, row_sum = carry
    empty = row_sum == 0.0
    safe_sum = jnp.where(empty, 1.0, row_sum)
    out = acc / safe_sum[:, None]
    if scale != 1.0:
        out = out * scale
    return out, jnp.where(empty, -jnp.inf, numerics.lse(row_max, safe_sum))


def optional_refs(spec, refs):
    """(slopes_ref or None, dropout seed ref or None, the remaining refs): the optional inputs
    that follow a kernel's arrays, ALiBi slopes then the dropout key words."""
    refs = list(refs)
    slopes_ref = refs.pop(0) if spec.has_alibi else None
    seed_ref = refs.pop(0) if spec.has_dropout else None
    return slopes_ref, seed_ref, refs


def optional_arrays(spec, slopes, seed):
    """The arrays behind ``optional_refs``: ALiBi slopes, then the dropout key words."""
    return [x for x, used in ((slopes, spec.has_alibi), (seed, spec.has_dropout)) if used]


def _mul_wide_instruction(a, multiplier: int):
    """``mul_wide_u32`` as one ``mul.wide.u32`` per element (a scalar keeps the jnp form). Inline
    assembly has no interpret-mode rule, so only compiled kernels use it. The 64-bit product is
    split by two more asm moves (register renaming): Pallas lowers an asm block of several results
    wrongly. Results are declared int32: the lowering types unsigned results apart from the
    signless integers of the rest."""
    if jnp.ndim(a) == 0:
        return mul_wide_u32(a, multiplier)
    [wide] = plgpu.elementwise_inline_asm(
        "mul.wide.u32 $0, $1, $2;", args=[a, jnp.full(a.shape, multiplier, jnp.uint32)],
        constraints="=l,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.dtype("int64"))])
    halves = []
    for move in ("mov.b64 {$0, _}, $1;", "mov.b64 {_, $0}, $1;"):  # low, high
        [half] = plgpu.elementwise_inline_asm(
            move, args=[wide], constraints="=r,l", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])
        halves.append(lax.bitcast_convert_type(half, jnp.uint32))
    low, high = halves
    return high, low


def _drop_pairs_instruction(p, words, threshold: int):
    """``p`` (16-bit) with the dropped elements zeroed, two at a time: ``words`` is the column
    tile of hash words, each pair's bytes in the word's low two bytes (the even column's in byte
    0). The keep test runs on the word's bytes at once (``dropout_ptx.keep_bytes_ptx``) and its
    result becomes a mask by copying byte 0's and byte 1's bit 7 over the pair's halves (``prmt``
    0x9988): 5 integer instructions per pair.

    Triton hands one asm instance two consecutive elements of a thread, which the tile layouts
    make two adjacent columns (2 t, 2 t + 1), so the first element's word serves both."""
    body = keep_bytes_ptx(threshold, "$2", "d", "d") + "\nprmt.b32 m, d, 0, 0x9988;\n"
    [dropped] = plgpu.elementwise_inline_asm(
        "{\n.reg .b32 d, m;\n" + body + "and.b32 $0, $1, m;\n}",
        args=[p, words], constraints="=r,r,r,r", pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(p.shape, p.dtype)])
    return dropped


class DropoutTile:
    """The dropout keep mask of one (rows, block_k) tile, in the forms the kernels apply it."""

    def __init__(self, words, block_k, threshold, *, interpret):
        self._words, self._block_k, self._threshold = words, block_k, threshold
        self._interpret = interpret

    @functools.cached_property
    def keep(self):
        """Boolean (rows, block_k), True where kept."""
        return keep_tile(self._words, self._block_k, self._threshold)

    def apply(self, p):
        """``p`` with the dropped elements set to 0 (no 1 / (1 - p) scaling). 16-bit tiles in
        compiled kernels take the packed form."""
        if self._interpret or p.dtype.itemsize != 2:
            return jnp.where(self.keep, p, jnp.zeros((), p.dtype))
        # Each pair's word with its bytes moved to the low two (bytes 2, 3: odd chunks).
        pair_words = column_tile([part for word in self._words
                                  for part in (word, word, word >> 16, word >> 16)],
                                 self._block_k)
        return _drop_pairs_instruction(p, pair_words, self._threshold)


def dropout_tile(spec, seed_ref, batch, head, *, interpret):
    """``tile(rows, col_lo, block_k)`` -> the ``DropoutTile`` of a tile for one (batch row, query
    head), or None without dropout."""
    if not spec.has_dropout:
        return None
    key = (seed_ref[0], seed_ref[1])
    mul_wide = mul_wide_u32 if interpret else _mul_wide_instruction
    return lambda rows, col_lo, block_k: DropoutTile(
        dropout_tile_words(key, batch, head, rows, col_lo, block_k, mul_wide=mul_wide), block_k,
        spec.dropout_threshold, interpret=interpret)
