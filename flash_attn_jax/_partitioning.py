"""The attention kernels on device meshes under ``jax.jit``: batch, head and sequence partitioning.

To XLA's SPMD partitioner a Pallas kernel is an opaque custom call: it would all-gather the
operands and run the whole attention on every device. So every kernel entry point is wrapped in
``jax.experimental.custom_partitioning``. Shardy propagates shardings through a factor rule
(batch, sequence, heads; the query heads of a kv head are its minor factor), and the partition
callback picks a plan from the operands' shardings and runs the kernels on the local shards:

* batch and heads: the local call, no communication. Dropout hashes global indices (the call is
  placed at the shard's first batch row and head), so the result is bitwise the unsharded one.
* query sequence alone: the local queries at their global positions against all keys.
* query and key sequence: ring attention over those mesh axes (``flash_attn_jax.ring``,
  contiguous layout): only collective-permutes, O(S / n) memory per device.
* KV cache: batch (the caches' rows or pages split like the batch) and heads.

Heads split only when the mesh axes' size divides the kv heads as well (GQA/MQA: a kv head goes
with its query heads); otherwise the heads stay whole on every device, gathered. Inside a
``jax.shard_map`` over every mesh axis the wrapper is transparent (the local call).
custom_partitioning has no vmap rule, so under ``jax.vmap`` the calls run unpartitioned (vmapped
local calls).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax import lax
from jax._src.sharding_impls import parse_flatten_op_sharding  # (see _decoded)
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from flash_attn_jax import kernels, ring
from flash_attn_jax.semantics import ScoreSpec

# Dimension kinds of the operands and results; each plan maps them to mesh axes.
BATCH, SEQ_Q, SEQ_K, HEADS, HEADS_K, CACHE_ROWS = "batch", "seq_q", "seq_k", "heads", "heads_k", "rows"


def _axes_of(sharding, dim) -> tuple:
    """The mesh axes that split dimension ``dim`` of a NamedSharding (empty when whole)."""
    spec = getattr(sharding, "spec", None)
    if spec is None or dim >= len(spec) or spec[dim] is None:
        return ()
    entry = spec[dim]
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _divides(mesh, axes, *lengths) -> tuple:
    """``axes`` if their size divides every length, else ()."""
    n = _size(mesh, axes)
    return axes if all(length % n == 0 for length in lengths) else ()


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The mesh axes that split each kind of dimension; ``ring``: the keys' sequence is split like
    the queries' (ring attention), otherwise the keys are whole on every device."""

    batch: tuple = ()
    heads: tuple = ()
    seq: tuple = ()
    ring: bool = False
    rows: tuple = ()  # the KV cache's rows or pages

    def axes(self, kind):
        return {BATCH: self.batch, HEADS: self.heads, HEADS_K: self.heads, SEQ_Q: self.seq,
                SEQ_K: self.seq if self.ring else (), CACHE_ROWS: self.rows}.get(kind, ())

    def sharding(self, mesh, dims):
        return NamedSharding(mesh, PartitionSpec(*(_entry(self.axes(kind)) for kind in dims)))


def _offset(axes, local_length):
    """The global index of this shard's first element along a dimension split over ``axes``."""
    return lax.axis_index(axes) * local_length if axes else 0


def _factor_names(dims, group, num_heads_k):
    """Factor names of a rule: the query heads of a kv head are the minor factor of the query
    heads (Shardy takes no factor of size 1 in a compound, so with one kv head they are apart)."""
    heads = "hk" if group == 1 else "hq" if num_heads_k == 1 else "(hk grp)"
    names = {BATCH: "b", SEQ_Q: "sq", SEQ_K: "sk", HEADS_K: "hk", CACHE_ROWS: "rows",
             HEADS: heads}
    return " ".join(names.get(kind, kind) for kind in dims)


