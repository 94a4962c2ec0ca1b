"""sj.linear_distillation: values and hand-written gradients against jax.grad of the unfused
definitions (Liger-Kernel's), every divergence/beta/temperature/hard weight/reduction/layout/mask,
dtypes, Liger's fused-linear-JSD test cases, jit/vmap, masks, teacher gradients, errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _vocab_refs import distillation_ref
from helpers import assert_close, host_normal, host_rng
from hypothesis import given, settings
from hypothesis import strategies as st

import softmax_jax as sj

# (divergence, beta): beta matters for "jsd" only; 0 and 1 are Liger's KL / reverse-KL ends.
DIVERGENCES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.1), ("jsd", 0.5),
               ("jsd", 0.9), ("jsd", 1.0)]  # fmt: skip


def _problem(key, lead, d, dt, k, dtype=jnp.float64, ignored=0.2):
    rng = host_rng(key)  # NumPy: jax.random compiles a program per shape
    normal = host_normal(rng, dtype)

    Z, W, Zt, Wt = normal((*lead, d)), normal((d, k)), normal((*lead, dt)), normal((dt, k), 1.5)
    y = np.where(rng.uniform(size=lead) < ignored, -100, rng.integers(0, k, lead))
    s = rng.uniform(0.5, 2.0, lead).astype(dtype)
    return Z, W, Zt, Wt, jnp.asarray(y, jnp.int32), jnp.asarray(s)


def _reference_fn(Z, W, Zt, Wt, labels, weights, g, *, options):
    """The float64 unfused reference's value and ``(∂/∂Z, ∂/∂W)`` (of ``Σ g ⊙ value`` for
    ``"none"``) on the same inputs; ``options`` the static keywords as ``(name, value)`` pairs."""
    f64 = lambda x: x if x is None else x.astype(jnp.float64)  # noqa: E731
    Z, W, Zt, Wt, weights = map(f64, (Z, W, Zt, Wt, weights))

    def ref(Z, W):
        return distillation_ref(Z, W, Zt, Wt, labels, weights=weights, **dict(options))

    scalar = ref if g is None else (lambda Z, W: jnp.sum(ref(Z, W) * g))
    return ref(Z, W), jax.grad(scalar, (0, 1))(Z, W)


# One compiled program per option set and shape (its primitives run eagerly would compile one by
# one, anew at every new shape); the conversions to float64 are inside, on the traced inputs.
_reference = jax.jit(_reference_fn, static_argnames="options")


def _check(Z, W, Zt, Wt, dtype, rtol=None, eager_reference=False, **kw):
    """Value and ∂/∂Z, ∂/∂W (a random cotangent for ``"none"``) against the float64 unfused
    reference on the same inputs; the teacher's gradients are exactly zero.

    ``eager_reference``: the reference op by op, for the matrix, whose 47 cases share their
    shapes: its primitives compile once per process for all of them, a jitted reference once per
    case (each its own option set)."""
    if kw.get("weight_layout") == "kd":  # on the host: an eager transpose compiles per shape
        W, Wt = jnp.asarray(np.asarray(W).T), jnp.asarray(np.asarray(Wt).T)
    fused = lambda *a: sj.linear_distillation(*a, **kw)  # noqa: E731
    g = jnp.asarray(
        np.cos(np.arange(Z.size // Z.shape[-1], dtype=np.float64)).reshape(Z.shape[:-1])
    )
    none = kw.get("reduction", "mean") == "none"
    scalar = (lambda fn: lambda *a: jnp.sum(fn(*a) * g.astype(fn(*a).dtype))) if none else (
        lambda fn: fn)  # fmt: skip
    value = fused(Z, W, Zt, Wt)
    options = tuple((k, v) for k, v in kw.items() if k not in ("labels", "weights", "chunk_size"))
    reference = _reference_fn if eager_reference else _reference
    want_value, want = reference(Z, W, Zt, Wt, kw.get("labels"), kw.get("weights"),
                                 g if none else None, options=options)  # fmt: skip
    assert_close(value, want_value, dtype, rtol)
    grads = jax.grad(scalar(fused), (0, 1, 2, 3))(Z, W, Zt, Wt)
    assert grads[0].dtype == Z.dtype and grads[1].dtype == W.dtype
    assert_close(grads[0], want[0], dtype, rtol)
    assert_close(grads[1], want[1], dtype, rtol)
    assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3]))


# Every option crossed; the fast subset takes every 9th case, the slow test the rest.
MATRIX = list(
    itertools.product(DIVERGENCES, (1.0, 2.0), (0.0, 0.5), ("mean", "sum", "none"),
                      ("dk", "kd"), (False, True))
)  # fmt: skip


def _matrix_case(key, div, temperature, hard_weight, reduction, layout, masked):
    (divergence, beta) = div
    Z, W, Zt, Wt, y, s = _problem(key, (23,), 5, 7, 11)
    labels = y if (masked or hard_weight) else None
    _check(Z, W, Zt, Wt, jnp.float64, labels=labels, weights=s if masked else None,
           temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
           reduction=reduction, weight_layout=layout, chunk_size=6,
           eager_reference=True)  # fmt: skip


@pytest.mark.x64
@pytest.mark.parametrize("div, temperature, hard_weight, reduction, layout, masked", MATRIX[::18])
def test_float64_matrix(getkey, div, temperature, hard_weight, reduction, layout, masked):
    _matrix_case(getkey(), div, temperature, hard_weight, reduction, layout, masked)


@pytest.mark.slow
@pytest.mark.x64
@pytest.mark.parametrize("div, temperature, hard_weight, reduction, layout, masked",
                         [c for i, c in enumerate(MATRIX) if i % 9 and i % 12 == 1])  # fmt: skip
def test_float64_matrix_rest(getkey, div, temperature, hard_weight, reduction, layout, masked):
    _matrix_case(getkey(), div, temperature, hard_weight, reduction, layout, masked)


@pytest.mark.slow
@pytest.mark.x64
@settings(max_examples=6, derandomize=True)
@given(
    div=st.sampled_from(DIVERGENCES),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    hard_weight=st.sampled_from([0.0, 1.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    lead=st.sampled_from([(9,), (2, 5), (1,)]),
    chunk=st.sampled_from([1, 4, None, "auto"]),
)
def test_float64_generated(div, temperature, hard_weight, reduction, lead, chunk):
    """Shapes, leading dimensions and chunkings drawn with the options (derandomized)."""
    Z, W, Zt, Wt, y, s = _problem(jax.random.key(len(lead) + 7), lead, 4, 6, 9)
    _check(Z, W, Zt, Wt, jnp.float64, labels=y, weights=s, temperature=temperature,
           divergence=div[0], beta=div[1], hard_weight=hard_weight, reduction=reduction,
           chunk_size=chunk)  # fmt: skip


@pytest.mark.parametrize("divergence, beta", [("kl", 0.5), ("jsd", 0.3)])
def test_float32_against_float64(getkey, divergence, beta):
    Z, W, Zt, Wt, y, s = _problem(getkey(), (64,), 16, 24, 40, jnp.float32)
    with jax.enable_x64(True):
        _check(Z, W, Zt, Wt, jnp.float32, labels=y, weights=s, temperature=2.0,
               divergence=divergence, beta=beta, hard_weight=0.5, chunk_size=24)  # fmt: skip


# Liger-Kernel's fused-linear-JSD test (test/transformers/test_fused_linear_jsd.py): weights
# (V, H/2) and (V, H) drawn with torch.rand (the "kd" layout), inputs torch.rand, (T, β) in
# {(1, 0.5), (2, 0.1), (1, 0) FKL, (1, 1) RKL}, ignore_index 2 or 42 on random tokens, the mean
# over the kept tokens; Liger's float32 tolerances atol 1e-5 / rtol 5e-4. Their shape
# (B, T, H, V) = (4, 423, 167, 1423), one of their two.
LIGER = [(1.0, 0.5, 2), (2.0, 0.1, 42), (1.0, 0.0, 2), (1.0, 1.0, 2)]


@jax.jit
def _liger_inputs(key, ignore_index):
    """Liger's inputs, drawn in one compiled program (``ignore_index`` traced: one for all)."""
    ks = jax.random.split(key, 6)
    bt, h, v = 4 * 423, 167, 1423
    W = jax.random.uniform(ks[0], (v, h // 2))
    Wt = jax.random.uniform(ks[1], (v, h))
    Z = jax.random.uniform(ks[2], (bt, h // 2))
    Zt = jax.random.uniform(ks[3], (bt, h))
    y = jax.random.randint(ks[4], (bt,), 0, v)
    y = jnp.where(jax.random.uniform(ks[5], (bt,)) < 0.25, ignore_index, y)
    return W, Wt, Z, Zt, y


@pytest.mark.parametrize("temperature, beta, ignore_index", LIGER)
def test_liger_fused_linear_jsd_cases(getkey, temperature, beta, ignore_index):
    W, Wt, Z, Zt, y = _liger_inputs(getkey(), ignore_index)
    kw = dict(labels=y, temperature=temperature, divergence="jsd", beta=beta,
              ignore_index=ignore_index, weight_layout="kd")  # fmt: skip
    value, (dZ, dW) = jax.value_and_grad(
        lambda Z, W: sj.linear_distillation(Z, W, Zt, Wt, **kw), (0, 1)
    )(Z, W)
    with jax.enable_x64(True):
        options = tuple((k, v) for k, v in kw.items() if k != "labels")
        rv, (rZ, rW) = _reference(Z, W, Zt, Wt, y, None, None, options=options)
        for x, r in ((value, rv), (dZ, rZ), (dW, rW)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(r), rtol=5e-4, atol=1e-5)
            # Logits ~20 here (sums of 83 products of U(0, 1)): log q is formed as
            # (a − max) − log Σ, never a − lse (rounding lse at 20 fails this by 2x).
            assert_close(x, r, jnp.float32)


def test_bfloat16_large_batch(getkey):
    """bfloat16 inputs at N = 8192 against float64 on the same rounded inputs (2e-2)."""
    Z, W, Zt, Wt, y, s = _problem(getkey(), (8192,), 32, 48, 64, jnp.bfloat16)
    with jax.enable_x64(True):
        _check(Z, W, Zt, Wt, jnp.bfloat16, labels=y, temperature=2.0, divergence="jsd",
               beta=0.5, hard_weight=0.5)  # fmt: skip


@pytest.mark.x64
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_is_zero(getkey, reduction):
    """An all-ignored (or all weight-0) batch: loss 0, gradients exactly 0, no NaN."""
    Z, W, Zt, Wt, y, s = _problem(getkey(), (12,), 5, 7, 11)
    ignored, zero = jnp.asarray(np.full_like(y, -100)), jnp.asarray(np.zeros_like(s))  # host
    for kw in ({"labels": ignored}, {"weights": zero}):
        f = lambda Z, W, Zt, Wt: sj.linear_distillation(  # noqa: E731
            Z, W, Zt, Wt, divergence="jsd", hard_weight=0.0, reduction=reduction, **kw
        )
        value, grads = jax.value_and_grad(f, (0, 1, 2, 3))(Z, W, Zt, Wt)
        assert float(value) == 0.0
        assert all(not np.any(np.asarray(g)) for g in grads)


@pytest.mark.x64
def test_identical_teacher_gives_zero(getkey):
    """The student equal to the teacher: every divergence is 0 and so is its gradient."""
    Z, W, *_ = _problem(getkey(), (10,), 5, 7, 11)
    for div, beta in DIVERGENCES:
        f = lambda Z, W: sj.linear_distillation(Z, W, Z, W, divergence=div, beta=beta)  # noqa: E731
        value, (dZ, dW) = jax.value_and_grad(f, (0, 1))(Z, W)
        assert abs(float(value)) < 1e-14 and np.abs(np.asarray(dW)).max() < 1e-13


@pytest.mark.x64
def test_jit_and_vmap(getkey):
    Z, W, Zt, Wt, y, s = _problem(getkey(), (3, 8), 5, 7, 11)
    kw = dict(divergence="jsd", beta=0.25, temperature=2.0, hard_weight=0.5)
    f = lambda Z, y: sj.linear_distillation(Z, W, Zt[0], Wt, labels=y, chunk_size=3, **kw)  # noqa: E731
    r = lambda Z, y: distillation_ref(Z, W, Zt[0], Wt, labels=y, **kw)  # noqa: E731
    Z0, y0 = (jnp.asarray(np.asarray(x)[0]) for x in (Z, y))  # on the host: no slice compiled
    # The references (one row, vmapped, the gradient of the vmapped sum) in one compiled program.
    refs = jax.jit(lambda Z, y: (r(Z[0], y[0]), jax.vmap(r)(Z, y),
                                 jax.grad(lambda Z: jnp.sum(jax.vmap(r)(Z, y)))(Z)))  # fmt: skip
    r_row, r_vmap, r_grad = refs(Z, y)
    assert_close(jax.jit(f)(Z0, y0), r_row)
    assert_close(jax.vmap(f)(Z, y), r_vmap)
    assert_close(jax.grad(lambda Z: jnp.sum(jax.vmap(f)(Z, y)))(Z), r_grad)


@pytest.mark.x64
def test_weights_gradient(getkey):
    """Floating weights get their exact gradient, as in the head."""
    Z, W, Zt, Wt, y, s = _problem(getkey(), (10,), 5, 7, 11)
    for reduction in ("mean", "sum"):
        kw = dict(labels=y, divergence="reverse_kl", reduction=reduction)
        got = jax.grad(lambda s: sj.linear_distillation(Z, W, Zt, Wt, weights=s, **kw))(s)
        want = jax.jit(jax.grad(lambda s: distillation_ref(Z, W, Zt, Wt, weights=s, **kw)))(s)
        assert_close(got, want)


def test_errors_name_the_argument():
    Z, W = jnp.ones((4, 3)), jnp.ones((3, 5))
    Zt, Wt = jnp.ones((4, 6)), jnp.ones((6, 5))
    y = jnp.array([0, 1, -100, 3])
    d = sj.linear_distillation
    with pytest.raises(ValueError, match="`divergence` must be one of 'kl', 'reverse_kl', 'jsd'"):
        d(Z, W, Zt, Wt, divergence="js")
    with pytest.raises(ValueError, match=r"`beta` must lie in \[0, 1\], got 1.5"):
        d(Z, W, Zt, Wt, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="`temperature` must be a positive finite float"):
        d(Z, W, Zt, Wt, temperature=-1.0)
    with pytest.raises(ValueError, match="`hard_weight` must be a finite float >= 0"):
        d(Z, W, Zt, Wt, labels=y, hard_weight=-0.1)
    with pytest.raises(ValueError, match="`hard_weight` = 0.5 needs `labels`"):
        d(Z, W, Zt, Wt, hard_weight=0.5)
    with pytest.raises(ValueError, match=r"`teacher_W` must have shape \(D_t, K\) = \(6, 5\)"):
        d(Z, W, Zt, Wt[:, :4])
    with pytest.raises(ValueError, match=r"`teacher_Z` must have shape \(\.\.\., D_t\)"):
        d(Z, W, Zt[:3], Wt)
    with pytest.raises(TypeError, match="`teacher_Z` must have a floating dtype"):
        d(Z, W, Zt.astype(jnp.int32), Wt)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, K\) = \[0, 5\)"):
        d(Z, W, Zt, Wt, labels=y.at[0].set(9))
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        d(Z, W, Zt, Wt, reduction="avg")
    with pytest.raises(ValueError, match="`weights` must be >= 0"):
        d(Z, W, Zt, Wt, weights=jnp.array([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="`beta` must be a Python float"):
        jax.jit(lambda b: d(Z, W, Zt, Wt, divergence="jsd", beta=b))(0.5)
