"""The autodiff cross-check: the hand-written eq. (6) gradient against ``jax.grad`` of eq. (2)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ._grad import derivation_terms
from ._grad import grad as _hand_grad
from ._loss import loss as _loss
from ._validate import check_problem

# Default tolerances on the normwise relative error max|g − g_ref| / max|g_ref|, by input dtype.
# The reference sees the same rounded inputs, so these bound the algorithm's own error.
#  float64: unit roundoff 1.1e-16; summation over N and the cancellation in Ŷ − Y cost a few
#           digits (worst seen over the standard suite: 3e-16), 1e-12 leaves 3 orders of margin.
#  float32: unit roundoff 6e-8; worst seen 7e-7 (sums over N ≤ 256, |logits| ~ 1e4); 1e-5.
#  bfloat16: ``Ŷ − Y`` is rounded to bf16 (unit roundoff 3.9e-3) for the second GEMM, which
#           accumulates in float32; worst seen 4.8e-3, so 2e-2. float16 (roundoff 4.9e-4): 5e-3.
TOLERANCES = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


class GradCheckReport(NamedTuple):
    """Result of :func:`check_grad`.

    Attributes:
      case: free-form label of the problem.
      dtype: the input dtype checked.
      max_abs_err: ``max |g − g_ref|``.
      max_rel_err: ``max |g − g_ref|`` over the scale of the computation, ``max(max |g_ref|,
        max |Zᵀ diag(s) Ŷ|)`` (normwise: elementwise relative errors are meaningless where the
        gradient is near zero; see :func:`check_grad`).
      tol: the tolerance on ``max_rel_err``.
      passed: ``max_rel_err <= tol`` and both gradients finite.
    """

    case: str
    dtype: str
    max_abs_err: float
    max_rel_err: float
    tol: float
    passed: bool

    def __str__(self) -> str:
        status = "pass" if self.passed else "FAIL"
        return (
            f"{self.case}  {self.dtype}  abs={self.max_abs_err:.3e}  rel={self.max_rel_err:.3e}"
            f"  tol={self.tol:.0e}  {status}"
        )


def _reference_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def check_grad(
    W: ArrayLike,
    Z: ArrayLike,
    Y: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    reduction: str = "sum",
    tol: float | None = None,
    case: str = "",
    grad_fn: Callable[..., ArrayLike] | None = None,
) -> GradCheckReport:
    r"""Compares the hand-written gradient (eq. (6)) with ``jax.grad`` of the loss (eq. (2)).

    The hand-written :func:`softmax_jax.grad` runs in the inputs' dtype. The reference is
    ``jax.grad(softmax_jax.loss)`` on the *same* (already rounded) inputs cast to the widest float
    available (float64 when ``jax_enable_x64`` is on, else float32), so the error measured is the
    algorithm's, not the rounding of the inputs.

    .. math::

        \text{rel} = \frac{\max |g - g_{\text{ref}}|}
                           {\max\big(\max |g_{\text{ref}}|,\ \max |Z^\top \operatorname{diag}(s) \hat Y|\big)}

    The gradient is the difference of the two terms of eq. (4); near an optimum it cancels to ~0
    while rounding errors stay the size of the terms, so the error is measured against the larger
    of the gradient and the second term (both in the reduction's scale).

    Args:
      W: ``(D, K)``. Z: ``(N, D)``. Y: ``(N, K)`` targets or ``(N,)`` integer labels.
      weights: optional ``(N,)``. reduction: ``"sum"`` or ``"mean"``.
      tol: tolerance on the relative error; default by dtype (float64 1e-12, float32 1e-5,
        bfloat16 2e-2, float16 5e-3).
      case: a label carried into the report.
      grad_fn: the gradient to check, called as ``grad_fn(W, Z, Y, weights=, reduction=)``;
        default :func:`softmax_jax.grad`. Your own implementation of eq. (6) can be checked too.

    Returns:
      A :class:`GradCheckReport`.

    Examples:
      >>> import jax.numpy as jnp, softmax_jax as sj
      >>> W = jnp.zeros((3, 4)); Z = jnp.ones((2, 3)); y = jnp.array([0, 3])
      >>> sj.check_grad(W, Z, y).passed
      True
    """
    W, Z, Y, weights, _ = check_problem(W, Z, Y, weights, reduction, allow_none=False)
    dtype = W.dtype  # GEMM operands are in W's dtype (the precision policy): its tolerance
    g = (_hand_grad if grad_fn is None else grad_fn)(W, Z, Y, weights=weights, reduction=reduction)
    g = jnp.asarray(g)
    if g.shape != W.shape:
        raise ValueError(f"`grad_fn` must return the shape of `W` {tuple(W.shape)}, got {g.shape}")
    rdt = _reference_dtype()
    Yr = Y if jnp.issubdtype(Y.dtype, jnp.integer) else Y.astype(rdt)
    wr = None if weights is None else weights.astype(rdt)
    g_ref = jax.grad(lambda w: _loss(w, Z.astype(rdt), Yr, weights=wr, reduction=reduction))(
        W.astype(rdt)
    )
    g64 = np.asarray(g.astype(rdt), dtype=np.float64)
    r64 = np.asarray(g_ref, dtype=np.float64)
    abs_err = float(np.max(np.abs(g64 - r64))) if g64.size else 0.0
    second = np.asarray(
        derivation_terms(W.astype(rdt), Z.astype(rdt), Yr, weights=wr).second, np.float64
    )
    if reduction == "mean":
        total = float(Z.shape[0] if wr is None else np.sum(np.asarray(wr, np.float64)))
        second = second / total if total > 0 else np.zeros_like(second)
    scale = float(max(np.max(np.abs(r64)), np.max(np.abs(second)))) if r64.size else 0.0
    rel_err = abs_err / scale if scale > 0 else abs_err
    if tol is None:
        tol = TOLERANCES.get(np.dtype(dtype).name, 1e-4)
    finite = bool(np.isfinite(g64).all() and np.isfinite(r64).all())
    return GradCheckReport(
        case, np.dtype(dtype).name, abs_err, rel_err, float(tol), finite and rel_err <= tol
    )


# --------------------------------------------------------------------------- the standard suite

_SHAPES = ((1, 1, 2), (64, 16, 10), (256, 32, 100), (32, 8, 1000))
_LABELS = ("integer", "one-hot", "soft", "unnormalised")
LabelKind = Literal["integer", "one-hot", "soft", "unnormalised"]


def _rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded by the bits of a JAX PRNG key (raw ``uint32`` or typed)."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def random_problem(
    key: jax.Array,
    n: int,
    d: int,
    k: int,
    labels: LabelKind = "integer",
    weighted: bool = False,
    scale: float = 1.0,
    dtype: Any = "float64",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """A random problem ``(W, Z, Y, weights)``, drawn in float64 and rounded to ``dtype``.

    The values depend only on ``key`` and the sizes, not on whether x64 is on: they are drawn in
    float64 NumPy from a generator seeded by ``key``'s bits. ``W`` ``(D, K)`` is ``scale`` times
    standard normal, ``Z`` ``(N, D)`` standard normal, ``weights`` uniform in ``[0, 2)``. ``labels``:
    ``"integer"`` ``(N,)``, ``"one-hot"``, ``"soft"`` (rows on the simplex, ``softmax(3 ξ)``) or
    ``"unnormalised"`` (entries uniform in ``[0, 2)``: rows with arbitrary sums), all ``(N, K)``.
    float64 needs x64 on at the caller.
    """
    cast = np.dtype(dtype)
    if cast == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError("`dtype` float64 needs jax_enable_x64 on (e.g. `with jax.enable_x64():`)")
    if labels not in _LABELS:
        raise ValueError(f"`labels` must be one of {', '.join(map(repr, _LABELS))}, got {labels!r}")
    # drawn on the host: jax.random would compile a program per shape (seconds on 2 cores)
    rng = _rng(key)
    W = scale * rng.standard_normal((d, k))
    Z = rng.standard_normal((n, d))
    y = rng.integers(0, k, n).astype(np.int32)
    s = rng.uniform(0.0, 2.0, n) if weighted else None
    if labels == "integer":
        Y = y
    elif labels == "one-hot":
        Y = np.eye(k)[y]
    elif labels == "soft":  # softmax(3 ξ), max-shifted
        xi = rng.standard_normal((n, k))
        E = np.exp(3 * (xi - xi.max(axis=1, keepdims=True)))
        Y = E / E.sum(axis=1, keepdims=True)
    else:  # rows that do not sum to one: eq. (2) as written, still exactly differentiated
        Y = rng.uniform(0.0, 2.0, (n, k))
    rounded = [None if x is None else jnp.asarray(x.astype(cast)) for x in (W, Z, s)]
    Y = jnp.asarray(Y) if labels == "integer" else jnp.asarray(Y.astype(cast))
    return rounded[0], rounded[1], Y, rounded[2]


def standard_cases(
    seed: int = 0,
    dtypes: tuple[str, ...] = ("float64", "float32", "bfloat16", "float16"),
    *,
    quick: bool = False,
) -> Iterator[GradCheckReport]:
    """Runs :func:`check_grad` over sizes, label kinds, weights, reductions and dtypes.

    Problems come from :func:`random_problem` (drawn in float64, rounded to each dtype). Each check
    runs with x64 switched on for that check only, so the reference is float64 whatever the
    caller's configuration, and the caller's configuration is untouched between the reports.
    Includes an extreme-logit case (``|wᵀz| ~ 1e4``) where a naive softmax overflows. ``quick``
    keeps the two smallest sizes.
    """
    shapes = _SHAPES[:2] if quick else _SHAPES
    key = jax.random.PRNGKey(seed)
    cases = []
    for i, shape in enumerate(shapes):
        for j, labels in enumerate(_LABELS):
            cases.append((shape, labels, (i + j) % 2 == 1, "sum", 1.0))
    cases.append(((64, 16, 10), "integer", True, "mean", 1.0))
    cases.append(((64, 16, 10), "one-hot", False, "mean", 1.0))
    cases.append(((64, 16, 10), "integer", False, "sum", 2.5e3))  # |logits| ~ 1e4
    for i, ((n, d, k), labels, weighted, reduction, scale) in enumerate(cases):
        name = f"N={n} D={d} K={k} {labels}{' weighted' if weighted else ''} {reduction}"
        if scale != 1.0:
            name += " extreme"
        for dt in dtypes:
            # Entered and left around each check, never across a `yield`: a caller that stops
            # iterating (or is suspended between reports) does not run in float64.
            with jax.enable_x64(True):
                W, Z, Y, s = random_problem(
                    jax.random.fold_in(key, i), n, d, k, labels, weighted, scale, dt
                )
                report = check_grad(W, Z, Y, weights=s, reduction=reduction, case=name)
            yield report


def format_table(reports: list[GradCheckReport]) -> str:
    """Renders reports as an aligned text table."""
    header = ("case", "dtype", "max abs err", "max rel err", "tolerance", "pass")
    rows = [
        (
            r.case,
            r.dtype,
            f"{r.max_abs_err:.2e}",
            f"{r.max_rel_err:.2e}",
            f"{r.tol:.0e}",
            "yes" if r.passed else "NO",
        )
        for r in reports
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


__all__ = ["GradCheckReport", "check_grad", "format_table", "random_problem", "standard_cases"]
