"""The minibatch loop: optax optimizers by name, the shuffling permutation, one compiled epoch."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ._objective import TrainData, objective, vg_sum
from ._placement import DataParallel, pad_batches
from ._precision import mean_normaliser
from ._solvers import FULL_BATCH_SOLVERS

# name -> (factory(learning_rate) -> GradientTransformation, default learning rate)
OPTIMIZERS: dict[str, tuple[Callable[[Any], optax.GradientTransformation], float]] = {
    "sgd": (optax.sgd, 0.1),
    "momentum": (lambda lr: optax.sgd(lr, momentum=0.9), 0.05),
    "nesterov": (lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True), 0.05),
    "adam": (optax.adam, 1e-2),
    "adamw": (optax.adamw, 1e-2),
    "nadam": (optax.nadam, 1e-2),
    "adabelief": (optax.adabelief, 1e-2),
    "adagrad": (optax.adagrad, 0.1),
    "rmsprop": (optax.rmsprop, 1e-3),
    "lion": (optax.lion, 1e-3),
}
DEFAULT_BATCH_SIZE = 256


@functools.lru_cache(maxsize=64)
def _cached_optimizer(name: str, learning_rate) -> optax.GradientTransformation:
    factory, _ = OPTIMIZERS[name]
    return factory(learning_rate)


def make_optimizer(
    optimizer: str | optax.GradientTransformation, learning_rate: Any = None
) -> optax.GradientTransformation:
    """An optax transformation from a name in :data:`OPTIMIZERS` and a learning rate (a float or
    an optax schedule; ``None`` for the optimizer's default), or ``optimizer`` itself."""
    if isinstance(optimizer, optax.GradientTransformation):
        if learning_rate is not None:
            raise ValueError(
                "`learning_rate` is only used with an optimizer name; an optax "
                f"GradientTransformation carries its own, got learning_rate={learning_rate!r}"
            )
        return optimizer
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        names = ", ".join(repr(n) for n in (*OPTIMIZERS, *FULL_BATCH_SOLVERS))
        raise ValueError(
            f"`optimizer` must be an optax GradientTransformation or one of {names}, "
            f"got {optimizer!r}"
        )
    lr = OPTIMIZERS[optimizer][1] if learning_rate is None else learning_rate
    if not callable(lr):
        lr = float(lr)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"`learning_rate` must be a positive finite float, got {lr}")
    try:
        return _cached_optimizer(optimizer, lr)
    except TypeError:  # an unhashable schedule
        return OPTIMIZERS[optimizer][0](lr)


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32 values."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def seed_key(seed: int) -> jax.Array:
    """``jax.random.key(seed)``, made on the host where its bits are known (JAX's default
    threefry: ``(0, seed)`` for ``0 <= seed < 2³²``) rather than by a compiled program."""
    if jax.config.jax_default_prng_impl == "threefry2x32" and 0 <= seed < 2**32:
        return jax.random.wrap_key_data(np.asarray([0, seed], np.uint32))
    return jax.random.key(seed)


#: Epoch ``e``'s key, ``fold_in(key, e)``, as one program (op by op it compiles two small ones).
epoch_key = jax.jit(jax.random.fold_in)


def permutation(key: jax.Array, n: int, *, rounds: int = 8) -> jax.Array:
    """A pseudo-random permutation of ``range(n)`` (int32), keyed by ``key``, without sorting.

    ``jax.random.permutation`` sorts random keys, several rounds of an O(N log N) sort that on a
    CPU can cost more than the epoch's GEMMs. This
    is an 8-round keyed Feistel network on the smallest ``2^{2h} >= n`` (a bijection for any round
    function; the round function is a hash of the half-block with a per-round key drawn from
    ``key``), restricted to ``[0, n)`` by cycle walking: O(N) elementwise work.
    The position of each element is uniform to sampling noise (tested).
    """
    if n >= 2**31:
        raise ValueError(f"`n` must be < 2**31 for the shuffling permutation, got {n}")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = jnp.uint32((1 << half) - 1)
    keys = jax.random.bits(key, (rounds,), jnp.uint32)

    def encrypt(x):
        left, right = x >> half, x & mask
        for i in range(rounds):
            left, right = right, left ^ (_mix32(right ^ keys[i]) & mask)
        return (left << half) | right

    x = lax.while_loop(
        lambda x: jnp.any(x >= n),
        lambda x: jnp.where(x >= n, encrypt(x), x),
        encrypt(jnp.arange(n, dtype=jnp.uint32)),
    )
    return x.astype(jnp.int32)


