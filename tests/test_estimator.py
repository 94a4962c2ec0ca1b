"""SoftmaxRegression: scikit-learn's estimator checks, the same optimum as LogisticRegression, the
two-class correspondence, weights, labels and bad input."""

from __future__ import annotations

import pickle
import warnings

import jax
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits, load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from softmax_jax._estimator import SoftmaxRegression


def sklearn_objective(coef, intercept, X, y, C, sample_weight=None):
    """½‖coef‖² + C Σ s_i NLL_i in float64, for softmax (K, D) coefficients."""
    A = X @ coef.T + intercept
    m = A.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(A - m).sum(axis=1, keepdims=True)))[:, 0]
    nll = lse - A[np.arange(len(y)), y]
    s = np.ones(len(y)) if sample_weight is None else sample_weight
    return 0.5 * np.sum(coef**2) + C * np.sum(s * nll)


def binary_objective(coef, intercept, X, y, C):
    """sklearn's binary objective ½‖w‖² + C Σ log(1 + exp(−ỹ_i (wᵀx_i + c))), ỹ = ±1."""
    margin = X @ coef[0] + intercept[0]
    return 0.5 * np.sum(coef**2) + C * np.sum(np.logaddexp(0.0, -(2 * y - 1) * margin))


def sklearn_reference(X, y, C, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, tol=1e-10, max_iter=100_000, **kw).fit(X, y)


# scikit-learn's estimator checks, one test each (the estimator switches x64 on for its own
# computations; the checks run in the default configuration, as users call it). Checks that need
# pandas (not a dependency) are skipped by scikit-learn itself.
@pytest.mark.slow
@parametrize_with_checks([SoftmaxRegression()])
def test_sklearn_estimator_check(estimator, check):
    check(estimator)


@pytest.mark.parametrize(
    "dataset, C",
    [("iris", 1.0), ("iris", 100.0), ("digits-standardized", 0.01)],
)
def test_same_optimum_as_sklearn(dataset, C):
    X, y = (load_iris if dataset == "iris" else load_digits)(return_X_y=True)
    if dataset != "iris":
        X = StandardScaler().fit_transform(X)
    ours = SoftmaxRegression(C=C).fit(X, y)  # default settings
    ref = sklearn_reference(X, y, C)
    f_ours = sklearn_objective(ours.coef_, ours.intercept_, X, y, C)
    f_ref = sklearn_objective(ref.coef_, ref.intercept_, X, y, C)
    assert (f_ours - f_ref) / abs(f_ref) <= 1e-6
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-4)


# LogisticRegression(C=1.0, tol=1e-10, max_iter=100000) on the raw digits (sklearn 1.9.1, float64):
# 4463 lbfgs iterations and ~4 minutes on this machine's CPUs, too slow for the test suite. The
# optimum value of a strictly convex problem does not depend on the solver.
SKLEARN_RAW_DIGITS_C1 = 17.032352407251288


def test_same_optimum_as_sklearn_on_raw_digits():
    X, y = load_digits(return_X_y=True)
    ours = SoftmaxRegression(C=1.0).fit(X, y)
    f_ours = sklearn_objective(ours.coef_, ours.intercept_, X, y, 1.0)
    assert (f_ours - SKLEARN_RAW_DIGITS_C1) / SKLEARN_RAW_DIGITS_C1 <= 1e-6


def test_lbfgs_solver_reaches_the_optimum_on_iris():
    X, y = load_iris(return_X_y=True)
    ours = SoftmaxRegression(C=1.0, solver="lbfgs", max_iter=1000).fit(X, y)
    ref = sklearn_reference(X, y, 1.0)
    f_ours = sklearn_objective(ours.coef_, ours.intercept_, X, y, 1.0)
    f_ref = sklearn_objective(ref.coef_, ref.intercept_, X, y, 1.0)
    assert (f_ours - f_ref) / abs(f_ref) <= 1e-6


def test_sample_and_class_weights():
    X, y = load_iris(return_X_y=True)
    rng = np.random.default_rng(0)
    sw = rng.integers(0, 4, size=len(y)).astype(float)
    weighted = SoftmaxRegression(tol=1e-10, C=0.5).fit(X, y, sample_weight=sw)
    repeated = SoftmaxRegression(tol=1e-10, C=0.5).fit(
        np.repeat(X, sw.astype(int), 0), np.repeat(y, sw.astype(int))
    )
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(weighted.intercept_, repeated.intercept_, rtol=1e-7, atol=1e-9)
    # class_weight multiplies the sample weights, as in sklearn
    cw = {0: 2.0, 1: 0.5, 2: 1.0}
    a = SoftmaxRegression(tol=1e-10, class_weight=cw).fit(X, y)
    b = SoftmaxRegression(tol=1e-10).fit(X, y, sample_weight=np.array([cw[c] for c in y]))
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-8, atol=1e-10)
    ref = sklearn_reference(X, y, 1.0, class_weight="balanced")
    ours = SoftmaxRegression(class_weight="balanced").fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-4)


