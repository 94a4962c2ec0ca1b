"""sj.grad / sj.value_and_grad / sj.hvp / sj.derivation_terms: API behaviour.

The exactness of eq. (6) itself is in test_cross_check.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, problem

import softmax_jax as sj
from softmax_jax import _grad

# Exactness checks against float64 references: x64 on for this module (scoped, see conftest).
pytestmark = pytest.mark.x64


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16))
@pytest.mark.parametrize("labels", ("integer", "one-hot"))
def test_output_dtype_and_shape(getkey, dtype, labels):
    W, Z, Y, _ = problem(getkey(), 9, 4, 6, labels, dtype=dtype)
    value, g = sj.value_and_grad(W, Z, Y)
    assert g.shape == (4, 6) and g.dtype == dtype
    assert value.shape == ()
    np.testing.assert_array_equal(sj.grad(W, Z, Y), g)


def test_mixed_precision_features_and_weights(getkey):
    W, Z, y, _ = problem(getkey(), 9, 4, 6, "integer")
    g = sj.grad(W.astype(jnp.float32), Z, y)  # f32 W, f64 Z: promoted, returned in W's dtype
    assert g.dtype == jnp.float32
    assert_close(g, sj.grad(W, Z, y), rtol=1e-6)


def test_mean_is_sum_over_weight_total(getkey):
    W, Z, y, s = problem(getkey(), 12, 4, 6, "integer", weighted=True)
    v_sum, g_sum = sj.value_and_grad(W, Z, y, weights=s)
    v_mean, g_mean = sj.value_and_grad(W, Z, y, weights=s, reduction="mean")
    np.testing.assert_allclose(v_mean, v_sum / s.sum(), rtol=1e-14)
    assert_close(g_mean, g_sum / s.sum())


def test_jit_vmap_and_grad_of_grad(getkey):
    W, Z, y, _ = problem(getkey(), 10, 4, 5, "integer")
    ref = sj.grad(W, Z, y)
    np.testing.assert_allclose(jax.jit(sj.grad)(W, Z, y), ref, rtol=1e-14)
    # vmap over a batch of problems (e.g. an ensemble of weight matrices).
    Ws = jnp.stack([W, 0.5 * W])
    batched = jax.vmap(sj.grad, in_axes=(0, None, None))(Ws, Z, y)
    assert_close(batched[1], sj.grad(0.5 * W, Z, y))
    # vmap over samples of a per-sample gradient: sums to the full gradient.
    per = jax.vmap(lambda z, t: sj.grad(W, z[None], t[None]))(Z, y)
    assert_close(per.sum(axis=0), ref)


def test_reduction_none_rejected(getkey):
    W, Z, y, _ = problem(getkey(), 4, 3, 5, "integer")
    for fn in (sj.grad, sj.value_and_grad):
        with pytest.raises(ValueError, match=r"`reduction` must be 'sum' or 'mean'.*got 'none'"):
            fn(W, Z, y, reduction="none")


def _nk_nonfloat_buffers(fn, args, n, k):
    """(N, K) arrays of a non-float type (a one-hot or mask) materialised by the compiled program.

    Instructions inside fusions compute in registers; only top-level instructions of the entry
    computation own buffers."""
    text = fn.lower(*args).compile().as_text()
    entry = text.split("\nENTRY", 1)[-1]
    pattern = rf"= (pred|s8|u8|s16|u16|s32|u32|s64|u64)\[{n},{k}\]"
    return [line.strip() for line in entry.splitlines() if re.search(pattern, line)]


def test_integer_labels_never_build_one_hot(getkey):
    """No (N, K) boolean/integer buffer exists in the compiled program for integer labels."""
    n, d, k = 37, 3, 11
    W, Z, y, _ = problem(getkey(), n, d, k, "integer", dtype=jnp.float32)
    for impl in (_grad._value_and_grad_impl, _grad._grad_impl):
        fn = jax.jit(lambda W, Z, y: impl(W, Z, y, None, reduction="sum", int_labels=True))
        assert _nk_nonfloat_buffers(fn, (W, Z, y), n, k) == []
    # ... whereas a materialised one-hot is caught by the same scan:
    onehot = jax.jit(lambda y: (jax.nn.one_hot(y, k) == 1, jnp.sum(y)))
    assert _nk_nonfloat_buffers(onehot, (y,), n, k)


def test_out_of_range_label_under_jit_poisons_gradient(getkey):
    W, Z, y, _ = problem(getkey(), 6, 3, 4, "integer")
    value, g = jax.jit(sj.value_and_grad)(W, Z, y.at[1].set(9))
    assert bool(jnp.isnan(value)) and bool(jnp.all(jnp.isnan(g)))


# --------------------------------------------------------------------------------- eq. (4) terms


@pytest.mark.parametrize("labels", ("integer", "one-hot", "soft"))
def test_derivation_terms(getkey, labels):
    W, Z, Y, s = problem(getkey(), 14, 4, 5, labels, weighted=True)
    t = sj.derivation_terms(W, Z, Y, weights=s)
    assert isinstance(t, sj.DerivationTerms)
    assert_close(t.grad, t.second - t.first)
    assert_close(t.grad, sj.grad(W, Z, Y, weights=s))


# ---------------------------------------------------------------------- Hessian-vector product


@pytest.mark.parametrize("labels", ("integer", "soft", "unnormalised"))
@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize("weighted", (False, True))
def test_hvp_matches_autodiff(getkey, labels, reduction, weighted):
    W, Z, Y, s = problem(getkey(), 15, 4, 6, labels, weighted)
    V = jax.random.normal(getkey(), W.shape, jnp.float64)
    f = lambda w: sj.loss(w, Z, Y, weights=s, reduction=reduction)  # noqa: E731
    ref = jax.jvp(jax.grad(f), (W,), (V,))[1]
    assert_close(sj.hvp(W, Z, Y, V, weights=s, reduction=reduction), ref)


def test_hvp_is_symmetric_psd(getkey):
    W, Z, y, _ = problem(getkey(), 20, 3, 4, "integer")
    U = jax.random.normal(getkey(), W.shape, jnp.float64)
    V = jax.random.normal(getkey(), W.shape, jnp.float64)
    uHv = jnp.sum(U * sj.hvp(W, Z, y, V))
    vHu = jnp.sum(V * sj.hvp(W, Z, y, U))
    np.testing.assert_allclose(uHv, vHu, rtol=1e-12)
    assert float(jnp.sum(V * sj.hvp(W, Z, y, V))) >= 0
    # The Hessian annihilates the shift direction (the same vector added to every w_k).
    shift = jnp.broadcast_to(jax.random.normal(getkey(), (3, 1), jnp.float64), W.shape)
    assert float(jnp.max(jnp.abs(sj.hvp(W, Z, y, shift)))) < 1e-12


def test_hvp_bad_direction(getkey):
    W, Z, y, _ = problem(getkey(), 5, 3, 4, "integer")
    with pytest.raises(
        ValueError, match=r"`V` must have the shape of `W` .* \(3, 4\), got \(4, 3\)"
    ):
        sj.hvp(W, Z, y, jnp.zeros((4, 3)))
