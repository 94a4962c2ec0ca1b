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

:func:`cached_program` also keeps the full-batch solver's traced and lowered form there
(``softmax_jax_programs/``, :mod:`jax.export`), so a warm process skips tracing too.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
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
# Traced programs on disk: a warm process skips tracing and lowering too.

#: Exported programs already loaded in this process, by key.
_programs: dict[str, Any] = {}
_source_digest: str | None = None


def _digest_of_sources() -> str:
    """A digest of this package's source files and JAX's version: an exported program is reused
    only by the code that traced it."""
    global _source_digest
    if _source_digest is None:
        h = hashlib.sha256(f"{jax.__version__} {jax.lib.__version__}".encode())
        for path in sorted(Path(__file__).parent.glob("*.py")):
            h.update(path.name.encode() + path.read_bytes())
        _source_digest = h.hexdigest()
    return _source_digest


def cached_program(
    fn: Callable, name: str, args: tuple, namedtuples: tuple[type, ...] = (), **static
) -> Callable:
    """``fn`` (a function of arrays; ``static`` bound as keywords) jitted, with its traced and
    lowered form kept on disk next to the compiled programs (:func:`jax.export`), so that a new
    process with a warm cache skips tracing and lowering as well as compiling.

    The key holds the package's sources, JAX's version, x64, the backend and the shapes, dtypes
    and tree structure of ``args``. Without the persistent cache, without JAX's export
    serialization (``flatbuffers``), or on any failure to export or read an entry, ``fn`` is
    returned jitted as it is.
    """
    plain = functools.partial(fn, **static)
    directory = jax.config.jax_compilation_cache_dir
    export = _export_module()
    if export is None or not directory:
        return plain
    leaves, tree = jax.tree.flatten(args)
    spec = [
        (np.shape(x), str(x.dtype if hasattr(x, "dtype") else np.result_type(x))) for x in leaves
    ]
    text = repr((name, sorted(static.items()), spec, str(tree), jax.config.jax_enable_x64,
                 jax.default_backend(), _digest_of_sources()))  # fmt: skip
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    if key in _programs:
        return _programs[key]
    path = Path(directory) / "softmax_jax_programs" / f"{name}-{key}.bin"
    try:
        _register_trees(namedtuples)
        if path.is_file():
            exported = export.deserialize(bytearray(path.read_bytes()))
        else:
            exported = export.export(jax.jit(plain))(*args)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(exported.serialize())
            os.replace(tmp, path)  # atomic: a reader never sees half a file
    except Exception:  # a damaged entry, an unsupported program: trace it as usual (and do
        _programs[key] = plain  # not try again in this process)
        return plain
    _programs[key] = jax.jit(exported.call)
    return _programs[key]


@functools.cache
def _export_module():
    """:mod:`jax.export` where its serialization can be imported (it needs ``flatbuffers``), else
    None; tried once per process."""
    try:
        from jax import export
        from jax._src.export import serialization  # noqa: F401  (needs flatbuffers)
    except ImportError:
        return None
    return export


_registered: set[type] = set()


def _register_trees(classes: tuple[type, ...]) -> None:
    """NamedTuples of the arguments and results, serializable in exported tree structures."""
    from jax import export

    for cls in classes:
        if cls not in _registered:
            export.register_namedtuple_serialization(
                cls, serialized_name=f"softmax_jax.{cls.__name__}"
            )
            _registered.add(cls)
