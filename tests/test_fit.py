"""sj.fit: the compiled minibatch epoch against a step-by-step reference, the full-batch solvers,
the analytic Hessian-vector product against autodiff, metrics, progress and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import compiled_programs

import softmax_jax as sj
from softmax_jax import TrainingDiverged, fit
from softmax_jax._minibatch import make_optimizer, permutation

# Exactness checks against float64 references: x64 on for this module (scoped, see conftest).
pytestmark = pytest.mark.x64


def blobs(n=90, d=4, k=3, seed=0, dtype=np.float64, sep=2.0):
    """Gaussian blobs, one per class: an easy, non-separable problem."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers = sep * rng.normal(size=(k, d))
    X = centers[y] + rng.normal(size=(n, d))
    return X.astype(dtype), y.astype(np.int32)


def objective(params, Z, y, l2, s=None):
    """The objective of fit, written independently with jax.numpy (autodiff reference)."""
    A = Z @ params["W"] + params.get("b", 0.0)
    nll = jax.nn.logsumexp(A, axis=1) - jnp.take_along_axis(A, y[:, None], axis=1)[:, 0]
    s = jnp.ones_like(nll) if s is None else s
    return jnp.sum(s * nll) / jnp.sum(s) + 0.5 * l2 * jnp.sum(params["W"] ** 2)


def reference_epochs(Z, y, *, opt, epochs, batch_size, l2, seed):
    """What one compiled epoch must do, step by step on the host, with sj.value_and_grad."""
    n, d = Z.shape
    k = int(y.max()) + 1
    params = {"W": jnp.zeros((d, k)), "b": jnp.zeros(k)}
    state = opt.init(params)
    Z1 = jnp.concatenate([jnp.asarray(Z), jnp.ones((n, 1))], axis=1)

    @jax.jit  # one program per batch size (the step's operations one by one would each compile)
    def step(params, state, Zb, yb):
        W1 = jnp.concatenate([params["W"], params["b"][None]], axis=0)
        _, G = sj.value_and_grad(W1, Zb, yb, reduction="mean")
        g = {"W": G[:-1] + l2 * params["W"], "b": G[-1]}
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for epoch in range(1, epochs + 1):
        perm = np.asarray(permutation(jax.random.fold_in(jax.random.key(seed), epoch), n))
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]  # the last batch is partial
            params, state = step(params, state, Z1[idx], jnp.asarray(y[idx]))
    return params


