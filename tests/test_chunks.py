"""The one row-chunk loop: every block visited once, in order, the remainder included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from softmax_jax._chunks import fold_chunks, host_chunks, map_chunks, put_block, slice_block

sizes = st.tuples(st.integers(0, 40), st.integers(1, 50))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(sizes)
@example((0, 1))
@example((5, 5))
@example((12, 5))
@example((3, 7))
@example((15, 5))
@example((40, 1))
def test_fold_chunks_visits_every_row_once(nb):
    n, block = nb
    x = jnp.arange(n, dtype=jnp.float32) + 1.0

    def body(start, size, carry):
        total, count, visits = carry
        part = jax.lax.dynamic_slice_in_dim(x, start, size)
        assert part.shape == (size,)
        seen = jax.lax.dynamic_slice_in_dim(visits, start, size) + 1
        visits = jax.lax.dynamic_update_slice_in_dim(visits, seen, start, 0)
        return total + jnp.sum(part), count + size, visits

    init = (jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros((n,), jnp.int32))
    total, count, visits = jax.jit(lambda: fold_chunks(n, block, body, init))()
    assert int(count) == n
    np.testing.assert_array_equal(np.asarray(visits), np.ones(n, np.int32))
    assert float(total) == pytest.approx(n * (n + 1) / 2)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(sizes)
@example((0, 1))
@example((5, 5))
@example((12, 5))
@example((3, 7))
@example((15, 5))
@example((40, 1))
def test_map_chunks_equals_whole_call(nb):
    n, block = nb
    Z = jnp.arange(n * 3, dtype=jnp.float32).reshape(n, 3)
    y = jnp.arange(n)

    def f(Zc, yc):
        return {"s": jnp.sum(Zc, axis=1) + yc, "z": 2 * Zc}

    got = jax.jit(lambda Z, y: map_chunks(f, block, Z, y))(Z, y)
    want = f(Z, y)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(sizes)
@example((0, 1))
@example((5, 5))
@example((12, 5))
@example((3, 7))
@example((15, 5))
@example((40, 1))
def test_host_chunks_partition_the_rows(nb):
    n, block = nb
    parts = list(host_chunks(n, block))
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    assert all(p.stop - p.start == block for p in parts[:-1])
    assert len(parts) == -(-n // block)


@pytest.mark.parametrize("n, block", [(3, 0), (3, -1), (-1, 2), (-2, 2)])
def test_bad_sizes_are_an_internal_error(n, block):
    # blocks of fewer than one row, or fewer than zero rows, from each helper
    with pytest.raises(AssertionError, match=rf"over n={n} rows in blocks of {block}"):
        list(host_chunks(n, block))
    with pytest.raises(AssertionError):
        fold_chunks(n, block, lambda start, size, c: c, 0)
    if n >= 0:  # map_chunks reads n from its array
        with pytest.raises(AssertionError):
            map_chunks(lambda x: x, block, jnp.zeros(n))


def test_map_chunks_of_one_array():
    # prediction maps over Z alone: n comes from the only array
    Z = jnp.arange(14.0).reshape(7, 2)
    got = jax.jit(lambda Z: map_chunks(lambda z: z.sum(axis=1), 3, Z))(Z)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(Z.sum(axis=1)))


def test_blocks_read_and_written_along_an_axis():
    """``slice_block``/``put_block`` at a traced start (inside a fold), along rows or columns;
    a written block takes the target's dtype."""
    x = jnp.arange(24.0).reshape(4, 6)

    def body(start, size, acc):
        blk = slice_block(x, start, size, 1)
        return put_block(acc, start, 2 * blk, 1)

    out = jax.jit(lambda: fold_chunks(6, 4, body, jnp.zeros((4, 6), jnp.int32)))()
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, 2 * np.arange(24).reshape(4, 6))
    np.testing.assert_array_equal(slice_block(x, 1, 2, 0), x[1:3])
