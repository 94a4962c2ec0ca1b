"""Shared test helpers: tolerances per dtype, random problems, the programs a call compiles."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax._check import TOLERANCES, random_problem
from softmax_jax._check import _rng as host_rng  # noqa: F401  (NumPy draws from a JAX key)

# Relative tolerances (normwise, against a float64 reference on the same rounded inputs).
#  float64: unit roundoff 1.1e-16; sums over N and the cancellation in Ŷ − Y lose a few digits,
#           1e-12 is what the derivation must hold to (the issue asks ~1e-12).
#  float32: unit roundoff 6e-8; sums over N ≤ 10^3 samples of terms O(1): 1e-5 leaves margin.
#  bfloat16 / float16: unit roundoff 3.9e-3 / 4.9e-4; the residual Ŷ − Y is rounded to the narrow
#           dtype before the second GEMM (accumulated in float32): a few roundoffs, 2e-2 / 5e-3.
# The same numbers as sj.check_grad's defaults (one table).
RTOL = {jnp.dtype(name): tol for name, tol in TOLERANCES.items()}


def host_normal(rng, dtype):
    """``normal(shape, scale=1.0)``: standard normal draws from the NumPy generator ``rng`` (see
    :func:`host_rng`), scaled and rounded to ``dtype``, as a JAX array."""

    def normal(shape, scale=1.0):
        return jnp.asarray((scale * rng.standard_normal(shape)).astype(dtype))

    return normal


def rel_err(x, ref) -> float:
    """``max |x − ref| / max |ref|`` in float64 (0 when both are zero)."""
    x = np.asarray(x).astype(np.float64)  # on the host: float64 whether or not x64 is on
    ref = np.asarray(ref).astype(np.float64)
    err = float(np.max(np.abs(x - ref))) if x.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return err / scale if scale > 0 else err


def assert_close(x, ref, dtype=jnp.float64, rtol=None) -> None:
    """Asserts a normwise relative error below the tolerance for ``dtype`` (or ``rtol``)."""
    tol = RTOL[jnp.dtype(dtype)] if rtol is None else rtol
    err = rel_err(x, ref)
    assert np.all(np.isfinite(np.asarray(x).astype(np.float64))), "non-finite values"
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e} ({jnp.dtype(dtype).name})"


def problem(key, n, d, k, labels="integer", weighted=False, scale=1.0, dtype=jnp.float64):
    """A random problem ``(W, Z, Y, weights)``: the generator of ``sj.check_grad``'s suite
    (:func:`softmax_jax._check.random_problem`), drawn in float64 and rounded to ``dtype``.

    labels: "integer" (N,), "one-hot", "soft" (rows on the simplex) or "unnormalised" (rows with
    arbitrary positive sums). float64 needs the ``x64`` marker.
    """
    return random_problem(key, n, d, k, labels, weighted, scale, dtype)


def _f64(x):
    return None if x is None else np.asarray(x).astype(np.float64)


def numpy_reference(W, Z, Y, weights=None, reduction="sum"):
    """Eq. (2) and eq. (6) in plain float64 NumPy on the host: ``(value, ∂L/∂W, per-sample ℓ)``.

    Works on the (already rounded) inputs of any dtype whether or not x64 is on, so float32,
    bfloat16 and float16 results are checked against float64 in the default configuration.
    """
    W, Z, s = _f64(W), _f64(Z), _f64(weights)
    A = Z @ W
    m = A.max(axis=1, keepdims=True)
    E = np.exp(A - m)
    S = E.sum(axis=1, keepdims=True)
    P = E / S
    lse = (m + np.log(S))[:, 0]
    Y = np.asarray(Y)
    T = np.eye(W.shape[1])[Y] if Y.ndim == 1 else Y.astype(np.float64)
    per = lse - np.sum(T * A, axis=1)
    s = np.ones(len(per)) if s is None else s
    c = s / (s.sum() if s.sum() > 0 else 1.0) if reduction == "mean" else s
    value = {"none": s * per, "sum": np.sum(s * per), "mean": np.sum(c * per)}[reduction]
    G = Z.T @ (c[:, None] * (P - T))
    return value, G, per


def numpy_hvp(W, Z, V, weights=None, reduction="sum"):
    """The Hessian of eq. (2) along ``V`` in float64 NumPy: ``Zᵀ diag(c) [P ∘ ZV − P ∘ rowsum(P ∘ ZV)]``."""
    W, Z, V, s = _f64(W), _f64(Z), _f64(V), _f64(weights)
    A = Z @ W
    P = np.exp(A - A.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    ZV = Z @ V
    R = P * ZV - P * np.sum(P * ZV, axis=1, keepdims=True)
    s = np.ones(Z.shape[0]) if s is None else s
    c = s / s.sum() if reduction == "mean" else s
    return Z.T @ (c[:, None] * R)


def device_env(devices: int) -> dict:
    """This process's environment for a subprocess on the CPU with ``devices`` forced devices,
    keeping the suite's ``$XLA_FLAGS`` (tests/conftest.py)."""
    forced = f"--xla_force_host_platform_device_count={devices}"
    flags = " ".join([os.environ.get("XLA_FLAGS", ""), forced]).strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def run_device_worker(script, *, devices: int = 8, timeout: float = 300) -> dict:
    """Runs ``script`` in a fresh interpreter with ``devices`` forced CPU devices and returns the
    JSON of its ``RESULT {json}`` line (its stderr tail on a non-zero exit)."""
    proc = subprocess.run([sys.executable, str(script)], env=device_env(devices),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-8000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@contextlib.contextmanager
def compiled_programs() -> Iterator[list[str]]:
    """The names (``"jit(f)"``) of the programs XLA compiles inside the ``with`` block, appended
    to the yielded list as they are compiled."""
    names: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
