"""sj.linear_log_probs: values and hand-written gradients (any cotangents) against jax.grad of the
unfused definition, every option, dtypes, jit/vmap, verl's PPO kernel test case, errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _vocab_refs import log_probs_ref
from helpers import assert_close, host_normal, host_rng

import softmax_jax as sj


def _problem(key, lead, d, k, dtype=jnp.float64, scale=1.0, bias=False):
    rng = host_rng(key)  # NumPy: jax.random compiles a program per shape
    normal = host_normal(rng, dtype)

    Z, W = normal((*lead, d), scale), normal((d, k), scale)
    b = normal((k,)) if bias else None
    tok = jnp.asarray(rng.integers(0, k, lead), jnp.int32)
    return Z, W, b, tok, normal(lead), normal(lead)


def _objective(fn, tok, g_l, g_h, use=("logp", "entropy"), **kw):
    """``Σ g_l logp + Σ g_h H`` (a policy-gradient loss with an entropy bonus)."""

    def f(Z, W, b):
        logp, ent = fn(Z, W, tok, bias=b, **kw)
        out = 0.0
        if "logp" in use:
            out = out + jnp.sum(g_l * logp)
        if "entropy" in use:
            out = out + jnp.sum(g_h * ent)
        return out

    return f


def _ref_fn(Z, W, tok, *, bias=None, temperature=1.0, weight_layout="dk", chunk_size=None):
    return log_probs_ref(Z, W, tok, bias, temperature, weight_layout)


def _reference_fn(Z, W, b, tok, g_l, g_h, *, temperature, layout, use):
    """The unfused reference's values and gradients (Z, W, bias) in float64."""
    f64 = lambda x: None if x is None else x.astype(jnp.float64)  # noqa: E731
    Z, W, b, g_l, g_h = map(f64, (Z, W, b, g_l, g_h))
    ref = log_probs_ref(Z, W, tok, b, temperature, layout)
    argn = (0, 1, 2) if b is not None else (0, 1)
    obj = _objective(_ref_fn, tok, g_l, g_h, use, temperature=temperature, weight_layout=layout)
    return ref, jax.grad(obj, argn)(Z, W, b)


# One compiled program per layout, outputs used and shapes (its primitives run eagerly would
# compile one by one, anew at every new shape); the temperature traced, so that the matrix's cases
# that differ in it share one; the conversions to float64 inside, on the traced inputs.
_reference = jax.jit(_reference_fn, static_argnames=("layout", "use"))


def _check(Z, W, b, tok, g_l, g_h, dtype, rtol=None, use=("logp", "entropy"), **kw):
    """Values and gradients (Z, W, bias) of the fused call against the unfused reference on
    the same inputs, in float64."""
    out = sj.linear_log_probs(Z, W, tok, bias=b, **kw)
    ref, want = _reference(Z, W, b, tok, g_l, g_h, temperature=kw.get("temperature", 1.0),
                           layout=kw.get("weight_layout", "dk"), use=use)  # fmt: skip
    assert out.logp.shape == tok.shape and out.entropy.shape == tok.shape
    assert_close(out.logp, ref[0], dtype, rtol)
    assert_close(out.entropy, ref[1], dtype, rtol)
    argn = (0, 1, 2) if b is not None else (0, 1)
    got = jax.grad(_objective(sj.linear_log_probs, tok, g_l, g_h, use, **kw), argn)(Z, W, b)
    for x, r, name in zip(got, want, ("Z", "W", "bias")):
        assert x.dtype == (Z if name == "Z" else W).dtype, name
        assert_close(x, r, dtype, rtol)


def _host_transpose(W):
    """``W.T`` on the host (an eager transpose compiles a program per shape)."""
    return jnp.asarray(np.asarray(W).T)


# Every option crossed: layout × bias × temperature × chunking (a remainder chunk, one chunk,
# "auto") × leading dimensions × which outputs carry a cotangent.
MATRIX = list(
    itertools.product(
        ("dk", "kd"), (False, True), (1.0, 1.5), (7, None, "auto"), ((29,), (3, 5)),
        (("logp", "entropy"), ("logp",), ("entropy",)),
    )
)  # fmt: skip


