"""flash_attn_jax demo: attention on random data, checked against the reference, with timings.

Runs on whatever JAX finds: the Triton-compiled kernels on a GPU, Pallas interpret mode elsewhere
(slow: it exists to test the kernels, so the shapes shrink there).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import flash_attn_jax as fa


def median_time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def max_error(x, ref):
    return float(jnp.max(jnp.abs(x.astype(jnp.float32) - ref.astype(jnp.float32))))


def main():
    on_gpu = jax.default_backend() == "gpu"
    batch, seqlen, nheads, nheads_k, head_dim = (4, 4096, 16, 4, 128) if on_gpu else (1, 256, 4, 2, 64)
    dtype = jnp.bfloat16
    repeats = 20 if on_gpu else 3
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"flash_attn_jax {fa.__version__} kernels: {fa.backend_name()}")
    print(f"shape: batch {batch}, seqlen {seqlen}, heads {nheads} (kv heads {nheads_k}), "
          f"head dim {head_dim}, {jnp.dtype(dtype).name}, causal")

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (batch, seqlen, nheads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seqlen, nheads_k, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seqlen, nheads_k, head_dim), dtype)
    cotangent = jax.random.normal(keys[3], q.shape, dtype)

    flash = jax.jit(lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=False))
    reference = jax.jit(lambda q, k, v: fa.attention_reference(q, k, v, causal=True)[0])
    low_precision = jax.jit(lambda q, k, v: fa.attention_reference(q, k, v, causal=True, upcast=False)[0])

    # Forward: flash-attn's rule, error <= 2x the error of the same math done in bf16.
    out, ref, pt = flash(q, k, v), reference(q, k, v), low_precision(q, k, v)
    err, base = max_error(out, ref), max_error(pt, ref)
    status = "ok" if err <= 2 * base + 1e-5 else "FAILED"
    print(f"forward : max |out - ref| = {err:.2e} (bf16 reference: {base:.2e}) {status}")

    # Backward: gradients against the reference's autodiff (rule: 3x).
    def grads(attend):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) *
                                                        cotangent.astype(jnp.float32)),
                                argnums=(0, 1, 2)))
    flash_grads = grads(flash)
    try:
        dq, dk, dv = flash_grads(q, k, v)
    except NotImplementedError as error:
        flash_grads = None
        print(f"backward: not available yet ({error})")
    else:
        ref_grads, pt_grads = grads(reference)(q, k, v), grads(low_precision)(q, k, v)
        for name, g, r, p in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, pt_grads):
            err, base = max_error(g, r), max_error(p, r)
            status = "ok" if err <= 3 * base + 2e-4 else "FAILED"
            print(f"backward: max |{name} - ref| = {err:.2e} (bf16 reference: {base:.2e}) {status}")

    flops = 4 * batch * nheads * seqlen * seqlen * head_dim / 2  # causal
    for name, fn in (("flash_attn_jax", flash), ("reference (jnp)", reference)):
        seconds = median_time(fn, q, k, v, repeats=repeats)
        print(f"forward  {name:16s} {seconds * 1e3:9.2f} ms  {flops / seconds / 1e12:7.2f} TFLOP/s")
    if flash_grads is not None:
        for name, fn in (("flash_attn_jax", flash_grads), ("reference (jnp)", grads(reference))):
            seconds = median_time(fn, q, k, v, repeats=repeats)
            print(f"fwd+bwd  {name:16s} {seconds * 1e3:9.2f} ms  {3.5 * flops / seconds / 1e12:7.2f} TFLOP/s")


if __name__ == "__main__":
    main()
