"""``softmax-jax train``: train softmax regression from the command line.

With no arguments it trains on scikit-learn's digits (75/25 stratified split, standardised with
the training statistics), shows a progress bar, prints train and test accuracy and the gradient
cross-check of the trained model. Bad input is reported on one line (exit code 2).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ._cli import CLIError
from ._minibatch import OPTIMIZERS
from ._solvers import FULL_BATCH_SOLVERS

DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 64
DEFAULT_L2 = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``train`` options to ``parser``."""
    names = (*OPTIMIZERS, *FULL_BATCH_SOLVERS)
    parser.add_argument(
        "--data",
        metavar="PATH",
        help=".npz with arrays X (N, D) and y (N,), or .csv with the integer label in the last "
        "column (default: scikit-learn's digits); or a .npy X (N, D), streamed from disk "
        "(memory-mapped) with its labels in --labels",
    )
    parser.add_argument(
        "--labels",
        metavar="PATH",
        help="with --data X.npy: a .npy of N integer labels in [0, K) (default: y.npy beside X)",
    )
    parser.add_argument(
        "--optimizer", default="adam", choices=names, metavar="NAME", help=f"one of {names}"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: per optimizer)"
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="number of epochs")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"minibatch size (default {DEFAULT_BATCH_SIZE}; full batch for lbfgs/newton-cg)",
    )
    parser.add_argument("--l2", type=float, default=DEFAULT_L2, help="L2 penalty on W")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and shuffling")
    parser.add_argument(
        "--test-size", type=float, default=0.25, help="fraction held out for testing"
    )
    parser.add_argument(
        "--no-standardize", action="store_true", help="do not standardise the features"
    )
    parser.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save a checkpoint every epoch and resume from the latest one there",
    )
    parser.add_argument("--save", metavar="PATH", help="write the model to an .npz (W, b)")
    parser.add_argument("--plot", metavar="PNG", help="write loss/accuracy curves")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(args: argparse.Namespace):
    from ._data import DataError, load_digits, load_file, split

    try:
        if args.data is None:
            return load_digits(
                test_size=args.test_size, seed=args.seed, standardize=not args.no_standardize
            )
        X, codes, classes = load_file(args.data)
        return split(
            X,
            codes,
            classes,
            name=args.data,
            test_size=args.test_size,
            seed=args.seed,
            standardize=not args.no_standardize,
        )
    except DataError as e:
        raise CLIError(str(e)) from None


def _check_args(args: argparse.Namespace) -> None:
    if args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.lr is not None and not args.lr > 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    if not args.l2 >= 0:
        raise CLIError(f"--l2 must be >= 0, got {args.l2}")
    if not 0 < args.test_size < 1:
        raise CLIError(f"--test-size must lie in (0, 1), got {args.test_size}")
    full = args.optimizer in FULL_BATCH_SOLVERS
    if full and args.lr is not None:
        raise CLIError(f"--lr does not apply to {args.optimizer} (its line search sets the step)")
    for opt in ("save", "plot"):
        path = getattr(args, opt)
        if path is not None:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise CLIError(f"--{opt} {path}: directory {folder} does not exist")


