"""Full-batch solvers of the training objective: truncated Newton-CG and optax L-BFGS.

Each solver is ``init(params, data, l2) -> FBState`` and ``step(state, data, l2) -> FBState``; the
state always holds ``f`` and ``∇f`` at its parameters. :func:`solve` runs one to convergence in a
single compiled call; :func:`full_batch_epoch` runs one iteration (an "epoch" of :func:`fit`).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from . import _compile_cache
from ._objective import (
    Columns,
    Params,
    TrainData,
    centred_basis,
    hessian_copy,
    hessian_diag,
    hessian_matrix,
    hessian_operand,
    hessian_probs,
    hessian_vp,
    mean_stats,
    objective,
    objective_vg,
    stack,
    tree_axpy,
    tree_l1,
    tree_max_abs,
    tree_vdot,
    unstack,
)


class FBState(NamedTuple):
    params: Params
    value: jax.Array
    grad: Params
    aux: Any  # the optax state (L-BFGS) or ()
    it: jax.Array
    stalled: jax.Array  # no decrease possible at working precision: stop
    n_inner: jax.Array  # Hessian-vector products (Newton-CG's CG; none in its dense steps)


def init_state(params, data, l2, aux) -> FBState:
    value, grad = objective_vg(params, data, l2)
    zero = jnp.zeros((), jnp.int32)
    return FBState(params, value, grad, aux, zero, jnp.zeros((), bool), zero)


# Newton-CG -----------------------------------------------------------------------------------
_NEWTON_MAX_CG = 250
_NEWTON_MAX_LS = 40
#: Largest relative CG residual of a Newton step. scipy's newton-cg allows ½ (with ``√‖∇f‖₁``,
#: which stays above ½ until late); 0.1 with ``√max|∇f|`` takes fewer Newton iterations from a
#: zero start for a few more products each (bench/train.py).
_NEWTON_FORCING = 0.1
#: Smallest relative CG residual asked for: the Hessian products are float32, and a tighter
#: residual than they resolve would only run CG to its iteration cap.
_NEWTON_FORCING_MIN = 1e-3
#: CG also stops once ``max|r| <= TOL_MARGIN · tol``: the gradient after the step is about the
#: CG residual ``r``, so the last Newton step lands just inside ``tol`` instead of far past it.
TOL_MARGIN = 0.25
#: Newton steps on problems where forming ``∇²f`` as a matrix (:func:`hessian_matrix`, ``N p²``
#: multiply-adds for ``p = (D + 1) K`` parameters) costs at most this much solve ``∇²f d = −∇f``
#: exactly: a few small GEMMs and one factorisation in place of tens to hundreds of CG
#: iterations, each a handful of tiny kernels in a compiled loop (the folds of a GridSearchCV).
DENSE_MAX_WORK = 1 << 26
DENSE_MAX_PARAMS = 1024


def dense_newton_size(n: int, d: int, k: int, intercept: bool) -> bool:
    """Whether Newton's steps on ``n`` rows of ``d`` dense features and ``k`` classes solve with
    the Hessian matrix: ``p = (d + intercept) k <=`` :data:`DENSE_MAX_PARAMS` and
    ``n p² <=`` :data:`DENSE_MAX_WORK`."""
    p = (d + bool(intercept)) * k
    return p <= DENSE_MAX_PARAMS and n * p * p <= DENSE_MAX_WORK


def wants_hessian_copy(
    solver: str, n: int, d: int, k: int, intercept: bool, *, sparse: bool, mixed: bool
) -> bool:
    """Whether Newton-CG's Hessian products get their own float32 copy of ``Z`` (``place``'s
    ``hessian_dtype``): not where its steps are dense (the Hessian matrix is formed from ``Z``)
    without a float32 phase (``mixed``, which runs on that copy)."""
    if solver != "newton-cg":
        return False
    return sparse or mixed or not dense_newton_size(n, d, k, intercept)


def dense_newton(params: Params, data: TrainData) -> bool:
    """Whether Newton's steps on ``data`` solve with the Hessian matrix (static: by shape;
    :func:`dense_newton_size`)."""
    Z = data.Z
    if not isinstance(Z, (jax.Array, Columns)):  # scipy.sparse or streamed rows
        return False
    return dense_newton_size(Z.shape[0], *params["W"].shape, "b" in params)


def _dense_direction(H: jax.Array, g: Params) -> Params:
    """``d = −(∇²f)⁻¹ ∇f`` on the centred subspace, ``H`` = :func:`hessian_matrix` (over ``V``,
    ``[W; b] = V Bᵀ``): ``d = D Bᵀ`` with ``H vec(D) = −vec(∇f B)``, centred by construction. A
    coordinate without curvature (a zero feature column without a penalty, whose gradient is 0
    too) gets a unit diagonal: its step is 0."""
    G = stack(g)
    rows, k = G.shape
    B = centred_basis(k, H.dtype)
    regular = H + jnp.diag(jnp.where(jnp.diag(H) > 0, 0.0, 1.0).astype(H.dtype))
    dv = jnp.linalg.solve(regular, -(G.astype(H.dtype) @ B).reshape(-1))
    return unstack((dv.reshape(rows, k - 1) @ B.T).astype(G.dtype), g)


def _dense_diagonal(H: jax.Array, g: Params) -> Params:
    """The diagonal of ``∇²f`` over ``[W; b]`` on the centred subspace, ``(I ⊗ B) H (I ⊗ B)ᵀ``, from
    :func:`hessian_matrix`'s ``H``, shaped like ``g``."""
    rows, k = stack(g).shape
    B = centred_basis(k, H.dtype)
    blocks = jnp.einsum("ajal->ajl", H.reshape(rows, k - 1, rows, k - 1))
    return unstack(jnp.einsum("kj,ajl,kl->ak", B, blocks, B).astype(g["W"].dtype), g)