class Op:
    """One partitioned kernel entry point: ``local(*arrays)`` computes on (local) arrays,
    ``arg_dims``/``out_dims`` name each dimension's kind, ``plan`` chooses the split from the
    operands' shardings and ``lower(plan, mesh)`` returns the per-shard function. Subclasses are
    frozen dataclasses (static arguments of custom_partitioning)."""

    group = 1  # query heads per kv head
    num_heads_k = 2  # only whether it is 1 matters (the rule's factors)

    def local(self, *arrays):
        raise NotImplementedError

    def arg_dims(self):
        raise NotImplementedError

    def out_dims(self):
        raise NotImplementedError

    def plan(self, mesh, arg_shapes):
        raise NotImplementedError

    def lower(self, plan, mesh):
        return self.local

    def rule(self):
        """The Shardy factor rule; dimensions that never split are replication factors."""
        unsplit = []  # in order of appearance, as Shardy wants its special factors

        def side(dims_list):
            parts = []
            for dims in dims_list:
                named = []
                for kind in dims:
                    if kind is None:  # a dimension of its own that is never split
                        kind = f"x{len(unsplit)}"
                        unsplit.append(kind)
                    named.append(kind)
                parts.append(_factor_names(named, self.group, self.num_heads_k))
            return ", ".join(parts)

        text = f"{side(self.arg_dims())} -> {side(self.out_dims())}"
        sizes = {"grp": self.group} if self.group > 1 and self.num_heads_k > 1 else {}
        return text, dict(need_replication_factors=tuple(unsplit), **sizes)


def _decoded(shape, mesh):
    """An operand as the partition callback receives it (its sharding in XLA's form: the callback
    decodes it, not JAX) with a NamedSharding over ``mesh``. A sharding no PartitionSpec states
    counts as no split: Shardy splits a mesh axis into parts when it divides the query heads but
    not the kv heads (the (hk grp) factor: 8 kv heads over 16 devices), and the plan keeps such
    heads whole."""
    try:
        spec = parse_flatten_op_sharding(shape.sharding._to_xla_hlo_sharding(len(shape.shape)),
                                         mesh)[0]
    except ValueError:  # IndivisibleError
        spec = ()
    return _Typed(shape.shape, NamedSharding(mesh, PartitionSpec(*spec)))


def _partition(op: Op, mesh, arg_shapes, result_shape):
    del result_shape  # (our shardings of the results are the plan's)
    plan = op.plan(mesh, [_decoded(shape, mesh) for shape in arg_shapes])
    arg_shardings = tuple(plan.sharding(mesh, dims) for dims in op.arg_dims())
    out_shardings = tuple(plan.sharding(mesh, dims) for dims in op.out_dims())
    if len(out_shardings) == 1:  # an op with one result returns it bare
        out_shardings = out_shardings[0]
    return mesh, op.lower(plan, mesh), out_shardings, arg_shardings


def _local(op: Op, *arrays):
    return op.local(*arrays)


_partitioned = custom_partitioning(_local, static_argnums=(0,))
_partitioned.def_partition(partition=_partition, decode_shardings=False,
                           sharding_rule=lambda op, mesh, values, results: op.rule())


def _is_explicit(mesh):
    return (mesh is not None and not mesh.empty
            and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types))


def _explicit_mesh(arrays):
    """In explicit sharding mode (the types carry the shardings: a mesh with Explicit axes set or
    on the arrays), that mesh; else None."""
    for x in arrays:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        if _is_explicit(mesh):
            return mesh
    mesh = jax.sharding.get_abstract_mesh()
    return mesh if _is_explicit(mesh) else None


@dataclasses.dataclass(frozen=True)
class _Typed:
    shape: tuple
    sharding: NamedSharding


def _explicit_call(op: Op, mesh, arrays):
    """Explicit sharding mode (the types carry the shardings): the plan's shard_map (also when
    nothing is split: Pallas's interpret mode fails under an Explicit mesh outside one)."""
    plan = op.plan(mesh, [_Typed(x.shape, jax.typeof(x).sharding) for x in arrays])
    in_specs = tuple(plan.sharding(mesh, dims).spec for dims in op.arg_dims())
    out_specs = tuple(plan.sharding(mesh, dims).spec for dims in op.out_dims())
    arrays = [x if jax.typeof(x).sharding.spec == spec
              else jax.sharding.reshard(x, NamedSharding(mesh, spec))
              for x, spec in zip(arrays, in_specs)]
    single = len(out_specs) == 1
    return jax.shard_map(op.lower(plan, mesh), mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs[0] if single else out_specs)(*arrays)


