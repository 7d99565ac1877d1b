"""Device meshes: partitioning under jax.jit, jax.shard_map with its defaults, ring attention.

Without a GPU the suite simulates 8 host devices (conftest) and the kernels run in interpret mode;
on a GPU machine the cases that need more devices than it has are skipped. Each case compares the
sharded call with the unsharded one (bitwise where the arithmetic is the same, batch and heads;
within float32 rounding for the ring, whose partial results merge in another order) and, for the
ring, with the reference under flash-attn's tolerance rule. The compiled programs are checked for
collectives: none for batch and head sharding, only collective-permutes for the ring.
(test_mesh_lowering.py checks the same on the GPU program.)
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flash_attn_jax as fa
from flash_attn_jax.kernels import use_interpret
from helpers import check_against_reference, cotangents, make_inputs, references

KEY = jax.random.key(7)
COLLECTIVES = re.compile(r"\b(all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)"
                         r"(?:-start)?\(")


NUM_DEVICES = len(jax.devices())
# Batch x heads meshes: 2 x 2 where there are 4 devices (8 simulated ones on CPU), else each axis
# alone (2 GPUs).
DATA_MODEL = [(2, 2)] if NUM_DEVICES >= 4 else [(2, 1), (1, 2)]
DATA_SEQ = (2, 4) if NUM_DEVICES >= 8 else (1, 2)


def make_mesh(shape, names, *, explicit=False):
    if NUM_DEVICES < math.prod(shape):
        pytest.skip(f"needs {math.prod(shape)} devices, {NUM_DEVICES} here")
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


def put(mesh, x, *entries):
    return jax.device_put(x, NamedSharding(mesh, P(*entries)))


def collectives(jitted, *args, **kwargs):
    """The collective ops in the compiled program."""
    text = jitted.lower(*args, **kwargs).compile().as_text()
    return sorted(set(COLLECTIVES.findall(text)))


def _normal(mesh, entries):
    """A PartitionSpec without mesh axes of size 1 and trailing Nones (what XLA reports)."""
    def keep(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        names = tuple(n for n in names if n is not None and mesh.shape[n] > 1)
        return None if not names else names[0] if len(names) == 1 else names
    entries = [keep(e) for e in entries]
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def spec_of(x):
    """The PartitionSpec of x's sharding, normalized."""
    return _normal(x.sharding.mesh, x.sharding.spec)


def assert_spec(x, *entries):
    assert spec_of(x) == _normal(x.sharding.mesh, entries), (x.sharding.spec, entries)


