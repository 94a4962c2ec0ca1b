"""Unfused references of the vocabulary losses (the (N, K) logits held whole; jax.grad gives
their gradients), shared by tests/test_logprobs.py, tests/test_distill.py and the mesh worker."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def log_probs_ref(Z, W, tokens, bias=None, temperature=1.0, weight_layout="dk"):
    """``(logp, entropy)`` of ``softmax((Z W + b) / T)`` (verl's ``run_torch_entropy``)."""
    r = Z @ W if weight_layout == "dk" else Z @ W.T
    a = (r if bias is None else r + bias) / temperature
    lq = jax.nn.log_softmax(a, axis=-1)
    logp = jnp.take_along_axis(lq, tokens[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(lq) * lq, axis=-1)


def divergence_ref(lq, lp, divergence, beta):
    """Per-row ``D(p, q)`` from log-probabilities, Liger-Kernel's definitions (``ops/jsd.py``):
    ``"jsd"`` is ``β KL(p‖m) + (1 − β) KL(q‖m)``, ``m = β p + (1 − β) q``, with β = 0 taken as
    ``KL(p‖q)`` and β = 1 as ``KL(q‖p)``."""
    q, p = jnp.exp(lq), jnp.exp(lp)
    if divergence == "kl" or (divergence == "jsd" and beta == 0.0):
        return jnp.sum(p * (lp - lq), axis=-1)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return jnp.sum(q * (lq - lp), axis=-1)
    lm = jnp.log(beta * p + (1.0 - beta) * q)
    return beta * jnp.sum(p * (lp - lm), axis=-1) + (1.0 - beta) * jnp.sum(q * (lq - lm), axis=-1)


def distillation_ref(Z, W, Zt, Wt, labels=None, *, temperature=1.0, divergence="kl", beta=0.5,
                     hard_weight=0.0, ignore_index=-100, weights=None, reduction="mean",
                     weight_layout="dk", chunk_size=None):  # fmt: skip
    mm = (lambda x, w: x @ w) if weight_layout == "dk" else (lambda x, w: x @ w.T)
    r = mm(Z, W)
    t = jax.lax.stop_gradient(mm(Zt, Wt))
    lq = jax.nn.log_softmax(r / temperature, axis=-1)
    lp = jax.nn.log_softmax(t / temperature, axis=-1)
    ell = divergence_ref(lq, lp, divergence, beta)
    s = jnp.ones(ell.shape, ell.dtype) if weights is None else weights.astype(ell.dtype)
    if labels is not None:
        keep = labels != ignore_index if ignore_index is not None else jnp.ones_like(s, bool)
        s = jnp.where(keep, s, 0.0)
        if hard_weight:
            y = jnp.where(keep, labels, 0)
            ce = jax.nn.logsumexp(r, axis=-1) - jnp.take_along_axis(r, y[..., None], -1)[..., 0]
            ell = ell + hard_weight * ce
    sp = s * ell
    if reduction == "none":
        return sp
    if reduction == "sum":
        return jnp.sum(sp)
    total = jnp.sum(s)
    return jnp.sum(sp) / jnp.where(total > 0, total, 1.0)
