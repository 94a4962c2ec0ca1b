"""JAX's persistent compilation cache, on by default for the training entry points.

The first fit in a fresh process spends most of its time compiling the solver; JAX can keep the
compiled programs on disk (its persistent compilation cache) so that later processes load them.
:func:`enable` turns that cache on in the user's cache directory the first time a training entry
point runs (``fit``, ``SoftmaxRegression.fit``, the CLI), unless

- ``$SOFTMAX_JAX_COMPILATION_CACHE`` is ``0``, ``off``, ``false`` or ``no`` (the opt-out), or
- the user already configured JAX's cache (``jax_compilation_cache_dir``, e.g. through
  ``$JAX_COMPILATION_CACHE_DIR``; that directory is then used as it is), or disabled it
  (``jax_enable_compilation_cache=False``).

The directory is ``$XDG_CACHE_HOME/softmax_jax/jax`` (``~/.cache/softmax_jax/jax`` when
``XDG_CACHE_HOME`` is unset), or the path ``$SOFTMAX_JAX_COMPILATION_CACHE`` names. JAX's
threshold for writing an entry (``jax_persistent_cache_min_compile_time_secs``) is lowered to
:data:`MIN_COMPILE_SECONDS` only when it is at JAX's default, so the small solvers are kept too.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import jax

#: The environment variable: ``0``/``off``/``false``/``no`` turns the cache off, a path moves it.
ENV = "SOFTMAX_JAX_COMPILATION_CACHE"
#: Compilations at least this long are written to the cache (below JAX's own default threshold).
MIN_COMPILE_SECONDS = 0.05
_JAX_DEFAULT_MIN_COMPILE_SECONDS = 1.0
_OFF = ("0", "off", "false", "no")

_lock = threading.Lock()
_done = False


def default_dir(environ: dict | None = None) -> Path | None:
    """Where the cache goes, from the environment (``os.environ`` by default); ``None`` when the
    opt-out is set."""
    env = os.environ if environ is None else environ
    choice = env.get(ENV, "").strip()
    if choice.lower() in _OFF:
        return None
    if choice:
        return Path(choice).expanduser()
    base = env.get("XDG_CACHE_HOME", "").strip()
    root = Path(base).expanduser() if base else Path.home() / ".cache"
    return root / "softmax_jax" / "jax"


def enable() -> Path | None:
    """Turns JAX's persistent compilation cache on in :func:`default_dir`, once per process.

    Returns the directory now in use (the user's own if they configured one), or ``None`` when the
    cache stays off. Never overrides a directory the user set, nor a cache they switched off.
    """
    global _done
    with _lock:
        configured = jax.config.jax_compilation_cache_dir
        if _done or configured or not jax.config.jax_enable_compilation_cache:
            _done = True
            return Path(configured) if configured else None
        _done = True
        path = default_dir()
        if path is None:
            return None
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only home: run without the cache
            return None
        jax.config.update("jax_compilation_cache_dir", str(path))
        if (
            jax.config.jax_persistent_cache_min_compile_time_secs
            == _JAX_DEFAULT_MIN_COMPILE_SECONDS
        ):
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
        # JAX decides once per process whether the cache is used (at its first compilation):
        # programs compiled before this call made it decide "no"; ask it to decide again
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
        return path
