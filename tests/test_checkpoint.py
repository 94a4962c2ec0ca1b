"""Checkpoint and resume with orbax: same parameters as an uninterrupted run, corrupt and
incompatible checkpoints, divergence, and a real training process killed with SIGKILL."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softmax_jax import TrainingDiverged, fit
from softmax_jax._checkpoint import (
    Checkpointer,
    CheckpointError,
    _one_line,
    data_digest,
    transformation_digest,
)
from softmax_jax._newton import FBState

# Exactness checks against float64 references: x64 on for this module (scoped, see conftest).
pytestmark = pytest.mark.x64

# The console script `softmax-jax`, run by this interpreter.
CLI = [sys.executable, "-c", "import sys; from softmax_jax._cli import main; sys.exit(main())"]


def blobs(n=96, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = 2.0 * rng.normal(size=(k, d))[y] + rng.normal(size=(n, d))
    return X, y.astype(np.int32)


def steps(directory) -> list[int]:
    """Complete checkpoints: orbax's temporary directories are not plain integers."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


KW = dict(optimizer="adam", batch_size=20, l2=1e-3, seed=5, progress=False)


@pytest.mark.parametrize(
    "kw",
    [
        KW,
        dict(optimizer="newton-cg", l2=1e-2, progress=False),
        dict(optimizer="lbfgs", l2=1e-2, progress=False),
    ],
    ids=["adam", "newton-cg", "lbfgs"],
)
def test_resume_ends_with_the_same_params_as_an_uninterrupted_run(tmp_path, kw):
    Z, y = blobs()
    full, h_full = fit(Z, y, epochs=6, **kw)
    ckpt = tmp_path / "ckpt"
    fit(Z, y, epochs=3, checkpoint_dir=ckpt, **kw)
    assert steps(ckpt) == [1, 2, 3]
    resumed, h = fit(Z, y, epochs=6, checkpoint_dir=ckpt, **kw)
    np.testing.assert_array_equal(resumed["W"], full["W"])
    np.testing.assert_array_equal(resumed["b"], full["b"])
    assert h["epoch"] == [1, 2, 3, 4, 5, 6] and h["loss"] == h_full["loss"]
    assert steps(ckpt) == [4, 5, 6]  # max_to_keep=3
    # a finished run resumes to the same result without training
    again, h2 = fit(Z, y, epochs=6, checkpoint_dir=ckpt, **kw)
    np.testing.assert_array_equal(again["W"], full["W"])
    assert h2["epoch"] == h["epoch"]


def test_newton_checkpoints_of_the_earlier_layout_resume(tmp_path):
    # Newton-CG's state had aux = () before it remembered its forcing term: a run checkpointed
    # then resumes (the forcing term starting afresh) rather than being refused as unreadable
    Z, y = blobs()
    kw = dict(optimizer="newton-cg", l2=1e-2, progress=False)
    full, h_full = fit(Z, y, epochs=6, **kw)
    new, old = tmp_path / "new", tmp_path / "old"
    fit(Z, y, epochs=3, checkpoint_dir=new, **kw)
    reader = Checkpointer(new, fingerprint={})
    writer = Checkpointer(old, fingerprint=reader._restore_meta(3)["fingerprint"])
    ocp = reader._ocp
    for step in steps(new):
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        tree = reader._manager.restore(step, args=args).state  # FBState's fields by name
        assert len(tree["state"]["aux"]) == 2  # (η, max|∇f|) of the last step
        tree["state"] = FBState(**{**tree["state"], "aux": ()})
        writer.save(step, tree, reader._restore_meta(step)["history"])
    writer.close()
    resumed, h = fit(Z, y, epochs=6, checkpoint_dir=old, **kw)
    assert h["epoch"] == [1, 2, 3, 4, 5, 6] and h["loss"][:3] == h_full["loss"][:3]
    np.testing.assert_allclose(resumed["W"], full["W"], rtol=1e-4, atol=1e-6)
    assert steps(old) == [4, 5, 6]


def test_checkpoint_every_and_max_to_keep(tmp_path):
    Z, y = blobs()
    fit(Z, y, epochs=7, checkpoint_dir=tmp_path, checkpoint_every=3, max_to_keep=2, **KW)
    assert steps(tmp_path) == [6, 7]  # every 3rd epoch and the last one, 2 kept


