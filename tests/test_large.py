"""Large shapes (seqlen 1k-8k, head dim 64/128/256) on the GPU, against the reference."""

import pytest

from helpers import DTYPE_IDS, DTYPES, run_case
from test_varlen import run_varlen_case

pytestmark = pytest.mark.gpu

LARGE_CASES = [
    # (seqlen_q, seqlen_k, head_dim, nheads, nheads_k, options)
    (1024, 1024, 64, 8, 8, dict()),
    (1024, 1024, 128, 8, 2, dict(causal=True)),
    (2048, 2048, 256, 4, 4, dict(causal=True)),
    (2048, 4096, 128, 8, 1, dict(window_size=(512, 256), alibi=True)),
    (4096, 4096, 128, 8, 2, dict(causal=True, alibi=True)),
    (4096, 1000, 256, 4, 2, dict(causal=True, softcap=30.0, q_scale=30.0)),
    (1023, 8192, 64, 4, 4, dict(causal=True)),
    (8192, 8192, 64, 4, 1, dict(causal=True)),
    (8192, 8192, 128, 2, 2, dict(window_size=(1024, 0))),
    (4097, 4099, 96, 4, 2, dict()),
]


@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: f"{c[0]}x{c[1]}-d{c[2]}-{c[3]}/{c[4]}-{c[5]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large(dtype, case):
    seqlen_q, seqlen_k, head_dim, nheads, nheads_k, options = case
    run_case(17, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, nheads=nheads,
             nheads_k=nheads_k, dtype=dtype, batch=1, **options)


VARLEN_CASES = [
    # (sequences (seqlen_q, seqlen_k), padding tokens, head_dim, (nheads, nheads_k), options)
    ([(1000, 1000), (2048, 2048), (1, 3000), (3000, 517), (0, 0), (777, 4096)], (100, 50), 128,
     (8, 2), dict(causal=True)),
    ([(4096, 4096), (1500, 2500), (33, 1)], (0, 7), 64, (4, 4), dict(window_size=(256, 0), alibi=True)),
    ([(2000, 2000), (1024, 1024), (2047, 2049)], (0, 0), 256, (4, 1), dict()),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"d{c[2]}-{c[3][0]}/{c[3][1]}-{c[4]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_varlen(dtype, case):
    seqlens, tail, head_dim, heads, options = case
    run_varlen_case(18, seqlens, tail, dtype=dtype, head_dim=head_dim, heads=heads, **options)
