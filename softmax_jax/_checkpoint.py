"""Checkpoint and resume for :func:`softmax_jax.fit`, with orbax-checkpoint's ``CheckpointManager``.

Layout: ``<dir>/<epoch>/state`` (the training state pytree: parameters, optimizer state, RNG key)
and ``<dir>/<epoch>/meta`` (JSON: a fingerprint of the run's configuration, the epoch, the
history). orbax writes each step into a temporary directory and renames it when complete, so a
process killed at any moment leaves only complete checkpoints (plus a temporary directory that is
cleaned up on the next start). Saves are synchronous, so a kill loses at most the epoch in
flight.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ._chunks import host_chunks
from ._validate import check_mapped, is_sparse

__all__ = ["CheckpointError", "Checkpointer", "data_digest", "transformation_digest"]

FORMAT_VERSION = 1


def _host_local(x) -> bool:
    """A value of one process only in a multi-process run (the RNG key data): saved and restored
    as NumPy, by every process alike. orbax saves global arrays (the state on a mesh) from all
    processes together, each writing the shards it holds; every process calls ``save``."""
    return jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed from (the message names the directory)."""


@contextlib.contextmanager
def _sigint_deferred():
    """Holds a Ctrl-C (SIGINT) that arrives during a save until the save is complete, then
    raises it: orbax writes from background threads, which an interrupted main thread would leave
    running into interpreter shutdown (tracebacks instead of the one-line notice)."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class Checkpointer:
    """Saves and restores the training state of one run in ``directory``.

    Args:
      directory: where checkpoints live (created if missing).
      fingerprint: JSON-able description of the run (data shape, optimizer, seed, ...). A
        checkpoint whose fingerprint differs is refused with :class:`CheckpointError`.
      max_to_keep: number of most recent checkpoints kept.
    """

    def __init__(self, directory: str | os.PathLike, *, fingerprint: dict, max_to_keep: int = 3):
        try:
            import orbax.checkpoint as ocp
        except ImportError as e:  # pragma: no cover - orbax is in the [cli] extra
            raise ImportError(
                "checkpoint_dir= needs orbax-checkpoint: pip install 'softmax-jax[cli]'"
            ) from e
        if max_to_keep < 1:
            raise ValueError(f"`max_to_keep` must be >= 1, got {max_to_keep}")
        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} is not a directory")
        self.fingerprint = {"format": FORMAT_VERSION, **fingerprint}
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            # Synchronous: when fit moves on to the next epoch the previous one is on disk, so a
            # kill loses at most the epoch in flight. The state of a linear model is small.
            enable_async_checkpointing=False,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta")
            )
        except Exception as e:  # noqa: BLE001 - any orbax failure is reported with the directory
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e}") from e

    def steps(self) -> list[int]:
        """The complete checkpoints present, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def _restore_meta(self, step: int) -> dict:
        ocp = self._ocp
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out.meta

    def restore_latest(
        self, target: Any, *, older: tuple[Any, Callable[[Any], Any]] | None = None
    ) -> tuple[int, Any, dict] | None:
        """Restores the newest readable checkpoint into the structure of ``target``.

        Returns ``(epoch, state, history)``, or ``None`` when the directory holds no checkpoint.
        An unreadable newest checkpoint falls back to the previous one with a ``UserWarning``.
        ``older`` = ``(layout, upgrade)``: where no checkpoint reads as ``target``, they are read
        as ``layout`` (the state as an earlier version wrote it) and ``upgrade`` maps it to
        ``target``'s structure.

        Raises:
          CheckpointError: the checkpoints were written by a different configuration, or none of
            them can be read.
        """
        try:
            return self._restore_into(target)
        except CheckpointError as err:
            if older is None:
                raise
            try:
                restored = self._restore_into(older[0])
            except CheckpointError:
                raise err from None
        epoch, state, history = restored
        return epoch, older[1](state), history

    def _restore_into(self, target: Any) -> tuple[int, Any, dict] | None:
        ocp = self._ocp
        steps = self.steps()
        if not steps:
            return None
        # Restored where the target lives (one device, or a mesh spanning several processes).
        abstract = jax.tree.map(
            lambda x: np.zeros(x.shape, x.dtype) if _host_local(x)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target,
        )  # fmt: skip
        errors = []
        for step in reversed(steps):
            try:
                meta = self._restore_meta(step)
            except Exception as e:  # noqa: BLE001 - corrupt JSON, missing files, ...
                errors.append(_one_line(step, e))
                continue
            self._check_fingerprint(meta, step)
            try:
                out = self._manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
                )
                state = out.state
                if jax.tree.structure(state) != jax.tree.structure(target):
                    raise ValueError("the saved state has a different structure")
            except Exception as e:  # noqa: BLE001
                errors.append(_one_line(step, e))
                continue
            if errors:
                moved = self._set_aside([s for s in steps if s > step])
                warnings.warn(
                    f"checkpoint directory {self.directory}: could not read "
                    f"{'; '.join(errors)}; resuming from epoch {step} instead (the unreadable "
                    f"checkpoints were moved to {', '.join(moved)})",
                    UserWarning,
                    stacklevel=3,
                )
            return int(meta["epoch"]), state, meta["history"]
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: it holds the state of another run (a "
            f"different optimizer or model) or damaged files; refusing to start over silently: "
            f"use another checkpoint_dir, or delete it to restart ({'; '.join(errors)})"
        )

    def _set_aside(self, bad_steps: list[int]) -> list[str]:
        """Renames unreadable step directories out of orbax's way (kept for inspection)."""
        moved = []
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in bad_steps:
            src = os.path.join(self.directory, str(step))
            dst = os.path.join(self.directory, f"unreadable-{step}-{stamp}")
            os.replace(src, dst)
            moved.append(dst)
        self._manager.reload()
        return moved

    def _check_fingerprint(self, meta: Any, step: int) -> None:
        saved = meta.get("fingerprint") if isinstance(meta, dict) else None
        if not isinstance(saved, dict):
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} was not written by softmax_jax.fit "
                "(no fingerprint); use another checkpoint_dir"
            )
        diff = {
            key: (saved.get(key), self.fingerprint.get(key))
            for key in sorted(set(saved) | set(self.fingerprint))
            if saved.get(key) != self.fingerprint.get(key)
        }
        if set(diff) == {"data_sha256"}:
            saved_digest = saved.get("data_sha256")
            was = "no digest" if saved_digest is None else f"SHA-256 {saved_digest[:12]}…"
            raise CheckpointError(
                f"checkpoint directory {self.directory} was written for other training data (same "
                f"shape and settings, different values: {was}, now "
                f"{self.fingerprint['data_sha256'][:12]}…); use another checkpoint_dir, or delete "
                "it to start over"
            )
        if diff:

            def short(key, value):  # a digest is told apart by its first 12 digits
                return f"'{value[:12]}…'" if key == "data_sha256" and value else repr(value)

            details = ", ".join(
                f"{k}: saved {short(k, a)}, now {short(k, b)}" for k, (a, b) in diff.items()
            )
            raise CheckpointError(
                f"checkpoint directory {self.directory} belongs to a different run ({details}); "
                "use another checkpoint_dir or the same settings"
            )

    def save(self, epoch: int, state: Any, history: dict) -> None:
        """Saves ``state`` and the history after ``epoch`` (complete on disk when it returns; a
        Ctrl-C during the save is raised once it is)."""
        meta = {"fingerprint": self.fingerprint, "epoch": int(epoch), "history": history}
        state = jax.tree.map(lambda x: np.asarray(x) if _host_local(x) else x, state)
        with _sigint_deferred():
            self._save(epoch, state, meta)

    def _save(self, epoch: int, state: Any, meta: dict) -> None:
        ocp = self._ocp
        self._manager.save(
            int(epoch),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _one_line(step: int, error: Exception) -> str:
    """An orbax error as one short line (its messages can dump whole pytrees)."""
    first = (str(error).strip().splitlines() or [""])[0]
    first = first if len(first) <= 160 else first[:157] + "..."
    return f"epoch {step}: {type(error).__name__}: {first}"


def _describe(value: Any, out: list, seen: dict, depth: int) -> None:
    """Appends to ``out`` what defines ``value``: the names of functions, and the numbers,
    strings and arrays held in closures, defaults, partials, tuples and dicts (recursively)."""
    # a guard against pathological nesting only (`seen` cuts cycles): real optimizers are
    # described whole (a schedule inside adamw inside a chain is 26 levels down)
    if depth > 100 or id(value) in seen:
        out.append("...")
        return
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        out.append(repr(value))
        return
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        a = np.asarray(value)
        out.append(f"{a.dtype.str}{a.shape}:{hashlib.sha256(a.tobytes()).hexdigest()[:16]}")
        return
    seen[id(value)] = value  # held, so that no temporary reuses its id
    if isinstance(value, tuple | list):
        out.append(f"{type(value).__name__}[")
        for item in value:
            _describe(item, out, seen, depth + 1)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        for key in sorted(value, key=repr):
            out.append(repr(key))
            _describe(value[key], out, seen, depth + 1)
        out.append("}")
    elif isinstance(value, functools.partial):
        out.append("partial")
        _describe((value.func, value.args, value.keywords), out, seen, depth + 1)
    elif hasattr(value, "__code__"):  # a Python function: its name, constants and closure
        out.append(f"{value.__module__}.{value.__qualname__}")
        cells = [c.cell_contents for c in value.__closure__ or () if _filled(c)]
        _describe((cells, value.__defaults__, value.__kwdefaults__), out, seen, depth + 1)
    else:
        out.append(type(value).__qualname__)


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def transformation_digest(transformation: Any) -> str:
    """A digest of what defines an optax transformation (or schedule): its functions' names and
    the hyperparameters their closures hold (learning rates, betas, nested transformations).

    ``optax.sgd(0.1)`` and ``optax.sgd(0.2)`` differ, as do ``optax.sgd`` and ``optax.adam``: part
    of the checkpoint fingerprint, so that a run with another optimizer is refused, not resumed.
    """
    out: list = []
    _describe(transformation, out, {}, 0)
    return hashlib.sha256("\x1f".join(out).encode()).hexdigest()[:16]


def _expand_sparse(arrays) -> list:
    """The arrays, a ``scipy.sparse`` one (a canonical CSR from ``check_training_data``) as a
    marker with its shape and its three arrays."""
    out: list = []
    for a in arrays:
        if is_sparse(a):
            out += [f"csr{a.shape};".encode(), a.indptr, a.indices, a.data]
        else:
            out.append(a)
    return out


def data_digest(*arrays: Any) -> str:
    """SHA-256 (hex) of the training arrays (features, labels, weights; ``None`` skipped): their
    dtypes and shapes and, block by block of about 64 MiB of rows, their bytes.

    The blocks are hashed in parallel threads (hashlib releases the GIL) and their digests hashed
    in order; a memory-mapped ``Z`` is read block by block, never copied whole. Part of the
    checkpoint fingerprint, so that a checkpoint directory of another dataset of the same shape
    is refused rather than resumed from.
    """
    from concurrent.futures import ThreadPoolExecutor

    parts: list = []
    for a in _expand_sparse(arrays):
        if a is None:
            parts.append(b"none;")
            continue
        if isinstance(a, bytes):
            parts.append(a)
            continue
        check_mapped(a, "Z")
        a = np.asarray(a)
        parts.append(f"{a.dtype.str}{a.shape};".encode())
        if a.ndim == 0:
            parts.append(a)
            continue
        rows = max(1, (64 << 20) // max(1, a[:1].nbytes))
        parts += [a[part] for part in host_chunks(a.shape[0], rows)]

    def block_digest(part) -> bytes:
        if isinstance(part, bytes):
            return hashlib.sha256(part).digest()
        return hashlib.sha256(memoryview(np.ascontiguousarray(part)).cast("B")).digest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(block_digest, parts))
    return hashlib.sha256(b"".join(digests)).hexdigest()
