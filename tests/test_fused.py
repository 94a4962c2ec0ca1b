"""The head's derivative rules (softmax_jax/_fused.py): forward mode (jvp, linearize, jacfwd),
reverse mode, jvp-of-grad Hessian-vector products and grad-of-grad, in float64 against central
finite differences of the head itself; forward-mode temporaries like reverse mode's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softmax_jax as sj

pytestmark = pytest.mark.x64

OPTS = {
    "plain": {},
    "all": {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0},
}


def _problem(key, n=7, d=3, k=5):
    ks = jax.random.split(key, 8)
    Z = jax.random.normal(ks[0], (n, d), jnp.float64)
    W = jax.random.normal(ks[1], (d, k), jnp.float64)
    b = jax.random.normal(ks[2], (k,), jnp.float64)
    s = jax.random.uniform(ks[3], (n,), jnp.float64, 0.5, 2.0)
    y = jax.random.randint(ks[4], (n,), 0, k).at[2].set(-100)
    tangents = tuple(
        jax.random.normal(kk, x.shape, jnp.float64) for kk, x in zip(ks[5:], (Z, W, b))
    )
    return (Z, W, b, s), y, tangents + (jax.random.normal(ks[7], (n,), jnp.float64),)


def _loss(y, reduction, opts):
    def f(Z, W, b, s):
        return sj.linear_cross_entropy(Z, W, y, bias=b, weights=s, reduction=reduction,
                                       chunk_size=3, **opts)  # fmt: skip

    return f


def _fd(f, args, tangents, eps=1e-6):
    plus = [a + eps * t for a, t in zip(args, tangents)]
    minus = [a - eps * t for a, t in zip(args, tangents)]
    return (f(*plus) - f(*minus)) / (2 * eps)


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("opts", OPTS.values(), ids=OPTS.keys())
def test_forward_mode_equals_finite_differences(getkey, reduction, opts):
    args, y, tangents = _problem(getkey())
    f = _loss(y, reduction, opts)
    fd = _fd(f, args, tangents)
    value, tangent = jax.jvp(f, args, tangents)
    np.testing.assert_allclose(tangent, fd, rtol=1e-6, atol=1e-8)
    value2, lin = jax.linearize(f, *args)
    np.testing.assert_allclose(lin(*tangents), fd, rtol=1e-6, atol=1e-8)
    assert float(value) == float(value2) == float(f(*args))
    jac = jax.jit(jax.jacfwd(f, 1))(*args)  # the whole (D, K) gradient by forward mode
    np.testing.assert_allclose(jac, jax.grad(f, 1)(*args), rtol=1e-10, atol=1e-12)
    # Only some inputs moving: the others' tangents are symbolic zeros.
    _, only_w = jax.jvp(lambda W: f(args[0], W, args[2], args[3]), (args[1],), (tangents[1],))
    np.testing.assert_allclose(only_w, jnp.vdot(jax.grad(f, 1)(*args), tangents[1]), rtol=1e-10)


@pytest.mark.parametrize("opts", OPTS.values(), ids=OPTS.keys())
def test_second_order_equals_finite_differences(getkey, opts):
    """jvp-of-grad (HVP) and grad-of-grad against finite differences of the gradient."""
    args, y, tangents = _problem(getkey())
    f = _loss(y, "mean", opts)
    grad_w = lambda W: jax.grad(f, 1)(args[0], W, args[2], args[3])  # noqa: E731
    _, hvp = jax.jvp(grad_w, (args[1],), (tangents[1],))
    fd = _fd(grad_w, (args[1],), (tangents[1],), eps=1e-5)
    np.testing.assert_allclose(hvp, fd, rtol=1e-6, atol=1e-8)
    gg = jax.grad(lambda W: jnp.vdot(grad_w(W), tangents[1]))(args[1])  # = H t (H symmetric)
    np.testing.assert_allclose(gg, fd, rtol=1e-6, atol=1e-8)


def test_reduction_none_reverse_mode_still_works(getkey):
    args, y, tangents = _problem(getkey())
    f = _loss(y, "none", {})
    ct = tangents[3]
    g = jax.grad(lambda *a: jnp.vdot(ct, f(*a)), (0, 1, 2, 3))(*args)
    loss = lambda *a: jnp.vdot(ct, f(*a))  # noqa: E731
    for i, (x, t) in enumerate(zip(g, tangents)):
        only = tuple(t if j == i else jnp.zeros_like(a) for j, a in enumerate(args))
        np.testing.assert_allclose(jnp.vdot(x, t), _fd(loss, args, only), rtol=1e-6, atol=1e-8)


def test_forward_mode_memory_like_reverse_mode():
    """Compile only, float32, N=16384, D=1024, K=32768: jax.jvp's temporaries within 1.2x of
    value_and_grad's temporaries and outputs (the tangent contracts the gradients that reverse
    mode returns: forward mode holds them as temporaries), and ≥ 10x below the unfused loss's
    jvp."""
    n, d, k = 16384, 1024, 32768
    sds = jax.ShapeDtypeStruct
    Z, W = sds((n, d), jnp.float32), sds((d, k), jnp.float32)
    y = jnp.zeros(n, jnp.int32)

    def temps(g, outputs=False):
        m = jax.jit(g).lower(Z, W).compile().memory_analysis()
        return m.temp_size_in_bytes + (m.output_size_in_bytes if outputs else 0)

    def head(Z, W):
        return sj.linear_cross_entropy(Z, W, y)

    def unfused(Z, W):
        return optax.softmax_cross_entropy_with_integer_labels(Z @ W, y).mean()

    jvp = temps(lambda Z, W: jax.jvp(head, (Z, W), (Z, W)))
    assert jvp <= 1.2 * temps(jax.value_and_grad(head, (0, 1)), outputs=True)
    assert 10 * jvp <= temps(lambda Z, W: jax.jvp(unfused, (Z, W), (Z, W)))
