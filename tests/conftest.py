"""Test configuration: float64 on for the whole session, seeded keys, hypothesis profile.

x64 is switched on once, before any test runs, so exactness checks can use float64; tests that
want float32/bfloat16 create those dtypes explicitly.
"""

import zlib

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

# Every new shape drawn by hypothesis compiles a new XLA program: no per-example deadline.
settings.register_profile(
    "softmax_jax",
    deadline=None,
    max_examples=15,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
    print_blob=True,
)
settings.load_profile("softmax_jax")


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
