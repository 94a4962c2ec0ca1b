"""Dataset loading and validation: sklearn digits, .csv and .npz files, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from softmax_jax._data import DataError, encode_labels, load_digits, load_file, split


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_digits_split_is_75_25_stratified_and_standardised():
    ds = load_digits()
    assert ds.X_train.shape == (1347, 64) and ds.X_test.shape == (450, 64)
    assert ds.y_train.dtype == np.int32 and set(np.unique(ds.y_train)) == set(range(10))
    np.testing.assert_array_equal(ds.classes, np.arange(10))
    # standardised with the training statistics: mean 0, std 1 (or 0 for constant pixels)
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0, atol=1e-12)
    assert set(np.round(ds.X_train.std(axis=0), 12)) <= {0.0, 1.0}
    # stratified: class frequencies agree between the splits
    f_tr = np.bincount(ds.y_train) / ds.y_train.size
    f_te = np.bincount(ds.y_test) / ds.y_test.size
    assert np.max(np.abs(f_tr - f_te)) < 0.01


def test_csv_with_header_and_labels_mapped(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,label\n1,2,7\n3,4,-1\n5,6.5,7\n")
    X, codes, classes = load_file(path)
    np.testing.assert_array_equal(X, [[1, 2], [3, 4], [5, 6.5]])
    np.testing.assert_array_equal(classes, [-1, 7])
    np.testing.assert_array_equal(codes, [1, 0, 1])


def test_csv_without_header_and_integer_valued_float_labels(tmp_path):
    X, codes, classes = load_file(write(tmp_path, "d.csv", "1,2,0.0\n3,4,1.0\n"))
    assert X.shape == (2, 2) and codes.dtype == np.int32
    np.testing.assert_array_equal(classes, [0, 1])


@pytest.mark.parametrize(
    "text, match",
    [
        ("1,2,0\n3,x,1\n", r"d\.csv: row 2, column 2: non-numeric feature 'x'"),
        (
            "f1,f2,y\n1,2,0\n3,4,1e20\n",
            r"row 3: label 1e20 is out of range \(\|label\| < 2\*\*53\)",
        ),
        (
            "1,2,0\n3,4,99999999999999999999\n",
            r"row 2: label 99999999999999999999 is out of the int64",
        ),
        ("1,2,0\n3,4,nan\n", r"row 2: label nan is not an integer"),
        ("1,2,0\n3,4, \n", r"row 2: empty label"),
        ("1;2,5;0\n3;4,5;1\n", r"row 1, column 2: non-numeric feature '2,5' \(a decimal comma"),
        ("1,2;3,0\n1,2;3,1\n", r"row 1, column 2: non-numeric feature '2;3' \(it holds ';'"),
        ("1,2,0\n3,4\n", r"row 2: ragged row with 2 columns, expected 3"),
        ("1,2,0\n3,nan,1\n", r"row 2, column 2: feature is nan"),
        ("1,inf,0\n3,4,1\n", r"row 1, column 2: feature is inf"),
        ("1,2,0\n3,4,1.5\n", r"row 2: label 1\.5 is not an integer"),
        ("1,2,3\n3,4,3\n", r"need at least 2 classes to train, found only class 3"),
        ("", r"empty CSV file"),
        ("a,b,c\n", r"header but no data rows"),
        ("1\n2\n", r"need at least 2 columns"),
    ],
)
def test_csv_errors_name_file_row_and_column(tmp_path, text, match):
    path = write(tmp_path, "d.csv", text)
    with pytest.raises(DataError, match=match) as e:
        load_file(path)
    msg = str(e.value)
    assert msg.startswith(path) and "\n" not in msg


def test_npz_roundtrip_and_errors(tmp_path):
    path = str(tmp_path / "d.npz")
    np.savez(path, X=np.arange(8.0).reshape(4, 2), y=np.array([3, 5, 3, 5]))
    X, codes, classes = load_file(path)
    assert X.shape == (4, 2) and list(classes) == [3, 5]

    np.savez(path, X=np.ones((3, 2)))
    with pytest.raises(DataError, match=r"missing array\(s\) \['y'\]"):
        load_file(path)
    np.savez(path, X=np.ones((3, 2)), y=np.array([1 + 2j, 1, 1]))
    with pytest.raises(DataError, match="labels must be integers or names, got dtype complex128"):
        load_file(path)
    np.savez(path, X=np.ones((3, 2)), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"`y` must have shape \(N,\) = \(3,\), got \(2,\)"):
        load_file(path)
    np.savez(path, X=np.array([[1.0, np.nan], [0, 0]]), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"row 0, column 2: feature is nan"):
        load_file(path)
    np.savez(path, X=np.ones(3), y=np.array([0, 1, 0]))
    with pytest.raises(DataError, match=r"`X` must have shape \(N, D\), got \(3,\)"):
        load_file(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_file(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        load_file(write(tmp_path, "d.txt", "1,2,0\n"))
    with pytest.raises(DataError, match="cannot read as .npz"):
        load_file(write(tmp_path, "bad.npz", "not a zip"))


def test_encode_labels_rejects_non_integers():
    with pytest.raises(DataError, match=r"row 1: label nan is not an integer"):
        encode_labels(np.array([0.0, np.nan]), "f")
    codes, classes = encode_labels(np.array([10, -3, 10]), "f")
    np.testing.assert_array_equal(classes[codes], [10, -3, 10])


def test_split_without_standardising_keeps_values():
    X = np.arange(40.0).reshape(20, 2)
    y = np.arange(20) % 2
    ds = split(X, y.astype(np.int32), np.array([0, 1]), name="t", standardize=False)
    assert ds.X_train.shape == (15, 2) and ds.X_test.shape == (5, 2)
    assert set(ds.X_train[:, 0]) | set(ds.X_test[:, 0]) == set(X[:, 0])
    with pytest.raises(DataError, match="too few"):
        split(X[:1], y[:1].astype(np.int32), np.array([0, 1]), name="t")


@pytest.mark.parametrize(
    "text",
    [
        "a;b;label\n1;2;0\n3;4;1\n",  # semicolons (Excel in many locales)
        "a\tb\tlabel\n1\t2\t0\n3\t4\t1\n",
        "a|b|label\n1|2|0\n3|4|1\n",
        "a,b,label\r\n1,2,0\r\n3,4,1\r\n",  # CRLF
        '"a","b","label"\n"1","2","0"\n"3","4","1"\n',  # quoted cells
        "\ufeffa,b,label\n1,2,0\n3,4,1\n",  # UTF-8 byte-order mark
        ",a,b,label\n0,1,2,0\n1,3,4,1\n",  # pandas' index column
    ],
)
def test_csv_variants_read_alike(tmp_path, text):
    X, codes, classes = load_file(write(tmp_path, "d.csv", text))
    np.testing.assert_array_equal(X, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(classes[codes], [0, 1])


def test_csv_utf16_with_bom(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("a,b,label\n1,2,0\n3,4,1\n".encode("utf-16"))
    X, codes, classes = load_file(path)
    np.testing.assert_array_equal(X, [[1, 2], [3, 4]])


def test_csv_not_utf8_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("caf\xe9,b,label\n1,2,0\n3,4,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not a UTF-8 text CSV file"):
        load_file(path)


def test_string_class_labels(tmp_path):
    text = "x,y,species\n1,2,setosa\n3,4,virginica\n5,6,setosa\n7,8,0\n"
    X, codes, classes = load_file(write(tmp_path, "d.csv", text))
    assert classes.dtype.kind == "U"
    np.testing.assert_array_equal(classes[codes], ["setosa", "virginica", "setosa", "0"])


def test_float_labels_in_npz_out_of_range(tmp_path):
    path = str(tmp_path / "d.npz")
    np.savez(path, X=np.ones((2, 2)), y=np.array([0.0, 1e20]))
    with pytest.raises(DataError, match=r"row 1: label 1e\+20 is out of range"):
        load_file(path)
    np.savez(path, X=np.ones((2, 2)), y=np.array(["a", "b"]))
    X, codes, classes = load_file(path)
    np.testing.assert_array_equal(classes[codes], ["a", "b"])


# --- property: a table written in any common CSV dialect reads back the same ------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def csv_table(draw):
    n, d = draw(st.integers(2, 5)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 1e-30, 1e30]))
    X = np.round(rng.normal(size=(n, d)) * 1000) / 1000 * scale
    names = draw(st.sampled_from([None, "ints", "names"]))
    y = np.arange(n) % 2 + draw(st.sampled_from([0, -5, 10**12]))
    labels = [str(v) for v in y] if names != "names" else [["cat", "dog"][v % 2] for v in y]
    return {
        "X": X,
        "labels": labels,
        "delimiter": draw(st.sampled_from([",", ";", "\t", "|"])),
        "header": draw(st.booleans()),
        "index": draw(st.booleans()),
        "newline": draw(st.sampled_from(["\n", "\r\n"])),
        "quote": draw(st.booleans()),
        "encoding": draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16"])),
        "blank_lines": draw(st.booleans()),
        "fmt": draw(st.sampled_from(["{!r}", "{:.17g}", "{:e}"])),
    }


def _write_table(path, t) -> None:
    q = (lambda c: f'"{c}"') if t["quote"] else (lambda c: c)
    n, d = t["X"].shape
    lines = []
    if t["header"]:
        lines.append(([""] if t["index"] else []) + [f"f{j}" for j in range(d)] + ["label"])
    for i in range(n):
        cells = [t["fmt"].format(float(v)) for v in t["X"][i]] + [t["labels"][i]]
        lines.append(([str(i)] if t["index"] and t["header"] else []) + cells)
        if t["blank_lines"] and i == 0:
            lines.append([])
    text = t["newline"].join(t["delimiter"].join(q(c) for c in row) for row in lines)
    path.write_bytes((text + t["newline"]).encode(t["encoding"]))


@settings(max_examples=25, derandomize=True)
@given(t=csv_table())
def test_csv_dialects_read_back_the_table(tmp_path_factory, t):
    path = tmp_path_factory.mktemp("csv") / "d.csv"
    _write_table(path, t)
    X, codes, classes = load_file(path)
    written = np.vectorize(lambda v: float(t["fmt"].format(float(v))))(t["X"])
    np.testing.assert_array_equal(X, written)
    expected = np.array(t["labels"])
    got = classes[codes].astype(str)
    np.testing.assert_array_equal(got, expected)
