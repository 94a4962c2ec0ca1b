"""The one row-chunk loop of the package: "whole chunks, then the remainder".

Every chunked computation (the head's row and class blocks, the full-batch objective and its
Hessian products, prediction, the host-side streaming passes) walks ``range(n)`` in blocks of a
static size with these helpers, so the remainder is handled — and tested — once.

- :func:`fold_chunks` (traced): ``carry = body(start, size, carry)`` over the blocks, a
  ``lax.fori_loop`` over the whole ones and one static remainder block; nothing is padded.
- :func:`map_chunks` (traced): ``f`` applied to row blocks of arrays, outputs concatenated.
- :func:`host_chunks` (host): the blocks as Python ``slice`` objects.
- :func:`slice_block` / :func:`put_block` (traced): read / write one block along an axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

Carry = TypeVar("Carry")


def _check_block(n: int, block: int) -> None:
    if n < 0 or block < 1:  # internal invariant: callers pass checked static sizes
        raise AssertionError(f"chunk loop over n={n} rows in blocks of {block}")


def fold_chunks(
    n: int, block: int, body: Callable[[Any, int, Carry], Carry], carry: Carry
) -> Carry:
    """``carry = body(start, size, carry)`` over the blocks ``[start, start + size)`` of
    ``range(n)``: ``size == block`` for the ``n // block`` whole blocks (a ``lax.fori_loop``;
    ``start`` traced; inlined when there is one) and ``size == n % block`` for the last one
    (``start`` a Python int). ``body`` reads its block with :func:`slice_block`."""
    _check_block(n, block)
    nfull, rem = divmod(n, block)
    if nfull == 1:
        carry = body(0, block, carry)
    elif nfull > 1:
        carry = lax.fori_loop(0, nfull, lambda i, c: body(i * block, block, c), carry)
    if rem:
        carry = body(nfull * block, rem, carry)
    return carry


def map_chunks(f: Callable[..., Any], block: int, *xs: jax.Array) -> Any:
    """``f(*[x[rows] for x in xs])`` over row blocks of ``block`` rows, the outputs (a pytree of
    arrays with a leading row axis) concatenated: ``lax.map`` over the whole blocks, one call on
    the remainder. Equal to ``f(*xs)`` when ``f`` acts row by row; only one block's
    temporaries are live at a time."""
    n = xs[0].shape[0]
    _check_block(n, block)
    nfull, rem = divmod(n, block)
    parts = []
    if nfull:
        heads = [x[: nfull * block].reshape(nfull, block, *x.shape[1:]) for x in xs]
        out = lax.map(lambda args: f(*args), tuple(heads))
        parts.append(jax.tree.map(lambda o: o.reshape(nfull * block, *o.shape[2:]), out))
    if rem or not nfull:
        parts.append(f(*[x[nfull * block :] for x in xs]))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *parts)


def host_chunks(n: int, block: int) -> Iterator[slice]:
    """The row blocks of ``range(n)`` as slices (host loops: streaming, checkpoints)."""
    _check_block(n, block)
    for start in range(0, n, block):
        yield slice(start, min(n, start + block))


def slice_block(x: jax.Array, start: int | jax.Array, size: int, axis: int) -> jax.Array:
    """``x[..., start : start + size, ...]`` along ``axis`` (``start`` may be traced)."""
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def put_block(x: jax.Array, start: int | jax.Array, block: jax.Array, axis: int) -> jax.Array:
    """``x`` with ``block`` (cast to ``x``'s dtype) written at ``start`` along ``axis``."""
    return lax.dynamic_update_slice_in_dim(x, block.astype(x.dtype), start, axis=axis)
