r"""The training objective: its value, hand-written gradient, Hessian-vector product and evaluation.

The objective, for parameters ``W`` (D, K) and ``b`` (K,) and per-sample weights ``s_i`` (all ones
by default), is the weighted *mean* of eq. (2) plus an L2 penalty on ``W`` (never on ``b``):

.. math::

    f(W, b) = \frac{\sum_i s_i\, \ell_i(W, b)}{\sum_i s_i} + \frac{\lambda}{2} \|W\|_F^2,
    \qquad \ell_i = \log \sum_k e^{a_{ik}} - a_{i y_i}, \quad a_i = z_i W + b.

The mean makes learning rates independent of ``N``; scikit-learn's ``C`` is ``λ = 1 / (C Σ s_i)``
(see :class:`softmax_jax.SoftmaxRegression`). Every gradient is the hand-written eq. (6),
assembled from the pieces of ``_grad``'s interface with a bias: ``∂f/∂W = Zᵀ M`` and
``∂f/∂b = Σ_i M_i``, the column sums of the same residual ``M``. The Hessian-vector products of
Newton-CG are the analytic formula of :func:`softmax_jax.hvp` with the bias as its own term
(``Zᵀ R`` and ``Σ_i R_i``). No autodiff anywhere.

Every pass over the rows goes through :func:`row_sums` (one pass, or chunks of about
:data:`CHUNK_ROWS` rows, :func:`chunk_rows`, through :func:`softmax_jax._chunks.fold_chunks`),
and every product with the features through :func:`features_times` (``Z V``) and
:func:`features_t_times` (``Zᵀ M``, or ``(Z⊙Z)ᵀ M``): the places where another storage of ``Z``
plugs in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._chunks import fold_chunks
from ._grad import hvp_residual, residual, softmax_variance, transpose_gemm
from ._loss import logits, logsumexp_rows, nll_rows, reduce_losses
from ._precision import compute_dtype, gemm, mean_normaliser, operand

Params = dict[str, jax.Array]


class TrainData(NamedTuple):
    """Training data on device.

    Attributes:
      Z: features ``(N, D)`` in the compute dtype.
      y: integer labels ``(N,)``.
      s: optional sample weights ``(N,)``.
      Zh: Newton-CG only: ``Z`` in the Hessian's dtype (float32), the operand of the Hessian
        products; ``None`` when they use ``Z`` itself (see :func:`hessian_operand`).
    """

    Z: jax.Array
    y: jax.Array
    s: jax.Array | None
    Zh: jax.Array | Columns | None = None


class Columns(NamedTuple):
    """An ``(N, X)`` array stored transposed, ``T`` (X, N): Newton-CG's float32 Hessian operand
    on one device (``X = D``), and the softmax of its logits (``X = K``, :func:`hessian_probs`).
    Both GEMMs of a pass then contract over ``T``'s minor axis (``Vᵀ T`` and ``T Rᵀ``), the
    layout XLA's CPU GEMMs run fastest (bench/train.py), and the ``(K, N)`` arrays of a pass over
    such features stay class-major (:func:`class_axis`); ``shape`` and ``dtype`` are those of the
    ``(N, X)`` array it holds."""

    T: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return self.T.shape[1], self.T.shape[0]

    @property
    def dtype(self):
        return self.T.dtype

    def rows(self, lo, size: int) -> Columns:
        """Rows ``[lo, lo + size)``, still transposed."""
        return Columns(lax.dynamic_slice_in_dim(self.T, lo, size, axis=1))

    def by_rows(self) -> jax.Array:
        """The features ``(N, D)``: ``T``'s transpose (a view inside ``jit``)."""
        return self.T.T

    def column_mean_squares(self) -> jax.Array:
        """``mean_i z_id²`` (D,)."""
        return jnp.mean(self.T * self.T, axis=1)


#: Newton-CG's Hessian operand is stored transposed from this many rows on, for at most this
#: many classes: the shapes whose fits measured faster on it (tools/profile_solve.py and the
#: session notes; with many classes the row-major passes measured faster).
COLUMNS_MIN_ROWS = 4096
COLUMNS_MAX_CLASSES = 64


