"""ring_flash_attn_func inside jax.shard_map against flash_attn_func on the global arrays.

Each case splits the sequence over a mesh axis (contiguous or zigzag), runs the ring forward and
backward (cotangents of out and softmax_lse) and checks out, lse and the gradients against the
reference under flash-attn's tolerance rule and against the unsharded kernels up to float32
merge rounding. Masks are at global positions; dropout hashes global rows and columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import flash_attn_jax as fa
from flash_attn_jax import ring
from flash_attn_jax.semantics import ScoreSpec, key_mask
from helpers import check_against_reference, cotangents, make_inputs, references

KEY = jax.random.key(11)


def make_mesh(size):
    """A ring of ``size`` devices, or of all there are (at least 2)."""
    size = min(size, len(jax.devices()))
    if size < 2:
        pytest.skip("needs 2 devices")
    return jax.make_mesh((size,), ("seq",), axis_types=(AxisType.Auto,))


def ring_call(mesh, layout, **options):
    """jit of (out, lse, grads) of the ring on global arrays: permuted into the layout, through
    shard_map, and back."""
    n = mesh.shape["seq"]
    to = (lambda x, axis=1: fa.to_ring_layout(x, n, axis)) if layout == "zigzag" else (
        lambda x, axis=1: x)
    back = (lambda x, axis=1: fa.from_ring_layout(x, n, axis)) if layout == "zigzag" else (
        lambda x, axis=1: x)
    rows, stats = P(None, "seq"), P(None, None, "seq")
    mapped = jax.shard_map(
        lambda q, k, v: fa.ring_flash_attn_func(q, k, v, axis_name="seq", layout=layout,
                                                return_softmax_lse=True, **options),
        mesh=mesh, in_specs=(rows,) * 3, out_specs=(rows, stats))

    @jax.jit
    def run(q, k, v, dout, dlse):
        def global_fn(q, k, v):
            out, lse = mapped(to(q), to(k), to(v))
            return back(out), back(lse, 2)
        (out, lse), vjp = jax.vjp(global_fn, q, k, v)
        return out, lse, vjp((dout, dlse))

    return run


CASES = {
    # name: (devices, layout, dtype, seqlen_q, seqlen_k, nheads_k, options)
    "contiguous-causal-alibi-gqa-dropout": (4, "contiguous", jnp.float32, 128, 128, 2,
                                            dict(causal=True, alibi=True, dropout_p=0.2)),
    "zigzag-causal-window-softcap": (4, "zigzag", jnp.bfloat16, 128, 128, 4,
                                     dict(causal=True, window_size=(40, -1), softcap=5.0)),
    "zigzag-cross-dropout-window": (2, "zigzag", jnp.float16, 64, 128, 1,
                                    dict(window_size=(30, 20), dropout_p=0.3)),
    "contiguous-two-sided-window-lse": (2, "contiguous", jnp.bfloat16, 96, 64, 2,
                                        dict(window_size=(20, 10), alibi=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ring_matches_the_global_call(name):
    devices, layout, dtype, seqlen_q, seqlen_k, nheads_k, options = CASES[name]
    mesh = make_mesh(devices)
    options = dict(options)
    alibi = options.pop("alibi", False)
    q, k, v, slopes = make_inputs(1, batch=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=4,
                                  nheads_k=nheads_k, head_dim=32, dtype=dtype, alibi=alibi)
    dout, dlse = cotangents(1, q, lse=True)
    kernel_options = dict(options, alibi_slopes=slopes)
    if options.get("dropout_p"):
        kernel_options["dropout_key"] = KEY
    out, lse, grads = ring_call(mesh, layout, **kernel_options)(q, k, v, dout, dlse)

    def global_fn(q, k, v):
        out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kernel_options)
        return out, lse
    (plain_out, plain_lse), vjp = jax.vjp(jax.jit(global_fn), q, k, v)
    plain_grads = vjp((dout, dlse))
    # The unsharded kernels, up to the rounding of the ring's merges (one rounding of the output
    # to the input dtype, float32 accumulation otherwise).
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(plain_out, np.float32),
                               atol=tolerance, rtol=0)
    finite = np.isfinite(np.asarray(plain_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.where(finite, lse, 0), np.where(finite, plain_lse, 0),
                               atol=1e-4, rtol=0)
    # The reference under flash-attn's rule.
    keep = None
    if options.get("dropout_p"):
        keep = fa.dropout_mask(KEY, options["dropout_p"], 2, 4, seqlen_q, seqlen_k)
    ref, pt = references(q, k, v, slopes, dout, dlse, keep_mask=keep, **options)
    check_against_reference(out, lse, None, ref, pt, grads)
    if dtype == jnp.float32:
        for grad, plain_grad in zip(grads, plain_grads):
            np.testing.assert_allclose(grad, plain_grad, atol=5e-5, rtol=0)


def test_layout_permutations():
    x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3)
    zig = fa.to_ring_layout(x, 3)
    chunks = np.split(np.asarray(x), 6, axis=1)
    np.testing.assert_array_equal(zig, np.concatenate([chunks[c] for c in (0, 5, 1, 4, 2, 3)], 1))
    np.testing.assert_array_equal(fa.from_ring_layout(zig, 3), x)
    np.testing.assert_array_equal(fa.from_ring_layout(fa.to_ring_layout(x, 2, axis=-2), 2, -2), x)
    with pytest.raises(ValueError, match="multiple of 2 \\* num_shards"):
        fa.to_ring_layout(x, 5)
    with pytest.raises(TypeError, match="num_shards"):
        fa.to_ring_layout(x, 2.0)


def test_visible_pairs_match_the_mask():
    # The ring skips a (query chunk, key chunk) pair exactly when the mask removes all of it.
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, right = (int(rng.choice([-1, rng.integers(0, 40)])) for _ in range(2))
        spec = ScoreSpec(softmax_scale=1.0, window_left=left, window_right=right)
        seqlen_q, seqlen_k = (int(rng.integers(1, 4)) * 16 for _ in range(2))
        q_pos, q_len = int(rng.integers(0, seqlen_q)), int(rng.integers(1, 17))
        k_pos, k_len = int(rng.integers(0, seqlen_k)), int(rng.integers(1, 17))
        q_len, k_len = min(q_len, seqlen_q - q_pos), min(k_len, seqlen_k - k_pos)
        rows = np.arange(q_pos, q_pos + q_len)[:, None]
        cols = np.arange(k_pos, k_pos + k_len)[None, :]
        any_kept = bool(np.any(key_mask(rows, cols, spec, offset=seqlen_k - seqlen_q,
                                        seqlen_k=seqlen_k)))
        visible = ring._visible(spec, q_pos, q_len, k_pos, k_len, seqlen_k - seqlen_q, seqlen_k)
        assert (True if visible is None else bool(visible)) == any_kept


def test_errors():
    mesh = make_mesh(2)
    x = jnp.zeros((1, 64, 2, 16), jnp.bfloat16)

    def run(layout="contiguous", length=64, **options):
        y = x[:, :length]
        fn = lambda q, k, v: fa.ring_flash_attn_func(q, k, v, axis_name="seq", layout=layout,
                                                     **options)
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(None, "seq"),) * 3,
                                     out_specs=P(None, "seq")))(y, y, y)

    with pytest.raises(ValueError, match="layout"):
        run(layout="ring")
    with pytest.raises(TypeError, match="layout"):
        run(layout=2)
    with pytest.raises(TypeError, match="axis_name"):
        fa.ring_flash_attn_func(x, x, x, axis_name=5)
    with pytest.raises(ValueError, match="even local sequence"):
        run(layout="zigzag", length=34)
    with pytest.raises(ValueError, match="multiple of 32"):
        run(length=32, dropout_p=0.1, dropout_key=KEY)
    with pytest.raises(ValueError, match="axis_name 'seq' is not a mesh axis"):
        fa.ring_flash_attn_func(x, x, x, axis_name="seq")
    with pytest.raises(ValueError, match="dropout_key"):
        run(dropout_p=0.1)
