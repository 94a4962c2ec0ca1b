r"""Training: the optax minibatch loop :func:`fit` and the full-batch solvers (L-BFGS, Newton-CG).

The objective, for parameters ``W`` (D, K) and ``b`` (K,) and per-sample weights ``s_i`` (all ones
by default), is the weighted *mean* of eq. (2) plus an L2 penalty on ``W`` (never on ``b``):

.. math::

    f(W, b) = \frac{\sum_i s_i\, \ell_i(W, b)}{\sum_i s_i} + \frac{\lambda}{2} \|W\|_F^2,
    \qquad \ell_i = \log \sum_k e^{a_{ik}} - a_{i y_i}, \quad a_i = z_i W + b.

The mean makes learning rates independent of ``N``; scikit-learn's ``C`` is ``λ = 1 / (C Σ s_i)``
(see :class:`softmax_jax.SoftmaxRegression`). Every gradient is the hand-written eq. (6),
assembled from the core's pieces with a bias (:func:`_vg_sum`): ``∂f/∂W = Zᵀ M`` and
``∂f/∂b = Σ_i c_i (ŷ_i − y_i)``, the column sums of the same residual ``M``. The Hessian-vector
products of Newton-CG are :func:`softmax_jax.hvp`'s analytic formula on ``Z`` augmented with a
column of ones (``[W; b]`` is then a ``(D+1, K)`` weight matrix of eq. (2)). No autodiff anywhere.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import ArrayLike

from ._grad import _dW, _hvp_impl, _residual
from ._loss import logits, logsumexp_rows, mean_scale, reduce_losses, target_term
from ._parallel import DataParallel, data_parallel, pad_batches
from ._validate import check_training_data, compute_dtype

__all__ = ["FULL_BATCH_SOLVERS", "OPTIMIZERS", "TrainingDiverged", "fit", "make_optimizer"]

Params = dict[str, jax.Array]
History = dict[str, list]

# name -> (factory(learning_rate) -> GradientTransformation, default learning rate)
OPTIMIZERS: dict[str, tuple[Callable[[Any], optax.GradientTransformation], float]] = {
    "sgd": (optax.sgd, 0.1),
    "momentum": (lambda lr: optax.sgd(lr, momentum=0.9), 0.05),
    "nesterov": (lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True), 0.05),
    "adam": (optax.adam, 1e-2),
    "adamw": (optax.adamw, 1e-2),
    "nadam": (optax.nadam, 1e-2),
    "adabelief": (optax.adabelief, 1e-2),
    "adagrad": (optax.adagrad, 0.1),
    "rmsprop": (optax.rmsprop, 1e-3),
    "lion": (optax.lion, 1e-3),
}
#: Solvers that use the whole training set at every iteration (one iteration per "epoch").
FULL_BATCH_SOLVERS = ("lbfgs", "newton-cg")
DEFAULT_BATCH_SIZE = 256


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite.

    Attributes:
      epoch: the epoch (1-based) whose loss was not finite.
      params: the parameters after the last good epoch (the initial ones if it was the first).
      history: the metrics of the good epochs.
    """

    def __init__(self, message: str, *, epoch: int, params: Params, history: History):
        super().__init__(message)
        self.epoch = epoch
        self.params = params
        self.history = history


# ---------------------------------------------------------------------------------------------
# The objective and its derivatives, all from the core's hand-written eq. (6) and HVP.


class _Data(NamedTuple):
    """Training data on device.

    Attributes:
      Z: features ``(N, D)`` in the compute dtype.
      y: integer labels ``(N,)``.
      s: optional sample weights ``(N,)``.
      Zh: Newton-CG only: ``Z`` with a column of ones appended when there is a bias
        (``(N, D+1)``), in float32: the operand of the Hessian products (:func:`_hessian_vp`).
      Zsq: Newton-CG only: ``Zh ⊙ Zh``, for the Jacobi preconditioner (:func:`_hessian_diag`).
    """

    Z: jax.Array
    y: jax.Array
    s: jax.Array | None
    Zh: jax.Array | None = None
    Zsq: jax.Array | None = None


def _stack(params: Params) -> jax.Array:
    """``[W; b]`` (D+1, K), or ``W`` without a bias: the weights of the augmented eq. (2)."""
    if "b" in params:
        return jnp.concatenate([params["W"], params["b"][None, :].astype(params["W"].dtype)], 0)
    return params["W"]


def _unstack(G: jax.Array, like: Params) -> Params:
    if "b" in like:
        return {"W": G[:-1], "b": G[-1]}
    return {"W": G}


def _vg_sum(params: Params, Z: jax.Array, y: jax.Array, s: jax.Array | None):
    r"""Eq. (2) summed over the rows of ``Z`` (weights ``s``) and its hand-written gradient.

    The core's eq. (6) with a bias: logits ``A = Z W + b``, ``M = diag(s)(Ŷ − Y)``,
    ``∂/∂W = Zᵀ M`` and ``∂/∂b = Σ_i M_i`` (the column sums of ``M``), assembled from the pieces
    of :func:`softmax_jax.value_and_grad` (``logits``, ``logsumexp_rows``, ``_residual``, ``_dW``)
    so that no ones column has to be appended to ``Z``. Also returns the logits ``A`` (N, K).
    """
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
#: ``Z`` is still in cache for the second GEMM of eq. (6) (about 15-25% faster at N = 200k).
CHUNK_ROWS = 4096


def chunk_rows(n: int) -> int | None:
    """The chunk size for a pass over ``n`` rows, or ``None`` for a single pass."""
    return CHUNK_ROWS if n >= 4 * CHUNK_ROWS else None


