"""Eq. (6): the hand-written gradient of eq. (2), its terms (eq. (4)) and its Hessian-vector product.

No autodiff is used in this module: every derivative is written out from the derivation.

Interface for the training layer (``_objective`` builds its objective, with a bias, chunks and
sample weights, from these pieces rather than from the public functions' internals):

- :func:`residual`: ``M = diag(c)(Ŷ − Y)`` from the softmax pieces of the logits;
- :func:`transpose_gemm`: ``scale · Zᵀ M`` under the precision policy (the second GEMM of eq. (6));
- :func:`hvp_residual`: the HVP's ``(N, K)`` middle factor ``Ŷ ⊙ (Z V) − Ŷ ⊙ rowsum(Ŷ ⊙ Z V)``;
- :func:`softmax_variance`: ``Ŷ ⊙ (1 − Ŷ)``, the Hessian's diagonal factor, exact on saturated rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._loss import (
    label_validity,
    logits,
    logsumexp_rows,
    mean_scale,
    nll_rows,
    reduce_classes,
    reduce_losses,
)
from ._precision import acc_dtype, gemm, mean_normaliser, operand
from ._validate import as_array, check_problem, check_result


def residual(A, E, S, Y, c, int_labels: bool, axis: int = 1) -> jax.Array:
    """``M = diag(c) (Ŷ − Y)``, laid out like ``A`` (the classes on axis ``axis``: ``(N, K)``, or
    class-major ``(K, N)``), from the softmax pieces ``E / S``.

    Integer labels subtract ``c_i`` at ``(i, y_i)``: the label position is an index compare
    (``iota == y_i``) evaluated inside the same fused loop that forms ``M``, so no (N, K) one-hot
    or mask is ever written to memory (``tests/test_grad.py`` checks the compiled program); a
    scatter-add at the label positions would cost a second pass over (N, K). A row with an
    out-of-range label (possible only under tracing) becomes NaN.
    """
    n, k = A.shape[1 - axis], A.shape[axis]
    if int_labels:
        c = jnp.ones((n,), A.dtype) if c is None else c
        c = jnp.expand_dims(jnp.where(label_validity(Y, k), c, jnp.nan), axis)
        hit = lax.broadcasted_iota(jnp.int32, A.shape, axis) == jnp.expand_dims(
            Y.astype(jnp.int32), axis
        )
        return E * (c / S) - jnp.where(hit, c, 0)
    M = E / S - Y.astype(A.dtype)
    return M if c is None else M * jnp.expand_dims(c, axis)


def transpose_gemm(
    Z: jax.Array,
    M: jax.Array,
    out_dtype,
    scale: jax.Array | None = None,
    *,
    rows_axis: int = 0,
    class_axis: int = 1,
) -> jax.Array:
    """``scale · Zᵀ M`` (D, K): the second GEMM, under the precision policy of ``_precision``:
    operands in ``W``'s dtype (``out_dtype``), accumulated in float32 at least, the scalar
    ``scale`` (the mean's ``1 / Σ s``) applied to the accumulated result. ``rows_axis=1``: ``Z``
    is given transposed, ``(D, N)``; ``class_axis=0``: ``M`` is class-major, ``(K, N)``."""
    acc = acc_dtype(out_dtype, M.dtype)
    G = gemm(operand(Z, out_dtype), operand(M, out_dtype), (rows_axis, 1 - class_axis), acc)
    if scale is not None:
        G = G * scale.astype(acc)
    return G.astype(out_dtype)


def _value_and_grad_math(W, Z, Y, weights, *, reduction: str, int_labels: bool):
    A = logits(W, Z)
    _, E, S = logsumexp_rows(A)
    value = reduce_losses(nll_rows(A, S, Y, int_labels), weights, reduction)
    # The residual carries the raw weights s_i; the mean's 1 / Σ s multiplies the GEMM's result.
    c = None if weights is None else weights.astype(A.dtype)
    M = residual(A, E, S, Y, c, int_labels)
    inv = mean_normaliser(weights, A.shape[0], reduction, A.dtype)
    return value, transpose_gemm(Z, M, jnp.result_type(W.dtype), inv)


_value_and_grad_impl = jax.jit(_value_and_grad_math, static_argnames=("reduction", "int_labels"))


@functools.partial(jax.jit, static_argnames=("reduction", "int_labels"))
def _grad_impl(W, Z, Y, weights, *, reduction: str, int_labels: bool):
    # The loss value is dead code here and XLA drops it.
    return _value_and_grad_math(W, Z, Y, weights, reduction=reduction, int_labels=int_labels)[1]


def _scalar_reduction(reduction: str, fn: str) -> None:
    if reduction == "none":
        raise ValueError(
            f"`reduction` must be 'sum' or 'mean' for {fn}: the gradient of the per-sample losses "
            f"(reduction='none') is not a single (D, K) array; got 'none'"
        )


def value_and_grad(
    W: ArrayLike,
    Z: ArrayLike,
    Y: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    reduction: str = "sum",
) -> tuple[jax.Array, jax.Array]:
    r"""Eq. (2) and its hand-written gradient, eq. (6), in one pass.

    .. math::

        \frac{\partial L}{\partial w_k} = \sum_i s_i (\hat y_{ik} - y_{ik})\, z_i,
        \qquad \frac{\partial L}{\partial W} = Z^\top \operatorname{diag}(s)\,(\hat Y - Y)

    with ``Ŷ = softmax(Z W)`` row-wise. Two GEMMs (``Z W`` and ``Zᵀ M``) and one softmax; no
    autodiff. Exact for any finite targets ``Y``, including rows that do not sum to one (see
    :func:`softmax_jax.loss`). With ``reduction="mean"`` both value and gradient are divided by
    ``Σ s_i`` (or ``N``). Integer labels never build an (N, K) one-hot: ``s_i`` is subtracted at the
    label positions, found by an index compare fused into the pass that forms ``Ŷ − Y``.

    Args:
      W: weights ``(D, K)``.
      Z: features ``(N, D)``.
      Y: targets ``(N, K)`` or integer labels ``(N,)`` in ``[0, K)``.
      weights: optional per-sample weights ``s``, ``(N,)``, non-negative.
      reduction: ``"sum"`` or ``"mean"``.

    Returns:
      ``(value, dW)``: the scalar loss in the accumulation dtype (float32 for bf16/f16 inputs) and
      the gradient ``(D, K)`` in ``W``'s dtype (accumulated in float32 for bf16/f16).

    Raises:
      ValueError / TypeError: as :func:`softmax_jax.loss`, and for ``reduction="none"``. Under
        ``jax.jit`` an out-of-range label makes the value and every gradient column NaN rather than
        silently dropping the sample.

    Examples:
      >>> import jax, jax.numpy as jnp, softmax_jax as sj
      >>> W = jnp.zeros((3, 4)); Z = jnp.ones((2, 3)); y = jnp.array([0, 3])
      >>> value, dW = sj.value_and_grad(W, Z, y)
      >>> dW.shape
      (3, 4)
    """
    _scalar_reduction(reduction, "value_and_grad")
    W, Z, Y, weights, int_labels = check_problem(W, Z, Y, weights, reduction)
    out = _value_and_grad_impl(W, Z, Y, weights, reduction=reduction, int_labels=int_labels)
    return check_result(out, W=W, Z=Z)


def grad(
    W: ArrayLike,
    Z: ArrayLike,
    Y: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    reduction: str = "sum",
) -> jax.Array:
    r"""The hand-written gradient of eq. (2), eq. (6): ``∂L/∂W = Zᵀ diag(s) (Ŷ − Y)``, ``(D, K)``.

    Same arguments, dtype rules and errors as :func:`softmax_jax.value_and_grad`; the loss value
    is not computed.

    Examples:
      >>> import jax.numpy as jnp, softmax_jax as sj
      >>> W = jnp.zeros((3, 4)); Z = jnp.ones((2, 3)); y = jnp.array([0, 3])
      >>> sj.grad(W, Z, y).sum(axis=1)  # columns sum to zero: rows of Y sum to one
      Array([0., 0., 0.], dtype=float32)
    """
    _scalar_reduction(reduction, "grad")
    W, Z, Y, weights, int_labels = check_problem(W, Z, Y, weights, reduction)
    out = _grad_impl(W, Z, Y, weights, reduction=reduction, int_labels=int_labels)
    return check_result(out, W=W, Z=Z)


class DerivationTerms(NamedTuple):
    """The pieces of eq. (4), each ``(D, K)``.

    Attributes:
      first: ``Σ_i s_i y_ik z_i = Zᵀ diag(s) Y`` — the derivative of the first term of (4).
      second: ``Σ_i s_i ŷ_ik z_i = Zᵀ diag(s) Ŷ`` — the derivative of the log-partition term.
      grad: ``second − first``, eq. (5)/(6).
    """

    first: jax.Array
    second: jax.Array
    grad: jax.Array


@functools.partial(jax.jit, static_argnames=("int_labels",))
def _terms_impl(W, Z, Y, weights, *, int_labels: bool):
    A = logits(W, Z)
    _, E, S = logsumexp_rows(A)
    Zc = Z.astype(A.dtype)
    if weights is not None:
        Zc = Zc * weights.astype(A.dtype)[:, None]
    if int_labels:
        # An out-of-range label (possible only under tracing) makes its row NaN, as in `grad`:
        # NaN in `second` and `grad` everywhere and in `first` at the clipped label's column.
        k = A.shape[1]
        Zc = jnp.where(label_validity(Y, k)[:, None], Zc, jnp.nan)
        first = jax.ops.segment_sum(Zc, jnp.clip(Y, 0, k - 1), num_segments=k).T
    else:
        first = Zc.T @ Y.astype(A.dtype)
    second = Zc.T @ (E / S)
    return DerivationTerms(first, second, second - first)


def derivation_terms(
    W: ArrayLike, Z: ArrayLike, Y: ArrayLike, *, weights: ArrayLike | None = None
) -> DerivationTerms:
    r"""The two derivatives of eq. (4), computed separately (``reduction="sum"``).

    .. math::

        \frac{d}{dw_k} \sum_k y_k w_k^\top z = y_k z, \qquad
        \frac{d}{dw_k} \log \sum_{k'} \exp(w_{k'}^\top z) = \hat y_k z

    summed over samples: ``first = Zᵀ diag(s) Y``, ``second = Zᵀ diag(s) Ŷ``. Their difference is
    eq. (6). Meant for checking the derivation line by line; :func:`softmax_jax.grad` is the fast
    path.

    Args:
      W: ``(D, K)``. Z: ``(N, D)``. Y: ``(N, K)`` targets or ``(N,)`` labels.
      weights: optional ``(N,)``.

    Returns:
      :class:`DerivationTerms` ``(first, second, grad)``, each ``(D, K)`` in the accumulation dtype.
      Under ``jax.jit`` an out-of-range label makes ``second`` and ``grad`` NaN.
    """
    W, Z, Y, weights, int_labels = check_problem(W, Z, Y, weights, "sum")
    return _terms_impl(W, Z, Y, weights, int_labels=int_labels)


def hvp_residual(
    P: jax.Array, ZV: jax.Array, c: jax.Array | None = None, axis: int = 1
) -> jax.Array:
    """``diag(c) [Ŷ ⊙ (Z V) − Ŷ ⊙ rowsum(Ŷ ⊙ Z V) 1ᵀ]`` (N, K) for the probabilities ``P = Ŷ``
    and the product ``ZV = Z V``: the HVP is ``Zᵀ`` times this (:func:`transpose_gemm`). With
    ``axis=0`` all three are class-major ``(K, N)``."""
    PZV = P * ZV
    R = PZV - P * reduce_classes("sum", PZV, axis)
    return R if c is None else R * jnp.expand_dims(c, axis).astype(R.dtype)


def softmax_variance(P: jax.Array, axis: int = 1) -> jax.Array:
    """``Ŷ ⊙ (1 − Ŷ)`` for the probabilities ``P`` (classes on ``axis``) without cancellation: a
    class with ``ŷ_ik > ½`` (at most one per row) takes ``1 − ŷ_ik`` as the sum of the row's
    other probabilities, where ``1 − ŷ_ik`` would round a saturated row's curvature away."""
    high = P > 0.5
    others = reduce_classes("sum", jnp.where(high, 0, P), axis)
    return P * jnp.where(high, others, 1 - P)


