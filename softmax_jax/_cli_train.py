"""``softmax-jax train``: train softmax regression from the command line.

With no arguments it trains on scikit-learn's digits (75/25 stratified split, standardised with
the training statistics), shows a progress bar, prints train and test accuracy and the gradient
cross-check of the trained model. ``--save`` writes a model file (preprocessing, classes, ``W``,
``b``, provenance) that ``softmax-jax predict`` and ``softmax_jax.load_model`` apply to raw
features. Bad input is reported on one line naming the file, flag or value (exit code 2).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import signal
import sys
import threading

import numpy as np

from ._cli_common import PROG, CLIError, as_flags
from ._cli_train_stream import run_streamed
from ._minibatch import DEFAULT_BATCH_SIZE, OPTIMIZERS
from ._solvers import FULL_BATCH_SOLVERS

# The command line's defaults: chosen for the built-in digits (1347 training samples) and small
# CSV files, where fit's library default of 10 epochs stops short. --help states both. The
# batch size is fit's (DEFAULT_BATCH_SIZE of _minibatch).
DEFAULT_EPOCHS = 30
DEFAULT_L2 = 1e-4
DEFAULT_TEST_SIZE = 0.25
EXTRA = "pip install 'softmax-jax[cli]'"

DESCRIPTION = """\
Train softmax regression (multinomial logistic regression) with optax and the hand-written
gradient of eq. (6). Without --data it trains on scikit-learn's digits. The data are split into
train and test sets (stratified, --test-size), standardised with the training split's mean and
std (unless --no-standardize), and trained with --optimizer; it prints the train and test
accuracy and the gradient cross-check at the trained parameters (exit code 1 if it fails).

--save writes a model file (an .npz, at exactly the path given) with the standardisation, the
class labels, W, b and how it was trained: `softmax-jax predict` and softmax_jax.load_model apply
it to raw features. With --checkpoint-dir a run that is interrupted (Ctrl-C, a kill) resumes from
its latest checkpoint when the same command is run again.

Defaults differ from softmax_jax.fit's where noted: they suit small datasets like digits."""

EXAMPLES = f"""\
  {PROG} train                                   # digits, adam, 30 epochs, progress bar
  {PROG} train --data data.csv --save model.npz   # label in the last column of the CSV
  {PROG} train --data data.npz --optimizer lbfgs --l2 1e-3 --plot curves.png
  {PROG} train --checkpoint-dir ckpt --epochs 100 --checkpoint-every 5   # Ctrl-C, re-run: resumes
"""


