"""The fused linear + softmax cross-entropy kernel shared by both heads.

One implementation of the per-chunk math of :func:`softmax_jax.linear_cross_entropy` and
:func:`softmax_jax.sharded_linear_cross_entropy`: the logits of a row chunk, the online
log-sum-exp, the target logit and the smoothing mean (read from the same logits, by an iota
compare), the residual ``G`` block by block into the two gradient GEMMs, and the ``custom_vjp``
bookkeeping. Its interface for a class shard is two numbers: the shard's first global class
(``offset``) and the global number of classes (``Spec.num_classes``); the row-wise reductions over classes
then go through :func:`_allmax` / :func:`_allsum` over ``Spec.class_axes`` (identities on one device).

Per sample, with ``r_i = z_i W + b`` and logits ``a_i = r_i`` or ``c · tanh(r_i / c)`` (softcap):

``ℓ_i = lse_i − [(1 − ε) a_{i,y_i} + ε mean_k a_ik] + λ lse_i²``,
``G_i = ∂ℓ_i/∂r_i = [(1 + 2 λ lse_i) softmax(a_i) − t_i] ⊙ (1 − (a_i / c)²)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _shard
from ._chunks import fold_chunks, put_block, slice_block
from ._precision import acc_dtype, gemm, operand

# Columns of a logits chunk handled per step of the inner (class) loops: besides the (chunk, K)
# logits, the temporaries are a few (chunk, K_BLOCK) and (D, K_BLOCK) blocks; 2048 keeps those
# GEMMs large enough to run at full speed.
K_BLOCK = 2048
# A class shard is read in this many column blocks, ``(chunk, K/P/4)`` each: its residual blocks
# shrink with the shard, so the per-device temporaries scale as 1/P whatever P.
_SHARD_BLOCKS = 4


def column_block(k_local: int, sharded: bool, kblock: int = K_BLOCK) -> int:
    """Columns per step of the inner class loops over a ``(chunk, k_local)`` logits chunk:
    ``kblock`` on one device, ``⌈k_local / 4⌉`` on a class shard; within ``[1, k_local]``."""
    block = -(-k_local // _SHARD_BLOCKS) if sharded else kblock
    return max(1, min(block, k_local))


class Spec(NamedTuple):
    """Static description of one call of the kernel (hashable: a jit/custom_vjp static arg)."""

    reduction: str
    chunk: int  # rows per chunk (per device)
    kblock: int  # columns per block of the inner loops (upper bound)
    label_smoothing: float  # ε
    z_loss: float  # λ
    softcap: float | None
    weight_layout: str  # "dk": W is (D, K); "kd": W is (K, D)
    num_classes: int  # the global K
    aux: bool  # also return (lse, predictions)
    placement: _shard.Layout | None = None  # where it runs (None: one device)
    class_axes: tuple[str, ...] | None = None  # per device: the mesh axes splitting the classes


# --------------------------------------------------------------------------------------------
# Collectives, layouts.
# --------------------------------------------------------------------------------------------


def _allmax(x, spec: Spec):
    return x if spec.class_axes is None else lax.pmax(x, spec.class_axes)


def _allsum(x, spec: Spec):
    return x if spec.class_axes is None else lax.psum(x, spec.class_axes)


def kaxis(layout: str) -> int:
    """The class axis of ``W`` (and of ``dW``) in ``layout`` (``"dk"``: 1, ``"kd"``: 0)."""
    return 1 if layout == "dk" else 0


def _logits_chunk(Zc, W, spec, acc):
    """``Z_c W`` (or ``Z_c Wᵀ`` for ``"kd"``), ``(C, K_local)``, accumulated in ``acc``."""
    return gemm(operand(Zc, W.dtype), W, (1, 1 - kaxis(spec.weight_layout)), acc)


# --------------------------------------------------------------------------------------------
# One row chunk.
# --------------------------------------------------------------------------------------------


def _block_logits(A, b, start, size, spec):
    """Columns ``[start, start + size)`` of the logits: ``r = A + b``, softcapped if asked."""
    r = slice_block(A, start, size, 1)
    if b is not None:
        r = r + slice_block(b, start, size, 0)[None, :]
    return r if spec.softcap is None else spec.softcap * jnp.tanh(r / spec.softcap)


def _row_stats(A, b, yl, offset, spec, kblock, vary):
    """Row-wise statistics of one chunk's logits over all K classes (across shards):
    ``lse`` (max-shifted, online over column blocks), the target logit ``a_{i,y_i}`` (an iota
    compare on the same logits the gradient uses; 0 where ``y_i`` is not a class of this shard),
    ``Σ_k (a_ik − m_i)`` (for smoothing) and the argmax (for ``aux``), each ``(C,)``; the
    log-sum-exp as the pair ``(m_i, log s_i)`` ``(C, 2)``."""
    c, kl = A.shape
    want_sum, want_arg = spec.label_smoothing != 0.0, spec.aux

    def body(start, size, carry):
        m, s, tgt, tot, best, idx = carry
        a = _block_logits(A, b, start, size, spec)
        bm = jnp.max(a, axis=1)
        m_new = jnp.maximum(m, bm)
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(a - m_new[:, None]), axis=1)
        cols = lax.broadcasted_iota(yl.dtype, (1, size), 1) + start
        tgt = tgt + jnp.sum(jnp.where(cols == yl[:, None], a, 0.0), axis=1)
        if want_sum:  # Σ_k (a_ik − m_i), rebased as the running max moves
            moved = jnp.where(jnp.isneginf(m), 0.0, m - m_new)  # no columns seen yet: 0
            tot = tot + start * moved + jnp.sum(a - m_new[:, None], axis=1)
        if want_arg:
            better = bm > best
            idx = jnp.where(better, jnp.argmax(a, axis=1).astype(jnp.int32) + start, idx)
            best = jnp.where(better, bm, best)
        return m_new, s, tgt, tot, best, idx

    z = jnp.zeros((c,), A.dtype)
    ninf = jnp.full((c,), -jnp.inf, A.dtype)
    init = vary((ninf, z, z, z, ninf, jnp.zeros((c,), jnp.int32)))
    m, s, tgt, tot, best, idx = fold_chunks(kl, kblock, body, init)
    if spec.class_axes is not None:  # M = max_p m_p, Σ_p s_p exp(m_p − M)
        big = lax.pmax(m, spec.class_axes)
        s = lax.psum(s * jnp.exp(m - big), spec.class_axes)
        if want_sum:
            tot = lax.psum(tot + kl * (m - big), spec.class_axes)
        m = big
    # lse = m + log s, kept as the pair (m, log s): with logits far above log K (tied
    # embeddings at 1e30), m + log K rounds to m and lse − a_y would cancel to 0.
    stats = jnp.stack([m, jnp.log(s)], axis=1)
    tgt = _allsum(tgt, spec)
    tot = tot if want_sum else None
    pred = None
    if want_arg:  # the first global argmax
        pred = idx + offset
        if spec.class_axes is not None:
            top = lax.pmax(best, spec.class_axes)
            pred = lax.pmin(jnp.where(best == top, pred, spec.num_classes), spec.class_axes)
    return stats, tgt, tot, pred


def _per_sample(stats, tgt, tot, spec):
    """``ℓ_i = lse_i − [(1 − ε) a_{i,y_i} + ε Σ_k a_ik / K] + λ lse_i²`` as
    ``(1 − ε)(m_i − a_{i,y_i}) − ε Σ_k (a_ik − m_i) / K + log s_i + λ lse_i²`` with
    ``lse_i = m_i + log s_i``: the differences to the row max first (≥ 0, no cancellation)."""
    m, log_s = stats[:, 0], stats[:, 1]
    eps = spec.label_smoothing
    per = m - tgt
    if eps != 0.0:
        per = (1.0 - eps) * per - eps * (tot / spec.num_classes)
    per = per + log_s
    if spec.z_loss == 0.0:
        return per
    lse = m + log_s
    return per + spec.z_loss * lse * lse


def _grad_blocks(A, b, stats, yl, cc, Zc, W, dW, db, spec, kblock, wants, vary):
    """One chunk's ``G`` block by block into the GEMMs: returns ``(G Wᵀ, dW + Z_cᵀ G,
    db + Σ_i G_i)`` (``dZ_c`` in ``acc``, unnormalised), with ``G = diag(cc) ∂ℓ/∂r``. The
    smoothed targets are never formed: ``cc ε / K`` is subtracted everywhere and ``cc (1 − ε)``
    at the label column (an iota compare); GEMM operands in ``W``'s dtype."""
    want_dZ, want_dW, want_db = wants
    (c, kl), acc, ls, cap = A.shape, A.dtype, spec.label_smoothing, spec.softcap
    ka = kaxis(spec.weight_layout)
    d = W.shape[1 - ka]
    m, log_s = stats[:, 0:1], stats[:, 1:2]
    lse = (m + log_s)[:, 0]
    coef = (cc if spec.z_loss == 0.0 else cc * (1.0 + 2.0 * spec.z_loss * lse))[:, None]
    hit = (cc * (1.0 - ls))[:, None]
    Zg = operand(Zc, W.dtype)

    def body(start, size, carry):
        dZc, dW, db = carry
        a = _block_logits(A, b, start, size, spec)
        G = jnp.exp((a - m) - log_s) * coef
        if ls != 0.0:
            G = G - (cc * (ls / spec.num_classes))[:, None]
        cols = lax.broadcasted_iota(yl.dtype, (1, size), 1) + start
        G = G - (cols == yl[:, None]).astype(G.dtype) * hit
        if cap is not None:
            G = G * (1.0 - jnp.square(a / cap))
        Gg = operand(G, W.dtype)
        if want_dZ:
            Wj = slice_block(W, start, size, ka)
            dZc = dZc + gemm(Gg, Wj, (1, ka), acc)
        if want_dW:
            blk = gemm(Zg, Gg, (0, 0), acc) if ka == 1 else gemm(Gg, Zg, (0, 0), acc)
            dW = put_block(dW, start, slice_block(dW, start, size, ka) + blk, ka)
        if want_db:
            db = put_block(db, start, slice_block(db, start, size, 0) + jnp.sum(G, axis=0), 0)
        return dZc, dW, db

    init = (vary(jnp.zeros((c if want_dZ else 0, d), acc)), dW, db)
    return fold_chunks(kl, kblock, body, init)


