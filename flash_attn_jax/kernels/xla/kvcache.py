"""flash_attn_with_kvcache on the blockwise attention of ``dense``.

The append is one scatter of the new keys and values into their slots
(``semantics.cache_write_slots``: positions outside the capacity, missing rows or pages and
later writers of a slot dropped), which XLA performs in place when the caches are donated. The
attention attends each batch row's keys with the row's length (bottom-right aligned, as the
kernels): the cache itself when row b is cache row b, else the keys gathered from the cache row
(``cache_batch_idx``) or pages the row names (``semantics.cache_locations``), starting at its
left padding; keys of missing rows or pages do not exist.
"""

from __future__ import annotations

import jax.numpy as jnp

from flash_attn_jax.kernels.xla import dense
from flash_attn_jax.semantics import cache_locations, cache_write_slots, cache_written


def append(k_cache, v_cache, k, v, starts, batch_idx, table, keep=None):
    """The caches with k, v (B, seqlen_new, Hk, D) written from ``starts`` (B,) on."""
    num_rows, page_size = k_cache.shape[:2]
    capacity = page_size if table is None else table.shape[1] * page_size
    slots = cache_write_slots(starts, k.shape[1], capacity, page_size=page_size,
                              num_rows=num_rows, block_table=table, batch_idx=batch_idx)
    if keep is not None:
        slots = jnp.where(keep != 0, slots, -1)
    return cache_written(k_cache, k, slots), cache_written(v_cache, v, slots)


def attention(q, k_cache, v_cache, lengths, leftpad, batch_idx, table, slopes, spec):
    """(out (B, Sq, H, D), lse (B, H, Sq)) of q over each row's cache positions
    [leftpad, lengths)."""
    batch, seqlen_q = q.shape[:2]
    num_rows, page_size = k_cache.shape[:2]
    capacity = page_size if table is None else table.shape[1] * page_size
    query_lengths = jnp.full((batch,), seqlen_q, jnp.int32)
    if table is None and batch_idx is None and leftpad is None:  # row b's keys: cache row b
        return dense.forward(q, k_cache, v_cache, slopes, spec,
                             lengths=(query_lengths, jnp.clip(lengths, 0, capacity)))
    if leftpad is None:
        leftpad = jnp.zeros((batch,), jnp.int32)
    positions = leftpad[:, None] + jnp.arange(capacity, dtype=jnp.int32)[None, :]
    inside = positions < capacity
    rows, offsets, exists = cache_locations(jnp.minimum(positions, capacity - 1),
                                            page_size=page_size, num_rows=num_rows,
                                            block_table=table, batch_idx=batch_idx)
    keys, values = k_cache[rows, offsets], v_cache[rows, offsets]
    key_lengths = jnp.clip(lengths - leftpad, 0, capacity)
    return dense.forward(q, keys, values, slopes, spec, lengths=(query_lengths, key_lengths),
                         key_valid=inside & exists)