def _fit_default(name: str):
    from ._fit import fit

    return inspect.signature(fit).parameters[name].default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``train`` options to ``parser``: data, training, checkpoints and outputs."""
    _add_data_arguments(parser)
    _add_training_arguments(parser)
    _add_output_arguments(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        metavar="PATH",
        help=".npz with arrays X (N, D) and y (N,), or .csv with the integer label in the last "
        "column, an optional header row (default: scikit-learn's digits); or a .npy X (N, D), "
        "streamed from disk (memory-mapped) with its labels in --labels",
    )
    parser.add_argument(
        "--labels",
        metavar="PATH",
        help="with --data X.npy: a .npy of N labels, or an .npz with y (default: y.npy beside X)",
    )
    parser.add_argument(
        "--test-size",
        type=float,
        default=DEFAULT_TEST_SIZE,
        metavar="F",
        help=f"fraction held out for testing, in (0, 1) (default: {DEFAULT_TEST_SIZE})",
    )
    parser.add_argument(
        "--no-standardize",
        action="store_true",
        help="train on the features as they are (default: standardise with the training split's "
        "mean and std, saved in the model)",
    )


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    names = (*OPTIMIZERS, *FULL_BATCH_SOLVERS)
    lrs = ", ".join(f"{k} {v[1]:g}" for k, v in OPTIMIZERS.items())
    parser.add_argument(
        "--optimizer",
        default="adam",
        choices=names,
        metavar="NAME",
        help=f"one of {', '.join(names)}; lbfgs and newton-cg are full-batch solvers, one "
        "iteration per epoch (default: adam, as fit)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        metavar="F",
        help=f"learning rate (default per optimizer, as fit: {lrs}); not for lbfgs/newton-cg",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        metavar="N",
        help=f"number of epochs, counting those restored from --checkpoint-dir "
        f"(default: {DEFAULT_EPOCHS}; fit's is {_fit_default('epochs')})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help=f"minibatch size (default: {DEFAULT_BATCH_SIZE}, as fit); not for lbfgs/newton-cg, "
        "which use all samples",
    )
    parser.add_argument(
        "--l2",
        type=float,
        default=DEFAULT_L2,
        metavar="F",
        help=f"L2 penalty λ/2·‖W‖² on W (default: {DEFAULT_L2:g}; fit's is {_fit_default('l2')})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the split and the shuffling, 0 <= N < 2**32 (default: 0, as fit)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save checkpoints in DIR and resume from the latest one there (it must hold this "
        "run: same data and settings); needs orbax-checkpoint (the cli extra)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=_fit_default("checkpoint_every"),
        metavar="N",
        help="with --checkpoint-dir: save every N epochs and after the last one; an interrupted "
        "run loses at most N epochs. A save is synchronous and can take longer than a short "
        f"epoch: raise N for small data (default: {_fit_default('checkpoint_every')}, as fit)",
    )
    parser.add_argument(
        "--save",
        metavar="PATH",
        help="write the model file (standardisation, classes, W, b, provenance; an .npz archive) "
        "to exactly PATH: no extension is added",
    )
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="write loss/accuracy curves as a PNG to exactly PNG (needs matplotlib)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


#: The distribution that provides each optional module.
PACKAGE_OF = {"sklearn": "scikit-learn", "orbax.checkpoint": "orbax-checkpoint"}


def _require(module: str, what: str) -> None:
    """A missing optional dependency, named with the extra that installs it, before training."""
    try:
        importlib.import_module(module)
    except ImportError:
        package = PACKAGE_OF.get(module, module)
        raise CLIError(f"{what} needs {package}, which is not installed: {EXTRA}") from None


def _check_args(args: argparse.Namespace) -> None:
    full = args.optimizer in FULL_BATCH_SOLVERS
    if args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size is not None:
        if full:
            raise CLIError(
                f"--batch-size does not apply to {args.optimizer}, a full-batch solver (every "
                f"iteration uses all samples); drop it, or choose a minibatch --optimizer"
            )
        if args.batch_size < 1:
            raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.lr is not None:
        if full:
            raise CLIError(
                f"--lr does not apply to {args.optimizer} (its line search sets the step)"
            )
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise CLIError(f"--lr must be a finite number > 0, got {args.lr}")
    if not (math.isfinite(args.l2) and args.l2 >= 0):
        raise CLIError(f"--l2 must be a finite number >= 0, got {args.l2}")
    if not 0 <= args.seed < 2**32:
        raise CLIError(f"--seed must lie in [0, 2**32), got {args.seed}")
    if not 0 < args.test_size < 1:
        raise CLIError(f"--test-size must lie in (0, 1), got {args.test_size}")
    if args.checkpoint_every < 1:
        raise CLIError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.checkpoint_dir is not None and os.path.exists(args.checkpoint_dir):
        if not os.path.isdir(args.checkpoint_dir):
            raise CLIError(f"--checkpoint-dir {args.checkpoint_dir}: exists and is not a directory")
    for opt in ("save", "plot"):
        path = getattr(args, opt)
        if path is not None:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise CLIError(f"--{opt} {path}: directory {folder} does not exist")
            if os.path.isdir(path):
                raise CLIError(f"--{opt} {path}: is a directory, expected a file name")
    # Optional dependencies, before any data is read or any epoch runs.
    if args.data is None:
        _require("sklearn", "training on the built-in digits (no --data)")
    if args.plot is not None:
        _require("matplotlib", "--plot")
    if args.checkpoint_dir is not None:
        _require("orbax.checkpoint", "--checkpoint-dir")


def _load(args: argparse.Namespace):
    from ._data import DataError, load_digits, load_file, split

    notes: list[str] = []
    try:
        if args.data is None:
            return load_digits(
                test_size=args.test_size, seed=args.seed, standardize=not args.no_standardize
            )
        X, codes, classes = load_file(args.data, notes=notes)
        for note in notes:
            print(f"note: {note}", flush=True)
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
        raise CLIError(str(e).replace("test size", "--test-size")) from None


def plot_history(history: dict, path: str, *, title: str = "") -> None:
    """Writes loss and accuracy curves per epoch (train, and eval when present) to ``path`` as a
    PNG (exactly that name)."""
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
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _checkpoint_steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


class _StopOnCtrlC:
    """A first Ctrl-C (SIGINT) asks ``fit`` to stop after the current epoch (its checkpoint
    saved, the checkpointer closed) and is raised as ``KeyboardInterrupt`` once ``fit`` has
    returned; a second one interrupts at once. A ``KeyboardInterrupt`` raised anywhere inside
    JAX or orbax could leave orbax's writer threads blocking the interpreter's exit."""

    def __init__(self):
        self.caught: list[int] = []
        self._previous = None

    def requested(self, epoch, params, record) -> bool:  # fit's callback
        del epoch, params, record
        return bool(self.caught)

    def _handler(self, signum, frame):
        del frame
        self.caught.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one: at once

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.caught and exc[0] is None:
            raise KeyboardInterrupt


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves behind, appended to the ``interrupted`` line."""
    if args.checkpoint_dir is None:
        return " (no --checkpoint-dir: nothing was saved)"
    steps = _checkpoint_steps(args.checkpoint_dir)
    if not steps:
        return f"; no checkpoint was written yet in {args.checkpoint_dir}"
    return (
        f"; the checkpoints in {args.checkpoint_dir} were kept (latest: epoch {steps[-1]}): run "
        "the same command again to resume from there"
    )


