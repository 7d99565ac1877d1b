"""A tiny causal character language model in Equinox, its attention run by flash_attn_jax.

The model of lm_nnx.py (2 transformer layers, d_model 64, 4 query heads sharing 2 key/value
heads, trained with optax on Shakespeare's sonnets 1-60 from examples/data), written the
Equinox way: every module handles one example, rank-3 attention inputs (length, heads,
head_dim), and the batch comes from ``jax.vmap``.

- training: ``flash_attn_jax.dot_product_attention(q, k, v, is_causal=True)`` on one example's
  (length, heads, head_dim) arrays, vmapped over the batch;
- generation: one prefill call, then one call per token; each example appends to its own
  (context, kv_heads, head_dim) caches with ``flash_attn_jax.flash_attn_with_kvcache`` (which
  takes a batch axis, so the example is given as a batch of one) and the step is vmapped over the
  batch and jitted with the caches donated: they are updated in place;
- the check: the same greedy continuation recomputed without a cache (a full causal forward
  over the whole prefix for every token) gives the same tokens and logits within 1e-4.

The model is too small and too briefly trained to write verse (greedy decoding soon repeats
"the"); the script shows the mechanics. Runs unchanged on CPU and GPU (float32 throughout).
On a 2-core CPU, where flash_attn_jax runs its xla backend, it takes 21 s of CPU time, compiles
included (31-43 s wall-clock on a machine shared with other jobs); on an NVIDIA H200, where it
runs the Pallas Triton kernels, 38 s wall-clock, compiles included. Run from the repository
root: ``python examples/lm_equinox.py``.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import flash_attn_jax
from _lm_common import (Config, CharTokenizer, attention_backends, check_loss_dropped,
                        generate_and_check, load_text, training_batches)

NUM_STEPS = 300
BATCH_SIZE = 16
OPTIMIZER = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, NUM_STEPS, 1e-3))


class Attention(eqx.Module):
    """Causal self-attention over one example's (length, d_model) inputs."""

    query: eqx.nn.Linear
    key: eqx.nn.Linear
    value: eqx.nn.Linear
    out: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)

    def __init__(self, config, key):
        query_key, key_key, value_key, out_key = jax.random.split(key, 4)
        kv_features = config.num_kv_heads * config.head_dim
        self.query = eqx.nn.Linear(config.d_model, config.d_model, key=query_key)
        self.key = eqx.nn.Linear(config.d_model, kv_features, key=key_key)
        self.value = eqx.nn.Linear(config.d_model, kv_features, key=value_key)
        self.out = eqx.nn.Linear(config.d_model, config.d_model, key=out_key)
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads

    def heads(self, x):
        """q (length, heads, head_dim), k and v (length, kv_heads, head_dim)."""
        q = jax.vmap(self.query)(x).reshape(x.shape[0], self.num_heads, -1)
        k = jax.vmap(self.key)(x).reshape(x.shape[0], self.num_kv_heads, -1)
        v = jax.vmap(self.value)(x).reshape(x.shape[0], self.num_kv_heads, -1)
        return q, k, v

    def __call__(self, x):
        out = flash_attn_jax.dot_product_attention(*self.heads(x), is_causal=True)
        return jax.vmap(self.out)(out.reshape(x.shape[0], -1))

    def extend(self, x, k_cache, v_cache, cache_seqlen):
        """x (length, d_model) appended to this example's caches at position cache_seqlen."""
        q, k, v = (a[None] for a in self.heads(x))
        out, k_cache, v_cache = flash_attn_jax.flash_attn_with_kvcache(
            q, k_cache[None], v_cache[None], k, v, cache_seqlens=cache_seqlen[None], causal=True)
        return jax.vmap(self.out)(out[0].reshape(x.shape[0], -1)), k_cache[0], v_cache[0]


