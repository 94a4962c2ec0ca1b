"""Prediction from fit's parameters and the model file: chunking, memory, round trip, bad files."""

from __future__ import annotations

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compiled_programs

import softmax_jax as sj


def problem(n=300, d=6, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = 3.0 * rng.normal(size=(k, d))[y] + rng.normal(size=(n, d))
    return X.astype(np.float32), y.astype(np.int32)


def params_of(d=6, k=4, seed=1):
    rng = np.random.default_rng(seed)
    return {
        "W": rng.normal(size=(d, k)).astype(np.float32),
        "b": rng.normal(size=k).astype(np.float32),
    }


@pytest.mark.parametrize("n, chunk", [(300, 64), (300, 300), (256, 64), (5, 4096), (1, 1)])
def test_predict_proba_is_the_softmax_of_the_logits(n, chunk):
    X, _ = problem(n)
    p = params_of()
    P = sj.predict_proba(p, X, chunk_size=chunk)
    ref = jax.nn.softmax(X @ p["W"] + p["b"], axis=1)
    assert P.shape == (n, 4) and P.dtype == jnp.float32
    np.testing.assert_allclose(P, ref, rtol=2e-6, atol=1e-7)
    labels = sj.predict(p, X, chunk_size=chunk)
    assert labels.dtype == jnp.int32
    np.testing.assert_array_equal(labels, np.argmax(X @ p["W"] + p["b"], axis=1))


def test_predict_under_jit_and_extreme_logits():
    X, _ = problem(50)
    p = params_of()
    p_big = {"W": 1e4 * p["W"], "b": p["b"]}
    P = jax.jit(lambda Z: sj.predict_proba(p_big, Z, chunk_size=16))(jnp.asarray(X))
    assert bool(jnp.all(jnp.isfinite(P))) and np.allclose(np.sum(P, axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(
        jax.jit(lambda Z: sj.predict(p, Z))(jnp.asarray(X)), sj.predict(p, X)
    )


def test_predict_holds_one_chunk_of_logits_not_n_by_k():
    """Compiled temporaries of predict at N = 65536, K = 512 with chunks of 256 rows: far below
    the (N, K) logits (128 MiB); an unchunked version would need them."""
    n, d, k, chunk = 65536, 16, 512, 256
    params = {"W": jnp.zeros((d, k)), "b": jnp.zeros(k)}
    Z = jax.ShapeDtypeStruct((n, d), jnp.float32)

    def temp(fn):
        return jax.jit(fn).lower(Z).compile().memory_analysis().temp_size_in_bytes

    chunked = temp(lambda Z: sj.predict(params, Z, chunk_size=chunk))
    whole = temp(lambda Z: sj.predict(params, Z, chunk_size=n))
    assert chunked < n * k * 4 / 32, chunked
    assert whole >= n * k * 4, whole  # the comparison shows what the chunking saves


def test_predict_argument_errors():
    X, _ = problem(10)
    p = params_of()
    with pytest.raises(ValueError, match=r"`Z` must have shape \(N, D\) with D = 6 features, got"):
        sj.predict(p, X[:, :5])
    with pytest.raises(TypeError, match="`params` must be a dict with 'W'"):
        sj.predict(p["W"], X)
    with pytest.raises(ValueError, match=r"`params\['b'\]` must have shape \(K,\) = \(4,\)"):
        sj.predict({"W": p["W"], "b": p["b"][:3]}, X)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer, got 0"):
        sj.predict_proba(p, X, chunk_size=0)
    assert sj.predict(p, X[:0]).shape == (0,) and sj.predict_proba(p, X[:0]).shape == (0, 4)


def test_fit_params_predict_like_training_accuracy():
    X, y = problem()
    params, history = sj.fit(X, y, epochs=5, batch_size=32, progress=False)
    acc = float(np.mean(np.asarray(sj.predict(params, X)) == y))
    assert acc == pytest.approx(history["train_accuracy"][-1], abs=0.05) and acc > 0.9


def _model(standardize=True):
    X, y = problem()
    mean, std = X.mean(0), X.std(0)
    Xs = (X - mean) / std if standardize else X
    params, _ = sj.fit(Xs, y, epochs=5, batch_size=32, progress=False)
    kw = dict(mean=mean, std=std) if standardize else {}
    return X, y, params, kw


@pytest.mark.parametrize("standardize", [True, False])
def test_save_load_round_trips_exactly_and_predicts_on_raw_features(tmp_path, standardize):
    X, y, params, kw = _model(standardize)
    classes = np.array([10, 20, 30, 40])
    path = sj.save_model(
        tmp_path / "m.npz", params, classes=classes, info={"optimizer": "adam"}, **kw
    )
    assert path == str(tmp_path / "m.npz")
    m = sj.load_model(path)
    np.testing.assert_array_equal(m.W, params["W"])
    np.testing.assert_array_equal(m.b, params["b"])
    np.testing.assert_array_equal(m.classes, classes)
    assert m.preprocessing == ("standardize" if standardize else "none")
    if standardize:
        np.testing.assert_array_equal(m.mean, kw["mean"])
        np.testing.assert_array_equal(m.std, kw["std"])
    assert m.info["optimizer"] == "adam" and m.info["softmax_jax"] == sj.__version__
    assert "created" in m.info
    # raw features: the model applies its own preprocessing
    Xs = (X - kw["mean"]) / kw["std"] if standardize else X
    np.testing.assert_array_equal(m.predict(X), classes[np.asarray(sj.predict(params, Xs))])
    assert m.score(X, classes[y]) > 0.9
    np.testing.assert_allclose(m.predict_proba(X), sj.predict_proba(params, Xs), rtol=1e-6)
    # save(load(f)) is the same file content, arrays and header alike
    again = sj.load_model(m.save(tmp_path / "again"))
    for name in ("W", "b", "classes", "mean", "std"):
        a, b = getattr(m, name), getattr(again, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))
    assert again.info == m.info


def test_save_writes_exactly_the_path_given(tmp_path):
    _, _, params, _ = _model(False)
    written = sj.save_model(tmp_path / "model_out", params)
    assert written == str(tmp_path / "model_out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_out"]
    np.testing.assert_array_equal(sj.load_model(written).classes, [0, 1, 2, 3])


def _npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


def test_bad_model_files_are_one_line_errors_naming_the_file(tmp_path):
    _, _, params, _ = _model(False)
    good = sj.save_model(tmp_path / "good.npz", params)
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "empty.npz").write_bytes(b"")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((tmp_path / "good.npz").read_bytes()[:-40])
    old = _npz(tmp_path / "old.npz", W=params["W"], b=params["b"], classes=np.arange(4))
    header = json.dumps({"format": 99, "preprocessing": "none", "info": {"softmax_jax": "9.0"}})
    newer = _npz(tmp_path / "newer.npz", header=np.array(header), **params, classes=np.arange(4))
    nomean = _npz(
        tmp_path / "nomean.npz",
        header=np.array(json.dumps({"format": 1, "preprocessing": "standardize", "info": {}})),
        **params,
        classes=np.arange(4),
    )
    cases = {
        str(tmp_path / "missing.npz"): "no such file",
        str(tmp_path / "random.npz"): "not a softmax_jax model file (not an .npz archive)",
        str(tmp_path / "empty.npz"): "not an .npz archive",
        str(truncated): "",
        old: "an older `softmax-jax train --save` file",
        newer: "model format 99 is not readable by this softmax_jax",
        nomean: "missing array(s) mean, std",
    }
    for path, expected in cases.items():
        with pytest.raises(sj.ModelFileError) as e:
            sj.load_model(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg, msg
    assert zipfile.is_zipfile(good)


def test_model_validates_its_arrays():
    W = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"`b` must have shape \(2,\)"):
        sj.Model(W, np.zeros(3), np.arange(2))
    with pytest.raises(ValueError, match="`mean` and `std` go together"):
        sj.Model(W, np.zeros(2), np.arange(2), mean=np.zeros(3))
    m = sj.Model(W, np.zeros(2), np.arange(2))
    with pytest.raises(ValueError, match=r"`X` must have shape \(N, D\) with D = 3 features"):
        m.predict(np.zeros((2, 4)))


# --- issue 19: nothing silent ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_features_are_named_not_passed_on(bad):
    params = params_of(d=2, k=3)
    Z = np.array([[0.0, 1.0], [bad, 0.0]], np.float32)
    for fn in (sj.predict_proba, sj.predict):
        with pytest.raises(ValueError, match=r"`Z` must be finite, got .* at index \(1, 0\)"):
            fn(params, Z)
    m = sj.Model(params["W"], params["b"], np.arange(3), mean=np.zeros(2), std=np.ones(2))
    with pytest.raises(ValueError, match=r"`X` must be finite, got .* at index \(1, 0\)"):
        m.predict_proba(Z)


def test_logits_overflowing_float32_are_an_error_naming_the_row():
    params = {"W": 2 * np.eye(2, dtype=np.float32), "b": np.zeros(2, np.float32)}
    Z = np.array([[1.0, 1.0], [3e38, 3e38]], np.float32)
    for fn in (sj.predict_proba, sj.predict):
        with pytest.raises(ValueError, match=r"overflows float32 at row 1 \(logits not finite\)"):
            fn(params, Z)


def test_constant_feature_std_zero_is_left_unscaled(tmp_path):
    """The README recipe `std=X.std(axis=0)` with a constant feature: finite predictions, the
    same as with std 1 there (as `softmax-jax train` saves it)."""
    X, y = problem(n=40, d=3, k=2)
    X[:, 1] = 5.0
    params = params_of(d=3, k=2)
    path = sj.save_model(tmp_path / "m.npz", params, mean=X.mean(0), std=X.std(0))
    P = sj.load_model(path).predict_proba(X)
    assert np.isfinite(P).all()
    std = X.std(0)
    std[1] = 1.0
    ref = sj.predict_proba(params, (X - X.mean(0)) / std)
    np.testing.assert_allclose(P, ref, rtol=1e-6)
    with pytest.raises(ValueError, match=r"`std` must be >= 0, got -1.0 at index 0"):
        sj.Model(params["W"], params["b"], np.arange(2), mean=np.zeros(3), std=-np.ones(3))


def test_float64_params_and_numpy_info_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    params = {"W": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}  # float64, x64 off
    info = {"acc": np.float32(0.9), "n": np.int64(7), "shape": np.array([3, 2])}
    m = sj.load_model(sj.save_model(tmp_path / "m.npz", params, info=info))
    assert m.W.dtype == np.float64 and m.b.dtype == np.float64
    np.testing.assert_array_equal(m.W, params["W"])
    np.testing.assert_array_equal(m.b, params["b"])
    assert m.info["acc"] == pytest.approx(0.9) and m.info["n"] == 7 and m.info["shape"] == [3, 2]
    with pytest.raises(TypeError, match="`info` must hold JSON values .* got object"):
        sj.save_model(tmp_path / "m.npz", params, info={"x": object()})
    with pytest.raises(TypeError, match="`info` must be a dict, got list"):
        sj.save_model(tmp_path / "m.npz", params, info=[1])


def _forge(path, header, W=None):
    W = np.eye(2, dtype=np.float32) if W is None else W
    np.savez(path, header=np.array(header), W=W, b=np.zeros(2, np.float32), classes=np.arange(2))
    return path


@pytest.mark.parametrize(
    "header, W, match",
    [
        ('{"format": Infinity}', None, r"`format` must be an integer, got inf"),
        ('{"format": 1.5}', None, r"`format` must be an integer, got 1.5"),
        ('{"format": true}', None, r"`format` must be an integer, got True"),
        ('{"format": 1, "info": [1]}', None, r"`info` must be an object, got \[1\]"),
        ('{"format": 1, "info": "x"}', None, r"`info` must be an object"),
        ("[1]", None, r"corrupt model header"),
        ('{"format": 1}', np.array([[np.nan, 0], [0, 1]], np.float32), r"`W` must be finite"),
        ('{"format": 1}', np.eye(2, dtype=np.int32), r"`W` must be a float array, got dtype int32"),
    ],
)
def test_damaged_model_headers_and_arrays_are_model_file_errors(tmp_path, header, W, match):
    path = _forge(tmp_path / "m.npz", header, W)
    with pytest.raises(sj.ModelFileError, match=match) as e:
        sj.load_model(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_model_file_permissions_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = sj.save_model(tmp_path / "m.npz", params_of())
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


# --- property: a damaged model file is a ModelFileError naming it, never anything else --------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_HEADERS = [
    '{"format": 1, "preprocessing": "none", "info": {}}',
    '{"format": 1, "preprocessing": "standardize", "info": {}}',
    '{"format": 2}', '{"format": 0}', '{"format": -1}', '{"format": "1"}', '{"format": null}',
    '{"format": NaN}', '{"format": 1e400}', '{"format": 1, "info": null}', '{}', "null", '"x"',
    "{", "", '{"format": 1, "preprocessing": 3}',
]  # fmt: skip


@st.composite
def model_file(draw):
    d, k = draw(st.integers(0, 3)), draw(st.integers(1, 3))
    arrays = {
        "header": np.array(draw(st.sampled_from(_HEADERS))),
        "W": np.ones((d, k), draw(st.sampled_from(["float32", "float64", "float16", "int8"]))),
        "b": np.zeros(draw(st.sampled_from([k, k + 1])), np.float32),
        "classes": draw(
            st.sampled_from([np.arange(k), np.array(list("abc")[:k]), np.ones(k, bool)])
        ),
        "mean": np.zeros(d),
        "std": np.array([draw(st.sampled_from([1.0, 0.0, -1.0, np.inf]))] * d),
    }
    for name in draw(st.sets(st.sampled_from(sorted(arrays)), max_size=2)):
        del arrays[name]
    if "W" in arrays and arrays["W"].size and draw(st.booleans()):
        arrays["W"] = arrays["W"].astype(np.float32)
        arrays["W"].flat[0] = draw(st.sampled_from([np.nan, np.inf]))
    cut = draw(st.one_of(st.none(), st.integers(0, 400)))  # truncated after `cut` bytes
    flip = draw(st.one_of(st.none(), st.integers(0, 400)))  # one byte changed
    return arrays, cut, flip


@settings(max_examples=25, derandomize=True)
@given(spec=model_file())
def test_damaged_model_files_are_one_line_model_file_errors(tmp_path_factory, spec):
    arrays, cut, flip = spec
    path = tmp_path_factory.mktemp("m") / "m.npz"
    np.savez(path, **arrays)
    raw = bytearray(path.read_bytes())
    if flip is not None and flip < len(raw):
        raw[flip] ^= 0xFF
    path.write_bytes(bytes(raw[:cut]) if cut is not None else bytes(raw))
    try:
        m = sj.load_model(path)
    except sj.ModelFileError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        return
    # read: it predicts finite probabilities on finite features
    X = np.ones((2, m.n_features), np.float32)
    P = m.predict_proba(X)
    assert P.shape == (2, m.n_classes) and np.isfinite(P).all()


# --- mutation testing (issue 19): what the tests above let through -------------------------------


def test_chunk_size_is_keyword_only_and_params_z_can_be_named():
    X, _ = problem(6)
    p = params_of()
    # chunks of 4 and 2 rows against one of 6: XLA's GEMMs of other shapes may round
    # differently in the last bit (float32), so probabilities to 1e-6, classes exactly
    np.testing.assert_allclose(sj.predict_proba(params=p, Z=X, chunk_size=4),
                               sj.predict_proba(p, X), rtol=1e-6, atol=1e-7)  # fmt: skip
    np.testing.assert_array_equal(sj.predict(params=p, Z=X, chunk_size=4), sj.predict(p, X))
    for fn in (sj.predict_proba, sj.predict):
        with pytest.raises(TypeError):
            fn(p, X, 4)


def test_params_without_b_and_a_non_finite_b():
    X, _ = problem(7)
    p = params_of()
    ref = jax.nn.softmax(X @ p["W"], axis=1)
    np.testing.assert_allclose(sj.predict_proba({"W": p["W"]}, X), ref, rtol=2e-6, atol=1e-7)
    for bad in (np.nan, np.inf):
        b = p["b"].copy()
        b[2] = bad
        for fn in (sj.predict_proba, sj.predict):
            with pytest.raises(ValueError, match=r"`params\['b'\]` must be finite, got .* index"):
                fn({"W": p["W"], "b": b}, X)


@pytest.mark.x64
def test_float64_features_are_not_rounded_under_x64():
    # x64 on: float64 params and features compute in float64, the features never cast to float32
    rng = np.random.default_rng(4)
    W, b, Z = rng.normal(size=(5, 3)), rng.normal(size=3), rng.normal(size=(9, 5))
    Z[:, 0] += 1 / 3  # not representable in float32
    P = sj.predict_proba({"W": W, "b": b}, Z)
    assert P.dtype == jnp.float64
    A = Z @ W + b
    ref = np.exp(A - A.max(1, keepdims=True))
    np.testing.assert_allclose(P, ref / ref.sum(1, keepdims=True), rtol=1e-13)


def test_sparse_features_predict_as_dense_and_their_width_is_checked():
    import scipy.sparse as sp

    X, _ = problem(9, d=6)  # N = 9 rows, D = 6 features: the two sizes differ
    X[X < 0.5] = 0.0
    p = params_of()
    Xs = sp.csr_matrix(X)
    np.testing.assert_allclose(sj.predict_proba(p, Xs), sj.predict_proba(p, X), atol=1e-6)
    np.testing.assert_array_equal(sj.predict(p, Xs), sj.predict(p, X))
    assert sj.predict(p, sp.csr_matrix(X[:6])).shape == (6,)  # N = D: fine too
    with pytest.raises(ValueError, match=r"`Z` must have shape \(N, D\) with D = 6 features"):
        sj.predict(p, sp.csr_matrix(X[:, :5]))


def test_one_class_models_are_models_and_no_class_is_an_error(tmp_path):
    # K >= 1: a one-class model predicts its class with probability 1; K = 0 is refused
    W = np.ones((2, 1), np.float32)
    m = sj.Model(W, np.zeros(1, np.float32), np.array(["only"]))
    X = np.array([[1.0, -2.0], [3.0, 0.5]], np.float32)
    assert m.predict(X).tolist() == ["only", "only"]
    np.testing.assert_array_equal(m.predict_proba(X), np.ones((2, 1)))
    again = sj.load_model(m.save(tmp_path / "one.npz"))
    assert again.n_classes == 1 and again.predict(X).tolist() == ["only", "only"]
    np.testing.assert_array_equal(sj.predict({"W": W}, X), [0, 0])
    with pytest.raises(ValueError, match=r"`W` must have shape \(D, K\) with K >= 1, got \(2, 0\)"):
        sj.Model(np.ones((2, 0), np.float32), np.zeros(0), np.arange(0))
    with pytest.raises(ValueError, match=r"`params\['W'\]` must be a float \(D, K\) array with K"):
        sj.predict({"W": np.ones((2, 0), np.float32)}, X)


@pytest.mark.parametrize("version", [0, -1, 2])
def test_formats_outside_one_to_current_are_refused(tmp_path, version):
    path = _forge(tmp_path / "m.npz", json.dumps({"format": version}))
    with pytest.raises(sj.ModelFileError, match=rf"model format {version} is not readable"):
        sj.load_model(path)


def test_headerless_file_with_the_old_arrays_gets_the_hint_whatever_else_it_holds(tmp_path):
    W, b = np.eye(2, dtype=np.float32), np.zeros(2, np.float32)
    exact = _npz(tmp_path / "a.npz", W=W, b=b, classes=np.arange(2))
    extra = _npz(tmp_path / "b.npz", W=W, b=b, classes=np.arange(2), accuracy=np.array(0.9))
    partial = _npz(tmp_path / "c.npz", W=W, b=b)
    for path in (exact, extra):
        with pytest.raises(sj.ModelFileError, match="an older `softmax-jax train --save` file"):
            sj.load_model(path)
    with pytest.raises(sj.ModelFileError, match=r"no header, found W, b$"):
        sj.load_model(partial)


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "x").write_text("a non-empty directory: os.replace onto it fails")
    with pytest.raises(OSError):
        sj.save_model(target, params_of())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("dtype, n", [(np.float32, 37), (np.float64, 41), (np.int64, 43)])
def test_new_row_counts_compile_only_the_prediction(dtype, n):
    """Features of a new shape are put on the device as they are, and the logits' finiteness is
    read on the host: the only program compiled is the prediction's own (``jnp.asarray`` of a
    NumPy array, or ``jnp.all`` of the flags, compiles a program per row count)."""
    from softmax_jax._model import _check_features

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(n, 5)) * 3).astype(dtype)
    params = {"W": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
    with compiled_programs() as compiled:
        Z = _check_features(X, 5)
        assert not compiled
        labels = sj.predict(params, X)
    assert set(compiled) <= {"jit(_predict_rows)"}, compiled
    assert isinstance(Z, jax.Array) and Z.shape == (n, 5)
    assert Z.dtype == np.float32  # integers and (without x64) float64: what JAX makes of them
    want = np.argmax(np.asarray(Z) @ np.asarray(params["W"]) + np.asarray(params["b"]), axis=1)
    np.testing.assert_array_equal(np.asarray(labels), want)
