"""The cross-check: the hand-written eq. (6) gradient against autodiff, line by line.

The exactness checks run in float64 (marked ``x64``); the narrow-dtype checks run in JAX's default
configuration against float64 NumPy references on the same rounded inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL, assert_close, numpy_hvp, numpy_reference, problem, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import softmax_jax as sj

LABELS = ("integer", "one-hot", "soft", "unnormalised")


@functools.partial(jax.jit, static_argnames="reduction")
def autodiff_grad(W, Z, Y, weights=None, reduction="sum"):
    """jax.grad of sj.loss: one compiled program per case (op by op, the forward and the
    transposed pass compile their own)."""
    return jax.grad(lambda w: sj.loss(w, Z, Y, weights=weights, reduction=reduction))(W)


# ----------------------------------------------------------------- eq. (6) against jax.grad


# Each drawn shape compiles three XLA programs (~0.3 s each): 12 examples keep this near 10 s;
# the edge shapes (N=1, D=1, K=2, large K) are pinned in test_edge_shapes_and_large_k.
@pytest.mark.slow
@pytest.mark.x64
@settings(max_examples=12)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 12),
    k=st.integers(2, 60),
    labels=st.sampled_from(LABELS),
    weighted=st.booleans(),
    reduction=st.sampled_from(("sum", "mean")),
    seed=st.integers(0, 2**31 - 1),
)
def test_hand_written_equals_jax_grad(n, d, k, labels, weighted, reduction, seed):
    W, Z, Y, s = problem(jax.random.PRNGKey(seed), n, d, k, labels, weighted)
    value, g = sj.value_and_grad(W, Z, Y, weights=s, reduction=reduction)
    assert_close(g, autodiff_grad(W, Z, Y, s, reduction))
    assert_close(value, sj.loss(W, Z, Y, weights=s, reduction=reduction))


@pytest.mark.x64
@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("n,d,k", [(1, 1, 2), (1, 5, 2), (3, 1, 7), (16, 4, 5000)])
def test_edge_shapes_and_large_k(getkey, n, d, k, labels):
    W, Z, Y, _ = problem(getkey(), n, d, k, labels)
    assert_close(sj.grad(W, Z, Y), autodiff_grad(W, Z, Y))


@pytest.mark.x64
def test_integer_and_one_hot_labels_agree(getkey):
    W, Z, y, _ = problem(getkey(), 20, 6, 9, "integer")
    Y = jax.nn.one_hot(y, 9, dtype=jnp.float64)
    np.testing.assert_allclose(sj.grad(W, Z, y), sj.grad(W, Z, Y), rtol=0, atol=1e-14)
    np.testing.assert_allclose(sj.loss(W, Z, y), sj.loss(W, Z, Y), rtol=1e-15)


@pytest.mark.x64
def test_single_sample_is_eq6(getkey):
    """Eq. (5)-(6) for one sample: ∂L/∂w_k = (ŷ_k − y_k) z, i.e. the outer product z (ŷ − y)ᵀ."""
    W, Z, Y, _ = problem(getkey(), 1, 7, 4, "soft")
    assert_close(sj.grad(W, Z, Y), _eq6_one_sample(W, Z, Y))


@jax.jit
def _eq6_one_sample(W, Z, Y):
    """z (ŷ − y)ᵀ for the first sample: one compiled program (op by op, one per primitive)."""
    z, y = Z[0], Y[0]
    y_hat = jax.nn.softmax(z @ W)
    return jnp.outer(z, y_hat - y)


# ------------------------------------------------------- each line of the derivation on its own


@pytest.mark.x64
@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("weighted", (False, True))
def test_eq4_first_term(getkey, labels, weighted):
    """d/dw_k Σ_k y_k w_kᵀ z = y_k z: summed over samples, Zᵀ diag(s) Y."""
    W, Z, Y, s = problem(getkey(), 30, 5, 6, labels, weighted)
    first_autodiff, first_closed_form = _eq4_first_references(W, Z, Y, s)
    terms = sj.derivation_terms(W, Z, Y, weights=s)
    assert_close(terms.first, first_autodiff)
    assert_close(terms.first, first_closed_form)


@jax.jit
def _eq4_first_references(W, Z, Y, s):
    """The first term by autodiff and in closed form (one compiled program per case)."""
    Yd = jax.nn.one_hot(Y, 6, dtype=jnp.float64) if Y.ndim == 1 else Y  # integer labels: (N,)
    sw = jnp.ones(30) if s is None else s
    first_autodiff = jax.grad(lambda w: jnp.sum(sw[:, None] * Yd * (Z @ w)))(W)
    return first_autodiff, Z.T @ (sw[:, None] * Yd)


@pytest.mark.x64
@pytest.mark.parametrize("weighted", (False, True))
def test_eq4_second_term(getkey, weighted):
    """d/dw_k log Σ_k' exp(w_k'ᵀ z) = ŷ_k z: summed over samples, Zᵀ diag(s) Ŷ."""
    W, Z, Y, s = problem(getkey(), 30, 5, 6, "integer", weighted)
    second_autodiff, second_closed_form = _eq4_second_references(W, Z, s)
    terms = sj.derivation_terms(W, Z, Y, weights=s)
    assert_close(terms.second, second_autodiff)
    assert_close(terms.second, second_closed_form)
    # Eq. (5)/(6): the gradient is the second term minus the first.
    assert_close(terms.grad, sj.grad(W, Z, Y, weights=s))


@jax.jit
def _eq4_second_references(W, Z, s):
    """The second term by autodiff and in closed form (one compiled program per case)."""
    sw = jnp.ones(30) if s is None else s
    second_autodiff = jax.grad(lambda w: jnp.sum(sw * jax.nn.logsumexp(Z @ w, axis=1)))(W)
    return second_autodiff, Z.T @ (sw[:, None] * jax.nn.softmax(Z @ W, axis=1))


@pytest.mark.x64
@pytest.mark.parametrize("labels", LABELS)
def test_eq2_is_sum_over_samples_of_eq3(getkey, labels):
    """Eq. (2) is the sum over i of the single-sample loss (3)."""
    W, Z, Y, _ = problem(getkey(), 12, 4, 5, labels)
    per_sample = jnp.stack([sj.loss(W, Z[i : i + 1], Y[i : i + 1]) for i in range(12)])
    np.testing.assert_allclose(sj.loss(W, Z, Y, reduction="none"), per_sample, rtol=1e-14)
    np.testing.assert_allclose(sj.loss(W, Z, Y), per_sample.sum(), rtol=1e-14)
    # ... and its gradient the sum of the per-sample gradients (6).
    per_grad = sum(sj.grad(W, Z[i : i + 1], Y[i : i + 1]) for i in range(12))
    assert_close(sj.grad(W, Z, Y), per_grad)


@pytest.mark.x64
def test_eq3_value_by_hand(getkey):
    """Eq. (3) for one sample, written out: −[Σ_k y_k w_kᵀ z − log Σ_k' exp(w_k'ᵀ z)]."""
    W, Z, Y, _ = problem(getkey(), 1, 3, 4, "soft")
    a = np.asarray(Z[0] @ W)
    expected = -(np.sum(np.asarray(Y[0]) * a) - np.log(np.sum(np.exp(a))))
    np.testing.assert_allclose(sj.loss(W, Z, Y), expected, rtol=1e-14)


# --------------------------------------------------------------------------- finite differences


def _loss_with_hand_written_derivatives(Z, Y, s, reduction):
    """Eq. (2) as a function of W whose jvp and vjp both use the hand-written gradient, so that
    ``check_grads`` compares eq. (6) itself against finite differences in both modes."""

    @jax.custom_jvp
    def f(W):
        return sj.loss(W, Z, Y, weights=s, reduction=reduction)

    @f.defjvp
    def f_jvp(primals, tangents):
        (W,), (dW,) = primals, tangents
        value, g = sj.value_and_grad(W, Z, Y, weights=s, reduction=reduction)
        return value, jnp.sum(g * dW)

    return f


@pytest.mark.x64
@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("reduction", ("sum", "mean"))
def test_finite_differences(getkey, labels, reduction):
    W, Z, Y, s = problem(getkey(), 10, 4, 5, labels, weighted=True)
    f = _loss_with_hand_written_derivatives(Z, Y, s, reduction)
    check_grads(f, (W,), order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-7, rtol=1e-7)
    # The autodiff reference itself is right too (second order, both modes).
    g = lambda w: sj.loss(w, Z, Y, weights=s, reduction=reduction)  # noqa: E731
    check_grads(g, (W,), order=2, modes=("fwd", "rev"), eps=1e-5)


# ----------------------------------------------------------------------------------- invariants


@pytest.mark.slow
@pytest.mark.x64
@settings(max_examples=10)
@given(
    n=st.integers(1, 30),
    k=st.integers(2, 30),
    labels=st.sampled_from(("integer", "one-hot", "soft")),
    weighted=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_columns_sum_to_zero_when_rows_sum_to_one(n, k, labels, weighted, seed):
    W, Z, Y, s = problem(jax.random.PRNGKey(seed), n, 6, k, labels, weighted)
    g = sj.grad(W, Z, Y, weights=s)
    # Σ_k ∂L/∂w_k = Σ_i s_i z_i (Σ_k ŷ_ik − Σ_k y_ik) = 0: compare with the size of the terms.
    g_max, z_max, column_sum_max = (float(x) for x in _column_sum_sizes(g, Z))
    scale = g_max + z_max
    assert column_sum_max <= 1e-13 * scale * n


@jax.jit
def _column_sum_sizes(g, Z):
    """``max |g|``, ``max |Z|`` and ``max |Σ_k g_k|``: one compiled program per shape (op by op,
    one per primitive and shape)."""
    return jnp.max(jnp.abs(g)), jnp.max(jnp.abs(Z)), jnp.max(jnp.abs(g.sum(axis=1)))


@pytest.mark.x64
def test_column_sum_for_unnormalised_rows(getkey):
    """With rows of Y not summing to one, Σ_k ∂L/∂w_k = Σ_i s_i z_i (1 − Σ_k y_ik) exactly."""
    W, Z, Y, s = problem(getkey(), 25, 6, 7, "unnormalised", weighted=True)
    g = sj.grad(W, Z, Y, weights=s)
    expected = jax.jit(lambda Z, Y, s: Z.T @ (s * (1.0 - Y.sum(axis=1))))(Z, Y, s)
    assert_close(g.sum(axis=1), expected)
    assert rel_err(expected, jnp.zeros_like(expected)) > 1e-3  # the check is not vacuous


@pytest.mark.x64
@settings(max_examples=10)
@given(
    labels=st.sampled_from(LABELS),
    shift_scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_shift_invariance(labels, shift_scale, seed):
    """Adding the same vector v to every w_k leaves the loss unchanged when rows sum to one."""
    key = jax.random.PRNGKey(seed)
    W, Z, Y, _ = problem(key, 15, 4, 6, labels)
    v = shift_scale * jax.random.normal(jax.random.fold_in(key, 1), (4, 1), jnp.float64)
    L0, L1 = sj.loss(W, Z, Y), sj.loss(W + v, Z, Y)
    if labels == "unnormalised":
        # Eq. (2) as written: the loss moves by −Σ_i (Σ_k y_ik − 1) vᵀ z_i.
        expected = _shifted_loss(L0, Z, Y, v)
        np.testing.assert_allclose(L1, expected, rtol=1e-10, atol=1e-9 * shift_scale)
    else:
        np.testing.assert_allclose(L1, L0, rtol=1e-10, atol=1e-10 * shift_scale)
        assert_close(sj.grad(W + v, Z, Y), sj.grad(W, Z, Y), rtol=1e-8)


@jax.jit
def _shifted_loss(L0, Z, Y, v):
    """``L0 − Σ_i (Σ_k y_ik − 1) vᵀ z_i``: one compiled program (op by op, one per primitive)."""
    return L0 - jnp.sum((Y.sum(axis=1) - 1.0) * (Z @ v)[:, 0])


# ------------------------------------------------------------------------------ extreme logits


@pytest.mark.x64
@pytest.mark.parametrize("labels", LABELS)
def test_extreme_logits_exact(getkey, labels):
    """|wᵀz| ~ 1e4: a naive exp overflows; the loss is finite and the gradient exact."""
    W, Z, Y, s = problem(getkey(), 20, 4, 6, labels, weighted=True, scale=5e3)
    max_abs_logit, by_hand = _softmax_eq6(W, Z, Y, s)
    assert float(max_abs_logit) > 5e3
    value, g = sj.value_and_grad(W, Z, Y, weights=s)
    assert np.isfinite(float(value))
    assert_close(g, autodiff_grad(W, Z, Y, s))
    # Eq. (6) by hand with the max-shifted float64 softmax. (Not "ŷ one-hot at the argmax": two
    # logits of a row can still be within a few units of each other at this scale; that failed
    # 48 of 400 draws.)
    assert_close(g, by_hand, rtol=1e-10)


@jax.jit
def _softmax_eq6(W, Z, Y, s):
    """``max |wᵀz|`` and eq. (6) with ŷ the max-shifted softmax of the logits, one compiled
    program per case (op by op, one per primitive)."""
    logits = Z @ W
    Yd = jax.nn.one_hot(Y, 6, dtype=jnp.float64) if Y.ndim == 1 else Y  # integer labels: (N,)
    y_hat = jax.nn.softmax(logits, axis=1)
    return jnp.max(jnp.abs(logits)), Z.T @ (s[:, None] * (y_hat - Yd))


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16, jnp.float16))
@pytest.mark.parametrize("scale", (1.0, 1e2, 5e3))
@pytest.mark.parametrize("labels", ("integer", "soft"))
def test_low_precision_close_to_float64(getkey, dtype, scale, labels):
    """float32/bf16/f16 inputs against float64 on the same rounded inputs (tolerances in
    helpers), in the default configuration."""
    W, Z, Y, s = problem(getkey(), 64, 16, 10, labels, weighted=True, scale=scale, dtype=dtype)
    value, g = sj.value_and_grad(W, Z, Y, weights=s)
    assert g.dtype == dtype
    assert value.dtype == jnp.float32  # bf16/f16 accumulate (and report) in float32
    value64, g64, _ = numpy_reference(W, Z, Y, s)
    assert_close(g, g64, dtype=dtype)
    # The loss is a sum of N terms of size ~|logits|: relative error ~ roundoff of the dtype used
    # for the logits GEMM accumulation (float32 in every case).
    assert abs(float(value) - float(value64)) <= 1e-5 * max(abs(float(value64)), 1.0)


# N ≥ 65536 with reduction="mean" and near-uniform predictions (small W: the start of training):
# the residuals (ŷ − y)/N ~ (1/K)/N ~ 6e-8 lie below float16's smallest normal number (6.1e-5)
# and its subnormal spacing (6e-8); a scale 1/N folded into a float16 operand loses them (the
# gradient was off by 0.16 before the precision policy applied 1/N after the float32 GEMM).
BIG_N, BIG_D, BIG_K = 65536, 32, 256


@functools.cache
def _big_draw():
    key = jax.random.PRNGKey(BIG_N)
    W, Z, y, s = problem(key, BIG_N, BIG_D, BIG_K, "integer", True, 0.01, "float32")
    V = jax.random.normal(jax.random.PRNGKey(1), W.shape, jnp.float32)
    return W, Z, y, s, V


@functools.cache
def _big_problem(dtype_name, weighted):
    W, Z, y, s, V = _big_draw()  # drawn once in float32, rounded to each dtype
    dt = jnp.dtype(dtype_name)
    cast = lambda x: jnp.asarray(np.asarray(x).astype(dt))  # noqa: E731  (on the host, no convert program)
    W, Z, V, s = cast(W), cast(Z), cast(V), cast(s) if weighted else None
    value, g, _ = numpy_reference(W, Z, y, s, "mean")  # float64, on the same rounded inputs
    return W, Z, y, s, V, value, g


@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("fn", ("loss", "grad", "value_and_grad", "hvp", "check_grad"))
@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
def test_narrow_dtypes_at_real_sizes(dtype, fn, weighted):
    """float16/bfloat16 values against float64 at N = 65536, reduction="mean"."""
    W, Z, y, s, V, ref_value, ref_g = _big_problem(dtype, weighted)
    tol = RTOL[jnp.dtype(dtype)]
    if fn == "loss":
        got = sj.loss(W, Z, y, weights=s, reduction="mean")
        np.testing.assert_allclose(float(got), ref_value, rtol=1e-5)
    elif fn == "grad":
        assert_close(sj.grad(W, Z, y, weights=s, reduction="mean"), ref_g, dtype=dtype)
    elif fn == "value_and_grad":
        value, g = sj.value_and_grad(W, Z, y, weights=s, reduction="mean")
        np.testing.assert_allclose(float(value), ref_value, rtol=1e-5)
        assert_close(g, ref_g, dtype=dtype)
    elif fn == "hvp":
        hv = sj.hvp(W, Z, y, V, weights=s, reduction="mean")
        assert_close(hv, numpy_hvp(W, Z, V, s, "mean"), dtype=dtype)
    else:
        report = sj.check_grad(W, Z, y, weights=s, reduction="mean")
        assert report.tol == tol and report.passed, str(report)
        # ... and what it reports is the error against float64, measured here independently.
        g = np.asarray(sj.grad(W, Z, y, weights=s, reduction="mean")).astype(np.float64)
        err = float(np.max(np.abs(g - ref_g)))
        assert abs(report.max_abs_err - err) <= 1e-2 * tol * float(np.max(np.abs(ref_g)))


# ------------------------------------------------------------- targets whose rows don't sum to 1


@pytest.mark.x64
def test_unnormalised_targets_decision(getkey):
    """Decision: any finite real Y is accepted and differentiated exactly as eq. (2) is written
    (the log-partition term once per sample). Then eq. (6) is the exact gradient, though the loss
    is not a cross-entropy; the hand-written gradient equals jax.grad of the loss."""
    W, Z, Y, _ = problem(getkey(), 20, 5, 4, "unnormalised")
    assert float(jnp.max(jnp.abs(Y.sum(axis=1) - 1))) > 0.1
    assert_close(sj.grad(W, Z, Y), autodiff_grad(W, Z, Y))
    Yneg = -Y  # even negative targets: still the exact gradient of eq. (2)
    assert_close(sj.grad(W, Z, Yneg), autodiff_grad(W, Z, Yneg))