# --------------------------------------------------------------------------------------------
# The pass over the rows (one device, or one shard inside shard_map).
# --------------------------------------------------------------------------------------------


def _pass(Z, W, b, labels, s, g, lse_in, inv, offset, spec, *, want_per, wants, dz_dtype):
    """One pass over the row chunks. Returns ``(per, lse, pred, dZ, dW, db)``:

    - ``per`` ``(N,)``: ``ℓ_i``; 0 where ``s_i = 0`` and the label is not a class, NaN where
      ``s_i ≠ 0`` and it is not (a row of weight 0 never poisons the batch);
    - ``lse`` ``(N, 2)``, the pair ``(m_i, log s_i)`` with ``lse_i = m_i + log s_i``, and
      ``pred`` ``(N,)`` (argmax) when ``spec.aux`` (``lse`` always when ``lse_in`` is given: it
      is read, not recomputed);
    - the gradients of ``inv · Σ_i s_i g_i ℓ_i`` (``g`` a per-row cotangent or ``None``, ``inv``
      the mean's ``1 / Σ s`` or ``None``) for the ``wants = (dZ, dW, db)`` asked for, ``inv``
      folded into ``G`` for operands in the accumulation dtype, else applied to the GEMM results.
    """
    (n, d), kl = Z.shape, W.shape[kaxis(spec.weight_layout)]
    acc = acc_dtype(W.dtype)
    kblock = column_block(kl, bool(spec.class_axes), spec.kblock)
    want_dZ, want_dW, want_db = wants
    want_grads = any(wants)
    want_lse = spec.aux or lse_in is not None
    refs = (Z, W, b, labels, s, g, lse_in, inv)
    # The mean's 1/Σs: folded into G when the GEMM operands are in the accumulation dtype (no
    # (K, D) rescaling pass after the loop); applied to the float32 GEMM results for narrower
    # operands, whose range 1/Σs · G could leave (float16 underflows at 6e-5).
    fold = inv is not None and jnp.dtype(W.dtype) == jnp.dtype(acc)
    post = None if fold else inv
    # Inside a user's shard_map (check_vma) the carries vary over the axes the inputs do.
    vary = lambda t: jax.tree.map(lambda x: _shard.varying_like(x, *refs), t)  # noqa: E731

    def body(start, size, carry):
        per, lse_all, pred_all, dZ, dW, db = carry
        Zc, yc, sc = (
            slice_block(Z, start, size, 0),
            slice_block(labels, start, size, 0),
            slice_block(s, start, size, 0),
        )
        valid = (yc >= 0) & (yc < spec.num_classes)
        yl = yc - offset
        A = _logits_chunk(Zc, W, spec, acc)
        if lse_in is None or want_per or spec.aux:
            lse, tgt, tot, pred = _row_stats(A, b, yl, offset, spec, kblock, vary)
        if lse_in is not None:
            lse = slice_block(lse_in, start, size, 0)
        if want_per:
            ell = _per_sample(lse, tgt, tot, spec)
            ell = jnp.where(valid, ell, jnp.where(sc == 0, 0.0, jnp.nan))
            per = put_block(per, start, ell, 0)
        if want_lse:
            lse_all = put_block(lse_all, start, lse, 0)
        if spec.aux and lse_in is None:
            pred_all = put_block(pred_all, start, pred, 0)
        if want_grads:
            cc = sc if g is None else sc * slice_block(g, start, size, 0)
            cc = jnp.where(valid | (sc == 0), cc, jnp.nan)
            if fold:
                cc = cc * inv
            # W tied to this chunk (a barrier with the chunk's start): XLA would otherwise
            # hoist the column blocks' slices of the loop-invariant W out of the row loop, into
            # a stacked copy of W.
            Wc, _ = lax.optimization_barrier((W, start))
            dZc, dW, db = _grad_blocks(A, b, lse, yl, cc, Zc, Wc, dW, db, spec, kblock, wants, vary)
            if want_dZ:
                dZ = put_block(dZ, start, dZc if post is None else dZc * post, 0)
        return per, lse_all, pred_all, dZ, dW, db

    w_shape = list(W.shape)
    w_shape[kaxis(spec.weight_layout)] = kl if want_dW else 0
    init = vary(
        (
            jnp.zeros((n if want_per else 0,), acc),
            jnp.zeros((n if want_lse else 0, 2), acc),
            jnp.zeros((n if spec.aux else 0,), jnp.int32),
            jnp.zeros((n if want_dZ else 0, d), dz_dtype),
            jnp.zeros(w_shape, acc),
            jnp.zeros((kl if want_db else 0,), acc),
        )
    )
    per, lse, pred, dZ, dW, db = fold_chunks(n, spec.chunk, body, init)
    if post is not None:
        dW, db = dW * post, db * post
    return per, lse, pred, dZ, dW, db