@functools.partial(jax.jit, static_argnames=("reduction",))
def _hvp_impl(W, Z, V, weights, *, reduction: str):
    A = logits(W, Z)
    _, E, S = logsumexp_rows(A)
    c = mean_scale(weights, A.shape[0], A.dtype, reduction)
    R = hvp_residual(E / S, logits(V.astype(W.dtype), Z), c)
    return transpose_gemm(Z, R, jnp.result_type(W.dtype))


def hvp(
    W: ArrayLike,
    Z: ArrayLike,
    Y: ArrayLike,
    V: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    reduction: str = "sum",
) -> jax.Array:
    r"""Hessian-vector product of eq. (2), the second-order continuation of the derivation.

    Differentiating eq. (6) once more along a direction ``V`` (D, K):

    .. math::

        H V = Z^\top \operatorname{diag}(s) \big[\hat Y \odot (Z V)
              - \hat Y \odot \operatorname{rowsum}(\hat Y \odot Z V)\, \mathbf 1^\top \big]

    Because the log-partition term of eq. (2) enters once per sample, the Hessian does not depend
    on ``Y``: any valid ``Y`` gives the same ``H V``. ``Y`` is taken and validated so the problem
    is passed as to :func:`softmax_jax.grad`, and a problem ``grad`` rejects is rejected here.
    Three GEMMs and no autodiff; the basis of the Newton-CG solver.

    Args:
      W: ``(D, K)``. Z: ``(N, D)``. Y: ``(N, K)`` or ``(N,)``. V: direction, ``(D, K)``.
      weights: optional ``(N,)``. reduction: ``"sum"`` or ``"mean"``.

    Returns:
      ``H V``, ``(D, K)`` in ``W``'s dtype.
    """
    _scalar_reduction(reduction, "hvp")
    W, Z, Y, weights, _ = check_problem(W, Z, Y, weights, reduction)
    V = as_array(V, "V")
    if V.shape != W.shape:
        raise ValueError(
            f"`V` must have the shape of `W` (D, K) = {tuple(W.shape)}, got {tuple(V.shape)}"
        )
    return _hvp_impl(W, Z, V, weights, reduction=reduction)
