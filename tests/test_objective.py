"""The training objective (``_objective``): the value, hand-written gradient, Hessian-vector
product and Hessian diagonal with a bias and sample weights, against autodiff and against the core's
public functions on ``Z`` augmented with a column of ones; one pass and the chunked passes agree
(row counts past the chunking threshold, with a remainder and in chunks of a divisor)."""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import softmax_jax as sj
from softmax_jax import _objective
from softmax_jax._objective import (
    CHUNK_ROWS,
    Columns,
    TrainData,
    chunk_rows,
    data_vg,
    evaluate,
    hessian_diag,
    hessian_matrix,
    hessian_probs,
    hessian_vp,
    objective_vg,
    transposed,
)
from softmax_jax._placement import place

# Exactness checks against float64 references: x64 on for this module (scoped, see conftest).
pytestmark = pytest.mark.x64

#: Rows that run chunk by chunk: 4 whole chunks and a remainder of 47 (16431 has no divisor in
#: ``[CHUNK_ROWS / 2, CHUNK_ROWS]``).
CHUNKED_N = 4 * CHUNK_ROWS + 47
#: Rows that run in chunks of a divisor: 5 chunks of 4000, no remainder.
DIVIDED_N = 20000


def reference_objective(params, Z, y, l2, s=None):
    """``f`` written with jax.numpy, differentiated by autodiff below."""
    A = Z @ params["W"] + params["b"]
    per = jax.nn.logsumexp(A, axis=1) - jnp.take_along_axis(A, y[:, None], axis=1)[:, 0]
    s = jnp.ones_like(per) if s is None else s
    return jnp.sum(s * per) / jnp.sum(s) + 0.5 * l2 * jnp.sum(params["W"] ** 2)


def random_problem(getkey, n, d, k, weighted):
    params = {"W": jax.random.normal(getkey(), (d, k)), "b": jax.random.normal(getkey(), (k,))}
    V = {"W": jax.random.normal(getkey(), (d, k)), "b": jax.random.normal(getkey(), (k,))}
    Z = jax.random.normal(getkey(), (n, d))
    y = jax.random.randint(getkey(), (n,), 0, k)
    s = jax.random.uniform(getkey(), (n,)) if weighted else None
    return params, V, Z, y, s


def augmented(params, Z):
    """``[Z, 1]`` and ``[W; b]``: eq. (2) with the bias as a weight row."""
    Z1 = jnp.concatenate([Z, jnp.ones((Z.shape[0], 1), Z.dtype)], 1)
    return Z1, jnp.concatenate([params["W"], params["b"][None]], 0)


