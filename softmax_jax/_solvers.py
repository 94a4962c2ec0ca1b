"""Full-batch solvers of the training objective: truncated Newton-CG (``_newton``) and optax
L-BFGS, and their runs: to convergence, in mixed precision, one iteration at a time.

Each solver is ``init(params, data, l2) -> FBState`` and ``step(state, data, l2) -> FBState``; the
state always holds ``f`` and ``∇f`` at its parameters. :func:`solve` runs one to convergence in a
single compiled call; :func:`full_batch_epoch` runs one iteration (an "epoch" of :func:`fit`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from . import _compile_cache
from ._newton import (
    FBState,
    _newton_init,
    _newton_step,
    center_classes,
    dense_newton,
    init_state,
    newton_aux,
)
from ._objective import (
    Columns,
    Params,
    TrainData,
    hessian_copy,
    hessian_operand,
    mean_stats,
    objective,
    objective_vg,
    tree_max_abs,
)

# L-BFGS (optax, zoom line search) --------------------------------------------------------------
_LBFGS = optax.lbfgs()


def _lbfgs_init(params, data, l2) -> FBState:
    return init_state(params, data, l2, _LBFGS.init(params))


def _lbfgs_step(st: FBState, data: TrainData, l2, tol=0.0) -> FBState:
    """One optax L-BFGS iteration; its zoom line search differentiates :func:`objective`, whose
    gradient is the hand-written one, and hands back f and ∇f at the new point."""
    updates, aux = _LBFGS.update(
        st.grad,
        st.aux,
        st.params,
        value=st.value,
        grad=st.grad,
        value_fn=lambda p: objective(p, data, l2),
    )
    params = optax.apply_updates(st.params, updates)
    value = optax.tree.get(aux, "value")
    grad = optax.tree.get(aux, "grad")
    stalled = ~(value < st.value)
    return FBState(params, value, grad, aux, st.it + 1, stalled, st.n_inner)


SOLVERS = {"newton-cg": (_newton_init, _newton_step), "lbfgs": (_lbfgs_init, _lbfgs_step)}


class SolveResult(NamedTuple):
    """Result of :func:`solve`: parameters, objective, max |∇f|, iterations and a stop reason."""

    params: Params
    value: float
    grad_max: float
    n_iter: int
    converged: bool
    message: str
    n_inner: int


def _going_on(st: FBState, tol) -> jax.Array:
    """Whether a solve goes on from ``st`` (iterations aside): ``max|∇f| > tol``, not stalled, a
    finite ``f``."""
    return (tree_max_abs(st.grad) > tol) & ~st.stalled & jnp.isfinite(st.value)


def _run(st: FBState, data: TrainData, l2, tol, max_iter, step) -> FBState:
    def cond(st):
        return (st.it < max_iter) & _going_on(st, tol)

    return lax.while_loop(cond, lambda st: step(st, data, l2, tol), st)


#: The float32 phase of a mixed-precision solve stops at ``max|∇f| <= F32_TOL · rms(z)``: about
#: 10× above the rounding noise of a float32 gradient (a mean of ``z_i (ŷ_i − y_i)`` accumulated
#: in float32), which is where a Newton step's objective decrease is already far below 1e-6.
F32_TOL = 3e-5


def float32_floor(Z: jax.Array, tol, *, intercept: bool) -> jax.Array:
    """The float32 phase's target ``max(tol, F32_TOL · rms(z))``, in float32: ``rms(z)`` the largest
    root mean square of a column of ``Z``, at least 1 with an intercept (its feature is a column
    of ones)."""
    ms = Z.column_mean_squares() if isinstance(Z, Columns) else jnp.mean(Z * Z, axis=0)
    rms = jnp.sqrt(jnp.max(ms))
    if intercept:
        rms = jnp.maximum(rms, 1.0)
    return jnp.maximum(jnp.asarray(tol).astype(jnp.float32), F32_TOL * rms)


def float32_phase_done(g, g_prev, floor):
    """Whether the float32 phase stops at ``max|∇f| = g`` after ``g_prev``: at ``g <= floor``, or
    within 100× of it (``g <= 100 floor``) once an iteration no longer halves it (``g > g_prev / 2``:
    the rounding, not the model, then sets the gradient)."""
    return (g <= floor) | ((g <= 100 * floor) & (g > 0.5 * g_prev))


def _run_mixed(params, data: TrainData, l2, tol, max_iter) -> tuple[FBState, jax.Array]:
    """Newton-CG on float64 ``data`` whose first iterations evaluate ``f`` and ``∇f`` on the
    float32 copy of ``Z`` (``data.Zh``, the Hessian's operand: the only copy) until the
    gradient reaches float32's noise floor ``max(tol, F32_TOL·rms(z))``
    (:func:`float32_phase_done`), then in float64 down to ``tol``. One loop, one Newton step:
    only the evaluation of ``f`` differs between the phases (``lax.cond``), and so the compiled
    program holds one copy of the step. The float32 phase's iterates stay float64; its ``f`` is
    rounded to float32's ``ε``, the step's slack; where it ends (or at ``max_iter``) ``f`` and
    ``∇f`` are evaluated again in float64. Returns the state and the float32 phase's
    iterations."""
    f32, f64 = jnp.float32, params["W"].dtype
    Z = hessian_operand(data)
    data32 = TrainData(Z, data.y, None if data.s is None else data.s.astype(f32))
    floor = float32_floor(Z, tol, intercept="b" in params).astype(f64)
    l2_32 = l2.astype(f32)

    def vg32(p):
        value, g = objective_vg(jax.tree.map(lambda a: a.astype(f32), p), data32, l2_32)
        return value.astype(f64), jax.tree.map(lambda a: a.astype(f64), g)

    def vg64(p):
        return objective_vg(p, data, l2)

    start = center_classes(params)
    st = init_state(start, data, l2, newton_aux(f64), vg=vg32)

    def to64(st):  # a float32 phase that ended on a non-finite f: from the start again
        p = jax.tree.map(lambda a, b: jnp.where(jnp.isfinite(st.value), a, b), st.params, start)
        value, g = vg64(p)
        return st._replace(params=p, value=value, grad=g, stalled=jnp.bool_(False))

    def body(c):
        st, phase32, it32 = c
        # (st.aux[1]: max|∇f| where the last step started, newton_aux; ∞ before the first)
        end32 = phase32 & (
            float32_phase_done(tree_max_abs(st.grad), st.aux[1], floor)
            | st.stalled
            | ~jnp.isfinite(st.value)
            | (st.it >= max_iter)
        )
        st = lax.cond(end32, to64, lambda st: st, st)
        it32 = jnp.where(end32, st.it, it32)
        phase32 = phase32 & ~end32

        def step(st):
            vg = functools.partial(lax.cond, phase32, vg32, vg64)
            eps = jnp.where(phase32, jnp.finfo(f32).eps, jnp.finfo(f64).eps).astype(f64)
            return _newton_step(st, data, l2, jnp.where(phase32, floor, tol), vg=vg, eps=eps)

        go = (st.it < max_iter) & (phase32 | _going_on(st, tol))
        return lax.cond(go, step, lambda st: st, st), phase32, it32

    def cond(c):
        st, phase32, _ = c
        return phase32 | ((st.it < max_iter) & _going_on(st, tol))

    st, _, it32 = lax.while_loop(cond, body, (st, jnp.bool_(True), jnp.int32(0)))
    return st, it32


def with_hessian_operand(data: TrainData, solver: str, params: Params, mixed: bool) -> TrainData:
    """``data`` with Newton-CG's float32 Hessian operand: one cast of ``Z``, transposed on large
    problems (:func:`~softmax_jax._objective.hessian_copy`), inside the solve; unless it has one
    (``place(hessian_dtype=)``, the callers' way: made inside the solve, XLA keeps up to four
    copies of it), ``Z`` is float32 already (no copy: the products then use ``Z``), or the Newton
    steps are dense (:func:`dense_newton`: the Hessian matrix is formed from ``Z``) without a
    float32 phase."""
    if solver != "newton-cg" or data.Zh is not None or data.Z.dtype == jnp.float32:
        return data
    if dense_newton(params, data) and not mixed:
        return data
    if hasattr(data.Z, "vg_sum"):  # scipy.sparse rows (softmax_jax._sparse): a cast of the values
        return data._replace(Zh=data.Z.astype(jnp.float32))
    return data._replace(Zh=hessian_copy(data.Z, jnp.float32, params["W"].shape[1]))


def solver_compiler_options(xla_flags: str) -> dict:
    """XLA's options for the solver's program: LLVM's optimisation level 1 (XLA's default is 3),
    unless ``xla_flags`` (``$XLA_FLAGS``) sets a level. The solve's time is in its GEMMs, library
    calls that the level does not change; its fused kernels ran as fast at level 1, and the
    program compiles faster (bench/train.py, the cold first fit)."""
    if "xla_backend_optimization_level" in xla_flags:
        return {}
    return {"xla_backend_optimization_level": 1}


SOLVER_COMPILER_OPTIONS = solver_compiler_options(os.environ.get("XLA_FLAGS", ""))


@functools.partial(
    jax.jit, static_argnames=("solver", "mixed"), compiler_options=SOLVER_COMPILER_OPTIONS
)
def _solve_impl(params, data, l2, tol, max_iter, *, solver: str, mixed: bool = False):
    init, step = SOLVERS[solver]
    data = with_hessian_operand(data, solver, params, mixed)
    if mixed:
        st, _ = _run_mixed(params, data, l2, tol, max_iter)
    else:
        st = _run(init(params, data, l2), data, l2, tol, max_iter, step)
    return st._replace(aux=()), tree_max_abs(st.grad)


def solve(
    data: TrainData,
    params: Params,
    *,
    solver: str,
    l2: float,
    tol: float,
    max_iter: int,
    mixed_precision: bool = False,
) -> SolveResult:
    """Runs a full-batch solver to ``max|∇f| <= tol`` in one compiled call (no host round-trip).

    With ``mixed_precision`` (Newton-CG on float64 data) the iterations first run on a float32
    copy of ``Z`` (twice the GEMM rate) until float32's gradient noise floor, then continue in
    float64 from there: the stopping test, and so the result, are float64's. ``max_iter`` counts
    the iterations of both phases.
    """
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {sorted(SOLVERS)}, got {solver!r}")
    dt = data.Z.dtype
    mixed = bool(mixed_precision) and solver == "newton-cg" and dt == jnp.float64
    args = (
        params,
        data,
        np.asarray(l2, dt),  # NumPy scalars: no conversion programs to compile
        np.asarray(tol, dt),
        np.int32(max_iter),
    )
    program = _compile_cache.cached_program(_solve_impl, "solve", args, solver=solver, mixed=mixed)
    st, gmax = program(*args)
    gmax, value, it, stalled, n_inner = jax.device_get(
        (gmax, st.value, st.it, st.stalled, st.n_inner)
    )
    gmax, value, it = float(gmax), float(value), int(it)
    if not math.isfinite(value):
        msg = f"the objective became {value} at iteration {it}"
        converged = False
    elif gmax <= tol:
        msg, converged = f"converged: max|grad| = {gmax:.2e} <= tol = {tol:.1e}", True
    elif bool(stalled):
        msg = (
            f"stopped at iteration {it}: no further decrease at working precision "
            f"(max|grad| = {gmax:.2e}, tol = {tol:.1e})"
        )
        converged = False
    else:
        msg = f"max_iter = {max_iter} reached with max|grad| = {gmax:.2e} > tol = {tol:.1e}"
        converged = False
    return SolveResult(st.params, value, gmax, it, converged, msg, int(n_inner))


def older_checkpoint(solver: str, tree: dict) -> tuple[dict, Callable[[dict], dict]] | None:
    """For a checkpoint ``tree`` of :func:`softmax_jax.fit` (``{"state": FBState, ...}``) with
    ``solver``: the layout an earlier version wrote and the upgrade from it (``None``: no other
    layout). Newton-CG's ``aux`` was ``()`` before it held the forcing term's memory; restored
    from such a checkpoint, the forcing term starts afresh (``tree``'s, as at a first step)."""
    if solver != "newton-cg":
        return None
    aux = tree["state"].aux
    layout = {**tree, "state": tree["state"]._replace(aux=())}
    return layout, lambda t: {**t, "state": t["state"]._replace(aux=aux)}


#: Solvers that use the whole training set at every iteration (one iteration per "epoch").
FULL_BATCH_SOLVERS = tuple(SOLVERS)


@functools.partial(jax.jit, static_argnames=("solver",))
def full_batch_epoch(st: FBState, data: TrainData, l2, tol=0.0, *, solver: str):
    """One iteration of ``solver`` (an "epoch" of :func:`softmax_jax.fit`): the new state, the
    training accuracy at it and ``max|∇f|``."""
    st = SOLVERS[solver][1](st, data, l2, tol)
    _, accuracy = mean_stats(st.params, data)
    return st, accuracy, tree_max_abs(st.grad)
