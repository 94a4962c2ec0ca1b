"""Scale-out on JAX's own engine: the class-sharded (vocabulary-parallel) head.

``sharded_linear_cross_entropy`` is :func:`softmax_jax.linear_cross_entropy` with ``W`` and ``b``
split over their K (class) axis across the devices of a mesh axis, Megatron-style. The per-device
math is the head's own kernel (``_kernel``), given its shard's first class and the global K.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from ._head import CrossEntropyAux, dispatch, prepare, sharded_spec

# --------------------------------------------------------------------------------------------
# Validation and the public wrapper.
# --------------------------------------------------------------------------------------------


def _check_mesh(mesh, axis_name: str, n: int, k: int) -> None:
    """Checks the mesh against the problem (the other axes split the N rows)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if axis_name not in names:
        raise ValueError(f"`axis_name` must be an axis of `mesh` {names}, got {axis_name!r}")
    p = mesh.shape[axis_name]
    if k % p:
        raise ValueError(
            f"`W` must have a number of classes K divisible by the {p} devices of mesh axis "
            f"{axis_name!r} (each device holds K / {p} columns), got K = {k}; use a mesh axis "
            f"whose size divides K"
        )
    batch = tuple(a for a in names if a != axis_name)
    nb = int(np.prod([mesh.shape[a] for a in batch], dtype=np.int64))
    if n % nb:
        raise ValueError(
            f"`Z` must have a number of rows N divisible by the {nb} devices of mesh axes "
            f"{batch} (the rows are split over them), got N = {n}"
        )


def sharded_linear_cross_entropy(
    Z: ArrayLike,
    W: ArrayLike,
    labels: ArrayLike,
    *,
    mesh: Mesh,
    axis_name: str = "model",
    bias: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    chunk_size: int | Literal["auto"] | None = "auto",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int | None = -100,
    softcap: float | None = None,
    weight_layout: Literal["dk", "kd"] = "dk",
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
    r"""Class-sharded (vocabulary-parallel) :func:`softmax_jax.linear_cross_entropy`.

    The same loss, options and hand-written gradient, with ``W`` and ``b`` split over their class
    axis across the ``P`` devices of ``mesh.shape[axis_name]`` (``W`` ``(D, K)`` as
    ``P(None, axis_name)``, or ``(K, D)`` as ``P(axis_name, None)`` with ``weight_layout="kd"``):
    device ``p`` holds the classes ``[p K/P, (p + 1) K/P)`` and only ever computes its
    ``(chunk, K / P)`` slice of the logits. The row-wise quantities over all ``K`` classes are
    combined across devices:

    .. math::

        M_i = \max_p \operatorname{lse}_p(a_i), \qquad
        \operatorname{lse}(a_i) = M_i + \log \sum_p e^{\operatorname{lse}_p(a_i) - M_i},
        \qquad a_{i, y_i} = \sum_p [y_i \in p]\, a_{i, y_i}

    (a ``pmax`` and ``psum`` of ``(chunk,)`` vectors per row chunk, one more ``psum`` for the
    smoothing mean ``Σ_k a_ik``, a ``pmax``/``pmin`` pair for ``aux.predictions``). The gradients
    are computed per shard: ``∂L/∂W_p = Zᵀ G_p`` and ``∂L/∂b_p`` stay on their device (sharded
    like ``W`` and ``b``), ``∂L/∂Z = psum_p(G_p W_pᵀ)`` is one all-reduce of an ``(N, D)`` array;
    gradients nobody asked for (``W`` frozen, ``Z`` a constant) are skipped. ``W`` is never
    gathered; per-device temporaries scale as ``chunk × K / P`` plus the ``(D, K / P)``
    gradient block.

    Every other mesh axis (e.g. ``"data"`` in a ``("data", "model")`` mesh) splits the rows of
    ``Z``, ``labels`` and ``weights``: the gradients of ``W`` and ``b`` are then also summed over
    those axes, and the mean uses the global ``Σ s``. With a one-axis mesh, ``Z`` is replicated.
    Meshes of any axis type are accepted (``jax.sharding.Mesh``, ``jax.make_mesh``'s explicit
    axes; with explicit axes, differentiate under ``jax.jit`` or inside ``jax.set_mesh(mesh)``, as
    JAX's explicit sharding mode asks of every function).

    Design: an explicit ``jax.shard_map`` rather than sharding annotations under ``jit``, so the
    collectives are exactly those above and the per-device code is the head's kernel. The
    ``custom_vjp`` sits *outside* the ``shard_map``: no collective is ever differentiated.

    Args:
      Z, W, labels, bias, weights, reduction, chunk_size, label_smoothing, z_loss, ignore_index,
        softcap, weight_layout, return_aux: as :func:`softmax_jax.linear_cross_entropy`;
        ``chunk_size`` counts rows per device; ``"auto"`` picks it from the global K, so each
        device's ``(chunk, K/P)`` logits are 1/P of the single-device budget.
        ``K`` must be divisible by the size of the class axis.
      mesh: a ``jax.sharding.Mesh`` with an axis named ``axis_name``.
      axis_name: the mesh axis that splits the classes, ``"model"`` by default.

    Returns:
      As :func:`softmax_jax.linear_cross_entropy`; ``∂L/∂W`` and ``∂L/∂b`` come back sharded like
      ``W`` and ``b``.

    Raises:
      ValueError: as :func:`softmax_jax.linear_cross_entropy`; ``axis_name`` not in the mesh,
        ``K`` not divisible by its size, or ``N`` not divisible by the other axes' sizes.
      TypeError: as :func:`softmax_jax.linear_cross_entropy`, or ``mesh`` not a ``Mesh``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from softmax_jax import sharded_linear_cross_entropy
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> Z = jnp.ones((4, 3)); W = jnp.zeros((3, 8)); y = jnp.arange(4)
      >>> float(sharded_linear_cross_entropy(Z, W, y, mesh=mesh))  # log(8)
      2.079441...

    References:
      Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
      Parallelism" (2019), §3 (parallel cross-entropy over the vocabulary).
    """
    with jax.named_scope("sharded_linear_cross_entropy"):
        p = prepare(Z, W, labels, bias, weights, reduction, chunk_size, label_smoothing,
                    z_loss, ignore_index, softcap, weight_layout, return_aux)  # fmt: skip
        _check_mesh(mesh, axis_name, p.Z.shape[0], p.spec.k)
        spec = sharded_spec(p, mesh, axis_name, split_rows=True)
        return dispatch(p, spec)


# --------------------------------------------------------------------------------------------
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
