"""Property-based tests (hypothesis): random valid calls against the reference under flash-attn's
tolerance rule, and random invalid calls against the error policy.

The examples are derandomized (a fixed sequence per test) and bounded, so the suite's time and
results do not vary from run to run. Each valid example compiles its own kernels in interpret
mode (seconds on CPU), hence the small counts; the invalid ones fail at trace time and are many.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flash_attn_jax as fa
from conftest import ON_GPU
from helpers import DTYPES, run_case
from test_dropout import run_dropout_case
from test_kvcache import run_kvcache_case
from test_varlen import run_varlen_case


def _settings(examples):
    # On a GPU, where an example costs little, four times as many.
    return settings(max_examples=examples * (4 if ON_GPU else 1), deadline=None,
                    derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


HEADS = [(1, 1), (2, 1), (2, 2), (4, 2), (4, 1), (3, 3)]
WINDOW_SIDE = st.one_of(st.just(-1), st.integers(0, 80), st.sampled_from([2**31 - 1, 2**40]))


@st.composite
def dense_calls(draw):
    heads = draw(st.sampled_from(HEADS))
    options = dict(causal=draw(st.booleans()))
    window = (draw(WINDOW_SIDE), draw(WINDOW_SIDE))
    if window != (-1, -1):
        options["window_size"] = window
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([2.0, 30.0]))
    if draw(st.booleans()):
        options["softmax_scale"] = draw(st.sampled_from([0.05, 0.3, 1.0]))
    return dict(dtype=draw(st.sampled_from(DTYPES)), batch=draw(st.integers(1, 2)),
                seqlen_q=draw(st.integers(1, 70)), seqlen_k=draw(st.integers(1, 70)),
                nheads=heads[0], nheads_k=heads[1],
                head_dim=draw(st.sampled_from([8, 16, 24, 32, 40, 64, 96])),
                alibi=draw(st.booleans()), q_scale=draw(st.sampled_from([1.0, 4.0])),
                dropout=draw(st.booleans()), options=options)


@_settings(6)
@given(dense_calls())
def test_random_dense_calls_match_the_reference(call):
    options = call.pop("options")
    dropout = call.pop("dropout")
    if dropout:  # (the dropout case's inputs have batch 2 and 4 query heads)
        call.pop("batch")
        call.pop("nheads")
        call["nheads_k"] = call["nheads_k"] if 4 % call["nheads_k"] == 0 else 2
        run_dropout_case(0, **call, dropout_p=0.2, **options)
    else:
        run_case(0, d_lse=True, **call, **options)


@st.composite
def varlen_calls(draw):
    batch = draw(st.integers(1, 4))
    lengths = [(draw(st.integers(0, 40)), draw(st.integers(0, 40))) for _ in range(batch)]
    if all(sq == 0 for sq, _ in lengths):
        lengths[0] = (1, lengths[0][1])
    options = dict(causal=draw(st.booleans()))
    if draw(st.booleans()):
        options["window_size"] = (draw(WINDOW_SIDE), draw(WINDOW_SIDE))
    if draw(st.booleans()):
        options["softcap"] = 10.0
    return dict(seqlens=lengths, tail=(draw(st.integers(0, 5)), draw(st.integers(0, 5))),
                dtype=draw(st.sampled_from(DTYPES)),
                head_dim=draw(st.sampled_from([16, 40, 64])),
                heads=draw(st.sampled_from(HEADS)), alibi=draw(st.booleans()),
                max_extra=draw(st.integers(0, 3)), options=options)


@_settings(4)
@given(varlen_calls())
def test_random_varlen_calls_match_the_reference(call):
    options = call.pop("options")
    run_varlen_case(0, call.pop("seqlens"), call.pop("tail"), **call, **options)


@st.composite
def cache_calls(draw):
    heads = draw(st.sampled_from(HEADS))
    seqlen_q = draw(st.integers(1, 6))
    paged = draw(st.booleans())
    shape = dict(batch=draw(st.integers(1, 3)), seqlen_q=seqlen_q,
                 seqlen_new=draw(st.sampled_from([0, seqlen_q])), nheads=heads[0],
                 nheads_k=heads[1], head_dim=draw(st.sampled_from([16, 48, 64])),
                 capacity=draw(st.integers(8, 90)), alibi=draw(st.booleans()),
                 leftpad=draw(st.booleans()))
    if paged:
        shape["page_size"] = draw(st.sampled_from([16, 32]))
    else:
        shape["batch_idx"] = draw(st.booleans())
    if shape["seqlen_new"] and draw(st.booleans()):
        shape["rotary_dim"] = draw(st.sampled_from([8, 16]))
    options = dict(causal=draw(st.booleans()), num_splits=draw(st.sampled_from([0, 1, 3])))
    if draw(st.booleans()):
        options["window_size"] = (draw(WINDOW_SIDE), draw(WINDOW_SIDE))
    if draw(st.booleans()):
        options["softcap"] = 8.0
    return dict(dtype=draw(st.sampled_from(DTYPES)), options=options, **shape)


@_settings(5)
@given(cache_calls())
def test_random_cache_calls_match_the_reference(call):
    run_kvcache_case(0, **call)


# ----------------------------------------------------------------------------------------------
# Invalid calls: a ValueError or TypeError, at trace time, never anything else.

Q = np.zeros((2, 8, 4, 16), np.float32)
K = np.zeros((2, 8, 2, 16), np.float32)

# Each entry: (argument name, a strategy of values every one of which is invalid for it).
BAD_DENSE_ARGUMENTS = {
    "q": st.sampled_from([np.zeros((8, 4, 16), np.float32), np.zeros((2, 8, 4, 300), np.float32),
                          np.zeros((2, 8, 3, 16), np.float32), np.zeros((2, 8, 4, 16), np.int32),
                          np.zeros((2, 8, 4, 16), np.float64), [[1.0]], "q", None]),
    "k": st.sampled_from([np.zeros((3, 8, 2, 16), np.float32), np.zeros((2, 8, 2, 8), np.float32),
                          np.zeros((2, 8, 0, 16), np.float32), np.zeros((2, 8, 2, 16), np.float16)]),
    "dropout_p": st.one_of(st.floats(max_value=-1e-9, allow_nan=False), st.floats(min_value=1.0),
                           st.just(float("nan")), st.just("0.1")),
    "softmax_scale": st.one_of(st.floats(min_value=3.5e38), st.floats(max_value=-3.5e38),
                               st.sampled_from([float("nan"), float("inf"), "1", [1.0], True])),
    "causal": st.sampled_from([1, 0, "yes", None, np.array([True, False])]),
    "window_size": st.one_of(st.tuples(st.integers(max_value=-2), st.integers(-1, 5)),
                             st.tuples(st.integers(-1, 5), st.integers(max_value=-2)),
                             st.sampled_from([(1,), (1, 2, 3), (1.5, 0), 3, "ab", None])),
    "softcap": st.one_of(st.floats(min_value=3.5e38),
                         st.sampled_from([float("nan"), None, "1", 1e-45])),
    "alibi_slopes": st.sampled_from([np.zeros((3,), np.float32), np.zeros((4,), np.float16),
                                     np.zeros((2, 2, 4), np.float32),
                                     np.full((4,), np.inf, np.float32), "slopes"]),
    "deterministic": st.sampled_from([1, None, "no"]),
    "return_attn_probs": st.sampled_from([1, None, "no"]),
}


@_settings(60)
@given(st.sampled_from(sorted(BAD_DENSE_ARGUMENTS)).flatmap(
    lambda name: st.tuples(st.just(name), BAD_DENSE_ARGUMENTS[name])))
def test_random_invalid_dense_calls_raise(bad):
    name, value = bad
    args = dict(q=Q, k=K, v=K) | {name: value}
    if name == "k":
        args["v"] = value
    with pytest.raises((ValueError, TypeError)):
        fa.flash_attn_func(**args)


VQ = np.zeros((20, 4, 16), np.float32)
VK = np.zeros((24, 2, 16), np.float32)


@st.composite
def bad_varlen_calls(draw):
    """cu_seqlens / max_seqlen combinations that are wrong with the concrete values."""
    kind = draw(st.sampled_from(["start", "decreasing", "past", "max", "dtype", "rank"]))
    cu_q = np.array([0, 8, 20], np.int64)
    cu_k = np.array([0, 12, 24], np.int64)
    max_q, max_k = 12, 12
    if kind == "start":
        cu_q[0] = draw(st.integers(1, 8))
    elif kind == "decreasing":
        cu_k[1] = draw(st.integers(25, 2**31 - 1))
    elif kind == "past":
        cu_q[-1] = draw(st.integers(21, 2**40))
    elif kind == "max":
        max_q = draw(st.integers(0, 11))
    elif kind == "dtype":
        cu_q = cu_q.astype(draw(st.sampled_from([np.float32, np.uint32, np.bool_])))
    else:
        cu_q = cu_q[None]
    return cu_q, cu_k, max_q, max_k


@_settings(40)
@given(bad_varlen_calls())
def test_random_invalid_varlen_calls_raise(call):
    cu_q, cu_k, max_q, max_k = call
    with pytest.raises((ValueError, TypeError)):
        fa.flash_attn_varlen_func(VQ, VK, VK, cu_q, cu_k, max_q, max_k)


@st.composite
def bad_cache_calls(draw):
    kind = draw(st.sampled_from(["seqlens", "seqlens_int", "batch_idx", "leftpad", "rotary",
                                 "page"]))
    args = dict(q=np.zeros((2, 1, 4, 16), np.float32), k_cache=np.zeros((3, 32, 2, 16), np.float32),
                v_cache=np.zeros((3, 32, 2, 16), np.float32), k=np.zeros((2, 1, 2, 16), np.float32),
                v=np.zeros((2, 1, 2, 16), np.float32), cache_seqlens=np.array([1, 2], np.int32),
                cache_batch_idx=np.array([0, 2], np.int32))
    if kind == "seqlens":
        args["cache_seqlens"] = np.array([draw(st.integers(-2**31, -1)), 0], np.int64)
    elif kind == "seqlens_int":
        args["cache_seqlens"] = draw(st.one_of(st.integers(max_value=-1),
                                               st.integers(min_value=2**31 - 1)))
    elif kind == "batch_idx":
        args["cache_batch_idx"] = np.array([0, draw(st.one_of(st.integers(max_value=-1),
                                                              st.integers(3, 2**31 - 1)))])
    elif kind == "leftpad":
        args["cache_leftpad"] = np.array([draw(st.one_of(st.integers(max_value=-1),
                                                         st.integers(33, 2**31 - 1))), 0])
    elif kind == "rotary":
        args["rotary_cos"] = np.zeros((draw(st.integers(1, 31)), 4), np.float32)
        args["rotary_sin"] = args["rotary_cos"]
    else:
        args["block_table"] = np.zeros((2, 2), np.int32)
        args["k_cache"] = args["v_cache"] = np.zeros((4, draw(st.sampled_from([8, 24, 33])), 2,
                                                      16), np.float32)
        del args["cache_batch_idx"]
    return args


@_settings(40)
@given(bad_cache_calls())
def test_random_invalid_cache_calls_raise(args):
    with pytest.raises((ValueError, TypeError)):
        fa.flash_attn_with_kvcache(**args)


def test_the_strategies_draw_valid_and_invalid_calls_as_intended():
    # A control: a valid call with the shared constants runs, so the invalid ones fail for the
    # value drawn, not for the rest of the call.
    out = fa.flash_attn_func(Q, K, K)
    assert out.shape == Q.shape
    cu_q, cu_k = np.array([0, 8, 20], np.int32), np.array([0, 12, 24], np.int32)
    assert fa.flash_attn_varlen_func(VQ, VK, VK, cu_q, cu_k, 12, 12).shape == VQ.shape
    args = dict(q=np.zeros((2, 1, 4, 16), np.float32), k_cache=np.zeros((3, 32, 2, 16), np.float32),
                v_cache=np.zeros((3, 32, 2, 16), np.float32), k=np.zeros((2, 1, 2, 16), np.float32),
                v=np.zeros((2, 1, 2, 16), np.float32), cache_seqlens=np.array([1, 2], np.int32),
                cache_batch_idx=np.array([0, 2], np.int32))
    assert fa.flash_attn_with_kvcache(**args)[0].shape == (2, 1, 4, 16)