def test_incompatible_checkpoint_is_refused_naming_the_directory(tmp_path):
    Z, y = blobs()
    fit(Z, y, epochs=1, checkpoint_dir=tmp_path, **KW)
    with pytest.raises(CheckpointError, match=rf"{tmp_path} belongs to a different run.*seed"):
        fit(Z, y, epochs=2, checkpoint_dir=tmp_path, **{**KW, "seed": 6})
    with pytest.raises(CheckpointError, match=r"optimizer: saved 'adam\(lr=0.01\)', now"):
        fit(Z, y, epochs=2, checkpoint_dir=tmp_path, **{**KW, "learning_rate": 0.02})
    with pytest.raises(CheckpointError, match=r"n_samples: saved 96, now 95") as e:
        fit(Z[:95], y[:95], epochs=2, checkpoint_dir=tmp_path, **KW)
    # beside other differences, the data digests by their first twelve digits
    assert re.search(r"data_sha256: saved '[0-9a-f]{12}…', now '[0-9a-f]{12}…', n_s", str(e.value))
    with pytest.raises(CheckpointError, match=r"\(batch_size: saved 20, now 10\)"):
        fit(Z, y, epochs=2, checkpoint_dir=tmp_path, **{**KW, "batch_size": 10})


def _corrupt(step_dir) -> None:
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")


# orbax logs through absl; a corrupt file makes tensorstore/orbax raise, which we turn into a
# fallback warning, asserted below.
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    Z, y = blobs()
    full, _ = fit(Z, y, epochs=6, **KW)
    fit(Z, y, epochs=4, checkpoint_dir=tmp_path, **KW)
    _corrupt(tmp_path / "4" / "state")
    with pytest.warns(
        UserWarning, match=rf"{tmp_path}: could not read epoch 4.*resuming from epoch 3"
    ):
        resumed, h = fit(Z, y, epochs=6, checkpoint_dir=tmp_path, **KW)
    np.testing.assert_array_equal(resumed["W"], full["W"])
    assert h["epoch"] == [1, 2, 3, 4, 5, 6]
    # the unreadable epoch 4 alone was set aside, not epoch 3 it resumed from
    aside = [n for n in os.listdir(tmp_path) if n.startswith("unreadable-")]
    assert len(aside) == 1 and aside[0].startswith("unreadable-4-"), aside


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    Z, y = blobs()
    fit(Z, y, epochs=2, checkpoint_dir=tmp_path, **KW)
    for s in steps(tmp_path):
        _corrupt(tmp_path / str(s))
    with pytest.raises(CheckpointError, match=rf"no readable checkpoint in {tmp_path}"):
        fit(Z, y, epochs=3, checkpoint_dir=tmp_path, **KW)


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    """Three good epochs (checkpointed), then an infinite learning rate: the error names epoch 4,
    the directory keeps epoch 3's checkpoint, and resuming from it gives the last good params."""
    Z, y = blobs()  # N = 96: 12 steps of 8 per epoch
    lr = [optax.constant_schedule(0.1), optax.constant_schedule(float("inf"))]
    sgd = optax.sgd(optax.join_schedules(lr, [3 * 12]))
    kw = dict(optimizer=sgd, batch_size=8, progress=False)
    with pytest.raises(TrainingDiverged, match=rf"epoch 4.*checkpoint in {tmp_path}") as e:
        fit(Z, y, epochs=30, checkpoint_dir=tmp_path, **kw)
    assert e.value.epoch == 4 and steps(tmp_path) == [1, 2, 3]
    restored, h = fit(Z, y, epochs=3, checkpoint_dir=tmp_path, **kw)  # nothing left to train
    assert h["epoch"] == [1, 2, 3]
    for name in ("W", "b"):
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(e.value.params[name]))
    assert np.isfinite(np.asarray(restored["W"])).all() and np.abs(restored["W"]).max() > 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill_a_real_training_process_and_resume(tmp_path):
    """SIGKILL a `softmax-jax train` process mid-run; restarting it with the same checkpoint
    directory ends with exactly the parameters of a run never interrupted."""
    rng = np.random.default_rng(0)
    n, d, k = 3000, 16, 5
    y = rng.integers(0, k, n)
    X = rng.normal(size=(k, d))[y] + rng.normal(size=(n, d))
    np.savez(tmp_path / "data.npz", X=X, y=y)
    ckpt = tmp_path / "ckpt"
    epochs = 30

    def cmd(out, *extra):
        return [
            *CLI, "train", "--data", str(tmp_path / "data.npz"),
            "--epochs", str(epochs), "--batch-size", "64", "--no-progress", "--save", str(out),
            *extra,
        ]  # fmt: skip

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        cmd(tmp_path / "killed.npz", "--checkpoint-dir", str(ckpt)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not steps(ckpt)[-1:] or steps(ckpt)[-1] < 3:
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    done = steps(ckpt)
    assert 3 <= done[-1] < epochs and not (tmp_path / "killed.npz").exists()

    # the resumed and an uninterrupted run, side by side
    runs = [
        subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for c in (
            cmd(tmp_path / "resumed.npz", "--checkpoint-dir", str(ckpt)),
            cmd(tmp_path / "straight.npz"),
        )
    ]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    a, b = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "straight.npz")
    np.testing.assert_array_equal(a["W"], b["W"])
    np.testing.assert_array_equal(a["b"], b["b"])
    assert steps(ckpt)[-1] == epochs


