"""The kernel backends and how one is chosen for each call.

A backend implements the seam's operations (``forward``, ``backward``, ``backward_delta``,
``probabilities``, ``kvcache_append``, ``kvcache_attention``) and says, per call, whether it can run
it (``Backend.supports``: None, or the reason it cannot). The registry holds the backends in
order of preference; a call runs on the first that supports it, so a backend that covers only
part of the features hands the rest to the next one.

A backend may be left out of the automatic choice (``automatic = False``: one not yet validated
on its hardware); it runs only when chosen.

Choosing by hand: the environment variable ``FLASH_ATTN_JAX_BACKEND`` (a backend's name), or in
Python ``flash_attn_jax.set_backend(name)`` / ``with flash_attn_jax.use_backend(name):``. A chosen
backend runs every call whose features it supports, on any platform (e.g. the Triton lowering for
an abstract GPU on a CPU); the calls it declines go to the automatic choice.
The Python-level choice is part of JAX's cache keys (a ``jax.make_user_context``): a jitted
function traced under one choice is traced again when called under another. The environment
variables are read when a function is traced; set them before the program starts.
``flash_attn_jax.backends_used(fn, *args)`` traces ``fn`` afresh and abstractly and says which
backend each operation of the call would run on. The older ``FLASH_ATTN_JAX_INTERPRET=1``
(``0``) still chooses the interpreted (compiled) Pallas backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import os

import jax
import numpy as np

from flash_attn_jax.semantics import ScoreSpec

BACKEND_ENV = "FLASH_ATTN_JAX_BACKEND"
INTERPRET_ENV = "FLASH_ATTN_JAX_INTERPRET"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
OPERATIONS = ("forward", "backward", "probabilities", "kvcache_append", "kvcache_attention")


@dataclasses.dataclass(frozen=True)
class Request:
    """What one call needs, for the backends' capability checks."""

    op: str  # one of OPERATIONS (backward_delta counts as "backward")
    platform: str | None  # jax.default_backend() at trace time ("gpu", "cpu", ...); None: any
    dtype: np.dtype
    head_dim: int
    varlen: bool = False
    paged: bool = False  # keys through a block table
    spec: ScoreSpec | None = None
    placed: bool = False  # a shard of a larger attention (kernels.Placement)
    positions: bool = False  # ... of the sequence too (the placement carries score positions)
    q_shape: tuple[int, ...] = ()
    k_shape: tuple[int, ...] = ()  # keys (or the cache's pages)
    out_dtype: np.dtype | None = None  # None: the inputs' dtype


class Backend:
    """A kernel backend: a name, a capability check and the seam's operations."""

    name = "backend"
    automatic = True  # False: runs only when chosen by hand

    def supports(self, request: Request) -> str | None:
        """None when this backend can run ``request``, else why not (a short phrase)."""
        raise NotImplementedError


_registry: list[Backend] = []
_AUTO = "auto"  # chosen automatically, overriding a choice made further out
# Keyed into JAX's trace and compile caches, so a changed choice retraces instead of reusing a
# trace dispatched under the old one.
_choice = jax.make_user_context(default_value=None)
# A fresh value per backends_used call: its trace misses every cache and dispatches afresh.
_fresh_trace = jax.make_user_context(default_value=0)
_fresh_counter = itertools.count(1)
_log = contextvars.ContextVar("flash_attn_jax_backend_log", default=None)


def register(backend: Backend, *, first=False):
    """Adds ``backend`` to the registry, last (or first) in the order of preference."""
    if any(b.name == backend.name for b in _registry):
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _registry.insert(0 if first else len(_registry), backend)


def names() -> tuple[str, ...]:
    return tuple(b.name for b in _registry)


def _by_name(name, source):
    for backend in _registry:
        if backend.name == name:
            return backend
    raise ValueError(f"{source} must name a backend, one of {names()}, got {name!r}")


def chosen() -> str | None:
    """The backend chosen by hand (Python setting, else environment), or None."""
    name = _choice.value
    if name == _AUTO:
        return None
    if name is not None:
        return name
    value = os.environ.get(BACKEND_ENV, "").strip()
    if value:
        _by_name(value, BACKEND_ENV)
        return value
    legacy = os.environ.get(INTERPRET_ENV, "").strip().lower()
    if legacy in _TRUE:
        return "pallas-interpret"
    if legacy in _FALSE:
        return "pallas-triton"
    if legacy:
        raise ValueError(f"{INTERPRET_ENV} must be one of {_TRUE + _FALSE} or unset, got "
                         f"{legacy!r}")
    return None


def set_automatic(name: str, automatic: bool):
    """Puts the backend ``name`` in or out of the automatic choice (the test suite takes ``xla``
    out on a CPU, so that its cases run the Pallas kernels in interpret mode)."""
    _by_name(name, "set_automatic's name").automatic = automatic


def set_backend(name: str | None):
    """Runs every call that the backend ``name`` supports on it (None: choose automatically)."""
    if name is not None:
        _by_name(name, "set_backend's name")
    _choice.set_global(name)


@contextlib.contextmanager
def use_backend(name: str | None):
    """``set_backend(name)`` for the calls made inside the ``with`` block (None: choose
    automatically there, whatever was set outside)."""
    if name is not None:
        _by_name(name, "use_backend's name")
    with _choice(_AUTO if name is None else name):
        yield


@contextlib.contextmanager
def fresh_traces():
    """Within the block, every function is traced again (no trace made outside it is reused), so
    every call dispatches to the registry afresh (for a registry changed at run time)."""
    with _fresh_trace(next(_fresh_counter)):
        yield


def select(request: Request) -> Backend:
    """The backend that runs ``request``."""
    name = chosen()
    backend = None
    if name is not None:
        # Chosen by hand, a backend may target another platform (lowering for a GPU on a CPU).
        backend = _by_name(name, "the chosen backend")
        if backend.supports(dataclasses.replace(request, platform=None)) is not None:
            backend = None
    if backend is None:
        backend = next((b for b in _registry if b.automatic and b.supports(request) is None),
                       None)
    if backend is None:
        reasons = "; ".join(f"{b.name}: {b.supports(request)}" for b in _registry)
        raise NotImplementedError(f"flash_attn_jax: no backend can run this {request.op} "
                                  f"({reasons})")
    log = _log.get()
    if log is not None:
        log.append((request.op, backend.name))
    return backend


def backends_used(fn, *args, **kwargs) -> dict[str, str]:
    """Which backend each operation of ``fn(*args, **kwargs)`` would run on, as
    {operation: backend name}: ``fn`` is traced abstractly (``jax.eval_shape``), nothing runs.
    Pass a function that takes gradients to see the backward's backend too."""
    log = []
    token = _log.set(log)
    try:
        with fresh_traces():
            jax.eval_shape(fn, *args, **kwargs)
    finally:
        _log.reset(token)
    return dict(log)
