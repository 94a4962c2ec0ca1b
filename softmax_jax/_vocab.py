"""The row-chunk pass shared by the fused vocabulary losses beyond cross-entropy.

:func:`softmax_jax.linear_log_probs` and :func:`softmax_jax.linear_distillation` walk the rows as
the head does (``_chunks.fold_chunks``, the precision policy of ``_precision``, both weight
layouts, the class-sharded ``jax.shard_map`` of ``_kernel``): per row chunk ``c`` the student
logits ``Z_c W`` (and the teacher's ``Z^t_c W^t``) are formed once, ``(C, K_local)``, and read in
column blocks; the row-wise reductions over all ``K`` classes (log-sum-exps, sums) are combined
across the class shards with one ``pmax``/``psum`` each. A loss describes one chunk with a
function ``chunk_fn(chunk, rows) -> (outputs, gblock)``: per-row outputs ``(C,)`` and, when a
gradient is asked for, ``gblock(block)``, the block ``G = ∂(Σ_i c_i ℓ_i)/∂r`` of the residual
with respect to the student's raw logits ``r = Z W + b``, which this module feeds block by block
into the two GEMMs ``∂/∂Z = G Wᵀ`` and ``∂/∂W = Zᵀ G`` (and ``∂/∂b = Σ_i G_i``). The ``(N, K)``
logits are never held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _shard
from ._chunks import fold_chunks, put_block, slice_block
from ._kernel import column_block, kaxis
from ._precision import acc_dtype, gemm, operand


class Layout(NamedTuple):
    """Where and how one call runs (hashable: part of a ``custom_vjp`` static argument)."""

    chunk: int  # rows per chunk (per device)
    layout: str  # "dk": W is (D, K); "kd": W is (K, D) (the teacher's W alike)
    k: int  # the global number of classes
    placement: _shard.Layout | None = None  # the mesh dispatch's layout (None: one device)
    axis: tuple[str, ...] | None = None  # per device: the mesh axes splitting the classes


class Chunk(NamedTuple):
    """One row chunk as a loss sees it."""

    A: jax.Array  # (C, K_local) student logits Z_c W (bias added per column block)
    b: jax.Array | None  # (K_local,) bias
    B: jax.Array | None  # (C, K_local) teacher logits, or None
    yl: jax.Array  # (C,) labels minus the shard's first class (an iota compare finds them)
    valid: jax.Array  # (C,) labels in [0, K)
    kblock: int
    axis: tuple[str, ...] | None


class Block(NamedTuple):
    """Columns ``[start, start + size)`` of a chunk."""

    a: jax.Array  # (C, size) student logits z W + b
    t: jax.Array | None  # (C, size) teacher logits, or None
    cols: jax.Array  # (1, size) local class indices
    start: int | jax.Array
    size: int


ChunkFn = Callable[[Chunk, tuple], tuple[tuple, Callable[[Block], jax.Array] | None]]


# --------------------------------------------------------------------------------------------
# Column blocks of one chunk: the reductions a loss builds its rows from.
# --------------------------------------------------------------------------------------------


def fold_columns(ch: Chunk, body, init):
    """``carry = body(block, carry)`` over the column blocks of the chunk (a :class:`Block`)."""

    def step(start, size, carry):
        a = slice_block(ch.A, start, size, 1)
        if ch.b is not None:
            a = a + slice_block(ch.b, start, size, 0)[None, :]
        t = None if ch.B is None else slice_block(ch.B, start, size, 1)
        cols = lax.broadcasted_iota(ch.yl.dtype, (1, size), 1) + start
        return body(Block(a, t, cols, start, size), carry)

    return fold_chunks(ch.A.shape[1], ch.kblock, step, init)


class Lse(NamedTuple):
    """A row-wise log-sum-exp over all K classes kept as ``m + ls``: ``m`` the row maximum,
    ``ls = log Σ_k exp(x_k − m)`` (``0 ≤ ls ≤ log K``). Log-probabilities are formed as
    ``(x − m) − ls``, never ``x − (m + ls)``: rounding ``m + ls`` at the logits' magnitude would
    scale a whole row of probabilities by ``1 + δ`` and leave their sum off 1 by ``δ``."""

    m: jax.Array  # (C,)
    ls: jax.Array  # (C,)

    def log_softmax(self, x: jax.Array) -> jax.Array:
        return (x - self.m[:, None]) - self.ls[:, None]


def lses_and_target(ch: Chunk, picks: Sequence[Callable]):
    """``([Lse of pick(block) for each pick], a_{i, y_i})``: the max-shifted log-sum-exps over
    all K classes (online over the column blocks, then across the shards) of each family of
    logits ``pick(block)``, and the student's raw target logit (0 where the label is no class)."""
    c = ch.A.shape[0]
    acc = ch.A.dtype

    def body(blk, carry):
        ms, tgt = carry
        new = []
        for pick, (m, s) in zip(picks, ms):
            x = pick(blk)
            m_new = jnp.maximum(m, jnp.max(x, axis=1))
            s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
            new.append((m_new, s))
        tgt = tgt + jnp.sum(jnp.where(blk.cols == ch.yl[:, None], blk.a, 0.0), axis=1)
        return new, tgt

    init = ([(jnp.full((c,), -jnp.inf, acc), jnp.zeros((c,), acc)) for _ in picks],
            jnp.zeros((c,), acc))  # fmt: skip
    ms, tgt = fold_columns(ch, body, init)
    return [_combine(m, s, ch.axis) for m, s in ms], allsum(tgt, ch.axis)


