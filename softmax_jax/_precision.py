"""The precision policy of every GEMM in the package (core ``grad``, the head, the sharded head).

- GEMM operands in ``W``'s dtype: features ``Z`` and residual blocks ``G = diag(c)(Ŷ − T)`` are
  cast to it (``W`` itself is never cast or copied);
- accumulation in float32 at least (``preferred_element_type``);
- scalar normalisations (the mean's ``1 / Σ s``) are applied to the float32 GEMM result, never
  folded into a narrow operand: ``G`` is formed with the raw weights ``s_i`` (entries ``O(1)``),
  and ``1 / Σ s`` (``1 / 65536`` at N = 65536, below float16's smallest normal) multiplies the
  accumulated ``Zᵀ G`` and ``G Wᵀ``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._validate import compute_dtype


def operand(x: jax.Array, w_dtype) -> jax.Array:
    """``x`` as a GEMM operand: in ``W``'s dtype."""
    return x if x.dtype == w_dtype else x.astype(w_dtype)


def acc_dtype(*dtypes):
    """The accumulation dtype: the promoted dtype, at least float32."""
    return compute_dtype(*dtypes)


def gemm(x: jax.Array, y: jax.Array, contract: tuple[int, int], acc) -> jax.Array:
    """``lax.dot_general`` contracting axis ``contract[0]`` of ``x`` with ``contract[1]`` of
    ``y`` (operands already in ``W``'s dtype), accumulated in ``acc``."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(x, y, dims, preferred_element_type=acc)


def mean_normaliser(s: jax.Array | None, n: int, reduction: str, dtype) -> jax.Array | None:
    """``1 / Σ s`` (``1 / N`` without weights) for ``"mean"``, applied after the GEMMs; ``None``
    for ``"sum"``. An all-zero ``s`` (or N = 0) gives 1: every term is then zero anyway."""
    if reduction != "mean":
        return None
    if s is None:
        return jnp.asarray(1.0 / max(n, 1), dtype)
    total = jnp.sum(s.astype(dtype))
    return 1.0 / jnp.where(total > 0, total, 1)
