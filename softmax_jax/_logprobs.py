"""Fused per-token log-probabilities and entropy of a linear head (RL fine-tuning: PPO, GRPO).

``linear_log_probs(Z, W, tokens)`` returns ``log softmax(a)[token]`` and the entropy of
``softmax(a)``, ``a = (Z W + b) / T``, without the ``(N, K)`` logits: the row-chunk pass of
``_vocab`` (the head's chunk loop, precision policy, layouts and class-sharded meshes), in a
``custom_vjp`` whose backward pass is the hand-written gradient for any per-token cotangents.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh
from jax.typing import ArrayLike

from . import _head, _shard, _vocab
from ._options import static_float
from ._precision import acc_dtype


class LogProbs(NamedTuple):
    """The outputs of :func:`softmax_jax.linear_log_probs`, both shaped like ``tokens``.

    Attributes:
      logp: ``log q_i[tokens_i]``, the log-probability of each token under ``q = softmax(a)``.
      entropy: ``−Σ_k q_ik log q_ik``, the entropy of each token's distribution.
    """

    logp: jax.Array
    entropy: jax.Array


class _Cfg(NamedTuple):
    lay: _vocab.Layout
    temperature: float


# --------------------------------------------------------------------------------------------
# One chunk: the forward rows and the residual block.
# --------------------------------------------------------------------------------------------


def _forward_chunk(cfg: _Cfg):
    """Rows ``(logp, H, m, ls)``: ``lse = m + ls`` of ``a = r / T`` (:class:`_vocab.Lse`),
    ``logp = a_y − lse`` (NaN for a token outside ``[0, K)``), ``H = −Σ_k q_k log q_k`` (a
    second pass, once ``lse`` is known: no cancellation between ``lse`` and ``Σ q a``)."""
    inv_t = 1.0 / cfg.temperature

    def fn(ch, rows):
        (lse,), tgt = _vocab.lses_and_target(ch, [lambda blk: blk.a * inv_t])

        def terms(blk):
            lq = lse.log_softmax(blk.a * inv_t)
            return (jnp.exp(lq) * lq,)

        (neg_h,) = _vocab.row_sums(ch, terms, 1)
        logp = jnp.where(ch.valid, (tgt * inv_t - lse.m) - lse.ls, jnp.nan)
        return (logp, -neg_h, lse.m, lse.ls), None

    return fn


def _backward_chunk(cfg: _Cfg, use_logp: bool, use_entropy: bool):
    """``G = [g_l (onehot_y − q) − g_h q ⊙ (log q + H)] / T`` (with respect to ``r``), from the
    saved ``lse`` and ``H``; a term whose cotangent is a symbolic zero is left out."""
    inv_t = 1.0 / cfg.temperature

    def fn(ch, rows):
        g_l, g_h, m, ls, ent = rows
        lse = _vocab.Lse(m, ls)

        def gblock(blk):
            lq = lse.log_softmax(blk.a * inv_t)
            q = jnp.exp(lq)
            coef = jnp.zeros_like(lq)
            G = jnp.zeros_like(lq)
            if use_logp:
                coef = coef + g_l[:, None]
                G = jnp.where(blk.cols == ch.yl[:, None], g_l[:, None], 0.0)
            if use_entropy:
                coef = coef + g_h[:, None] * (lq + ent[:, None])
            return (G - q * coef) * inv_t

        return (), gblock

    return fn


# --------------------------------------------------------------------------------------------
# custom_vjp: private function, _fwd, _bwd, defvjp.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _log_probs(Z, W, b, tokens, cfg: _Cfg):
    (logp, ent, _, _), *_ = _vocab.run(Z, W, b, None, None, tokens, (), cfg.lay,
                                       _forward_chunk(cfg), 4)  # fmt: skip
    return logp, ent


def _log_probs_fwd(Z, W, b, tokens, cfg: _Cfg):
    wants = (Z.perturbed, W.perturbed, b is not None and b.perturbed)
    Z, W, tokens = Z.value, W.value, tokens.value
    b = None if b is None else b.value
    (logp, ent, m, ls), *_ = _vocab.run(Z, W, b, None, None, tokens, (), cfg.lay,
                                        _forward_chunk(cfg), 4)  # fmt: skip
    protos = (jnp.zeros((0,), W.dtype), None if b is None else jnp.zeros((0,), b.dtype))
    return (logp, ent), (Z, W, b, tokens, (m, ls, ent), wants, protos)


def _log_probs_bwd(cfg: _Cfg, res, g):
    Z, W, b, tokens, stats, wants, (w_proto, b_proto) = res
    g_l, g_h = g
    use_l, use_h = (not isinstance(x, SymbolicZero) for x in (g_l, g_h))
    m = stats[0]
    zero = jnp.zeros(m.shape, m.dtype)
    g_l = g_l.astype(m.dtype) if use_l else zero
    g_h = g_h.astype(m.dtype) if use_h else zero
    _, dZ, dW, db = _vocab.run(Z, W, b, None, None, tokens, (g_l, g_h, *stats), cfg.lay,
                               _backward_chunk(cfg, use_l, use_h), 0, wants=wants)  # fmt: skip
    dZ = dZ if wants[0] else None
    dW = dW.astype(w_proto.dtype) if wants[1] else None
    db = db.astype(b_proto.dtype) if wants[2] else None
    return dZ, dW, db, None


_log_probs.defvjp(_log_probs_fwd, _log_probs_bwd, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnames=("cfg", "lead"))
def _call(Z, W, b, tokens, *, cfg, lead):
    acc = acc_dtype(W.dtype)
    b = None if b is None else b.astype(acc)  # outside the custom_vjp: db flows back cast
    logp, ent = _log_probs(Z, W, b, tokens.astype(jnp.int32), cfg)
    return LogProbs(logp, ent)


# --------------------------------------------------------------------------------------------
# The public wrapper.
# --------------------------------------------------------------------------------------------


def _prepare(Z, W, tokens, bias, temperature, weight_layout, chunk_size):
    """The head's checks (``tokens`` named as such), the temperature, the layout."""
    t = static_float(temperature, "temperature")
    if not (t > 0.0 and np.isfinite(t)):
        raise ValueError(f"`temperature` must be a positive finite float, got {t}")
    try:
        p = _head.prepare(Z, W, tokens, bias, None, "none", chunk_size, 0.0, 0.0, None, None,
                          weight_layout, False)  # fmt: skip
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("`labels`", "`tokens`")) from None
    return p, t


