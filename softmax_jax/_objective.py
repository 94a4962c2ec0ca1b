r"""The training objective: its value, hand-written gradient, Hessian-vector product and evaluation.

The objective, for parameters ``W`` (D, K) and ``b`` (K,) and per-sample weights ``s_i`` (all ones
by default), is the weighted *mean* of eq. (2) plus an L2 penalty on ``W`` (never on ``b``):

.. math::

    f(W, b) = \frac{\sum_i s_i\, \ell_i(W, b)}{\sum_i s_i} + \frac{\lambda}{2} \|W\|_F^2,
    \qquad \ell_i = \log \sum_k e^{a_{ik}} - a_{i y_i}, \quad a_i = z_i W + b.

The mean makes learning rates independent of ``N``; scikit-learn's ``C`` is ``λ = 1 / (C Σ s_i)``
(see :class:`softmax_jax.SoftmaxRegression`). Every gradient is the hand-written eq. (6),
assembled from the core's pieces with a bias (:func:`vg_sum`): ``∂f/∂W = Zᵀ M`` and
``∂f/∂b = Σ_i c_i (ŷ_i − y_i)``, the column sums of the same residual ``M``. The Hessian-vector
products of Newton-CG are :func:`softmax_jax.hvp`'s analytic formula on ``Z`` augmented with a
column of ones (``[W; b]`` is then a ``(D+1, K)`` weight matrix of eq. (2)). No autodiff anywhere.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._chunks import fold_chunks
from ._grad import _dW, _hvp_from_probs, _residual
from ._loss import logits, logsumexp_rows, mean_scale, reduce_losses, target_term

Params = dict[str, jax.Array]


class TrainData(NamedTuple):
    """Training data on device.

    Attributes:
      Z: features ``(N, D)`` in the compute dtype.
      y: integer labels ``(N,)``.
      s: optional sample weights ``(N,)``.
      Zh: Newton-CG only: ``Z`` with a column of ones appended when there is a bias
        (``(N, D+1)``), in float32: the operand of the Hessian products (:func:`hessian_vp`).
      Zsq: Newton-CG only: ``Zh ⊙ Zh``, for the Jacobi preconditioner (:func:`hessian_diag`).
    """

    Z: jax.Array
    y: jax.Array
    s: jax.Array | None
    Zh: jax.Array | None = None
    Zsq: jax.Array | None = None


def stack(params: Params) -> jax.Array:
    """``[W; b]`` (D+1, K), or ``W`` without a bias: the weights of the augmented eq. (2)."""
    if "b" in params:
        return jnp.concatenate([params["W"], params["b"][None, :].astype(params["W"].dtype)], 0)
    return params["W"]


def unstack(G: jax.Array, like: Params) -> Params:
    if "b" in like:
        return {"W": G[:-1], "b": G[-1]}
    return {"W": G}


def vg_sum(params: Params, Z: jax.Array, y: jax.Array, s: jax.Array | None):
    r"""Eq. (2) summed over the rows of ``Z`` (weights ``s``) and its hand-written gradient.

    The core's eq. (6) with a bias: logits ``A = Z W + b``, ``M = diag(s)(Ŷ − Y)``,
    ``∂/∂W = Zᵀ M`` and ``∂/∂b = Σ_i M_i`` (the column sums of ``M``), assembled from the pieces
    of :func:`softmax_jax.value_and_grad` (``logits``, ``logsumexp_rows``, ``_residual``, ``_dW``)
    so that no ones column has to be appended to ``Z``. Also returns the logits ``A`` (N, K).
    """
    if hasattr(Z, "vg_sum"):  # scipy.sparse rows (softmax_jax._sparse)
        return Z.vg_sum(params, y, s)
    W = params["W"]
    A = logits(W, Z)
    if "b" in params:
        A = A + params["b"].astype(A.dtype)
    lse, E, S = logsumexp_rows(A)
    value = reduce_losses(lse - target_term(A, y, True), s, "sum")
    M = _residual(A, E, S, y, mean_scale(s, A.shape[0], A.dtype, "sum"), True)
    g = {"W": _dW(Z, M, W.dtype)}
    if "b" in params:
        g["b"] = jnp.sum(M, axis=0).astype(params["b"].dtype)
    return value, g, A


#: Full-batch passes over at least 4 chunks of this many rows run chunk by chunk: each chunk of
#: ``Z`` is still in cache for the second GEMM of eq. (6).
CHUNK_ROWS = 4096


def chunk_rows(n: int) -> int | None:
    """The chunk size for a pass over ``n`` rows, or ``None`` for a single pass."""
    return CHUNK_ROWS if n >= 4 * CHUNK_ROWS else None


def data_vg(params: Params, data: TrainData) -> tuple[jax.Array, Params]:
    """Weighted mean of eq. (2) over ``data`` and its hand-written gradient, in chunks of
    :data:`CHUNK_ROWS` rows (:func:`softmax_jax._chunks.fold_chunks`) for large N.
    Rows left on the host (``softmax_jax._stream``) are summed there, chunk by chunk."""
    if hasattr(data.Z, "data_vg"):
        return data.Z.data_vg(params)
    n = data.Z.shape[0]
    dt = params["W"].dtype
    c = chunk_rows(n)
    if c is None:
        value, g, _ = vg_sum(params, data.Z, data.y, data.s)
    else:

        def body(lo, size, acc):
            def cut(x):
                return None if x is None else lax.dynamic_slice_in_dim(x, lo, size)

            v, g, _ = vg_sum(params, cut(data.Z), cut(data.y), cut(data.s))
            return acc[0] + v, jax.tree.map(jnp.add, acc[1], g)

        zero = (jnp.zeros((), dt), jax.tree.map(jnp.zeros_like, params))
        value, g = fold_chunks(n, c, body, zero)
    total = jnp.asarray(n, dt) if data.s is None else jnp.sum(data.s.astype(dt))
    total = jnp.where(total > 0, total, 1)
    return value / total, jax.tree.map(lambda x: x / total, g)


def objective_vg(params: Params, data: TrainData, l2) -> tuple[jax.Array, Params]:
    """``f`` and ``∇f``: the weighted mean of eq. (2) with its hand-written gradient (eq. (6)),
    plus the L2 term on ``W``."""
    W = params["W"]
    value, g = data_vg(params, data)
    g = {**g, "W": g["W"] + l2 * W}
    return value + 0.5 * l2 * jnp.vdot(W, W), g


@jax.custom_vjp
def objective(params: Params, data: TrainData, l2) -> jax.Array:
    """``f`` as a differentiable function whose gradient is the hand-written one (for optax's
    line search, which calls ``jax.value_and_grad`` on it)."""
    return objective_vg(params, data, l2)[0]


def _objective_fwd(params, data, l2):
    return objective_vg(params, data, l2)


def _objective_bwd(g, ct):
    return jax.tree.map(lambda x: ct * x, g), None, None


objective.defvjp(_objective_fwd, _objective_bwd)


def hessian_probs(params: Params, data: TrainData) -> jax.Array:
    """``Ŷ = softmax(Zh [W; b])`` (N, K) in the Hessian's precision: the only part of ``∇²f`` that
    depends on the parameters, computed once per Newton step and shared by the products."""
    if hasattr(data.Zh, "probs"):  # scipy.sparse rows (softmax_jax._sparse)
        return data.Zh.probs(params)
    W1 = stack(params).astype(data.Zh.dtype)
    _, E, S = logsumexp_rows(logits(W1, data.Zh))
    return E / S


def _hessian_scale(data: TrainData, dtype) -> jax.Array | None:
    """``c_i = s_i / Σ s`` (N,), or ``None`` for unit weights (then ``1/N`` is applied after)."""
    return None if data.s is None else mean_scale(data.s, data.Zh.shape[0], dtype, "mean")


def hessian_vp(
    params: Params, V: Params, data: TrainData, l2, *, probs: jax.Array | None = None
) -> Params:
    """``∇²f · V`` with the analytic HVP of eq. (2) (:func:`softmax_jax.hvp`) plus ``λ V_W``.

    The bias enters through the ones column of ``data.Zh``. The product runs in float32
    (``data.Zh``) at half the memory traffic of float64: it only steers Newton's direction, which
    conjugate gradients solve to a relative accuracy far coarser than float32's; the gradient, the
    objective and so the optimum stay in ``Z``'s dtype. With ``probs`` (:func:`hessian_probs` at
    ``params``) it is two GEMMs instead of three; over many rows it runs in chunks of
    :data:`CHUNK_ROWS` (the chunk of ``Zh`` is still in cache for the second GEMM).
    """
    if hasattr(data.Zh, "hessian_vp"):  # scipy.sparse rows (softmax_jax._sparse)
        return data.Zh.hessian_vp(params, V, l2, probs=probs)
    Zh = data.Zh
    dt = params["W"].dtype
    P = hessian_probs(params, data) if probs is None else probs
    V1 = stack(V).astype(Zh.dtype)
    c = _hessian_scale(data, P.dtype)
    n = Zh.shape[0]
    rows = chunk_rows(n)
    if rows is None:
        H = _hvp_from_probs(P, Zh, V1, c, Zh.dtype)
    else:

        def body(lo, size, acc):
            def cut(x):
                return None if x is None else lax.dynamic_slice_in_dim(x, lo, size)

            return acc + _hvp_from_probs(cut(P), cut(Zh), V1, cut(c), Zh.dtype)

        H = fold_chunks(n, rows, body, jnp.zeros_like(V1))
    if c is None:
        H = H / n
    hv = unstack(H.astype(dt), params)
    hv["W"] = hv["W"] + l2 * V["W"]
    return hv


def predict_stats(params: Params, data: TrainData) -> tuple[jax.Array, jax.Array]:
    """``(Σ s_i ℓ_i, Σ s_i [argmax a_i = y_i])`` without the penalty."""
    if hasattr(data.Z, "predict_stats"):  # rows left on the host
        return data.Z.predict_stats(params)
    A = logits(params["W"], data.Z)
    if "b" in params:
        A = A + params["b"].astype(A.dtype)
    lse, _, _ = logsumexp_rows(A)
    per = lse - target_term(A, data.y, True)
    correct = (jnp.argmax(A, axis=1) == data.y).astype(A.dtype)
    s = jnp.ones_like(per) if data.s is None else data.s.astype(per.dtype)
    return jnp.sum(s * per), jnp.sum(s * correct)


@jax.jit
def evaluate(params: Params, data: TrainData) -> tuple[jax.Array, jax.Array]:
    """Weighted mean NLL and accuracy on ``data``."""
    nll, correct = predict_stats(params, data)
    total = data.y.shape[0] if data.s is None else jnp.sum(data.s)
    return nll / total, correct / total


def tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_axpy(alpha, x, y):
    return jax.tree.map(lambda u, v: alpha * u + v, x, y)


def tree_max_abs(t) -> jax.Array:
    return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(t)])


def tree_l1(t) -> jax.Array:
    return sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t))


def hessian_diag(params: Params, data: TrainData, l2, *, probs: jax.Array | None = None) -> Params:
    r"""The diagonal of ``∇²f``: ``Σ_i c_i z_{id}^2 ŷ_{ik}(1 − ŷ_{ik}) + λ [d is a W row]``, one
    GEMM ``(Z⊙Z)ᵀ M`` given ``probs`` (:func:`hessian_probs`; two without), with ``Z⊙Z`` computed
    once; the Jacobi preconditioner of Newton-CG, in the precision of the Hessian products."""
    if hasattr(data.Zh, "hessian_diag"):  # scipy.sparse rows (softmax_jax._sparse)
        return data.Zh.hessian_diag(params, l2, probs=probs)
    P = hessian_probs(params, data) if probs is None else probs
    c = mean_scale(data.s, P.shape[0], P.dtype, "mean")
    D1 = _dW(data.Zsq, P * (1 - P) * c[:, None], params["W"].dtype)
    diag = unstack(D1, params)
    diag["W"] = diag["W"] + l2
    return diag
