"""``fit``: softmax regression trained with optax minibatches or a full-batch solver."""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from . import _compile_cache
from ._checkpoint import Checkpointer, CheckpointError, data_digest, transformation_digest
from ._minibatch import (
    DEFAULT_BATCH_SIZE,
    OPTIMIZERS,
    epoch_key,
    make_optimizer,
    minibatch_epoch,
    seed_key,
)
from ._newton import wants_hessian_copy
from ._objective import Params
from ._placement import bucket_rows, data_parallel, initial_params, place, resolve_device
from ._progress import History, new_history, notice, progress_bar, record_epoch, update_bar
from ._solvers import FULL_BATCH_SOLVERS, SOLVERS, full_batch_epoch, older_checkpoint
from ._stream import HostData, host_data, stream_epoch, streamed_train_data
from ._validate import check_fit_options, check_training_data, compute_dtype, is_sparse

__all__ = ["TrainingDiverged", "fit"]


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite.

    Attributes:
      epoch: the epoch (1-based) whose loss was not finite.
      params: the parameters after the last good epoch (the initial ones if it was the first).
      history: the metrics of the good epochs.
    """

    def __init__(self, message: str, *, epoch: int, params: Params, history: History):
        super().__init__(message)
        self.epoch = epoch
        self.params = params
        self.history = history


def _describe_optimizer(optimizer, learning_rate) -> str:
    if isinstance(optimizer, str):
        lr = learning_rate
        if lr is None and optimizer in OPTIMIZERS:
            lr = OPTIMIZERS[optimizer][1]
        lr = f"fn {transformation_digest(lr)}" if callable(lr) else lr  # issue 19: hyperparameters
        return optimizer if lr is None else f"{optimizer}(lr={lr})"
    return f"custom {type(optimizer).__name__} {transformation_digest(optimizer)}"


def _output(params: Params, k: int) -> Params:
    out = {"W": params["W"]}
    out["b"] = params["b"] if "b" in params else jnp.zeros((k,), params["W"].dtype)
    return out


def fit(
    Z: ArrayLike,
    y: ArrayLike,
    *,
    optimizer: str | optax.GradientTransformation = "adam",
    learning_rate: float | optax.Schedule | None = None,
    epochs: int = 10,
    batch_size: int | None = None,
    l2: float = 0.0,
    fit_intercept: bool = True,
    sample_weight: ArrayLike | None = None,
    num_classes: int | None = None,
    init_params: Params | None = None,
    seed: int = 0,
    tol: float | None = None,
    eval_data: tuple[ArrayLike, ArrayLike] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    max_to_keep: int = 3,
    progress: bool = True,
    callback: Callable[[int, Params, dict], bool | None] | None = None,
    device: str | jax.Device | None = None,
    mesh: Any = None,
    stream: bool = False,
) -> tuple[Params, History]:
    r"""Trains softmax regression with optax and the hand-written gradient of eq. (6).

    Minimises the weighted mean negative log-likelihood plus an L2 penalty on ``W``:

    .. math::

        f(W, b) = \frac{\sum_i s_i \big(\log \sum_k e^{a_{ik}} - a_{i y_i}\big)}{\sum_i s_i}
                  + \frac{\lambda}{2} \|W\|_F^2, \qquad a_i = z_i W + b

    (``λ`` = ``l2``; the bias is not penalised). Each step calls the hand-written value and
    gradient (eq. (6), on ``Z`` augmented with a ones column for the bias), never ``jax.grad``.

    Minibatch optimizers (any optax ``GradientTransformation``, schedules included, or a name in
    :data:`OPTIMIZERS`): each epoch is one compiled call that draws a permutation (a keyed
    Feistel network, :func:`permutation`) from ``fold_in(key(seed), epoch)`` and ``lax.scan``-s
    over the batches; the last partial batch is
    padded with zero-weight samples, so every sample is seen once per epoch. Full-batch solvers
    (``"lbfgs"``: optax L-BFGS with its zoom line search; ``"newton-cg"``: truncated Newton with the
    analytic Hessian-vector product :func:`softmax_jax.hvp`) do one iteration per epoch and stop
    early when ``max |∇f| <= tol``.

    With ``checkpoint_dir`` the state (parameters, optimizer state, epoch, RNG key, history) is
    saved with orbax-checkpoint after every ``checkpoint_every`` epochs (atomically; the last
    ``max_to_keep`` are kept), and a call with the same directory resumes from the latest
    checkpoint (saying so, and from which epoch), ending with the same parameters as an
    uninterrupted run. A checkpoint written by a different configuration or for other data (the
    fingerprint holds a SHA-256 of ``Z``, ``y`` and the weights), or past ``epochs``, raises
    :class:`softmax_jax.CheckpointError`; an unreadable one falls back to the previous one with a
    warning.

    Args:
      Z: features ``(N, D)``, finite. float64 stays float64 when x64 is enabled; bfloat16/float16
        are trained in float32.
      y: integer class indices ``(N,)`` in ``[0, K)``, at least two distinct classes.
      optimizer: an optax transformation or one of ``"sgd"``, ``"momentum"``, ``"nesterov"``,
        ``"adam"``, ``"adamw"``, ``"nadam"``, ``"adabelief"``, ``"adagrad"``, ``"rmsprop"``,
        ``"lion"``, ``"lbfgs"``, ``"newton-cg"``.
      learning_rate: float or optax schedule for a named optimizer (default per optimizer, see
        :data:`OPTIMIZERS`); ``None`` for the full-batch solvers (line searches choose the step).
      epochs: total number of epochs (iterations for the full-batch solvers), counting those
        restored from a checkpoint.
      batch_size: minibatch size (default 256; ``>= N`` means one batch); ``None`` for the
        full-batch solvers.
      l2: ``λ >= 0``, the penalty on ``W``.
      fit_intercept: learn the bias ``b`` (otherwise ``b = 0``).
      sample_weight: ``(N,)`` non-negative weights ``s``.
      num_classes: ``K`` (default ``max(y) + 1``).
      init_params: starting ``{"W": (D, K), "b": (K,)}`` (default zeros).
      seed: seeds the shuffling.
      tol: full-batch solvers only: stop when ``max |∇f| <= tol``.
      eval_data: ``(Z_eval, y_eval)`` evaluated after every epoch.
      checkpoint_dir: directory for orbax checkpoints; resumes from it if it holds one.
      checkpoint_every: save every this many epochs (and after the last one).
      max_to_keep: number of checkpoints kept.
      progress: show a tqdm progress bar (``tqdm.auto``: a widget in notebooks).
      callback: ``callback(epoch, params, record)`` after each epoch; returning ``True`` stops.
      device: ``"cpu"``, ``"gpu"`` or a ``jax.Device`` (default: JAX's default device); the data
        are placed there once.
      mesh: a ``jax.sharding.Mesh`` with an axis ``"data"`` (over the devices of every process
        after ``jax.distributed.initialize()``): data-parallel training. Each minibatch is split
        over ``"data"`` (padded with zero-weight samples to a multiple of its size), ``W`` and
        ``b`` are replicated, and the gradient is summed across devices by XLA; the full-batch
        solvers split all rows. Same result as one device, to rounding. Excludes ``device``.
        The rows of ``Z`` are split over ``"data"``: with several processes each one reads only
        the rows of its own devices (every process passes the same ``Z``, e.g. a memmap).
      stream: keep ``Z`` on the host (a NumPy array or ``np.memmap``): each epoch's shuffled
        batches are gathered there and copied to the device a few at a time, ahead of use
        (``softmax_jax._stream``); same batches, so the same parameters to rounding as
        ``stream=False``. The full-batch solvers stream their passes chunk by chunk. The rows
        of ``Z`` are checked to be finite as they are read (on a mesh of several processes
        each process reads only its devices' share of every batch).

    Returns:
      ``(params, history)``: ``params = {"W": (D, K), "b": (K,)}`` and ``history``, a dict of
      per-epoch lists: ``epoch``, ``loss`` (the objective ``f``; for minibatches the running mean
      over the epoch's batches), ``train_accuracy`` (likewise), ``eval_loss``/``eval_accuracy``
      (mean NLL and accuracy on ``eval_data``, ``None`` without it), ``seconds`` (wall time of the
      epoch's computation) and, for full-batch solvers, ``grad_max``.

    Raises:
      ValueError / TypeError: bad data (NaN/inf, empty, mismatched lengths, one class, labels out
        of range) or arguments, naming the argument.
      TrainingDiverged: the loss became NaN/inf; the message names the epoch, the exception holds
        the last good parameters and the checkpoint directory keeps the last good checkpoint.

    Examples:
      >>> import numpy as np, softmax_jax as sj
      >>> rng = np.random.default_rng(0)
      >>> Z = rng.normal(size=(200, 5)).astype(np.float32); y = (Z[:, 0] > 0).astype(np.int32)
      >>> params, history = sj.fit(Z, y, epochs=5, batch_size=32, progress=False)
      >>> params["W"].shape, len(history["loss"])
      ((5, 2), 5)
    """
    check_fit_options(
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, l2=l2,
        num_classes=num_classes, seed=seed, tol=tol, checkpoint_every=checkpoint_every,
        max_to_keep=max_to_keep,
    )  # fmt: skip
    _compile_cache.enable()
    setup = _setup(
        Z, y, optimizer=optimizer, learning_rate=learning_rate, batch_size=batch_size, l2=l2,
        fit_intercept=fit_intercept, sample_weight=sample_weight, num_classes=num_classes,
        tol=tol, eval_data=eval_data, device=device, mesh=mesh, stream=stream,
    )  # fmt: skip
    params = setup.put(initial_params(init_params, setup.d, setup.k, fit_intercept, setup.dtype))
    run = _Run(
        state=_initial_state(setup.plan, params, setup.data, setup.l2, setup.put),
        key=seed_key(seed),
        history=new_history(setup.plan.full_batch),
        start=0,
    )
    ckpt = None
    if checkpoint_dir is not None:
        fingerprint = _fingerprint(setup, optimizer, learning_rate, fit_intercept, l2, seed)
        ckpt, run = _resume(checkpoint_dir, fingerprint, max_to_keep, run, setup, epochs, progress)
    state = _train_epochs(setup, run, epochs, ckpt, checkpoint_every, progress, callback)
    return _output(setup.plan.params(state), setup.k), run.history


# ---------------------------------------------------------------------------------------------
# The steps of fit.


class _Setup(NamedTuple):
    """``fit``'s validated arguments and placed data: what every later step reads."""

    plan: _Plan
    data: Any  # TrainData on the device (or mesh), or HostData when streamed
    eval_dev: Any
    n: int
    d: int
    k: int
    dtype: Any
    dp: Any  # DataParallel or None
    put: Callable
    l2: jax.Array
    tol: float | None
    host: tuple  # (Z, y, sample weights) as validated on the host: the checkpoint's digest


class _Run(NamedTuple):
    """Where the epochs start: the state, the shuffling key, the history and the epochs done."""

    state: Any
    key: jax.Array
    history: History
    start: int


def _setup(Z, y, *, optimizer, learning_rate, batch_size, l2, fit_intercept, sample_weight,
           num_classes, tol, eval_data, device, mesh, stream) -> _Setup:  # fmt: skip
    """Checks the arguments and data, chooses how the epochs run and places the data once."""
    dp = data_parallel(mesh)
    if dp is not None and device is not None:  # the other options: check_fit_options in fit
        raise ValueError(f"`device` must be None when `mesh` is given, got {device!r}")
    local_rows = stream or (dp is not None and jax.process_count() > 1)  # not all of Z here
    Zh, yh, sw, k = check_training_data(
        Z, y, sample_weight=sample_weight, num_classes=num_classes, finite=not local_rows
    )
    n, d = Zh.shape
    dtype = compute_dtype(Zh.dtype if Zh.dtype.kind not in "iub" else jnp.zeros(()).dtype)
    plan = _plan(optimizer, learning_rate, batch_size, tol, n)
    dev = resolve_device(device) if dp is None else dp
    put = functools.partial(jax.device_put, device=dev) if dp is None else dp.replicate
    if stream:
        data = host_data(Zh, yh, sw, fit_intercept=fit_intercept, dtype=dtype, device=dev)
    else:  # full batch on one device: rows padded (weight 0) to a size shared with nearby N
        rows = bucket_rows(n) if plan.full_batch and dp is None else n
        data = place(
            Zh,
            yh,
            sw,
            fit_intercept=fit_intercept,
            dtype=dtype,
            device=dev,
            shape=None if rows == n else (rows, d),
            hessian_dtype=np.float32
            if _wants_hessian_copy(plan.solver, Zh, rows, k, fit_intercept, dp)
            else None,
            num_classes=k,
            check="Z" if local_rows else None,
        )
    if stream and plan.full_batch:
        data = streamed_train_data(data, solver=plan.solver, mesh=dp)
    eval_dev = _place_eval(eval_data, d, k, fit_intercept=fit_intercept, dtype=dtype, device=dev)
    l2_np = np.asarray(l2, dtype)  # a NumPy scalar: jnp.asarray would compile a program
    return _Setup(plan, data, eval_dev, n, d, k, dtype, dp, put, l2_np, tol, (Zh, yh, sw))


def _fingerprint(setup: _Setup, optimizer, learning_rate, fit_intercept, l2, seed) -> dict:
    """What a checkpoint must have been written by to be resumed (the run's configuration)."""
    return {
        "n_samples": setup.n,
        "n_features": setup.d,
        "n_classes": setup.k,
        "fit_intercept": bool(fit_intercept),
        "optimizer": _describe_optimizer(optimizer, learning_rate),
        "batch_size": None if setup.plan.full_batch else setup.plan.batch_size,
        "l2": float(l2),
        "seed": int(seed),
        "dtype": np.dtype(setup.dtype).name,
        "weighted": setup.host[2] is not None,
        "data_sha256": data_digest(*setup.host),
    }


def _resume(directory, fingerprint, max_to_keep, run: _Run, setup: _Setup, epochs, progress):
    """Opens the checkpoint directory; the run restored from its latest checkpoint, if any."""
    ckpt, restored = _open_checkpoint(
        directory, fingerprint, max_to_keep, run.state, run.key, epochs, progress, setup.plan.solver
    )
    if restored is None:
        return ckpt, run
    start, state, key, history = restored
    return ckpt, _Run(setup.put(state), key, history, start)


def _train_epochs(setup: _Setup, run: _Run, epochs, ckpt, checkpoint_every, progress, callback):
    """The epochs from ``run.start + 1``: each one run, checked, recorded (``run.history`` is
    appended to), reported and checkpointed; stops early on the callback's ``True``, on
    convergence (``tol``) or a stalled full-batch solver. Returns the final state."""
    plan, state, history = setup.plan, run.state, run.history
    bar = progress_bar(progress and run.start < epochs, epochs, run.start)
    try:
        for epoch in range(run.start + 1, epochs + 1):
            t0 = time.perf_counter()
            new_state, loss, acc, gmax = _run_epoch(setup, state, run.key, epoch)
            seconds = time.perf_counter() - t0
            if not math.isfinite(loss):
                params = _output(plan.params(state), setup.k)
                raise _diverged(epoch, loss, params, history, ckpt)
            state = new_state
            record = record_epoch(plan, state, epoch, loss, acc, gmax, seconds, setup.eval_dev)
            for key_, value in record.items():
                history[key_].append(value)
            params = _output(plan.params(state), setup.k)
            stop = bool(callback(epoch, params, record)) if callback else False
            converged = plan.full_batch and setup.tol is not None and gmax <= setup.tol
            stalled = plan.full_batch and bool(state.stalled)
            last = epoch == epochs or stop or converged or stalled
            if ckpt is not None and (epoch % checkpoint_every == 0 or last):
                ckpt.save(epoch, {"state": state, "rng": jax.random.key_data(run.key)}, history)
            update_bar(bar, record, last)
            if last:
                break
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
    return state


class _Plan(NamedTuple):
    """How the epochs run: a full-batch ``solver``, or minibatches of ``opt`` of ``batch_size``."""

    solver: str | None
    opt: optax.GradientTransformation | None
    batch_size: int | None

    @property
    def full_batch(self) -> bool:
        return self.solver is not None

    def params(self, state) -> Params:
        return state.params if self.full_batch else state[0]


def _plan(optimizer, learning_rate, batch_size, tol, n: int) -> _Plan:
    if isinstance(optimizer, str) and optimizer in FULL_BATCH_SOLVERS:
        if batch_size is not None and batch_size < n:
            raise ValueError(
                f"`batch_size` must be None (or >= N = {n}) for the full-batch solver "
                f"{optimizer!r}, got {batch_size}"
            )
        if learning_rate is not None:
            raise ValueError(
                f"`learning_rate` must be None for {optimizer!r}: its line search picks the "
                f"step, got {learning_rate!r}"
            )
        return _Plan(optimizer, None, None)
    if tol is not None:
        raise ValueError(f"`tol` applies to the full-batch solvers only, got tol={tol}")
    opt = make_optimizer(optimizer, learning_rate)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    return _Plan(None, opt, int(min(batch_size, n)))


def _wants_hessian_copy(solver: str, Z, rows: int, k: int, fit_intercept: bool, dp) -> bool:
    """Whether Newton-CG's Hessian products get their own float32 copy of ``Z`` (``place``'s
    ``hessian_dtype``): not where its steps are dense (the Hessian matrix is formed from ``Z``)."""
    rows = rows if dp is None else dp.padded(rows)
    return wants_hessian_copy(
        solver, rows, Z.shape[1], k, fit_intercept, sparse=is_sparse(Z), mixed=False
    )


def _place_eval(eval_data, d: int, k: int, *, fit_intercept: bool, dtype, device):
    if eval_data is None:
        return None
    if not (isinstance(eval_data, tuple | list) and len(eval_data) == 2):
        raise TypeError("`eval_data` must be a pair (Z_eval, y_eval)")
    Ze, ye, _, _ = _check_eval(eval_data, d, k)
    return place(Ze, ye, None, fit_intercept=fit_intercept, dtype=dtype, device=device)


@functools.partial(jax.jit, static_argnames=("init",))
def _strong_init(init, *args):
    """``init(*args)`` with every leaf strongly typed, as one program (op by op, each leaf and
    each weak type removed would compile its own)."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), init(*args))


def _initial_state(plan: _Plan, params: Params, data, l2, put):
    """The solver's state, or ``(params, opt_state)``; committed to the device and strongly typed
    like the epoch's outputs, so that epoch 2 does not compile again."""
    if plan.full_batch:
        state: Any = _strong_init(SOLVERS[plan.solver][0], params, data, l2)
    else:
        state = (params, _strong_init(plan.opt.init, params))
    return put(state)


def _open_checkpoint(
    directory, fingerprint: dict, max_to_keep: int, state, base_key, epochs, progress, solver
):
    """The :class:`Checkpointer` of ``directory`` and ``(epoch, state, key, history)`` restored
    from its checkpoint of this run (``solver``'s: ``older_checkpoint``), or ``None``; says that it
    resumes. A checkpoint past ``epochs`` is refused: that would be a longer run than asked for."""
    ckpt = Checkpointer(directory, fingerprint=fingerprint, max_to_keep=max_to_keep)
    target = {"state": state, "rng": jax.random.key_data(base_key)}
    restored = ckpt.restore_latest(target, older=older_checkpoint(solver, target))
    if restored is None:
        return ckpt, None
    start, tree, history = restored
    if start > epochs:
        ckpt.close()
        raise CheckpointError(
            f"checkpoint directory {ckpt.directory} holds epoch {start}, more than the "
            f"`epochs` = {epochs} asked for: ask for `epochs` >= {start} to resume from it, or use "
            "another checkpoint_dir"
        )
    if start == epochs:
        notice(
            f"checkpoint directory {ckpt.directory} already holds all {epochs} epochs: "
            "returning its parameters without training",
            progress,
        )
    else:
        notice(
            f"resuming from epoch {start} of {epochs} (checkpoint directory {ckpt.directory})",
            progress,
        )
    key = jax.random.wrap_key_data(np.asarray(tree["rng"]))  # uncommitted: any device or mesh
    return ckpt, (start, tree["state"], key, history)


def _run_epoch(setup: _Setup, state, base_key, epoch: int):
    """One epoch: ``(new_state, loss, train_accuracy, max|∇f| or None)`` as Python floats."""
    plan = setup.plan
    if plan.full_batch:
        tol = 0.0 if setup.tol is None else setup.tol
        new_state, acc, gmax = full_batch_epoch(
            state, setup.data, setup.l2, np.asarray(tol, setup.dtype), solver=plan.solver
        )
        loss, acc, gmax = jax.device_get((new_state.value, acc, gmax))
        return new_state, float(loss), float(acc), float(gmax)
    key = epoch_key(base_key, epoch)
    epoch_fn = stream_epoch if isinstance(setup.data, HostData) else minibatch_epoch
    p, o, loss, acc = epoch_fn(
        *state, setup.data, setup.l2, key, opt=plan.opt, batch_size=plan.batch_size,
        dp=setup.dp, n=setup.n,
    )  # fmt: skip
    loss, acc = jax.device_get((loss, acc))
    return (p, o), float(loss), float(acc), None


def _diverged(epoch: int, loss: float, params: Params, history: History, ckpt) -> TrainingDiverged:
    where = "" if ckpt is None else f" and the checkpoint in {ckpt.directory}"
    return TrainingDiverged(
        f"training diverged at epoch {epoch}: the loss is {loss}; the returned "
        f"parameters{where} are from epoch {epoch - 1}, the last good one "
        "(try a smaller learning rate)",
        epoch=epoch,
        params=params,
        history=history,
    )


def _check_eval(eval_data, d: int, k: int):
    Ze, ye, _, _ = check_training_data(
        eval_data[0],
        eval_data[1],
        num_classes=k,
        min_classes=1,
        z_name="eval_data[0]",
        y_name="eval_data[1]",
    )
    if Ze.shape[1] != d:
        raise ValueError(
            f"`eval_data[0]` must have D = {d} features like `Z`, got shape {Ze.shape}"
        )
    return Ze, ye, None, k
