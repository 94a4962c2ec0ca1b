"""The minibatch loop (``_minibatch``): the keyed shuffling permutation, optimizers by name, and
the epoch's batches (weights zero on the padding of the last one)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from softmax_jax._minibatch import epoch_order, make_optimizer, permutation, seed_key


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permutation_is_a_permutation(n):
    p = np.asarray(permutation(jax.random.key(n), n))
    np.testing.assert_array_equal(np.sort(p), np.arange(n))
    q = np.asarray(permutation(jax.random.key(n + 1), n))
    assert n < 3 or not np.array_equal(p, q)


def test_permutation_positions_are_uniform():
    # where each element lands, over 20000 keys: uniform up to multinomial noise
    n, draws = 12, 20000
    keys = jax.random.split(jax.random.key(0), draws)
    P = np.asarray(jax.jit(jax.vmap(lambda k: permutation(k, n)))(keys))
    counts = np.stack([np.bincount(P[:, i], minlength=n) for i in range(n)]) / (draws / n)
    noise = np.sqrt(n / draws)  # relative sd of one count
    assert counts.std() < 1.5 * noise and np.abs(counts - 1).max() < 6 * noise


# --- derivatives used by the solvers, against autodiff (float64) --------------------------------


@pytest.mark.parametrize("n, batch_size", [(10, 4), (8, 8), (5, 16)])
def test_epoch_order_pads_the_last_batch_with_weight_zero(n, batch_size):
    idx, w = epoch_order(jax.random.key(0), None, n, batch_size)
    nb = -(-n // batch_size)
    assert idx.shape == w.shape == (nb * batch_size,)
    np.testing.assert_array_equal(np.sort(np.asarray(idx)[:n]), np.arange(n))
    np.testing.assert_array_equal(np.asarray(w), [1.0] * n + [0.0] * (nb * batch_size - n))


def test_optimizer_names_and_errors():
    assert make_optimizer("adam") is make_optimizer("adam", 1e-2)  # cached by name and rate
    with pytest.raises(ValueError, match="`optimizer` must be"):
        make_optimizer("adamm")
    with pytest.raises(ValueError, match="`learning_rate` must be a positive"):
        make_optimizer("sgd", -1.0)


def test_the_seed_key_is_jax_random_key():
    """``fit``'s key made on the host (:func:`seed_key`) is ``jax.random.key(seed)``, bit for bit
    (the shuffles and the checkpoints' keys depend on it), over the seeds it covers and past."""
    for seed in [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1]:
        want = jax.random.key_data(jax.random.key(seed))
        np.testing.assert_array_equal(jax.random.key_data(seed_key(seed)), want)
    for seed in [2**32, 2**40, -1]:  # JAX's own key (x64 for the 64-bit seeds)
        with jax.enable_x64(True):
            want = jax.random.key_data(jax.random.key(seed))
            np.testing.assert_array_equal(jax.random.key_data(seed_key(seed)), want)
