"""The reusable head: fused linear + softmax cross-entropy that never holds the (N, K) logits.

``linear_cross_entropy(Z, W, labels)`` is the loss of ``softmax(Z W + b)`` against integer labels,
as a ``jax.custom_vjp`` whose backward pass is the hand-written gradient of eq. (6) carried to the
head's inputs: ``∂/∂Z = G Wᵀ``, ``∂/∂W = Zᵀ G``, ``∂/∂b = Σ_i G_i``. Rows are processed in chunks
with lax loops; for a scalar loss the gradients are accumulated during the forward pass (one pass
over the logits, no recomputation: the Liger-Kernel approach) and the backward pass only scales
them by the incoming cotangent.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from ._validate import (
    as_array,
    check_float,
    check_labels_values,
    check_linear,
    check_reduction,
    check_weights,
    compute_dtype,
)

# Columns of a logits chunk handled per step of the inner (class) loops. The temporaries besides
# the (chunk, K) logits are a few (chunk, _K_BLOCK) and (D, _K_BLOCK) blocks; 2048 keeps those
# GEMMs large enough to run at full speed.
_K_BLOCK = 2048


class _Config(NamedTuple):
    """The static arguments (``nondiff_argnums``) of the custom_vjp."""

    reduction: str
    chunk: int  # rows per chunk
    kblock: int  # columns per block of the inner loops
    ls: float  # label smoothing
    zl: float  # z-loss weight


# --------------------------------------------------------------------------------------------
# Loops and slices.
# --------------------------------------------------------------------------------------------


def _loop(n: int, block: int, body, carry):
    """Runs ``carry = body(start, size, carry)`` over the blocks ``[start, start + size)`` of
    ``range(n)``.

    A ``fori_loop`` over the ``n // block`` full blocks, then one remainder block of static size
    ``n % block``: nothing is padded, and ``body`` reads its block with ``dynamic_slice`` so only
    one block of each input is live at a time.
    """
    nfull, rem = divmod(n, block)
    if nfull == 1:
        carry = body(0, block, carry)
    elif nfull > 1:
        carry = lax.fori_loop(0, nfull, lambda i, c: body(i * block, block, c), carry)
    if rem:
        carry = body(nfull * block, rem, carry)
    return carry


def _rows(x, start, size):
    return lax.dynamic_slice_in_dim(x, start, size, axis=0)


def _put_rows(x, start, block):
    return lax.dynamic_update_slice_in_dim(x, block.astype(x.dtype), start, axis=0)


def _cols(x, start, size):
    return lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 1)


def _put_cols(x, start, block):
    return lax.dynamic_update_slice_in_dim(x, block.astype(x.dtype), start, axis=x.ndim - 1)


def _cdt(W):
    """The accumulation dtype: ``W``'s, at least float32."""
    return compute_dtype(W.dtype)


def _gemm_in(x, W):
    """``x`` rounded to ``W``'s dtype when that is narrower (bf16/f16 GEMMs), else unchanged."""
    return x.astype(W.dtype) if jnp.finfo(W.dtype).bits < jnp.finfo(x.dtype).bits else x


def _dot(x, y, contract, cdt):
    """``lax.dot_general`` contracting axis ``contract[0]`` of ``x`` with ``contract[1]`` of ``y``."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(x, y, dims, preferred_element_type=cdt)


# --------------------------------------------------------------------------------------------
# One chunk of rows: logits, log-sum-exp, target term, and the gradients block by block.
# --------------------------------------------------------------------------------------------


def _logits(Zc, W, cdt):
    """``Z_c W``, ``(C, K)`` in the compute dtype (the bias is added block by block later).
    ``Z_c`` is cast to ``W``'s dtype, a ``(C, D)`` copy at most: ``W`` is never copied or cast."""
    return jnp.dot(Zc.astype(W.dtype), W, preferred_element_type=cdt)


