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
    assert any("solve" in p.name for p in cache.iterdir())


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
