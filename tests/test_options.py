"""`_options`: the fused vocabulary losses' static options and counted-label checks, called
directly (the heads' tests reach the same errors through the public functions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import _options

GOOD = {"label_smoothing": 0.1, "z_loss": 0.0, "ignore_index": -100, "softcap": None,
        "weight_layout": "dk", "return_aux": False}  # fmt: skip


def test_is_int():
    for x in (0, 3, -100, np.int8(4), np.uint64(7)):
        assert _options.is_int(x), x
    for x in (True, np.bool_(True), 2.5, "3", None, 3.0 + 0j):
        assert not _options.is_int(x), x


def test_static_float_rejects_traced_values():
    assert _options.static_float(np.float32(0.5), "beta") == 0.5
    with pytest.raises(TypeError, match=r"`beta` must be a Python float .* got DynamicJaxprTracer"):
        jax.jit(lambda b: _options.static_float(b, "beta"))(0.5)


@pytest.mark.parametrize("ok", (None, "auto", 1, np.int64(64)))
def test_chunk_size_accepted(ok):
    _options.check_chunk_size(ok)


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (0, ValueError, r"got 0$"),
        (2.0, TypeError, r"got float 2.0"),
        (True, TypeError, r"got bool True"),
        ("all", TypeError, r"got str 'all'"),
    ],
)
def test_chunk_size_errors(bad, error, match):
    with pytest.raises(
        error, match=r"`chunk_size` must be a positive int, 'auto' or None, " + match
    ):
        _options.check_chunk_size(bad)


def test_head_options_returned_as_python_numbers():
    out = _options.check_head_options(**{**GOOD, "ignore_index": np.int16(-1), "softcap": 30})
    assert out == (0.1, 0.0, -1, 30.0)
    assert type(out[2]) is int and type(out[3]) is float


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"label_smoothing": 1.0}, ValueError, r"`label_smoothing` must lie in \[0, 1\), got 1.0"),
        ({"z_loss": float("nan")}, ValueError, r"`z_loss` must be >= 0, got nan"),
        ({"ignore_index": 1.5}, TypeError, r"`ignore_index` must be an int or None, got float"),
        ({"softcap": 0.0}, ValueError, r"`softcap` must be a positive float or None, got 0.0"),
        ({"softcap": "big"}, ValueError, r"could not convert"),
        ({"weight_layout": "kn"}, ValueError, r"`weight_layout` must be 'dk' or 'kd', got 'kn'"),
        ({"return_aux": 1}, TypeError, r"`return_aux` must be a bool, got int"),
    ],
)
def test_head_option_errors_name_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        _options.check_head_options(**{**GOOD, **change})


def test_counted_labels_skip_ignored_and_weight0_rows():
    y = jnp.array([[0, 4, -100], [5, 1, 2]])
    _options.check_counted_labels(y, jnp.array([[1, 1, 1], [0, 1, 1]]), 5, -100)
    with pytest.raises(
        ValueError, match=r"\[0, 5\) or ignore_index = -100, got 5 at index \(1, 0\)"
    ):
        _options.check_counted_labels(y, None, 5, -100)
    with pytest.raises(
        ValueError, match=r"`labels` must lie in \[0, K\) = \[0, 5\), got -100 at index 2$"
    ):
        _options.check_counted_labels(jnp.array([0, 1, -100]), None, 5, None)


def test_counted_labels_name_the_stored_ignore_index():
    # -100 held in uint16 is 65436: the message says what the labels' dtype makes of it.
    y = np.array([0, 9], np.uint16)
    with pytest.raises(ValueError, match=r"\(held as 65436 in uint16\), got 9 at index 1"):
        _options.check_counted_labels(y, None, 5, -100)


def test_counted_labels_unchecked_while_traced():
    @jax.jit
    def f(y, s):
        _options.check_counted_labels(y, s, 5, None)
        _options.check_counted_labels(jnp.array([9]), s, 5, None)  # weights traced: unknown
        return y

    f(jnp.array([7]), jnp.ones(1))