def row_sums(ch: Chunk, terms: Callable, count: int):
    """``Σ_k terms(block)[j]`` over all K classes, for ``j < count`` (each term a
    ``(C, size)`` block), summed across the shards."""
    c = ch.A.shape[0]

    def body(blk, carry):
        return tuple(x + jnp.sum(v, axis=1) for x, v in zip(carry, terms(blk)))

    init = tuple(jnp.zeros((c,), ch.A.dtype) for _ in range(count))
    return tuple(allsum(x, ch.axis) for x in fold_columns(ch, body, init))


def allsum(x, axis):
    return x if axis is None else lax.psum(x, axis)


def _combine(m, s, axis) -> Lse:
    """Across the shards: ``M = max_p m_p``, ``ls = log Σ_p s_p exp(m_p − M)``."""
    if axis is not None:
        big = lax.pmax(m, axis)
        m, s = big, lax.psum(s * jnp.exp(m - big), axis)
    return Lse(m, jnp.log(s))


def _grad_gemms(ch: Chunk, gblock, Zc, W, dW, db, layout, wants):
    """One chunk's residual ``G`` block by block into the GEMMs: ``(G Wᵀ, dW + Z_cᵀ G,
    db + Σ_i G_i)``; GEMM operands in ``W``'s dtype, accumulation in ``acc``."""
    want_dZ, want_dW, want_db = wants
    acc, ka = ch.A.dtype, kaxis(layout)
    Zg = operand(Zc, W.dtype)

    def body(blk, carry):
        dZc, dW, db = carry
        G = gblock(blk)
        Gg = operand(G, W.dtype)
        start, size = blk.start, blk.size
        if want_dZ:
            dZc = dZc + gemm(Gg, slice_block(W, start, size, ka), (1, ka), acc)
        if want_dW:
            blk = gemm(Zg, Gg, (0, 0), acc) if ka == 1 else gemm(Gg, Zg, (0, 0), acc)
            dW = put_block(dW, start, slice_block(dW, start, size, ka) + blk, ka)
        if want_db:
            db = put_block(db, start, slice_block(db, start, size, 0) + jnp.sum(G, 0), 0)
        return dZc, dW, db

    init = (jnp.zeros((Zc.shape[0] if want_dZ else 0, W.shape[1 - ka]), acc), dW, db)
    return fold_columns(ch, body, init)


# --------------------------------------------------------------------------------------------
# The pass over the rows (one device, or one shard inside shard_map).
# --------------------------------------------------------------------------------------------