def test_string_labels_methods_and_pickle():
    X, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    est = SoftmaxRegression(C=10.0).fit(X, names)
    np.testing.assert_array_equal(est.classes_, ["setosa", "versicolor", "virginica"])
    assert est.predict(X).dtype.kind == "U" and est.score(X, names) > 0.95
    proba = est.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(np.exp(est.predict_log_proba(X)), proba, rtol=1e-12)
    assert est.decision_function(X).shape == (150, 3)
    np.testing.assert_array_equal(est.predict(X), est.classes_[proba.argmax(axis=1)])
    np.testing.assert_allclose(est.intercept_.sum(), 0.0, atol=1e-10)
    clone = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(clone.predict_proba(X), proba)
    assert est.n_features_in_ == 4 and est.n_iter_.shape == (1,)


def test_warm_start_and_no_intercept():
    X, y = load_iris(return_X_y=True)
    est = SoftmaxRegression(warm_start=True).fit(X, y)
    first = est.n_iter_[0]
    est.fit(X, y)
    assert est.n_iter_[0] <= 1 < first
    est = SoftmaxRegression(fit_intercept=False).fit(X, y)
    np.testing.assert_array_equal(est.intercept_, 0.0)


def test_x64_is_local_to_the_fit():
    """The fit runs in float64 without changing the caller's configuration. Run outside any
    x64 context manager: inside one, a global `config.update` would be hidden by the context's
    thread-local value."""
    X, y = load_iris(return_X_y=True)
    assert not jax.config.jax_enable_x64
    est = SoftmaxRegression().fit(X, y)
    assert not jax.config.jax_enable_x64
    assert jax.numpy.zeros(1).dtype == np.float32
    assert est.coef_.dtype == np.float64


def test_max_iter_warns():
    X, y = load_digits(return_X_y=True)
    with pytest.warns(ConvergenceWarning, match="did not converge: max_iter = 2 reached"):
        SoftmaxRegression(max_iter=2).fit(X, y)


