"""Scale-out on JAX's own engine: the class-sharded (vocabulary-parallel) head.

``sharded_linear_cross_entropy`` is :func:`softmax_jax.linear_cross_entropy` with ``W`` and ``b``
split over their K (class) axis across the devices of a mesh axis, Megatron-style. Each device
holds ``K / P`` columns and computes its slice of the logits; the row-wise quantities that need
every class (the log-sum-exp, the target logit, the mean logit for label smoothing) are combined
with one collective each over the class axis, and the gradients are written out by hand, so
``W`` is never gathered and the per-device temporaries shrink as ``1 / P``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from ._head import (
    _cdt,
    _check_head,
    _cols,
    _gemm_in,
    _logits,
    _loop,
    _lse,
    _mean_scale,
    _put_cols,
    _put_rows,
    _rows,
)

# A logits chunk is read (log-sum-exp) and turned into the residual G this many column blocks at
# a time, ``(C, K/P/4)`` each: besides the ``(C, K/P)`` logits only a quarter of that is live, so
# the temporaries scale as 1/P whatever P.
_KSPLIT = 4

# --------------------------------------------------------------------------------------------
# Static configuration.
# --------------------------------------------------------------------------------------------


class _Cfg(NamedTuple):
    """Everything static about one sharded call (hashable: a jit / custom_vjp static argument)."""

    mesh: Mesh
    model: str  # the mesh axis that splits the classes
    batch: tuple[str, ...]  # the other mesh axes: they split the rows
    reduction: str
    chunk: int  # rows per chunk, per device
    ls: float
    zl: float
    k: int  # the global number of classes


def _rowspec(cfg: _Cfg):
    return cfg.batch if cfg.batch else None


# --------------------------------------------------------------------------------------------
# The per-device pass: runs inside shard_map on one (rows / B, D) x (D, K / P) block.
# --------------------------------------------------------------------------------------------


def _shard_pass(Z, W, b, labels, c, *, cfg: _Cfg, want_per: bool, want_grads: bool,
                want_dZ: bool):  # fmt: skip
    """Per-sample losses and/or the gradients of ``Σ_i c_i ℓ_i`` for this device's block.

    ``Z, labels, c`` are this device's rows (all rows without a batch axis); ``W, b``
    its ``K / P`` class columns, starting at global class ``offset``. Per row chunk:

    - ``A = Z_c W_p + b_p`` (the local logits block, ``(C, K / P)``);
    - ``lse = m + log psum(exp(lse_p − m))`` with ``lse_p`` the local log-sum-exp and
      ``m = pmax(lse_p)``: one ``pmax`` and one ``psum`` of ``(C,)`` vectors;
    - the target logit ``a_{i,y_i}``: ``psum`` of the local pick, zero where ``y_i`` is not local;
    - ``mean_k a_ik = z_i · w̄ + b̄`` with ``w̄ = psum(Σ_k w_k) / K`` computed once per call;
    - ``G_p = diag(c)[diag(1 + 2 z lse) Ŷ_p − T_p]``, ``dW_p += Z_cᵀ G_p``, ``db_p += Σ_i G_p``
      and ``dZ_c = G_p W_pᵀ`` (a partial sum: ``psum`` over the class axis once, at the end).

    Returns ``(per, dZ, dW, db)`` (empty placeholders for what was not asked for); ``dW, db`` are
    summed over the batch axes.
    """
    (n, d), kl, cdt = Z.shape, W.shape[1], _cdt(W)
    k, ls, zl = cfg.k, cfg.ls, cfg.zl
    offset = lax.axis_index(cfg.model) * kl
    kb = -(-kl // _KSPLIT)
    bc = None if b is None else b.astype(cdt)
    means = None
    if ls != 0.0 and want_per:
        w_bar = lax.psum(jnp.sum(W, axis=1, dtype=cdt), cfg.model) / k
        b_bar = 0.0 if bc is None else lax.psum(jnp.sum(bc), cfg.model) / k
        means = (w_bar, b_bar)

    def body(start, size, carry):
        per, dZ, dW, db = carry
        Zc, yc = _rows(Z, start, size), _rows(labels, start, size)
        valid = (yc >= 0) & (yc < k)
        A = _logits(Zc, W, cdt)  # the bias is added where A is read: no biased copy of A
        lse_p = _lse(A, bc, kb)
        m = lax.pmax(lse_p, cfg.model)
        lse = m + jnp.log(lax.psum(jnp.exp(lse_p - m), cfg.model))
        yl = yc - offset
        here = (yl >= 0) & (yl < kl)
        if want_per:
            yi = jnp.clip(yl, 0, kl - 1)
            pick = jnp.take_along_axis(A, yi[:, None], axis=1)[:, 0]
            pick = pick if bc is None else pick + bc[yi]
            tgt = lax.psum(jnp.where(here, pick, 0.0), cfg.model)
            if ls != 0.0:
                tgt = (1.0 - ls) * tgt + ls * (jnp.dot(Zc.astype(cdt), means[0]) + means[1])
            ell = lse - tgt if zl == 0.0 else lse - tgt + zl * lse * lse
            per = _put_rows(per, start, jnp.where(valid, ell, jnp.nan))
        if want_grads:
            cc = jnp.where(valid, _rows(c, start, size).astype(cdt), jnp.nan)
            coef = (cc if zl == 0.0 else cc * (1.0 + 2.0 * zl * lse))[:, None]
            hit = (cc * (1.0 - ls))[:, None]
            Zg = _gemm_in(Zc.astype(cdt), W)

            def block(j, kb, acc):  # G for columns [j, j + kb) only, straight into the GEMMs
                dZc, dW, db = acc
                Aj = _cols(A, j, kb)
                Aj = Aj if bc is None else Aj + _cols(bc, j, kb)[None, :]
                Gj = jnp.exp(Aj - lse[:, None]) * coef
                if ls != 0.0:
                    Gj = Gj - (cc * (ls / k))[:, None]
                cols = lax.broadcasted_iota(yl.dtype, (1, kb), 1) + j
                Gj = Gj - jnp.where(cols == yl[:, None], hit, 0.0)
                Gg = _gemm_in(Gj, W)
                dWj = lax.dot_general(Zg, Gg, (((0,), (0,)), ((), ())), preferred_element_type=cdt)
                dW = _put_cols(dW, j, _cols(dW, j, kb) + dWj)
                db = _put_cols(db, j, _cols(db, j, kb) + jnp.sum(Gj, axis=0))
                if want_dZ:
                    Wj = _cols(W, j, kb)
                    dZc = dZc + lax.dot_general(
                        Gg, Wj, (((1,), (1,)), ((), ())), preferred_element_type=cdt
                    )
                return dZc, dW, db

            dZc = jnp.zeros((size if want_dZ else 0, d), cdt)
            dZc, dW, db = _loop(kl, kb, block, (dZc, dW, db))
            if want_dZ:
                dZ = _put_rows(dZ, start, dZc)
        return per, dZ, dW, db

    init = (
        jnp.zeros((n if want_per else 0,), cdt),
        jnp.zeros((n if want_dZ else 0, d), cdt),
        jnp.zeros((d, kl if want_grads else 0), cdt),
        jnp.zeros((kl if want_grads else 0,), cdt),
    )
    per, dZ, dW, db = _loop(n, cfg.chunk, body, init)
    if want_dZ:
        dZ = lax.psum(dZ, cfg.model).astype(Z.dtype)
    if want_grads and cfg.batch:
        dW, db = lax.psum(dW, cfg.batch), lax.psum(db, cfg.batch)
    return per, dZ, dW, db


def _run(Z, W, b, labels, c, cfg: _Cfg, *, want_per=True, want_grads=False, want_dZ=False):
    """``_shard_pass`` under ``jax.shard_map`` over ``cfg.mesh``; returns global arrays."""
    rows, model = _rowspec(cfg), cfg.model
    args = [Z, W, labels]
    specs = [P(rows, None), P(None, model), P(rows)]
    for x, spec in ((b, P(model)), (c, P(rows))):
        if x is not None:
            args.append(x)
            specs.append(spec)
    has_b, has_c = b is not None, c is not None

    def f(Z, W, labels, *rest):
        rest = list(rest)
        b_ = rest.pop(0) if has_b else None
        c_ = rest.pop(0) if has_c else None
        return _shard_pass(Z, W, b_, labels, c_, cfg=cfg, want_per=want_per,
                           want_grads=want_grads, want_dZ=want_dZ)  # fmt: skip

    out_specs = (P(rows), P(rows, None), P(None, model), P(model))
    # check_vma=False: the per-device code reuses the head's loops (``_loop``, ``_lse``), whose
    # carries carry no varying-axis types; every output declared replicated over an axis is, by
    # construction, the result of a psum/pmax over it (or computed from replicated inputs only).
    smap = jax.shard_map(
        f, mesh=cfg.mesh, in_specs=tuple(specs), out_specs=out_specs, check_vma=False
    )
    return smap(*args)


# --------------------------------------------------------------------------------------------
# custom_vjp: private function, _fwd, _bwd, defvjp.
# --------------------------------------------------------------------------------------------


def _reduce(per, s, reduction):
    if reduction == "none":
        return s * per
    return jnp.sum(_mean_scale(s, reduction) * per)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _slce(Z, W, b, labels, s, cfg: _Cfg):
    per, _, _, _ = _run(Z, W, b, labels, None, cfg)
    return _reduce(per, s.astype(per.dtype), cfg.reduction)


def _slce_fwd(Z, W, b, labels, s, cfg: _Cfg):
    # symbolic_zeros=True, as in _head: gradients nobody asked for (dZ, ds) are never computed.
    want_dZ, want_ds = Z.perturbed, s.perturbed
    Z, W, labels, s = Z.value, W.value, labels.value, s.value
    b = None if b is None else b.value
    protos = (jnp.zeros((0,), Z.dtype), jnp.zeros((0,), W.dtype),
              None if b is None else jnp.zeros((0,), b.dtype))  # fmt: skip
    cdt = _cdt(W)
    if cfg.reduction == "none":
        per, _, _, _ = _run(Z, W, b, labels, None, cfg)
        res = (Z, W, b, labels, s, per if want_ds else None, want_dZ, protos)
        return s.astype(cdt) * per, res
    c = _mean_scale(s.astype(cdt), cfg.reduction)
    per, dZ, dW, db = _run(Z, W, b, labels, c, cfg, want_grads=True, want_dZ=want_dZ)
    value = jnp.sum(c * per)
    ds = None
    if want_ds:  # ∂L/∂s_i: ℓ_i for sum; (ℓ_i − L) / Σ s for mean, 0-guarded.
        if cfg.reduction == "sum":
            ds = per
        else:
            total = jnp.sum(s.astype(cdt))
            ok = total > 0
            ds = (per - jnp.where(ok, value, 0)) / jnp.where(ok, total, 1)
        ds = ds.astype(s.dtype)
    return value, (dZ if want_dZ else None, dW, db, ds, protos)


def _slce_bwd(cfg: _Cfg, res, g):
    if cfg.reduction == "none":
        Z, W, b, labels, s, per, want_dZ, protos = res
        cdt = _cdt(W)
        g = jnp.zeros(s.shape, cdt) if isinstance(g, SymbolicZero) else g.astype(cdt)
        _, dZ, dW, db = _run(Z, W, b, labels, g * s.astype(cdt), cfg, want_per=False,
                             want_grads=True, want_dZ=want_dZ)  # fmt: skip
        dZ = dZ if want_dZ else None
        ds = None if per is None else (g * per).astype(s.dtype)
    else:
        dZ, dW, db, ds, protos = res
        g = jnp.zeros((), dW.dtype) if isinstance(g, SymbolicZero) else g.astype(dW.dtype)
        dZ = None if dZ is None else g.astype(dZ.dtype) * dZ
        dW, db = g * dW, g * db
        ds = None if ds is None else g.astype(ds.dtype) * ds
    z_proto, w_proto, b_proto = protos
    dZ = None if dZ is None else dZ.astype(z_proto.dtype)
    db = None if b_proto is None else db.astype(b_proto.dtype)
    return dZ, dW.astype(w_proto.dtype), db, None, ds


_slce.defvjp(_slce_fwd, _slce_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------
# Validation and the public wrapper.
# --------------------------------------------------------------------------------------------


def _check_mesh(mesh, axis_name: str, n: int, k: int) -> tuple[str, ...]:
    """Checks the mesh against the problem; returns the batch (row) axes."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if axis_name not in names:
        raise ValueError(f"`axis_name` must be an axis of `mesh` {names}, got {axis_name!r}")
    p = mesh.shape[axis_name]
    if k % p:
        raise ValueError(
            f"`W` must have a number of classes K divisible by the {p} devices of mesh axis "
            f"{axis_name!r} (each device holds K / {p} columns), got K = {k}; use a mesh axis "
            f"whose size divides K"
        )
    batch = tuple(a for a in names if a != axis_name)
    nb = 1
    for a in batch:
        nb *= mesh.shape[a]
    if n % nb:
        raise ValueError(
            f"`Z` must have a number of rows N divisible by the {nb} devices of mesh axes "
            f"{batch} (the rows are split over them), got N = {n}"
        )
    return batch


