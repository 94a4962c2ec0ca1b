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

:func:`cached_program` also keeps the full-batch solver's compiled executable there
(``softmax_jax_programs/``), so a warm process skips tracing and lowering too; the solver is
compiled bypassing JAX's own entries, which it then never reads.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import platform
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

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


# ---------------------------------------------------------------------------------------------
# Compiled programs on disk: a warm process skips tracing and lowering too.

#: Programs already loaded (or compiled) in this process, by key.
_programs: dict[str, Any] = {}
_source_digest: str | None = None


def _digest_of_sources() -> str:
    """A digest of this package's source files, JAX's version, ``XLA_FLAGS`` and the host's CPU
    (an executable compiled for one instruction set must not run on another): a stored program is
    reused only where it was compiled."""
    global _source_digest
    if _source_digest is None:
        h = hashlib.sha256(f"{jax.__version__} {jax.lib.__version__}".encode())
        h.update(os.environ.get("XLA_FLAGS", "").encode() + platform.machine().encode())
        try:  # the CPU's model and instruction-set flags (Linux; not its clock, which varies)
            lines = Path("/proc/cpuinfo").read_bytes().split(b"\n\n", 1)[0].splitlines()
            h.update(b"".join(x for x in lines if x.startswith((b"model name", b"flags"))))
        except OSError:
            h.update(platform.processor().encode())
        for path in sorted(Path(__file__).parent.glob("*.py")):
            h.update(path.name.encode() + path.read_bytes())
        _source_digest = h.hexdigest()
    return _source_digest


def cached_program(fn: Callable, name: str, args: tuple, **static) -> Callable:
    """``fn`` (a ``jax.jit`` function of arrays; ``static`` its static arguments, by keyword, and
    its XLA options those of its ``jax.jit``) compiled for ``args``, with the
    executable kept on disk next to JAX's own entries
    (:mod:`jax.experimental.serialize_executable`), so that a new process with a warm cache loads
    it without tracing, lowering or compiling.

    The key holds the package's sources (and so ``fn``'s XLA options), JAX's version, the host
    (:func:`_digest_of_sources`, with ``XLA_FLAGS``), x64,
    the backend and the shapes, dtypes, devices and tree structure of ``args``; the entries are
    trusted like JAX's own (loading one runs its code). In a single process on the CPU backend
    only (elsewhere JAX's own cache of compiled programs serves); without the persistent cache (no
    directory, or ``jax_enable_compilation_cache=False``), or on any failure to compile or read an
    entry, ``fn`` is returned jitted as it is.
    """
    plain = functools.partial(fn, **static)
    directory = jax.config.jax_compilation_cache_dir
    if (
        not directory
        or not jax.config.jax_enable_compilation_cache
        or jax.default_backend() != "cpu"
        or jax.process_count() > 1
    ):
        return plain
    leaves, tree = jax.tree.flatten(args)
    spec = [
        (np.shape(x), str(x.dtype if hasattr(x, "dtype") else np.result_type(x)),
         str(getattr(x, "sharding", "")))
        for x in leaves
    ]  # fmt: skip
    text = repr((name, sorted(static.items()), spec, str(tree), jax.config.jax_enable_x64,
                 jax.default_backend(), _digest_of_sources()))  # fmt: skip
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    if key in _programs:
        return _programs[key]
    path = Path(directory) / "softmax_jax_programs" / f"{name}-{key}.xla"
    from jax.experimental import serialize_executable

    stored = path.is_file()
    try:
        if stored:
            # the LAPACK kernels (jnp.linalg) are bound when a program that calls them is lowered;
            # a loaded executable is not lowered: bind them first (else it calls a null pointer)
            from jax._src.lax import linalg

            linalg.initialize_lapack()
            program = serialize_executable.deserialize_and_load(*pickle.loads(path.read_bytes()))
        else:
            program, compiled_here = _compile(fn, args, static)
    except Exception as err:  # a damaged entry, a program that does not compile this way: trace
        if not stored:  # it as usual (and do not try again in this process); say why, once
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(
                f"softmax_jax: compiling the {name!r} program for the compilation cache failed "
                f"({reason}); it runs without that cache in this process",
                RuntimeWarning,
                stacklevel=2,
            )
        _programs[key] = plain
        return plain
    if not stored and compiled_here:
        try:
            blob = pickle.dumps(serialize_executable.serialize(program))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        except Exception:  # a backend that cannot serialize, a read-only directory: not kept
            pass
    _programs[key] = program
    return program


_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_compile_lock = threading.Lock()


def _compile(fn: Callable, args: tuple, static: dict) -> tuple[Any, bool]:
    """``fn`` (jitted) compiled by XLA for ``args`` and ``static`` with JAX's own cache bypassed,
    and whether it was:
    an executable that JAX read from its cache does not serialize whole (loaded again, it misses
    functions), and JAX's cache may hold the solver where ours does not (another package version
    with the same program)."""
    from jax.experimental.compilation_cache import compilation_cache

    hits = []

    def listener(event: str, **kwargs) -> None:
        if event == _CACHE_HIT:
            hits.append(event)

    with _compile_lock:
        # JAX decides once whether its cache is used: switch it off, and ask it to decide again
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
        jax.monitoring.register_event_listener(listener)
        try:
            program = fn.lower(*args, **static).compile()
        finally:
            jax.monitoring.unregister_event_listener(listener)
            jax.config.update("jax_enable_compilation_cache", True)
            compilation_cache.reset_cache()
    return program, not hits