def call(op: Op, *arrays):
    """``op.local(*arrays)``, partitioned over the mesh of the arrays' shardings: under jit by
    custom_partitioning, or, when the shardings are in the types (Explicit mesh axes), by the
    plan's shard_map. Under vmap, the vmapped local call (custom_partitioning has no vmap
    rule)."""
    mesh = _explicit_mesh(arrays)
    if mesh is not None:
        return _explicit_call(op, mesh, arrays)

    @jax.custom_batching.custom_vmap
    def partitioned(*arrays):
        return _partitioned(op, *arrays)

    @partitioned.def_vmap
    def _vmapped(axis_size, in_batched, *arrays):
        del axis_size
        outs = jax.vmap(op.local, in_axes=tuple(0 if b else None for b in in_batched))(*arrays)
        return outs, jax.tree.map(lambda _: True, outs)

    return partitioned(*arrays)


# ----------------------------------------------------------------------------------------------
# Dense attention: forward, backward, probabilities.

_Q = (BATCH, SEQ_Q, HEADS, None)
_KV = (BATCH, SEQ_K, HEADS_K, None)
_LSE = (BATCH, HEADS, SEQ_Q)
_SLOPES = (BATCH, HEADS)
_SEED = (None,)


@dataclasses.dataclass(frozen=True)
class _Dense(Op):
    """Shared by the dense ops: the score spec (which optional arrays are present), GQA."""

    spec: ScoreSpec
    group: int
    num_heads_k: int
    allows_ring = True  # whether a split key sequence runs the ring (else keys are gathered)

    def _optional_dims(self):
        return ((_SLOPES,) if self.spec.has_alibi else ()) + (
            (_SEED,) if self.spec.has_dropout else ())

    def _split_optional(self, arrays):
        """(slopes, seed) from the optional arrays (those the spec uses)."""
        arrays = list(arrays)
        slopes = arrays.pop(0) if self.spec.has_alibi else None
        seed = arrays.pop(0) if self.spec.has_dropout else None
        return slopes, seed

    def plan(self, mesh, arg_shapes):
        q, k = arg_shapes[:2]
        batch, seqlen_q, num_heads, _ = q.shape
        seqlen_k, num_heads_k = k.shape[1], k.shape[2]
        plan_batch = _divides(mesh, _axes_of(q.sharding, 0), batch)
        heads = _divides(mesh, _axes_of(q.sharding, 2), num_heads, num_heads_k)
        seq = _divides(mesh, _axes_of(q.sharding, 1), seqlen_q)
        # A ring when the keys' sequence is split too (over the queries' axes, resharded if
        # need be) and its chunks suit it (dropout's aligned key chunks); otherwise whole keys.
        n = _size(mesh, seq)
        use_ring = bool(seq and self.allows_ring and _axes_of(k.sharding, 1) and seqlen_k % n == 0
                        and ring.chunk_problem(self.spec, ring.Ring(seq, n), seqlen_q // n,
                                               seqlen_k // n) is None)
        return Plan(batch=plan_batch, heads=heads, seq=seq, ring=use_ring)

    def _placement(self, plan, mesh, q, k):
        """The Placement of this shard's call (None when local indices are right)."""
        base = self._base(plan, q)
        if plan.seq:
            n = _size(mesh, plan.seq)
            return kernels.Placement(batch=base[0], head=base[1],
                                     query=_offset(plan.seq, q.shape[1]), key=0,
                                     diagonal=k.shape[1] - n * q.shape[1])
        if self.spec.has_dropout and (plan.batch or plan.heads):
            return kernels.Placement(batch=base[0], head=base[1])
        return None

    def ring_call(self, plan_ring, base, *arrays):
        """The op on this device's shard of a ring (``ring.forward`` or ``ring.backward``)."""
        raise NotImplementedError

    def lower(self, plan, mesh):
        def per_shard(q, k, *rest):
            if plan.ring:
                plan_ring = ring.Ring(axis_name=_entry(plan.seq), num_shards=_size(mesh, plan.seq))
                return self.ring_call(plan_ring, self._base(plan, q), q, k, *rest)
            return self.local(q, k, *rest, placement=self._placement(plan, mesh, q, k))
        return per_shard

    def _base(self, plan, q):
        """The global (batch, head) of this shard's first batch row and query head."""
        return (_offset(plan.batch, q.shape[0]), _offset(plan.heads, q.shape[2]))


@dataclasses.dataclass(frozen=True)
class Forward(_Dense):
    """(q, k, v[, slopes][, seed]) -> (out, lse)."""

    def local(self, q, k, v, *optional, placement=None):
        slopes, seed = self._split_optional(optional)
        return kernels.forward(q, k, v, slopes, self.spec, None, seed, placement=placement)

    def arg_dims(self):
        return (_Q, _KV, _KV) + self._optional_dims()

    def out_dims(self):
        return (_Q, _LSE)

    def ring_call(self, plan_ring, base, q, k, v, *optional):
        slopes, seed = self._split_optional(optional)
        return ring.forward(q, k, v, slopes, seed, self.spec, plan_ring, base)


@dataclasses.dataclass(frozen=True)
class Backward(_Dense):
    """(q, k, v, out, lse, dout, dlse[, slopes][, seed]) -> (dq, dk, dv)."""

    def local(self, q, k, v, out, lse, dout, dlse, *optional, placement=None):
        slopes, seed = self._split_optional(optional)
        return kernels.backward(q, k, v, slopes, out, lse, dout, dlse, self.spec, None, seed,
                                placement=placement)

    def arg_dims(self):
        return (_Q, _KV, _KV, _Q, _LSE, _Q, _LSE) + self._optional_dims()

    def out_dims(self):
        return (_Q, _KV, _KV)

    def ring_call(self, plan_ring, base, q, k, v, out, lse, dout, dlse, *optional):
        slopes, seed = self._split_optional(optional)
        return ring.backward(q, k, v, slopes, seed, out, lse, dout, dlse, self.spec, plan_ring,
                             base)


@dataclasses.dataclass(frozen=True)
class Probabilities(_Dense):
    """(q, k, lse[, slopes][, seed]) -> probabilities (B, H, Sq, Sk); keys whole per device."""

    def local(self, q, k, lse, *optional, placement=None):
        slopes, seed = self._split_optional(optional)
        return kernels.probabilities(q, k, lse, slopes, self.spec, None, seed,
                                     placement=placement)

    def arg_dims(self):
        return (_Q, _KV, _LSE) + self._optional_dims()

    def out_dims(self):
        return ((BATCH, HEADS, SEQ_Q, SEQ_K),)

    allows_ring = False


# ----------------------------------------------------------------------------------------------
# Variable-length attention: heads only (the packed token axis and cu_seqlens stay whole).

_VQ = (None, HEADS, None)
_VKV = (None, HEADS_K, None)
_VLSE = (HEADS, None)


@dataclasses.dataclass(frozen=True)
class _Varlen(_Dense):
    """Shared by the varlen ops: ``max_seqlen_q``/``max_seqlen_k`` and paged keys."""

    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    paged: bool = False

    def _kv_dims(self):
        return (None, None, HEADS_K, None) if self.paged else _VKV

    def _seq_dims(self):
        return ((None,), (None,)) + (((None, None),) if self.paged else ())

    def _optional_dims(self):
        return (((None, HEADS),) if self.spec.has_alibi else ()) + (
            (_SEED,) if self.spec.has_dropout else ())

    def _varlen(self, seq_arrays):
        table = seq_arrays[2] if self.paged else None
        return kernels.Varlen(cu_seqlens_q=seq_arrays[0], cu_seqlens_k=seq_arrays[1],
                              block_table=table, max_seqlen_q=self.max_seqlen_q,
                              max_seqlen_k=self.max_seqlen_k)

    def _num_seq(self):
        return 3 if self.paged else 2

    def _unpack(self, rest):
        """(Varlen, slopes, seed) from the arrays after the leading ones."""
        seq, optional = rest[:self._num_seq()], rest[self._num_seq():]
        return (self._varlen(seq), *self._split_optional(optional))

    def plan(self, mesh, arg_shapes):
        q, k = arg_shapes[:2]
        return Plan(heads=_divides(mesh, _axes_of(q.sharding, 1), q.shape[1], k.shape[-2]))

    def lower(self, plan, mesh):
        def per_shard(q, *rest):
            placement = None
            if self.spec.has_dropout and plan.heads:
                placement = kernels.Placement(batch=0, head=_offset(plan.heads, q.shape[1]))
            return self.local(q, *rest, placement=placement)
        return per_shard


@dataclasses.dataclass(frozen=True)
class VarlenForward(_Varlen):
    """(q, k, v, cu_q, cu_k[, table][, slopes][, seed]) -> (out, lse)."""

    def local(self, q, k, v, *rest, placement=None):
        varlen, slopes, seed = self._unpack(rest)
        return kernels.forward(q, k, v, slopes, self.spec, varlen, seed, placement=placement)

    def arg_dims(self):
        return (_VQ, self._kv_dims(), self._kv_dims()) + self._seq_dims() + self._optional_dims()

    def out_dims(self):
        return (_VQ, _VLSE)


@dataclasses.dataclass(frozen=True)
class VarlenBackward(_Varlen):
    """(q, k, v, out, lse, dout, dlse, cu_q, cu_k[, slopes][, seed]) -> (dq, dk, dv)."""

    def local(self, q, k, v, out, lse, dout, dlse, *rest, placement=None):
        varlen, slopes, seed = self._unpack(rest)
        return kernels.backward(q, k, v, slopes, out, lse, dout, dlse, self.spec, varlen, seed,
                                placement=placement)

    def arg_dims(self):
        return ((_VQ, _VKV, _VKV, _VQ, _VLSE, _VQ, _VLSE) + self._seq_dims()
                + self._optional_dims())

    def out_dims(self):
        return (_VQ, _VKV, _VKV)


@dataclasses.dataclass(frozen=True)
class VarlenProbabilities(_Varlen):
    """(q, k, lse, cu_q, cu_k[, table][, slopes][, seed]) -> (B, H, max_q, max_k)."""

    def local(self, q, k, lse, *rest, placement=None):
        varlen, slopes, seed = self._unpack(rest)
        return kernels.probabilities(q, k, lse, slopes, self.spec, varlen, seed,
                                     placement=placement)

    def arg_dims(self):
        return (_VQ, self._kv_dims(), _VLSE) + self._seq_dims() + self._optional_dims()

    def out_dims(self):
        return ((None, HEADS, None, None),)


# ----------------------------------------------------------------------------------------------
# flash_attn_with_kvcache: batch and heads.

@dataclasses.dataclass(frozen=True)
class KvCache(Op):
    """The whole cache call (rotary, append, attention) on the ``names`` arrays given.

    Batch: a contiguous cache without cache_batch_idx splits with the batch. With cache_batch_idx
    or a block table, the cache's rows (pages) split over the batch's mesh axes too: shard d owns
    rows [d * R / n, (d + 1) * R / n), and the indices and page ids of its batch rows are taken
    relative to that (an index outside the shard counts as missing: nothing read or written).
    A cache that is not split like that stays whole on every device: read-only calls still
    split the batch, appending ones do not (every replica must take every write).
    """

    compute: object  # (call, **arrays) -> results, the local computation
    call: object  # the static _core.CacheCall
    names: tuple  # the arguments given, in CACHE_ARGS order

    @property
    def group(self):
        return self.call.layout.num_heads // self.call.layout.num_heads_k

    @property
    def num_heads_k(self):
        return self.call.layout.num_heads_k

    @property
    def _rows_kind(self):
        layout = self.call.layout
        return CACHE_ROWS if layout.paged or "cache_batch_idx" in self.names else BATCH

    @property
    def _appends(self):
        return "k" in self.names

    def _dims(self, name):
        cache = (self._rows_kind, None, HEADS_K, None)
        return {"q": (BATCH, None, HEADS, None), "k_cache": cache, "v_cache": cache,
                "k": (BATCH, None, HEADS_K, None), "v": (BATCH, None, HEADS_K, None),
                "rotary_cos": (None, None), "rotary_sin": (None, None),
                "cache_seqlens": (BATCH,), "cache_batch_idx": (BATCH,),
                "cache_leftpad": (BATCH,), "block_table": (BATCH, None),
                "alibi_slopes": (BATCH, HEADS)}[name]

    def local(self, *arrays):
        return self.compute(self.call, **dict(zip(self.names, arrays)))

    def arg_dims(self):
        return tuple(self._dims(name) for name in self.names)

    def out_dims(self):
        outs = ((BATCH, None, HEADS, None), (BATCH, HEADS, None))
        return outs + ((self._dims("k_cache"),) * 2 if self._appends else ())

    def plan(self, mesh, arg_shapes):
        q, k_cache = arg_shapes[0], arg_shapes[1]
        layout = self.call.layout
        batch = _divides(mesh, _axes_of(q.sharding, 0), layout.batch)
        heads = _divides(mesh, _axes_of(q.sharding, 2), layout.num_heads, layout.num_heads_k)
        rows = ()
        if self._rows_kind == CACHE_ROWS and batch:
            if (_axes_of(k_cache.sharding, 0) == batch
                    and k_cache.shape[0] % _size(mesh, batch) == 0):
                rows = batch
            elif self._appends:
                batch = ()
        return Plan(batch=batch, heads=heads, rows=rows)

    def lower(self, plan, mesh):
        def per_shard(*arrays):
            named = dict(zip(self.names, arrays))
            if plan.rows:
                first_row = _offset(plan.rows, named["k_cache"].shape[0])
                for name in ("cache_batch_idx", "block_table"):
                    if name in named:
                        named[name] = named[name] - first_row
            return self.compute(self.call, **named)
        return per_shard


# ----------------------------------------------------------------------------------------------
# The seam's attention functions, partitioned (the signatures of flash_attn_jax.kernels).

def _run(dense_op, varlen_op, spec, varlen, leading, slopes, seed):
    """The dense or the varlen op on the ``leading`` arrays (q, k, ...) and the optional ones."""
    q, k = leading[:2]
    heads = dict(group=q.shape[-2] // k.shape[-2], num_heads_k=k.shape[-2])
    optional = tuple(x for x in (slopes, seed) if x is not None)
    if varlen is None:
        return call(dense_op(spec=spec, **heads), *leading, *optional)
    op = varlen_op(spec=spec, **heads, max_seqlen_q=varlen.max_seqlen_q,
                   max_seqlen_k=varlen.max_seqlen_k, paged=varlen.block_table is not None)
    return call(op, *leading, *varlen.arrays, *optional)


def forward(q, k, v, slopes, spec, varlen=None, seed=None):
    """``kernels.forward``, partitioned."""
    return _run(Forward, VarlenForward, spec, varlen, (q, k, v), slopes, seed)


def backward(q, k, v, slopes, out, lse, dout, dlse, spec, varlen=None, seed=None):
    """``kernels.backward``, partitioned."""
    return _run(Backward, VarlenBackward, spec, varlen, (q, k, v, out, lse, dout, dlse), slopes,
                seed)


def probabilities(q, k, lse, slopes, spec, varlen=None, seed=None):
    """``kernels.probabilities``, partitioned."""
    return _run(Probabilities, VarlenProbabilities, spec, varlen, (q, k, lse), slopes, seed)