def _lse(A, b, kblock):
    """Row-wise log-sum-exp of ``A + b``, ``(C,)``, finite for logits of any magnitude.

    An online (running max) pass over blocks of ``kblock`` columns: a single reduction over all
    K columns would make XLA materialise ``exp(A − m)``, a second ``(C, K)`` array.
    """
    c, k = A.shape

    def body(start, size, carry):
        m, s = carry
        Aj = _cols(A, start, size)
        if b is not None:
            Aj = Aj + _cols(b, start, size)[None, :]
        m_new = jnp.maximum(m, jnp.max(Aj, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(Aj - m_new[:, None]), axis=1)
        return m_new, s

    init = (jnp.full((c,), -jnp.inf, A.dtype), jnp.zeros((c,), A.dtype))
    m, s = _loop(k, kblock, body, init)
    return m + jnp.log(s)


def _means(W, b, ls, cdt):
    """``(mean_k w_k, mean(b))`` for label smoothing, or ``None``; one read of ``W``."""
    if ls == 0.0:
        return None
    return jnp.mean(W, axis=1, dtype=cdt), (0.0 if b is None else jnp.mean(b))


def _target_term(Zc, W, b, yc, ls, means, cdt):
    """``Σ_k t_ik a_ik = (1 − ls) a_{i,y_i} + ls · mean_k a_ik``, ``(C,)``, in closed form.

    Computed from ``Z_c`` and the label columns of ``W`` (a ``(D, C)`` gather), not from the
    logits; ``mean_k a_ik = z_i · mean_k w_k + mean(b)`` with ``means`` precomputed once per
    call. An out-of-range label (only possible under tracing: eager calls are checked) gives NaN.
    """
    k = W.shape[1]
    idx = jnp.clip(yc, 0, k - 1)
    Zw = Zc.astype(W.dtype).astype(cdt)  # the logits GEMM's operands, exact in cdt
    picked = jnp.sum(Zw * jnp.take(W, idx, axis=1).T.astype(cdt), axis=1)
    if b is not None:
        picked = picked + b[idx]
    picked = jnp.where((yc >= 0) & (yc < k), picked, jnp.nan)
    if ls == 0.0:
        return picked
    w_mean, b_mean = means
    return (1.0 - ls) * picked + ls * (jnp.dot(Zc.astype(cdt), w_mean) + b_mean)


def _per_sample(lse, tgt, zl):
    """``ℓ_i = lse_i − Σ_k t_ik a_ik + z_loss · lse_i²``."""
    per = lse - tgt
    return per if zl == 0.0 else per + zl * lse * lse


def _grads(A, b, lse, yc, cc, Zc, W, dW, db, cfg, want_dZ, want_dW):
    """Adds one chunk's share of eq. (6): returns ``(G Wᵀ, dW + Z_cᵀ G, db + Σ_i G_i)`` with

    ``G = diag(c) [diag(1 + 2 z_loss lse) Ŷ − T]`` ``= ∂(Σ_i c_i ℓ_i)/∂A``, ``Ŷ = exp(A + b − lse)``.

    ``G`` exists only as ``(C, kblock)`` blocks, each going straight into the two GEMMs and
    updating its columns of ``dW`` in place. The smoothed targets ``T`` are never formed:
    ``c_i ls / K`` is subtracted everywhere and ``c_i (1 − ls)`` where the column is ``y_i`` (an
    iota compare fused into the block). For bf16/f16 ``W`` the block is rounded to that dtype for
    the GEMMs, which accumulate in float32.
    """
    (c, k), d, cdt, ls = A.shape, W.shape[0], A.dtype, cfg.ls
    cc = jnp.where((yc >= 0) & (yc < k), cc, jnp.nan)  # out-of-range label: NaN, not dropped
    coef = (cc if cfg.zl == 0.0 else cc * (1.0 + 2.0 * cfg.zl * lse))[:, None]
    hit = (cc * (1.0 - ls))[:, None]
    Zg = _gemm_in(Zc.astype(cdt), W)

    def body(start, size, carry):
        dZc, dW, db = carry
        Aj = _cols(A, start, size)
        if b is not None:
            Aj = Aj + _cols(b, start, size)[None, :]
        Gj = jnp.exp(Aj - lse[:, None]) * coef
        if ls != 0.0:
            Gj = Gj - (cc * (ls / k))[:, None]
        cols = lax.broadcasted_iota(yc.dtype, (1, size), 1) + start
        Gj = Gj - jnp.where(cols == yc[:, None], hit, 0.0)
        Gg = _gemm_in(Gj, W)
        if want_dZ:
            dZc = dZc + _dot(Gg, _cols(W, start, size), (1, 1), cdt)
        if want_dW:
            dW = _put_cols(dW, start, _cols(dW, start, size) + _dot(Zg, Gg, (0, 0), cdt))
        db = _put_cols(db, start, _cols(db, start, size) + jnp.sum(Gj, axis=0))
        return dZc, dW, db

    init = (jnp.zeros((c if want_dZ else 0, d), cdt), dW, db)
    return _loop(k, cfg.kblock, body, init)


# --------------------------------------------------------------------------------------------
# Passes over the rows.
# --------------------------------------------------------------------------------------------


def _forward_losses(Z, W, b, labels, cfg):
    """Per-sample ``(ℓ, lse)``, both ``(N,)`` in the compute dtype; one logits chunk live."""
    n, cdt = Z.shape[0], _cdt(W)
    means = _means(W, b, cfg.ls, cdt)

    def body(start, size, carry):
        per, lse_all = carry
        Zc = _rows(Z, start, size)
        lse = _lse(_logits(Zc, W, cdt), b, cfg.kblock)
        tgt = _target_term(Zc, W, b, _rows(labels, start, size), cfg.ls, means, cdt)
        return _put_rows(per, start, _per_sample(lse, tgt, cfg.zl)), _put_rows(lse_all, start, lse)

    return _loop(n, cfg.chunk, body, (jnp.zeros((n,), cdt), jnp.zeros((n,), cdt)))


def _fused_pass(Z, W, b, labels, c, cfg, *, lse=None, want_per=True, want_dZ=True, want_dW=True):
    """One pass over the row chunks returning ``(ℓ, dZ, dW, db)`` for ``Σ_i c_i ℓ_i``: the
    per-sample losses ``ℓ`` (if ``want_per``), ``dZ = G Wᵀ`` (in ``Z``'s dtype, if ``want_dZ``),
    ``dW = Zᵀ G`` (if ``want_dW``) and ``db = Σ_i G_i`` (in the compute dtype). With ``lse`` given
    (the backward pass of ``reduction="none"``) the log-sum-exp is read, not recomputed.

    Per chunk: one GEMM for the ``(chunk, K)`` logits, a pass over them for the log-sum-exp, and a
    pass forming ``G`` block by block into the two gradient GEMMs: three GEMMs in all, as the
    unfused loss. Live temporaries: the logits chunk, ``(chunk, kblock)`` and ``(D, kblock)``
    blocks, and the ``dW`` accumulator ``(D, K)``, which XLA makes the output buffer when the
    cotangent is the constant 1 of ``jax.grad``.
    """
    (n, d), k, cdt = Z.shape, W.shape[1], _cdt(W)
    means = _means(W, b, cfg.ls, cdt) if want_per else None

    def body(start, size, carry):
        per, dZ, dW, db = carry
        Zc, yc = _rows(Z, start, size), _rows(labels, start, size)
        A = _logits(Zc, W, cdt)
        lse_c = _lse(A, b, cfg.kblock) if lse is None else _rows(lse, start, size)
        if want_per:
            tgt = _target_term(Zc, W, b, yc, cfg.ls, means, cdt)
            per = _put_rows(per, start, _per_sample(lse_c, tgt, cfg.zl))
        cc = _rows(c, start, size)
        dZc, dW, db = _grads(A, b, lse_c, yc, cc, Zc, W, dW, db, cfg, want_dZ, want_dW)
        if want_dZ:
            dZ = _put_rows(dZ, start, dZc)
        return per, dZ, dW, db

    init = (
        jnp.zeros((n if want_per else 0,), cdt),
        jnp.zeros((n if want_dZ else 0, d), Z.dtype),
        jnp.zeros((d, k if want_dW else 0), cdt),
        jnp.zeros((k,), cdt),
    )
    return _loop(n, cfg.chunk, body, init)


def _mean_scale(s, reduction):
    """``c_i = ∂L/∂ℓ_i``: ``s_i`` (sum) or ``s_i / Σ s`` (mean; 0 when ``Σ s = 0``)."""
    if reduction == "sum":
        return s
    total = jnp.sum(s)
    return s / jnp.where(total > 0, total, 1)


# --------------------------------------------------------------------------------------------
# custom_vjp: private function, _fwd, _bwd, defvjp.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lce(Z, W, b, labels, s, cfg: _Config):
    b = None if b is None else b.astype(_cdt(W))
    per, _ = _forward_losses(Z, W, b, labels, cfg)
    if cfg.reduction == "none":
        return s * per
    return jnp.sum(_mean_scale(s, cfg.reduction) * per)


def _lce_fwd(Z, W, b, labels, s, cfg: _Config):
    # symbolic_zeros=True: each differentiable leaf arrives as CustomVJPPrimal(value, perturbed),
    # so gradients nobody asked for (dZ when only the head is trained, ds) are never computed.
    want_dZ, want_dW, want_ds = Z.perturbed, W.perturbed, s.perturbed
    want_db = b is not None and b.perturbed
    Z, W, labels, s = Z.value, W.value, labels.value, s.value
    b = None if b is None else b.value
    # Zero-size arrays carry the cotangents' dtypes through the residuals.
    protos = (jnp.zeros((0,), W.dtype), None if b is None else jnp.zeros((0,), b.dtype))
    b = None if b is None else b.astype(_cdt(W))

    if cfg.reduction == "none":
        per, lse = _forward_losses(Z, W, b, labels, cfg)
        flags = tuple(jnp.zeros((0,)) if f else None for f in (want_dZ, want_dW))
        return s * per, (Z, W, b, labels, s, per if want_ds else None, lse, flags, protos)

    c = _mean_scale(s, cfg.reduction)
    dZ = dW = db = None
    if want_dZ or want_dW or want_db:
        per, dZ, dW, db = _fused_pass(Z, W, b, labels, c, cfg, want_dZ=want_dZ, want_dW=want_dW)
    else:
        per, _ = _forward_losses(Z, W, b, labels, cfg)
    value = jnp.sum(c * per)
    ds = None
    if want_ds:  # ∂L/∂s_i: ℓ_i for sum; (ℓ_i − L) / Σ s for mean, with the all-zero guard.
        if cfg.reduction == "sum":
            ds = per
        else:
            total = jnp.sum(s)
            ds = (per - jnp.where(total > 0, value, 0)) / jnp.where(total > 0, total, 1)
    res = (dZ if want_dZ else None, dW if want_dW else None, db if want_db else None, ds, protos)
    return value, res


def _lce_bwd(cfg: _Config, res, g):
    if cfg.reduction == "none":
        Z, W, b, labels, s, per, lse, (flag_dZ, flag_dW), (w_proto, b_proto) = res
        g = jnp.zeros(s.shape, s.dtype) if isinstance(g, SymbolicZero) else g.astype(s.dtype)
        want_dZ, want_dW = flag_dZ is not None, flag_dW is not None
        _, dZ, dW, db = _fused_pass(
            Z, W, b, labels, g * s, cfg, lse=lse, want_per=False, want_dZ=want_dZ, want_dW=want_dW
        )
        dZ, dW = (dZ if want_dZ else None), (dW if want_dW else None)
        ds = None if per is None else g * per
    else:
        dZ, dW, db, ds, (w_proto, b_proto) = res
        g = jnp.zeros((), w_proto.dtype) if isinstance(g, SymbolicZero) else g
        scale = lambda x: None if x is None else g.astype(x.dtype) * x  # noqa: E731
        dZ, dW, db, ds = scale(dZ), scale(dW), scale(db), scale(ds)
    dW = None if dW is None else dW.astype(w_proto.dtype)
    db = None if b_proto is None or db is None else db.astype(b_proto.dtype)
    return dZ, dW, db, None, ds


_lce.defvjp(_lce_fwd, _lce_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------
# Validation and the public wrapper.
# --------------------------------------------------------------------------------------------


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    try:
        ok = not isinstance(chunk_size, bool) and operator.index(chunk_size) == chunk_size
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(
            f"`chunk_size` must be a positive int or None, got {type(chunk_size).__name__} "
            f"{chunk_size!r}"
        )
    if chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size}")


def _static_float(x, name: str) -> float:
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"`{name}` must be a Python float (a static configuration value), got "
            f"{type(x).__name__}"
        ) from None


