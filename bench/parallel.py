"""Benchmark: scale-out on 1, 2, 4, 8 *simulated* devices (forced CPU host-platform devices).

Each device count runs in its own process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=P`` (the flag is read once, when jax starts).
The P "devices" share this machine's cores, so the times measure **correctness and the overhead
of sharding** (collectives, partitioned programs), not a speed-up: on a 2-core machine 8 devices
cannot be faster than 1. What each process measures:

- the class-sharded head (``sharded_linear_cross_entropy``, W split over K on a ``"model"`` axis):
  time of ``value_and_grad``, compiled temporaries per device (memory analysis), and its loss and
  gradient against the single-device ``linear_cross_entropy`` (relative error, float32);
- data parallelism (batch split over a ``"data"`` axis, W replicated): time of one
  ``sj.value_and_grad`` step and of one epoch of ``sj.fit(mesh=...)`` (when ``fit`` accepts a
  mesh), with the final parameters against the single-device fit.

Run: ``python bench/parallel.py [--quick]`` or ``softmax-jax bench --only parallel``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/_bench_package.py makes this folder `bench`
    import _bench_package  # noqa: F401

from bench import _common as C

DEVICE_COUNTS = (1, 2, 4, 8)
CONFIGS = {
    # head: (N, D, K, chunk); dp: (N, D, K, batch, epochs)
    "full": {"head": (4096, 256, 16384, 1024), "dp": (32768, 128, 64, 1024, 3), "repeats": 5},
    "quick": {"head": (1024, 128, 8192, 256), "dp": (8192, 64, 32, 512, 3), "repeats": 3},
    "tiny": {"head": (64, 16, 64, 32), "dp": (256, 8, 8, 64, 2), "repeats": 2},
}
CHILD_TIMEOUT = 1800


def _mode(quick: bool) -> str:
    return "tiny" if C.tiny_mode() else ("quick" if quick else "full")


# --------------------------------------------------------------------------------------------
# In the child: P forced devices.
# --------------------------------------------------------------------------------------------


def _rel(x, ref) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _head(p: int, cfg: dict) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from softmax_jax import linear_cross_entropy, sharded_linear_cross_entropy

    n, d, k, chunk = cfg["head"]
    mesh = Mesh(np.array(jax.devices()[:p]), ("model",))
    rng = np.random.default_rng(0)
    Z = jnp.asarray(rng.standard_normal((n, d), np.float32))
    W = jnp.asarray(rng.standard_normal((d, k), np.float32) / np.sqrt(d))
    b = jnp.asarray(rng.standard_normal(k).astype(np.float32))
    y = jnp.asarray(rng.integers(0, k, n).astype(np.int32))
    Ws = jax.device_put(W, NamedSharding(mesh, P(None, "model")))
    bs = jax.device_put(b, NamedSharding(mesh, P("model")))

    def loss(Z, W, b):
        return sharded_linear_cross_entropy(Z, W, y, mesh=mesh, bias=b, chunk_size=chunk)

    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    t = C.timeit(vg, Z, Ws, bs, repeats=cfg["repeats"], warmup=1)
    temp = vg.lower(Z, Ws, bs).compile().memory_analysis().temp_size_in_bytes
    v, g = vg(Z, Ws, bs)
    ref = jax.jit(
        jax.value_and_grad(
            lambda Z, W, b: linear_cross_entropy(Z, W, y, bias=b, chunk_size=chunk), (0, 1, 2)
        )
    )
    rv, rg = ref(Z, W, b)
    err = max([_rel(v, rv)] + [_rel(x, r) for x, r in zip(g, rg)])
    extra = {}
    if p == 1:  # the single-device head itself, for reference
        extra = {
            "unsharded_head_value_and_grad_s": C.timeit(ref, Z, W, b, repeats=cfg["repeats"]),
            "unsharded_head_temp_bytes": int(
                ref.lower(Z, W, b).compile().memory_analysis().temp_size_in_bytes
            ),
        }
    return {
        **extra,
        "head_value_and_grad_s": t,
        "head_gflops": 6.0 * n * d * k / t / 1e9,  # three GEMMs: logits, dW, dZ
        "head_temp_bytes_per_device": int(temp),
        "head_rel_err_vs_1_device": err,
    }


def _dp(p: int, cfg: dict) -> dict[str, Any]:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import softmax_jax as sj

    n, d, k, batch, epochs = cfg["dp"]
    mesh = Mesh(np.array(jax.devices()[:p]), ("data",))
    rng = np.random.default_rng(1)
    Z = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, k, n).astype(np.int32)
    y[:k] = np.arange(k)
    W = np.zeros((d, k), np.float32)

    # One data-parallel gradient step on the same batch for every P: split over "data", W
    # replicated; XLA partitions the two GEMMs and sums Zᵀ(Ŷ − Y) across devices.
    Zb = jax.device_put(Z[:batch], NamedSharding(mesh, P("data", None)))
    yb = jax.device_put(y[:batch], NamedSharding(mesh, P("data")))
    Wr = jax.device_put(W, NamedSharding(mesh, P()))
    step = jax.jit(lambda W, Z, y: sj.value_and_grad(W, Z, y, reduction="mean"))
    out: dict[str, Any] = {
        "dp_step_s": C.timeit(step, Wr, Zb, yb, repeats=cfg["repeats"], warmup=1),
    }
    kw = dict(optimizer="adam", batch_size=batch, progress=False, seed=0, num_classes=k)
    try:
        params, hist = sj.fit(Z, y, epochs=epochs, mesh=mesh, **kw)
    except ValueError as e:  # a fit without data-parallel support yet
        if "not supported yet" not in str(e):
            raise
        out["dp_epoch_s"] = None
        out["dp_note"] = f"fit(mesh=) unavailable: {e}"
        return out
    ref, _ = sj.fit(Z, y, epochs=epochs, **kw)
    out["dp_epoch_s"] = statistics.median(hist["seconds"][1:])  # the first epoch compiles
    out["dp_params_rel_err_vs_1_device"] = max(_rel(params[x], ref[x]) for x in ("W", "b"))
    return out


def _child(p: int, mode: str) -> dict[str, Any]:
    import jax

    assert jax.device_count() >= p, f"expected {p} devices, got {jax.device_count()}"
    cfg = CONFIGS[mode]
    return {"devices": p, **_head(p, cfg), **_dp(p, cfg)}


# --------------------------------------------------------------------------------------------
# In the parent: one child per device count.
# --------------------------------------------------------------------------------------------


def _spawn(p: int, mode: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={p}"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(p), "--mode", mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{p} devices: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def run(quick: bool = False) -> dict[str, Any]:
    mode = _mode(quick)
    cfg = CONFIGS[mode]
    cores = os.cpu_count()
    print(
        f"parallel ({mode}): 1, 2, 4, 8 devices SIMULATED as forced CPU devices on {cores} cores; "
        "times show correctness and sharding overhead, not speed-up",
        flush=True,
    )
    rows = [_spawn(p, mode) for p in DEVICE_COUNTS]
    base = rows[0]
    for r in rows:
        r["head_time_vs_1"] = r["head_value_and_grad_s"] / base["head_value_and_grad_s"]
        r["head_temp_vs_1"] = r["head_temp_bytes_per_device"] / base["head_temp_bytes_per_device"]
        r["head_temp_MiB"] = r["head_temp_bytes_per_device"] / 2**20
        r["dp_step_ms"] = 1e3 * r["dp_step_s"]
        r["head_ms"] = 1e3 * r["head_value_and_grad_s"]
        r["dp_epoch_ms"] = None if r.get("dp_epoch_s") is None else 1e3 * r["dp_epoch_s"]
    n, d, k, chunk = cfg["head"]
    ref_row = {
        "devices": "1 (unsharded linear_cross_entropy)",
        "head_ms": 1e3 * base["unsharded_head_value_and_grad_s"],
        "head_time_vs_1": base["unsharded_head_value_and_grad_s"] / base["head_value_and_grad_s"],
        "head_temp_MiB": base["unsharded_head_temp_bytes"] / 2**20,
        "head_temp_vs_1": base["unsharded_head_temp_bytes"] / base["head_temp_bytes_per_device"],
    }
    C.print_table(
        [ref_row, *rows],
        [
            "devices",
            "head_ms",
            "head_time_vs_1",
            "head_temp_MiB",
            "head_temp_vs_1",
            "head_rel_err_vs_1_device",
        ],  # fmt: skip
        title=f"class-sharded head, value_and_grad, N={n} D={d} K={k} chunk={chunk}, float32 "
        f"(simulated devices on {cores} cores)",
    )
    n, d, k, batch, epochs = cfg["dp"]
    C.print_table(
        rows,
        ["devices", "dp_step_ms", "dp_epoch_ms", "dp_params_rel_err_vs_1_device"],
        title=f"data parallel: one value_and_grad step (one batch) and one fit epoch, N={n} "
        f"D={d} K={k} batch={batch}, float32 (simulated devices on {cores} cores)",
    )
    payload = {
        "mode": mode,
        "simulated": True,
        "note": (
            f"{len(DEVICE_COUNTS)} device counts simulated with "
            f"--xla_force_host_platform_device_count on {cores} CPU cores: a check of correctness "
            "and sharding overhead, not of speed-up"
        ),
        "config": cfg,
        "rows": rows,
    }
    C.write_json("parallel", payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args.child, args.mode)), flush=True)
    else:
        run(args.quick)


if __name__ == "__main__":
    main()
