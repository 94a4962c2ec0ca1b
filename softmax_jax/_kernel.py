"""The fused linear + softmax cross-entropy kernel shared by both heads.

One implementation of the per-chunk math of :func:`softmax_jax.linear_cross_entropy` and
:func:`softmax_jax.sharded_linear_cross_entropy`: the logits of a row chunk, the online
log-sum-exp, the target logit and the smoothing mean (read from the same logits, by an iota
compare), the residual ``G`` block by block into the two gradient GEMMs, and the ``custom_vjp``
bookkeeping. Its interface for a class shard is two numbers: the shard's first global class
(``offset``) and the global number of classes (``Spec.k``); the row-wise reductions over classes
then go through :func:`_allmax` / :func:`_allsum` over ``Spec.axis`` (identities on one device).

Per sample, with ``r_i = z_i W + b`` and logits ``a_i = r_i`` or ``c · tanh(r_i / c)`` (softcap):

``ℓ_i = lse_i − [(1 − ε) a_{i,y_i} + ε mean_k a_ik] + λ lse_i²``,
``G_i = ∂ℓ_i/∂r_i = [(1 + 2 λ lse_i) softmax(a_i) − t_i] ⊙ (1 − (a_i / c)²)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._chunks import fold_chunks
from ._precision import acc_dtype, gemm, mean_normaliser, operand

# Columns of a logits chunk handled per step of the inner (class) loops: besides the (chunk, K)
# logits, the temporaries are a few (chunk, K_BLOCK) and (D, K_BLOCK) blocks; 2048 keeps those
# GEMMs large enough to run at full speed.
K_BLOCK = 2048
# A class shard is read in this many column blocks, ``(chunk, K/P/4)`` each: its residual blocks
# shrink with the shard, so the per-device temporaries scale as 1/P whatever P.
_SHARD_BLOCKS = 4


class Spec(NamedTuple):
    """Static description of one call of the kernel (hashable: a jit/custom_vjp static arg)."""

    reduction: str
    chunk: int  # rows per chunk (per device)
    kblock: int  # columns per block of the inner loops (upper bound)
    ls: float  # label smoothing ε
    zl: float  # z-loss weight λ
    softcap: float | None
    layout: str  # "dk": W is (D, K); "kd": W is (K, D)
    k: int  # the global number of classes
    aux: bool  # also return (lse, predictions)
    mesh: Mesh | None = None  # class-sharded: the mesh, its class axis and its row axes
    axis: str | None = None
    batch: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Loops, slices, collectives, layouts.
# --------------------------------------------------------------------------------------------


def _slice(x, start, size, axis):
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _put(x, start, block, axis):
    return lax.dynamic_update_slice_in_dim(x, block.astype(x.dtype), start, axis=axis)


def _allmax(x, spec: Spec):
    return x if spec.axis is None else lax.pmax(x, spec.axis)


def _allsum(x, spec: Spec):
    return x if spec.axis is None else lax.psum(x, spec.axis)


def _kaxis(spec: Spec) -> int:
    """The class axis of ``W`` (and of ``dW``)."""
    return 1 if spec.layout == "dk" else 0


def _logits_chunk(Zc, W, spec, acc):
    """``Z_c W`` (or ``Z_c Wᵀ`` for ``"kd"``), ``(C, K_local)``, accumulated in ``acc``."""
    return gemm(operand(Zc, W.dtype), W, (1, 1 - _kaxis(spec)), acc)


# --------------------------------------------------------------------------------------------
# One row chunk.
# --------------------------------------------------------------------------------------------


def _block_logits(A, b, start, size, spec):
    """Columns ``[start, start + size)`` of the logits: ``r = A + b``, softcapped if asked."""
    r = _slice(A, start, size, 1)
    if b is not None:
        r = r + _slice(b, start, size, 0)[None, :]
    return r if spec.softcap is None else spec.softcap * jnp.tanh(r / spec.softcap)


def _row_stats(A, b, yl, offset, spec, kblock):
    """Row-wise statistics of one chunk's logits over all K classes (across shards):
    ``lse`` (max-shifted, online over column blocks), the target logit ``a_{i,y_i}`` (an iota
    compare on the same logits the gradient uses; 0 where ``y_i`` is not a class of this shard),
    ``Σ_k a_ik`` (for smoothing) and the argmax (for ``aux``), each ``(C,)``."""
    c, kl = A.shape
    want_sum, want_arg = spec.ls != 0.0, spec.aux

    def body(start, size, carry):
        m, s, tgt, tot, best, idx = carry
        a = _block_logits(A, b, start, size, spec)
        bm = jnp.max(a, axis=1)
        m_new = jnp.maximum(m, bm)
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(a - m_new[:, None]), axis=1)
        cols = lax.broadcasted_iota(yl.dtype, (1, size), 1) + start
        tgt = tgt + jnp.sum(jnp.where(cols == yl[:, None], a, 0.0), axis=1)
        if want_sum:
            tot = tot + jnp.sum(a, axis=1)
        if want_arg:
            better = bm > best
            idx = jnp.where(better, jnp.argmax(a, axis=1).astype(jnp.int32) + start, idx)
            best = jnp.where(better, bm, best)
        return m_new, s, tgt, tot, best, idx

    z = jnp.zeros((c,), A.dtype)
    ninf = jnp.full((c,), -jnp.inf, A.dtype)
    init = (ninf, z, z, z, ninf, jnp.zeros((c,), jnp.int32))
    m, s, tgt, tot, best, idx = fold_chunks(kl, kblock, body, init)
    lse_p = m + jnp.log(s)
    if spec.axis is None:
        lse = lse_p
    else:  # lse = M + log Σ_p exp(lse_p − M) ≥ M ≥ every logit
        big = lax.pmax(lse_p, spec.axis)
        lse = big + jnp.log(lax.psum(jnp.exp(lse_p - big), spec.axis))
    tgt = _allsum(tgt, spec)
    tot = _allsum(tot, spec) if want_sum else None
    pred = None
    if want_arg:  # the first global argmax
        pred = idx + offset
        if spec.axis is not None:
            top = lax.pmax(best, spec.axis)
            pred = lax.pmin(jnp.where(best == top, pred, spec.k), spec.axis)
    return lse, tgt, tot, pred


def _per_sample(lse, tgt, tot, spec):
    """``ℓ_i = lse_i − [(1 − ε) a_{i,y_i} + ε Σ_k a_ik / K] + λ lse_i²`` (≥ 0: lse ≥ every
    logit, from the same logits)."""
    t = tgt if spec.ls == 0.0 else (1.0 - spec.ls) * tgt + (spec.ls / spec.k) * tot
    per = lse - t
    return per if spec.zl == 0.0 else per + spec.zl * lse * lse


def _grad_blocks(A, b, lse, yl, cc, Zc, W, dW, db, spec, kblock, wants):
    """One chunk's ``G`` block by block into the GEMMs: returns ``(G Wᵀ, dW + Z_cᵀ G,
    db + Σ_i G_i)`` (``dZ_c`` in ``acc``, unnormalised), with ``G = diag(cc) ∂ℓ/∂r``. The
    smoothed targets are never formed: ``cc ε / K`` is subtracted everywhere and ``cc (1 − ε)``
    at the label column (an iota compare); GEMM operands in ``W``'s dtype."""
    want_dZ, want_dW, want_db = wants
    (c, kl), acc, ls, cap = A.shape, A.dtype, spec.ls, spec.softcap
    ka = _kaxis(spec)
    d = W.shape[1 - ka]
    coef = (cc if spec.zl == 0.0 else cc * (1.0 + 2.0 * spec.zl * lse))[:, None]
    hit = (cc * (1.0 - ls))[:, None]
    Zg = operand(Zc, W.dtype)

    def body(start, size, carry):
        dZc, dW, db = carry
        a = _block_logits(A, b, start, size, spec)
        G = jnp.exp(a - lse[:, None]) * coef
        if ls != 0.0:
            G = G - (cc * (ls / spec.k))[:, None]
        cols = lax.broadcasted_iota(yl.dtype, (1, size), 1) + start
        G = G - jnp.where(cols == yl[:, None], hit, 0.0)
        if cap is not None:
            G = G * (1.0 - jnp.square(a / cap))
        Gg = operand(G, W.dtype)
        if want_dZ:
            Wj = _slice(W, start, size, ka)
            dZc = dZc + gemm(Gg, Wj, (1, ka), acc)
        if want_dW:
            blk = gemm(Zg, Gg, (0, 0), acc) if ka == 1 else gemm(Gg, Zg, (0, 0), acc)
            dW = _put(dW, start, _slice(dW, start, size, ka) + blk, ka)
        if want_db:
            db = _put(db, start, _slice(db, start, size, 0) + jnp.sum(G, axis=0), 0)
        return dZc, dW, db

    init = (jnp.zeros((c if want_dZ else 0, d), acc), dW, db)
    return fold_chunks(kl, kblock, body, init)