class Block(eqx.Module):
    """Pre-norm transformer layer: causal self-attention and an MLP."""

    attention_norm: eqx.nn.LayerNorm
    attention: Attention
    mlp_norm: eqx.nn.LayerNorm
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear

    def __init__(self, config, key):
        attention_key, in_key, out_key = jax.random.split(key, 3)
        self.attention_norm = eqx.nn.LayerNorm(config.d_model)
        self.attention = Attention(config, attention_key)
        self.mlp_norm = eqx.nn.LayerNorm(config.d_model)
        self.mlp_in = eqx.nn.Linear(config.d_model, 4 * config.d_model, key=in_key)
        self.mlp_out = eqx.nn.Linear(4 * config.d_model, config.d_model, key=out_key)

    def mlp(self, x):
        hidden = jax.nn.gelu(jax.vmap(self.mlp_in)(jax.vmap(self.mlp_norm)(x)))
        return jax.vmap(self.mlp_out)(hidden)

    def __call__(self, x):
        x = x + self.attention(jax.vmap(self.attention_norm)(x))
        return x + self.mlp(x)

    def extend(self, x, k_cache, v_cache, cache_seqlen):
        out, k_cache, v_cache = self.attention.extend(
            jax.vmap(self.attention_norm)(x), k_cache, v_cache, cache_seqlen)
        x = x + out
        return x + self.mlp(x), k_cache, v_cache


class CharLM(eqx.Module):
    token_embedding: jax.Array
    position_embedding: jax.Array
    blocks: list[Block]
    final_norm: eqx.nn.LayerNorm
    unembed: eqx.nn.Linear

    def __init__(self, config, key):
        token_key, position_key, unembed_key, *block_keys = jax.random.split(
            key, 3 + config.num_layers)
        self.token_embedding = jax.random.normal(token_key, (config.vocab_size, config.d_model))
        self.position_embedding = jax.random.normal(position_key, (config.context, config.d_model))
        self.blocks = [Block(config, block_key) for block_key in block_keys]
        self.final_norm = eqx.nn.LayerNorm(config.d_model)
        self.unembed = eqx.nn.Linear(config.d_model, config.vocab_size, key=unembed_key)

    def logits(self, x):
        return jax.vmap(self.unembed)(jax.vmap(self.final_norm)(x))

    def __call__(self, tokens):
        """Logits (length, vocab) of one example's tokens (length,) at positions 0..length-1."""
        x = self.token_embedding[tokens] + self.position_embedding[:tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return self.logits(x)

    def extend(self, tokens, caches, cache_seqlen):
        positions = cache_seqlen + jnp.arange(tokens.shape[0])
        x = self.token_embedding[tokens] + self.position_embedding[positions]
        new_caches = []
        for block, (k_cache, v_cache) in zip(self.blocks, caches):
            x, k_cache, v_cache = block.extend(x, k_cache, v_cache, cache_seqlen)
            new_caches.append((k_cache, v_cache))
        return self.logits(x), tuple(new_caches)


@eqx.filter_jit
def train_step(model, opt_state, inputs, targets):
    def loss_fn(model):
        logits = jax.vmap(model)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


# Plain jax.jit for inference: the model's leaves are all arrays, and donate_argnums donates
# the caches alone.
@jax.jit
def forward(model, tokens):
    return jax.vmap(model)(tokens)


@jax.jit(donate_argnums=2)
def extend(model, tokens, caches, cache_seqlens):
    return jax.vmap(model.extend)(tokens, caches, cache_seqlens)


def main():
    # Full float32 matmuls (GPUs would round their inputs to TF32), so that decoding with and
    # without the cache can be compared at 1e-4.
    jax.config.update("jax_default_matmul_precision", "highest")
    text = load_text()
    tokenizer = CharTokenizer(text)
    config = Config(vocab_size=len(tokenizer.chars))
    print(f"jax {jax.__version__} on {jax.default_backend()}, flash_attn_jax backends "
          f"{attention_backends(config, BATCH_SIZE)}; {len(text)} characters, vocabulary "
          f"{config.vocab_size}; {config}")

    model = CharLM(config, jax.random.key(0))
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))
    batches = training_batches(tokenizer.encode(text), BATCH_SIZE, config.context)
    start = time.perf_counter()
    losses = []
    for _ in range(NUM_STEPS):
        model, opt_state, loss = train_step(model, opt_state, *next(batches))
        losses.append(float(loss))
    check_loss_dropped(losses, time.perf_counter() - start)

    generate_and_check(
        extend=lambda tokens, caches, cache_seqlens: extend(model, tokens, caches, cache_seqlens),
        forward=lambda tokens: forward(model, tokens), config=config, tokenizer=tokenizer)


if __name__ == "__main__":
    main()
