r"""Prediction with trained parameters, and the model file that carries everything it needs.

:func:`predict` and :func:`predict_proba` apply ``fit``'s parameters ``{"W": (D, K), "b": (K,)}``
to features ``Z`` (N, D): ``Ŷ = softmax(Z W + b)`` row-wise, with the core's logits and max-shifted
log-sum-exp, in blocks of rows so that no more than a ``(chunk_size, K)`` block of logits is live.

A :class:`Model` adds what raw features need: the preprocessing (the training split's mean and
std, or none), the original class labels, and provenance (the softmax_jax version, optimizer, date,
data shape). :func:`save_model` writes it as an ``.npz`` archive of plain arrays and a JSON
header (no pickle); :func:`load_model` reads it back exactly.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import tempfile
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ._chunks import map_chunks
from ._loss import logits, logsumexp_rows
from ._sparse import predict_sparse
from ._validate import as_host_array, check_finite, check_sparse, is_concrete, is_sparse
from ._version import package_version

__all__ = ["Model", "ModelFileError", "load_model", "predict", "predict_proba", "save_model"]

#: The model file format this version writes; it reads formats ``1..MODEL_FORMAT``.
MODEL_FORMAT = 1

#: Rows of ``Z`` per block of prediction: at most a ``(CHUNK_ROWS, K)`` block of logits is live.
CHUNK_ROWS = 4096


class ModelFileError(ValueError):
    """A model file that cannot be read: a one-line message naming the file."""


# ---------------------------------------------------------------------------------------------
# Prediction from fit's parameters.


def _block_outputs(W, b, Zc, what: str):
    """The block's labels or probabilities, and whether each row's logits are finite."""
    A = logits(W, Zc)
    if b is not None:
        A = A + b.astype(A.dtype)
    finite = jnp.all(jnp.isfinite(A), axis=1)
    if what == "label":
        return jnp.argmax(A, axis=1).astype(jnp.int32), finite
    _, E, S = logsumexp_rows(A)
    return E / S, finite


@functools.partial(jax.jit, static_argnames=("chunk", "what"))
def _predict_rows(W, b, Z, *, chunk: int, what: str):
    """``what`` (``"proba"`` (N, K) or ``"label"`` (N,)) over the rows of ``Z``, ``chunk`` rows
    at a time (:func:`softmax_jax._chunks.map_chunks`)."""
    return map_chunks(lambda Zc: _block_outputs(W, b, Zc, what), chunk, Z)


def _check_params(params: Any) -> tuple[jax.Array, jax.Array | None]:
    if not isinstance(params, dict) or "W" not in params:
        raise TypeError(
            f"`params` must be a dict with 'W' (D, K) and optionally 'b' (K,), as returned by "
            f"fit, got {type(params).__name__}"
        )
    W = params["W"] if isinstance(params["W"], jax.Array) else np.asarray(params["W"])
    if W.ndim != 2 or not jnp.issubdtype(W.dtype, jnp.floating) or W.shape[1] < 1:
        raise ValueError(
            f"`params['W']` must be a float (D, K) array with K >= 1, got {W.dtype}{W.shape}"
        )
    b = params.get("b")
    if b is not None:
        b = b if isinstance(b, jax.Array) else np.asarray(b)
        if b.shape != (W.shape[1],):
            raise ValueError(f"`params['b']` must have shape (K,) = ({W.shape[1]},), got {b.shape}")
    return W, b


def _check_features(Z: Any, d: int, name: str = "Z"):
    if not isinstance(Z, jax.Array):
        Z = np.asarray(Z)
        if Z.dtype.kind not in "fiub" and Z.dtype != jnp.bfloat16:
            raise TypeError(f"`{name}` must be a real numeric array, got dtype {Z.dtype}")
        if Z.dtype.kind != "f" or (Z.dtype.itemsize > 4 and not jax.config.jax_enable_x64):
            Z = Z.astype(np.float32)  # what JAX would make of it, without its float64 warning
    if Z.ndim != 2 or Z.shape[1] != d:
        raise ValueError(f"`{name}` must have shape (N, D) with D = {d} features, got {Z.shape}")
    check_finite(Z, name)
    return jax.device_put(Z)  # (jnp.asarray compiles a copy program for each new shape)


def _run(params, Z, chunk_size: int, what: str) -> jax.Array:
    W, b = _check_params(params)
    check_finite(W, "params['W']")
    if b is not None:
        check_finite(b, "params['b']")
    W, b = jnp.asarray(W), None if b is None else jnp.asarray(b)
    if is_sparse(Z):  # scipy.sparse rows, never densified (softmax_jax._sparse)
        Zs = check_sparse(Z, "Z")
        if Zs.shape[1] != W.shape[0]:
            raise ValueError(
                f"`Z` must have shape (N, D) with D = {W.shape[0]} features, got {Zs.shape}"
            )
        return predict_sparse(W, b, Zs, what)
    Z = _check_features(Z, W.shape[0])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
        raise TypeError(f"`chunk_size` must be a positive integer, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}")
    if Z.shape[0] == 0:
        if what == "label":
            return jnp.zeros((0,), jnp.int32)
        return jnp.zeros((0, W.shape[1]), W.dtype)
    out, finite = _predict_rows(W, b, Z, chunk=int(min(chunk_size, Z.shape[0])), what=what)
    # read on the host: jnp.all would compile a program for each new row count
    if is_concrete(finite) and not (finite := np.asarray(finite)).all():
        row = int(np.argmin(finite))
        raise ValueError(
            f"`Z` @ `W` + `b` overflows {jnp.result_type(W.dtype, Z.dtype)} at row {row} (logits "
            "not finite): features far outside the training range; scale them, or use float64 "
            "(jax_enable_x64)"
        )
    return out


def predict_proba(params: dict, Z: ArrayLike, *, chunk_size: int = CHUNK_ROWS) -> jax.Array:
    r"""Class probabilities of softmax regression, ``Ŷ = softmax(Z W + b)`` row-wise.

    .. math::

        \hat y_{ik} = \frac{e^{a_{ik} - m_i}}{\sum_{k'} e^{a_{ik'} - m_i}}, \qquad
        a_i = z_i W + b, \quad m_i = \max_k a_{ik}

    Jit-compiled; rows are processed in blocks of ``chunk_size`` (``lax.map``), so the only
    ``(·, K)`` temporaries are one block's logits (the output itself is ``(N, K)``).

    Args:
      params: ``{"W": (D, K), "b": (K,)}`` as returned by :func:`softmax_jax.fit` (``b``
        optional).
      Z: features ``(N, D)``, preprocessed as for training: an array, or a ``scipy.sparse``
        matrix (never densified: its logits come from the sparse rows, ``softmax_jax._sparse``).
      chunk_size: rows per block.

    Returns:
      ``(N, K)`` probabilities, rows summing to one, in ``W``'s compute dtype.

    Examples:
      >>> import numpy as np, softmax_jax as sj
      >>> params = {"W": np.eye(2, dtype=np.float32), "b": np.zeros(2, np.float32)}
      >>> sj.predict_proba(params, np.array([[0.0, 0.0]], np.float32)).tolist()
      [[0.5, 0.5]]
    """
    return _run(params, Z, chunk_size, "proba")


def predict(params: dict, Z: ArrayLike, *, chunk_size: int = CHUNK_ROWS) -> jax.Array:
    """The most probable class index ``argmax_k (z_i W + b)_k`` of each row, ``(N,)`` int32.

    Same arguments as :func:`predict_proba`; only a ``(chunk_size, K)`` block of logits is ever
    live. Class indices are ``0..K-1`` as in ``fit``'s labels; :class:`Model` maps them back to the
    original labels.

    Examples:
      >>> import numpy as np, softmax_jax as sj
      >>> params = {"W": np.eye(2, dtype=np.float32), "b": np.zeros(2, np.float32)}
      >>> sj.predict(params, np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)).tolist()
      [1, 0]
    """
    return _run(params, Z, chunk_size, "label")


# ---------------------------------------------------------------------------------------------
# The model: parameters, preprocessing, classes, provenance.


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A trained softmax-regression model that predicts from raw features.

    Attributes:
      W: weights ``(D, K)``.
      b: bias ``(K,)``.
      classes: the original label of each class index ``(K,)``.
      mean: per-feature mean subtracted before ``W`` ``(D,)``, or ``None`` (no preprocessing).
      std: per-feature scale divided by before ``W`` ``(D,)``, or ``None``.
      info: provenance, a JSON-able dict (softmax_jax version, optimizer, date, data shape, ...).
    """

    W: np.ndarray
    b: np.ndarray
    classes: np.ndarray
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        W = np.asarray(self.W)
        if W.ndim != 2 or W.shape[1] < 1:
            raise ValueError(f"`W` must have shape (D, K) with K >= 1, got {W.shape}")
        d, k = W.shape
        for name, want in (("b", (k,)), ("classes", (k,)), ("mean", (d,)), ("std", (d,))):
            value = getattr(self, name)
            if value is None:
                if name in ("b", "classes"):
                    raise ValueError(f"`{name}` is required, shape {want}")
                continue
            value = np.asarray(value)
            if value.shape != want:
                raise ValueError(f"`{name}` must have shape {want}, got {value.shape}")
            object.__setattr__(self, name, value)
        if (self.mean is None) != (self.std is None):
            raise ValueError("`mean` and `std` go together: give both or neither")
        if not isinstance(self.info, dict):
            raise TypeError(f"`info` must be a dict, got {type(self.info).__name__}")
        for name in ("W", "b", "mean", "std"):
            value = W if name == "W" else getattr(self, name)
            if value is not None and value.dtype.kind != "f":
                raise TypeError(f"`{name}` must be a float array, got dtype {value.dtype}")
            if value is not None:
                check_finite(value, name)
        if self.classes.dtype.kind not in "iufbU":
            raise TypeError(f"`classes` must be numbers or strings, got dtype {self.classes.dtype}")
        if self.std is not None:
            if (self.std < 0).any():
                j = int(np.flatnonzero(self.std < 0)[0])
                raise ValueError(f"`std` must be >= 0, got {self.std[j]} at index {j}")
            # A constant feature (std 0) is left unscaled, as `softmax-jax train` does.
            object.__setattr__(
                self, "std", np.where(self.std == 0, 1, self.std).astype(self.std.dtype)
            )
        object.__setattr__(self, "W", W)

    @property
    def n_features(self) -> int:
        return self.W.shape[0]

    @property
    def n_classes(self) -> int:
        return self.W.shape[1]

    @property
    def preprocessing(self) -> str:
        """``"standardize"`` (``(X − mean) / std``) or ``"none"``."""
        return "none" if self.mean is None else "standardize"

    def transform(self, X: ArrayLike) -> np.ndarray:
        """Raw features ``(N, D)`` to the model's inputs: ``(X − mean) / std``, or ``X`` as is."""
        X = as_host_array(X, "X")
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(
                f"`X` must have shape (N, D) with D = {self.n_features} features, got {X.shape}"
            )
        if X.dtype.kind not in "fiub":
            raise TypeError(f"`X` must be a real numeric array, got dtype {X.dtype}")
        check_finite(X, "X")
        if self.mean is None:
            return X
        return ((X - self.mean) / self.std).astype(self.W.dtype)

    def params(self) -> dict:
        """``{"W", "b"}`` for :func:`predict` and :func:`predict_proba`."""
        return {"W": self.W, "b": self.b}

    def predict_proba(self, X: ArrayLike, *, chunk_size: int = CHUNK_ROWS) -> np.ndarray:
        """Class probabilities ``(N, K)`` of raw features ``X`` (N, D); columns in the order of
        :attr:`classes`."""
        return np.asarray(predict_proba(self.params(), self.transform(X), chunk_size=chunk_size))

    def predict(self, X: ArrayLike, *, chunk_size: int = CHUNK_ROWS) -> np.ndarray:
        """The predicted label (one of :attr:`classes`) of each row of raw features ``X``."""
        idx = np.asarray(predict(self.params(), self.transform(X), chunk_size=chunk_size))
        return self.classes[idx]

    def score(self, X: ArrayLike, y: ArrayLike) -> float:
        """Accuracy of :meth:`predict` against the labels ``y`` (N,)."""
        return float(np.mean(self.predict(X) == np.asarray(y)))

    def save(self, path: str | os.PathLike) -> str:
        """Writes the model to ``path`` (exactly that name; see :func:`save_model`)."""
        return save_model(path, self)