@given(st.integers(0, 1 << 22) | st.integers(4 * CHUNK_ROWS - 2, 4 * CHUNK_ROWS + 2))
def test_chunk_rows_divides_the_rows_where_a_chunk_size_near_chunk_rows_can(n):
    c = chunk_rows(n)
    if n < 4 * CHUNK_ROWS:
        assert c is None
        return
    divisors = [m for m in range(CHUNK_ROWS // 2, CHUNK_ROWS + 1) if n % m == 0]
    assert c == (max(divisors) if divisors else CHUNK_ROWS)


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("n", [45, CHUNKED_N, DIVIDED_N])
@pytest.mark.parametrize("weighted", [False, True])
def test_value_gradient_and_hessian_products_match_the_core_on_augmented_features(
    getkey, n, weighted, layout
):
    # "columns": the features stored transposed (Newton-CG's Hessian operand), whose passes run
    # whole except the diagonal's (its squares are formed chunk by chunk)
    d, k, l2 = 3, 4, 0.2
    params, V, Z, y, s = random_problem(getkey, n, d, k, weighted)
    assert chunk_rows(n) == {45: None, CHUNKED_N: CHUNK_ROWS, DIVIDED_N: 4000}[n]
    Zs = Z if layout == "rows" else transposed(Z, Z.dtype)
    data = TrainData(Zs, y, s)  # float64 Hessian operands: exact comparisons
    v, g = jax.jit(data_vg)(params, data)
    P = jax.jit(hessian_probs)(params, data)
    hv = jax.jit(functools.partial(hessian_vp, probs=P))(params, V, data, l2)
    Z1, Wb = augmented(params, Z)
    ref_v, ref_G = sj.value_and_grad(Wb, Z1, y, weights=s, reduction="mean")
    assert float(v) == pytest.approx(float(ref_v), rel=1e-12)
    np.testing.assert_allclose(g["W"], ref_G[:-1], rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(g["b"], ref_G[-1], rtol=1e-11, atol=1e-14)
    Vb = jnp.concatenate([V["W"], V["b"][None]], 0)
    ref_hv = sj.hvp(Wb, Z1, y, Vb, weights=s, reduction="mean")
    np.testing.assert_allclose(hv["W"], ref_hv[:-1] + l2 * V["W"], rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(hv["b"], ref_hv[-1], rtol=1e-11, atol=1e-14)
    # the diagonal from the cached softmax is the one computed from scratch, and the Hessian's
    # diagonal of the augmented problem
    diag = jax.jit(hessian_diag)
    d1, d0 = diag(params, data, l2, probs=P), diag(params, data, l2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-14), d1, d0)
    c = np.ones(n) if s is None else np.asarray(s)
    Pn = np.asarray(P if layout == "rows" else P.by_rows())  # the softmax stored like Z
    ref_diag = (np.asarray(Z1) ** 2).T @ (Pn * (1 - Pn) * (c / c.sum())[:, None])
    np.testing.assert_allclose(d1["W"], ref_diag[:-1] + l2, rtol=1e-11)
    np.testing.assert_allclose(d1["b"], ref_diag[-1], rtol=1e-11)


def test_objective_gradient_hvp_and_diagonal_match_autodiff(getkey):
    n, d, k, l2 = 29, 4, 3, 0.3
    params, V, Z, y, s = random_problem(getkey, n, d, k, True)
    data = TrainData(Z, y, s)

    @jax.jit
    def ours(params, V, data):
        value, grad = objective_vg(params, data, l2)
        auto = jax.grad(_objective.objective)(params, data, l2)  # custom_vjp: the hand-written grad
        hv = hessian_vp(params, V, data, l2)
        return value, grad, auto, hv, hessian_diag(params, data, l2)

    @jax.jit
    def reference(params, V):
        f = functools.partial(reference_objective, Z=Z, y=y, l2=l2, s=s)
        value, grad = jax.value_and_grad(f)(params)
        hv = jax.jvp(jax.grad(f), (params,), (V,))[1]
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        return value, grad, hv, jnp.diag(jax.hessian(lambda x: f(unravel(x)))(flat))

    value, grad, auto, hv, diag = ours(params, V, data)
    ref_v, ref_g, ref_hv, ref_diag = reference(params, V)
    assert float(value) == pytest.approx(float(ref_v), rel=1e-13)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-11, atol=1e-13)
    jax.tree.map(close, grad, ref_g)
    jax.tree.map(close, auto, ref_g)  # what optax's line search differentiates
    jax.tree.map(close, hv, ref_hv)
    close(jax.flatten_util.ravel_pytree(diag)[0], ref_diag)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_hessian_operand_gives_float32_products(getkey, dtype):
    # the Hessian products and diagonal run in the operand's dtype, returned in the params'
    params, V, Z, y, s = random_problem(getkey, 40, 5, 3, False)
    data = TrainData(Z, y, s, Z.astype(dtype))
    assert hessian_probs(params, data).dtype == dtype
    columns = TrainData(Z, y, s, transposed(Z, dtype))
    assert isinstance(columns.Zh, Columns) and hessian_probs(params, columns).dtype == dtype
    exact = TrainData(Z, y, s)
    for fn in (lambda dt: hessian_vp(params, V, dt, 0.1), lambda dt: hessian_diag(params, dt, 0.1)):
        got, ref, got_t = fn(data), fn(exact), fn(columns)
        assert got["W"].dtype == got_t["W"].dtype == jnp.float64
        tol = 1e-5 if dtype == np.float32 else 1e-13
        for g in (got, got_t):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), g, ref)


def test_all_zero_weights_evaluate_to_zero_not_nan(getkey):
    params, _, Z, y, _ = random_problem(getkey, 10, 3, 4, False)
    data = TrainData(Z, y, jnp.zeros(10))
    v, g = data_vg(params, data)
    nll, acc = evaluate(params, data)
    for x in (v, g["W"], g["b"], nll, acc):
        assert np.all(np.asarray(x) == 0)


