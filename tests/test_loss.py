"""sj.loss: eq. (2), its reductions, dtypes, transformations and input errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import numpy_reference, problem
from hypothesis import given, settings
from hypothesis import strategies as st

import softmax_jax as sj
from softmax_jax import _loss

X64 = pytest.param(jnp.float64, marks=pytest.mark.x64, id="float64")
# Relative tolerance of a loss value: its sum/mean accumulates in float32 for every input dtype
# but float64 (the inputs' rounding is shared with the reference).
VALUE_RTOL = {jnp.dtype(jnp.float64): 1e-12}


@pytest.mark.parametrize("dtype", (jnp.float32, X64))
@pytest.mark.parametrize("labels", ("integer", "one-hot", "soft", "unnormalised"))
@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("n,d,k", [(1, 1, 2), (17, 5, 3), (64, 8, 100)])
def test_matches_numpy(getkey, dtype, labels, weighted, n, d, k):
    W, Z, Y, s = problem(getkey(), n, d, k, labels, weighted, dtype=dtype)
    rtol = VALUE_RTOL.get(jnp.dtype(dtype), 1e-5)
    per = numpy_reference(W, Z, Y, s, "none")[0]
    # atol: terms of size ~|logits| cancel in lse − Σ y a; their rounding is relative to |logits|
    atol = rtol * float(np.max(np.abs(np.asarray(Z, np.float64) @ np.asarray(W, np.float64))))
    got = sj.loss(W, Z, Y, weights=s, reduction="none")
    np.testing.assert_allclose(got, per, rtol=rtol, atol=atol)
    np.testing.assert_allclose(sj.loss(W, Z, Y, weights=s), per.sum(), rtol=rtol, atol=n * atol)
    denom = n if s is None else float(np.sum(np.asarray(s, np.float64)))
    np.testing.assert_allclose(
        sj.loss(W, Z, Y, weights=s, reduction="mean"), per.sum() / denom, rtol=rtol, atol=atol
    )


@pytest.mark.x64
def test_matches_optax(getkey):
    W, Z, y, _ = problem(getkey(), 50, 7, 11, "integer")
    # the reference as one compiled program (op by op, optax's primitives compile one each)
    reference = jax.jit(lambda W, Z, y: optax.softmax_cross_entropy_with_integer_labels(Z @ W, y))
    ref = reference(W, Z, y)
    np.testing.assert_allclose(sj.loss(W, Z, y, reduction="none"), ref, rtol=1e-12)


def test_all_zero_weights_mean_is_zero(getkey):
    W, Z, y, _ = problem(getkey(), 8, 3, 4, "integer", dtype=jnp.float32)
    value, g = sj.value_and_grad(W, Z, y, weights=jnp.zeros(8), reduction="mean")
    assert float(value) == 0.0
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_mask_equals_subset(getkey):
    W, Z, y, _ = problem(getkey(), 10, 3, 4, "integer", dtype=jnp.float32)
    mask = jnp.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    sub = np.flatnonzero(np.asarray(mask))
    for reduction in ("sum", "mean"):
        np.testing.assert_allclose(
            sj.loss(W, Z, y, weights=mask, reduction=reduction),
            sj.loss(W, Z[sub], y[sub], reduction=reduction),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            sj.grad(W, Z, y, weights=mask, reduction=reduction),
            sj.grad(W, Z[sub], y[sub], reduction=reduction),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("scale", (1e2, 1e4, 1e6))
def test_extreme_logits_values(getkey, scale):
    """|logits| up to ~1e6 in float32: each ℓ_i is the float64 value up to the rounding of the
    logits themselves (relative 1e-6 of max |a|), never inf/NaN, and ≥ 0 for integer labels."""
    W, Z, y, _ = problem(getkey(), 16, 4, 5, "integer", scale=scale, dtype=jnp.float32)
    per = sj.loss(W, Z, y, reduction="none")
    ref = numpy_reference(W, Z, y, None, "none")[0]
    amax = float(np.max(np.abs(np.asarray(Z, np.float64) @ np.asarray(W, np.float64))))
    np.testing.assert_allclose(per, ref, rtol=0, atol=1e-6 * amax)
    assert bool(jnp.all(per >= 0))  # lse ≥ every logit, so each ℓ_i ≥ 0 for integer labels


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16, jnp.float16, X64))
def test_dtypes(getkey, dtype):
    W, Z, y, s = problem(getkey(), 8, 3, 4, "integer", weighted=True, dtype=dtype)
    out = sj.loss(W, Z, y, weights=s)
    expected = jnp.float64 if dtype == jnp.float64 else jnp.float32
    assert out.dtype == expected
    # accumulated in float32 (or float64): only the inputs' rounding, shared with the reference
    ref = numpy_reference(W, Z, y, s, "sum")[0]
    np.testing.assert_allclose(float(out), ref, rtol=VALUE_RTOL.get(jnp.dtype(dtype), 1e-5))


def test_jit_and_vmap(getkey):
    W, Z, y, _ = problem(getkey(), 8, 3, 4, "integer", dtype=jnp.float32)
    ref = numpy_reference(W, Z, y, None, "mean")[0]
    f = jax.jit(lambda W, Z, y: sj.loss(W, Z, y, reduction="mean"))
    np.testing.assert_allclose(f(W, Z, y), ref, rtol=1e-6)
    Ws = jnp.stack([W, 2 * W, -W])
    batched = jax.vmap(lambda w: sj.loss(w, Z, y, reduction="mean"))(Ws)
    for i, w in enumerate(Ws):
        np.testing.assert_allclose(batched[i], numpy_reference(w, Z, y, None, "mean")[0], rtol=1e-6)


def test_out_of_range_label_under_jit_is_nan(getkey):
    """Under jit the values are not visible: an out-of-range label gives NaN, never a silent
    wrong number (documented in the docstring)."""
    W, Z, y, _ = problem(getkey(), 4, 3, 4, "integer", dtype=jnp.float32)
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
    W, Z, y, _ = problem(getkey(), 6, 3, 4, "integer", dtype=jnp.float32)
    np.testing.assert_allclose(jax.jit(lambda w: sj.loss(w, Z, y))(W), sj.loss(W, Z, y))
    bad = y.at[0].set(9)
    with pytest.raises(ValueError, match=r"got 9 at index 0"):
        jax.jit(lambda w: sj.loss(w, Z, bad))(W)


@pytest.mark.parametrize("x64", [False, pytest.param(True, marks=pytest.mark.x64)], ids=str)
def test_plain_numpy_float64_input_does_not_warn(x64):
    """What np.random.rand gives, passed to every public function: no warning, x64 on or off."""
    rng = np.random.default_rng(0)
    X, y, W = rng.random((40, 3)), np.arange(40) % 3, rng.random((3, 3))
    expected = jnp.float64 if x64 else jnp.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sj.loss(W, X, y).dtype == expected
        assert sj.grad(W, X, y).dtype == expected
        sj.value_and_grad(W, X, y, weights=rng.random(40), reduction="mean")
        sj.hvp(W, X, y, W)
        sj.derivation_terms(W, X, y)
        assert sj.check_grad(W, X, y).passed
        sj.linear_cross_entropy(X, W, y)
        params, _ = sj.fit(X, y, epochs=1, batch_size=20, progress=False)
    assert params["W"].dtype == expected


def test_value_checks_bring_back_scalars_not_arrays(monkeypatch):
    """Finite-target, label-range and weight checks reduce on the device: no implicit copy of
    an input to the host, and each check's explicit transfer is a handful of scalars (the path of
    accelerator arrays; small CPU arrays, in the host's memory already, are scanned by NumPy)."""
    from softmax_jax import _validate

    monkeypatch.setattr(_validate, "HOST_SCAN_MAX", 0)
    n, k = 4096, 8
    Y = jnp.full((n, k), 1.0 / k).at[3000, 5].set(jnp.nan)
    moved = []
    device_get = jax.device_get

    def counting_device_get(x):
        moved.extend(int(np.size(leaf)) for leaf in jax.tree.leaves(x))
        return device_get(x)

    monkeypatch.setattr(jax, "device_get", counting_device_get)
    W, Z = jnp.zeros((3, k)), jnp.ones((n, 3))
    with jax.transfer_guard_device_to_host("disallow"):
        with pytest.raises(ValueError, match=r"`Y` must be finite, got nan at index \(3000, 5\)"):
            sj.loss(W, Z, Y)
        labels = jnp.zeros(n, jnp.int32).at[4000].set(k)
        with pytest.raises(ValueError, match=rf"got {k} at index 4000 \(min 0, max {k}\)"):
            sj.loss(W, Z, labels)
        s = jnp.ones(n).at[17].set(-2.0)
        with pytest.raises(ValueError, match=r"`weights` must be >= 0, got -2.0 at index 17"):
            sj.loss(W, Z, labels.at[4000].set(0), weights=s)
    # five scans (finite Y; labels; labels, finite and >= 0 weights) of five scalars each
    assert max(moved) == 1 and sum(moved) == 5 * 5