# --------------------------------------------------------------------------------------------
# The pass over the rows (one device, or one shard inside shard_map).
# --------------------------------------------------------------------------------------------


def _pass(Z, W, b, labels, s, g, lse_in, inv, offset, spec, *, want_per, wants, dz_dtype):
    """One pass over the row chunks. Returns ``(per, lse, pred, dZ, dW, db)``:

    - ``per`` ``(N,)``: ``ℓ_i``; 0 where ``s_i = 0`` and the label is not a class, NaN where
      ``s_i ≠ 0`` and it is not (a row of weight 0 never poisons the batch);
    - ``lse`` ``(N,)`` and ``pred`` ``(N,)`` (argmax) when ``spec.aux`` (``lse`` always when
      ``lse_in`` is given: it is read, not recomputed);
    - the gradients of ``inv · Σ_i s_i g_i ℓ_i`` (``g`` a per-row cotangent or ``None``, ``inv``
      the mean's ``1 / Σ s`` or ``None``) for the ``wants = (dZ, dW, db)`` asked for, ``inv``
      applied to the float32 GEMM results.
    """
    (n, d), kl = Z.shape, W.shape[_kaxis(spec)]
    acc = acc_dtype(W.dtype)
    kblock = -(-kl // _SHARD_BLOCKS) if spec.axis else spec.kblock
    kblock = max(1, min(kblock, kl))
    want_dZ, want_dW, want_db = wants
    want_grads = any(wants)
    want_lse = spec.aux or lse_in is not None

    def body(start, size, carry):
        per, lse_all, pred_all, dZ, dW, db = carry
        Zc, yc, sc = (
            _slice(Z, start, size, 0),
            _slice(labels, start, size, 0),
            _slice(s, start, size, 0),
        )
        valid = (yc >= 0) & (yc < spec.k)
        yl = yc - offset
        A = _logits_chunk(Zc, W, spec, acc)
        if lse_in is None or want_per or spec.aux:
            lse, tgt, tot, pred = _row_stats(A, b, yl, offset, spec, kblock)
        if lse_in is not None:
            lse = _slice(lse_in, start, size, 0)
        if want_per:
            ell = _per_sample(lse, tgt, tot, spec)
            ell = jnp.where(valid, ell, jnp.where(sc == 0, 0.0, jnp.nan))
            per = _put(per, start, ell, 0)
        if want_lse:
            lse_all = _put(lse_all, start, lse, 0)
        if spec.aux and lse_in is None:
            pred_all = _put(pred_all, start, pred, 0)
        if want_grads:
            cc = sc if g is None else sc * _slice(g, start, size, 0)
            cc = jnp.where(valid | (sc == 0), cc, jnp.nan)
            dZc, dW, db = _grad_blocks(A, b, lse, yl, cc, Zc, W, dW, db, spec, kblock, wants)
            if want_dZ:
                dZ = _put(dZ, start, dZc if inv is None else dZc * inv, 0)
        return per, lse_all, pred_all, dZ, dW, db

    w_shape = list(W.shape)
    w_shape[_kaxis(spec)] = kl if want_dW else 0
    init = (
        jnp.zeros((n if want_per else 0,), acc),
        jnp.zeros((n if want_lse else 0,), acc),
        jnp.zeros((n if spec.aux else 0,), jnp.int32),
        jnp.zeros((n if want_dZ else 0, d), dz_dtype),
        jnp.zeros(w_shape, acc),
        jnp.zeros((kl if want_db else 0,), acc),
    )
    per, lse, pred, dZ, dW, db = fold_chunks(n, spec.chunk, body, init)
    if inv is not None:
        dW, db = dW * inv, db * inv
    return per, lse, pred, dZ, dW, db


def _reshard(x, mesh, pspec):
    have = getattr(jax.typeof(x), "sharding", None)
    if isinstance(have, NamedSharding) and have.spec == pspec:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, pspec))


