"""The kernel registry: which backend runs a call, choosing one by hand, falling back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_attn_jax
from flash_attn_jax import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flash_attn_jax.kernels import registry, tuning
from flash_attn_jax.kernels.triton import PallasTriton

from helpers import make_inputs


class _Narrow(PallasTriton):
    """A backend covering head dims up to 64 only (the interpreted kernels underneath), counting
    the operations it ran."""

    name = "narrow"

    def __init__(self):
        super().__init__(interpret=True)
        self.name = "narrow"
        self.ran = []

    def supports(self, request):
        if request.head_dim > 64:
            return "head dims up to 64"
        self.ran.append(request.op)
        return None


@pytest.fixture(autouse=True)
def automatic_choice(monkeypatch):
    """These tests are about the automatic choice and the registry's own machinery: a backend the
    suite runs with (``FLASH_ATTN_JAX_BACKEND=... scripts/dev.sh test``) is set aside here; the
    tests of choosing by hand make their own choice."""
    monkeypatch.delenv(registry.BACKEND_ENV, raising=False)
    monkeypatch.delenv(registry.INTERPRET_ENV, raising=False)
    with registry.fresh_traces():  # no trace made under the suite's choice is reused
        yield


@pytest.fixture
def narrow(monkeypatch):
    """The registry with ``narrow`` in front of the stock backends."""
    backend = _Narrow()
    monkeypatch.setattr(registry, "_registry", [backend] + list(registry._registry))
    with registry.fresh_traces():  # traces made before the change would bypass it
        yield backend


def _qkv(seed, batch, seqlen, nheads, head_dim, dtype):
    return make_inputs(seed, batch=batch, seqlen_q=seqlen, seqlen_k=seqlen, nheads=nheads,
                       nheads_k=nheads, head_dim=head_dim, dtype=dtype)[:3]


def _default():
    """The automatic backend of the small, odd shapes these tests use."""
    return "pallas-triton" if jax.default_backend() == "gpu" else "pallas-interpret"


def _default_plain():
    """The automatic backend of ``backend_name``'s plain 16-bit call (1024 tokens, head dim 128)."""
    hopper = jax.default_backend() == "gpu" and tuning.gpu_generation() == tuning.HOPPER
    return "mosaic-gpu" if hopper else _default()


def _grad_fn(q, k, v):
    return jax.grad(lambda q, k, v: flash_attn_func(q, k, v, causal=True).sum(),
                    argnums=(0, 1, 2))(q, k, v)


def test_default_backend_of_each_operation():
    q, k, v = _qkv(0, 2, 24, 2, 32, jnp.float16)
    expected = _default()
    assert flash_attn_jax.backend_name() == _default_plain()
    assert flash_attn_jax.backends_used(_grad_fn, q, k, v) == {"forward": expected,
                                                              "backward": expected}
    cache = jnp.zeros((2, 32, 2, 32), jnp.float16)
    used = flash_attn_jax.backends_used(
        lambda q, c: flash_attn_with_kvcache(q, c, c, k[:, :1], v[:, :1],
                                             cache_seqlens=jnp.array([3, 5], jnp.int32)),
        q[:, :1], cache)
    assert used == {"kvcache_append": expected, "kvcache_attention": expected}


def test_fallback_runs_what_the_first_backend_declines(narrow):
    """The first backend runs the calls it supports; the next one takes the rest, and the
    results are those of the backend that ran."""
    for head_dim, ran_on_narrow in ((64, True), (96, False)):
        narrow.ran.clear()
        q, k, v = _qkv(1, 2, 40, 2, head_dim, jnp.float16)
        used = flash_attn_jax.backends_used(_grad_fn, q, k, v)
        name = "narrow" if ran_on_narrow else _default()
        assert used == {"forward": name, "backward": name}
        got = jax.jit(_grad_fn)(q, k, v)
        assert bool(narrow.ran) == ran_on_narrow
        # narrow interprets the kernels; the fallback is the platform's default backend.
        with flash_attn_jax.use_backend("pallas-interpret" if ran_on_narrow else _default()):
            want = jax.jit(_grad_fn)(q, k, v)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_a_chosen_backend_hands_what_it_cannot_run_to_the_automatic_choice(narrow):
    q, k, v = _qkv(2, 1, 20, 2, 128, jnp.bfloat16)  # 20: no Mosaic GPU (lengths in 8s)
    with flash_attn_jax.use_backend("narrow"):
        assert flash_attn_jax.backends_used(flash_attn_func, q, k, v) == {"forward": _default()}
        small = q[..., :64], k[..., :64], v[..., :64]
        assert flash_attn_jax.backends_used(flash_attn_func, *small) == {"forward": "narrow"}


def test_a_backend_left_out_of_the_automatic_choice_runs_only_when_chosen(monkeypatch):
    """``automatic = False`` (a backend not yet validated on its hardware): never picked by
    itself, even first in the order and supporting the call."""

    class Manual(_Narrow):
        automatic = False

    manual = Manual()
    monkeypatch.setattr(registry, "_registry", [manual] + list(registry._registry))
    q, k, v = _qkv(6, 1, 16, 1, 32, jnp.float32)
    assert flash_attn_jax.backends_used(flash_attn_func, q, k, v) == {"forward": _default()}
    with flash_attn_jax.use_backend("narrow"):
        assert flash_attn_jax.backends_used(flash_attn_func, q, k, v) == {"forward": "narrow"}


