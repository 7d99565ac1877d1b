"""A tiny causal character language model in Flax NNX, its attention run by flash_attn_jax.

Trains 2 transformer layers (d_model 64, 4 query heads sharing 2 key/value heads) with optax on
Shakespeare's sonnets 1-60 (examples/data), then continues two prompts of different lengths
(each cache row has its own ``cache_seqlens``) greedily:

- training: ``nnx.MultiHeadAttention(attention_fn=flash_attn_jax.flax_attention_fn(
  is_causal=True))``, called without a mask (causality comes from the attention function);
- generation: one prefill call, then one call per token, each running the same module's
  query/key/value/output projections around ``flash_attn_jax.flash_attn_with_kvcache``, which
  returns the caches with the new keys and values written; the step is jitted with the caches
  donated, so they are updated in place (MultiHeadAttention's own ``decode`` mode keeps its
  cache inside the module and attends through a dense mask, so it is not used);
- the check: the same greedy continuation recomputed without a cache (a full causal forward
  over the whole prefix for every token) gives the same tokens and logits within 1e-4.

The model is too small and too briefly trained to write verse (greedy decoding soon repeats
"the"); the script shows the mechanics. Runs unchanged on CPU and GPU (float32 throughout).
On a 2-core CPU, where flash_attn_jax runs its xla backend, it takes 21 s of CPU time, compiles
included (31-43 s wall-clock on a machine shared with other jobs); on an NVIDIA H200, where it
runs the Pallas Triton kernels, 36 s wall-clock, compiles included. Run from the repository
root: ``python examples/lm_nnx.py``.
"""

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import flash_attn_jax
from _lm_common import (Config, CharTokenizer, attention_backends, check_loss_dropped,
                        generate_and_check, load_text, training_batches)

NUM_STEPS = 300
BATCH_SIZE = 16
LEARNING_RATE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, NUM_STEPS, 1e-3)


class Block(nnx.Module):
    """Pre-norm transformer layer: causal self-attention and an MLP."""

    def __init__(self, config, rngs):
        self.attention_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            in_features=config.d_model, decode=False,
            attention_fn=flash_attn_jax.flax_attention_fn(is_causal=True), rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(config.d_model, 4 * config.d_model, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * config.d_model, config.d_model, rngs=rngs)

    def mlp(self, x):
        return self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))

    def __call__(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(x)

    def extend(self, x, k_cache, v_cache, cache_seqlens):
        """x (batch, length, d_model) appended to the caches at cache_seqlens."""
        h = self.attention_norm(x)
        attention = self.attention
        out, k_cache, v_cache = flash_attn_jax.flash_attn_with_kvcache(
            attention.query(h), k_cache, v_cache, attention.key(h), attention.value(h),
            cache_seqlens=cache_seqlens, causal=True)
        x = x + attention.out(out)
        return x + self.mlp(x), k_cache, v_cache


class CharLM(nnx.Module):
    def __init__(self, config, rngs):
        self.token_embedding = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.position_embedding = nnx.Embed(config.context, config.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.unembed = nnx.Linear(config.d_model, config.vocab_size, rngs=rngs)

    def __call__(self, tokens):
        """Logits (batch, length, vocab) of tokens (batch, length) at positions 0..length-1."""
        x = self.token_embedding(tokens) + self.position_embedding(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.final_norm(x))

    def extend(self, tokens, caches, cache_seqlens):
        positions = cache_seqlens[:, None] + jnp.arange(tokens.shape[1])
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        new_caches = []
        for block, (k_cache, v_cache) in zip(self.blocks, caches):
            x, k_cache, v_cache = block.extend(x, k_cache, v_cache, cache_seqlens)
            new_caches.append((k_cache, v_cache))
        return self.unembed(self.final_norm(x)), tuple(new_caches)


@nnx.jit
def train_step(model, optimizer, inputs, targets):
    def loss_fn(model):
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@nnx.jit(donate_argnums=2)
def extend(model, tokens, caches, cache_seqlens):
    return model.extend(tokens, caches, cache_seqlens)


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

    model = CharLM(config, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(LEARNING_RATE), wrt=nnx.Param)
    batches = training_batches(tokenizer.encode(text), BATCH_SIZE, config.context)
    start = time.perf_counter()
    losses = [float(train_step(model, optimizer, *next(batches))) for _ in range(NUM_STEPS)]
    check_loss_dropped(losses, time.perf_counter() - start)

    generate_and_check(
        extend=lambda tokens, caches, cache_seqlens: extend(model, tokens, caches, cache_seqlens),
        forward=lambda tokens: forward(model, tokens), config=config, tokenizer=tokenizer)


if __name__ == "__main__":
    main()
