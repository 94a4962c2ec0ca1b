"""`_kernel`: the fused head's per-chunk math called directly, against float64 NumPy.

The row statistics of one chunk (online log-sum-exp, target logit, smoothing sum, first argmax)
over several column blocks, the per-sample loss, the gradient blocks, and the pass over the rows
(`fused_pass` on one device) with generated shapes: rows not a multiple of the chunk, classes
not a multiple of the column block, label smoothing, z-loss, softcap, both weight layouts, a
bias, per-row cotangents, the mean's ``1 / Σ s``, and out-of-range labels of weight 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from softmax_jax import _kernel

# float64 throughout: the kernel must equal the NumPy definitions to a few roundoffs.
pytestmark = pytest.mark.x64
RTOL = 1e-12

OPTIONS = {
    "plain": (0.0, 0.0, None),
    "smoothing": (0.2, 0.0, None),
    "z_loss": (0.0, 0.05, None),
    "softcap": (0.0, 0.0, 1.5),
    "all": (0.1, 0.01, 2.0),
}  # (ε, λ, softcap)


def spec(k, *, chunk=4, kblock=3, option="plain", layout="dk", aux=False) -> _kernel.Spec:
    eps, lam, cap = OPTIONS[option]
    return _kernel.Spec("sum", chunk, kblock, eps, lam, cap, layout, k, aux)


def numpy_head(Z, W, b, y, s, g, sp: _kernel.Spec) -> dict:
    """The head from its definition in float64 NumPy: logits ``a`` ``(N, K)``, ``ℓ_i``, ``lse``,
    the first argmax, and the gradients of ``Σ_i s_i g_i ℓ_i`` with respect to ``Z``, ``W``, ``b``
    (``G = ∂/∂r``, r the logits before the softcap)."""
    Z, W = np.asarray(Z, np.float64), np.asarray(W, np.float64)
    Wd = W if sp.weight_layout == "dk" else W.T
    y, s = np.asarray(y).reshape(-1), np.asarray(s, np.float64).reshape(-1)
    Z = Z.reshape(len(y), -1)
    g = np.ones(len(y)) if g is None else np.asarray(g, np.float64).reshape(-1)
    r = Z @ Wd + (0.0 if b is None else np.asarray(b, np.float64))
    cap, eps, lam = sp.softcap, sp.label_smoothing, sp.z_loss
    a = r if cap is None else cap * np.tanh(r / cap)
    k = a.shape[1]
    m = a.max(axis=1, keepdims=True)
    e = np.exp(a - m)
    lse = (m + np.log(e.sum(axis=1, keepdims=True)))[:, 0]
    P = e / e.sum(axis=1, keepdims=True)
    valid = (y >= 0) & (y < k)
    onehot = np.zeros_like(a)
    onehot[np.flatnonzero(valid), y[valid]] = 1.0
    per = lse - ((1 - eps) * (a * onehot).sum(axis=1) + eps * a.mean(axis=1)) + lam * lse**2
    per = np.where(valid, per, np.where(s == 0, 0.0, np.nan))
    cc = np.where(valid | (s == 0), s * g, np.nan)
    G = cc[:, None] * ((1 + 2 * lam * lse)[:, None] * P - ((1 - eps) * onehot + eps / k))
    if cap is not None:
        G = G * (1 - (a / cap) ** 2)
    dWd = Z.T @ G
    return {
        "a": a, "per": per, "lse": lse, "pred": a.argmax(axis=1), "G": G, "dZ": G @ Wd.T,
        "dW": dWd if sp.weight_layout == "dk" else dWd.T, "db": G.sum(axis=0),
    }  # fmt: skip


def problem(seed, n, d, k, *, layout="dk", lead=None, out_of_range=0):
    """``(Z, W, b, y, s)``; the first ``out_of_range`` rows get labels outside ``[0, K)``
    (-1, K, ...) and weight 0."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d))
    W = rng.normal(size=(d, k) if layout == "dk" else (k, d))
    b = rng.normal(size=k)
    y = rng.integers(0, k, size=n)
    s = rng.uniform(0.5, 2.0, size=n)
    bad = np.arange(min(out_of_range, n))
    y[bad] = np.where(bad % 2 == 0, -1, k + bad)
    s[bad] = 0.0
    if lead is not None:
        Z, y, s = Z.reshape(*lead, d), y.reshape(lead), s.reshape(lead)
    return tuple(jnp.asarray(x) for x in (Z, W, b, y.astype(np.int32), s))


