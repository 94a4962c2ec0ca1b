"""The reusable head: fused linear + softmax cross-entropy that never holds the (N, K) logits.

``linear_cross_entropy(Z, W, labels)`` is the loss of ``softmax(Z W + b)`` against integer labels,
differentiated by the hand-written gradient of eq. (6) carried to the head's inputs (``_fused``:
forward and reverse mode). The per-chunk math lives in ``_kernel``, where it runs (one device or
a mesh, from the inputs' shardings) in ``_shard``; this module checks the arguments, applies
``ignore_index`` and the weights, and picks the rows per chunk. The vocabulary losses
(``_logprobs``, ``_distill``) share its :func:`prepare` and :func:`rows_per_chunk`.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from . import _fused, _kernel, _shard
from ._options import check_chunk_size, check_counted_labels, check_head_options
from ._precision import acc_dtype
from ._validate import as_array, check_float, check_reduction, is_concrete, label_masks

#: ``chunk_size="auto"``: a chunk's logits ``(rows, K)`` as large as the hidden-state block
#: ``(N, D)`` it comes from (Liger-Kernel's rule: rows = N / ⌈K / D⌉, to a power of two), raised
#: to GEMM_ROWS rows where N allows at most MAX_CHUNKS chunks of them (each chunk adds a pass over
#: the (D, K) gradient, whose GEMM contracts over the chunk's rows: short chunks run it below full
#: speed), at least MIN_ROWS rows, and its float32 logits at most LOGITS_BUDGET bytes.
MIN_ROWS = 64
GEMM_ROWS = 1024
MAX_CHUNKS = 8
LOGITS_BUDGET = 256 * 2**20


class CrossEntropyAux(NamedTuple):
    """The by-products of the fused pass (``return_aux=True``); no gradient flows through them.

    Attributes:
      lse: the per-token log-sum-exp of the logits, shape ``(...)`` (``labels``' shape).
      predictions: the argmax class of each token (the first one on ties), ``(...)``, int32.
      accuracy: ``Σ_i s_i [predictions_i = y_i] / Σ_i s_i`` over the kept tokens (weights ``s``,
        ignored tokens excluded; 0 when none is kept), a scalar.
    """

    lse: jax.Array
    predictions: jax.Array
    accuracy: jax.Array


class _Prepared(NamedTuple):
    """Arguments checked, ready for the kernel (the heads' shared interface)."""

    Z: jax.Array  # (..., D)
    W: jax.Array  # (D, K) or (K, D)
    labels: jax.Array  # (...)
    bias: jax.Array | None
    weights: jax.Array | None  # (...)
    lead: tuple[int, ...]  # the leading shape of Z (labels' shape)
    spec: _kernel.Spec  # mesh fields unset; chunk 0 means "auto" (set per device count)
    chunk_size: int | str | None
    ignore_index: int | None


def prepare(Z, W, labels, bias, weights, reduction, chunk_size, label_smoothing, z_loss,
            ignore_index, softcap, weight_layout, return_aux) -> _Prepared:  # fmt: skip
    """Checks every argument of the heads (the leading dims stay: each device flattens its own
    rows, so any sharding of them works)."""
    check_reduction(reduction)
    check_chunk_size(chunk_size)
    ls, zl, ignore_index, softcap = check_head_options(
        label_smoothing, z_loss, ignore_index, softcap, weight_layout, return_aux
    )
    Z, W = as_array(Z, "Z"), as_array(W, "W")
    w_doc = "(D, K)" if weight_layout == "dk" else "(K, D)"
    if Z.ndim < 1:
        raise ValueError(f"`Z` must have shape (..., D), got {tuple(Z.shape)}")
    if W.ndim != 2:
        raise ValueError(
            f"`W` must have shape {w_doc} (weight_layout={weight_layout!r}), got {tuple(W.shape)}"
        )
    check_float(Z, "Z")
    check_float(W, "W")
    d, k = W.shape if weight_layout == "dk" else W.shape[::-1]
    if Z.shape[-1] != d:
        raise ValueError(
            f"`Z` and `W` must agree on the feature dimension D: `Z` has shape {tuple(Z.shape)} "
            f"(D={Z.shape[-1]}) but `W` {w_doc} (weight_layout={weight_layout!r}) has shape "
            f"{tuple(W.shape)} (D={d})"
        )
    if k < 1:
        raise ValueError(f"`W` must have at least one class, got shape {tuple(W.shape)}")
    lead = tuple(Z.shape[:-1])
    labels = as_array(labels, "labels")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"`labels` must have an integer dtype, got {labels.dtype}")
    if tuple(labels.shape) != lead:
        raise ValueError(
            f"`labels` must have shape (...) = {lead} (the leading dimensions of `Z` "
            f"{tuple(Z.shape)}), got {tuple(labels.shape)}"
        )
    if bias is not None:
        bias = as_array(bias, "bias")
        check_float(bias, "bias")
        if bias.shape != (k,):
            raise ValueError(
                f"`bias` must have shape (K,) = ({k},) to match `W` {tuple(W.shape)}, "
                f"got {tuple(bias.shape)}"
            )
    if weights is not None:
        weights = as_array(weights, "weights")
        if tuple(weights.shape) != lead:
            raise ValueError(
                f"`weights` must have shape (...) = {lead} (`labels`' shape), got "
                f"{tuple(weights.shape)}"
            )
        if jnp.issubdtype(weights.dtype, jnp.complexfloating):
            raise TypeError(f"`weights` must be real (a mask or weights), got {weights.dtype}")
        if is_concrete(weights) and weights.size:
            w = np.asarray(weights, np.float64).reshape(-1)
            if not np.all(np.isfinite(w)):
                idx = int(np.flatnonzero(~np.isfinite(w))[0])
                raise ValueError(f"`weights` must be finite, got {w[idx]} at flat index {idx}")
            if np.any(w < 0):
                idx = int(np.flatnonzero(w < 0)[0])
                raise ValueError(f"`weights` must be >= 0, got {w[idx]} at flat index {idx}")
    check_counted_labels(labels, weights, k, ignore_index)
    spec = _kernel.Spec(reduction, 0, _kernel.K_BLOCK, ls, zl, softcap, weight_layout, k,
                        return_aux)  # fmt: skip
    return _Prepared(Z, W, labels, bias, weights, lead, spec, chunk_size, ignore_index)


def rows_per_chunk(
    chunk_size, n: int, k: int, d: int | None = None, *, gemm_rows: int = GEMM_ROWS
) -> int:
    """The static rows per chunk of ``n`` rows (per device): ``chunk_size``, all rows (``None``)
    or, for ``"auto"``, the power of two ≥ ``max(n / ⌈k / d⌉, min(GEMM_ROWS, n / MAX_CHUNKS))``
    clamped to ``[MIN_ROWS, LOGITS_BUDGET / (4 k)]`` (``d=None``: the largest within the
    budget; ``gemm_rows=MIN_ROWS``: Liger's rule alone, for losses holding several logits-sized
    blocks per chunk)."""
    if d is None and isinstance(chunk_size, str):
        d = n * k  # no hidden-state bound: the budget alone
    if chunk_size is None:
        rows = n
    elif isinstance(chunk_size, str):
        share = max(1, n // max(1, -(-k // max(d, 1))), min(gemm_rows, -(-n // MAX_CHUNKS)))
        rows = 1 << (share - 1).bit_length()
        cap = max(1, LOGITS_BUDGET // (4 * max(k, 1)))
        rows = min(max(rows, MIN_ROWS), 1 << (cap.bit_length() - 1))
    else:
        rows = int(chunk_size)
    return max(1, min(rows, n))


# --------------------------------------------------------------------------------------------
# The call: weights and ignore_index outside the custom rules, aux, leading dims.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("spec", "ignore_index", "lead"))
def call(Z, W, labels, bias, weights, *, spec, ignore_index, lead):
    """Runs the kernel on prepared arguments (shared by both heads; ``spec`` says where)."""
    acc = acc_dtype(W.dtype)
    # Masks in the labels' own dtype, then int32 (-1 for a label outside [0, K)).
    ignored, in_range = label_masks(labels, spec.num_classes, ignore_index, jnp)
    labels = jnp.where(in_range, labels.astype(jnp.int32), -1)
    # Casts outside the custom rules: the gradients of floating weights and of the bias flow back
    # through them into the inputs' dtypes.
    s = jnp.ones(labels.shape, acc) if weights is None else weights.astype(acc)
    bias = None if bias is None else bias.astype(acc)
    s = jnp.where(ignored, jnp.zeros((), acc), s)
    out = _fused.fused(Z, W, bias, labels, s, spec)
    loss = out[0] if spec.aux else out
    if not spec.aux:
        return loss
    lse, pred = (jax.lax.stop_gradient(x) for x in out[1:])
    s = jax.lax.stop_gradient(s)
    total = jnp.sum(s)
    hits = jnp.sum(jnp.where(pred == labels, s, 0.0))
    accuracy = hits / jnp.where(total > 0, total, 1)
    return loss, CrossEntropyAux(lse, pred, accuracy)


def placed_spec(p: _Prepared, **where) -> _kernel.Spec:
    """The kernel spec of a prepared call: where it runs (:func:`_shard.layout_of` reading the
    inputs' shardings, or ``where`` = the sharded head's ``mesh``/``classes``/``rows``) and the
    rows per chunk of one device."""
    layout = _shard.layout_of(p.Z, p.W, p.bias, kaxis=_kernel.kaxis(p.spec.weight_layout), **where)
    n_local = _shard.local_rows(layout, p.lead)
    return p.spec._replace(
        chunk=rows_per_chunk(p.chunk_size, n_local, p.spec.num_classes, p.Z.shape[-1]),
        placement=layout,
    )


def dispatch(p: _Prepared, spec: _kernel.Spec):
    """:func:`call`; an eager call on a mesh of explicit axes runs inside ``jax.set_mesh``
    (JAX's explicit-sharding mode types the outputs from the mesh in context)."""
    layout = spec.placement
    traced = any(isinstance(x, jax.core.Tracer) for x in (p.Z, p.W, p.labels))
    if layout is not None and layout.explicit and isinstance(layout.mesh, Mesh) and not traced:
        with jax.set_mesh(layout.mesh):
            return call(p.Z, p.W, p.labels, p.bias, p.weights, spec=spec,
                        ignore_index=p.ignore_index, lead=p.lead)  # fmt: skip
    return call(
        p.Z, p.W, p.labels, p.bias, p.weights, spec=spec, ignore_index=p.ignore_index, lead=p.lead
    )


# --------------------------------------------------------------------------------------------
# The public wrapper.
# --------------------------------------------------------------------------------------------


def linear_cross_entropy(
    Z: ArrayLike,
    W: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    chunk_size: int | Literal["auto"] | None = "auto",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int | None = -100,
    softcap: float | None = None,
    weight_layout: Literal["dk", "kd"] = "dk",
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
    r"""Fused linear + softmax cross-entropy head with a hand-written gradient.

    The loss of ``softmax(Z W + b)`` against integer labels, without the ``(N, K)`` logits ever
    being held. Per token, with ``r_i = z_i W + b`` and logits ``a_i = r_i`` (or
    ``a_i = c tanh(r_i / c)`` with ``softcap = c``, Gemma 2):

    .. math::

        \ell_i = \operatorname{lse}(a_i) - \sum_k t_{ik}\, a_{ik}
                 + \lambda_z \operatorname{lse}(a_i)^2, \qquad
        t_i = (1 - \epsilon)\, \mathrm{onehot}(y_i) + \epsilon / K

    where ``lse`` is the max-shifted log-sum-exp, ``ε = label_smoothing``, ``λ_z = z_loss``; the
    target logit is read from the same logits block as the gradient, so ``ℓ_i ≥ 0``. With
    ``ε = λ_z = 0`` and no softcap this is eq. (2) with one-hot targets. The gradient is eq. (6)
    carried to the head's inputs, with ``c_i = ∂L/∂ℓ_i`` and ``Ŷ = softmax(a)``:

    .. math::

        G = \operatorname{diag}(c) \big[\operatorname{diag}(1 + 2 \lambda_z\,
            \operatorname{lse})\, \hat Y - T\big] \odot \big(1 - (a / c)^2\big), \quad
        \frac{\partial L}{\partial Z} = G W^\top, \quad
        \frac{\partial L}{\partial W} = Z^\top G, \quad
        \frac{\partial L}{\partial b} = \sum_i G_i

    (the last factor only with a softcap). For ``"sum"``/``"mean"`` a ``jax.custom_jvp`` whose
    tangent is ``⟨∂L/∂Z, Ż⟩ + ⟨∂L/∂W, Ẇ⟩ + ⟨∂L/∂b, ḃ⟩ + ⟨∂L/∂s, ṡ⟩``: ``jax.jvp``,
    ``jax.linearize``, ``jax.jacfwd``, ``jax.grad`` and their compositions (Hessian-vector
    products) all work; for ``"none"`` a ``jax.custom_vjp`` (reverse mode). Rows are
    processed ``chunk_size`` at a time in a ``lax.fori_loop`` and classes in blocks of 2048, so
    the live temporaries are one ``(chunk, K)`` logits chunk, a few ``(chunk, 2048)`` and
    ``(D, 2048)`` blocks and the ``∂L/∂W`` accumulator. For ``"sum"``/``"mean"`` the gradients
    are accumulated during the forward pass (three GEMMs, as the unfused loss); gradients of
    inputs that are not differentiated (``Z`` when only the head is trained, ``W`` when it is
    frozen) are skipped. For ``"none"`` the backward pass recomputes the logits chunk by chunk.
    ``chunk_size="auto"`` sizes a chunk's logits like the hidden-state block they come from
    (Liger-Kernel's rule), at least 64 rows, at most 64 MiB of float32 logits.

    Meshes: the shardings ``Z``, ``W``, the bias, labels and weights carry are read (concrete
    arrays, or the types of arrays on a mesh of explicit axes, ``jax.make_mesh``'s default) and
    the pass runs under ``jax.shard_map`` with them: rows (any leading dim) over data axes, the
    classes of ``W`` and the bias over model axes, ``W`` split along D (FSDP) gathered for the
    call; gradients come back sharded like their inputs. Inside a user's ``jax.shard_map`` it
    works on the local shards.

    Precision: GEMM operands in ``W``'s dtype (``Z`` and residual chunks are cast to it; ``W`` is
    never cast, padded or copied), accumulation in float32 at least, the mean's ``1 / Σ s``
    applied to the float32 GEMM results (never folded into a narrow operand).

    Sharding: when ``W``'s class axis is sharded over one mesh axis and that is known at trace
    time (a concrete array, or a mesh from ``jax.make_mesh`` with explicit axes), the
    class-sharded kernel of :func:`softmax_jax.sharded_linear_cross_entropy` runs (per-device
    logits ``(chunk, K/P)``, ``W`` never gathered). Inside ``jax.jit`` on an automatic-axis mesh
    the sharding of ``W`` is not known at trace time: call the sharded head there. With explicit
    axes, differentiate under ``jax.jit`` or inside ``jax.set_mesh(mesh)``, as JAX's explicit
    sharding mode asks of every function.

    Args:
      Z: features (the last hidden layer), shape ``(..., D)``, floating.
      W: head weights, ``(D, K)`` (``weight_layout="dk"``) or ``(K, D)`` (``"kd"``: a tied
        embedding table or ``eqx.nn.Linear.weight``, used through ``dot_general`` dimension
        numbers, never transposed); its gradient comes back in the same layout.
      labels: integer labels, shape ``(...)`` (``Z``'s leading shape), in ``[0, K)`` or equal to
        ``ignore_index``. No gradient.
      bias: optional ``b``, shape ``(K,)``.
      weights: optional per-token weights ``s`` (a mask or non-negative reals), shape ``(...)``.
        Floating weights get their exact gradient; integer/boolean masks none.
      reduction: ``"mean"`` (``Σ s_i ℓ_i / Σ s_i`` over the kept tokens; 0 when none is kept),
        ``"sum"`` (``Σ s_i ℓ_i``) or ``"none"`` (``s_i ℓ_i``, shape ``(...)``).
      chunk_size: rows per chunk (a positive int), ``None`` for one chunk of all rows, or
        ``"auto"`` (the default): the largest power of two whose float32 logits chunk
        ``(chunk, K)`` fits in 64 MiB (512 rows at ``K = 32768``; when class-sharded, each
        device holds its ``(chunk, K/P)`` part).
      label_smoothing: ``ε`` in ``[0, 1)``, a static Python float.
      z_loss: ``λ_z ≥ 0``, the weight of the ``lse²`` penalty (PaLM), a static Python float.
      ignore_index: a label value that contributes nothing (loss, gradients, the mean's
        denominator); ``-100`` by default (PyTorch's convention), ``None`` for none. A token of
        weight 0 contributes nothing either, whatever its label; an all-ignored batch gives 0
        and zero gradients.
      softcap: ``c > 0`` for logits ``c · tanh(r / c)`` inside the fused pass, or ``None``.
      weight_layout: ``"dk"`` or ``"kd"``, the layout of ``W``.
      return_aux: ``True`` returns ``(loss, aux)``, ``aux`` a :class:`CrossEntropyAux`
        (``lse``, ``predictions``, ``accuracy``) computed in the fused pass; no gradient flows
        through it.

    Returns:
      The loss: a scalar, or shape ``(...)`` for ``reduction="none"``, in the compute dtype
      (``W``'s, float32 for bfloat16/float16); ``(loss, aux)`` with ``return_aux``. Gradients come
      back in each input's dtype and shape.

    Raises:
      ValueError: wrong shapes (``Z`` vs ``W``, ``labels``, ``bias``, ``weights``), an unknown
        ``reduction`` or ``weight_layout``, ``chunk_size <= 0``, ``label_smoothing`` outside
        ``[0, 1)``, ``z_loss < 0``, ``softcap <= 0``, negative weights, or a counted label
        outside ``[0, K)`` (checked when the values are concrete; under ``jax.jit`` such a
        token's loss and gradient rows are NaN); a class-sharded ``W`` whose K is not divisible
        by its axis size.
      TypeError: non-floating ``Z``/``W``/``bias``, non-integer ``labels``/``ignore_index``, a
        non-int ``chunk_size`` or a traced ``label_smoothing``/``z_loss``/``softcap``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, softmax_jax as sj
      >>> Z = jax.random.normal(jax.random.key(0), (10, 8)); W = jnp.zeros((8, 5))
      >>> y = jnp.arange(10) % 5
      >>> float(sj.linear_cross_entropy(Z, W, y, chunk_size=4))  # uniform over 5 classes: log 5
      1.609437...

      A language model's tokens ``(B, T, D)``, padding labelled ``-100``, a tied ``(K, D)``
      embedding table:

      >>> h = jax.random.normal(jax.random.key(1), (2, 3, 8)); E = jnp.zeros((5, 8))
      >>> tok = jnp.array([[1, 2, -100], [3, -100, -100]])
      >>> loss, aux = sj.linear_cross_entropy(h, E, tok, weight_layout="kd", return_aux=True)
      >>> float(loss), aux.lse.shape
      (1.609437..., (2, 3))

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
      (2022) for the z-loss; Gemma Team, "Gemma 2" (2024) for the logit softcap.
    """
    with jax.named_scope("linear_cross_entropy"):
        p = prepare(Z, W, labels, bias, weights, reduction, chunk_size, label_smoothing,
                    z_loss, ignore_index, softcap, weight_layout, return_aux)  # fmt: skip
        spec = placed_spec(p)
        return dispatch(p, spec)
