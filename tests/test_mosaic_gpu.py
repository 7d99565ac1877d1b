"""The Mosaic GPU backend: which calls it takes, its kernels lowered for an H100 on any machine,
and on a Hopper GPU its results against the reference (flash-attn's tolerance rule) and bitwise
determinism. Elsewhere the GPU cases are skipped; the lowering runs everywhere, and without a GPU
JAX's GPU interpret mode runs the kernels for a set of reference cases."""

import contextlib
import dataclasses
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import flash_attn_jax as fa
from conftest import ON_GPU
from flash_attn_jax.kernels import Varlen, mosaic_gpu, registry, tuning
from flash_attn_jax.kernels.mosaic_gpu import backward as mosaic_backward
from flash_attn_jax.kernels.mosaic_gpu import forward as mosaic_forward
from flash_attn_jax.kernels.mosaic_gpu import varlen as mosaic_varlen
from flash_attn_jax.kernels.registry import Request
from flash_attn_jax.semantics import ScoreSpec
from helpers import (assert_within_tolerance, cotangents, make_inputs, references, rotating_grid,
                     run_case)
from test_varlen import make_varlen, run_varlen_case, sequence_references

ON_HOPPER = ON_GPU and tuning.gpu_generation() == tuning.HOPPER
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=1, platform="cuda")
H100_MESH = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                     abstract_device=H100)
BF16, F16 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


def _request(**changes):
    base = dict(op="forward", platform=None, dtype=BF16, head_dim=128,
                spec=ScoreSpec(softmax_scale=0.1), q_shape=(2, 256, 4, 128),
                k_shape=(2, 384, 2, 128))
    return Request(**{**base, **changes})


@pytest.mark.parametrize("changes,reason", [
    (dict(), None),
    (dict(dtype=F16, head_dim=64, q_shape=(1, 128, 2, 64), k_shape=(1, 128, 2, 64)), None),
    (dict(head_dim=256, q_shape=(1, 128, 2, 256), k_shape=(1, 64, 1, 256)), None),
    (dict(spec=ScoreSpec(softmax_scale=0.1, softcap=5.0, has_alibi=True, window_left=3,
                         window_right=0)), None),
    (dict(op="backward"), None),
    (dict(op="backward", head_dim=256, q_shape=(1, 128, 2, 256), k_shape=(1, 128, 1, 256)), None),
    (dict(op="backward", head_dim=256, q_shape=(1, 128, 2, 256), k_shape=(1, 64, 1, 256)), None),
    (dict(op="backward", q_shape=(2, 104, 4, 128), k_shape=(2, 200, 2, 128)), None),
    (dict(op="backward", q_shape=(2, 100, 4, 128), k_shape=(2, 200, 2, 128)), "multiple of 8"),
    (dict(op="backward", q_shape=(2, 256, 4, 128), k_shape=(2, 0, 2, 128)), "one key"),
    (dict(op="backward", out_dtype=jnp.dtype(jnp.float32)), "output in the inputs' dtype"),
    (dict(op="probabilities"), "no probabilities kernel yet"),
    (dict(op="kvcache_attention"), "no kvcache_attention kernel yet"),
    (dict(dtype=jnp.dtype(jnp.float32)), "float16 and bfloat16 only"),
    (dict(head_dim=96), "head dims"),
    (dict(varlen=True, q_shape=(300, 4, 128), k_shape=(301, 2, 128)), None),
    (dict(op="backward", varlen=True, q_shape=(300, 4, 128), k_shape=(301, 2, 128)), None),
    (dict(varlen=True, paged=True, q_shape=(300, 4, 128), k_shape=(8, 16, 2, 128)),
     "contiguous keys only"),
    (dict(spec=ScoreSpec(softmax_scale=0.1, dropout_p=0.1)), None),  # the forward
    (dict(op="backward", spec=ScoreSpec(softmax_scale=0.1, dropout_p=0.1)), None),
    (dict(op="backward", spec=ScoreSpec(softmax_scale=0.1, dropout_p=0.1), head_dim=64,
          q_shape=(2, 256, 4, 64), k_shape=(2, 384, 2, 64)), None),
    (dict(placed=True, positions=True), "no sequence shards"),
    (dict(out_dtype=jnp.dtype(jnp.float32)), "output in the inputs' dtype"),
    (dict(q_shape=(2, 200, 4, 128)), None),
    (dict(k_shape=(2, 104, 2, 128)), None),
    (dict(k_shape=(2, 100, 2, 128)), "multiple of 8"),
    (dict(q_shape=(2, 0, 4, 128)), "one query"),
    (dict(platform="cpu"), "GPUs only"),
])
def test_what_it_takes(changes, reason):
    got = mosaic_gpu.MosaicGPU().supports(_request(**changes))
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def _grad_fn(**options):
    def attend(q, k, v):
        return fa.flash_attn_func(q, k, v, **options).astype(jnp.float32).sum()

    return lambda q, k, v: jax.grad(attend, argnums=(0, 1, 2))(q, k, v)


