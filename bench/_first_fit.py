"""Fast from the first call: fits timed in fresh processes (a section of bench/train.py).

Every measurement runs in a new Python process (``python bench/train.py --first-fit-worker JOB``),
ours and scikit-learn interleaved round by round:

- **small datasets** (scikit-learn's iris, wine, breast_cancer, digits; raw features, all rows):
  the first ``SoftmaxRegression(C=1, tol=t)`` fit in a fresh process with a *cold* persistent
  compilation cache (an emptied temporary directory) and with a *warm* one (the next process),
  then the median of later fits in that process; scikit-learn's ``LogisticRegression(C=1, tol=t)``
  likewise. ``t`` is each library's loosest tolerance of ``TOLS`` whose objective is within 1e-6
  (relative) of the optimum ``f*`` (the lowest objective either reached, explored in one process
  per library).
- **GridSearchCV** over ``C ∈ logspace(−3, 3, 7)``, ``cv=5``, on a ``StandardScaler`` pipeline, in
  a fresh process with a warm cache (a first process warms it), two ways:

  - *at equal accuracy* (the protocol of the other measurements): each library at its loosest
    ``tol`` of ``TOLS`` whose 35 fits (7 ``C`` × 5 folds, the folds ``GridSearchCV`` makes) all
    end within 1e-6 (relative) of their optimum (the lowest objective either reached, explored
    in one process per library; scikit-learn with ``max_iter`` raised so that ``tol`` decides);
  - *at the defaults* (``tol`` 1e-9 here, 1e-4 and ``max_iter=100`` in scikit-learn), with the
    largest relative gap to the optimum that each library's default fits leave.
- **the large synthetic problem** of the time-to-optimum table: the first fit in a fresh process,
  cold and warm, against scikit-learn's fit in a fresh process, each at the tolerance the main table
  found for it.

Our processes see ``SOFTMAX_JAX_COMPILATION_CACHE`` set to a temporary directory (the user's cache
is never touched); scikit-learn's run with ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` unset.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from bench._common import OPENBLAS_VARS, sklearn_objective

SMALL = ("iris", "wine", "breast_cancer", "digits")
GRID_C = [10.0**e for e in range(-3, 4)]
TARGET_REL = 1e-6
CACHE_ENV = "SOFTMAX_JAX_COMPILATION_CACHE"
#: ``max_iter`` of the fits at a given ``tol``: high enough that ``tol`` decides where they stop.
MAX_ITER = {"sklearn": 100_000, "ours": 500}


# ---------------------------------------------------------------------------------------------
# The child process.


def _load(data: dict):
    if "small" in data:
        from sklearn import datasets

        return getattr(datasets, f"load_{data['small']}")(return_X_y=True)
    from bench.train import dataset

    Xtr, ytr, _, _ = dataset(data["spec"])
    return Xtr, ytr


def _estimator(lib: str, **kw):
    if lib == "ours":
        from softmax_jax import SoftmaxRegression

        return SoftmaxRegression(**kw)
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(**kw)


def _objective(est, X, y, C: float) -> float:
    """scikit-learn's objective of a fitted estimator (:func:`bench._common.sklearn_objective`)."""
    return sklearn_objective(est.coef_, est.intercept_, X, y, C)