def _data_vg(params: Params, data: _Data) -> tuple[jax.Array, Params]:
    """Weighted mean of eq. (2) over ``data`` and its hand-written gradient, in chunks of
    :data:`CHUNK_ROWS` rows (a loop over the whole chunks, then the remainder) for large N."""
    n = data.Z.shape[0]
    dt = params["W"].dtype
    c = chunk_rows(n)
    if c is None:
        value, g, _ = _vg_sum(params, data.Z, data.y, data.s)
    else:

        def body(i, acc):
            def cut(x):
                return None if x is None else lax.dynamic_slice_in_dim(x, i * c, c)

            v, g, _ = _vg_sum(params, cut(data.Z), cut(data.y), cut(data.s))
            return acc[0] + v, jax.tree.map(jnp.add, acc[1], g)

        full = n // c
        zero = (jnp.zeros((), dt), jax.tree.map(jnp.zeros_like, params))
        value, g = lax.fori_loop(0, full, body, zero)
        if n > full * c:
            tail = slice(full * c, n)
            s_tail = None if data.s is None else data.s[tail]
            v, g_tail, _ = _vg_sum(params, data.Z[tail], data.y[tail], s_tail)
            value, g = value + v, jax.tree.map(jnp.add, g, g_tail)
    total = jnp.asarray(n, dt) if data.s is None else jnp.sum(data.s.astype(dt))
    total = jnp.where(total > 0, total, 1)
    return value / total, jax.tree.map(lambda x: x / total, g)


def _objective_vg(params: Params, data: _Data, l2) -> tuple[jax.Array, Params]:
    """``f`` and ``∇f``: the weighted mean of eq. (2) with its hand-written gradient (eq. (6)),
    plus the L2 term on ``W``."""
    W = params["W"]
    value, g = _data_vg(params, data)
    g = {**g, "W": g["W"] + l2 * W}
    return value + 0.5 * l2 * jnp.vdot(W, W), g


@jax.custom_vjp
def _objective(params: Params, data: _Data, l2) -> jax.Array:
    """``f`` as a differentiable function whose gradient is the hand-written one (for optax's
    line search, which calls ``jax.value_and_grad`` on it)."""
    return _objective_vg(params, data, l2)[0]


def _objective_fwd(params, data, l2):
    return _objective_vg(params, data, l2)


def _objective_bwd(g, ct):
    return jax.tree.map(lambda x: ct * x, g), None, None


_objective.defvjp(_objective_fwd, _objective_bwd)


def _hessian_vp(params: Params, V: Params, data: _Data, l2) -> Params:
    """``∇²f · V`` with the analytic HVP of eq. (2) (:func:`softmax_jax.hvp`) plus ``λ V_W``.

    The bias enters through the ones column of ``data.Zh``. The product runs in float32
    (``data.Zh``) at half the memory traffic of float64: it only steers Newton's direction, which
    conjugate gradients solve to a relative accuracy far coarser than float32's; the gradient, the
    objective and so the optimum stay in ``Z``'s dtype.
    """
    Zh = data.Zh
    dt = params["W"].dtype
    W1, V1 = _stack(params).astype(Zh.dtype), _stack(V).astype(Zh.dtype)
    H = _hvp_impl(W1, Zh, V1, data.s, reduction="mean").astype(dt)
    hv = _unstack(H, params)
    hv["W"] = hv["W"] + l2 * V["W"]
    return hv


def _predict_stats(params: Params, data: _Data) -> tuple[jax.Array, jax.Array]:
    """``(Σ s_i ℓ_i, Σ s_i [argmax a_i = y_i])`` without the penalty."""
    A = logits(params["W"], data.Z)
    if "b" in params:
        A = A + params["b"].astype(A.dtype)
    lse, _, _ = logsumexp_rows(A)
    per = lse - target_term(A, data.y, True)
    correct = (jnp.argmax(A, axis=1) == data.y).astype(A.dtype)
    s = jnp.ones_like(per) if data.s is None else data.s.astype(per.dtype)
    return jnp.sum(s * per), jnp.sum(s * correct)


@jax.jit
def _evaluate(params: Params, data: _Data) -> tuple[jax.Array, jax.Array]:
    """Weighted mean NLL and accuracy on ``data``."""
    nll, correct = _predict_stats(params, data)
    total = data.y.shape[0] if data.s is None else jnp.sum(data.s)
    return nll / total, correct / total


def _tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _tree_axpy(alpha, x, y):
    return jax.tree.map(lambda u, v: alpha * u + v, x, y)


def _tree_max_abs(t) -> jax.Array:
    return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(t)])


def _tree_l1(t) -> jax.Array:
    return sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t))


# ---------------------------------------------------------------------------------------------
# Full-batch solvers. Each is ``init(params, data, l2) -> _FBState`` and
# ``step(state, data, l2) -> _FBState``; the state always holds f and ∇f at its params.


class _FBState(NamedTuple):
    params: Params
    value: jax.Array
    grad: Params
    aux: Any  # the optax state (L-BFGS) or ()
    it: jax.Array
    stalled: jax.Array  # no decrease possible at working precision: stop
    n_inner: jax.Array  # Hessian-vector products (Newton-CG)


def _init_state(params, data, l2, aux) -> _FBState:
    value, grad = _objective_vg(params, data, l2)
    zero = jnp.zeros((), jnp.int32)
    return _FBState(params, value, grad, aux, zero, jnp.zeros((), bool), zero)


