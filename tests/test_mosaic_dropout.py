"""Dropout in the Mosaic GPU kernels: the keep mask built on wgmma register tiles
(kernels/mosaic_gpu/dropout.py) against the per-element definition, and attention with dropout
through the Mosaic forward against the reference run with the same mask.

On a Hopper GPU the mask comes from the register-level hash (inline Mosaic GPU code); on a CPU
the kernels run in JAX's GPU interpret mode, where the per-element form stands in for it, and
the lowering test builds the register-level code for an H100.
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import flash_attn_jax as fa
from conftest import ON_GPU
from flash_attn_jax import semantics
from flash_attn_jax.kernels import Placement, mosaic_gpu, tuning
from flash_attn_jax.kernels.mosaic_gpu import backward as mosaic_backward
from flash_attn_jax.kernels.mosaic_gpu import dropout as mosaic_dropout
from flash_attn_jax.kernels.mosaic_gpu import forward as mosaic_forward
from flash_attn_jax.semantics import ScoreSpec
from helpers import assert_within_tolerance, cotangents, make_inputs, references
from test_dropout import KEY, run_dropout_case, run_varlen_dropout_case
from test_mosaic_gpu import H100_MESH, _kernels

ON_HOPPER = ON_GPU and tuning.gpu_generation() == tuning.HOPPER
hopper_only = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU")
interpret_only = pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels themselves run")
WORDS = jax.random.key_data(KEY).astype(jnp.uint32)


def _store(tile, tile_smem, out_ref):
    """A one-warpgroup kernel's result tile to its output, through shared memory."""
    tile_smem[...] = tile
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(tile_smem, out_ref)
    plgpu.wait_smem_to_gmem(0)


def _keep_factor_tile(words, shape, *, batch, head, row0, col0, rows_are_queries, dropout_p,
                      kept):
    """keep_factor's tile from a one-warpgroup kernel."""
    spec = ScoreSpec.create(softmax_scale=1.0, dropout_p=dropout_p)

    def body(words_ref, out_ref, tile_smem):
        _store(mosaic_dropout.keep_factor(
            words_ref, shape, batch=batch, head=head, row0=row0, col0=col0, spec=spec,
            rows_are_queries=rows_are_queries, kept=kept), tile_smem, out_ref)

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(shape, jnp.float32),
                          scratch_types=[plgpu.SMEM(shape, jnp.float32)])
    return kernel(words)


def _on_hopper_or_interpreted(run):
    """``run()`` (a small kernel) as a numpy array: on a Hopper GPU, else in interpret mode."""
    if ON_HOPPER:
        return np.asarray(run())
    with plgpu.force_gpu_interpret_mode():
        return np.asarray(run())


def _positions(shape, row0, col0):
    """The (rows, 1) and (1, cols) positions of a tile at (row0, col0)."""
    return row0 + np.arange(shape[0])[:, None], col0 + np.arange(shape[1])[None, :]


MASK_CASES = [  # rows are queries?, shape, row0, col0 (the key offset a multiple of 64, or of
    (True, (64, 128), 0, 0),  # a narrower tile's width)
    (True, (64, 64), 72, 4032),
    (True, (128, 128), 5, 192),
    (True, (64, 32), 9, 96),
    (True, (64, 32), 0, 4032),
    (False, (64, 64), 0, 0),
    (False, (64, 128), 4096, 40),
    (False, (128, 64), 192, 7),
]


@pytest.mark.parametrize("rows_are_queries,shape,row0,col0", MASK_CASES)
def test_keep_factor_is_the_reference_mask(rows_are_queries, shape, row0, col0):
    words = jnp.concatenate([WORDS, jnp.asarray([3, 5], jnp.uint32)])  # batch and head offsets
    dropout_p, kept = 0.3, 1.25
    tile = _on_hopper_or_interpreted(lambda: _keep_factor_tile(
        words, shape, batch=2, head=7, row0=row0, col0=col0, rows_are_queries=rows_are_queries,
        dropout_p=dropout_p, kept=kept))
    rows, cols = _positions(shape, row0, col0)
    queries, keys = (rows, cols) if rows_are_queries else (cols, rows)
    keep = semantics.dropout_keep(WORDS, 2 + 3, 7 + 5, queries, keys,
                                  semantics.dropout_threshold(dropout_p))
    np.testing.assert_array_equal(tile, np.where(keep, kept, 0.0).astype(np.float32))
    assert 0.6 < np.mean(tile != 0) < 0.8  # not all kept: the mask is exercised


