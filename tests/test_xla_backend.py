"""The ``xla`` backend (blockwise attention in plain JAX) against the reference with flash-attn's
tolerance rule, its dropout keep mask against the kernels' definition, what it hands on, and its
memory: O(S * block), not O(S^2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax as fa
from flash_attn_jax import _validation
from flash_attn_jax.kernels import Placement, registry
from flash_attn_jax.kernels.xla import Xla, dense
from flash_attn_jax.semantics import ScoreSpec
from conftest import ON_GPU
from helpers import DTYPE_IDS, DTYPES, dtype_grid, make_inputs, run_case
import test_dropout as dropout_tests
import test_kvcache as kvcache_tests
import test_varlen as varlen_tests
from test_dropout import run_dropout_case

FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(37, 11)),
    "window_left": dict(window_size=(29, -1)),
    "softcap": dict(softcap=50.0, q_scale=50.0),
    "alibi": dict(alibi=True),
    "causal_window_softcap_alibi": dict(causal=True, window_size=(31, 5), softcap=50.0,
                                        q_scale=50.0, alibi=True),
}
# (seqlen_q, seqlen_k): cross attention both ways (Sq > Sk leaves causal rows without keys),
# lengths no multiple of the block, one longer than a block.
SEQLENS = [(113, 203), (203, 113), (1, 239), (97, 700)]


@pytest.fixture(autouse=True)
def xla_backend():
    with fa.use_backend("xla"):
        yield


# On a GPU the whole dtype x feature x lengths product; on a CPU (CI) every feature with every
# length once, the dtype rotating (each feature and each length meets every dtype).
@pytest.mark.parametrize("dtype,feature,seqlens", dtype_grid(list(FEATURES), SEQLENS, full=ON_GPU))
def test_against_the_reference(dtype, feature, seqlens):
    index = list(FEATURES).index(feature) + SEQLENS.index(seqlens)
    run_case(index, seqlen_q=seqlens[0], seqlen_k=seqlens[1], head_dim=(59, 64, 128, 40)[index % 4],
             nheads=6, nheads_k=(6, 2, 1)[index % 3], dtype=dtype, d_lse=index % 2 == 0,
             **FEATURES[feature])


@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap_alibi"])
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_dropout(dtype, feature):
    options = dict(plain={}, causal=dict(causal=True), window=dict(window_size=(37, 11)),
                   softcap_alibi=dict(softcap=20.0, q_scale=20.0, alibi=True))[feature]
    run_dropout_case(3, dtype=dtype, seqlen_q=113, seqlen_k=600, head_dim=64, **options)


def test_dropout_mask_of_a_shard():
    """The keep mask hashes global batch rows (and heads): a placed call's S_dmask signs are the
    whole call's rows from its first one."""
    q, k = make_inputs(4, batch=2, seqlen_q=40, seqlen_k=70, nheads=3, head_dim=32,
                       dtype=jnp.float32)[:2]
    p, words = _validation.dropout(0.3, jax.random.key(7))
    spec = ScoreSpec(softmax_scale=0.2, dropout_p=p)
    lse = dense.forward(q, k, k, None, spec, words)[1]
    placement = Placement(batch=jnp.int32(5), head=jnp.int32(0))
    probs = dense.probabilities(q, k, lse, None, spec, words, placement=placement)
    want = fa.dropout_mask(jax.random.key(7), 0.3, 2, 3, 40, 70, first_batch=5)
    np.testing.assert_array_equal(np.signbit(np.asarray(probs)), ~np.asarray(want))


@pytest.mark.parametrize("feature", list(varlen_tests.FEATURES))
def test_varlen_against_the_reference(feature):
    index = list(varlen_tests.FEATURES).index(feature)
    lengths = list(varlen_tests.LENGTHS)[index % len(varlen_tests.LENGTHS)]
    varlen_tests.run_varlen_case(index, *varlen_tests.LENGTHS[lengths], dtype=DTYPES[index % 3],
                                head_dim=varlen_tests.HEAD_DIMS[index % 5],
                                heads=varlen_tests.HEADS[index % 3], max_extra=index % 3,
                                **varlen_tests.FEATURES[feature])


