"""Datasets for training: scikit-learn's digits, ``.npz``/``.csv`` files, and their validation.

Everything here runs on the host in NumPy: files are read, checked cell by cell where needed,
labels are encoded to ``0..K-1`` and the features standardised with statistics of the training
split only. Problems are reported with :class:`DataError`, a ``ValueError`` whose message is one
line naming the file, row and column, which the command line prints as is.
"""

from __future__ import annotations

import codecs
import csv
import math
import os
import zipfile
from typing import NamedTuple

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "encode_labels",
    "parse_labels",
    "load_digits",
    "load_features",
    "load_file",
    "split",
]


class DataError(ValueError):
    """Bad training data: a one-line message naming the file, row and column where known."""


class Dataset(NamedTuple):
    """A train/test split ready for :func:`softmax_jax.fit`.

    Attributes:
      X_train: features ``(N_train, D)``, float64, standardised when asked.
      y_train: labels ``(N_train,)``, int32 in ``[0, K)``.
      X_test: features ``(N_test, D)``.
      y_test: labels ``(N_test,)``.
      classes: the original label of each class index, ``(K,)``.
      name: where the data came from (a file path or ``"sklearn digits"``).
      mean, std: the standardisation ``(X − mean) / std`` applied (``(D,)``), or ``None``.
      raw: ``(X_train, X_test)`` before standardisation.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: np.ndarray
    name: str
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    raw: tuple | None = None


def _fail(where: str, msg: str) -> DataError:
    return DataError(f"{where}: {msg}")


def check_features(X: np.ndarray, where: str, *, first_row: int = 0, col_names=None) -> None:
    """Rejects NaN/inf features, naming the first offending row (``first_row``-based) and column."""
    bad = ~np.isfinite(X)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        col = f"column {c + 1}" + (f" ({col_names[c]!r})" if col_names is not None else "")
        raise _fail(where, f"row {r + first_row}, {col}: feature is {X[r, c]} (must be finite)")


#: The largest magnitude of a class label given as a float: beyond it floats are not all integers
#: apart (``2**53 + 1`` does not exist as a float64), so two labels could read as one.
MAX_FLOAT_LABEL = 2**53


def encode_labels(
    y: np.ndarray, where: str, *, first_row: int = 0, min_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Class labels to class indices ``0..K-1``.

    Args:
      y: labels ``(N,)``: integers, floats holding integer values (``3.0``, ``|y| < 2**53``),
        booleans, or names (strings).
      where: name used in error messages (a file path).
      first_row: the row number of ``y[0]`` in messages (1-based line number for a CSV file).
      min_classes: fewer distinct labels than this is an error.

    Returns:
      ``(codes, classes)``: ``codes`` int32 ``(N,)`` with ``classes[codes] == y``.

    Raises:
      DataError: non-integer, out-of-range or non-finite numeric labels, labels that are neither
        numbers nor strings, or fewer than ``min_classes`` classes.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise _fail(where, f"labels must have shape (N,), got {y.shape}")
    if y.dtype.kind == "S":
        y = y.astype(str)
    if y.dtype.kind not in "iufbU":
        raise _fail(
            where, f"labels must be integers or names, got dtype {y.dtype} (e.g. {y[:1].tolist()})"
        )
    if y.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(y) | (y != np.round(y)) | (np.abs(y) >= MAX_FLOAT_LABEL)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            why = (
                "is out of range (|label| < 2**53)"
                if np.isfinite(y[r]) and y[r] == np.round(y[r])
                else "is not an integer"
            )
            raise _fail(where, f"row {r + first_row}: label {y[r].item()!r} {why}")
        y = y.astype(np.int64)
    classes, codes = np.unique(y, return_inverse=True)
    if classes.size < min_classes:
        found = "no labels" if classes.size == 0 else f"only class {classes[0]}"
        raise _fail(where, f"need at least {min_classes} classes to train, found {found}")
    return codes.astype(np.int32), classes


def parse_labels(cells: list[str], where: str, *, lines: list[int] | None = None) -> np.ndarray:
    """The label column of a CSV file as an array: integers (``"3"``, ``"3.0"``), or names
    (``"setosa"``) when any label is not a number. A column of numbers that are not all integers
    (``"2.5"``, ``"nan"``), or integers beyond int64 (``2**53`` written as a float), is refused;
    ``lines`` are the rows' line numbers for messages."""
    cells = [c.strip() for c in cells]
    lines = list(range(len(cells))) if lines is None else lines
    for line, c in zip(lines, cells):
        if not c:
            raise _fail(where, f"row {line}: empty label")
    if not all(_is_number(c) for c in cells):
        return np.array(cells, dtype=str)
    values = []
    for line, c in zip(lines, cells):
        try:
            v = int(c)
        except ValueError:
            f = float(c)
            if not (math.isfinite(f) and f.is_integer()):
                raise _fail(where, f"row {line}: label {c} is not an integer") from None
            if abs(f) >= MAX_FLOAT_LABEL:
                raise _fail(
                    where, f"row {line}: label {c} is out of range (|label| < 2**53)"
                ) from None
            v = int(f)
        if not -(2**63) <= v < 2**63:
            raise _fail(where, f"row {line}: label {c} is out of the int64 range")
        values.append(v)
    return np.array(values, dtype=np.int64)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


