"""Data placement (``_placement``): row buckets shared by nearby sizes, padded rows of weight 0
that change nothing, the float32 Hessian operand made only when it differs from ``Z``."""

from __future__ import annotations

import numpy as np
import pytest

import softmax_jax as sj
from softmax_jax._placement import bucket_rows, place


def test_row_buckets():
    assert [bucket_rows(n) for n in (1, 16, 17, 1024, 1025, 65536, 200_000)] == [
        16, 16, 32, 1024, 1056, 65536, 200_000,
    ]  # fmt: skip
    # nearby sizes (cross-validation folds) share a bucket, never more than 3.2% larger
    sizes = np.arange(1025, 65537)
    buckets = np.array([bucket_rows(int(n)) for n in sizes])
    assert np.all(buckets >= sizes) and np.all(buckets <= sizes * 1.032)


@pytest.mark.x64
@pytest.mark.parametrize("dtype, hessian_dtype, copied", [
    (np.float32, np.float32, False), (np.float32, None, False), (np.float64, np.float32, True),
])  # fmt: skip
def test_padded_placement(dtype, hessian_dtype, copied):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(10, 3)), rng.integers(0, 3, 10)
    data = place(X, y, None, fit_intercept=True, dtype=dtype, device=None, shape=(16, 3),
                 hessian_dtype=hessian_dtype)  # fmt: skip
    assert data.Z.shape == (16, 3) and data.Z.dtype == dtype
    np.testing.assert_array_equal(np.asarray(data.s), [1] * 10 + [0] * 6)
    np.testing.assert_array_equal(np.asarray(data.Z)[10:], 0)
    assert (data.Zh is not None) == copied
    if copied:
        assert data.Zh.dtype == np.float32 and data.Zh.shape == (16, 3)


@pytest.mark.slow
def test_full_batch_fit_on_padded_rows_equals_the_sizes_own_fit():
    # fit pads N = 1030 to a bucket of 1056 rows with weight 0: the result is the unpadded
    # problem's (reached through sample weights of one, which take the weighted path too)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1030, 4))
    y = rng.integers(0, 3, 1030)
    kw = dict(optimizer="newton-cg", epochs=30, l2=1e-2, tol=1e-7, progress=False)
    p, h = sj.fit(X, y, **kw)
    q, _ = sj.fit(np.concatenate([X, X[:26]]), np.concatenate([y, y[:26]]),
                  sample_weight=np.r_[np.ones(1030), np.zeros(26)], **kw)  # fmt: skip
    np.testing.assert_allclose(p["W"], q["W"], rtol=1e-4, atol=1e-5)
    assert 0 < h["train_accuracy"][-1] <= 1
