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

from ._cli_common import (
    PROG,
    CLIError,
    Formatter,
    Parser,
    add_device_argument,
    select_device,
    version,
)

__all__ = ["PROG", "CLIError", "build_parser", "main"]


def _subparser(sub, name: str, *, help: str, description: str, examples: str):
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=Formatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Softmax regression with a hand-written, jit-compiled eq. (6) gradient:\n"
        "train a model, predict with it, cross-check the gradient against jax.grad, benchmark.",
        epilog="examples:\n"
        f"  {PROG} train                           # the built-in digits: progress, accuracy\n"
        f"  {PROG} train --data data.csv --save model.npz\n"
        f"  {PROG} predict --model model.npz --data data.csv --out predictions.csv\n"
        f"  {PROG} <command> --help                # the options and defaults of a command",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(
        dest="command", metavar="{train,predict,check,bench}", parser_class=Parser
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
    add_device_argument(p_train)
    p_train.set_defaults(run=_cli_train.run_cli, on_interrupt=_cli_train.interrupted)

    p_predict = _subparser(
        sub,
        "predict",
        help="predict with a model saved by `train --save`, on raw features",
        description=_cli_predict.DESCRIPTION,
        examples=_cli_predict.EXAMPLES,
    )
    _cli_predict.add_arguments(p_predict)
    add_device_argument(p_predict)
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
    add_device_argument(p_check)
    p_check.set_defaults(run=_cli_check.run_cli)

    p_bench = _subparser(
        sub,
        "bench",
        help="run the benchmark suite of bench/",
        description=_cli_bench.DESCRIPTION,
        examples=_cli_bench.EXAMPLES,
    )
    _cli_bench.add_arguments(p_bench)
    add_device_argument(p_bench, "; GPU results are saved as *_gpu.json")
    p_bench.set_defaults(run=_cli_bench.run_cli)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        select_device(getattr(args, "device", None))
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
    sys.exit(main())
