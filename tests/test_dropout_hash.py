"""The dropout keep mask's hash (flash_attn_jax.semantics), ahead of the dropout kernels.

Threefry-2x32 written with uint32 operations must equal jax.random's; the kernels' tile form of
the keep mask must equal the per-element form the reference uses; the statistics must match p.
"""

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np
import pytest

from flash_attn_jax import semantics


def test_threefry_equals_jax_random():
    rng = np.random.default_rng(0)
    key = rng.integers(0, 2**32, 2, dtype=np.uint32)
    x0, x1 = (rng.integers(0, 2**32, 1000, dtype=np.uint32) for _ in range(2))
    expected = jax.extend.random.threefry_2x32(jnp.asarray(key), jnp.asarray(np.concatenate([x0, x1])))
    got = semantics.threefry2x32(jnp.uint32(key[0]), jnp.uint32(key[1]), jnp.asarray(x0), jnp.asarray(x1))
    np.testing.assert_array_equal(np.concatenate([np.asarray(w) for w in got]), np.asarray(expected))


@pytest.mark.parametrize("col_lo,block_k", [(0, 64), (64, 128), (256, 256), (16, 16), (48, 16),
                                            (32, 32), (0, 32)])
def test_tile_form_equals_per_element_form(col_lo, block_k):
    row_key = semantics.dropout_row_key(1234, 5678, 3, 7)
    rows = jnp.arange(40, 72, dtype=jnp.int32)
    threshold = semantics.dropout_threshold(0.3)
    tile = semantics.dropout_keep_tile(row_key, rows, col_lo, block_k, threshold)
    cols = col_lo + jnp.arange(block_k, dtype=jnp.int32)
    np.testing.assert_array_equal(tile, semantics.dropout_keep(row_key, rows[:, None], cols[None, :],
                                                               threshold))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropped_fraction_matches_p(p):
    rows, cols = jnp.arange(128)[:, None], jnp.arange(128)[None, :]
    keep = jnp.stack([semantics.dropout_keep(semantics.dropout_row_key(42, 0, 0, head), rows, cols,
                                             semantics.dropout_threshold(p)) for head in range(4)])
    assert abs(1.0 - float(jnp.mean(keep)) - p) <= 0.01


def test_masks_differ_across_keys_heads_and_batch_rows():
    rows, cols = jnp.arange(64)[:, None], jnp.arange(64)[None, :]
    threshold = semantics.dropout_threshold(0.5)
    masks = [semantics.dropout_keep(semantics.dropout_row_key(*k, b, h), rows, cols, threshold)
             for k, b, h in [((1, 2), 0, 0), ((1, 3), 0, 0), ((1, 2), 1, 0), ((1, 2), 0, 1)]]
    for i in range(len(masks)):
        for j in range(i):
            assert 0.4 < float(jnp.mean(masks[i] != masks[j])) < 0.6


def test_threshold_resolution_is_16_bits():
    assert semantics.dropout_threshold(1 / 65536) == 1
    assert semantics.dropout_threshold(0.1) == 6554


def keep_tile_call(block_q, block_k, *, interpret, debug=False):
    """A Pallas kernel that writes dropout_keep_tile (as float32) for a (block_q, block_k) tile at
    rows [32, 32 + block_q) and columns [block_k, 2 * block_k), key words from an input."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def kernel(key_ref, out_ref):
        row_key = semantics.dropout_row_key(key_ref[0], key_ref[1], 2, 5)
        rows = 32 + jnp.arange(block_q, dtype=jnp.int32)
        keep = semantics.dropout_keep_tile(row_key, rows, block_k, block_k, 6554)
        plgpu.store(out_ref, keep.astype(jnp.float32))

    return pl.pallas_call(kernel, grid=(1,), in_specs=[pl.BlockSpec((2,), lambda i: (0,))],
                          out_specs=pl.BlockSpec((block_q, block_k), lambda i: (0, 0)),
                          out_shape=jax.ShapeDtypeStruct((block_q, block_k), jnp.float32),
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
                          interpret=interpret, debug=debug)


@pytest.mark.parametrize("block_k", [16, 128])
def test_tile_form_inside_a_kernel(block_k):
    key = jnp.asarray([99, 7], jnp.uint32)
    got = keep_tile_call(64, block_k, interpret=True)(key)
    rows, cols = 32 + jnp.arange(64)[:, None], block_k + jnp.arange(block_k)[None, :]
    expected = semantics.dropout_keep(semantics.dropout_row_key(99, 7, 2, 5), rows, cols, 6554)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected, np.float32))
