"""Eq. (2): the negative log-likelihood of softmax regression."""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._precision import gemm, mean_normaliser, operand
from ._validate import check_problem, check_result, compute_dtype


def logits(W: jax.Array, Z: jax.Array) -> jax.Array:
    """``A = Z W`` with ``Z`` cast to ``W``'s dtype (the precision policy, ``_precision``),
    accumulated in the compute dtype (the promoted dtype, float32 for bf16/f16 inputs)."""
    cdt = compute_dtype(W.dtype, Z.dtype)
    return gemm(operand(Z, W.dtype), W, (1, 0), cdt)


#: Class-major arrays with at most this many classes are reduced over their classes by a halving
#: tree of elementwise operations (:func:`reduce_classes`).
HALVING_MAX_CLASSES = 256


def reduce_classes(kind: Literal["max", "sum"], A: jax.Array, axis: int = 1) -> jax.Array:
    """The max or sum of ``A`` over its class axis ``axis``, kept as an axis of size 1.

    ``axis=1``: ``A`` is ``(N, K)``, XLA's reduction. ``axis=0``: ``A`` is class-major ``(K, N)``
    (Newton-CG's transposed operand, ``_objective.Columns``), reduced over its major axis, which
    XLA:CPU does many times slower than it applies an elementwise operation to the same array:
    up to :data:`HALVING_MAX_CLASSES` classes, rows are combined pairwise (``K → ⌈K/2⌉ → … → 1``,
    an odd row folded into the first) instead (tools/profile_solve.py)."""
    if axis == 1 or A.shape[0] > HALVING_MAX_CLASSES:
        return (jnp.max if kind == "max" else jnp.sum)(A, axis=axis, keepdims=True)
    op = jnp.maximum if kind == "max" else jnp.add
    while A.shape[0] > 1:
        h = A.shape[0] // 2
        top = op(A[:h], A[h : 2 * h])
        if A.shape[0] % 2:
            top = jnp.concatenate([op(top[:1], A[2 * h :]), top[1:]])
        A = top
    return A


