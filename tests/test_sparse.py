"""scipy.sparse features (softmax_jax._sparse): the products, and the public API on sparse X.

The kernel is checked against scipy on generated matrices (empty rows and columns, rows longer
than a piece, explicit zeros); the public API (``SoftmaxRegression``, ``fit``, ``predict``)
against the dense path on ``X.toarray()`` and scikit-learn's optimum, with every input form
(CSR, CSC, COO, unsorted indices, duplicates, int64 indices, float32) and the errors.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from helpers import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import softmax_jax as sj
from softmax_jax import _sparse


def random_csr(rng, n, d, density, *, long_rows=0, dtype=np.float64):
    """A random CSR with empty rows/columns (low density), ``long_rows`` rows longer than a
    piece, and a few explicit zeros."""
    X = sp.random(n, d, density=density, format="lil", random_state=rng, dtype=np.float64)
    for i in range(min(long_rows, n)):
        X[i, : min(d, _sparse.PIECE + 7 + i)] = rng.normal(size=min(d, _sparse.PIECE + 7 + i))
    X = sp.csr_matrix(X, dtype=dtype)
    if X.nnz:
        X.data[:: max(1, X.nnz // 5)] = 0.0  # explicit zeros, stored
    return X


def tfidf(n, d, k, seed=0):
    """A small TF-IDF-like problem: Zipf column frequencies, L2-normalised rows."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(12, size=n) + 1
    p = 1.0 / np.arange(1, d + 1) ** 1.1
    cols = np.searchsorted(np.cumsum(p / p.sum()), rng.random(counts.sum())).clip(0, d - 1)
    X = sp.csr_matrix((np.ones(cols.size), (np.repeat(np.arange(n), counts), cols)), (n, d))
    X.sum_duplicates()
    X.data = (
        np.log1p(X.data) * (np.log(n / (1 + np.bincount(X.indices, minlength=d))) + 1)[X.indices]
    )
    X = sp.csr_matrix(sp.diags(1 / np.sqrt(X.multiply(X).sum(axis=1).A1)) @ X)
    y = np.argmax(X @ rng.normal(size=(d, k)) * 3 + rng.gumbel(size=(n, k)), axis=1)
    return X, y


_apply = jax.jit(_sparse.ell_apply, static_argnames="square")


