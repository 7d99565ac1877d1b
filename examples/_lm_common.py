"""What the example language models share: the text and its characters as tokens, the model's
sizes, training batches, and greedy generation with a KV cache checked against generation
without one.

The models plug in two functions of the same weights:

- ``forward(tokens) -> logits``: the full causal forward, tokens (batch, length) int32, logits
  (batch, length, vocab) float32; the uncached reference (and the training forward).
- ``extend(tokens, caches, cache_seqlens) -> (logits, caches)``: appends tokens (batch, length)
  to each row of the caches at that row's ``cache_seqlens`` (int32 (batch,)) and returns their
  logits and the updated caches, jitted with the caches donated. Prefill and each decoding step
  are the same call with another length.
"""

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import flash_attn_jax

TEXT_PATH = Path(__file__).parent / "data" / "sonnets.txt"
PROMPTS = ("Shall I compare thee", "When I do count the clock")


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    context: int = 64  # positions: training windows and the KV cache capacity
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention: 2 query heads per key/value head
    num_layers: int = 2

    @property
    def head_dim(self):
        return self.d_model // self.num_heads


def attention_backends(config, batch_size, dtype=jnp.float32):
    """Which flash_attn_jax backend runs the training's attention, {"forward": name, "backward":
    name} (traced abstractly at the model's shapes: nothing runs)."""
    def shape(heads):
        return jax.ShapeDtypeStruct((batch_size, config.context, heads, config.head_dim), dtype)

    def loss(q, k, v):
        return flash_attn_jax.flash_attn_func(q, k, v, causal=True).sum()

    return flash_attn_jax.backends_used(jax.grad(loss, argnums=(0, 1, 2)), shape(config.num_heads),
                                        shape(config.num_kv_heads), shape(config.num_kv_heads))


class CharTokenizer:
    """Each character of the text is a token."""

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text):
        return np.array([self.ids[c] for c in text], np.int32)

    def decode(self, ids):
        return "".join(self.chars[i] for i in np.asarray(ids))


def load_text():
    return TEXT_PATH.read_text()


def training_batches(tokens, batch_size, length, seed=0):
    """Endless (inputs, targets) pairs of random windows, targets shifted by one token."""
    rng = np.random.default_rng(seed)
    offsets = np.arange(length + 1)
    while True:
        starts = rng.integers(0, len(tokens) - length - 1, batch_size)
        windows = tokens[starts[:, None] + offsets]
        yield windows[:, :-1], windows[:, 1:]


def check_loss_dropped(losses, seconds):
    first, last = losses[0], float(np.mean(losses[-10:]))
    print(f"trained {len(losses)} steps in {seconds:.1f} s (compile included): "
          f"loss {first:.3f} -> {last:.3f}")
    assert last < 0.7 * first, f"the loss did not drop clearly: {first:.3f} -> {last:.3f}"


def empty_caches(config, batch_size, dtype=jnp.float32):
    """One (k_cache, v_cache) pair per layer, (batch, context, num_kv_heads, head_dim) each."""
    shape = (batch_size, config.context, config.num_kv_heads, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(config.num_layers))


def padded_prompts(tokenizer, prompts):
    """The prompts' tokens left-aligned in one (batch, longest) array, and their lengths."""
    encoded = [tokenizer.encode(p) for p in prompts]
    lengths = np.array([len(e) for e in encoded], np.int32)
    tokens = np.zeros((len(encoded), lengths.max()), np.int32)
    for row, e in enumerate(encoded):
        tokens[row, :len(e)] = e
    return tokens, lengths


