"""The ``softmax-jax`` command line: ``train``, ``predict``, ``check`` and ``bench``.

Each subcommand lives in its own module (``_cli_train``, ``_cli_predict``, ``_cli_check``,
``_cli_bench``); heavy dependencies (scikit-learn, matplotlib, orbax) are imported only by the
commands that use them. Every expected user error (a missing file, bad data, a bad flag value, a
missing optional dependency) prints one line ``softmax-jax <cmd>: error: ...`` naming the file,
flag or value, and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "softmax-jax"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``softmax-jax train: error: ... (see --help)``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples laid out as written; wide enough for the option lists."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=100)


def _select_device(name: str | None) -> None:
    """Makes ``name`` (``cpu``/``gpu``) JAX's default device before any array is created."""
    if name is None:
        return
    import jax

    try:
        devices = jax.devices(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name}: no {name} device available to JAX ({e})") from None
    jax.config.update("jax_default_device", devices[0])


def _add_device_argument(parser: argparse.ArgumentParser, extra: str = "") -> None:
    """``--device cpu|gpu``, shared by every subcommand and applied by :func:`main`."""
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default=None,
        help=f"JAX device to run on (default: JAX's default){extra}",
    )


def _version() -> str:
    from . import __version__

    return __version__


def _subparser(sub, name: str, *, help: str, description: str, examples: str):
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=_Formatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Softmax regression with a hand-written, jit-compiled eq. (6) gradient:\n"
        "train a model, predict with it, cross-check the gradient against jax.grad, benchmark.",
        epilog="examples:\n"
        f"  {PROG} train                           # the built-in digits: progress, accuracy\n"
        f"  {PROG} train --data data.csv --save model.npz\n"
        f"  {PROG} predict --model model.npz --data data.csv --out predictions.csv\n"
        f"  {PROG} <command> --help                # the options and defaults of a command",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(
        dest="command", metavar="{train,predict,check,bench}", parser_class=_Parser
    )
    sub.required = True

    from . import _cli_bench, _cli_check, _cli_predict, _cli_train

    p_train = _subparser(
        sub,
        "train",
        help="train softmax regression (default: scikit-learn's digits)",
        description=_cli_train.DESCRIPTION,
        examples=_cli_train.EXAMPLES,
    )
    _cli_train.add_arguments(p_train)
    _add_device_argument(p_train)
    p_train.set_defaults(run=_cli_train.run_cli, on_interrupt=_cli_train.interrupted)

    p_predict = _subparser(
        sub,
        "predict",
        help="predict with a model saved by `train --save`, on raw features",
        description=_cli_predict.DESCRIPTION,
        examples=_cli_predict.EXAMPLES,
    )
    _cli_predict.add_arguments(p_predict)
    _add_device_argument(p_predict)
    p_predict.set_defaults(run=_cli_predict.run_cli)

    p_check = _subparser(
        sub,
        "check",
        help="cross-check the hand-written gradient against jax.grad, as a table",
        description="The hand-written gradient of eq. (6) against jax.grad of eq. (2), per "
        "dtype and case (labels, targets, weights, extreme logits): a table of max abs/rel "
        "errors and pass/fail; exit code 1 if any case fails.",
        examples=f"  {PROG} check\n  {PROG} check --quick --dtypes float32",
    )
    _cli_check.add_arguments(p_check)
    _add_device_argument(p_check)
    p_check.set_defaults(run=_cli_check.run_cli)

    p_bench = _subparser(
        sub,
        "bench",
        help="run the benchmark suite of bench/",
        description=_cli_bench.DESCRIPTION,
        examples=_cli_bench.EXAMPLES,
    )
    _cli_bench.add_arguments(p_bench)
    _add_device_argument(p_bench, "; GPU results are saved as *_gpu.json")
    p_bench.set_defaults(run=_cli_bench.run_cli)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _select_device(getattr(args, "device", None))
        return int(args.run(args) or 0)
    except CLIError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        on_interrupt = getattr(args, "on_interrupt", None)
        detail = on_interrupt(args) if on_interrupt is not None else ""
        print(f"{PROG} {args.command}: interrupted{detail}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # `python -m softmax_jax._cli` runs this file as __main__, a second copy of the module whose
    # CLIError the subcommands do not raise: dispatch through the package's copy instead.
    from softmax_jax._cli import main as _main

    sys.exit(_main())