# Newton-CG -----------------------------------------------------------------------------------
_NEWTON_MAX_CG = 250
_NEWTON_MAX_LS = 40


def _newton_init(params, data, l2) -> _FBState:
    return _init_state(params, data, l2, ())


def _hessian_diag(params: Params, data: _Data, l2) -> Params:
    r"""The diagonal of ``∇²f``: ``Σ_i c_i z_{id}^2 ŷ_{ik}(1 − ŷ_{ik}) + λ [d is a W row]``, two
    GEMMs (the logits and ``(Z⊙Z)ᵀ M``, with ``Z⊙Z`` computed once); the Jacobi preconditioner of
    Newton-CG, in the precision of the Hessian products."""
    Zh = data.Zh
    W1 = _stack(params).astype(Zh.dtype)
    _, E, S = logsumexp_rows(logits(W1, Zh))
    P = E / S
    c = mean_scale(data.s, P.shape[0], P.dtype, "mean")
    D1 = _dW(data.Zsq, P * (1 - P) * c[:, None], params["W"].dtype)
    diag = _unstack(D1, params)
    diag["W"] = diag["W"] + l2
    return diag


def _newton_step(st: _FBState, data: _Data, l2) -> _FBState:
    r"""One truncated-Newton iteration.

    Preconditioned conjugate gradients (Jacobi: the diagonal of the Hessian) on
    ``(∇²f) d = −∇f`` with products from the analytic HVP, stopped when
    ``‖r‖₁ ≤ min(½, √‖∇f‖₁) ‖∇f‖₁`` (the forcing sequence of scipy's newton-cg: superlinear
    convergence) or on non-positive curvature (then the last CG iterate, or −∇f on the first
    iteration); then a backtracking Armijo line search from the Newton step ``t = 1``. Near the
    optimum the decrease can fall below the rounding of ``f``: an increase up to ``16 ε |f|`` is
    accepted, and a search that fails altogether marks the state ``stalled``.
    """
    params, value, g = st.params, st.value, st.grad
    dtype = value.dtype
    gnorm1 = _tree_l1(g)
    cg_tol = jnp.minimum(0.5, jnp.sqrt(gnorm1)) * gnorm1
    diag = _hessian_diag(params, data, l2)
    tiny = jnp.finfo(dtype).tiny

    def precond(r):
        return jax.tree.map(lambda a, h: a / jnp.maximum(h, tiny), r, diag)

    zeros = jax.tree.map(jnp.zeros_like, g)
    r0 = jax.tree.map(jnp.negative, g)
    z0 = precond(r0)

    def cg_cond(c):
        _, r, _, _, _, i, done = c
        return (~done) & (i < _NEWTON_MAX_CG) & (_tree_l1(r) > cg_tol)

    def cg_body(c):
        x, r, z, p, rz, i, _ = c
        Hp = _hessian_vp(params, p, data, l2)
        curv = _tree_vdot(p, Hp)
        neg = curv <= jnp.finfo(dtype).eps * _tree_vdot(p, p) * jnp.max(
            jnp.asarray([jnp.max(h) for h in jax.tree.leaves(diag)])
        )
        alpha = rz / jnp.where(neg, 1.0, curv)
        x_new = _tree_axpy(alpha, p, x)
        r_new = _tree_axpy(-alpha, Hp, r)
        z_new = precond(r_new)
        rz_new = _tree_vdot(r_new, z_new)
        p_new = _tree_axpy(rz_new / rz, p, z_new)
        keep = jax.tree.map(lambda a, b: jnp.where(i == 0, a, b), z0, x)  # on iteration 0
        x = jax.tree.map(lambda a, b: jnp.where(neg, a, b), keep, x_new)
        return x, r_new, z_new, p_new, rz_new, i + 1, neg

    rz0 = _tree_vdot(r0, z0)
    init = (zeros, r0, z0, z0, rz0, jnp.int32(0), jnp.bool_(False))
    d, *_, n_cg, _ = lax.while_loop(cg_cond, cg_body, init)
    slope = _tree_vdot(g, d)
    d = jax.tree.map(lambda a, b: jnp.where(slope < 0, a, b), d, z0)
    slope = jnp.where(slope < 0, slope, -rz0)
    slack = 16 * jnp.finfo(dtype).eps * jnp.abs(value)

    def ls_cond(c):
        _, _, _, ok, j = c
        return (~ok) & (j < _NEWTON_MAX_LS)

    def ls_body(c):
        t, _, _, _, j = c
        trial = _tree_axpy(t, d, params)
        v_t, g_t = _objective_vg(trial, data, l2)
        ok = jnp.isfinite(v_t) & (v_t <= value + 1e-4 * t * slope + slack)
        # quadratic interpolation of f along d, safeguarded to [0.1 t, 0.5 t]
        denom = 2 * (v_t - value - slope * t)
        t_q = jnp.where(denom > 0, -slope * t * t / jnp.where(denom > 0, denom, 1.0), 0.5 * t)
        t_next = jnp.where(jnp.isfinite(v_t), jnp.clip(t_q, 0.1 * t, 0.5 * t), 0.1 * t)
        return jnp.where(ok, t, t_next), v_t, g_t, ok, j + 1

    t0 = jnp.ones((), dtype)
    t, v_t, g_t, ok, _ = lax.while_loop(
        ls_cond, ls_body, (t0, value, g, jnp.bool_(False), jnp.int32(0))
    )
    new_params = jax.tree.map(lambda p, u: jnp.where(ok, p + t * u, p), params, d)
    return _FBState(
        new_params,
        jnp.where(ok, v_t, value),
        jax.tree.map(lambda a, b: jnp.where(ok, a, b), g_t, g),
        (),
        st.it + 1,
        ~ok,
        st.n_inner + n_cg,
    )


