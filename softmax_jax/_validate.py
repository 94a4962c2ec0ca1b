"""Eager argument checks shared by the public functions.

Static facts (rank, shape agreement, dtype) are checked here, at call or trace time, and raise
``ValueError``/``TypeError`` naming the argument, what was expected and what came instead. Value
checks (labels within ``[0, K)``, non-negative weights, finite targets) run only when the values
are concrete, i.e. outside ``jax.jit``/``jax.vmap`` tracing; under tracing see each function's
docstring for what happens to bad values. A value check of a device array is a reduction on the
device that brings back a few scalars (a flag, the first bad index, the value there), never the
array; arrays that are not fully addressable (multi-host) are not checked.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("sum", "mean", "none")
#: Concrete arrays on CPU devices up to this many elements are scanned by NumPy (the host's memory
#: already) rather than by a compiled scan, which costs a compilation per shape and dtype.
HOST_SCAN_MAX = 1 << 20


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values we can look at (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def as_array(x: Any, name: str) -> jax.Array:
    """Converts ``x`` to an array, with an error naming the argument if that is impossible."""
    if isinstance(x, jax.Array):
        return x
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, np.dtype) and (
        dtype.kind in "OSUMm" or (dtype.kind == "V" and not jnp.issubdtype(dtype, np.number))
    ):  # (bfloat16 and ml_dtypes' other floats are of kind "V" to NumPy)
        raise TypeError(
            f"`{name}` must be a numeric array, got {type(x).__name__} of dtype {dtype}"
        )
    if isinstance(x, np.ndarray | np.generic):
        # cast to JAX's dtype on the host and copied: jnp.asarray compiles a program per shape
        return jax.device_put(x)
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}: {first}") from None


def check_reduction(reduction: str, *, allow_none: bool = True) -> None:
    allowed = REDUCTIONS if allow_none else tuple(r for r in REDUCTIONS if r != "none")
    if reduction not in allowed:
        raise ValueError(
            f"`reduction` must be one of {', '.join(repr(r) for r in allowed)}, got {reduction!r}"
        )


def check_float(x: jax.Array, name: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating dtype, got {x.dtype}")


def check_rank(x: jax.Array, name: str, rank: int, shape_doc: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"`{name}` must have shape {shape_doc}, got {tuple(x.shape)}")


def compute_dtype(*dtypes: Any) -> np.dtype:
    """The accumulation dtype of floating inputs: float64 when one of them is float64 and x64 is
    on, else float32 (bf16/f16 accumulate in float32).

    Chosen by width, not by JAX's promotion lattice: it works under
    ``jax_numpy_dtype_promotion="strict"`` (where float32 with bfloat16 does not promote) and never
    asks JAX for a float64 it does not have (NumPy float64 input with x64 off is float32 work).
    """
    wide = any(np.dtype(d).itemsize >= 8 for d in dtypes)
    return np.dtype(np.float64 if wide and jax.config.jax_enable_x64 else np.float32)


def _checkable(x: Any) -> bool:
    """A non-empty array whose values this process can read: concrete and fully addressable."""
    if isinstance(x, jax.core.Tracer) or x.size == 0:
        return False
    return not isinstance(x, jax.Array) or x.is_fully_addressable


@functools.partial(jax.jit, static_argnames=("kind", "bound"))
def _scan(x: jax.Array, kind: Literal["finite", "range", "negative"], bound: int = 0):
    """``(any bad, first bad flat index, value there, min, max)`` of ``x``: five scalars."""
    flat = x.reshape(-1)
    if kind == "finite":
        bad = ~jnp.isfinite(flat)
    elif kind == "range":  # integers in [0, bound); the bound clipped to what the dtype holds
        bad = (flat < 0) | (flat > min(bound - 1, int(jnp.iinfo(x.dtype).max)))
    else:
        bad = flat < 0
    idx = jnp.argmax(bad)
    return jnp.any(bad), idx, flat[idx], jnp.min(flat), jnp.max(flat)


def _first_bad(x: Any, kind: str, bound: int = 0):
    """``None`` when ``x`` passes, else ``(flat index, value, min, max)`` as Python numbers.

    NumPy arrays and small arrays on CPU devices (:data:`HOST_SCAN_MAX`) are scanned on the host;
    other device arrays on their device (eagerly even inside an outer ``jax.jit`` trace, since
    ``x`` is concrete), bringing back five scalars: never a copy of an accelerator's array.
    """
    if (
        isinstance(x, jax.Array)
        and x.size <= HOST_SCAN_MAX
        and x.is_fully_addressable
        and all(d.platform == "cpu" for d in x.devices())
    ):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        v = x.astype(np.float32) if x.dtype == np.dtype(jnp.bfloat16) else x
        if kind == "finite":
            bad = ~np.isfinite(v)
        elif kind == "range":
            bad = (v < 0) | (v >= bound)
        else:
            bad = v < 0
        if not bad.any():
            return None
        idx = int(np.flatnonzero(bad)[0])
        return idx, v.flat[idx], v.min(), v.max()
    with jax.ensure_compile_time_eval():
        any_bad, idx, value, lo, hi = jax.device_get(_scan(x, kind, bound))
    if not any_bad:
        return None
    return int(idx), value, lo, hi


def check_labels_values(labels: jax.Array, num_classes: int, name: str = "labels") -> None:
    """Labels must lie in ``[0, K)``: checked only when the values are concrete."""
    if not _checkable(labels):
        return
    found = _first_bad(labels, "range", int(num_classes))
    if found is not None:
        idx, value, lo, hi = found
        raise ValueError(
            f"`{name}` must lie in [0, K) = [0, {num_classes}), got {int(value)} "
            f"at index {idx} (min {int(lo)}, max {int(hi)})"
        )


def check_weights(weights: Any, n: int, name: str = "weights") -> jax.Array | None:
    """Per-sample weights: shape (N,), floating or integer, finite and >= 0 when concrete."""
    if weights is None:
        return None
    weights = as_array(weights, name)
    if weights.ndim != 1 or weights.shape[0] != n:
        raise ValueError(f"`{name}` must have shape (N,) = ({n},), got {tuple(weights.shape)}")
    if jnp.issubdtype(weights.dtype, jnp.complexfloating):
        raise TypeError(
            f"`{name}` must be real (a mask or non-negative weights), got {weights.dtype}"
        )
    if _checkable(weights) and jnp.issubdtype(weights.dtype, jnp.number):
        if jnp.issubdtype(weights.dtype, jnp.floating):
            found = _first_bad(weights, "finite")
            if found is not None:
                raise ValueError(f"`{name}` must be finite, got {found[1]} at index {found[0]}")
        found = _first_bad(weights, "negative")
        if found is not None:
            raise ValueError(f"`{name}` must be >= 0, got {float(found[1])} at index {found[0]}")
    return weights


def check_finite(x: jax.Array, name: str) -> None:
    """Rejects NaN/inf in a concrete floating array, naming the first offending index."""
    if not _checkable(x) or not jnp.issubdtype(x.dtype, jnp.floating):
        return
    found = _first_bad(x, "finite")
    if found is not None:
        idx = np.unravel_index(found[0], x.shape)
        raise ValueError(
            f"`{name}` must be finite, got {found[1]} at index {tuple(int(i) for i in idx)}"
        )


def check_linear(Z: Any, W: Any) -> tuple[jax.Array, jax.Array]:
    """Features ``Z`` (N, D) and weights ``W`` (D, K): floating, agreeing on D, with K >= 1."""
    Z, W = as_array(Z, "Z"), as_array(W, "W")
    check_rank(Z, "Z", 2, "(N, D)")
    check_rank(W, "W", 2, "(D, K)")
    check_float(Z, "Z")
    check_float(W, "W")
    (_, d), (d_w, k) = Z.shape, W.shape
    if d != d_w:
        raise ValueError(
            f"`Z` and `W` must agree on the feature dimension D: `Z` has shape {tuple(Z.shape)} "
            f"(D={d}) but `W` has shape {tuple(W.shape)} (D={d_w})"
        )
    if k < 1:
        raise ValueError(f"`W` must have at least one class column, got shape {tuple(W.shape)}")
    return Z, W


def check_problem(W: Any, Z: Any, Y: Any, weights: Any, reduction: str, *, allow_none: bool = True):
    """Validates the ``(W, Z, Y, weights, reduction)`` arguments of eq. (2).

    Returns ``(W, Z, Y, weights, int_labels)`` as arrays, where ``int_labels`` says whether ``Y``
    holds (N,) integer labels (True) or (N, K) targets (False).
    """
    check_reduction(reduction, allow_none=allow_none)
    Z, W = check_linear(Z, W)
    Y = as_array(Y, "Y")
    n, k = Z.shape[0], W.shape[1]
    if Y.ndim == 1:
        if not jnp.issubdtype(Y.dtype, jnp.integer):
            raise TypeError(
                f"`Y` of shape (N,) is read as integer class labels and must have an integer dtype, "
                f"got {Y.dtype}; pass (N, K) targets for soft labels"
            )
        if Y.shape[0] != n:
            raise ValueError(
                f"`Y` (labels) must have shape (N,) = ({n},) to match `Z` {tuple(Z.shape)}, "
                f"got {tuple(Y.shape)}"
            )
        check_labels_values(Y, k, "Y")
        int_labels = True
    elif Y.ndim == 2:
        if Y.shape != (n, k):
            raise ValueError(
                f"`Y` (targets) must have shape (N, K) = ({n}, {k}) to match `Z` {tuple(Z.shape)} "
                f"and `W` {tuple(W.shape)}, got {tuple(Y.shape)}"
            )
        if jnp.issubdtype(Y.dtype, jnp.complexfloating):
            raise TypeError(f"`Y` must be real, got {Y.dtype}")
        check_finite(Y, "Y")
        int_labels = False
    else:
        raise ValueError(
            f"`Y` must be (N,) integer labels or (N, K) targets, got shape {tuple(Y.shape)}"
        )
    weights = check_weights(weights, n)
    return W, Z, Y, weights, int_labels


def check_training_data(
    Z: Any,
    y: Any,
    *,
    sample_weight: Any = None,
    num_classes: int | None = None,
    min_classes: int = 2,
    z_name: str = "Z",
    y_name: str = "y",
    finite: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Host-side checks of a training set ``(Z, y)`` for :func:`softmax_jax.fit`.

    ``Z`` must be a non-empty ``(N, D)`` real array of finite values, ``y`` ``(N,)`` integer class
    indices ``>= 0`` (and ``< num_classes`` when given) with at least ``min_classes`` (2) classes, and
    ``sample_weight`` finite, ``>= 0`` with a positive sum.
    A ``scipy.sparse`` ``Z`` is returned as a canonical CSR matrix (:func:`check_sparse`), never
    densified.

    Returns:
      ``(Z, y, sample_weight, K)`` as NumPy arrays (``Z`` floating, ``y`` int32) and the number of
      classes ``K`` (``num_classes``, or ``max(y) + 1``). With ``finite=False`` the values of ``Z``
      are neither read nor converted (``Z`` as given: the caller checks the rows it reads).
    """
    sparse = is_sparse(Z)
    if sparse:  # a canonical CSR, never densified
        Zh = check_sparse(Z, z_name, in_memory=finite)
    else:
        check_mapped(Z, z_name)
        Zh = as_host_array(Z, z_name)
    yh = as_host_array(y, y_name)
    if Zh.ndim != 2:
        raise ValueError(f"`{z_name}` must have shape (N, D), got {Zh.shape}")
    is_bf16 = Zh.dtype == np.dtype(jnp.bfloat16)
    if Zh.dtype.kind not in "fiub" and not is_bf16:
        raise TypeError(f"`{z_name}` must be a real numeric array, got dtype {Zh.dtype}")
    if Zh.shape[0] == 0 or Zh.shape[1] == 0:
        raise ValueError(
            f"`{z_name}` must have at least one sample and one feature, got shape {Zh.shape}"
        )
    if Zh.dtype.kind != "f" and not is_bf16 and finite:
        Zh = Zh.astype(np.float64 if jax.config.jax_enable_x64 else np.float32)
    if yh.ndim != 1 or yh.shape[0] != Zh.shape[0]:
        raise ValueError(
            f"`{y_name}` must have shape (N,) = ({Zh.shape[0]},) to match `{z_name}` "
            f"{Zh.shape}, got {yh.shape}"
        )
    if yh.dtype.kind not in "iu":
        raise TypeError(f"`{y_name}` must hold integer class indices, got dtype {yh.dtype}")
    if num_classes is not None:
        check_int(num_classes, "num_classes", minimum=1)
    if finite and not sparse:
        check_finite(Zh, z_name)
    found = _first_bad(yh, "negative" if num_classes is None else "range", int(num_classes or 0))
    if found is not None:
        hi = "" if num_classes is None else f" and < num_classes = {num_classes}"
        raise ValueError(f"`{y_name}` must be >= 0{hi}, got {int(found[1])} at index {found[0]}")
    k = int(yh.max()) + 1 if num_classes is None else int(num_classes)
    present = np.unique(yh)
    if present.size < min_classes:
        raise ValueError(
            f"`{y_name}` must contain at least {min_classes} classes to train a classifier, got "
            f"only class {int(present[0])}"
        )
    sw = None
    if sample_weight is not None:
        sw = np.asarray(check_weights(sample_weight, Zh.shape[0], "sample_weight"), np.float64)
        if not sw.sum() > 0:
            raise ValueError("`sample_weight` must have a positive sum, got all zeros")
    return Zh, yh.astype(np.int32), sw, k


