"""The minibatch epoch of ``sj.fit`` against the two-GEMM floor (a section of bench/train.py)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench import _common as C


def throughput(X: np.ndarray, y: np.ndarray, k: int, *, rounds: int, batch: int) -> dict:
    """Seconds of one epoch of ``sj.fit`` (Adam, float32; the history's ``seconds``) and of the
    two GEMMs ``(Z @ W, Zᵀ @ M)`` jitted by XLA on the same ``Z``, interleaved round by round;
    NumPy's (OpenBLAS) floor beside them."""
    import jax
    import jax.numpy as jnp

    import softmax_jax as sj

    n, d = X.shape
    dev = C.default_device()
    Xf = X.astype(np.float32)
    kw = dict(optimizer="adam", batch_size=batch, l2=1.0 / n, progress=False, device=dev)

    def epoch() -> float:
        return sj.fit(Xf, y, epochs=1, num_classes=k, **kw)[1]["seconds"][0]

    Z = jax.device_put(Xf, dev)
    W = jnp.zeros((d, k), jnp.float32)
    M = jax.device_put(np.random.default_rng(0).normal(size=(n, k)).astype(np.float32), dev)
    floor = jax.jit(lambda Z, W, M: (Z @ W, Z.T @ M))

    def floor_s() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(floor(Z, W, M))
        return time.perf_counter() - t0

    epoch(), floor_s()  # compile
    t_epoch, t_floor = [], []
    for _ in range(rounds):  # interleaved: a load change hits both alike
        t_epoch.append(epoch())
        t_floor.append(floor_s())
    ratio = statistics.median(f / e for f, e in zip(t_floor, t_epoch))
    e_s, f_s = statistics.median(t_epoch), statistics.median(t_floor)
    return {
        "n": n,
        "d": d,
        "k": k,
        "batch": batch,
        "epoch_s": e_s,
        "epoch_samples_per_s": n / e_s,
        "xla_floor_s": f_s,
        "xla_floor_samples_per_s": n / f_s,
        "epoch_vs_floor": ratio,
        "numpy_floor": numpy_floor(n, d, k, rounds),
        "samples": {"epoch": t_epoch, "xla_floor": t_floor},
    }


def numpy_floor(n: int, d: int, k: int, rounds: int) -> dict:
    try:
        with C.NumpyGemmFloor() as nf:
            nf.setup(n, d, k)
            times = nf.time(repeats=rounds)
            median = statistics.median(a + b for a, b in zip(times["gemm1"], times["gemm2"]))
            return {"median_s": median, "info": nf.info}
    except Exception as e:  # noqa: BLE001 - the NumPy floor is a reference, not the target
        return {"error": f"{type(e).__name__}: {e}"}