def _provenance(info: dict | None) -> dict:
    """``info`` with the softmax_jax version and the date (UTC) added where it has none."""
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"`info` must be a dict, got {type(info).__name__}")
    out = {
        "softmax_jax": package_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out.update(info or {})
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_value(value: Any):
    """NumPy scalars and arrays in ``info`` as the Python numbers and lists they hold."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"`info` must hold JSON values (numbers, strings, lists, dicts), got "
                    f"{type(value).__name__} {value!r}")  # fmt: skip


def _header_json(header: dict) -> str:
    return json.dumps(header, default=_json_value)


def save_model(
    path: str | os.PathLike,
    model: Model | dict,
    *,
    classes: ArrayLike | None = None,
    mean: ArrayLike | None = None,
    std: ArrayLike | None = None,
    info: dict | None = None,
) -> str:
    """Writes a model file: ``W``, ``b``, classes, preprocessing and provenance.

    The file is an ``.npz`` archive of plain arrays plus a JSON header (no pickle), written to a
    temporary file and renamed, at exactly ``path`` (no extension is appended).

    Args:
      path: the file to write.
      model: a :class:`Model`, or ``fit``'s params ``{"W": (D, K), "b": (K,)}``.
      classes: with params: the label of each class index ``(K,)`` (default ``0..K-1``).
      mean, std: with params: the standardisation applied to raw features before ``W`` ``(D,)``.
      info: with params: provenance to record (optimizer, data shape, ...). The softmax_jax
        version and the date (UTC) are added to the provenance when it has none.

    Returns:
      The path written.

    Examples:
      >>> import numpy as np, softmax_jax as sj, tempfile, os
      >>> params = {"W": np.eye(2, dtype=np.float32), "b": np.zeros(2, np.float32)}
      >>> path = sj.save_model(os.path.join(tempfile.mkdtemp(), "m.npz"), params, classes=[3, 7])
      >>> sj.load_model(path).predict(np.array([[0.0, 1.0]])).tolist()
      [7]
    """
    if isinstance(model, Model):
        if any(v is not None for v in (classes, mean, std, info)):
            raise ValueError("`classes`, `mean`, `std` and `info` go with params, not a Model")
        m = dataclasses.replace(model, info=_provenance(model.info))
    else:
        W, b = (None if v is None else np.asarray(v) for v in _check_params(model))
        b = np.zeros(W.shape[1], W.dtype) if b is None else b
        cls = np.arange(W.shape[1]) if classes is None else np.asarray(classes)
        m = Model(W, b, cls, mean=mean, std=std, info=_provenance(info))
    header = {"format": MODEL_FORMAT, "preprocessing": m.preprocessing, "info": m.info}
    arrays = {"header": np.array(_header_json(header)), "W": m.W, "b": m.b, "classes": m.classes}
    if m.mean is not None:
        arrays.update(mean=m.mean, std=m.std)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would: mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_model(path: str | os.PathLike) -> Model:
    """Reads a model file written by :func:`save_model` or ``softmax-jax train --save``.

    Returns:
      a :class:`Model`: ``predict`` / ``predict_proba`` on raw features.

    Raises:
      ModelFileError: a missing, corrupt or foreign file, or one of a newer format; the message
        is one line naming the file.
    """
    path = os.fspath(path)

    def fail(msg: str) -> ModelFileError:
        return ModelFileError(f"{path}: {msg}")

    if not os.path.isfile(path):
        raise fail("no such file")
    if not zipfile.is_zipfile(path):
        raise fail("not a softmax_jax model file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except Exception as e:  # noqa: BLE001 - zip, zlib and format errors alike
        raise fail(f"corrupt model file ({type(e).__name__}: {e})") from None
    if "header" not in arrays:
        found = ", ".join(sorted(arrays)) or "nothing"
        hint = (
            " (an older `softmax-jax train --save` file, without the preprocessing: train and "
            "save it again)"
            if {"W", "b", "classes"} <= set(arrays)
            else ""
        )
        raise fail(f"not a softmax_jax model file: no header, found {found}{hint}")
    try:
        header = json.loads(str(arrays["header"]))
        version = header["format"]
    except (ValueError, KeyError, TypeError) as e:
        raise fail(f"corrupt model header ({type(e).__name__}: {e})") from None
    if not isinstance(header.get("info", {}), dict):
        raise fail(f"corrupt model header: `info` must be an object, got {header['info']!r}")
    if isinstance(version, bool) or not isinstance(version, int):
        raise fail(f"corrupt model header: `format` must be an integer, got {version!r}")
    if not 1 <= version <= MODEL_FORMAT:
        raise fail(
            f"model format {version} is not readable by this softmax_jax (it reads formats 1 to "
            f"{MODEL_FORMAT}; written by softmax_jax "
            f"{header.get('info', {}).get('softmax_jax', '?')}): upgrade softmax-jax"
        )
    missing = [k for k in ("W", "b", "classes") if k not in arrays]
    if header.get("preprocessing") == "standardize":
        missing += [k for k in ("mean", "std") if k not in arrays]
    if missing:
        raise fail(f"corrupt model file: missing array(s) {', '.join(missing)}")
    try:
        return Model(
            arrays["W"],
            arrays["b"],
            arrays["classes"],
            mean=arrays.get("mean"),
            std=arrays.get("std"),
            info=dict(header.get("info", {})),
        )
    except (ValueError, TypeError) as e:
        raise fail(f"corrupt model file ({e})") from None
