"""Problems shared by the solver tests (``test_solvers``, ``test_newton``)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import _newton
from softmax_jax._placement import place


def problem(n=120, d=5, k=4, seed=0, noise=1.0):
    """Features and labels drawn from a random softmax model (not separable)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) + 0.5
    A = X @ rng.normal(size=(d, k))
    y = np.argmax(A + noise * rng.gumbel(size=(n, k)), axis=1).astype(np.int32)
    return X, y


def generated_problem(n, d, k, seed, noise, feature_scale, weighted):
    """A generated problem of the property-based solver tests: :func:`problem`'s features times
    ``feature_scale`` and labels with every class present (a finite optimum: an absent class's
    ``b`` runs off), exponential sample weights if ``weighted``; ``(X, y, s, rng)``, ``rng`` the
    generator of the weights, for the test's further draws."""
    X, y = problem(n=n, d=d, k=k, seed=seed % 2**31, noise=noise)
    y[:k] = np.arange(k)
    rng = np.random.default_rng(seed)
    s = rng.exponential(size=n) if weighted else None
    return feature_scale * X, y, s, rng


@contextlib.contextmanager
def newton_steps(dense: bool):
    """Newton's steps dense where the problem is small enough (``dense``: as shipped), or by
    conjugate gradients at every size (``_newton.DENSE_MAX_WORK`` 0). The switch is static (by
    shape, at trace time): the traced solvers are dropped before and after."""
    if dense:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        jax.clear_caches()
        mp.setattr(_newton, "DENSE_MAX_WORK", 0)
        try:
            yield
        finally:
            jax.clear_caches()


def float64_data(X, y, s=None):
    """TrainData with float64 Hessian operands (exact comparisons)."""
    return place(X, y, s, fit_intercept=True, dtype=np.float64, device=None,
                 hessian_dtype=np.float64)  # fmt: skip


def numpy_objective(X, y, s, params, l2):
    """The solvers' objective in float64 NumPy: the weighted mean of eq. (2) over the rows of
    ``X @ W + b``, plus ``l2 / 2 ‖W‖²`` (the intercept is not penalised)."""
    W, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    A = X @ W + b
    m = A.max(axis=1)
    per = m + np.log(np.exp(A - m[:, None]).sum(axis=1)) - A[np.arange(len(y)), y]
    s = np.ones(len(y)) if s is None else np.asarray(s, np.float64)
    return float(np.sum(s * per) / np.sum(s) + 0.5 * l2 * np.sum(W * W))


def zeros(d, k):
    return {"W": jnp.zeros((d, k)), "b": jnp.zeros(k)}