#: Column separators recognised in CSV files, in order of preference.
DELIMITERS = (",", ";", "\t", "|")


def _sniff_delimiter(lines: list[str]) -> str:
    """The separator that splits the first lines into the same number (> 1) of columns, with the
    most numeric cells; ``","`` when none does."""
    best, best_score = ",", -1.0
    for delim in DELIMITERS:
        rows = [r for r in csv.reader(lines, delimiter=delim) if any(c.strip() for c in r)]
        widths = {len(r) for r in rows}
        if len(widths) != 1 or widths.pop() < 2:
            continue
        cells = [c for r in rows[1:] or rows for c in r]
        score = sum(_is_number(c) for c in cells) / max(1, len(cells))
        if score > best_score:
            best, best_score = delim, score
    return best


def _read_text(path: str) -> str:
    """The text of a CSV file: UTF-8 (a byte-order mark skipped) or UTF-16 with its mark."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as e:
            raise _fail(path, f"not a text CSV file ({e.reason} at byte {e.start})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _fail(
            path, f"not a UTF-8 text CSV file ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    if "\x00" in text:
        raise _fail(path, "not a text CSV file (it holds NUL bytes)")
    return text


def _read_csv_rows(path: str, notes: list | None):
    """The non-empty rows of a CSV file as strings: ``(rows [(line, cells)], names or None)``.

    The separator (``,`` ``;`` tab ``|``) is detected; an optional header (a first row with no
    numeric cell) names the columns; a first column with an empty header, as pandas' ``to_csv``
    writes its index, is dropped (and said in ``notes``).
    """
    lines = _read_text(path).splitlines(keepends=True)
    delim = _sniff_delimiter([ln for ln in lines if ln.strip()][:20])
    rows = [
        (i + 1, r)
        for i, r in enumerate(csv.reader(lines, delimiter=delim))
        if any(c.strip() for c in r)
    ]
    if not rows:
        raise _fail(path, "empty CSV file (expected rows of numbers)")
    names = None
    if not any(_is_number(c) for c in rows[0][1]):
        names = [c.strip() for c in rows[0][1]]
        rows = rows[1:]
        if not rows:
            raise _fail(path, "CSV file has a header but no data rows")
    width = len(names) if names is not None else len(rows[0][1])
    for line, row in rows:
        if len(row) != width:
            raise _fail(path, f"row {line}: ragged row with {len(row)} columns, expected {width}")
    if names is not None and width > 1 and names[0] in ("", "Unnamed: 0"):
        names = names[1:]
        rows = [(line, row[1:]) for line, row in rows]
        if notes is not None:
            notes.append(
                f"{path}: column 1 has no name (an index column, as pandas' to_csv writes): "
                "not used as a feature"
            )
        return rows, names, 1
    return rows, names, 0


def _numbers(path: str, rows, names, skip: int, ncols: int) -> np.ndarray:
    """The first ``ncols`` columns of ``rows`` as float64 ``(N, ncols)``."""
    data = np.empty((len(rows), ncols), np.float64)
    for j, (line, row) in enumerate(rows):
        try:
            data[j] = [float(c) for c in row[:ncols]]
        except ValueError:
            c = next(i for i, cell in enumerate(row[:ncols]) if not _is_number(cell))
            col = f"column {c + 1 + skip}" + (f" ({names[c]!r})" if names is not None else "")
            others = [d for d in DELIMITERS if d in row[c]]
            hint = f" (it holds {others[0]!r}: another column separator?)" if others else ""
            if _is_number(row[c].replace(",", ".")):
                hint = " (a decimal comma? write decimals with '.')"
            raise _fail(
                path, f"row {line}, {col}: non-numeric feature {row[c].strip()!r}{hint}"
            ) from None
    return data


def _read_csv(path: str, notes: list | None) -> tuple[np.ndarray, np.ndarray, int]:
    """A CSV with the label (an integer or a name) in the last column: ``(X, y, first_row)``."""
    rows, names, skip = _read_csv_rows(path, notes)
    width = len(rows[0][1])
    if width < 2:
        raise _fail(path, f"need at least 2 columns (features, then the label), got {width}")
    X = _numbers(path, rows, names, skip, width - 1)
    first = rows[0][0]
    check_features(X, path, first_row=first, col_names=names)
    y = parse_labels([row[-1] for _, row in rows], path, lines=[line for line, _ in rows])
    return X, y, first


def _check_npz_file(path: str) -> None:
    if os.path.getsize(path) == 0:
        raise _fail(path, "cannot read as .npz: the file is empty (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise _fail(path, "cannot read as .npz: not a zip archive (as np.savez writes)")


def _read_npz(path: str, *, need_y: bool = True) -> tuple[np.ndarray, np.ndarray | None, int]:
    _check_npz_file(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in (("X", "y") if need_y else ("X",)) if k not in f.files]
            if missing:
                raise _fail(path, f"missing array(s) {missing}; found {sorted(f.files)}")
            X = f["X"]
            y = f["y"] if "y" in f.files else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - zip, zlib and format errors alike
        raise _fail(path, f"cannot read as .npz ({type(e).__name__}: {e})") from None
    if X.ndim != 2:
        raise _fail(path, f"`X` must have shape (N, D), got {X.shape}")
    if X.dtype.kind not in "iufb":
        raise _fail(path, f"`X` must be numeric, got dtype {X.dtype}")
    if y is not None and (y.ndim != 1 or y.shape[0] != X.shape[0]):
        raise _fail(path, f"`y` must have shape (N,) = ({X.shape[0]},), got {y.shape}")
    X = X.astype(np.float64)
    check_features(X, path)
    return X, y, 0


def load_file(
    path: str | os.PathLike, *, notes: list | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loads ``(X, codes, classes)`` from a ``.npz`` (arrays ``X``, ``y``) or a ``.csv`` file.

    CSV: one sample per row, numeric features, the integer label in the last column; an optional
    header row; a UTF-8 byte-order mark is skipped and a pandas index column (empty header) is
    dropped, said in ``notes`` (a list the messages are appended to). Rows and columns in error messages are 1-based (rows are line numbers); for
    ``.npz`` files rows are 0-based indices into ``X``.

    Returns:
      ``X`` float64 ``(N, D)``, ``codes`` int32 ``(N,)`` in ``[0, K)``, ``classes`` ``(K,)``.

    Raises:
      DataError: a missing file, an unknown extension, non-numeric or ragged CSV rows, NaN/inf
        features, non-integer labels, an empty file or a single class.
    """
    path, ext = _check_path(path)
    if ext == ".csv":
        X, y, first = _read_csv(path, notes)
    else:
        X, y, first = _read_npz(path)
    if X.shape[0] == 0:
        raise _fail(path, "no samples")
    codes, classes = encode_labels(y, path, first_row=first)
    return X, codes, classes


