"""Every README block runs as shown, in order, in one folder: the Python blocks in one namespace
(as a user would paste them) in a process with 4 forced CPU devices, so that the data-parallel and
sharded-head blocks run too, and the `softmax-jax` lines of the bash blocks as commands."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
from helpers import device_env

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
ROOT = README.parent

#: Commands of the bash blocks that are not run here, and why.
NOT_RUN = {
    "pip": "installs the package: the environment running this test",
    "python -m pytest": "the test suite itself",
    "softmax-jax check": "minutes; tests/test_check.py runs the same table",
    "softmax-jax bench": "minutes; tests/test_cli_bench.py runs the same suites with --tiny",
}

# Runs the Python blocks given on stdin (JSON) one after the other in one namespace; reports
# each block's outcome as one JSON line. The blocks run in JAX's default configuration, as a user
# pastes them.
RUNNER = textwrap.dedent(
    """
    import json, sys, traceback, warnings
    warnings.simplefilter("error")
    namespace = {}
    for i, line in enumerate(sys.stdin):
        code = json.loads(line)
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
            print("@@block@@", json.dumps({"ok": True}), flush=True)
        except BaseException as e:
            msg = "".join(traceback.format_exception_only(type(e), e)).strip()
            print("@@block@@", json.dumps({"ok": False, "error": msg}), flush=True)
    """
)


def blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in order."""
    return re.findall(r"```(\w+)\n(.*?)```", README.read_text(), flags=re.S)


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block: one per line, split at ``&&``, comments dropped."""
    out = []
    for line in code.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                out.append(words)
    return out


def _skipped(words: list[str]) -> str | None:
    text = " ".join(words)
    return next((why for cmd, why in NOT_RUN.items() if text.startswith(cmd)), None)


def _python_env() -> dict:
    return {
        **device_env(4),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def _result(runner, n: int) -> dict:
    """The runner's report on the block just sent (the block's own output is passed over)."""
    while True:
        line = runner.stdout.readline()
        if not line:
            pytest.fail(f"the block runner died at README block {n}: {runner.stderr.read()}")
        if line.startswith("@@block@@ "):
            return json.loads(line.split(" ", 1)[1])


@pytest.mark.slow
def test_readme_blocks_run_as_shown(tmp_path):
    found = blocks()
    python = [code for lang, code in found if lang == "python"]
    assert len(python) >= 8 and sum(lang == "bash" for lang, _ in found) >= 3, "examples lost"
    env = _python_env()
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    cli = [sys.executable, "-m", "softmax_jax"]
    cli_env = {**env, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}  # one device
    failures = []
    ran = set()  # a command shown twice (the quick start and the CLI section) runs once
    try:
        for n, (lang, code) in enumerate(found):
            if lang == "python":
                if "jax.distributed.initialize()" in code:
                    continue  # several processes: tests/test_parallel.py runs fit across two
                code = code.replace('"/tmp/ckpt"', f'"{tmp_path}/fit-ckpt"')
                runner.stdin.write(json.dumps(code) + "\n")
                runner.stdin.flush()
                result = _result(runner, n)
                if result["ok"]:
                    continue
                failures.append(f"README block {n} (python) failed: {result['error']}\n{code}")
            elif lang == "bash":
                for words in commands(code):
                    if _skipped(words) or tuple(words) in ran:
                        continue
                    ran.add(tuple(words))
                    assert words[0] == "softmax-jax", f"unexpected README command {words}"
                    extra = ["--no-progress"] if words[1] == "train" else []
                    res = subprocess.run(
                        [*cli, *words[1:], *extra],
                        capture_output=True,
                        text=True,
                        cwd=tmp_path,
                        env=cli_env,
                        timeout=600,
                    )
                    if res.returncode != 0:
                        failures.append(
                            f"README block {n}: {shlex.join(words)} exited {res.returncode}\n"
                            f"{res.stdout[-2000:]}{res.stderr[-2000:]}"
                        )
    finally:
        runner.communicate(timeout=60)
    assert not failures, "\n\n".join(failures)
    # The files the CLI examples promise, where the README says.
    for name in ("data.csv", "model.npz", "curves.png", "predictions.csv", "iris.npz"):
        assert (tmp_path / name).is_file(), name


def test_bash_commands_are_parsed_as_a_shell_would():
    assert commands('pip install ".[cli]" && softmax-jax train  # comment\n') == [
        ["pip", "install", ".[cli]"],
        ["softmax-jax", "train"],
    ]
    assert _skipped(["pip", "install", "x"]) and not _skipped(["softmax-jax", "train"])


def test_readme_training_tables_are_the_committed_results():
    # "the README table from bench/results/train.json": the tables printed by
    # `bench/train.py --readme` from the committed JSON, verbatim in the README
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train.py"), "--readme",
         str(ROOT / "bench" / "results" / "train.json")],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    tables = [t for t in out.strip().split("\n\n") if t]
    assert len(tables) == 2, out
    text = README.read_text(encoding="utf-8")
    for table in tables:
        assert table in text, table