def as_host_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a NumPy array of numbers, or a ``TypeError`` naming ``name`` and the type given
    (a scipy.sparse matrix, a string, a ragged list, objects)."""
    if hasattr(x, "tocsr") or isinstance(x, str | bytes | dict | set):  # sparse / not an array
        raise TypeError(
            f"`{name}` must be a dense array (NumPy, JAX or a nested list), got {type(x).__name__}"
        )
    try:
        out = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}: {e}") from None
    if out.dtype.kind in "OSUVMmc":
        raise TypeError(
            f"`{name}` must be a real numeric array, got {type(x).__name__} of dtype {out.dtype}"
        )
    return out


def check_int(value: Any, name: str, *, minimum: int | None = None, optional: bool = False):
    """An integer argument (Python or NumPy, never ``bool``) ``>= minimum``; ``None`` when
    ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"`{name}` must be an integer{' or None' if optional else ''}, got "
            f"{type(value).__name__} {value!r}"
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_real(value: Any, name: str, *, minimum: float | None = None, strict: bool = False,
               optional: bool = False):  # fmt: skip
    """A finite real argument (never ``bool``) ``>= minimum`` (``> minimum`` when ``strict``)."""
    if value is None and optional:
        return None
    if isinstance(value, jax.Array) and value.ndim == 0 and is_concrete(value):
        value = value.item()
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, int | float | np.number)
        or (isinstance(value, complex | np.complexfloating))
    ):
        want = "a real number" + (" or None" if optional else "")
        raise TypeError(f"`{name}` must be {want}, got {type(value).__name__} {value!r}")
    v = float(value)
    if not np.isfinite(v) or (minimum is not None and (v <= minimum if strict else v < minimum)):
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"`{name}` must be a finite number{bound}, got {value!r}")
    return v