def identity(x):
    return x


# The chunk functions under one jit each (op by op, every primitive would compile on its own).
@functools.partial(jax.jit, static_argnames=("sp", "kblock"))
def row_stats(A, b, yl, offset, *, sp, kblock):
    return _kernel._row_stats(A, b, yl, offset, sp, kblock, identity)


@functools.partial(jax.jit, static_argnames=("sp", "kblock"))
def loss_rows(A, b, yl, *, sp, kblock):
    stats, tgt, tot, _ = _kernel._row_stats(A, b, yl, 0, sp, kblock, identity)
    return _kernel._per_sample(stats, tgt, tot, sp)


@functools.partial(jax.jit, static_argnames=("sp", "kblock"))
def grad_blocks(A, b, stats, yl, cc, Zc, W, dW, db, *, sp, kblock):
    wants = (True, True, True)
    return _kernel._grad_blocks(A, b, stats, yl, cc, Zc, W, dW, db, sp, kblock, wants, identity)


# --------------------------------------------------------------------------------------------
# Column blocks.
# --------------------------------------------------------------------------------------------


def test_column_block():
    assert _kernel.column_block(10, False) == min(10, _kernel.K_BLOCK)
    assert _kernel.column_block(10_000, False) == _kernel.K_BLOCK
    assert _kernel.column_block(10, False, 3) == 3
    assert _kernel.column_block(2, False, 3) == 2  # never wider than the chunk
    assert _kernel.column_block(10, True, 3) == 3  # a class shard: ⌈10 / 4⌉ whatever kblock
    assert _kernel.column_block(40_000, True) == 10_000
    assert _kernel.column_block(1, True) == 1


# --------------------------------------------------------------------------------------------
# One chunk: row statistics, per-sample loss, gradient blocks.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,kblock", [(7, 3), (6, 3), (1, 1)])
@pytest.mark.parametrize("option", ["smoothing", "all", "softcap"])
def test_row_stats_over_column_blocks(k, kblock, option):
    """``(m, log s)`` with ``m + log s = lse``, the target logit (0 for a label that is not a
    class), ``Σ_k (a_ik − m_i)`` and the first argmax, for whole blocks and a remainder."""
    Z, W, b, y, s = problem(k + kblock, 6, 3, k, out_of_range=2)
    sp = spec(k, kblock=kblock, option=option, aux=True)
    A = Z @ W
    stats, tgt, tot, pred = row_stats(A, b, y, 0, sp=sp, kblock=kblock)
    ref = numpy_head(Z, W, b, y, s, None, sp)
    a, m = ref["a"], ref["a"].max(axis=1)
    assert_close(stats[:, 0], m, rtol=RTOL)
    assert_close(stats[:, 0] + stats[:, 1], ref["lse"], rtol=RTOL)
    in_range = (np.asarray(y) >= 0) & (np.asarray(y) < k)
    want_tgt = np.where(in_range, a[np.arange(6), np.clip(y, 0, k - 1)], 0.0)
    assert_close(tgt, want_tgt, rtol=RTOL)
    if sp.label_smoothing:
        assert_close(tot, (a - m[:, None]).sum(axis=1), rtol=RTOL)
    else:
        assert tot is None  # only smoothing reads it
    np.testing.assert_array_equal(pred, ref["pred"])


def test_row_stats_first_argmax_on_ties_across_blocks():
    # Row 0's maximum appears in blocks 0 and 2, row 1's in blocks 1 and 2 (remainder).
    A = jnp.array([[0.0, 5.0, 1.0, 2.0, 5.0, 5.0, 5.0], [0.0, 1.0, 2.0, 9.0, 3.0, 4.0, 9.0]])
    sp = spec(7, kblock=3, option="smoothing", aux=True)
    *_, pred = row_stats(A, None, jnp.array([0, 0]), 0, sp=sp, kblock=3)
    np.testing.assert_array_equal(pred, [1, 3])


def test_row_stats_of_a_class_shard_offset():
    """Labels are read relative to the shard's first class: ``yl = y − offset``; the argmax
    comes back as a global class."""
    A = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    sp = spec(9, kblock=2, aux=True)
    yl = jnp.array([7, 4]) - 6  # global labels 7 and 4 on the shard holding classes 6..8
    _, tgt, _, pred = row_stats(A, None, yl, 6, sp=sp, kblock=2)
    np.testing.assert_array_equal(tgt, [3.0, 0.0])
    np.testing.assert_array_equal(pred, [7, 6])