def _grid_explore(job: dict, X, y) -> list[dict]:
    """The fits of ``GridSearchCV``'s grid (every ``C``, every fold of ``cv=5``, standardised
    as the pipeline does) at the defaults and at each ``tol``: their objectives."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    fits = []
    for C in GRID_C:
        for train, _ in StratifiedKFold(5).split(X, y):
            Xt, yt = StandardScaler().fit_transform(X[train]), y[train]
            fit = {
                "C": C,
                "default": _objective(_estimator(job["lib"], C=C).fit(Xt, yt), Xt, yt, C),
            }
            fit["runs"] = [
                _objective(_estimator(job["lib"], C=C, tol=t, max_iter=job["max_iter"]).fit(Xt, yt),
                           Xt, yt, C)
                for t in job["tols"]
            ]  # fmt: skip
            fits.append(fit)
    return fits


def worker(job: dict) -> dict:
    """One job in this fresh process: ``fit`` (first and later fits), ``grid`` or ``explore``."""
    t0 = time.perf_counter()
    import numpy as np

    if job["lib"] == "ours":
        import softmax_jax  # noqa: F401 - the import is part of a fresh process's cost
    else:
        import sklearn.linear_model  # noqa: F401
    import_s = time.perf_counter() - t0
    X, y = _load(job["data"])
    _, y = np.unique(y, return_inverse=True)
    out: dict[str, Any] = {"import_s": import_s}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if job["task"] == "grid_explore":
            out["fits"] = _grid_explore(job, X, y)
        elif job["task"] == "explore":
            out["runs"] = []
            for tol in job["tols"]:
                est = _estimator(job["lib"], C=job["C"], tol=tol, max_iter=job["max_iter"])
                est.fit(X, y)
                out["runs"].append({"tol": tol, "objective": _objective(est, X, y, job["C"])})
        elif job["task"] == "fit":
            times = []
            for _ in range(1 + job["later"]):
                est = _estimator(job["lib"], C=job["C"], tol=job["tol"], max_iter=job["max_iter"])
                t = time.perf_counter()
                est.fit(X, y)
                times.append(time.perf_counter() - t)
            out.update(first_fit_s=times[0], later_fit_s=times[1:], n_iter=int(est.n_iter_[0]))
            out["objective"] = _objective(est, X, y, job["C"])
        else:  # grid
            from sklearn.model_selection import GridSearchCV
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            pipe = make_pipeline(StandardScaler(), _estimator(job["lib"], **job.get("params", {})))
            step = pipe.steps[-1][0]
            grid = GridSearchCV(pipe, {f"{step}__C": GRID_C}, cv=5)
            t = time.perf_counter()
            grid.fit(X, y)
            out.update(grid_s=time.perf_counter() - t, best_C=grid.best_params_[f"{step}__C"])
            out["best_score"] = float(grid.best_score_)
    return out


# ---------------------------------------------------------------------------------------------
# The parent.


class Spawner:
    """Starts one worker process per job: ours with the cache in a temporary directory,
    scikit-learn with the OpenBLAS knobs unset."""

    def __init__(self, script: Path):
        self.script = script
        self.cache = Path(tempfile.mkdtemp(prefix="softmax_jax_bench_cache_"))

    def clear_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir()

    def run(self, job: dict) -> dict:
        env = dict(os.environ)
        if job["lib"] == "ours":
            env[CACHE_ENV] = str(self.cache)
        else:
            for var in OPENBLAS_VARS:
                env.pop(var, None)
        time.sleep(0.3)  # let the previous process's threads go quiet
        out = subprocess.run(
            [sys.executable, str(self.script), "--first-fit-worker", json.dumps(job)],
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if out.returncode != 0:
            raise RuntimeError(f"first-fit worker failed on {job}: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)


def _loosest_tol(runs: list[dict], f_star: float) -> float | None:
    return next(
        (r["tol"] for r in runs if (r["objective"] - f_star) / abs(f_star) <= TARGET_REL), None
    )


def bench_small(sp: Spawner, name: str, *, tols, rounds: int, later: int) -> dict:
    """First and later fits of one small dataset, cold and warm, against scikit-learn."""
    data = {"small": name}
    explore = {
        lib: sp.run(dict(lib=lib, data=data, task="explore", C=1.0, tols=list(tols),
                         max_iter=MAX_ITER[lib]))["runs"]
        for lib in ("ours", "sklearn")
    }  # fmt: skip
    f_star = min(r["objective"] for runs in explore.values() for r in runs)
    tol = {lib: _loosest_tol(runs, f_star) for lib, runs in explore.items()}
    res: dict[str, Any] = {"f_star": f_star, "tol": tol, "explore": explore, "rounds": []}
    for _ in range(rounds):
        row = {}
        for lib, cache in (("ours", "cold"), ("ours", "warm"), ("sklearn", None)):
            if cache == "cold":
                sp.clear_cache()
            job = dict(lib=lib, data=data, task="fit", C=1.0, tol=tol[lib] or 1e-10, later=later,
                       max_iter=MAX_ITER[lib])  # fmt: skip
            row[lib if cache is None else f"ours_{cache}"] = sp.run(job)
        res["rounds"].append(row)
    first = {k: min(r[k]["first_fit_s"] for r in res["rounds"]) for k in res["rounds"][0]}
    later_s = {
        k: statistics.median(t for r in res["rounds"] for t in r[k]["later_fit_s"])
        for k in ("ours_warm", "sklearn")
    }
    res["summary"] = {
        "first_fit_cold_s": first["ours_cold"],
        "first_fit_warm_s": first["ours_warm"],
        "sklearn_first_fit_s": first["sklearn"],
        "later_fit_s": later_s["ours_warm"],
        "sklearn_later_fit_s": later_s["sklearn"],
        "later_ratio": later_s["ours_warm"] / later_s["sklearn"],
    }
    return res


def _grid_tolerances(data: dict, sp: Spawner, tols) -> dict:
    """Each library's loosest ``tol`` whose grid fits all reach 1e-6 of their optimum, and the
    largest gap its default fits leave (:func:`_grid_explore`)."""
    fits = {lib: sp.run(dict(lib=lib, data=data, task="grid_explore", tols=list(tols),
                             max_iter=MAX_ITER[lib]))["fits"]
            for lib in ("ours", "sklearn")}  # fmt: skip
    f_star = [min(min(f["runs"]) for f in (fo, fs)) for fo, fs in zip(*fits.values())]
    out: dict[str, Any] = {"tol": {}, "max_gap_default": {}, "max_gap": {}}
    for lib, fs in fits.items():
        gaps = [[(v - f) / abs(f) for v in fit["runs"]] for fit, f in zip(fs, f_star)]
        worst = [max(g[i] for g in gaps) for i in range(len(tols))]
        out["max_gap"][lib] = dict(zip(map(str, tols), worst))
        out["tol"][lib] = next((t for t, w in zip(tols, worst) if w <= TARGET_REL), None)
        out["max_gap_default"][lib] = max(
            (fit["default"] - f) / abs(f) for fit, f in zip(fs, f_star)
        )
    return out


def bench_grid(sp: Spawner, name: str, *, tols, rounds: int) -> dict:
    """GridSearchCV on a StandardScaler pipeline, ours (warm cache) against scikit-learn: at equal
    accuracy (each at its :func:`_grid_tolerances`) and at the defaults, interleaved."""
    data = {"small": name}
    res: dict[str, Any] = _grid_tolerances(data, sp, tols)
    params = {
        lib: {"tol": res["tol"][lib] or min(tols), "max_iter": MAX_ITER[lib]}
        for lib in ("ours", "sklearn")
    }
    sp.run(dict(lib="ours", data=data, task="grid"))  # warms the cache for the folds' shapes
    runs: dict[str, list] = {"ours": [], "sklearn": [], "ours_eq": [], "sklearn_eq": []}
    for _ in range(rounds):
        for key in runs:
            lib = key.removesuffix("_eq")
            job = dict(lib=lib, data=data, task="grid", params=params[lib] if "_eq" in key else {})
            runs[key].append(sp.run(job))
    best = {key: min(r["grid_s"] for r in rs) for key, rs in runs.items()}
    res.update(runs=runs, grid_s=best, params=params)
    res["ratio"] = best["ours"] / best["sklearn"]
    res["ratio_eq"] = best["ours_eq"] / best["sklearn_eq"]
    return res


def bench_large(sp: Spawner, spec: dict, tol: dict, *, rounds: int) -> dict:
    """The first fit of the large synthetic problem in a fresh process, cold and warm cache, and
    scikit-learn's, interleaved over ``rounds`` rounds (the cache cleared at each): each one's
    fastest round is reported (the machine's speed drifts between processes), all are kept."""
    data = {"spec": spec}
    runs: dict[str, list] = {"ours_cold": [], "ours_warm": [], "sklearn": []}
    for _ in range(rounds):
        sp.clear_cache()
        for key, lib in (("ours_cold", "ours"), ("ours_warm", "ours"), ("sklearn", "sklearn")):
            job = dict(lib=lib, data=data, task="fit", C=1.0, tol=tol[lib], later=0,
                       max_iter=100_000 if lib == "sklearn" else 200)  # fmt: skip
            runs[key].append(sp.run(job))
    out: dict[str, Any] = {k: min(v, key=lambda r: r["first_fit_s"]) for k, v in runs.items()}
    sk = out["sklearn"]["first_fit_s"]
    out["ratio_cold"] = out["ours_cold"]["first_fit_s"] / sk
    out["ratio_warm"] = out["ours_warm"]["first_fit_s"] / sk
    out["rounds"] = runs
    return out


def run(script: Path, *, quick: bool, tiny: bool, tols, large: tuple | None, load_average):
    """The section: small datasets, GridSearchCV, the large problem; with load averages."""
    names = SMALL[:1] if tiny else (SMALL[:2] if quick else SMALL)
    rounds = 1 if (tiny or quick) else 3
    sp = Spawner(script)
    results: dict[str, Any] = {"load_average_before": load_average()}
    try:
        results["small"] = {
            n: bench_small(sp, n, tols=tols, rounds=rounds, later=3 if tiny else 5) for n in names
        }
        results["grid_search"] = {n: bench_grid(sp, n, tols=tols, rounds=rounds) for n in names}
        if large is not None:
            results["large"] = bench_large(sp, *large, rounds=rounds)
    finally:
        sp.close()
    results["load_average_after"] = load_average()
    return results


def table_rows(results: dict) -> list[dict]:
    rows = []
    for name, r in results["small"].items():
        s, g = r["summary"], results["grid_search"][name]
        rows.append({
            "dataset": name,
            "first_cold_s": s["first_fit_cold_s"],
            "first_warm_s": s["first_fit_warm_s"],
            "sk_first_s": s["sklearn_first_fit_s"],
            "later_s": s["later_fit_s"],
            "sk_later_s": s["sklearn_later_fit_s"],
            "later_ratio": round(s["later_ratio"], 3),
            "grid_eq_s": g["grid_s"]["ours_eq"],
            "sk_grid_eq_s": g["grid_s"]["sklearn_eq"],
            "grid_eq_ratio": round(g["ratio_eq"], 3),
            "grid_tols": f"{g['tol']['ours']:g} / {g['tol']['sklearn']:g}"
            if None not in g["tol"].values() else "-",
            "grid_default_ratio": round(g["ratio"], 3),
            "default_gaps": f"{g['max_gap_default']['ours']:.0e} / "
            f"{g['max_gap_default']['sklearn']:.0e}",
        })  # fmt: skip
    if "large" in results:
        lg = results["large"]
        rows.append({
            "dataset": "large synthetic",
            "first_cold_s": lg["ours_cold"]["first_fit_s"],
            "first_warm_s": lg["ours_warm"]["first_fit_s"],
            "sk_first_s": lg["sklearn"]["first_fit_s"],
            "later_s": "-", "sk_later_s": "-",
            "later_ratio": f"cold {lg['ratio_cold']:.2f}, warm {lg['ratio_warm']:.2f}",
            "grid_eq_s": "-", "sk_grid_eq_s": "-", "grid_eq_ratio": "-", "grid_tols": "-",
            "grid_default_ratio": "-", "default_gaps": "-",
        })  # fmt: skip
    return rows


COLUMNS = ["dataset", "first_cold_s", "first_warm_s", "sk_first_s", "later_s", "sk_later_s",
           "later_ratio", "grid_eq_s", "sk_grid_eq_s", "grid_eq_ratio", "grid_tols",
           "grid_default_ratio", "default_gaps"]  # fmt: skip


def _sec(x: float) -> str:
    return f"{x:.3g}" if x >= 0.1 else f"{x:.2g}"


def _tol(t: float) -> str:
    return f"{t:.0e}".replace("e-0", "e-")


def readme_table(results: dict, large: str) -> str:
    """The README's fresh-process table (Markdown) from the ``first_fit`` section of a JSON
    written by :func:`run` (``train.json`` or ``train_first_fit.json``); ``large`` names the
    large problem's row."""
    lines = [
        "| dataset | first fit, cold / warm cache | `LogisticRegression` first fit "
        "| later fits, ours / sklearn | `GridSearchCV` at equal accuracy, ours / sklearn (`tol`s) "
        "| `GridSearchCV` at the defaults |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["small"].items():
        s, g = r["summary"], results["grid_search"][name]
        t, gs = g["tol"], g["grid_s"]
        tols = f"; {_tol(t['ours'])} / {_tol(t['sklearn'])}" if None not in t.values() else ""
        lines.append(
            f"| {name} | {_sec(s['first_fit_cold_s'])} / {_sec(s['first_fit_warm_s'])} s "
            f"| {_sec(s['sklearn_first_fit_s'])} s "
            f"| {_sec(s['later_fit_s'])} / {_sec(s['sklearn_later_fit_s'])} s "
            f"| {_sec(gs['ours_eq'])} / {_sec(gs['sklearn_eq'])} s ({g['ratio_eq']:.2f}×{tols}) "
            f"| {_sec(gs['ours'])} / {_sec(gs['sklearn'])} s ({g['ratio']:.2f}×) |"
        )
    if "large" in results:
        lg = results["large"]
        lines.append(
            f"| {large} | {_sec(lg['ours_cold']['first_fit_s'])} / "
            f"{_sec(lg['ours_warm']['first_fit_s'])} s | {_sec(lg['sklearn']['first_fit_s'])} s "
            f"| | | ({lg['ratio_cold']:.2f}× cold, {lg['ratio_warm']:.2f}× warm) |"
        )
    return "\n".join(lines)