def _batch(
    data: TrainData, idx: jax.Array, weights: jax.Array, dp: DataParallel | None
) -> TrainData:
    """Gathers one minibatch; with a data-parallel layout ``dp``, split over its ``"data"`` axis.

    On a mesh ``data``'s rows are split over ``"data"`` too: XLA gathers each row on the device
    that holds it and sums the masked gathers across devices (an all-reduce of the batch, never
    of the training set)."""
    if hasattr(data.Z, "take_rows"):  # scipy.sparse rows (softmax_jax._sparse)
        return TrainData(data.Z.take_rows(idx, weights), jnp.take(data.y, idx), weights)
    batch = TrainData(jnp.take(data.Z, idx, axis=0), jnp.take(data.y, idx), weights)
    return batch if dp is None else jax.tree.map(dp.split_rows, batch)


def epoch_order(key, s: jax.Array | None, n: int, batch_size: int, dp=None, dtype=jnp.float32):
    """An epoch's sample order: ``(idx, w)`` of shape ``(nb·B,)``, the :func:`permutation` of
    ``range(n)`` from ``key`` and its samples' weights ``s`` (ones by default), padded with
    index 0 at weight 0 to ``nb = ⌈n / batch_size⌉`` whole batches of ``B`` entries (``B`` is
    ``batch_size``, or with ``dp`` rounded up to a multiple of its ``"data"`` axis, each batch
    padded likewise). The in-memory and the streamed epochs both draw their batches from it."""
    nb = -(-n // batch_size)
    perm = permutation(key, n)
    s_all = jnp.ones((n,), dtype) if s is None else s[:n].astype(dtype)
    idx = jnp.concatenate([perm, jnp.zeros((nb * batch_size - n,), perm.dtype)])
    w = jnp.concatenate([jnp.take(s_all, perm), jnp.zeros((nb * batch_size - n,), dtype)])
    if dp is not None:
        idx, w = pad_batches(idx, w, batch_size, dp.padded(batch_size))
    return idx, w


def minibatch_step(params, opt_state, batch: TrainData, l2, *, opt):
    """One optimizer step on ``batch`` (``batch.s``: the weights, zero on padding) with the
    hand-written gradient of the batch's weighted mean objective.

    Returns ``(params, opt_state, Σ_batch s_i f, Σ_batch s_i [correct])``: the epoch's running
    metrics before normalisation."""
    w = batch.s
    wsum = jnp.sum(w)
    scale = mean_normaliser(w, w.shape[0], "mean", w.dtype)  # the batch's weighted mean
    value, g, A = vg_sum(params, batch.Z, batch.y, w)
    W = params["W"]
    value = value * scale + 0.5 * l2 * jnp.vdot(W, W)
    g = jax.tree.map(lambda x: x * scale, g)
    g["W"] = g["W"] + l2 * W
    hit = jnp.argmax(A, axis=1) == batch.y
    kw = {}
    if isinstance(opt, optax.GradientTransformationExtraArgs):
        kw = dict(value=value, grad=g, value_fn=lambda p: objective(p, batch, l2))
    updates, opt_state = opt.update(g, opt_state, params, **kw)
    params = optax.apply_updates(params, updates)
    return params, opt_state, value * wsum, jnp.sum(w * hit)


@functools.partial(jax.jit, static_argnames=("opt", "batch_size", "dp", "n"))
def minibatch_epoch(
    params, opt_state, data: TrainData, l2, key, *, opt, batch_size: int, dp=None, n=None
):
    """One epoch in one compiled call: the batches of :func:`epoch_order` from ``key``, a
    ``lax.scan`` of :func:`minibatch_step` over them.

    The last, partial batch is filled with index 0 at weight zero, so each batch is the weighted
    mean over its real samples. With ``dp`` each batch is split over the devices of its
    ``"data"`` axis, padded with zero-weight samples to a multiple of their number. ``n``: the
    number of real samples when ``data`` holds padding rows after them (default: all rows).
    Returns the new ``(params, opt_state)`` and the epoch's running metrics: weighted mean
    objective and accuracy over the batches as they were seen.
    """
    n = data.y.shape[0] if n is None else n
    dtype = params["W"].dtype
    idx_all, w_all = epoch_order(key, data.s, n, batch_size, dp, dtype)
    if dp is not None:
        batch_size = dp.padded(batch_size)
    nb = idx_all.shape[0] // batch_size

    def body(carry, i):
        params, opt_state, tot, correct = carry
        idx = lax.dynamic_slice(idx_all, (i * batch_size,), (batch_size,))
        w = lax.dynamic_slice(w_all, (i * batch_size,), (batch_size,))
        params, opt_state, v, c = minibatch_step(
            params, opt_state, _batch(data, idx, w, dp), l2, opt=opt
        )
        return (params, opt_state, tot + v, correct + c), None

    zero = jnp.zeros((), dtype)
    (params, opt_state, tot, correct), _ = lax.scan(
        body, (params, opt_state, zero, zero), jnp.arange(nb)
    )
    inv = mean_normaliser(None if data.s is None else data.s[:n], n, "mean", dtype)
    return params, opt_state, tot * inv, correct * inv
