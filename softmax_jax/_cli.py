"""The ``softmax-jax`` command line: ``train``, ``check`` and ``bench``.

Each subcommand lives in its own module (``_cli_train``, ``_cli_check``, ``_cli_bench``), imported
lazily so ``softmax-jax check`` does not pay for scikit-learn or matplotlib. Expected user errors
(a missing file, bad data) print one line ``softmax-jax <cmd>: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softmax-jax",
        description="Softmax regression with a hand-written, jit-compiled eq. (6) gradient.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,check,bench}")
    sub.required = True

    from . import _cli_check

    p_check = sub.add_parser(
        "check", help="cross-check the hand-written gradient against jax.grad, as a table"
    )
    _cli_check.add_arguments(p_check)
    _add_device_argument(p_check)
    p_check.set_defaults(run=_cli_check.run_cli)

    from . import _cli_bench, _cli_train

    p_train = sub.add_parser("train", help="train softmax regression (default: sklearn digits)")
    _cli_train.add_arguments(p_train)
    _add_device_argument(p_train)
    p_train.set_defaults(run=_cli_train.run_cli)

    p_bench = sub.add_parser("bench", help="run the benchmark suite of bench/")
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
        print(f"softmax-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"softmax-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # `python -m softmax_jax._cli` runs this file as __main__, a second copy of the module whose
    # CLIError the subcommands do not raise: dispatch through the package's copy instead.
    from softmax_jax._cli import main as _main

    sys.exit(_main())