def test_huge_tied_logits_keep_log_k():
    """Logits ~1e30 tied across the classes: ``lse − a_y`` cancels to 0 in float32, the objective's
    ``(m − a_y) + log Σ exp(a − m)`` keeps the exact ``N log K`` (value and predict_stats)."""
    n, d, k = 5, 3, 4
    Z = jnp.full((n, d), 1e15, jnp.float32)
    params = {"W": jnp.full((d, k), 1e15 / 3, jnp.float32), "b": jnp.zeros((k,), jnp.float32)}
    y = jnp.arange(n) % k
    value, _, A = _objective.vg_sum(params, Z, y, None)
    assert float(jnp.max(jnp.abs(A))) > 1e29  # the regime where lse − a_y cancels
    np.testing.assert_allclose(float(value), n * np.log(k), rtol=1e-6)
    total, _ = _objective.predict_stats(params, _objective.TrainData(Z, y, None))
    np.testing.assert_allclose(float(total), n * np.log(k), rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 7, 20])
def test_centred_basis_is_orthonormal_and_sums_to_zero(k):
    # the exact Newton steps map d = D Bᵀ back: B must span the zero-sum vectors orthonormally
    B = np.asarray(_objective.centred_basis(k, jnp.float64))
    assert B.shape == (k, k - 1)
    np.testing.assert_allclose(B.T @ B, np.eye(k - 1), atol=1e-15)
    np.testing.assert_allclose(B.sum(axis=0), 0, atol=1e-15)


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_hessian_matrix_is_autodiffs_hessian(getkey, layout, bias, weighted):
    # the exact Newton steps' matrix over V ([W; b] = V Bᵀ, flattened row by row) against
    # jax.hessian of the plainly written objective over [W; b] restricted to that subspace; its
    # products are the HVP's
    n, d, l2 = 23, 3, 0.3
    for k in (4, 3, 2):
        params, V, Z, y, s = random_problem(getkey, n, d, k, weighted)
        if not bias:
            params, V = {"W": params["W"]}, {"W": V["W"]}
        Zs = Z if layout == "rows" else transposed(Z, Z.dtype)
        data = TrainData(Zs, y, s)
        H = jax.jit(hessian_matrix)(params, data, l2)

        @jax.jit
        @jax.hessian
        def hessian(flat, Z, y, s):  # jitted: one program, not autodiff's operations one by one
            W = flat.reshape(d + bias, k)
            p = {"W": W[:d], "b": W[d] if bias else jnp.zeros(k)}
            return reference_objective(p, Z, y, l2, s)

        B = np.asarray(_objective.centred_basis(k, jnp.float64))
        lift = np.kron(np.eye(d + bias), B)  # vec(V) -> vec(V Bᵀ)
        flat = _objective.stack(params).reshape(-1)
        q = (d + bias) * (k - 1)
        assert H.shape == (q, q) and H.dtype == jnp.float64
        np.testing.assert_allclose(
            H, lift.T @ hessian(flat, Z, y, s) @ lift, rtol=1e-12, atol=1e-14
        )
        Vc = _objective.stack(V) @ B  # a direction in V's coordinates
        hv = jax.jit(hessian_vp)(params, _objective.unstack(Vc @ B.T, V), TrainData(Z, y, s), l2)
        np.testing.assert_allclose(H @ Vc.reshape(-1), (_objective.stack(hv) @ B).reshape(-1),
                                   rtol=1e-11, atol=1e-14)  # fmt: skip