def transposed(Z: jax.Array, dtype) -> Columns:
    """``Z`` (N, D) as :class:`Columns` in ``dtype``: one copy."""
    return Columns(Z.astype(dtype).T)


def hessian_copy(Z: jax.Array, dtype, num_classes: int) -> jax.Array | Columns:
    """Newton-CG's copy of ``Z`` in ``dtype`` for ``num_classes`` classes: :class:`Columns` from
    :data:`COLUMNS_MIN_ROWS` rows on, up to :data:`COLUMNS_MAX_CLASSES` classes; else row-major."""
    if Z.shape[0] >= COLUMNS_MIN_ROWS and num_classes <= COLUMNS_MAX_CLASSES:
        return transposed(Z, dtype)
    return Z.astype(dtype)


def hessian_operand(data: TrainData) -> jax.Array:
    """The features of the Hessian products: ``data.Zh``, or ``data.Z`` without one."""
    return data.Z if data.Zh is None else data.Zh


def class_axis(Z) -> int:
    """The class axis of the ``(N, K)`` arrays of a pass over features ``Z``: 1, or 0 for
    :class:`Columns`, whose passes keep them class-major, ``(K, N)``."""
    return 0 if isinstance(Z, Columns) else 1


def features_times(Z: jax.Array | Columns, V: jax.Array) -> jax.Array:
    """``Z V`` (N, K) in ``V``'s dtype, accumulated in float32 at least (the first GEMM); for
    :class:`Columns`, ``Vᵀ T`` (K, N), class-major."""
    if isinstance(Z, Columns):
        return gemm(V, operand(Z.T, V.dtype), (0, 0), compute_dtype(V.dtype, Z.dtype))
    return logits(V, Z)


def features_t_times(Z: jax.Array | Columns, M: jax.Array, out_dtype, *, squared: bool = False):
    """``Zᵀ M`` (D, K) (or ``(Z ⊙ Z)ᵀ M`` with ``squared``, for the Hessian's diagonal), with
    operands in ``out_dtype`` (the second GEMM); for :class:`Columns`, ``T Mᵀ`` with ``M``
    class-major (K, N)."""
    if isinstance(Z, Columns):
        T = Z.T * Z.T if squared else Z.T
        return transpose_gemm(T, M, out_dtype, rows_axis=1, class_axis=0)
    return transpose_gemm(Z * Z if squared else Z, M, out_dtype)


#: Full-batch passes over at least 4 chunks of this many rows run chunk by chunk: each chunk of
#: ``Z`` is still in cache for the second GEMM of eq. (6).
CHUNK_ROWS = 4096