def _check_head(Z, W, labels, bias, weights, reduction, chunk_size, label_smoothing, z_loss):
    check_reduction(reduction)
    _check_chunk_size(chunk_size)
    ls = _static_float(label_smoothing, "label_smoothing")
    zl = _static_float(z_loss, "z_loss")
    if not 0.0 <= ls < 1.0:
        raise ValueError(f"`label_smoothing` must lie in [0, 1), got {ls}")
    if not zl >= 0.0:
        raise ValueError(f"`z_loss` must be >= 0, got {zl}")
    Z, W = check_linear(Z, W)
    labels = as_array(labels, "labels")
    n, k = Z.shape[0], W.shape[1]
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"`labels` must have an integer dtype, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(
            f"`labels` must have shape (N,) = ({n},) to match `Z` {tuple(Z.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    check_labels_values(labels, k, "labels")
    if bias is not None:
        bias = as_array(bias, "bias")
        check_float(bias, "bias")
        if bias.shape != (k,):
            raise ValueError(
                f"`bias` must have shape (K,) = ({k},) to match `W` {tuple(W.shape)}, "
                f"got {tuple(bias.shape)}"
            )
    weights = check_weights(weights, n)
    return Z, W, labels, bias, weights, ls, zl


@functools.partial(jax.jit, static_argnames=("cfg",))
def _impl(Z, W, labels, bias, weights, *, cfg: _Config):
    cdt = _cdt(W)
    # Cast outside the custom_vjp: a floating weight's gradient flows back through the cast.
    s = jnp.ones(labels.shape, cdt) if weights is None else weights.astype(cdt)
    return _lce(Z, W, bias, labels.astype(jnp.int32), s, cfg)