@functools.partial(jax.jit, static_argnames=("cfg",))
def _impl(Z, W, labels, bias, weights, *, cfg: _Cfg):
    cdt = _cdt(W)
    if weights is None:
        s = jnp.ones(labels.shape, cdt)
    elif jnp.issubdtype(weights.dtype, jnp.floating):
        s = weights
    else:  # an integer/boolean mask: a constant, cast outside the custom_vjp
        s = weights.astype(cdt)
    return _slce(Z, W, bias, labels.astype(jnp.int32), s, cfg)


def sharded_linear_cross_entropy(
    Z: ArrayLike,
    W: ArrayLike,
    labels: ArrayLike,
    *,
    mesh: Mesh,
    axis_name: str = "model",
    bias: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> jax.Array:
    r"""Class-sharded (vocabulary-parallel) :func:`softmax_jax.linear_cross_entropy`.

    The same loss and the same hand-written gradient, with ``W`` ``(D, K)`` and ``b`` ``(K,)``
    split over their class axis across the ``P`` devices of ``mesh.shape[axis_name]``
    (``NamedSharding(mesh, P(None, axis_name))``): device ``p`` holds the columns
    ``[p K/P, (p + 1) K/P)`` and only ever computes its ``(chunk, K / P)`` slice of the logits.
    The row-wise quantities that need all ``K`` classes are combined across devices:

    .. math::

        m_i = \max_p \operatorname{lse}_p(a_i), \qquad
        \operatorname{lse}(a_i) = m_i + \log \sum_p e^{\operatorname{lse}_p(a_i) - m_i},
        \qquad a_{i, y_i} = \sum_p [y_i \in p]\, a_{i, y_i}

    (a ``pmax`` and two ``psum`` of ``(N,)`` vectors per row chunk; the label-smoothing mean
    ``mean_k a_ik = z_i · psum_p(Σ_{k∈p} w_k) / K + mean(b)`` costs one ``psum`` of a ``(D,)``
    vector per call). The gradients are those of :func:`~softmax_jax.linear_cross_entropy`,
    computed per shard: ``∂L/∂W_p = Zᵀ G_p`` and ``∂L/∂b_p = Σ_i G_{p,i}`` stay on their
    device (sharded like ``W`` and ``b``), ``∂L/∂Z = psum_p(G_p W_pᵀ)`` is one all-reduce of an
    ``(N, D)`` array. ``W`` is never gathered; per-device temporaries scale as ``chunk × K / P``
    plus the ``(D, K / P)`` gradient block.

    Every other mesh axis (e.g. ``"data"`` in a ``("data", "model")`` mesh) splits the rows of
    ``Z``, ``labels`` and ``weights``: the gradients of ``W`` and ``b`` are then also summed
    over those axes, and the mean uses the global ``Σ s``. With a one-axis mesh, ``Z`` is
    replicated.

    Design: an explicit ``jax.shard_map`` rather than sharding annotations under ``jit``, so the
    collectives are exactly the three above (XLA's automatic partitioner, given a sharded ``W``,
    may all-gather it) and the per-device code is the small, readable math of eq. (6). The
    ``custom_vjp`` sits *outside* the ``shard_map``: for ``"mean"``/``"sum"`` the forward pass
    computes the gradients along with the loss (one pass over the logits, as the chunked
    single-device head), and no collective is ever differentiated.

    Args:
      Z: features ``(N, D)``, floating; replicated (or split over the non-class mesh axes).
      W: head weights ``(D, K)``, floating; ``K`` must be divisible by the size of the class
        axis (a ``ValueError`` otherwise: uneven shards would need a padded copy of ``W``).
      labels: integer labels ``(N,)`` in ``[0, K)`` (global class indices).
      mesh: a ``jax.sharding.Mesh`` with an axis named ``axis_name``.
      axis_name: the mesh axis that splits the classes, ``"model"`` by default.
      bias, weights, reduction, chunk_size, label_smoothing, z_loss: as
        :func:`softmax_jax.linear_cross_entropy`; ``chunk_size`` counts rows per device.

    Returns:
      The loss: a scalar, or ``(N,)`` for ``reduction="none"``, in the compute dtype. Gradients
      come back in each input's dtype, ``∂L/∂W`` and ``∂L/∂b`` sharded like ``W`` and ``b``.

    Raises:
      ValueError: as :func:`softmax_jax.linear_cross_entropy`; ``axis_name`` not in the mesh,
        ``K`` not divisible by its size, or ``N`` not divisible by the other axes' sizes.
      TypeError: as :func:`softmax_jax.linear_cross_entropy`, or ``mesh`` not a ``Mesh``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import Mesh
      >>> from softmax_jax import sharded_linear_cross_entropy
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> Z = jnp.ones((4, 3)); W = jnp.zeros((3, 8)); y = jnp.arange(4)
      >>> float(sharded_linear_cross_entropy(Z, W, y, mesh=mesh))  # log(8)
      2.079441...

    References:
      Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
      Parallelism" (2019), §3 (parallel cross-entropy over the vocabulary).
    """
    Z, W, labels, bias, weights, ls, zl = _check_head(
        Z, W, labels, bias, weights, reduction, chunk_size, label_smoothing, z_loss
    )
    (n, _), k = Z.shape, W.shape[1]
    batch = _check_mesh(mesh, axis_name, n, k)
    nb = n
    for a in batch:
        nb //= mesh.shape[a]
    chunk = max(nb if chunk_size is None else min(int(chunk_size), nb), 1)
    cfg = _Cfg(mesh, axis_name, batch, reduction, chunk, ls, zl, k)
    return _impl(Z, W, labels, bias, weights, cfg=cfg)