def greedy_with_cache(extend, caches, prompt_tokens, prompt_lengths, num_new):
    """Prefill the padded prompts in one call, then decode one token per call.

    Each row's cache holds its prompt's real tokens (``cache_seqlens`` = its length); the
    padding written after them is overwritten by the tokens generated next, never attended.
    Returns the new tokens (batch, num_new) and the logits that chose them (batch, num_new,
    vocab)."""
    rows = np.arange(len(prompt_lengths))
    cache_seqlens = jnp.zeros(len(prompt_lengths), jnp.int32)
    logits, caches = extend(jnp.asarray(prompt_tokens), caches, cache_seqlens)
    next_logits = logits[rows, prompt_lengths - 1]
    cache_seqlens = jnp.asarray(prompt_lengths)
    new_tokens, chosen_logits = [], []
    for step in range(num_new):
        next_token = jnp.argmax(next_logits, axis=-1).astype(jnp.int32)
        new_tokens.append(next_token)
        chosen_logits.append(next_logits)
        if step + 1 < num_new:
            logits, caches = extend(next_token[:, None], caches, cache_seqlens)
            next_logits = logits[:, 0]
            cache_seqlens = cache_seqlens + 1
    return jnp.stack(new_tokens, 1), jnp.stack(chosen_logits, 1)


def greedy_without_cache(forward, context, prompt_tokens, prompt_lengths, num_new):
    """The same greedy decoding, each token from a full causal forward over its whole prefix.

    The prefixes sit left-aligned in a (batch, context) buffer: causal attention makes the
    positions after a row's prefix irrelevant, so one compiled forward serves every step."""
    rows = np.arange(len(prompt_lengths))
    buffer = np.zeros((len(prompt_lengths), context), np.int32)
    buffer[:, :prompt_tokens.shape[1]] = prompt_tokens
    new_tokens, chosen_logits = [], []
    for step in range(num_new):
        next_logits = forward(jnp.asarray(buffer))[rows, prompt_lengths - 1 + step]
        next_token = np.asarray(jnp.argmax(next_logits, axis=-1))
        buffer[rows, prompt_lengths + step] = next_token
        new_tokens.append(next_token)
        chosen_logits.append(next_logits)
    return np.stack(new_tokens, 1), jnp.stack(chosen_logits, 1)


def generate_and_check(extend, forward, config, tokenizer, max_logit_diff=1e-4):
    """Greedy continuations of PROMPTS with the KV cache, checked against decoding without it:
    identical tokens, logits within ``max_logit_diff``. Prints the text and timings."""
    prompt_tokens, prompt_lengths = padded_prompts(tokenizer, PROMPTS)
    num_new = config.context - int(prompt_lengths.max())
    caches = empty_caches(config, len(PROMPTS))

    start = time.perf_counter()
    cached_tokens, cached_logits = jax.block_until_ready(
        greedy_with_cache(extend, caches, prompt_tokens, prompt_lengths, num_new))
    cached_seconds = time.perf_counter() - start
    assert all(k.is_deleted() and v.is_deleted() for k, v in caches), "caches not donated"

    start = time.perf_counter()
    uncached_tokens, uncached_logits = jax.block_until_ready(
        greedy_without_cache(forward, config.context, prompt_tokens, prompt_lengths, num_new))
    uncached_seconds = time.perf_counter() - start

    for prompt, row in zip(PROMPTS, np.asarray(cached_tokens)):
        print(f"--- {prompt!r} ->\n{prompt}{tokenizer.decode(row)}")
    print(f"generated {num_new} tokens x {len(PROMPTS)} prompts: with the KV cache "
          f"{cached_seconds:.1f} s (prefill + {num_new - 1} decoding steps, compile included), "
          f"without it {uncached_seconds:.1f} s ({num_new} full forwards)")
    logit_diff = float(jnp.max(jnp.abs(cached_logits - uncached_logits)))
    assert np.array_equal(np.asarray(cached_tokens), uncached_tokens), \
        "cached and uncached greedy decoding chose different tokens"
    assert logit_diff <= max_logit_diff, f"logits differ by {logit_diff:.2e}"
    print(f"KV-cache decoding matches decoding without a cache: same tokens, "
          f"max |logit difference| {logit_diff:.1e}")