@functools.lru_cache(maxsize=256)
def chunk_rows(n: int) -> int | None:
    """The chunk size for a pass over ``n`` rows, or ``None`` for a single pass: the largest
    divisor of ``n`` in ``[CHUNK_ROWS / 2, CHUNK_ROWS]``, else :data:`CHUNK_ROWS`. Without a
    remainder block :func:`~softmax_jax._chunks.fold_chunks` traces the pass once, not twice: a
    smaller program, compiled and loaded faster."""
    if n < 4 * CHUNK_ROWS:
        return None
    divisors = (c for c in range(CHUNK_ROWS, CHUNK_ROWS // 2 - 1, -1) if n % c == 0)
    return next(divisors, CHUNK_ROWS)


def row_sums(fn: Callable, rows: tuple, zero, *, squares: bool = False):
    """``fn(*rows)`` summed over the row chunks of the arrays ``rows`` (``None`` entries passed
    through): ``fn`` returns a pytree shaped like ``zero`` that sums over rows. One call for small
    N, else :func:`softmax_jax._chunks.fold_chunks` over :func:`chunk_rows`-row chunks. Features
    stored as :class:`Columns` are passed whole (slices of their minor axis cost more than the
    cache saves), unless ``fn`` forms ``(N, D)`` temporaries (``squares``)."""
    n = rows[0].shape[0]
    c = None if isinstance(rows[0], Columns) and not squares else chunk_rows(n)
    if c is None:
        return fn(*rows)

    def cut(x, lo, size):
        if x is None:
            return None
        return x.rows(lo, size) if isinstance(x, Columns) else lax.dynamic_slice_in_dim(x, lo, size)

    def body(lo, size, acc):
        parts = [cut(x, lo, size) for x in rows]
        return jax.tree.map(jnp.add, acc, fn(*parts))

    return fold_chunks(n, c, body, zero)


def stack(params: Params) -> jax.Array:
    """``[W; b]`` (D+1, K), or ``W`` without a bias."""
    if "b" in params:
        return jnp.concatenate([params["W"], params["b"][None, :].astype(params["W"].dtype)], 0)
    return params["W"]


def unstack(G: jax.Array, like: Params) -> Params:
    if "b" in like:
        return {"W": G[:-1], "b": G[-1]}
    return {"W": G}


def _biased_logits(params: Params, Z: jax.Array) -> jax.Array:
    """``Z W + b``, class-major for :class:`Columns` (:func:`class_axis`)."""
    A = features_times(Z, params["W"])
    if "b" not in params:
        return A
    return A + jnp.expand_dims(params["b"].astype(A.dtype), 1 - class_axis(Z))


def vg_sum(params: Params, Z: jax.Array, y: jax.Array, s: jax.Array | None):
    r"""Eq. (2) summed over the rows of ``Z`` (weights ``s``) and its hand-written gradient.

    Logits ``A = Z W + b``, ``M = diag(s)(Ŷ − Y)``, ``∂/∂W = Zᵀ M`` and ``∂/∂b = Σ_i M_i`` (the
    column sums of ``M``): no ones column is appended to ``Z``. Also returns the logits ``A``
    (class-major for :class:`Columns`).
    """
    if hasattr(Z, "vg_sum"):  # scipy.sparse rows (softmax_jax._sparse)
        return Z.vg_sum(params, y, s)
    W = params["W"]
    ax = class_axis(Z)
    A = _biased_logits(params, Z)
    _, E, S = logsumexp_rows(A, ax)
    value = reduce_losses(nll_rows(A, S, y, True, ax), s, "sum")
    M = residual(A, E, S, y, None if s is None else s.astype(A.dtype), True, ax)
    g = {"W": features_t_times(Z, M, W.dtype)}
    if "b" in params:
        g["b"] = jnp.sum(M, axis=1 - ax).astype(params["b"].dtype)
    return value, g, A


def data_vg(params: Params, data: TrainData) -> tuple[jax.Array, Params]:
    """Weighted mean of eq. (2) over ``data`` and its hand-written gradient (:func:`row_sums`).
    Rows left on the host (``softmax_jax._stream``) are summed there, chunk by chunk."""
    if hasattr(data.Z, "data_vg"):
        return data.Z.data_vg(params)
    dt = params["W"].dtype
    zero = (jnp.zeros((), dt), jax.tree.map(jnp.zeros_like, params))
    value, g = row_sums(lambda Z, y, s: vg_sum(params, Z, y, s)[:2], (data.Z, data.y, data.s), zero)
    inv = mean_normaliser(data.s, data.Z.shape[0], "mean", dt)
    return value * inv, jax.tree.map(lambda x: x * inv, g)


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


def _hessian_params(params: Params, dtype) -> Params:
    return jax.tree.map(lambda x: x.astype(dtype), params)


def hessian_probs(params: Params, data: TrainData) -> jax.Array | Columns:
    """``Ŷ = softmax(Z W + b)`` (N, K) in the Hessian's precision: the only part of ``∇²f`` that
    depends on the parameters, computed once per Newton step and shared by the products; stored
    transposed (:class:`Columns`) when the operand is."""
    Zh = hessian_operand(data)
    if hasattr(Zh, "probs"):  # scipy.sparse rows (softmax_jax._sparse)
        return Zh.probs(params)
    ax = class_axis(Zh)
    _, E, S = logsumexp_rows(_biased_logits(_hessian_params(params, Zh.dtype), Zh), ax)
    return Columns(E / S) if ax == 0 else E / S


def _class_layout(P: jax.Array | Columns) -> jax.Array:
    """:func:`hessian_probs` as its pass uses it: ``(N, K)``, or ``(K, N)`` from :class:`Columns`."""
    return P.T if isinstance(P, Columns) else P


def _hessian_sums(fn, data: TrainData, P: jax.Array, like: Params, squares=False) -> Params:
    """``fn(Zh, P, s)`` summed over the rows (:func:`row_sums`) times the mean's ``1/Σ s``, in
    the Hessian's dtype."""
    Zh = hessian_operand(data)
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, Zh.dtype), like)
    total = row_sums(fn, (Zh, P, data.s), zero, squares=squares)
    inv = mean_normaliser(data.s, Zh.shape[0], "mean", Zh.dtype)
    return jax.tree.map(lambda x, p: (x * inv).astype(p.dtype), total, like)


