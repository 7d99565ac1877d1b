"""flash_attn_with_kvcache against kvcache_reference, and the cache update's own properties.

Tolerance (flash-attn's kvcache test): out <= 3x the same-dtype reference error + 1e-5 (5x with
ALiBi); v_cache exactly the reference's, k_cache too unless rotary rotated it (then within 1e-3);
every cache position that was not written is bit-identical to the input.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa
from helpers import assert_within_tolerance, to_f64


def make_cache_case(seed, *, dtype, batch=2, seqlen_q=1, seqlen_new=1, nheads=4, nheads_k=2,
                    head_dim=64, capacity=300, page_size=None, leftpad=False, batch_idx=False,
                    rotary_dim=0, alibi=False, empty_cache=False):
    """Random arguments of one flash_attn_with_kvcache call (keyword dict)."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32).astype(jnp.dtype(dtype)))

    args = dict(q=normal(batch, seqlen_q, nheads, head_dim))
    if page_size is None:
        cache_rows = batch + 1 if batch_idx else batch
        cache_shape = (cache_rows, capacity, nheads_k, head_dim)
    else:
        max_blocks = -(-capacity // page_size)
        capacity = max_blocks * page_size
        num_blocks = batch * max_blocks + 3  # a few pages nobody uses
        args["block_table"] = jnp.asarray(
            rng.permutation(num_blocks)[:batch * max_blocks].reshape(batch, max_blocks).astype(np.int32))
        cache_shape = (num_blocks, page_size, nheads_k, head_dim)
    args["k_cache"], args["v_cache"] = normal(*cache_shape), normal(*cache_shape)
    if seqlen_new:
        args["k"], args["v"] = (normal(batch, seqlen_new, nheads_k, head_dim) for _ in range(2))
    low = 0 if seqlen_new else 1
    seqlens = np.zeros(batch, np.int32) if empty_cache else rng.integers(
        low, capacity - seqlen_new + 1, batch).astype(np.int32)
    args["cache_seqlens"] = jnp.asarray(seqlens)
    if leftpad:
        args["cache_leftpad"] = jnp.asarray(
            np.array([rng.integers(0, max(n, 1)) for n in seqlens], np.int32))
    if batch_idx:
        args["cache_batch_idx"] = jnp.asarray(rng.permutation(batch + 1)[:batch].astype(np.int32))
    if rotary_dim:
        angles = rng.uniform(0, 2 * np.pi, (capacity, rotary_dim // 2)).astype(np.float32)
        args["rotary_cos"] = jnp.asarray(np.cos(angles).astype(jnp.dtype(dtype)))
        args["rotary_sin"] = jnp.asarray(np.sin(angles).astype(jnp.dtype(dtype)))
    if alibi:
        args["alibi_slopes"] = jnp.asarray(rng.uniform(0, 0.3, (batch, nheads)).astype(np.float32))
    return args


_STATIC = ("causal", "window_size", "softcap", "rotary_interleaved", "num_splits",
           "return_softmax_lse", "softmax_scale")
kvcache = jax.jit(fa.flash_attn_with_kvcache, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=("options", "compute_dtype"))
def _references(args, *, options, compute_dtype):
    options = dict(options)
    return (fa.kvcache_reference(**args, **options, compute_dtype=compute_dtype),
            fa.kvcache_reference(**args, **options, upcast=False))


def written_positions(args):
    """Boolean masks over the caches' (page, row) positions that the call writes."""
    num_pages, page_size = args["k_cache"].shape[:2]
    written = np.zeros((num_pages, page_size), bool)
    if "k" not in args:
        return written
    batch, seqlen_new = args["k"].shape[:2]
    for b in range(batch):
        for t in range(seqlen_new):
            position = int(args["cache_seqlens"][b]) + t
            if "block_table" in args:
                table = np.asarray(args["block_table"])
                slot = position // page_size
                if slot < table.shape[1] and 0 <= table[b, slot] < num_pages:
                    written[table[b, slot], position % page_size] = True
            elif position < page_size:
                row = int(args["cache_batch_idx"][b]) if "cache_batch_idx" in args else b
                if 0 <= row < num_pages:
                    written[row, position] = True
    return written


def run_kvcache_case(seed, *, dtype, options=None, **shape):
    args = make_cache_case(seed, dtype=dtype, **shape)
    options = dict(options or {})
    results = kvcache(**args, **options, return_softmax_lse=True)
    out, lse = results[:2]
    reference_options = tuple(sorted((k, v) for k, v in options.items() if k != "num_splits"))
    compute_dtype = jnp.float64 if dtype == jnp.float32 else jnp.float32
    with jax.enable_x64(dtype == jnp.float32):
        ref, pt = _references(args, options=reference_options, compute_dtype=compute_dtype)
        ref, pt = (tuple(map(to_f64, r)) for r in (ref, pt))
    factor = 5.0 if "alibi_slopes" in args else 3.0
    assert_within_tolerance("out", out, ref[0], pt[0], factor=factor, atol=1e-5)
    assert_within_tolerance("lse", lse, ref[1], pt[1], factor=factor, atol=1e-4)
    if "k" in args:
        k_cache, v_cache = (to_f64(x) for x in results[2:])
        np.testing.assert_array_equal(v_cache, ref[3])
        if "rotary_cos" in args:
            np.testing.assert_allclose(k_cache, ref[2], rtol=1e-3, atol=1e-3)
        else:
            np.testing.assert_array_equal(k_cache, ref[2])
        untouched = ~written_positions(args)
        for new, old in ((k_cache, args["k_cache"]), (v_cache, args["v_cache"])):
            np.testing.assert_array_equal(new[untouched], to_f64(old)[untouched])
    return args, results


DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]

# Each option alone, then in combination. (shape keywords, call options)
CASES = {
    "decode": (dict(), dict()),
    "no_new_kv": (dict(seqlen_new=0), dict()),
    "prefill_chunk_causal": (dict(seqlen_q=16, seqlen_new=16), dict(causal=True)),
    "window_new_shorter_than_q": (dict(seqlen_q=5, seqlen_new=3), dict(window_size=(40, 2))),
    "softcap": (dict(seqlen_q=2, seqlen_new=2), dict(softcap=5.0)),
    "alibi": (dict(alibi=True, seqlen_q=3, seqlen_new=3), dict(causal=True)),
    "rotary_interleaved": (dict(rotary_dim=64, seqlen_q=4, seqlen_new=4), dict(causal=True)),
    "rotary_neox_half": (dict(rotary_dim=32, seqlen_q=4, seqlen_new=4),
                         dict(rotary_interleaved=False)),
    "paged_16": (dict(page_size=16), dict()),
    "paged_64": (dict(page_size=64, seqlen_q=3, seqlen_new=3), dict(causal=True)),
    "paged_256": (dict(page_size=256, capacity=600), dict()),
    "leftpad": (dict(leftpad=True, seqlen_q=2, seqlen_new=2), dict(causal=True)),
    "batch_idx": (dict(batch_idx=True), dict()),
    "gqa_group_3": (dict(nheads=6, nheads_k=2), dict()),
    "mqa": (dict(nheads=8, nheads_k=1, seqlen_q=3, seqlen_new=3), dict(causal=True)),
    "splits_3": (dict(capacity=700), dict(num_splits=3)),
    "splits_1": (dict(capacity=700), dict(num_splits=1)),
    "empty_cache": (dict(empty_cache=True, seqlen_q=4, seqlen_new=4), dict(causal=True)),
    "rotary_paged_gqa_causal": (dict(rotary_dim=64, page_size=32, nheads=6, nheads_k=2,
                                     seqlen_q=3, seqlen_new=3), dict(causal=True)),
    "rotary_neox_leftpad_batch_idx_window_splits": (
        dict(rotary_dim=32, leftpad=True, batch_idx=True, seqlen_q=2, seqlen_new=2),
        dict(rotary_interleaved=False, window_size=(50, 0), num_splits=2)),
    "paged_leftpad_alibi_mqa_splits": (dict(page_size=64, leftpad=True, alibi=True, nheads=4,
                                            nheads_k=1), dict(num_splits=4)),
    "paged_rotary_window_softcap_prefill": (
        dict(page_size=32, rotary_dim=48, nheads=6, nheads_k=2, seqlen_q=20, seqlen_new=20,
             head_dim=59), dict(window_size=(30, 5), softcap=10.0)),
    "batch_idx_alibi_causal_q_longer": (dict(batch_idx=True, alibi=True, seqlen_q=3,
                                             seqlen_new=2), dict(causal=True)),
    "head_dim_256_splits": (dict(head_dim=256, capacity=500), dict(num_splits=0)),
    "head_dim_16_paged_splits": (dict(head_dim=16, page_size=16, capacity=400),
                                 dict(num_splits=5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kvcache_case(case):
    index = list(CASES).index(case)
    shape, options = CASES[case]
    shape.setdefault("head_dim", (64, 40, 96, 128)[index % 4])
    run_kvcache_case(index, dtype=DTYPES[index % 3], options=options, **shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_kvcache_all_options_each_dtype(dtype):
    run_kvcache_case(99, dtype=dtype, options=dict(causal=True, window_size=(60, 0), num_splits=2),
                     rotary_dim=32, page_size=32, leftpad=True, alibi=True, nheads=6, nheads_k=2,
                     seqlen_q=3, seqlen_new=3, head_dim=59)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_generation_loop_equals_dense_attention(paged):
    # A prompt written in one call, then 16 one-token steps through the returned caches; at every
    # step the output must be dense causal attention over all tokens so far.
    batch, nheads, nheads_k, head_dim, prompt, steps, dtype = 2, 4, 2, 32, 9, 16, jnp.bfloat16
    rng = np.random.default_rng(5)
    total = prompt + steps
    normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32).astype(jnp.bfloat16))
    q_all, k_all, v_all = normal(batch, total, nheads, head_dim), normal(batch, total, nheads_k, head_dim), \
        normal(batch, total, nheads_k, head_dim)
    if paged:
        page_size = 16
        table = jnp.asarray(np.array([[3, 0], [1, 2]], np.int32))
        caches = [jnp.zeros((4, page_size, nheads_k, head_dim), dtype) for _ in range(2)]
        extra = dict(block_table=table)
    else:
        caches = [jnp.zeros((batch, 40, nheads_k, head_dim), dtype) for _ in range(2)]
        extra = {}
    step = jax.jit(functools.partial(fa.flash_attn_with_kvcache, causal=True, **extra),
                   donate_argnums=(1, 2))
    k_cache, v_cache = caches
    out, k_cache, v_cache = step(q_all[:, :prompt], k_cache, v_cache, k_all[:, :prompt],
                                 v_all[:, :prompt], cache_seqlens=0)
    outputs = [out]
    for t in range(prompt, total):
        out, k_cache, v_cache = step(q_all[:, t:t + 1], k_cache, v_cache, k_all[:, t:t + 1],
                                     v_all[:, t:t + 1], cache_seqlens=t)
        outputs.append(out)
    generated = jnp.concatenate(outputs, axis=1)
    dense = fa.flash_attn_func(q_all, k_all, v_all, causal=True)
    ref, _ = fa.attention_reference(q_all, k_all, v_all, causal=True)
    pt, _ = fa.attention_reference(q_all, k_all, v_all, causal=True, upcast=False)
    assert_within_tolerance("generated", generated, to_f64(ref), to_f64(pt), factor=3.0, atol=1e-5)
    assert_within_tolerance("dense", dense, to_f64(ref), to_f64(pt), factor=3.0, atol=1e-5)


def test_num_splits_agree_and_zero_is_the_default():
    args = make_cache_case(7, dtype=jnp.float32, capacity=900, nheads=8, nheads_k=2)
    results = {n: kvcache(**args, num_splits=n, return_softmax_lse=True) for n in (0, 1, 2, 7)}
    for n in (1, 2, 7):
        np.testing.assert_allclose(to_f64(results[n][0]), to_f64(results[0][0]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(to_f64(results[n][1]), to_f64(results[0][1]), rtol=1e-5, atol=1e-5)
    default = kvcache(**args, return_softmax_lse=True)
    for a, b in zip(default, results[0]):
        np.testing.assert_array_equal(to_f64(a), to_f64(b))


def test_out_of_range_block_table_entries_touch_nothing():
    # Entries outside [0, num_blocks) mark missing pages: their keys are absent, writes dropped.
    args = make_cache_case(8, dtype=jnp.float16, page_size=16, capacity=64, seqlen_new=20,
                           seqlen_q=1)
    args["cache_seqlens"] = jnp.asarray(np.array([10, 30], np.int32))
    table = np.asarray(args["block_table"]).copy()
    table[0, 1] = -1
    table[1, 2] = 10_000
    args["block_table"] = jnp.asarray(table)
    run_kvcache_case_with(args)


def test_writes_past_the_capacity_are_dropped():
    args = make_cache_case(9, dtype=jnp.bfloat16, capacity=50, seqlen_new=8, seqlen_q=8)
    args["cache_seqlens"] = jnp.asarray(np.array([46, 20], np.int32))  # row 0 overflows by 4
    run_kvcache_case_with(args, dict(causal=True))


def run_kvcache_case_with(args, options=None):
    options = dict(options or {})
    out, lse, k_cache, v_cache = kvcache(**args, **options, return_softmax_lse=True)
    ref_out, ref_lse, ref_k, ref_v = fa.kvcache_reference(**args, **options)
    pt_out, pt_lse, _, _ = fa.kvcache_reference(**args, **options, upcast=False)
    assert_within_tolerance("out", out, to_f64(ref_out), to_f64(pt_out), factor=3.0, atol=1e-5)
    assert_within_tolerance("lse", lse, to_f64(ref_lse), to_f64(pt_lse), factor=3.0, atol=1e-4)
    untouched = ~written_positions(args)
    for new, ref, old in ((k_cache, ref_k, args["k_cache"]), (v_cache, ref_v, args["v_cache"])):
        np.testing.assert_array_equal(to_f64(new), to_f64(ref))
        np.testing.assert_array_equal(to_f64(new)[untouched], to_f64(old)[untouched])


def test_return_forms():
    args = make_cache_case(10, dtype=jnp.bfloat16, seqlen_new=0)
    out = fa.flash_attn_with_kvcache(**args)
    assert out.shape == args["q"].shape
    out2, lse = fa.flash_attn_with_kvcache(**args, return_softmax_lse=True)
    assert lse.shape == (2, 4, 1) and lse.dtype == jnp.float32
    np.testing.assert_array_equal(to_f64(out), to_f64(out2))
    with_new = make_cache_case(10, dtype=jnp.bfloat16)
    assert len(fa.flash_attn_with_kvcache(**with_new)) == 3
    assert len(fa.flash_attn_with_kvcache(**with_new, return_softmax_lse=True)) == 4


def _decode_step(capacity):
    """A jitted decode step with donated caches, and its arguments."""
    args = make_cache_case(11, dtype=jnp.bfloat16, capacity=capacity)
    step = jax.jit(lambda q, kc, vc, k, v, n: fa.flash_attn_with_kvcache(q, kc, vc, k, v,
                                                                         cache_seqlens=n),
                   donate_argnums=(1, 2))
    return step, [args[name] for name in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens")]


def test_in_place_update_is_declared_for_the_gpu(monkeypatch):
    # Lowered for an H100: the append kernel's cache outputs alias its cache operands, and the
    # jitted step's outputs alias the donated caches, so XLA needs no copy of the caches.
    from test_lowering import H100_MESH
    monkeypatch.setenv("FLASH_ATTN_JAX_INTERPRET", "0")
    step, args = _decode_step(4096)
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(H100_MESH):
        warnings.simplefilter("ignore", DeprecationWarning)
        text = step.trace(*args).lower().as_text()
    append_calls = [line for line in text.splitlines() if "flash_attn_kvcache_append" in line
                    and "stablehlo.custom_call" in line]
    assert len(append_calls) == 1
    assert "output_operand_aliases" in append_calls[0]
    assert text.count("tf.aliasing_output") == 2  # both donated caches come back as outputs


@pytest.mark.gpu
def test_in_place_update_has_no_cache_copy_on_gpu():
    step, args = _decode_step(4096)
    compiled = step.lower(*args).compile().as_text()
    cache_shape = "bf16[2,4096,2,64]"
    copies = [line for line in compiled.splitlines() if " copy(" in line and cache_shape in line]
    assert copies == [], copies


def test_gradient_raises_clear_error():
    args = make_cache_case(12, dtype=jnp.float32, seqlen_new=0)
    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.grad(lambda q: fa.flash_attn_with_kvcache(q, args["k_cache"], args["v_cache"],
                                                      cache_seqlens=args["cache_seqlens"]).sum())(args["q"])


def _s(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


Q, CACHE, NEW = _s((2, 1, 4, 32)), _s((2, 64, 2, 32)), _s((2, 1, 2, 32))
I32 = functools.partial(_s, dtype=jnp.int32)
BAD_CALLS = [
    ("k without v", dict(k=NEW), ValueError, "k and v must be given together"),
    ("k without seqlens", dict(k=NEW, v=NEW), ValueError, "cache_seqlens is required"),
    ("new kv shape", dict(k=_s((2, 1, 4, 32)), v=_s((2, 1, 4, 32)), cache_seqlens=3), ValueError,
     "k and v must have shape"),
    ("cache dtype", dict(k_cache=_s((2, 64, 2, 32), jnp.float16)), TypeError,
     "k_cache must have the dtype of q"),
    ("cache shapes", dict(v_cache=_s((2, 65, 2, 32))), ValueError, "same shape"),
    ("cache batch", dict(k_cache=_s((3, 64, 2, 32)), v_cache=_s((3, 64, 2, 32))), ValueError,
     "without cache_batch_idx"),
    ("heads", dict(k_cache=_s((2, 64, 3, 32)), v_cache=_s((2, 64, 3, 32))), ValueError, "multiple"),
    ("seqlens dtype", dict(cache_seqlens=_s((2,), jnp.float32)), TypeError, "cache_seqlens must have dtype int32"),
    ("seqlens shape", dict(cache_seqlens=I32((3,))), ValueError, r"cache_seqlens must have shape \(2,\)"),
    ("page size", dict(block_table=I32((2, 4)), k_cache=_s((8, 24, 2, 32)), v_cache=_s((8, 24, 2, 32))),
     ValueError, "power of two >= 16"),
    ("table dtype", dict(block_table=_s((2, 4), jnp.float32)), TypeError, "block_table must have dtype int32"),
    ("paged with batch idx", dict(block_table=I32((2, 4)), cache_batch_idx=I32((2,))), ValueError,
     "cache_batch_idx cannot be combined with block_table"),
    ("rotary without k", dict(rotary_cos=_s((64, 8)), rotary_sin=_s((64, 8))), ValueError,
     "need new k and v"),
    ("rotary too short", dict(k=NEW, v=NEW, cache_seqlens=2, rotary_cos=_s((63, 8)),
                              rotary_sin=_s((63, 8))), ValueError, "seqlen_ro"),
    ("rotary too wide", dict(k=NEW, v=NEW, cache_seqlens=2, rotary_cos=_s((64, 17)),
                             rotary_sin=_s((64, 17))), ValueError, "rotary_dim"),
    ("num splits", dict(num_splits=129), ValueError, "num_splits"),
    ("num splits type", dict(num_splits=1.5), TypeError, "num_splits"),
    ("q longer than cache", dict(q=_s((2, 65, 4, 32)), k=NEW, v=NEW, cache_seqlens=1), ValueError,
     "capacity"),
]


@pytest.mark.parametrize("overrides,error,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_kvcache_rejects(overrides, error, match):
    arrays = dict(q=Q, k_cache=CACHE, v_cache=CACHE)
    arrays.update({k: v for k, v in overrides.items() if isinstance(v, jax.ShapeDtypeStruct)})
    statics = {k: v for k, v in overrides.items() if not isinstance(v, jax.ShapeDtypeStruct)}
    names = list(arrays)
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: fa.flash_attn_with_kvcache(**dict(zip(names, a)), **statics)).trace(
            *arrays.values())