def linear_cross_entropy(
    Z: ArrayLike,
    W: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> jax.Array:
    r"""Fused linear + softmax cross-entropy head with a hand-written gradient.

    The loss of ``softmax(Z W + b)`` against integer labels, without the ``(N, K)`` logits ever
    being held when ``chunk_size`` is set. Per sample, with logits ``a_i = z_i W + b``:

    .. math::

        \ell_i = \operatorname{lse}(a_i) - \sum_k t_{ik}\, a_{ik}
                 + \lambda_z \operatorname{lse}(a_i)^2, \qquad
        t_i = (1 - \epsilon)\, \mathrm{onehot}(y_i) + \epsilon / K

    where ``lse`` is the max-shifted log-sum-exp (finite for logits of any magnitude),
    ``ε = label_smoothing`` (in closed form: ``Σ_k t_ik a_ik = (1 − ε) a_{i,y_i} + ε mean_k a_ik``)
    and ``λ_z = z_loss``. With ``ε = λ_z = 0`` this is eq. (2) with one-hot targets. The gradient is
    eq. (6) carried to the head's inputs, with ``c_i = ∂L/∂ℓ_i`` (``s_i``, or ``s_i / Σ s`` for the
    mean) and ``Ŷ = softmax(A)``:

    .. math::

        G = \operatorname{diag}(c) \big[\operatorname{diag}(1 + 2 \lambda_z\,
            \operatorname{lse})\, \hat Y - T\big], \qquad
        \frac{\partial L}{\partial Z} = G W^\top, \quad
        \frac{\partial L}{\partial W} = Z^\top G, \quad
        \frac{\partial L}{\partial b} = \sum_i G_i .

    It is a ``jax.custom_vjp``: no autodiff of the inner loss (reverse mode only; forward-mode
    ``jax.jvp``/``jacfwd`` through it is not supported). The rows are processed ``chunk_size`` at a
    time in a ``lax.fori_loop`` (``N`` need not be a multiple), and within a chunk the classes in
    blocks, so the live temporaries are one ``(chunk_size, K)`` logits chunk, a few
    ``(chunk_size, 2048)`` and ``(D, 2048)`` blocks, and the ``(D, K)`` accumulator of ``∂L/∂W``.
    For ``"sum"``/``"mean"`` the gradients are accumulated during the forward pass (three GEMMs in
    all, as the unfused loss) and the backward pass scales them by the cotangent; gradients of
    inputs that are not differentiated (e.g. ``Z`` when only the head is trained) are skipped. For
    ``"none"`` the backward pass recomputes the logits chunk by chunk with the per-sample
    cotangents. ``W`` is never padded, copied or cast by this function (XLA:CPU itself computes
    bf16/f16 GEMMs in float32 and may convert ``W``; GPUs do not).

    Args:
      Z: features (the last hidden layer), shape ``(N, D)``, floating.
      W: head weights, shape ``(D, K)``, floating. The GEMMs run in ``W``'s dtype (``Z`` chunks
        are cast to it) and accumulate in float32 at least.
      labels: integer class labels, shape ``(N,)``, in ``[0, K)``. No gradient.
      bias: optional bias ``b``, shape ``(K,)``.
      weights: optional per-sample weights ``s`` (a mask or non-negative reals), shape ``(N,)``.
        Floating weights get their exact gradient; integer/boolean masks none.
      reduction: ``"mean"`` (``Σ s_i ℓ_i / Σ s_i``; 0 when all weights are zero), ``"sum"``
        (``Σ s_i ℓ_i``) or ``"none"`` (``s_i ℓ_i``, shape ``(N,)``).
      chunk_size: rows per chunk (a positive int), or ``None`` for one chunk of all ``N`` rows.
        Temporaries scale as ``chunk_size × K``: 1024 at ``K = 32768`` in float32 holds 128 MiB
        of logits where the unfused loss holds ``N × K`` twice over.
      label_smoothing: ``ε`` in ``[0, 1)``, a static Python float.
      z_loss: ``λ_z ≥ 0``, the weight of the ``lse²`` penalty (PaLM), a static Python float.

    Returns:
      The loss: a scalar, or ``(N,)`` for ``reduction="none"``, in the compute dtype (``W``'s
      dtype, float32 for bfloat16/float16). Gradients come back in each input's own dtype.

    Raises:
      ValueError: wrong ranks or shapes (``Z`` vs ``W``, ``labels``, ``bias``, ``weights``), an
        unknown ``reduction``, ``chunk_size <= 0``, ``label_smoothing`` outside ``[0, 1)``,
        ``z_loss < 0``, negative weights, or labels outside ``[0, K)`` (checked when the values
        are concrete; under ``jax.jit`` such a sample's loss and gradient rows are NaN).
      TypeError: non-floating ``Z``/``W``/``bias``, non-integer ``labels``, a non-int
        ``chunk_size`` or a traced ``label_smoothing``/``z_loss``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, softmax_jax as sj
      >>> Z = jax.random.normal(jax.random.key(0), (10, 8)); W = jnp.zeros((8, 5))
      >>> y = jnp.arange(10) % 5
      >>> float(sj.linear_cross_entropy(Z, W, y, chunk_size=4))  # uniform over 5 classes: log 5
      1.609437...

      As the last layer of a model, trained with optax (the head's gradient flows into ``W1``):

      >>> def model_loss(params, x, y):
      ...     h = jax.nn.relu(x @ params["W1"])
      ...     return sj.linear_cross_entropy(h, params["W2"], y, bias=params["b"], chunk_size=4)
      >>> x = jax.random.normal(jax.random.key(1), (10, 3))
      >>> params = {"W1": jnp.ones((3, 8)) / 8, "W2": W, "b": jnp.zeros(5)}
      >>> opt = optax.adam(1e-2); state = opt.init(params)
      >>> loss, grads = jax.value_and_grad(model_loss)(params, x, y)
      >>> updates, state = opt.update(grads, state)
      >>> params = optax.apply_updates(params, updates)
      >>> bool(model_loss(params, x, y) < loss)
      True

    References:
      Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024); Hsu et al.,
      "Liger Kernel: Efficient Triton Kernels for LLM Training" (2024); Chowdhery et al., "PaLM"
      (2022) for the z-loss.
    """
    Z, W, labels, bias, weights, ls, zl = _check_head(
        Z, W, labels, bias, weights, reduction, chunk_size, label_smoothing, z_loss
    )
    n = Z.shape[0]
    chunk = max(1, n if chunk_size is None else min(int(chunk_size), n))
    cfg = _Config(reduction, chunk, _K_BLOCK, ls, zl)
    return _impl(Z, W, labels, bias, weights, cfg=cfg)
