"""The persistent compilation cache (``_compile_cache``): where it goes, that it never overrides a
cache the user configured, the opt-out, and that a fit in a fresh process writes its programs
there even after other JAX work compiled first. Subprocesses with temporary cache directories:
the suite never touches the user's (tests/conftest.py turns the cache off)."""

from __future__ import annotations

import functools
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
print(sj.SoftmaxRegression().fit(X, y).coef_.tobytes().hex())
import jax; print(jax.config.jax_compilation_cache_dir)
"""


def run_fit(env_changes: dict, coef: bool = False) -> str | tuple[str, str]:
    """The cache directory a fit in a fresh process used (and, with ``coef``, its ``coef_``)."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "JAX_COMPILATION_CACHE_DIR")}
    env.update(env_changes)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", FIT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    return (lines[-1], lines[-2]) if coef else lines[-1]


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


def _without_optimization_level(flags: str) -> str:
    return " ".join(f for f in flags.split() if "xla_backend_optimization_level" not in f)


@pytest.mark.slow
@pytest.mark.parametrize("level", ["suite", "solver's own"])
def test_fit_writes_its_programs_to_the_user_cache_dir(tmp_path, level):
    # "solver's own": no level in XLA_FLAGS, so the solver's jax.jit carries its own XLA options
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    if level != "suite":
        env["XLA_FLAGS"] = _without_optimization_level(os.environ.get("XLA_FLAGS", ""))
    used, coef = run_fit(env, coef=True)
    cache = tmp_path / "softmax_jax" / "jax"
    assert used == str(cache)
    # the compiled solver, as our executable (not in JAX's own entries: compiled bypassing them)
    assert any((cache / "softmax_jax_programs").glob("solve-*.xla"))
    assert not any(p.name.startswith("jit__solve_impl") for p in cache.iterdir())
    # the next process loads that executable (LAPACK's kernels bound first) and runs it
    assert run_fit(env, coef=True) == (used, coef)