@pytest.mark.parametrize("targets", [False, True])
def test_huge_tied_logits_keep_the_log_k_term(targets):
    """Z ≈ 1e30 with equal columns of W: every logit is ~1e30 and tied, each sample's loss is
    log 3; ``lse − a_y`` cancelled to 0, ``(m − a_y) + log Σ exp(a − m)`` keeps it."""
    n, k = 240, 3
    Z = np.full((n, 1), 1e30, np.float32)
    W = np.ones((1, k), np.float32)
    y = np.arange(n) % k
    Y = np.eye(k, dtype=np.float32)[y] if targets else y
    exact = n * np.log(k)
    np.testing.assert_allclose(float(sj.loss(W, Z, Y)), exact, rtol=1e-6)
    np.testing.assert_allclose(float(sj.value_and_grad(W, Z, Y)[0]), exact, rtol=1e-6)


# --- mutation testing (issue 19): what the tests above let through -------------------------------

from softmax_jax._loss import logsumexp_rows  # noqa: E402


def test_logsumexp_rows_is_the_log_partition_and_its_softmax():
    # lse is what the objective and the sparse path read; E / S the softmax the gradient reads.
    # One row per magnitude of the logits, 1e-3 to 1e30 (seed 0)
    scales = np.array([1e-3, 1.0, 30.0, 1e4, 1e30])[:, None]
    A = (scales * np.random.default_rng(0).normal(size=(5, 7))).astype(np.float32)
    lse, E, S = logsumexp_rows(jnp.asarray(A))
    a = A.astype(np.float64)
    m = a.max(axis=1, keepdims=True)
    ref = (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]
    np.testing.assert_allclose(lse, ref, rtol=1e-6)
    assert E.shape == A.shape and S.shape == (5, 1)
    np.testing.assert_allclose(E / S, np.exp(a - ref[:, None]), rtol=1e-5, atol=1e-30)