def _dropped_tile(tile, words, *, batch, head, row0, col0, dropout_p):
    """dropout.drop of a 16-bit tile from a one-warpgroup kernel."""
    spec = ScoreSpec.create(softmax_scale=1.0, dropout_p=dropout_p)

    def body(tile_ref, words_ref, out_ref, tile_smem, loaded):
        plgpu.copy_gmem_to_smem(tile_ref, tile_smem, loaded)
        plgpu.barrier_wait(loaded)
        _store(mosaic_dropout.drop(plgpu.load(tile_smem, layout=plgpu.Layout.WGMMA), words_ref,
                                   batch=batch, head=head, row0=row0, col0=col0, spec=spec),
               tile_smem, out_ref)

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(tile.shape, tile.dtype),
                          scratch_types=[plgpu.SMEM(tile.shape, tile.dtype), plgpu.Barrier()])
    return kernel(tile, words)


# The byte test's two formulas: up to the threshold 0x80 (0.5), and above it (0.7); 1e-6 rounds
# to the threshold 0 (all kept).
@pytest.mark.parametrize("dropout_p", [1e-6, 0.1, 0.5, 0.7])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape,row0,col0", [
    ((64, 128), 8, 192),
    # On a Hopper GPU only: interpret mode takes the per-element form, which the case above and
    # the mask tests check at these offsets.
    pytest.param((64, 64), 3, 64, marks=hopper_only),
    pytest.param((64, 32), 0, 32, marks=hopper_only)])
def test_drop_zeroes_the_dropped_elements(dropout_p, dtype, shape, row0, col0):
    tile = jnp.asarray(np.random.default_rng(1).uniform(-2, 2, shape), dtype)
    words = jnp.concatenate([WORDS, jnp.asarray([1, 0], jnp.uint32)])
    dropped = _on_hopper_or_interpreted(lambda: _dropped_tile(
        tile, words, batch=4, head=3, row0=row0, col0=col0, dropout_p=dropout_p))
    rows, cols = _positions(shape, row0, col0)
    keep = np.asarray(semantics.dropout_keep(WORDS, 5, 3, rows, cols,
                                             semantics.dropout_threshold(dropout_p)))
    np.testing.assert_array_equal(dropped, np.where(keep, np.asarray(tile), 0).astype(dtype))
    # The mask is exercised: the dropped fraction is p's (within 0.02, and within 4 standard
    # deviations and the threshold's rounding where that is tighter).
    spread = 4 * np.sqrt(dropout_p * (1 - dropout_p) / keep.size) + 1 / 512
    assert abs(np.mean(~keep) - dropout_p) < min(0.02, spread)


@pytest.mark.parametrize("rows_are_queries", [True, False])
def test_keep_factor_lowers_for_an_h100(rows_are_queries):
    """The register-level mask of both orientations builds for an H100 (on a CPU the test above
    checks the interpret-mode form only)."""
    words = jnp.concatenate([WORDS, jnp.zeros((2,), jnp.uint32)])
    tile = lambda words: _keep_factor_tile(words, (64, 128), batch=1, head=2, row0=64, col0=64,
                                           rows_are_queries=rows_are_queries, dropout_p=0.1,
                                           kept=1.0)
    with jax.sharding.use_abstract_mesh(H100_MESH):
        text = jax.jit(tile).trace(words).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", text) == ["mosaic_gpu_v2"]


