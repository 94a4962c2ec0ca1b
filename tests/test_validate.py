"""`_validate`: the argument checks shared by the public functions, through fit's options and
arrays (wrong types, bools, out-of-range values, non-array inputs, truncated memmaps)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from helpers import compiled_programs

import softmax_jax as sj


def data(n=20):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype(np.float32), np.arange(n) % 2


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            {"batch_size": True},
            TypeError,
            r"`batch_size` must be an integer or None, got bool",
        ),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1, got 0"),
        (
            {"batch_size": 2.0},
            TypeError,
            r"`batch_size` must be an integer or None, got float",
        ),
        (
            {"num_classes": 1.5},
            TypeError,
            r"`num_classes` must be an integer or None, got float",
        ),
        ({"num_classes": 1}, ValueError, r"`num_classes` must be an integer >= 2, got 1"),
        ({"learning_rate": "fast"}, TypeError, r"`learning_rate` must be a real number, got str"),
        ({"learning_rate": -1.0}, ValueError, r"`learning_rate` must be a finite number > 0"),
        (
            {"learning_rate": float("nan")},
            ValueError,
            r"`learning_rate` must be a finite number > 0",
        ),
        (
            {"checkpoint_every": None},
            TypeError,
            r"`checkpoint_every` must be an integer, got NoneType",
        ),
        (
            {"checkpoint_every": 0},
            ValueError,
            r"`checkpoint_every` must be an integer >= 1, got 0",
        ),
        ({"max_to_keep": 0}, ValueError, r"`max_to_keep` must be an integer >= 1, got 0"),
        ({"epochs": 2.0}, TypeError, r"`epochs` must be an integer, got float"),
        ({"epochs": True}, TypeError, r"`epochs` must be an integer, got bool"),
        ({"l2": "0"}, TypeError, r"`l2` must be a real number, got str"),
        ({"l2": np.inf}, ValueError, r"`l2` must be a finite number >= 0, got inf"),
        ({"seed": 1.5}, TypeError, r"`seed` must be an integer, got float"),
        ({"tol": -1.0, "optimizer": "lbfgs"}, ValueError, r"`tol` must be a finite number >= 0"),
    ],
)
def test_fit_options_are_checked_and_named(kwargs, exc, match):
    Z, y = data()
    with pytest.raises(exc, match=match) as e:
        sj.fit(Z, y, progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_fit_options_accept_numpy_and_jax_scalars():
    import jax.numpy as jnp

    Z, y = data()
    sj.fit(Z, y, epochs=np.int64(1), batch_size=np.int32(8), learning_rate=jnp.float32(0.1),
           l2=np.float32(0.0), seed=np.uint32(3), progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "Z, match",
    [
        ("text", r"`Z` must be a dense array .* got str"),
        (
            np.array([[object()]] * 20),
            r"`Z` must be a real numeric array, got ndarray of dtype object",
        ),
        (np.full((20, 3), "1"), r"`Z` must be a real numeric array, got ndarray of dtype <U1"),
        ([[1.0, 2.0]] * 19 + [[1.0]], r"`Z` must be an array, got list"),
    ],
)
def test_unsupported_feature_types_are_named(Z, match):
    _, y = data()
    Z = {"text": "abc"}.get(Z if isinstance(Z, str) else "", Z)
    with pytest.raises(TypeError, match=match):
        sj.fit(Z, y, epochs=1, progress=False)


def test_label_range_rule_is_one_check():
    Z, y = data()
    with pytest.raises(
        ValueError, match=r"`y` must be >= 0 and < num_classes = 2, got 5 at index 3"
    ):
        sj.fit(Z, np.where(np.arange(20) == 3, 5, y), num_classes=2, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"`y` must be >= 0, got -1 at index 0"):
        sj.fit(Z, np.where(np.arange(20) == 0, -1, y), epochs=1, progress=False)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_truncated_memmap_is_an_error_not_a_crash(tmp_path, optimizer):
    Z, y = data(64)
    np.save(tmp_path / "X.npy", Z)
    X = np.load(tmp_path / "X.npy", mmap_mode="r")
    os.truncate(tmp_path / "X.npy", 300)
    with pytest.raises(ValueError, match=r"`Z`: its memory-mapped file .* is 300 bytes, shorter"):
        sj.fit(X, y, optimizer=optimizer, stream=True, epochs=1, progress=False)


def test_streamed_lbfgs_nan_row_is_the_one_line_error_of_the_minibatch_path(tmp_path):
    Z, y = data(64)
    Z[5, 1] = np.nan
    np.save(tmp_path / "X.npy", Z)
    X = np.load(tmp_path / "X.npy", mmap_mode="r")
    for optimizer in ("adam", "lbfgs"):
        with pytest.raises(ValueError, match=r"^`Z` must be finite, got nan at index \(5, 1\)$"):
            sj.fit(X, y, optimizer=optimizer, stream=True, epochs=1, progress=False)


# --- property: every public array function either names the culprit or is right -------------

from hypothesis import event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = ["float32", "float64", "float16", "int32", "uint8", "bool", "object"]
BAD_VALUES = [None, "abc", [[1.0], [2.0, 3.0]], {"W": 1}, 3.5]


def _one_line_named(e: Exception) -> None:
    msg = str(e)
    assert "\n" not in msg and msg, msg
    assert "`" in msg, f"the message names no argument: {msg}"


@st.composite
def arrays_problem(draw):
    n, d, k = draw(st.integers(0, 4)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    k = k if draw(st.integers(0, 4)) == 4 else max(k, 1)  # K = 0 sometimes
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 1e4, 1e15]))
    Z, W = rng.normal(size=(n, d)) * scale, rng.normal(size=(d, k))
    if Z.size and draw(st.integers(0, 3)) == 3:
        Z.flat[draw(st.integers(0, Z.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if W.size and draw(st.integers(0, 4)) == 4:
        W.flat[draw(st.integers(0, W.size - 1))] = np.nan
    y = rng.integers(0, max(k, 1), n)
    if n and draw(st.integers(0, 4)) == 4:
        y[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, k, 2**31 - 1]))
    kind = draw(
        st.sampled_from(["labels", "targets", "labels", "targets", "float labels", "uint8 labels"])
    )
    Y = {
        "labels": y,
        "targets": np.eye(max(k, 1))[np.clip(y, 0, max(k, 1) - 1)][:, :k],
        "float labels": y.astype(np.float64),
        "uint8 labels": y.astype(np.uint8) if (y >= 0).all() and (y < 256).all() else y,
    }[kind]
    zdt, wdt = (
        draw(st.sampled_from(DTYPES)),
        draw(st.sampled_from([*DTYPES[:3], "object", "int32"])),
    )
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # casts that overflow make inf/garbage: inputs too
        Z, W = Z.astype(zdt), W.astype(wdt)
    args = {"W": W, "Z": Z, "Y": Y}
    if draw(st.integers(0, 7)) == 7:  # a wrong type for one argument
        args[draw(st.sampled_from(list(args)))] = draw(st.sampled_from(BAD_VALUES))
    return args, scale


def _reference_loss(W, Z, Y):
    """Eq. (2) in float64 NumPy, from the inputs' values as the function reads them."""
    A = np.asarray(Z, np.float64) @ np.asarray(W, np.float64)
    m = A.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(A - m).sum(axis=1, keepdims=True)))[:, 0]
    T = np.eye(A.shape[1])[Y] if Y.ndim == 1 else np.asarray(Y, np.float64)
    P = np.exp(A - lse[:, None])
    return float(np.sum(lse - np.sum(T * A, axis=1))), np.asarray(Z, np.float64).T @ (P - T)


