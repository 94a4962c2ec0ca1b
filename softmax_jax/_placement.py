"""Where the training data and parameters live: one device, or a data-parallel mesh."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ._compile_cache import cached_program
from ._objective import TrainData, hessian_copy
from ._sparse import place_sparse
from ._validate import is_sparse

# Data parallelism for ``fit``: batches split over a "data" axis, parameters replicated.
# --------------------------------------------------------------------------------------------

DATA_AXIS = "data"


class DataParallel(NamedTuple):
    """How :func:`softmax_jax.fit` lays out one training run on a mesh (hashable: a static jit
    argument).

    The training set's rows are split over the ``"data"`` axis (padded with zero-weight rows to a
    multiple of its size): each device holds ``N / P`` rows, and in a multi-process run each
    process reads and places only the rows of its own devices
    (``jax.make_array_from_process_local_data``), so no process or device holds the whole set.
    The parameters are replicated. Each minibatch is gathered from the split rows (XLA gathers a
    row on the device holding it and sums the masked gathers: an all-reduce of the batch) and
    split over ``"data"`` with a sharding constraint, so XLA partitions the GEMMs of eq. (6)
    row-wise and sums ``Zᵀ(Ŷ − Y)`` across devices with one all-reduce. A batch whose size is not
    a multiple of the axis size is padded with zero-weight samples (the weighted mean, its
    gradient and the accuracy are unchanged). The full-batch solvers run over the split rows.
    """

    mesh: Mesh

    @property
    def size(self) -> int:
        """Devices along the ``"data"`` axis."""
        return self.mesh.shape[DATA_AXIS]

    def padded(self, batch_size: int) -> int:
        """``batch_size`` rounded up to a multiple of the axis size."""
        return -(-batch_size // self.size) * self.size

    def replicate(self, tree):
        """Puts host values (NumPy or single-device arrays) on every device of the mesh.

        ``jax.make_array_from_callback`` works alike with one process and with several (each
        process fills its own devices from its own copy)."""
        sharding = jax.sharding.NamedSharding(self.mesh, P())

        def put(x):
            if x is None:
                return None
            if isinstance(x, jax.Array) and x.sharding == sharding:
                return x
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

        return jax.tree.map(put, tree)

    def row_sharding(self, ndim: int) -> jax.sharding.NamedSharding:
        """The first axis split over ``"data"``, the others whole."""
        return jax.sharding.NamedSharding(self.mesh, P(DATA_AXIS, *([None] * (ndim - 1))))

    def local_range(self, sharding: jax.sharding.Sharding, shape: tuple, axis: int = 0):
        """``(lo, hi)``: the entries along ``axis`` of a ``shape`` array laid out by ``sharding``
        that this process's devices hold (contiguous: a ``"data"`` axis lists each process's
        devices together, as ``jax.make_mesh`` and ``jax.devices()`` order them)."""
        spans = {
            (sl[axis].indices(shape[axis])[:2])
            for sl in sharding.addressable_devices_indices_map(shape).values()
        }
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        if sum(b - a for a, b in spans) != hi - lo:
            raise ValueError(
                f"the devices of process {jax.process_index()} must be contiguous along mesh "
                f"axis {DATA_AXIS!r} (order the mesh's devices by process), got rows {sorted(spans)}"
            )
        return lo, hi

    def put_rows(self, x, *, rows: int | None = None, dtype=None, check: str | None = None):
        """Host values ``x`` (an array or memmap, ``(N, ...)``) as a global array of ``rows``
        (default ``N``, a multiple of the axis size) rows split over ``"data"``; rows past ``N``
        are zeros. Each process reads only the rows of its own devices (and with ``check``, the
        argument's name, rejects NaN/inf in them)."""
        if x is None:
            return None
        n = x.shape[0]
        rows = n if rows is None else rows
        if rows % self.size:
            raise ValueError(
                f"rows must be a multiple of the {self.size} devices of axis {DATA_AXIS!r}, "
                f"got {rows}"
            )  # an internal invariant: fit pads the rows first
        shape = (rows, *x.shape[1:])
        sharding = self.row_sharding(len(shape))
        lo, hi = self.local_range(sharding, shape)
        dtype = x.dtype if dtype is None else dtype
        if hi <= n:
            local = np.asarray(x[lo:hi], dtype)
        else:
            local = np.zeros((hi - lo, *shape[1:]), dtype)
            local[: max(0, n - lo)] = x[lo:n]
        if check is not None and not np.isfinite(local).all():
            r, *c = np.unravel_index(int(np.flatnonzero(~np.isfinite(local))[0]), local.shape)
            raise ValueError(
                f"`{check}` must be finite, got {local[(r, *c)]} at index "
                f"{(lo + int(r), *(int(i) for i in c))}"
            )
        return jax.make_array_from_process_local_data(sharding, local, shape)

    def split_rows(self, x: jax.Array) -> jax.Array:
        """Inside ``jit``: ``x``'s first axis split over ``"data"``."""
        spec = P(DATA_AXIS, *([None] * (x.ndim - 1)))
        return lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))