@pytest.mark.parametrize(
    "X, y, kwargs, match",
    [
        ([[0.0, np.nan], [1, 1]], [0, 1], {}, "Input X contains NaN"),
        ([[0.0, np.inf], [1, 1]], [0, 1], {}, "Input X contains infinity"),
        (np.zeros((0, 2)), [], {}, "0 sample"),
        ([[0.0], [1.0], [2.0]], [0, 1], {}, "inconsistent numbers of samples"),
        ([[0.0], [1.0]], [1, 1], {}, "at least 2 classes .* only one class: 1"),
        ([[0.0], [1.0]], [0, 1], {"C": 0.0}, r"`C` must be a float > 0"),
        ([[0.0], [1.0]], [0, 1], {"solver": "sag"}, r"`solver` must be one of"),
        ([[0.0], [1.0]], [0, 1], {"max_iter": -1}, r"`max_iter` must be an integer >= 0"),
        ([[0.0], [1.0]], [0, 1], {"tol": -1.0}, r"`tol` must be a float >= 0"),
        ([[0.0], [1.0]], [0.5, 1.5], {}, "Unknown label type"),
    ],
)
def test_bad_input(X, y, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftmaxRegression(**kwargs).fit(np.asarray(X), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# The behaviour scikit-learn's own tests (sklearn/linear_model/tests/test_logistic.py) ask of
# LogisticRegression, checked on SoftmaxRegression: binary C, identifiability, weights, warm start,
# n_iter_, dtype, max_iter=0, no penalty, the intercept.


def _binary_problem():
    X, y = load_breast_cancer(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_two_classes_same_C_as_logistic_regression(fit_intercept):
    # the same C gives LogisticRegression's binary model: one coefficient vector u = w_1 - w_0
    X, y = _binary_problem()
    C = 0.05
    ours = SoftmaxRegression(tol=1e-10, C=C, fit_intercept=fit_intercept).fit(X, y)
    ref = sklearn_reference(X, y, C, fit_intercept=fit_intercept)
    assert ours.coef_.shape == ref.coef_.shape == (1, 30)
    assert ours.intercept_.shape == ref.intercept_.shape == (1,)
    # at least as low in sklearn's own binary objective (sklearn's lbfgs stops on its ftol)
    f_ours = binary_objective(ours.coef_, ours.intercept_, X, y, C)
    f_ref = binary_objective(ref.coef_, ref.intercept_, X, y, C)
    assert f_ours <= f_ref * (1 + 1e-12)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-6)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-6)
    np.testing.assert_allclose(ours.decision_function(X), ref.decision_function(X), atol=1e-5)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("C", [150.0, np.inf])
def test_multinomial_coefficients_sum_to_zero(fit_intercept, C):
    # softmax is invariant to adding one vector to every class: the reported coefficients are the
    # centred ones (scikit-learn's identifiability test, 1e-10), with or without a penalty
    X, y = load_iris(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # C=inf: iris is nearly separable
        est = SoftmaxRegression(C=C, fit_intercept=fit_intercept, max_iter=30).fit(X, y)
    np.testing.assert_allclose(est.coef_.sum(axis=0), 0.0, atol=1e-10)
    assert abs(est.intercept_.sum()) <= 1e-11


@pytest.mark.parametrize("n_classes", [2, 3])
def test_sample_weight_is_repeating_rows(n_classes):
    X, y = load_iris(return_X_y=True)
    X, y = X[y < n_classes], y[y < n_classes]
    sw = np.random.default_rng(1).integers(0, 4, size=len(y)).astype(float)
    reps = sw.astype(int)
    a = SoftmaxRegression(tol=1e-10, C=0.3).fit(X, y, sample_weight=sw)
    b = SoftmaxRegression(tol=1e-10, C=0.3).fit(np.repeat(X, reps, 0), np.repeat(y, reps))
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(a.intercept_, b.intercept_, rtol=1e-6, atol=1e-8)


def test_binary_class_weight_as_logistic_regression():
    X, y = _binary_problem()
    cw = {0: 3.0, 1: 0.5}
    ours = SoftmaxRegression(tol=1e-10, C=0.1, class_weight=cw).fit(X, y)
    ref = sklearn_reference(X, y, 0.1, class_weight=cw)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-6)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-6)
    balanced = SoftmaxRegression(tol=1e-10, C=0.1, class_weight="balanced").fit(X, y)
    ref = sklearn_reference(X, y, 0.1, class_weight="balanced")
    np.testing.assert_allclose(balanced.predict_proba(X), ref.predict_proba(X), atol=1e-6)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("C", [1.0, np.inf])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_warm_start_steps_add_up(fit_intercept, C, n_classes):
    # two warm-started 1-iteration fits are one 2-iteration fit (sklearn: rtol 1e-7)
    X, y = load_iris(return_X_y=True)
    X, y = X[y < n_classes], y[y < n_classes]
    kw = dict(C=C, fit_intercept=fit_intercept)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        two = SoftmaxRegression(max_iter=2, **kw).fit(X, y)
        warm = SoftmaxRegression(max_iter=1, warm_start=True, **kw).fit(X, y)
        warm.fit(X, y)
    assert two.n_iter_[0] == 2 and warm.n_iter_[0] == 1
    np.testing.assert_allclose(warm.coef_, two.coef_, rtol=1e-7)
    np.testing.assert_allclose(warm.intercept_, two.intercept_, rtol=1e-7, atol=1e-14)


def test_n_iter_and_warm_start_from_the_optimum():
    X, y = load_iris(return_X_y=True)
    est = SoftmaxRegression(tol=1e-10, C=1.0, warm_start=True).fit(X, y)
    assert est.n_iter_.shape == (1,) and est.n_iter_.dtype == np.int32
    assert 1 <= est.n_iter_[0] <= est.max_iter
    coef = est.coef_.copy()
    est.fit(X, y)  # already at the optimum
    assert est.n_iter_[0] <= 1
    np.testing.assert_allclose(est.coef_, coef, atol=1e-9)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_float32_input_keeps_float32(fit_intercept, n_classes):
    X, y = load_iris(return_X_y=True)
    X, y = X[y < n_classes], y[y < n_classes]
    e32 = SoftmaxRegression(fit_intercept=fit_intercept).fit(X.astype(np.float32), y)
    e64 = SoftmaxRegression(fit_intercept=fit_intercept).fit(X, y)
    assert e32.coef_.dtype == e32.intercept_.dtype == np.float32
    assert e64.coef_.dtype == e64.intercept_.dtype == np.float64
    # the float32 data are the float64 data rounded: the same optimum to float32's accuracy
    np.testing.assert_allclose(e32.coef_, e64.coef_.astype(np.float32), rtol=1e-4, atol=1e-5)
    assert e32.predict_proba(X.astype(np.float32)).shape == (len(y), n_classes)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_zero_max_iter_returns_the_initial_state(n_classes):
    X, y = load_iris(return_X_y=True)
    y = (y == 2).astype(int) if n_classes == 2 else y
    with pytest.warns(ConvergenceWarning, match="max_iter = 0 reached"):
        est = SoftmaxRegression(max_iter=0).fit(X, y)
    assert est.n_iter_[0] == 0
    np.testing.assert_array_equal(est.coef_, 0.0)
    np.testing.assert_array_equal(est.intercept_, 0.0)
    np.testing.assert_allclose(est.predict_proba(X), 1.0 / n_classes)
    assert est.score(X, y) < 0.7


