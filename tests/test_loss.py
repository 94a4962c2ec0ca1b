"""sj.loss: eq. (2), its reductions, dtypes, transformations and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import problem

import softmax_jax as sj

# Exactness checks against float64 references: x64 on for this module (scoped, see conftest).
pytestmark = pytest.mark.x64


def numpy_loss(W, Z, Y, s=None):
    """Eq. (2) in plain float64 NumPy, per sample (no weights applied when s is None)."""
    W, Z = np.asarray(W, np.float64), np.asarray(Z, np.float64)
    A = Z @ W
    m = A.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(A - m).sum(axis=1, keepdims=True)))[:, 0]
    Y = np.asarray(Y)
    tgt = A[np.arange(len(Y)), Y] if Y.ndim == 1 else np.sum(Y * A, axis=1)
    per = lse - tgt
    return per if s is None else np.asarray(s, np.float64) * per


@pytest.mark.parametrize("labels", ("integer", "one-hot", "soft", "unnormalised"))
@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("n,d,k", [(1, 1, 2), (17, 5, 3), (64, 8, 100)])
def test_matches_numpy(getkey, labels, weighted, n, d, k):
    W, Z, Y, s = problem(getkey(), n, d, k, labels, weighted)
    per = numpy_loss(W, Z, Y, s)
    np.testing.assert_allclose(sj.loss(W, Z, Y, weights=s, reduction="none"), per, rtol=1e-12)
    np.testing.assert_allclose(sj.loss(W, Z, Y, weights=s), per.sum(), rtol=1e-12)
    denom = n if s is None else float(np.sum(s))
    np.testing.assert_allclose(
        sj.loss(W, Z, Y, weights=s, reduction="mean"), per.sum() / denom, rtol=1e-12
    )


def test_matches_optax(getkey):
    W, Z, y, _ = problem(getkey(), 50, 7, 11, "integer")
    ref = optax.softmax_cross_entropy_with_integer_labels(Z @ W, y)
    np.testing.assert_allclose(sj.loss(W, Z, y, reduction="none"), ref, rtol=1e-12)


def test_all_zero_weights_mean_is_zero(getkey):
    W, Z, y, _ = problem(getkey(), 8, 3, 4, "integer")
    value, g = sj.value_and_grad(W, Z, y, weights=jnp.zeros(8), reduction="mean")
    assert float(value) == 0.0
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_mask_equals_subset(getkey):
    W, Z, y, _ = problem(getkey(), 10, 3, 4, "integer")
    mask = jnp.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    sub = np.flatnonzero(np.asarray(mask))
    for reduction in ("sum", "mean"):
        np.testing.assert_allclose(
            sj.loss(W, Z, y, weights=mask, reduction=reduction),
            sj.loss(W, Z[sub], y[sub], reduction=reduction),
            rtol=1e-14,
        )
        np.testing.assert_allclose(
            sj.grad(W, Z, y, weights=mask, reduction=reduction),
            sj.grad(W, Z[sub], y[sub], reduction=reduction),
            rtol=1e-13,
            atol=1e-15,
        )


@pytest.mark.parametrize("scale", (1e2, 1e4, 1e6))
def test_extreme_logits_finite(getkey, scale):
    W, Z, y, _ = problem(getkey(), 16, 4, 5, "integer", scale=scale, dtype=jnp.float32)
    per = sj.loss(W, Z, y, reduction="none")
    assert bool(jnp.all(jnp.isfinite(per)))
    assert bool(jnp.all(per >= 0))  # lse ≥ every logit, so each ℓ_i ≥ 0 for integer labels


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64))
def test_dtypes(getkey, dtype):
    W, Z, y, _ = problem(getkey(), 8, 3, 4, "integer", dtype=dtype)
    out = sj.loss(W, Z, y)
    expected = jnp.float64 if dtype == jnp.float64 else jnp.float32
    assert out.dtype == expected


def test_jit_and_vmap(getkey):
    W, Z, y, _ = problem(getkey(), 8, 3, 4, "integer")
    ref = sj.loss(W, Z, y, reduction="mean")
    f = jax.jit(lambda W, Z, y: sj.loss(W, Z, y, reduction="mean"))
    np.testing.assert_allclose(f(W, Z, y), ref, rtol=1e-15)
    Ws = jnp.stack([W, 2 * W, -W])
    batched = jax.vmap(lambda w: sj.loss(w, Z, y, reduction="mean"))(Ws)
    for i, w in enumerate(Ws):
        np.testing.assert_allclose(batched[i], sj.loss(w, Z, y, reduction="mean"), rtol=1e-14)


def test_out_of_range_label_under_jit_is_nan(getkey):
    """Under jit the values are not visible: an out-of-range label gives NaN, never a silent
    wrong number (documented in the docstring)."""
    W, Z, y, _ = problem(getkey(), 4, 3, 4, "integer")
    bad = y.at[2].set(7)
    per = jax.jit(lambda y: sj.loss(W, Z, y, reduction="none"))(bad)
    assert bool(jnp.isnan(per[2])) and bool(jnp.all(jnp.isfinite(per.at[2].set(0))))
    neg = jax.jit(lambda y: sj.loss(W, Z, y))(y.at[0].set(-1))
    assert bool(jnp.isnan(neg))


# ------------------------------------------------------------------------------- input errors

W3 = jnp.zeros((3, 4))
Z3 = jnp.ones((5, 3))
y3 = jnp.array([0, 1, 2, 3, 0])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(W=jnp.zeros((4, 4))), ValueError, r"feature dimension D.*\(5, 3\).*\(4, 4\)"),
        (dict(W=jnp.zeros(3)), ValueError, r"`W` must have shape \(D, K\), got \(3,\)"),
        (dict(Z=jnp.ones((5, 3, 1))), ValueError, r"`Z` must have shape \(N, D\), got \(5, 3, 1\)"),
        (dict(Y=jnp.array([0, 1, 2])), ValueError, r"\(N,\) = \(5,\).*got \(3,\)"),
        (dict(Y=jnp.zeros((5, 3))), ValueError, r"\(N, K\) = \(5, 4\).*got \(5, 3\)"),
        (dict(Y=jnp.zeros((5, 4, 1))), ValueError, r"`Y` must be \(N,\) integer labels"),
        (dict(Y=jnp.array([0.0, 1, 2, 3, 0])), TypeError, r"integer dtype, got float"),
        (dict(Y=jnp.array([0, 1, 4, 3, 0])), ValueError, r"\[0, 4\), got 4 at index 2"),
        (dict(Y=jnp.array([0, -1, 2, 3, 0])), ValueError, r"got -1 at index 1"),
        (dict(Y=jnp.full((5, 4), jnp.nan)), ValueError, r"`Y` must be finite"),
        (dict(Z=jnp.ones((5, 3), jnp.int32)), TypeError, r"`Z` must have a floating dtype"),
        (dict(reduction="avg"), ValueError, r"`reduction` must be one of.*got 'avg'"),
        (dict(weights=jnp.ones(4)), ValueError, r"`weights` must have shape \(N,\) = \(5,\)"),
        (dict(weights=-jnp.ones(5)), ValueError, r"`weights` must be >= 0, got -1.0 at index 0"),
        (dict(weights=jnp.array([1, 1, jnp.inf, 1, 1])), ValueError, r"`weights` must be finite"),
        (dict(W=jnp.zeros((3, 0))), ValueError, r"at least one class"),
        (dict(W="not an array"), TypeError, r"`W` must be an array"),
    ],
)
@pytest.mark.parametrize("fn", ("loss", "grad", "value_and_grad"))
def test_bad_input(kwargs, exc, match, fn):
    args = dict(W=W3, Z=Z3, Y=y3)
    args.update(kwargs)
    opts = {k: args.pop(k) for k in ("weights", "reduction") if k in args}
    with pytest.raises(exc, match=match):
        getattr(sj, fn)(args["W"], args["Z"], args["Y"], **opts)


def test_shape_errors_raise_under_jit():
    f = jax.jit(lambda W, Z, y: sj.loss(W, Z, y))
    with pytest.raises(ValueError, match="feature dimension"):
        f(jnp.zeros((4, 4)), Z3, y3)


def test_concrete_labels_closed_over_in_jit(getkey):
    """Labels captured by a jitted closure are concrete: checked with NumPy, not traced ops."""
    W, Z, y, _ = problem(getkey(), 6, 3, 4, "integer")
    np.testing.assert_allclose(jax.jit(lambda w: sj.loss(w, Z, y))(W), sj.loss(W, Z, y))
    bad = y.at[0].set(9)
    with pytest.raises(ValueError, match=r"got 9 at index 0"):
        jax.jit(lambda w: sj.loss(w, Z, bad))(W)
