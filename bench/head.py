"""Benchmark: the fused head ``linear_cross_entropy`` against the unfused loss and jax-cce.

``value_and_grad`` with respect to ``(Z, W)`` of the mean cross-entropy of ``softmax(Z W)``,
float32, integer labels, for three methods:

- ``head``     ``sj.linear_cross_entropy(Z, W, y, chunk_size=1024)``;
- ``head_default`` ``sj.linear_cross_entropy(Z, W, y)`` (``chunk_size="auto"``);
- ``unfused``  ``optax.softmax_cross_entropy_with_integer_labels(Z @ W, y).mean()`` (autodiff);
- ``jax_cce``  ``jax_cce.linear_cross_entropy(Z, Wt, y)`` (PyPI ``jax-cce``, vocabulary chunks of
               4096, its default), given ``Wt`` in its own ``(K, D)`` layout so no transpose is
               charged to it. Skipped if not installed; a failure at a shape is recorded.

Three measurements:

- memory: XLA's compiled memory analysis (``temp_size_in_bytes``: the temporaries, not inputs or
  outputs) at N=16384, D=1024, K in {32768, 131072} and a ragged K=32771, compile only (no array
  is allocated). On CPU it is also measured with XLA's YNNPACK library fusions off: their scratch
  memory is invisible to the analysis, so that column is the honest upper bound.
- time: median of interleaved rounds after a warm-up, ``block_until_ready`` on every call, at
  N=4096, D=512, K=8192; ratios against ``unfused`` from the same round.
- a chunk-size sweep of the head: memory at the memory shape, time at the time shape;
- a language-model row (``lm``): N=8192 tokens, D=1024, K=50257 (GPT-2's vocabulary), float32,
  the head with *default* arguments (``chunk_size="auto"``; also the tied ``(K, D)`` layout,
  memory only) against ``unfused`` and ``jax_cce``: compiled memory and time (few rounds: each
  call is ~1.7 TFLOP on this CPU). ``--lm-only`` runs just this row and merges it into the
  existing ``head.json``.

Writes ``head.json`` and ``head_memory.png`` (memory against K) to ``bench/results``.
Run: ``python bench/head.py [--quick]`` or ``softmax-jax bench --only head``.
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

METHODS = ("head", "head_default", "unfused", "jax_cce")
CHUNK = 1024
#: A smaller chunk, in the memory table and plot only: the knob for large K.
SMALL_CHUNK = 256
#: (N, D, [K...]) for memory, (N, D, K) for time, chunk sizes for the sweep.
FULL = {
    "memory": (16384, 1024, [32768, 131072], 32771),
    "time": (4096, 512, 8192),
    "sweep": [256, 512, 1024, 2048, 4096],
    "lm": (8192, 1024, 50257),
}
QUICK = {
    "memory": (4096, 512, [8192, 32768], 8195),
    "time": (2048, 256, 4096),
    "sweep": [256, 512, 1024, 2048],
    "lm": (2048, 256, 8192),
}
TINY = {
    "memory": (256, 32, [64, 128], 67),
    "time": (256, 32, 64),
    "sweep": [64, 256],
    "lm": (256, 32, 67),
}
#: Timed rounds of the LM row (each call is long; the machine is shared).
LM_ROUNDS = {"full": 3, "quick": 3, "tiny": 2}
#: Issue 3's targets at the full memory shape (K=32768) and time shape.
TARGET_MEMORY_RATIO = 15.0
TARGET_TIME_RATIO = 1.0
#: CPU compiler option that turns XLA's YNNPACK library fusions off (see the module docstring).
NO_LIBRARY_FUSION = {"xla_cpu_experimental_ynn_fusion_type": ""}
GB = 1e9


def _head_fn():
    from softmax_jax import linear_cross_entropy

    return linear_cross_entropy


def _losses(small_chunk: bool = False) -> dict[str, Any]:
    """``name -> (loss(Z, W_or_Wt, y), weight layout)``; jax-cce only if it is installed."""
    import optax

    head = _head_fn()
    out = {
        "head": (lambda Z, W, y: head(Z, W, y, chunk_size=CHUNK), "DK"),
        "head_default": (lambda Z, W, y: head(Z, W, y), "DK"),
        "unfused": (
            lambda Z, W, y: optax.softmax_cross_entropy_with_integer_labels(Z @ W, y).mean(),
            "DK",
        ),
    }
    if small_chunk:
        out[f"head_c{SMALL_CHUNK}"] = (lambda Z, W, y: head(Z, W, y, chunk_size=SMALL_CHUNK), "DK")
    try:
        import jax_cce
    except ImportError:
        return out
    out["jax_cce"] = (lambda Z, Wt, y: jax_cce.linear_cross_entropy(Z, Wt, y), "KD")
    return out


def _specs(n: int, d: int, k: int, layout: str):
    import jax
    import jax.numpy as jnp

    w_shape = (d, k) if layout == "DK" else (k, d)
    return (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct(w_shape, jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )


def compiled_memory(loss, specs, options: dict | None = None) -> dict[str, Any]:
    """Temporaries of ``jax.jit(jax.value_and_grad(loss, (0, 1)))`` at ``specs``, compile only."""
    import jax

    t0 = time.perf_counter()
    try:
        lowered = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*specs)
        analysis = lowered.compile(compiler_options=options or None).memory_analysis()
    except Exception as e:  # a peer failing at a shape is a result, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    if analysis is None:
        return {"error": "no memory analysis on this backend"}
    return {
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "compile_s": round(time.perf_counter() - t0, 2),
    }


def bench_memory(n: int, d: int, ks: list[int]) -> list[dict[str, Any]]:
    cpu = C.device_kind() == "cpu"
    rows = []
    for k in ks:
        for name, (loss, layout) in _losses(small_chunk=True).items():
            print(f"head: memory {name} N={n} D={d} K={k} ...", flush=True)
            chunk = {"head": CHUNK, f"head_c{SMALL_CHUNK}": SMALL_CHUNK}.get(name)
            row = {"method": name, "N": n, "D": d, "K": k, "chunk": chunk}
            row.update(compiled_memory(loss, _specs(n, d, k, layout)))
            if cpu:
                nolib = compiled_memory(loss, _specs(n, d, k, layout), NO_LIBRARY_FUSION)
                row["temp_bytes_no_library_fusion"] = nolib.get("temp_bytes")
            rows.append(row)
    return rows


def _problem(n: int, d: int, k: int, seed: int = 0):
    import jax
    import jax.numpy as jnp

    kz, kw, ky = jax.random.split(jax.random.key(seed), 3)
    Z = jax.random.normal(kz, (n, d), jnp.float32)
    W = jax.random.normal(kw, (d, k), jnp.float32) / jnp.sqrt(d)
    y = jax.random.randint(ky, (n,), 0, k)
    return Z, W, jnp.asarray(W.T), y  # jax-cce's (K, D) copy made once, outside the timing


def bench_time(fns: dict[str, Any], n: int, d: int, k: int, rounds: int) -> dict[str, Any]:
    """Interleaved rounds: each round times every method once (load drifts hit all alike)."""
    import jax

    Z, W, Wt, y = _problem(n, d, k)
    calls, errors = {}, {}
    for name, (loss, layout) in fns.items():
        f = jax.jit(jax.value_and_grad(loss, (0, 1)))
        args = (Z, W if layout == "DK" else Wt, y)
        try:
            jax.block_until_ready(f(*args))  # compile
            jax.block_until_ready(f(*args))  # warm up
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            continue
        calls[name] = (f, args)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (f, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            samples[name].append(time.perf_counter() - t0)
    return {"samples_s": samples, "errors": errors}


def _ratio_stats(samples: dict[str, list[float]], base: str) -> dict[str, float]:
    """Median over rounds of the per-round ratio to ``base``."""
    return {
        name: statistics.median(a / b for a, b in zip(s, samples[base]))
        for name, s in samples.items()
    }


def _lm_losses() -> dict[str, Any]:
    """The LM row's methods: the head with default arguments (both layouts), unfused, jax-cce."""
    head = _head_fn()
    base = _losses()
    out = {
        "head_default": (lambda Z, W, y: head(Z, W, y), "DK"),
        "head_default_kd": (lambda Z, Wt, y: head(Z, Wt, y, weight_layout="kd"), "KD"),
        "unfused": base["unfused"],
    }
    if "jax_cce" in base:
        out["jax_cce"] = base["jax_cce"]
    return out


