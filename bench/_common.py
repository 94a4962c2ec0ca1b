"""Shared benchmark helpers: machine facts, timing, tables, JSON results and plots.

Every timing follows the same protocol: compile/warm up first, ``jax.block_until_ready`` on every
call, the median of several repeats, and ratios only against baselines measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Where results go unless ``--out`` (or ``SOFTMAX_JAX_BENCH_OUT``) says otherwise.
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
OUT_ENV = "SOFTMAX_JAX_BENCH_OUT"
#: OpenBLAS knobs some images set for old CPUs; they change which GEMM kernel NumPy runs.
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
TINY_ENV = "SOFTMAX_JAX_BENCH_TINY"


def sklearn_objective(coef, intercept, X, y, C: float) -> float:
    """scikit-learn's objective ``½‖coef‖² + C Σ NLL`` in float64, for its ``coef_`` ``(K, D)``
    and ``intercept_`` (binary: one row, the softmax with ``w_1 − w_0 = coef``, its symmetric
    optimum); ``X`` dense or scipy.sparse."""
    import numpy as np

    penalty = 0.5 * float(np.sum(coef**2))
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-1, 1]) * intercept / 2
    A = np.asarray(X @ coef.T) + intercept
    m = A.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(A - m).sum(axis=1, keepdims=True)))[:, 0]
    return penalty + C * float(np.sum(lse - A[np.arange(len(y)), y]))


def tiny_mode() -> bool:
    """``$SOFTMAX_JAX_BENCH_TINY=1``: the smallest shapes, seconds per suite (for tests)."""
    return os.environ.get(TINY_ENV, "") not in ("", "0")


def results_dir() -> Path:
    """The output folder: ``$SOFTMAX_JAX_BENCH_OUT`` if set, else ``bench/results``."""
    out = os.environ.get(OUT_ENV)
    return Path(out) if out else DEFAULT_RESULTS_DIR


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_simd_flags() -> list[str]:
    """The vector extensions the CPU reports (they decide which GEMM kernels can run)."""
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in wanted if x in have] + sorted(
                        x for x in have if x.startswith("amx")
                    )
    except OSError:
        pass
    return []


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def default_device():
    """The device computations land on: ``jax_default_device`` if set, else the first device."""
    import jax

    dev = jax.config.jax_default_device
    if isinstance(dev, str):
        return jax.devices(dev)[0]
    return dev if dev is not None else jax.devices()[0]


def select_device(name: str | None) -> None:
    """Makes the first ``name`` (``"cpu"``/``"gpu"``) device JAX's default device."""
    if name:
        import jax

        jax.config.update("jax_default_device", jax.devices(name)[0])


def device_kind() -> str:
    """``"cpu"`` or ``"gpu"`` (or another JAX platform name) of the device in use."""
    return default_device().platform


