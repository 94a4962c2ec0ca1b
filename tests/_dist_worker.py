"""Multi-device checks run in a fresh interpreter (the pytest session already holds 1 CPU device).

Run by ``tests/test_parallel.py`` as ``python tests/_dist_worker.py MODE ...`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set in the environment before jax is
imported. Every mode prints one JSON line (prefixed ``RESULT ``) that the test asserts on:

- ``devices``: the class-sharded head on 1, 2, 4, 8 devices (and a 2 x 4 data x model mesh)
  against a single-device unfused float64 reference, its input errors and compiled memory per
  device; data-parallel ``fit(mesh=...)`` against the single-device fit, and its input errors.
- ``process ID PORT NPROC DIR``: one of NPROC processes joined by ``jax.distributed`` on
  127.0.0.1:PORT, training data-parallel with ``fit(mesh=...)`` over the global mesh: from
  ``DIR/Z.npy`` opened as a memmap (the share of the file this process touched is reported), the
  same streamed (``stream=True``, the rows each process read are reported), and a resume from
  the checkpoint that ``process-kill`` left in ``DIR/ckpt``.
- ``process-kill ID PORT NPROC DIR``: the same processes, training with a checkpoint in
  ``DIR/ckpt``, all killed (``os._exit``) during epoch :data:`KILL_AT`.
- ``mesh-kill DIR`` / ``devices DIR``: the same kill on a one-process 4-device mesh, and the
  resume from it (in the ``devices`` run).
"""

from __future__ import annotations

import json
import sys
import time


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def rel_err(x, ref) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(x - ref))) if x.size else 0.0
    return err / scale if scale > 0 else err


def reference_loss(Z, W, b, y, s, reduction, ls, zl):
    """The unfused head, written directly from DESIGN.md: ``(N, K)`` logits, autodiff gradients."""
    import jax
    import jax.numpy as jnp

    A = Z @ W + (0.0 if b is None else b)
    lse = jax.nn.logsumexp(A, axis=1)
    tgt = (1 - ls) * jnp.take_along_axis(A, y[:, None], axis=1)[:, 0] + ls * jnp.mean(A, axis=1)
    per = lse - tgt + zl * lse**2
    if reduction == "none":
        return s * per
    if reduction == "sum":
        return jnp.sum(s * per)
    return jnp.sum(s * per) / jnp.sum(s)


