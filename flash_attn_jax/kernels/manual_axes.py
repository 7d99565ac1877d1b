"""Pallas calls inside ``jax.shard_map`` with its default ``check_vma=True``.

Inside such a shard_map every value carries the mesh axes it varies over, and a ``pallas_call``
must say how its outputs vary: ``out_shape`` structs carry the varying axes of the operands (the
kernels compute each shard from its own operands, so the outputs vary over their union).

Pallas's interpret mode in JAX 0.11 cannot run there: it evaluates the kernel inside its own
grid loop, whose carries start varying (the operands) and come back invariant (the kernel body
is typed without the shard_map), and the loop's type check fails. ``pallas_call`` below runs an
interpreted kernel as one opaque step instead: traced and lowered without the varying axes (each
shard's computation is the unsharded kernel on its local arrays), typed outside with them. It
uses two JAX internals, pinned by the JAX range of pyproject.toml and exercised by the mesh tests.

The same step serves interpreted kernels under ``jax_enable_x64``: traced and lowered with 32-bit
defaults, since the interpreter's own index constants would otherwise be int64 next to the
kernels' int32 ones.
"""

from __future__ import annotations

import jax
from jax._src import config as _jax_config
from jax._src import core as _jax_core
from jax.experimental import pallas as pl
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir


def _checked_shard_map() -> bool:
    """Whether this trace is inside a shard_map that checks varying axes."""
    return bool(jax.sharding.get_abstract_mesh().manual_axes) and _jax_config._check_vma.value


def varying_axes(arrays) -> frozenset:
    """The manual mesh axes any of ``arrays`` varies over (empty outside a checked shard_map)."""
    axes = frozenset()
    for x in arrays:
        mat = getattr(jax.typeof(x), "mat", None)
        if mat is not None:
            axes |= mat.varying
    return axes


def _varying_struct(struct, axes):
    return jax.ShapeDtypeStruct(struct.shape, struct.dtype,
                                manual_axis_type=_jax_core.ManualAxisType(varying=axes))


def pallas_call(kernel, *, out_shape, interpret: bool, **kwargs):
    """``pl.pallas_call(kernel, out_shape=..., interpret=..., **kwargs)`` that also works inside
    a checked shard_map (compiled and interpreted) and, interpreted, under jax_enable_x64."""

    def call(*operands):
        checked = _checked_shard_map()
        if interpret and (checked or jax.config.jax_enable_x64):
            return _untyped_call(
                lambda *ops: pl.pallas_call(kernel, out_shape=out_shape, interpret=True,
                                            **kwargs)(*ops),
                operands, varying_axes(operands) if checked else frozenset())
        if not checked:
            return pl.pallas_call(kernel, out_shape=out_shape, interpret=interpret, **kwargs)(
                *operands)
        axes = varying_axes(operands)
        typed = jax.tree.map(lambda s: _varying_struct(s, axes), out_shape)
        return pl.pallas_call(kernel, out_shape=typed, interpret=False, **kwargs)(*operands)

    return call


_untyped_call_p = jex_core.Primitive("flash_attn_jax_untyped_call")
_untyped_call_p.multiple_results = True


def _untyped_call(fn, operands, axes):
    """``fn(*operands)`` traced and lowered without manual axes and with 32-bit defaults (the
    interpreter's own index constants would be int64 under jax_enable_x64, next to the kernels'
    int32 ones), its outputs varying over ``axes``."""
    structs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in operands]
    with _jax_config._check_vma(False), jax.enable_x64(False):
        closed, out_tree = jax.make_jaxpr(fn, return_shape=True)(*structs)
    outs = _untyped_call_p.bind(*operands, jaxpr=closed, axes=axes)
    return jax.tree.unflatten(jax.tree.structure(out_tree), outs)


def _abstract_eval(*avals, jaxpr, axes):
    if not axes:
        return list(jaxpr.out_avals)
    mat = _jax_core.ManualAxisType(varying=axes)
    # The sharding of an operand that varies: its mesh knows the manual axes.
    like = next((a for a in avals if a.mat.varying), avals[0])
    return [a.update(manual_axis_type=mat, sharding=like.sharding) for a in jaxpr.out_avals]


def _lowering(ctx, *operands, jaxpr, axes):
    del axes
    plain = [_jax_core.ShapedArray(a.shape, a.dtype) for a in ctx.avals_in]
    with _jax_config._check_vma(False), jax.enable_x64(False):
        ctx = ctx.replace(avals_in=plain, avals_out=list(jaxpr.out_avals))
        return mlir.lower_fun(_jax_core.jaxpr_as_fun(jaxpr), multiple_results=True)(ctx, *operands)


def _batching(operands, dims, *, jaxpr, axes):
    batched = jax.vmap(_jax_core.jaxpr_as_fun(jaxpr),
                       in_axes=tuple(None if d is batching.not_mapped else d for d in dims))
    outs = _untyped_call(batched, operands, axes)
    return outs, [0] * len(outs)


def _impl(*operands, jaxpr, axes):
    # Eagerly: a jitted program of the one primitive, lowered by the rule below.
    return jax.jit(lambda *ops: _untyped_call_p.bind(*ops, jaxpr=jaxpr, axes=axes))(*operands)


_untyped_call_p.def_impl(_impl)
_untyped_call_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_untyped_call_p, _lowering)
batching.primitive_batchers[_untyped_call_p] = _batching