def test_drop_lowers_for_an_h100():
    words = jnp.concatenate([WORDS, jnp.zeros((2,), jnp.uint32)])
    drop = lambda tile, words: _dropped_tile(tile, words, batch=1, head=2, row0=64, col0=32,
                                             dropout_p=0.1)
    tile = jnp.zeros((64, 128), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(H100_MESH):
        text = jax.jit(drop).trace(tile, words).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", text) == ["mosaic_gpu_v2"]


FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window_softcap": dict(window_size=(100, 30), softcap=20.0, q_scale=20.0),
    "causal_alibi": dict(causal=True, alibi=True),
}


INTERPRETED = [  # head dim, lengths, feature, deterministic
    (64, (256, 384), "causal_alibi", False),  # dQ added, one tile: the warpgroups take turns
    (128, (136, 264), "window_softcap", True),  # partial tiles, dQ in its own kernel
    (128, (200, 136), "causal", False),  # dQ added, a tile per warpgroup
    (256, (128, 128), "plain", True),  # dV and dK in two passes, on keys x queries tiles
]


@interpret_only
@pytest.mark.parametrize("head_dim,seqlens,feature,deterministic", INTERPRETED)
def test_interpreted_dropout(head_dim, seqlens, feature, deterministic):
    """The kernels' use of the mask (which products drop, the 1 / (1 - p) factors) in JAX's GPU
    interpret mode: forward and backward against the reference with the same mask."""
    options = dict(FEATURES[feature])
    alibi, q_scale = options.pop("alibi", False), options.pop("q_scale", 1.0)
    dropout_p = 0.17
    q, k, v, slopes = make_inputs(6, batch=1, seqlen_q=seqlens[0], seqlen_k=seqlens[1], nheads=2,
                                  nheads_k=1, head_dim=head_dim, dtype=jnp.bfloat16, alibi=alibi,
                                  q_scale=q_scale)
    dout, dlse = cotangents(6, q, out=True, lse=True)
    spec = ScoreSpec.create(softmax_scale=head_dim ** -0.5, has_alibi=alibi, dropout_p=dropout_p,
                            **options)
    words = mosaic_dropout.words(WORDS)
    with plgpu.force_gpu_interpret_mode():
        out, lse = mosaic_forward.forward(q, k, v, slopes, spec,
                                          mosaic_gpu.forward_config(head_dim),
                                          dropout_words=words)
        config = mosaic_gpu.backward_config(head_dim, *seqlens, dropout=True)
        # with dropout the dK/dV kernel adds dQ at any length (deterministic=False)
        assert config.fuses_dq(head_dim, seqlens[1], dropout=True) == (head_dim != 256)
        grads = mosaic_backward.backward(q, k, v, slopes, out, lse, dout, dlse, spec, config,
                                         deterministic=deterministic, dropout_words=words)
        out, lse, grads = jax.tree.map(np.asarray, (out, lse, grads))
    keep = fa.dropout_mask(KEY, dropout_p, 1, 2, *seqlens)
    ref, pt = references(q, k, v, slopes, dout, dlse, dropout_p=dropout_p, keep_mask=keep,
                         **options)
    assert_within_tolerance("out", out, ref[0], pt[0])
    assert_within_tolerance("lse", lse, ref[1], pt[1], atol=1e-4)
    for name, grad, r, p in zip(("dq", "dk", "dv"), grads, ref[3], pt[3]):
        assert_within_tolerance(name, grad, r, p, factor=3.0)


