"""Mutation testing of one module with cosmic-ray (not part of CI: minutes to hours per module).

    pip install "cosmic-ray>=8.7,<9"
    python tools/mutation.py _precision              # every mutant of softmax_jax/_precision.py
    python tools/mutation.py _grad --sample 60       # 60 mutants drawn at random (seed 0)

Each module is tested against its own tests (``MODULE_TESTS`` below; ``PYTEST`` for the options). The working tree
(tracked and untracked, not ignored, files) is copied to ``$MUTATION_DIR/<module>`` (default
``/tmp/softmax_jax_mutation``, outside the repository): cosmic-ray writes each mutant into that
copy's source file, runs the tests there in a fresh process (``PYTHONPATH`` set to the copy, at
``nice 19``; one mutant at a time) and restores the file. The session database, the report and
the diff of every survivor are left in that folder.

Operators left out (``EXCLUDED_OPERATORS``): arithmetic operators turned into bitwise, shift,
``**``, ``%`` or ``//`` ones and comparisons turned into identity tests (and back): on float arrays
they raise at trace time, so they only inflate the score; and ``RemoveDecorator``, whose mutants
here are removals of ``jax.jit`` (equivalent: the same function, not compiled). Mutants inside
annotations are skipped too (never evaluated: every module has ``from __future__ import
annotations``). So are mutants that do not compile (say ``def f(a, *, b)`` turned into
``def f(a, +, b)``): cosmic-ray would count them as killed; the report counts them apart, as
"not compiling", out of the score and out of the sample.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

MODULE_TESTS = {
    "_precision": ["tests/test_precision.py"],
    "_chunks": ["tests/test_chunks.py"],
    # mean_scale (the per-sample factor of the mean) is used by _grad and _objective, not by loss
    "_loss": ["tests/test_loss.py", "tests/test_grad.py"],
    "_grad": ["tests/test_grad.py"],
    "_kernel": ["tests/test_kernel.py", "tests/test_head.py"],
    "_head": ["tests/test_head.py"],
    "_solvers": ["tests/test_solvers.py", "tests/test_newton.py"],
    "_newton": ["tests/test_newton.py", "tests/test_solvers.py"],
    "_model": ["tests/test_model.py"],
    "_checkpoint": ["tests/test_checkpoint.py"],
}

EXCLUDED_OPERATORS = [
    r"core/ReplaceBinaryOperator_\w+_(FloorDiv|Mod|Pow|RShift|LShift|BitXor)$",
    r"core/ReplaceBinaryOperator_(Add|Sub|Mul|Div|FloorDiv|Mod|Pow)_(BitOr|BitAnd)$",
    r"core/ReplaceBinaryOperator_(BitOr|BitAnd|BitXor)_(Add|Sub|Mul|Div)$",
    r"core/ReplaceComparisonOperator_(Eq|NotEq|Lt|LtE|Gt|GtE)_(Is|IsNot)$",
    r"core/ReplaceComparisonOperator_(Is|IsNot)_(Eq|NotEq|Lt|LtE|Gt|GtE)$",
    r"core/RemoveDecorator$",
]

NOT_COMPILING = "does not compile"

#: Every test of the module's files but those starting other processes; a mutant that makes them
#: hang (say a loop that no longer ends) fails at pytest-timeout's limit and counts as killed.
#: (``slow`` is not left out: tests/slow_tests.json marks tests slow by their measured time.)
PYTEST = "-q -x -p no:cacheprovider --timeout=300 -m 'not multiprocess'"


def _config(module: str, timeout: float) -> str:
    tests = " ".join(MODULE_TESTS[module])
    command = f"env PYTHONPATH=. nice -n 19 {sys.executable} -m pytest {PYTEST} {tests}"
    excluded = ",\n    ".join(f"'{op}'" for op in EXCLUDED_OPERATORS)
    return f"""[cosmic-ray]
module-path = "softmax_jax/{module}.py"
timeout = {timeout}
excluded-modules = []
test-command = "{command}"

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = [
    {excluded},
]
"""


def _copy_tree(src: Path, dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=src, check=True, capture_output=True,
    ).stdout.split(b"\0")  # fmt: skip
    if dst.exists():
        shutil.rmtree(dst)
    for name in filter(None, (f.decode() for f in files)):
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)


def _annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    spans = []
    for node in ast.walk(ast.parse(source)):
        notes = []
        if isinstance(node, ast.arg | ast.AnnAssign):
            notes.append(node.annotation)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            notes.append(node.returns)
        spans += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in notes if a]
    return spans


def _skip_annotations(db: Path, source: str) -> None:
    """Marks mutants inside annotations as skipped: with ``from __future__ import annotations``
    (every module here) annotations are never evaluated, so these mutants are equivalent."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = _annotation_spans(source)
    with use_db(str(db), WorkDB.Mode.open) as work_db:
        inside = [
            item.job_id
            for item in work_db.pending_work_items
            if any(a <= tuple(item.mutations[0].start_pos) < b for a, b in spans)
        ]
        result = WorkResult(output="in an annotation", worker_outcome=WorkerOutcome.SKIPPED)
        if inside:
            work_db.set_multiple_results(inside, result)


