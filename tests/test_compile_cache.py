"""The persistent compilation cache (``_compile_cache``): where it goes, that it never overrides a
cache the user configured, the opt-out, and that a fit in a fresh process writes its programs
there even after other JAX work compiled first. Subprocesses with temporary cache directories:
the suite never touches the user's (tests/conftest.py turns the cache off)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from softmax_jax._compile_cache import ENV, default_dir

FIT = """
import jax.numpy as jnp, numpy as np, softmax_jax as sj
jnp.ones(3).sum().block_until_ready()  # JAX has compiled (and decided on its cache) before fit
rng = np.random.default_rng(0)
X = rng.normal(size=(40, 3)); y = np.arange(40) % 3
sj.SoftmaxRegression().fit(X, y)
import jax; print(jax.config.jax_compilation_cache_dir)
"""


def run_fit(env_changes: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "JAX_COMPILATION_CACHE_DIR")}
    env.update(env_changes)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", FIT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"XDG_CACHE_HOME": "/x/cache"}, "/x/cache/softmax_jax/jax"),
        ({"XDG_CACHE_HOME": "/x/cache", ENV: "/y/jit"}, "/y/jit"),
        ({"XDG_CACHE_HOME": "", "HOME": "/home/u"}, "~/.cache/softmax_jax/jax"),
        ({ENV: "0"}, None),
        ({ENV: "off"}, None),
        ({ENV: "False"}, None),
    ],
)
def test_default_dir_follows_xdg_and_the_opt_out(environ, expected):
    got = default_dir(environ)
    if expected is None:
        assert got is None
    elif expected.startswith("~"):
        assert got == Path.home() / ".cache" / "softmax_jax" / "jax"
    else:
        assert got == Path(expected)


@pytest.mark.slow
def test_fit_writes_its_programs_to_the_user_cache_dir(tmp_path):
    used = run_fit({"XDG_CACHE_HOME": str(tmp_path)})
    cache = tmp_path / "softmax_jax" / "jax"
    assert used == str(cache)
    assert any(p.name.startswith("jit_") for p in cache.iterdir())  # compiled programs
    assert any((cache / "softmax_jax_programs").glob("solve-*.bin"))  # the traced solver


@pytest.mark.slow
def test_a_cache_the_user_configured_is_kept(tmp_path):
    mine = tmp_path / "mine"
    used = run_fit(
        {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_COMPILATION_CACHE_DIR": str(mine)}
    )
    assert used == str(mine)
    assert any(mine.iterdir()) and not (tmp_path / "xdg").exists()


def test_the_opt_out_leaves_jax_without_a_cache(tmp_path):
    assert run_fit({"XDG_CACHE_HOME": str(tmp_path), ENV: "0"}) == "None"
    assert not any(tmp_path.iterdir())


@pytest.fixture
def program_dir(tmp_path, monkeypatch):
    """JAX's cache directory set to a temporary one for this test, no program loaded yet."""
    import jax

    from softmax_jax import _compile_cache

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    monkeypatch.setattr(_compile_cache, "_programs", {})
    yield tmp_path / "softmax_jax_programs"
    jax.config.update("jax_compilation_cache_dir", before)


def _solve_args(n=24):
    import jax
    import numpy as np

    from softmax_jax._placement import place

    rng = np.random.default_rng(n)
    X, y = rng.normal(size=(n, 3)), np.arange(n) % 3
    with jax.enable_x64(True):
        data = place(X, y, None, fit_intercept=True, dtype=np.float64, device=None)
    params = {"W": np.zeros((3, 3)), "b": np.zeros(3)}
    return params, data, np.float64(0.05), np.float64(1e-10), np.int32(50)


def test_traced_solver_is_kept_and_reused(program_dir, monkeypatch):
    """A solver traced in one process is written as an exported program; the next process (here:
    an emptied in-memory table) reads it instead of tracing, with the same result; another
    package source or another shape is another entry; a damaged entry is traced again."""
    import jax
    import numpy as np
    from jax import export

    from softmax_jax import _compile_cache, _solvers
    from softmax_jax._objective import TrainData

    TREES = (TrainData, _solvers.FBState)
    args = _solve_args()
    with jax.enable_x64(True):
        want = _solvers._solve_impl(*args, solver="newton-cg")[0].params["W"]
        run = _compile_cache.cached_program(
            _solvers._solve_impl, "solve", args, TREES, solver="newton-cg"
        )
        (entry,) = program_dir.glob("solve-*.bin")
        np.testing.assert_array_equal(run(*args)[0].params["W"], want)

        monkeypatch.setattr(_compile_cache, "_programs", {})
        monkeypatch.setattr(export, "export", None)  # reading the entry must not trace
        run = _compile_cache.cached_program(
            _solvers._solve_impl, "solve", args, TREES, solver="newton-cg"
        )
        np.testing.assert_array_equal(run(*args)[0].params["W"], want)
        assert run is _compile_cache.cached_program(
            _solvers._solve_impl, "solve", args, TREES, solver="newton-cg"
        )  # one jitted program per key in a process
        monkeypatch.undo()
        monkeypatch.setattr(_compile_cache, "_programs", {})

        monkeypatch.setattr(_compile_cache, "_source_digest", "another version")
        _compile_cache.cached_program(
            _solvers._solve_impl, "solve", args, TREES, solver="newton-cg"
        )
        _compile_cache.cached_program(
            _solvers._solve_impl, "solve", _solve_args(40), TREES, solver="newton-cg"
        )
        assert len(list(program_dir.glob("solve-*.bin"))) == 3

        entry.write_bytes(b"damaged")
        monkeypatch.setattr(_compile_cache, "_programs", {})
        monkeypatch.setattr(_compile_cache, "_source_digest", None)
        run = _compile_cache.cached_program(
            _solvers._solve_impl, "solve", args, TREES, solver="newton-cg"
        )
        np.testing.assert_array_equal(run(*args)[0].params["W"], want)
        assert run.func is _solvers._solve_impl  # traced as usual ...
        assert run is _compile_cache.cached_program(
            _solvers._solve_impl, "solve", args, TREES, solver="newton-cg"
        )  # ... and the damaged entry is not read again in this process


def test_without_export_serialization_the_solver_is_traced_as_usual(program_dir, monkeypatch):
    """Without ``flatbuffers`` (JAX's export serialization), nothing is written."""
    from softmax_jax import _compile_cache, _solvers

    monkeypatch.setattr(_compile_cache, "_export_module", lambda: None)
    run = _compile_cache.cached_program(
        _solvers._solve_impl, "solve", _solve_args(), solver="lbfgs"
    )
    assert run.func is _solvers._solve_impl and not program_dir.exists()


def test_without_a_cache_directory_the_solver_is_traced_as_usual():
    import jax

    from softmax_jax import _compile_cache, _solvers

    assert not jax.config.jax_compilation_cache_dir  # the suite's setting (tests/conftest.py)
    run = _compile_cache.cached_program(_solvers._solve_impl, "solve", (), solver="lbfgs")
    assert run.func is _solvers._solve_impl and run.keywords == {"solver": "lbfgs"}