def _pass(Z, W, b, Zt, Wt, y, rows, offset, lay, chunk_fn, n_out, wants, inv, dz_dtype):
    """Returns ``(outputs, dZ, dW, db)``: the ``n_out`` per-row outputs ``(N,)`` of
    ``chunk_fn`` and the gradients asked for in ``wants = (dZ, dW, db)``, ``inv`` (the mean's
    ``1 / Σ s`` or ``None``) applied to the accumulated GEMM results."""
    (n, d), ka = Z.shape, kaxis(lay.layout)
    kl = W.shape[ka]
    acc = acc_dtype(W.dtype) if Wt is None else acc_dtype(W.dtype, Wt.dtype)
    kblock = column_block(kl, bool(lay.axis))
    want_dZ, want_dW, want_db = wants

    def body(start, size, carry):
        outs, dZ, dW, db = carry
        sl = lambda x: slice_block(x, start, size, 0)  # noqa: E731
        Zc, yc = sl(Z), sl(y)
        A = gemm(operand(Zc, W.dtype), W, (1, 1 - ka), acc)
        B = None
        if Wt is not None:
            B = gemm(operand(sl(Zt), Wt.dtype), Wt, (1, 1 - ka), acc).astype(acc)
        ch = Chunk(A, b, B, yc - offset, (yc >= 0) & (yc < lay.k), kblock, lay.axis)
        vals, gblock = chunk_fn(ch, tuple(sl(r) for r in rows))
        outs = tuple(put_block(o, start, v, 0) for o, v in zip(outs, vals))
        if gblock is not None and any(wants):
            dZc, dW, db = _grad_gemms(ch, gblock, Zc, W, dW, db, lay.layout, wants)
            if want_dZ:
                dZ = put_block(dZ, start, dZc if inv is None else dZc * inv, 0)
        return outs, dZ, dW, db

    w_shape = list(W.shape)
    w_shape[ka] = kl if want_dW else 0
    init = (
        tuple(jnp.zeros((n,), acc) for _ in range(n_out)),
        jnp.zeros((n if want_dZ else 0, d), dz_dtype),
        jnp.zeros(w_shape, acc),
        jnp.zeros((kl if want_db else 0,), acc),
    )
    outs, dZ, dW, db = fold_chunks(n, lay.chunk, body, init)
    if inv is not None:
        dW, db = dW * inv, db * inv
    return outs, dZ, dW, db


def run(Z, W, b, Zt, Wt, y, rows, lay: Layout, chunk_fn: ChunkFn, n_out: int, *,
        wants=(False, False, False), inv=None):  # fmt: skip
    """:func:`_pass` where ``lay.placement`` says (the head's mesh dispatch, ``_shard.run``): on
    one device, or on each device of its mesh — its rows, its class shard of ``W``, ``b`` and
    the teacher's ``W`` at ``offset``; ``dZ`` summed over the class axes, ``dW`` and ``db`` over
    the row axes. ``Z (..., D)``, ``Zt (..., D_t)`` and the per-row arrays keep their leading dims
    (each device flattens its own). Returns ``(outputs, dZ, dW, db)``, the outputs shaped like
    ``y``, every gradient sharded like its input."""
    acc = acc_dtype(W.dtype)
    nrows = len(rows)

    def per_device(local, Z, W, b, Zt, Wt, y, inv, *rws):
        lead = y.shape
        axis = local.classes or None
        flat = lambda x: _shard.flat_rows(x, lead)  # noqa: E731
        offset = local.class_offset(W.shape[kaxis(lay.layout)])
        outs, dZ, dW, db = _pass(flat(Z), W, b, flat(Zt), Wt, flat(y),
                                 tuple(flat(r) for r in rws), offset,
                                 lay._replace(axis=axis), chunk_fn, n_out, wants, inv,
                                 acc if axis else Z.dtype)  # fmt: skip
        dZ, dW, db = _shard.reduce_gradients(local, lead, dZ, dW, db, wants, Z.dtype)
        return (*(o.reshape(lead) for o in outs), dZ, dW, db)

    out = _shard.run(
        per_device, lay.placement, (Z, W, b, Zt, Wt, y, inv, *rows),
        ("features", "weight", "classes", "features", "weight", "rows", "replicated",
         *("rows",) * nrows),
        (*(("rows", None),) * n_out, ("features", 0), ("weight", 1), ("classes", 2)),
    )  # fmt: skip
    return out[:n_out], out[n_out], out[n_out + 1], out[n_out + 2]
