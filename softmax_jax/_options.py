"""Argument checks of the fused vocabulary losses (the heads, log-probs, distillation).

The static options (``chunk_size``, ``label_smoothing``, ``z_loss``, ``ignore_index``,
``softcap``, ``weight_layout``, ``return_aux``, a temperature...) are Python values read at trace
time: each is checked eagerly and an error names the argument, what was expected and what came.
The labels that count (not ``ignore_index``, weight ≠ 0) are checked when their values are
concrete. The array checks these losses share with the core functions live in ``_validate``.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import numpy as np

from ._validate import is_concrete, label_masks


def is_int(x: Any) -> bool:
    """A Python or NumPy integer (``bool`` excluded)."""
    try:
        return not isinstance(x, bool) and operator.index(x) == x
    except TypeError:
        return False


def static_float(x: Any, name: str) -> float:
    """``float(x)``, or a ``TypeError`` naming ``name`` when ``x`` is traced (a static option)."""
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"`{name}` must be a Python float (a static configuration value), got "
            f"{type(x).__name__}"
        ) from None


def check_chunk_size(chunk_size: Any) -> None:
    """Rows per chunk: a positive int, ``"auto"`` or ``None``."""
    if chunk_size is None or (isinstance(chunk_size, str) and chunk_size == "auto"):
        return
    if not is_int(chunk_size):
        raise TypeError(
            f"`chunk_size` must be a positive int, 'auto' or None, got "
            f"{type(chunk_size).__name__} {chunk_size!r}"
        )
    if chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be a positive int, 'auto' or None, got {chunk_size}")


def check_head_options(
    label_smoothing: Any, z_loss: Any, ignore_index: Any, softcap: Any, weight_layout: Any,
    return_aux: Any,
) -> tuple[float, float, int | None, float | None]:  # fmt: skip
    """The head's static options; returns ``(ε, λ_z, ignore_index, softcap)`` as Python numbers
    (``ε`` in ``[0, 1)``, ``λ_z ≥ 0``, ``softcap > 0`` or ``None``)."""
    ls = static_float(label_smoothing, "label_smoothing")
    zl = static_float(z_loss, "z_loss")
    if not 0.0 <= ls < 1.0:
        raise ValueError(f"`label_smoothing` must lie in [0, 1), got {ls}")
    if not zl >= 0.0:
        raise ValueError(f"`z_loss` must be >= 0, got {zl}")
    if ignore_index is not None:
        if not is_int(ignore_index):
            raise TypeError(
                f"`ignore_index` must be an int or None, got {type(ignore_index).__name__} "
                f"{ignore_index!r}"
            )
        ignore_index = int(ignore_index)
    if softcap is not None:
        softcap = static_float(softcap, "softcap")
        if not softcap > 0.0:
            raise ValueError(f"`softcap` must be a positive float or None, got {softcap}")
    if weight_layout not in ("dk", "kd"):
        raise ValueError(f"`weight_layout` must be 'dk' or 'kd', got {weight_layout!r}")
    if not isinstance(return_aux, bool):
        raise TypeError(f"`return_aux` must be a bool, got {type(return_aux).__name__}")
    return ls, zl, ignore_index, softcap


def check_counted_labels(labels: Any, weights: Any, k: int, ignore_index: int | None) -> None:
    """Labels ``(...)`` in ``[0, K)`` where they count (not ``ignore_index``, weight ≠ 0): checked
    when the values are concrete; under tracing such a row's loss and gradients are NaN."""
    if not is_concrete(labels) or labels.size == 0:
        return
    if weights is not None and not is_concrete(weights):
        return  # which rows count is known only at run time: NaN rows there, as under jit
    y = np.asarray(labels).reshape(-1)  # NumPy: under an outer jit, jnp ops would be traced
    ignored, in_range = label_masks(y, k, ignore_index)
    bad = ~(ignored | in_range)
    if weights is not None:
        bad &= np.asarray(weights).reshape(-1) != 0
    if not bad.any():
        return
    idx = int(np.flatnonzero(bad)[0])
    where = idx if labels.ndim == 1 else tuple(int(i) for i in np.unravel_index(idx, labels.shape))
    extra = "" if ignore_index is None else f" or ignore_index = {ignore_index}"
    stored = None if ignore_index is None else np.array(ignore_index).astype(y.dtype)
    if stored is not None and int(stored) != ignore_index:
        extra += f" (held as {int(stored)} in {y.dtype})"
    raise ValueError(
        f"`labels` must lie in [0, K) = [0, {k}){extra}, got {int(y[idx])} at index {where}"
    )
