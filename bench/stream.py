"""Benchmark: streamed training (``sj.fit(..., stream=True)``) against the in-memory fit.

Two measurements:

- **throughput** on data that fits in memory: the epoch time of ``fit`` with ``stream=False``
  (the whole set on the device, one compiled epoch) and ``stream=True`` (batches gathered on the
  host from a NumPy array and copied ahead of use), run alternately in the same process; the
  ratio is in-memory time / streamed time (the target: >= 0.7). Epoch 1 (compilation) is left out.
- **memory**: one streamed epoch over a float32 ``.npy`` of >= 2 GB opened with
  ``mmap_mode="r"``, written under ``/tmp`` and deleted afterwards; the process's anonymous
  memory (``RssAnon`` of /proc/self/status, sampled every 5 ms in a thread) minus its value before
  the epoch. The target: below a quarter of the file's size (the file's pages are page cache,
  not anonymous memory; what remains is a few chunks of batches in flight).

Run: ``python bench/stream.py [--quick]`` or ``softmax-jax bench --only stream``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/_bench_package.py makes this folder `bench`
    import _bench_package  # noqa: F401

from bench import _common as C

CONFIGS = {
    # throughput: (N, D, K, batch, epochs, rounds); memmap: (N, D, K, batch)
    "full": {"fit": (200_000, 256, 16, 1024, 3, 5), "memmap": (1_050_000, 512, 16, 4096)},
    "quick": {"fit": (50_000, 128, 10, 512, 3, 2), "memmap": (250_000, 256, 10, 2048)},
    "tiny": {"fit": (4_000, 16, 4, 256, 2, 1), "memmap": (20_000, 16, 4, 1024)},
}


def _mode(quick: bool) -> str:
    return "tiny" if C.tiny_mode() else ("quick" if quick else "full")


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_anon(fn) -> tuple[int, int, Any]:
    """``(before, peak, fn())``: RssAnon before ``fn`` and its peak while it runs."""
    before, peak, done = _rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return before, max(peak[0], _rss_anon()), out


def throughput(n: int, d: int, k: int, batch: int, epochs: int, rounds: int) -> dict[str, Any]:
    import numpy as np

    import softmax_jax as sj

    rng = np.random.default_rng(0)
    Z = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, n).astype(np.int32)
    kw = dict(epochs=epochs, batch_size=batch, seed=0, progress=False, num_classes=k)
    times: dict[str, list[float]] = {"memory": [], "stream": []}
    params = {}
    for _ in range(rounds):  # alternately, so that both see the same load
        for name in ("memory", "stream"):
            p, hist = sj.fit(Z, y, stream=name == "stream", **kw)
            times[name].extend(hist["seconds"][1:])  # epoch 1 compiles
            params[name] = np.asarray(p["W"])
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "shape": [n, d, k],
        "batch_size": batch,
        "epoch_s_memory": med["memory"],
        "epoch_s_stream": med["stream"],
        "samples_per_s_memory": n / med["memory"],
        "samples_per_s_stream": n / med["stream"],
        "ratio_stream_vs_memory": med["memory"] / med["stream"],
        "max_abs_W_diff": float(np.max(np.abs(params["memory"] - params["stream"]))),
        "epoch_times": times,
    }


def memmap_epoch(n: int, d: int, k: int, batch: int) -> dict[str, Any]:
    import numpy as np

    import softmax_jax as sj

    need = n * d * 4
    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free
    if free < 2 * need:
        return {"skipped": f"{free / 2**30:.1f} GiB free in {tmp}, {need / 2**30:.1f} GiB needed"}
    path = Path(tempfile.mkdtemp(prefix="sj_stream_", dir=tmp)) / "Z.npy"
    try:
        Zw = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
        rng = np.random.default_rng(0)
        step = max(1, (64 << 20) // (4 * d))
        for i in range(0, n, step):
            Zw[i : i + step] = rng.standard_normal((min(step, n - i), d), np.float32)
        Zw.flush()
        del Zw
        Z = np.load(path, mmap_mode="r")
        y = (np.asarray(Z[:, 0]) > 0).astype(np.int32) + (np.asarray(Z[:, 1]) > 0)
        kw = dict(epochs=1, batch_size=batch, seed=0, progress=False, stream=True, num_classes=k)
        sj.fit(Z[: 4 * batch], y[: 4 * batch], **kw)  # compile first
        t0 = time.perf_counter()
        before, peak, _ = _peak_rss_anon(lambda: sj.fit(Z, y, **kw))
        seconds = time.perf_counter() - t0
        size = path.stat().st_size
        return {
            "shape": [n, d, k],
            "batch_size": batch,
            "file_bytes": size,
            "rss_anon_before": before,
            "rss_anon_peak": peak,
            "rss_anon_growth": peak - before,
            "growth_vs_file": (peak - before) / size,
            "peak_vs_file": peak / size,
            "epoch_s": seconds,
        }
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def run(quick: bool = False) -> dict[str, Any]:
    mode = _mode(quick)
    cfg = CONFIGS[mode]
    print(f"stream ({mode}): streamed vs in-memory epochs, and a streamed epoch over a memmap",
          flush=True)  # fmt: skip
    tp = throughput(*cfg["fit"])
    mm = memmap_epoch(*cfg["memmap"])
    rows = [
        {
            "measure": "epoch (in memory / streamed)",
            "value": f"{C.fmt(tp['epoch_s_memory'])} s / {C.fmt(tp['epoch_s_stream'])} s",
            "ratio": C.fmt(tp["ratio_stream_vs_memory"]),
            "target": ">= 0.7",
        }
    ]
    if "skipped" not in mm:
        rows.append(
            {
                "measure": f"RssAnon growth, {mm['file_bytes'] / 2**30:.2f} GiB memmap",
                "value": f"{mm['rss_anon_growth'] / 2**20:.0f} MiB",
                "ratio": C.fmt(mm["growth_vs_file"]),
                "target": "< 0.25",
            }
        )
    C.print_table(rows, ["measure", "value", "ratio", "target"], title="stream")
    payload = {"mode": mode, "machine": C.machine_info(), "throughput": tp, "memmap": mm}
    C.write_json("stream", payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args(argv).quick)


if __name__ == "__main__":
    main()
