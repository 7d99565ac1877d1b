"""The dropout keep mask's hash (flash_attn_jax.semantics), ahead of the dropout kernels.

Philox-4x32 written with uint32 operations must reproduce the published known-answer vectors;
the kernels' tile form of the keep mask must equal the per-element form the reference uses; the
statistics must match p.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ON_GPU
from flash_attn_jax import semantics

# Kernel cases whose CPU (interpret-mode) runs repeat what the other cases check there: on a GPU
# only, where they compile to the packed instructions (the CI stays within its time).
gpu_only = pytest.mark.skipif(not ON_GPU, reason="the GPU run's grid")

# Random123's known-answer vectors (kat_vectors): rounds, counter, key, output.
PHILOX_KAT = [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("rounds,counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(rounds, counter, key, expected):
    u32 = lambda words: tuple(jnp.uint32(w) for w in words)
    got = semantics.philox4x32(u32(counter), u32(key), rounds=rounds)
    assert tuple(int(w) for w in got) == expected


def test_mul_wide_gives_both_words_of_the_product():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.integers(0, 2**32, 20000, dtype=np.uint64),
                        np.array([0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF], np.uint64)])
    for multiplier in (0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF, 1):
        high, low = semantics.mul_wide_u32(jnp.asarray(a.astype(np.uint32)), multiplier)
        product = a * np.uint64(multiplier)
        np.testing.assert_array_equal(np.asarray(high).astype(np.uint64), product >> np.uint64(32))
        np.testing.assert_array_equal(np.asarray(low).astype(np.uint64), product & np.uint64(0xFFFFFFFF))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_byte_is_kept_at_or_above_the_threshold(p):
    threshold = semantics.dropout_threshold(p)
    values = np.array([0, threshold - 1, threshold, threshold + 1, 0x7F, 0x80, 0xFF], np.uint32)
    grid = np.stack(np.meshgrid(*[values] * 4, indexing="ij"), -1).reshape(-1, 4)
    words = sum(grid[:, byte] << np.uint32(8 * byte) for byte in range(4)).astype(np.uint32)
    keeps = semantics.byte_keeps(jnp.asarray(words), threshold)
    for byte in range(4):
        np.testing.assert_array_equal(np.asarray(keeps[byte]), grid[:, byte] >= threshold)


@pytest.mark.parametrize("col_lo,block_k", [(0, 64), (64, 128), (256, 256), (16, 16), (48, 16),
                                            (32, 32), (0, 32), (96, 32), (112, 16), (192, 64)])
def test_tile_form_equals_per_element_form(col_lo, block_k):
    key, threshold = (1234, 5678), semantics.dropout_threshold(0.3)
    rows = jnp.arange(40, 72, dtype=jnp.int32)
    tile = semantics.dropout_keep_tile(key, 3, 7, rows, col_lo, block_k, threshold)
    cols = col_lo + jnp.arange(block_k, dtype=jnp.int32)
    np.testing.assert_array_equal(tile, semantics.dropout_keep(key, 3, 7, rows[:, None], cols[None, :],
                                                               threshold))


def test_per_element_form_reads_the_documented_bits():
    # Column j = 64 g + 8 c + 2 t + h of row i takes byte 2 (c % 2) + h of word c // 2 of
    # philox((batch, i, head, 4 g + t)).
    key, batch, head, row, g, t = (11, 22), 1, 2, 5, 3, 1
    words = semantics.philox4x32(tuple(jnp.uint32(x) for x in (batch, row, head, 4 * g + t)),
                                 (jnp.uint32(key[0]), jnp.uint32(key[1])))
    bits = [(int(words[c // 2]) >> (8 * (2 * (c % 2) + h))) & 0xFF
            for c in range(8) for h in range(2)]
    cols = jnp.asarray([64 * g + 8 * c + 2 * t + h for c in range(8) for h in range(2)])
    for threshold in (bits[0], bits[0] + 1, 1 << 7, 0xFF):
        keep = semantics.dropout_keep(key, batch, head, row, cols, threshold)
        assert [bool(x) for x in keep] == [b >= threshold for b in bits]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropped_fraction_matches_p(p):
    rows, cols = jnp.arange(128)[:, None], jnp.arange(128)[None, :]
    keep = jnp.stack([semantics.dropout_keep((42, 0), 0, head, rows, cols, semantics.dropout_threshold(p))
                      for head in range(4)])
    assert abs(1.0 - float(jnp.mean(keep)) - p) <= 0.01


def test_masks_differ_across_keys_heads_and_batch_rows():
    rows, cols = jnp.arange(64)[:, None], jnp.arange(64)[None, :]
    threshold = semantics.dropout_threshold(0.5)
    masks = [semantics.dropout_keep(k, b, h, rows, cols, threshold)
             for k, b, h in [((1, 2), 0, 0), ((1, 3), 0, 0), ((1, 2), 1, 0), ((1, 2), 0, 1)]]
    for i in range(len(masks)):
        for j in range(i):
            assert 0.4 < float(jnp.mean(masks[i] != masks[j])) < 0.6


def test_neighbouring_columns_and_rows_are_uncorrelated():
    # The 8 columns of one hash and adjacent rows must not move together.
    rows, cols = jnp.arange(256)[:, None], jnp.arange(256)[None, :]
    keep = np.asarray(semantics.dropout_keep((7, 9), 0, 0, rows, cols, semantics.dropout_threshold(0.5)),
                      np.float64) - 0.5
    for shift_rows, shift_cols in ((0, 1), (0, 2), (0, 8), (0, 16), (1, 0)):
        a = keep[:256 - shift_rows, :256 - shift_cols]
        b = keep[shift_rows:, shift_cols:]
        assert abs(np.mean(a * b)) / 0.25 < 0.02


def test_threshold_resolution_is_8_bits():
    # flash-attn's own resolution (it compares a byte per element); round to nearest.
    assert semantics.dropout_threshold(1 / 256) == 1
    assert semantics.dropout_threshold(0.1) == 26
    assert semantics.dropout_threshold(0.5) == 128


def test_dropout_p_next_to_one_keeps_one_column_in_256():
    # round(p * 2**8) would be 2**8, past the 8 bits a column is compared in.
    threshold = semantics.dropout_threshold(1 - 2.0**-10)
    assert threshold == 0xFF
    keep = semantics.dropout_keep((5, 6), 0, 0, jnp.arange(512)[:, None], jnp.arange(512)[None, :],
                                  threshold)
    assert 900 < int(jnp.sum(keep)) < 1150  # 1024 expected


def keep_tile_call(block_q, block_k, *, interpret, debug=False):
    """A Pallas kernel that writes the kernels' keep tile (as float32) for a (block_q, block_k)
    tile at rows [32, 32 + block_q) and columns [block_k, 2 * block_k) of batch row 2, head 5,
    key words from an input: compiled, its multiplies are the GPU's mul.wide instruction."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    from flash_attn_jax.kernels.triton.tiles import dropout_tile

    spec = semantics.ScoreSpec(softmax_scale=1.0, dropout_p=0.1)

    def kernel(key_ref, out_ref):
        keep = dropout_tile(spec, key_ref, 2, 5, interpret=interpret)
        rows = 32 + jnp.arange(block_q, dtype=jnp.int32)
        plgpu.store(out_ref, keep(rows, block_k, block_k).keep.astype(jnp.float32))

    return pl.pallas_call(kernel, grid=(1,), in_specs=[pl.BlockSpec((2,), lambda i: (0,))],
                          out_specs=pl.BlockSpec((block_q, block_k), lambda i: (0, 0)),
                          out_shape=jax.ShapeDtypeStruct((block_q, block_k), jnp.float32),
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
                          interpret=interpret, debug=debug)


