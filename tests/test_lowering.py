"""Every kernel configuration lowers to Triton for an H100, on a machine without a GPU.

The CPU interpret mode accepts things the GPU does not (non-power-of-two tensors, tiny dots, ...);
lowering for an abstract H100 catches most of them, and a lint of the Triton IR catches the dots
under 16 that lower but compute garbage on the GPU (see the Pallas Triton notes).
"""

import collections
import contextlib
import dataclasses
import io
import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from conftest import ON_GPU
from flash_attn_jax.kernels import Varlen
from flash_attn_jax.kernels.triton import backward as triton_backward
from flash_attn_jax.kernels.triton import decode as triton_decode
from flash_attn_jax.kernels.triton import forward as triton_forward
from flash_attn_jax.kernels.triton import layout_args
from flash_attn_jax.kernels.triton import segments as triton_segments
from flash_attn_jax.kernels.triton.config import (all_backward_configs, all_decode_configs,
                                           all_forward_configs, backward_configs, forward_config)
from flash_attn_jax.kernels.triton.tiles import Numerics
from flash_attn_jax.semantics import ScoreSpec
from helpers import dtype_grid

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=1, platform="cuda")
H100_MESH = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                     abstract_device=H100)
_DOT = re.compile(r"tt\.dot .*: tensor<(\d+)x(\d+)x\w+> \* tensor<(\d+)x(\d+)x\w+>")


def lower_for_h100(fn, *args):
    """Lowers ``fn`` for an H100; returns the Triton IR the kernels printed."""
    ttir = io.StringIO()
    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(H100_MESH), contextlib.redirect_stdout(ttir):
        warnings.simplefilter("ignore", DeprecationWarning)  # the Triton backend's deprecation
        hlo = jax.jit(fn).trace(*args).lower().as_text()
    assert plgpu.CUSTOM_CALL_TARGET_NAME in hlo, "no Triton custom call in the lowered module"
    return ttir.getvalue()


def lint_ttir(ttir):
    """Problems that lower fine but break on the GPU."""
    problems = []
    dots = _DOT.findall(ttir)
    if "tt.dot" in ttir and not dots:
        problems.append("tt.dot present but not parsed")
    for dims in dots:
        if min(int(d) for d in dims) < 16:
            problems.append(f"dot with a dimension under 16: {dims}")
    for line in ttir.splitlines():
        if "tt.atomic_rmw fadd" in line and re.search(r"tensor<[\dx]+xi\d+>", line):
            problems.append(f"integer atomic add lowers to a float add: {line.strip()}")
    return problems