def logsumexp_rows(A: jax.Array, axis: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Max-shifted log-sum-exp over the classes (axis ``axis``: 1 for ``(N, K)``, 0 for
    class-major ``(K, N)``; :func:`reduce_classes`).

    Returns ``(lse, E, S)`` with ``E = exp(A - m)`` and ``S = Σ_k E`` (both kept for the softmax
    ``Ŷ = E / S``, ``S`` with a class axis of size 1) and ``lse = m + log S`` (N,); finite for
    logits of any magnitude. The max carries a ``stop_gradient``: ``lse`` does not depend on it,
    so autodiff through it stays exact.
    """
    m = lax.stop_gradient(reduce_classes("max", A, axis))
    E = jnp.exp(A - m)
    S = reduce_classes("sum", E, axis)
    return jnp.squeeze(m + jnp.log(S), axis), E, S


def label_validity(Y: jax.Array, k: int) -> jax.Array:
    return (Y >= 0) & (Y < k)


def target_term(A: jax.Array, Y: jax.Array, int_labels: bool, axis: int = 1) -> jax.Array:
    """``Σ_k y_ik a_ik`` per sample, (N,), the classes on ``A``'s axis ``axis`` (``Y`` laid out
    like ``A``). Integer labels gather ``a_{i, y_i}`` (no one-hot); an out-of-range label gives
    NaN."""
    if int_labels:
        k = A.shape[axis]
        idx = jnp.clip(Y, 0, k - 1).astype(jnp.int32)
        picked = jnp.take_along_axis(A, jnp.expand_dims(idx, axis), axis=axis)
        return jnp.where(label_validity(Y, k), jnp.squeeze(picked, axis), jnp.nan)
    return jnp.squeeze(reduce_classes("sum", Y.astype(A.dtype) * A, axis), axis)


def nll_rows(
    A: jax.Array, S: jax.Array, Y: jax.Array, int_labels: bool, axis: int = 1
) -> jax.Array:
    """Per-sample eq. (2), ``ℓ_i = lse_i − Σ_k y_ik a_ik``, as ``Σ_k y_ik (m_i − a_ik) + log S_i
    + m_i (1 − Σ_k y_ik)`` with ``m_i = max_k a_ik`` and ``S`` from :func:`logsumexp_rows` (the
    classes on axis ``axis``).

    Exact where ``lse − a_y`` cancels: huge tied logits (``a ≈ 1e30``) give ``log K``, not 0.
    The last term is 0 for rows of ``Y`` that sum to one (and absent for integer labels).
    """
    m = lax.stop_gradient(reduce_classes("max", A, axis))
    per = target_term(m - A, Y, int_labels, axis) + jnp.log(jnp.squeeze(S, axis))
    if not int_labels:
        y_sum = jnp.squeeze(reduce_classes("sum", Y.astype(A.dtype), axis), axis)
        per = per + jnp.squeeze(m, axis) * (1 - y_sum)
    return per


def reduce_losses(per: jax.Array, weights: jax.Array | None, reduction: str) -> jax.Array:
    """Applies the sample weights ``s`` and the reduction to per-sample losses ``ℓ`` (N,)."""
    if weights is not None:
        per = weights.astype(per.dtype) * per
    if reduction == "none":
        return per
    total = jnp.sum(per)
    if reduction == "sum":
        return total
    # An all-zero weight vector (or N = 0) gives 0, not NaN.
    return total * mean_normaliser(weights, per.shape[0], reduction, per.dtype)


def mean_scale(weights: jax.Array | None, n: int, dtype, reduction: str) -> jax.Array | None:
    """The per-sample factor ``c_i`` with ``∂L/∂ℓ_i = c_i``: ``s_i`` for sum, ``s_i / Σ s`` for mean."""
    if reduction == "sum":
        return None if weights is None else weights.astype(dtype)
    inv = mean_normaliser(weights, n, reduction, dtype)
    return jnp.full((n,), inv, dtype) if weights is None else weights.astype(dtype) * inv


@functools.partial(jax.jit, static_argnames=("reduction", "int_labels"))
def _loss_impl(W, Z, Y, weights, *, reduction: str, int_labels: bool) -> jax.Array:
    A = logits(W, Z)
    _, _, S = logsumexp_rows(A)
    return reduce_losses(nll_rows(A, S, Y, int_labels), weights, reduction)


def loss(
    W: ArrayLike,
    Z: ArrayLike,
    Y: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    reduction: str = "sum",
) -> jax.Array:
    r"""The softmax-regression negative log-likelihood, eq. (2).

    .. math::

        L(W) = -\sum_i s_i \Big[ \sum_k y_{ik}\, w_k^\top z_i
               - \log \sum_{k'} \exp(w_{k'}^\top z_i) \Big]

    computed with a max-shifted log-sum-exp, so it is finite for logits of any magnitude.

    As in eq. (2), the log-partition term enters once per sample whatever ``Σ_k y_ik`` is: for
    rows of ``Y`` that do not sum to one this is *not* a cross-entropy, but it is still the
    function whose exact gradient :func:`softmax_jax.grad` returns. Any finite real targets are
    accepted.

    Args:
      W: weights, shape ``(D, K)``; column ``w_k`` per class.
      Z: features, shape ``(N, D)``; row ``z_i`` per sample.
      Y: targets, shape ``(N, K)`` (one-hot or any finite rows), or integer labels ``(N,)`` in
        ``[0, K)``.
      weights: optional per-sample weights ``s`` (mask or non-negative reals), shape ``(N,)``.
      reduction: ``"sum"`` (eq. (2) itself), ``"mean"`` (divided by ``Σ s_i``, or ``N``; an
        all-zero ``weights`` gives 0) or ``"none"`` (per-sample ``s_i ℓ_i``, shape ``(N,)``).

    Returns:
      A scalar (``"sum"``/``"mean"``) or ``(N,)`` array, in the accumulation dtype: the input
      dtype, or float32 for bfloat16/float16 inputs.

    Raises:
      ValueError / TypeError: wrong ranks or shapes, non-floating ``W``/``Z``, non-integer
        ``(N,)`` labels, labels outside ``[0, K)`` or negative weights (value checks only when the
        values are concrete; under ``jax.jit`` an out-of-range label gives a NaN loss).

    Examples:
      >>> import jax.numpy as jnp, softmax_jax as sj
      >>> W = jnp.zeros((3, 4)); Z = jnp.ones((2, 3)); y = jnp.array([0, 3])
      >>> float(sj.loss(W, Z, y))  # 2 * log(4)
      2.772588...
    """
    W, Z, Y, weights, int_labels = check_problem(W, Z, Y, weights, reduction)
    out = _loss_impl(W, Z, Y, weights, reduction=reduction, int_labels=int_labels)
    return check_result(out, W=W, Z=Z)
