"""`_validate`: the argument checks shared by the public functions, through fit's options and
arrays (wrong types, bools, out-of-range values, non-array inputs, truncated memmaps)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import softmax_jax as sj


def data(n=20):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype(np.float32), np.arange(n) % 2


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"batch_size": True}, TypeError, r"`batch_size` must be an integer or None, got bool"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, TypeError, r"`batch_size` must be an integer or None, got float"),
        ({"num_classes": 1.5}, TypeError, r"`num_classes` must be an integer or None, got float"),
        ({"num_classes": 1}, ValueError, r"`num_classes` must be an integer >= 2, got 1"),
        ({"learning_rate": "fast"}, TypeError, r"`learning_rate` must be a real number, got str"),
        ({"learning_rate": -1.0}, ValueError, r"`learning_rate` must be a finite number > 0"),
        ({"learning_rate": float("nan")}, ValueError, r"`learning_rate` must be a finite number"),
        ({"checkpoint_every": None}, TypeError, r"`checkpoint_every` must be an integer, got None"),
        ({"checkpoint_every": 0}, ValueError, r"`checkpoint_every` must be an integer >= 1"),
        ({"max_to_keep": 0}, ValueError, r"`max_to_keep` must be an integer >= 1"),
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
        ("sparse", r"`Z` must be a dense array \(NumPy, JAX or a nested list\), got csr_matrix"),
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
    import scipy.sparse

    _, y = data()
    Z = {"sparse": scipy.sparse.csr_matrix(np.ones((20, 3))), "text": "abc"}.get(
        Z if isinstance(Z, str) else "", Z
    )
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
