"""``softmax-jax train --data X.npy``: streamed training over a memory-mapped ``.npy``, labels from
``--labels`` (a ``.npy`` or an ``.npz`` with ``y``)."""

from __future__ import annotations

import argparse
import os

import numpy as np

from ._cli_common import CLIError, as_flags
from ._minibatch import DEFAULT_BATCH_SIZE
from ._solvers import FULL_BATCH_SOLVERS


def _load_labels(path: str, n: int):
    """``(codes, classes)`` of the labels of a streamed ``--data X.npy``: a ``.npy`` of N labels or
    an ``.npz`` holding ``y`` (integers, integer-valued floats or names)."""
    from ._data import DataError, encode_labels

    try:
        loaded = np.load(path, allow_pickle=False)
        if hasattr(loaded, "files"):
            with loaded:
                if "y" not in loaded.files:
                    raise CLIError(
                        f"--labels {path}: no array y in it, found {sorted(loaded.files)}"
                    )
                y = loaded["y"]
        else:
            y = np.asarray(loaded)
        if y.shape != (n,):
            raise CLIError(f"--labels {path}: must hold ({n},) labels for --data, got {y.shape}")
        return encode_labels(y, f"--labels {path}")
    except DataError as e:
        raise CLIError(str(e)) from None
    except (OSError, ValueError, EOFError) as e:
        raise CLIError(f"--labels {path}: cannot read ({type(e).__name__}: {e})") from None


def run_streamed(args: argparse.Namespace) -> int:
    """``--data X.npy``: ``fit(..., stream=True)`` over ``X`` memory-mapped, labels from
    ``--labels``. The features are used as stored (no split, no standardisation: each would be
    a pass over data that need not fit in memory); the accuracy is the training one, as seen
    during the last epoch."""
    from ._checkpoint import CheckpointError
    from ._fit import TrainingDiverged, fit
    from ._model import Model, save_model

    labels = args.labels or os.path.join(os.path.dirname(os.path.abspath(args.data)), "y.npy")
    try:
        X = np.load(args.data, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CLIError(
            f"--data {args.data}: cannot read as .npy ({type(e).__name__}: {e})"
        ) from None
    if X.ndim != 2 or X.dtype.kind not in "fiu":
        raise CLIError(f"--data {args.data}: must hold an (N, D) array of numbers, got "
                       f"{X.dtype}{X.shape}")  # fmt: skip
    n, d = X.shape
    codes, classes = _load_labels(labels, n)
    print(f"data: {args.data} streamed (memmap): {n} samples, {d} features; labels {labels}")
    try:
        params, history = fit(
            X, codes, optimizer=args.optimizer, learning_rate=args.lr,
            epochs=args.epochs, l2=args.l2, seed=args.seed, stream=True,
            batch_size=args.batch_size or (None if args.optimizer in FULL_BATCH_SOLVERS
                                           else DEFAULT_BATCH_SIZE),
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
            progress=not args.no_progress,
        )  # fmt: skip
    except (TrainingDiverged, CheckpointError, ValueError, TypeError) as e:
        raise CLIError(as_flags(str(e)).replace("`Z`", f"--data {args.data}")) from None
    if history["epoch"]:
        print(f"final objective: {history['loss'][-1]:.6g}  ({len(history['epoch'])} epochs)")
        print(f"train accuracy (last epoch, as trained): {history['train_accuracy'][-1]:.4f}")
    if args.save:
        W, b = np.asarray(params["W"]), np.asarray(params["b"])
        info = {"data": args.data, "labels": labels, "n_samples": n, "streamed": True}
        written = save_model(args.save, Model(W, b, classes, info=info))
        print(f"wrote the model (no preprocessing, W {W.shape}, b {b.shape}) to {written}")
    return 0