def layout_for(p, k_rows: int) -> _vocab.Layout:
    """The :class:`_vocab.Layout` of a prepared call: where it runs (the head's
    ``_shard.layout_of``, from the inputs' shardings) and the rows per chunk of one device,
    ``chunk_size="auto"`` budgeting ``k_rows`` float32 logits per row (``K``, or ``2 K`` with a
    teacher)."""
    kaxis = _vocab.kaxis(p.spec.weight_layout)
    placement = _shard.layout_of(p.Z, p.W, p.bias, kaxis=kaxis)
    n_local = _shard.local_rows(placement, p.lead)
    # Liger's rule alone: each chunk holds several (rows, K) blocks (logits, probabilities, a
    # teacher's), so the head's larger GEMM chunks would cost these losses their frugality.
    chunk = _head.rows_per_chunk(p.chunk_size, n_local, k_rows, p.Z.shape[-1],
                                 gemm_rows=_head.MIN_ROWS)  # fmt: skip
    return _vocab.Layout(chunk, p.spec.weight_layout, p.spec.num_classes, placement)


def run_on_mesh(fn, lay: _vocab.Layout, *args, **kwargs):
    """``fn(*args, **kwargs)``; eagerly inside ``jax.set_mesh`` on a mesh of explicit axes
    (JAX's explicit-sharding mode types the outputs from the mesh in context)."""
    placement = lay.placement
    traced = any(isinstance(x, jax.core.Tracer) for x in args)
    if (
        placement is not None
        and placement.explicit
        and isinstance(placement.mesh, Mesh)
        and not traced
    ):
        with jax.set_mesh(placement.mesh):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def linear_log_probs(
    Z: ArrayLike,
    W: ArrayLike,
    tokens: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: float = 1.0,
    weight_layout: Literal["dk", "kd"] = "dk",
    chunk_size: int | Literal["auto"] | None = "auto",
) -> LogProbs:
    r"""Per-token log-probabilities and entropies of a linear head, fused (RL: PPO, GRPO).

    With logits ``a_i = (z_i W + b) / T`` and ``q_i = softmax(a_i)``:

    .. math::

        \log p_i = a_{i, y_i} - \operatorname{lse}(a_i), \qquad
        H_i = -\sum_k q_{ik} \log q_{ik}

    computed row chunk by row chunk without the ``(N, K)`` logits. Both outputs are
    differentiable in ``Z``, ``W`` and ``bias`` with any cotangents ``(g_l, g_h)`` (a
    policy-gradient loss ``−Σ_i A_i log p_i − c Σ_i H_i``): the ``custom_vjp`` recomputes each
    chunk's logits and forms the residual with respect to ``r = z W + b``

    .. math::

        \frac{\partial \log p_i}{\partial a_i} = \mathrm{onehot}(y_i) - q_i, \qquad
        \frac{\partial H_i}{\partial a_i} = -q_i \odot (\log q_i + H_i), \qquad
        G_i = \frac{g_{l,i} (\mathrm{onehot}(y_i) - q_i) - g_{h,i}\, q_i \odot
              (\log q_i + H_i)}{T}

    then ``∂/∂Z = G Wᵀ``, ``∂/∂W = Zᵀ G``, ``∂/∂b = Σ_i G_i`` (two GEMMs per chunk, ``G`` in
    column blocks). A cotangent that is zero by construction (only ``logp`` used) is skipped.

    Precision: as the head (GEMM operands in ``W``'s dtype, float32 accumulation at least).
    Sharding: when ``W``'s class axis is sharded over a mesh axis (known at trace time, as for
    :func:`softmax_jax.linear_cross_entropy`), each device computes its ``(chunk, K/P)`` logits;
    the log-sum-exp, the target logit and the entropy sum are combined across devices.

    Args:
      Z: features, shape ``(..., D)``, floating.
      W: weights, ``(D, K)`` (``weight_layout="dk"``) or ``(K, D)`` (``"kd"``, tied embeddings).
      tokens: integer tokens in ``[0, K)``, shape ``(...)`` (``Z``'s leading shape).
      bias: optional ``b``, shape ``(K,)``.
      temperature: ``T > 0``, a static Python float (sampling temperature).
      weight_layout: ``"dk"`` or ``"kd"``.
      chunk_size: rows per chunk, ``None`` (one chunk) or ``"auto"`` (as the head).

    Returns:
      A :class:`LogProbs` ``(logp, entropy)``, each shaped like ``tokens``, in the compute dtype.
      A token outside ``[0, K)`` under ``jax.jit`` gets ``logp = NaN`` (its gradient treats the
      one-hot as zero); eagerly it raises.

    Raises:
      ValueError: wrong shapes, ``temperature <= 0``, an unknown ``weight_layout``,
        ``chunk_size <= 0``, a token outside ``[0, K)`` (when the values are concrete).
      TypeError: non-floating ``Z``/``W``/``bias``, non-integer ``tokens``, a traced
        ``temperature``.

    Examples:
      >>> import jax, jax.numpy as jnp, softmax_jax as sj
      >>> Z = jnp.ones((2, 3, 8)); W = jnp.zeros((8, 4)); tok = jnp.array([[0, 1, 2], [3, 0, 1]])
      >>> out = sj.linear_log_probs(Z, W, tok)
      >>> round(float(out.logp[0, 0]), 4), round(float(out.entropy[0, 0]), 4)  # log(1/4), log 4
      (-1.3863, 1.3863)

    References:
      Schulman et al., "Proximal Policy Optimization Algorithms" (2017); verl's
      ``FusedLinearForPPO`` (``verl/utils/experimental/torch_functional.py``), the PyTorch
      counterpart.
    """
    with jax.named_scope("linear_log_probs"):
        p, t = _prepare(Z, W, tokens, bias, temperature, weight_layout, chunk_size)
        lay = layout_for(p, p.spec.num_classes)
        cfg = _Cfg(lay, t)
        return run_on_mesh(_call, lay, p.Z, p.W, p.bias, p.labels, cfg=cfg, lead=p.lead)