def test_no_backend_left(monkeypatch):
    monkeypatch.setattr(registry, "_registry", [_Narrow()])
    q, k, v = _qkv(3, 1, 16, 1, 128, jnp.float32)
    with registry.fresh_traces(), pytest.raises(
            NotImplementedError, match=r"no backend can run this forward \(narrow: head dims"):
        flash_attn_func(q, k, v)


def test_choice_by_context_setting_and_environment(monkeypatch):
    q, k, v = _qkv(4, 1, 16, 1, 32, jnp.float32)
    auto = flash_attn_jax.backend_name()
    # A chosen backend need not match the platform: the Triton lowering traces on a CPU.
    with flash_attn_jax.use_backend("pallas-triton"):
        used = flash_attn_jax.backends_used(flash_attn_func, q, k, v)
        assert used == {"forward": "pallas-triton"}
        with flash_attn_jax.use_backend("pallas-interpret"):  # the innermost choice wins
            assert flash_attn_jax.backend_name() == "pallas-interpret"
        assert flash_attn_jax.backend_name() == "pallas-triton"
    assert flash_attn_jax.backend_name() == auto
    try:
        flash_attn_jax.set_backend("pallas-interpret")
        assert flash_attn_jax.backends_used(flash_attn_func, q, k, v) == {
            "forward": "pallas-interpret"}
        with flash_attn_jax.use_backend("pallas-triton"):  # a context beats the setting
            assert flash_attn_jax.backend_name() == "pallas-triton"
    finally:
        flash_attn_jax.set_backend(None)
    assert flash_attn_jax.backend_name() == auto
    monkeypatch.setenv(registry.BACKEND_ENV, "pallas-triton")
    assert flash_attn_jax.backend_name() == "pallas-triton"
    monkeypatch.delenv(registry.BACKEND_ENV)
    for value, name in (("1", "pallas-interpret"), ("off", "pallas-triton")):
        monkeypatch.setenv(registry.INTERPRET_ENV, value)
        assert flash_attn_jax.backend_name() == name


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="set_backend's name must name a backend"):
        flash_attn_jax.set_backend("cudnn-please")
    with pytest.raises(ValueError, match="use_backend's name"):
        with flash_attn_jax.use_backend("triton"):
            pass
    assert registry.chosen() is None  # a refused name leaves no choice behind
    monkeypatch.setenv(registry.BACKEND_ENV, "nope")
    with pytest.raises(ValueError, match=registry.BACKEND_ENV):
        flash_attn_jax.backend_name()
    monkeypatch.delenv(registry.BACKEND_ENV)
    monkeypatch.setenv(registry.INTERPRET_ENV, "maybe")
    with pytest.raises(ValueError, match=registry.INTERPRET_ENV):
        flash_attn_jax.backend_name()
    with pytest.raises(ValueError, match="already registered"):
        registry.register(PallasTriton(interpret=True))


def test_a_jitted_function_retraces_when_the_choice_changes(narrow):
    """The choice is part of JAX's cache keys: a cached trace never runs a call on a backend
    other than the one chosen now, and an unchanged choice reuses the cache."""
    q, k, v = _qkv(5, 1, 16, 1, 32, jnp.float32)
    fn = jax.jit(flash_attn_func)
    with flash_attn_jax.use_backend("pallas-interpret"):
        want = fn(q, k, v)
    assert narrow.ran == []
    got = fn(q, k, v)  # automatic choice: traced again, dispatched to narrow
    assert narrow.ran == ["forward"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    fn(q, k, v)  # cached under the same choice
    assert narrow.ran == ["forward"]
    try:
        flash_attn_jax.set_backend("pallas-interpret")
        fn(q, k, v)
        assert narrow.ran == ["forward"]
        with flash_attn_jax.use_backend(None):  # automatic inside, whatever is set outside
            fn(q, k, v)
        assert narrow.ran == ["forward"] * 2
    finally:
        flash_attn_jax.set_backend(None)
    # backends_used traces afresh: it reports the dispatch of a call already cached.
    assert flash_attn_jax.backends_used(fn, q, k, v) == {"forward": "narrow"}


def test_varlen_requests_say_varlen_and_paged(monkeypatch):
    seen = []

    class Recorder(_Narrow):
        def supports(self, request):
            seen.append((request.op, request.varlen, request.paged))
            return "recording only"

    monkeypatch.setattr(registry, "_registry", [Recorder()] + list(registry._registry))
    q = jnp.zeros((10, 2, 32), jnp.float16)
    cu = jnp.array([0, 4, 10], jnp.int32)
    flash_attn_jax.backends_used(
        lambda q: flash_attn_varlen_func(q, q, q, cu, cu, 6, 6), q)
    cache = jnp.zeros((3, 16, 2, 32), jnp.float16)
    table = jnp.array([[0, 1], [2, 0]], jnp.int32)
    flash_attn_jax.backends_used(
        lambda q: flash_attn_varlen_func(q, cache, cache, cu, jnp.array([0, 20, 30], jnp.int32),
                                         6, 20, block_table=table), q)
    assert seen == [("forward", True, False), ("forward", True, True)]
