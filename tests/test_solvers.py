"""The full-batch solvers' runs (``_solvers``): ``max_iter``, a start at the optimum, L-BFGS's
stall, Newton-CG's float32 Hessian operand, and the mixed-precision solve: its float32 phase down
to float32's noise floor, then the float64 optimum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import float64_data, generated_problem, newton_steps, numpy_objective, problem, zeros
from hypothesis import given, settings
from hypothesis import strategies as st

from softmax_jax import _newton, _objective, _solvers
from softmax_jax._objective import Columns, TrainData, transposed, tree_max_abs
from softmax_jax._placement import place
from softmax_jax._solvers import solve

# Exactness checks against float64 references: x64 on for this module (scoped, see conftest).
pytestmark = pytest.mark.x64


@pytest.mark.parametrize("weighted", [False, True])
def test_mixed_precision_solve_ends_at_the_float64_optimum(weighted):
    X, y = problem(n=400, d=6, k=5, seed=1)
    s = np.random.default_rng(2).uniform(0.5, 2.0, size=len(y)) if weighted else None
    data = place(X, y, s, fit_intercept=True, dtype=np.float64, device=None,
                 hessian_dtype=np.float32)  # fmt: skip
    kw = dict(solver="newton-cg", l2=1e-3, max_iter=100)
    ref = solve(data, zeros(6, 5), tol=1e-12, **kw)
    for tol in (1e-10, 1e-6):
        mixed = solve(data, zeros(6, 5), tol=tol, mixed_precision=True, **kw)
        assert mixed.converged and mixed.grad_max <= tol
        assert mixed.params["W"].dtype == jnp.float64
        # the float64 phase decides: the value reported is the objective's in float64 at the
        # returned parameters, evaluated here in NumPy (not with the solver's own function)
        v = numpy_objective(X, y, s, mixed.params, 1e-3)
        assert mixed.value == pytest.approx(v, rel=1e-13)
        assert (mixed.value - ref.value) / ref.value <= (1e-14 if tol < 1e-8 else 1e-9)
    np.testing.assert_allclose(mixed.params["W"], ref.params["W"], atol=1e-3)


@settings(max_examples=6, deadline=None)
@given(
    n=st.integers(20, 300),
    d=st.integers(1, 8),
    k=st.integers(2, 6),
    seed=st.integers(0, 2**31 - 1),
    noise=st.sampled_from([0.05, 0.3, 1.0]),
    feature_scale=st.sampled_from([0.1, 1.0, 10.0]),
    weighted=st.booleans(),
    l2=st.sampled_from([1e-4, 1e-2, 1.0]),
    dense=st.booleans(),
)
def test_mixed_precision_reaches_the_float64_optimum_on_generated_problems(
    n, d, k, seed, noise, feature_scale, weighted, l2, dense
):
    # generated problems (near-separable to noisy, features from 0.1 to 10, weighted or not), on
    # the dense and the CG steps: the solve whose first iterations run in float32 ends where the
    # float64 solve does, its value the float64 objective at its parameters
    X, y, s, _ = generated_problem(n, d, k, seed, noise, feature_scale, weighted)
    data = place(X, y, s, fit_intercept=True, dtype=np.float64, device=None,
                 hessian_dtype=np.float32)  # fmt: skip
    kw = dict(solver="newton-cg", l2=l2, tol=1e-10, max_iter=500)
    with newton_steps(dense):
        ref = solve(data, zeros(d, k), **kw)
        mixed = solve(data, zeros(d, k), mixed_precision=True, **kw)
    assert ref.converged and mixed.converged, (ref, mixed)
    assert mixed.value == pytest.approx(numpy_objective(X, y, s, mixed.params, l2), rel=1e-13)
    # both at max|∇f| <= 1e-10: on near-separable data f is almost flat along the unpenalised
    # intercept, where two such points differ by up to ~2e-9 in f
    assert mixed.value == pytest.approx(ref.value, rel=1e-8), (ref, mixed)


def test_mixed_precision_counts_the_iterations_of_both_phases():
    X, y = problem(n=400, d=6, k=5, seed=1)
    data = place(X, y, None, fit_intercept=True, dtype=np.float64, device=None,
                 hessian_dtype=np.float32)  # fmt: skip
    kw = dict(solver="newton-cg", l2=1e-3, mixed_precision=True)
    full = solve(data, zeros(6, 5), tol=1e-9, max_iter=100, **kw)
    assert full.converged
    values = []
    for m in (0, 1, full.n_iter - 1):
        res = solve(data, zeros(6, 5), tol=1e-9, max_iter=m, **kw)
        assert res.n_iter == m and not res.converged
        values.append(res.value)
    # the float32 phase's iterates are kept (not the start) however few: the value goes down
    assert values[0] == pytest.approx(np.log(5), rel=1e-15)
    assert values[0] > values[1] > values[2] > full.value


def test_float32_phase_runs_down_to_its_noise_floor():
    # the float32 phase stops at max|∇f| <= floor = F32_TOL·rms(z), or near it (within 100×)
    # once an iteration no longer halves max|∇f|; while Newton's steps still converge fast it
    # goes on down to the floor (here to 6e-6, below the floor's 3.5e-5; ending at the first
    # iterate within 100× of the floor, as soon as it gets there, would stop at 2.4e-3)
    X, y = problem(n=400, d=6, k=5, seed=1)
    data = place(X, y, None, fit_intercept=True, dtype=np.float64, device=None,
                 hessian_dtype=np.float32)  # fmt: skip
    args = (zeros(6, 5), data, np.float64(1e-3), np.float64(1e-12))
    _, it32 = jax.jit(_solvers._run_mixed)(*args, np.int32(100))
    assert 2 <= it32 < 10
    # the iterate where the float32 phase ended, its gradient evaluated in float64
    st, _ = jax.jit(_solvers._run_mixed)(*args, it32)
    Z = np.asarray(data.Zh.T, np.float64).T  # the float32 copy, stored transposed
    floor = _solvers.F32_TOL * max(np.sqrt(np.max(np.mean(Z * Z, axis=0))), 1.0)
    assert int(st.it) == it32 and st.params["W"].dtype == jnp.float64
    assert float(tree_max_abs(st.grad)) <= floor
    # an iteration fewer: not yet there (within 100× of the floor, still halving)
    st, _ = jax.jit(_solvers._run_mixed)(*args, it32 - 1)
    assert float(tree_max_abs(st.grad)) > floor


@pytest.mark.parametrize("solver", ["newton-cg", "lbfgs"])
def test_max_iter_caps_the_iterations(solver):
    X, y = problem()
    res = solve(float64_data(X, y), zeros(5, 4), solver=solver, l2=0.1, tol=1e-12, max_iter=3)
    assert res.n_iter == 3 and not res.converged and res.message.startswith("max_iter"), res


def test_trainData_without_hessian_operands_still_solves_with_lbfgs():
    X, y = problem()
    data = place(X, y, None, fit_intercept=True, dtype=np.float64, device=None)
    res = solve(
        data, zeros(5, 4), solver="lbfgs", l2=0.05, tol=1e-8, max_iter=500, mixed_precision=True
    )  # mixed precision is Newton-CG's only: ignored here
    assert res.converged and isinstance(data, TrainData)


@pytest.mark.parametrize("solver", ["newton-cg", "lbfgs"])
def test_a_start_at_the_optimum_takes_no_iteration(solver):
    # max|∇f| = 0 exactly at the start (features all zero, balanced classes, zero parameters):
    # the stopping test max|∇f| <= tol holds at tol = 0, so no iteration runs
    y = np.tile(np.arange(4, dtype=np.int32), 2)
    res = solve(float64_data(np.zeros((8, 3)), y), zeros(3, 4), solver=solver, l2=0.1, tol=0.0,
                max_iter=5)  # fmt: skip
    assert res.converged and res.n_iter == 0 and res.grad_max == 0.0, res
    assert res.value == pytest.approx(np.log(4), rel=1e-15)


@pytest.mark.parametrize(
    "g, g_prev, done",
    [
        (0.25, 0.3, True),  # at the floor
        (0.25, 100.0, True),  # at the floor, however fast it got there
        (0.2501, 100.0, False),  # above it, still converging (halved)
        (24.9, 30.0, True),  # within 100× and no longer halved
        (25.0, 30.0, True),  # at 100× exactly
        (25.1, 30.0, False),  # past 100×
        (20.0, 40.0, False),  # halved exactly: still converging
        (20.0, 39.9, True),  # not quite halved
    ],
)
def test_float32_phase_stops_at_the_floor_or_near_it_once_progress_stalls(g, g_prev, done):
    floor = 0.25  # exact in binary: 100 floor = 25
    got = _solvers.float32_phase_done(jnp.float32(g), jnp.float32(g_prev), jnp.float32(floor))
    assert bool(got) is done


def test_an_lbfgs_step_that_ends_above_the_state_value_is_a_stall():
    # at the rounding floor a step can end at or above f: the state is marked stalled (and the
    # solve stops) rather than taking an increase as progress. Simulated by a state whose value is
    # below the true f at its parameters: no step can get under it.
    X, y = problem()
    data, l2 = float64_data(X, y), np.float64(0.1)
    st0 = _solvers._lbfgs_init(zeros(5, 4), data, l2)
    st1 = _solvers._lbfgs_step(st0, data, l2)
    assert not bool(st1.stalled) and float(st1.value) < float(st0.value)
    low = st0._replace(value=st0.value - 1.0)
    st2 = _solvers._lbfgs_step(low, data, l2)
    assert float(st2.value) > float(low.value) and bool(st2.stalled)


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 10.0])
@pytest.mark.parametrize("intercept", [False, True])
def test_float32_floor_follows_the_largest_feature_scale(scale, intercept, layout):
    Z = np.zeros((8, 3), np.float32)
    Z[:, 1] = scale  # the largest column rms is `scale` (the largest row rms 0.65 scale)
    Z[:4, 2] = scale / 2
    rms = max(scale, 1.0) if intercept else scale  # the intercept's column of ones
    Zs = jnp.asarray(Z) if layout == "rows" else transposed(jnp.asarray(Z), jnp.float32)
    got = _solvers.float32_floor(Zs, 1e-12, intercept=intercept)
    assert got.dtype == jnp.float32
    assert float(got) == pytest.approx(_solvers.F32_TOL * rms, rel=1e-6)
    assert float(_solvers.float32_floor(Zs, 0.5, intercept=intercept)) == 0.5


def test_newton_cg_gets_one_float32_copy_of_float64_features_and_no_copy_of_float32_ones(
    monkeypatch,
):
    X, y = problem()
    p0 = zeros(5, 4)
    data64 = place(X, y, None, fit_intercept=True, dtype=np.float64, device=None)

    def copy(data, solver="newton-cg", mixed=True):
        return _solvers.with_hessian_operand(data, solver, p0, mixed)

    with_op = copy(data64._replace(Zh=None))
    assert not isinstance(with_op.Zh, Columns)  # fewer rows than COLUMNS_MIN_ROWS: row-major
    np.testing.assert_array_equal(with_op.Zh, np.asarray(data64.Z).astype(np.float32))
    # dense Newton steps (this problem is small) form the Hessian from Z: no copy, unless a
    # float32 phase runs on it
    assert _newton.dense_newton(p0, data64)
    assert copy(data64._replace(Zh=None), mixed=False).Zh is None
    monkeypatch.setattr(_newton, "DENSE_MAX_WORK", 0)
    assert copy(data64._replace(Zh=None), mixed=False).Zh is not None
    monkeypatch.setattr(_objective, "COLUMNS_MIN_ROWS", X.shape[0])
    with_op = copy(data64._replace(Zh=None))
    assert isinstance(with_op.Zh, Columns)  # transposed: (D, N)
    assert with_op.Zh.dtype == jnp.float32 and with_op.Zh.shape == X.shape
    np.testing.assert_array_equal(with_op.Zh.T, np.asarray(data64.Z).astype(np.float32).T)
    monkeypatch.setattr(_objective, "COLUMNS_MAX_CLASSES", 3)  # more classes: row-major again
    assert not isinstance(copy(data64._replace(Zh=None)).Zh, Columns)
    assert copy(data64._replace(Zh=None), "lbfgs").Zh is None
    data32 = place(X, y, None, fit_intercept=True, dtype=np.float32, device=None)
    assert copy(data32._replace(Zh=None)).Zh is None
    kept = data64._replace(Zh=jnp.ones((3, 3)))
    assert copy(kept) is kept


def test_mixed_precision_runs_its_first_iterations_in_float32():
    # one iteration of a mixed-precision float64 solve is a float32 Newton step: close to the
    # float64 step (float32 rounding, ~1e-7 relative) but not equal to it
    X, y = problem(n=400, d=6, k=5, seed=1)
    data = place(X, y, None, fit_intercept=True, dtype=np.float64, device=None,
                 hessian_dtype=np.float32)  # fmt: skip
    kw = dict(solver="newton-cg", l2=1e-3, tol=1e-9, max_iter=1)
    W32 = np.asarray(solve(data, zeros(6, 5), mixed_precision=True, **kw).params["W"])
    W64 = np.asarray(solve(data, zeros(6, 5), mixed_precision=False, **kw).params["W"])
    assert not np.array_equal(W32, W64)
    np.testing.assert_allclose(W32, W64, rtol=1e-4, atol=1e-6)