def check_fit_options(
    *, epochs, batch_size, learning_rate, l2, num_classes, seed, tol, checkpoint_every,
    max_to_keep,
) -> None:  # fmt: skip
    """The scalar options of :func:`softmax_jax.fit`: types and ranges, each error naming its
    argument (``batch_size=True`` is not a batch of 1, ``learning_rate="fast"`` not a float)."""
    check_int(epochs, "epochs", minimum=0)
    check_int(batch_size, "batch_size", minimum=1, optional=True)
    if learning_rate is not None and not callable(learning_rate):
        check_real(learning_rate, "learning_rate", minimum=0.0, strict=True)
    check_real(l2, "l2", minimum=0.0)
    check_int(num_classes, "num_classes", minimum=2, optional=True)
    check_int(seed, "seed")
    check_real(tol, "tol", minimum=0.0, optional=True)
    check_int(checkpoint_every, "checkpoint_every", minimum=1)
    check_int(max_to_keep, "max_to_keep", minimum=1)


def check_mapped(Z: Any, name: str = "Z") -> None:
    """A memory-mapped ``Z`` whose file still holds every byte it mapped: reading past the end
    of a file truncated after it was opened would kill the process (SIGBUS)."""
    filename = getattr(Z, "filename", None)
    if not isinstance(Z, np.memmap) or not isinstance(filename, str | os.PathLike):
        return
    filename = os.fspath(filename)
    need = int(getattr(Z, "offset", 0)) + Z.nbytes
    try:
        size = os.path.getsize(filename)
    except OSError as e:
        raise ValueError(
            f"`{name}`: its memory-mapped file {filename} cannot be read: {e}"
        ) from None
    if size < need:
        raise ValueError(
            f"`{name}`: its memory-mapped file {filename} is {size} bytes, shorter than the {need} "
            "it held when opened (truncated while in use); reading it would crash the process"
        )