@pytest.mark.parametrize("head_dim", mosaic_gpu.HEAD_DIMS)
@pytest.mark.parametrize("deterministic", [True, False])
def test_dropout_lowers_for_an_h100(head_dim, deterministic):
    """Forward and backward with dropout lower to the Mosaic kernels (the register-level mask
    built in both orientations), at the head dims whose dropout backward runs there."""
    seqlen_k = 384
    q, k, v, slopes = make_inputs(1, batch=2, seqlen_q=256, seqlen_k=seqlen_k, nheads=4,
                                  nheads_k=2, head_dim=head_dim, dtype=jnp.bfloat16, alibi=True)

    def loss(q, k, v, slopes):
        out = fa.flash_attn_func(q, k, v, dropout_p=0.1, causal=True, alibi_slopes=slopes,
                                 deterministic=deterministic, dropout_key=KEY)
        return out.astype(jnp.float32).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    with fa.use_backend("mosaic-gpu"):
        used = fa.backends_used(grad, q, k, v, slopes)
        with jax.sharding.use_abstract_mesh(H100_MESH):
            text = jax.jit(grad).trace(q, k, v, slopes).lower(
                lowering_platforms=("cuda",)).as_text()
    assert used["forward"] == "mosaic-gpu"
    if head_dim in mosaic_gpu.DROPOUT_BACKWARD_HEAD_DIMS:
        assert used["backward"] == "mosaic-gpu"
        # dQ added by the dK/dV kernel unless deterministic (or at head dim 256: two passes).
        kernels = _kernels(mosaic_gpu.backward_config(head_dim, 256, seqlen_k, dropout=True),
                           head_dim, seqlen_k, deterministic=deterministic, dropout=True)
        assert kernels == (4 if head_dim == 256 else 3 if deterministic else 2)
    else:  # the backward on the next backend (its kernels are tested without this one)
        assert used["backward"] != "mosaic-gpu"
        kernels = 1
    assert re.findall(r"custom_call @(\w+)", text).count("mosaic_gpu_v2") == kernels


GPU_CASES = [  # head dim, lengths, feature, dtype
    (64, (256, 256), "causal", jnp.bfloat16),
    (64, (200, 328), "causal_alibi", jnp.float16),
    (128, (512, 384), "plain", jnp.float16),
    (128, (264, 136), "window_softcap", jnp.bfloat16),
    (256, (128, 192), "causal_alibi", jnp.bfloat16),
    (256, (136, 136), "window_softcap", jnp.float16),
    # from mosaic_gpu.LONG_QUERIES queries: the forward's three compute warpgroups
    (64, (4104, 200), "causal_alibi", jnp.bfloat16),
    (128, (4096, 136), "window_softcap", jnp.float16),
    # many key blocks adding to one query block's dQ (deterministic=False)
    (128, (264, 4104), "causal_alibi", jnp.bfloat16),
]


@hopper_only
@pytest.mark.parametrize("head_dim,seqlens,feature,dtype", GPU_CASES)
@pytest.mark.parametrize("deterministic", [True, False])
def test_dropout(head_dim, seqlens, feature, dtype, deterministic):
    """flash_attn_func with dropout through the Mosaic kernels (S_dmask from the next backend):
    out, lse, S_dmask's signs and the gradients against the reference with the same mask."""
    with fa.use_backend("mosaic-gpu"):
        run_dropout_case(7, dtype=dtype, seqlen_q=seqlens[0], seqlen_k=seqlens[1],
                         head_dim=head_dim, deterministic=deterministic, **FEATURES[feature])


@hopper_only
@pytest.mark.parametrize("head_dim", mosaic_gpu.HEAD_DIMS)
def test_varlen_with_dropout(head_dim):
    """flash_attn_varlen_func with dropout through the Mosaic kernels: each sequence hashes as
    its own batch row (test_dropout.test_varlen's checks, at the Mosaic head dims)."""
    seqlens, tail = [(37, 61), (0, 5), (130, 100), (1, 9), (200, 200)], (3, 0)
    with fa.use_backend("mosaic-gpu"):
        used = run_varlen_dropout_case(seqlens, tail, head_dim=head_dim, max_seqlen=200)
    assert used["forward"] == "mosaic-gpu"
    assert (used["backward"] == "mosaic-gpu") == (head_dim in mosaic_gpu.DROPOUT_BACKWARD_HEAD_DIMS)


