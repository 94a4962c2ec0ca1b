r"""``SoftmaxRegression``: a scikit-learn classifier on the full-batch solvers of ``_solvers``.

Objective: with ``C`` as in :class:`sklearn.linear_model.LogisticRegression` (scikit-learn ≥ 1.5,
multinomial loss, L2 penalty) and sample weights ``s_i`` (``sample_weight`` times
``class_weight``), the estimator minimises

.. math::

    \tfrac12 \|W\|_F^2 + C \sum_i s_i\, \ell_i(W, b), \qquad
    \ell_i = \log \sum_k e^{a_{ik}} - a_{i y_i}, \quad a_i = W^\top x_i + b,

the intercept ``b`` not penalised. Dividing by ``C Σ s_i`` gives the objective of
:func:`softmax_jax.fit` with ``l2 = 1 / (C Σ_i s_i)``, which is what the solvers see (and what
``tol`` refers to, as scikit-learn's lbfgs does).

Two classes. scikit-learn's binary model has one weight vector ``w`` and minimises
``½‖w‖² + C Σ s_i log(1 + exp(−ỹ_i (wᵀx_i + c)))``. Softmax with two columns depends only on
``u = w_1 − w_0`` (and ``c = b_1 − b_0``); for a given ``u`` the penalty ``½(‖w_0‖² + ‖w_1‖²)`` is
smallest at ``w_1 = −w_0 = u/2``, where it equals ``¼‖u‖²``. So with the penalty doubled,
``‖W‖_F² + C Σ s_i ℓ_i`` is ``½‖u‖² + C Σ s_i ℓ_i(u, c)`` at its optimum: scikit-learn's binary
objective with the same ``C``. The estimator solves that (``l2 = 2 / (C Σ s_i)`` for two classes)
and reports ``coef_ = u`` (1, D) and ``intercept_ = c`` (1,), so ``SoftmaxRegression(C=C)`` and
``LogisticRegression(C=C)`` give the same ``coef_``, ``decision_function`` and probabilities for
any number of classes.

Identifiability. Softmax is unchanged by adding one vector to every ``w_k`` (one number to every
``b_k``); the penalised optimum has ``Σ_k w_k = 0``, and Newton-CG keeps its iterates in that
subspace (with or without a penalty). ``coef_`` and ``intercept_`` are centred over the classes,
as scikit-learn's multinomial coefficients are.
"""

from __future__ import annotations

import math
import numbers
import warnings

import jax
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from . import _compile_cache
from ._newton import wants_hessian_copy
from ._placement import bucket_rows, place
from ._solvers import SOLVERS, solve
from ._validate import check_sparse, is_sparse

#: What ``X`` may be: float64/float32 arrays, or scipy.sparse CSR and CSC as they are (other
#: formats converted to CSR; softmax_jax._sparse)
_X_TYPES = {
    "dtype": [np.float64, np.float32],
    "accept_sparse": ("csr", "csc"),
    "accept_large_sparse": True,
}

__all__ = ["SoftmaxRegression"]


#: Newton-CG starts in float32 (``solve(mixed_precision=True)``) from this many entries of the
#: logits' GEMM ``N·D·K`` on: below it the float32 phase's extra passes (the cast, a second
#: initial gradient) cost about what its cheaper GEMMs save.
MIXED_PRECISION_MIN_SIZE = 1 << 24


#: A fit with at most this many entries ``N·D·K`` pads its rows for a 25% larger fit too: the
#: refit of a 5-fold cross-validation then runs its folds' compiled solver (on small data,
#: compiling costs far more than the padded rows).
CV_HEADROOM_MAX_SIZE = 1 << 22
CV_HEADROOM = 1.25
#: The row buckets this process's fits have compiled for (see :func:`_bucket_rows`).
_row_buckets: set[int] = set()


def _bucket_rows(n: int, dk: int) -> int:
    """The padded row count of a fit on ``n`` rows (``dk = D·K``): a bucket an earlier fit
    compiled for when one holds ``n`` rows within 2× (cross-validation folds and their refit
    share one program), else :func:`bucket_rows` of ``CV_HEADROOM · n`` on small problems
    (:data:`CV_HEADROOM_MAX_SIZE`), of ``n`` on larger ones."""
    reuse = [m for m in _row_buckets if n <= m <= 2 * n]
    if reuse:
        return min(reuse)
    small = n * dk <= CV_HEADROOM_MAX_SIZE and n <= 65536
    m = bucket_rows(min(math.ceil(CV_HEADROOM * n), 65536)) if small else bucket_rows(n)
    if m != n:  # a bucket, not a problem's own size
        _row_buckets.add(m)
    return m


def _bucket_features(d: int) -> int:
    """Rounds small ``d`` up to a power of two (at least 8) with zero columns; their weights stay 0
    (zero gradient; without a penalty, no curvature either: the exact Newton steps leave them)."""
    return max(8, 1 << (d - 1).bit_length()) if d <= 64 else d