def test_varlen_empty_sequences_and_padding_tokens():
    varlen_tests.test_empty_sequences_and_padding_tokens()


def test_varlen_dropout():
    dropout_tests.test_varlen()


@pytest.mark.parametrize("case", list(kvcache_tests.CASES))
def test_kvcache_against_the_reference(case):
    """Every KV-cache case of test_kvcache (append and attention, paged, left padding, batch
    indices, rotary, every mask) on this backend; num_splits is accepted and has no effect."""
    kvcache_tests.test_kvcache_case(case)


@pytest.mark.parametrize("name", ["generation_loop", "missing_pages", "past_the_capacity"])
def test_kvcache_edges(name):
    {"generation_loop": lambda: kvcache_tests.test_generation_loop_equals_dense_attention(True),
     "missing_pages": kvcache_tests.test_out_of_range_block_table_entries_touch_nothing,
     "past_the_capacity": kvcache_tests.test_writes_past_the_capacity_are_dropped}[name]()


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_donated_caches_are_updated_in_place(paged):
    """A jitted decode step with donated caches writes into the caches' own buffers: the
    compiled program aliases them to its outputs and the returned arrays reuse the memory."""
    args = kvcache_tests.make_cache_case(12, dtype=jnp.float32, capacity=256, seqlen_q=1,
                                         seqlen_new=1, page_size=32 if paged else None)
    names = ["q", "k_cache", "v_cache", "k", "v", "cache_seqlens"] + (
        ["block_table"] if paged else [])
    step = jax.jit(lambda *a: fa.flash_attn_with_kvcache(**dict(zip(names, a))),
                   donate_argnums=(1, 2))
    inputs = [args[name] for name in names]
    compiled = step.lower(*inputs).compile()
    assert "input_output_alias" in compiled.as_text() or compiled.as_text().count(
        "may-alias") >= 2
    buffers = [x.unsafe_buffer_pointer() for x in inputs[1:3]]
    _, k_cache, v_cache = step(*inputs)
    assert [k_cache.unsafe_buffer_pointer(), v_cache.unsafe_buffer_pointer()] == buffers
    assert fa.backends_used(lambda *a: fa.flash_attn_with_kvcache(**dict(zip(names, a))),
                            *inputs) == {"kvcache_append": "xla", "kvcache_attention": "xla"}


def test_what_it_hands_on():
    """Every layout and operation runs on it when chosen, except calls placed at sequence
    positions (a ring step), which go on to the automatic choice."""
    kernel = "pallas-interpret" if jax.default_backend() != "gpu" else "pallas-triton"
    tokens = jnp.zeros((10, 2, 32), jnp.float32)
    cu = jnp.array([0, 4, 10], jnp.int32)
    assert fa.backends_used(lambda t: fa.flash_attn_varlen_func(t, t, t, cu, cu, 6, 6),
                            tokens) == {"forward": "xla"}
    pages = jnp.zeros((3, 16, 2, 32), jnp.float32)
    table = jnp.array([[0, 1], [2, 0]], jnp.int32)
    paged = fa.backends_used(lambda t: fa.flash_attn_varlen_func(
        t, pages, pages, cu, jnp.array([0, 20, 30], jnp.int32), 6, 20, block_table=table), tokens)
    assert paged == {"forward": "xla"}
    dense_q = jnp.zeros((1, 16, 2, 32), jnp.float32)
    assert fa.backends_used(fa.flash_attn_func, dense_q, dense_q, dense_q) == {"forward": "xla"}
    request = registry.Request(op="forward", platform=jax.default_backend(),
                               dtype=jnp.dtype(jnp.float32),
                               head_dim=32, positions=True)
    assert "sequence shards" in Xla().supports(request)
    assert registry.select(request).name == kernel