@pytest.mark.x64
@pytest.mark.parametrize("layout, bias, temperature, chunk, lead, use", MATRIX[::18])
def test_float64_matrix(getkey, layout, bias, temperature, chunk, lead, use):
    Z, W, b, tok, g_l, g_h = _problem(getkey(), lead, 6, 13, bias=bias)
    W = W if layout == "dk" else _host_transpose(W)
    _check(Z, W, b, tok, g_l, g_h, jnp.float64, use=use, temperature=temperature,
           weight_layout=layout, chunk_size=chunk)  # fmt: skip


@pytest.mark.slow
@pytest.mark.x64
@pytest.mark.parametrize("layout, bias, temperature, chunk, lead, use",
                         [c for i, c in enumerate(MATRIX) if i % 18 and i % 12 == 1])  # fmt: skip
def test_float64_matrix_rest(getkey, layout, bias, temperature, chunk, lead, use):
    test_float64_matrix(getkey, layout, bias, temperature, chunk, lead, use)


@pytest.mark.parametrize("layout", ["dk", "kd"])
def test_float32_against_float64(getkey, layout):
    """float32 inputs: values and gradients within float32's rtol 1e-5 of float64."""
    Z, W, b, tok, g_l, g_h = _problem(getkey(), (64,), 16, 50, jnp.float32, bias=True)
    W = W if layout == "dk" else _host_transpose(W)
    with jax.enable_x64(True):
        _check(Z, W, b, tok, g_l, g_h, jnp.float32, temperature=1.5, weight_layout=layout,
               chunk_size=24)  # fmt: skip


@jax.jit
def _verl_inputs(key):
    """verl's inputs, drawn in one compiled program."""
    ks = jax.random.split(key, 5)
    n, h, v = 193, 96, 1531
    Z = jax.random.uniform(ks[0], (n, h), jnp.float32, -0.5, 0.5)
    W = jax.random.uniform(ks[1], (v, h), jnp.float32, -0.5, 0.5)
    tok = jax.random.randint(ks[2], (n,), 0, v)
    g_l = jax.random.uniform(ks[3], (n,), jnp.float32, -1.0, 1.0)
    g_h = jax.random.uniform(ks[4], (n,), jnp.float32, -0.5, 0.5)
    return Z, W, tok, g_l, g_h


def test_verl_ppo_case(getkey):
    """verl's fused PPO kernel test (tests/utils/test_linear_cross_entropy.py): weights
    ``(V, H)`` (``"kd"``), inputs uniform in [-0.5, 0.5], temperature 1.5, cotangents
    ``g_logprobs ~ U(-1, 1)``, ``g_entropy ~ U(-0.5, 0.5)``; verl's float32 tolerances are
    atol 1e-4 / rtol 1e-4 on values, atol 1e-2 / rtol 1e-4 on gradients — here a shape small
    enough for CPU and the stricter normwise float32 tolerance."""
    Z, W, tok, g_l, g_h = _verl_inputs(getkey())
    with jax.enable_x64(True):
        _check(Z, W, None, tok, g_l, g_h, jnp.float32, temperature=1.5, weight_layout="kd")


def test_bfloat16_large_batch(getkey):
    """bfloat16 inputs at N = 8192 against float64 on the same (rounded) inputs: within what
    rounding the residual to bfloat16 before the GEMMs explains (the dtype's 2e-2)."""
    Z, W, b, tok, g_l, g_h = _problem(getkey(), (8192,), 32, 96, jnp.bfloat16)
    with jax.enable_x64(True):
        _check(Z, W, None, tok, g_l, g_h, jnp.bfloat16, temperature=1.5)


