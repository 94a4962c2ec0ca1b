"""What every ``softmax-jax`` subcommand shares: the program name, the one-line user error
(:class:`CLIError`), the parser and help layout, and ``--device``.

The subcommand modules import from here, and :mod:`softmax_jax._cli` (which dispatches to them)
too: imports point one way, with no cycle back to ``_cli``.
"""

from __future__ import annotations

import argparse
import re

from ._version import package_version

PROG = "softmax-jax"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``softmax-jax train: error: ... (see --help)``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples laid out as written; wide enough for the option lists."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=100)


def select_device(name: str | None) -> None:
    """Makes ``name`` (``cpu``/``gpu``) JAX's default device before any array is created."""
    if name is None:
        return
    import jax

    try:
        devices = jax.devices(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name}: no {name} device available to JAX ({e})") from None
    jax.config.update("jax_default_device", devices[0])


def add_device_argument(parser: argparse.ArgumentParser, extra: str = "") -> None:
    """``--device cpu|gpu``, shared by every subcommand and applied by ``main``."""
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default=None,
        help=f"JAX device to run on (default: JAX's default){extra}",
    )


def version() -> str:
    return package_version()


#: Python argument names of fit, as the flags that set them (for errors raised inside fit).
FLAG_OF = {
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "learning_rate": "--lr",
    "l2": "--l2",
    "seed": "--seed",
    "checkpoint_dir": "--checkpoint-dir",
    "checkpoint_every": "--checkpoint-every",
    "optimizer": "--optimizer",
}


def as_flags(message: str) -> str:
    """An error of fit with its Python argument names as the flags: ```batch_size``` (quoted)
    and ``checkpoint_dir`` (a bare name with an underscore) as ``--batch-size``,
    ``--checkpoint-dir``."""
    for name, flag in FLAG_OF.items():
        message = message.replace(f"`{name}`", flag)
        if "_" in name:
            message = re.sub(rf"(?<![\w-]){name}\b", flag, message)
    return message
