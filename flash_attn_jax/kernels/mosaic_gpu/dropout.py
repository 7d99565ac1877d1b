"""Dropout's keep mask on wgmma-layout tiles: ``semantics.py``'s bits, one hash per counter a
thread needs.

The keep mask hashes one Philox counter per (query row, 64-key group, t) and takes the 16
columns 64 g + 8 c + 2 t + h (c, h) from the bytes of its four words (``semantics.dropout_lane``).
A wgmma accumulator tile gives each thread rows 16 w + lane / 4 (+ 8) and the column pairs
8 j + 2 (lane % 4) (+ 1) (``mgpu.WGMMA_LAYOUT``); so:

- a tile whose rows are queries (S = Q K^T: the forward and the dQ kernel) holds all 16 columns
  of a counter in one thread: one hash per 16 elements, a column pair two adjacent bytes of one
  word, known statically;
- a tile whose rows are keys (S^T = K Q^T: the dK/dV kernel's split passes) holds keys 8 apart in
  one thread (rows r and r + 8: bytes h and 2 + h of one word): one hash per 2 elements, word
  and byte chosen at run time.

Pallas's array operations cannot say "these elements share a hash", so the mask is built
register by register inside ``plgpu.inline_mgpu``, running ``semantics.philox4x32`` and the lane
and byte expressions themselves on 32-bit register values (``_Word``). In JAX's GPU interpret
mode, which has no rule for inline Mosaic GPU code, the per-element reference form
(``semantics.dropout_keep``) gives the same mask.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm, vector
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from flash_attn_jax import semantics
from flash_attn_jax.kernels.dropout_ptx import keep_bytes_ptx
from flash_attn_jax.kernels.mosaic_gpu.common import interpreting, wgmma_iota

_GROUP = 64  # key columns a counter's four words cover (semantics.dropout_lane)


class _Word:
    """A uint32 value in a 32-bit register (an MLIR i32), with the operators ``semantics.py``'s
    Philox, lane and keep-mask expressions use, so that the kernels run those definitions."""

    def __init__(self, value):
        self.value = value

    @staticmethod
    def of(x) -> "_Word":
        if isinstance(x, _Word):
            return x
        value = int(x) & 0xFFFFFFFF
        i32 = ir.IntegerType.get_signless(32)
        return _Word(mgpu_utils.c(value - (1 << 32) if value >= 1 << 31 else value, i32))

    def _binary(self, op, other):
        return _Word(op(self.value, _Word.of(other).value))

    def __xor__(self, other):
        return self._binary(arith.xori, other)

    def __add__(self, other):
        return self._binary(arith.addi, other)

    def __mul__(self, other):
        return self._binary(arith.muli, other)

    def __sub__(self, other):
        return self._binary(arith.subi, other)

    def __lshift__(self, other):
        return self._binary(arith.shli, other)

    __rxor__, __radd__, __rmul__ = __xor__, __add__, __mul__

    def __floordiv__(self, other):  # by powers of two only (the positions' divisions)
        shift = _log2(other)
        return self._binary(arith.shrui, shift) if shift else self

    def __mod__(self, other):  # by powers of two only
        _log2(other)
        return self._binary(arith.andi, int(other) - 1)

    def __ge__(self, other):
        """An i1: unsigned >=."""
        return arith.cmpi(arith.CmpIPredicate.uge, self.value, _Word.of(other).value)


def _log2(x) -> int:
    x = int(x)
    if x <= 0 or x & (x - 1):
        raise ValueError(f"a power of two, got {x}")
    return x.bit_length() - 1


def _mul_wide(a: _Word, multiplier: int):
    """(high, low) words of a * multiplier: one mul.wide.u32."""
    product = arith.MulUIExtendedOp(a.value, _Word.of(multiplier).value)
    return _Word(product.high), _Word(product.low)


def _register_offsets(layout, shape):
    """(row, column) of each register's first element relative to its thread's first element,
    in the order of ``layout.thread_idxs`` (static: the layout's tiling)."""
    strides = layout.tiling.tile_strides(tuple(mgpu_utils.get_contiguous_strides(shape)))
    return [divmod(sum(i * s for i, s in zip(index, strides)), shape[1])
            for index in np.ndindex(layout.registers_shape(shape))]


def _select_word(words, index: _Word):
    """words[index] for a run-time index in [0, 4)."""
    bit0 = arith.trunci(ir.IntegerType.get_signless(1), index.value)
    bit1 = arith.trunci(ir.IntegerType.get_signless(1), (index // 2).value)
    low = arith.select(bit0, words[1].value, words[0].value)
    high = arith.select(bit0, words[3].value, words[2].value)
    return _Word(arith.select(bit1, high, low))


def _register_words(scalars, *, shape, rows_are_queries):
    """For each register of a wgmma-layout tile of ``shape``: (its index, [(word, byte)] for its
    two elements), ``word`` the hash word holding the element's 8 bits and ``byte`` which of its
    bytes (a Python int when static, else a ``_Word``). Registers that share a word get the same
    ``_Word`` object. ``scalars``: the splat arrays (row0, col0, key0, key1, batch, head) of
    ``keep_factor``."""
    layout = mgpu.WGMMA_LAYOUT
    if layout.vector_length != 2:
        raise NotImplementedError("column pairs per register")
    i32 = ir.IntegerType.get_signless(32)
    row0, col0, key0, key1, batch, head = (_Word(array.registers.item()) for array in scalars)
    words_of_group, picked = {}, {}

    def words(group, counter_row, lane):
        if group not in words_of_group:
            words_of_group[group] = semantics.dropout_words(
                (key0, key1), batch, head, counter_row, lane, mul_wide=_mul_wide, cast=_Word.of)
        return words_of_group[group]

    def pick(group, index_key, index):
        """words[index] of a group, a run-time index selected once per (group, index_key)."""
        if (group, index_key) not in picked:
            picked[group, index_key] = _select_word(words_of_group[group], index)
        return picked[group, index_key]

    for register, (row_offset, col_offset), (row_index, col_index) in zip(
            np.ndindex(layout.registers_shape(shape)), _register_offsets(layout, shape),
            layout.thread_idxs(shape), strict=True):
        if col_offset % 8 or row_offset % 8:
            raise NotImplementedError("wgmma tiles of 8 x 8 per warp")
        row = row0 + _Word(arith.index_cast(i32, row_index))
        col = col0 + _Word(arith.index_cast(i32, col_index))
        if rows_are_queries:
            # The thread's 16 columns of a 64-column group share the counter (row, 4 g + t); the
            # register's column pair (chunk c) is bytes 2 (c % 2) and 2 (c % 2) + 1 of word c // 2.
            # A tile 64 or more wide starts at a group (col0 a multiple of 64); a narrower one
            # (col0 a multiple of its width) takes its words from the group's run-time offset.
            group = (row_offset, col_offset // _GROUP)
            group_words = words(group, row, semantics.dropout_lane(col))
            chunk = col_offset // 8 % 8
            if shape[1] >= _GROUP:
                word = group_words[chunk // 2]
            else:
                word = pick(group, chunk // 2,
                            semantics.dropout_word_index(col0) + chunk // 2)
            first = 2 * (chunk % 2)
            yield register, [(word, first), (word, first + 1)]
        else:
            # Key rows r and r + 8 of a 16-row slab share the counter (query, 4 g + t) of each
            # column (row0 a multiple of 64) and its word; each query column is its own
            # counter.
            byte = semantics.dropout_byte_index(row)
            elements = []
            for element in range(2):
                group = (row_offset // 16, col_offset, element)
                words(group, col + element, semantics.dropout_lane(row))
                elements.append((pick(group, 0, semantics.dropout_word_index(row)), byte))
            yield register, elements


def _byte_kept(word: _Word, byte, threshold):
    """An i1: ``word``'s byte ``byte`` (an int or a ``_Word``) >= threshold, compared as the top
    byte (``semantics.byte_keeps``)."""
    return (word << (_Word.of(24) - byte * 8)) >= threshold << 24


def _factor_registers(*scalars, shape, rows_are_queries, threshold, kept):
    """The factor tile (``kept`` where kept, else 0.0) in ``mgpu.WGMMA_LAYOUT``."""
    f32 = ir.F32Type.get()
    values = (mgpu_utils.c(0.0, f32), mgpu_utils.c(float(kept), f32))
    layout = mgpu.WGMMA_LAYOUT
    registers = np.empty(layout.registers_shape(shape), dtype=object)
    vector_type = ir.VectorType.get((2,), f32)
    for register, elements in _register_words(scalars, shape=shape,
                                              rows_are_queries=rows_are_queries):
        result = llvm.mlir_undef(vector_type)
        for position, (word, byte) in enumerate(elements):
            keep = _byte_kept(word, byte, threshold)
            result = vector.insert(arith.select(keep, values[1], values[0]), result,
                                   dynamic_position=[],
                                   static_position=ir.DenseI64ArrayAttr.get([position]))
        registers[register] = result
    return mgpu.FragmentedArray(_registers=registers, _layout=layout, _is_signed=None)


# A 16-bit pair masked by bytes 0, 1 (selector 0x9988) or 2, 3 (0xBBAA) of a keep-bytes word:
# prmt copies each byte's bit 7 over the pair's half, and applies the mask.
_MASK_PAIR_PTX = "{{ .reg .b32 m; prmt.b32 m, $1, 0, {selector}; and.b32 $0, $2, m; }}"


def _dropped_pair_registers(pairs, *scalars, threshold):
    """``pairs`` (16-bit, wgmma layout, rows are queries) with its dropped elements zeroed, a
    register (a column pair: two bytes of one word) at a time: the bytes of each word tested
    once (``dropout_ptx.keep_bytes_ptx``), then 2 instructions a pair."""
    i32 = ir.IntegerType.get_signless(32)
    keep_bytes_asm = "{ .reg .b32 d; " + keep_bytes_ptx(threshold, "$1", "d", "$0") + " }"
    keep_bytes = {}
    registers = np.empty_like(pairs.registers)
    for register, [(word, first), _] in _register_words(scalars, shape=pairs.shape,
                                                        rows_are_queries=True):
        if id(word) not in keep_bytes:
            keep_bytes[id(word)] = (word, llvm.inline_asm(i32, [word.value], keep_bytes_asm,
                                                          "=r,r"))
        pair = pairs.registers[register]
        asm = _MASK_PAIR_PTX.format(selector="0x9988" if first == 0 else "0xBBAA")
        masked = llvm.inline_asm(i32, [keep_bytes[id(word)][1], mgpu_utils.bitcast(pair, i32)],
                                 asm, "=r,r,r")
        registers[register] = mgpu_utils.bitcast(masked, pair.type)
    return mgpu.FragmentedArray(_registers=registers, _layout=pairs.layout, _is_signed=None)


def words(seed, placement=None):
    """The kernels' dropout operand: uint32 (4,), the dropout key's two words, then the global
    index of the call's first batch row and first query head (a shard's ``Placement``; else 0:
    the mask hashes global indices)."""
    offsets = (0, 0) if placement is None else (placement.batch, placement.head)
    parts = [jnp.asarray(seed)[i] for i in range(2)] + list(offsets)
    return jnp.stack([jnp.asarray(x).astype(jnp.uint32) for x in parts])


def check_words(spec: semantics.ScoreSpec, dropout_words):
    """``dropout_words`` for a kernel's operand (zeros, unread, without dropout)."""
    if not spec.has_dropout:
        return jnp.zeros((4,), jnp.uint32)
    if dropout_words is None or jnp.shape(dropout_words) != (4,):
        raise ValueError("dropout needs the (4,) words of dropout.words")
    return jnp.asarray(dropout_words).astype(jnp.uint32)


def _hash_scalars(words_ref, *, batch, head, row0, col0):
    """uint32 (row0, col0, key0, key1, batch, head) of the tile's hash: the call's batch row and
    query head plus the offsets in ``words_ref`` (``words``)."""
    batch = jnp.asarray(batch).astype(jnp.uint32) + words_ref[2]
    head = jnp.asarray(head).astype(jnp.uint32) + words_ref[3]
    return [jnp.asarray(x).astype(jnp.uint32)
            for x in (row0, col0, words_ref[0], words_ref[1], batch, head)]


def keep_factor(words_ref, shape, *, batch, head, row0, col0, spec: semantics.ScoreSpec,
                rows_are_queries: bool, kept: float = 1.0):
    """A float32 wgmma-layout tile of ``shape`` (rows, cols): ``kept`` where dropout keeps the
    element, 0 where it drops it. Element (i, j) is query row0 + i and key col0 + j when
    ``rows_are_queries``, else key row0 + i and query col0 + j (the dK/dV kernel's S^T):
    positions inside the sequence. ``batch`` (a varlen call's sequence) and ``head`` (the query
    head) are the call's; ``words_ref`` (``words``) adds its offsets. The key offset (col0, or
    row0) must be a multiple of 64, or of the tile's width below 64 keys (32 or 16), and the
    shape's dims multiples of 64 and 8."""
    threshold = spec.dropout_threshold
    scalars = _hash_scalars(words_ref, batch=batch, head=head, row0=row0, col0=col0)
    if interpreting():
        _, _, key0, key1, batch, head = scalars
        rows, cols = wgmma_iota(shape, 0, row0), wgmma_iota(shape, 1, col0)
        queries, keys = (rows, cols) if rows_are_queries else (cols, rows)
        keep = semantics.dropout_keep((key0, key1), batch, head, queries, keys, threshold)
        return jnp.where(keep, jnp.float32(kept), jnp.float32(0.0))
    build = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WG_SPLAT(()),) * len(scalars),
        return_type=plgpu.ShapeDtypeStruct(shape, jnp.float32, layout=plgpu.Layout.WGMMA),
    )(lambda _, *arrays: _factor_registers(*arrays, shape=tuple(shape),
                                           rows_are_queries=rows_are_queries,
                                           threshold=threshold, kept=kept))
    return build(*scalars)


def drop(p16, words_ref, *, batch, head, row0, col0, spec: semantics.ScoreSpec):
    """``p16`` (a 16-bit wgmma-layout tile, queries x keys as in ``keep_factor``) with the
    elements dropout drops set to 0 (the kept ones unscaled). The mask works on the registers'
    16-bit pairs (``keep_bytes_ptx`` once a word, then ``_MASK_PAIR_PTX``: about 1.4
    instructions an element instead of a compare, a select and a multiply on float32)."""
    threshold = spec.dropout_threshold
    if interpreting():
        factor = keep_factor(words_ref, p16.shape, batch=batch, head=head, row0=row0, col0=col0,
                             spec=spec, rows_are_queries=True)
        return (p16.astype(jnp.float32) * factor).astype(p16.dtype)
    scalars = _hash_scalars(words_ref, batch=batch, head=head, row0=row0, col0=col0)
    build = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, *(plgpu.Layout.WG_SPLAT(()),) * len(scalars)),
        return_type=plgpu.ShapeDtypeStruct(p16.shape, p16.dtype, layout=plgpu.Layout.WGMMA),
    )(lambda _, pairs, *arrays: _dropped_pair_registers(pairs, *arrays, threshold=threshold))
    return build(p16, *scalars)