# L-BFGS (optax, zoom line search) --------------------------------------------------------------
_LBFGS = optax.lbfgs()


def _lbfgs_init(params, data, l2) -> _FBState:
    return _init_state(params, data, l2, _LBFGS.init(params))


def _lbfgs_step(st: _FBState, data: _Data, l2) -> _FBState:
    """One optax L-BFGS iteration; its zoom line search differentiates :func:`_objective`, whose
    gradient is the hand-written one, and hands back f and ∇f at the new point."""
    updates, aux = _LBFGS.update(
        st.grad,
        st.aux,
        st.params,
        value=st.value,
        grad=st.grad,
        value_fn=lambda p: _objective(p, data, l2),
    )
    params = optax.apply_updates(st.params, updates)
    value = optax.tree.get(aux, "value")
    grad = optax.tree.get(aux, "grad")
    stalled = ~(value < st.value)
    return _FBState(params, value, grad, aux, st.it + 1, stalled, st.n_inner)


_SOLVERS = {"newton-cg": (_newton_init, _newton_step), "lbfgs": (_lbfgs_init, _lbfgs_step)}


class SolveResult(NamedTuple):
    """Result of :func:`solve`: parameters, objective, max |∇f|, iterations and a stop reason."""

    params: Params
    value: float
    grad_max: float
    n_iter: int
    converged: bool
    message: str
    n_inner: int


@functools.partial(jax.jit, static_argnames=("solver",))
def _solve_impl(params, data, l2, tol, max_iter, *, solver: str) -> _FBState:
    init, step = _SOLVERS[solver]

    def cond(st):
        return (
            (st.it < max_iter)
            & (_tree_max_abs(st.grad) > tol)
            & (~st.stalled)
            & jnp.isfinite(st.value)
        )

    return lax.while_loop(cond, lambda st: step(st, data, l2), init(params, data, l2))


def solve(
    data: _Data, params: Params, *, solver: str, l2: float, tol: float, max_iter: int
) -> SolveResult:
    """Runs a full-batch solver to ``max|∇f| <= tol`` in one compiled call (no host round-trip)."""
    if solver not in _SOLVERS:
        raise ValueError(f"`solver` must be one of {sorted(_SOLVERS)}, got {solver!r}")
    dt = data.Z.dtype
    st = _solve_impl(
        params, data, jnp.asarray(l2, dt), jnp.asarray(tol, dt), jnp.int32(max_iter), solver=solver
    )
    gmax = float(_tree_max_abs(st.grad))
    value = float(st.value)
    it = int(st.it)
    if not math.isfinite(value):
        msg = f"the objective became {value} at iteration {it}"
        converged = False
    elif gmax <= tol:
        msg, converged = f"converged: max|grad| = {gmax:.2e} <= tol = {tol:.1e}", True
    elif bool(st.stalled):
        msg = (
            f"stopped at iteration {it}: no further decrease at working precision "
            f"(max|grad| = {gmax:.2e}, tol = {tol:.1e})"
        )
        converged = False
    else:
        msg = f"max_iter = {max_iter} reached with max|grad| = {gmax:.2e} > tol = {tol:.1e}"
        converged = False
    return SolveResult(st.params, value, gmax, it, converged, msg, int(st.n_inner))


# ---------------------------------------------------------------------------------------------
# Minibatch epochs.


@functools.lru_cache(maxsize=64)
def _cached_optimizer(name: str, learning_rate) -> optax.GradientTransformation:
    factory, _ = OPTIMIZERS[name]
    return factory(learning_rate)


def make_optimizer(
    optimizer: str | optax.GradientTransformation, learning_rate: Any = None
) -> optax.GradientTransformation:
    """An optax transformation from a name in :data:`OPTIMIZERS` and a learning rate (a float or
    an optax schedule; ``None`` for the optimizer's default), or ``optimizer`` itself."""
    if isinstance(optimizer, optax.GradientTransformation):
        if learning_rate is not None:
            raise ValueError(
                "`learning_rate` is only used with an optimizer name; an optax "
                f"GradientTransformation carries its own, got learning_rate={learning_rate!r}"
            )
        return optimizer
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        names = ", ".join(repr(n) for n in (*OPTIMIZERS, *FULL_BATCH_SOLVERS))
        raise ValueError(
            f"`optimizer` must be an optax GradientTransformation or one of {names}, "
            f"got {optimizer!r}"
        )
    lr = OPTIMIZERS[optimizer][1] if learning_rate is None else learning_rate
    if not callable(lr):
        lr = float(lr)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"`learning_rate` must be a positive finite float, got {lr}")
    try:
        return _cached_optimizer(optimizer, lr)
    except TypeError:  # an unhashable schedule
        return OPTIMIZERS[optimizer][0](lr)


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32 values."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def permutation(key: jax.Array, n: int, *, rounds: int = 8) -> jax.Array:
    """A pseudo-random permutation of ``range(n)`` (int32), keyed by ``key``, without sorting.

    ``jax.random.permutation`` sorts random keys, several rounds of an O(N log N) sort that on a
    CPU cost more than the epoch's GEMMs (0.17 s at N = 200k against 0.1 s for the two GEMMs). This
    is an 8-round keyed Feistel network on the smallest ``2^{2h} >= n`` (a bijection for any round
    function; the round function is a hash of the half-block with a per-round key drawn from
    ``key``), restricted to ``[0, n)`` by cycle walking: O(N) elementwise work, 8 ms at N = 200k.
    The position of each element is uniform to sampling noise (tested).
    """
    if n >= 2**31:
        raise ValueError(f"`n` must be < 2**31 for the shuffling permutation, got {n}")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = jnp.uint32((1 << half) - 1)
    keys = jax.random.bits(key, (rounds,), jnp.uint32)

    def encrypt(x):
        left, right = x >> half, x & mask
        for i in range(rounds):
            left, right = right, left ^ (_mix32(right ^ keys[i]) & mask)
        return (left << half) | right

    x = lax.while_loop(
        lambda x: jnp.any(x >= n),
        lambda x: jnp.where(x >= n, encrypt(x), x),
        encrypt(jnp.arange(n, dtype=jnp.uint32)),
    )
    return x.astype(jnp.int32)