def assert_bitwise(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def loss_grads(fn, argnums):
    """jit(grad) of a loss of every float output (out, and lse where given)."""
    def loss(*args):
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        total = 0.0
        for i, x in enumerate(outs):
            x = jnp.where(jnp.isfinite(x), x, 0.0).astype(jnp.float32)
            total = total + jnp.sum(x * jnp.cos(jnp.arange(x.size, dtype=jnp.float32) + i
                                                ).reshape(x.shape))
        return total
    return jax.jit(jax.grad(loss, argnums=argnums))


# ----------------------------------------------------------------------------------------------
# Batch and heads under jit: local calls, bitwise the unsharded results, no collectives.

def _dense_inputs(seed=0, *, batch=4, seqlen=64, nheads=4, nheads_k=2, head_dim=32,
                  dtype=jnp.float32):
    q, k, v, slopes = make_inputs(seed, batch=batch, seqlen_q=seqlen, seqlen_k=seqlen,
                                  nheads=nheads, nheads_k=nheads_k, head_dim=head_dim,
                                  dtype=dtype, alibi=True)
    return q, k, v, slopes


DENSE_OPTIONS = dict(causal=True, softcap=8.0, dropout_p=0.15, dropout_key=KEY)


@pytest.mark.parametrize("shape", DATA_MODEL)
@pytest.mark.parametrize("variant", ["separate", "qkvpacked", "kvpacked"])
def test_jit_batch_and_heads_bitwise_and_local(variant, shape):
    mesh = make_mesh(shape, ("data", "model"))
    q, k, v, slopes = _dense_inputs(nheads_k=2 if variant != "qkvpacked" else 4)
    if variant == "separate":
        fn = lambda q, k, v, s: fa.flash_attn_func(q, k, v, alibi_slopes=s,
                                                   return_attn_probs=True, **DENSE_OPTIONS)
        args = (q, k, v, slopes)
        shardings = [P("data", None, "model", None)] * 3
    elif variant == "qkvpacked":
        fn = lambda qkv, s: fa.flash_attn_qkvpacked_func(qkv, alibi_slopes=s,
                                                         return_attn_probs=True, **DENSE_OPTIONS)
        args = (jnp.stack([q, k, v], axis=2), slopes)
        shardings = [P("data", None, None, "model", None)]
    else:
        fn = lambda q, kv, s: fa.flash_attn_kvpacked_func(q, kv, alibi_slopes=s,
                                                          return_attn_probs=True, **DENSE_OPTIONS)
        args = (q, jnp.stack([k, v], axis=2), slopes)
        shardings = [P("data", None, "model", None), P("data", None, None, "model", None)]
    shardings.append(P("data", "model"))
    sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, shardings)]
    expected = jax.jit(fn)(*args)
    actual = jax.jit(fn)(*sharded)
    assert_bitwise(actual, expected)
    out, lse, probs = actual
    assert_spec(out, "data", None, "model")
    assert_spec(lse, "data", "model")
    assert_spec(probs, "data", "model")
    argnums = tuple(range(len(args) - 1))
    grads = loss_grads(fn, argnums)
    assert_bitwise(grads(*sharded), grads(*args))
    for grad, x in zip(grads(*sharded), sharded):
        assert spec_of(grad) == spec_of(x)
    assert collectives(grads, *sharded) == []


@pytest.mark.parametrize("nheads,nheads_k,shape", [(4, 1, DATA_MODEL[-1]), (8, 2, (2, 4))],
                         ids=["mqa", "gqa-model-axis-above-kv-heads"])
def test_jit_gqa_heads_not_dividing_kv_heads_stay_whole(nheads, nheads_k, shape):
    # The kv heads cannot split over the heads' mesh axis (MQA: one over 2 devices; GQA: 2 over
    # 4, which divides the query heads, so Shardy splits the axis between the two kinds of
    # heads); the heads stay whole (gathered), the batch still splits, and the results and
    # gradients are the unsharded ones.
    mesh = make_mesh(shape, ("data", "model"))
    q, k, v, _ = _dense_inputs(nheads=nheads, nheads_k=nheads_k)
    attend = lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True)
    sharded = [put(mesh, q, "data", None, "model", None)] + [put(mesh, x, "data") for x in (k, v)]
    assert_bitwise(jax.jit(attend)(*sharded), jax.jit(attend)(q, k, v))
    grads = loss_grads(attend, (0, 1, 2))
    assert_bitwise(grads(*sharded), grads(q, k, v))


# ----------------------------------------------------------------------------------------------
# The sequence under jit: ring attention (only collective-permutes), or local queries when the
# keys are whole.

SEQ_OPTIONS = dict(causal=True, window_size=(40, -1), softcap=6.0, dropout_p=0.1)


