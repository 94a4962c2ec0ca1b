"""Where Newton-CG's time goes: the counts of one ``SoftmaxRegression`` fit and the cost of each
operation of its loop alone, on bench/train.py's synthetic problem (issue 18's profile table).

    python tools/profile_solve.py                 # 200000 x 256 x 20, tol 3e-5 (the bench's)
    python tools/profile_solve.py --n 50000 --tol 1e-5

Prints, for N/8, N/4, N/2 and N rows, the warm fit's time (minimum of 3), Newton iterations and Hessian-vector
products (the growth in N), then each operation jitted alone on the N rows (minimum of 5 runs):
the objective and gradient in both precisions, the softmax and diagonal of the Hessian, the
Hessian-vector product on the row-major and the transposed float32 operand, and the two-GEMM
floor. Multiply the counts by the costs to account for the fit. Run it on a quiet machine; for
NumPy-free timings the OpenBLAS variables do not matter.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

import softmax_jax as sj  # noqa: E402
from bench.train import synthetic  # noqa: E402
from softmax_jax import _objective as O  # noqa: E402
from softmax_jax._placement import place  # noqa: E402
from softmax_jax._solvers import solve  # noqa: E402


def best_ms(fn, *args, rounds: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def fits(X, y, tol: float) -> None:
    n_max, d = X.shape
    k = int(y.max()) + 1
    print(f"{'rows':>8} {'fit_s':>7} {'iters':>5} {'HVPs':>5}")
    for n in (n_max // 8, n_max // 4, n_max // 2, n_max):
        model = sj.SoftmaxRegression(C=1.0, tol=tol).fit(X[:n], y[:n])  # compiles
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model.fit(X[:n], y[:n])
            times.append(time.perf_counter() - t)
        seconds = min(times)
        data = place(X[:n], y[:n], None, fit_intercept=True, dtype=np.float64, device=None)
        p0 = {"W": np.zeros((d, k)), "b": np.zeros(k)}
        res = solve(data, p0, solver="newton-cg", l2=1.0 / n, tol=tol, max_iter=100,
                    mixed_precision=True)  # fmt: skip
        print(f"{n:8d} {seconds:7.3f} {res.n_iter:5d} {res.n_inner:5d}")


def operations(X, y) -> None:
    n, d = X.shape
    k = int(y.max()) + 1
    data = place(X, y, None, fit_intercept=True, dtype=np.float64, device=None)
    Z32 = data.Z.astype(jnp.float32)
    rows32 = data._replace(Z=Z32)
    cols32 = data._replace(Z=O.transposed(data.Z, jnp.float32))
    rng = np.random.default_rng(1)
    p64 = {"W": jnp.asarray(rng.normal(size=(d, k)) * 0.1), "b": jnp.zeros(k)}
    V64 = {"W": jnp.asarray(rng.normal(size=(d, k))), "b": jnp.asarray(rng.normal(size=k))}
    p32, V32 = (jax.tree.map(lambda a: a.astype(jnp.float32), t) for t in (p64, V64))
    l2_32, l2 = np.float32(1.0 / n), 1.0 / n
    P = jax.jit(O.hessian_probs)(p32, rows32)  # (N, K), and stored transposed for Columns
    Pc = jax.jit(O.hessian_probs)(p32, cols32)
    hvp = jax.jit(lambda p, v, d, P: O.hessian_vp(p, v, d, l2_32, probs=P))
    diag = jax.jit(lambda p, d, P: O.hessian_diag(p, d, l2_32, probs=P))
    vg = jax.jit(O.objective_vg)
    ops = {
        "objective + gradient, float32 (transposed)": (vg, (p32, cols32, l2_32)),
        "objective + gradient, float64": (vg, (p64, data, l2)),
        "softmax for the Hessian, float32 (transposed)": (jax.jit(O.hessian_probs), (p32, cols32)),
        "Hessian diagonal, float32 (transposed)": (diag, (p32, cols32, Pc)),
        "Hessian diagonal, float32 (row-major)": (diag, (p32, rows32, P)),
        "HVP, float32 (transposed)": (hvp, (p32, V32, cols32, Pc)),
        "HVP, float32 (row-major)": (hvp, (p32, V32, rows32, P)),
        "two-GEMM floor Z @ V, Z^T @ R, float32": (
            jax.jit(lambda Z, V, R: (Z @ V, Z.T @ R)), (Z32, V32["W"], P)),
        "cast and transpose of Z to float32": (
            jax.jit(lambda Z: O.transposed(Z, jnp.float32)), (data.Z,)),
    }  # fmt: skip
    for name, (fn, args) in ops.items():
        print(f"{name:48s} {best_ms(fn, *args):8.1f} ms", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--tol", type=float, default=3e-5)
    args = parser.parse_args(argv)
    X, y = synthetic(args.n, args.d, args.k)
    print(f"{args.n} x {args.d} x {args.k}, tol {args.tol}, load {os.getloadavg()}")
    fits(X, y, args.tol)
    operations(X, y)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
