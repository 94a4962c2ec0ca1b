"""``softmax-jax bench``: the runner, its JSON and its failure handling (no timings asserted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from softmax_jax import _cli_bench
from softmax_jax._cli import main

BENCH = Path(__file__).resolve().parent.parent / "bench"
GRAD_METHODS = {
    "ours",
    "ours_jit",
    "autodiff",
    "optax",
    "scatter",
    "xla_floor",
    "numpy_floor",
}


def test_bench_grad_tiny_writes_json(tmp_path):
    rc = main(["bench", "--only", "grad", "--quick", "--tiny", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "grad.json").read_text())
    assert {"suite", "machine", "config", "numpy_floor", "rows", "targets_met", "table"} <= set(
        result
    )
    assert result["suite"] == "grad"
    machine = result["machine"]
    for key in ("cpu_model", "cpu_cores", "device", "versions", "date", "env"):
        assert key in machine, key
    assert {"jax", "jaxlib", "optax", "numpy"} <= set(machine["versions"])
    assert set(result["numpy_floor"]["env"]) == {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}
    # The NumPy floor runs with the OpenBLAS knobs unset, whatever the parent has.
    assert result["numpy_floor"]["env"] == {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}
    (row,) = result["rows"]
    assert GRAD_METHODS <= set(row["median_s"])
    assert all(t > 0 for t in row["median_s"].values())
    for ratio in ("ours_jit/xla_floor", "ours_jit/autodiff", "ours_jit/optax", "ours/numpy_floor"):
        assert ratio in row["ratios"], ratio
    # Every method computes the same thing as sj.value_and_grad.
    assert all(err < 1e-4 for err in row["agreement_rel"].values()), row["agreement_rel"]
    assert not list(tmp_path.glob("*_gpu.json"))


def test_bench_unknown_suite_is_a_clear_error(capsys):
    assert main(["bench", "--only", "grad,nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite nosuch" in err and "grad" in err


def test_bench_missing_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(_cli_bench.BENCH_DIR_ENV, raising=False)
    monkeypatch.setattr(_cli_bench, "__file__", str(tmp_path / "pkg" / "_cli_bench.py"))
    assert main(["bench", "--only", "grad"]) == 2
    err = capsys.readouterr().err
    assert "cannot find the benchmark suites" in err and _cli_bench.BENCH_DIR_ENV in err


def test_bench_failing_suite_does_not_hide_the_others(tmp_path, monkeypatch, capfd):
    bench = tmp_path / "mybench"  # any folder name: the runner imports it as `bench`
    bench.mkdir()
    for name in ("__init__.py", "_bench_package.py", "_common.py", "run.py"):
        shutil.copy(BENCH / name, bench / name)
    (bench / "bad.py").write_text("def run(quick):\n    raise RuntimeError('boom')\n")
    (bench / "good.py").write_text(
        "from bench import _common\n\ndef run(quick):\n    return {'quick': quick, 'x': 1}\n"
    )
    monkeypatch.setenv(_cli_bench.BENCH_DIR_ENV, str(bench))
    out = tmp_path / "out"
    assert main(["bench", "--only", "bad", "--only", "good", "--quick", "--out", str(out)]) == 1
    text = capfd.readouterr().out
    assert "bad" in text and "FAILED" in text and "1 suite(s) failed: bad" in text
    good = json.loads((out / "good.json").read_text())
    assert good["x"] == 1 and good["quick"] is True and "machine" in good


@pytest.mark.parametrize("only", [["--only", "a,b", "--only", "b"], ["--only", " a , ,b"]])
def test_parse_only(only):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_run_for_test", BENCH / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    values = [v for v in only if v != "--only"]
    assert runner.parse_only(values) == ["a", "b"]


def test_bench_report_prints_markdown_from_json(tmp_path, capsys):
    payload = {
        "suite": "grad",
        "machine": {"cpu_model": "TestCPU", "cpu_cores": 2, "device": "cpu", "versions": {}},
        "table": {"times_ms": [{"N,D,K": "8,4,2", "ours": 1.25}]},
    }
    (tmp_path / "grad.json").write_text(json.dumps(payload))
    assert main(["bench", "--report", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "### grad" in out and "TestCPU" in out
    assert "| N,D,K | ours |" in out and "| 8,4,2 | 1.250 |" in out


def test_bench_without_out_never_writes_the_committed_results(tmp_path, monkeypatch, capfd):
    """A checkout's bench/results (which the README embeds) is written only with --out."""
    checkout = tmp_path / "checkout" / "bench"
    (checkout / "results").mkdir(parents=True)
    for name in ("__init__.py", "_bench_package.py", "_common.py", "run.py"):
        shutil.copy(BENCH / name, checkout / name)
    (checkout / "good.py").write_text("def run(quick):\n    return {'quick': quick, 'x': 1}\n")
    committed = checkout / "results" / "good.json"
    committed.write_text('{"committed": true}')
    monkeypatch.setenv(_cli_bench.BENCH_DIR_ENV, str(checkout))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["bench", "--only", "good", "--quick"]) == 0
    assert f"results go to {cwd / 'bench_results'}" in capfd.readouterr().out
    assert json.loads((cwd / "bench_results" / "good.json").read_text())["x"] == 1
    assert committed.read_text() == '{"committed": true}'
    assert sorted(p.name for p in (checkout / "results").iterdir()) == ["good.json"]
    # asked for explicitly, it does write there
    assert main(["bench", "--only", "good", "--quick", "--out", str(checkout / "results")]) == 0
    assert json.loads(committed.read_text())["x"] == 1
