"""Scale-out: the class-sharded head on 1-8 devices, data-parallel fit, and 2 processes.

This pytest session already initialised jax with one CPU device, so the multi-device checks run in
fresh interpreters (``tests/_dist_worker.py``) started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; each prints one JSON result that the tests
below assert on. The checks are grouped into few subprocesses because each pays the jax import
(~3 s) and its compilations.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _dist_worker import KILL_AT, KILL_CODE, MP_FIT, mp_problem, single_process_reference
from helpers import assert_close, device_env
from jax.sharding import Mesh

# Private paths until __init__ re-exports these names.
from softmax_jax._head import linear_cross_entropy
from softmax_jax._parallel import sharded_linear_cross_entropy

# Exactness checks against float64 references: x64 on for this module (scoped, see conftest).
pytestmark = pytest.mark.x64

WORKER = Path(__file__).with_name("_dist_worker.py")
TIMEOUT = 240  # seconds per worker process: generous for a loaded 2-core machine

# float64 against the unfused single-device reference: the sums over the class shards are
# associated differently from one logsumexp over all K (a few roundoffs), far below this.
EXACT = 1e-10


def _result(stdout: str) -> dict:
    """The ``RESULT {json}`` line of a worker (gloo prints its own lines on stdout)."""
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"no RESULT line in the worker's output:\n{stdout[-4000:]}")


def _run_worker(*args: str, devices: int) -> dict:
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args],
        env=device_env(devices),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, (
        f"worker {args} failed:\n{proc.stdout[-4000:]}{proc.stderr[-8000:]}"
    )
    return _result(proc.stdout)


@pytest.fixture(scope="module")
def devices_run(tmp_path_factory) -> dict:
    # A 4-device mesh run killed during epoch KILL_AT; the devices run resumes it.
    ckpt = tmp_path_factory.mktemp("mesh_ckpt")
    proc = subprocess.run(
        [sys.executable, str(WORKER), "mesh-kill", str(ckpt)],
        env=device_env(4), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == KILL_CODE, f"mesh-kill: {proc.stdout[-4000:]}{proc.stderr[-8000:]}"
    return _run_worker("devices", str(ckpt), devices=8)


@pytest.fixture(scope="module")
def sharded_run(devices_run) -> dict:
    return devices_run["sharded"]


@pytest.fixture(scope="module")
def fit_run(devices_run) -> dict:
    return devices_run["fit"]


# --------------------------------------------------------------------------------------------
# The class-sharded head on forced CPU devices.
# --------------------------------------------------------------------------------------------


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
@pytest.mark.parametrize(
    "case",
    [
        "all_options_mean_p1",
        "all_options_sum_p2",
        "all_options_mean_p4",
        "all_options_mean_p8",
        "none_nobias_p4",
        "data2_model4",
    ],
)
def test_sharded_head_matches_unfused_reference(sharded_run, case):
    """Value and gradients (Z, W, b, weights) equal the single-device unfused float64 loss."""
    got = sharded_run["cases"][case]
    bad = {k: v for k, v in got["err"].items() if not v <= EXACT}
    assert not bad, f"{case}: relative errors above {EXACT:.0e}: {bad}"
    assert got["dW_shape"] == [6, 24]
    if not case.endswith("p1"):  # the gradient of W stays sharded like W
        assert got["dW_spec"] == "P(None, 'model')"


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
def test_sharded_head_never_gathers_w(sharded_run):
    assert sharded_run["devices"] == 8
    assert sharded_run["all_gather_in_hlo"] is False


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
def test_sharded_head_temporaries_shrink(sharded_run):
    """Compiled per-device temporaries of value_and_grad on 4 devices ≤ ¼ of 1 device × 1.1.

    What shrinks as 1/P: the ``(chunk, K/P)`` logits, the ``(chunk, K/P/4)`` residual block and the
    ``(D, K/P)`` gradient accumulator. What does not: the ``(N, D)`` partial of ∂L/∂Z summed across
    devices and ``(N,)`` row vectors; at N=2048, D=128, K=16384 they are ~1% of the 4-device figure
    without chunks and ~5% with chunks of 256 rows (N·D·4 B = 1 MiB of ~6.7 MiB): 10% margin.
    """
    mem = sharded_run["memory"]["temp_bytes"]
    for chunk in ("None", "256"):
        one, four = mem[f"chunk{chunk}_p1"], mem[f"chunk{chunk}_p4"]
        assert four <= 0.25 * 1.1 * one, f"chunk {chunk}: {four} B on 4 devices vs {one} B on 1"
    assert mem["chunk256_p8"] < mem["chunk256_p4"]


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
@pytest.mark.parametrize(
    "name, kind, match",
    [
        (
            "k_not_divisible",
            "ValueError",
            r"divisible by the 4 devices of mesh axis 'model'.*K = 10",
        ),
        ("n_not_divisible", "ValueError", r"`Z` must have a number of rows N divisible by the 2"),
        (
            "bad_axis",
            "ValueError",
            r"`axis_name` must be an axis of `mesh` \('model',\), got 'vocab'",
        ),
        ("not_a_mesh", "TypeError", r"`mesh` must be a jax.sharding.Mesh, got list"),
    ],
)
def test_sharded_head_errors(sharded_run, name, kind, match):
    msg = sharded_run["errors"][name]
    assert msg is not None, f"{name}: no error raised"
    assert msg.startswith(kind + ": "), msg
    assert re.search(match, msg), msg


def test_sharded_head_one_device_in_session(getkey):
    """On this session's single device the sharded head is the head (and its errors are eager)."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    kz, kw, kb, ky = (getkey() for _ in range(4))
    Z = jax.random.normal(kz, (9, 4), jnp.float64)
    W = jax.random.normal(kw, (4, 6), jnp.float64)
    b = jax.random.normal(kb, (6,), jnp.float64)
    y = jax.random.randint(ky, (9,), 0, 6)

    def f(fn, **kw):
        return jax.value_and_grad(lambda Z, W, b: fn(Z, W, y, bias=b, label_smoothing=0.1, **kw),
                                  argnums=(0, 1, 2))(Z, W, b)  # fmt: skip

    (v, g), (rv, rg) = (
        f(sharded_linear_cross_entropy, mesh=mesh, chunk_size=4),
        f(linear_cross_entropy),
    )
    assert_close(v, rv)
    for x, r in zip(g, rg):
        assert_close(x, r)
    with pytest.raises(ValueError, match=r"`axis_name` must be an axis of `mesh`"):
        sharded_linear_cross_entropy(Z, W, y, mesh=mesh, axis_name="data")
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, K\)"):
        sharded_linear_cross_entropy(Z, W, y + 6, mesh=mesh)


