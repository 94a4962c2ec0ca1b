"""Fused knowledge distillation of a linear head: KL, reverse KL, Liger-Kernel's generalized JSD.

``linear_distillation(Z, W, teacher_Z, teacher_W)`` compares the student's ``softmax(Z W / T)``
with the teacher's ``softmax(teacher_Z teacher_W / T)`` row chunk by row chunk (``_vocab``: the
head's chunk loop, precision policy, layouts, masks and class-sharded meshes), never holding either
``(N, K)`` logits, in a ``custom_vjp`` with the hand-written gradient of the student.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from . import _head, _vocab
from ._logprobs import layout_for, run_on_mesh
from ._options import static_float
from ._precision import acc_dtype, mean_normaliser
from ._validate import as_array, check_float

DIVERGENCES = ("kl", "reverse_kl", "jsd")


class _Cfg(NamedTuple):
    lay: _vocab.Layout
    temperature: float
    divergence: str  # "kl", "reverse_kl" or "jsd" with 0 < beta < 1 (beta 0 / 1 resolved)
    beta: float
    hard_weight: float  # 0 without labels
    reduction: str


# --------------------------------------------------------------------------------------------
# One chunk: row statistics, per-row losses, the residual block.
# --------------------------------------------------------------------------------------------


def _log_probs(blk, cfg, lse_a, lse_t):
    """``(log q, log p)`` of a column block: student and teacher at temperature ``T``."""
    inv_t = 1.0 / cfg.temperature
    return lse_a.log_softmax(blk.a * inv_t), lse_t.log_softmax(blk.t * inv_t)


def _log_mix(lq, lp, beta):
    """``log m = log(β p + (1 − β) q)``, finite whenever ``log q``, ``log p`` are."""
    return jnp.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)


def _stats(ch, cfg):
    """Rows ``(lse_a, lse_t, lse_r, div, S, ce)``: the log-sum-exps (:class:`_vocab.Lse`) of
    the tempered student
    and teacher logits and of the raw student logits ``r`` (for the hard loss; ``lse_a`` when
    ``T = 1``), the divergence, its gradient's row sum ``S`` (JSD: ``(1 − β) KL(q‖m)``) and the
    cross-entropy ``lse_r − r_y`` (0 without a hard loss)."""
    inv_t, hard = 1.0 / cfg.temperature, cfg.hard_weight != 0.0
    raw = hard and cfg.temperature != 1.0
    picks = [lambda blk: blk.a * inv_t, lambda blk: blk.t * inv_t]
    lses, tgt = _vocab.lses_and_target(ch, picks + ([lambda blk: blk.a] if raw else []))
    lse_a, lse_t = lses[0], lses[1]
    lse_r = lses[2] if raw else lse_a

    def terms(blk):
        lq, lp = _log_probs(blk, cfg, lse_a, lse_t)
        q, p = jnp.exp(lq), jnp.exp(lp)
        if cfg.divergence == "kl":
            return (p * (lp - lq),)
        if cfg.divergence == "reverse_kl":
            return (q * (lq - lp),)
        lm, beta = _log_mix(lq, lp, cfg.beta), cfg.beta
        to_q = (1.0 - beta) * q * (lq - lm)
        return beta * p * (lp - lm) + to_q, to_q

    sums = _vocab.row_sums(ch, terms, 2 if cfg.divergence == "jsd" else 1)
    div, S = sums[0], sums[-1]
    ce = (lse_r.m - tgt) + lse_r.ls if hard else jnp.zeros_like(div)
    return lse_a, lse_t, lse_r, div, S, ce


def _gblock(ch, cfg, cc, lse_a, lse_t, lse_r, div, S):
    """``G = c/T · ∂D/∂a + c λ_h (softmax(r) − onehot_y)`` with, per divergence ``D``:
    KL(p‖q): ``q − p``; KL(q‖p): ``q ⊙ (log q − log p − D)``; JSD:
    ``d − q Σ_k d_k``, ``d = (1 − β) q ⊙ (log q − log m)``."""
    inv_t, hw = 1.0 / cfg.temperature, cfg.hard_weight

    def gblock(blk):
        lq, lp = _log_probs(blk, cfg, lse_a, lse_t)
        q = jnp.exp(lq)
        if cfg.divergence == "kl":
            Gd = q - jnp.exp(lp)
        elif cfg.divergence == "reverse_kl":
            Gd = q * (lq - lp - div[:, None])
        else:
            Gd = (1.0 - cfg.beta) * q * (lq - _log_mix(lq, lp, cfg.beta)) - q * S[:, None]
        G = (cc * inv_t)[:, None] * Gd
        if hw != 0.0:
            onehot = blk.cols == ch.yl[:, None]
            G = G + (cc * hw)[:, None] * (jnp.exp(lse_r.log_softmax(blk.a)) - onehot)
        return G

    return gblock


def _forward_chunk(cfg):
    """Rows ``(ℓ, *lse_a, *lse_t, *lse_r, div, S)`` (9) with ``ℓ = D + λ_h ce`` (NaN for a counted
    token whose label is no class when there is a hard loss), and the residual block for the
    row coefficients ``rows = (c,)`` when given."""

    def fn(ch, rows):
        lse_a, lse_t, lse_r, div, S, ce = _stats(ch, cfg)
        ell = div + cfg.hard_weight * ce
        gblock = None
        if rows:
            (cc,) = rows
            if cfg.hard_weight != 0.0:
                ell = jnp.where(ch.valid, ell, jnp.where(cc == 0, 0.0, jnp.nan))
                cc = jnp.where(ch.valid | (cc == 0), cc, jnp.nan)
            gblock = _gblock(ch, cfg, cc, lse_a, lse_t, lse_r, div, S)
        return (ell, *lse_a, *lse_t, *lse_r, div, S), gblock

    return fn


def _backward_chunk(cfg):
    def fn(ch, rows):
        cc, ma, la, mt, lt, mr, lr, div, S = rows
        lse_a, lse_t, lse_r = _vocab.Lse(ma, la), _vocab.Lse(mt, lt), _vocab.Lse(mr, lr)
        if cfg.hard_weight != 0.0:
            cc = jnp.where(ch.valid | (cc == 0), cc, jnp.nan)
        return (), _gblock(ch, cfg, cc, lse_a, lse_t, lse_r, div, S)

    return fn


# --------------------------------------------------------------------------------------------
# custom_vjp: private function, _fwd, _bwd, defvjp.
# --------------------------------------------------------------------------------------------


def _reduce(ell, s, cfg):
    sp = jnp.where(s == 0, 0.0, s * ell)  # a weight-0 row's NaN never reaches the sum
    if cfg.reduction == "none":
        return sp
    inv = mean_normaliser(s, s.size, cfg.reduction, ell.dtype)
    value = jnp.sum(sp)
    return value if inv is None else value * inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _distill(Z, W, Zt, Wt, labels, s, cfg: _Cfg):
    (ell, *_), *_ = _vocab.run(Z, W, None, Zt, Wt, labels, (s,), cfg.lay, _forward_chunk(cfg), 9)
    return _reduce(ell, s, cfg)


def _distill_fwd(Z, W, Zt, Wt, labels, s, cfg: _Cfg):
    wants = (Z.perturbed, W.perturbed, False)
    want_ds = s.perturbed
    Z, W, Zt, Wt, labels, s = (x.value for x in (Z, W, Zt, Wt, labels, s))
    proto = jnp.zeros((0,), W.dtype)
    if cfg.reduction == "none":
        outs, *_ = _vocab.run(Z, W, None, Zt, Wt, labels, (s,), cfg.lay, _forward_chunk(cfg), 9)
        ell = outs[0]
        res = (Z, W, Zt, Wt, labels, s, outs[1:], ell if want_ds else None, wants, proto)
        return _reduce(ell, s, cfg), res
    inv = mean_normaliser(s, s.size, cfg.reduction, acc_dtype(W.dtype))
    (ell, *_), dZ, dW, _ = _vocab.run(Z, W, None, Zt, Wt, labels, (s,), cfg.lay,
                                      _forward_chunk(cfg), 9, wants=wants, inv=inv)  # fmt: skip
    value = _reduce(ell, s, cfg)
    ds = None
    if want_ds:  # ∂L/∂s_i: ℓ_i (sum), (ℓ_i − L) / Σ s (mean)
        ds = ell if inv is None else (ell - value) * inv
    return value, (dZ if wants[0] else None, dW if wants[1] else None, ds, proto)


def _distill_bwd(cfg: _Cfg, res, g):
    if cfg.reduction == "none":
        Z, W, Zt, Wt, labels, s, stats, ell, wants, proto = res
        g = jnp.zeros(s.shape, s.dtype) if isinstance(g, SymbolicZero) else g.astype(s.dtype)
        _, dZ, dW, _ = _vocab.run(Z, W, None, Zt, Wt, labels, (s * g, *stats), cfg.lay,
                                  _backward_chunk(cfg), 0, wants=wants)  # fmt: skip
        dZ, dW = (dZ if wants[0] else None), (dW if wants[1] else None)
        ds = None if ell is None else ell * g
    else:
        dZ, dW, ds, proto = res
        g = jnp.zeros((), proto.dtype) if isinstance(g, SymbolicZero) else g
        scale = lambda x: None if x is None else g.astype(x.dtype) * x  # noqa: E731
        dZ, dW, ds = scale(dZ), scale(dW), scale(ds)
    dW = None if dW is None else dW.astype(proto.dtype)
    return dZ, dW, None, None, None, ds


_distill.defvjp(_distill_fwd, _distill_bwd, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnames=("cfg", "ignore_index", "lead"))
def _call(Z, W, Zt, Wt, labels, weights, *, cfg, ignore_index, lead):
    acc = acc_dtype(W.dtype)
    labels = labels.astype(jnp.int32)
    s = jnp.ones(labels.shape, acc) if weights is None else weights.astype(acc)
    if ignore_index is not None:
        s = jnp.where(labels == ignore_index, jnp.zeros((), acc), s)
    Zt, Wt = jax.lax.stop_gradient(Zt), jax.lax.stop_gradient(Wt)
    loss = _distill(Z, W, Zt, Wt, labels, s, cfg)
    return loss.reshape(lead) if cfg.reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# Validation and the public wrapper.
# --------------------------------------------------------------------------------------------


def _check_options(temperature, divergence, beta, hard_weight, labels):
    """The static options; returns ``(T, divergence, β, λ_h)`` with β = 0 / 1 resolved."""
    t = static_float(temperature, "temperature")
    if not (t > 0.0 and np.isfinite(t)):
        raise ValueError(f"`temperature` must be a positive finite float, got {t}")
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"`divergence` must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}"
        )
    b = static_float(beta, "beta")
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"`beta` must lie in [0, 1], got {b}")
    hw = static_float(hard_weight, "hard_weight")
    if not (hw >= 0.0 and np.isfinite(hw)):
        raise ValueError(f"`hard_weight` must be a finite float >= 0, got {hw}")
    if hw != 0.0 and labels is None:
        raise ValueError(f"`hard_weight` = {hw} needs `labels` (the hard cross-entropy's targets)")
    if divergence == "jsd" and b in (0.0, 1.0):  # Liger's kernel: β = 0 → KL(p‖q), 1 → KL(q‖p)
        divergence = "kl" if b == 0.0 else "reverse_kl"
    return t, divergence, b, hw


def _check_teacher(teacher_Z, teacher_W, lead, k, layout):
    """``teacher_Z (..., D_t)`` with the student's leading shape, ``teacher_W`` in the same
    layout with the same K."""
    Zt, Wt = as_array(teacher_Z, "teacher_Z"), as_array(teacher_W, "teacher_W")
    check_float(Zt, "teacher_Z")
    check_float(Wt, "teacher_W")
    if Zt.ndim < 1 or tuple(Zt.shape[:-1]) != lead:
        raise ValueError(
            f"`teacher_Z` must have shape (..., D_t) with the leading dimensions {lead} of `Z`, "
            f"got {tuple(Zt.shape)}"
        )
    doc = "(D_t, K)" if layout == "dk" else "(K, D_t)"
    shape = (Zt.shape[-1], k) if layout == "dk" else (k, Zt.shape[-1])
    if tuple(Wt.shape) != shape:
        raise ValueError(
            f"`teacher_W` must have shape {doc} = {shape} (weight_layout={layout!r}, D_t from "
            f"`teacher_Z`, K from `W`), got {tuple(Wt.shape)}"
        )
    return Zt, Wt


def linear_distillation(
    Z: ArrayLike,
    W: ArrayLike,
    teacher_Z: ArrayLike,
    teacher_W: ArrayLike,
    *,
    labels: ArrayLike | None = None,
    temperature: float = 1.0,
    divergence: Literal["kl", "reverse_kl", "jsd"] = "kl",
    beta: float = 0.5,
    hard_weight: float = 0.0,
    ignore_index: int | None = -100,
    weights: ArrayLike | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    weight_layout: Literal["dk", "kd"] = "dk",
    chunk_size: int | Literal["auto"] | None = "auto",
) -> jax.Array:
    r"""Fused distillation loss of a linear head: the student's against the teacher's softmax.

    Student ``q_i = softmax(a_i)``, ``a_i = z_i W / T``; teacher ``p_i = softmax(t_i)``,
    ``t_i = z^t_i W^t / T`` (no gradient flows to ``teacher_Z``, ``teacher_W``). Per token:

    .. math::

        \ell_i = D(p_i, q_i) + \lambda_h \bigl(\operatorname{lse}(r_i) - r_{i, y_i}\bigr),
        \qquad r_i = z_i W

    with the hard cross-entropy on the untempered logits ``r`` (``λ_h = hard_weight``, as
    Liger-Kernel's distillation base) and ``D``, without a ``T²`` factor:

    - ``"kl"``: ``KL(p‖q) = Σ_k p_k (log p_k − log q_k)``, gradient ``∂D/∂a = q − p``;
    - ``"reverse_kl"``: ``KL(q‖p)``, gradient ``q ⊙ (log q − log p − KL(q‖p))``;
    - ``"jsd"``: Liger-Kernel's generalized Jensen-Shannon divergence, ``m = β p + (1 − β) q``,
      ``β KL(p‖m) + (1 − β) KL(q‖m)``, gradient ``d − q Σ_k d_k`` with
      ``d = (1 − β) q ⊙ (log q − log m)``; ``β = 0`` is taken as ``KL(p‖q)`` and ``β = 1`` as
      ``KL(q‖p)``, as Liger's kernel does.

    The residual with respect to the student's logits ``z W`` is ``G_i = s_i [∂D/∂a_i / T +
    λ_h (softmax(r_i) − onehot(y_i))]``; ``∂/∂Z = G Wᵀ``, ``∂/∂W = Zᵀ G``, formed row chunk by
    row chunk (two GEMMs each, ``G`` in column blocks) in the forward pass for ``"mean"`` and
    ``"sum"`` (recomputed in the backward pass for ``"none"``). Neither ``(N, K)`` logits is held.

    Args:
      Z: student features, ``(..., D)``, floating.
      W: student weights, ``(D, K)`` (``weight_layout="dk"``) or ``(K, D)`` (``"kd"``).
      teacher_Z: teacher features, ``(..., D_t)`` (``Z``'s leading shape; ``D_t`` may differ).
      teacher_W: teacher weights in the same layout as ``W``: ``(D_t, K)`` or ``(K, D_t)``.
      labels: optional integer labels ``(...)``: tokens labelled ``ignore_index`` contribute
        nothing; the targets of the hard loss when ``hard_weight > 0`` (then required).
      temperature: ``T > 0``, a static Python float.
      divergence: ``"kl"``, ``"reverse_kl"`` or ``"jsd"``.
      beta: ``β`` in ``[0, 1]`` of ``"jsd"``.
      hard_weight: ``λ_h ≥ 0``, the weight of the hard cross-entropy.
      ignore_index: a label value that contributes nothing, or ``None``.
      weights: optional per-token weights ``s ≥ 0`` ``(...)``; a weight-0 token contributes
        nothing. An all-ignored batch gives 0 and zero gradients.
      reduction: ``"mean"`` (``Σ s_i ℓ_i / Σ s_i``), ``"sum"`` or ``"none"`` (``s_i ℓ_i``).
      weight_layout: ``"dk"`` or ``"kd"``, the layout of both ``W`` and ``teacher_W``.
      chunk_size: rows per chunk, ``None`` or ``"auto"`` (the head's budget for the two
        ``(chunk, K)`` float32 logits chunks together).

    Returns:
      The loss: a scalar, or shape ``(...)`` for ``reduction="none"``.

    Raises:
      ValueError: wrong shapes (``Z``/``W``, ``teacher_Z``/``teacher_W``, ``labels``,
        ``weights``), an unknown ``divergence``/``reduction``/``weight_layout``,
        ``temperature <= 0``, ``beta`` outside ``[0, 1]``, ``hard_weight < 0`` or ``> 0``
        without ``labels``, negative weights, a counted label outside ``[0, K)``.
      TypeError: non-floating features or weights, non-integer labels, traced static options.

    Examples:
      >>> import jax, jax.numpy as jnp, softmax_jax as sj
      >>> Z = jnp.ones((4, 8)); W = jnp.zeros((8, 5))
      >>> float(sj.linear_distillation(Z, W, Z, W))  # identical distributions
      0.0
      >>> Zt = jax.random.normal(jax.random.key(0), (4, 16)); Wt = jnp.ones((16, 5))
      >>> loss = sj.linear_distillation(Z, W, Zt, Wt, divergence="jsd", beta=0.5)
      >>> bool(loss >= 0)
      True

    References:
      Hinton et al., "Distilling the Knowledge in a Neural Network" (2015); Agarwal et al.,
      "On-Policy Distillation of Language Models" (2024) for the generalized JSD; Liger-Kernel
      (``liger_kernel/ops/jsd.py``, ``fused_linear_jsd.py``, ``chunked_loss``), the PyTorch
      counterpart whose definitions this follows.
    """
    with jax.named_scope("linear_distillation"):
        t, div, b, hw = _check_options(temperature, divergence, beta, hard_weight, labels)
        Za = as_array(Z, "Z")
        mask = labels
        if labels is None:
            mask, ignore_index = jnp.zeros(Za.shape[:-1], jnp.int32), None
        p = _head.prepare(Za, W, mask, None, weights, reduction, chunk_size, 0.0, 0.0,
                          ignore_index, None, weight_layout, False)  # fmt: skip
        k = p.spec.num_classes
        Zt, Wt = _check_teacher(teacher_Z, teacher_W, p.lead, k, weight_layout)
        lay = layout_for(p, 2 * k)
        cfg = _Cfg(lay, t, div, b, hw, reduction)
        return run_on_mesh(_call, lay, p.Z, p.W, Zt, Wt, p.labels, p.weights, cfg=cfg,
                           ignore_index=p.ignore_index, lead=p.lead)  # fmt: skip
