"""Benchmark: the fused vocabulary losses beyond cross-entropy against their unfused definitions.

Gradient with respect to ``(Z, W)`` (``jax.value_and_grad``), float32, for:

- ``log_probs``: ``−mean(A · logp) − 0.01 · mean(entropy)`` (a policy-gradient loss with an entropy
  bonus) of ``sj.linear_log_probs(Z, W, tokens)`` against the same from ``log_softmax(Z @ W)``;
- ``kl``, ``reverse_kl``, ``jsd`` (β = 0.5): ``sj.linear_distillation(Z, W, Zt, Wt, labels=y,
  temperature=2, divergence=...)`` against the unfused definition on both ``(N, K)`` logits.

All with default arguments (``chunk_size="auto"``). Two measurements:

- memory: XLA's compiled memory analysis (``temp_size_in_bytes``) at N=8192, D=256, K=32768
  (compile only). Target: fused ≥ 10× below unfused.
- time: median over interleaved rounds of the per-round ratio fused / unfused, after a warm-up,
  ``block_until_ready`` on every call, at the same shape (``--quick``: N=2048, K=8192). Target
  ≤ 1.0. Measure on a quiet machine.

Writes ``vocab.json`` to ``bench/results``. Run: ``python bench/vocab.py [--quick]`` or
``softmax-jax bench --only vocab``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/_bench_package.py makes this folder `bench`
    import _bench_package  # noqa: F401

from bench import _common as C

#: (N, D, K) of the memory and the time measurements.
FULL = {"memory": (8192, 256, 32768), "time": (8192, 256, 32768)}
QUICK = {"memory": (8192, 256, 32768), "time": (2048, 256, 8192)}
TINY = {"memory": (256, 32, 64), "time": (256, 32, 64)}
TEMPERATURE = 2.0
ENTROPY_BONUS = 0.01
TARGET_MEMORY_RATIO = 10.0
TARGET_TIME_RATIO = 1.0
LOSSES = ("log_probs", "kl", "reverse_kl", "jsd")


def _pairs() -> dict[str, tuple[Any, Any]]:
    """``{loss: (fused, unfused)}``, each ``f(Z, W, Zt, Wt, y, adv) -> scalar``."""
    import jax
    import jax.numpy as jnp

    import softmax_jax as sj

    def lp_fused(Z, W, Zt, Wt, y, adv):
        out = sj.linear_log_probs(Z, W, y)
        return -jnp.mean(adv * out.logp) - ENTROPY_BONUS * jnp.mean(out.entropy)

    def lp_unfused(Z, W, Zt, Wt, y, adv):
        lq = jax.nn.log_softmax(Z @ W, axis=-1)
        logp = jnp.take_along_axis(lq, y[:, None], axis=1)[:, 0]
        entropy = -jnp.sum(jnp.exp(lq) * lq, axis=1)
        return -jnp.mean(adv * logp) - ENTROPY_BONUS * jnp.mean(entropy)

    def distill(divergence):
        def fused(Z, W, Zt, Wt, y, adv):
            return sj.linear_distillation(Z, W, Zt, Wt, labels=y, temperature=TEMPERATURE,
                                          divergence=divergence)  # fmt: skip

        def unfused(Z, W, Zt, Wt, y, adv):
            lq = jax.nn.log_softmax(Z @ W / TEMPERATURE, axis=-1)
            lp = jax.nn.log_softmax(jax.lax.stop_gradient(Zt @ Wt) / TEMPERATURE, axis=-1)
            q, p = jnp.exp(lq), jnp.exp(lp)
            if divergence == "kl":
                d = jnp.sum(p * (lp - lq), axis=1)
            elif divergence == "reverse_kl":
                d = jnp.sum(q * (lq - lp), axis=1)
            else:
                lm = jnp.log(0.5 * p + 0.5 * q)
                d = 0.5 * jnp.sum(p * (lp - lm), axis=1) + 0.5 * jnp.sum(q * (lq - lm), axis=1)
            keep = (y != -100).astype(d.dtype)
            return jnp.sum(keep * d) / jnp.maximum(jnp.sum(keep), 1.0)

        return fused, unfused

    return {"log_probs": (lp_fused, lp_unfused),
            **{d: distill(d) for d in ("kl", "reverse_kl", "jsd")}}  # fmt: skip


def _specs(n: int, d: int, k: int):
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32
    return (jax.ShapeDtypeStruct((n, d), f32), jax.ShapeDtypeStruct((d, k), f32),
            jax.ShapeDtypeStruct((n, d), f32), jax.ShapeDtypeStruct((d, k), f32),
            jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), f32))  # fmt: skip


def compiled_temp(loss, specs) -> dict[str, Any]:
    """Temporaries of ``jax.jit(jax.value_and_grad(loss, (0, 1)))`` at ``specs``."""
    import jax

    t0 = time.perf_counter()
    try:
        analysis = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*specs).compile()
        analysis = analysis.memory_analysis()
    except Exception as e:  # a failure at a shape is a result, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return {"temp_bytes": int(analysis.temp_size_in_bytes),
            "compile_s": round(time.perf_counter() - t0, 2)}  # fmt: skip


def bench_memory(n: int, d: int, k: int) -> list[dict[str, Any]]:
    rows = []
    for name, (fused, unfused) in _pairs().items():
        print(f"vocab: memory {name} N={n} D={d} K={k} ...", flush=True)
        f, u = compiled_temp(fused, _specs(n, d, k)), compiled_temp(unfused, _specs(n, d, k))
        ratio = None
        if f.get("temp_bytes") and u.get("temp_bytes"):
            ratio = u["temp_bytes"] / f["temp_bytes"]
        rows.append({"loss": name, "N": n, "D": d, "K": k, "fused": f, "unfused": u,
                     "ratio": ratio})  # fmt: skip
    return rows


def _problem(n: int, d: int, k: int):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(0), 6)
    Z = jax.random.normal(ks[0], (n, d), jnp.float32)
    W = jax.random.normal(ks[1], (d, k), jnp.float32) / jnp.sqrt(d)
    Zt = jax.random.normal(ks[2], (n, d), jnp.float32)
    Wt = 2.0 * jax.random.normal(ks[3], (d, k), jnp.float32) / jnp.sqrt(d)
    y = jax.random.randint(ks[4], (n,), 0, k)
    adv = jax.random.normal(ks[5], (n,), jnp.float32)
    return Z, W, Zt, Wt, y, adv


def bench_time(n: int, d: int, k: int, rounds: int) -> dict[str, Any]:
    """Interleaved rounds: every (loss, fused/unfused) timed once per round."""
    import jax

    args = _problem(n, d, k)
    calls = {}
    for name, pair in _pairs().items():
        for kind, fn in zip(("fused", "unfused"), pair):
            f = jax.jit(jax.value_and_grad(fn, (0, 1)))
            jax.block_until_ready(f(*args))  # compile
            jax.block_until_ready(f(*args))  # warm up
            calls[(name, kind)] = f
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, f in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            samples[key].append(time.perf_counter() - t0)
    rows = []
    for name in _pairs():
        fs, us = samples[(name, "fused")], samples[(name, "unfused")]
        rows.append({"loss": name, "N": n, "D": d, "K": k,
                     "fused_s": statistics.median(fs), "unfused_s": statistics.median(us),
                     "ratio": statistics.median(a / b for a, b in zip(fs, us)),
                     "samples_s": {"fused": fs, "unfused": us}})  # fmt: skip
    return {"rows": rows, "rounds": rounds}


def run(quick: bool = False, *, tiny: bool | None = None, rounds: int | None = None) -> dict:
    """Runs the suite, prints the tables, writes ``vocab.json``."""
    tiny = C.tiny_mode() if tiny is None else tiny
    cfg = TINY if tiny else QUICK if quick else FULL
    rounds = rounds or (2 if tiny else 3 if quick else 5)
    load_before = C.load_average()
    memory = bench_memory(*cfg["memory"])
    timing = bench_time(*cfg["time"], rounds)
    mib = lambda r, key: r[key].get("temp_bytes", float("nan")) / 2**20  # noqa: E731
    mem_rows = [{"loss": r["loss"], "fused MiB": mib(r, "fused"), "unfused MiB": mib(r, "unfused"),
                 "unfused / fused": r["ratio"]} for r in memory]  # fmt: skip
    time_rows = [{"loss": r["loss"], "fused s": r["fused_s"], "unfused s": r["unfused_s"],
                  "fused / unfused": r["ratio"]} for r in timing["rows"]]  # fmt: skip
    n, d, k = cfg["memory"]
    text = C.print_table(
        mem_rows,
        list(mem_rows[0]),
        f"gradient temporaries, N={n} D={d} K={k} (compiled memory analysis)",
    )
    n, d, k = cfg["time"]
    text += C.print_table(
        time_rows,
        list(time_rows[0]),
        f"value_and_grad time, N={n} D={d} K={k}, median of {rounds} rounds",
    )
    full = not tiny and not quick
    targets = {
        "memory_ratio_ge_10": all((r["ratio"] or 0) >= TARGET_MEMORY_RATIO for r in memory),
        "time_ratio_le_1": all(r["ratio"] <= TARGET_TIME_RATIO for r in timing["rows"])
        if full else None,
    }  # fmt: skip
    payload = {"mode": "tiny" if tiny else "quick" if quick else "full", "memory": memory,
               "time": timing, "targets_met": targets, "table_text": text,
               "load_average_before": load_before, "load_average_after": C.load_average(),
               "machine": C.machine_info()}  # fmt: skip
    C.write_json("vocab", payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller timing shape")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        run(args.quick, rounds=args.rounds)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