_TIED = {
    "W": np.ones((1, 3), np.float32),
    "Z": np.full((6, 1), 1e30, np.float32),
    "Y": np.arange(6) % 3,
}
_INF = {
    "W": np.ones((2, 2), np.float32),
    "Z": np.array([[1, np.inf], [0, 1]], np.float32),
    "Y": np.array([0, 1]),
}


@settings(max_examples=25, derandomize=True)
@given(problem=arrays_problem(), fn=st.sampled_from(["loss", "grad", "value_and_grad"]))
@example(problem=(_TIED, 1e30), fn="loss")  # the instances of issue 19
@example(problem=(_INF, 1.0), fn="value_and_grad")
def test_math_functions_name_the_culprit_or_match_numpy(problem, fn):
    args, scale = problem
    try:
        out = getattr(sj, fn)(args["W"], args["Z"], args["Y"])
    except (ValueError, TypeError) as e:
        event(f"error {type(e).__name__}: {str(e)[:50]}")
        _one_line_named(e)
        return
    event("result")
    W, Z, Y = (np.asarray(args[a]) for a in "WZY")
    value, G = _reference_loss(W, Z, Y)
    low = any(np.dtype(x.dtype).itemsize <= 2 for x in (W, Z))
    rtol = 2e-2 if low else 1e-4
    size = (np.abs(np.asarray(Z, np.float64)).max(initial=0) * np.abs(W.astype(np.float64)).max(initial=0)
            * max(W.shape[0], 1) + 1) * max(Z.shape[0], 1)  # fmt: skip
    outs = {"loss": [out], "grad": [None, out], "value_and_grad": out}[fn]
    if outs[0] is not None:
        assert np.isfinite(float(outs[0]))
        np.testing.assert_allclose(float(outs[0]), value, rtol=rtol, atol=rtol * size)
    if len(outs) > 1:
        g = np.asarray(outs[1], np.float64)
        assert np.isfinite(g).all() and g.shape == W.shape
        np.testing.assert_allclose(g, G, rtol=rtol, atol=rtol * size)