def _batch(data: _Data, idx: jax.Array, weights: jax.Array, dp: DataParallel | None) -> _Data:
    """Gathers one minibatch; with a data-parallel layout ``dp``, split over its ``"data"`` axis."""
    batch = _Data(jnp.take(data.Z, idx, axis=0), jnp.take(data.y, idx), weights)
    return batch if dp is None else jax.tree.map(dp.split_rows, batch)


@functools.partial(jax.jit, static_argnames=("opt", "batch_size", "dp"))
def _minibatch_epoch(params, opt_state, data: _Data, l2, key, *, opt, batch_size: int, dp=None):
    """One epoch in one compiled call: a :func:`permutation` from ``key``, ``lax.scan`` over the
    batches.

    The last, partial batch is filled with index 0 at weight zero, so each batch is the weighted
    mean over its real samples. With ``dp`` each batch is split over the devices of its
    ``"data"`` axis, padded with zero-weight samples to a multiple of their number. Returns the new ``(params, opt_state)`` and the epoch's running
    metrics: weighted mean objective and accuracy over the batches as they were seen.
    """
    n = data.y.shape[0]
    nb = -(-n // batch_size)
    dtype = params["W"].dtype
    perm = permutation(key, n)
    idx_all = jnp.concatenate([perm, jnp.zeros((nb * batch_size - n,), perm.dtype)])
    s_all = jnp.ones((n,), dtype) if data.s is None else data.s.astype(dtype)
    w_all = jnp.concatenate([jnp.take(s_all, perm), jnp.zeros((nb * batch_size - n,), dtype)])
    extra = isinstance(opt, optax.GradientTransformationExtraArgs)
    if dp is not None:
        idx_all, w_all = pad_batches(idx_all, w_all, batch_size, dp.padded(batch_size))
        batch_size = dp.padded(batch_size)

    def body(carry, i):
        params, opt_state, tot, correct = carry
        idx = lax.dynamic_slice(idx_all, (i * batch_size,), (batch_size,))
        w = lax.dynamic_slice(w_all, (i * batch_size,), (batch_size,))
        batch = _batch(data, idx, w, dp)
        wsum = jnp.sum(w)
        scale = 1 / jnp.where(wsum > 0, wsum, 1)  # the batch's weighted mean
        value, g, A = _vg_sum(params, batch.Z, batch.y, w)
        W = params["W"]
        value = value * scale + 0.5 * l2 * jnp.vdot(W, W)
        g = jax.tree.map(lambda x: x * scale, g)
        g["W"] = g["W"] + l2 * W
        hit = jnp.argmax(A, axis=1) == batch.y
        kw = {}
        if extra:
            kw = dict(value=value, grad=g, value_fn=lambda p: _objective(p, batch, l2))
        updates, opt_state = opt.update(g, opt_state, params, **kw)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, tot + value * wsum, correct + jnp.sum(w * hit)), None

    zero = jnp.zeros((), dtype)
    (params, opt_state, tot, correct), _ = lax.scan(
        body, (params, opt_state, zero, zero), jnp.arange(nb)
    )
    total = jnp.sum(s_all)
    return params, opt_state, tot / total, correct / total


@functools.partial(jax.jit, static_argnames=("solver",))
def _full_batch_epoch(st: _FBState, data: _Data, l2, *, solver: str):
    st = _SOLVERS[solver][1](st, data, l2)
    _, correct = _predict_stats(st.params, data)
    total = data.y.shape[0] if data.s is None else jnp.sum(data.s)
    return st, correct / total, _tree_max_abs(st.grad)


# ---------------------------------------------------------------------------------------------
# fit


def _resolve_device(device: Any) -> jax.Device:
    if device is None:
        default = jax.config.jax_default_device
        if isinstance(default, jax.Device):
            return default
        return jax.devices(default)[0] if isinstance(default, str) else jax.devices()[0]
    if isinstance(device, jax.Device):
        return device
    if isinstance(device, str):
        try:
            return jax.devices(device)[0]
        except RuntimeError as e:
            raise ValueError(f"`device` {device!r} is not available to JAX: {e}") from None
    raise TypeError(f"`device` must be None, 'cpu', 'gpu' or a jax.Device, got {device!r}")


@functools.partial(jax.jit, static_argnames=("fit_intercept", "dtype"))
def _hessian_operands(Z: jax.Array, *, fit_intercept: bool, dtype) -> tuple[jax.Array, jax.Array]:
    """``Zh = [Z, 1]`` (or ``Z``) in ``dtype`` and ``Zh ⊙ Zh``, built on the device."""
    Zh = Z.astype(dtype)
    if fit_intercept:
        Zh = jnp.concatenate([Zh, jnp.ones((Z.shape[0], 1), dtype)], axis=1)
    return Zh, Zh * Zh


