"""`_version`: the installed version, without importing the package."""

from importlib.metadata import version

import softmax_jax
from softmax_jax._version import package_version


def test_package_version_is_the_installed_one():
    assert package_version() == version("softmax-jax") == softmax_jax.__version__