@settings(max_examples=25, derandomize=True)
@given(problem=arrays_problem(), fn=st.sampled_from(["predict", "predict_proba"]))
def test_prediction_names_the_culprit_or_matches_numpy(problem, fn):
    args, scale = problem
    params = args["W"] if isinstance(args["W"], dict | str | None) else {"W": args["W"]}
    try:
        out = np.asarray(getattr(sj, fn)(params, args["Z"]))
    except (ValueError, TypeError) as e:
        event(f"error {type(e).__name__}: {str(e)[:50]}")
        _one_line_named(e)
        return
    event("result")
    W, Z = np.asarray(args["W"], np.float64), np.asarray(args["Z"], np.float64)
    A = Z @ W
    assert out.shape[0] == Z.shape[0]
    if fn == "predict_proba":
        assert np.isfinite(out).all() and np.allclose(out.sum(axis=1), 1, atol=1e-2)
        if scale == 1.0 and A.size:
            P = np.exp(A - A.max(axis=1, keepdims=True))
            np.testing.assert_allclose(out, P / P.sum(axis=1, keepdims=True), atol=2e-2)
    elif A.size:
        top2 = np.sort(A, axis=1)[:, -2:] if A.shape[1] > 1 else np.zeros((A.shape[0], 2))
        clear = (top2[:, 1] - top2[:, 0]) > 1e-2 * (np.abs(A).max() + 1)
        np.testing.assert_array_equal(out[clear], A.argmax(axis=1)[clear])


@settings(max_examples=25)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 7)),
    kind_dtype=st.sampled_from(
        [("finite", t) for t in ("float32", "float16", "bfloat16")]
        + [("range", t) for t in ("int32", "int8", "uint8")]
        + [("negative", t) for t in ("float32", "bfloat16", "int32", "uint8")]
    ),
    bad_at=st.one_of(st.none(), st.integers(0, 62)),
    seed=st.integers(0, 2**16),
)
def test_host_and_device_scans_agree(shape, kind_dtype, bad_at, seed):
    """Small device arrays are scanned on the host, large ones by a compiled scan on their device:
    the same verdict, first bad index and value either way (the kinds as the checks use them:
    finiteness of floats, label ranges of integers, signs of weights)."""
    import jax.numpy as jnp

    from softmax_jax import _validate

    kind, dtype = kind_dtype
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, shape).astype(np.float64)
    if bad_at is not None:
        bad = {"finite": np.inf, "range": 5.0, "negative": -1.0}[kind]  # at the boundaries
        x.flat[bad_at % x.size] = bad
    if dtype == "uint8":
        x = np.abs(x)
    a = jnp.asarray(x.astype(jnp.dtype(dtype)))
    results = []
    default = _validate.HOST_SCAN_MAX
    try:
        for limit in (default, 0):
            _validate.HOST_SCAN_MAX = limit
            found = _validate._first_bad(a, kind, 5)
            results.append(None if found is None else tuple(float(v) for v in found))
    finally:
        _validate.HOST_SCAN_MAX = default
    assert results[0] == results[1]
    unsigned = kind == "negative" and dtype == "uint8"  # |x| above: nothing negative
    assert (results[0] is not None) == (bad_at is not None and not unsigned)
    if results[0] is not None:
        assert results[0][0] == bad_at % x.size  # the first bad flat index


@settings(max_examples=12)
@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(
        ["float16", "bfloat16", "float32", "float64", "int8", "int64", "uint8", "bool"]
    ),
    x64=st.booleans(),
    scalar=st.booleans(),
)
def test_as_array_of_numpy_compiles_nothing_and_equals_jnp_asarray(shape, dtype, x64, scalar):
    """NumPy input (an array of any shape, or a NumPy scalar) goes to the device with the dtype
    and values ``jnp.asarray`` gives it (float64 kept under x64, else float32; int64 likewise),
    and no program is compiled (``jnp.asarray`` of a NumPy array compiles one per new shape)."""
    import jax
    import jax.numpy as jnp

    from softmax_jax._validate import as_array

    rng = np.random.default_rng(len(shape))
    x = (rng.normal(size=shape) * 50).astype(jnp.dtype(dtype))
    if scalar:
        x = x.reshape(-1)[:1].reshape(())[()]  # a NumPy scalar (np.generic)
    with jax.enable_x64(x64):
        with compiled_programs() as compiled:
            got = as_array(x, "x")
        want = jnp.asarray(x)
        assert not compiled
        assert isinstance(got, jax.Array)
        assert (got.dtype, got.shape, got.weak_type) == (want.dtype, want.shape, want.weak_type)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