@settings(max_examples=15)
@given(
    k=st.sampled_from([1, 2, 3, 7, 20, 255, 256, 257]),  # across HALVING_MAX_CLASSES = 256
    n=st.sampled_from([1, 5]),
    scale=st.sampled_from([1.0, 1e3, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_class_major_pieces_equal_the_row_major_ones(k, n, scale, seed):
    # the objective's passes over transposed features keep their (K, N) arrays class-major: the
    # halving reductions and the pieces of eq. (2) on A (K, N) are those of Aᵀ (N, K), any K
    # (odd ones fold a row into the first), logits of any magnitude
    assert _loss.HALVING_MAX_CLASSES == 256
    rng = np.random.default_rng(seed)
    A = (rng.normal(size=(n, k)) * scale).astype(np.float32)
    y = jnp.asarray(rng.integers(0, k, n), jnp.int32)
    p = jax.device_get(_class_major_pieces(jnp.asarray(A), jnp.asarray(A.T), y))  # NumPy arrays
    np.testing.assert_array_equal(p["max_t"][0], A.max(axis=1))
    np.testing.assert_allclose(
        p["abs_sum_t"][0],
        np.abs(A.astype(np.float64)).sum(axis=1),
        rtol=1e-5,  # float32 sums of K positive terms in another order
    )
    assert p["E_t"].shape == (k, n) and p["S_t"].shape == (1, n)
    np.testing.assert_allclose(p["lse_t"], p["lse"], rtol=1e-6)
    np.testing.assert_array_equal(p["E_t"], p["E"].T)
    np.testing.assert_allclose(p["nll_int_t"], p["nll_int"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p["nll_soft_t"], p["nll_soft"], rtol=1e-5, atol=1e-6 * scale)


@jax.jit
def _class_major_pieces(A, At, y):
    """The pieces compared above, row-major on ``A`` (N, K) and class-major on ``At = Aᵀ``
    (K, N), as one compiled program per shape (op by op, each primitive compiled its own)."""
    k = A.shape[1]
    lse, E, S = _loss.logsumexp_rows(A)
    lse_t, E_t, S_t = _loss.logsumexp_rows(At, 0)
    Y = jax.nn.one_hot(y, k) * 0.7  # soft rows not summing to one: the m (1 − Σ y) term
    return {
        "max_t": _loss.reduce_classes("max", At, 0),
        "abs_sum_t": _loss.reduce_classes("sum", jnp.abs(At), 0),
        "lse": lse,
        "E": E,
        "lse_t": lse_t,
        "E_t": E_t,
        "S_t": S_t,
        "nll_int": _loss.nll_rows(A, S, y, True),
        "nll_int_t": _loss.nll_rows(At, S_t, y, True, 0),
        "nll_soft": _loss.nll_rows(A, S, Y, False),
        "nll_soft_t": _loss.nll_rows(At, S_t, Y.T, False, 0),
    }
