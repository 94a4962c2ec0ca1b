"""Where a vocabulary kernel runs: one device, or ``jax.shard_map`` from its inputs' shardings.

Every fused vocabulary loss has the same operands: features ``Z (..., D)``, a weight ``W``
(``(D, K)`` or ``(K, D)``), an optional bias ``(K,)`` and per-row arrays shaped like ``Z``'s
leading dims (labels, weights, per-row cotangents and outputs). :func:`layout_of` reads the
shardings those arrays carry — a concrete array's ``.sharding``, or the type of a traced array on
a mesh of explicit axes — and returns one :class:`Layout`:

- the **row axes**: every mesh axis splitting a leading dim of ``Z`` (data parallel, sequence
  parallel, the rows of a 2-D mesh); labels and weights follow ``Z``'s leading dims;
- the **class axes**: the mesh axes splitting ``W``'s class axis (vocabulary parallel);
  the bias follows them;
- anything else (``W`` split along D as FSDP does, ``Z`` split along D) is gathered for the call.

:func:`run` then calls a per-device function once (no mesh) or under ``jax.shard_map`` with the
specs of the layout, and gives every output the sharding of the input it belongs to (``dZ`` like
``Z``, ``dW`` like ``W``, ``db`` like the bias). The per-device function reads the axes it must
reduce over from its :class:`Local` argument. A layout that cannot work (rows and classes on one
axis, meshes that differ, a dim not divisible by its axes) is a ``ValueError`` naming the
shardings and what to pass instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

#: How an operand or output is split: ``"rows"`` like ``Z``'s leading dims, ``"features"`` like
#: ``Z`` (leading dims, then an unsplit D), ``"weight"`` like ``W`` (class axis split, D whole),
#: ``"classes"`` like the bias, ``"replicated"`` whole on every device.
Kind = Literal["rows", "features", "weight", "classes", "replicated"]


class Layout(NamedTuple):
    """Static description of where a call runs (hashable: part of a jit/custom-rule key)."""

    mesh: Mesh | AbstractMesh
    explicit: bool  # the mesh's axes are Explicit: shardings are part of the arrays' types
    lead: tuple  # one entry per leading dim of Z: None, an axis name or a tuple of names
    classes: tuple[str, ...]  # axes splitting W's class axis
    kaxis: int  # W's class axis (1 for (D, K), 0 for (K, D))
    given: tuple  # the specs the inputs came with: (Z, W, bias), each a PartitionSpec or None

    @property
    def rows(self) -> tuple[str, ...]:
        return _names(self.lead)


class Local(NamedTuple):
    """What the per-device function is told: the axes its reductions go over."""

    rows: tuple[str, ...]  # psum per-row sums over these (empty on one device)
    classes: tuple[str, ...]  # pmax / psum row statistics over these

    def class_offset(self, k_local: int):
        """The first global class of this device's shard."""
        return 0 if not self.classes else lax.axis_index(self.classes) * k_local


ONE_DEVICE = Local((), ())


def _names(entries) -> tuple[str, ...]:
    out: list[str] = []
    for e in entries:
        if e is None:
            continue
        out.extend(e if isinstance(e, tuple) else (e,))
    return tuple(out)


def _sharding(x):
    """The ``NamedSharding`` an array carries now (concrete) or in its type (explicit axes)."""
    if x is None:
        return None
    sharding = getattr(jax.typeof(x), "sharding", None) if isinstance(x, jax.core.Tracer) else None
    if sharding is None or not isinstance(sharding, NamedSharding):
        sharding = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else sharding
    if not isinstance(sharding, NamedSharding):
        return None
    types = tuple(sharding.mesh.axis_types)
    if AxisType.Manual in types or sharding.mesh.size == 1:
        return None  # inside a user's shard_map (local shards), or one device
    if isinstance(x, jax.core.Tracer) and AxisType.Explicit not in types:
        return None
    return sharding


def _padded(spec, ndim) -> tuple:
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    return tuple(e[0] if isinstance(e, tuple) and len(e) == 1 else e for e in entries)


def _abstract(mesh):
    return mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh


def _spec_text(name, sharding, ndim):
    return f"`{name}` sharded as {P(*_padded(sharding.spec, ndim))}"