def _run(Z, W, b, labels, s, spec, *, g=None, lse=None, inv=None, want_per=True,
         wants=(False, False, False)):  # fmt: skip
    """:func:`_pass` on one device, or under ``jax.shard_map`` over ``spec.mesh`` (each device
    its class shard, ``offset = axis_index · K/P``; ``dZ`` summed over the class axis, ``dW``
    and ``db`` over the row axes). Returns global arrays."""
    acc = acc_dtype(W.dtype)
    if spec.mesh is None:
        return _pass(Z, W, b, labels, s, g, lse, inv, 0, spec, want_per=want_per, wants=wants,
                     dz_dtype=Z.dtype)  # fmt: skip
    rows, model = (spec.batch or None), spec.axis
    wspec = P(None, model) if spec.layout == "dk" else P(model, None)
    opt = {"b": (b, P(model)), "g": (g, P(rows)), "lse": (lse, P(rows)), "inv": (inv, P())}
    names = [k for k, (x, _) in opt.items() if x is not None]
    args = [Z, W, labels, s] + [opt[k][0] for k in names]
    in_specs = [P(rows, None), wspec, P(rows), P(rows)] + [opt[k][1] for k in names]

    def f(Z, W, labels, s, *rest):
        o = dict(zip(names, rest))
        offset = lax.axis_index(model) * W.shape[_kaxis(spec)]
        out = _pass(Z, W, o.get("b"), labels, s, o.get("g"), o.get("lse"), o.get("inv"), offset,
                    spec, want_per=want_per, wants=wants, dz_dtype=acc)  # fmt: skip
        per, lse_, pred, dZ, dW, db = out
        if wants[0]:
            dZ = lax.psum(dZ, model)
        if spec.batch:
            dW = lax.psum(dW, spec.batch) if wants[1] else dW
            db = lax.psum(db, spec.batch) if wants[2] else db
        return per, lse_, pred, dZ, dW, db

    out_specs = (P(rows), P(rows), P(rows), P(rows, None), wspec, P(model))
    # check_vma=False: the loops' carries carry no varying-axis types; every output declared
    # replicated over an axis is a psum/pmax over it, or computed from replicated inputs only.
    if jax.sharding.AxisType.Explicit in tuple(spec.mesh.axis_types):
        # Explicit axes: the inputs' types must carry the layouts shard_map is given.
        args = [_reshard(x, spec.mesh, p) for x, p in zip(args, in_specs)]
    smap = jax.shard_map(f, mesh=spec.mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                         check_vma=False)  # fmt: skip
    per, lse_, pred, dZ, dW, db = smap(*args)
    return per, lse_, pred, dZ.astype(Z.dtype), dW, db


