"""The suite runner behind ``softmax-jax bench``: runs each suite of bench/ in its own process.

A suite is a module ``bench/<name>.py`` with ``run(quick: bool) -> dict`` that prints its table
and normally writes ``<out>/<name>.json`` itself (through ``bench._common.write_json``); if it
only returns its results, the runner writes them. Each suite runs in a fresh Python process, so
one that crashes, runs out of memory or needs its own ``XLA_FLAGS`` (``parallel``) cannot take
the others down or skew them; every suite runs, failures are listed at the end and make the exit
status non-zero.

Run: ``python bench/run.py [--quick] [--only grad,scaling] [--device cpu|gpu] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
#: The suites, in the order they run; ``parallel`` only where ``bench/parallel.py`` exists.
SUITES = ("grad", "head", "train", "scaling", "stream", "sparse")
OPTIONAL_SUITES = ("parallel",)
_NOT_SUITES = {"run", "__init__"}


def load_bench_package(bench_dir: Path = BENCH_DIR):
    """Imports ``bench_dir`` as the package ``bench`` whatever the folder is called or where it
    lies (a source tree, or a copy shipped inside the wheel), so ``from bench import _common``
    works in every suite (``bench/_bench_package.py`` registers its own folder when loaded)."""
    spec = importlib.util.spec_from_file_location(
        "_bench_package", Path(bench_dir) / "_bench_package.py"
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the benchmark package from {bench_dir}")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return sys.modules["bench"]


def available_suites(bench_dir: Path = BENCH_DIR) -> list[str]:
    """Suite names with a module in ``bench_dir``: the known ones first, in order, then others."""
    present = sorted(
        p.stem for p in bench_dir.glob("*.py") if not p.stem.startswith("_") and p.stem != "run"
    )
    known = [s for s in (*SUITES, *OPTIONAL_SUITES) if s in present]
    return known + [s for s in present if s not in known]


def default_suites(bench_dir: Path = BENCH_DIR) -> list[str]:
    """What a plain ``softmax-jax bench`` runs: every required suite (a missing one fails) and
    the optional ones that exist."""
    present = available_suites(bench_dir)
    return list(SUITES) + [s for s in OPTIONAL_SUITES if s in present]


def parse_only(values: list[str] | None) -> list[str] | None:
    """``--only a --only b,c`` -> ``["a", "b", "c"]`` (order kept, duplicates dropped)."""
    if not values:
        return None
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names or None


def _run_child(name: str, *, quick: bool, device: str | None, out_dir: Path | None) -> int:
    """Inside the child process: runs one suite, writes its JSON if the suite did not."""
    load_bench_package(BENCH_DIR)
    from bench import _common as C

    C.select_device(device)
    module = importlib.import_module(f"bench.{name}")
    out = out_dir if out_dir is not None else C.results_dir()
    path = out / f"{C.result_name(name)}.json"
    before = path.stat().st_mtime_ns if path.exists() else None
    result = module.run(quick)
    after = path.stat().st_mtime_ns if path.exists() else None
    if isinstance(result, dict) and (after is None or after == before):
        C.write_json(name, result, out_dir=out)
    return 0


def run_suites(
    names: list[str],
    *,
    quick: bool = False,
    tiny: bool = False,
    device: str | None = None,
    out_dir: Path | None = None,
    bench_dir: Path = BENCH_DIR,
) -> dict[str, dict[str, Any]]:
    """Runs ``names`` one after the other, each in a child process; returns their statuses.

    ``{name: {"ok": bool, "seconds": float, "returncode": int, "reason": str}}``. A suite whose
    module is missing fails without being started.
    """
    env = dict(os.environ)
    if out_dir is not None:
        env["SOFTMAX_JAX_BENCH_OUT"] = str(Path(out_dir).resolve())
    if tiny:
        env["SOFTMAX_JAX_BENCH_TINY"] = "1"
    statuses: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"\n=== bench: {name}{' (quick)' if quick else ''} ===", flush=True)
        if not (bench_dir / f"{name}.py").is_file():
            reason = f"no module {bench_dir / (name + '.py')}"
            print(f"bench {name}: FAILED: {reason}", flush=True)
            statuses[name] = {"ok": False, "seconds": 0.0, "returncode": None, "reason": reason}
            continue
        cmd = [sys.executable, str(bench_dir / "run.py"), "--child", name]
        cmd += ["--quick"] if quick else []
        cmd += ["--device", device] if device else []
        t0 = time.perf_counter()
        try:
            rc = subprocess.call(cmd, env=env)
        except KeyboardInterrupt:
            raise
        except OSError as e:
            rc, reason = -1, f"could not start: {e}"
        else:
            reason = "" if rc == 0 else f"exit status {rc}"
        seconds = time.perf_counter() - t0
        statuses[name] = {"ok": rc == 0, "seconds": seconds, "returncode": rc, "reason": reason}
        if rc != 0:
            print(f"bench {name}: FAILED ({reason})", flush=True)

    print("\n=== bench summary ===")
    width = max([len(n) for n in statuses] + [5])
    for name, st in statuses.items():
        state = "ok" if st["ok"] else f"FAILED: {st['reason']}"
        print(f"{name.ljust(width)}  {st['seconds']:7.1f} s  {state}")
    out = Path(env.get("SOFTMAX_JAX_BENCH_OUT") or bench_dir / "results")
    print(f"results in {out}", flush=True)
    return statuses


def _md_cell(x: Any) -> str:
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.3g}"
        return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
    return "" if x is None else str(x).replace("|", "\\|")


def _md_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join(_md_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(results: Path | None = None) -> str:
    """Markdown tables (with the machine each came from) from the JSON results: what the README
    quotes, generated rather than copied by hand."""
    import json

    results = Path(results) if results is not None else BENCH_DIR / "results"
    order = {name: i for i, name in enumerate((*SUITES, *OPTIONAL_SUITES))}
    paths = sorted(
        results.glob("*.json"), key=lambda p: (order.get(p.stem.split("_")[0], 99), p.stem)
    )
    parts = []
    for path in paths:
        payload = json.loads(path.read_text())
        table = payload.get("table")
        if not table:
            continue
        m = payload.get("machine", {})
        versions = m.get("versions", {})
        parts.append(
            f"### {path.stem}\n\n"
            f"{m.get('cpu_model', '?')}, {m.get('cpu_cores', '?')} cores, device "
            f"{m.get('device', '?')} ({m.get('device_kind', '?')}), jax {versions.get('jax')}, "
            f"{m.get('date', '?')}, load average {m.get('load_average')}; from "
            f"`bench/results/{path.name}`.\n"
        )
        tables = table if isinstance(table, dict) else {"": table}
        for title, rows in tables.items():
            if isinstance(rows, list) and rows and isinstance(rows[0], dict):
                parts.append((f"{title}:\n\n" if title else "") + _md_table(rows) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, a few minutes")
    parser.add_argument("--only", action="append", metavar="SUITE", help="suite(s), repeatable")
    parser.add_argument("--device", choices=("cpu", "gpu"), default=None)
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--tiny", action="store_true", help="smallest shapes (for tests)")
    parser.add_argument(
        "--report", action="store_true", help="print the results as Markdown tables and exit"
    )
    parser.add_argument("--child", metavar="SUITE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:
        print(report_markdown(args.out))
        return 0
    if args.child:
        try:
            return _run_child(args.child, quick=args.quick, device=args.device, out_dir=args.out)
        except Exception:
            traceback.print_exc()
            return 1
    names = parse_only(args.only) or default_suites()
    statuses = run_suites(
        names, quick=args.quick, tiny=args.tiny, device=args.device, out_dir=args.out
    )
    return 0 if all(st["ok"] for st in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