@pytest.mark.parametrize("n_classes", [2, 4])
def test_unpenalized_matches_logistic_regression(n_classes):
    # C = inf on a problem with a finite unpenalised optimum (noisy labels, not separable)
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=400, n_features=6, n_informative=4, n_redundant=0, n_classes=n_classes,
        flip_y=0.2,
        random_state=0,
    )  # fmt: skip
    ours = SoftmaxRegression(tol=1e-10, C=np.inf).fit(X, y)
    # exact Newton steps: the padded zero features (no curvature without a penalty) take no step
    # and leave the Newton system regular
    assert ours.n_iter_[0] <= 12
    ref = sklearn_reference(X, y, np.inf)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-5)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-5)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_intercept_is_not_penalised(n_classes):
    # a penalty so strong that coef_ ~ 0: the intercept alone fits the class frequencies
    X, y = load_iris(return_X_y=True)
    keep = np.r_[0:50, 50:80, 100:110] if n_classes == 3 else np.r_[0:50, 50:70]
    X, y = X[keep], y[keep]
    est = SoftmaxRegression(C=1e-8).fit(X, y)
    assert np.max(np.abs(est.coef_)) < 1e-5
    freq = np.bincount(y) / len(y)
    np.testing.assert_allclose(est.predict_proba(X).mean(axis=0), freq, atol=1e-5)
    ref = sklearn_reference(X, y, 1e-8)
    np.testing.assert_allclose(est.intercept_, ref.intercept_, atol=1e-4)
    # without an intercept the same penalty gives uniform probabilities
    flat = SoftmaxRegression(C=1e-8, fit_intercept=False).fit(X, y)
    np.testing.assert_allclose(flat.predict_proba(X), 1.0 / n_classes, atol=1e-5)


@pytest.mark.parametrize("n_full, cv", [(150, 5), (569, 5), (1797, 5), (1000, 10), (301, 4)])
def test_cross_validation_folds_and_refit_share_one_program(monkeypatch, n_full, cv):
    """The folds of a cv-fold search (``n (cv − 1) / cv`` rows) and the refit on all ``n`` rows
    run one compiled solver: one new program, not one per row count."""
    from softmax_jax import _estimator, _solvers

    monkeypatch.setattr(_estimator, "_row_buckets", set())  # a fresh process
    rng = np.random.default_rng(n_full)
    X = rng.normal(size=(n_full, 5))
    y = np.arange(n_full) % 3
    fold = n_full - n_full // cv
    before = _solvers._solve_impl._cache_size()
    SoftmaxRegression(C=0.37).fit(X[:fold], y[:fold])
    SoftmaxRegression(C=0.37).fit(X[: fold + 1], y[: fold + 1])  # folds differ by a row
    SoftmaxRegression(C=0.37).fit(X, y)
    assert _solvers._solve_impl._cache_size() - before <= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "n, d, k, mixed",
    [(4096, 256, 5, False), (16384, 256, 4, True)],  # conjugate gradients; a float32 phase first
)
def test_the_solve_holds_no_copy_of_the_features(monkeypatch, n, d, k, mixed):
    """Newton-CG's float32 copy of ``X`` is made once, outside the compiled solve, and the solve's
    temporaries hold no copy of ``X``: made inside it, XLA fused the cast into each consumer and
    kept three to four copies (``jax.stages.Compiled.memory_analysis``)."""
    from softmax_jax import _estimator, _solvers
    from softmax_jax._objective import Columns

    seen = {}

    def spy(data, params, **kw):
        seen.update(data=data, params=params, kw=kw)
        return _solvers.solve(data, params, **kw)

    monkeypatch.setattr(_estimator, "solve", spy)
    rng = np.random.default_rng(n)
    X, y = rng.normal(size=(n, d)), rng.integers(0, k, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        SoftmaxRegression(max_iter=2).fit(X, y)
    data, params, kw = seen["data"], seen["params"], seen["kw"]
    assert kw["mixed_precision"] is mixed
    assert isinstance(data.Zh, Columns) and data.Zh.dtype == np.float32
    with jax.enable_x64(True):
        args = (params, data, np.float64(kw["l2"]), np.float64(kw["tol"]), np.int32(2))
        solve = _solvers._solve_impl.lower(*args, solver="newton-cg", mixed=mixed).compile()
    copy = data.Zh.T.size * data.Zh.T.dtype.itemsize
    # besides the (N, K) arrays of a pass: 1.19 and 0.53 copies here, 3.0 and 4.0 made inside
    assert solve.memory_analysis().temp_size_in_bytes < 1.5 * copy
