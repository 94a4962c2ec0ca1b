"""The precision policy (``softmax_jax._precision``): operand dtype, accumulation dtype, the GEMM
and the mean's normaliser, each against what the public functions promise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_jax as sj
from softmax_jax._precision import acc_dtype, gemm, mean_normaliser, operand


@pytest.mark.parametrize(
    "dtypes, expected",
    [
        ((jnp.bfloat16,), jnp.float32),
        ((jnp.float16, jnp.bfloat16), jnp.float32),
        ((jnp.float32, jnp.bfloat16), jnp.float32),
        ((jnp.float32,), jnp.float32),
    ],
)
def test_accumulation_is_float32_at_least(dtypes, expected):
    assert acc_dtype(*dtypes) == expected


def test_operand_is_cast_to_w_dtype_and_never_copied_when_it_has_it():
    x = jnp.ones((3, 2), jnp.float32)
    assert operand(x, jnp.float32) is x
    assert operand(x, jnp.bfloat16).dtype == jnp.bfloat16


def test_gemm_accumulates_in_the_wide_dtype():
    # 4096 products of 1 + 2^-7 (exact in bfloat16): a bfloat16 accumulator would stall at 256.
    z = jnp.full((1, 4096), 1 + 2**-7, jnp.bfloat16)
    w = jnp.ones((4096, 1), jnp.bfloat16)
    out = gemm(z, w, (1, 0), jnp.float32)
    assert out.dtype == jnp.float32
    assert float(out[0, 0]) == pytest.approx(4096 * (1 + 2**-7), rel=1e-6)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_mean_normaliser_without_weights_is_one_over_n(n):
    assert mean_normaliser(None, n, "sum", jnp.float32) is None
    inv = mean_normaliser(None, n, "mean", jnp.float32)
    assert float(inv) == pytest.approx(1.0 / max(n, 1))


@pytest.mark.parametrize(
    "weights, expected", [([0.5, 1.5, 2.0], 0.25), ([0.0, 0.0], 1.0), ([], 1.0)]
)
def test_mean_normaliser_is_one_over_the_weight_sum_with_a_zero_guard(weights, expected):
    s = jnp.asarray(weights, jnp.float32)
    assert mean_normaliser(s, s.shape[0], "sum", jnp.float32) is None
    assert float(mean_normaliser(s, s.shape[0], "mean", jnp.float32)) == expected


def test_mean_of_all_zero_weights_is_zero_not_nan_everywhere():
    """The one normaliser serves loss, grad and the head alike: all-zero weights give 0."""
    key = jax.random.key(0)
    Z = jax.random.normal(key, (4, 3))
    W = jnp.ones((3, 5)) / 3
    y = jnp.array([0, 1, 2, 4])
    s = jnp.zeros(4)
    value, g = sj.value_and_grad(W, Z, y, weights=s, reduction="mean")
    head = sj.linear_cross_entropy(Z, W, y, weights=s, reduction="mean")
    for x in (sj.loss(W, Z, y, weights=s, reduction="mean"), value, g, head):
        np.testing.assert_array_equal(np.asarray(x), 0.0)


def test_mean_normaliser_of_weights_summing_below_one():
    # 1 / Σ s whatever Σ s > 0 is: the zero guard must not clip small totals
    s = jnp.asarray([0.125, 0.375], jnp.float32)
    assert float(mean_normaliser(s, 2, "mean", jnp.float32)) == 2.0


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16])
def test_operand_narrower_than_w_is_cast_up(x_dtype):
    # W's dtype whichever is wider: a narrower Z (bf16/f16 features, float32 W) is cast up too
    assert operand(jnp.ones((3, 2), x_dtype), jnp.float32).dtype == jnp.float32
