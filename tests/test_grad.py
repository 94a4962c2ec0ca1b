"""sj.grad / sj.value_and_grad / sj.hvp / sj.derivation_terms: API behaviour and values.

Tests run in JAX's default (float32) configuration against float64 NumPy references computed on
the host from the same rounded inputs; those that need float64 inputs are marked ``x64``. The
exactness of eq. (6) itself (to 1e-12) is in test_cross_check.py.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL, assert_close, numpy_hvp, numpy_reference, problem
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import softmax_jax as sj
from softmax_jax import _grad, _loss

X64 = pytest.param(jnp.float64, marks=pytest.mark.x64, id="float64")


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16, jnp.float16, X64))
@pytest.mark.parametrize("labels", ("integer", "one-hot", "soft"))
@pytest.mark.parametrize("reduction", ("sum", "mean"))
def test_values_against_float64(getkey, dtype, labels, reduction):
    W, Z, Y, s = problem(getkey(), 37, 5, 6, labels, weighted=True, dtype=dtype)
    value, g = sj.value_and_grad(W, Z, Y, weights=s, reduction=reduction)
    assert g.shape == (5, 6) and g.dtype == dtype and value.shape == ()
    assert value.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
    ref_value, ref_g, _ = numpy_reference(W, Z, Y, s, reduction)
    assert_close(g, ref_g, dtype=dtype)
    np.testing.assert_allclose(float(value), ref_value, rtol=VALUE_RTOL[jnp.dtype(dtype)])
    # sj.grad on its own, against autodiff of eq. (2) written out plainly (not the package's
    # eq. (6), nor the NumPy eq. (6) above), on the same rounded inputs in float32 or float64.
    # (The exact upcasts on the host; the reference one compiled program per reduction, dtype and
    # label kind, not one per primitive.)
    up = np.float64 if dtype == jnp.float64 else np.float32
    Wu, Zu = jnp.asarray(np.asarray(W, up)), jnp.asarray(np.asarray(Z, up))
    Yu, su = (Y if Y.ndim == 1 else jnp.asarray(np.asarray(Y, up))), jnp.asarray(np.asarray(s, up))
    auto = _plain_grad(Wu, Zu, Yu, su, reduction)
    assert_close(sj.grad(W, Z, Y, weights=s, reduction=reduction), auto, dtype=dtype)


# The loss value's tolerance. Its products z_id w_dk are exact in float32 for bfloat16 and
# float16 inputs (8- and 11-bit significands: products of 16 and 22 bits fit float32's 24), so
# the narrow dtypes lose nothing before the float32 accumulation: what is left is float32's
# summation error, |err| ≤ n·u·Σ|terms| with u = 6e-8 and n ≈ D + K + N = 48 terms here, times the
# condition Σ|terms| / |L| (O(1) for these O(1) logits and losses): 1e-5, float32's own tolerance,
# not the 2e-2 / 5e-3 the *gradient* needs (its residual Ŷ − Y is rounded to the narrow dtype).
# float64: 1e-12 like its gradient.
VALUE_RTOL = {
    jnp.dtype(t): RTOL[jnp.dtype(jnp.float32)] for t in (jnp.float32, jnp.bfloat16, jnp.float16)
}
VALUE_RTOL[jnp.dtype(jnp.float64)] = RTOL[jnp.dtype(jnp.float64)]


def _plain_loss(W, Z, Y, s, reduction):
    """Eq. (2) written out: Σ_i c_i (log Σ_k exp a_ik − Σ_k y_ik a_ik), c_i = s_i or s_i / Σ s."""
    A = Z @ W
    T = jax.nn.one_hot(Y, W.shape[1], dtype=A.dtype) if Y.ndim == 1 else Y
    per = jax.scipy.special.logsumexp(A, axis=1) - jnp.sum(T * A, axis=1)
    c = s / jnp.sum(s) if reduction == "mean" else s
    return jnp.sum(c * per)


_plain_grad = jax.jit(jax.grad(_plain_loss), static_argnums=4)


@pytest.mark.x64
def test_mixed_precision_features_and_weights(getkey):
    W, Z, y, _ = problem(getkey(), 9, 4, 6, "integer")
    g = sj.grad(W.astype(jnp.float32), Z, y)  # f32 W, f64 Z: returned in W's dtype
    assert g.dtype == jnp.float32
    assert_close(g, sj.grad(W, Z, y), rtol=1e-6)


def test_mean_is_sum_over_weight_total(getkey):
    W, Z, y, s = problem(getkey(), 12, 4, 6, "integer", weighted=True, dtype=jnp.float32)
    v_sum, g_sum = sj.value_and_grad(W, Z, y, weights=s)
    v_mean, g_mean = sj.value_and_grad(W, Z, y, weights=s, reduction="mean")
    np.testing.assert_allclose(v_mean, v_sum / s.sum(), rtol=1e-6)
    assert_close(g_mean, g_sum / s.sum(), dtype=jnp.float32)


def test_jit_and_vmap(getkey):
    W, Z, y, _ = problem(getkey(), 10, 4, 5, "integer", dtype=jnp.float32)
    ref = sj.grad(W, Z, y)
    np.testing.assert_allclose(jax.jit(sj.grad)(W, Z, y), ref, rtol=1e-6)
    # vmap over a batch of problems (e.g. an ensemble of weight matrices).
    Ws = jnp.stack([W, 0.5 * W])
    batched = jax.vmap(sj.grad, in_axes=(0, None, None))(Ws, Z, y)
    assert_close(batched[1], numpy_reference(0.5 * W, Z, y)[1], dtype=jnp.float32)
    # vmap over samples of a per-sample gradient: sums to the full gradient.
    per = jax.vmap(lambda z, t: sj.grad(W, z[None], t[None]))(Z, y)
    assert_close(per.sum(axis=0), ref, dtype=jnp.float32)


@pytest.mark.parametrize("reduction", ("sum", "mean"))
def test_second_derivative_through_grad(getkey, reduction):
    """Autodiff through the hand-written gradient: d/dt grad(W + tV) = H V (sj.hvp, NumPy)."""
    W, Z, y, s = problem(getkey(), 16, 4, 5, "integer", weighted=True, dtype=jnp.float32)
    V = jax.random.normal(getkey(), W.shape, jnp.float32)
    g = lambda w: sj.grad(w, Z, y, weights=s, reduction=reduction)  # noqa: E731
    jvp = jax.jvp(g, (W,), (V,))[1]
    vjp = jax.vjp(g, W)[1](V)[0]  # the Hessian is symmetric: the vjp is the same H V
    ref = numpy_hvp(W, Z, V, s, reduction)
    for hv in (jvp, vjp, sj.hvp(W, Z, y, V, weights=s, reduction=reduction)):
        assert_close(hv, ref, dtype=jnp.float32)


def test_hvp_takes_y_as_grad_does_and_ignores_its_values(getkey):
    """The Hessian of eq. (2) does not depend on Y; a Y that grad rejects, hvp rejects too."""
    W, Z, y, _ = problem(getkey(), 8, 3, 4, "integer", dtype=jnp.float32)
    V = jax.random.normal(getkey(), W.shape, jnp.float32)
    soft = jax.nn.softmax(jax.random.normal(getkey(), (8, 4)), axis=-1)
    hv = sj.hvp(W, Z, y, V)
    for other in ((y + 1) % 4, soft):
        assert_close(sj.hvp(W, Z, other, V), hv, dtype=jnp.float32)
    for fn in (sj.grad, lambda W, Z, Y: sj.hvp(W, Z, Y, V)):
        with pytest.raises(ValueError, match="`Y`"):
            fn(W, Z, y[:-1])


def test_reduction_none_rejected(getkey):
    W, Z, y, _ = problem(getkey(), 4, 3, 5, "integer", dtype=jnp.float32)
    for fn in (sj.grad, sj.value_and_grad):
        with pytest.raises(ValueError, match=r"`reduction` must be 'sum' or 'mean'.*got 'none'"):
            fn(W, Z, y, reduction="none")


def _nk_nonfloat_buffers(fn, args, n, k):
    """(N, K) arrays of a non-float type (a one-hot or mask) materialised by the compiled program.

    Instructions inside fusions compute in registers; only top-level instructions of the entry
    computation own buffers."""
    text = fn.lower(*args).compile().as_text()
    entry = text.split("\nENTRY", 1)[-1]
    pattern = rf"= (pred|s8|u8|s16|u16|s32|u32|s64|u64)\[{n},{k}\]"
    return [line.strip() for line in entry.splitlines() if re.search(pattern, line)]


def test_integer_labels_never_build_one_hot(getkey):
    """No (N, K) boolean/integer buffer exists in the compiled program for integer labels."""
    n, d, k = 37, 3, 11
    W, Z, y, _ = problem(getkey(), n, d, k, "integer", dtype=jnp.float32)
    for public in (sj.value_and_grad, sj.grad):
        assert _nk_nonfloat_buffers(jax.jit(public), (W, Z, y), n, k) == []
    # ... whereas a materialised one-hot is caught by the same scan:
    onehot = jax.jit(lambda y: (jax.nn.one_hot(y, k) == 1, jnp.sum(y)))
    assert _nk_nonfloat_buffers(onehot, (y,), n, k)


def test_out_of_range_label_under_jit_poisons_gradient(getkey):
    W, Z, y, _ = problem(getkey(), 6, 3, 4, "integer", dtype=jnp.float32)
    for bad in (9, -1):
        value, g = jax.jit(sj.value_and_grad)(W, Z, y.at[1].set(bad))
        assert bool(jnp.isnan(value)) and bool(jnp.all(jnp.isnan(g)))


# --------------------------------------------------------------------------------- eq. (4) terms


@pytest.mark.parametrize("labels", ("integer", "one-hot", "soft"))
def test_derivation_terms(getkey, labels):
    """Each term of eq. (4) against its closed form in NumPy: first = Zᵀ diag(s) Y, second =
    Zᵀ diag(s) Ŷ; their difference is sj.grad."""
    W, Z, Y, s = problem(getkey(), 14, 4, 5, labels, weighted=True, dtype=jnp.float32)
    t = sj.derivation_terms(W, Z, Y, weights=s)
    assert isinstance(t, sj.DerivationTerms)
    Zs = np.asarray(Z, np.float64) * np.asarray(s, np.float64)[:, None]
    T = np.eye(5)[np.asarray(Y)] if labels == "integer" else np.asarray(Y, np.float64)
    A = np.asarray(Z, np.float64) @ np.asarray(W, np.float64)
    P = np.exp(A - A.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    assert_close(t.first, Zs.T @ T, dtype=jnp.float32)
    assert_close(t.second, Zs.T @ P, dtype=jnp.float32)
    assert_close(t.grad, sj.grad(W, Z, Y, weights=s), dtype=jnp.float32)


def test_derivation_terms_out_of_range_label_under_jit_is_nan(getkey):
    """The NaN policy of the other functions: a bad label is never dropped silently."""
    W, Z, y, _ = problem(getkey(), 6, 3, 4, "integer", dtype=jnp.float32)
    for bad in (9, -1):
        t = jax.jit(sj.derivation_terms)(W, Z, y.at[1].set(bad))
        assert bool(jnp.all(jnp.isnan(t.second))) and bool(jnp.all(jnp.isnan(t.grad)))
        assert bool(jnp.any(jnp.isnan(t.first)))


# ---------------------------------------------------------------------- Hessian-vector product


@pytest.mark.x64
@pytest.mark.parametrize("labels", ("integer", "soft", "unnormalised"))
@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize("weighted", (False, True))
def test_hvp_matches_autodiff(getkey, labels, reduction, weighted):
    W, Z, Y, s = problem(getkey(), 15, 4, 6, labels, weighted)
    V = jax.random.normal(getkey(), W.shape, jnp.float64)
    ref = _autodiff_hvp(W, Z, Y, s, V, reduction)
    assert_close(sj.hvp(W, Z, Y, V, weights=s, reduction=reduction), ref)


@functools.partial(jax.jit, static_argnums=5)
def _autodiff_hvp(W, Z, Y, s, V, reduction):
    """Forward-over-reverse autodiff of sj.loss along ``V``: one compiled program per case."""
    f = lambda w: sj.loss(w, Z, Y, weights=s, reduction=reduction)  # noqa: E731
    return jax.jvp(jax.grad(f), (W,), (V,))[1]


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16, jnp.float16))
def test_hvp_values_in_narrow_dtypes(getkey, dtype):
    W, Z, y, s = problem(getkey(), 40, 4, 6, "integer", weighted=True, dtype=dtype)
    V = jax.random.normal(getkey(), W.shape, jnp.float32).astype(dtype)
    hv = sj.hvp(W, Z, y, V, weights=s)
    assert hv.dtype == dtype
    assert_close(hv, numpy_hvp(W, Z, V, s), dtype=dtype)


@pytest.mark.x64
def test_hvp_is_symmetric_psd(getkey):
    W, Z, y, _ = problem(getkey(), 20, 3, 4, "integer")
    U = jax.random.normal(getkey(), W.shape, jnp.float64)
    V = jax.random.normal(getkey(), W.shape, jnp.float64)
    uHv = jnp.sum(U * sj.hvp(W, Z, y, V))
    vHu = jnp.sum(V * sj.hvp(W, Z, y, U))
    np.testing.assert_allclose(uHv, vHu, rtol=1e-12)
    assert float(jnp.sum(V * sj.hvp(W, Z, y, V))) >= 0
    # The Hessian annihilates the shift direction (the same vector added to every w_k).
    shift = jnp.broadcast_to(jax.random.normal(getkey(), (3, 1), jnp.float64), W.shape)
    assert float(jnp.max(jnp.abs(sj.hvp(W, Z, y, shift)))) < 1e-12


def test_hvp_bad_direction(getkey):
    W, Z, y, _ = problem(getkey(), 5, 3, 4, "integer", dtype=jnp.float32)
    with pytest.raises(
        ValueError, match=r"`V` must have the shape of `W` .* \(3, 4\), got \(4, 3\)"
    ):
        sj.hvp(W, Z, y, jnp.zeros((4, 3)))


# --------------------------------------------------------------------- strict dtype promotion

# equinox's test setting, used by many research codebases: no implicit promotion between float
# types that do not promote in the lattice (float32 with bfloat16/float16, bf16 with f16).
MIXED = [
    ("W f32, Z bf16", jnp.float32, jnp.bfloat16, None),
    ("W bf16, Z f32", jnp.bfloat16, jnp.float32, None),
    ("W f32, Z f16", jnp.float32, jnp.float16, None),
    ("W f32, Z f32, weights bf16", jnp.float32, jnp.float32, jnp.bfloat16),
]
FUNCTIONS = {
    "loss": lambda W, Z, y, s: sj.loss(W, Z, y, weights=s, reduction="mean"),
    "grad": lambda W, Z, y, s: sj.grad(W, Z, y, weights=s, reduction="mean"),
    "value_and_grad": lambda W, Z, y, s: sj.value_and_grad(W, Z, y, weights=s),
    "hvp": lambda W, Z, y, s: sj.hvp(W, Z, y, W, weights=s),
    "derivation_terms": lambda W, Z, y, s: sj.derivation_terms(W, Z, y, weights=s),
    "check_grad": lambda W, Z, y, s: sj.check_grad(W, Z, y, weights=s).max_rel_err,
    "linear_cross_entropy": lambda W, Z, y, s: sj.linear_cross_entropy(Z, W, y, weights=s),
}


@pytest.mark.parametrize("fn", sorted(FUNCTIONS))
@pytest.mark.parametrize("case, w_dtype, z_dtype, s_dtype", MIXED, ids=[m[0] for m in MIXED])
def test_strict_dtype_promotion(getkey, fn, case, w_dtype, z_dtype, s_dtype):
    """Mixed input dtypes under jax_numpy_dtype_promotion="strict" give what they give under
    the standard promotion (the library casts explicitly, never promotes implicitly)."""
    W, Z, y, s = problem(getkey(), 24, 4, 5, "integer", weighted=True, dtype=jnp.float32)
    cast = lambda x, dtype: jnp.asarray(np.asarray(x).astype(dtype))  # noqa: E731  (on the host)
    W, Z = cast(W, w_dtype), cast(Z, z_dtype)
    s = None if s_dtype is None else cast(s, s_dtype)
    expected = FUNCTIONS[fn](W, Z, y, s)
    with jax.numpy_dtype_promotion("strict"):
        got = FUNCTIONS[fn](W, Z, y, s)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mean_of_one_row_no_rows_and_zero_weights(getkey):
    # the mean's normaliser at its edges: N = 1 (divides by 1), N = 0 and all-zero weights
    # (every term is zero: a zero gradient and value, not NaN or a division error)
    W, Z, y, _ = problem(getkey(), 1, 4, 3, "integer", dtype=jnp.float32)
    value, g = sj.value_and_grad(W, Z, y, reduction="mean")
    ref_value, ref_g, _ = numpy_reference(W, Z, y)
    assert_close(g, ref_g, dtype=jnp.float32)
    np.testing.assert_allclose(float(value), ref_value, rtol=1e-6)
    for rows, weights in ((Z[:0], None), (Z, jnp.zeros(1))):
        labels = y[: rows.shape[0]]
        value, g = sj.value_and_grad(W, rows, labels, weights=weights, reduction="mean")
        assert float(value) == 0.0 and np.array_equal(g, np.zeros((4, 3))), (value, g)
        assert np.array_equal(sj.hvp(W, rows, labels, W, weights=weights, reduction="mean"), g)


def test_mean_is_invariant_to_the_weights_scale(getkey):
    # 1 / Σ s for any Σ s > 0, below 1 too: weights scaled by 1e-3 give the same mean
    W, Z, y, s = problem(getkey(), 8, 4, 3, "integer", weighted=True, dtype=jnp.float32)
    v1, g1 = sj.value_and_grad(W, Z, y, weights=s, reduction="mean")
    v2, g2 = sj.value_and_grad(W, Z, y, weights=1e-3 * s / s.sum(), reduction="mean")
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    assert_close(g2, g1, dtype=jnp.float32)


def _dot_generals(jaxpr):
    import jax.extend.core

    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _dot_generals(sub)


@pytest.mark.parametrize("fn", ("loss", "grad", "value_and_grad", "hvp"))
@pytest.mark.parametrize(
    "case, w_dtype, z_dtype, s_dtype", MIXED[:3], ids=[m[0] for m in MIXED[:3]]
)
def test_gemm_operands_in_W_dtype_accumulated_in_float32(
    getkey, fn, case, w_dtype, z_dtype, s_dtype
):
    # the precision policy (_precision): every GEMM takes its operands in W's dtype (Z cast to
    # it, whichever is wider) and accumulates in float32; the values alone do not show a mixed
    # or a narrow GEMM (their errors stay within the tolerances)
    W, Z, y, _ = problem(getkey(), 6, 4, 3, "integer", dtype=jnp.float32)
    jaxpr = jax.make_jaxpr(FUNCTIONS[fn])(W.astype(w_dtype), Z.astype(z_dtype), y, None)
    dots = list(_dot_generals(jaxpr.jaxpr))
    assert dots
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.dtype(w_dtype)] * 2, eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn


@pytest.mark.parametrize("k", [1, 3, 20, 257])  # 257: past HALVING_MAX_CLASSES
@pytest.mark.parametrize("weighted", [False, True])
def test_class_major_residuals_are_the_transposed_row_major_ones(k, weighted):
    # Newton-CG's passes over transposed features form M and the HVP's R class-major (K, N):
    # the same numbers as the (N, K) ones, transposed; an out-of-range label still gives NaN
    n = 6
    rng = np.random.default_rng(k)
    A = jnp.asarray(rng.normal(size=(n, k)) * 3, jnp.float32)
    ZV = jnp.asarray(rng.normal(size=(n, k)), jnp.float32)
    y = jnp.asarray(rng.integers(0, k, n), jnp.int32).at[2].set(k)  # row 2 out of range
    c = jnp.asarray(rng.random(n), jnp.float32) if weighted else None
    r = jax.device_get(_class_major_residuals(A, ZV, y, c))  # NumPy arrays: no compile per op
    M = r["M"]
    np.testing.assert_allclose(r["M_t"], M.T, rtol=1e-6)
    assert np.isnan(M[2]).all() and not np.isnan(np.delete(np.asarray(M), 2, 0)).any()
    np.testing.assert_allclose(r["soft_t"], r["soft"].T, rtol=1e-6)
    np.testing.assert_allclose(r["R_t"], r["R"].T, rtol=1e-5, atol=1e-7)


@jax.jit
def _class_major_residuals(A, ZV, y, c):
    """The residuals compared above, row-major on ``A`` (N, K) and class-major on ``Aᵀ`` (K, N),
    as one compiled program per shape (op by op, each primitive compiled its own)."""
    _, E, S = _loss.logsumexp_rows(A)
    _, E_t, S_t = _loss.logsumexp_rows(A.T, 0)
    Y = jax.nn.one_hot(y, A.shape[1])
    P = E / S
    return {
        "M": _grad.residual(A, E, S, y, c, True),
        "M_t": _grad.residual(A.T, E_t, S_t, y, c, True, 0),
        "soft": _grad.residual(A, E, S, Y, c, False),
        "soft_t": _grad.residual(A.T, E_t, S_t, Y.T, c, False, 0),
        "R": _grad.hvp_residual(P, ZV, c),
        "R_t": _grad.hvp_residual(P.T, ZV.T, c, 0),
    }


@pytest.mark.x64
@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    k=st.integers(2, 7),
    n=st.integers(1, 6),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_softmax_variance_is_exact_on_saturated_rows(data, k, n, dtype):
    # logits with one class 0 to 60 above the others: ŷ_top rounds to 1, and 1 − ŷ_top to 0 in
    # the plain ŷ(1 − ŷ), which leaves the top class no curvature. The exact value is ŷ_top times
    # the sum of the other classes' ŷ, relative rounding for every entry, in both layouts
    A = data.draw(hnp.arrays(np.float64, (n, k), elements=st.floats(-3, 3)))
    top = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    A[np.arange(n), top] += data.draw(hnp.arrays(np.float64, (n,), elements=st.floats(0, 60)))
    E = np.exp(A - A.max(axis=1, keepdims=True))
    P = (E / E.sum(axis=1, keepdims=True)).astype(dtype)
    P64 = P.astype(np.float64)  # the reference from the same probabilities, in float64
    want = P64 * np.array([[np.sum(np.delete(r, j)) if r[j] > 0.5 else 1 - r[j]
                            for j in range(k)] for r in P64])  # fmt: skip
    rtol = 4 * np.finfo(dtype).eps * k  # a sum of k terms and a product, each rounded once
    got = jax.jit(_grad.softmax_variance)(jnp.asarray(P))
    got_t = jax.jit(_grad.softmax_variance, static_argnums=1)(jnp.asarray(P.T), 0)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=0)
    np.testing.assert_allclose(np.asarray(got_t, np.float64).T, want, rtol=rtol, atol=0)