def machine_info() -> dict[str, Any]:
    """The facts a result needs to be read: CPU, cores, device, versions, date, OpenBLAS knobs."""
    import jax

    dev = default_device()
    return {
        "cpu_model": cpu_model(),
        "cpu_simd": cpu_simd_flags(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "optax", "numpy", "softmax-jax", "scikit-learn")
        },
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": load_average(),
        "env": {var: os.environ.get(var) for var in (*OPENBLAS_VARS, "XLA_FLAGS")},
    }


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: other work on the machine skews every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _block(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def time_samples(
    fn: Callable[..., Any], *args: Any, repeats: int = 7, warmup: int = 2
) -> list[float]:
    """Seconds per call of ``fn(*args)``, ``repeats`` samples after ``warmup`` untimed calls.

    The first warm-up call compiles; every call, warm-up included, is waited for with
    ``jax.block_until_ready`` so asynchronous dispatch never leaks into the next sample.
    """
    for _ in range(max(warmup, 1)):
        _block(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn(*args))
        samples.append(time.perf_counter() - t0)
    return samples


def timeit(fn: Callable[..., Any], *args: Any, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds per call of ``fn(*args)`` (see :func:`time_samples`)."""
    return statistics.median(time_samples(fn, *args, repeats=repeats, warmup=warmup))


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.{digits}f}" if abs(x) < 10 else f"{x:.{max(digits - 2, 1)}f}"
        return f"{x:.{digits}g}"
    return str(x)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """Prints ``rows`` (dicts) as an aligned text table over ``columns``; returns the text."""
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def result_name(suite: str, device: str | None = None) -> str:
    """``grad`` on CPU, ``grad_gpu`` on a GPU: CPU and GPU results live side by side."""
    device = device or device_kind()
    return suite if device == "cpu" else f"{suite}_{device}"


def write_json(suite: str, payload: dict[str, Any], *, out_dir: Path | None = None) -> Path:
    """Writes ``payload`` (plus ``machine`` info if absent) to ``<out>/<suite>[_gpu].json``."""
    out = Path(out_dir) if out_dir is not None else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    payload = {"suite": suite, **payload}
    payload.setdefault("machine", machine_info())
    path = out / f"{result_name(suite)}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def _jsonable(x: Any) -> Any:
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(x)


def new_figure(*args: Any, **kwargs: Any):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, suite: str, *, out_dir: Path | None = None) -> Path:
    """Saves ``fig`` as ``<out>/<suite>[_gpu].png`` and closes it."""
    import matplotlib.pyplot as plt

    out = Path(out_dir) if out_dir is not None else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result_name(suite)}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return path


# --------------------------------------------------------------------------------------------
# The NumPy (OpenBLAS) two-GEMM floor, in a child process.
#
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are read by OpenBLAS once, when NumPy is first imported,
# and pin it to a kernel (often an old, slower one). The benchmark wants the machine's real
# floor, so the NumPy timings run in a child process started with both variables removed from
# its environment -- for the benchmark only: tests and CI never touch them. The child answers
# one JSON line per command on stdin, so its timings interleave with the JAX ones round by round.
# --------------------------------------------------------------------------------------------


def _numpy_worker() -> None:  # runs in the child: ``python bench/_common.py --numpy-worker``
    import sys

    import numpy as np

    arrays: dict[str, Any] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "info":
            from threadpoolctl import threadpool_info

            reply: dict[str, Any] = {
                "numpy": np.__version__,
                "env": {var: os.environ.get(var) for var in OPENBLAS_VARS},
                "threadpool_info": threadpool_info(),
            }
        elif cmd == "setup":
            n, d, k = msg["n"], msg["d"], msg["k"]
            rng = np.random.default_rng(msg.get("seed", 0))
            arrays = {
                "Z": rng.standard_normal((n, d), dtype=np.float32),
                "W": rng.standard_normal((d, k), dtype=np.float32),
                "M": rng.standard_normal((n, k), dtype=np.float32),
                "A": np.empty((n, k), np.float32),
                "G": np.empty((d, k), np.float32),
            }
            for _ in range(msg.get("warmup", 2)):
                np.matmul(arrays["Z"], arrays["W"], out=arrays["A"])
                np.matmul(arrays["Z"].T, arrays["M"], out=arrays["G"])
            reply = {"ok": True}
        elif cmd == "time":
            from threadpoolctl import threadpool_limits

            Z, W, M, A, G = (arrays[x] for x in "ZWMAG")
            t1, t2 = [], []
            with threadpool_limits(limits=msg.get("threads"), user_api="blas"):
                for _ in range(msg.get("repeats", 1)):
                    t0 = time.perf_counter()
                    np.matmul(Z, W, out=A)
                    t_mid = time.perf_counter()
                    np.matmul(Z.T, M, out=G)
                    t_end = time.perf_counter()
                    t1.append(t_mid - t0)
                    t2.append(t_end - t_mid)
            if msg.get("threads") != 1:
                # OpenBLAS's idle threads spin for ~0.1 s before they sleep: let them settle so
                # they do not steal the cores from whatever the parent times next.
                time.sleep(0.25)
            reply = {"gemm1": t1, "gemm2": t2}
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(reply), flush=True)


def start_worker(script: str | Path, flag: str, *, unset_openblas_env: bool = True):
    """``python script flag`` as a child speaking JSON lines on stdin/stdout (text mode), with
    ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` unset for it only: NumPy and scikit-learn are timed
    with OpenBLAS's own choice of kernels."""
    import subprocess
    import sys

    env = dict(os.environ)
    if unset_openblas_env:
        for var in OPENBLAS_VARS:
            env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, str(Path(script).resolve()), flag],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )


class NumpyGemmFloor:
    """A child process timing NumPy's ``Z @ W`` and ``Zᵀ M`` with the OpenBLAS knobs unset.

    Use as a context manager: ``setup(n, d, k)``, then ``time(repeats)`` ->
    ``{"gemm1": [...], "gemm2": [...]}`` seconds per call; ``info`` describes the BLAS that ran
    (threadpoolctl) and the environment the child saw.
    """

    def __init__(self, *, unset_openblas_env: bool = True):
        self.unset_openblas_env = unset_openblas_env
        self.proc = None
        self.info: dict[str, Any] = {}

    def __enter__(self) -> NumpyGemmFloor:
        self.proc = start_worker(
            __file__, "--numpy-worker", unset_openblas_env=self.unset_openblas_env
        )
        self.info = self._ask({"cmd": "info"})
        self.info["openblas_env_unset_for_numpy"] = self.unset_openblas_env
        self.info["openblas_env_of_parent"] = {v: os.environ.get(v) for v in OPENBLAS_VARS}
        return self

    def _ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the NumPy timing process died (exit {self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def setup(self, n: int, d: int, k: int, *, seed: int = 0, warmup: int = 2) -> None:
        self._ask({"cmd": "setup", "n": n, "d": d, "k": k, "seed": seed, "warmup": warmup})

    def time(self, repeats: int = 1, *, threads: int | None = None) -> dict[str, list[float]]:
        """Seconds per GEMM call; ``threads`` limits OpenBLAS's threads (None: its default)."""
        return self._ask({"cmd": "time", "repeats": repeats, "threads": threads})

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # the child's loop ends at end of input
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--numpy-worker"]:
        _numpy_worker()
    else:
        print(json.dumps(machine_info(), indent=2))
