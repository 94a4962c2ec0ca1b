"""`softmax-jax train`: the default digits run, files, options, and one-line errors (exit code 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from softmax_jax._cli import main

# The console script `softmax-jax`, run by this interpreter.
CLI = [sys.executable, "-c", "import sys; from softmax_jax._cli import main; sys.exit(main())"]


def test_no_arguments_trains_on_digits(capsys):
    assert main(["train"]) == 0
    out, err = capsys.readouterr()
    assert "sklearn digits: 1347 train / 450 test samples" in out
    acc = {
        line.split(":")[0]: float(line.split(":")[1])
        for line in out.splitlines()
        if "accuracy:" in line
    }
    assert acc["train accuracy"] > 0.97 and acc["test accuracy"] > 0.94
    assert "gradient check" in out and "pass" in out
    assert "30/30" in err and "eval_acc=" in err  # the progress bar


@pytest.fixture
def csv_file(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    X = 3 * rng.normal(size=(3, 5))[y] + rng.normal(size=(120, 5))
    path = tmp_path / "data.csv"
    rows = [",".join(f"{v:.6f}" for v in x) + f",{c}" for x, c in zip(X, y + 10)]
    path.write_text("f1,f2,f3,f4,f5,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("optimizer", ["sgd", "newton-cg", "lbfgs"])
def test_csv_save_and_plot(tmp_path, csv_file, capsys, optimizer):
    model, png = tmp_path / "model.npz", tmp_path / "curves.png"
    args = ["train", "--data", str(csv_file), "--optimizer", optimizer, "--epochs", "8"]
    args += ["--save", str(model), "--plot", str(png), "--no-progress", "--seed", "1"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "90 train / 30 test samples, 5 features, 3 classes" in out
    assert "test accuracy: " in out and err == ""
    with np.load(model) as f:
        assert f["W"].shape == (5, 3) and f["b"].shape == (3,)
        np.testing.assert_array_equal(f["classes"], [10, 11, 12])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_npz_and_checkpoint_resume(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    np.savez(tmp_path / "d.npz", X=rng.normal(size=(4, 3))[y] + rng.normal(size=(200, 3)), y=y)
    base = ["train", "--data", str(tmp_path / "d.npz"), "--no-progress", "--batch-size", "32"]
    ckpt = ["--checkpoint-dir", str(tmp_path / "ck")]
    assert main([*base, "--epochs", "3", *ckpt, "--save", str(tmp_path / "a.npz")]) == 0
    assert main([*base, "--epochs", "5", *ckpt, "--save", str(tmp_path / "b.npz")]) == 0
    assert main([*base, "--epochs", "5", "--save", str(tmp_path / "c.npz")]) == 0
    capsys.readouterr()
    b, c = np.load(tmp_path / "b.npz"), np.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(b["W"], c["W"])
    # another learning rate with the same directory is refused with a one-line error
    assert main([*base, "--epochs", "6", *ckpt, "--lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("softmax-jax train: error: checkpoint directory") and "\n" not in err


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("missing.csv", None, "missing.csv: no such file"),
        ("bad.csv", "1,2,0\n3,abc,1\n", "bad.csv: row 2, column 2: non-numeric feature 'abc'"),
        ("ragged.csv", "1,2,0\n3,4,1\n5,1\n", "ragged.csv: row 3: ragged row with 2 columns"),
        ("nan.csv", "1,2,0\n3,nan,1\n", "nan.csv: row 2, column 2: feature is nan"),
        ("inf.csv", "1,2,0\n-inf,4,1\n", "inf.csv: row 2, column 1: feature is -inf"),
        (
            "one.csv",
            "1,2,4\n3,4,4\n",
            "one.csv: need at least 2 classes to train, found only class 4",
        ),
        ("float.csv", "1,2,0\n3,4,0.5\n", "float.csv: row 2: label 0.5 is not an integer"),
        ("strlabel.csv", "1,2,a\n3,4,b\n", "row 1, column 3: non-numeric label 'a'"),
    ],
)
def test_bad_data_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, name, text, expected):
    path = str(tmp_path / name) if text is None else _write(tmp_path, name, text)
    assert main(["train", "--data", path, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("softmax-jax train: error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--optimizer", "newton-cg", "--lr", "0.1"], "--lr does not apply to newton-cg"),
        (["--save", "/no/such/dir/m.npz"], "--save /no/such/dir/m.npz: directory /no/such/dir"),
        (["--optimizer", "lbfgs", "--batch-size", "10"], "`batch_size` must be None"),
    ],
)
def test_bad_options(capsys, args, expected):
    assert main(["train", "--no-progress", *args]) == 2
    assert expected in capsys.readouterr().err


def test_subprocess_error_has_no_traceback(tmp_path):
    """The installed entry point, end to end: exit code 2 and one line on stderr."""
    path = _write(tmp_path, "bad.csv", "1,2,0\n3,x,1\n")
    proc = subprocess.run(
        [*CLI, "train", "--data", path],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr
        == f"softmax-jax train: error: {path}: row 2, column 2: non-numeric feature 'x'\n"
    )