def plot_history(history: dict, path: str, *, title: str = "") -> None:
    """Writes loss and accuracy curves per epoch (train, and eval when present) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history["epoch"]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    ax_l.plot(epochs, history["loss"], label="train objective")
    if any(v is not None for v in history["eval_loss"]):
        ax_l.plot(epochs, history["eval_loss"], label="test NLL")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.set_yscale("log")
    ax_l.legend()
    ax_a.plot(epochs, history["train_accuracy"], label="train")
    if any(v is not None for v in history["eval_accuracy"]):
        ax_a.plot(epochs, history["eval_accuracy"], label="test")
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("accuracy")
    ax_a.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_cli(args: argparse.Namespace) -> int:
    """Runs ``softmax-jax train``; returns the exit code."""
    _check_args(args)
    if args.data is not None and args.data.endswith(".npy"):
        return _run_streamed(args)
    ds = _load(args)

    import jax
    import jax.numpy as jnp

    from ._check import check_grad
    from ._checkpoint import CheckpointError
    from ._fit import TrainingDiverged, fit

    full = args.optimizer in FULL_BATCH_SOLVERS
    batch_size = args.batch_size if args.batch_size is not None else None
    if not full and batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
    n, d = ds.X_train.shape
    k = ds.classes.size
    print(
        f"data: {ds.name}: {n} train / {ds.X_test.shape[0]} test samples, {d} features, "
        f"{k} classes; optimizer {args.optimizer}, {args.epochs} epochs",
        flush=True,
    )
    try:
        params, history = fit(
            ds.X_train.astype(np.float32),
            ds.y_train,
            optimizer=args.optimizer,
            learning_rate=args.lr,
            epochs=args.epochs,
            batch_size=batch_size,
            l2=args.l2,
            seed=args.seed,
            num_classes=k,
            eval_data=(ds.X_test.astype(np.float32), ds.y_test),
            checkpoint_dir=args.checkpoint_dir,
            progress=not args.no_progress,
        )
    except TrainingDiverged as e:
        raise CLIError(str(e)) from None
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:
        raise CLIError(str(e)) from None

    W = np.asarray(params["W"])
    b = np.asarray(params["b"])
    if history["epoch"]:
        print(f"final objective: {history['loss'][-1]:.6g}  ({len(history['epoch'])} epochs)")
    train_acc = float(np.mean(np.argmax(ds.X_train @ W + b, axis=1) == ds.y_train))
    test_acc = float(np.mean(np.argmax(ds.X_test @ W + b, axis=1) == ds.y_test))
    print(f"train accuracy: {train_acc:.4f}")
    print(f"test accuracy: {test_acc:.4f}")

    # Gradient cross-check at the trained parameters: eq. (6) vs jax.grad of eq. (2), on the
    # training set with the bias as an extra row of W (Z augmented with ones). In float64: near
    # an optimum the gradient is a small difference of large terms, which float32 cannot resolve
    # to the check's normwise tolerance.
    with jax.enable_x64(True):
        W1 = jnp.asarray(np.vstack([W, b[None, :]]), jnp.float64)
        Z1 = jnp.asarray(np.hstack([ds.X_train, np.ones((n, 1))]), jnp.float64)
        report = check_grad(
            W1, Z1, jnp.asarray(ds.y_train), reduction="mean", case="trained [W; b], train set"
        )
    print(f"gradient check (hand-written eq. (6) vs jax.grad): {report}")

    if args.save:
        np.savez(args.save, W=W, b=b, classes=ds.classes)
        print(f"saved W {W.shape} and b {b.shape} to {args.save}")
    if args.plot:
        plot_history(history, args.plot, title=f"softmax regression on {ds.name}")
        print(f"wrote {args.plot}")
    return 0 if report.passed else 1


def _run_streamed(args: argparse.Namespace) -> int:
    """``--data X.npy``: ``fit(..., stream=True)`` over ``X`` memory-mapped, labels from
    ``--labels``. The features are used as stored (no split, no standardisation: each would be
    a pass over data that need not fit in memory); the accuracy is the training one, as seen
    during the last epoch."""
    from ._checkpoint import CheckpointError
    from ._fit import TrainingDiverged, fit

    labels = args.labels or os.path.join(os.path.dirname(os.path.abspath(args.data)), "y.npy")
    try:
        X = np.load(args.data, mmap_mode="r")
        y = np.load(labels, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CLIError(f"--data {args.data} / --labels {labels}: {e}") from None
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise CLIError(
            f"--data must hold an (N, D) array and --labels (N,) labels, got {X.shape} and {y.shape}"
        )
    n, d = X.shape
    print(f"data: {args.data} streamed (memmap): {n} samples, {d} features; labels {labels}")
    try:
        params, history = fit(
            X, np.asarray(y), optimizer=args.optimizer, learning_rate=args.lr,
            epochs=args.epochs, batch_size=args.batch_size or DEFAULT_BATCH_SIZE, l2=args.l2,
            seed=args.seed, checkpoint_dir=args.checkpoint_dir, progress=not args.no_progress,
            stream=True,
        )  # fmt: skip
    except (TrainingDiverged, CheckpointError, ValueError) as e:
        raise CLIError(str(e)) from None
    if history["epoch"]:
        print(f"final objective: {history['loss'][-1]:.6g}  ({len(history['epoch'])} epochs)")
        print(f"train accuracy (last epoch, as trained): {history['train_accuracy'][-1]:.4f}")
    if args.save:
        W, b = np.asarray(params["W"]), np.asarray(params["b"])
        np.savez(args.save, W=W, b=b, classes=np.arange(W.shape[1]))
        print(f"saved W {W.shape} and b {b.shape} to {args.save}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from ._cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
