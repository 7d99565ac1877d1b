"""Variable-length attention on the GPU: the work follows the real tokens.

64 sequences of random lengths 1..2048 (a fixed seed), nheads x headdim = 16 x 128, bf16, causal
and not, forward and forward + backward. Each implementation gets the same data:

* flash_attn_jax varlen: the sequences packed into (total, H, D) with cu_seqlens (the backend
  chosen automatically: mosaic-gpu on Hopper), and the same with each GPU backend chosen.
* flash_attn_jax dense (padded): the sequences padded to (64, 2048, H, D), no length information,
  so it computes the full 64 x 2048^2 (what the lengths save).
* cudnn: jax.nn.dot_product_attention on the padded data with query_seq_lengths and
  key_value_seq_lengths.

TFLOP/s count only the real tokens' work: 4 * H * D * sum(L_b^2) forward (halved when causal),
3.5x that forward + backward; so a faster time is a higher rate for every column. The run also
checks that the varlen and cuDNN outputs agree on the real tokens.

    PYTHONPATH=. python benchmarks/bench_varlen.py [--out results.md] [--json results.json]

--json writes the table's numbers (with the device, date, versions and command) to a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import flash_attn_jax as fa
from timing import report, seconds_per_call

NUM_SEQS, MAX_LEN, NHEADS, HEAD_DIM = 64, 2048, 16, 128
CHOSEN = {"flash_attn_jax varlen pallas-triton": "pallas-triton",
          "flash_attn_jax varlen mosaic-gpu": "mosaic-gpu"}


def lengths(seed=0):
    return np.random.default_rng(seed).integers(1, MAX_LEN + 1, NUM_SEQS)


def make_data(seq_lengths):
    total = int(seq_lengths.sum())
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    packed = [jax.random.normal(key, (total, NHEADS, HEAD_DIM), jnp.bfloat16) for key in keys]
    cu = np.concatenate([[0], np.cumsum(seq_lengths)]).astype(np.int32)
    # Padded copies: token t of sequence b at [b, t]; the padding is zero.
    batch_index = np.repeat(np.arange(NUM_SEQS), seq_lengths)
    position = np.arange(total) - cu[batch_index]
    padded = [jnp.zeros((NUM_SEQS, MAX_LEN, NHEADS, HEAD_DIM), jnp.bfloat16).at[batch_index, position].set(x)
              for x in packed]
    return packed, jnp.asarray(cu), padded, (batch_index, position)


def implementations(cu, seq_lengths, causal):
    lens = jnp.asarray(seq_lengths, jnp.int32)
    return {
        "flash_attn_jax varlen": ("packed", lambda q, k, v: fa.flash_attn_varlen_func(
            q, k, v, cu, cu, MAX_LEN, MAX_LEN, causal=causal)),
        **{name: ("packed", lambda q, k, v: fa.flash_attn_varlen_func(
            q, k, v, cu, cu, MAX_LEN, MAX_LEN, causal=causal)) for name in CHOSEN},
        "flash_attn_jax dense (padded)": ("padded", lambda q, k, v: fa.flash_attn_func(
            q, k, v, causal=causal)),
        "cudnn (seq lengths)": ("padded", lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, query_seq_lengths=lens, key_value_seq_lengths=lens,
            implementation="cudnn")),
    }


def timed(attend, phase):
    if phase == "fwd":
        return jax.jit(attend)
    return jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](q))  # q serves as the cotangent


def real_flops(seq_lengths, causal, phase):
    forward = 4 * NHEADS * HEAD_DIM * float(np.sum(seq_lengths.astype(np.float64) ** 2))
    forward /= 2 if causal else 1
    return forward * (1.0 if phase == "fwd" else 3.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    seq_lengths = lengths()
    packed, cu, padded, (batch_index, position) = make_data(seq_lengths)
    device = jax.devices()[0].device_kind
    lines = [f"Varlen, {NUM_SEQS} sequences of lengths 1..{MAX_LEN} (total {int(seq_lengths.sum())} "
             f"tokens, mean {seq_lengths.mean():.0f}), H {NHEADS}, D {HEAD_DIM}, bf16, {device}, "
             f"jax {jax.__version__}, {datetime.date.today().isoformat()}; ms (TFLOP/s of the real "
             "tokens' work)", ""]
    names = list(implementations(cu, seq_lengths, False))
    lines += ["| phase | causal | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    rows = []
    for causal in (False, True):
        impls = implementations(cu, seq_lengths, causal)
        outs = {name: jax.jit(fn)(*(packed if layout == "packed" else padded))
                for name, (layout, fn) in impls.items()}
        varlen_out = np.asarray(outs["flash_attn_jax varlen"], np.float32)
        cudnn_real = np.asarray(outs["cudnn (seq lengths)"], np.float32)[batch_index, position]
        print(f"causal={causal}: max |varlen - cudnn| over real tokens = "
              f"{np.max(np.abs(varlen_out - cudnn_real)):.3g}", flush=True)
        for phase in ("fwd", "fwd_bwd"):
            cells = []
            rows.append({"phase": phase, "causal": causal, "ms": {}, "tflops": {}})
            for name, (layout, fn) in impls.items():
                inputs = packed if layout == "packed" else padded
                try:
                    with fa.use_backend(CHOSEN.get(name)):  # part of the jit cache key
                        used = set(fa.backends_used(timed(fn, phase), *inputs).values())
                        if name in CHOSEN and used != {CHOSEN[name]}:
                            cells.append(f"not run ({', '.join(sorted(used))} ran)")
                            continue
                        seconds = seconds_per_call(timed(fn, phase), *inputs)
                    rate = real_flops(seq_lengths, causal, phase) / seconds / 1e12
                    cells.append(f"{seconds * 1e3:.2f} ({rate:.0f})")
                    rows[-1]["ms"][name], rows[-1]["tflops"][name] = seconds * 1e3, rate
                except Exception as error:  # report a failing peer, keep going
                    cells.append(f"failed: {type(error).__name__}")
            lines.append(f"| {phase} | {'y' if causal else 'n'} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    report(lines, args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "bench_varlen.py", "device": device,
                       "date": datetime.date.today().isoformat(), "jax": jax.__version__,
                       "command": " ".join(["python"] + sys.argv),
                       "seq_lengths": [int(n) for n in seq_lengths], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