def _place(
    Z: np.ndarray,
    y: np.ndarray,
    s: np.ndarray | None,
    *,
    fit_intercept: bool,
    dtype,
    device,
    shape: tuple[int, int] | None = None,
    hessian_dtype=None,
    split_rows: bool = False,
) -> _Data:
    """Puts the data on ``device`` once: ``Z`` in ``dtype`` (copied only when the dtype changes or
    when it is padded with zeros to ``shape = (rows, features)``; padded rows get weight 0), and
    with ``hessian_dtype`` the operands of Newton-CG's Hessian products. ``device`` may be a
    :class:`DataParallel` layout: the data are then replicated on its mesh, or with ``split_rows``
    their rows split over its ``"data"`` axis."""
    n, d = Z.shape
    rows, cols = (n, d) if shape is None else shape
    if (rows, cols) == (n, d):
        Zp = np.asarray(Z, dtype)
    else:
        Zp = np.zeros((rows, cols), dtype)
        Zp[:n, :d] = Z
    yb = np.zeros(rows, np.int32)
    yb[:n] = y
    sb = None
    if rows > n or s is not None:
        sb = np.zeros(rows, dtype)
        sb[:n] = 1 if s is None else s
    if isinstance(device, DataParallel):
        put = device.put_rows if split_rows else device.replicate
    else:
        put = functools.partial(jax.device_put, device=device)
    Zd = put(Zp)
    Zh = Zsq = None
    if hessian_dtype is not None:
        Zh, Zsq = _hessian_operands(
            Zd, fit_intercept=fit_intercept, dtype=np.dtype(hessian_dtype).name
        )
    return _Data(Zd, put(yb), None if sb is None else put(sb), Zh, Zsq)


def _init_params(init_params, d: int, k: int, fit_intercept: bool, dtype) -> Params:
    if init_params is None:
        params = {"W": jnp.zeros((d, k), dtype)}
        if fit_intercept:
            params["b"] = jnp.zeros((k,), dtype)
        return params
    if not isinstance(init_params, dict) or "W" not in init_params:
        raise TypeError(f"`init_params` must be a dict with 'W' (and 'b'), got {init_params!r}")
    W = jnp.asarray(init_params["W"], dtype)
    if W.shape != (d, k):
        raise ValueError(f"`init_params['W']` must have shape (D, K) = {(d, k)}, got {W.shape}")
    params = {"W": W}
    if fit_intercept:
        b = jnp.asarray(init_params.get("b", np.zeros(k)), dtype)
        if b.shape != (k,):
            raise ValueError(f"`init_params['b']` must have shape (K,) = ({k},), got {b.shape}")
        params["b"] = b
    return params


def _describe_optimizer(optimizer, learning_rate) -> str:
    if isinstance(optimizer, str):
        lr = learning_rate
        if lr is None and optimizer in OPTIMIZERS:
            lr = OPTIMIZERS[optimizer][1]
        return optimizer if lr is None else f"{optimizer}(lr={lr if not callable(lr) else 'fn'})"
    return f"custom {type(optimizer).__name__}"


def _output(params: Params, k: int) -> Params:
    out = {"W": params["W"]}
    out["b"] = params["b"] if "b" in params else jnp.zeros((k,), params["W"].dtype)
    return out


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="epoch", dynamic_ncols=True)


