import sys, jax
sys.path.insert(0, "benchmarks")
import bench_dense as b
from timing import seconds_per_call
for phase in ("fwd_bwd",):
    for d, s, causal in ((128, 4096, False), (128, 4096, True), (64, 4096, True)):
        q, k, v = b.inputs(d, s)
        impls = b.peers(d, causal)
        rates = {}
        for name in ("flash_attn_jax", "cudnn"):
            t = seconds_per_call(b.timed(impls[name], phase), q, k, v)
            rates[name] = b.flops(d, s, causal, phase) / t / 1e12
        print(phase, d, s, causal, {n: round(r) for n, r in rates.items()}, "ratio %.2f" % (rates["flash_attn_jax"] / rates["cudnn"]), flush=True)