def test_automatic_on_hopper_and_the_rest_handed_on():
    """In the automatic choice on a Hopper GPU only; chosen or not, what it declines (here
    float32 inputs) goes to the next backend."""
    q, k, v = make_inputs(0, batch=1, seqlen_q=200, seqlen_k=320, nheads=4, nheads_k=2,
                          head_dim=256, dtype=jnp.bfloat16)[:3]  # lengths in 8s, not in tiles
    wide = [x.astype(jnp.float32) for x in (q, k, v)]
    with fa.use_backend(None):  # the automatic choice, whatever the suite runs with
        automatic = fa.backends_used(_grad_fn(causal=True), q, k, v)
        wide_automatic = fa.backends_used(_grad_fn(causal=True), *wide)
    assert "mosaic-gpu" not in wide_automatic.values()
    if ON_HOPPER:
        assert automatic == {"forward": "mosaic-gpu", "backward": "mosaic-gpu"}
    else:
        assert "mosaic-gpu" not in automatic.values()
    with fa.use_backend("mosaic-gpu"):
        assert fa.backends_used(_grad_fn(causal=True), q, k, v) == {
            "forward": "mosaic-gpu", "backward": "mosaic-gpu"}
        assert fa.backends_used(_grad_fn(causal=True), *wide) == wide_automatic


# Features that change the kernel's code, lowered at each dtype and head dim.
FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(100, 30)),
    "softcap": dict(softcap=5.0),
    "alibi": dict(alibi=True),
    "all": dict(causal=True, window_size=(70, 0), softcap=5.0, alibi=True),
}


LOWERED_DTYPES = (jnp.float16, jnp.bfloat16)


@pytest.mark.parametrize("head_dim", mosaic_gpu.HEAD_DIMS)
@pytest.mark.parametrize("dtype", LOWERED_DTYPES)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_kernels_lower_for_an_h100(feature, dtype, head_dim):
    # The full product lowers in the GPU run; on a CPU (CI's time) half of it, which still gives
    # every feature and every head dim both dtypes and both backwards: the dtype alternates with
    # the feature and the head dim.
    position = (list(FEATURES).index(feature) + mosaic_gpu.HEAD_DIMS.index(head_dim)
                + LOWERED_DTYPES.index(dtype))
    if not ON_GPU and position % 2:
        pytest.skip("lowered in the GPU run (the CPU lowers the alternating half)")
    forward = mosaic_gpu.forward_config(head_dim)
    deterministic = dtype == jnp.float16  # the two backwards, each at every feature and head dim
    for backward in mosaic_gpu.backward_configs(head_dim):
        # An odd number of each config's programs, so that each backward config gets chosen.
        rows = max(forward.rows_per_program, backward.rows_per_program)
        keys = max(forward.block_k, backward.keys_per_program)
        # Enough keys for the dK/dV kernel to add dQ (where it can).
        key_programs = max(5, -(-backward.fuse_dq_from // keys))
        seqlen_k = keys * (key_programs + 1 - key_programs % 2)
        assert mosaic_gpu.backward_config(head_dim, 3 * rows, seqlen_k) == backward
        _lower_for_an_h100(feature, dtype, head_dim, 3 * rows, seqlen_k,
                           _kernels(backward, head_dim, seqlen_k, deterministic), deterministic)


def _kernels(backward, head_dim, seqlen_k, deterministic, dropout=False):
    """Kernels of a forward + backward: the forward, the dK/dV pass(es), dQ (unless the dK/dV
    kernel adds it)."""
    if not deterministic and backward.fuses_dq(head_dim, seqlen_k, dropout=dropout):
        return 2
    return 1 + len(backward.dkdv_parts) + 1


def _lower_for_an_h100(feature, dtype, head_dim, seqlen_q, seqlen_k, kernels,
                       deterministic=False):
    options = dict(FEATURES[feature], deterministic=deterministic)
    alibi = options.pop("alibi", False)
    q, k, v, slopes = make_inputs(1, batch=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=4,
                                  nheads_k=2, head_dim=head_dim, dtype=dtype, alibi=alibi)

    def attend(q, k, v, slopes):
        return fa.flash_attn_func(q, k, v, alibi_slopes=slopes, **options)

    loss = lambda q, k, v, slopes: attend(q, k, v, slopes).astype(jnp.float32).sum()
    fn = jax.grad(loss, argnums=(0, 1, 2))
    with fa.use_backend("mosaic-gpu"):
        assert fa.backends_used(fn, q, k, v, slopes) == {"forward": "mosaic-gpu",
                                                         "backward": "mosaic-gpu"}
        with jax.sharding.use_abstract_mesh(H100_MESH):
            hlo = jax.jit(fn).trace(q, k, v, slopes).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", hlo) == ["mosaic_gpu_v2"] * kernels


@pytest.mark.parametrize("head_dim", mosaic_gpu.HEAD_DIMS)
def test_partial_tiles_lower(head_dim):
    backward = mosaic_gpu.backward_config(head_dim, 104, 336)
    for deterministic in (False, True):
        _lower_for_an_h100("all", jnp.bfloat16, head_dim, 104, 336,
                           _kernels(backward, head_dim, 336, deterministic), deterministic)


def test_backward_adding_dq_lowers_sharded():
    """Batch and heads split over a mesh of eight H100s (Explicit axes: the library's shard_map):
    the forward and the dK/dV kernel adding dQ (its aliased float32 sum inside the shard_map),
    no collective."""
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"),
                                     (jax.sharding.AxisType.Explicit,) * 2, abstract_device=H100)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "model"))
    q, kv = (jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=rows)
             for shape in ((4, 512, 8, 64), (4, 512, 4, 64)))
    assert mosaic_gpu.backward_config(64, 512, 512).fuses_dq(64, 512)
    fn = jax.grad(lambda q, k, v: jnp.sum(fa.flash_attn_func(q, k, v, causal=True).astype(
        jnp.float32)), argnums=(0, 1, 2))
    with fa.use_backend("mosaic-gpu"), jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", text) == ["mosaic_gpu_v2"] * 2
    assert not re.search(r"stablehlo\.(all_gather|all_reduce|all_to_all|reduce_scatter|"
                         r"collective_permute)", text)


