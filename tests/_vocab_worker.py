"""The vocabulary losses on class-sharded meshes, in a fresh interpreter with 8 CPU devices.

Run by ``tests/test_vocab.py`` as ``python tests/_vocab_worker.py`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``: for each mesh case (one class axis of 2,
4 or 8 devices; a 2 x 4 data x model mesh whose data axis splits the rows; automatic and explicit
axis types; both layouts; the student's and the teacher's W sharded alike) the value and the
gradients of ``linear_log_probs`` (any cotangents, a bias) and ``linear_distillation`` (JSD +
hard loss, mask, weights; "mean" and "none") against the single-device unfused float64 reference.
Prints one ``RESULT {json}`` line: ``{case: {"err": {...}, "dW_spec": ...}}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
jax.config.update("jax_enable_x64", True)

from _vocab_refs import distillation_ref, log_probs_ref  # noqa: E402

import softmax_jax as sj  # noqa: E402

N, D, DT, K = 16, 5, 7, 24


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(x - ref))) / scale if scale > 0 else float(np.max(np.abs(x)))


def problem():
    ks = jax.random.split(jax.random.key(0), 9)
    Z, W = jax.random.normal(ks[0], (N, D)), jax.random.normal(ks[1], (D, K))
    Zt, Wt = jax.random.normal(ks[2], (N, DT)), jax.random.normal(ks[3], (DT, K))
    b = jax.random.normal(ks[4], (K,))
    y = jax.random.randint(ks[5], (N,), 0, K)
    y = jnp.where(jax.random.uniform(ks[6], (N,)) < 0.2, -100, y)
    s = jax.random.uniform(ks[7], (N,), minval=0.5, maxval=2.0)
    g = jax.random.normal(ks[8], (2, N))
    return Z, W, Zt, Wt, b, y, s, g


def objectives(Zt, Wt, b, y, s, g, layout, reduction):
    """(log-probs objective, distillation objective) of ``(Z, W, b)`` / ``(Z, W)``, given a
    loss implementation pair (fused or reference) and the weights' layout."""
    tok = jnp.where(y < 0, 0, y)
    kw = dict(labels=y, weights=s, temperature=2.0, divergence="jsd", beta=0.3,
              hard_weight=0.5, reduction=reduction, weight_layout=layout)  # fmt: skip

    def lp(fn):
        def f(Z, W, b):
            logp, ent = fn(Z, W, tok, b)
            return jnp.sum(g[0] * logp) + jnp.sum(g[1] * ent)

        return f

    def dist(fn):
        def f(Z, W, Wt):
            out = fn(Z, W, Zt, Wt, **kw)
            return out if reduction != "none" else jnp.sum(out * g[0])

        return f

    fused_lp = lambda Z, W, t, b: tuple(  # noqa: E731
        sj.linear_log_probs(Z, W, t, bias=b, temperature=1.5, weight_layout=layout, chunk_size=5)
    )
    ref_lp = lambda Z, W, t, b: log_probs_ref(Z, W, t, b, 1.5, layout)  # noqa: E731
    fused_d = lambda *a, **k: sj.linear_distillation(*a, chunk_size=5, **k)  # noqa: E731
    return (lp(fused_lp), dist(fused_d)), (lp(ref_lp), dist(distillation_ref))


def run_case(mesh, layout, reduction, explicit):
    Z, W, Zt, Wt, b, y, s, g = problem()
    if layout == "kd":
        W, Wt = W.T, Wt.T
    (f_lp, f_d), (r_lp, r_d) = objectives(Zt, Wt, b, y, s, g, layout, reduction)
    want_lp = jax.value_and_grad(r_lp, (0, 1, 2))(Z, W, b)
    want_d = jax.value_and_grad(r_d, (0, 1))(Z, W, Wt)
    wspec = P(None, "model") if layout == "dk" else P("model", None)
    put = lambda x, p: jax.device_put(x, NamedSharding(mesh, p))  # noqa: E731
    Ws, Wts, bs = put(W, wspec), put(Wt, wspec), put(b, P("model"))
    if "data" in mesh.axis_names:  # the rows split over the data axis (data x vocabulary)
        Z = put(Z, P("data", None))
    g_lp = jax.value_and_grad(f_lp, (0, 1, 2))
    g_d = jax.value_and_grad(f_d, (0, 1, 2))
    if explicit:  # JAX's explicit-sharding mode: differentiate under jit
        g_lp, g_d = jax.jit(g_lp), jax.jit(g_d)
    got_lp = g_lp(Z, Ws, bs)
    got_d = g_d(Z, Ws, Wts)
    err = {}
    for name, got, want in (("logprobs", got_lp, want_lp), ("distill", got_d, want_d)):
        err[f"{name}_value"] = rel_err(got[0], want[0])
        for i, part in enumerate(("Z", "W", "b")[: len(want[1])]):
            err[f"{name}_d{part}"] = rel_err(got[1][i], want[1][i])
    teacher_zero = not np.any(np.asarray(got_d[1][2]))
    return {"err": err, "teacher_grad_zero": teacher_zero,
            "dW_spec": str(got_d[1][1].sharding.spec)}  # fmt: skip


def main():
    devs = np.array(jax.devices())
    cases = {}
    for shape, names, layout, reduction, explicit in [
        ((2,), ("model",), "dk", "mean", False),
        ((4,), ("model",), "kd", "none", False),
        ((8,), ("model",), "dk", "sum", False),
        ((2, 4), ("data", "model"), "dk", "mean", False),
        ((2, 4), ("data", "model"), "kd", "none", True),
        ((4,), ("model",), "dk", "mean", True),
    ]:
        size = int(np.prod(shape))
        if explicit:
            mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))
        else:
            mesh = Mesh(devs[:size].reshape(shape), names)
        key = f"{'x'.join(map(str, shape))}_{layout}_{reduction}{'_explicit' if explicit else ''}"
        cases[key] = run_case(mesh, layout, reduction, explicit)
    print("RESULT " + json.dumps(cases), flush=True)


if __name__ == "__main__":
    main()