def _compiles(source: str, mutation) -> bool:
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.plugins import get_operator

    operator = get_operator(mutation.operator_name)(**mutation.operator_args)
    try:
        compile(mutate_code(source, operator, mutation.occurrence), "<mutant>", "exec")
    except SyntaxError:
        return False
    return True


def _skip_not_compiling(db: Path, source: str) -> None:
    """Marks mutants whose source does not compile as skipped ("does not compile")."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(db), WorkDB.Mode.open) as work_db:
        broken = [
            item.job_id
            for item in work_db.pending_work_items
            if not _compiles(source, item.mutations[0])
        ]
        result = WorkResult(output=NOT_COMPILING, worker_outcome=WorkerOutcome.SKIPPED)
        if broken:
            work_db.set_multiple_results(broken, result)


def _sample(db: Path, n: int, seed: int) -> None:
    """Marks all but ``n`` pending mutants (drawn with ``seed``) as skipped."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(db), WorkDB.Mode.open) as work_db:
        pending = sorted(item.job_id for item in work_db.pending_work_items)
        keep = set(random.Random(seed).sample(pending, min(n, len(pending))))
        drop = [job for job in pending if job not in keep]
        result = WorkResult(output="not sampled", worker_outcome=WorkerOutcome.SKIPPED)
        if drop:
            work_db.set_multiple_results(drop, result)


def summary(db: Path) -> dict:
    """Counts per outcome, and the survivors' diffs."""
    from cosmic_ray.work_db import WorkDB, use_db

    counts = dict(
        run=0, killed=0, survived=0, timeout=0, incompetent=0, not_compiling=0, skipped=0, pending=0
    )
    survivors = []
    with use_db(str(db), WorkDB.Mode.open) as work_db:
        results = dict(work_db.results)
        for item in work_db.work_items:
            res = results.get(item.job_id)
            if res is None:
                counts["pending"] += 1
            elif res.worker_outcome == "skipped":
                counts["not_compiling" if res.output == NOT_COMPILING else "skipped"] += 1
            elif res.test_outcome == "survived":
                counts["run"] += 1
                counts["survived"] += 1
                survivors.append((item, res))
            elif res.test_outcome == "incompetent" or res.worker_outcome != "normal":
                counts["incompetent"] += 1
            else:
                counts["run"] += 1
                counts["timeout" if res.output == "timeout" else "killed"] += 1
    return counts, survivors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", choices=sorted(MODULE_TESTS))
    parser.add_argument("--sample", type=int, default=None, help="run this many mutants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    parser.add_argument("--resume", action="store_true", help="continue the session there")
    args = parser.parse_args(argv)

    repo = Path(__file__).resolve().parents[1]
    work = Path(os.environ.get("MUTATION_DIR", "/tmp/softmax_jax_mutation")) / args.module
    db = work / "session.sqlite"
    if not args.resume:
        _copy_tree(repo, work)
        head = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        (work / "commit.txt").write_text(head + "\n")  # the code and tests that were mutated
        (work / "cosmic-ray.toml").write_text(_config(args.module, args.timeout))
        subprocess.run(["cosmic-ray", "init", "cosmic-ray.toml", db.name], cwd=work, check=True)
        subprocess.run(["cr-filter-operators", db.name, "cosmic-ray.toml"], cwd=work, check=True)
        source = (work / "softmax_jax" / f"{args.module}.py").read_text()
        _skip_annotations(db, source)
        _skip_not_compiling(db, source)
        if args.sample is not None:
            _sample(db, args.sample, args.seed)
    subprocess.run(["cosmic-ray", "exec", "cosmic-ray.toml", db.name], cwd=work, check=True)

    counts, survivors = summary(db)
    # a timeout counts as not killed: on a loaded machine a surviving mutant's run can time out
    score = counts["killed"] / counts["run"] if counts["run"] else float("nan")
    head = (work / "commit.txt").read_text().strip()
    lines = [f"{args.module} @ {head}: score {score:.1%} {counts}"]
    for item, res in survivors:  # the timeouts' diffs: `cosmic-ray dump session.sqlite`
        lines.append(f"--- survived {item.job_id}\n{res.diff}")
    (work / "report.txt").write_text("\n".join(lines) + "\n")
    print(lines[0])
    print(f"survivors' diffs: {work / 'report.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
