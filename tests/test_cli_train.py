"""`softmax-jax train`: the default digits run, files, options, and one-line errors (exit code 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from softmax_jax import load_model
from softmax_jax._cli import main


def run(argv) -> int:
    """``main``'s exit code, also when argparse exits (bad flag syntax)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


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
    m = load_model(model)
    assert m.W.shape == (5, 3) and m.b.shape == (3,) and m.preprocessing == "standardize"
    np.testing.assert_array_equal(m.classes, [10, 11, 12])
    assert m.info["optimizer"] == optimizer and m.info["n_samples"] == 90
    assert f"to {model}\n" in out and f"wrote the curves to {png}\n" in out
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
    b, c = load_model(tmp_path / "b.npz"), load_model(tmp_path / "c.npz")
    np.testing.assert_array_equal(b.W, c.W)
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
        ("big.csv", "1,2,0\n3,4,1e20\n", "big.csv: row 2: label 1e20 is out of range (|label| <"),
        ("semi.csv", "1,2;5,0\n3,4;5,1\n", "column 2: non-numeric feature '2;5' (it holds ';'"),
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
        (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
        (["--optimizer", "newton-cg", "--lr", "0.1"], "--lr does not apply to newton-cg"),
        (["--save", "/no/such/dir/m.npz"], "--save /no/such/dir/m.npz: directory /no/such/dir"),
        (["--optimizer", "lbfgs", "--batch-size", "10"], "--batch-size does not apply to lbfgs"),
        (["--optimizer", "newton-cg", "--batch-size", "32"], "--batch-size does not apply to"),
        (["--seed", "-3"], "--seed must lie in [0, 2**32), got -3"),
        (["--l2", "inf"], "--l2 must be a finite number >= 0, got inf"),
        (["--l2", "nan"], "--l2 must be a finite number >= 0, got nan"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
        (["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
        (["--optimizer", "adamm"], "argument --optimizer: invalid choice: 'adamm'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_options(capsys, args, expected):
    """One line naming the flag by its command-line name (never fit's `batch_size`), exit 2."""
    assert run(["train", "--no-progress", *args]) == 2
    out, err = capsys.readouterr()
    assert expected in err and err.count("\n") == 1 and "`" not in err, err
    assert out == ""  # nothing ran


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


# --- the model file: what training reports is what the saved model does on raw features --------


def _accuracies(out: str) -> dict:
    return {
        line.split(":")[0]: float(line.split(":")[1])
        for line in out.splitlines()
        if line.startswith(("train accuracy:", "test accuracy:"))
    }


def test_saved_model_predicts_raw_features_as_training_reported(tmp_path, capsys):
    """Features far from standardised (offset 100, scale 50): a model without its preprocessing
    would score at chance on them."""
    rng = np.random.default_rng(3)
    y = np.arange(160) % 4
    X = 100 + 50 * (rng.normal(size=(4, 3))[y] + 0.5 * rng.normal(size=(160, 3)))
    path = tmp_path / "raw.csv"
    path.write_text("".join(",".join(f"{v:.17g}" for v in x) + f",{c}\n" for x, c in zip(X, y)))
    assert main(["train", "--data", str(path), "--save", str(tmp_path / "m"), "--no-progress"]) == 0
    acc = _accuracies(capsys.readouterr().out)
    model = load_model(tmp_path / "m")
    overall = (120 * acc["train accuracy"] + 40 * acc["test accuracy"]) / 160
    assert acc["test accuracy"] > 0.8  # chance is 0.25 (one batch of 120 rows per epoch)
    assert model.score(X, y) == pytest.approx(overall, abs=1e-4)  # printed to 4 decimals


# --- data files ---------------------------------------------------------------------------------


def test_npz_that_is_empty_or_random_bytes_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(256))
    for name, expected in [("empty.npz", "the file is empty"), ("random.npz", "not a zip archive")]:
        assert main(["train", "--data", str(tmp_path / name), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name}: cannot read as .npz: {expected}" in err, err
        assert "pickle" not in err


def test_too_few_rows_for_a_test_split_names_the_file_and_flag(tmp_path, capsys):
    path = _write(tmp_path, "two.csv", "1,2,0\n3,4,1\n")
    assert main(["train", "--data", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: 2 samples are too few for a train/test split with --test-size 0.25" in err
    assert err.count("\n") == 1 and "eval_data" not in err


def test_utf8_bom_and_pandas_index_column(tmp_path, capsys, csv_file):
    lines = csv_file.read_text().splitlines()
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\n".join(lines).encode("utf-8-sig"))
    pandas = tmp_path / "pandas.csv"  # what DataFrame.to_csv writes: an unnamed index first
    pandas.write_text("\n".join(["," + lines[0]] + [f"{i},{r}" for i, r in enumerate(lines[1:])]))
    for path in (bom, pandas):
        assert main(["train", "--data", str(path), "--no-progress", "--epochs", "3"]) == 0
        out = capsys.readouterr().out
        assert "90 train / 30 test samples, 5 features, 3 classes" in out
    assert "column 1 has no name (an index column, as pandas' to_csv writes)" in out


def test_output_paths_are_written_as_reported(tmp_path, capsys, csv_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", str(csv_file), "--no-progress", "--epochs", "2"]
    assert main([*args, "--save", "model_out", "--plot", "curves"]) == 0
    out = capsys.readouterr().out
    assert ") to model_out\n" in out and "wrote the curves to curves\n" in out
    assert (tmp_path / "model_out").is_file() and not (tmp_path / "model_out.npz").exists()
    assert (tmp_path / "curves").read_bytes()[:4] == b"\x89PNG"
    assert load_model("model_out").n_features == 5


@pytest.mark.parametrize(
    "module, args, expected",
    [
        ("sklearn", [], "training on the built-in digits (no --data) needs scikit-learn"),
        ("matplotlib", ["--plot", "c.png"], "--plot needs matplotlib"),
        ("orbax.checkpoint", ["--checkpoint-dir", "ck"], "--checkpoint-dir needs orbax-checkpoint"),
    ],
)
def test_missing_optional_dependency_is_named_before_training(
    tmp_path, capsys, csv_file, monkeypatch, module, args, expected
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    data = [] if module == "sklearn" else ["--data", str(csv_file)]
    assert main(["train", *data, "--no-progress", *args]) == 2
    out, err = capsys.readouterr()
    assert expected in err and "pip install 'softmax-jax[cli]'" in err and err.count("\n") == 1
    assert out == ""  # before the data are read or an epoch runs


def test_lbfgs_says_why_it_stopped_early(csv_file, capsys):
    args = ["train", "--data", str(csv_file), "--optimizer", "lbfgs", "--epochs", "500"]
    assert main([*args, "--no-progress", "--l2", "1e-2"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("lbfgs stopped"))
    assert "of 500: its line search found no further decrease" in line and "max |∇f| =" in line


# --- progress, checkpoints, interruption --------------------------------------------------------


def test_bar_is_drawn_once_at_the_end_and_resume_is_announced(tmp_path, csv_file, capfd):
    capsys = capfd  # file descriptors: a handler of the root logger writes to the real stderr
    args = ["train", "--data", str(csv_file), "--epochs", "3", "--batch-size", "30"]
    ckpt = ["--checkpoint-dir", str(tmp_path / "ck")]
    assert main([*args, *ckpt]) == 0
    err = capsys.readouterr().err
    assert err.count("3/3") == 1, err  # tqdm in a pipe: every drawing is a line
    assert main([*args[:-4], "--epochs", "5", *args[-2:], *ckpt]) == 0
    err = capsys.readouterr().err
    assert f"resuming from epoch 3 of 5 (checkpoint directory {tmp_path / 'ck'})" in err
    assert err.count("5/5") == 1, err
    assert main([*args[:-4], "--epochs", "5", *args[-2:], *ckpt, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "already holds all 5 epochs: returning its parameters without training" in out
    assert err == "" and (out + err).count("already holds") == 1  # once, not again on stderr
    assert main([*args, *ckpt]) == 2  # fewer epochs than the checkpoint holds
    err = capsys.readouterr().err
    assert "holds epoch 5, more than the --epochs = 3 asked for" in err and err.count("\n") == 1
    assert err.endswith("or use another --checkpoint-dir\n")


def test_checkpoint_every(tmp_path, csv_file, capsys):
    ck = tmp_path / "ck"
    args = ["train", "--data", str(csv_file), "--epochs", "7", "--no-progress"]
    assert main([*args, "--checkpoint-dir", str(ck), "--checkpoint-every", "3"]) == 0
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [3, 6, 7]


def test_ctrl_c_says_the_checkpoint_was_kept_and_a_rerun_resumes(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 3000)
    np.savez(tmp_path / "d.npz", X=rng.normal(size=(5, 16))[y] + rng.normal(size=(3000, 16)), y=y)
    ck = tmp_path / "ck"
    cmd = [*CLI, "train", "--data", str(tmp_path / "d.npz"), "--epochs", "100000"]
    cmd += ["--batch-size", "64", "--no-progress", "--checkpoint-dir", str(ck)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (ck.is_dir() and any(p.name.isdigit() for p in ck.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # a hang: kill it and close its pipes (no leak into later tests)
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert (
        err.startswith("softmax-jax train: interrupted; the checkpoints in ")
        and err.count("\n") == 1
    ), err
    assert "were kept (latest: epoch " in err and "run the same command again to resume" in err


# --- the command itself --------------------------------------------------------------------------


def test_version_and_python_dash_m(capsys):
    import softmax_jax

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert (
        e.value.code == 0 and capsys.readouterr().out == f"softmax-jax {softmax_jax.__version__}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "softmax_jax", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "usage: softmax-jax" in proc.stdout
    assert "{train,predict,check,bench}" in proc.stdout


@pytest.mark.parametrize("command", ["train", "predict", "check", "bench"])
def test_help_has_a_description_defaults_and_examples(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "examples:\n  softmax-jax " + command in text
    assert text.split("\n\n")[1].strip()  # a description paragraph after the usage


def test_help_states_each_default_and_how_it_differs_from_fit(capsys):
    import inspect

    from softmax_jax import _cli_train, fit
    from softmax_jax._minibatch import DEFAULT_BATCH_SIZE

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    fit_default = inspect.signature(fit).parameters
    assert (
        f"(default: {_cli_train.DEFAULT_EPOCHS}; fit's is {fit_default['epochs'].default})" in text
    )
    assert f"(default: {DEFAULT_BATCH_SIZE}, as fit)" in text  # one batch size: _minibatch's
    assert f"(default: {_cli_train.DEFAULT_L2:g}; fit's is {fit_default['l2'].default})" in text
    assert "(default: adam, as fit)" in text and "(default: 0, as fit)" in text
    assert f"(default: {fit_default['checkpoint_every'].default}, as fit)" in text


def test_class_names_train_save_and_predict(tmp_path, capsys):
    """Labels that are names ("setosa") train, are saved in the model and come back from predict;
    the model file is written with the permissions of any other output (0644 under umask 022)."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    X = 3 * rng.normal(size=(3, 2))[y] + rng.normal(size=(60, 2))
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    data = tmp_path / "iris.csv"
    data.write_text("a;b;species\n" + "".join(f"{a};{b};{c}\n" for (a, b), c in zip(X, names)))
    model = tmp_path / "m.npz"
    old = os.umask(0o022)
    try:
        assert main(["train", "--data", str(data), "--no-progress", "--save", str(model)]) == 0
    finally:
        os.umask(old)
    assert model.stat().st_mode & 0o777 == 0o644
    np.testing.assert_array_equal(load_model(model).classes, ["setosa", "versicolor", "virginica"])
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--data", str(data)]) == 0
    out, err = capsys.readouterr()
    assert set(out.split()[1:]) <= set(names) and "accuracy on" in err
    assert float(err.split(":")[-1]) > 0.6  # 30 steps of adam: above chance (1/3)