def fit(
    Z: ArrayLike,
    y: ArrayLike,
    *,
    optimizer: str | optax.GradientTransformation = "adam",
    learning_rate: float | optax.Schedule | None = None,
    epochs: int = 10,
    batch_size: int | None = None,
    l2: float = 0.0,
    fit_intercept: bool = True,
    sample_weight: ArrayLike | None = None,
    num_classes: int | None = None,
    init_params: Params | None = None,
    seed: int = 0,
    tol: float | None = None,
    eval_data: tuple[ArrayLike, ArrayLike] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    max_to_keep: int = 3,
    progress: bool = True,
    callback: Callable[[int, Params, dict], bool | None] | None = None,
    device: str | jax.Device | None = None,
    mesh: Any = None,
) -> tuple[Params, History]:
    r"""Trains softmax regression with optax and the hand-written gradient of eq. (6).

    Minimises the weighted mean negative log-likelihood plus an L2 penalty on ``W``:

    .. math::

        f(W, b) = \frac{\sum_i s_i \big(\log \sum_k e^{a_{ik}} - a_{i y_i}\big)}{\sum_i s_i}
                  + \frac{\lambda}{2} \|W\|_F^2, \qquad a_i = z_i W + b

    (``λ`` = ``l2``; the bias is not penalised). Each step calls the hand-written value and
    gradient (eq. (6), on ``Z`` augmented with a ones column for the bias), never ``jax.grad``.

    Minibatch optimizers (any optax ``GradientTransformation``, schedules included, or a name in
    :data:`OPTIMIZERS`): each epoch is one compiled call that draws a permutation (a keyed
    Feistel network, :func:`permutation`) from ``fold_in(key(seed), epoch)`` and ``lax.scan``-s
    over the batches; the last partial batch is
    padded with zero-weight samples, so every sample is seen once per epoch. Full-batch solvers
    (``"lbfgs"``: optax L-BFGS with its zoom line search; ``"newton-cg"``: truncated Newton with the
    analytic Hessian-vector product :func:`softmax_jax.hvp`) do one iteration per epoch and stop
    early when ``max |∇f| <= tol``.

    With ``checkpoint_dir`` the state (parameters, optimizer state, epoch, RNG key, history) is
    saved with orbax-checkpoint after every ``checkpoint_every`` epochs (atomically; the last
    ``max_to_keep`` are kept), and a call with the same directory resumes from the latest
    checkpoint, ending with the same parameters as an uninterrupted run. A checkpoint written by a
    different configuration raises :class:`softmax_jax._checkpoint.CheckpointError`; an unreadable
    one falls back to the previous one with a warning.

    Args:
      Z: features ``(N, D)``, finite. float64 stays float64 when x64 is enabled; bfloat16/float16
        are trained in float32.
      y: integer class indices ``(N,)`` in ``[0, K)``, at least two distinct classes.
      optimizer: an optax transformation or one of ``"sgd"``, ``"momentum"``, ``"nesterov"``,
        ``"adam"``, ``"adamw"``, ``"nadam"``, ``"adabelief"``, ``"adagrad"``, ``"rmsprop"``,
        ``"lion"``, ``"lbfgs"``, ``"newton-cg"``.
      learning_rate: float or optax schedule for a named optimizer (default per optimizer, see
        :data:`OPTIMIZERS`); ``None`` for the full-batch solvers (line searches choose the step).
      epochs: total number of epochs (iterations for the full-batch solvers), counting those
        restored from a checkpoint.
      batch_size: minibatch size (default 256; ``>= N`` means one batch); ``None`` for the
        full-batch solvers.
      l2: ``λ >= 0``, the penalty on ``W``.
      fit_intercept: learn the bias ``b`` (otherwise ``b = 0``).
      sample_weight: ``(N,)`` non-negative weights ``s``.
      num_classes: ``K`` (default ``max(y) + 1``).
      init_params: starting ``{"W": (D, K), "b": (K,)}`` (default zeros).
      seed: seeds the shuffling.
      tol: full-batch solvers only: stop when ``max |∇f| <= tol``.
      eval_data: ``(Z_eval, y_eval)`` evaluated after every epoch.
      checkpoint_dir: directory for orbax checkpoints; resumes from it if it holds one.
      checkpoint_every: save every this many epochs (and after the last one).
      max_to_keep: number of checkpoints kept.
      progress: show a tqdm progress bar (``tqdm.auto``: a widget in notebooks).
      callback: ``callback(epoch, params, record)`` after each epoch; returning ``True`` stops.
      device: ``"cpu"``, ``"gpu"`` or a ``jax.Device`` (default: JAX's default device); the data
        are placed there once.
      mesh: a ``jax.sharding.Mesh`` with an axis ``"data"`` (over the devices of every process
        after ``jax.distributed.initialize()``): data-parallel training. Each minibatch is split
        over ``"data"`` (padded with zero-weight samples to a multiple of its size), ``W`` and
        ``b`` are replicated, and the gradient is summed across devices by XLA; the full-batch
        solvers split all rows. Same result as one device, to rounding. Excludes ``device``.

    Returns:
      ``(params, history)``: ``params = {"W": (D, K), "b": (K,)}`` and ``history``, a dict of
      per-epoch lists: ``epoch``, ``loss`` (the objective ``f``; for minibatches the running mean
      over the epoch's batches), ``train_accuracy`` (likewise), ``eval_loss``/``eval_accuracy``
      (mean NLL and accuracy on ``eval_data``, ``None`` without it), ``seconds`` (wall time of the
      epoch's computation) and, for full-batch solvers, ``grad_max``.

    Raises:
      ValueError / TypeError: bad data (NaN/inf, empty, mismatched lengths, one class, labels out
        of range) or arguments, naming the argument.
      TrainingDiverged: the loss became NaN/inf; the message names the epoch, the exception holds
        the last good parameters and the checkpoint directory keeps the last good checkpoint.

    Examples:
      >>> import numpy as np, softmax_jax as sj
      >>> rng = np.random.default_rng(0)
      >>> Z = rng.normal(size=(200, 5)).astype(np.float32); y = (Z[:, 0] > 0).astype(np.int32)
      >>> params, history = sj.fit(Z, y, epochs=5, batch_size=32, progress=False)
      >>> params["W"].shape, len(history["loss"])
      ((5, 2), 5)
    """
    dp = data_parallel(mesh)
    if dp is not None and device is not None:
        raise ValueError(f"`device` must be None when `mesh` is given, got {device!r}")
    if not isinstance(epochs, int | np.integer) or epochs < 0:
        raise ValueError(f"`epochs` must be a non-negative integer, got {epochs!r}")
    if not (isinstance(l2, int | float | np.floating) and l2 >= 0 and math.isfinite(l2)):
        raise ValueError(f"`l2` must be a finite float >= 0, got {l2!r}")
    if checkpoint_every < 1:
        raise ValueError(f"`checkpoint_every` must be >= 1, got {checkpoint_every}")
    Zh, yh, sw, k = check_training_data(Z, y, sample_weight=sample_weight, num_classes=num_classes)
    n, d = Zh.shape
    dtype = compute_dtype(Zh.dtype)
    full_batch = isinstance(optimizer, str) and optimizer in FULL_BATCH_SOLVERS
    if full_batch:
        if batch_size is not None and batch_size < n:
            raise ValueError(
                f"`batch_size` must be None (or >= N = {n}) for the full-batch solver "
                f"{optimizer!r}, got {batch_size}"
            )
        if learning_rate is not None:
            raise ValueError(
                f"`learning_rate` must be None for {optimizer!r}: its line search picks the "
                f"step, got {learning_rate!r}"
            )
        opt = None
    else:
        if tol is not None:
            raise ValueError(f"`tol` applies to the full-batch solvers only, got tol={tol}")
        opt = make_optimizer(optimizer, learning_rate)
        batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        batch_size = int(min(batch_size, n))
    dev = _resolve_device(device) if dp is None else dp
    put = functools.partial(jax.device_put, device=dev) if dp is None else dp.replicate
    data = _place(
        Zh,
        yh,
        sw,
        fit_intercept=fit_intercept,
        dtype=dtype,
        device=dev,
        hessian_dtype=np.float32 if optimizer == "newton-cg" else None,
        # Full batch on a mesh: the rows split over "data", padded with zero-weight rows.
        shape=(dp.padded(n), d) if dp is not None and full_batch else None,
        split_rows=dp is not None and full_batch,
    )
    eval_dev = None
    if eval_data is not None:
        if not (isinstance(eval_data, tuple | list) and len(eval_data) == 2):
            raise TypeError("`eval_data` must be a pair (Z_eval, y_eval)")
        Ze, ye, _, _ = _check_eval(eval_data, d, k)
        eval_dev = _place(Ze, ye, None, fit_intercept=fit_intercept, dtype=dtype, device=dev)
    params = put(_init_params(init_params, d, k, fit_intercept, dtype))
    l2_dev = jnp.asarray(l2, dtype)
    base_key = jax.random.key(seed)

    if full_batch:
        state: Any = jax.jit(_SOLVERS[optimizer][0])(params, data, l2_dev)
    else:
        state = (params, opt.init(params))
    # Committed to the device and strongly typed like the epoch's outputs, so that epoch 2 does
    # not compile again.
    state = put(jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), state))
    history: History = {
        "epoch": [],
        "loss": [],
        "train_accuracy": [],
        "eval_loss": [],
        "eval_accuracy": [],
        "seconds": [],
    }
    if full_batch:
        history["grad_max"] = []

    ckpt = None
    start = 0
    if checkpoint_dir is not None:
        from ._checkpoint import Checkpointer

        fingerprint = {
            "n_samples": n,
            "n_features": d,
            "n_classes": k,
            "fit_intercept": bool(fit_intercept),
            "optimizer": _describe_optimizer(optimizer, learning_rate),
            "batch_size": None if full_batch else batch_size,
            "l2": float(l2),
            "seed": int(seed),
            "dtype": np.dtype(dtype).name,
            "weighted": sw is not None,
        }
        ckpt = Checkpointer(checkpoint_dir, fingerprint=fingerprint, max_to_keep=max_to_keep)
        target = {"state": state, "rng": jax.random.key_data(base_key)}
        restored = ckpt.restore_latest(target)
        if restored is not None:
            start, tree, history = restored
            state = put(tree["state"])
            base_key = jax.random.wrap_key_data(jnp.asarray(tree["rng"]))

    def current_params() -> Params:
        return state.params if full_batch else state[0]

    bar = _progress_bar(progress, epochs, min(start, epochs))
    try:
        for epoch in range(start + 1, epochs + 1):
            t0 = time.perf_counter()
            if full_batch:
                new_state, acc, gmax = _full_batch_epoch(state, data, l2_dev, solver=optimizer)
                loss = float(new_state.value)
                acc, gmax = float(acc), float(gmax)
            else:
                key = jax.random.fold_in(base_key, epoch)
                p, o, loss, acc = _minibatch_epoch(
                    state[0], state[1], data, l2_dev, key, opt=opt, batch_size=batch_size, dp=dp
                )
                new_state = (p, o)
                loss, acc = float(loss), float(acc)
            seconds = time.perf_counter() - t0
            if not math.isfinite(loss):
                where = "" if ckpt is None else f" and the checkpoint in {ckpt.directory}"
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch}: the loss is {loss}; the returned "
                    f"parameters{where} are from epoch {epoch - 1}, the last good one "
                    "(try a smaller learning rate)",
                    epoch=epoch,
                    params=_output(current_params(), k),
                    history=history,
                )
            state = new_state
            record = {"epoch": epoch, "loss": loss, "train_accuracy": acc, "seconds": seconds}
            record["eval_loss"] = record["eval_accuracy"] = None
            if eval_dev is not None:
                el, ea = _evaluate(current_params(), eval_dev)
                record["eval_loss"], record["eval_accuracy"] = float(el), float(ea)
            if full_batch:
                record["grad_max"] = gmax
            for key_, value in record.items():
                history[key_].append(value)
            stop = (
                bool(callback(epoch, _output(current_params(), k), record)) if callback else False
            )
            converged = full_batch and tol is not None and gmax <= tol
            stalled = full_batch and bool(state.stalled)
            last = epoch == epochs or stop or converged or stalled
            if ckpt is not None and (epoch % checkpoint_every == 0 or last):
                ckpt.save(epoch, {"state": state, "rng": jax.random.key_data(base_key)}, history)
            if bar is not None:
                post = {"loss": f"{loss:.4f}", "acc": f"{acc:.3f}"}
                if record["eval_accuracy"] is not None:
                    post["eval_acc"] = f"{record['eval_accuracy']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if last:
                break
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
    return _output(current_params(), k), history


def _check_eval(eval_data, d: int, k: int):
    Ze, ye, _, _ = check_training_data(
        eval_data[0],
        eval_data[1],
        num_classes=k,
        min_classes=1,
        z_name="eval_data[0]",
        y_name="eval_data[1]",
    )
    if Ze.shape[1] != d:
        raise ValueError(
            f"`eval_data[0]` must have D = {d} features like `Z`, got shape {Ze.shape}"
        )
    return Ze, ye, None, k
