"""The installed softmax_jax version, for modules that record it (no import of the package)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """``softmax-jax``'s installed version, or ``"0.0.0+unknown"`` in a never-installed tree."""
    try:
        return version("softmax-jax")
    except PackageNotFoundError:
        return "0.0.0+unknown"