# --------------------------------------------------------------------------------------------
# custom_vjp: private function, _fwd, _bwd, defvjp.
# --------------------------------------------------------------------------------------------


def _out(spec, value, lse, pred):
    return (value, lse, pred) if spec.aux else value


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def fused(Z, W, b, labels, s, spec: Spec):
    """The head's loss of ``(Z (N, D), W, b (K,) | None, labels (N,) int32, s (N,))``:
    ``Σ s ℓ`` (sum), ``Σ s ℓ / Σ s`` (mean) or ``s ℓ`` (none); with ``spec.aux`` the tuple
    ``(loss, lse, predictions)`` (no gradient flows through the last two)."""
    per, lse, pred, *_ = _run(Z, W, b, labels, s, spec)
    return _out(spec, _reduce(per, s, spec), lse, pred)


def _reduce(per, s, spec):
    sp = jnp.where(s == 0, 0.0, s * per)  # a weight-0 row's NaN never reaches the sum
    if spec.reduction == "none":
        return sp
    value = jnp.sum(sp)
    inv = mean_normaliser(s, per.shape[0], spec.reduction, per.dtype)
    return value if inv is None else value * inv


def _fused_fwd(Z, W, b, labels, s, spec: Spec):
    # symbolic_zeros=True: each differentiable leaf arrives as CustomVJPPrimal(value, perturbed),
    # so gradients nobody asked for (dZ when only the head is trained, dW when it is frozen, ds)
    # are never computed.
    want_dZ, want_dW, want_ds = Z.perturbed, W.perturbed, s.perturbed
    want_db = b is not None and b.perturbed
    Z, W, labels, s = Z.value, W.value, labels.value, s.value
    b = None if b is None else b.value
    # Zero-size arrays carry the cotangents' dtypes through the residuals.
    protos = (jnp.zeros((0,), W.dtype), None if b is None else jnp.zeros((0,), b.dtype))
    acc = acc_dtype(W.dtype)
    bc = None if b is None else b.astype(acc)
    wants = (want_dZ, want_dW, want_db)
    if spec.reduction == "none":
        per, lse, pred, *_ = _run(Z, W, bc, labels, s, spec._replace(aux=True))
        value = _reduce(per, s, spec)
        res = (Z, W, bc, labels, s, per if want_ds else None, lse, wants, protos)
        return _out(spec, value, lse, pred), res
    inv = mean_normaliser(s, s.shape[0], spec.reduction, acc)
    per, lse, pred, dZ, dW, db = _run(Z, W, bc, labels, s, spec, inv=inv, wants=wants)
    value = _reduce(per, s, spec)
    ds = None
    if want_ds:  # ∂L/∂s_i: ℓ_i (sum), (ℓ_i − L) / Σ s (mean, 0-guarded)
        ds = per if inv is None else (per - value) * inv
    res = (dZ if want_dZ else None, dW if want_dW else None, db if want_db else None, ds, protos)
    return _out(spec, value, lse, pred), res


def _fused_bwd(spec: Spec, res, g):
    g = g[0] if spec.aux else g  # aux carries no gradient
    if spec.reduction == "none":
        Z, W, b, labels, s, per, lse, wants, (w_proto, b_proto) = res
        g = jnp.zeros(s.shape, s.dtype) if isinstance(g, SymbolicZero) else g.astype(s.dtype)
        _, _, _, dZ, dW, db = _run(Z, W, b, labels, s, spec._replace(aux=False), g=g, lse=lse,
                                   want_per=False, wants=wants)  # fmt: skip
        dZ, dW, db = (x if w else None for x, w in zip((dZ, dW, db), wants))
        ds = None if per is None else per * g
    else:
        dZ, dW, db, ds, (w_proto, b_proto) = res
        g = jnp.zeros((), w_proto.dtype) if isinstance(g, SymbolicZero) else g
        scale = lambda x: None if x is None else g.astype(x.dtype) * x  # noqa: E731
        dZ, dW, db, ds = scale(dZ), scale(dW), scale(db), scale(ds)
    dW = None if dW is None else dW.astype(w_proto.dtype)
    db = None if b_proto is None or db is None else db.astype(b_proto.dtype)
    return dZ, dW, db, None, ds


fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
