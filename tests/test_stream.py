"""Streamed training (``fit(..., stream=True)``, ``softmax_jax._stream``): the same parameters as
the in-memory epoch, chunks of a few batches, a memmap whose pages never become anonymous memory,
errors on the rows read, checkpoints shared with the in-memory path."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

import softmax_jax as sj
import softmax_jax._stream as stream_mod

# float32: the streamed and the in-memory epochs run the same step on the same batches; only the
# compiled programs differ (a scan over the whole epoch against one per chunk), so results agree
# to a few float32 roundoffs carried over a few epochs.
RTOL, ATOL = 1e-5, 1e-6


def _problem(n=600, d=7, k=4, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d)).astype(np.float32)
    y = (np.argmax(Z[:, :k], axis=1) + (rng.random(n) < 0.2)) % k
    return Z, y.astype(np.int32), rng.uniform(0.0, 2.0, n)


def _same(a, b):
    for name in ("W", "b"):
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=RTOL, atol=ATOL)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 batches of 32 float32 rows of 7 features: many chunks and a partial last one."""
    monkeypatch.setattr(stream_mod, "CHUNK_BYTES", 3 * 32 * 7 * 4)


@pytest.mark.parametrize(
    "kw",
    [
        dict(optimizer="adam", batch_size=32),
        dict(optimizer="sgd", batch_size=50, l2=1e-2, weighted=True),
        dict(optimizer="lion", batch_size=600),  # one batch, one chunk
    ],
    ids=["adam_b32", "sgd_b50_weights_l2", "lion_full"],
)
def test_stream_matches_in_memory(small_chunks, kw):
    """Same seed: same parameters and per-epoch metrics, streamed or in memory."""
    Z, y, sw = _problem()
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["sample_weight"] = sw
    ref, ref_h = sj.fit(Z, y, epochs=3, seed=7, progress=False, **kw)
    got, got_h = sj.fit(Z, y, epochs=3, seed=7, progress=False, stream=True, **kw)
    _same(got, ref)
    for key in ("loss", "train_accuracy"):
        np.testing.assert_allclose(got_h[key], ref_h[key], rtol=RTOL)


def test_stream_from_memmap_keeps_it_out_of_anonymous_memory(tmp_path, monkeypatch):
    """A streamed epoch over a 96 MB float32 memmap (chunks of 2 MB, a small file's share of the
    default): the process's anonymous memory (RssAnon, sampled every 2 ms) grows by less than a
    quarter of the file (the host's 4 blocks and a chunk or two in flight), while a copy of the
    file grows it by the file's size. (On a CPU the in-memory fit of a float32 memmap may alias
    the file's pages too; a GPU would copy them.)"""
    monkeypatch.setattr(stream_mod, "CHUNK_BYTES", 2 << 20)
    n, d = 48_000, 500
    path = tmp_path / "Z.npy"
    Zw = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(0)
    for i in range(0, n, 8000):
        Zw[i : i + 8000] = rng.normal(size=(8000, d)).astype(np.float32)
    y = (Zw[:, 0] > 0).astype(np.int32)
    Zw.flush()
    del Zw
    Z = np.load(path, mmap_mode="r")
    size = path.stat().st_size
    kw = dict(epochs=1, batch_size=512, seed=0, progress=False)
    sj.fit(Z[:2048], y[:2048], stream=True, **kw)  # compile the chunk programs first
    grew = _peak_growth(lambda: sj.fit(Z, y, stream=True, **kw))
    assert grew < size / 4, (
        f"RssAnon grew by {grew / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"
    )
    copied = _peak_growth(lambda: np.array(Z).sum())
    assert copied > 0.9 * size  # the measurement sees a copy of the data


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _peak_growth(fn) -> int:
    """The peak of RssAnon while ``fn`` runs, minus its value before (sampled in a thread)."""
    base, peak, done = _rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss_anon()) - base


def test_stream_rejects_nonfinite_rows_as_read():
    Z, y, _ = _problem()
    Z[123, 4] = np.nan
    with pytest.raises(ValueError, match=r"`Z` must be finite, got nan at index \(123, 4\)"):
        sj.fit(Z, y, epochs=1, batch_size=64, progress=False, stream=True)


def test_stream_checks_rows_until_an_epoch_found_them_finite(small_chunks, monkeypatch):
    """Epoch 1 checks every row it reads; once an epoch found them all finite the later epochs
    skip the check (the rows are the same); each ``fit`` call checks again."""
    Z, y, _ = _problem()
    checks = []
    original = stream_mod._train_chunk

    def recording(*args, **kw):
        checks.append(bool(args[9]))  # `check`, a device bool
        return original(*args, **kw)

    monkeypatch.setattr(stream_mod, "_train_chunk", recording)
    sj.fit(Z, y, epochs=3, batch_size=32, progress=False, stream=True)
    per_epoch = len(checks) // 3
    assert per_epoch > 1 and checks == [True] * per_epoch + [False] * (2 * per_epoch)
    checks.clear()
    Z[-1, 0] = np.inf
    with pytest.raises(ValueError, match=r"`Z` must be finite, got inf at index \(599, 0\)"):
        sj.fit(Z, y, epochs=3, batch_size=32, progress=False, stream=True)
    assert checks == [True] * per_epoch  # a new call checks again, and stops at epoch 1


