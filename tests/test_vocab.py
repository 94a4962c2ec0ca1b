"""The row-chunk pass of the vocabulary losses (_vocab): class-sharded meshes against one device,
and compiled temporaries of each gradient against the unfused computation."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from helpers import run_device_worker

import softmax_jax as sj

WORKER = Path(__file__).with_name("_vocab_worker.py")
# float64 against the single-device unfused reference: the class shards' sums are associated
# differently from one pass over all K (a few roundoffs).
EXACT = 1e-12


@pytest.fixture(scope="module")
def mesh_run() -> dict:
    return run_device_worker(WORKER, timeout=600)


@pytest.mark.multiprocess
def test_class_sharded_meshes_match_one_device(mesh_run):
    """1-axis meshes of 2/4/8 devices and a 2 x 4 data x model mesh (automatic and explicit
    axes, both layouts, "mean"/"sum"/"none"): log-probs and distillation values and gradients
    equal the unfused float64 reference; dW stays sharded like W; the teacher gets zero."""
    assert len(mesh_run) == 6
    for case, got in mesh_run.items():
        bad = {k: v for k, v in got["err"].items() if not v <= EXACT}
        assert not bad, f"{case}: {bad}"
        assert got["teacher_grad_zero"], case
        assert "model" in got["dW_spec"], (case, got["dW_spec"])


# The shape: gradient temporaries at N=8192, D=256, K=32768 at least 10x below the
# unfused computation's (compile only: nothing is allocated).
N, D, K = 8192, 256, 32768
TARGET_RATIO = 10.0


def _temp(f, *args) -> int:
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _log_probs_unfused(Z, W, y, g):
    lq = jax.nn.log_softmax(Z @ W)
    logp = jnp.take_along_axis(lq, y[:, None], 1)[:, 0]
    return -jnp.sum(g * logp) - 0.01 * jnp.sum(-jnp.sum(jnp.exp(lq) * lq, 1))


def _log_probs_fused(Z, W, y, g):
    out = sj.linear_log_probs(Z, W, y)
    return -jnp.sum(g * out.logp) - 0.01 * jnp.sum(out.entropy)


def _distill_unfused(Z, W, Zt, Wt, y, divergence):
    from _vocab_refs import distillation_ref

    return distillation_ref(Z, W, Zt, Wt, y, temperature=2.0, divergence=divergence)


def _distill_fused(Z, W, Zt, Wt, y, divergence):
    return sj.linear_distillation(Z, W, Zt, Wt, labels=y, temperature=2.0, divergence=divergence)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["log_probs", "kl", "reverse_kl", "jsd"])
def test_gradient_temporaries_ten_times_below_unfused(loss):
    f32 = jnp.float32
    Z, W = jax.ShapeDtypeStruct((N, D), f32), jax.ShapeDtypeStruct((D, K), f32)
    y = jax.ShapeDtypeStruct((N,), jnp.int32)
    if loss == "log_probs":
        g = jax.ShapeDtypeStruct((N,), f32)
        fused = _temp(jax.grad(_log_probs_fused, (0, 1)), Z, W, y, g)
        unfused = _temp(jax.grad(_log_probs_unfused, (0, 1)), Z, W, y, g)
    else:
        args = (Z, W, Z, W, y)
        fused = _temp(jax.grad(functools.partial(_distill_fused, divergence=loss), (0, 1)), *args)
        unfused = _temp(
            jax.grad(functools.partial(_distill_unfused, divergence=loss), (0, 1)), *args
        )
    assert unfused / fused >= TARGET_RATIO, (loss, fused, unfused)