def test_another_dataset_of_the_same_shape_is_refused_naming_the_directory(tmp_path):
    Z, y = blobs()
    fit(Z, y, epochs=2, checkpoint_dir=tmp_path, **KW)
    for other in (blobs(seed=1)[0], Z[::-1].copy(), -Z):  # other values, order, sign
        with pytest.raises(CheckpointError) as e:
            fit(other, y, epochs=3, checkpoint_dir=tmp_path, **KW)
        msg = str(e.value)
        assert f"checkpoint directory {tmp_path} was written for other training data" in msg
        assert "\n" not in msg
        # twelve hex digits of each digest, the saved one and the current one
        digests = re.search(r"values: SHA-256 ([0-9a-f]+)…, now ([0-9a-f]+)…\)", msg)
        assert digests and [len(g) for g in digests.groups()] == [12, 12], msg
    with pytest.raises(CheckpointError, match="other training data"):
        fit(Z, y[::-1].copy(), epochs=3, checkpoint_dir=tmp_path, **KW)  # other labels
    with pytest.raises(CheckpointError, match="weighted: saved False, now True"):
        fit(Z, y, epochs=3, checkpoint_dir=tmp_path, sample_weight=np.ones(len(y)), **KW)
    resumed, h = fit(Z.copy(), y, epochs=3, checkpoint_dir=tmp_path, **KW)  # same data
    assert h["epoch"] == [1, 2, 3]


def test_data_digest_tells_datasets_apart_and_reads_memmaps_in_blocks(tmp_path):
    Z, y = blobs()
    assert data_digest(Z, y, None) == data_digest(Z.copy(), y.copy(), None)
    changed = Z.copy()
    changed[50, 2] = np.nextafter(changed[50, 2], np.inf)  # one ulp of one value
    digests = {
        data_digest(Z, y, None),
        data_digest(changed, y, None),
        data_digest(Z.astype(np.float32), y, None),
        data_digest(Z, y, np.ones(len(y))),
        data_digest(Z.reshape(48, 8), y, None),
    }
    assert len(digests) == 5
    mm = np.lib.format.open_memmap(tmp_path / "z.npy", mode="w+", dtype=Z.dtype, shape=Z.shape)
    mm[:] = Z
    assert data_digest(mm, y, None) == data_digest(Z, y, None)


def test_resume_is_announced_and_fewer_epochs_than_saved_is_an_error(tmp_path, caplog, capsys):
    import logging

    Z, y = blobs()
    fit(Z, y, epochs=3, checkpoint_dir=tmp_path, **KW)
    with caplog.at_level(logging.INFO, logger="softmax_jax"):
        fit(Z, y, epochs=4, checkpoint_dir=tmp_path, **KW)
    assert f"resuming from epoch 3 of 4 (checkpoint directory {tmp_path})" in caplog.text
    fit(Z, y, epochs=5, checkpoint_dir=tmp_path, **{**KW, "progress": True})
    assert "resuming from epoch 4 of 5" in capsys.readouterr().err  # shown with the bar
    with pytest.raises(CheckpointError) as e:
        fit(Z, y, epochs=2, checkpoint_dir=tmp_path, **KW)
    assert str(e.value) == (
        f"checkpoint directory {tmp_path} holds epoch 5, more than the `epochs` = 2 asked for: "
        "ask for `epochs` >= 5 to resume from it, or use another checkpoint_dir"
    )