@settings(max_examples=8, derandomize=True)
@given(
    n=st.integers(0, 40),
    d=st.integers(1, 300),
    density=st.sampled_from([0.0, 0.02, 0.2]),
    long_rows=st.integers(0, 2),
    square=st.booleans(),
)
def test_products_equal_scipy(n, d, density, long_rows, square):
    """``X W``, ``Xᵀ G`` and ``(X ⊙ X)ᵀ G`` of the padded-ELL blocks equal scipy's, empty
    rows/columns, explicit zeros and rows cut into pieces included."""
    rng = np.random.default_rng(n * 1000 + d)
    X = random_csr(rng, n, d, density, long_rows=long_rows)
    Xc = X.tocsc()
    W, G = rng.normal(size=(d, 3)), rng.normal(size=(n, 3))
    with jax.enable_x64(True):
        fwd = _sparse.ell_from_csr(X.indptr, X.indices, X.data, np.float64)
        bwd = _sparse.ell_from_csr(Xc.indptr, Xc.indices, Xc.data, np.float64)
        XW = np.asarray(_apply(fwd, jnp.asarray(W), square=square))
        XtG = np.asarray(_apply(bwd, jnp.asarray(G), square=square))
    Xs = X.multiply(X) if square else X
    np.testing.assert_allclose(XW, Xs @ W, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(XtG, Xs.T @ G, rtol=1e-12, atol=1e-12)


def _forms(X):
    """The same matrix as CSR, CSC, COO, a csr_array, with unsorted indices, with duplicate
    entries (summing to X's values), with int64 indices, in float32."""
    unsorted = X.copy()
    for i in range(X.shape[0]):  # reverse each row's entries
        lo, hi = unsorted.indptr[i], unsorted.indptr[i + 1]
        unsorted.indices[lo:hi] = unsorted.indices[lo:hi][::-1]
        unsorted.data[lo:hi] = unsorted.data[lo:hi][::-1]
    unsorted.has_sorted_indices = False
    coo = X.tocoo()
    dup = sp.coo_matrix(
        (np.concatenate([coo.data / 4, coo.data * 3 / 4]),
         (np.tile(coo.row, 2), np.tile(coo.col, 2))), X.shape,
    ).tocsr()  # fmt: skip
    wide = X.copy()
    wide.indices, wide.indptr = wide.indices.astype(np.int64), wide.indptr.astype(np.int64)
    return {
        "csr": X, "csc": X.tocsc(), "coo": coo, "csr_array": sp.csr_array(X),
        "unsorted": unsorted, "duplicates": dup, "int64": wide, "float32": X.astype(np.float32),
    }  # fmt: skip


@pytest.fixture(scope="module")
def problem():
    X, y = tfidf(300, 64, 4)
    est = sj.SoftmaxRegression(C=10.0).fit(X.toarray(), y)
    return X, y, est


def test_estimator_equals_dense_for_every_form(problem):
    """Every sparse form gives the dense fit's optimum, and the caller's matrix is untouched."""
    X, y, dense = problem
    for name, Xf in _forms(X).items():
        tol = 1e-4 if Xf.dtype == np.float32 else 1e-6  # float32 X: a rounded problem
        before = (Xf.data.copy(), getattr(Xf, "indices", np.zeros(0)).copy())
        est = sj.SoftmaxRegression(C=10.0).fit(Xf, y)
        assert est.coef_.dtype == Xf.dtype, name
        assert rel_err(est.coef_, dense.coef_) < tol, name
        assert rel_err(est.intercept_, dense.intercept_) < 10 * tol, name
        np.testing.assert_array_equal(Xf.data, before[0], err_msg=name)
        np.testing.assert_array_equal(getattr(Xf, "indices", np.zeros(0)), before[1])
        np.testing.assert_allclose(
            est.predict_proba(Xf), dense.predict_proba(X.toarray()), atol=tol / 10
        )
        assert abs(est.score(Xf, y) - dense.score(X.toarray(), y)) <= 1 / len(y)


@pytest.mark.parametrize("solver", ["newton-cg", "lbfgs"])
def test_estimator_reaches_sklearn_optimum(solver):
    """The same objective as LogisticRegression on the same sparse X (C = 10), to 1e-6."""
    from sklearn.linear_model import LogisticRegression

    X, y = tfidf(400, 500, 5, seed=1)

    def objective(m):
        A = X @ m.coef_.T + m.intercept_
        lse = np.log(np.exp(A - A.max(1, keepdims=True)).sum(1)) + A.max(1)
        return 0.5 * np.sum(m.coef_**2) + 10.0 * np.sum(lse - A[np.arange(len(y)), y])

    ref = LogisticRegression(C=10.0, tol=1e-10, max_iter=10_000).fit(X, y)
    ours = sj.SoftmaxRegression(C=10.0, solver=solver, max_iter=2000).fit(X, y)
    assert abs(objective(ours) - objective(ref)) <= 1e-6 * objective(ref)
    assert np.mean(ours.predict(X) == ref.predict(X)) > 0.99


@pytest.mark.slow
def test_fit_equals_dense(cg_steps):
    """``sj.fit`` on sparse Z: minibatch (adam) and full batch (lbfgs, newton-cg) give the dense
    run's parameters to rounding; ``predict``/``predict_proba`` agree with the dense ones. (Newton
    steps by CG on both: dense features this small would take exact Newton steps.)"""
    X, y = tfidf(200, 48, 3, seed=2)
    X = X.astype(np.float32)
    eval_data = (X[:50], y[:50])
    runs = {
        "adam": dict(epochs=2, batch_size=64),
        "lbfgs": dict(epochs=15),
        "newton-cg": dict(epochs=4),
    }
    for opt, kw in runs.items():
        ps, hs = sj.fit(X, y, optimizer=opt, l2=1e-3, progress=False, eval_data=eval_data, **kw)
        pd, hd = sj.fit(X.toarray(), y, optimizer=opt, l2=1e-3, progress=False, **kw)
        assert rel_err(ps["W"], pd["W"]) < 1e-4, opt
        assert abs(hs["loss"][-1] - hd["loss"][-1]) < 1e-5, opt
        assert hs["eval_loss"][-1] is not None
    for Xf in (X, X.tocsc()):
        np.testing.assert_allclose(
            sj.predict_proba(ps, Xf), sj.predict_proba(ps, X.toarray()), atol=1e-6
        )
        np.testing.assert_array_equal(sj.predict(ps, Xf), sj.predict(ps, X.toarray()))


def test_empty_rows_and_columns_and_no_rows():
    """Rows without entries get the bias's softmax; columns without entries keep W = 0."""
    X = sp.csr_matrix(np.array([[0, 1.0, 0, 0], [0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 0]]))
    y = np.array([0, 1, 1, 0])
    est = sj.SoftmaxRegression(C=1.0).fit(X, y)
    dense = sj.SoftmaxRegression(C=1.0).fit(X.toarray(), y)
    assert rel_err(est.coef_, dense.coef_) < 1e-6 and est.coef_[0, 2:].tolist() == [0, 0]
    params = {"W": np.ones((4, 2), np.float32), "b": np.zeros(2, np.float32)}
    assert sj.predict_proba(params, sp.csr_matrix((0, 4))).shape == (0, 2)


def test_errors():
    X, y = tfidf(60, 20, 3)
    bad = X.copy()
    bad.data[5] = np.nan
    row = int(np.searchsorted(bad.indptr, 5, side="right") - 1)
    with pytest.raises(ValueError, match=rf"`Z` must be finite, got nan at index \({row}, "):
        sj.fit(bad, y, progress=False)
    with pytest.raises(ValueError, match="`X` must be finite|contains NaN"):
        sj.SoftmaxRegression().fit(bad, y)
    with pytest.raises(ValueError, match="trained in memory, got one with stream=True"):
        sj.fit(X, y, stream=True, progress=False)
    with pytest.raises(TypeError, match="`Z` must hold real numbers"):
        sj.fit(X.astype(np.complex64), y, progress=False)
    params = {"W": np.zeros((21, 3), np.float32)}
    with pytest.raises(ValueError, match=r"`Z` must have shape \(N, D\) with D = 21"):
        sj.predict(params, X)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="trains on one device, got a mesh"):
        sj.fit(X, y, mesh=mesh, progress=False)


