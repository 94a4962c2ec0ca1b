"""sj.check_grad, its standard suite and the `softmax-jax check` command."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import pytest
from helpers import problem

import softmax_jax as sj
from softmax_jax import _check, _cli

X64 = pytest.param(jnp.float64, marks=pytest.mark.x64, id="float64")


@pytest.mark.parametrize("dtype", (X64, jnp.float32, jnp.bfloat16, jnp.float16))
@pytest.mark.parametrize("labels", ("integer", "soft", "unnormalised"))
def test_check_grad_passes(getkey, dtype, labels):
    W, Z, Y, s = problem(getkey(), 30, 6, 7, labels, weighted=True, dtype=dtype)
    report = sj.check_grad(W, Z, Y, weights=s, case="x")
    assert isinstance(report, sj.GradCheckReport)
    assert report.passed, str(report)
    assert report.dtype == jnp.dtype(dtype).name and report.case == "x"
    assert report.tol == _check.TOLERANCES[jnp.dtype(dtype).name]
    assert 0 <= report.max_rel_err <= report.tol


def _wrong_grad(size):
    def wrong(W, Z, Y, **kwargs):
        g = sj.grad(W, Z, Y, **kwargs)
        return g.at[0, 0].add(size * jnp.max(jnp.abs(g)))

    return wrong


@pytest.mark.parametrize(
    "dtype, size", [pytest.param(jnp.float64, 1e-6, marks=pytest.mark.x64), (jnp.float32, 1e-3)]
)
def test_check_grad_detects_a_wrong_gradient(getkey, dtype, size):
    """An error of `size`·max|g| in one entry: far below what float64 (float32) would let pass."""
    W, Z, y, _ = problem(getkey(), 20, 4, 5, "integer", dtype=dtype)
    assert sj.check_grad(W, Z, y, grad_fn=sj.grad).passed
    report = sj.check_grad(W, Z, y, grad_fn=_wrong_grad(size))
    assert not report.passed
    # The error is size·max|g|, measured against max(max|g|, max|Zᵀ Ŷ|) >= max|g|.
    assert 1e-3 * size < report.max_rel_err <= size * (1 + 1e-6)


@pytest.mark.x64
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
    W, Z, y, _ = problem(getkey(), 4, 3, 5, "integer", dtype=jnp.float32)
    with pytest.raises(ValueError, match="`reduction` must be one of 'sum', 'mean', got 'none'"):
        sj.check_grad(W, Z, y, reduction="none")


def test_standard_cases_leave_the_configuration_alone():
    """Between two reports (and after stopping early) the caller runs in its own configuration."""
    gen = _check.standard_cases(quick=True, dtypes=("float32", "float64"))
    first = next(gen)
    assert not jax.config.jax_enable_x64
    assert jnp.zeros(1).dtype == jnp.float32
    second = next(gen)
    gen.close()
    assert not jax.config.jax_enable_x64
    assert (first.dtype, second.dtype) == ("float32", "float64") and first.passed and second.passed


def test_random_problem_is_independent_of_x64(getkey):
    """One generator for the tests and check_grad's suite: the same key gives the same values
    whether x64 is on or off."""
    key = getkey()
    a = _check.random_problem(key, 7, 3, 4, "soft", True, 1.0, "float32")
    with jax.enable_x64(True):
        b = _check.random_problem(key, 7, 3, 4, "soft", True, 1.0, "float32")
        c = _check.random_problem(key, 7, 3, 4, "soft", True, 1.0, "float64")
    for x, y, z in zip(a, b, c):
        assert x.dtype == y.dtype == jnp.float32
        assert bool(jnp.all(x == y)) and bool(jnp.all(x == z.astype(jnp.float32)))
    with pytest.raises(ValueError, match="`dtype` float64 needs jax_enable_x64"):
        _check.random_problem(key, 7, 3, 4, dtype="float64")


def test_the_math_modules_do_not_import_the_cli():
    for name in ("_check", "_grad", "_loss", "_validate"):
        tree = ast.parse(pathlib.Path(_check.__file__).with_name(f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in imported if m == "argparse" or m.startswith("_cli")}, name


@pytest.mark.slow
def test_cli_check_prints_table(capsys):
    assert _cli.main(["check", "--quick", "--dtypes", "float16,float64"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:2] == ["case", "dtype"] and "tolerance" in header and header[-1] == "pass"
    assert "extreme" in out and "unnormalised" in out
    assert "  float16  " in out and "  float64  " in out
    assert " NO" not in out and ", 0 failed" in out


@pytest.mark.slow  # the whole --quick suite again; check_grad's failure is tested fast above
def test_cli_check_fails_on_wrong_gradient(capsys, monkeypatch):
    monkeypatch.setattr(_check, "_hand_grad", _wrong_grad(1e-6))
    assert _cli.main(["check", "--quick", "--dtypes", "float64"]) == 1
    assert " NO" in capsys.readouterr().out


def test_check_grad_rejects_a_gradient_of_the_wrong_shape(getkey):
    W, Z, y, _ = problem(getkey(), 6, 3, 4, "integer", dtype=jnp.float32)
    with pytest.raises(
        ValueError, match=r"`grad_fn` must return the shape of `W` \(3, 4\), got \(4, 3\)"
    ):
        sj.check_grad(W, Z, y, grad_fn=lambda W, Z, Y, **kw: sj.grad(W, Z, Y, **kw).T)


def test_cli_check_bad_dtype(capsys):
    assert _cli.main(["check", "--dtypes", "float8"]) == 2
    assert "--dtypes: unknown dtype 'float8'" in capsys.readouterr().err