def bench_lm(n: int, d: int, k: int, rounds: int) -> dict[str, Any]:
    """Compiled memory of every LM method, then interleaved timing (the kd variant: memory)."""
    fns = _lm_losses()
    memory = []
    for name, (loss, layout) in fns.items():
        print(f"head: LM memory {name} N={n} D={d} K={k} ...", flush=True)
        memory.append({"method": name, "N": n, "D": d, "K": k,
                       **compiled_memory(loss, _specs(n, d, k, layout))})  # fmt: skip
    timed = {name: f for name, f in fns.items() if name != "head_default_kd"}
    print(f"head: LM time, {rounds} rounds ...", flush=True)
    timing = bench_time(timed, n, d, k, rounds)
    samples = timing["samples_s"]
    ratios = _ratio_stats(samples, "unfused") if "unfused" in samples else {}
    return {"shape": {"N": n, "D": d, "K": k}, "rounds": rounds, "memory": memory,
            "time": {"samples_s": samples, "ratio_vs_unfused_median": ratios,
                     "errors": timing["errors"]}}  # fmt: skip


def _lm_table(lm: dict[str, Any]) -> str:
    shape = lm["shape"]
    by = {r["method"]: r for r in lm["memory"]}
    unf = by.get("unfused", {}).get("temp_bytes")
    samples, ratios = lm["time"]["samples_s"], lm["time"]["ratio_vs_unfused_median"]
    rows = []
    for name, r in by.items():
        temp = r.get("temp_bytes")
        rows.append({
            "method": name,
            "GB": temp / GB if temp is not None else r.get("error", "-"),
            "unfused / this": unf / temp if unf and temp else "-",
            "median s": statistics.median(samples[name]) if name in samples else "-",
            "time vs unfused": ratios.get(name, "-"),
        })  # fmt: skip
    for name, err in lm["time"]["errors"].items():
        rows.append({"method": name, "median s": err})
    title = (f"language-model row N={shape['N']}, D={shape['D']}, K={shape['K']}, float32, "
             f"value_and_grad wrt (Z, W), {lm['rounds']} rounds")  # fmt: skip
    return C.print_table(rows, list(rows[0]), title=title)