def pairwise_hessian(params, Z, l2):
    """``∇²f`` over ``V`` in NumPy from ``diag ŷ − ŷŷᵀ = Σ_{k<l} ŷ_k ŷ_l (e_k − e_l)(e_k − e_l)ᵀ``:
    a sum of products, exact on saturated rows (where ``ŷ_k (1 − ŷ_k)`` rounds to 0)."""
    W, b = np.asarray(params["W"]), np.asarray(params["b"])
    A = Z @ W + b
    P = np.exp(A - A.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    n, k = P.shape
    B = np.asarray(_objective.centred_basis(k, jnp.float64))
    X = np.concatenate([Z, np.ones((n, 1))], axis=1)
    H = 0.0
    for a in range(k):
        for c in range(a + 1, k):
            u = B[a] - B[c]
            w = P[:, a] * P[:, c] / n
            H = H + np.kron((X * w[:, None]).T @ X, np.outer(u, u))
    q = H.shape[0]
    return H + np.diag(np.where(np.arange(q) < Z.shape[1] * (k - 1), l2, 0.0))


@given(
    st.integers(2, 6).flatmap(
        lambda k: st.lists(
            st.lists(st.sampled_from([-2.0, 0.0, 0.0, 1.0, 5.0]), min_size=k, max_size=k),
            min_size=1,
            max_size=8,
        )
    )
)
def test_softmax_curvature_is_the_projected_softmax_jacobian_also_with_ties(logits):
    # logits from a few values: rows with two or more tied top classes (a zero start ties all);
    # moderate logits, where the plain formula is accurate to rounding
    A = np.asarray(logits)
    P = np.exp(A - A.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    B = np.asarray(_objective.centred_basis(A.shape[1], jnp.float64))
    want = np.einsum("kj,nkl,lm->njm", B, P[:, :, None] * np.eye(A.shape[1])
                     - P[:, :, None] * P[:, None, :], B)  # fmt: skip
    got = jax.jit(_objective.softmax_curvature)(jnp.asarray(P), jnp.asarray(B))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_hessian_matrix_keeps_the_curvature_of_saturated_rows(k):
    # every row saturated (the top logit 30-40 above the others: 1 - ŷ_max below float64's ε):
    # the curvature, 1e-13 to 1e-18 per row, comes from products, not differences of O(1) terms
    # that would leave rounding noise of either sign; without a penalty it is positive definite
    rng = np.random.default_rng(k)
    n, d = 40, 3
    Z = rng.normal(size=(n, d))
    y = rng.integers(0, k, n)
    A = rng.uniform(-1, 1, size=(n, k))
    A[np.arange(n), y] += rng.uniform(30, 40, size=n)
    # the logits as features, which W selects: Z W + b = A exactly
    Zk = np.concatenate([Z, A], axis=1)
    params = {"W": jnp.asarray(np.vstack([np.zeros((d, k)), np.eye(k)])), "b": jnp.zeros(k)}
    H = jax.jit(hessian_matrix)(params, TrainData(jnp.asarray(Zk), jnp.asarray(y), None), 0.0)
    ref = pairwise_hessian(params, Zk, 0.0)
    assert np.max(np.abs(ref)) < 1e-10
    np.testing.assert_allclose(H, ref, rtol=1e-10, atol=1e-12 * np.max(np.abs(ref)))
    assert np.min(np.linalg.eigvalsh(np.asarray(H))) > 0


@pytest.mark.parametrize("layout", ["rows", "columns", "sparse"])
def test_float32_hessian_diagonal_keeps_the_curvature_of_saturated_rows(layout):
    # Newton-CG's preconditioner on a float32 operand, every row saturated (the top logit 20-30
    # above the others: 1 − ŷ_top rounds to 0 in float32). A class's diagonal comes mostly from
    # the rows it tops, ŷ_top times the sum of the others; the plain ŷ(1 − ŷ) drops them
    import scipy.sparse

    rng = np.random.default_rng(3)
    n, d, k, l2 = 64, 3, 4, 1e-12
    y = rng.integers(0, k, n)
    A = rng.uniform(-1, 1, size=(n, k))
    A[np.arange(n), y] += rng.uniform(20, 30, size=n)
    Z = np.concatenate([rng.normal(size=(n, d)), A], axis=1)  # Z W = A for W = [0; I]
    params = {"W": jnp.asarray(np.vstack([np.zeros((d, k)), np.eye(k)])), "b": jnp.zeros(k)}
    if layout == "sparse":
        data = place(scipy.sparse.csr_matrix(Z), y, None, fit_intercept=True, dtype=np.float64,
                     device=None)  # fmt: skip
        data = data._replace(Zh=data.Z.astype(jnp.float32))
    else:
        Zh = (
            jnp.asarray(Z, jnp.float32)
            if layout == "rows"
            else transposed(jnp.asarray(Z), jnp.float32)
        )
        data = TrainData(jnp.asarray(Z), jnp.asarray(y), None, Zh)
    got = jax.jit(hessian_diag)(params, data, l2)
    A32 = Z.astype(np.float32).astype(np.float64) @ np.asarray(params["W"])  # the float32 logits
    P = np.exp(A32 - A32.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    V = P * np.array([[np.sum(np.delete(r, j)) if r[j] > 0.5 else 1 - r[j] for j in range(k)]
                      for r in P])  # fmt: skip
    want = (Z**2).T @ V / n
    # float32 probabilities of 1e-9..1e-13: relative rounding of a few float32 ε per term
    np.testing.assert_allclose(got["W"], want + l2, rtol=1e-4)
    np.testing.assert_allclose(got["b"], V.sum(axis=0) / n, rtol=1e-4)
