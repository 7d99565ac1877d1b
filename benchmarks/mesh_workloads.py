"""Workloads and compiled-program checks shared by benchmarks/bench_mesh.py (which times them)
and tests/test_mesh_scale.py (which checks them on 8 simulated CPU devices): one definition of
each, so that the test checks what the benchmark runs.

* A pre-norm transformer block (RMSNorm, QKV projection, causal GQA ``flash_attn_func``, output
  projection, RMSNorm, SwiGLU MLP) with Megatron-style shardings: the batch over the "data" mesh
  axis, the heads (QKV columns, output-projection rows) and the MLP hidden units over "model".
* A batch-sharded paged decode step: ``flash_attn_with_kvcache`` appending one token per sequence
  to paged caches whose pages are split over the batch's mesh axis (each batch row's pages in
  its own device's part of the pool), caches donated.
* The all-gathers of a compiled program (``compiled.as_text()``), and those that gather a tensor
  shaped like one of given global arrays (the attention's inputs, the caches).
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import flash_attn_jax as fa

# ----------------------------------------------------------------------------------------------
# The transformer block.


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Sizes of the block; ``batch`` is per data shard (the global batch is batch x data size)."""

    batch: int = 8
    seqlen: int = 4096
    d_model: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    d_ff: int = 14336

    def flops(self, data_shards=1):
        """Model FLOPs of one forward + backward (matmuls x 3, causal attention x 3.5) of the
        global batch."""
        tokens = self.batch * data_shards * self.seqlen
        proj = self.d_model * (self.heads + 2 * self.kv_heads) * self.head_dim
        proj += self.heads * self.head_dim * self.d_model + 3 * self.d_model * self.d_ff
        attention = (4 * self.batch * data_shards * self.heads * self.seqlen ** 2 * self.head_dim
                     / 2)
        return 3 * 2 * tokens * proj + 3.5 * attention


TINY_BLOCK = BlockConfig(batch=2, seqlen=64, d_model=48, heads=16, kv_heads=8, head_dim=16,
                         d_ff=96)

# Megatron-style: column-parallel QKV and MLP input projections, row-parallel output projections,
# norms replicated; activations split on the batch over "data".
BLOCK_SPECS = dict(attn_norm=P(), wq=P(None, "model", None), wk=P(None, "model", None),
                   wv=P(None, "model", None), wo=P("model", None, None), mlp_norm=P(),
                   w_gate=P(None, "model"), w_up=P(None, "model"), w_down=P("model", None))
TOKENS_SPEC = P("data")


