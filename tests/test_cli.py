"""`_cli`: the dispatch of every subcommand, as property tests driven in-process (``main(argv)``):
whatever the flags and files, ``softmax-jax`` exits 0 (or 1: a failed gradient check), or 2 with
one line ``softmax-jax <cmd>: error: ...`` on stderr, and never lets an exception through."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from softmax_jax._cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data files, good and bad, and a trained model; all small."""
    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    X = rng.normal(size=(40, 3)) + 2 * y[:, None]
    rows = [f"{a:.4f},{b:.4f},{c:.4f}" for a, b, c in X]

    def write(name, text, mode="w"):
        path = tmp / name
        path.write_bytes(text) if mode == "wb" else path.write_text(text)
        return str(path)

    f = {
        "good.csv": write(
            "good.csv", "a,b,c,label\n" + "".join(f"{r},{v}\n" for r, v in zip(rows, y))
        ),
        "semi.csv": write(
            "semi.csv", "".join(f"{r.replace(',', ';')};{v}\n" for r, v in zip(rows, y))
        ),
        "names.csv": write("names.csv", "".join(f"{r},{'ab'[v]}\n" for r, v in zip(rows, y))),
        "features.csv": write("features.csv", "".join(f"{r}\n" for r in rows)),
        "nan.csv": write("nan.csv", "1,2,3,0\n1,nan,3,1\n"),
        "ragged.csv": write("ragged.csv", "1,2,3,0\n1,2,1\n"),
        "one.csv": write("one.csv", "1,2,3,0\n4,5,6,0\n"),
        "empty.csv": write("empty.csv", ""),
        "binary.csv": write("binary.csv", b"\x00\xff\xfe\x01" * 20, "wb"),
        "big.csv": write("big.csv", "1,2,3,0\n4,5,6,1e20\n"),
        "wide.csv": write("wide.csv", "1,2,3,4,5,0\n"),
        "data.txt": write("data.txt", "1,2,0\n"),
        "missing.csv": str(tmp / "missing.csv"),
        "dir": str(tmp),
    }
    np.savez(tmp / "good.npz", X=X, y=y)
    np.savez(tmp / "floaty.npz", X=X, y=y + 0.5)
    np.savez(tmp / "noy.npz", X=X)
    np.save(tmp / "X.npy", X.astype(np.float32))
    np.save(tmp / "y.npy", y)
    np.save(tmp / "yfloat.npy", y.astype(float))
    np.save(tmp / "yshort.npy", y[:5])
    np.save(tmp / "X1d.npy", X[:, 0])
    for name in (
        "good.npz",
        "floaty.npz",
        "noy.npz",
        "X.npy",
        "y.npy",
        "yfloat.npy",
        "yshort.npy",
        "X1d.npy",
    ):
        f[name] = str(tmp / name)
    model = str(tmp / "model.npz")
    assert (
        main(["train", "--data", f["good.csv"], "--epochs", "2", "--no-progress", "--save", model])
        == 0
    )
    f["model.npz"] = model
    with open(model, "rb") as fh:
        raw = bytearray(fh.read())
    f["cut.npz"] = write("cut.npz", bytes(raw[: len(raw) // 2]), "wb")
    raw[len(raw) // 2] ^= 0xFF
    f["flipped.npz"] = write("flipped.npz", bytes(raw), "wb")
    f["tmp"] = str(tmp)
    return f


def check_exit(argv, command: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: bad flag syntax
            rc = e.code
    err = err.getvalue()
    event(f"exit {rc}: {err.split(': error: ')[-1][:40] if rc == 2 else ''}")
    assert rc in (0, 1, 2), (argv, rc, err)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith(f"softmax-jax {command}: error: "), (argv, err)
    assert "Traceback" not in err, (argv, err)


TRAIN_DATA = ["good.csv", "semi.csv", "names.csv", "good.npz", "X.npy"] * 3 + ["good.csv", "semi.csv", "names.csv", "nan.csv", "ragged.csv", "one.csv", "empty.csv",
              "binary.csv", "big.csv", "data.txt", "missing.csv", "dir", "good.npz", "floaty.npz",
              "noy.npz", "X.npy", "X1d.npy"]  # fmt: skip
TRAIN_FLAGS = {
    "--epochs": ["1", "2", "0", "-1", "x", "1.5"],
    "--optimizer": ["sgd", "lbfgs", "newton-cg", "bogus"],
    "--lr": ["0.1", "-1", "nan", "abc"],
    "--batch-size": ["8", "0", "x", "100000"],
    "--l2": ["0", "-1", "inf"],
    "--seed": ["1", "-1", "4294967296"],
    "--test-size": ["0.5", "0", "1", "0.99", "nan"],
    "--checkpoint-every": ["1", "0"],
    "--labels": ["y.npy", "yfloat.npy", "yshort.npy", "good.npz", "missing.csv", "good.csv"],
    "--save": ["out.npz", "nodir/out.npz", "dir"],
    "--checkpoint-dir": ["ck", "good.csv"],
}


@settings(max_examples=20, derandomize=True)
@given(
    data=st.sampled_from(TRAIN_DATA),
    flags=st.dictionaries(st.sampled_from(sorted(TRAIN_FLAGS)), st.integers(0, 9), max_size=2),
    standardize=st.booleans(),
)
def test_train_exits_0_1_or_2_with_one_line(files, data, flags, standardize):
    argv = ["train", "--data", files[data], "--no-progress"]
    if "--epochs" not in flags:
        argv += ["--epochs", "1"]
    for flag, i in flags.items():
        value = TRAIN_FLAGS[flag][i if i < len(TRAIN_FLAGS[flag]) else 0]  # mostly the good one
        if flag in ("--labels", "--checkpoint-dir", "--save"):
            value = files.get(value, f"{files['tmp']}/{value}")
        argv += [flag, value]
    argv += [] if standardize else ["--no-standardize"]
    check_exit(argv, "train")


@settings(max_examples=20, derandomize=True)
@given(
    model=st.sampled_from(
        ["model.npz", "cut.npz", "flipped.npz", "missing.csv", "good.csv", "dir"]
    ),
    data=st.sampled_from(
        [
            "good.csv",
            "features.csv",
            "semi.csv",
            "names.csv",
            "wide.csv",
            "nan.csv",
            "good.npz",
            "noy.npz",
            "binary.csv",
            "missing.csv",
        ]
    ),  # fmt: skip
    out=st.sampled_from([None, "p.csv"] * 3 + ["nodir/p.csv", "dir"]),
    proba=st.booleans(),
    damaged=st.integers(0, 3),
)
def test_predict_exits_0_or_2_with_one_line(files, model, data, out, proba, damaged):
    model = model if damaged == 3 else "model.npz"  # a damaged model one time in four
    argv = ["predict", "--model", files[model], "--data", files[data]]
    if out is not None:
        argv += ["--out", files.get(out, f"{files['tmp']}/{out}")]
    argv += ["--proba"] if proba else []
    check_exit(argv, "predict")
