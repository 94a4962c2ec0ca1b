"""scikit-learn's fits for bench/train.py, in a child process with the OpenBLAS knobs unset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any


def sklearn_worker() -> None:  # ``python bench/train.py --sklearn-worker``: JSON lines
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_info

    from bench.train import C_REG, accuracy, dataset, objective

    data = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "load":
            data = dataset(msg["spec"])
            with warnings.catch_warnings():  # warm up thread pools and allocators
                warnings.simplefilter("ignore", ConvergenceWarning)
                LogisticRegression(max_iter=20).fit(data[0][:500], data[1][:500])
            reply: dict[str, Any] = {"ok": True}
        elif msg["cmd"] == "fit":
            Xtr, ytr, Xte, yte = data
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                t0 = time.perf_counter()
                m = LogisticRegression(C=C_REG, tol=msg["tol"], max_iter=100_000).fit(Xtr, ytr)
                seconds = time.perf_counter() - t0
            reply = {
                "tol": msg["tol"],
                "seconds": seconds,
                "n_iter": int(m.n_iter_[0]),
                "objective": objective(m.coef_, m.intercept_, Xtr, ytr),
                "test_accuracy": accuracy(m.coef_, m.intercept_, Xte, yte),
            }
        else:  # info
            reply = {
                "env": {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
                "blas": [
                    {
                        k: p.get(k)
                        for k in ("internal_api", "version", "num_threads", "architecture")
                    }
                    for p in threadpool_info()
                ],
            }
        print(json.dumps(reply), flush=True)


class SklearnProcess:
    """scikit-learn in a child process started with the OpenBLAS knobs unset; ``fit(tol)``."""

    def __enter__(self) -> SklearnProcess:
        env = dict(os.environ)
        for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
            env.pop(var, None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve().with_name("train.py")),
                "--sklearn-worker",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        return self

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the scikit-learn process died (exit {self.proc.poll()})")
        return json.loads(line)

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