def normal(shape, dtype=jnp.bfloat16, sharding=None, *, seed=0, scale=1.0, mean=0.0):
    """Random normal values, ``mean`` + ``scale`` x N(0, 1), drawn on the devices: each draws its
    own part when ``sharding`` splits the array (the values do not depend on the sharding:
    jax_threefry_partitionable)."""
    draw = lambda key: (mean + scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.jit(draw, out_shardings=sharding)(jax.random.PRNGKey(seed))


def block_shardings(mesh, specs=None):
    """{parameter name: NamedSharding} by BLOCK_SPECS (updated by ``specs``) and the tokens'
    sharding, on ``mesh`` (axes "data" and "model")."""
    named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
    return ({name: named(spec) for name, spec in {**BLOCK_SPECS, **(specs or {})}.items()},
            named(TOKENS_SPEC))


def init_block(config: BlockConfig, dtype=jnp.bfloat16, shardings=None, seed=0):
    """Random parameters and input tokens (global batch = batch x data shards of the tokens'
    sharding), placed by ``shardings`` (block_shardings' pair) or on the default device."""
    c = config
    params_at, tokens_at = shardings or ({}, None)
    data_shards = 1 if tokens_at is None else tokens_at.mesh.shape["data"]
    shapes = dict(attn_norm=(c.d_model,), wq=(c.d_model, c.heads, c.head_dim),
                  wk=(c.d_model, c.kv_heads, c.head_dim), wv=(c.d_model, c.kv_heads, c.head_dim),
                  wo=(c.heads, c.head_dim, c.d_model), mlp_norm=(c.d_model,),
                  w_gate=(c.d_model, c.d_ff), w_up=(c.d_model, c.d_ff), w_down=(c.d_ff, c.d_model))
    params = {}
    for i, (name, shape) in enumerate(shapes.items()):
        at = params_at.get(name)
        if name.endswith("norm"):
            params[name] = normal(shape, dtype, at, seed=seed + i, scale=0.1, mean=1.0)
        else:  # scaled by 1 / sqrt(fan-in)
            fan_in = shape[0] * (shape[1] if name == "wo" else 1)
            params[name] = normal(shape, dtype, at, seed=seed + i, scale=fan_in ** -0.5)
    tokens = normal((c.batch * data_shards, c.seqlen, c.d_model), dtype, tokens_at,
                    seed=seed + len(shapes))
    return params, tokens


def flash_causal(q, k, v):
    return fa.flash_attn_func(q, k, v, causal=True)


def _wide(x):
    """x in float32, or wider when it is (a float64 oracle)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def rms_norm(x, weight, eps=1e-6):
    wide = _wide(x)
    scale = jax.lax.rsqrt(jnp.mean(wide * wide, axis=-1, keepdims=True) + eps)
    return (wide * scale).astype(x.dtype) * weight


def block(params, x, attention=flash_causal):
    """x + attention, then + SwiGLU MLP, each after an RMSNorm. ``attention(q, k, v)`` with
    q (B, S, heads, head_dim), k and v (B, S, kv_heads, head_dim)."""
    h = rms_norm(x, params["attn_norm"])
    q = jnp.einsum("bsm,mhd->bshd", h, params["wq"])
    k = jnp.einsum("bsm,mhd->bshd", h, params["wk"])
    v = jnp.einsum("bsm,mhd->bshd", h, params["wv"])
    x = x + jnp.einsum("bshd,hdm->bsm", attention(q, k, v), params["wo"])
    h = rms_norm(x, params["mlp_norm"])
    hidden = jax.nn.silu(h @ params["w_gate"]) * (h @ params["w_up"])
    return x + hidden @ params["w_down"]


def block_loss(params, x, attention=flash_causal):
    y = _wide(block(params, x, attention))
    return jnp.mean(y * y)


def block_train_step(attention=flash_causal):
    """The jitted loss and gradients (parameters and input) of the block: forward + backward.
    Its partitioning comes from the arguments' shardings (plain jit)."""
    return jax.jit(jax.value_and_grad(lambda p, x: block_loss(p, x, attention), argnums=(0, 1)))


def attention_shapes(config: BlockConfig, data_shards=1):
    """The global shapes of the attention's inputs: q, and k and v."""
    batch = config.batch * data_shards
    return [(batch, config.seqlen, config.heads, config.head_dim),
            (batch, config.seqlen, config.kv_heads, config.head_dim)]


# ----------------------------------------------------------------------------------------------
# Batch-sharded paged decoding.


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decode step sizes: ``batch`` sequences in all, each with ``cache_len`` positions (the last
    one written by the step), pages of ``page_size`` tokens."""

    batch: int = 512
    cache_len: int = 8192
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 256

    @property
    def pages_per_row(self):
        return -(-self.cache_len // self.page_size)

    @property
    def num_pages(self):
        return self.batch * self.pages_per_row


TINY_DECODE = DecodeConfig(batch=16, cache_len=64, heads=4, kv_heads=2, head_dim=16, page_size=16)

DECODE_SPECS = dict(q=P("data"), k_cache=P("data"), v_cache=P("data"), k=P("data"), v=P("data"),
                    cache_seqlens=P("data"), block_table=P("data"))
DECODE_ORDER = ("k_cache", "v_cache", "q", "k", "v", "cache_seqlens", "block_table")


def block_table(config: DecodeConfig, num_shards, seed=0):
    """(batch, pages_per_row) int32: the rows of shard d (of ``num_shards`` equal batch slices)
    use pages of shard d's slice of the pool, in a random order (the partitioning's rule:
    device d owns pages [d * P / n, (d + 1) * P / n))."""
    rng = np.random.default_rng(seed)
    per_shard = config.num_pages // num_shards
    if config.batch % num_shards:
        raise ValueError(f"batch {config.batch} does not split over {num_shards} devices")
    order = np.concatenate([d * per_shard + rng.permutation(per_shard)
                            for d in range(num_shards)])
    return order.reshape(config.batch, config.pages_per_row).astype(np.int32)


def decode_inputs(config: DecodeConfig, mesh=None, dtype=jnp.bfloat16, seed=0):
    """The step's arguments in DECODE_ORDER, drawn on the devices and placed with DECODE_SPECS on
    ``mesh`` (axis "data"; None: the default device, the block table made for one shard). The
    caches' contents are random; each sequence holds cache_len - 1 tokens and the step appends
    one."""
    c = config
    at = lambda name: (None if mesh is None
                       else jax.sharding.NamedSharding(mesh, DECODE_SPECS[name]))
    shapes = dict(k_cache=(c.num_pages, c.page_size, c.kv_heads, c.head_dim),
                  v_cache=(c.num_pages, c.page_size, c.kv_heads, c.head_dim),
                  q=(c.batch, 1, c.heads, c.head_dim), k=(c.batch, 1, c.kv_heads, c.head_dim),
                  v=(c.batch, 1, c.kv_heads, c.head_dim))
    arrays = {name: normal(shape, dtype, at(name), seed=seed + i)
              for i, (name, shape) in enumerate(shapes.items())}
    arrays["cache_seqlens"] = jax.device_put(jnp.full((c.batch,), c.cache_len - 1, jnp.int32),
                                             at("cache_seqlens"))
    table = block_table(c, 1 if mesh is None else mesh.shape["data"], seed)
    arrays["block_table"] = jax.device_put(jnp.asarray(table), at("block_table"))
    return [arrays[name] for name in DECODE_ORDER]


def decode_step():
    """jit of one decode step, (k_cache, v_cache, q, k, v, cache_seqlens, block_table) ->
    ((k_cache, v_cache), out): the caches (arguments 0 and 1) donated, written in place."""
    def step(k_cache, v_cache, q, k, v, cache_seqlens, block_table):
        out, k_cache, v_cache = fa.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
            causal=True)
        return (k_cache, v_cache), out
    return jax.jit(step, donate_argnums=(0, 1))


def decode_shapes(config: DecodeConfig):
    """The global shapes of the step's 4-axis arrays: the caches, q, and the new k and v."""
    c = config
    return [(c.num_pages, c.page_size, c.kv_heads, c.head_dim), (c.batch, 1, c.heads, c.head_dim),
            (c.batch, 1, c.kv_heads, c.head_dim)]