def _vmap_of_dropout_against_a_loop(interpret):
    """Forward and backward with dropout under jax.vmap, the key shared (each element draws the
    unbatched call's mask) or split (each its own), against one call per element: the vmapped
    axis must not reach the mask's batch rows."""
    head_dim, seqlen = 64, 128  # one program a kernel; two query blocks (both turns of dQ)
    inputs = [make_inputs(90 + i, batch=1, seqlen_q=seqlen, seqlen_k=seqlen, nheads=2,
                          nheads_k=1, head_dim=head_dim, dtype=jnp.bfloat16)[:3]
              for i in range(2)]
    q, k, v = (jnp.stack(x) for x in zip(*inputs))
    spec = ScoreSpec.create(softmax_scale=head_dim ** -0.5, causal=True, dropout_p=0.3)
    forward_config = mosaic_gpu.forward_config(head_dim)
    backward_config = mosaic_gpu.backward_config(head_dim, seqlen, seqlen, dropout=True)

    def attend_and_grads(q, k, v, key_words):
        words = mosaic_dropout.words(key_words)
        out, lse = mosaic_forward.forward(q, k, v, None, spec, forward_config,
                                          dropout_words=words)
        grads = mosaic_backward.backward(q, k, v, None, out, lse, out, jnp.zeros_like(lse), spec,
                                         backward_config, deterministic=False,
                                         dropout_words=words)
        return out, grads

    split = jax.random.key_data(jax.random.split(KEY, 2)).astype(jnp.uint32)
    context = plgpu.force_gpu_interpret_mode() if interpret else contextlib.nullcontext()
    with context:
        for key_axis, keys in ((None, WORDS), (0, split)):
            batched = jax.tree.map(np.asarray, jax.jit(jax.vmap(
                attend_and_grads, in_axes=(0, 0, 0, key_axis)))(q, k, v, keys))
            for i in range(2):
                single = jax.tree.map(np.asarray, jax.jit(attend_and_grads)(
                    q[i], k[i], v[i], keys if key_axis is None else keys[i]))
                np.testing.assert_array_equal(batched[0][i], single[0], err_msg="out")
                for name, a, b in zip(("dq", "dk", "dv"), batched[1], single[1]):
                    np.testing.assert_allclose(a[i].astype(np.float32), b.astype(np.float32),
                                               rtol=2.0 ** -7, atol=1e-6, err_msg=name)
            if key_axis == 0:  # split keys draw different masks
                assert np.mean(batched[0][0] != batched[0][1]) > 0.5


@interpret_only
def test_interpreted_vmap_of_dropout():
    _vmap_of_dropout_against_a_loop(interpret=True)


@hopper_only
def test_vmap_of_dropout():
    _vmap_of_dropout_against_a_loop(interpret=False)


def test_a_shard_hashes_its_global_rows_and_heads():
    """A call on a shard of the batch rows and heads (``Placement``'s offsets in the dropout
    words, as the mesh partitioning passes them) draws the whole call's mask for its part: its
    output equals that part of the whole call's, bit for bit."""
    q, k, v, _ = make_inputs(8, batch=2, seqlen_q=128, seqlen_k=192, nheads=4, nheads_k=2,
                             head_dim=64, dtype=jnp.bfloat16)
    spec = ScoreSpec.create(softmax_scale=0.125, causal=True, dropout_p=0.3)
    config = mosaic_gpu.forward_config(64)
    shard = (slice(1, 2), slice(None), slice(2, 4))  # batch row 1, query heads 2-3 (kv head 1)
    kv_shard = (slice(1, 2), slice(None), slice(1, 2))

    def outputs():
        whole = mosaic_forward.forward(q, k, v, None, spec, config,
                                       dropout_words=mosaic_dropout.words(WORDS))
        part = mosaic_forward.forward(
            q[shard], k[kv_shard], v[kv_shard], None, spec, config,
            dropout_words=mosaic_dropout.words(WORDS, Placement(batch=1, head=2)))
        return whole, part

    context = contextlib.nullcontext() if ON_HOPPER else plgpu.force_gpu_interpret_mode()
    with context:
        (whole_out, whole_lse), (part_out, part_lse) = jax.tree.map(np.asarray, outputs())
    np.testing.assert_array_equal(part_out, whole_out[shard])
    np.testing.assert_array_equal(part_lse, whole_lse[1:2, 2:4])
