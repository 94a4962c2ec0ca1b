"""The multi-device checks of tests/test_shard.py, in one fresh interpreter with 8 CPU devices.

Run as ``python tests/_shard_worker.py`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``;
prints one line ``RESULT {json}``: per check, the facts the tests assert on (layouts read from the
inputs' shardings, error messages, outputs of ``_shard.run`` against NumPy).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from softmax_jax import _shard


def put(x, mesh, *spec):
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def described(layout):
    if layout is None:
        return None
    return {
        "lead": [list(e) if isinstance(e, tuple) else e for e in layout.lead],
        "classes": list(layout.classes),
        "rows": list(layout.rows),
        "kaxis": layout.kaxis,
        "explicit": layout.explicit,
        "given": [None if s is None else str(s) for s in layout.given],
    }


def error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def layouts(mesh) -> dict:
    Z3 = jnp.ones((4, 6, 4))
    W, Wkd, b = jnp.ones((4, 8)), jnp.ones((8, 4)), jnp.ones(8)
    other = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    return {
        "rows_and_classes": described(_shard.layout_of(
            put(Z3, mesh, ("data", "seq")), put(W, mesh, None, "model"), put(b, mesh, "model"),
            kaxis=1)),
        "kd": described(_shard.layout_of(put(Z3, mesh, "data"), put(Wkd, mesh, "model"), None,
                                         kaxis=0)),
        "fsdp_w_gathered": described(_shard.layout_of(Z3, put(W, mesh, "data"), None, kaxis=1)),
        "replicated": described(_shard.layout_of(put(Z3, mesh), put(W, mesh), None, kaxis=1)),
        "local_rows": _shard.local_rows(
            _shard.layout_of(put(Z3, mesh, "data", "seq"), W, None, kaxis=1), Z3.shape[:-1]),
        "err_same_axis": error(lambda: _shard.layout_of(
            put(Z3, mesh, "model"), put(W, mesh, None, "model"), None, kaxis=1)),
        "err_two_meshes": error(lambda: _shard.layout_of(
            put(Z3, mesh, "data"), put(W, other, None, "x"), None, kaxis=1)),
    }  # fmt: skip


def run_on_mesh(mesh) -> dict:
    """``_shard.run`` of a per-device function whose reductions have known results: ``dZ = K_l Z``
    summed over the class shards is ``K Z``; ``dW = Z_lᵀ 1`` summed over the row shards is the
    column sums of ``Z``; ``db = n_l`` summed is ``N``; each class shard's offset."""
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(4, 6, 3))
    y = np.arange(24).reshape(4, 6)
    k = 8

    def per_device(local, Z, W, b, y):
        lead = y.shape
        Zf = _shard.flat_rows(Z, lead)
        kl = W.shape[1]
        dZ = Zf * kl
        dW = Zf.T @ jnp.ones((Zf.shape[0], kl))
        db = jnp.full((kl,), float(Zf.shape[0]))
        dZ, dW, db = _shard.reduce_gradients(local, lead, dZ, dW, db, (True, True, True), Z.dtype)
        per = _shard.lead_rows(2.0 * _shard.flat_rows(y, lead), lead)
        offsets = jnp.full((kl,), local.class_offset(kl), jnp.int32)
        return per, dZ, dW, db, offsets

    Zs = put(jnp.asarray(Z), mesh, ("data", "seq"))
    Ws = put(jnp.ones((3, k)), mesh, None, "model")
    bs = put(jnp.zeros(k), mesh, "model")
    ys = put(jnp.asarray(y), mesh, ("data", "seq"))
    layout = _shard.layout_of(Zs, Ws, bs, kaxis=1)
    out = jax.jit(lambda *a: _shard.run(
        per_device, layout, a, ("features", "weight", "classes", "rows"),
        (("rows", None), ("features", 0), ("weight", 1), ("classes", 2), ("classes", 2))))(
            Zs, Ws, bs, ys)  # fmt: skip
    per, dZ, dW, db, offsets = out
    kl = k // mesh.shape["model"]
    return {
        "per": bool(np.array_equal(per, 2.0 * y)),
        "dZ": float(np.max(np.abs(np.asarray(dZ) - k * Z))),
        "dW": float(np.max(np.abs(np.asarray(dW) - Z.reshape(-1, 3).sum(0)[:, None]))),
        "db": bool(np.array_equal(db, np.full(k, 24.0))),
        "offsets": np.asarray(offsets).tolist(),
        "offsets_want": np.repeat(np.arange(0, k, kl), kl).tolist(),
        "dZ_spec": str(dZ.sharding.spec),
        "dW_spec": str(dW.sharding.spec),
    }


def explicit_under_jit() -> dict:
    """On a mesh of explicit axes the shardings are part of the traced arrays' types."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    Z, W = put(jnp.ones((8, 3)), mesh, "data"), put(jnp.ones((3, 8)), mesh, None, "model")
    seen = {}

    def f(Z, W):
        seen["layout"] = described(_shard.layout_of(Z, W, None, kaxis=1))
        return Z

    with jax.set_mesh(mesh):
        jax.jit(f)(Z, W)
    return seen["layout"]


def inside_user_shard_map() -> dict:
    """Inside a user's ``jax.shard_map`` (check_vma on) the arrays are local shards: no layout;
    ``varying_like`` types a carry as varying over the inputs' axes, ``reduce_like`` sums a
    cotangent over the axes its invariant primal does not vary over."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    x, w = put(jnp.arange(8.0), mesh, "data"), put(jnp.ones(3), mesh)
    seen = {}

    def body(x, w):
        seen["layout"] = _shard.layout_of(x[:, None] * w, w[:, None], None, kaxis=1)
        carry = _shard.varying_like(jnp.zeros(3), x, w)
        seen["carry_varies"] = sorted(_shard._vma(carry))
        ct = carry + x[0] * w  # varies over "data"
        return _shard.reduce_like(ct, w)

    with jax.set_mesh(mesh):
        out = jax.jit(jax.shard_map(body, in_specs=(P("data"), P()), out_specs=P()))(x, w)
    return {"layout": seen["layout"], "carry_varies": seen["carry_varies"],
            "reduced": np.asarray(out).tolist()}  # fmt: skip


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 2, 2), ("data", "seq", "model"), axis_types=(AxisType.Auto,) * 3)
    flat = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    result = {
        "layouts": layouts(mesh),
        "run": run_on_mesh(mesh),
        "run_2x4": run_on_mesh(jax.make_mesh((2, 1, 4), ("data", "seq", "model"),
                                             axis_types=(AxisType.Auto,) * 3)),  # fmt: skip
        "explicit": explicit_under_jit(),
        "shard_map": inside_user_shard_map(),
        "flat_mesh_classes": described(_shard.layout_of(
            jnp.ones((8, 3)), put(jnp.ones((3, 8)), flat, None, "model"), None, kaxis=1)),
    }  # fmt: skip
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
