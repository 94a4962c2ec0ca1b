"""``softmax-jax check``: the autodiff cross-check of :mod:`softmax_jax._check` as a table."""

from __future__ import annotations

import argparse
import time

import jax

from ._check import TOLERANCES, format_table, standard_cases
from ._cli_common import CLIError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed of the problems")
    parser.add_argument(
        "--dtypes",
        default="float64,float32,bfloat16,float16",
        help="comma-separated input dtypes to check (default: float64,float32,bfloat16,float16)",
    )
    parser.add_argument("--quick", action="store_true", help="only the two smallest sizes")


def run_cli(args: argparse.Namespace) -> int:
    dtypes = tuple(t.strip() for t in args.dtypes.split(",") if t.strip())
    for dt in dtypes:
        if dt not in TOLERANCES:
            raise CLIError(f"--dtypes: unknown dtype {dt!r}; choose from {', '.join(TOLERANCES)}")
    start = time.perf_counter()
    reports = list(standard_cases(args.seed, dtypes, quick=args.quick))
    print(format_table(reports))
    failed = [r for r in reports if not r.passed]
    print(
        f"\n{len(reports) - len(failed)} passed, {len(failed)} failed "
        f"({time.perf_counter() - start:.1f} s, device {jax.devices()[0].platform})"
    )
    return 1 if failed else 0