def _early_stop(args, history) -> str | None:
    """Why a full-batch solver stopped before --epochs, or ``None``."""
    done = history["epoch"][-1] if history["epoch"] else 0
    if args.optimizer not in FULL_BATCH_SOLVERS or done >= args.epochs:
        return None
    gmax = history["grad_max"][-1]
    return (
        f"{args.optimizer} stopped at iteration {done} of {args.epochs}: its line search found no "
        f"further decrease of the objective (max |∇f| = {gmax:.3g}): converged to the precision "
        "of float32"
    )


def _provenance(args, ds, history, batch_size, n: int, d: int, k: int) -> dict:
    return {
        "trained_by": "softmax-jax train",
        "data": ds.name,
        "n_samples": n,
        "n_features": d,
        "n_classes": k,
        "optimizer": args.optimizer,
        "learning_rate": args.lr,
        "epochs": len(history["epoch"]),
        "batch_size": batch_size,
        "l2": args.l2,
        "seed": args.seed,
        "test_size": args.test_size,
    }


def _gradient_check(W: np.ndarray, b: np.ndarray, ds):
    """Eq. (6) vs jax.grad of eq. (2) at the trained parameters, on the training set with the bias
    as an extra row of W (Z augmented with ones). In float64: near an optimum the gradient is a
    small difference of large terms, which float32 cannot resolve to the check's tolerance."""
    import jax
    import jax.numpy as jnp

    from ._check import check_grad

    n = ds.X_train.shape[0]
    with jax.enable_x64(True):
        W1 = jnp.asarray(np.vstack([W, b[None, :]]), jnp.float64)
        Z1 = jnp.asarray(np.hstack([ds.X_train, np.ones((n, 1))]), jnp.float64)
        return check_grad(
            W1, Z1, jnp.asarray(ds.y_train), reduction="mean", case="trained [W; b], train set"
        )


def run_cli(args: argparse.Namespace) -> int:
    """Runs ``softmax-jax train``; returns the exit code."""
    _check_args(args)
    if args.data is not None and args.data.endswith(".npy"):
        return run_streamed(args)
    ds = _load(args)

    from ._checkpoint import CheckpointError
    from ._fit import TrainingDiverged, fit
    from ._model import Model, predict, save_model

    full = args.optimizer in FULL_BATCH_SOLVERS
    batch_size = args.batch_size
    if not full and batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
    n, d = ds.X_train.shape
    k = ds.classes.size
    print(
        f"data: {ds.name}: {n} train / {ds.X_test.shape[0]} test samples, {d} features, "
        f"{k} classes; optimizer {args.optimizer}, {args.epochs} epochs",
        flush=True,
    )
    if args.no_progress:  # fit's notices (resuming from a checkpoint) go to the log
        import logging

        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("softmax_jax")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        propagate, logger.propagate = logger.propagate, False  # printed once, not again by root
    stop = _StopOnCtrlC()
    try:
        with stop:
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
                checkpoint_every=args.checkpoint_every,
                progress=not args.no_progress,
                callback=stop.requested,
            )
    except (TrainingDiverged, CheckpointError, ValueError, TypeError) as e:
        raise CLIError(as_flags(str(e))) from None
    finally:
        if args.no_progress:
            logger.removeHandler(handler)
            logger.propagate = propagate

    W = np.asarray(params["W"])
    b = np.asarray(params["b"])
    if history["epoch"]:
        print(f"final objective: {history['loss'][-1]:.6g}  ({len(history['epoch'])} epochs)")
    why = _early_stop(args, history)
    if why:
        print(why)
    train_acc = float(np.mean(np.asarray(predict(params, ds.X_train)) == ds.y_train))
    test_acc = float(np.mean(np.asarray(predict(params, ds.X_test)) == ds.y_test))
    print(f"train accuracy: {train_acc:.4f}")
    print(f"test accuracy: {test_acc:.4f}")

    report = _gradient_check(W, b, ds)
    print(f"gradient check (hand-written eq. (6) vs jax.grad): {report}")

    if args.save:
        info = _provenance(args, ds, history, batch_size, n, d, k)
        info.update(train_accuracy=train_acc, test_accuracy=test_acc)
        model = Model(W, b, ds.classes, mean=ds.mean, std=ds.std, info=info)
        written = save_model(args.save, model)
        prep = "standardisation" if ds.mean is not None else "no preprocessing"
        print(f"wrote the model ({prep}, {k} classes, W {W.shape}, b {b.shape}) to {written}")
    if args.plot:
        plot_history(history, args.plot, title=f"softmax regression on {ds.name}")
        print(f"wrote the curves to {args.plot}")
    return 0 if report.passed else 1