def layout_of(Z, W, bias, *, kaxis: int, mesh=None, classes=None, rows=None) -> Layout | None:
    """The layout of a call, ``None`` when nothing is split over more than one device.

    ``mesh``/``classes``/``rows`` override what the shardings say (the sharded head's
    ``mesh=``/``axis_name=``): ``classes`` the axes splitting K, ``rows`` those splitting
    ``Z``'s first leading dim."""
    asked = mesh is not None  # the sharded head: runs on its mesh even when that is 1 device
    found = {n: _sharding(x) for n, x in (("Z", Z), ("W", W), ("bias", bias))}
    meshes = {n: s.mesh for n, s in found.items() if s is not None}
    if mesh is None:
        if not meshes:
            return None
        mesh = next(m for m in meshes.values() if isinstance(m, Mesh)) if any(
            isinstance(m, Mesh) for m in meshes.values()) else next(iter(meshes.values()))  # fmt: skip
    for n, m in meshes.items():
        if _abstract(m) != _abstract(mesh):
            raise ValueError(
                f"`{n}` is sharded on mesh {dict(_abstract(m).shape)} but the call runs on mesh "
                f"{dict(_abstract(mesh).shape)}; put every operand on one mesh"
            )
    nlead = Z.ndim - 1
    zs = found["Z"]
    lead = _padded(zs.spec, Z.ndim)[:nlead] if zs is not None else (None,) * nlead
    ws = found["W"]
    if classes is None:
        entry = _padded(ws.spec, 2)[kaxis] if ws is not None else None
        classes = _names((entry,))
    if rows is not None:  # the rows split where the first leading dim allows it
        split = rows and nlead and Z.shape[0] % _size(mesh, rows) == 0
        lead = ((rows if split else None),) + (None,) * (nlead - 1) if nlead else ()
    if rows is None and zs is None and classes and nlead:
        lead = (None,) * nlead
    clash = set(_names(lead)) & set(classes)
    if clash:
        raise ValueError(
            f"{_spec_text('Z', zs, Z.ndim) if zs else '`Z`'} splits its rows and "
            f"{_spec_text('W', ws, 2) if ws else '`W`'} its classes over the same mesh axes "
            f"{sorted(clash)}; shard the rows and the vocabulary over different axes"
        )
    _check_divisible(Z, W, lead, classes, kaxis, mesh)
    layout = Layout(
        mesh, AxisType.Explicit in tuple(mesh.axis_types), tuple(lead), tuple(classes), kaxis,
        tuple(None if s is None else P(*_padded(s.spec, x.ndim))
              for s, x in zip(found.values(), (Z, W, bias))),
    )  # fmt: skip
    used = set(layout.rows) | set(layout.classes) | set(_given_axes(layout))
    if not asked and not any(mesh.shape[a] > 1 for a in used):
        return None
    return layout


def _given_axes(layout: Layout) -> tuple[str, ...]:
    return _names(e for spec in layout.given if spec is not None for e in spec)


def _size(mesh, axes) -> int:
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def _check_divisible(Z, W, lead, classes, kaxis, mesh) -> None:
    for dim, entry in enumerate(lead):
        size = _size(mesh, _names((entry,)))
        if Z.shape[dim] % size:
            raise ValueError(
                f"`Z` {tuple(Z.shape)} splits its leading dim {dim} over mesh axes "
                f"{_names((entry,))} of {size} devices, which do not divide {Z.shape[dim]}; "
                f"pad the batch or shard another dim"
            )
    size = _size(mesh, classes)
    if classes and W.shape[kaxis] % size:
        raise ValueError(
            f"`W` is sharded over its class axis on mesh axes {classes} of size {size}, but "
            f"K = {W.shape[kaxis]} is not divisible by {size}; shard W evenly or gather it"
        )


def local_rows(layout: Layout | None, lead_shape: Sequence[int]) -> int:
    """The number of rows each device holds."""
    n = int(np.prod(lead_shape, dtype=np.int64))
    return n if layout is None else n // max(_size(layout.mesh, layout.rows), 1)


def _spec(layout: Layout, kind: Kind, ndim: int) -> P:
    classes = layout.classes or None
    if kind == "rows":
        return P(*layout.lead, *(None,) * (ndim - len(layout.lead)))
    if kind == "features":
        return P(*layout.lead, None)
    if kind == "weight":
        return P(None, classes) if layout.kaxis == 1 else P(classes, None)
    if kind == "classes":
        return P(classes)
    return P()