def test_row_stats_combined_over_class_shards():
    """On a class shard (``spec.class_axes`` set) each statistic is combined across the shards:
    ``M = max_p m_p``, ``Σ_p s_p exp(m_p − M)``, the smoothing sums rebased to ``M``, the target
    logits summed, the first global argmax; here 3 shards of 3 classes under ``vmap`` with a named
    axis (its collectives are those of ``shard_map``), each holding its columns of the logits."""
    k, shards, n = 9, 3, 6
    Z, W, b, y, s = problem(7, n, 3, k, out_of_range=2)
    sp = spec(k, option="all", aux=True)._replace(class_axes=("c",))
    kl = k // shards
    A = (Z @ W).reshape(n, shards, kl).transpose(1, 0, 2)
    offsets = jnp.arange(shards) * kl

    def shard(A, b, offset):
        return _kernel._row_stats(A, b, y - offset, offset, sp, 2, identity)

    stats, tgt, tot, pred = jax.jit(jax.vmap(shard, axis_name="c"))(
        A, b.reshape(shards, kl), offsets
    )
    ref = numpy_head(Z, W, b, y, s, None, sp)
    a, m = ref["a"], ref["a"].max(axis=1)
    in_range = (np.asarray(y) >= 0) & (np.asarray(y) < k)
    for p in range(shards):  # every shard holds the combined statistics
        assert_close(stats[p, :, 0], m, rtol=RTOL)
        assert_close(stats[p, :, 0] + stats[p, :, 1], ref["lse"], rtol=RTOL)
        assert_close(tgt[p], np.where(in_range, a[np.arange(n), np.clip(y, 0, k - 1)], 0.0),
                     rtol=RTOL)  # fmt: skip
        assert_close(tot[p], (a - m[:, None]).sum(axis=1), rtol=RTOL)
        np.testing.assert_array_equal(pred[p], ref["pred"])


@pytest.mark.parametrize("option", list(OPTIONS))
def test_per_sample_loss(option):
    Z, W, b, y, s = problem(1, 5, 4, 6)
    sp = spec(6, option=option)
    per = loss_rows(Z @ W, b, y, sp=sp, kblock=4)
    assert_close(per, numpy_head(Z, W, b, y, s, None, sp)["per"], rtol=RTOL)


def test_per_sample_loss_of_tied_huge_logits_does_not_cancel():
    """``ℓ_i`` from the pair ``(m_i, log s_i)``: K tied logits at 1e30 give log K, not
    ``(1e30 + log K) − 1e30 = 0``."""
    A = jnp.full((2, 5), 1e30)
    for option in ("plain", "smoothing"):
        sp = spec(5, option=option)
        per = loss_rows(A, None, jnp.array([0, 4]), sp=sp, kblock=2)
        np.testing.assert_allclose(per, np.log(5), 1e-14)


@pytest.mark.parametrize(
    "layout,option,kblock", [("dk", "all", 3), ("kd", "all", 2), ("dk", "smoothing", 2)]
)
def test_gradient_blocks(layout, option, kblock):
    """``G Wᵀ``, ``dW + Z_cᵀ G`` and ``db + Σ_i G_i`` with ``G = diag(cc) ∂ℓ/∂r``, accumulated
    onto the given ``dW``/``db``; rows of weight 0 with labels outside ``[0, K)`` add nothing."""
    k = 7
    Z, W, b, y, s = problem(kblock, 5, 3, k, layout=layout, out_of_range=2)
    g = jnp.linspace(-1.0, 2.0, 5)
    sp = spec(k, option=option, layout=layout)
    A = Z @ W if layout == "dk" else Z @ W.T
    stats, *_ = row_stats(A, b, y, 0, sp=sp, kblock=kblock)
    dW0, db0 = jnp.ones(W.shape), jnp.arange(float(k))
    dZ, dW, db = grad_blocks(A, b, stats, y, s * g, Z, W, dW0, db0, sp=sp, kblock=kblock)
    ref = numpy_head(Z, W, b, y, s, g, sp)
    assert_close(dZ, ref["dZ"], rtol=RTOL)
    assert_close(dW - dW0, ref["dW"], rtol=RTOL)
    assert_close(db - db0, ref["db"], rtol=RTOL)
    assert not np.any(np.asarray(dZ)[:2]), "weight-0 rows with labels outside [0, K)"