def test_uneven_rows_refuse_minibatches_only():
    """Rows too uneven for one padded ELL: minibatch training is refused with a clear error,
    the full-batch solvers still train."""
    X = sp.lil_matrix((64, 600))
    X[0, :] = 1.0
    for i in range(1, 64):
        X[i, i] = 1.0
    X = X.tocsr()
    y = np.arange(64) % 2
    with pytest.raises(ValueError, match="minibatch training on a scipy.sparse Z"):
        sj.fit(X, y, optimizer="sgd", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, _ = sj.fit(X, y, optimizer="lbfgs", epochs=3, progress=False)
    assert np.isfinite(np.asarray(params["W"])).all()


@pytest.mark.slow
def test_bench_sparse_tiny_writes_json(tmp_path):
    """bench/sparse.py runs end to end (tiny shapes) and reaches the optimum with both."""
    from softmax_jax._cli import main

    assert main(["bench", "--only", "sparse", "--quick", "--tiny", "--out", str(tmp_path)]) == 0
    import json

    result = json.loads((tmp_path / "sparse.json").read_text())
    assert result["suite"] == "sparse" and result["mode"] == "tiny" and not result["missed"]
    assert {"sklearn-lbfgs", "ours-newton-cg"} <= set(result["results"])
    assert result["results"]["ours-newton-cg"]["peak_rss_growth"] >= 0
