"""Scale-out on JAX's own engine: the class-sharded (vocabulary-parallel) head.

``sharded_linear_cross_entropy`` is :func:`softmax_jax.linear_cross_entropy` with ``W`` and ``b``
split over their K (class) axis across the devices of a mesh axis, Megatron-style. The per-device
math is the head's own kernel (``_kernel``), given its shard's first class and the global K.
"""

from __future__ import annotations

from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from ._head import CrossEntropyAux, dispatch, placed_spec, prepare

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
        n = int(np.prod(p.lead, dtype=np.int64))
        _check_mesh(mesh, axis_name, n, p.spec.num_classes)
        rows = tuple(a for a in mesh.axis_names if a != axis_name)
        if rows and not p.lead:
            raise ValueError(
                "`Z` must have rows (shape (..., D)) to split over the mesh axes {rows}"
            )
        spec = placed_spec(p, mesh=mesh, classes=(axis_name,), rows=rows)
        return dispatch(p, spec)
