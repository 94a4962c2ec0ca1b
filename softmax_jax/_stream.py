"""Streamed training: minibatches gathered on the host from an array or memmap, copied ahead of use.

``fit(..., stream=True)`` leaves ``Z`` where it is (a NumPy array, or an ``np.memmap`` such as a
``.npy`` opened with ``mmap_mode="r"``). Each epoch draws the same order as the in-memory epoch
(:func:`softmax_jax._minibatch.epoch_order`, computed on the device and brought to the host: O(N)
int32), gathers its batches on the host a *chunk* (a few batches) at a time, in a background
thread, into one of a few reused host blocks, while the previous chunk trains: the device and the
host hold a few batches, never the dataset. A CPU device reads the block in place (no copy); a
block is read into again only once its chunk is trained. Each chunk is one compiled ``lax.scan``
of :func:`softmax_jax._minibatch.minibatch_step`, the step of the in-memory epoch, so the same seed
gives the same parameters to rounding.

On a mesh each chunk's batches are split over ``"data"``; in a multi-process run each process
gathers only the rows of its own devices' share of every batch
(``jax.make_array_from_process_local_data``). The full-batch solver L-BFGS streams its passes
too (:class:`StreamedRows`): eq. (2) and its gradient are summed chunk by chunk from the host,
called back from inside the compiled solver.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ._chunks import host_chunks
from ._minibatch import epoch_order, minibatch_step
from ._objective import TrainData, predict_stats, vg_sum
from ._placement import DATA_AXIS, DataParallel
from ._precision import mean_normaliser
from ._validate import check_mapped

#: Bytes of ``Z`` per chunk: whole batches, about this many (at least one batch). Nothing next to
#: a dataset (the host holds 4 such blocks), large enough to amortise each chunk's compiled call
#: and thread hand-off (chosen with bench/stream.py).
CHUNK_BYTES = 8 << 20


def chunk_batches(batch_size: int, d: int, itemsize: int, nb: int) -> int:
    """Batches per chunk: about :data:`CHUNK_BYTES` of ``Z``, at least 1, at most ``nb``."""
    return int(max(1, min(nb, CHUNK_BYTES // max(1, batch_size * d * itemsize))))


def read_rows(Z: Any, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``idx`` of ``Z`` (an array or memmap), in the order of ``idx``: one gather, the only
    copy the host makes; into ``out`` ``(len(idx), D)`` (cast to its dtype) when given."""
    check_mapped(Z)  # issue 19: a truncated memmap is an error, not a SIGBUS
    if out is None:
        return np.take(Z, idx, axis=0)
    if isinstance(Z, np.ndarray) and Z.dtype == out.dtype:
        # "clip": unbuffered (the default "raise" gathers into a temporary first); the indices
        # come from `epoch_order`, in range by construction
        return np.take(Z, idx, axis=0, out=out, mode="clip")
    out[...] = np.take(Z, idx, axis=0)
    return out


def _aligned(nbytes: int, align: int = 64) -> np.ndarray:
    """``nbytes`` of uninitialised bytes at an address divisible by ``align``: a host block the
    CPU device adopts without a copy (passed to a compiled call, or ``jax.device_put(...,
    may_alias=True)``)."""
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes]


class _Ring:
    """``count`` host blocks of ``nbytes``, reused chunk after chunk: :meth:`take` hands one out
    (waiting for one to be free), :meth:`give` takes it back once the device is done with it.
    Reused blocks are memory already touched: a fresh block per chunk costs page faults."""

    def __init__(self, count: int, nbytes: int):
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(_aligned(nbytes))

    def take(self, stop: threading.Event) -> np.ndarray | None:
        while not stop.is_set():
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                pass
        return None

    def give(self, block: np.ndarray) -> None:
        self._free.put(block)


def _check_rows(block: np.ndarray, idx: np.ndarray, name: str) -> None:
    finite = np.isfinite(block)
    if not finite.all():
        r, c = np.unravel_index(int(np.flatnonzero(~finite)[0]), finite.shape)
        raise ValueError(
            f"`{name}` must be finite, got {block[r, c]} at index ({int(idx[r])}, {int(c)})"
        )


