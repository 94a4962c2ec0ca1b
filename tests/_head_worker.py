"""Multi-device checks of the heads, run in a fresh interpreter by ``tests/test_parallel.py``.

Started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; prints one ``RESULT {json}``
line:

- ``options``: the sharded head on ``Mesh``, ``jax.make_mesh`` (explicit axes) and a 2 x 4
  data x model mesh, with every option at once (leading dims, ``-100`` padding and a weight-0
  out-of-range row, the tied ``"kd"`` layout, softcap, smoothing, z-loss, bias, weights, aux),
  against the single-device head (float64): relative errors of values, gradients and aux;
- ``plain_sharded``: the plain head given a W sharded over classes (explicit mesh under jit, a
  concrete array on an automatic mesh): errors against one device, compiled per-device
  temporaries against one device's, and the error for K not divisible by the axis.
"""

from __future__ import annotations

import json
import sys


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def rel_err(x, ref) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(x - ref))) if x.size else 0.0
    return err / scale if scale > 0 else err


def _problem(rng, lead, d, k):
    import jax.numpy as jnp

    Z = jnp.asarray(rng.normal(size=(*lead, d)))
    W = jnp.asarray(rng.normal(size=(d, k)))
    b = jnp.asarray(rng.normal(size=(k,)))
    y = rng.integers(0, k, lead)
    y.flat[1] = -100
    y.flat[5] = k + 3  # out of range, weight 0 below: contributes nothing
    s = rng.uniform(0.0, 2.0, lead)
    s.flat[5] = 0.0
    return Z, W, b, jnp.asarray(y, jnp.int32), jnp.asarray(s)


def options() -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import softmax_jax as sj

    devs = jax.devices()
    rng = np.random.default_rng(0)
    meshes = {
        "Mesh_p4": Mesh(np.array(devs[:4]), ("model",)),
        "make_mesh_p4": jax.make_mesh((4,), ("model",), devices=devs[:4]),
        "make_mesh_data2_model4": jax.make_mesh((2, 4), ("data", "model")),
    }
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0, weight_layout="kd",
                return_aux=True, chunk_size=3)  # fmt: skip
    out: dict = {}
    for name, mesh in meshes.items():
        for reduction in ("mean", "none"):
            Z, W, b, y, s = _problem(rng, (2, 8), 6, 24)
            E = W.T  # the tied (K, D) table
            ct = jnp.asarray(rng.normal(size=y.shape))
            Es = jax.device_put(E, NamedSharding(mesh, P("model", None)))
            bs = jax.device_put(b, NamedSharding(mesh, P("model")))

            def run(fn, E, b):
                def loss(Z, E, b, s):
                    value, aux = fn(Z, E, y, bias=b, weights=s, reduction=reduction, **opts)
                    value = jnp.vdot(ct, value) if reduction == "none" else value
                    return value, aux

                vg = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)
                return jax.jit(vg)(Z, E, b, s)

            (v, aux), g = run(
                lambda *a, **kw: sj.sharded_linear_cross_entropy(*a, mesh=mesh, **kw), Es, bs
            )
            (rv, raux), rg = run(sj.linear_cross_entropy, E, b)
            err = {"value": rel_err(v, rv), "lse": rel_err(aux.lse, raux.lse),
                   "accuracy": abs(float(aux.accuracy) - float(raux.accuracy)),
                   "predictions_equal": bool(np.array_equal(aux.predictions, raux.predictions))}  # fmt: skip
            err.update({nm: rel_err(x, r) for nm, x, r in zip(("Z", "E", "b", "s"), g, rg)})
            out[f"{name}_{reduction}"] = {
                "err": err,
                "finite": bool(all(np.all(np.isfinite(np.asarray(x))) for x in g)),
                "dE_spec": str(g[1].sharding.spec),
            }
    return out


def plain_sharded() -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import softmax_jax as sj

    devs = jax.devices()
    rng = np.random.default_rng(1)
    out: dict = {"err": {}}
    explicit = jax.make_mesh((4,), ("model",), devices=devs[:4])
    auto = Mesh(np.array(devs[:4]), ("model",))
    Z, W, b, y, s = _problem(rng, (16,), 6, 24)
    f = jax.value_and_grad(lambda Z, W, b: sj.linear_cross_entropy(Z, W, y, bias=b, weights=s,
                                                                  label_smoothing=0.1), (0, 1, 2))  # fmt: skip
    rv, rg = jax.jit(f)(Z, W, b)
    for name, mesh, jit in (("explicit_jit", explicit, True), ("auto_eager", auto, False)):
        Ws = jax.device_put(W, NamedSharding(mesh, P(None, "model")))
        v, g = (jax.jit(f) if jit else f)(Z, Ws, b)
        out["err"][name] = max(rel_err(v, rv), *(rel_err(x, r) for x, r in zip(g, rg)))
        out[f"{name}_dW_spec"] = str(g[1].sharding.spec)

    # Compiled per-device temporaries, float32, compile only: W sharded over classes on an
    # explicit mesh against the same call on one device.
    n, d, k = 8192, 256, 65536

    def temps(sharding, rows=n, row_sharding=None):
        sds = jax.ShapeDtypeStruct
        args = (sds((rows, d), jnp.float32, sharding=row_sharding),
                sds((d, k), jnp.float32, sharding=sharding),
                sds((rows,), jnp.int32, sharding=row_sharding))  # fmt: skip
        g = jax.value_and_grad(lambda Z, W, y: sj.linear_cross_entropy(Z, W, y), (0, 1))
        return int(jax.jit(g).lower(*args).compile().memory_analysis().temp_size_in_bytes)

    one = temps(None)
    four = temps(NamedSharding(explicit, P(None, "model")))
    # Plain data parallelism: rows over 4 devices, W replicated, against one device running the
    # same call on its 2048 local rows.
    data = jax.make_mesh((4,), ("data",), devices=devs[:4])
    rows = temps(NamedSharding(data, P()), n, NamedSharding(data, P("data")))
    local = temps(None, n // 4)
    out["memory"] = {"one_device": one, "four_devices_per_device": four,
                     "data_parallel_per_device": rows, "one_device_local_rows": local}  # fmt: skip

    return out


def main(argv: list[str]) -> None:
    if argv[1] == "heads":
        emit({"options": options(), "plain_sharded": plain_sharded()})
    else:
        raise SystemExit(f"unknown mode {argv[1]!r}")


if __name__ == "__main__":
    main(sys.argv)