@pytest.mark.parametrize("case", ["p16-bf16-causal", "p32-fp16-window-alibi", "p64-fp32-softcap"])
def test_paged_varlen_keys(case):
    page_size, dtype, options = {
        "p16-bf16-causal": (16, jnp.bfloat16, dict(causal=True)),
        "p32-fp16-window-alibi": (32, jnp.float16, dict(window_size=(10, 3), alibi=True)),
        "p64-fp32-softcap": (64, jnp.float32, dict(softcap=15.0))}[case]
    varlen_tests.test_paged_keys(page_size, dtype, options)


def test_memory_is_linear_in_the_sequence():
    """Temporary memory of the compiled forward + backward at S 16k against XLA's attention,
    which materialises S x S scores: at most a tenth."""
    shape = jax.ShapeDtypeStruct((1, 16384, 1, 64), jnp.float32)

    def temp_bytes(attend):
        loss = lambda q, k, v: attend(q, k, v).sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours = temp_bytes(lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True))
    theirs = temp_bytes(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                       implementation="xla"))
    assert ours * 10 <= theirs, (ours, theirs)


def test_the_automatic_choice_without_a_kernel():
    """Shipped in the automatic choice (the suite takes it out on a CPU): there every call runs
    on it; on a GPU the kernels come first."""
    assert Xla.automatic is True  # as shipped; conftest takes the instance out on a CPU
    q = jnp.zeros((1, 16, 2, 32), jnp.float32)
    cu = jnp.array([0, 4, 10], jnp.int32)
    tokens = jnp.zeros((10, 2, 32), jnp.float32)
    pages = jnp.zeros((3, 16, 2, 32), jnp.float32)
    table = jnp.array([[0, 1], [2, 0]], jnp.int32)
    was = next(b for b in registry._registry if b.name == "xla").automatic
    try:
        registry.set_automatic("xla", True)
        with fa.use_backend(None), registry.fresh_traces():
            dense_used = fa.backends_used(fa.flash_attn_func, q, q, q)
            varlen_used = fa.backends_used(
                lambda t: fa.flash_attn_varlen_func(t, t, t, cu, cu, 6, 6), tokens)
            paged_used = fa.backends_used(lambda t: fa.flash_attn_varlen_func(
                t, pages, pages, cu, jnp.array([0, 20, 30], jnp.int32), 6, 20,
                block_table=table), tokens)
            cache_used = fa.backends_used(lambda q, c: fa.flash_attn_with_kvcache(
                q, c, c, q[:, :1], q[:, :1], cache_seqlens=3, block_table=table[:1]), q[:, :1],
                pages)
    finally:
        registry.set_automatic("xla", was)
    kernel = "pallas-triton" if ON_GPU else None
    assert dense_used == {"forward": kernel or "xla"}
    assert varlen_used == {"forward": kernel or "xla"}
    assert paged_used == {"forward": kernel or "xla"}
    assert cache_used == {"kvcache_append": kernel or "xla", "kvcache_attention": kernel or "xla"}



@pytest.mark.parametrize("name", ["dense", "varlen_and_kvcache", "dropout"])
def test_inside_a_checked_shard_map(name, monkeypatch):
    """test_mesh's shard_map tests (check_vma on, as by default) on this backend: its scans keep
    their carries' manual-axis types, and each shard equals the unsharded call. Both use the same
    key block (by default it follows the rows in flight, which a shard has fewer of); the KV
    cache's head-sharded matmuls still round differently on XLA's CPU (its dot kernels block by
    shape), so there the shards are compared to float32 rounding."""
    import test_mesh
    monkeypatch.setattr(dense, "key_block", lambda rows, phase: 32)
    if name == "varlen_and_kvcache":
        def assert_close(got, want):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=2e-6)
        monkeypatch.setattr(test_mesh, "assert_bitwise", assert_close)
    {"dense": lambda: test_mesh.test_shard_map_dense_functions_forward_and_grad(
        test_mesh.DATA_MODEL[0]),
     "varlen_and_kvcache": test_mesh.test_shard_map_varlen_and_kvcache,
     "dropout": test_mesh.test_shard_map_dropout_with_folded_key}[name]()
