r"""``scipy.sparse`` features: eq. (2), eq. (6) and the Hessian products on CSR data, never densified.

The objective needs two products with a sparse ``X`` (N, D): the logits ``A = X W`` and the
gradient ``Xᵀ M`` (with ``M = diag(s)(Ŷ − Y)``); Newton-CG also ``X V``, ``Xᵀ R`` and, for its
preconditioner, ``(X ⊙ X)ᵀ R`` (the squares keep the sparsity). Each is a sparse matrix ``S``
(the rows of ``X`` for ``X W``; the rows of ``Xᵀ``, i.e. the columns of ``X``, for ``Xᵀ M``)
times a dense ``(n_in, K)`` block, and all run as one kernel, :func:`ell_apply`, on an
:class:`Ell`: the rows of ``S`` (cut into pieces of at most :data:`PIECE` entries) sorted by
length and laid out :data:`BLOCK` at a time as padded ELL, each block a loop over its slots that
gathers one dense row per stored entry and accumulates ``value · row`` into a ``(BLOCK, K)``
block that stays in cache. Gathers only: XLA's scatter-add on a CPU (and so ``segment_sum`` and
BCOO's transposed product) runs one update at a time. Sorting absorbs the columns' lengths, as
uneven as term frequencies (Zipf: a few columns in most rows, most columns in a few), with little
padding; the arrays' sizes are rounded up (:func:`_bucket`) so that data of similar size share
compiled programs.

:class:`SparseRows` is the ``Z`` of a :class:`softmax_jax._objective.TrainData` on such data (it
holds its labels and weights too): the objective's passes (``data_vg``, ``predict_stats``,
``vg_sum``, the Hessian products) call its methods, and minibatches gather their rows
(:meth:`SparseRows.take_rows`) from a padded ELL of all rows.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._grad import hvp_residual, residual, softmax_variance
from ._loss import logsumexp_rows, mean_scale, nll_rows, reduce_losses
from ._precision import mean_normaliser

#: Longest piece: longer rows of ``S`` are cut into pieces of this length, whose partial products
#: are then added (a scatter-add over the further pieces only).
PIECE = 128
#: Pieces per block: the pieces, sorted by length, are processed ``BLOCK`` at a time, each block
#: padded to its longest piece (at most ``BLOCK`` rows of ``(·, K)`` accumulate, in cache).
BLOCK = 1024
#: Minibatches gather rows of a padded ELL of all rows, built when it holds at most this many
#: times the stored entries (rows of similar lengths, as in TF-IDF); otherwise refused.
ROWS_PADDING_MAX = 4


class Ell(NamedTuple):
    """A sparse ``(n_out, n_in)`` matrix ``S`` in blocks of padded pieces (a pytree of arrays).

    The rows of ``S`` (cut into pieces of at most :data:`PIECE` entries) are sorted by length
    and laid out ``C`` (= ``idx.shape[1]``) at a time: block ``b`` holds ``length[b]`` slots,
    the rows ``start[b] ... start[b] + length[b] - 1`` of ``idx``/``val``, slot ``l`` of the
    block's ``C`` pieces in row ``start[b] + l`` (entries past a piece's end: column 0, value 0).

    Attributes:
      idx: ``(slots, C)`` int32 column indices.
      val: ``(slots, C)`` values.
      start: ``(blocks,)`` int32 first slot row of each block.
      length: ``(blocks,)`` int32 slots of each block (its longest piece).
      pos: ``(n_out,)`` int32: the piece (``block · C + lane``) holding the first entries of
        row ``i``; an empty row points past the pieces, to a zero row.
      extra_src: ``(E,)`` int32: the further pieces of long rows ...
      extra_dst: ``(E,)`` int32: ... and the rows of ``S`` they add to.
    """

    idx: Any
    val: Any
    start: Any
    length: Any
    pos: Any
    extra_src: Any
    extra_dst: Any


def _pieces(indptr: np.ndarray):
    """Rows of the CSR ``indptr`` cut into pieces of at most :data:`PIECE` entries:
    ``(row, number within the row, first entry, length)`` per piece."""
    m = np.diff(indptr).astype(np.int64)
    npieces = -(-m // PIECE)
    prow = np.repeat(np.arange(m.size), npieces)
    pk = np.arange(prow.size) - (np.cumsum(npieces) - npieces)[prow]
    return (
        prow,
        pk,
        indptr[prow].astype(np.int64) + pk * PIECE,
        np.minimum(PIECE, m[prow] - pk * PIECE),
    )


def _bucket(n: int) -> int:
    """``n`` rounded up to 16 or to a multiple of 1/8 of its power of two (at most 12.5% more):
    the sizes of :class:`Ell`'s arrays, so that data of similar size share compiled programs."""
    if n <= 16:
        return 16
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def ell_from_csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, dtype) -> Ell:
    """The :class:`Ell` (NumPy arrays) of the CSR matrix ``(indptr, indices, data)``."""
    prow, pk, pstart, plen = _pieces(indptr)
    npc = prow.size
    C = int(min(BLOCK, max(8, 1 << max(npc - 1, 0).bit_length())))
    order = np.argsort(-plen, kind="stable")  # longest first
    nb = _bucket(-(-npc // C))  # whole blocks, then empty ones (no slots)
    sorted_len = np.zeros(nb * C, np.int64)
    sorted_len[:npc] = plen[order]
    length = sorted_len.reshape(nb, C).max(axis=1)
    start = np.cumsum(length) - length
    rank = np.empty(npc, np.int64)
    rank[order] = np.arange(npc)
    first = np.zeros(nb * C, np.int64)
    first[:npc] = pstart[order]
    idx = np.zeros((_bucket(int(length.sum())), C), np.int32)
    val = np.zeros(idx.shape, dtype)
    for b in range(-(-npc // C)):  # block by block: gathers from the CSR arrays, in cache
        slot = np.arange(length[b])[:, None]
        inside = slot < sorted_len[b * C : (b + 1) * C][None, :]
        src = np.where(inside, first[b * C : (b + 1) * C][None, :] + slot, 0)
        rows = slice(start[b], start[b] + length[b])
        idx[rows] = np.where(inside, indices[src], 0)
        val[rows] = np.where(inside, data[src], 0)
    pos = np.full(indptr.size - 1, nb * C, np.int32)
    head = pk == 0
    pos[prow[head]] = rank[head]
    n_extra = int((~head).sum())
    extra_src = np.full(_bucket(n_extra) if n_extra else 0, nb * C, np.int32)  # padding: + 0
    extra_dst = np.zeros(extra_src.size, np.int32)
    extra_src[:n_extra] = rank[~head]
    extra_dst[:n_extra] = prow[~head]
    return Ell(idx, val, start.astype(np.int32), length.astype(np.int32), pos, extra_src, extra_dst)


def _slot_sum(idx, val, X, first, length, *, square: bool = False) -> jax.Array:
    """``Σ_l val[first + l] ⊙ X[idx[first + l]]`` over ``l < length`` for ``idx``/``val``
    ``(slots, C)``: one gather of ``C`` rows of ``X`` (``(n_in, K)``) per slot; ``(C, K)``."""

    def body(slot, acc):
        i = lax.dynamic_index_in_dim(idx, first + slot, keepdims=False)
        v = lax.dynamic_index_in_dim(val, first + slot, keepdims=False).astype(X.dtype)
        v = v * v if square else v
        return acc + v[:, None] * X.at[i].get(mode="promise_in_bounds")

    return lax.fori_loop(0, length, body, jnp.zeros((idx.shape[1], X.shape[1]), X.dtype))


def ell_apply(ell: Ell, X: jax.Array, *, square: bool = False) -> jax.Array:
    """``S X`` (``(S ⊙ S) X`` with ``square``) for ``S`` an :class:`Ell` ``(n_out, n_in)`` and a
    dense ``X`` ``(n_in, K)``: ``(n_out, K)`` in ``X``'s dtype. One loop over the blocks, and in
    each a loop over its slots that gathers ``C`` rows of ``X`` and accumulates
    ``value · row``."""
    K = X.shape[1]
    if X.shape[0] == 0:  # S has no columns
        return jnp.zeros((ell.pos.shape[0], K), X.dtype)

    def block(args):
        return _slot_sum(ell.idx, ell.val, X, *args, square=square)

    out = lax.map(block, (ell.start, ell.length)).reshape(-1, K)
    stacked = jnp.concatenate([out, jnp.zeros((1, K), X.dtype)])
    res = stacked.at[ell.pos].get(mode="promise_in_bounds")
    if ell.extra_src.shape[0]:
        more = stacked.at[ell.extra_src].get(mode="promise_in_bounds")
        res = res.at[ell.extra_dst].add(more, mode="promise_in_bounds")
    return res


def _cast_values(ell: Ell, dtype) -> Ell:
    return ell._replace(val=ell.val.astype(dtype))


def _with_bias(A: jax.Array, params) -> jax.Array:
    return A + params["b"].astype(A.dtype) if "b" in params else A


def _sums_to_params(R: jax.Array, gW: jax.Array, params) -> dict:
    """``{"W": gW, "b": Σ_i R_i}`` in the parameters' dtypes (no ``b`` without a bias)."""
    g = {"W": gW.astype(params["W"].dtype)}
    if "b" in params:
        g["b"] = jnp.sum(R, axis=0).astype(params["b"].dtype)
    return g


class SparseRows(NamedTuple):
    """Sparse training rows on the device: ``X`` as :class:`Ell` twice (``fwd``: its rows, for
    ``X W``; ``bwd``: its columns, for ``Xᵀ M``), optionally all rows as one padded ELL
    (``rows_idx``/``rows_val`` ``(N, L)``, for minibatches), and the labels ``y`` and weights
    ``s`` of the :class:`TrainData` it is the ``Z`` of."""

    fwd: Ell
    bwd: Ell
    rows_idx: Any
    rows_val: Any
    y: jax.Array
    s: jax.Array | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.fwd.pos.shape[0], self.bwd.pos.shape[0]

    @property
    def dtype(self):
        return self.fwd.val.dtype

    def astype(self, dtype) -> SparseRows:
        """The same rows with values (and weights) in ``dtype``; the indices are shared."""
        s = None if self.s is None else self.s.astype(dtype)
        rv = None if self.rows_val is None else self.rows_val.astype(dtype)
        fwd, bwd = _cast_values(self.fwd, dtype), _cast_values(self.bwd, dtype)
        return self._replace(fwd=fwd, bwd=bwd, rows_val=rv, s=s)

    def logits(self, params) -> jax.Array:
        """``A = X W + b`` ``(N, K)`` in ``W``'s dtype."""
        return _with_bias(ell_apply(self.fwd, params["W"]), params)

    def vg_sum(self, params, y, s):
        """``softmax_jax._objective.vg_sum`` on these rows: eq. (2) summed with weights ``s``,
        its gradient (eq. (6): ``Xᵀ M`` and the column sums of ``M``) and the logits."""
        A = self.logits(params)
        _, E, S = logsumexp_rows(A)
        value = reduce_losses(nll_rows(A, S, y, True), s, "sum")
        M = residual(A, E, S, y, mean_scale(s, A.shape[0], A.dtype, "sum"), True)
        return value, _sums_to_params(M, ell_apply(self.bwd, M), params), A

    def data_vg(self, params):
        """``softmax_jax._objective.data_vg``: the weighted mean of eq. (2) and its gradient."""
        value, g, _ = self.vg_sum(params, self.y, self.s)
        scale = mean_normaliser(self.s, self.shape[0], "mean", value.dtype)
        return value * scale, jax.tree.map(lambda x: x * scale.astype(x.dtype), g)

    def predict_stats(self, params):
        """``(Σ s_i ℓ_i, Σ s_i [argmax a_i = y_i])`` (``softmax_jax._objective.predict_stats``)."""
        A = self.logits(params)
        _, _, S = logsumexp_rows(A)
        per = nll_rows(A, S, self.y, True)
        correct = (jnp.argmax(A, axis=1) == self.y).astype(A.dtype)
        s = jnp.ones_like(per) if self.s is None else self.s.astype(per.dtype)
        return jnp.sum(s * per), jnp.sum(s * correct)

    # Newton-CG: these rows in the Hessian's dtype are ``TrainData.Zh``.
    def probs(self, params) -> jax.Array:
        """``Ŷ = softmax(X W + b)`` in these rows' dtype (``softmax_jax._objective.hessian_probs``)."""
        dt = self.dtype
        _, E, S = logsumexp_rows(self.logits(jax.tree.map(lambda a: a.astype(dt), params)))
        return E / S

    def hessian_vp(self, params, V, l2, *, probs=None):
        """``∇²f · V`` (``softmax_jax._objective.hessian_vp``): ``Xᵀ R`` and ``Σ_i R_i`` for
        ``R = diag(c)[Ŷ ⊙ (X V_W + V_b) − Ŷ ⊙ rowsum(·) 1ᵀ]``, ``c_i = s_i / Σ s``, plus ``λ V_W``."""
        P = self.probs(params) if probs is None else probs
        XV = self.logits(jax.tree.map(lambda a: a.astype(P.dtype), V))
        R = hvp_residual(P, XV, mean_scale(self.s, P.shape[0], P.dtype, "mean"))
        hv = _sums_to_params(R, ell_apply(self.bwd, R), params)
        hv["W"] = hv["W"] + l2 * V["W"]
        return hv

    def hessian_diag(self, params, l2, *, probs=None):
        """The diagonal of ``∇²f`` (``softmax_jax._objective.hessian_diag``): ``(X ⊙ X)ᵀ R`` with
        ``R = diag(c)(Ŷ ⊙ (1 − Ŷ))`` (``softmax_jax._grad.softmax_variance``), its column sums
        for the bias, ``λ`` on ``W``."""
        P = self.probs(params) if probs is None else probs
        R = softmax_variance(P) * mean_scale(self.s, P.shape[0], P.dtype, "mean")[:, None]
        diag = _sums_to_params(R, ell_apply(self.bwd, R, square=True), params)
        diag["W"] = diag["W"] + l2
        return diag

    # Minibatches
    def take_rows(self, idx: jax.Array, weights: jax.Array) -> SparseBatch:
        """The rows ``idx`` ``(B,)`` with weights ``weights``, as a :class:`SparseBatch`."""
        if self.rows_idx is None:
            raise ValueError(
                "`Z`: minibatch training on a scipy.sparse Z needs rows of similar lengths "
                f"(all rows padded to the longest at most {ROWS_PADDING_MAX}× the stored "
                "entries); use optimizer='lbfgs' or 'newton-cg'"
            )
        return SparseBatch(
            jnp.take(self.rows_idx, idx, axis=0).T,
            jnp.take(self.rows_val, idx, axis=0).T,
            jnp.take(self.y, idx),
            weights,
            jnp.zeros((self.shape[1], 0), jnp.int8),
        )


class SparseBatch(NamedTuple):
    """Minibatch rows of a :class:`SparseRows`: padded ELL ``idx``/``val`` ``(L, B)``, labels and
    weights; ``d_like`` ``(D, 0)`` carries the number of features."""

    idx: jax.Array
    val: jax.Array
    y: jax.Array
    s: jax.Array
    d_like: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return self.idx.shape[1], self.d_like.shape[0]

    def vg_sum(self, params, y, s):
        """Like :meth:`SparseRows.vg_sum`; ``Xᵀ M`` is a scatter-add of the batch's entries."""
        W = params["W"]
        A = _with_bias(_slot_sum(self.idx, self.val, W, 0, self.idx.shape[0]), params)
        _, E, S = logsumexp_rows(A)
        value = reduce_losses(nll_rows(A, S, y, True), s, "sum")
        M = residual(A, E, S, y, mean_scale(s, A.shape[0], A.dtype, "sum"), True)
        upd = self.val.astype(M.dtype)[:, :, None] * M[None, :, :]
        gW = jnp.zeros(W.shape, M.dtype).at[self.idx.reshape(-1)].add(upd.reshape(-1, W.shape[1]))
        return value, _sums_to_params(M, gW, params), A

    def data_vg(self, params):
        value, g, _ = self.vg_sum(params, self.y, self.s)
        scale = mean_normaliser(self.s, self.shape[0], "mean", value.dtype)
        return value * scale, jax.tree.map(lambda x: x * scale.astype(x.dtype), g)


# Host side: building the device data -------------------------------------------------------------


def _padded_rows(X, dtype):
    """All rows of the CSR ``X`` as one padded ELL ``(N, L)``, or ``(None, None)`` when that
    would exceed :data:`ROWS_PADDING_MAX` times the stored entries."""
    m = np.diff(X.indptr)
    L = max(1, int(m.max(initial=0)))
    if m.size * L > ROWS_PADDING_MAX * max(X.nnz, 1) + 1024:
        return None, None
    slot = np.arange(L)[None, :]
    inside = slot < m[:, None]
    j = np.where(inside, X.indptr[:-1, None] + slot, 0)
    return (
        np.where(inside, X.indices[j], 0).astype(np.int32),
        np.where(inside, X.data[j], 0).astype(dtype),
    )


def _check_index_range(X, name: str) -> None:
    if max(X.shape) >= 2**31:
        raise ValueError(f"`{name}` must have fewer than 2**31 rows and columns, got {X.shape}")


def sparse_rows_host(X, dtype) -> tuple[Ell, Ell, Any, Any]:
    """``(fwd, bwd, rows_idx, rows_val)`` of :class:`SparseRows` for the CSR ``X``, in NumPy."""
    _check_index_range(X, "Z")
    Xc = X.tocsc()
    fwd = ell_from_csr(X.indptr, X.indices, X.data, dtype)
    bwd = ell_from_csr(Xc.indptr, Xc.indices, Xc.data, dtype)
    return (fwd, bwd, *_padded_rows(X, dtype))


def place_sparse(
    X, y, s, *, dtype, device, shape=None, hessian_dtype=None
) -> tuple[SparseRows, Any, Any, SparseRows | None]:
    """The device data of ``softmax_jax._placement.place`` for a canonical CSR ``X``
    (``softmax_jax._validate.check_sparse``): ``(Z, y, s, Zh)``, ``Z`` a :class:`SparseRows` in
    ``dtype``, ``Zh`` the same rows in ``hessian_dtype`` (sharing the indices) or ``None``.
    ``shape = (rows, features)`` pads with empty rows of weight 0 and empty columns."""
    import scipy.sparse as sp

    if device is not None and not isinstance(device, jax.Device):
        raise ValueError(
            "`Z` as a scipy.sparse matrix trains on one device, got a mesh: pass a dense Z "
            "to split it over `mesh`"
        )
    n = X.shape[0]
    rows, cols = X.shape if shape is None else shape
    if (rows, cols) != X.shape:
        indptr = np.concatenate([X.indptr, np.full(rows - n, X.indptr[-1], X.indptr.dtype)])
        X = sp.csr_matrix((X.data, X.indices, indptr), shape=(rows, cols))
    yb = np.zeros(rows, np.int32)
    yb[:n] = y
    sb = None
    if rows > n or s is not None:
        sb = np.zeros(rows, dtype)
        sb[:n] = 1 if s is None else s
    put = functools.partial(jax.device_put, device=device)
    fwd, bwd, ri, rv = put(sparse_rows_host(X, dtype))
    yd, sd = put(yb), None if sb is None else put(sb)
    Z = SparseRows(fwd, bwd, ri, rv, yd, sd)
    Zh = None
    if hessian_dtype is not None:
        Zh = Z._replace(rows_idx=None, rows_val=None).astype(np.dtype(hessian_dtype))
    return Z, yd, sd, Zh


# Prediction ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("what",))
def _predict_ell(fwd: Ell, W, b, *, what: str):
    A = ell_apply(fwd, W)
    if b is not None:
        A = A + b.astype(A.dtype)
    if what == "label":
        return jnp.argmax(A, axis=1).astype(jnp.int32)
    _, E, S = logsumexp_rows(A)
    return E / S


def predict_sparse(W: jax.Array, b: jax.Array | None, X, what: str) -> jax.Array:
    """``softmax(X W + b)`` (``what="proba"``, ``(N, K)``) or its argmax (``"label"``, ``(N,)``)
    for a canonical CSR ``X`` (``softmax_jax._validate.check_sparse``), in ``W``'s dtype."""
    _check_index_range(X, "Z")
    fwd = ell_from_csr(X.indptr, X.indices, X.data, W.dtype)
    return _predict_ell(jax.device_put(fwd), W, b, what=what)
