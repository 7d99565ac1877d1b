"""The Pallas Mosaic GPU kernels for Hopper (sm90): TMA loads, asynchronous wgmma,
warp-specialized producer and compute warpgroups.

Backend ``mosaic-gpu``. Covers today: the dense and varlen forward and backward (deterministic:
no atomics; or dQ added by TMA reductions) in float16 and bfloat16 at head dims 64, 128 and 256,
with every mask (causal, windows), softcap, ALiBi, GQA/MQA and the lse and its cotangent; dense
sequence lengths in 8s (the last tiles read zeros past the ends and their writes are clipped),
varlen ones of any length (``varlen``: the sequences gathered at tile-aligned offsets, contiguous
keys only); dropout (``dropout``: ``semantics.py``'s keep mask bit for bit, hashed on the wgmma
registers) in the forward and the backward (``DROPOUT_BACKWARD_HEAD_DIMS``: all three head
dims); every other call (paged keys, sequence shards, the KV cache, S_dmask) goes to the next
backend. It is the automatic choice on Hopper for what it covers: on an H200 its tests pass,
the head dim 256 backward, lengths that end inside tiles, varlen and dropout included
(tests/test_mosaic_gpu.py, tests/test_mosaic_dropout.py, with tests/test_varlen.py and
tests/test_dropout.py), and so do the dense, hardening and varlen files of the suite with it
chosen (370 passed on 2026-11-30). Its kernels lower on a machine without a GPU when the CUDA
plugin's Python extensions are installed (``jax-cuda13-plugin``),
which the lowering tests use, and run on a CPU under JAX's GPU interpret mode
(``plgpu.force_gpu_interpret_mode()``; test_interpreted_against_the_reference and
test_interpreted_varlen_against_the_reference).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from flash_attn_jax.kernels.mosaic_gpu import backward as _backward
from flash_attn_jax.kernels.mosaic_gpu import dropout as _dropout
from flash_attn_jax.kernels.mosaic_gpu import forward as _forward
from flash_attn_jax.kernels.mosaic_gpu import varlen as _varlen
from flash_attn_jax.kernels.registry import Backend, Request
from flash_attn_jax.kernels.tuning import HOPPER, TuningTable, gpu_generation

_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
HEAD_DIMS = (64, 128, 256)

# head dim -> blocks by query length: ((from length, config), ...), the first entry from 0; a
# call takes the last entry whose length its queries reach (``forward_config``). Shared memory per
# program: its query rows plus ``stages`` key and value blocks, within Hopper's 227 KiB (d256:
# 64 + 128 KiB). Swept on an H200 at S 4096 (bf16, benchmarks/RESULTS.md, TFLOP/s non-causal /
# causal): d 64 (64, 128, 2) 403 / 349, 3 stages 382 / 349, (128, 128, 2) 416 / 232; d 128
# (64, 128, 2) 545 / 474, the next (128, 64, 2) 500 / 373; d 256 only (64, 64, 2) fits.
# Schedules (forward.ForwardConfig, RESULTS.md 1.2): the wait for the next key block under the
# P V wgmma gains 0-6 % at every head dim; dropping the warpgroups' turns loses 1-6 %.
# From 2048 queries, three compute warpgroups without turns (programs of 192 rows), at head dims
# 64 and 128 (at 256 a 64 x 256 float32 accumulator is 128 of their 160 registers). H200,
# 2026-12-02, forward TFLOP/s two / three warpgroups (benchmarks/RESULTS.md section 1),
# non-causal, causal: d 64 S 2k 390-398 / 427, 334-337 / 335 (two timed twice); S 4k 416 / 454,
# 386 / 388; S 8k 430 / 481, 412 / 435; S 16k 438 / 493, 432 / 461; d 128 S 2k 530-532 / 570,
# 454-462 / 459; S 4k 561 / 601, 522 / 519; S 8k 585 / 625, 564 / 583; S 16k 601 / 639,
# 589 / 608. At S 1k they lose (d 64 365 / 360, 263 / 245; d 128 481 / 479, 367 / 327): a
# head's 1024 queries make 5 1/3 programs of 192 rows, and causal programs have less work under
# the diagonal to hide a program's start. Varlen calls keep the first entry (their sequences are
# tiled per program; not measured with three).
LONG_QUERIES = 2048
_TWO_WARPGROUPS = _forward.ForwardConfig(block_q=64, block_k=128, stages=2, key_wait_under_pv=True)
_THREE_WARPGROUPS = dataclasses.replace(_TWO_WARPGROUPS, compute_warpgroups=3, pingpong=False)
FORWARD_TABLE = TuningTable({
    64: ((0, _TWO_WARPGROUPS), (LONG_QUERIES, _THREE_WARPGROUPS)),
    128: ((0, _TWO_WARPGROUPS), (LONG_QUERIES, _THREE_WARPGROUPS)),
    256: ((0, _forward.ForwardConfig(block_q=64, block_k=64, stages=2, key_wait_under_pv=True)),),
})


# The backward keeps dK and dV (or dQ) of 64 rows per warpgroup in registers: at head dim 256
# that would be 256 registers a thread for dK and dV alone, so there dV and dK take a pass each,
# and the dK pass and the dQ kernel stream blocks of 32 to fit their shared memory (keys and
# values, or queries and output gradients, of 2 x 64 rows are 128 KiB). head dim -> blocks in
# order of preference; a call takes the first whose programs tile its lengths (the larger dQ
# program needs query lengths in 256s), else the last (its last tiles partial). Swept at S 4096
# (forward + backward TFLOP/s, non-causal / causal): d 64 (128, 64, 2) 363 / 313, (64, 64, 2)
# 340 / 296; d 128 (64, 64, 2) 446 / 400, (128, 64, 2) 332 / 265, 128-key blocks 140-304.
# d 256, the two passes (H200, benchmarks/RESULTS.md section 1): forward + backward 390 / 344 at
# S 4096, 408 / 378 at S 16384 (cuDNN 416 / 366 and 410 / 412; with the Triton backward it was
# 270 / 239 and 256 / 256).
# deterministic=False (flash-attn's default) adds dQ in the dK/dV kernel (5 matmuls a tile, not
# 7) where the blocks allow; forward + backward on the H200 (RESULTS.md section 1), TFLOP/s
# added / separate dQ kernel, S 1k, 4k, 16k non-causal: d 64 340 / 325, 402 / 368, 432 / 379;
# d 128 372 / 392, 448 / 445, 487 / 471: at head dim 128 from 4096 keys only.
BACKWARD_TABLE = TuningTable({
    64: (_backward.BackwardConfig(block_q=128, block_k=64, stages=2),
         _backward.BackwardConfig(block_q=64, block_k=64, stages=2)),
    128: (_backward.BackwardConfig(block_q=64, block_k=64, stages=2, fuse_dq_from=4096),),
    256: (_backward.BackwardConfig(block_q=64, block_k=64, stages=2, split_dkdv=True,
                                   dk_block_q=32, dq_block_k=32),),
})


def forward_config(head_dim: int, seqlen_q: int = 0) -> _forward.ForwardConfig:
    """The forward's blocks at ``head_dim`` for ``seqlen_q`` queries a sequence (0: the first
    entry, which varlen calls take)."""
    chosen = None
    for from_length, config in FORWARD_TABLE.lookup(head_dim, HOPPER):
        if seqlen_q >= from_length:
            chosen = config
    return chosen


def backward_configs(head_dim: int, *, dropout: bool = False
                     ) -> tuple[_backward.BackwardConfig, ...]:
    """The backward's blocks at ``head_dim``, in order of preference. With dropout those of 64
    streamed queries where there are any: the dK/dV step then holds block_q x block_k tiles of S,
    dP, P and the keep factor per warpgroup (``backward._query_major_step``); at head dim 64 the
    128-query blocks spill (ptxas, S 4096: 436 bytes against none) and lost to the Triton
    backward on the H200."""
    configs = BACKWARD_TABLE.lookup(head_dim, HOPPER)
    if dropout:
        configs = tuple(config for config in configs if config.block_q == 64) or configs
    return configs


def backward_config(head_dim: int, seqlen_q: int, seqlen_k: int, *, dropout: bool = False
                    ) -> _backward.BackwardConfig:
    """The first of the head dim's blocks whose programs tile the lengths, else the last (the
    smallest programs: the least work past the ends)."""
    configs = backward_configs(head_dim, dropout=dropout)
    for config in configs:
        if not seqlen_q % config.rows_per_program and not seqlen_k % config.keys_per_program:
            return config
    return configs[-1]


# Head dims whose backward with dropout runs here. With dropout the dK/dV kernel works on queries x
# keys tiles (one hash per 16 elements; P and dS reach the dV and dK wgmmas transposed through
# shared memory) of 64 streamed queries (``backward_configs``); at head dim 256 so does its dV
# pass, while the dK pass (32 streamed queries) keeps keys x queries tiles (a hash per 2
# elements). Forward + backward with dropout 0.1 on the H200
# (RESULTS.md 8.1, TFLOP/s, S 4096 non-causal / causal): head dim 128 344 / 309 (with the Triton
# backward 325 / 287), 256 279 / 264 (the Triton backward without dropout: 270); head dim 64 242 /
# 226 against 230 / 220 with the Triton backward (geomean over its 6 shapes 1.02x; 128-query
# blocks lost: 205 / 179). Since 2026-12-03 the dK/dV kernel also adds dQ with dropout
# (deterministic=False, head dims 64 and 128, any length), where a dQ kernel hashed the mask again:
# dropout 0.1 costs +24 % forward + backward over the 16 shapes (+43 % before over the 12 of head
# dims 64 and 128; RESULTS.md 8.1).
DROPOUT_BACKWARD_HEAD_DIMS = (64, 128, 256)


def _unsupported(request: Request) -> str | None:
    """Why the kernels cannot run ``request`` (None if they can)."""
    if request.dtype not in _DTYPES:
        return "float16 and bfloat16 only"
    if request.head_dim not in HEAD_DIMS:
        return f"head dims {HEAD_DIMS} only"
    if request.paged:
        return "contiguous keys only (no block table)"
    if (request.op == "backward" and request.spec is not None and request.spec.has_dropout
            and request.head_dim not in DROPOUT_BACKWARD_HEAD_DIMS):
        return "dropout's backward at this head dim is faster on the next backend"
    if request.positions:
        return "no sequence shards yet"
    if request.out_dtype not in (None, request.dtype):
        return "output in the inputs' dtype only"
    if request.varlen:  # packed at tile-aligned offsets: any lengths
        return None
    if len(request.q_shape) != 4 or len(request.k_shape) != 4:
        return "the dense layout only"
    if not request.q_shape[1] or not request.k_shape[1]:
        return "at least one query and one key"
    if request.q_shape[1] % 8 or request.k_shape[1] % 8:
        # A TMA copy into tiled shared memory takes its rows in whole tiles of 8.
        return "query and key lengths a multiple of 8 only"
    return None


class MosaicGPU(Backend):
    """The Mosaic GPU kernels (see the module docstring for what they cover)."""

    name = "mosaic-gpu"
    automatic = True  # on Hopper (supports() declines other platforms and generations)

    def supports(self, request: Request) -> str | None:
        if request.op not in ("forward", "backward"):
            return f"no {request.op} kernel yet"
        if request.platform is not None:
            if request.platform != "gpu":
                return "it compiles for GPUs only"
            if gpu_generation() != HOPPER:
                return "it needs a Hopper GPU (sm90)"
        return _unsupported(request)

    def forward(self, q, k, v, slopes, spec, varlen=None, seed=None, *, placement=None,
                out_dtype=None):
        dropout_words = _dropout.words(seed, placement) if spec.has_dropout else None
        if varlen is not None:
            return _varlen.forward(q, k, v, slopes, spec, varlen, forward_config(q.shape[-1]),
                                   dropout_words)
        return _forward.forward(q, k, v, slopes, spec, forward_config(q.shape[-1], q.shape[1]),
                                dropout_words=dropout_words)

    def backward(self, q, k, v, slopes, out, lse, dout, dlse, spec, varlen=None, seed=None, *,
                 placement=None, grad_dtype=None, delta=None):
        dropout_words = _dropout.words(seed, placement) if spec.has_dropout else None
        if varlen is not None:
            # the packing aligns to its tiles
            config = backward_configs(q.shape[-1], dropout=spec.has_dropout)[0]
            return _varlen.backward(q, k, v, slopes, out, lse, dout, dlse, spec, varlen, config,
                                    delta=delta, deterministic=spec.deterministic,
                                    dropout_words=dropout_words)
        config = backward_config(q.shape[-1], q.shape[1], k.shape[1], dropout=spec.has_dropout)
        return _backward.backward(q, k, v, slopes, out, lse, dout, dlse, spec, config,
                                  delta=delta, deterministic=spec.deterministic,
                                  dropout_words=dropout_words)