def hessian_vp(
    params: Params, V: Params, data: TrainData, l2, *, probs: jax.Array | None = None
) -> Params:
    """``∇²f · V`` with the analytic HVP of eq. (2) (:func:`softmax_jax.hvp`) plus ``λ V_W``.

    The product runs in the dtype of :func:`hessian_operand` (float32 for Newton-CG): it only
    steers Newton's direction, which conjugate gradients solve to a relative accuracy far coarser
    than float32's; the gradient, the objective and so the optimum stay in ``Z``'s dtype. With
    ``probs`` (:func:`hessian_probs` at ``params``) it is two GEMMs (``Z V`` and ``Zᵀ R``).
    """
    if hasattr(hessian_operand(data), "hessian_vp"):  # scipy.sparse rows (softmax_jax._sparse)
        return hessian_operand(data).hessian_vp(params, V, l2, probs=probs)
    dt = hessian_operand(data).dtype
    Vh = _hessian_params(V, dt)

    def part(Z, P, s):
        ax = class_axis(Z)
        R = hvp_residual(_class_layout(P), _biased_logits(Vh, Z), s, ax)
        out = {"W": features_t_times(Z, R, dt)}
        if "b" in Vh:
            out["b"] = jnp.sum(R, axis=1 - ax)
        return out

    P = hessian_probs(params, data) if probs is None else probs
    hv = _hessian_sums(part, data, P, V)
    return {**hv, "W": hv["W"] + l2 * V["W"]}


def hessian_diag(params: Params, data: TrainData, l2, *, probs: jax.Array | None = None) -> Params:
    r"""The diagonal of ``∇²f``: ``Σ_i c_i z_{id}^2 ŷ_{ik}(1 − ŷ_{ik}) + λ [d is a W row]``, one
    GEMM ``(Z⊙Z)ᵀ M`` per chunk given ``probs`` (:func:`hessian_probs`), the squares formed chunk
    by chunk, ``ŷ(1 − ŷ)`` exact on saturated rows (:func:`softmax_variance`); the Jacobi
    preconditioner of Newton-CG, in the precision of the Hessian products."""
    if hasattr(hessian_operand(data), "hessian_diag"):  # scipy.sparse rows (softmax_jax._sparse)
        return hessian_operand(data).hessian_diag(params, l2, probs=probs)
    dt = hessian_operand(data).dtype

    def part(Z, P, s):
        ax = class_axis(Z)
        M = softmax_variance(_class_layout(P), ax)
        M = M if s is None else M * jnp.expand_dims(s, ax).astype(M.dtype)
        out = {"W": features_t_times(Z, M, dt, squared=True)}
        if "b" in params:
            out["b"] = jnp.sum(M, axis=1 - ax)
        return out

    P = hessian_probs(params, data) if probs is None else probs
    diag = _hessian_sums(part, data, P, params, squares=True)
    return {**diag, "W": diag["W"] + l2}


def centred_basis(k: int, dtype) -> jax.Array:
    """An orthonormal basis ``B`` ``(K, K − 1)`` of the vectors that sum to zero (Helmert's):
    column ``j`` is ``(1, …, 1, −j, 0, …) / √(j (j + 1))`` with ``j`` ones."""
    j = np.arange(1, k)
    rows = np.arange(k)[:, None]
    B = np.where(rows < j, 1.0, np.where(rows == j, -j, 0.0)) / np.sqrt(j * (j + 1.0))
    return jnp.asarray(B, dtype)


