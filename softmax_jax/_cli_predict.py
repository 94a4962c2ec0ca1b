"""``softmax-jax predict``: a saved model's predictions on raw features, one per row.

The model file carries its preprocessing, so the features are given as they were to ``train``
(a CSV with or without its label column, or an ``.npz`` with ``X`` and optionally ``y``). With
labels present it also prints the accuracy.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np

from ._cli_common import PROG, CLIError

DESCRIPTION = """\
Apply a model saved by `softmax-jax train --save` (or softmax_jax.save_model) to raw features:
the model file carries the standardisation, so give the features as they were given to train.
--data is a .csv with D feature columns (a header row, a byte-order mark and a pandas index
column are handled as for train) or D + 1 with the label last, or an .npz with X and optionally
y. Writes one prediction per row (the class label) as CSV, or with --proba the probability of
each class, to --out or to standard output. When the data have labels, prints the accuracy."""

EXAMPLES = f"""\
  {PROG} predict --model model.npz --data data.csv                  # CSV on standard output
  {PROG} predict --model model.npz --data data.csv --out predictions.csv
  {PROG} predict --model model.npz --data new.npz --proba --out probabilities.csv
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="PATH", help="a model file written by train --save"
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help=".csv (D features, optionally the label last) or .npz (X, optionally y)",
    )
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="write the CSV here, exactly this name (default: standard output)",
    )
    parser.add_argument(
        "--proba",
        action="store_true",
        help="one column per class with its probability, instead of the predicted label",
    )


def _format_label(value) -> str:
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _write_csv(f, model, X, proba: bool) -> int:
    writer = csv.writer(f, lineterminator="\n")
    if proba:
        P = model.predict_proba(X)
        writer.writerow([f"p_{_format_label(c)}" for c in model.classes])
        writer.writerows([[f"{p:.6g}" for p in row] for row in P])
        return P.shape[0]
    labels = model.predict(X)
    writer.writerow(["prediction"])
    writer.writerows([[_format_label(v)] for v in labels])
    return labels.shape[0]


def _accuracy(predicted: np.ndarray, y: np.ndarray) -> float:
    """The fraction of rows whose predicted class is the label ``y``: compared as numbers when
    both are numbers (``3`` and ``"3.0"`` agree), else as the labels written by this command."""
    if predicted.dtype.kind in "iufb":
        try:
            return float(np.mean(predicted.astype(np.float64) == y.astype(np.float64)))
        except ValueError:  # names in y
            pass
    written = np.array([_format_label(v) for v in predicted], dtype=str)
    return float(np.mean(written == np.char.strip(y.astype(str))))


def run_cli(args: argparse.Namespace) -> int:
    from ._data import DataError, load_features
    from ._model import ModelFileError, load_model

    if args.out is not None:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise CLIError(f"--out {args.out}: directory {folder} does not exist")
        if os.path.isdir(args.out):
            raise CLIError(f"--out {args.out}: is a directory, expected a file name")
    try:
        model = load_model(args.model)
    except ModelFileError as e:
        raise CLIError(f"--model {e}") from None
    notes: list[str] = []
    try:
        X, y = load_features(args.data, model.n_features, notes=notes)
    except DataError as e:
        raise CLIError(f"--data {e}") from None
    info = sys.stderr if args.out is None else sys.stdout  # stdout stays CSV without --out
    for note in notes:
        print(f"note: {note}", file=info)
    if args.out is None:
        buf = io.StringIO()
        n = _write_csv(buf, model, X, args.proba)
        sys.stdout.write(buf.getvalue())
    else:
        with open(args.out, "w", newline="") as f:
            n = _write_csv(f, model, X, args.proba)
        what = "probabilities" if args.proba else "predictions"
        print(f"wrote {n} {what} to {args.out}", file=info)
    if y is not None:
        acc = _accuracy(model.predict(X), y)
        print(f"accuracy on {args.data} (its last column as the labels): {acc:.4f}", file=info)
    return 0