def center_classes(t: Params) -> Params:
    """Each leaf minus its mean over the class axis (the last): the projection onto the
    directions that change the model (softmax is shift-invariant along ``W + v 1ᵀ``, ``b + c 1``)."""
    return jax.tree.map(lambda a: a - jnp.mean(a, axis=-1, keepdims=True), t)


def forcing(g_max):
    """The relative CG residual ``η`` asked of a Newton step at ``max|∇f| = g_max``: ``√g_max``
    clipped to ``[_NEWTON_FORCING_MIN, _NEWTON_FORCING]``."""
    return jnp.clip(jnp.sqrt(g_max), _NEWTON_FORCING_MIN, _NEWTON_FORCING)


def backtrack(t, v_t, value, slope):
    """The next trial step of a backtracking line search after ``f(t) = v_t`` was refused: the
    minimiser ``−f'(0) t² / 2 (f(t) − f(0) − f'(0) t)`` of the quadratic through ``f(0) = value``,
    ``f'(0) = slope < 0`` and ``f(t)``, safeguarded to ``[0.1 t, 0.5 t]``; ``0.5 t`` where that
    quadratic has no minimum (``f(t)`` on or below the tangent), ``0.1 t`` where ``f(t)`` is not
    finite. After a refused Armijo test the minimiser is below ``t / 2(1 − 10⁻⁴)``, so the upper
    clip binds only within ``10⁻⁴`` of it."""
    denom = 2 * (v_t - value - slope * t)
    t_q = -slope * t * t / jnp.maximum(denom, 0.0)  # no minimum (denom <= 0): +inf, clipped
    return jnp.where(jnp.isfinite(v_t), jnp.clip(t_q, 0.1 * t, 0.5 * t), 0.1 * t)


def _newton_init(params, data, l2) -> FBState:
    """The state at ``params`` centred over the classes (the same model, the smallest penalty):
    the subspace Newton-CG's steps stay in (:func:`_newton_step`)."""
    return init_state(center_classes(params), data, l2, ())