def _check_path(path) -> tuple[str, str]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _fail(path, "no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".npz"):
        raise _fail(path, f"unknown data format {ext!r}: expected .npz (arrays X, y) or .csv")
    return path, ext


def load_features(
    path: str | os.PathLike, n_features: int, *, notes: list | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features to predict on, ``(X (N, n_features), y or None)``, from a ``.csv`` or ``.npz``.

    CSV: ``n_features`` columns, or ``n_features + 1`` with the label last (as for training);
    header, byte-order mark and pandas index column as in :func:`load_file`. ``.npz``: array
    ``X`` and, optionally, ``y``. The labels, when present, are returned as they are (the
    cells of a CSV file as strings).
    """
    path, ext = _check_path(path)
    if ext == ".csv":
        rows, names, skip = _read_csv_rows(path, notes)
        width = len(rows[0][1])
        if width not in (n_features, n_features + 1):
            raise _fail(
                path,
                f"has {width} columns; the model takes {n_features} features (and "
                "optionally the label as one more, last, column)",
            )
        X, first = _numbers(path, rows, names, skip, n_features), rows[0][0]
        y = None
        if width > n_features:
            y = np.array([row[-1].strip() for _, row in rows], dtype=str)
    else:
        X, y, first = _read_npz(path, need_y=False)
        names = None
        if X.shape[1] != n_features:
            raise _fail(path, f"`X` has {X.shape[1]} features; the model takes {n_features}")
    if X.shape[0] == 0:
        raise _fail(path, "no samples")
    check_features(X, path, first_row=first, col_names=names)
    return X, y


def split(
    X: np.ndarray,
    codes: np.ndarray,
    classes: np.ndarray,
    *,
    name: str,
    test_size: float = 0.25,
    seed: int = 0,
    standardize: bool = True,
) -> Dataset:
    """A seeded train/test split, stratified by class, standardised with the training split's
    mean and std (constant features keep std 1).

    Each class sends ``round(test_size · N_c)`` of its shuffled samples to the test split (at
    least one when it has two or more samples, never all of them); the totals are then adjusted
    to ``ceil(test_size · N)`` test samples.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"`test_size` must lie in (0, 1), got {test_size}")
    n = X.shape[0]
    n_test = math.ceil(test_size * n)
    if n < 2 or n_test >= n:
        raise DataError(f"{name}: {n} samples are too few for a train/test split")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(codes == c)) for c in range(classes.size)]
    take = [min(len(ix) - 1, max(int(round(test_size * len(ix))), 1)) for ix in per_class]
    take = [max(t, 0) for t in take]
    # adjust the total to n_test, largest classes first
    order = np.argsort([-len(ix) for ix in per_class], kind="stable")
    i = 0
    while sum(take) != n_test and i < 4 * len(order) + n:
        c = order[i % len(order)]
        if sum(take) < n_test and take[c] < len(per_class[c]) - 1:
            take[c] += 1
        elif sum(take) > n_test and take[c] > 0:
            take[c] -= 1
        i += 1
    test = np.sort(np.concatenate([ix[:t] for ix, t in zip(per_class, take)]).astype(np.intp))
    if test.size == 0:
        raise DataError(
            f"{name}: {n} samples are too few for a train/test split with test size {test_size} "
            f"(no class has a sample to spare for the test split: {n} samples, "
            f"{classes.size} classes)"
        )
    train = np.setdiff1d(np.arange(n), test)
    train, test = rng.permutation(train), rng.permutation(test)
    Xtr, Xte = X[train], X[test]
    mean = std = None
    if standardize:
        mean = Xtr.mean(axis=0)
        std = Xtr.std(axis=0)
        std[std == 0] = 1.0
        Xtr, Xte = (Xtr - mean) / std, (Xte - mean) / std
    return Dataset(
        Xtr,
        codes[train].astype(np.int32),
        Xte,
        codes[test].astype(np.int32),
        classes,
        name,
        mean,
        std,
        (X[train], X[test]),
    )


def load_digits(*, test_size: float = 0.25, seed: int = 0, standardize: bool = True) -> Dataset:
    """scikit-learn's digits (1797 images 8×8, 10 classes), split 75/25 and standardised.

    Ships with scikit-learn: no download.
    """
    from sklearn.datasets import load_digits as _load

    X, y = _load(return_X_y=True)
    codes, classes = encode_labels(y, "sklearn digits")
    return split(
        X.astype(np.float64),
        codes,
        classes,
        name="sklearn digits",
        test_size=test_size,
        seed=seed,
        standardize=standardize,
    )