# --- issue 19: the optimizer's hyperparameters are part of the run -----------------------------


def test_custom_optimizer_with_other_hyperparameters_is_another_run(tmp_path):
    """A custom optax optimizer resumes only with the same hyperparameters (its closures are in
    the fingerprint): another learning rate, another transformation or another schedule is
    refused in one line naming the directory, not resumed into a mix of two runs."""
    Z, y = blobs()
    kw = dict(batch_size=20, progress=False)
    fit(Z, y, optimizer=optax.sgd(0.1), epochs=1, checkpoint_dir=tmp_path, **kw)
    fit(Z, y, optimizer=optax.sgd(0.1), epochs=2, checkpoint_dir=tmp_path, **kw)  # same: resumes
    assert steps(tmp_path) == [1, 2]
    others = [
        optax.sgd(0.5),
        optax.adam(0.1),
        optax.chain(optax.clip(1.0), optax.sgd(0.1)),
        optax.sgd(optax.linear_schedule(0.1, 0.0, 5)),
    ]
    for opt in others:
        with pytest.raises(CheckpointError, match=rf"{tmp_path} belongs to a different run \(opt"):
            fit(Z, y, optimizer=opt, epochs=3, checkpoint_dir=tmp_path, **kw)
    # a named optimizer's schedule: two schedules are two runs
    d2 = tmp_path / "named"
    fit(Z, y, learning_rate=optax.linear_schedule(0.1, 0.0, 5), epochs=1, checkpoint_dir=d2, **kw)
    with pytest.raises(CheckpointError, match=r"different run \(optimizer: saved 'adam\(lr=fn "):
        fit(
            Z,
            y,
            learning_rate=optax.linear_schedule(0.2, 0.0, 5),
            epochs=2,
            checkpoint_dir=d2,
            **kw,
        )


def test_no_readable_checkpoint_is_one_line_saying_another_run(tmp_path):
    Z, y = blobs()
    fit(Z, y, epochs=2, checkpoint_dir=tmp_path, **KW)
    for s in steps(tmp_path):
        _corrupt(tmp_path / str(s) / "state")
    with pytest.raises(CheckpointError, match=r"holds the state of another run") as e:
        fit(Z, y, epochs=3, checkpoint_dir=tmp_path, **KW)
    assert "\n" not in str(e.value) and len(str(e.value)) < 1500


# --- property: a damaged checkpoint folder resumes or is one CheckpointError naming it ---------

import shutil  # noqa: E402
import warnings  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "ck"
    Z, y = blobs(n=40)
    fit(Z, y, epochs=2, checkpoint_dir=directory, **KW)
    return directory, Z, y


def _damage(root, how: str, target: int) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    f = files[target % len(files)]
    if how == "delete file":
        f.unlink()
    elif how == "truncate file":
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif how == "garbage file":
        f.write_bytes(b"{not json\x00")
    elif how == "empty file":
        f.write_bytes(b"")
    elif how == "delete step":
        shutil.rmtree(root / str(1 + target % 2))
    elif how == "junk entries":
        (root / "3.orbax-checkpoint-tmp-1").mkdir()
        (root / "notes.txt").write_text("x")
        (root / "7").write_text("a file named like a step")


@settings(max_examples=8, derandomize=True)
@given(
    damages=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "delete file",
                    "truncate file",
                    "garbage file",
                    "empty file",
                    "delete step",
                    "junk entries",
                ]
            ),  # fmt: skip
            st.integers(0, 50),
        ),
        min_size=1,
        max_size=2,
    )
)
def test_damaged_checkpoint_folders_resume_or_raise_one_line(saved_run, tmp_path_factory, damages):
    source, Z, y = saved_run
    root = tmp_path_factory.mktemp("damaged") / "ck"
    shutil.copytree(source, root)
    for how, target in damages:
        _damage(root, how, target)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            params, history = fit(Z, y, epochs=3, checkpoint_dir=root, **KW)
        except CheckpointError as e:
            assert str(root) in str(e) and "\n" not in str(e), str(e)
            return
    assert np.isfinite(params["W"]).all() and history["epoch"][-1] == 3