def _with_vjp(fn):
    """jit of (out, lse, grads) of ``fn(q, k, v) -> (out, lse)`` for cotangents (dout, dlse)."""
    def run(q, k, v, dout, dlse):
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        return out, lse, vjp((dout, dlse))
    return jax.jit(run)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_jit_sequence_sharding_runs_the_ring(explicit):
    mesh = make_mesh(DATA_SEQ, ("data", "seq"), explicit=explicit)
    q, k, v, slopes = _dense_inputs(batch=2, seqlen=128)
    dout, dlse = cotangents(3, q, lse=True)

    def fn(q, k, v):
        out, lse, _ = fa.flash_attn_func(q, k, v, alibi_slopes=slopes, return_attn_probs=True,
                                         dropout_key=KEY, **SEQ_OPTIONS)
        return out, lse

    rows, stats = ("data", "seq", None, None), ("data", None, "seq")
    sharded = [put(mesh, x, *rows) for x in (q, k, v, dout)] + [put(mesh, dlse, *stats)]
    run = _with_vjp(fn)
    out, lse, grads = run(*sharded)
    assert_spec(out, "data", "seq")
    assert_spec(lse, "data", None, "seq")
    for grad in grads:
        assert_spec(grad, "data", "seq")
    assert collectives(run, *sharded) == ["collective-permute"]
    # The unsharded call, up to the order in which partial results merge...
    plain_out, plain_lse, plain_grads = run(q, k, v, dout, dlse)
    np.testing.assert_allclose(out, plain_out, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, plain_lse, atol=1e-5, rtol=0)
    for grad, plain_grad in zip(grads, plain_grads):
        np.testing.assert_allclose(grad, plain_grad, atol=5e-5, rtol=0)
    if explicit:
        return
    # ...and the reference with the kernels' keep mask, under the tolerance rule.
    keep = fa.dropout_mask(KEY, SEQ_OPTIONS["dropout_p"], 2, 4, 128, 128)
    ref, pt = references(q, k, v, slopes, dout, dlse, keep_mask=keep, **SEQ_OPTIONS)
    check_against_reference(out, lse, None, ref, pt, grads)


def test_jit_query_sequence_alone_keeps_keys_whole():
    # Queries split, keys whole on every device: local queries at their global positions.
    mesh = make_mesh((min(4, NUM_DEVICES),), ("seq",))
    q, k, v, slopes = _dense_inputs(batch=2, seqlen=128)
    fn = jax.jit(lambda q, k, v: fa.flash_attn_func(q, k, v, alibi_slopes=slopes,
                                                    return_attn_probs=True, **DENSE_OPTIONS))
    sharded_q = put(mesh, q, None, "seq", None, None)
    actual, expected = fn(sharded_q, k, v), fn(q, k, v)
    for x, y in zip(actual, expected):  # other row blocks: not always the same roundings
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.signbit(actual[2]), np.signbit(expected[2]))  # dropout
    assert_spec(actual[0], None, "seq")
    assert_spec(actual[2], None, None, "seq")  # S_dmask: rows split
    assert collectives(fn, sharded_q, k, v) == []


# ----------------------------------------------------------------------------------------------
# Varlen: heads split.

def _varlen_inputs(lengths=((17, 23), (0, 5), (40, 33), (9, 9))):
    from test_varlen import make_varlen
    return make_varlen(5, list(lengths), (3, 1), nheads=4, nheads_k=2, head_dim=32,
                       dtype=jnp.float32, alibi=True)


@pytest.mark.parametrize("variant", ["separate", "qkvpacked"])
def test_jit_varlen_heads_bitwise_and_local(variant):
    mesh = make_mesh((2,), ("model",))
    options = dict(causal=True, dropout_p=0.2, dropout_key=KEY, return_attn_probs=True)
    if variant == "separate":
        q, k, v, cu_q, cu_k, slopes, _ = _varlen_inputs()
        fn = lambda q, k, v: fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 33,
                                                       alibi_slopes=slopes, **options)
        args, entries = (q, k, v), [(None, "model", None)] * 3
    else:
        q, _, _, cu, _, slopes, _ = _varlen_inputs(((17, 17), (0, 0), (40, 40), (9, 9)))
        qkv = jnp.stack([q, q * 0.5, -q], axis=1)
        fn = lambda qkv: fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 40, alibi_slopes=slopes,
                                                             **options)
        args, entries = (qkv,), [(None, None, "model", None)]
    sharded = [put(mesh, x, *e) for x, e in zip(args, entries)]
    actual = jax.jit(fn)(*sharded)
    assert_bitwise(actual, jax.jit(fn)(*args))
    out, lse, probs = actual
    assert_spec(out, None, "model")
    assert_spec(lse, "model")
    assert_spec(probs, None, "model")
    grads = loss_grads(fn, tuple(range(len(args))))
    assert_bitwise(grads(*sharded), grads(*args))
    assert collectives(grads, *sharded) == []