def run_lm_only(quick: bool = False, *, tiny: bool | None = None) -> dict:
    """Runs only the LM row and merges it into the existing ``head.json``."""
    import json

    tiny = C.tiny_mode() if tiny is None else tiny
    cfg = TINY if tiny else QUICK if quick else FULL
    mode = "tiny" if tiny else "quick" if quick else "full"
    lm = bench_lm(*cfg["lm"], LM_ROUNDS[mode])
    lm["machine"] = C.machine_info()
    text = _lm_table(lm)
    path = C.results_dir() / f"{C.result_name('head')}.json"
    payload = json.loads(path.read_text()) if path.exists() else {"config": {}}
    payload.pop("suite", None)
    payload["lm"] = lm
    payload["lm_table_text"] = text
    C.write_json("head", payload)
    return payload


def _plot(rows: list[dict[str, Any]], ks: list[int], n: int, d: int) -> None:
    fig, ax = C.new_figure(figsize=(6, 4))
    labels = {"head": f"head, chunk {CHUNK}", f"head_c{SMALL_CHUNK}": f"head, chunk {SMALL_CHUNK}"}
    for name in (*METHODS, f"head_c{SMALL_CHUNK}"):
        pts = [
            (r["K"], r["temp_bytes"] / GB)
            for r in rows
            if r["method"] == name and r["K"] in ks and "temp_bytes" in r
        ]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=labels.get(name, name))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (classes)")
    ax.set_ylabel("temporaries of value_and_grad (GB)")
    ax.set_title(f"value_and_grad temporaries (compiled), N={n}, D={d}, float32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    C.save_figure(fig, "head_memory")


def run(quick: bool = False, *, tiny: bool | None = None, rounds: int | None = None) -> dict:
    """Runs the suite, prints the tables, writes ``head.json`` and ``head_memory.png``."""
    tiny = C.tiny_mode() if tiny is None else tiny
    cfg = TINY if tiny else QUICK if quick else FULL
    rounds = rounds or (3 if tiny else 5 if quick else 11)
    (mn, md, mks, ragged), (tn, td, tk) = cfg["memory"], cfg["time"]

    memory = bench_memory(mn, md, [*mks, ragged])
    timing = bench_time(_losses(), tn, td, tk, rounds)
    head = _head_fn()
    sweep_fns = {
        f"chunk {c}": ((lambda c: lambda Z, W, y: head(Z, W, y, chunk_size=c))(c), "DK")
        for c in cfg["sweep"]
    }
    sweep_time = bench_time({**sweep_fns, "unfused": _losses()["unfused"]}, tn, td, tk, rounds)
    sweep = []
    for c in cfg["sweep"]:
        print(f"head: memory sweep chunk {c} ...", flush=True)
        mem = compiled_memory(sweep_fns[f"chunk {c}"][0], _specs(mn, md, mks[0], "DK"))
        sweep.append({"chunk": c, "N": mn, "D": md, "K": mks[0], **mem})

    # Tables.
    by = {(r["method"], r["K"]): r for r in memory}
    mem_rows = []
    for k in [*mks, ragged]:
        unf = by.get(("unfused", k), {}).get("temp_bytes")
        for name in (*METHODS, f"head_c{SMALL_CHUNK}"):
            r = by.get((name, k))
            if r is None:
                continue
            temp = r.get("temp_bytes")
            mem_rows.append(
                {
                    "N,D,K": f"{mn},{md},{k}",
                    "method": name if r["chunk"] is None else f"head (chunk {r['chunk']})",
                    "GB": temp / GB if temp is not None else r.get("error", "-"),
                    "GB no lib-fusion": (r.get("temp_bytes_no_library_fusion") or 0) / GB or "-",
                    "unfused / this": unf / temp if unf and temp else "-",
                }
            )
    text = C.print_table(
        mem_rows, list(mem_rows[0]), title="temporaries of value_and_grad (compiled, GB = 1e9 B)"
    )

    samples = timing["samples_s"]
    ratios = _ratio_stats(samples, "unfused") if "unfused" in samples else {}
    time_rows = [
        {
            "method": name,
            "N,D,K": f"{tn},{td},{tk}",
            "median ms": 1e3 * statistics.median(s),
            "best ms": 1e3 * min(s),
            "ratio vs unfused": ratios.get(name, "-"),
            "best/best": min(s) / min(samples["unfused"]) if "unfused" in samples else "-",
        }
        for name, s in samples.items()
    ] + [{"method": name, "median ms": err} for name, err in timing["errors"].items()]
    text += "\n" + C.print_table(
        time_rows,
        list(time_rows[0]),
        title=f"value_and_grad time, {rounds} interleaved rounds (ratio: median of per-round ratios)",
    )

    sw_samples = sweep_time["samples_s"]
    sw_ratios = _ratio_stats(sw_samples, "unfused") if "unfused" in sw_samples else {}
    sweep_rows = [
        {
            "chunk": s["chunk"],
            f"GB at K={mks[0]}": s["temp_bytes"] / GB if "temp_bytes" in s else s.get("error"),
            f"ms at {tn},{td},{tk}": 1e3 * statistics.median(sw_samples[f"chunk {s['chunk']}"])
            if f"chunk {s['chunk']}" in sw_samples
            else "-",
            "time vs unfused": sw_ratios.get(f"chunk {s['chunk']}", "-"),
        }
        for s in sweep
    ]
    text += "\n" + C.print_table(sweep_rows, list(sweep_rows[0]), title="chunk-size sweep (head)")

    mode = "tiny" if tiny else "quick" if quick else "full"
    lm = bench_lm(*cfg["lm"], LM_ROUNDS[mode])
    lm_text = _lm_table(lm)
    text += "\n" + lm_text

    _plot(memory, mks, mn, md)

    targets = {}
    hd, unf = by.get(("head", mks[0]), {}), by.get(("unfused", mks[0]), {})
    cce = by.get(("jax_cce", mks[0]), {})
    if "temp_bytes" in hd and "temp_bytes" in unf:
        targets["memory_vs_unfused"] = unf["temp_bytes"] / hd["temp_bytes"] >= TARGET_MEMORY_RATIO
    if "temp_bytes" in hd and "temp_bytes" in cce:
        targets["memory_below_jax_cce"] = hd["temp_bytes"] < cce["temp_bytes"]
    if "head" in ratios:
        targets["time_vs_unfused"] = ratios["head"] <= TARGET_TIME_RATIO
    payload = {
        "config": {
            "quick": quick,
            "tiny": tiny,
            "rounds": rounds,
            "dtype": "float32",
            "reduction": "mean",
            "grad_wrt": ["Z", "W"],
            "head_chunk": CHUNK,
            "memory_shape": {"N": mn, "D": md, "K": [*mks, ragged]},
            "time_shape": {"N": tn, "D": td, "K": tk},
            "targets": {"memory_ratio": TARGET_MEMORY_RATIO, "time_ratio": TARGET_TIME_RATIO},
            "note": "targets are defined at the full shapes; --quick/tiny only exercise the code",
        },
        "memory": memory,
        "time": {
            "samples_s": samples,
            "ratio_vs_unfused_median": ratios,
            "errors": timing["errors"],
        },
        "sweep": {
            "memory": sweep,
            "time_samples_s": sw_samples,
            "ratio_vs_unfused_median": sw_ratios,
        },
        "lm": lm,
        "lm_table_text": lm_text,
        "targets_met": targets,
        "table_text": text,
        "machine": C.machine_info(),
    }
    C.write_json("head", payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--lm-only", action="store_true", help="only the language-model row")
    args = parser.parse_args(argv)
    try:
        if args.lm_only:
            run_lm_only(args.quick)
        else:
            run(args.quick, rounds=args.rounds)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