# --- mutation testing (issue 19): what the tests above let through -------------------------------


def test_an_unusable_directory_is_a_checkpoint_error_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder is needed")
    with pytest.raises(CheckpointError, match=rf"cannot open checkpoint directory {blocker}/ck"):
        Checkpointer(blocker / "ck", fingerprint={})
    with pytest.raises(CheckpointError, match=rf"directory {blocker} is not a directory"):
        Checkpointer(blocker, fingerprint={})


def test_a_single_process_state_is_restored_as_device_arrays(tmp_path):
    # one process: nothing is host-local, so the state comes back as jax arrays where the target
    # lives (not as host NumPy copies), with the saved values; three checkpoints kept by default
    state = {"W": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key_data(jax.random.key(1))}
    ck = Checkpointer(tmp_path, fingerprint={"run": 1})
    assert ck.fingerprint == {"format": 1, "run": 1}  # a new format refuses every old checkpoint
    for epoch in range(1, 5):
        ck.save(epoch, state, {"epoch": list(range(1, epoch + 1))})
    assert ck.steps() == [2, 3, 4]
    epoch, restored, history = ck.restore_latest(jax.tree.map(jnp.zeros_like, state))
    ck.close()
    assert epoch == 4 and history == {"epoch": [1, 2, 3, 4]}
    for name in state:
        assert isinstance(restored[name], jax.Array), type(restored[name])
        assert restored[name].sharding == state[name].sharding
        np.testing.assert_array_equal(restored[name], state[name])


def test_orbax_errors_are_cut_to_one_short_line():
    assert _one_line(3, ValueError("first\nsecond")) == "epoch 3: ValueError: first"
    assert _one_line(4, OSError("")) == "epoch 4: OSError: "
    at_limit = "x" * 160
    assert _one_line(1, RuntimeError(at_limit)) == f"epoch 1: RuntimeError: {at_limit}"
    cut = _one_line(2, RuntimeError("y" * 161))
    assert cut == "epoch 2: RuntimeError: " + "y" * 157 + "..."


def test_digests_are_stable_across_versions():
    # no softmax_jax version in the fingerprint: a checkpoint written before an upgrade is
    # resumed after it only if the digests of the same data and optimizer are unchanged
    Z = np.arange(12.0).reshape(4, 3)
    assert data_digest(Z, np.arange(4, dtype=np.int32), None) == (
        "31111619e95aec07bb78848f557bdfaec7565b6bc026a4587ee6cb5d46e3e96b"
    )
    assert data_digest(np.array(2.0)) != data_digest(np.array(3.0))  # 0-d: hashed whole
    assert transformation_digest(functools.partial(max, 1.5, np.arange(3.0), key=None)) == (
        "d16bae87f7d508de"
    )
    assert transformation_digest({"lr": 0.1, "betas": (0.9, 0.999), "on": True}) == (
        "d5601c125984f539"
    )


def test_a_save_from_another_thread_leaves_sigint_alone(tmp_path):
    # signal handlers can only be set from the main thread: a save from a worker thread skips
    # the Ctrl-C deferral instead of failing
    import threading

    ck = Checkpointer(tmp_path, fingerprint={})
    errors = []

    def save():
        try:
            ck.save(1, {"W": np.ones(2)}, {})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    worker = threading.Thread(target=save)
    worker.start()
    worker.join()
    ck.close()
    assert errors == [] and steps(tmp_path) == [1]


def test_optimizer_digest_sees_deep_inside_a_chain_and_empty_closure_cells():
    def opt(peak):  # the schedule's peak sits 26 levels down in the description
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, 10, 100)
        return optax.chain(optax.clip(1.0), optax.adamw(schedule))

    assert transformation_digest(opt(0.1)) == transformation_digest(opt(0.1))
    assert transformation_digest(opt(0.1)) != transformation_digest(opt(0.2))

    def unfinished():
        def fn(x):
            return x * later

        return fn
        later = 2.0  # noqa: F841 - never runs: `fn`'s closure cell stays empty

    assert len(transformation_digest(unfinished())) == 16
