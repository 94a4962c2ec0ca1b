"""sj.check_grad and the `softmax-jax check` command."""

import jax.numpy as jnp
import pytest
from helpers import problem

import softmax_jax as sj
from softmax_jax import _check, _cli

# Exactness checks against float64 references: x64 on for this module (scoped, see conftest).
pytestmark = pytest.mark.x64


@pytest.mark.parametrize("dtype", (jnp.float64, jnp.float32, jnp.bfloat16))
@pytest.mark.parametrize("labels", ("integer", "soft", "unnormalised"))
def test_check_grad_passes(getkey, dtype, labels):
    W, Z, Y, s = problem(getkey(), 30, 6, 7, labels, weighted=True, dtype=dtype)
    report = sj.check_grad(W, Z, Y, weights=s, case="x")
    assert isinstance(report, sj.GradCheckReport)
    assert report.passed, str(report)
    assert report.dtype == jnp.dtype(dtype).name and report.case == "x"
    assert report.tol == _check.TOLERANCES[jnp.dtype(dtype).name]
    assert 0 <= report.max_rel_err <= report.tol


def _wrong_grad(W, Z, Y, **kwargs):
    g = sj.grad(W, Z, Y, **kwargs)
    return g.at[0, 0].add(1e-6 * jnp.max(jnp.abs(g)))  # a tiny error float64 must catch


def test_check_grad_detects_a_wrong_gradient(getkey, monkeypatch):
    W, Z, y, _ = problem(getkey(), 20, 4, 5, "integer")
    monkeypatch.setattr(_check, "_hand_grad", _wrong_grad)
    report = sj.check_grad(W, Z, y)
    assert not report.passed
    # The error is 1e-6 of max|g|, measured against max(max|g|, max|Zᵀ Ŷ|) >= max|g|.
    assert 1e-9 < report.max_rel_err <= 1e-6 * (1 + 1e-9)


def test_check_grad_near_an_optimum(getkey):
    """At a stationary point g ≈ 0: the error is judged against the size of the eq. (4) terms,
    so float32 rounding (relative ~1e-7 of those terms) passes instead of dividing by ~0."""
    W, Z, y, _ = problem(getkey(), 64, 5, 4, "integer")
    for _ in range(200):  # gradient descent on the mean loss down to |g| ~ 1e-7 of the terms
        W = W - 2.0 * sj.grad(W, Z, y, reduction="mean")
    W32, Z32 = W.astype(jnp.float32), Z.astype(jnp.float32)
    report = sj.check_grad(W32, Z32, y, reduction="mean")
    g_ref = sj.grad(W32.astype(jnp.float64), Z32.astype(jnp.float64), y, reduction="mean")
    terms = sj.derivation_terms(W32.astype(jnp.float64), Z32.astype(jnp.float64), y)
    assert float(jnp.max(jnp.abs(g_ref))) < 1e-2 * float(jnp.max(jnp.abs(terms.second))) / 64
    assert report.passed, str(report)


def test_check_grad_rejects_reduction_none(getkey):
    W, Z, y, _ = problem(getkey(), 4, 3, 5, "integer")
    with pytest.raises(ValueError, match="`reduction` must be one of 'sum', 'mean', got 'none'"):
        sj.check_grad(W, Z, y, reduction="none")


def test_cli_check_prints_table(capsys):
    assert _cli.main(["check", "--quick", "--dtypes", "float64,float32"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:2] == ["case", "dtype"] and "tolerance" in header and header[-1] == "pass"
    assert "extreme" in out and "unnormalised" in out and "float32" in out
    assert " NO" not in out and ", 0 failed" in out


def test_cli_check_fails_on_wrong_gradient(capsys, monkeypatch):
    monkeypatch.setattr(_check, "_hand_grad", _wrong_grad)
    assert _cli.main(["check", "--quick", "--dtypes", "float64"]) == 1
    assert " NO" in capsys.readouterr().out


def test_cli_check_bad_dtype(capsys):
    assert _cli.main(["check", "--dtypes", "float8"]) == 2
    assert "--dtypes: unknown dtype 'float8'" in capsys.readouterr().err
