"""`softmax-jax predict`: a saved model on raw features, from the CLI and from Python alike."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

import softmax_jax as sj
from softmax_jax._cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CSV of raw features (offset and scaled: standardisation matters) and a model trained on
    it with `softmax-jax train --save`."""
    tmp = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(7)
    y = np.arange(150) % 3
    X = 40 + 20 * (rng.normal(size=(3, 4))[y] + 0.3 * rng.normal(size=(150, 4)))
    data = tmp / "data.csv"
    rows = [",".join(f"{v:.17g}" for v in x) + f",{c}" for x, c in zip(X, y + 5)]
    data.write_text("a,b,c,d,label\n" + "\n".join(rows) + "\n")
    features = tmp / "features.csv"  # the same rows without the label column
    features.write_text("\n".join(",".join(r.split(",")[:4]) for r in rows) + "\n")
    model = tmp / "model.npz"
    assert main(["train", "--data", str(data), "--save", str(model), "--no-progress"]) == 0
    return X, y + 5, data, features, model


def read_csv(text: str):
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], rows[1:]


def test_predict_writes_one_label_per_row_matching_python(trained, tmp_path, capsys):
    X, y, data, features, model = trained
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    header, rows = read_csv(out.read_text())
    labels = np.array([int(r[0]) for r in rows])
    m = sj.load_model(model)
    assert header == ["prediction"] and len(rows) == 150
    np.testing.assert_array_equal(labels, m.predict(X))
    acc = float(np.mean(labels == y))
    assert acc > 0.9
    assert f"wrote 150 predictions to {out}\n" in stdout
    assert f"accuracy on {data} (its last column as the labels): {acc:.4f}" in stdout
    # features only (no label column), to standard output: the same predictions, CSV only
    assert main(["predict", "--model", str(model), "--data", str(features)]) == 0
    captured = capsys.readouterr()
    assert read_csv(captured.out)[1] == rows and "accuracy" not in captured.err


def test_predict_proba(trained, capsys):
    X, _, _, features, model = trained
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--data", str(features), "--proba"]) == 0
    header, rows = read_csv(capsys.readouterr().out)
    P = np.array(rows, dtype=float)
    assert header == ["p_5", "p_6", "p_7"] and P.shape == (150, 3)
    np.testing.assert_allclose(P.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(P, sj.load_model(model).predict_proba(X), atol=1e-6)


def test_predict_npz_with_and_without_labels(trained, tmp_path, capsys):
    X, y, _, _, model = trained
    np.savez(tmp_path / "xy.npz", X=X, y=y)
    np.savez(tmp_path / "x.npz", X=X)
    for name in ("xy.npz", "x.npz"):
        capsys.readouterr()
        assert main(["predict", "--model", str(model), "--data", str(tmp_path / name)]) == 0
        captured = capsys.readouterr()
        assert len(read_csv(captured.out)[1]) == 150
        assert ("accuracy on" in captured.err) == (name == "xy.npz")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_model", "--model {tmp}/nope.npz: no such file"),
        ("corrupt_model", "--model {tmp}/bad.npz: not a softmax_jax model file"),
        ("old_model", "an older `softmax-jax train --save` file"),
        ("wrong_columns", "--data {tmp}/three.csv: has 3 columns; the model takes 4 features"),
        ("bad_cell", "--data {tmp}/cell.csv: row 2, column 3: non-numeric feature 'x'"),
        ("no_out_dir", "--out /no/such/dir/p.csv: directory /no/such/dir does not exist"),
    ],
)
def test_predict_errors_are_one_line(trained, tmp_path, capsys, case, expected):
    _, _, _, features, model = trained
    (tmp_path / "bad.npz").write_bytes(b"garbage" * 10)
    np.savez(tmp_path / "old.npz", W=np.zeros((4, 3)), b=np.zeros(3), classes=np.arange(3))
    (tmp_path / "three.csv").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "cell.csv").write_text("1,2,3,4\n1,2,x,4\n")
    args = {
        "missing_model": ["--model", str(tmp_path / "nope.npz"), "--data", str(features)],
        "corrupt_model": ["--model", str(tmp_path / "bad.npz"), "--data", str(features)],
        "old_model": ["--model", str(tmp_path / "old.npz"), "--data", str(features)],
        "wrong_columns": ["--model", str(model), "--data", str(tmp_path / "three.csv")],
        "bad_cell": ["--model", str(model), "--data", str(tmp_path / "cell.csv")],
        "no_out_dir": [
            "--model",
            str(model),
            "--data",
            str(features),
            "--out",
            "/no/such/dir/p.csv",
        ],
    }[case]
    capsys.readouterr()
    assert main(["predict", *args]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("softmax-jax predict: error: ") and err.count("\n") == 1
    assert expected.format(tmp=tmp_path) in err, err
    assert out == ""
