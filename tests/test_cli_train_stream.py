"""`softmax-jax train --data X.npy`: streamed training from the command line (labels as a .npy
of integers or integer-valued floats, or an .npz with y; bad rows and labels one line)."""

from __future__ import annotations

import numpy as np

from softmax_jax import load_model
from softmax_jax._cli import main


def test_streamed_labels_as_floats_or_npz_and_nan_rows(tmp_path, capsys):
    """--labels holding integer-valued floats or an .npz trains; a NaN row with lbfgs is one
    line naming --data (not a traceback from the solver's host callback)."""
    rng = np.random.default_rng(0)
    y = np.arange(64) % 2
    X = (rng.normal(size=(64, 3)) + y[:, None]).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "yf.npy", y.astype(np.float64))
    np.savez(tmp_path / "y.npz", y=y + 5)
    base = ["train", "--data", str(tmp_path / "X.npy"), "--no-progress", "--epochs", "2"]
    assert main([*base, "--labels", str(tmp_path / "yf.npy")]) == 0
    model = tmp_path / "m.npz"
    assert main([*base, "--labels", str(tmp_path / "y.npz"), "--save", str(model)]) == 0
    np.testing.assert_array_equal(load_model(model).classes, [5, 6])
    np.save(tmp_path / "bad.npy", np.array([0.5] * 64))
    capsys.readouterr()
    assert main([*base, "--labels", str(tmp_path / "bad.npy")]) == 2
    err = capsys.readouterr().err
    assert "row 0: label 0.5 is not an integer" in err and err.count("\n") == 1
    X[7, 1] = np.nan
    np.save(tmp_path / "X.npy", X)
    assert main([*base, "--labels", str(tmp_path / "y.npz"), "--optimizer", "lbfgs"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"softmax-jax train: error: --data {tmp_path / 'X.npy'} must be finite, got nan at index (7, 1)\n"
    )
