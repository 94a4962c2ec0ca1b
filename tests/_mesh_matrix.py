"""The generated mesh matrix of the head, run in one fresh interpreter by ``tests/test_parallel.py``.

Started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The cases are drawn (fixed
seed) from the product mesh kind × sharding × layout × reduction × options × gradients asked
for, every mesh kind × sharding pair at least once; each case compares
``jax.value_and_grad`` of :func:`softmax_jax.linear_cross_entropy` on the mesh with the same call
on one device (float32), and the gradients' shardings with their inputs'. Prints one
``RESULT {json}`` line: ``{case name: {"error": message} | {"err": max rel error,
"specs_ok": bool, "specs": ...}}``.

``python tests/_mesh_matrix.py N`` runs the first N cases (all when N is 0).
"""

from __future__ import annotations

import itertools
import json
import sys

MESH_KINDS = ("explicit", "auto", "legacy")
SHARDINGS = ("rows", "rows_t", "replicated", "fsdp", "vocab", "2d", "user_shard_map")
OPTIONS = ("plain", "smoothing", "z_loss", "softcap", "weights", "ignore", "aux")
GRADS = ("ZWb", "W", "Z", "none")
#: Every mesh kind × sharding pair once (options, layout, reduction and gradients rotating), then
#: 4 more drawn cases: each case compiles several programs in the one subprocess.
DEFAULT_COUNT = len(MESH_KINDS) * len(SHARDINGS) + 4


def cases(count: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    pairs = list(itertools.product(MESH_KINDS, SHARDINGS))
    out = []
    for i in range(count):
        mesh, sharding = pairs[i] if i < len(pairs) else rng.choice(pairs)
        out.append({
            "mesh": mesh, "sharding": sharding,
            "layout": rng.choice(("dk", "kd")),
            "reduction": rng.choice(("mean", "sum", "none")),
            "option": OPTIONS[i % len(OPTIONS)],
            "grads": rng.choice(GRADS),
            "jit": rng.random() < 0.75,
        })  # fmt: skip
    return out


def _mesh(kind):
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    if kind == "explicit":
        return jax.make_mesh((2, 4), ("data", "model"))
    if kind == "auto":
        return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def _specs(sharding, layout, lead):
    """PartitionSpecs of (Z, W, bias, labels) for a sharding of the matrix."""
    from jax.sharding import PartitionSpec as P

    rows = P("data", *(None,) * len(lead))
    rows_lab = P("data", *(None,) * (len(lead) - 1))
    cls = P(None, "model") if layout == "dk" else P("model", None)
    dsh = P("data", None) if layout == "dk" else P(None, "data")
    if sharding == "rows_t":  # the sequence axis of (B, T, D)
        return P(None, "data", None), P(), P(), P(None, "data")
    return {
        "rows": (rows, P(), P(), rows_lab),
        "replicated": (P(), P(), P(), P()),
        "fsdp": (rows, dsh, P(), rows_lab),
        "vocab": (P(), cls, P("model"), P()),
        "2d": (rows, cls, P("model"), rows_lab),
        "user_shard_map": (rows, P(), P(), rows_lab),
    }[sharding]


def _problem(case, rng):
    import jax.numpy as jnp
    import numpy as np

    lead = (4, 6) if case["sharding"] == "rows_t" or case["layout"] == "kd" else (16,)
    d, k = 8, 24
    Z = rng.normal(size=(*lead, d)).astype(np.float32)
    W = rng.normal(size=(d, k) if case["layout"] == "dk" else (k, d)).astype(np.float32)
    b = rng.normal(size=(k,)).astype(np.float32)
    y = rng.integers(0, k, lead).astype(np.int32)
    kw = {"reduction": case["reduction"], "weight_layout": case["layout"], "chunk_size": 3}
    opt = case["option"]
    s = None
    if opt == "smoothing":
        kw["label_smoothing"] = 0.1
    elif opt == "z_loss":
        kw["z_loss"] = 1e-2
    elif opt == "softcap":
        kw["softcap"] = 2.0
    elif opt == "weights":
        s = rng.uniform(0.0, 2.0, lead).astype(np.float32)
        s.flat[::5] = 0.0
        y.flat[5] = k + 3  # a weight-0 row with an out-of-range label counts for nothing
    elif opt == "ignore":
        y.flat[::4] = -100
    elif opt == "aux":
        kw["return_aux"] = True
        y.flat[2] = -100
    ct = rng.normal(size=lead).astype(np.float32)
    arrays = {"Z": Z, "W": W, "b": b, "y": y, "s": s}
    return {n: (None if x is None else jnp.asarray(x)) for n, x in arrays.items()}, kw, ct


def _loss_fn(kw, ct, argnums):
    import jax
    import jax.numpy as jnp

    import softmax_jax as sj

    def loss(Z, W, b, y, s):
        out = sj.linear_cross_entropy(Z, W, y, bias=b, weights=s, **kw)
        value, extra = (out[0], out[1].lse) if kw.get("return_aux") else (out, jnp.zeros(()))
        if kw["reduction"] == "none":
            value = jnp.sum(ct * value)
        return value, extra

    if not argnums:  # forward only
        return lambda *a: (loss(*a), ())
    return jax.value_and_grad(loss, argnums, has_aux=True)


def _rel(x, ref):
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(x - ref))) if x.size else 0.0
    return err / scale if scale > 0 else err


