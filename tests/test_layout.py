"""The package's layout, read from its source: layers, import graph, sizes, test files, comments.

These checks read the code (``ast``, ``tokenize``); nothing is imported or compiled, so they take
well under a second. A check that fails today is marked ``xfail(strict=True)`` per offending item
(see ``KNOWN``): it flips to a failure the moment the item is fixed, and the entry is then removed.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import re
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "softmax_jax"
SRC = ROOT / PACKAGE

# The layers, lowest first. A module may import modules of its own layer and of the layers in
# MAY_IMPORT. Add a new module here when you add its file: the completeness test names it otherwise.
MATH, HEAD, TRAINING, MODEL, CLI, TOP = "math", "head", "training", "model", "cli", "top"
LAYER_OF = {
    # math: the loss (eq. 2), its gradient and HVP (eq. 6), the cross-check, and what they share.
    "_chunks": MATH,
    "_version": MATH,
    "_precision": MATH,
    "_validate": MATH,
    "_options": MATH,  # issue16: the fused vocabulary losses' option and label checks
    "_loss": MATH,
    "_grad": MATH,
    "_check": MATH,
    # sparse (CSR) products of eq. (2), (6) and the HVP: imports math only; training and the
    # model file call it.
    "_sparse": MATH,
    # head: the fused linear + softmax cross-entropy kernel and the heads built on it.
    "_kernel": HEAD,
    "_fused": HEAD,
    "_head": HEAD,
    "_parallel": HEAD,
    "_shard": HEAD,  # issue16: mesh / sharding helpers of the head
    "_vocab": HEAD,  # issue17: the vocabulary losses' row-chunk pass
    "_logprobs": HEAD,
    "_distill": HEAD,
    # training: the objective, the solvers, the minibatch / streamed loops, placement, checkpoints.
    "_objective": TRAINING,
    "_solvers": TRAINING,
    "_newton": TRAINING,  # Newton-CG's step and line search, and the full-batch solvers' state
    "_minibatch": TRAINING,
    "_placement": TRAINING,
    "_stream": TRAINING,
    "_checkpoint": TRAINING,
    "_fit": TRAINING,
    "_progress": TRAINING,  # issue18: fit's history, progress bar and notices
    "_compile_cache": TRAINING,  # issue18: the persistent compilation cache fit turns on
    # model / estimator: a trained model's file and predictions, the scikit-learn estimator, data.
    "_model": MODEL,
    "_estimator": MODEL,
    "_data": MODEL,
    # the command line: _cli and one _cli_<command> per subcommand (matched by prefix below).
    "_cli": CLI,
    # the package itself: re-exports (may import anything), `python -m softmax_jax`.
    "__init__": TOP,
    "__main__": TOP,
}
MAY_IMPORT = {
    MATH: {MATH},
    HEAD: {MATH, HEAD},
    TRAINING: {MATH, TRAINING},  # training does not import the head layer
    MODEL: {MATH, HEAD, TRAINING, MODEL},
    CLI: {MATH, HEAD, TRAINING, MODEL, CLI},
    TOP: {MATH, HEAD, TRAINING, MODEL, CLI, TOP},
}

MAX_FUNCTION_CODE_LINES = 80
MAX_MODULE_LINES = 500

# Known offenders, one entry per (check, item): each becomes an xfail(strict=True) so the suite
# stays green while the owner fixes it, and fails as soon as it is fixed (then delete the entry).
KNOWN: dict[tuple[str, str], str] = {}


@functools.cache
def _modules() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in SRC.glob("*.py")))


def _layer(module: str) -> str | None:
    if module in LAYER_OF:
        return LAYER_OF[module]
    if module.startswith("_cli_"):
        return CLI
    return None


def _cases(check: str, items: Iterable[str]) -> list:
    return [
        pytest.param(item, marks=pytest.mark.xfail(strict=True, reason=KNOWN[(check, item)]))
        if (check, item) in KNOWN
        else item
        for item in items
    ]


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@functools.cache
def _imports(module: str) -> dict[str, int]:
    """The package modules ``module`` imports (anywhere in the file) -> first line; the package
    itself is ``"softmax_jax"``. Imports inside functions count: a lazy import is still an edge."""
    found: dict[str, int] = {}
    names = set(_modules())
    for node in ast.walk(_tree(SRC / f"{module}.py")):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE:
                    targets.append(parts[1] if len(parts) > 1 else PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 1 and parts:
                targets.append(parts[0])
            elif (node.level == 1 and not parts) or (node.level == 0 and parts == [PACKAGE]):
                # `from . import x`: a submodule when x is one, else a name of the package.
                for alias in node.names:
                    targets.append(alias.name if alias.name in names else PACKAGE)
            elif node.level == 0 and parts[0] == PACKAGE:
                targets.append(parts[1])
        for target in targets:
            if target != module:  # `python -m softmax_jax._cli` dispatching to itself
                found.setdefault(target, node.lineno)
    return found


def test_layer_table_is_complete():
    unknown = [m for m in _modules() if _layer(m) is None]
    assert not unknown, (
        f"softmax_jax/{unknown[0]}.py has no layer: add it to LAYER_OF in tests/test_layout.py "
        f"(unknown: {unknown})"
    )


@pytest.mark.parametrize("module", _cases("layers", _modules()))
def test_imports_point_down(module):
    layer = _layer(module)
    assert layer is not None, f"softmax_jax/{module}.py has no layer in LAYER_OF"
    upward = [
        f"{target} ({_layer(target)}, line {line})"
        for target, line in _imports(module).items()
        if target != PACKAGE and _layer(target) not in MAY_IMPORT[layer]
    ]
    assert not upward, (
        f"{module} ({layer}) may import {sorted(MAY_IMPORT[layer])}, imports {upward}"
    )


@pytest.mark.parametrize("module", _cases("no_package_import", _modules()))
def test_no_module_imports_the_package(module):
    if module in ("__init__", "__main__"):
        return
    line = _imports(module).get(PACKAGE)
    assert line is None, f"softmax_jax/{module}.py:{line} imports the package softmax_jax itself"


def _cycle_through(module: str) -> list[str] | None:
    """A shortest import cycle through ``module`` (breadth-first), or None."""
    graph = {m: set(_imports(m)) - {PACKAGE} for m in _modules()}
    paths = {module: [module]}
    frontier = [module]
    while frontier:
        nxt = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target == module:
                    return paths[node] + [module]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    nxt.append(target)
        frontier = nxt
    return None


@pytest.mark.parametrize("module", _cases("acyclic", _modules()))
def test_no_import_cycle(module):
    cycle = _cycle_through(module)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _code_lines(source: str, tree: ast.Module) -> set[int]:
    """Line numbers holding code: not blank, not only a comment, not part of a docstring."""
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    skip |= {tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines -= set(range(first.lineno, first.end_lineno + 1))
    return lines


def function_code_lines(source: str) -> dict[str, int]:
    """Lines of code of every function (methods and nested functions too), by qualified name."""
    tree = ast.parse(source)
    code = _code_lines(source, tree)
    sizes: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                span = range(child.lineno, child.end_lineno + 1)
                sizes[name] = sum(1 for line in span if line in code)
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return sizes


@pytest.mark.parametrize("module", _cases("function_length", _modules()))
def test_functions_are_short(module):
    sizes = function_code_lines((SRC / f"{module}.py").read_text(encoding="utf-8"))
    long = {name: n for name, n in sizes.items() if n > MAX_FUNCTION_CODE_LINES}
    assert not long, f"{module}: functions over {MAX_FUNCTION_CODE_LINES} lines of code: {long}"


@pytest.mark.parametrize("module", _cases("module_length", _modules()))
def test_modules_are_short(module):
    n = len((SRC / f"{module}.py").read_text(encoding="utf-8").splitlines())
    assert n <= MAX_MODULE_LINES, (
        f"softmax_jax/{module}.py has {n} lines (at most {MAX_MODULE_LINES})"
    )


# A measurement written into prose: a number with a unit of time or bandwidth, a speed ratio, a
# percentage faster/slower, an iteration count observed on a dataset, a setting that "beat" others.
# Units of time need a number right before them ("0.17 s", "8 ms"), so math ("s_i", "2 s_i") does
# not match; sizes ("blocks of 64 MiB") are settings, not measurements.
_NUMBER = r"\d+(?:\.\d+)?(?:\s*[-–]\s*\d+(?:\.\d+)?)?"
TIMING = re.compile(
    "|".join(
        [
            rf"\b{_NUMBER}\s*(?:ns|µs|us|ms|s|sec|secs|seconds?|min|minutes?|hours?)\b(?![_'])",
            rf"\b{_NUMBER}\s*(?:[kMGT]B/s|GFLOP/?s|TFLOP/?s)",
            rf"\b{_NUMBER}\s*(?:×|x)\s+(?:faster|slower|quicker|the\s+speed|less\s+time)",
            rf"\b{_NUMBER}\s*%\s*(?:faster|slower|quicker|less\s+time|more\s+time)",
            r"\babout\s+(?:\d+|half|twice|a\s+third)\s+(?:the\s+)?(?:\w+\s+)?iterations\b",
            r"\b(?:measured\s+(?:at\s+)?\d|beat|beats|outran)\b",
        ]
    ),
    re.IGNORECASE,
)


def prose(source: str) -> Iterator[tuple[int, str]]:
    """(first line, text) of every run of comment lines (joined) and of every docstring."""
    run: list[tuple[int, str]] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        if run and tok.start[0] != run[-1][0] + 1:
            yield run[0][0], " ".join(text for _, text in run)
            run = []
        run.append((tok.start[0], tok.string.lstrip("#:").strip()))
    if run:
        yield run[0][0], " ".join(text for _, text in run)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                yield node.body[0].lineno, " ".join(doc.split())


# A duration that is a setting, not a result: "a threshold of 1 s", "a timeout of 30 s".
SETTING = re.compile(
    r"\b(?:threshold|timeout|time-out|limit|interval|every|after|wait|deadline|at least|at most)"
    r"\W+(?:\w+\W+){0,3}$",
    re.IGNORECASE,
)


def timings(source: str) -> list[str]:
    """Measurements found in comments and docstrings: "line N: <the matched words>"."""
    found = []
    for line, text in prose(source):
        text = " ".join(text.split())
        for match in TIMING.finditer(text):
            if SETTING.search(text[: match.start()]):
                continue
            found.append(
                f"line {line}: ...{text[max(match.start() - 30, 0) : match.end() + 10]}..."
            )
    return found


@pytest.mark.parametrize("module", _cases("no_timings", _modules()))
def test_no_timings_in_docstrings_or_comments(module):
    found = timings((SRC / f"{module}.py").read_text(encoding="utf-8"))
    assert not found, (
        f"softmax_jax/{module}.py: measurements belong in bench/results and the README: {found}"
    )


def _script_sources() -> dict[str, str]:
    """bench/*.py, notebooks/*.py and the code cells of notebooks/*.ipynb (magics dropped)."""
    sources = {}
    for path in sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "notebooks").glob("*.py")):
        sources[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = [
            "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in cells
            if c["cell_type"] == "code"
        ]
        lines = [
            ln
            for cell in code
            for ln in cell.splitlines()
            if not ln.lstrip().startswith(("%", "!"))
        ]
        sources[str(path.relative_to(ROOT))] = "\n".join(lines)
    return sources


def private_uses(source: str) -> list[str]:
    """Imports of ``softmax_jax._x`` / ``from softmax_jax import _x`` and ``sj._x`` attributes."""
    found = []
    aliases = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1 and parts[1].startswith("_"):
                    found.append(f"line {node.lineno}: import {alias.name}")
                elif alias.name == PACKAGE:
                    aliases.add(alias.asname or PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != PACKAGE:
                continue
            if len(parts) > 1 and parts[1].startswith("_"):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


SCRIPTS = _script_sources()


@pytest.mark.parametrize("script", _cases("public_names_only", sorted(SCRIPTS)))
def test_bench_and_notebooks_use_public_names_only(script):
    found = private_uses(SCRIPTS[script])
    assert not found, f"{script} uses private names of softmax_jax: {found}"


@pytest.mark.parametrize(
    "module", _cases("test_file", [m for m in _modules() if m not in ("__init__", "__main__")])
)
def test_one_test_file_per_module(module):
    expected = ROOT / "tests" / f"test_{module.lstrip('_')}.py"
    assert expected.exists(), f"softmax_jax/{module}.py has no tests/{expected.name}"


# The checks above must be able to fail: each helper is run on a small broken example.


def test_checks_catch_what_they_look_for():
    long_function = "def f():\n    '''doc\n\n    more'''\n    # comment\n\n" + "    x = 1\n" * 81
    assert function_code_lines(long_function) == {"f": 82}  # the `def` line counts
    nested = (
        "class C:\n    def m(self):\n        def g():\n            return 1\n        return g\n"
    )
    assert function_code_lines(nested) == {"C.m": 4, "C.m.g": 2}
    assert timings('"""Fast: 0.17 s at N = 200k, 8 ms here."""\n')
    assert timings("# measured 1.3× slower at N=8192\n")
    assert timings("# about 15-25% faster at N = 200k\n")
    assert timings("# 2 MB beat 1, 4, 8 and 32 MB\n")
    assert timings("#: takes about half the Newton\n#: iterations (bench/train.py)\n")
    assert timings('"""It reaches the optimum in about 20 iterations."""\n')
    assert not timings("#: Compilations at least this long (JAX's default threshold is 1 s).\n")
    assert not timings("# a timeout of 30 s, then retry\n")
    for math in (
        "# 1 / Σ s_i over the weights s",
        "# (N, K) in blocks of 2048",
        "# 2 s_i ℓ_i",
        "# blocks of about 64 MiB of rows",
    ):
        assert not timings(math + "\n"), math
    assert private_uses("from softmax_jax import _fit\n")
    assert private_uses("from softmax_jax._head import linear_cross_entropy\n")
    assert private_uses("import softmax_jax as sj\nsj._head.dispatch\n")
    assert not private_uses("import softmax_jax as sj\nsj.fit\nsj.__version__\n")


def test_init_exports_what_it_imports():
    """``__init__`` only re-exports: every name it imports from a private module is in
    ``__all__``, and every name of ``__all__`` is imported there (or served by ``__getattr__``)."""
    tree = _tree(SRC / "__init__.py")
    imported = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
    }
    exported = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
    )
    getattr_fn = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
    ]
    lazy = {
        node.value
        for fn in getattr_fn
        for node in ast.walk(fn)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert len(exported) == len(set(exported)), "a name appears twice in __all__"
    assert imported - set(exported) == set(), "imported but not in __all__"
    assert set(exported) - imported - lazy == set(), "in __all__ but never imported"