def test_kernels_lower_under_x64():
    q, k, v = make_inputs(2, batch=1, seqlen_q=256, seqlen_k=256, nheads=2, head_dim=64,
                          dtype=jnp.bfloat16)[:3]
    with jax.enable_x64(True), fa.use_backend("mosaic-gpu"):
        with jax.sharding.use_abstract_mesh(H100_MESH):
            hlo = jax.jit(_grad_fn(causal=True)).trace(q, k, v).lower(
                lowering_platforms=("cuda",)).as_text()
    assert hlo.count("custom_call @mosaic_gpu_v2") == 2  # forward, dK/dV adding dQ


hopper_only = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU")

# (seqlen_q, seqlen_k): whole tiles, cross attention both ways, Sq > Sk where causal leaves the
# first rows without keys, and lengths that end inside a tile.
SEQLENS = [(128, 128), (256, 512), (512, 256), (384, 1024), (104, 336), (264, 136)]


@hopper_only
@pytest.mark.parametrize("head_dim", mosaic_gpu.HEAD_DIMS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("seqlens", SEQLENS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_against_the_reference(feature, dtype, head_dim, seqlens, monkeypatch):
    index = list(FEATURES).index(feature) + SEQLENS.index(seqlens)
    if dtype == jnp.bfloat16:  # dQ added by the dK/dV kernel at these lengths too
        _add_dq_at_any_length(monkeypatch)
    with fa.use_backend("mosaic-gpu"):
        # float16 with the deterministic backward, bfloat16 with dQ added by the dK/dV kernel
        # (where its blocks allow).
        run_case(index, seqlen_q=seqlens[0], seqlen_k=seqlens[1], head_dim=head_dim,
                 dtype=dtype, nheads=4, nheads_k=(4, 2, 1)[index % 3],
                 q_scale=5.0 if "softcap" in FEATURES[feature] else 1.0,
                 deterministic=dtype == jnp.float16, **FEATURES[feature])


def _add_dq_at_any_length(monkeypatch):
    """The backend's backward configs with ``fuse_dq_from`` 0, so that short test lengths take
    the dK/dV kernel that adds dQ (the tables keep it for long ones)."""
    chosen = mosaic_gpu.backward_configs
    monkeypatch.setattr(mosaic_gpu, "backward_configs", lambda head_dim, **options: tuple(
        dataclasses.replace(config, fuse_dq_from=0) for config in chosen(head_dim, **options)))


# Forward schedules besides the tables' (ForwardConfig's flags): each lowered, and on Hopper
# checked against the reference, so that the sweep can pick any of them.
SCHEDULES = {
    "key-wait-at-the-top": dict(pingpong=True, key_wait_under_pv=False, pin_softmax=False),
    "no-pingpong": dict(pingpong=False, key_wait_under_pv=False, pin_softmax=False),
    "pinned-softmax": dict(pingpong=True, key_wait_under_pv=False, pin_softmax=True),
    "all-changed": dict(pingpong=False, key_wait_under_pv=True, pin_softmax=True),
    "hardware-turns": dict(pingpong=True, key_wait_under_pv=True, hardware_turns=True),
    "three-warpgroups": dict(pingpong=False, key_wait_under_pv=True, compute_warpgroups=3),
}


# Each schedule with each feature and head dim; on Hopper at both lengths, elsewhere (where the
# kernels only lower) at one, alternating.
@pytest.mark.parametrize("seqlens,schedule,feature,head_dim", rotating_grid(
    [(512, 256), (384, 1024)], list(SCHEDULES), ["causal", "all"], (64, 128), full=ON_HOPPER,
    ids=["512x256", "384x1024"]))
def test_forward_schedules(schedule, feature, seqlens, head_dim):
    config = dataclasses.replace(mosaic_gpu.forward_config(head_dim), **SCHEDULES[schedule])
    options = dict(FEATURES[feature])
    alibi = options.pop("alibi", False)
    q, k, v, slopes = make_inputs(4, batch=2, seqlen_q=seqlens[0], seqlen_k=seqlens[1], nheads=4,
                                  nheads_k=2, head_dim=head_dim, dtype=jnp.bfloat16, alibi=alibi)
    spec = ScoreSpec.create(softmax_scale=head_dim ** -0.5, has_alibi=alibi, **options)
    attend = jax.jit(lambda q, k, v, slopes: mosaic_forward.forward(q, k, v, slopes, spec, config))
    if not ON_HOPPER:
        with jax.sharding.use_abstract_mesh(H100_MESH):
            hlo = attend.trace(q, k, v, slopes).lower(lowering_platforms=("cuda",)).as_text()
        assert hlo.count("custom_call @mosaic_gpu_v2") == 1
        return
    out, lse = attend(q, k, v, slopes)
    ref, pt = references(q, k, v, slopes, **options)
    assert_within_tolerance("out", out, ref[0], pt[0])
    assert_within_tolerance("lse", lse, ref[1], pt[1], atol=1e-4)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels themselves run (above)")
@pytest.mark.parametrize("schedule", ["hardware-turns", "three-warpgroups"])
@pytest.mark.parametrize("seqlens", [(376, 1000), (512, 128)], ids=["ragged", "tiles-without-keys"])
def test_interpreted_schedules(schedule, seqlens):
    """The forward's schedules that change its synchronisation, against the reference in
    interpret mode. ``hardware-turns``: the hand-over of the ping-pong turns (on shared-memory
    stand-ins counting the same arrivals): a turn awaited and never handed over hangs, one
    handed over and never awaited fails the interpreter's check. ``three-warpgroups``: programs
    of 3 x 64 rows, each slot freed after three arrivals. Lengths that end inside the last query
    tile and key block; under bottom-right causal with more queries than keys the first tiles
    walk no key block at all, where only the start and the end hand a turn over."""
    config = dataclasses.replace(mosaic_gpu.forward_config(64), **SCHEDULES[schedule])
    q, k, v, slopes = make_inputs(6, batch=1, seqlen_q=seqlens[0], seqlen_k=seqlens[1], nheads=2,
                                  nheads_k=1, head_dim=64, dtype=jnp.bfloat16)
    spec = ScoreSpec.create(softmax_scale=0.125, causal=True)
    with plgpu.force_gpu_interpret_mode():
        out, lse = jax.tree.map(np.asarray, mosaic_forward.forward(q, k, v, slopes, spec, config))
    ref, pt = references(q, k, v, slopes, causal=True)
    assert_within_tolerance("out", out, ref[0], pt[0])
    assert_within_tolerance("lse", lse, ref[1], pt[1], atol=1e-4)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels themselves run (test_varlen_*)")
def test_interpreted_three_warpgroups_varlen():
    """Three compute warpgroups through the packed layout: sequences placed at 192-row program
    offsets, a sequence of no queries, one of 300 queries over two programs (the second
    partial), keys ending inside key blocks; causal with ALiBi, against each sequence's
    reference."""
    seqlens = [(70, 300), (0, 30), (300, 20), (129, 257)]
    q, k, v, cu_q, cu_k, slopes, dout = make_varlen(8, seqlens, (5, 3), nheads=2, nheads_k=1,
                                                    head_dim=64, dtype=jnp.bfloat16, alibi=True)
    config = dataclasses.replace(mosaic_gpu.forward_config(64), **SCHEDULES["three-warpgroups"])
    spec = ScoreSpec.create(softmax_scale=0.125, causal=True, has_alibi=True)
    layout = Varlen(jnp.asarray(cu_q), jnp.asarray(cu_k), None, 300, 300)
    with plgpu.force_gpu_interpret_mode():
        out, lse = jax.tree.map(np.asarray, mosaic_varlen.forward(q, k, v, slopes, spec, layout,
                                                                  config))
    ref, pt = sequence_references(q, k, v, cu_q, cu_k, slopes, dout, 300, 300, causal=True)
    assert_within_tolerance("out", out, ref[0], pt[0])
    assert_within_tolerance("lse", lse, ref[1], pt[1], atol=1e-4)


@pytest.mark.parametrize("head_dim", mosaic_gpu.HEAD_DIMS)
def test_forward_blocks_follow_the_query_length(head_dim):
    """From ``LONG_QUERIES`` queries a dense forward takes three compute warpgroups at head dims
    64 and 128 (two at 256), and flash_attn_func lowers with them for an H100; shorter queries
    and varlen calls (length 0) take two."""
    long = mosaic_gpu.forward_config(head_dim, mosaic_gpu.LONG_QUERIES)
    assert long.compute_warpgroups == (2 if head_dim == 256 else 3)
    for seqlen_q in (0, 8, mosaic_gpu.LONG_QUERIES - 8):
        assert mosaic_gpu.forward_config(head_dim, seqlen_q).compute_warpgroups == 2
    q, k, v = make_inputs(1, batch=1, seqlen_q=mosaic_gpu.LONG_QUERIES + 8, seqlen_k=256,
                          nheads=2, nheads_k=1, head_dim=head_dim, dtype=jnp.bfloat16)[:3]
    configs, forward = [], mosaic_forward.forward

    def recording(q, k, v, slopes, spec, config, *args, **kwargs):
        configs.append(config)
        return forward(q, k, v, slopes, spec, config, *args, **kwargs)

    with (mock.patch.object(mosaic_forward, "forward", recording), fa.use_backend("mosaic-gpu"),
          registry.fresh_traces(), jax.sharding.use_abstract_mesh(H100_MESH)):
        hlo = jax.jit(fa.flash_attn_func).trace(q, k, v).lower(
            lowering_platforms=("cuda",)).as_text()
    assert configs == [long]
    assert hlo.count("custom_call @mosaic_gpu_v2") == 1


@pytest.mark.parametrize("changes,message", [
    (dict(compute_warpgroups=4, pingpong=False), "compute_warpgroups must be 2 or 3"),
    (dict(compute_warpgroups=3), "needs pingpong=False"),
])
def test_forward_config_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(mosaic_gpu.forward_config(64), **changes)


# JAX's GPU interpret mode runs the kernels on a CPU (TMA, wgmma and barriers simulated, layouts
# not): their semantics against the reference in CI, forward and backward, at each head dim's
# backward blocks, lengths that end inside tiles, and every feature.
INTERPRETED = [
    (64, (256, 256), "causal", True),  # the (128, 64, 2) backward
    (64, (256, 256), "causal", False),  # the same adding dQ by row halves
    (64, (104, 336), "all", False),  # 64-query blocks adding dQ's one tile in turns
    (128, (264, 136), "window", True),
    (128, (264, 136), "all", False),  # adding dQ by column halves
    (256, (128, 128), "causal", True),  # dV and dK in two passes
    (256, (104, 336), "all", True),
]


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels themselves run (above)")
@pytest.mark.parametrize("head_dim,seqlens,feature,deterministic", INTERPRETED,
                         ids=[f"d{d}-{q}x{k}-{f}" + ("" if det else "-dq-added")
                              for d, (q, k), f, det in INTERPRETED])
def test_interpreted_against_the_reference(head_dim, seqlens, feature, deterministic):
    options = dict(FEATURES[feature])
    alibi = options.pop("alibi", False)
    seqlen_q, seqlen_k = seqlens
    q, k, v, slopes = make_inputs(5, batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=2,
                                  nheads_k=1, head_dim=head_dim, dtype=jnp.bfloat16, alibi=alibi,
                                  q_scale=5.0 if "softcap" in options else 1.0)
    dout, dlse = cotangents(5, q, out=True, lse=True)
    spec = ScoreSpec.create(softmax_scale=head_dim ** -0.5, has_alibi=alibi, **options)
    with plgpu.force_gpu_interpret_mode():
        out, lse = mosaic_forward.forward(q, k, v, slopes, spec,
                                          mosaic_gpu.forward_config(head_dim))
        config = mosaic_gpu.backward_config(head_dim, seqlen_q, seqlen_k)
        if not deterministic:  # dQ added by the dK/dV kernel at these short lengths too
            config = dataclasses.replace(config, fuse_dq_from=0)
            assert config.fuses_dq(head_dim, seqlen_k)
        grads = mosaic_backward.backward(q, k, v, slopes, out, lse, dout, dlse, spec, config,
                                         deterministic=deterministic)
        out, lse, grads = jax.tree.map(np.asarray, (out, lse, grads))
    ref, pt = references(q, k, v, slopes, dout, dlse, **options)
    assert_within_tolerance("out", out, ref[0], pt[0])
    assert_within_tolerance("lse", lse, ref[1], pt[1], atol=1e-4)
    for name, grad, r, p in zip(("dq", "dk", "dv"), grads, ref[3], pt[3]):
        assert_within_tolerance(name, grad, r, p, factor=3.0)


# Query lengths from LONG_QUERIES (three compute warpgroups at head dims 64 and 128), the last
# program partial or whole.
LONG_CASES = [  # head dim, lengths, feature
    (64, (mosaic_gpu.LONG_QUERIES + 8, 200), "all"),
    (128, (mosaic_gpu.LONG_QUERIES, 392), "window"),
    (64, (mosaic_gpu.LONG_QUERIES, mosaic_gpu.LONG_QUERIES), "causal"),
    (128, (mosaic_gpu.LONG_QUERIES + 64, 136), "softcap"),
]


@hopper_only
@pytest.mark.parametrize("head_dim,seqlens,feature", LONG_CASES)
def test_long_queries_against_the_reference(head_dim, seqlens, feature):
    """flash_attn_func's out, lse and gradients (of out and lse) at the table's long-query
    blocks, against the reference."""
    options = dict(FEATURES[feature])
    alibi = options.pop("alibi", False)
    assert mosaic_gpu.forward_config(head_dim, seqlens[0]).compute_warpgroups == 3
    with fa.use_backend("mosaic-gpu"):
        run_case(9, seqlen_q=seqlens[0], seqlen_k=seqlens[1], head_dim=head_dim,
                 dtype=jnp.bfloat16, batch=1, nheads=4, nheads_k=2, alibi=alibi, d_lse=True,
                 q_scale=5.0 if "softcap" in options else 1.0, **options)


@hopper_only
def test_deterministic_and_the_backend_ran():
    q, k, v = make_inputs(3, batch=2, seqlen_q=512, seqlen_k=512, nheads=8, nheads_k=2,
                          head_dim=128, dtype=jnp.bfloat16)[:3]
    with fa.use_backend("mosaic-gpu"):
        assert fa.backends_used(fa.flash_attn_func, q, k, v) == {"forward": "mosaic-gpu"}
        attend = jax.jit(lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True,
                                                            return_attn_probs=True)[:2])
        first, second = attend(q, k, v), attend(q, k, v)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _vmapped_grads_and_loop(interpret):
    """Gradients of a batch of two attention calls under jax.vmap, and one call at a time,
    through the backward that adds dQ in the dK/dV kernel (whose batching rule folds the
    vmapped axis into the batch)."""
    inputs = [make_inputs(80 + i, batch=1, seqlen_q=128, seqlen_k=192, nheads=2, nheads_k=1,
                          head_dim=128, dtype=jnp.bfloat16)[:3] for i in range(2)]
    q, k, v = (jnp.stack(x) for x in zip(*inputs))
    spec = ScoreSpec.create(softmax_scale=128 ** -0.5, causal=True)
    config = dataclasses.replace(mosaic_gpu.backward_config(128, 128, 192), fuse_dq_from=0)
    assert config.fuses_dq(128, 192)

    def grads(q, k, v):
        out, lse = mosaic_forward.forward(q, k, v, None, spec, mosaic_gpu.forward_config(128))
        return mosaic_backward.backward(q, k, v, None, out, lse, q, jnp.zeros_like(lse), spec,
                                        config, deterministic=False)

    _assert_vmap_equals_loop(grads, (q, k, v), interpret)


def _assert_vmap_equals_loop(grads, args, interpret):
    """``grads`` (-> dq, dk, dv) under jax.vmap over the leading axis of ``args`` against one
    call per element; dQ to rounding (float32 sums in any order, rounded to bfloat16: one unit
    in the last place)."""
    context = plgpu.force_gpu_interpret_mode() if interpret else contextlib.nullcontext()
    with context:
        batched = jax.tree.map(np.asarray, jax.jit(jax.vmap(grads))(*args))
        singles = [jax.tree.map(np.asarray, jax.jit(grads)(*(x[i] for x in args)))
                   for i in range(len(args[0]))]
    for i, single in enumerate(singles):
        for name, a, b in zip(("dq", "dk", "dv"), batched, single):
            np.testing.assert_allclose(a[i].astype(np.float32), b.astype(np.float32),
                                       rtol=2.0 ** -7, atol=1e-6, err_msg=name)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels themselves run (below)")
def test_interpreted_vmap_of_the_backward_adding_dq():
    _vmapped_grads_and_loop(interpret=True)


@hopper_only
def test_vmap_of_the_backward_adding_dq():
    _vmapped_grads_and_loop(interpret=False)


# Varlen: the sequences packed at tile-aligned offsets (mosaic_gpu.varlen), the dense kernels
# reading each program's sequence from a tile table. (seqlen_q, seqlen_k) of each sequence and
# the padding tokens after the last: empty sequences both ways, sequences longer than a tile,
# one shorter than max_seqlen and lengths off every tile.
VARLEN_LENGTHS = {
    "short": ([(5, 7), (0, 3), (17, 0), (33, 40)], (3, 2)),
    "long": ([(70, 300), (0, 30), (300, 20), (129, 257), (8, 8)], (5, 3)),
}


def test_packing_places_each_sequence_at_aligned_rows():
    cu = jnp.asarray([0, 5, 5, 140, 141, 300], jnp.int32)
    packing = mosaic_varlen.Packing(cu, max_seqlen=150, total=310, align=64)
    lengths = np.asarray([5, 0, 135, 1, 150])  # the last one clipped to max_seqlen
    np.testing.assert_array_equal(np.asarray(packing.lengths), lengths)
    starts = np.asarray(packing.starts)
    assert np.all(starts % 64 == 0) and packing.size >= starts[-1] + 150
    tokens = jnp.arange(1, 311, dtype=jnp.float32)[:, None]
    packed = np.asarray(packing.pack(tokens))[:, 0]
    for b, (lo, length) in enumerate(zip(cu[:-1], lengths)):
        np.testing.assert_array_equal(packed[starts[b]:starts[b] + length],
                                      np.arange(lo + 1, lo + length + 1))
    assert np.count_nonzero(packed) == lengths.sum()  # every other row padding
    back = np.asarray(packing.unpack(jnp.asarray(packed)[:, None], -1.0))[:, 0]
    inside = np.arange(310) < 291  # the last sequence's tokens past 150, and the tail, dropped
    np.testing.assert_array_equal(back[inside], np.arange(1, 292))
    assert np.all(back[~inside] == -1.0)
    table = np.asarray(mosaic_varlen.tile_table(packing, packing, 64, queries=True, causal=True))
    assert table.shape == (packing.size // 64, 6)
    # Each of the sequences' tiles once (the heaviest first), and the rest past every sequence.
    unit = mosaic_gpu.common.TABLE_UNIT
    covered = sorted((row[1] + row[5]) * unit // 64 for row in table)
    assert covered == list(range(packing.size // 64))
    work = [min(row[5] * unit + 64 + row[4] - row[3], row[4]) for row in table]
    assert work == sorted(work, reverse=True)


def test_masks_leave_out_the_length_test_only_where_tiles_hold_keys_only():
    """``Program.mask_span``: the length test goes only where every tile of the block's size is
    inside the keys (the dense layout, a multiple of the block); a packed layout's traced lengths
    keep it. The interpreted cases above run both paths (256 keys; 136 and 336)."""
    common = mosaic_gpu.common
    for seqlen_k, block, bounded in [(256, 128, False), (256, 64, False), (384, 256, True),
                                     (136, 64, True), (136, 8, False)]:
        program = common.locate(None, 1, 0, tile_size=128, seqlen_q=200, seqlen_k=seqlen_k)
        span = program.mask_span(block)
        assert span == dict(offset=seqlen_k - 200, seqlen_k=seqlen_k if bounded else None)
    table = jnp.asarray([[0, 1, 2, 100, 256, 0]], jnp.int32)
    packed = jax.jit(lambda t: common.locate(t, 0, 0, tile_size=128, seqlen_q=0,
                                             seqlen_k=0).mask_span(128)["seqlen_k"])(table)
    assert int(packed) == 256


def _varlen_grad_fn(cu_q, cu_k, max_q, max_k, **options):
    def loss(q, k, v, slopes):
        return fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes,
                                         **options).astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("head_dim", mosaic_gpu.HEAD_DIMS)
def test_varlen_lowers(head_dim):
    seqlens, tail = VARLEN_LENGTHS["long"]
    q, k, v, cu_q, cu_k, slopes, _ = make_varlen(0, seqlens, tail, nheads=4, nheads_k=2,
                                                 head_dim=head_dim, dtype=jnp.bfloat16,
                                                 alibi=True)
    backward = mosaic_gpu.backward_configs(head_dim)[0]
    for deterministic in (False, True):
        options = {name: value for name, value in FEATURES["all"].items() if name != "alibi"}
        fn = _varlen_grad_fn(jnp.asarray(cu_q), jnp.asarray(cu_k), 300, 300, **options,
                             deterministic=deterministic)
        with fa.use_backend("mosaic-gpu"):
            assert fa.backends_used(fn, q, k, v, slopes) == {"forward": "mosaic-gpu",
                                                             "backward": "mosaic-gpu"}
            with jax.sharding.use_abstract_mesh(H100_MESH):
                hlo = jax.jit(fn).trace(q, k, v, slopes).lower(
                    lowering_platforms=("cuda",)).as_text()
        kernels = re.findall(r"custom_call @(\w+)", hlo)
        assert kernels == ["mosaic_gpu_v2"] * _kernels(backward, head_dim, 300, deterministic)


INTERPRETED_VARLEN = [(64, "all", True), (128, "causal", False), (256, "window", True)]


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels themselves run (below)")
@pytest.mark.parametrize("head_dim,feature,deterministic", INTERPRETED_VARLEN,
                         ids=[f"d{d}-{f}" + ("" if det else "-dq-added")
                              for d, f, det in INTERPRETED_VARLEN])
def test_interpreted_varlen_against_the_reference(head_dim, feature, deterministic):
    options = dict(FEATURES[feature])
    alibi = options.pop("alibi", False)
    seqlens, tail = VARLEN_LENGTHS["long"]
    q, k, v, cu_q, cu_k, slopes, dout = make_varlen(
        6, seqlens, tail, nheads=2, nheads_k=1, head_dim=head_dim, dtype=jnp.bfloat16,
        alibi=alibi, q_scale=5.0 if "softcap" in options else 1.0)
    max_q, max_k = 300, 300
    layout = Varlen(jnp.asarray(cu_q), jnp.asarray(cu_k), None, max_q, max_k)
    spec = ScoreSpec.create(softmax_scale=head_dim ** -0.5, has_alibi=alibi, **options)
    config = mosaic_gpu.backward_configs(head_dim)[0]
    if not deterministic:
        config = dataclasses.replace(config, fuse_dq_from=0)
        assert config.fuses_dq(head_dim, max_k)
    with plgpu.force_gpu_interpret_mode():
        out, lse = mosaic_varlen.forward(q, k, v, slopes, spec, layout,
                                         mosaic_gpu.forward_config(head_dim))
        dlse = jnp.zeros(lse.shape, jnp.float32)
        grads = mosaic_varlen.backward(q, k, v, slopes, out, lse, dout, dlse, spec, layout,
                                       config, deterministic=deterministic)
        out, lse, grads = jax.tree.map(np.asarray, (out, lse, grads))
    ref, pt = sequence_references(q, k, v, cu_q, cu_k, slopes, dout, max_q, max_k, **options)
    assert_within_tolerance("out", out, ref[0], pt[0])
    assert_within_tolerance("lse", lse, ref[1], pt[1], atol=1e-4)
    for name, grad, r, p in zip(("dq", "dk", "dv"), grads, ref[3], pt[3]):
        assert_within_tolerance(name, grad, r, p, factor=3.0)


def _vmapped_varlen_grads_and_loop(interpret):
    """As ``_vmapped_grads_and_loop`` through the varlen path, each call with its own
    cu_seqlens and ALiBi slopes (batched tile tables; the backward adding dQ then takes one
    call after another)."""
    seqlens = [[(70, 100), (58, 30)], [(128, 64), (0, 66)]]  # 128 queries, 130 keys each
    data = [make_varlen(90 + i, lengths, (0, 0), nheads=2, nheads_k=1, head_dim=64,
                        dtype=jnp.bfloat16, alibi=True) for i, lengths in enumerate(seqlens)]
    q, k, v, cu_q, cu_k, slopes, dout = (jnp.stack([jnp.asarray(x) for x in arrays])
                                         for arrays in zip(*data))
    spec = ScoreSpec.create(softmax_scale=64 ** -0.5, causal=True, has_alibi=True)
    config = mosaic_gpu.backward_configs(64)[0]
    assert config.fuses_dq(64, 100)

    def grads(q, k, v, cu_q, cu_k, slopes, dout):
        layout = Varlen(cu_q, cu_k, None, 128, 100)
        out, lse = mosaic_varlen.forward(q, k, v, slopes, spec, layout,
                                         mosaic_gpu.forward_config(64))
        return mosaic_varlen.backward(q, k, v, slopes, out, lse, dout, jnp.zeros_like(lse),
                                      spec, layout, config, deterministic=False)

    _assert_vmap_equals_loop(grads, (q, k, v, cu_q, cu_k, slopes, dout), interpret)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels themselves run (below)")
def test_interpreted_vmap_of_varlen():
    _vmapped_varlen_grads_and_loop(interpret=True)


@hopper_only
def test_vmap_of_varlen():
    _vmapped_varlen_grads_and_loop(interpret=False)


@hopper_only
@pytest.mark.parametrize("head_dim", mosaic_gpu.HEAD_DIMS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("lengths", list(VARLEN_LENGTHS))
@pytest.mark.parametrize("feature", list(FEATURES))
def test_varlen_against_the_reference(feature, lengths, dtype, head_dim, monkeypatch):
    """flash_attn_varlen_func forward and backward with the backend chosen (S_dmask from the
    next backend), float16 deterministic, bfloat16 with dQ added by the dK/dV kernel."""
    if dtype == jnp.bfloat16:
        _add_dq_at_any_length(monkeypatch)
    options = dict(FEATURES[feature])
    index = list(FEATURES).index(feature)
    with fa.use_backend("mosaic-gpu"):
        run_varlen_case(index, *VARLEN_LENGTHS[lengths], dtype=dtype, head_dim=head_dim,
                        heads=((4, 4), (4, 2), (4, 1))[index % 3],
                        q_scale=5.0 if "softcap" in options else 1.0,
                        deterministic=dtype == jnp.float16, **options)


def test_varlen_lowers_with_heads_sharded():
    """Heads split over a mesh of eight H100s (Explicit axes: the library's partitioning of the
    varlen call), cu_seqlens replicated: the varlen forward and the backward adding dQ inside,
    no collective."""
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"),
                                     (jax.sharding.AxisType.Explicit,) * 2, abstract_device=H100)
    heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    q, kv = (jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=heads)
             for shape in ((600, 8, 64), (640, 4, 64)))
    cu = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=replicated)
    fn = jax.grad(lambda q, k, v, cu_q, cu_k: jnp.sum(fa.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 300, 320, causal=True).astype(jnp.float32)), argnums=(0, 1, 2))
    with fa.use_backend("mosaic-gpu"), jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(q, kv, kv, cu, cu).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", text) == ["mosaic_gpu_v2"] * 2
    assert not re.search(r"stablehlo\.(all_gather|all_reduce|all_to_all|reduce_scatter|"
                         r"collective_permute)", text)