class SoftmaxRegression(ClassifierMixin, BaseEstimator):
    r"""Multinomial logistic (softmax) regression with an L2 penalty, solved in float64 with JAX.

    Minimises ``½‖W‖² + C Σ_i s_i ℓ_i`` (intercept not penalised): the same optimum as
    ``sklearn.linear_model.LogisticRegression(C=C)``, for two classes too (``coef_`` is then
    ``w_1 − w_0`` (1, D), scikit-learn's binary ``coef_``; derivation in the module docstring). Gradients are the hand-written eq. (6); ``solver="newton-cg"`` uses the
    analytic Hessian-vector product with a Jacobi preconditioner, ``"lbfgs"`` optax's L-BFGS with
    a zoom line search. The objective, gradients and line searches run in float64 (x64 is switched
    on only inside ``fit``); Newton-CG's Hessian products, which only steer the search direction,
    run in float32, and on large problems so do the first iterations (float64 finishes them, so the
    optimum is float64's). ``coef_`` has ``X``'s dtype (float32 or float64); the solve is float64 either
    way. The whole solve is one compiled call (compiled once per data shape; small
    data are padded with zero-weight rows to shared sizes); prediction runs in NumPy.

    Newton-CG is the default because it is robust to ill-conditioning: on the raw (unscaled)
    digits it reaches the optimum in a few Newton steps where L-BFGS (ours or scikit-learn's)
    needs orders of magnitude more iterations (bench/train.py).

    Args:
      C: inverse penalty strength, ``> 0`` (``np.inf``: no penalty).
      fit_intercept: learn an unpenalised intercept per class.
      solver: ``"newton-cg"`` (default) or ``"lbfgs"``.
      max_iter: maximum solver iterations (``0``: the initial state, with a ConvergenceWarning).
      tol: stop when ``max |∇f| <= tol`` for ``f = (½‖W‖² + C Σ s_i ℓ_i) / (C Σ s_i)``. The
        default is far inside 1e-6 (relative objective) of the optimum on the benchmark's
        problems and keeps ``coef_`` within scikit-learn's 1e-7 sample-weight equivalence check.
      class_weight: ``None``, ``"balanced"`` or ``{label: weight}``, multiplying sample weights.
      warm_start: start from the previous fit's solution when the shapes match.

    Attributes:
      classes_: the labels, ``(K,)``, any type ``np.unique`` sorts.
      coef_: ``(K, D)`` summing to zero over the classes, or ``(1, D)`` for two classes
        (``w_1 − w_0``); ``X``'s dtype.
      intercept_: ``(K,)`` (summing to zero), or ``(1,)`` for two classes; zeros without an
        intercept.
      n_iter_: ``(1,)`` iterations used.
      n_features_in_: ``D``.

    Examples:
      >>> from sklearn.datasets import load_iris
      >>> from softmax_jax import SoftmaxRegression
      >>> X, y = load_iris(return_X_y=True)
      >>> SoftmaxRegression(C=1.0).fit(X, y).score(X, y) > 0.95
      True
    """

    def __init__(
        self,
        *,
        C: float = 1.0,
        fit_intercept: bool = True,
        solver: str = "newton-cg",
        max_iter: int = 100,
        tol: float = 1e-9,
        class_weight: dict | str | None = None,
        warm_start: bool = False,
    ):
        self.C = C
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.warm_start = warm_start

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # scipy.sparse X, never densified (softmax_jax._sparse)
        return tags

    def _check_params(self) -> None:
        if not isinstance(self.C, numbers.Real) or not self.C > 0:
            raise ValueError(f"`C` must be a float > 0 (np.inf for no penalty), got {self.C!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {sorted(SOLVERS)}, got {self.solver!r}")
        if not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 0:
            raise ValueError(f"`max_iter` must be an integer >= 0, got {self.max_iter!r}")
        if not isinstance(self.tol, numbers.Real) or not self.tol >= 0:
            raise ValueError(f"`tol` must be a float >= 0, got {self.tol!r}")

    def fit(self, X, y, sample_weight=None) -> SoftmaxRegression:
        """Fits the model to ``X`` ``(N, D)`` and labels ``y`` ``(N,)``.

        Args:
          X: features ``(N, D)``, finite.
          y: labels ``(N,)`` of any sortable type, at least two distinct.
          sample_weight: optional ``(N,)`` non-negative weights.

        Returns:
          ``self``.
        """
        self._check_params()
        _compile_cache.enable()
        X, y = validate_data(self, X, y, ensure_min_samples=1, **_X_TYPES)
        sparse = is_sparse(X)  # scipy.sparse X: a canonical CSR (softmax_jax._sparse)
        X = check_sparse(X, "X") if sparse else X
        check_classification_targets(y)
        classes, y_enc = np.unique(y, return_inverse=True)
        if classes.size < 2:
            raise ValueError(
                "SoftmaxRegression needs samples of at least 2 classes in the data, but the data "
                f"contains only one class: {getattr(classes[0], 'item', lambda: classes[0])()!r}"
            )
        sw = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        if self.class_weight is not None:
            cw = compute_class_weight(self.class_weight, classes=classes, y=y)
            sw = sw * cw[y_enc]
        total = float(sw.sum())
        if not total > 0:
            raise ValueError("the sample weights (times class weights) sum to zero")
        d, k = X.shape[1], classes.size
        # two classes: the doubled penalty makes C scikit-learn's binary C (module docstring)
        l2 = 0.0 if np.isinf(self.C) else (2.0 if k == 2 else 1.0) / (self.C * total)

        W0 = np.zeros((d, k))
        b0 = np.zeros(k)
        if self.warm_start and getattr(self, "coef_", None) is not None:
            prev = getattr(self, "classes_", None)
            if prev is not None and np.array_equal(prev, classes) and self.coef_.shape[1] == d:
                W0, b0 = self._softmax_params()

        W, b, res = self._solve(X, y_enc, sw, W0, b0, l2=l2, sparse=sparse)
        if not np.isfinite(res.value):
            raise FloatingPointError(f"SoftmaxRegression.fit: {res.message}")
        if not res.converged and res.n_iter >= self.max_iter:  # max_iter = 0 included
            warnings.warn(
                f"SoftmaxRegression ({self.solver}) did not converge: {res.message}. "
                "Increase max_iter or scale the data.",
                ConvergenceWarning,
                stacklevel=2,
            )
        # centred over the classes: the iterates already are, up to rounding
        W = W - W.mean(axis=1, keepdims=True)
        b = b - b.mean()
        self.classes_ = classes
        if k == 2:
            coef, intercept = (W[:, 1] - W[:, 0])[None, :], np.array([b[1] - b[0]])
        else:
            coef, intercept = W.T, b
        self.coef_ = np.ascontiguousarray(coef, X.dtype)
        self.intercept_ = np.asarray(intercept, X.dtype)
        self.n_iter_ = np.array([res.n_iter], np.int32)
        return self

    def _solve(self, X, y_enc, sw, W0, b0, *, l2: float, sparse: bool):
        """Pads ``X`` to its row and feature buckets, puts it on the device and runs the solver
        from ``(W0, b0)``: ``(W (D, K), b (K,), SolveResult)``, ``W`` and ``b`` in float64."""
        (n, d), k = X.shape, W0.shape[1]
        dp = _bucket_features(d)
        m = _bucket_rows(n, dp * k)
        if dp > d:
            W0 = np.concatenate([W0, np.zeros((dp - d, k))])
        if m == n and np.all(sw == 1):
            sw = None  # unit weights: the unweighted passes are cheaper
        mixed = m * dp * k >= MIXED_PRECISION_MIN_SIZE and not sparse
        copy = wants_hessian_copy(
            self.solver, m, dp, k, self.fit_intercept, sparse=sparse, mixed=mixed
        )
        with jax.enable_x64(True):
            data = place(
                X,
                y_enc,
                sw,
                fit_intercept=self.fit_intercept,
                dtype=np.float64,
                device=None,
                shape=(m, dp),
                hessian_dtype=np.float32 if copy else None,
                num_classes=k,
            )
            params = {"W": W0}  # NumPy: the solve takes them as they are
            if self.fit_intercept:
                params["b"] = b0
            res = solve(
                data,
                params,
                solver=self.solver,
                l2=l2,
                tol=float(self.tol),
                max_iter=int(self.max_iter),
                mixed_precision=mixed,
            )
            W = np.asarray(res.params["W"], np.float64)[:d]
            b = np.asarray(res.params["b"], np.float64) if self.fit_intercept else np.zeros(k)
        return W, b, res

    def _softmax_params(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W (D, K), b (K,))`` of the fitted softmax; for two classes the symmetric optimum."""
        if self.coef_.shape[0] == 1:
            u, c = np.asarray(self.coef_[0], np.float64), float(self.intercept_[0])
            return np.stack([-u / 2, u / 2], axis=1), np.array([-c / 2, c / 2])
        return (
            np.asarray(self.coef_.T, np.float64).copy(),
            np.asarray(self.intercept_, np.float64).copy(),
        )

    def decision_function(self, X) -> np.ndarray:
        """Logits ``X Wᵀ + b`` ``(N, K)``; for two classes the margin ``a_1 − a_0`` ``(N,)``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, **_X_TYPES)
        scores = X @ self.coef_.T + self.intercept_
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict_log_proba(self, X) -> np.ndarray:
        """Log class probabilities ``(N, K)``, columns in the order of ``classes_``."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.stack([np.zeros_like(scores), scores], axis=1)
        m = scores.max(axis=1, keepdims=True)
        return scores - (m + np.log(np.exp(scores - m).sum(axis=1, keepdims=True)))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``softmax(X Wᵀ + b)`` ``(N, K)``."""
        return np.exp(self.predict_log_proba(X))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row of ``X``, ``(N,)``."""
        scores = self.decision_function(X)
        idx = (scores > 0).astype(np.intp) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[idx]