@pytest.mark.parametrize("name, batch_size", [("sgd", 32), ("adam", 25), ("momentum", 200)])
def test_epoch_matches_step_by_step_reference(name, batch_size):
    # N = 90 is not a multiple of 32 or 25: the last partial batch must count, at its own mean.
    Z, y = blobs()
    opt = make_optimizer(name, 0.05)
    params, history = fit(
        Z, y, optimizer=opt, epochs=2, batch_size=batch_size, l2=0.01, seed=3, progress=False
    )
    ref = reference_epochs(Z, y, opt=opt, epochs=2, batch_size=batch_size, l2=0.01, seed=3)
    np.testing.assert_allclose(params["W"], ref["W"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(params["b"], ref["b"], rtol=1e-10, atol=1e-12)
    assert history["epoch"] == [1, 2] and len(history["seconds"]) == 2


def test_history_metrics_and_learning():
    Z, y = blobs(n=300, sep=3.0)
    Ze, ye = blobs(n=60, sep=3.0, seed=1)
    params, h = fit(
        Z.astype(np.float32), y, epochs=15, batch_size=32, eval_data=(Ze, ye), progress=False
    )
    assert params["W"].dtype == jnp.float32 and params["W"].shape == (4, 3)
    assert set(h) == {"epoch", "loss", "train_accuracy", "eval_loss", "eval_accuracy", "seconds"}
    assert all(len(v) == 15 for v in h.values())
    assert h["loss"][-1] < 0.5 * h["loss"][0]
    assert h["train_accuracy"][-1] > 0.9
    # eval metrics are those of the returned parameters
    _, y_hat_acc = _eval(params, Ze, ye)
    assert h["eval_accuracy"][-1] == pytest.approx(y_hat_acc, abs=1e-6)


def _eval(params, Z, y):
    A = np.asarray(Z, np.float64) @ np.asarray(params["W"], np.float64) + np.asarray(params["b"])
    return None, float(np.mean(A.argmax(1) == y))


def test_schedule_and_custom_transformation():
    Z, y = blobs()
    sched = optax.exponential_decay(0.1, transition_steps=3, decay_rate=0.5)
    p1, _ = fit(Z, y, optimizer="sgd", learning_rate=sched, epochs=2, batch_size=30, progress=False)
    p2, _ = fit(Z, y, optimizer=optax.sgd(sched), epochs=2, batch_size=30, progress=False)
    np.testing.assert_allclose(p1["W"], p2["W"], rtol=1e-12)
    chained = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    p3, _ = fit(Z, y, optimizer=chained, epochs=3, batch_size=30, l2=0.0, seed=0, progress=False)
    ref = reference_epochs(Z, y, opt=chained, epochs=3, batch_size=30, l2=0.0, seed=0)
    for name in ("W", "b"):
        np.testing.assert_allclose(p3[name], ref[name], rtol=1e-7, atol=1e-10)  # adam: 5e-9 seen


def test_no_intercept_weights_and_l2():
    Z, y = blobs()
    p, _ = fit(Z, y, fit_intercept=False, epochs=2, batch_size=16, progress=False)
    np.testing.assert_array_equal(p["b"], 0.0)
    small, _ = fit(Z, y, l2=10.0, epochs=5, batch_size=16, progress=False)
    big, _ = fit(Z, y, l2=0.0, epochs=5, batch_size=16, progress=False)
    assert np.linalg.norm(small["W"]) < 0.5 * np.linalg.norm(big["W"])


@pytest.mark.parametrize("solver", ["newton-cg", "lbfgs"])
def test_full_batch_solvers_reach_the_optimum(solver):
    Z, y = blobs(n=120, d=5, k=4)
    l2 = 0.05
    params, h = fit(Z, y, optimizer=solver, epochs=300, l2=l2, tol=1e-9, progress=False)
    g = jax.jit(jax.grad(objective))(params, jnp.asarray(Z), jnp.asarray(y), l2)
    assert max(float(jnp.max(jnp.abs(v))) for v in g.values()) <= 1e-8
    assert h["grad_max"][-1] <= 1e-9 and len(h["epoch"]) < 300
    assert h["loss"][-1] == pytest.approx(float(jax.jit(objective)(params, Z, y, l2)), rel=1e-12)


def test_solvers_agree_with_sample_weights_as_repetitions():
    Z, y = blobs(n=40, d=3, k=3)
    w = np.random.default_rng(1).integers(0, 4, size=40)
    w[:3] = [1, 2, 3]
    kw = dict(l2=0.1, epochs=100, tol=1e-11, progress=False)
    pw, _ = fit(Z, y, optimizer="newton-cg", sample_weight=w.astype(float), **kw)
    pr, _ = fit(np.repeat(Z, w, axis=0), np.repeat(y, w), optimizer="newton-cg", **kw)
    pl, _ = fit(Z, y, optimizer="lbfgs", sample_weight=w.astype(float), **kw)
    for p in (pr, pl):
        np.testing.assert_allclose(pw["W"], p["W"], rtol=1e-7, atol=1e-9)
        # b is unpenalised and softmax is shift-invariant: b is defined up to a constant
        np.testing.assert_allclose(pw["b"] - pw["b"].mean(), p["b"] - p["b"].mean(), atol=1e-8)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_hvp_matches_jvp_of_autodiff_gradient(getkey, reduction, weighted):
    n, d, k = 37, 6, 5
    W = jax.random.normal(getkey(), (d, k))
    Z = jax.random.normal(getkey(), (n, d))
    y = jax.random.randint(getkey(), (n,), 0, k)
    V = jax.random.normal(getkey(), (d, k))
    s = jax.random.uniform(getkey(), (n,)) if weighted else None

    def g(W):
        return jax.grad(sj.loss)(W, Z, y, weights=s, reduction=reduction)

    ref = jax.jvp(g, (W,), (V,))[1]
    got = sj.hvp(W, Z, y, V, weights=s, reduction=reduction)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)


# --- progress, callback, devices ---------------------------------------------------------------


def test_callback_can_stop_and_device_placement():
    Z, y = blobs()
    seen = []

    def callback(epoch, params, record):
        seen.append((epoch, record["loss"]))
        return epoch == 2

    params, h = fit(Z, y, epochs=10, batch_size=30, callback=callback, device="cpu", progress=False)
    assert [e for e, _ in seen] == [1, 2] and h["epoch"] == [1, 2]
    assert params["W"].devices() == {jax.devices("cpu")[0]}
    cpu = jax.devices("cpu")[0]
    by_device, _ = fit(Z, y, epochs=1, batch_size=30, device=cpu, progress=False)
    by_name, _ = fit(Z, y, epochs=1, batch_size=30, device="cpu", progress=False)
    assert by_device["W"].devices() == {cpu}
    np.testing.assert_array_equal(by_device["W"], by_name["W"])


@pytest.mark.parametrize("optimizer, d, k", [("adam", 29, 11), ("lbfgs", 31, 13)])
def test_setup_compiles_no_op_by_op_programs(optimizer, d, k):
    """Starting a fit (parameters, optimizer state, key, penalty) compiles no program per
    primitive: JAX compiles each op-by-op call at each new shape (zeros, casts, the seed's
    threefry), 10-50 ms each in a fresh process. Shapes no other test uses."""
    rng = np.random.default_rng(d)
    Z, y = rng.normal(size=(40 + d, d)), np.arange(40 + d) % k
    with compiled_programs() as compiled:
        params, _ = fit(Z, y, optimizer=optimizer, epochs=2, seed=12345 + d, progress=False)
    op_by_op = {"jit(broadcast_in_dim)", "jit(convert_element_type)", "jit(stage)",
                "jit(_threefry_seed)", "jit(_threefry_fold_in)"}  # fmt: skip
    assert not op_by_op & set(compiled), compiled
    assert params["W"].shape == (d, k)


# --- divergence and bad input ------------------------------------------------------------------


def diverging_sgd(good_epochs, steps_per_epoch):
    """SGD at lr 0.1 for `good_epochs` epochs, then an infinite step: epoch good_epochs + 1 is the
    first whose loss is not finite (deterministically, whatever the dtype)."""
    boundary = good_epochs * steps_per_epoch
    lr = [optax.constant_schedule(0.1), optax.constant_schedule(float("inf"))]
    return optax.sgd(optax.join_schedules(lr, [boundary]))


def test_divergence_names_the_epoch_and_keeps_the_last_good_params():
    Z, y = blobs()  # N = 90: 9 steps of 10 per epoch
    good = []
    with pytest.raises(TrainingDiverged, match=r"diverged at epoch 4: the loss is (nan|inf)") as e:
        fit(
            Z, y, optimizer=diverging_sgd(3, 9), epochs=20, batch_size=10,
            callback=lambda e, p, r: good.append((e, jax.tree.map(np.asarray, p))), progress=False,
        )  # fmt: skip
    assert e.value.epoch == 4 and [g[0] for g in good] == [1, 2, 3]
    # the parameters after epoch 3 (not the initial ones, not the diverged ones)
    for name in ("W", "b"):
        np.testing.assert_array_equal(np.asarray(e.value.params[name]), good[-1][1][name])
    assert np.abs(np.asarray(e.value.params["W"])).max() > 0
    assert e.value.history["epoch"] == [1, 2, 3]
    assert all(np.isfinite(e.value.history["loss"]))


@pytest.mark.parametrize(
    "Z, y, exc, match",
    [
        (
            [[0.0, np.nan], [1, 1]],
            [0, 1],
            ValueError,
            r"`Z` must be finite, got nan at index \(0, 1\)",
        ),
        ([[0.0, np.inf], [1, 1]], [0, 1], ValueError, r"`Z` must be finite, got inf"),
        (np.zeros((0, 3)), np.zeros(0, int), ValueError, r"at least one sample"),
        ([[0.0], [1.0], [2.0]], [0, 1], ValueError, r"`y` must have shape \(N,\) = \(3,\)"),
        ([[0.0], [1.0]], [1, 1], ValueError, r"at least 2 classes .* only class 1"),
        ([[0.0], [1.0]], [0.0, 1.0], TypeError, r"`y` must hold integer class indices"),
        ([[0.0], [1.0]], [0, -1], ValueError, r"`y` must be >= 0, got -1 at index 1"),
        ([0.0, 1.0], [0, 1], ValueError, r"`Z` must have shape \(N, D\)"),
    ],
)
def test_bad_data(Z, y, exc, match):
    with pytest.raises(exc, match=match):
        fit(np.asarray(Z), np.asarray(y), epochs=1, progress=False)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(optimizer="adamax"), ValueError, r"`optimizer` must be .* got 'adamax'"),
        (
            dict(optimizer="lbfgs", batch_size=1),
            ValueError,
            r"`batch_size` must be None .* 'lbfgs'",
        ),
        (
            dict(optimizer="newton-cg", learning_rate=0.1),
            ValueError,
            r"`learning_rate` must be None",
        ),
        (
            dict(optimizer=optax.sgd(0.1), learning_rate=0.1),
            ValueError,
            r"only used with an optimizer name",
        ),
        (dict(tol=1e-6), ValueError, r"`tol` applies to the full-batch solvers only"),
        (dict(l2=-1.0), ValueError, r"`l2` must be a finite number >= 0, got -1.0"),
        (
            dict(learning_rate=-1.0),
            ValueError,
            r"`learning_rate` must be a finite number > 0, got -1.0",
        ),
        (dict(batch_size=0), ValueError, r"`batch_size` must be an integer >= 1, got 0"),
        (dict(epochs=-1), ValueError, r"`epochs` must be an integer >= 0, got -1"),
        (dict(num_classes=2, y=[0, 2]), ValueError, r"< num_classes = 2, got 2 at index 1"),
        (dict(sample_weight=[1.0, -1.0]), ValueError, r"`sample_weight` must be >= 0"),
        (dict(sample_weight=[0.0, 0.0]), ValueError, r"`sample_weight` must have a positive sum"),
        (dict(mesh="m"), TypeError, r"`mesh` must be a jax.sharding.Mesh or None, got str"),
        (dict(device="tpu"), ValueError, r"`device` 'tpu' is not available"),
        (
            dict(eval_data=(np.ones((2, 3)), [0, 1])),
            ValueError,
            r"`eval_data\[0\]` must have D = 1",
        ),
        (
            dict(init_params={"W": np.zeros((2, 2))}),
            ValueError,
            r"`init_params\['W'\]` must have shape",
        ),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    y = kwargs.pop("y", [0, 1])
    kwargs = {"epochs": 1, "progress": False, **kwargs}
    with pytest.raises(exc, match=match):
        fit(np.array([[0.0], [1.0]]), np.asarray(y), **kwargs)