def fused_pass(Z, W, b, labels, s, spec, *, g=None, lse=None, inv=None, want_per=True,
         wants=(False, False, False)):  # fmt: skip
    """:func:`_pass` where ``spec.placement`` says: on one device, or on each device of its mesh
    (its rows, its class shard at ``offset``; ``dZ`` summed over the class axes, ``dW`` and
    ``db`` over the row axes). ``Z (..., D)`` and the per-row arrays keep their leading dims
    (each device flattens its own). Returns ``(per, lse, pred, dZ, dW, db)``, the per-row ones
    shaped like ``labels``, every gradient sharded like its input."""
    acc = acc_dtype(W.dtype)

    def per_device(local, Z, W, b, labels, s, g, lse, inv):
        lead = labels.shape
        flat = lambda x: _shard.flat_rows(x, lead)  # noqa: E731
        axis = local.classes or None
        sp = spec._replace(class_axes=axis)
        offset = local.class_offset(W.shape[kaxis(spec.weight_layout)])
        per, lse_, pred, dZ, dW, db = _pass(
            flat(Z),
            W,
            b,
            flat(labels),
            flat(s),
            flat(g),
            flat(lse),
            inv,
            offset,
            sp,
            want_per=want_per,
            wants=wants,
            dz_dtype=acc if axis else Z.dtype,
        )
        dZ, dW, db = _shard.reduce_gradients(local, lead, dZ, dW, db, wants, Z.dtype)
        per, lse_, pred = (_shard.lead_rows(x, lead) for x in (per, lse_, pred))
        return per, lse_, pred, dZ, dW, db

    return _shard.run(
        per_device, spec.placement, (Z, W, b, labels, s, g, lse, inv),
        ("features", "weight", "classes", "rows", "rows", "rows", "rows", "replicated"),
        (("rows", None), ("rows", None), ("rows", None), ("features", 0), ("weight", 1),
         ("classes", 2)),
    )  # fmt: skip