def pad_batches(idx: jax.Array, w: jax.Array, batch_size: int, padded: int):
    """``(nb·batch_size,)`` sample indices and weights laid out as ``nb`` batches of ``padded``
    entries: each batch's own samples, then ``padded − batch_size`` entries of index 0 and weight
    0. Returns ``(idx, w)`` of shape ``(nb·padded,)``."""
    if padded == batch_size:
        return idx, w
    extra = ((0, 0), (0, padded - batch_size))
    nb = idx.shape[0] // batch_size
    idx = jnp.pad(idx.reshape(nb, batch_size), extra).reshape(-1)
    w = jnp.pad(w.reshape(nb, batch_size), extra).reshape(-1)
    return idx, w


def data_parallel(mesh) -> DataParallel | None:
    """Validates ``fit``'s ``mesh`` argument: ``None``, or a ``Mesh`` with a ``"data"`` axis.

    Axes of explicit type (``jax.make_mesh``'s default in recent jax) are read as automatic:
    ``fit`` states its layouts with sharding constraints. Other axes than ``"data"`` are allowed
    and hold replicas (the batch is split over ``"data"`` only).
    """
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if DATA_AXIS not in names:
        raise ValueError(
            f"`mesh` must have an axis named {DATA_AXIS!r} to split the batches over, got axes "
            f"{names}"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    if tuple(mesh.axis_types) != auto:
        mesh = Mesh(mesh.devices, names, axis_types=auto)
    return DataParallel(mesh)


def initial_params(init_params, d: int, k: int, fit_intercept: bool, dtype) -> dict:
    """``fit``'s starting parameters: zeros, or ``init_params`` checked against ``(D, K)``; NumPy
    arrays, for the caller to place (made on the device, each shape would compile a program)."""
    dtype = np.dtype(dtype)
    if init_params is None:
        params = {"W": np.zeros((d, k), dtype)}
        if fit_intercept:
            params["b"] = np.zeros((k,), dtype)
        return params
    if not isinstance(init_params, dict) or "W" not in init_params:
        raise TypeError(f"`init_params` must be a dict with 'W' (and 'b'), got {init_params!r}")
    W = np.asarray(init_params["W"], dtype)
    if W.shape != (d, k):
        raise ValueError(f"`init_params['W']` must have shape (D, K) = {(d, k)}, got {W.shape}")
    params = {"W": W}
    if fit_intercept:
        b = np.asarray(init_params.get("b", np.zeros(k)), dtype)
        if b.shape != (k,):
            raise ValueError(f"`init_params['b']` must have shape (K,) = ({k},), got {b.shape}")
        params["b"] = b
    return params


def resolve_device(device: Any) -> jax.Device:
    if device is None:
        default = jax.config.jax_default_device
        if isinstance(default, jax.Device):
            return default
        return jax.devices(default)[0] if isinstance(default, str) else jax.devices()[0]
    if isinstance(device, jax.Device):
        return device
    if isinstance(device, str):
        try:
            return jax.devices(device)[0]
        except RuntimeError as e:
            raise ValueError(f"`device` {device!r} is not available to JAX: {e}") from None
    raise TypeError(f"`device` must be None, 'cpu', 'gpu' or a jax.Device, got {device!r}")


def bucket_rows(n: int) -> int:
    """Rounds small ``n`` up to a power of two (``n <= 1024``) or to a multiple of 1/32 of the
    power of two below it (at most 3.2% more rows, up to 65536), so fits on data of nearby sizes
    (cross-validation folds, scikit-learn's checks) share one compiled solver; padded rows have
    weight 0 (``place(..., shape=)``). Larger problems keep their size: compiling is then a small
    part of a fit."""
    if n <= 1024:
        return max(16, 1 << (n - 1).bit_length())
    if n > 65536:
        return n
    step = 1 << (n.bit_length() - 6)
    return -(-n // step) * step


def place(
    Z: np.ndarray,
    y: np.ndarray,
    s: np.ndarray | None,
    *,
    fit_intercept: bool,
    dtype,
    device,
    shape: tuple[int, int] | None = None,
    hessian_dtype=None,
    num_classes: int = 0,
    check: str | None = None,
) -> TrainData:
    """Puts the data on ``device`` once: ``Z`` in ``dtype`` (copied only when the dtype changes or
    when it is padded with zeros to ``shape = (rows, features)``; padded rows get weight 0), and
    with ``hessian_dtype`` a copy of ``Z`` in that dtype for Newton-CG's Hessian products (none
    when it is ``dtype``: the products then use ``Z``), on one device transposed from
    :data:`softmax_jax._objective.COLUMNS_MIN_ROWS` rows on (for ``num_classes`` classes:
    :func:`~softmax_jax._objective.hessian_copy`), by rows on a mesh. ``device`` may be a
    :class:`DataParallel` layout: the rows are then split over its ``"data"`` axis, padded with
    zero rows of weight 0 to a multiple of its size (:meth:`DataParallel.put_rows`: each process
    reads only its rows of ``Z``, and with ``check``, the argument's name, rejects NaN/inf there)."""
    if is_sparse(Z):  # a canonical CSR (softmax_jax._sparse)
        Zs, yd, sd, Zh = place_sparse(
            Z, y, s, dtype=dtype, device=device, shape=shape, hessian_dtype=hessian_dtype
        )
        return TrainData(Zs, yd, sd, Zh)
    n = Z.shape[0]
    if isinstance(device, DataParallel):
        rows = device.padded(n)
        sb = s
        if rows > n or s is not None:
            sb = np.zeros(rows, dtype)
            sb[:n] = 1 if s is None else s
        Zd = device.put_rows(Z, rows=rows, dtype=dtype, check=check)
        Zh = (
            None
            if not _needs_copy(hessian_dtype, dtype)
            else device.put_rows(Z, rows=rows, dtype=hessian_dtype)
        )
        yd = device.put_rows(np.asarray(y, np.int32), rows=rows)
        sd = device.put_rows(sb)
    else:
        rows, cols = Z.shape if shape is None else shape
        if (rows, cols) == Z.shape:
            Zp = np.asarray(Z, dtype)
        else:
            Zp = np.zeros((rows, cols), dtype)
            Zp[:n, : Z.shape[1]] = Z
        yb = np.zeros(rows, np.int32)
        yb[:n] = y
        sb = None
        if rows > n or s is not None:
            sb = np.zeros(rows, dtype)
            sb[:n] = 1 if s is None else s
        Zd, yd, sd = jax.device_put((Zp, yb, sb), device)  # one call: one dispatch (None stays)
        # the Hessian's operand (transposed on large problems), cast on the device
        Zh = None
        if _needs_copy(hessian_dtype, dtype):
            copy = cached_program(
                _hessian_copy, "hessian-copy", (Zd,), dtype=np.dtype(hessian_dtype),
                num_classes=num_classes,
            )  # fmt: skip
            Zh = copy(Zd)
    return TrainData(Zd, yd, sd, Zh)


_hessian_copy = jax.jit(hessian_copy, static_argnames=("dtype", "num_classes"))


def _needs_copy(hessian_dtype, dtype) -> bool:
    return hessian_dtype is not None and np.dtype(hessian_dtype) != np.dtype(dtype)
