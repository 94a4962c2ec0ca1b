"""Newton-CG (``_newton``): its iterates stay centred over the classes, the line search and its
backtracking, the forcing term, CG's products, the dense steps on small problems, and convergence
from far starts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import (
    float64_data,
    generated_problem,
    newton_steps,
    numpy_objective,
    problem,
    zeros,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from softmax_jax import _newton, _objective
from softmax_jax._newton import center_classes
from softmax_jax._objective import TrainData, transposed
from softmax_jax._placement import place
from softmax_jax._solvers import solve

# Exactness checks against float64 references: x64 on for this module (scoped, see conftest).
pytestmark = pytest.mark.x64


@pytest.mark.parametrize("l2", [0.05, 0.0])
def test_newton_iterates_sum_to_zero_over_classes(l2):
    # the raw solver output, before any centring by the estimator: the preconditioned CG
    # directions are projected onto Σ_k w_k = 0, so every iterate stays there
    X, y = problem()
    data = place(X, y, None, fit_intercept=True, dtype=np.float64, device=None,
                 hessian_dtype=np.float32)  # fmt: skip
    for max_iter in (1, 3, 50):
        res = solve(data, zeros(5, 4), solver="newton-cg", l2=l2, tol=1e-10, max_iter=max_iter)
        np.testing.assert_allclose(np.asarray(res.params["W"]).sum(axis=1), 0.0, atol=1e-12)
        assert abs(float(np.asarray(res.params["b"]).sum())) <= 1e-12
    assert res.converged


def test_center_classes_keeps_the_model():
    rng = np.random.default_rng(3)
    p = {"W": jnp.asarray(rng.normal(size=(5, 4))), "b": jnp.asarray(rng.normal(size=4))}
    c = center_classes(p)
    X = rng.normal(size=(7, 5))
    a, b = X @ p["W"] + p["b"], X @ c["W"] + c["b"]
    np.testing.assert_allclose(jax.nn.softmax(a), jax.nn.softmax(b), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(c["W"]).sum(axis=1), 0.0, atol=1e-14)


def test_newton_cg_converges_in_a_few_iterations(cg_steps):
    # Newton's method with the exact Hessian (eq. (2)'s plus l2·I) converges quadratically: 6
    # iterations (24 CG products) here. A Hessian product or preconditioner that drops or
    # mis-scales a term still converges, but linearly (the L2 term left out of the Hessian
    # product: 27 iterations, 194 products), and so does a forcing term that stays at 0.1 (no
    # tighter CG solves as ∇f shrinks: 8 iterations), which bounds on the counts see.
    X, y = problem()
    res = solve(
        float64_data(X, y), zeros(5, 4), solver="newton-cg", l2=0.1, tol=1e-10, max_iter=100
    )
    assert res.converged and res.n_iter <= 7 and res.n_iter <= res.n_inner <= 40, res
    assert res.value == pytest.approx(numpy_objective(X, y, None, res.params, 0.1), rel=1e-13)


def test_newton_stops_where_tol_asks_not_far_past_it(cg_steps):
    # the last Newton step's CG stops once its residual (about the next gradient) is inside tol:
    # max|∇f| ends below tol but within a small factor of it, with fewer Hessian products
    X, y = problem(n=400, d=6, k=5, seed=1, noise=0.3)
    data = place(X, y, None, fit_intercept=True, dtype=np.float64, device=None,
                 hessian_dtype=np.float32)  # fmt: skip
    for tol in (1e-6, 1e-8):
        res = solve(data, zeros(6, 5), solver="newton-cg", l2=1e-3, tol=tol, max_iter=100)
        assert res.converged and tol / 30 <= res.grad_max <= tol


@pytest.mark.parametrize("steps", ["dense", "cg"])
@pytest.mark.parametrize("scale, iterations", [(3.0, 15), (10.0, 20), (100.0, 40), (300.0, 70)])
def test_newton_converges_from_a_far_start(request, steps, scale, iterations):
    # from W = scale · N(0, 1), 8 draws (confident wrong predictions), on the dense and the CG
    # steps. Saturated rows leave the Hessian directions of almost no curvature, along which the
    # Newton step is astronomically long: the search's first trial is shortened to move no
    # coordinate by more than max(1, max|W|). Without that, from 100σ the dense steps took 176
    # iterations on one draw and CG did not converge in 200 on another (on a 2-core AMD EPYC, LLVM
    # level 0); the rounding, which differs between CPUs, decided where. With it, every draw
    # converges within 10 (3σ), 14, 31 and 44 (300σ) iterations there
    if steps == "cg":
        request.getfixturevalue("cg_steps")
    X, y = problem()
    data = float64_data(X, y)
    best = solve(data, zeros(5, 4), solver="newton-cg", l2=1e-3, tol=1e-8, max_iter=100)
    for seed in range(8):
        W0 = scale * np.random.default_rng(seed).normal(size=(5, 4))
        res = solve(data, {"W": jnp.asarray(W0), "b": jnp.zeros(4)},
                    solver="newton-cg", l2=1e-3, tol=1e-8, max_iter=100)  # fmt: skip
        assert res.converged and res.n_iter <= iterations, (seed, res)
        assert res.value == pytest.approx(numpy_objective(X, y, None, res.params, 1e-3), rel=1e-13)
        assert res.value == pytest.approx(best.value, rel=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(10, 200),
    d=st.integers(1, 10),
    k=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
    noise=st.sampled_from([0.01, 0.3, 1.0]),
    feature_scale=st.sampled_from([0.1, 1.0, 3.0]),
    weighted=st.booleans(),
    l2=st.sampled_from([1e-4, 1e-2, 1.0]),
    start=st.sampled_from([1.0, 10.0]),
    dense=st.booleans(),
)
def test_newton_from_generated_far_starts_reaches_the_optimum(
    n, d, k, seed, noise, feature_scale, weighted, l2, start, dense
):
    # generated problems (near-separable to noisy, weighted or not, l2 > 0, every class present)
    # and starts W, b = start · N(0, 1), on the dense and the CG steps: the solve from there
    # converges to the optimum the solve from zero finds. Not yet from 100σ: with features at
    # scale 3 and l2 = 1, 2 of 150 draws on the dense steps and more on CG still run to max_iter
    # (test_newton_converges_from_a_far_start has the 100σ starts that converge)
    X, y, s, rng = generated_problem(n, d, k, seed, noise, feature_scale, weighted)
    data = float64_data(X, y, s)
    far = {"W": jnp.asarray(start * rng.normal(size=(d, k))),
           "b": jnp.asarray(start * rng.normal(size=k))}  # fmt: skip
    with newton_steps(dense):
        best = solve(data, zeros(d, k), solver="newton-cg", l2=l2, tol=1e-10, max_iter=500)
        res = solve(data, far, solver="newton-cg", l2=l2, tol=1e-10, max_iter=500)
    assert best.converged and res.converged, (best, res)
    # both at max|∇f| <= 1e-10 (the intercept is not penalised: near-separable data leave f
    # almost flat along it, and two such points differ by up to ~2e-9 in f): the same optimum
    assert res.value == pytest.approx(best.value, rel=1e-8), (best, res)


@pytest.mark.parametrize("factor", [1e2, 1e3])
def test_newton_line_search_backtracks_orders_of_magnitude(factor):
    # one Newton-CG step from a state whose gradient is scaled by `factor`: the direction is
    # `factor` times the Newton step (and the slope factor² times), so the Armijo condition
    # holds only at t ≈ 1/factor; the search gets there (t shrinks 2-10× per trial) and moves
    X, y = problem()
    data, l2 = float64_data(X, y), jnp.asarray(1e-3)
    st = _newton._newton_init(zeros(5, 4), data, l2)
    scaled = st._replace(grad=jax.tree.map(lambda g: factor * g, st.grad))
    new = jax.jit(_newton._newton_step)(scaled, data, l2)
    assert not new.stalled and new.value < st.value


# The line search's next trial step, as a pure function ---------------------------------------------
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    t=st.floats(1e-6, 1.0),
    slope=st.floats(-1e3, -1e-3),
    minimiser=st.floats(1e-3, 2.0),  # where the quadratic's minimum lies, as a multiple of t
)
def test_backtrack_steps_to_the_minimiser_of_a_quadratic(t, slope, minimiser):
    # f(s) = f0 + slope s + c s² has its minimum at s* = −slope / 2c; a refused trial at t is
    # followed by s* itself when it lies in [0.1 t, 0.5 t], else by the nearest bound
    f0, s_star = 3.0, minimiser * t
    c = -slope / (2 * s_star)
    v_t = f0 + slope * t + c * t * t
    got = float(
        _newton.backtrack(np.float64(t), np.float64(v_t), np.float64(f0), np.float64(slope))
    )
    want = min(max(s_star, 0.1 * t), 0.5 * t)
    assert got == pytest.approx(want, rel=1e-9, abs=0), (t, slope, minimiser)


@pytest.mark.parametrize("minimiser", [0.50002, 0.6, 2.0])
def test_backtrack_never_steps_past_half_the_refused_step(minimiser):
    # the clip binds at 0.5 t exactly, however close above it the quadratic's minimum lies
    t, f0, slope = 0.5, 1.0, -2.0
    c = -slope / (2 * minimiser * t)
    v_t = f0 + slope * t + c * t * t
    assert float(_newton.backtrack(t, v_t, f0, slope)) == 0.5 * t


@pytest.mark.parametrize("t", [1.0, 0.3, 1e-3])
@pytest.mark.parametrize("v_t", [np.inf, np.nan])
def test_backtrack_after_a_non_finite_value_steps_to_a_tenth(t, v_t):
    assert float(_newton.backtrack(np.float64(t), np.float64(v_t), 1.0, -1.0)) == pytest.approx(
        0.1 * t, rel=1e-15
    )


@pytest.mark.parametrize("t", [1.0, 0.3])
def test_backtrack_halves_where_the_quadratic_has_no_minimum(t):
    # f(t) on or below the tangent line f0 + slope t: no curvature to interpolate with
    for v_t in (1.0 - 2.0 * t, 1.0 - 3.0 * t):
        assert float(_newton.backtrack(np.float64(t), np.float64(v_t), 1.0, -2.0)) == 0.5 * t


def _forcing(g_max, g_prev, eta_prev):
    return float(_newton.forcing(np.float64(g_max), np.float64(g_prev), np.float64(eta_prev)))


def test_forcing_term_starts_at_its_cap():
    eta0, g0 = _newton.newton_aux(jnp.float64)
    assert float(eta0) == _newton._NEWTON_FORCING and np.isinf(float(g0))
    for g_max in (10.0, 1.0, 1e-6, 0.0):
        assert _forcing(g_max, np.inf, float(eta0)) == _newton._NEWTON_FORCING


@settings(max_examples=200, deadline=None)
@given(
    g_max=st.floats(0.0, 1e3),
    g_prev=st.floats(1e-12, 1e3),
    eta_prev=st.floats(_newton._NEWTON_FORCING_MIN, _newton._NEWTON_FORCING),
)
def test_forcing_term_is_eisenstat_walker_choice_2(g_max, g_prev, eta_prev):
    # η = 0.9 (g/g_prev)², not below 0.9 η_prev² where that exceeds 0.1, within [1e-3, ½]
    eta = _forcing(g_max, g_prev, eta_prev)
    expect = 0.9 * (g_max / g_prev) ** 2
    if 0.9 * eta_prev**2 > 0.1:
        expect = max(expect, 0.9 * eta_prev**2)
    expect = min(max(expect, _newton._NEWTON_FORCING_MIN), _newton._NEWTON_FORCING)
    assert eta == pytest.approx(expect, rel=1e-12)
    assert _newton._NEWTON_FORCING_MIN <= eta <= _newton._NEWTON_FORCING


def test_forcing_term_is_loose_on_slow_steps_and_tight_on_fast_ones():
    assert _forcing(0.95, 1.0, 0.01) == _newton._NEWTON_FORCING  # the gradient barely fell
    assert _forcing(1e-3, 1e-2, 0.01) == pytest.approx(0.9 * 1e-2)  # 0.9 (g / g_prev)²
    assert _forcing(1e-6, 1e-2, 0.01) == _newton._NEWTON_FORCING_MIN  # quadratic phase
    assert _forcing(1e-6, 1e-2, 0.5) == pytest.approx(0.9 * 0.25)  # no sudden tightening


def test_newton_cg_does_not_solve_damped_steps_finely():
    # a GridSearchCV's weak end: standardised digits, C = 1000, the five folds. Nearly separable:
    # Newton's steps are cut back by the line search for tens of iterations. With CG solving each
    # to a relative residual √max|∇f| (about 1%) the folds took 1020-1510 products (6190 in all);
    # with Eisenstat and Walker's forcing term, which keeps those steps loose, 399-725 (2755)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    X0, y0 = load_digits(return_X_y=True)
    products = 0
    for train, _ in StratifiedKFold(5).split(X0, y0):
        X, y = StandardScaler().fit_transform(X0[train]), y0[train]
        data = place(X, y, None, fit_intercept=True, dtype=np.float64, device=None,
                     hessian_dtype=np.float32)  # fmt: skip
        params = {"W": np.zeros((X.shape[1], 10)), "b": np.zeros(10)}
        l2 = 1.0 / (1000.0 * len(y))
        res = solve(data, params, solver="newton-cg", l2=l2, tol=1e-9, max_iter=200)
        assert res.converged, res
        products += res.n_inner
    assert products <= 4000


def test_a_search_refused_only_by_rounding_stalls_rather_than_creeping_on(cg_steps):
    # all the weight on one class: the optimum's probabilities round to 1, its intercepts run off
    # (unpenalised) and max|∇f| shrinks like their exp(−gap). The search's first trial is kept
    # within max(1, max|params|) (test_newton_converges_from_a_far_start): the solve reaches
    # tol = 1e-9 in 17 iterations (max|∇f| 3e-13). With Newton's full step tried first it stopped
    # at 1e-7, its trials refused within the rounding of f; never may it creep on to max_iter
    X, y = problem()
    res = solve(float64_data(X, y, (y == 0).astype(float)), zeros(5, 4), solver="newton-cg",
                l2=0.1, tol=1e-9, max_iter=100)  # fmt: skip
    assert res.converged and res.n_iter <= 25, res


def test_newton_step_counts_its_hessian_products(cg_steps):
    # one feature, two classes, no intercept: the centred subspace is 1-D, so CG solves the
    # Newton system exactly with one Hessian product and stops on a zero residual
    X, y = problem(n=50, d=1, k=2)
    data = place(X, y, None, fit_intercept=False, dtype=np.float64, device=None,
                 hessian_dtype=np.float64)  # fmt: skip
    l2 = np.float64(0.1)
    st = _newton._newton_init({"W": jnp.zeros((1, 2))}, data, l2)
    new = _newton._newton_step(st, data, l2, np.float64(0.0))
    assert int(new.n_inner) == 1 and float(new.value) < float(st.value)
    # a residual already inside TOL_MARGIN · tol takes no product
    done = _newton._newton_step(st, data, l2, np.float64(1e3))
    assert int(done.n_inner) == 0


@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("l2", [0.1, 1e-4, 0.0])
def test_dense_and_cg_newton_steps_reach_the_same_optimum(intercept, l2):
    # the dense steps (the Hessian as a matrix, exact solves) on the problems small enough, CG on
    # the others: the same optimum, also without a penalty (W + v 1ᵀ is then a null direction of
    # the Hessian too) and without an intercept; the dense steps take no Hessian-vector product
    X, y = problem(n=90, d=4, k=3, seed=2, noise=1.0)
    data = place(X, y, None, fit_intercept=intercept, dtype=np.float64, device=None)
    p0 = zeros(4, 3) if intercept else {"W": jnp.zeros((4, 3))}
    assert _newton.dense_newton(p0, data)
    run = functools.partial(solve, data, p0, solver="newton-cg", l2=l2, tol=1e-9, max_iter=200)
    dense = run()
    with newton_steps(dense=False):
        cg = run()
    assert dense.converged and cg.converged, (dense.message, cg.message)
    assert dense.n_inner == 0 and cg.n_inner > 0
    assert dense.n_iter <= cg.n_iter
    assert dense.value == pytest.approx(cg.value, rel=1e-12)
    if l2 > 0:  # (without a penalty the optimum lies at infinity: only its value is compared)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), dense.params,
                     cg.params)  # fmt: skip
        assert dense.value == pytest.approx(
            numpy_objective(X, y, None, {"b": np.zeros(3), **dense.params}, l2), rel=1e-13
        )


def test_dense_newton_steps_only_where_the_hessian_matrix_is_cheap():
    # N p² multiply-adds at most DENSE_MAX_WORK and p at most DENSE_MAX_PARAMS, p = (D + 1) K
    def data(n, d):
        return TrainData(jnp.zeros((n, d)), jnp.zeros(n, jnp.int32), None)

    p = (7 + 1) * 4
    n_max = _newton.DENSE_MAX_WORK // (p * p)
    assert _newton.dense_newton(zeros(7, 4), data(n_max, 7))
    assert not _newton.dense_newton(zeros(7, 4), data(n_max + 1, 7))
    assert _newton.dense_newton({"W": jnp.zeros((8, 4))}, data(n_max, 8))  # no bias: 8 · 4
    k = _newton.DENSE_MAX_PARAMS // 2
    assert _newton.dense_newton(zeros(1, k), data(4, 1))
    assert not _newton.dense_newton(zeros(1, k + 1), data(4, 1))
    assert _newton.dense_newton(
        zeros(7, 4), TrainData(transposed(jnp.zeros((40, 7)), jnp.float32), None, None)
    )


def test_dense_direction_is_centred_and_steps_zero_without_curvature():
    # H over V ([W; b] = V Bᵀ) the identity but for a coordinate without curvature (a zero
    # feature without a penalty; its gradient is 0): the direction is −∇f, centred, 0 there
    H = jnp.diag(jnp.asarray([1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))  # row 1 of V has no curvature
    g = center_classes({"W": jnp.asarray([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0]]),
                        "b": jnp.asarray([1.0, -1.0, 3.0])})  # fmt: skip
    d = _newton._dense_direction(H, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -b, atol=1e-12), d, g)
    assert np.all(np.isfinite(d["W"])) and not np.any(d["W"][1])
    np.testing.assert_allclose(d["W"].sum(axis=1), 0, atol=1e-12)


@pytest.mark.parametrize("k", [2, 5])
def test_dense_diagonal_is_the_lifted_matrix_diagonal(getkey, k):
    # (I ⊗ B) H (I ⊗ B)ᵀ's diagonal, shaped like the parameters, for any symmetric H over V
    rows = 3
    A = jax.random.normal(getkey(), (rows * (k - 1),) * 2)
    H = A @ A.T
    g = {"W": jnp.zeros((rows - 1, k)), "b": jnp.zeros(k)}
    B = np.asarray(_objective.centred_basis(k, jnp.float32))
    lift = np.kron(np.eye(rows), B)
    got = _objective.stack(_newton._dense_diagonal(H, g)).reshape(-1)
    np.testing.assert_allclose(got, np.diag(lift @ np.asarray(H) @ lift.T), rtol=1e-5, atol=1e-5)