# scipy.sparse features ------------------------------------------------------------------------


def is_sparse(x: Any) -> bool:
    """True for a ``scipy.sparse`` matrix or array (scipy itself is imported only if it already
    is: a sparse ``x`` implies it)."""
    import sys

    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and sparse.issparse(x)


def check_sparse(x: Any, name: str, *, in_memory: bool = True):
    """A ``scipy.sparse`` ``x`` (N, D) as a canonical CSR matrix of floats (the caller's ``x`` is
    never modified).

    CSR and CSC are taken as they are (explicit zeros kept, unsorted indices allowed), other
    formats (COO, BSR, DOK, LIL, DIA) converted; duplicate entries are summed (scipy's meaning of
    them), integer/bool values become float64 (float32 without x64), float16 float32. Rejects
    NaN/inf values naming the first one's ``(row, column)``, and ``in_memory=False`` (the rows
    would be streamed: ``stream=True`` and multi-process meshes take dense arrays)."""
    import scipy.sparse as sp

    if not in_memory:
        raise ValueError(
            f"`{name}` as a scipy.sparse matrix must be trained in memory, got one with "
            "stream=True (or a multi-process mesh): pass a dense array or memmap to stream"
        )
    if x.ndim != 2:
        raise ValueError(f"`{name}` must have shape (N, D), got {x.shape}")
    dt = np.dtype(x.dtype)
    if dt.kind not in "fiub":
        raise TypeError(f"`{name}` must hold real numbers, got a sparse matrix of dtype {dt}")
    if dt.kind != "f":
        dt = np.dtype(np.float64 if jax.config.jax_enable_x64 else np.float32)
    elif dt.itemsize < 4:
        dt = np.dtype(np.float32)
    fmt = x.format
    X = sp.csr_matrix(x if fmt in ("csr", "csc") else x.tocsr(), dtype=dt, copy=False)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()  # sorts the indices too
    bad = ~np.isfinite(X.data)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(X.indptr, j, side="right") - 1)
        raise ValueError(
            f"`{name}` must be finite, got {X.data[j]} at index ({row}, {int(X.indices[j])})"
        )
    return X


