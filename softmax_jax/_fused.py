"""The head's differentiable loss: the kernel pass (``_kernel.fused_pass``) with its derivative rules.

- ``reduction="sum"`` / ``"mean"``: a ``jax.custom_jvp``. One fused pass gives the loss and the
  hand-written gradients the tangents ask for (``symbolic_zeros``: none for an input held
  constant); the output tangent is ``⟨∂L/∂Z, Ż⟩ + ⟨∂L/∂W, Ẇ⟩ + ⟨∂L/∂b, ḃ⟩ + ⟨∂L/∂s, ṡ⟩``, linear in
  the tangents, so ``jax.jvp``/``jax.linearize``/``jax.jacfwd`` work and JAX transposes it for
  ``jax.grad`` (the cotangent times the same gradients: one pass either way). Higher orders
  (jvp-of-grad Hessian-vector products, grad-of-grad) differentiate the pass itself.
- ``reduction="none"``: a ``jax.custom_vjp`` (a per-row cotangent needs a second pass over the
  rows with it; forward mode is not available there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from . import _shard
from ._kernel import Spec, fused_pass
from ._precision import acc_dtype, mean_normaliser


def _out(spec, value, stats, pred):
    return (value, stats.sum(axis=-1), pred) if spec.aux else value


def _reduce(per, s, spec):
    sp = jnp.where(s == 0, 0.0, s * per)  # a weight-0 row's NaN never reaches the sum
    if spec.reduction == "none":
        return sp
    value = jnp.sum(sp)
    inv = mean_normaliser(s, per.shape[0], spec.reduction, per.dtype)
    return value if inv is None else value * inv


def fused(Z, W, b, labels, s, spec: Spec):
    """The head's loss of ``(Z (..., D), W, b (K,) | None, labels (...) int32, s (...))``:
    ``Σ s ℓ`` (sum), ``Σ s ℓ / Σ s`` (mean) or ``s ℓ`` (none); with ``spec.aux`` the tuple
    ``(loss, lse, predictions)`` (no derivative flows through the last two)."""
    if spec.reduction == "none":
        return _per_row(Z, W, b, labels, s, spec)
    return _reduced(Z, W, b, labels, s, spec)


# --------------------------------------------------------------------------------------------
# sum / mean: custom_jvp.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _reduced(Z, W, b, labels, s, spec: Spec):
    per, stats, pred, *_ = fused_pass(Z, W, b, labels, s, spec)
    return _out(spec, _reduce(per, s, spec), stats, pred)


def _is_zero(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _reduced_jvp(spec: Spec, primals, tangents):
    Z, W, b, labels, s = primals
    tZ, tW, tb, _, ts = tangents
    wants = (not _is_zero(tZ), not _is_zero(tW), b is not None and not _is_zero(tb))
    acc = acc_dtype(W.dtype)
    inv = mean_normaliser(s, s.size, spec.reduction, acc)
    per, stats, pred, dZ, dW, db = fused_pass(Z, W, b, labels, s, spec, inv=inv, wants=wants)
    value = _reduce(per, s, spec)
    terms = []
    if wants[0]:
        terms.append(jnp.sum(dZ.astype(acc) * tZ.astype(acc)))
    if wants[1]:
        terms.append(jnp.sum(dW * tW.astype(acc)))
    if wants[2]:
        terms.append(jnp.sum(db * tb.astype(acc)))
    if not _is_zero(ts):  # ∂L/∂s_i: ℓ_i (sum), (ℓ_i − L) / Σ s (mean, 0-guarded)
        ds = per if inv is None else (per - value) * inv
        terms.append(jnp.sum(ds * ts.astype(acc)))
    tangent = functools.reduce(jnp.add, terms, jnp.zeros((), acc)).astype(value.dtype)
    if not spec.aux:
        return value, tangent
    lse = stats.sum(axis=-1)
    return (value, lse, pred), (
        tangent,
        jnp.zeros_like(lse),
        np.zeros(pred.shape, jax.dtypes.float0),
    )


_reduced.defjvp(_reduced_jvp, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------
# none: custom_vjp (private function, _fwd, _bwd, defvjp).
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _per_row(Z, W, b, labels, s, spec: Spec):
    per, stats, pred, *_ = fused_pass(Z, W, b, labels, s, spec)
    return _out(spec, _reduce(per, s, spec), stats, pred)


def _per_row_fwd(Z, W, b, labels, s, spec: Spec):
    # symbolic_zeros=True: each differentiable leaf arrives as CustomVJPPrimal(value, perturbed),
    # so gradients nobody asked for (dZ when only the head is trained, dW when it is frozen, ds)
    # are never computed.
    wants = (Z.perturbed, W.perturbed, b is not None and b.perturbed)
    want_ds = s.perturbed
    Z, W, labels, s = Z.value, W.value, labels.value, s.value
    b = None if b is None else b.value
    # Empty arrays with the primals' dtypes (and, in a user's shard_map, varying axes).
    protos = tuple(None if x is None else _shard.varying_like(jnp.zeros((0,), x.dtype), x)
                   for x in (Z, W, b))  # fmt: skip
    per, stats, pred, *_ = fused_pass(Z, W, b, labels, s, spec._replace(aux=True))
    value = _reduce(per, s, spec)
    res = (Z, W, b, labels, s, per if want_ds else None, stats, wants, protos)
    return _out(spec, value, stats, pred), res


def _per_row_bwd(spec: Spec, res, g):
    g = g[0] if spec.aux else g  # aux carries no gradient
    Z, W, b, labels, s, per, stats, wants, (z_proto, w_proto, b_proto) = res
    g = jnp.zeros(s.shape, s.dtype) if isinstance(g, SymbolicZero) else g.astype(s.dtype)
    _, _, _, dZ, dW, db = fused_pass(Z, W, b, labels, s, spec._replace(aux=False), g=g, lse=stats,
                               want_per=False, wants=wants)  # fmt: skip
    dZ, dW, db = (x if w else None for x, w in zip((dZ, dW, db), wants))
    ds = None if per is None else per * g
    dZ = None if dZ is None else _shard.reduce_like(dZ, z_proto)
    dW = None if dW is None else _shard.reduce_like(dW.astype(w_proto.dtype), w_proto)
    if db is not None:
        db = _shard.reduce_like(db.astype(b_proto.dtype), b_proto)
    return dZ, dW, db, None, ds


_per_row.defvjp(_per_row_fwd, _per_row_bwd, symbolic_zeros=True)