# ----------------------------------------------------------------------------------------------
# KV cache: batch and heads, donated caches updated in place.

def _cache_case(kind):
    from test_kvcache import make_cache_case
    if kind == "paged":
        args = make_cache_case(11, dtype=jnp.float32, batch=4, capacity=64, page_size=16,
                               head_dim=32, alibi=True)
        # Each sequence's pages within its shard of the pool (2 shards of the batch).
        num_pages = args["k_cache"].shape[0] - args["k_cache"].shape[0] % 2
        args["k_cache"], args["v_cache"] = (x[:num_pages] for x in (args["k_cache"],
                                                                    args["v_cache"]))
        per_seq, half = args["block_table"].shape[1], num_pages // 2
        # Batch rows 0, 1 (shard 0) use pages of [0, half), rows 2, 3 pages of [half, 2 half).
        rng = np.random.default_rng(0)
        low, high = (offset + rng.permutation(half)[:2 * per_seq].reshape(2, per_seq)
                     for offset in (0, half))
        args["block_table"] = jnp.asarray(np.concatenate([low, high]).astype(np.int32))
        return args, "rows"
    if kind == "batch_idx":
        args = make_cache_case(12, dtype=jnp.float32, batch=4, capacity=48, head_dim=32,
                               batch_idx=True, rotary_dim=16)
        # 6 cache rows, 3 per shard; batch rows 0, 1 use rows of shard 0.
        args["k_cache"], args["v_cache"] = (jnp.concatenate([x, x[:1]]) for x in
                                            (args["k_cache"], args["v_cache"]))
        args["cache_batch_idx"] = jnp.asarray(np.array([2, 0, 4, 3], np.int32))
        return args, "rows"
    args = make_cache_case(13, dtype=jnp.float32, batch=4, seqlen_q=3, seqlen_new=3,
                           capacity=48, head_dim=32, leftpad=True)
    return args, "batch"


@pytest.mark.parametrize("shape", DATA_MODEL)
@pytest.mark.parametrize("kind", ["contiguous", "batch_idx", "paged"])
def test_jit_kvcache_batch_and_heads_in_place(kind, shape):
    mesh = make_mesh(shape, ("data", "model"))
    args, cache_split = _cache_case(kind)
    entries = {"q": ("data", None, "model", None), "k": ("data", None, "model", None),
               "v": ("data", None, "model", None), "k_cache": ("data", None, "model", None),
               "v_cache": ("data", None, "model", None), "rotary_cos": (), "rotary_sin": (),
               "block_table": ("data", None), "alibi_slopes": ("data", "model")}
    sharded = {name: put(mesh, x, *entries.get(name, ("data",))) for name, x in args.items()}
    names = sorted(args)

    def step(*arrays):
        return fa.flash_attn_with_kvcache(**dict(zip(names, arrays)), causal=True,
                                          return_softmax_lse=True)

    expected = jax.jit(step)(*(args[n] for n in names))
    donated = tuple(names.index(n) for n in ("k_cache", "v_cache"))
    jitted = jax.jit(step, donate_argnums=donated)
    compiled_text = jitted.lower(*(sharded[n] for n in names)).compile().as_text()
    assert COLLECTIVES.findall(compiled_text) == []
    aliases = re.search(r"input_output_alias=\{(.*?)\}, entry", compiled_text).group(1)
    assert aliases.count("may-alias") == 2  # both caches written where they lie
    if not use_interpret():  # (interpret mode copies its loop carries)
        shape = ",".join(map(str, sharded["k_cache"].addressable_shards[0].data.shape))
        assert not re.search(rf"= f32\[{shape}\]\S* copy\(", compiled_text), "a cache copied"
    actual = jitted(*(sharded[n] for n in names))
    assert_bitwise(actual, expected)
    out, lse, k_cache, v_cache = actual
    assert_spec(out, "data", None, "model")
    assert_spec(k_cache, "data", None, "model")