def test_the_solver_compiles_at_llvm_level_1_unless_xla_flags_set_a_level():
    from softmax_jax._solvers import solver_compiler_options

    assert solver_compiler_options("") == {"xla_backend_optimization_level": 1}
    assert solver_compiler_options("--xla_cpu_enable_fast_math=false") == {
        "xla_backend_optimization_level": 1
    }
    assert solver_compiler_options("--xla_backend_optimization_level=3") == {}


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
    """JAX's cache directory set to a temporary one for this test, no program loaded yet; JAX
    itself writes no entry there (a test lowers its threshold to write some)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from softmax_jax import _compile_cache

    before = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)  # fmt: skip
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    compilation_cache.reset_cache()
    monkeypatch.setattr(_compile_cache, "_programs", {})
    yield tmp_path / "softmax_jax_programs"
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()


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


def test_compiled_solver_is_kept_and_reused(program_dir, monkeypatch):
    """A solver compiled in one process is written as a serialized executable; the next process
    (here: an emptied in-memory table) loads it without tracing or compiling, with the same result;
    another package source or another shape is another entry; a damaged entry is traced again."""
    import jax
    import numpy as np

    from softmax_jax import _compile_cache, _solvers

    args = _solve_args()
    with jax.enable_x64(True):
        want = _solvers._solve_impl(*args, solver="newton-cg")[0].params["W"]
        run = _compile_cache.cached_program(_solvers._solve_impl, "solve", args, solver="newton-cg")
        (entry,) = program_dir.glob("solve-*.xla")
        np.testing.assert_array_equal(run(*args)[0].params["W"], want)

        monkeypatch.setattr(_compile_cache, "_programs", {})
        monkeypatch.setattr(jax, "jit", None)  # loading the entry must not trace nor compile
        run = _compile_cache.cached_program(_solvers._solve_impl, "solve", args, solver="newton-cg")
        assert isinstance(run, jax.stages.Compiled)
        np.testing.assert_array_equal(run(*args)[0].params["W"], want)
        assert run is _compile_cache.cached_program(
            _solvers._solve_impl, "solve", args, solver="newton-cg"
        )  # one program per key in a process
        monkeypatch.undo()
        monkeypatch.setattr(_compile_cache, "_programs", {})

        monkeypatch.setattr(_compile_cache, "_source_digest", "another version")
        _compile_cache.cached_program(_solvers._solve_impl, "solve", args, solver="newton-cg")
        _compile_cache.cached_program(
            _solvers._solve_impl, "solve", _solve_args(40), solver="newton-cg"
        )
        assert len(list(program_dir.glob("solve-*.xla"))) == 3

        entry.write_bytes(b"damaged")
        monkeypatch.setattr(_compile_cache, "_programs", {})
        monkeypatch.setattr(_compile_cache, "_source_digest", None)
        run = _compile_cache.cached_program(_solvers._solve_impl, "solve", args, solver="newton-cg")
        np.testing.assert_array_equal(run(*args)[0].params["W"], want)
        assert run.func is _solvers._solve_impl  # traced as usual ...
        assert run is _compile_cache.cached_program(
            _solvers._solve_impl, "solve", args, solver="newton-cg"
        )  # ... and the damaged entry is not read again in this process


def test_a_program_in_jaxs_cache_is_compiled_again_and_kept(program_dir, monkeypatch):
    """Where JAX's own cache holds the solver but ours does not (another package version with the
    same program), the solver is compiled by XLA again and kept: an executable that JAX read from
    its cache does not serialize whole (loaded again, it misses functions). The kept entry loads in
    a new process (an emptied table) and gives the same result."""
    import jax
    import numpy as np
    from jax.experimental.compilation_cache import compilation_cache

    from softmax_jax import _compile_cache, _solvers

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # JAX's cache on, writing every entry, in program_dir's parent
    try:
        args = _solve_args(30)
        with jax.enable_x64(True):
            want = _solvers._solve_impl(*args, solver="lbfgs")[0].params["W"]
            jax.clear_caches()
            jax.jit(functools.partial(_solvers._solve_impl, solver="lbfgs")).lower(*args).compile()
            assert any(program_dir.parent.glob("jit__solve_impl-*"))  # in JAX's cache only
            assert not program_dir.exists()
            jax.clear_caches()
            run = _compile_cache.cached_program(_solvers._solve_impl, "solve", args, solver="lbfgs")
            np.testing.assert_array_equal(run(*args)[0].params["W"], want)
            (entry,) = program_dir.glob("solve-*.xla")  # compiled again: kept
            monkeypatch.setattr(_compile_cache, "_programs", {})
            with monkeypatch.context() as m:
                m.setattr(jax, "jit", None)  # loading the entry must not trace nor compile
                run = _compile_cache.cached_program(
                    _solvers._solve_impl, "solve", args, solver="lbfgs"
                )
            assert isinstance(run, jax.stages.Compiled)
            np.testing.assert_array_equal(run(*args)[0].params["W"], want)
            assert jax.config.jax_enable_compilation_cache  # JAX's cache is on again
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)


def test_the_host_and_xla_flags_are_in_the_key(monkeypatch):
    """An executable is compiled for one CPU and one set of XLA flags: either changes the key."""
    from softmax_jax import _compile_cache

    monkeypatch.setattr(_compile_cache, "_source_digest", None)
    here = _compile_cache._digest_of_sources()
    monkeypatch.setattr(_compile_cache, "_source_digest", None)
    assert _compile_cache._digest_of_sources() == here  # stable (not the CPU's clock)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    monkeypatch.setattr(_compile_cache, "_source_digest", None)
    assert _compile_cache._digest_of_sources() != here


def test_a_backend_that_cannot_serialize_still_runs_the_compiled_solver(program_dir, monkeypatch):
    """Where the executable cannot be serialized, the compiled program runs and nothing is kept."""
    import jax
    from jax.experimental import serialize_executable

    from softmax_jax import _compile_cache, _solvers

    def refuse(compiled):
        raise ValueError("Compilation does not support serialization")

    monkeypatch.setattr(serialize_executable, "serialize", refuse)
    args = _solve_args()
    with jax.enable_x64(True):
        run = _compile_cache.cached_program(_solvers._solve_impl, "solve", args, solver="lbfgs")
        assert isinstance(run, jax.stages.Compiled) and bool(run(*args)[0].it > 0)
    assert not program_dir.exists()


def test_a_program_that_does_not_compile_for_the_cache_runs_uncached_with_a_warning(
    program_dir, monkeypatch
):
    """A failure to compile the program this way (a nested jit refused the solver's XLA options,
    once) is said, not swallowed; the fit still runs, traced as usual, and nothing is kept."""
    import jax

    from softmax_jax import _compile_cache, _solvers

    def refuse(fn, args, static):
        raise ValueError("compiler_options can only be passed to top-level jax.jit\nmore")

    monkeypatch.setattr(_compile_cache, "_compile", refuse)
    args = _solve_args()
    with jax.enable_x64(True):
        with pytest.warns(
            RuntimeWarning, match=r"'solve' program .*\(ValueError: compiler_options"
        ):
            run = _compile_cache.cached_program(_solvers._solve_impl, "solve", args, solver="lbfgs")
        assert not isinstance(run, jax.stages.Compiled) and bool(run(*args)[0].it > 0)
    assert not program_dir.exists()


def test_a_cache_the_user_switched_off_gets_no_program(program_dir):
    import jax

    from softmax_jax import _compile_cache, _solvers

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        run = _compile_cache.cached_program(_solvers._solve_impl, "solve", (), solver="lbfgs")
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
    assert run.func is _solvers._solve_impl and not program_dir.exists()


def test_without_a_cache_directory_the_solver_is_traced_as_usual():
    import jax

    from softmax_jax import _compile_cache, _solvers

    assert not jax.config.jax_compilation_cache_dir  # the suite's setting (tests/conftest.py)
    run = _compile_cache.cached_program(_solvers._solve_impl, "solve", (), solver="lbfgs")
    assert run.func is _solvers._solve_impl and run.keywords == {"solver": "lbfgs"}