def _same_spec(x, ref_sharding, ndim):
    return x.sharding.is_equivalent_to(ref_sharding, ndim)


def run_case(case, seed):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(seed)
    arrays, kw, ct = _problem(case, rng)
    argnums = {"ZWb": (0, 1, 2), "W": (1,), "Z": (0,), "none": ()}[case["grads"]]
    vg = _loss_fn(kw, ct, argnums)
    (rv, raux), rg = jax.jit(vg)(arrays["Z"], arrays["W"], arrays["b"], arrays["y"], arrays["s"])
    mesh = _mesh(case["mesh"])
    zs, ws, bs, ys = _specs(case["sharding"], case["layout"], arrays["y"].shape)
    put = lambda x, p: None if x is None else jax.device_put(x, NamedSharding(mesh, p))  # noqa: E731
    args = (put(arrays["Z"], zs), put(arrays["W"], ws), put(arrays["b"], bs),
            put(arrays["y"], ys), put(arrays["s"], ys))  # fmt: skip
    if case["sharding"] == "user_shard_map":
        return _user_shard_map(case, mesh, arrays, kw, ct, argnums, args, (zs, ws, bs, ys))
    fn = jax.jit(vg) if case["jit"] else vg
    if case["mesh"] == "explicit":
        with jax.set_mesh(mesh):
            (v, aux), g = fn(*args)
    else:
        (v, aux), g = fn(*args)
    err = max(_rel(v, rv), _rel(aux, raux), *(_rel(x, r) for x, r in zip(g, rg)))
    specs = {}
    ok = True
    for i, x in zip(argnums, g):
        ref = args[i].sharding
        specs[("dZ", "dW", "db")[i]] = str(x.sharding.spec)
        # Auto axes: shardings are not part of the types, so under a transformation the head
        # cannot read them and XLA places the gradients; explicit axes carry them.
        if case["mesh"] == "explicit":
            ok &= bool(_same_spec(x, ref, x.ndim))
    del P
    return {"err": err, "specs_ok": ok, "specs": specs}


def _user_shard_map(case, mesh, arrays, kw, ct, argnums, args, specs):
    """Inside the user's own ``jax.shard_map`` on local shards: the head against the unfused
    loss (optax's) in the same shard_map, value and gradients (each device its rows' loss)."""
    import jax
    import jax.numpy as jnp
    import optax

    import softmax_jax as sj

    del ct
    argnums = argnums or (0,)
    kw = dict(kw, reduction="sum")
    kw.pop("return_aux", None)
    zs, ws, bs, ys = specs
    s_in = arrays["s"] is not None

    def local(fused):
        def f(Z, W, b, y, *s):
            s = s[0] if s else None
            if fused:
                value = sj.linear_cross_entropy(Z, W, y, bias=b, weights=s, **kw)
            else:
                Wd = W if kw["weight_layout"] == "dk" else W.T
                logits = Z @ Wd + b
                if kw.get("softcap"):
                    logits = kw["softcap"] * jnp.tanh(logits / kw["softcap"])
                keep = y != -100
                yk = jnp.where(keep, y, 0)
                k = logits.shape[-1]
                eps = kw.get("label_smoothing", 0.0)
                t = (
                    optax.smooth_labels(jax.nn.one_hot(yk, k), eps)
                    if eps
                    else jax.nn.one_hot(yk, k)
                )
                lse = jax.nn.logsumexp(logits, -1)
                per = optax.softmax_cross_entropy(logits, t) + kw.get("z_loss", 0.0) * lse**2
                sw = keep.astype(per.dtype) if s is None else jnp.where(keep, s, 0.0)
                value = jnp.sum(jnp.where(sw == 0, 0.0, sw * per))
            return value[None]

        in_specs = (zs, ws, bs, ys) + ((ys,) if s_in else ())

        def total(*a):
            sm = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=jax.P("data"))
            return jnp.sum(sm(*a))

        return jax.jit(jax.value_and_grad(total, argnums))

    a = args[:4] + ((args[4],) if s_in else ())
    if case["mesh"] == "explicit":
        with jax.set_mesh(mesh):
            (v, g), (rv, rg) = local(True)(*a), local(False)(*a)
    else:
        (v, g), (rv, rg) = local(True)(*a), local(False)(*a)
    err = max(_rel(v, rv), *(_rel(x, r) for x, r in zip(g, rg)))
    ok = all(bool(_same_spec(x, args[i].sharding, x.ndim)) for i, x in zip(argnums, g))
    return {"err": err, "specs_ok": ok, "specs": {}}


def main(argv):
    import jax

    count = int(argv[1]) if len(argv) > 1 else 0
    todo = cases(count or DEFAULT_COUNT)
    out = {}
    for i, case in enumerate(todo):
        name = "-".join(str(v) for v in case.values()) + f"-{i}"
        try:
            out[name] = run_case(case, i)
        except Exception as e:  # noqa: BLE001 - reported per case
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    print("RESULT " + json.dumps(out), flush=True)
    del jax


if __name__ == "__main__":
    main(sys.argv)
