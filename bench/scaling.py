"""Benchmark: how ``value_and_grad`` and one training epoch scale with N and with K.

The work of eq. (6) is two GEMMs, ``4·N·D·K`` flops, plus O(N·K) for the softmax: linear in N
and in K. This suite times ``sj.value_and_grad`` (jitted, float32, integer labels) and one epoch
of ``sj.fit`` (adam, minibatches of 256) as N grows over two decades at fixed D, K, and as K grows
over two decades at fixed N, D; it fits ``log t = a + s·log x`` and reports the slope ``s``
over all points and over the upper half (where fixed per-call costs no longer dominate). A slope
near 1 says the implementation is linear; well above 1 says something scales worse than the
math. At small K the time is not proportional to K even in principle: both GEMMs must read all of
``Z`` (``N·D`` floats) whatever K is, so the slope in K approaches 1 only once the ``N·D·K``
arithmetic outweighs that read (the upper half of the K sweep).

Run: ``python bench/scaling.py [--quick]`` or ``softmax-jax bench --only scaling``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/_bench_package.py makes this folder `bench`
    import _bench_package  # noqa: F401

from bench import _common as C

# (fixed D, fixed K, N values) and (fixed N, fixed D, K values), per mode.
CONFIGS = {
    "full": {
        "n_sweep": (256, 100, [1024 * 2**i for i in range(8)]),  # 1024 .. 131072
        "k_sweep": (8192, 256, [8 * 2**i for i in range(8)]),  # 8 .. 1024
        "repeats": 7,
        "epoch_max_n": 131072,
    },
    "quick": {
        "n_sweep": (128, 32, [512 * 2**i for i in range(8)]),  # 512 .. 65536
        "k_sweep": (4096, 128, [4 * 2**i for i in range(8)]),  # 4 .. 512
        "repeats": 3,
        "epoch_max_n": 65536,
    },
    "tiny": {
        "n_sweep": (16, 4, [128, 256, 512]),
        "k_sweep": (256, 16, [4, 8, 16]),
        "repeats": 2,
        "epoch_max_n": 512,
    },
}
BATCH_SIZE = 256


def loglog_slope(xs: list[float], ts: list[float]) -> float | None:
    """Least-squares slope of ``log t`` against ``log x``."""
    import numpy as np

    if len(xs) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ts), 1)[0])


def _problem(n: int, d: int, k: int, seed: int = 0):
    import jax
    import jax.numpy as jnp

    kz, kw, ky = jax.random.split(jax.random.key(seed), 3)
    Z = jax.random.normal(kz, (n, d), jnp.float32)
    W = jax.random.normal(kw, (d, k), jnp.float32) / jnp.sqrt(d)
    y = jax.random.randint(ky, (n,), 0, k)
    return W, Z, y


def _time_value_and_grad(n: int, d: int, k: int, repeats: int) -> float:
    import jax

    import softmax_jax as sj

    W, Z, y = _problem(n, d, k)
    return C.timeit(jax.jit(sj.value_and_grad), W, Z, y, repeats=repeats, warmup=2)


def _time_epoch(n: int, d: int, k: int, repeats: int) -> float | None:
    """Median wall time of one minibatch epoch of ``sj.fit`` (the compiling first one excluded)."""
    import numpy as np

    import softmax_jax as sj

    _, Z, y = _problem(n, d, k)
    y = np.array(y)
    y[:k] = np.arange(k)  # every class present, so fit infers K
    _, history = sj.fit(
        np.asarray(Z),
        y,
        optimizer="adam",
        epochs=1 + repeats,
        batch_size=BATCH_SIZE,
        progress=False,
        num_classes=k,
    )
    return statistics.median(history["seconds"][1:])


def _sweep(name: str, points: list[tuple[int, int, int]], x_of, repeats: int, epoch_max_n: int):
    rows = []
    for n, d, k in points:
        vg = _time_value_and_grad(n, d, k, repeats)
        epoch = None
        if n <= epoch_max_n:
            epoch = _time_epoch(n, d, k, max(2, repeats // 2))
        row = {
            "sweep": name,
            "N": n,
            "D": d,
            "K": k,
            "value_and_grad_s": vg,
            "gflops": 4.0 * n * d * k / vg / 1e9,
            "epoch_s": epoch,
        }
        rows.append(row)
        print(
            f"  {name}: N={n} D={d} K={k}  value_and_grad {1e3 * vg:.3f} ms"
            + (f"  epoch {1e3 * epoch:.1f} ms" if epoch is not None else ""),
            flush=True,
        )
    xs = [x_of(r) for r in rows]
    fits: dict[str, Any] = {}
    for key in ("value_and_grad_s", "epoch_s"):
        pts = [(x, r[key]) for x, r in zip(xs, rows) if r[key] is not None]
        if len(pts) < 2:
            fits[key] = None
            continue
        upper = pts[len(pts) // 2 :] if len(pts) >= 4 else pts
        fits[key] = {
            "slope_all": loglog_slope(*zip(*pts)),
            "slope_upper_half": loglog_slope(*zip(*upper)),
            "x_range": [pts[0][0], pts[-1][0]],
        }
    return rows, fits


def _plot(results: dict[str, Any]) -> None:
    fig, axes = C.new_figure(1, 2, figsize=(11, 4.2))
    for ax, sweep, xkey in zip(axes, ("n_sweep", "k_sweep"), ("N", "K")):
        rows = results[sweep]["rows"]
        fits = results[sweep]["fits"]
        xs = [r[xkey] for r in rows]
        for key, label, marker in (
            ("value_and_grad_s", "value_and_grad", "o"),
            ("epoch_s", "one epoch of fit (adam, batch 256)", "s"),
        ):
            pts = [(x, r[key]) for x, r in zip(xs, rows) if r[key] is not None]
            if not pts:
                continue
            slope = fits[key]["slope_upper_half"] if fits.get(key) else None
            text = f"{label} (slope {slope:.2f})" if slope is not None else label
            ax.loglog(*zip(*pts), marker=marker, label=text)
        x0, x1 = xs[0], xs[-1]
        t_ref = rows[-1]["value_and_grad_s"]
        ax.loglog([x0, x1], [t_ref * x0 / x1, t_ref], "k:", lw=1, label="slope 1")
        fixed = (
            f"D={rows[0]['D']}, K={rows[0]['K']}"
            if xkey == "N"
            else f"N={rows[0]['N']}, D={rows[0]['D']}"
        )
        ax.set_xlabel(xkey)
        ax.set_ylabel("seconds")
        ax.set_title(f"time vs {xkey} ({fixed})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"softmax_jax scaling, float32, {C.device_kind()}: {C.cpu_model()}", fontsize=9)
    C.save_figure(fig, "scaling")


def run(quick: bool = False, *, tiny: bool | None = None) -> dict:
    """Runs both sweeps, prints the table and slopes, writes ``scaling.json`` and ``.png``."""
    tiny = C.tiny_mode() if tiny is None else tiny
    mode = "tiny" if tiny else "quick" if quick else "full"
    cfg = CONFIGS[mode]
    d, k, ns = cfg["n_sweep"]
    n_fixed, d2, ks = cfg["k_sweep"]
    results: dict[str, Any] = {"config": {"mode": mode, "batch_size": BATCH_SIZE, **cfg}}
    print(f"scaling ({mode}): N sweep at D={d}, K={k}", flush=True)
    rows, fits = _sweep(
        "N", [(n, d, k) for n in ns], lambda r: r["N"], cfg["repeats"], cfg["epoch_max_n"]
    )
    results["n_sweep"] = {"rows": rows, "fits": fits}
    print(f"scaling ({mode}): K sweep at N={n_fixed}, D={d2}", flush=True)
    rows, fits = _sweep(
        "K", [(n_fixed, d2, kk) for kk in ks], lambda r: r["K"], cfg["repeats"], cfg["epoch_max_n"]
    )
    results["k_sweep"] = {"rows": rows, "fits": fits}

    table = []
    for sweep in ("n_sweep", "k_sweep"):
        for key in ("value_and_grad_s", "epoch_s"):
            f = results[sweep]["fits"][key]
            if f is None:
                continue
            table.append(
                {
                    "sweep": "N" if sweep == "n_sweep" else "K",
                    "timed": key.removesuffix("_s"),
                    "range": f"{f['x_range'][0]}..{f['x_range'][1]}",
                    "slope (all)": f["slope_all"],
                    "slope (upper half)": f["slope_upper_half"],
                }
            )
    results["table"] = table
    results["table_text"] = C.print_table(table, list(table[0]), title="log-log slopes")
    _plot(results)
    C.write_json("scaling", results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    args = parser.parse_args(argv)
    run(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
