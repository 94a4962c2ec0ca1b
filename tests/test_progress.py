"""What ``fit`` reports (``_progress``): the progress bar on stderr (or nothing), the history's
per-epoch records, notices logged and printed."""

from __future__ import annotations

import logging

import numpy as np

from softmax_jax import fit
from softmax_jax._progress import new_history, notice


def blobs(n=90, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    return (rng.normal(size=(n, d)) + 2.0 * np.eye(k, d)[y]).astype(np.float32), y


def test_progress_bar_goes_to_stderr_and_can_be_switched_off(capsys):
    Z, y = blobs()
    _, history = fit(Z, y, epochs=2, batch_size=30, progress=True)
    err = capsys.readouterr().err
    assert "train" in err and "2/2" in err and "loss=" in err and "acc=" in err
    assert history["epoch"] == [1, 2] and set(history) == set(new_history(False))
    fit(Z, y, epochs=2, batch_size=30, progress=False)
    assert capsys.readouterr().err == ""


def test_full_batch_history_has_the_gradient(capsys):
    Z, y = blobs()
    _, history = fit(Z, y, optimizer="lbfgs", epochs=3, progress=False)
    assert set(history) == set(new_history(True)) and len(history["grad_max"]) == 3
    assert all(g >= 0 for g in history["grad_max"])


def test_notice_is_logged_and_printed_only_with_progress(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="softmax_jax"):
        notice("resuming", progress=False)
        assert capsys.readouterr().err == ""
        notice("resuming", progress=True)
        assert capsys.readouterr().err == "resuming\n"
    assert [r.message for r in caplog.records] == ["resuming", "resuming"]
