"""Test configuration: JAX's default (float32) configuration, scoped x64, seeded keys, hypothesis.

Tests run in JAX's default configuration, as users do. A test that needs float64 asks for it with
the ``x64`` marker (``@pytest.mark.x64`` or a module-level ``pytestmark``): x64 is switched on for
that test only and restored afterwards, even when the test fails.
"""

import json
import os
import zlib
from pathlib import Path

# The suite never writes into the user's cache directory: the package's persistent compilation
# cache (softmax_jax._compile_cache) stays off in this process and in the subprocesses it starts;
# tests/test_compile_cache.py turns it on in temporary directories.
os.environ["SOFTMAX_JAX_COMPILATION_CACHE"] = "0"

# Compiling XLA programs is most of the suite's time: each test compiles its own (new shapes and
# options), tens of milliseconds each, where running them takes microseconds. LLVM's optimisation
# level 0 compiles them a quarter faster (this process and the subprocesses it starts: the
# variable is inherited). It changes the machine code's speed only, not what it computes: the HLO
# program, its fusion, its buffers and its float semantics (no fast-math at any level) are XLA's,
# above LLVM. bench/ measures the default level. A level set in $XLA_FLAGS is left as it is
# (``XLA_FLAGS=--xla_backend_optimization_level=2 pytest`` runs the suite on the default code).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
    ).strip()

import jax  # noqa: E402
import pytest
from hypothesis import HealthCheck, settings

# Every new shape drawn by hypothesis compiles a new XLA program: no per-example deadline.
settings.register_profile(
    "softmax_jax",
    deadline=None,
    max_examples=15,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
    print_blob=True,
)
settings.load_profile("softmax_jax")


@pytest.fixture(autouse=True)
def _scoped_x64(request):
    """Turns x64 on for tests marked ``x64``; checks that no test leaks a global x64 change."""
    before = jax.config.jax_enable_x64
    if request.node.get_closest_marker("x64") is not None:
        with jax.enable_x64(True):
            yield
    else:
        yield
    after = jax.config.jax_enable_x64
    if after != before:
        jax.config.update("jax_enable_x64", before)
        pytest.fail(f"the test left jax_enable_x64={after} (was {before})")


@pytest.fixture
def getkey(request):
    """Returns a function producing fresh PRNG keys; the seed is shown in failure reports."""
    seed = zlib.crc32(request.node.nodeid.encode())  # stable across runs
    request.node.user_properties.append(("prng_seed", seed))
    key = jax.random.PRNGKey(seed)
    counter = iter(range(10**9))

    def _getkey():
        return jax.random.fold_in(key, next(counter))

    return _getkey


@pytest.fixture
def cg_steps():
    """Newton's steps by conjugate gradients at every size (the dense steps of
    ``softmax_jax._newton`` off), for the tests of CG's own logic; the traced solvers are dropped
    before and after (the switch is static: by shape, at trace time)."""
    from _problems import newton_steps

    with newton_steps(dense=False):
        yield


#: Module-scoped fixtures that start subprocesses or train models, by test module. Every test that
#: uses one joins one xdist group (``--dist loadgroup``, in pyproject.toml's addopts), so under
#: ``-n 2`` the fixture runs once on one worker instead of once on each.
SHARED_FIXTURES = {
    "test_checkpoint": ("saved_run",),
    "test_cli": ("files",),
    "test_cli_predict": ("trained",),
    "test_lm_client": ("runs",),
    "test_parallel": ("devices_run", "heads_run", "matrix_run", "two_processes"),
    "test_shard": ("devices",),
    "test_sparse": ("problem",),
    "test_vocab": ("mesh_run",),
}


#: Tests measured over a limit (tools/durations.py writes the file from a ``--durations=0`` run):
#: marked ``slow``, with every test of their xdist group, and so out of the fast subset.
SLOW_TESTS = set(json.loads((Path(__file__).with_name("slow_tests.json")).read_text())["tests"])


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    groups: dict[str, list] = {}
    for item in items:
        module = getattr(item, "module", None)
        names = SHARED_FIXTURES.get(getattr(module, "__name__", "").rsplit(".", 1)[-1], ())
        used = [name for name in names if name in getattr(item, "fixturenames", ())]
        if used:
            group = f"{module.__name__}:{used[0]}"
            item.add_marker(pytest.mark.xdist_group(group))
            groups.setdefault(group, []).append(item)
    slow_groups = [g for g in groups.values() if any(i.nodeid in SLOW_TESTS for i in g)]
    for item in [
        *(i for i in items if i.nodeid in SLOW_TESTS),
        *(i for g in slow_groups for i in g),
    ]:
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    # xdist hands out the groups first (largest first), then single tests in this order: the slow
    # ones (notebooks, README, subprocess runs; up to 90 s each) go first, so that no worker is
    # left running one of them alone at the end while the other has finished
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