HEAD_WORKER = Path(__file__).with_name("_head_worker.py")


@pytest.fixture(scope="module")
def heads_run() -> dict:
    proc = subprocess.run(
        [sys.executable, str(HEAD_WORKER), "heads"],
        env=device_env(8),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"head worker failed:\n{proc.stdout[-4000:]}{proc.stderr[-8000:]}"
    return _result(proc.stdout)


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
@pytest.mark.parametrize(
    "case",
    [f"{m}_{r}" for m in ("Mesh_p4", "make_mesh_p4", "make_mesh_data2_model4") for r in ("mean", "none")],
)  # fmt: skip
def test_sharded_head_equals_the_head_on_every_option(heads_run, case):
    """On a Mesh, a jax.make_mesh mesh (explicit axes) and a data x model mesh, with leading
    dims, -100 padding, a weight-0 out-of-range row, the tied (K, D) layout, softcap, smoothing,
    z-loss, bias, weights and aux: the single-device head's values, gradients and aux."""
    got = heads_run["options"][case]
    assert got["finite"]
    assert got["err"].pop("predictions_equal") is True
    bad = {k: v for k, v in got["err"].items() if not v <= EXACT}
    assert not bad, f"{case}: relative errors above {EXACT:.0e}: {bad}"
    assert got["dE_spec"].startswith("P('model'")  # the (K, D) gradient stays sharded like E


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
def test_plain_head_with_class_sharded_w(heads_run):
    """W sharded over classes, known at trace time (explicit mesh under jit, a concrete array on
    an automatic mesh): the plain head runs the class-sharded kernel; same values, per-device
    temporaries ≤ ½ of one device's on 4 devices (N=8192, D=256, K=65536, compiled)."""
    got = heads_run["plain_sharded"]
    for name, err in got["err"].items():
        assert err <= EXACT, (name, err)
        assert got[f"{name}_dW_spec"] == "P(None, 'model')"
    mem = got["memory"]
    assert mem["four_devices_per_device"] <= 0.5 * mem["one_device"], mem
    # Data parallel: each device's temporaries are those of one device running the call on its
    # local rows (the all-reduce of dW adds at most a dW-sized buffer: W is (256, 65536) here).
    dw_bytes = 256 * 65536 * 4
    assert mem["data_parallel_per_device"] <= mem["one_device_local_rows"] + dw_bytes, mem


MATRIX = Path(__file__).with_name("_mesh_matrix.py")
sys.path.insert(0, str(MATRIX.parent))
import _mesh_matrix  # noqa: E402

MATRIX_CASES = _mesh_matrix.cases(_mesh_matrix.DEFAULT_COUNT)


@pytest.fixture(scope="module")
def matrix_run() -> dict:
    proc = subprocess.run(
        [sys.executable, str(MATRIX)],
        env=device_env(8),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"matrix failed:\n{proc.stdout[-4000:]}{proc.stderr[-8000:]}"
    return _result(proc.stdout)


@pytest.mark.multiprocess  # runs in a subprocess (8 host devices)
@pytest.mark.parametrize("index", range(len(MATRIX_CASES)))
def test_head_on_every_mesh_and_sharding(matrix_run, index):
    """The generated matrix (tests/_mesh_matrix.py): mesh kind (jax.make_mesh explicit, Auto
    axes, a legacy Mesh) × sharding (rows, the sequence axis, replicated on the mesh, FSDP W,
    vocabulary-sharded W and bias, 2-D data × model, inside the user's shard_map) × layout ×
    reduction × option × gradients asked for: float32 values and gradients equal one device's
    (rtol 1e-5), gradients sharded like their inputs (explicit axes, where types carry them)."""
    case = MATRIX_CASES[index]
    name = "-".join(str(v) for v in case.values()) + f"-{index}"
    got = matrix_run[name]
    assert "error" not in got, f"{name}: {got.get('error')}"
    assert got["err"] <= 1e-5, (name, got)
    assert got["specs_ok"], (name, got["specs"])


def _one_device_problem(getkey, n=9, d=4, k=6):
    Z = jax.random.normal(getkey(), (n, d), jnp.float64)
    W = jax.random.normal(getkey(), (d, k), jnp.float64)
    b = jax.random.normal(getkey(), (k,), jnp.float64)
    y = jax.random.randint(getkey(), (n,), 0, k)
    return Z, W, b, y


def test_sharded_head_skips_gradients_nobody_asked_for(getkey):
    """A frozen W (grad w.r.t. Z only) costs one GEMM fewer, as in the single-device head."""
    mesh = jax.make_mesh((1,), ("model",))
    Z, W, b, y = _one_device_problem(getkey)

    def f(Z, W):
        return sharded_linear_cross_entropy(Z, W, y, mesh=mesh, chunk_size=4)

    def dots(argnums):
        return str(jax.make_jaxpr(jax.grad(f, argnums))(Z, W)).count("dot_general")

    assert dots(0) < dots((0, 1)) and dots(1) < dots((0, 1))
    ref = jax.grad(lambda Z: linear_cross_entropy(Z, W, y), 0)(Z)
    assert_close(jax.jit(jax.grad(f, 0))(Z, W), ref)


# --------------------------------------------------------------------------------------------
# Data-parallel fit.
# --------------------------------------------------------------------------------------------

# float64: each step's gradient is summed across devices in another order than on one device
# (roundoff ~1e-16 relative), and a few epochs of adam carry that forward almost unchanged.
FIT_RTOL = 1e-9


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
@pytest.mark.parametrize(
    "case",
    [
        "adam_b64_make_mesh_p2",
        "adam_b30_weights_eval_p4",
        "sgd_b20_p8",
        "lbfgs_p4",
        "stream_adam_b30_weights_eval_p4",
        "stream_sgd_b20_p8",
    ],
)
def test_data_parallel_fit_matches_one_device(fit_run, case):
    """Same seed, same final params and losses with the batch split over 2, 4 or 8 devices,
    including batch sizes that do not divide the device count (zero-weight padding), from rows
    split over the mesh or streamed from the host."""
    got = fit_run["cases"][case]
    assert got["err"] <= FIT_RTOL, got
    if "loss_err" in got:
        assert got["loss_err"] <= FIT_RTOL, got
        assert got["W_spec"] == "P()"  # W replicated on every device of the mesh
        assert got["W_devices"] == int(case[-1])


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
def test_mesh_checkpoint_kill_and_resume(devices_run):
    """A 4-device mesh run killed during epoch KILL_AT resumes from its last checkpoint and ends
    where the uninterrupted run ends."""
    got, ref = devices_run["mesh_resume"], single_process_reference()
    assert got["epochs_run"] == list(range(KILL_AT, MP_FIT["epochs"] + 1))
    for name in ("W", "b", "loss"):
        assert_close(np.asarray(got[name]), np.asarray(ref[name]), rtol=FIT_RTOL)


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
@pytest.mark.parametrize(
    "name, kind, match",
    [
        ("no_data_axis", "ValueError", r"`mesh` must have an axis named 'data'.*\('model',\)"),
        ("not_a_mesh", "TypeError", r"`mesh` must be a jax.sharding.Mesh or None, got list"),
        ("mesh_and_device", "ValueError", r"`device` must be None when `mesh` is given"),
    ],
)
def test_data_parallel_fit_errors(fit_run, name, kind, match):
    msg = fit_run["errors"][name]
    assert msg is not None, f"{name}: no error raised"
    assert msg.startswith(kind + ": "), msg
    assert re.search(match, msg), msg


# --------------------------------------------------------------------------------------------
# Several processes joined by jax.distributed.
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(mode: str, directory: Path) -> list[tuple[int, str, str]]:
    """Runs 2 processes of ``mode`` × 2 CPU devices joined by ``jax.distributed`` on 127.0.0.1."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(i), str(port), "2", str(directory)],
            env=device_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:  # a hung peer (e.g. waiting for the coordinator) is never left behind
            if p.poll() is None:
                p.kill()
                p.communicate()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    """The 2-process runs of ``_dist_worker.process`` on a float64 memmap, after a first pair
    killed during epoch KILL_AT of a checkpointed run."""
    directory = tmp_path_factory.mktemp("two_processes")
    Z, y = mp_problem()
    np.save(directory / "Z.npy", Z)
    np.save(directory / "y.npy", y)
    runs = _run_pair("process-kill", directory)
    assert any(rc == KILL_CODE for rc, _, _ in runs), [rc for rc, _, _ in runs]
    for rc, out, err in runs:
        # the first process to exit can take its peer down with it: the peer, still finishing the
        # epoch's last all-reduce or polling the coordinator, is then aborted by JAX's runtime
        # (SIGABRT) rather than exiting by itself; either way it died during epoch KILL_AT
        peer_died = rc == -signal.SIGABRT and any(
            m in err for m in ("distributed service detected fatal errors", "Gloo")
        )
        assert rc == KILL_CODE or peer_died, f"process-kill: rc {rc}\n{out[-4000:]}{err[-8000:]}"
    results = []
    for rc, out, err in _run_pair("process", directory):
        assert rc == 0, f"process failed:\n{out[-4000:]}{err[-8000:]}"
        results.append(_result(out))
    return results


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
@pytest.mark.parametrize("run", ["memmap", "stream", "resumed"])
def test_two_processes_data_parallel_fit(two_processes, run):
    """2 processes × 2 CPU devices (gloo collectives): ``fit`` over the global 4-device ``"data"``
    mesh ends with the same parameters and losses as the same fit in one process on one device:
    from rows split over the processes, streamed, and resumed after both were killed."""
    ref = single_process_reference()
    for i, r in enumerate(two_processes):
        assert (r["pid"], r["process_count"], r["devices"], r["local_devices"]) == (i, 2, 4, 2)
        for name in ("W", "b", "loss"):
            assert_close(np.asarray(r[run][name]), np.asarray(ref[name]), rtol=FIT_RTOL)
    if run == "resumed":  # the checkpoint of epoch KILL_AT - 1 was restored, not a restart
        assert all(r[run]["epochs_run"] == list(range(KILL_AT, 5)) for r in two_processes)


@pytest.mark.multiprocess  # runs in subprocesses (8 host devices, 2 processes)
def test_two_processes_each_read_only_their_rows(two_processes):
    """In memory, each process touches about half of the 8 MB memmap (its 2 devices' 1000 rows
    of 2000, a contiguous half); streamed, each reads its devices' half of every batch: per epoch
    the two processes read disjoint rows (but the padding index 0) that cover the training set."""
    Z = mp_problem()[0]
    n, row_bytes = Z.shape[0], Z.shape[1] * 8
    header = two_processes[0]["file_bytes"] - n * row_bytes
    for i, r in enumerate(two_processes):  # rows [1000 i, 1000 (i + 1)): the pages holding them
        lo = (header + 1000 * i * row_bytes) // 4096
        hi = (header + 1000 * (i + 1) * row_bytes - 1) // 4096
        pages = np.asarray(r["memmap"]["mapped_pages"])
        assert set(range(lo, hi + 1)) <= set(pages.tolist()), i
        # The kernel maps a touched page's page-cache neighbours too: the whole large folio
        # (up to 2 MiB = 512 pages, aligned) of a page at either end of the range.
        outside = pages[(pages < lo) | (pages > hi)]
        near_ends = (outside // 512 == lo // 512) | (outside // 512 == hi // 512)
        assert near_ends.all(), (i, outside[~near_ends][:20], int((~near_ends).sum()))
    epochs, per_epoch = MP_FIT["epochs"], -(-n // MP_FIT["batch_size"]) * 16
    reads = []
    for r in two_processes:  # chunks of 10 batches: 7 per epoch
        rows = np.concatenate([np.asarray(c) for c in r["stream"]["rows_read"]])
        assert len(r["stream"]["rows_read"]) == 7 * epochs
        assert rows.size == epochs * per_epoch  # 16 of every batch's 32 entries
        reads.append(rows.reshape(epochs, per_epoch))
    for a, b in zip(*reads):
        assert set(a) & set(b) <= {0}
        assert set(a) | set(b) == set(range(n))
