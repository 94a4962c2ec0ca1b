"""``softmax-jax bench``: runs the benchmark suites of ``bench/`` (grad, head, train, scaling).

The suites are scripts of the source tree, not part of the library: the command finds ``bench/``
beside the package (an editable install or a checkout), inside it as ``softmax_jax/_bench`` (a
wheel that ships it), or where ``$SOFTMAX_JAX_BENCH_DIR`` points. Results go to
``./bench_results`` (or ``--out DIR``), never into a checkout's committed ``bench/results``
unless ``--out`` names it; each suite runs in its own process and a failing one does not stop the
others.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._cli_common import PROG, CLIError

BENCH_DIR_ENV = "SOFTMAX_JAX_BENCH_DIR"
DEFAULT_OUT = "bench_results"

DESCRIPTION = f"""\
Run the benchmark suites of bench/ (grad, head, train, scaling, and parallel where present), each
in its own process: tables on the terminal, JSON (and PNG) results in ./{DEFAULT_OUT} or --out
DIR. The committed results of a checkout (bench/results, which the README quotes) are written
only when --out names them. Timings depend on the machine and its load: see the JSON's
"machine" entry."""

EXAMPLES = f"""\
  {PROG} bench --quick                         # a few minutes; results in ./{DEFAULT_OUT}
  {PROG} bench --only grad,head --out /tmp/results
  {PROG} bench --out bench/results             # refresh a checkout's committed results
  {PROG} bench --report                        # the committed results as Markdown tables
"""


def find_bench_dir() -> Path:
    """The ``bench/`` folder holding ``run.py``; a :class:`CLIError` saying where it looked."""
    here = Path(__file__).resolve().parent
    candidates = []
    if os.environ.get(BENCH_DIR_ENV):
        candidates.append(Path(os.environ[BENCH_DIR_ENV]).expanduser())
    candidates += [here.parent / "bench", here / "_bench"]
    for path in candidates:
        if (path / "run.py").is_file() and (path / "_common.py").is_file():
            return path.resolve()
    looked = ", ".join(str(p) for p in candidates)
    raise CLIError(
        f"cannot find the benchmark suites (a bench/ folder with run.py); looked in {looked}. "
        "They ship with the source tree: run from a checkout installed with "
        f"`pip install -e .`, or set {BENCH_DIR_ENV}=/path/to/softmax_jax/bench"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="smaller shapes and fewer repeats (a few minutes)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="SUITE",
        help="run only these suites (repeatable, or a comma list): grad, head, train, scaling"
        " (and parallel where bench/parallel.py exists)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"write the results here (default: ./{DEFAULT_OUT}; --out bench/results replaces a "
        "checkout's committed results)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the smallest shapes, seconds per suite: checks the machinery, not the machine",
    )
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument(
        "--report",
        action="store_true",
        help="print saved results (--out DIR, default: the committed bench/results) as Markdown "
        "tables and exit",
    )


def run_cli(args: argparse.Namespace) -> int:
    bench_dir = find_bench_dir()
    import importlib.util

    spec = importlib.util.spec_from_file_location("_softmax_jax_bench_run", bench_dir / "run.py")
    assert spec is not None and spec.loader is not None
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)

    available = runner.available_suites(bench_dir)
    if args.report:
        print(runner.report_markdown(args.out if args.out is not None else bench_dir / "results"))
        return 0
    if args.list:
        for name in available:
            print(name)
        return 0
    names = runner.parse_only(args.only)
    if names is None:
        names = runner.default_suites(bench_dir)
    else:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise CLIError(
                f"--only: unknown suite {', '.join(unknown)}; available: {', '.join(available)}"
            )
    out = args.out
    if out is None:
        # Never the committed bench/results of a checkout (nor site-packages for a wheel).
        out = Path.cwd() / DEFAULT_OUT
        print(f"softmax-jax bench: results go to {out} (use --out DIR to choose)", flush=True)
    statuses = runner.run_suites(
        names,
        quick=args.quick,
        tiny=args.tiny,
        device=args.device,
        out_dir=out,
        bench_dir=bench_dir,
    )
    failed = [name for name, st in statuses.items() if not st["ok"]]
    if failed:
        print(f"softmax-jax bench: {len(failed)} suite(s) failed: {', '.join(failed)}")
        return 1
    return 0