def _newton_step(st: FBState, data: TrainData, l2, tol=0.0, *, vg=None, eps=None) -> FBState:
    r"""One truncated-Newton iteration on ``f``, ``vg(params) -> (f, ∇f)`` (by default
    :func:`objective_vg` on ``data``; a mixed-precision solve passes its phase's), whose values
    are rounded to a relative ``eps`` (by default the machine epsilon of ``st.value``'s dtype).

    On problems small enough (:func:`dense_newton`) the Newton system is solved exactly with the
    Hessian as a matrix (:func:`_dense_direction`); otherwise by preconditioned conjugate
    gradients (Jacobi: the diagonal of the Hessian, followed by :func:`center_classes`) on ``(∇²f) d = −∇f`` with products from the analytic HVP. ``∇f`` and
    ``∇²f V`` have class sums of zero (rows of ``Ŷ − Y`` sum to zero, and so do those of the HVP's
    residual), so with the centred preconditioner every CG iterate, and so ``d``, stays in that
    subspace: the iterates keep ``Σ_k w_k = 0`` and ``Σ_k b_k = 0`` (where the penalised optimum
    lies, and the only identifiable solution without a penalty). Stopped when
    ``‖r‖₁ ≤ η ‖∇f‖₁`` with ``η = √max|∇f|`` clipped to ``[10⁻³, 0.1]`` (a forcing sequence
    that shrinks with the gradient: superlinear convergence down to a rate of 10⁻³ per step), when
    ``max|r| ≤`` :data:`TOL_MARGIN` ``· tol`` (the step then reaches ``tol``: no solve past what
    was asked), or on non-positive curvature (then the last CG iterate, or −∇f on the first
    iteration); then :func:`_newton_search`, a backtracking Armijo line search from the Newton
    step ``t = 1`` (shortened to move no coordinate by more than ``max(1, max|params|)``), which
    goes on along ``−∇f / max diag(∇²f)`` if half its trials fail by more than the rounding of
    ``f`` (a preconditioner made extreme by saturated rows). Near the optimum the decrease can fall
    below the rounding of ``f``: an increase up to ``16 ε |f|`` is accepted, and a search that
    fails altogether marks the state ``stalled``.
    """
    params, value, g = st.params, st.value, st.grad
    dtype = value.dtype
    eps = jnp.finfo(dtype).eps if eps is None else eps
    if vg is None:
        vg = functools.partial(objective_vg, data=data, l2=l2)
    gnorm1 = tree_l1(g)
    eta = forcing(tree_max_abs(g))
    cg_tol = eta * gnorm1
    r_tol = TOL_MARGIN * tol
    dense = dense_newton(params, data)
    if dense:  # the Hessian as a matrix (small problems): its diagonal is the preconditioner's
        H = hessian_matrix(params, data, l2)
        diag = _dense_diagonal(H, g)
    else:
        P = hessian_probs(params, data)  # shared by the preconditioner and every CG product
        diag = hessian_diag(params, data, l2, probs=P)
    tiny = jnp.finfo(dtype).tiny
    h_max = jnp.max(jnp.asarray([jnp.max(h) for h in jax.tree.leaves(diag)]))

    def precond(r):
        return center_classes(jax.tree.map(lambda a, h: a / jnp.maximum(h, tiny), r, diag))

    r0 = center_classes(jax.tree.map(jnp.negative, g))  # centred already, up to rounding
    z0 = precond(r0)

    def cg_cond(c):
        _, r, _, _, _, i, done = c
        return (~done) & (i < _NEWTON_MAX_CG) & (tree_l1(r) > cg_tol) & (tree_max_abs(r) > r_tol)

    def cg_body(c):
        x, r, z, p, rz, i, _ = c
        # the float32 products' rounding has class sums the centred preconditioner cannot
        # remove: projected, the residual stays in the subspace and CG does not stagnate
        Hp = center_classes(hessian_vp(params, p, data, l2, probs=P))
        curv = tree_vdot(p, Hp)
        neg = curv <= eps * tree_vdot(p, p) * h_max
        alpha = rz / jnp.where(neg, 1.0, curv)
        x_new = tree_axpy(alpha, p, x)
        r_new = tree_axpy(-alpha, Hp, r)
        z_new = precond(r_new)
        rz_new = tree_vdot(r_new, z_new)
        p_new = tree_axpy(rz_new / rz, p, z_new)
        x = jax.tree.map(lambda a, b: jnp.where(neg, a, b), x, x_new)  # (0 on iteration 0)
        return x, r_new, z_new, p_new, rz_new, i + 1, neg

    if dense:
        d, n_cg = _dense_direction(H, g), jnp.int32(0)
    else:
        rz0 = tree_vdot(r0, z0)
        zeros = jax.tree.map(jnp.zeros_like, g)
        init = (zeros, r0, z0, z0, rz0, jnp.int32(0), jnp.bool_(False))
        d, *_, n_cg, _ = lax.while_loop(cg_cond, cg_body, init)
    # not a descent direction (d = 0 after non-positive curvature on iteration 0): M⁻¹(−∇f)
    d = jax.tree.map(lambda a, b: jnp.where(tree_vdot(g, d) < 0, a, b), d, z0)
    # steepest descent scaled by the largest curvature: where the search along d fails half its
    # trials (a preconditioner made extreme by saturated rows), it goes on along this direction
    sd = jax.tree.map(lambda a: -a / h_max, g)
    ok, new_params, v_t, g_t = _newton_search(params, value, g, d, sd, vg, eps)
    return FBState(new_params, v_t, g_t, (), st.it + 1, ~ok, st.n_inner + n_cg)