@pytest.mark.parametrize("block_k", [16, pytest.param(32, marks=gpu_only), 128])
def test_tile_form_inside_a_kernel(block_k):
    # On a GPU the kernel is compiled (mul.wide as an instruction), elsewhere interpreted.
    from flash_attn_jax.kernels import use_interpret

    key = jnp.asarray([99, 7], jnp.uint32)
    got = keep_tile_call(64, block_k, interpret=use_interpret())(key)
    rows, cols = 32 + jnp.arange(64)[:, None], block_k + jnp.arange(block_k)[None, :]
    expected = semantics.dropout_keep((99, 7), 2, 5, rows, cols, semantics.dropout_threshold(0.1))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected, np.float32))


def drop_tile_call(x, p, *, interpret):
    """A Pallas kernel that zeroes the dropped elements of the 16-bit tile ``x`` with the kernels'
    ``DropoutTile.apply`` (compiled: the packed pair instructions) for rows [32, 32 + R) and
    columns [C, 2 C) of batch row 2, head 5."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    from flash_attn_jax.kernels.triton.tiles import dropout_tile

    spec = semantics.ScoreSpec(softmax_scale=1.0, dropout_p=p)
    block_q, block_k = x.shape

    def kernel(key_ref, x_ref, out_ref):
        rows = 32 + jnp.arange(block_q, dtype=jnp.int32)
        tile = dropout_tile(spec, key_ref, 2, 5, interpret=interpret)(rows, block_k, block_k)
        plgpu.store(out_ref, tile.apply(plgpu.load(x_ref)))

    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    return pl.pallas_call(kernel, grid=(1,), in_specs=[whole((2,)), whole(x.shape)],
                          out_specs=whole(x.shape), out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
                          interpret=interpret)(jnp.asarray([99, 7], jnp.uint32), x)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])
@pytest.mark.parametrize("block_k", [16, pytest.param(32, marks=gpu_only), 64,
                                     pytest.param(128, marks=gpu_only)])
def test_apply_zeroes_exactly_the_dropped_elements(dtype, p, block_k):
    # The compiled form tests the bytes of a word at once (two formulas, split at p = 0.5).
    from flash_attn_jax.kernels import use_interpret

    x = jax.random.normal(jax.random.key(1), (64, block_k), jnp.float32).astype(dtype)
    got = drop_tile_call(x, p, interpret=use_interpret())
    rows, cols = 32 + jnp.arange(64)[:, None], block_k + jnp.arange(block_k)[None, :]
    keep = semantics.dropout_keep((99, 7), 2, 5, rows, cols, semantics.dropout_threshold(p))
    expected = jnp.where(keep, x, jnp.zeros((), dtype))
    np.testing.assert_array_equal(np.asarray(got.view(jnp.uint16)),
                                  np.asarray(expected.view(jnp.uint16)))