def _first_bad_row(Z: Any, order: np.ndarray, name: str) -> None:
    """Raises the ``ValueError`` of the first non-finite row of ``Z`` in ``order`` (rows read
    again, a chunk at a time: only after a chunk was found non-finite on the device)."""
    rows = max(1, CHUNK_BYTES // max(1, Z.shape[1] * Z.dtype.itemsize))
    for part in host_chunks(order.size, rows):
        ix = np.sort(order[part])
        _check_rows(read_rows(Z, ix), ix, name)


class _Prefetch:
    """Produces the items of ``make(j)`` for ``j < count`` in a background thread, at most
    ``depth`` ahead of the consumer; an exception in the producer is re-raised on ``get``."""

    def __init__(self, make, count: int, depth: int = 1, stop: threading.Event | None = None):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event() if stop is None else stop
        self._left = count

        def run():
            try:
                for j in range(count):
                    if self._stop.is_set():
                        return
                    self._q.put((make(j), None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                self._q.put((None, e))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._left == 0:
            raise StopIteration
        self._left -= 1
        item, err = self._q.get()
        if err is not None:
            raise err
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass


class _Layout:
    """Where one chunk ``(batches, B, ...)`` goes: one device, or the mesh with each batch
    split over ``"data"`` (this process supplying the entries ``[lo, hi)`` of every batch)."""

    def __init__(self, device, dp: DataParallel | None, batch_size: int):
        self.device, self.dp = device, dp
        self.lo, self.hi = 0, batch_size
        if dp is not None:
            self.lo, self.hi = dp.local_range(self._sharding(2), (1, batch_size), axis=1)

    def _sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.dp.mesh, P(None, DATA_AXIS, *([None] * (ndim - 2))))

    def put(self, local: tuple[np.ndarray, ...], batch_size: int) -> tuple[Any, ...]:
        """The host blocks ``local`` for the device(s); the device may alias them (they are not
        written again until their chunk is trained). A CPU device gets them as they are: the
        compiled call adopts an aligned NumPy block in place, for a fraction of the overhead of
        ``jax.device_put``."""
        if self.dp is None:
            if self.device.platform == "cpu":
                return local
            return jax.device_put(local, self.device, may_alias=True)
        return tuple(
            jax.make_array_from_process_local_data(
                self._sharding(x.ndim), x, (x.shape[0], batch_size, *x.shape[2:])
            )
            for x in local
        )


class HostData(NamedTuple):
    """A training set left on the host: ``Z`` ``(N, D)`` (array or memmap, any real dtype),
    labels ``y`` ``(N,)`` int32, weights ``s`` ``(N,)`` or ``None``; batches are cast to
    ``dtype`` and sent to ``device`` (a device, or a :class:`DataParallel` layout).
    ``checked`` is set once an epoch has read every row and found them finite."""

    Z: Any
    y: np.ndarray
    s: np.ndarray | None
    dtype: np.dtype
    device: Any
    checked: threading.Event


def host_data(Z, y, s, *, fit_intercept: bool, dtype, device, hessian_dtype=None, check=None):
    """``fit``'s data for ``stream=True`` (the arguments of
    :func:`softmax_jax._placement.place`): nothing is read or copied."""
    del fit_intercept, hessian_dtype, check  # batches are cast, and their rows checked, as read
    return HostData(Z, np.asarray(y, np.int32), s, np.dtype(dtype), device, threading.Event())


@functools.partial(jax.jit, static_argnames=("n", "batch_size", "dp", "dtype"))
def _order(key, s, *, n, batch_size, dp, dtype):
    return epoch_order(key, s, n, batch_size, dp, dtype)


@functools.partial(jax.jit, static_argnames=("opt", "dp"))
def _train_chunk(params, opt_state, tot, correct, finite, Zc, yc, wc, l2, check, *, opt, dp=None):
    """``lax.scan`` of :func:`minibatch_step` over the batches of one chunk ``(b, B, ...)``;
    where ``check`` (a traced bool), ``finite`` is and-ed with whether every value of ``Zc`` is
    finite (on the device, batch by batch while the batch is in cache)."""

    def body(carry, batch):
        params, opt_state, tot, correct, finite = carry
        if dp is not None:
            batch = jax.tree.map(dp.split_rows, batch)
        finite = lax.cond(check, lambda: finite & jnp.all(jnp.isfinite(batch[0])), lambda: finite)
        params, opt_state, v, c = minibatch_step(params, opt_state, TrainData(*batch), l2, opt=opt)
        return (params, opt_state, tot + v, correct + c, finite), None

    carry, _ = lax.scan(body, (params, opt_state, tot, correct, finite), (Zc, yc, wc))
    return carry


def stream_epoch(
    params,
    opt_state,
    data: HostData,
    l2,
    key,
    *,
    opt,
    batch_size: int,
    dp: DataParallel | None = None,
    n: int | None = None,
    name: str = "Z",
):
    """One streamed epoch over :class:`HostData`: the batches of the in-memory
    :func:`softmax_jax._minibatch.minibatch_epoch` for the same ``key``, trained chunk by chunk
    as they arrive. The rows read are checked to be finite until an epoch has found them all
    finite (``data.checked``; on the device; at the end of an epoch that met one, a
    ``ValueError`` naming the first bad index).

    Returns ``(params, opt_state, loss, accuracy)`` like the in-memory epoch (``n``, accepted
    for its signature, is the number of rows of ``Z``).
    """
    Z, y, s, dtype, device, checked = data
    n, d = Z.shape
    s_dev = None if s is None else jax.device_put(np.asarray(s, dtype))  # (no cast program)
    idx, w = _order(key, s_dev, n=n, batch_size=batch_size, dp=dp, dtype=dtype.name)
    B = batch_size if dp is None else dp.padded(batch_size)
    idx, w = np.asarray(idx).reshape(-1, B), np.asarray(w).reshape(-1, B)
    nb = idx.shape[0]
    layout = _Layout(device, dp, B)
    lo, hi = layout.lo, layout.hi
    m = chunk_batches(B, d, dtype.itemsize, nb)
    stop = threading.Event()
    # one block per chunk in flight: training, queued to train, queued by the reader, being read
    ring = _Ring(4, m * (hi - lo) * d * dtype.itemsize)

    def make(j):
        ix = idx[j * m : (j + 1) * m, lo:hi]
        buf = ring.take(stop)
        if buf is None:  # the epoch ended early (an error): nothing more to read
            return None
        block = buf[: ix.size * d * dtype.itemsize].view(dtype).reshape(ix.size, d)
        block = read_rows(Z, ix.reshape(-1), out=block).reshape(*ix.shape, d)
        wc = np.ascontiguousarray(w[j * m : (j + 1) * m, lo:hi])
        return layout.put((block, y[ix], wc), B), buf

    put = functools.partial(jax.device_put, device=device) if dp is None else dp.replicate
    tot = correct = put(np.zeros((), dtype))
    finite = put(np.ones((), bool))
    check = put(np.asarray(not checked.is_set()))
    chunks = _Prefetch(make, -(-nb // m), stop=stop)
    prev = None
    try:
        for (Zc, yc, wc), buf in chunks:
            params, opt_state, tot, correct, finite = _train_chunk(
                params, opt_state, tot, correct, finite, Zc, yc, wc, l2, check, opt=opt, dp=dp
            )
            if prev is not None:  # at most two chunks on the device: the host waits here
                prev[0].block_until_ready()
                ring.give(prev[1])  # that chunk is trained: its block may be read into again
            prev = tot, buf
    finally:
        chunks.close()
    if not bool(finite):  # every process of a mesh learns it: all raise
        _first_bad_row(Z, idx[:, lo:hi].reshape(-1), name)
        raise ValueError(f"`{name}` must be finite, got NaN/inf in rows another process read")
    checked.set()
    inv = mean_normaliser(s_dev, n, "mean", dtype)
    return params, opt_state, tot * inv, correct * inv


# Full-batch passes -------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("stats",))
def _chunk_sums(params, Zc, yc, sc, *, stats: bool):
    if stats:
        return predict_stats(params, TrainData(Zc, yc, sc))
    value, g, _ = vg_sum(params, Zc, yc, sc)
    return value, g


class StreamedRows:
    """The ``Z`` of a :class:`TrainData` whose rows stay on the host (a static pytree leaf-less
    node): the full-batch solvers' passes (:func:`softmax_jax._objective.data_vg`,
    :func:`softmax_jax._objective.predict_stats`) call back to the host, which streams the rows
    to the device in chunks of about :data:`CHUNK_BYTES` (prefetched one ahead) and sums the
    per-chunk results of the same functions there. One pass holds a chunk or two on the device.
    """

    def __init__(self, host: HostData):
        self.host = host
        self.shape = host.Z.shape

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other

    def _sums(self, params, stats: bool):
        Z, y, s, dtype, device, _ = self.host
        n, d = Z.shape
        rows = max(1, CHUNK_BYTES // (d * dtype.itemsize))
        params = jax.device_put(params, device)

        def make(j):
            sl = slice(j * rows, min(n, (j + 1) * rows))
            check_mapped(Z)  # issue 19
            block = np.asarray(Z[sl]).astype(dtype, copy=False)
            _check_rows(block, np.arange(sl.start, sl.stop), "Z")
            sc = None if s is None else np.asarray(s[sl], dtype)
            return jax.device_put((block, y[sl], sc), device)

        chunks = _Prefetch(make, -(-n // rows))
        total = None
        try:
            for Zc, yc, sc in chunks:
                part = _chunk_sums(params, Zc, yc, sc, stats=stats)
                total = part if total is None else jax.tree.map(jnp.add, total, part)
        finally:
            chunks.close()
        return jax.tree.map(np.asarray, total)

    def _host_vg(self, params):
        value, g = self._sums(params, stats=False)
        s = self.host.s
        total = self.shape[0] if s is None else np.sum(np.asarray(s, self.host.dtype))
        total = total if total > 0 else 1
        return (value / total).astype(value.dtype), jax.tree.map(lambda x: x / total, g)

    def data_vg(self, params):
        """``data_vg`` of the host rows, from inside a compiled solver (``jax.pure_callback``)."""
        shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
        scalar = jax.ShapeDtypeStruct((), params["W"].dtype)
        return jax.pure_callback(self._host_vg, (scalar, shapes), params)

    def predict_stats(self, params):
        scalar = jax.ShapeDtypeStruct((), params["W"].dtype)
        return jax.pure_callback(lambda p: self._sums(p, stats=True), (scalar, scalar), params)


jax.tree_util.register_pytree_node(StreamedRows, lambda z: ((), z), lambda z, _: z)


def streamed_train_data(host: HostData, *, solver: str, mesh=None) -> TrainData:
    """A :class:`TrainData` for the full-batch solver ``solver`` whose rows stay on the host:
    labels and weights (``(N,)`` each) on the device, ``Z`` a :class:`StreamedRows`. L-BFGS
    only, on one device (Newton-CG's Hessian products would need every pass of its inner
    solve streamed too)."""
    if solver != "lbfgs" or mesh is not None:
        what = "on a mesh" if mesh is not None else f"with optimizer {solver!r}"
        raise ValueError(
            f"`stream=True` with a full-batch solver supports optimizer='lbfgs' on one device, "
            f"got stream=True {what}; use stream=False or a minibatch optimizer"
        )
    # issue 19: NaN/inf rows found here, one line, not from inside the solver's host callback
    _first_bad_row(host.Z, np.arange(host.Z.shape[0]), "Z")
    put = functools.partial(jax.device_put, device=host.device)
    s = None if host.s is None else put(np.asarray(host.s, host.dtype))
    return TrainData(StreamedRows(host), put(host.y), s)