def _struct(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


# Feature sets that change the kernel code: masks, softcap, ALiBi, ragged edges, head-dim padding.
# Every block configuration is lowered with all of them at once; the other sets at the default
# configuration of each dtype and head dim.
FULL = ScoreSpec(softmax_scale=0.1, softcap=5.0, window_left=30, window_right=0, has_alibi=True)
SEED = jax.ShapeDtypeStruct((2,), jnp.uint32)
# Dropout adds the keep-mask hash, whose tile shape follows block_k: it is lowered at each dtype
# and head dim's default blocks and, in the forward, at every block_k.
DROPOUT = dataclasses.replace(FULL, dropout_p=0.1)
VARIANTS = {"all-features-ragged": (FULL, 203, 150, 3),
            "dropout-all-features-ragged": (DROPOUT, 203, 150, 3),
            "plain-aligned": (ScoreSpec(softmax_scale=0.1), 256, 256, 0),
            "window-right-ragged": (ScoreSpec(softmax_scale=0.1, window_right=7), 97, 113, 1)}


def _shapes(dtype, head_dim_p, variant):
    _, seqlen_q, seqlen_k, head_dim_cut = VARIANTS[variant]
    head_dim = head_dim_p - head_dim_cut if head_dim_p > 16 else 16 - head_dim_cut
    q = _struct((2, seqlen_q, 4, head_dim), dtype)
    kv = _struct((2, seqlen_k, 2, head_dim), dtype)
    stats = _struct((2, 4, seqlen_q), jnp.float32)
    return q, kv, stats, _struct((2, 4), jnp.float32)


def _lower_forward(dtype, head_dim_p, config, variant):
    spec = VARIANTS[variant][0]
    q, kv, lse, slopes = _shapes(dtype, head_dim_p, variant)
    options = dict(interpret=False, debug=True)
    ttir = lower_for_h100(
        lambda q, k, v, s, seed: triton_forward.forward(q, k, v, s, spec, config, seed=seed, **options),
        q, kv, kv, slopes, SEED)
    return ttir + lower_for_h100(
        lambda q, k, lse, s, seed: triton_forward.probabilities(q, k, lse, s, spec, config, seed=seed,
                                                                **options),
        q, kv, lse, slopes, SEED)


def _lower_backward(dtype, head_dim_p, dkdv_config, dq_config, variant):
    spec = VARIANTS[variant][0]
    q, kv, lse, slopes = _shapes(dtype, head_dim_p, variant)
    return lower_for_h100(
        lambda q, k, v, s, o, lse, do, dlse, seed: triton_backward.backward(
            q, k, v, s, o, lse, do, dlse, spec, dkdv_config, dq_config, seed=seed, interpret=False,
            debug=True),
        q, kv, kv, slopes, q, lse, q, lse, SEED)


def _check(ttir, expected_dots):
    assert ttir.count("tt.dot ") >= expected_dots, "a kernel lost its dots"
    assert lint_ttir(ttir) == []


def _id(dtype, head_dim_p, config):
    return f"{jnp.dtype(dtype).name}-d{head_dim_p}-q{config.block_q}-k{config.block_k}"


@pytest.mark.parametrize("dtype,head_dim_p,config",
                         [pytest.param(*c, id=_id(*c)) for c in all_forward_configs()])
def test_every_forward_config_lowers(dtype, head_dim_p, config):
    _check(_lower_forward(dtype, head_dim_p, config, "all-features-ragged"), 3)


def _backward_config_pairs():
    """(dtype, head dim, dK/dV config, dQ config, variant): every configuration of each kernel, the
    two kernels' lists zipped (one lowering covers a configuration of each), every other pair with
    dropout (its dK/dV kernel works on queries x keys tiles, without dropout on keys x queries)."""
    lists = collections.defaultdict(lambda: ([], []))
    for kernel, dtype, head_dim_p, config in all_backward_configs():
        lists[(dtype, head_dim_p)][kernel == "dq"].append(config)
    for (dtype, head_dim_p), (dkdv_list, dq_list) in lists.items():
        defaults = backward_configs(dtype, head_dim_p, 1 << 20, 1 << 20)
        for i in range(max(len(dkdv_list), len(dq_list))):
            dkdv, dq = (xs[i] if i < len(xs) else default
                        for xs, default in zip((dkdv_list, dq_list), defaults))
            variant = ("all-features-ragged", "dropout-all-features-ragged")[i % 2]
            yield pytest.param(dtype, head_dim_p, dkdv, dq, variant,
                               id=f"{_id(dtype, head_dim_p, dkdv)}-dq-q{dq.block_q}-k{dq.block_k}"
                                  f"-{variant.split('-')[0]}")


@pytest.mark.parametrize("dtype,head_dim_p,dkdv_config,dq_config,variant",
                         list(_backward_config_pairs()))
def test_every_backward_config_lowers(dtype, head_dim_p, dkdv_config, dq_config, variant):
    _check(_lower_backward(dtype, head_dim_p, dkdv_config, dq_config, variant), 7)


# Every variant at every head dim; on a CPU (CI) with the dtype rotating (each variant and head
# dim meets every dtype; every dtype x head dim x block configuration lowers above), on a GPU with
# each dtype.
@pytest.mark.parametrize("dtype,variant,head_dim_p", dtype_grid(
    ["plain-aligned", "window-right-ragged", "dropout-all-features-ragged"], [16, 32, 64, 128, 256],
    full=ON_GPU))
def test_feature_variants_lower(dtype, head_dim_p, variant):
    spec = VARIANTS[variant][0]
    forward = forward_config(dtype, head_dim_p, 1 << 20, 1 << 20, dropout=spec.has_dropout)
    _check(_lower_forward(dtype, head_dim_p, forward, variant), 3)
    _check(_lower_backward(dtype, head_dim_p, *backward_configs(dtype, head_dim_p, 1 << 20, 1 << 20),
                           variant), 7)


@pytest.mark.parametrize("head_dim_p,block_k", [(128, 16), (128, 32), (128, 64), (128, 128),
                                                (64, 16), (64, 32), (64, 64)])
def test_dropout_forward_lowers_at_every_block_k(head_dim_p, block_k):
    # d 64 has its own dropout blocks (64 x 64).
    config = forward_config(jnp.bfloat16, head_dim_p, 1 << 20, 1 << 20, dropout=True)
    config = dataclasses.replace(config, block_k=block_k)
    _check(_lower_forward(jnp.bfloat16, head_dim_p, config, "dropout-all-features-ragged"), 3)


def _lower_decode(dtype, head_dim_p, config, *, paged, num_splits, spec=FULL):
    """The cache attention (+ combine when split), lowered for an H100."""
    group = max(1, config.group_p - 1) if config.group_p > 2 else config.group_p  # padded heads too
    num_heads_k, head_dim = 2, head_dim_p - 3 if head_dim_p > 16 else 13
    seqlen_q = max(1, 2 * config.block_i - 1)
    q = _struct((2, seqlen_q, num_heads_k * group, head_dim), dtype)
    page_size = max(config.block_k, 16)
    cache = _struct((7, page_size, num_heads_k, head_dim) if paged else (3, 200, num_heads_k, head_dim),
                    dtype)
    ints = lambda *shape: _struct(shape, jnp.int32)
    table, batch_idx = (ints(2, 3), None) if paged else (None, ints(2))
    slopes = _struct((2, num_heads_k * group), jnp.float32)
    return lower_for_h100(
        lambda q, kc, vc, n, lp, bi, t, s: triton_decode.attention(
            q, kc, vc, n, lp, bi, t, s, spec, config, num_splits, interpret=False, debug=True),
        q, cache, cache, ints(2), ints(2), batch_idx, table, slopes)


def _append_params():
    """Every dtype and head dim, contiguous and paged (pages of 32); every page size at bf16 d128."""
    for dtype, name in zip((jnp.float16, jnp.bfloat16, jnp.float32), ("fp16", "bf16", "fp32")):
        for head_dim_p in (16, 32, 64, 128, 256):
            for page_size in (0, 32):
                yield pytest.param(dtype, head_dim_p, page_size, id=f"{name}-d{head_dim_p}-p{page_size}")
    for page_size in (16, 64, 128, 256):
        yield pytest.param(jnp.bfloat16, 128, page_size, id=f"bf16-d128-p{page_size}")


@pytest.mark.parametrize("dtype,head_dim_p,page_size", list(_append_params()))
def test_cache_append_lowers(dtype, head_dim_p, page_size):
    head_dim = head_dim_p - 3 if head_dim_p > 16 else 13
    cache = _struct((7, page_size, 2, head_dim) if page_size else (3, 200, 2, head_dim), dtype)
    new = _struct((2, 3, 2, head_dim), dtype)
    ints = lambda *shape: _struct(shape, jnp.int32)
    table, batch_idx = (ints(2, 3), None) if page_size else (None, ints(2))
    ttir = lower_for_h100(
        lambda kc, vc, k, v, n, bi, t: triton_decode.append(kc, vc, k, v, n, bi, t, interpret=False,
                                                             debug=True),
        cache, cache, new, new, ints(2), batch_idx, table)
    assert "tt.store" in ttir and lint_ttir(ttir) == []


def _decode_params():
    for i, (dtype, head_dim_p, config) in enumerate(all_decode_configs()):
        name = f"{jnp.dtype(dtype).name}-d{head_dim_p}-i{config.block_i}-g{config.group_p}-k{config.block_k}"
        yield pytest.param(dtype, head_dim_p, config, i % 2 == 1, 1 + 2 * (i % 3 == 0), id=name)


@pytest.mark.parametrize("dtype,head_dim_p,config,paged,num_splits", list(_decode_params()))
def test_every_decode_config_lowers(dtype, head_dim_p, config, paged, num_splits):
    _check(_lower_decode(dtype, head_dim_p, config, paged=paged, num_splits=num_splits), 3)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("page_size", [16, 32, 64, 128, 256])
def test_decode_every_page_size_and_split_lowers(page_size, paged, num_splits):
    from flash_attn_jax.kernels.triton.config import decode_config
    config = decode_config(jnp.bfloat16, 128, 1, 4, page_size * 3, page_size if paged else None)
    spec = ScoreSpec(softmax_scale=0.1, window_left=5)
    _check(_lower_decode(jnp.bfloat16, 128, config, paged=paged, num_splits=num_splits, spec=spec), 3)


def _lower_varlen(dtype, head_dim_p, *, page_size=0, spec=DROPOUT):
    """The varlen forward, probabilities and (contiguous keys) backward, and the tail fill."""
    batch, num_heads, num_heads_k, max_seqlen = 3, 4, 2, 150
    head_dim = head_dim_p - 3 if head_dim_p > 16 else 13
    q = _struct((301, num_heads, head_dim), dtype)
    keys = (_struct((9, page_size, num_heads_k, head_dim), dtype) if page_size
            else _struct((250, num_heads_k, head_dim), dtype))
    lse = _struct((num_heads, 301), jnp.float32)
    ints = lambda *shape: _struct(shape, jnp.int32)
    table = ints(batch, 4) if page_size else None
    slopes = _struct((batch, num_heads), jnp.float32)
    forward = forward_config(dtype, head_dim_p, max_seqlen, max_seqlen)
    if page_size:
        forward = dataclasses.replace(forward, block_k=min(forward.block_k, page_size))

    def options(cu_q, cu_k, table):
        varlen = Varlen(cu_q, cu_k, table, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
        return dict(layout_args(keys, varlen, None), interpret=False, debug=True)

    ttir = lower_for_h100(
        lambda q, k, v, s, cu_q, cu_k, t, seed: triton_forward.forward(
            q, k, v, s, spec, forward, seed=seed, **options(cu_q, cu_k, t)),
        q, keys, keys, slopes, ints(batch + 1), ints(batch + 1), table, SEED)
    ttir += lower_for_h100(
        lambda q, k, lse, s, cu_q, cu_k, t, seed: triton_forward.probabilities(
            q, k, lse, s, spec, forward, seed=seed, **options(cu_q, cu_k, t)),
        q, keys, lse, slopes, ints(batch + 1), ints(batch + 1), table, SEED)
    if not page_size:
        configs = backward_configs(dtype, head_dim_p, max_seqlen, max_seqlen)
        ttir += lower_for_h100(
            lambda q, k, v, s, o, lse, do, dlse, cu_q, cu_k, seed: triton_backward.backward(
                q, k, v, s, o, lse, do, dlse, spec, *configs, seed=seed, **options(cu_q, cu_k, None)),
            q, keys, keys, slopes, q, lse, q, lse, ints(batch + 1), ints(batch + 1), SEED)
        for x, axis in ((q, 0), (lse, 1)):
            ttir += lower_for_h100(
                lambda x, cu: triton_segments.fill_outside(x, cu, 0.0, token_axis=axis,
                                                        interpret=False, debug=True),
                x, ints(batch + 1))
    return ttir


@pytest.mark.parametrize("head_dim_p", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32], ids=["fp16", "bf16", "fp32"])
def test_varlen_kernels_lower(dtype, head_dim_p):
    _check(_lower_varlen(dtype, head_dim_p), 10)


@pytest.mark.parametrize("page_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_varlen_paged_kernels_lower(dtype, page_size):
    _check(_lower_varlen(dtype, 128, page_size=page_size), 3)


@pytest.mark.parametrize("block_k", [16, 32, 64, 128])
def test_dropout_hash_lowers(block_k):
    from test_dropout_hash import keep_tile_call
    ttir = lower_for_h100(keep_tile_call(64, block_k, interpret=False, debug=True),
                          _struct((2,), jnp.uint32))
    assert "mul.wide.u32" in ttir and "tt.join" in ttir and lint_ttir(ttir) == []


def _tiny_dot_kernel(x_ref, o_ref):
    x = plgpu.load(x_ref)
    o_ref[...] = Numerics(x.dtype).matmul(x, x, transpose_b=True).astype(o_ref.dtype)


def _call(kernel, n):
    return lambda x: pl.pallas_call(
        kernel, out_shape=_struct((n, n), x.dtype), grid=(1,),
        in_specs=[pl.BlockSpec((n, n), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((n, n), lambda i: (0, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), debug=True)(x)


def test_lint_flags_dots_under_16():
    # A control: the lint must catch what the lowering lets through.
    assert lint_ttir(lower_for_h100(_call(_tiny_dot_kernel, 8), _struct((8, 8), jnp.bfloat16)))
    assert not lint_ttir(lower_for_h100(_call(_tiny_dot_kernel, 16), _struct((16, 16), jnp.bfloat16)))


def test_lowering_rejects_non_power_of_two_tiles():
    # A control: a 48-row tile must not lower, so a kernel change that creates one fails above.
    with pytest.raises(Exception, match="power"):
        lower_for_h100(_call(_tiny_dot_kernel, 48), _struct((48, 48), jnp.bfloat16))


def test_kernels_lower_under_x64():
    # Under jax_enable_x64 a Python int in the kernels' index arithmetic would be int64 next to
    # the int32 program ids, which lax refuses (interpreted kernels run in 32-bit mode, so only
    # this lowering sees it).
    with jax.enable_x64(True):
        config = forward_config(jnp.bfloat16, 64, 1 << 20, 1 << 20)
        _check(_lower_forward(jnp.bfloat16, 64, config, "dropout-all-features-ragged"), 3)
        _check(_lower_backward(jnp.bfloat16, 64, *backward_configs(jnp.bfloat16, 64, 1 << 20,
                                                                   1 << 20),
                               "all-features-ragged"), 7)
        _check(_lower_varlen(jnp.bfloat16, 64), 10)
        _check(_lower_varlen(jnp.float32, 32, page_size=32), 3)
        from flash_attn_jax.kernels.triton.config import decode_config
        for paged in (False, True):
            config = decode_config(jnp.bfloat16, 64, 3, 2, 64, 16 if paged else None)
            _check(_lower_decode(jnp.bfloat16, 64, config, paged=paged, num_splits=3), 3)
        cache = _struct((7, 32, 2, 61), jnp.bfloat16)
        new = _struct((2, 3, 2, 61), jnp.bfloat16)
        ints = lambda *shape: _struct(shape, jnp.int32)
        ttir = lower_for_h100(
            lambda kc, vc, k, v, n, t, keep: triton_decode.append(kc, vc, k, v, n, None, t, keep,
                                                                   interpret=False, debug=True),
            cache, cache, new, new, ints(2), ints(2, 3), ints(2, 3))
        assert "tt.store" in ttir and lint_ttir(ttir) == []