def label_masks(labels: Any, num_classes: int, ignore_index: int | None, xp: Any = np):
    """``(ignored, in_range)`` of integer labels, compared in their own dtype (``xp`` is NumPy
    for concrete checks, ``jax.numpy`` under tracing: both give the same masks). A label is
    ignored when it holds ``ignore_index`` as that dtype stores it (``-100`` in ``uint16`` is
    65436, its bit pattern), and in range when ``0 ≤ y < K`` — no wrap-around through a
    narrower dtype, so every integer dtype, signed or unsigned, 8 to 64 bits, agrees."""
    dtype = np.dtype(labels.dtype)
    info = np.iinfo(dtype)
    if ignore_index is None:
        ignored = xp.zeros(labels.shape, bool)
    else:
        ignored = labels == xp.asarray(np.array(ignore_index).astype(dtype), dtype)
    in_range = labels >= 0 if info.min < 0 else xp.ones(labels.shape, bool)
    if num_classes <= info.max:
        in_range = in_range & (labels < xp.asarray(num_classes, dtype))
    return ignored, in_range


@jax.jit
def _all_finite(leaves) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_result(result: Any, *, W: jax.Array, Z: jax.Array) -> Any:
    """``result`` of a concrete call, or a ``ValueError`` when it holds NaN/inf: naming the first
    non-finite input (``Z`` or ``W``), else the overflow of the logits. One reduction on the
    device and one flag brought back; traced results (under ``jax.jit``) are returned as they are.
    """
    leaves = [x for x in jax.tree.leaves(result) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves or not all(_checkable(x) for x in leaves):
        return result
    if bool(jax.device_get(_all_finite(leaves))):
        return result
    check_finite(Z, "Z")
    check_finite(W, "W")
    raise ValueError(
        f"the result is not finite: `Z` @ `W` overflows {leaves[0].dtype} (max |Z| "
        f"{float(jnp.max(jnp.abs(Z))):.3g}, max |W| {float(jnp.max(jnp.abs(W))):.3g}); scale the "
        "features or weights, or use float64 (jax_enable_x64)"
    )