def _newton_search(params, value, g, d, sd, vg, eps):
    """The line search of :func:`_newton_step` along ``d``: ``(ok, params + t d, f, ∇f)`` at the
    accepted step ``t``, or ``(False, params, f, ∇f)`` where none was found (``vg`` and ``eps``
    as there).

    The first trial is ``t = 1``, shortened where it would move a coordinate by more than
    ``max(1, max|params|)`` (saturated rows give the Hessian directions of almost no curvature,
    along which Newton's step is astronomically long); then backtracking (:func:`backtrack`)
    until Armijo's test ``f(t) <= f(0) + 10⁻⁴ t ∇f·d`` holds, where an increase up to
    ``16 eps |f|`` (the rounding of ``f``) is accepted. Where half the trials fail by more than the
    rounding of ``f``, the search starts again along ``sd`` (steepest descent)."""
    dtype = value.dtype
    slack = 16 * eps * jnp.abs(value)
    radius = jnp.maximum(1.0, tree_max_abs(params))

    def first(d):
        return jnp.minimum(1.0, radius / jnp.maximum(tree_max_abs(d), jnp.finfo(dtype).tiny))

    sd_t, sd_slope = first(sd), tree_vdot(g, sd)  # the restart along sd (loop invariants)

    def body(c):
        t, v_prev, _, _, j, d, slope = c
        # (not at the rounding floor, where a refused trial is within the slack of f)
        switch = (j == _NEWTON_MAX_LS // 2) & ~(v_prev - value <= slack)
        t = jnp.where(switch, sd_t, t)
        d = jax.tree.map(lambda a, b: jnp.where(switch, a, b), sd, d)
        slope = jnp.where(switch, sd_slope, slope)
        v_t, g_t = vg(tree_axpy(t, d, params))
        ok = jnp.isfinite(v_t) & (v_t <= value + 1e-4 * t * slope + slack)
        t = jnp.where(ok, t, backtrack(t, v_t, value, slope))
        return t, v_t, g_t, ok, j + 1, d, slope

    init = (first(d), value, g, jnp.bool_(False), jnp.int32(0), d, tree_vdot(g, d))
    t, v_t, g_t, ok, _, d, _ = lax.while_loop(lambda c: ~c[3] & (c[4] < _NEWTON_MAX_LS), body, init)
    moved = jax.tree.map(lambda p, u: jnp.where(ok, p + t * u, p), params, d)
    g_new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), g_t, g)
    return ok, moved, jnp.where(ok, v_t, value), g_new


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


def _run(st: FBState, data: TrainData, l2, tol, max_iter, step) -> FBState:
    def cond(st):
        return (
            (st.it < max_iter)
            & (tree_max_abs(st.grad) > tol)
            & (~st.stalled)
            & jnp.isfinite(st.value)
        )

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
    st = FBState(start, *vg32(start), (), jnp.int32(0), jnp.bool_(False), jnp.int32(0))

    def to64(st):  # a float32 phase that ended on a non-finite f: from the start again
        p = jax.tree.map(lambda a, b: jnp.where(jnp.isfinite(st.value), a, b), st.params, start)
        value, g = vg64(p)
        return st._replace(params=p, value=value, grad=g, stalled=jnp.bool_(False))

    def running64(st):
        return (tree_max_abs(st.grad) > tol) & ~st.stalled & jnp.isfinite(st.value)

    def body(c):
        st, phase32, g_prev, it32 = c
        g_max = tree_max_abs(st.grad)
        end32 = phase32 & (
            float32_phase_done(g_max, g_prev, floor)
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

        go = (st.it < max_iter) & (phase32 | running64(st))
        return lax.cond(go, step, lambda st: st, st), phase32, g_max, it32

    def cond(c):
        st, phase32, _, _ = c
        return phase32 | ((st.it < max_iter) & running64(st))

    init = (st, jnp.bool_(True), jnp.asarray(jnp.inf, f64), jnp.int32(0))
    st, _, _, it32 = lax.while_loop(cond, body, init)
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
    program (both phases of a mixed-precision solve) compiles faster (bench/train.py, cold first
    fit)."""
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


#: Solvers that use the whole training set at every iteration (one iteration per "epoch").
FULL_BATCH_SOLVERS = tuple(SOLVERS)


@functools.partial(jax.jit, static_argnames=("solver",))
def full_batch_epoch(st: FBState, data: TrainData, l2, tol=0.0, *, solver: str):
    """One iteration of ``solver`` (an "epoch" of :func:`softmax_jax.fit`): the new state, the
    training accuracy at it and ``max|∇f|``."""
    st = SOLVERS[solver][1](st, data, l2, tol)
    _, accuracy = mean_stats(st.params, data)
    return st, accuracy, tree_max_abs(st.grad)