def donated_aliases(hlo_text):
    """How many parameters the compiled module writes its outputs into (input_output_alias)."""
    match = re.search(r"input_output_alias=\{(.*?)\}, entry", hlo_text)
    return 0 if match is None else len(re.findall(r"(?:may|must)-alias", match.group(1)))


# ----------------------------------------------------------------------------------------------
# Collectives in a compiled program.

_COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)"
                         r"(?:-start)?\(")
_ALL_GATHER = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\((.*)")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Gather:
    dtype: str
    result: tuple  # the gathered array's per-device shape in the compiled (partitioned) module
    dimensions: tuple  # the axes gathered along

    def __str__(self):
        return f"{self.dtype}{list(self.result)} along {list(self.dimensions)}"


def collective_counts(hlo_text):
    """{collective: number of instructions} in a compiled module's text."""
    counts = {}
    for name in _COLLECTIVE.findall(hlo_text):
        counts[name] = counts.get(name, 0) + 1
    return counts


def all_gathers(hlo_text):
    """Every all-gather (sync, or the start of an async one) of a compiled module."""
    gathers = []
    for lhs, rest in _ALL_GATHER.findall(hlo_text):
        results = _SHAPE.findall(lhs)
        if not results:
            continue
        # An async start's result is the tuple (operand, result): its last shape is the result.
        dtype, dims = results[-1]
        gathered = re.search(r"dimensions=\{([\d,]*)\}", rest)
        gathers.append(Gather(dtype=dtype, result=tuple(int(d) for d in dims.split(",") if d),
                              dimensions=tuple(int(d) for d in gathered.group(1).split(",") if d)
                              if gathered else ()))
    return gathers


def _shard_of(shape, global_shape):
    """Whether ``shape`` is a shard (or the whole) of an array of ``global_shape``, its axes in
    any order (a backend may transpose)."""
    if len(shape) != len(global_shape):
        return False
    return any(all(g % s == 0 for s, g in zip(perm, global_shape))
               for perm in itertools.permutations(shape))


def gathers_of(hlo_text, global_shapes):
    """The all-gathers whose result is shaped like a shard (or the whole) of an array of one of
    ``global_shapes``. In the block only the attention's operands (q, k, v, and out and the
    gradients, shaped like them) have four axes, so a match there gathers one of them."""
    return [gather for gather in all_gathers(hlo_text)
            if any(_shard_of(gather.result, shape) for shape in global_shapes)]