def test_stream_reuses_a_host_block_only_once_its_chunk_is_trained(small_chunks, monkeypatch):
    """The host blocks go to the device without a copy and are read into again for later chunks:
    each is given back to the ring only when the chunk that used it has finished training."""
    Z, y, _ = _problem()
    trained: list = []  # (features handed to the device, that chunk's outputs)
    early: list[int] = []
    original_chunk, original_give = stream_mod._train_chunk, stream_mod._Ring.give

    def chunk(*args, **kw):
        out = original_chunk(*args, **kw)
        trained.append((args[5], out))
        return out

    def give(self, block):
        mine = [out for Zc, out in trained if np.shares_memory(Zc, block)]
        if not all(x.is_ready() for x in jax.tree.leaves(mine[-1])):
            early.append(len(trained))
        original_give(self, block)

    monkeypatch.setattr(stream_mod, "_train_chunk", chunk)
    monkeypatch.setattr(stream_mod._Ring, "give", give)
    ref, _ = sj.fit(Z, y, epochs=2, batch_size=32, seed=3, progress=False)
    got, _ = sj.fit(Z, y, epochs=2, batch_size=32, seed=3, progress=False, stream=True)
    assert len(trained) > 8 and early == []
    _same(got, ref)


def test_stream_checks_labels_and_weights_up_front():
    Z, y, _ = _problem()
    with pytest.raises(ValueError, match=r"`y` must be >= 0"):
        sj.fit(Z, y - 1, epochs=1, progress=False, stream=True)
    with pytest.raises(ValueError, match=r"`sample_weight`"):
        sj.fit(Z, y, sample_weight=-np.ones(len(y)), epochs=1, progress=False, stream=True)


def test_stream_integer_features_cast_per_batch(small_chunks):
    Z, y, _ = _problem()
    Zi = np.round(Z * 4).astype(np.int16)
    ref, _ = sj.fit(Zi.astype(np.float32), y, epochs=2, batch_size=32, progress=False)
    got, _ = sj.fit(Zi, y, epochs=2, batch_size=32, progress=False, stream=True)
    _same(got, ref)


def test_stream_resumes_an_in_memory_checkpoint(tmp_path, small_chunks):
    """The checkpoint does not depend on where the data live: 2 epochs in memory, then 2 more
    streamed from the same directory, end where 4 in-memory epochs end."""
    Z, y, _ = _problem()
    kw = dict(batch_size=32, seed=1, progress=False)
    ref, _ = sj.fit(Z, y, epochs=4, **kw)
    sj.fit(Z, y, epochs=2, checkpoint_dir=tmp_path, **kw)
    got, hist = sj.fit(Z, y, epochs=4, checkpoint_dir=tmp_path, stream=True, **kw)
    assert hist["epoch"] == [1, 2, 3, 4]
    _same(got, ref)


def test_prefetch_hands_producer_errors_to_the_consumer():
    def make(j):
        if j == 2:
            raise OSError("disk gone")
        return j

    chunks = stream_mod._Prefetch(make, 5)
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in chunks:
            got.append(item)
    chunks.close()
    assert got == [0, 1]


def test_read_rows_in_any_order():
    Z = np.arange(40.0).reshape(10, 4)
    idx = np.array([7, 2, 2, 9, 0])
    np.testing.assert_array_equal(stream_mod.read_rows(Z, idx), Z[idx])


def test_cli_train_streams_a_npy(tmp_path, capsys):
    """``softmax-jax train --data X.npy`` streams the memmapped file (labels: y.npy beside it, or
    --labels) and ends where the in-memory fit of the same data ends."""
    from softmax_jax._cli import main

    Z, y, _ = _problem()
    np.save(tmp_path / "X.npy", Z)
    np.save(tmp_path / "y.npy", y.astype(np.int64))
    args = [
        "train",
        "--data",
        str(tmp_path / "X.npy"),
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--no-progress",
    ]
    assert main([*args, "--save", str(tmp_path / "m.npz"), "--lr", "0.05"]) == 0
    assert "streamed (memmap): 600 samples, 7 features" in capsys.readouterr().out
    ref, _ = sj.fit(Z, y, epochs=2, batch_size=64, l2=1e-4, learning_rate=0.05, progress=False)
    with np.load(tmp_path / "m.npz") as m:
        _same({"W": m["W"], "b": m["b"]}, ref)
    np.save(tmp_path / "short.npy", y[:10])
    assert main([*args, "--labels", str(tmp_path / "short.npy")]) == 2
    assert "must hold (600,) labels for --data, got (10,)" in capsys.readouterr().err


@pytest.mark.parametrize("weighted", [False, True])
def test_stream_lbfgs_passes_chunk_by_chunk(monkeypatch, weighted):
    """L-BFGS with stream=True: every pass of its line search sums eq. (2) and its gradient over
    host chunks (here 5 of 128 rows and a partial one); same iterates as in memory."""
    monkeypatch.setattr(stream_mod, "CHUNK_BYTES", 128 * 7 * 4)
    Z, y, sw = _problem()
    kw = dict(optimizer="lbfgs", epochs=4, progress=False, l2=1e-3)
    if weighted:
        kw["sample_weight"] = sw
    calls = []
    original = stream_mod.StreamedRows._sums
    monkeypatch.setattr(
        stream_mod.StreamedRows,
        "_sums",
        lambda self, p, stats: calls.append(stats) or original(self, p, stats),
    )
    ref, ref_h = sj.fit(Z, y, **kw)
    got, got_h = sj.fit(Z, y, stream=True, **kw)
    assert calls.count(True) == 4 and calls.count(False) >= 5  # accuracy per epoch; passes
    _same(got, ref)
    np.testing.assert_allclose(got_h["loss"], ref_h["loss"], rtol=RTOL)
    np.testing.assert_allclose(got_h["train_accuracy"], ref_h["train_accuracy"], rtol=RTOL)


def test_stream_full_batch_limits():
    Z, y, _ = _problem()
    with pytest.raises(
        ValueError,
        match=r"supports optimizer='lbfgs' on one device, got stream=True with optimizer 'newton-cg'",
    ):
        sj.fit(Z, y, optimizer="newton-cg", epochs=1, progress=False, stream=True)
