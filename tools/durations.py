"""Regenerates ``tests/slow_tests.json``: the tests that take longer than a limit, from a
``pytest --durations=0`` report (setup, call and teardown summed per test).

    python -m pytest -n 2 --durations=0 > durations.txt
    python tools/durations.py durations.txt            # tests over 1 s
    python tools/durations.py durations.txt --limit 2
    python tools/durations.py fast.txt --merge         # a run of the fast subset: adds to the list

``tests/conftest.py`` marks the tests listed there ``slow`` (with every test of their xdist group,
so that a module fixture that takes long does not run in the fast subset either). The fast subset,
``pytest -m "not slow and not multiprocess"``, is what is left.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "slow_tests.json"
LINE = re.compile(r"^\s*([0-9.]+)s\s+(setup|call|teardown)\s+(\S+)\s*$")


def parse(text: str) -> dict[str, float]:
    """Seconds per test id (xdist's ``@group`` suffix removed) from a ``--durations`` report."""
    seconds: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            seconds[m.group(3).split("@", 1)[0]] += float(m.group(1))
    return dict(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the output of pytest --durations=0")
    parser.add_argument("--limit", type=float, default=1.0, help="seconds (default 1.0)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the listed tests the report does not time (a report of part of the suite)",
    )
    args = parser.parse_args(argv)
    seconds = parse(args.report.read_text())
    if not seconds:
        parser.error(f"no durations in {args.report}: run pytest with --durations=0")
    slow = {k: round(v, 2) for k, v in seconds.items() if v > args.limit}
    if args.merge and OUT.is_file():
        listed = json.loads(OUT.read_text())["tests"]
        slow = {**{k: v for k, v in listed.items() if k not in seconds}, **slow}
    slow = dict(sorted(slow.items()))
    OUT.write_text(json.dumps({"limit_s": args.limit, "tests": slow}, indent=1) + "\n")
    fast = sum(v for v in seconds.values() if v <= args.limit)
    over = sum(v > args.limit for v in seconds.values())
    print(
        f"{over} of the {len(seconds)} tests timed over {args.limit} s; {len(slow)} listed -> {OUT}"
    )
    print(f"the rest: {fast:.0f} s of test time in all ({sum(seconds.values()):.0f} s measured)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