# ----------------------------------------------------------------------------------------------
# shard_map with its defaults (check_vma=True) around every function, forward and grad.

@pytest.mark.parametrize("shape", DATA_MODEL)
def test_shard_map_dense_functions_forward_and_grad(shape):
    mesh = make_mesh(shape, ("data", "model"))
    q, k, v, _ = _dense_inputs()
    row = P("data", None, "model", None)
    packed = P("data", None, None, "model", None)
    cases = [
        (lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True), (q, k, v), (row,) * 3),
        (lambda qkv: fa.flash_attn_qkvpacked_func(qkv, window_size=(9, 9)),
         (jnp.stack([q, q, q], 2),), (packed,)),
        (lambda q, kv: fa.flash_attn_kvpacked_func(q, kv, softcap=5.0),
         (q, jnp.stack([k, v], 2)), (row, packed)),
    ]
    for fn, args, in_specs in cases:
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=row)
        assert_bitwise(jax.jit(mapped)(*args), jax.jit(fn)(*args))
        argnums = tuple(range(len(args)))
        assert_bitwise(loss_grads(mapped, argnums)(*args), loss_grads(fn, argnums)(*args))


def test_shard_map_varlen_and_kvcache():
    mesh = make_mesh((2,), ("model",))
    q, k, v, cu_q, cu_k, _, _ = _varlen_inputs()
    fn = lambda q, k, v: fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 33, causal=True)
    heads = P(None, "model", None)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(heads,) * 3, out_specs=heads)
    assert_bitwise(jax.jit(mapped)(q, k, v), jax.jit(fn)(q, k, v))
    assert_bitwise(loss_grads(mapped, (0, 1, 2))(q, k, v), loss_grads(fn, (0, 1, 2))(q, k, v))

    args, _ = _cache_case("contiguous")
    names = sorted(args)
    step = lambda *a: fa.flash_attn_with_kvcache(**dict(zip(names, a)), causal=True)
    per_name = {"q": P(None, None, "model"), "k": P(None, None, "model"),
                "v": P(None, None, "model"), "k_cache": P(None, None, "model"),
                "v_cache": P(None, None, "model")}
    in_specs = tuple(per_name.get(n, P()) for n in names)
    mapped = jax.shard_map(step, mesh=mesh, in_specs=in_specs,
                           out_specs=(P(None, None, "model"),) * 3)
    assert_bitwise(jax.jit(mapped)(*(args[n] for n in names)),
                   jax.jit(step)(*(args[n] for n in names)))


def test_shard_map_dropout_with_folded_key():
    # Under shard_map a call sees its local batch rows: fold the shard's index into the key for
    # independent masks. Each shard then equals the unsharded call on its rows with its key.
    mesh = make_mesh((2,), ("data",))
    q, k, v, _ = _dense_inputs(batch=2)
    options = dict(causal=True, dropout_p=0.3)

    def per_shard(q, k, v):
        key = jax.random.fold_in(KEY, jax.lax.axis_index("data"))
        return fa.flash_attn_func(q, k, v, dropout_key=key, **options)

    row = P("data")
    out = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(row,) * 3, out_specs=row))(q, k, v)
    for shard in range(2):
        rows = slice(shard, shard + 1)
        expected = fa.flash_attn_func(q[rows], k[rows], v[rows],
                                      dropout_key=jax.random.fold_in(KEY, shard), **options)
        np.testing.assert_array_equal(out[rows], expected)
    # The fold changes the mask: shard 1 with shard 0's key would give another result.
    other = fa.flash_attn_func(q[1:], k[1:], v[1:], dropout_key=jax.random.fold_in(KEY, 0),
                               **options)
    assert not np.array_equal(np.asarray(out[1:]), np.asarray(other))