# --------------------------------------------------------------------------------------------
# The pass over the rows.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("sp", "wants", "want_per"))
def run_pass(Z, W, b, y, s, g, inv, lse=None, *, sp, wants=(True, True, True), want_per=True):
    return _kernel.fused_pass(Z, W, b, y, s, sp, g=g, lse=lse, inv=inv, want_per=want_per,
                              wants=wants)  # fmt: skip


def check_pass(out, ref, lead, sp, inv):
    per, lse, pred, dZ, dW, db = out
    scale = 1.0 if inv is None else float(inv)
    assert per.shape == lead and dZ.shape[:-1] == lead
    assert_close(per, ref["per"].reshape(lead), rtol=RTOL)
    for name, got in (("dZ", dZ), ("dW", dW), ("db", db)):
        assert_close(got, scale * ref[name].reshape(got.shape), rtol=RTOL)
    if sp.aux:
        assert_close(lse[..., 0] + lse[..., 1], ref["lse"].reshape(lead), rtol=RTOL)
        np.testing.assert_array_equal(pred, ref["pred"].reshape(lead))
    else:
        assert lse.size == 0 and pred.size == 0


@settings(max_examples=12, derandomize=True)
@given(
    n=st.integers(1, 13),
    chunk=st.integers(1, 6),
    k=st.integers(1, 9),
    kblock=st.integers(1, 4),
    option=st.sampled_from(list(OPTIONS)),
    layout=st.sampled_from(["dk", "kd"]),
    bias=st.booleans(),
    aux=st.booleans(),
    cotangent=st.booleans(),
    mean=st.booleans(),
    split_lead=st.booleans(),
)
def test_pass_generated(n, chunk, k, kblock, option, layout, bias, aux, cotangent, mean,
                        split_lead):  # fmt: skip
    """Shapes (row and class remainders, a chunk or block wider than the data), options and
    leading dims drawn together; the first rows hold labels outside ``[0, K)`` with weight 0."""
    lead = (2, n) if split_lead else (n,)
    rows = int(np.prod(lead))
    Z, W, b, y, s = problem(n * 31 + k, rows, 3, k, layout=layout, lead=lead, out_of_range=2)
    b = b if bias else None
    g = jnp.cos(jnp.arange(rows, dtype=jnp.float64)).reshape(lead) if cotangent else None
    inv = 1.0 / jnp.sum(s) if mean else None
    sp = spec(k, chunk=chunk, kblock=kblock, option=option, layout=layout, aux=aux)
    out = run_pass(Z, W, b, y, s, g, inv, sp=sp)
    check_pass(out, numpy_head(Z, W, b, y, s, g, sp), lead, sp, inv)


def test_pass_reads_a_saved_lse_and_skips_gradients_not_asked_for():
    """The backward pass of ``"none"`` reads the forward's ``lse`` instead of recomputing it,
    and a gradient not in ``wants`` comes back empty."""
    Z, W, b, y, s = problem(3, 11, 3, 7, out_of_range=1)
    sp = spec(7, chunk=4, kblock=3, option="all", aux=True)
    _, lse, *_ = run_pass(Z, W, b, y, s, None, None, sp=sp)
    g = jnp.linspace(0.5, 1.5, 11)
    per, lse2, pred, dZ, dW, db = run_pass(
        Z, W, b, y, s, g, None, lse, sp=sp._replace(aux=False), wants=(False, True, False),
        want_per=False,
    )  # fmt: skip
    ref = numpy_head(Z, W, b, y, s, g, sp)
    assert_close(dW, ref["dW"], rtol=RTOL)
    assert per.size == 0 and pred.size == 0 and dZ.size == 0 and db.size == 0
    np.testing.assert_array_equal(lse2, lse)


def test_counted_out_of_range_label_is_nan_in_its_row_only():
    """A label outside ``[0, K)`` with weight ≠ 0: its ``ℓ_i`` is NaN (jit cannot raise), the
    other rows' losses stay finite; a weight-0 row with such a label gives 0."""
    Z, W, b, y, s = problem(4, 9, 3, 5, out_of_range=1)
    y = y.at[5].set(5)
    per, *_ = run_pass(Z, W, b, y, s, None, None, sp=spec(5))
    per = np.asarray(per)
    assert np.isnan(per[5]) and per[0] == 0.0
    assert np.all(np.isfinite(np.delete(per, 5)))