def sharded() -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from softmax_jax._parallel import sharded_linear_cross_entropy as slce

    devs = jax.devices()
    out: dict = {"devices": len(devs), "errors": {}, "cases": {}}
    rng = np.random.default_rng(0)

    def problem(n, d, k):
        return (
            jnp.asarray(rng.normal(size=(n, d))),
            jnp.asarray(rng.normal(size=(d, k))),
            jnp.asarray(rng.normal(size=(k,))),
            jnp.asarray(rng.integers(0, k, n), jnp.int32),
            jnp.asarray(rng.uniform(0.0, 2.0, n)),
        )

    def case(name, mesh, n, d, k, *, reduction, ls, zl, chunk, bias=True, jit=False, primal=False):
        Z, W, b, y, s = problem(n, d, k)
        b = b if bias else None
        ct = jnp.asarray(rng.normal(size=(n,)))  # a random cotangent for reduction="none"

        def scalar(fn):
            def f(Z, W, b, s):
                v = fn(Z, W, b, s)
                return jnp.vdot(ct, v) if reduction == "none" else v

            return f

        def ours(Z, W, b, s):
            return slce(Z, W, y, mesh=mesh, bias=b, weights=s, reduction=reduction,
                        chunk_size=chunk, label_smoothing=ls, z_loss=zl)  # fmt: skip

        def ref(Z, W, b, s):
            return reference_loss(Z, W, b, y, s, reduction, ls, zl)

        argnums = (0, 1, 2, 3) if bias else (0, 1, 3)
        vg = jax.value_and_grad(scalar(ours), argnums=argnums)
        ref_vg = jax.value_and_grad(scalar(ref), argnums=argnums)
        if jit:  # ours inside an outer jit, compiled with the reference as one program
            (v, g), (rv, rg) = jax.jit(lambda *a: (vg(*a), ref_vg(*a)))(Z, W, b, s)
        else:  # called with concrete arrays: its eager checks, then its own jit
            (v, g), (rv, rg) = vg(Z, W, b, s), jax.jit(ref_vg)(Z, W, b, s)
        names = ("Z", "W", "b", "s") if bias else ("Z", "W", "s")
        errs = {"value": rel_err(v, rv), **{nm: rel_err(x, r) for nm, x, r in zip(names, g, rg)}}
        if primal:  # the primal-only path (no gradient requested)
            errs["primal"] = rel_err(ours(Z, W, b, s), jax.jit(ref)(Z, W, b, s))
        out["cases"][name] = {
            "err": errs,
            "dW_spec": str(g[1].sharding.spec),
            "dW_shape": list(g[1].shape),
        }
        return Z, W, b, y, s

    t0 = time.perf_counter()
    for p in (1, 2, 4, 8):
        mesh = Mesh(np.array(devs[:p]), ("model",))
        # Every option at once; N = 13 rows in chunks of 5 (not a multiple). On 2 devices the
        # "sum" reduction, called eagerly (its own jit, inputs moved from one device).
        red = "sum" if p == 2 else "mean"
        Z, W, b, y, s = case(f"all_options_{red}_p{p}", mesh, 13, 6, 24, reduction=red,
                             ls=0.1, zl=1e-3, chunk=5, jit=p != 2, primal=p == 8)  # fmt: skip
        if p == 4:
            case("none_nobias_p4", mesh, 13, 6, 24, reduction="none", ls=0.2, zl=0.0,
                 chunk=None, bias=False, jit=True, primal=True)  # fmt: skip
            # The compiled program never gathers W.
            hlo = jax.jit(jax.grad(lambda W: slce(Z, W, y, mesh=mesh, bias=b, chunk_size=5)))
            out["all_gather_in_hlo"] = "all-gather" in hlo.lower(W).compile().as_text()
    mesh2 = Mesh(np.array(devs).reshape(2, 4), ("data", "model"))
    case("data2_model4", mesh2, 16, 6, 24, reduction="mean", ls=0.1, zl=1e-3, chunk=3, jit=True)

    out["seconds_values"] = time.perf_counter() - t0

    def error(name, fn):
        try:
            fn()
        except (ValueError, TypeError) as e:
            out["errors"][name] = f"{type(e).__name__}: {e}"
        else:
            out["errors"][name] = None

    mesh4 = Mesh(np.array(devs[:4]), ("model",))
    Z, W, b, y, s = problem(13, 6, 10)
    error("k_not_divisible", lambda: slce(Z, W, y, mesh=mesh4))
    Z, W, b, y, s = problem(13, 6, 24)
    error("n_not_divisible", lambda: slce(Z, W, y, mesh=mesh2))
    error("bad_axis", lambda: slce(Z, W, y, mesh=mesh4, axis_name="vocab"))
    error("not_a_mesh", lambda: slce(Z, W, y, mesh=devs[:4]))

    # Compiled memory per device of value_and_grad (compile only), float32.
    t0 = time.perf_counter()
    n, d, k = 2048, 128, 16384
    mem = {}
    for chunk in (None, 256):
        for p in (1, 4, 8) if chunk else (1, 4):
            mesh = Mesh(np.array(devs[:p]), ("model",))

            def spec(shape, dtype, pspec, mesh=mesh):
                return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, pspec))

            args = (
                spec((n, d), jnp.float32, P()),
                spec((d, k), jnp.float32, P(None, "model")),
                spec((k,), jnp.float32, P("model")),
                spec((n,), jnp.int32, P()),
            )
            f = jax.value_and_grad(
                lambda Z, W, b, y, mesh=mesh, chunk=chunk: slce(
                    Z, W, y, mesh=mesh, bias=b, chunk_size=chunk
                ),
                argnums=(0, 1, 2),
            )
            ma = jax.jit(f).lower(*args).compile().memory_analysis()
            mem[f"chunk{chunk}_p{p}"] = int(ma.temp_size_in_bytes)
    out["memory"] = {"shape": [n, d, k], "temp_bytes": mem}
    out["seconds_memory"] = time.perf_counter() - t0
    return out


def _fit():
    try:
        import softmax_jax as sj

        return sj.fit
    except AttributeError:  # not re-exported yet
        from softmax_jax import fit

        return fit


def _fit_problem(n=250, d=5, k=3, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, k, n), rng.uniform(0.0, 2.0, n)