def test_extreme_logits_finite(getkey):
    """Logits of magnitude 1e4: log-probabilities, entropies and gradients stay finite."""
    Z, W, _, tok, g_l, g_h = _problem(getkey(), (16,), 4, 9, jnp.float32, scale=60.0)
    out = sj.linear_log_probs(Z, W, tok, chunk_size=5)
    assert np.all(np.isfinite(out.logp)) and np.all(np.asarray(out.entropy) >= -1e-6)
    grads = jax.grad(_objective(sj.linear_log_probs, tok, g_l, g_h), (0, 1))(Z, W, None)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.x64
def test_jit_and_vmap(getkey):
    Z, W, b, tok, g_l, g_h = _problem(getkey(), (3, 10), 5, 7, bias=True)
    fn = jax.jit(lambda Z, W, b: sj.linear_log_probs(Z, W, tok, bias=b, chunk_size=4))
    # The references (values, the gradient of Σ g_l logp) in one compiled program.
    ref, grad_r = jax.jit(lambda Z: (log_probs_ref(Z, W, tok, b), jax.grad(
        lambda Z: jnp.sum(log_probs_ref(Z, W, tok)[0] * g_l))(Z)))(Z)  # fmt: skip
    assert_close(fn(Z, W, b).logp, ref[0])
    per_row = jax.vmap(lambda z, t: sj.linear_log_probs(z, W, t, bias=b, chunk_size=4))(Z, tok)
    assert_close(per_row.entropy, ref[1])
    grad_v = jax.grad(lambda Z: jnp.sum(jax.vmap(
        lambda z, t: sj.linear_log_probs(z, W, t, chunk_size=4).logp)(Z, tok) * g_l))(Z)  # fmt: skip
    assert_close(grad_v, grad_r)


@pytest.mark.x64
def test_matches_head_cross_entropy(getkey):
    """``−logp`` is the head's per-token cross-entropy (reduction ``"none"``), to roundoff."""
    Z, W, b, tok, *_ = _problem(getkey(), (20,), 6, 11, bias=True)
    ce = sj.linear_cross_entropy(Z, W, tok, bias=b, reduction="none")
    assert_close(-sj.linear_log_probs(Z, W, tok, bias=b).logp, ce)


def test_errors_name_the_argument():
    Z, W = jnp.ones((4, 3)), jnp.ones((3, 5))
    tok = jnp.array([0, 1, 2, 3])
    with pytest.raises(TypeError, match="`tokens` must have an integer dtype"):
        sj.linear_log_probs(Z, W, tok.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"`tokens` must lie in \[0, K\) = \[0, 5\), got 7"):
        sj.linear_log_probs(Z, W, tok.at[2].set(7))
    with pytest.raises(ValueError, match=r"`tokens` must have shape \(\.\.\.\) = \(4,\)"):
        sj.linear_log_probs(Z, W, tok[:3])
    with pytest.raises(ValueError, match="`temperature` must be a positive finite float"):
        sj.linear_log_probs(Z, W, tok, temperature=0.0)
    with pytest.raises(TypeError, match="`temperature` must be a Python float"):
        jax.jit(lambda t: sj.linear_log_probs(Z, W, tok, temperature=t))(1.0)
    with pytest.raises(ValueError, match="`Z` and `W` must agree on the feature dimension"):
        sj.linear_log_probs(Z, W.T, tok)
    with pytest.raises(ValueError, match="`weight_layout` must be 'dk' or 'kd'"):
        sj.linear_log_probs(Z, W, tok, weight_layout="kk")
    with pytest.raises(ValueError, match=r"`bias` must have shape \(K,\)"):
        sj.linear_log_probs(Z, W, tok, bias=jnp.ones(4))
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        sj.linear_log_probs(Z, W, tok, chunk_size=0)


def test_out_of_range_token_under_jit_is_nan():
    """Under jit the token values are unknown: a token outside [0, K) gets logp NaN (never a
    plausible wrong number); the other rows are untouched."""
    Z, W = jnp.ones((3, 2)), jnp.zeros((2, 4))
    out = jax.jit(lambda t: sj.linear_log_probs(Z, W, t))(jnp.array([0, 9, 1]))
    assert np.isnan(out.logp[1]) and np.allclose(np.asarray(out.logp)[[0, 2]], -np.log(4))