def softmax_curvature(P: jax.Array, B: jax.Array) -> jax.Array:
    """``Bᵀ (diag ŷ_i − ŷ_i ŷ_iᵀ) B`` (N, K − 1, K − 1) for the rows ``ŷ_i`` of ``P`` (N, K),
    without cancellation: the diagonal from :func:`softmax_variance` (exact on saturated rows),
    the rest products, not differences."""
    k = P.shape[1]
    A = jnp.where(
        jnp.eye(k, dtype=bool), softmax_variance(P)[:, :, None], -P[:, :, None] * P[:, None, :]
    )
    return jnp.einsum("kj,nkl,lm->njm", B, A, B)


def hessian_matrix(params: Params, data: TrainData, l2) -> jax.Array:
    r"""``∇²f`` on the centred subspace, as a ``(q, q)`` matrix over ``V`` with
    ``[W; b] = V Bᵀ`` (``B`` = :func:`centred_basis`; ``V`` flattened row by row, ``q = (D + 1)
    (K − 1)`` with a bias, ``D (K − 1)`` without), in the parameters' dtype:

    .. math:: \sum_i c_i\, (x_i x_i^\top) \otimes S_i + \lambda I_W, \qquad
              S_i = B^\top (\operatorname{diag} \hat y_i - \hat y_i \hat y_i^\top) B, \quad
              x_i = [z_i, 1],\ c_i = s_i / \textstyle\sum s,

    ``I_W`` the identity on ``W``'s entries, ``S_i`` from :func:`softmax_curvature` (exact on
    saturated rows). The full Hessian is singular along the class shifts; this one is not (with
    ``λ > 0`` or full-rank features). One GEMM ``Xᵀ (X ⊗ c S)``, ``N (D + 1)² (K − 1)²``
    multiply-adds: for small problems (the exact Newton steps of ``_solvers``)."""
    Z = data.Z.by_rows() if isinstance(data.Z, Columns) else data.Z
    dt = params["W"].dtype
    X = Z.astype(dt)
    n, d = X.shape
    _, E, S = logsumexp_rows(_biased_logits(params, X))
    P = E / S
    if "b" in params:
        X = jnp.concatenate([X, jnp.ones((n, 1), dt)], axis=1)
    inv = mean_normaliser(data.s, n, "mean", dt)
    c = jnp.broadcast_to(inv, (n,)) if data.s is None else data.s.astype(dt) * inv
    rows, k = X.shape[1], P.shape[1]
    q = rows * (k - 1)
    cS = softmax_curvature(P, centred_basis(k, dt)) * c[:, None, None]
    R = (X[:, :, None, None] * cS[:, None, :, :]).reshape(n, rows * (k - 1) ** 2)
    H = (X.T @ R).reshape(rows, rows, k - 1, k - 1).transpose(0, 2, 1, 3).reshape(q, q)
    return H + jnp.diag(jnp.where(jnp.arange(q) < d * (k - 1), l2, 0).astype(dt))


def predict_stats(params: Params, data: TrainData) -> tuple[jax.Array, jax.Array]:
    """``(Σ s_i ℓ_i, Σ s_i [argmax a_i = y_i])`` without the penalty."""
    if hasattr(data.Z, "predict_stats"):  # rows left on the host
        return data.Z.predict_stats(params)
    A = _biased_logits(params, data.Z)
    _, _, S = logsumexp_rows(A)
    per = nll_rows(A, S, data.y, True)
    correct = (jnp.argmax(A, axis=1) == data.y).astype(A.dtype)
    s = jnp.ones_like(per) if data.s is None else data.s.astype(per.dtype)
    return jnp.sum(s * per), jnp.sum(s * correct)


def mean_stats(params: Params, data: TrainData) -> tuple[jax.Array, jax.Array]:
    """Weighted mean NLL and accuracy on ``data`` (traced)."""
    nll, correct = predict_stats(params, data)
    inv = mean_normaliser(data.s, data.y.shape[0], "mean", nll.dtype)
    return nll * inv, correct * inv


evaluate = jax.jit(mean_stats)


def tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_axpy(alpha, x, y):
    return jax.tree.map(lambda u, v: alpha * u + v, x, y)


def tree_max_abs(t) -> jax.Array:
    return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(t)])


def tree_l1(t) -> jax.Array:
    return sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t))
