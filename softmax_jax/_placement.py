"""Where the training data and parameters live: one device, or a data-parallel mesh."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ._objective import TrainData

# Data parallelism for ``fit``: batches split over a "data" axis, parameters replicated.
# --------------------------------------------------------------------------------------------

DATA_AXIS = "data"


class DataParallel(NamedTuple):
    """How :func:`softmax_jax.fit` lays out one training run on a mesh (hashable: a static jit
    argument).

    For the minibatch optimizers the training set and the parameters are replicated on every
    device of the mesh (each process of a multi-process run holds the data it was given); each
    minibatch is gathered from the replicated set and split over the ``"data"`` axis with a
    sharding constraint, so XLA partitions the GEMMs of eq. (6) row-wise and sums
    ``Zᵀ(Ŷ − Y)`` across devices with one all-reduce. A batch whose size is not a multiple of
    the axis size is padded with zero-weight samples (the weighted mean, its gradient and the
    accuracy are unchanged). The full-batch solvers get all rows split over ``"data"`` instead
    (padded likewise).
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

    def put_rows(self, x):
        """Host values with their rows (first axis, a multiple of the axis size) split over
        ``"data"``: for the full-batch solvers, which run over all rows at every step."""
        if x is None:
            return None
        host = np.asarray(x)
        if host.shape[0] % self.size:
            raise ValueError(
                f"rows must be a multiple of the {self.size} devices of axis {DATA_AXIS!r}, "
                f"got {host.shape[0]}"
            )  # an internal invariant: fit pads the rows first
        spec = P(DATA_AXIS, *([None] * (host.ndim - 1)))
        sharding = jax.sharding.NamedSharding(self.mesh, spec)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

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


@functools.partial(jax.jit, static_argnames=("fit_intercept", "dtype"))
def hessian_operands(Z: jax.Array, *, fit_intercept: bool, dtype) -> tuple[jax.Array, jax.Array]:
    """``Zh = [Z, 1]`` (or ``Z``) in ``dtype`` and ``Zh ⊙ Zh``, built on the device."""
    Zh = Z.astype(dtype)
    if fit_intercept:
        Zh = jnp.concatenate([Zh, jnp.ones((Z.shape[0], 1), dtype)], axis=1)
    return Zh, Zh * Zh


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
    split_rows: bool = False,
) -> TrainData:
    """Puts the data on ``device`` once: ``Z`` in ``dtype`` (copied only when the dtype changes or
    when it is padded with zeros to ``shape = (rows, features)``; padded rows get weight 0), and
    with ``hessian_dtype`` the operands of Newton-CG's Hessian products. ``device`` may be a
    :class:`DataParallel` layout: the data are then replicated on its mesh, or with ``split_rows``
    their rows split over its ``"data"`` axis."""
    n, d = Z.shape
    rows, cols = (n, d) if shape is None else shape
    if (rows, cols) == (n, d):
        Zp = np.asarray(Z, dtype)
    else:
        Zp = np.zeros((rows, cols), dtype)
        Zp[:n, :d] = Z
    yb = np.zeros(rows, np.int32)
    yb[:n] = y
    sb = None
    if rows > n or s is not None:
        sb = np.zeros(rows, dtype)
        sb[:n] = 1 if s is None else s
    if isinstance(device, DataParallel):
        put = device.put_rows if split_rows else device.replicate
    else:
        put = functools.partial(jax.device_put, device=device)
    Zd = put(Zp)
    Zh = Zsq = None
    if hessian_dtype is not None:
        Zh, Zsq = hessian_operands(
            Zd, fit_intercept=fit_intercept, dtype=np.dtype(hessian_dtype).name
        )
    return TrainData(Zd, put(yb), None if sb is None else put(sb), Zh, Zsq)