def _place(x, layout: Layout, spec: P):
    sharding = NamedSharding(layout.mesh, spec)
    if layout.explicit:
        have = getattr(jax.typeof(x), "sharding", None)
        if isinstance(have, NamedSharding) and have.spec == spec:
            return x
        return jax.sharding.reshard(x, sharding)
    return lax.with_sharding_constraint(x, sharding)


def _given(layout: Layout, index: int | None):
    """The spec an output takes from its input (``dZ`` like ``Z``...), if that one is known."""
    return None if index is None else layout.given[index]


def run(
    per_device: Callable,
    layout: Layout | None,
    args: Sequence,
    in_kinds: Sequence[Kind],
    out_kinds: Sequence[tuple[Kind, int | None]],
):
    """``per_device(local, *args)`` on one device or on every device of ``layout.mesh``.

    ``in_kinds`` says how each argument is split (``None`` arguments pass through);
    ``out_kinds`` how each output is, and which input (0 ``Z``, 1 ``W``, 2 bias) it takes its
    final sharding from. ``per_device`` returns local outputs already reduced over the axes its
    :class:`Local` names (a ``dW`` summed over the rows, a ``dZ`` over the classes)."""
    if layout is None:
        return per_device(ONE_DEVICE, *args)
    live = [i for i, x in enumerate(args) if x is not None]
    in_specs = tuple(_spec(layout, in_kinds[i], args[i].ndim) for i in live)
    placed = [_place(args[i], layout, s) if layout.explicit else args[i]
              for i, s in zip(live, in_specs)]  # fmt: skip
    local = Local(layout.rows, layout.classes)

    def body(*xs):
        full: list = list(args)
        for i, x in zip(live, xs):
            full[i] = x
        return tuple(per_device(local, *full))

    # A "rows" output has exactly Z's leading dims; "replicated" ones any rank.
    out_specs = tuple(_spec(layout, kind, len(layout.lead)) for kind, _ in out_kinds)
    # check_vma=False: the loops' carries carry no varying-axis types; every output declared
    # replicated over an axis is a psum/pmax over it, or computed from replicated inputs only.
    smap = jax.shard_map(body, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)  # fmt: skip
    outs = smap(*placed)
    final = []
    for (_, index), o, s in zip(out_kinds, outs, out_specs):
        want = _given(layout, index)
        final.append(o if want is None or want == s else _place(o, layout, want))
    return tuple(final)


def flat_rows(x, lead: tuple[int, ...]):
    """``x`` ``(*lead, ...)`` as rows ``(n, ...)`` (``None`` stays ``None``): what a per-device
    function does to its local shard before the row-chunk pass."""
    return None if x is None else x.reshape(-1, *x.shape[len(lead) :])


def lead_rows(x, lead: tuple[int, ...]):
    """A per-row output ``(n, ...)`` back to ``(*lead, ...)``; an empty one (not asked for) to
    ``(0, ..., 0, ...)``: the rank the out specs of :func:`run` expect."""
    return x.reshape(*(lead if x.shape[0] else (0,) * len(lead)), *x.shape[1:])


def reduce_gradients(local: Local, lead: tuple[int, ...], dZ, dW, db, wants, z_dtype):
    """The per-device tail of a pass over rows: of the gradients asked for in
    ``wants = (dZ, dW, db)``, ``dZ`` ``(n, D)`` summed over the class axes (in ``z_dtype``) and
    reshaped to ``(*lead, D)``, ``dW`` and ``db`` summed over the row axes."""
    if wants[0] and local.classes:
        dZ = lax.psum(dZ, local.classes).astype(z_dtype)
    if local.rows:
        dW = lax.psum(dW, local.rows) if wants[1] else dW
        db = lax.psum(db, local.rows) if wants[2] else db
    return lead_rows(dZ, lead), dW, db


def varying_like(x, *refs):
    """``x`` typed as varying over the manual axes any of ``refs`` varies over (inside a user's
    ``jax.shard_map`` with ``check_vma``): loop carries then keep one type."""
    axes = frozenset().union(*(_vma(r) for r in refs if r is not None))
    missing = tuple(sorted(axes - _vma(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def reduce_like(ct, primal):
    """A cotangent summed over the manual axes it varies over and its primal does not (the
    transpose of the implicit broadcast of an invariant operand)."""
    extra = tuple(sorted(_vma(ct) - _vma(primal)))
    return lax.psum(ct, extra) if extra else ct


def _vma(x) -> frozenset:
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset() if mat is None else frozenset(mat.varying)