def data_parallel_fit() -> dict:
    """``fit(mesh=...)`` against the same fit on one device, for several meshes and options."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from jax.sharding import Mesh

    fit = _fit()
    devs = jax.devices()
    Z, y, sw = _fit_problem()
    out: dict = {"cases": {}, "errors": {}}
    cases = {
        # N = 250: the last batch is partial in every case.
        # 30 and 20 rows are not multiples of 4 and 8 devices: padded with zero-weight rows.
        "adam_b30_weights_eval_p4": (
            4,
            dict(
                optimizer="adam",
                epochs=3,
                batch_size=30,
                sample_weight=sw,
                eval_data=(Z[:40], y[:40]),
            ),
        ),
        "sgd_b20_p8": (8, dict(optimizer="sgd", epochs=2, batch_size=20, l2=1e-2)),
        # Full batch: the 250 rows split over 4 devices, padded to 252.
        "lbfgs_p4": (4, dict(optimizer="lbfgs", epochs=4)),
    }
    # Streamed: the host-gathered batches split over the mesh.
    for name in ("adam_b30_weights_eval_p4", "sgd_b20_p8"):
        p, kw = cases[name]
        cases["stream_" + name] = (p, {**kw, "stream": True})
    for name, (p, kw) in cases.items():
        mesh = Mesh(np.array(devs[:p]), ("data",))
        got, hist = fit(Z, y, mesh=mesh, progress=False, seed=3, **kw)
        ref, ref_hist = fit(Z, y, progress=False, seed=3, **kw)
        out["cases"][name] = {
            "err": max(rel_err(got[x], ref[x]) for x in ("W", "b")),
            "loss_err": rel_err(hist["loss"], ref_hist["loss"]),
            "W_spec": str(got["W"].sharding.spec),
            "W_devices": len(got["W"].sharding.device_set),
        }
    # jax.make_mesh gives axes of explicit type: accepted.
    got, _ = fit(Z, y, mesh=jax.make_mesh((2,), ("data",), devices=devs[:2]), progress=False,
                 epochs=2, batch_size=64)  # fmt: skip
    ref, _ = fit(Z, y, progress=False, epochs=2, batch_size=64)
    out["cases"]["adam_b64_make_mesh_p2"] = {
        "err": max(rel_err(got[x], ref[x]) for x in ("W", "b"))
    }

    def error(name, **kw):
        try:
            fit(Z, y, progress=False, epochs=1, **kw)
        except (ValueError, TypeError) as e:
            out["errors"][name] = f"{type(e).__name__}: {e}"
        else:
            out["errors"][name] = None

    error("no_data_axis", mesh=Mesh(np.array(devs[:2]), ("model",)))
    error("not_a_mesh", mesh=devs[:2])
    error("mesh_and_device", mesh=Mesh(np.array(devs[:2]), ("data",)), device="cpu")
    return out


def _join(pid: int, port: int, nproc: int):
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=nproc, process_id=pid, initialization_timeout=60
    )
    return jax


def _as_lists(params, hist) -> dict:
    import numpy as np

    return {
        "W": np.asarray(params["W"]).tolist(),
        "b": np.asarray(params["b"]).tolist(),
        "loss": hist["loss"],
    }


def _mapped_pages(path: str) -> list[int]:
    """The pages of ``path`` (4 KiB each, by file offset) mapped into this process: those of a
    memmap it has touched (bit 63 of /proc/self/pagemap; the kernel may also map a few
    neighbours of a touched page that are in the page cache)."""
    import os

    target, pages = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        spans = [line.split() for line in f]
    with open("/proc/self/pagemap", "rb") as pm:
        for head in spans:
            if len(head) < 6 or head[5] != target:
                continue
            start, stop = (int(x, 16) for x in head[0].split("-"))
            offset = int(head[2], 16) // 4096
            pm.seek(start // 4096 * 8)
            raw = pm.read((stop - start) // 4096 * 8)
            for i in range(len(raw) // 8):
                if int.from_bytes(raw[8 * i : 8 * i + 8], "little") >> 63:
                    pages.append(offset + i)
    return pages


def _killer(epoch_to_die: int):
    import os

    def callback(epoch, params, record):
        if epoch == epoch_to_die:  # before this epoch's checkpoint: a kill mid-run
            os._exit(KILL_CODE)

    return callback


def process(pid: int, port: int, nproc: int, directory: str) -> dict:
    """The 2-process runs (see the module docstring); each fit is the one of
    :func:`single_process_reference`."""
    import os

    jax = _join(pid, port, nproc)
    import numpy as np
    from jax.sharding import Mesh

    import softmax_jax._stream as stream_mod

    fit = _fit()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    path = os.path.join(directory, "Z.npy")
    Z = np.load(path, mmap_mode="r")
    y = np.load(os.path.join(directory, "y.npy"))
    result = {
        "pid": pid,
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "file_bytes": os.path.getsize(path),
    }
    params, hist = fit(Z, y, mesh=mesh, **MP_FIT)
    result["memmap"] = {**_as_lists(params, hist), "mapped_pages": _mapped_pages(path)}

    read: list[list[int]] = []
    original = stream_mod.read_rows

    def counting(Z, idx, out=None):  # the rows the stream reads, as it reads them
        read.append(np.asarray(idx).tolist())
        return original(Z, idx, out)

    stream_mod.read_rows = counting
    stream_mod.CHUNK_BYTES = 10 * 32 * 512 * 8  # chunks of 10 batches of 32 float64 rows
    try:
        params, hist = fit(Z, y, mesh=mesh, stream=True, **MP_FIT)
    finally:
        stream_mod.read_rows = original
    result["stream"] = {**_as_lists(params, hist), "rows_read": read}

    ran: list[int] = []
    params, hist = fit(Z, y, mesh=mesh, checkpoint_dir=os.path.join(directory, "ckpt"),
                       callback=lambda e, p, r: ran.append(e), **MP_FIT)  # fmt: skip
    result["resumed"] = {**_as_lists(params, hist), "epochs_run": ran}
    jax.distributed.shutdown()
    return result


def process_kill(pid: int, port: int, nproc: int, directory: str) -> None:
    import os

    jax = _join(pid, port, nproc)
    import numpy as np
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()), ("data",))
    Z = np.load(os.path.join(directory, "Z.npy"), mmap_mode="r")
    y = np.load(os.path.join(directory, "y.npy"))
    _fit()(Z, y, mesh=mesh, checkpoint_dir=os.path.join(directory, "ckpt"),
           callback=_killer(KILL_AT), **MP_FIT)  # fmt: skip
    raise AssertionError("not killed")


def mesh_kill(directory: str) -> None:
    """A 4-device mesh in one process, killed during epoch :data:`KILL_AT`."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    Z, y = mp_problem()
    _fit()(Z, y, mesh=mesh, checkpoint_dir=directory, callback=_killer(KILL_AT), **MP_FIT)
    raise AssertionError("not killed")


