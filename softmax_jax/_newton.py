"""Newton-CG, the default full-batch solver: one truncated-Newton step of the training objective
(the Newton system solved exactly on small problems, by preconditioned conjugate gradients
otherwise) and its line search; and ``FBState``, the state every full-batch solver carries
(``init(params, data, l2) -> FBState``, ``step(state, data, l2) -> FBState``, run by
``_solvers``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._objective import (
    Columns,
    Params,
    TrainData,
    centred_basis,
    hessian_diag,
    hessian_matrix,
    hessian_probs,
    hessian_vp,
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
    aux: Any  # the optax state (L-BFGS) or the forcing term's memory (Newton-CG: newton_aux)
    it: jax.Array
    stalled: jax.Array  # no decrease possible at working precision: stop
    n_inner: jax.Array  # Hessian-vector products (Newton-CG's CG; none in its dense steps)


def init_state(params, data, l2, aux, *, vg=None) -> FBState:
    """The state at ``params`` before a first iteration: ``f`` and ``∇f`` from ``vg(params)``
    (by default :func:`objective_vg` on ``data``), no iterations, products or stall yet."""
    value, grad = objective_vg(params, data, l2) if vg is None else vg(params)
    zero = jnp.zeros((), jnp.int32)
    return FBState(params, value, grad, aux, zero, jnp.zeros((), bool), zero)


_NEWTON_MAX_CG = 250
_NEWTON_MAX_LS = 40
#: Largest relative CG residual of a Newton step, and the first step's (Eisenstat and Walker's
#: ``η₀``): see :func:`forcing`.
_NEWTON_FORCING = 0.5
#: Eisenstat and Walker's choice 2: ``η = γ (max|∇f| / previous max|∇f|)^α``.
_EW_GAMMA = 0.9
_EW_ALPHA = 2
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


def newton_aux(dtype) -> tuple[jax.Array, jax.Array]:
    """Newton-CG's ``FBState.aux`` before its first step: ``(η, max|∇f|)`` of the previous step,
    ``(η₀, ∞)`` (:func:`forcing`)."""
    return jnp.asarray(_NEWTON_FORCING, dtype), jnp.asarray(jnp.inf, dtype)


def forcing(g_max, g_prev, eta_prev):
    """The relative CG residual ``η`` asked of a Newton step at ``max|∇f| = g_max``, the previous
    step having started at ``g_prev`` with ``eta_prev``: Eisenstat and Walker's choice 2,
    ``η = γ (g_max / g_prev)^α`` (``γ = 0.9``, ``α = 2``), raised to ``γ η_prev^α`` where that
    exceeds 0.1 (no sudden tightening), clipped to ``[_NEWTON_FORCING_MIN, _NEWTON_FORCING]``;
    ``_NEWTON_FORCING`` on the first step (``g_prev = ∞``). Loose while the gradient falls slowly
    (damped steps, which the line search cuts back whatever CG's accuracy), tight where it falls
    fast (the quadratic phase): superlinear convergence without solving damped steps finely."""
    eta = _EW_GAMMA * (g_max / g_prev) ** _EW_ALPHA
    guard = _EW_GAMMA * eta_prev**_EW_ALPHA
    eta = jnp.where(guard > 0.1, jnp.maximum(eta, guard), eta)
    eta = jnp.clip(eta, _NEWTON_FORCING_MIN, _NEWTON_FORCING)
    return jnp.where(jnp.isfinite(g_prev), eta, _NEWTON_FORCING).astype(g_max.dtype)


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
    return init_state(center_classes(params), data, l2, newton_aux(params["W"].dtype))


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
    ``‖r‖₁ ≤ η ‖∇f‖₁`` with ``η`` from :func:`forcing` (Eisenstat and Walker's, in ``[10⁻³, ½]``,
    remembered in ``st.aux``: superlinear convergence down to a rate of 10⁻³ per step), when
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
    g_max = tree_max_abs(g)
    eta_prev, g_prev = st.aux
    eta = forcing(g_max, g_prev, eta_prev)
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
    return FBState(new_params, v_t, g_t, (eta, g_max), st.it + 1, ~ok, st.n_inner + n_cg)


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
