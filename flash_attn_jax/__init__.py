"""FlashAttention for JAX: flash-attn's Python interface as Pallas kernels.

Public functions keep flash-attn's (batch, seqlen, nheads, headdim) layout and argument semantics;
see README.md for the differences (explicit ``dropout_key``, caches returned instead of mutated).
"""

from flash_attn_jax._validation import DtypeError
from flash_attn_jax.adapters import dot_product_attention, flax_attention_fn
from flash_attn_jax.interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from flash_attn_jax.kernels import backend_name, backends_used, set_backend, use_backend
from flash_attn_jax.reference import attention_reference, dropout_mask, kvcache_reference
from flash_attn_jax.ring import from_ring_layout, ring_flash_attn_func, to_ring_layout
from flash_attn_jax.semantics import ScoreSpec

__version__ = "0.1.0"

__all__ = [
    "DtypeError",
    "ScoreSpec",
    "attention_reference",
    "backend_name",
    "backends_used",
    "dot_product_attention",
    "dropout_mask",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "flax_attention_fn",
    "from_ring_layout",
    "kvcache_reference",
    "ring_flash_attn_func",
    "set_backend",
    "to_ring_layout",
    "use_backend",
]