def mesh_resume(directory: str) -> dict:
    """The resume of :func:`mesh_kill`'s run, on the same mesh."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    Z, y = mp_problem()
    ran: list[int] = []
    params, hist = _fit()(Z, y, mesh=mesh, checkpoint_dir=directory,
                          callback=lambda e, p, r: ran.append(e), **MP_FIT)  # fmt: skip
    return {**_as_lists(params, hist), "epochs_run": ran}


# 2000 rows (an 8 MB float64 memmap: its halves are large next to the kernel's granularity of
# mapping file pages, up to a large folio) over 4 devices in batches of
# 30 (padded to 32), a partial last batch; killed during epoch 3 of 4.
MP_FIT = dict(optimizer="adam", epochs=4, batch_size=30, seed=5, progress=False)
KILL_AT, KILL_CODE = 3, 17


def mp_problem():
    import numpy as np

    rng = np.random.default_rng(1)
    Z = rng.normal(size=(2000, 512))
    return Z, (Z[:, 0] > 0).astype(np.int32) + (Z[:, 1] > 0).astype(np.int32)


def single_process_reference() -> dict:
    """The fit of ``process`` on one device (run in the caller's interpreter)."""
    import numpy as np

    Z, y = mp_problem()
    params, hist = _fit()(Z, y, **MP_FIT)
    return {"W": np.asarray(params["W"]), "b": np.asarray(params["b"]), "loss": hist["loss"]}


def main(argv: list[str]) -> None:
    mode = argv[1]
    if mode == "devices":
        t0 = time.perf_counter()
        result = {"sharded": sharded()}
        t1 = time.perf_counter()
        result["fit"] = data_parallel_fit()
        if len(argv) > 2:
            result["mesh_resume"] = mesh_resume(argv[2])
        result["seconds"] = {"sharded": t1 - t0, "fit": time.perf_counter() - t1}
        emit(result)
    elif mode == "mesh-kill":
        mesh_kill(argv[2])
    elif mode == "process":
        emit(process(int(argv[2]), int(argv[3]), int(argv[4]), argv[5]))
    elif mode == "process-kill":
        process_kill(int(argv[2]), int(argv[3]), int(argv[4]), argv[5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
