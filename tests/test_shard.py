"""`_shard`: where a call of the head runs, read from its inputs' shardings, and the shard_map
around the per-device pass.

In this process (one CPU device) the layouts are built on abstract meshes of any size (nothing is
allocated on them) and ``run`` takes its one-device path. The checks that need real shardings
(arrays placed on 8 devices, explicit axes under ``jax.jit``, a user's ``jax.shard_map``) run in
one fresh interpreter, ``tests/_shard_worker.py``, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_device_worker
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from softmax_jax import _shard

WORKER = Path(__file__).with_name("_shard_worker.py")
MESH = AbstractMesh((2, 4), ("data", "model"))
Z, W, B = jnp.ones((8, 3)), jnp.ones((3, 8)), jnp.ones(8)


def test_no_layout_without_a_mesh():
    assert _shard.layout_of(Z, W, B, kaxis=1) is None
    assert _shard.local_rows(None, (3, 5)) == 15


def test_a_mesh_asked_for_is_used_even_of_one_device():
    one = AbstractMesh((1,), ("model",))
    layout = _shard.layout_of(Z, W, B, kaxis=1, mesh=one, classes=("model",), rows=())
    assert layout is not None and layout.classes == ("model",) and layout.rows == ()
    assert _shard.local_rows(layout, (8,)) == 8


def test_rows_and_classes_on_a_mesh():
    Z3 = jnp.ones((4, 6, 3))
    layout = _shard.layout_of(Z3, W, B, kaxis=1, mesh=MESH, classes=("model",), rows=("data",))
    assert layout.lead == (("data",), None) and layout.rows == ("data",)
    assert layout.classes == ("model",) and layout.kaxis == 1 and not layout.explicit
    assert _shard.local_rows(layout, Z3.shape[:-1]) == 12  # 24 rows over 2 devices


def test_rows_split_only_where_the_first_leading_dim_divides():
    layout = _shard.layout_of(jnp.ones((3, 4)), jnp.ones((4, 8)), None, kaxis=1, mesh=MESH,
                              classes=("model",), rows=("data",))  # fmt: skip
    assert layout.lead == (None,) and layout.rows == ()
    assert _shard.local_rows(layout, (3,)) == 3


def test_specs_of_each_kind():
    layout = _shard.layout_of(jnp.ones((4, 6, 3)), W.T, None, kaxis=0, mesh=MESH,
                              classes=("model",), rows=("data",))  # fmt: skip
    assert _shard._spec(layout, "rows", 2) == P("data", None)
    assert _shard._spec(layout, "features", 3) == P("data", None, None)
    assert _shard._spec(layout, "weight", 2) == P("model", None)  # (K, D): class axis first
    assert _shard._spec(layout, "classes", 1) == P("model")
    assert _shard._spec(layout, "replicated", 0) == P()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"classes": ("model",), "rows": ("model",)},
         r"`Z` splits its rows and `W` its classes over the same mesh axes \['model'\]"),
        ({"classes": ("model",), "rows": ("data",), "W": jnp.ones((3, 6))},
         r"`W` is sharded over its class axis on mesh axes \('model',\) of size 4, but K = 6 is "
         r"not divisible by 4"),
    ],
)  # fmt: skip
def test_layouts_that_cannot_work(kwargs, match):
    kwargs = dict(kwargs)
    w = kwargs.pop("W", W)
    with pytest.raises(ValueError, match=match):
        _shard.layout_of(Z, w, None, kaxis=1, mesh=MESH, **kwargs)


def test_rows_reshaped_both_ways():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    flat = _shard.flat_rows(x, (2, 3))
    assert flat.shape == (6, 4) and _shard.flat_rows(None, (2, 3)) is None
    np.testing.assert_array_equal(_shard.lead_rows(flat, (2, 3)), x)
    assert _shard.flat_rows(jnp.arange(6).reshape(2, 3), (2, 3)).shape == (6,)
    # An output nobody asked for is empty with the rank of the leading dims.
    assert _shard.lead_rows(jnp.zeros((0, 4)), (2, 3)).shape == (0, 0, 4)


def test_one_device_run_and_gradient_tail():
    """``run`` without a layout calls the per-device function once with no axes; the tail then
    only reshapes ``dZ`` to the leading dims (nothing to sum over)."""
    seen = {}

    def per_device(local, x, w):
        seen["local"] = local
        dZ, dW, db = _shard.reduce_gradients(local, (2, 3), x.reshape(6, 4), w, None,
                                             (True, True, False), x.dtype)  # fmt: skip
        return dZ, dW, db

    x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    dZ, dW, db = _shard.run(per_device, None, (x, w), ("features", "weight"),
                            (("features", 0), ("weight", 1), ("classes", 2)))  # fmt: skip
    assert seen["local"] == _shard.ONE_DEVICE
    assert seen["local"].class_offset(5) == 0
    assert dZ.shape == (2, 3, 4) and dW is w and db is None


# --------------------------------------------------------------------------------------------
# 8 devices, one subprocess.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def devices() -> dict:
    return run_device_worker(WORKER, timeout=300)


@pytest.mark.multiprocess
def test_layouts_read_from_shardings(devices):
    got = devices["layouts"]
    both = got["rows_and_classes"]  # Z (4, 6, D) over data x seq, W and the bias over model
    assert both["lead"] == [["data", "seq"], None] and both["rows"] == ["data", "seq"]
    assert both["classes"] == ["model"] and both["kaxis"] == 1
    assert both["given"] == ["P(('data', 'seq'), None, None)", "P(None, 'model')", "P('model',)"]
    assert got["kd"]["classes"] == ["model"] and got["kd"]["kaxis"] == 0
    # W split along D (FSDP): no row or class axes, but a layout (the call gathers W).
    assert got["fsdp_w_gathered"]["rows"] == [] and got["fsdp_w_gathered"]["classes"] == []
    assert got["fsdp_w_gathered"]["given"][1] == "P('data', None)"
    assert got["replicated"] is None  # on a mesh, split over nothing: one device's program
    assert got["local_rows"] == 6  # 24 rows over data x seq = 4 devices
    assert devices["flat_mesh_classes"]["classes"] == ["model"]
    assert devices["flat_mesh_classes"]["lead"] == [None]


@pytest.mark.multiprocess
def test_errors_name_the_shardings(devices):
    got = devices["layouts"]
    assert got["err_same_axis"].startswith(
        "`Z` sharded as P('model', None, None) splits its rows and `W` sharded as "
        "P(None, 'model') its classes over the same mesh axes ['model']"
    )
    assert got["err_two_meshes"].startswith(
        "`W` is sharded on mesh {'x': 8} but the call runs on mesh {'data': 2, 'seq': 2, "
        "'model': 2}"
    )


@pytest.mark.multiprocess
@pytest.mark.parametrize("mesh", ["run", "run_2x4"])
def test_run_reduces_over_the_right_axes(devices, mesh):
    """Per device ``dZ = K_l Z_l``, ``dW = Z_lᵀ 1``, ``db = n_l``: after the tail, ``K Z``,
    the column sums of ``Z`` and ``N``; outputs sharded like their inputs."""
    got = devices[mesh]
    assert got["per"] and got["db"]
    assert got["dZ"] < 1e-5 and got["dW"] < 1e-5  # float32 in the worker
    assert got["offsets"] == got["offsets_want"]
    assert "('data', 'seq')" in got["dZ_spec"] and got["dW_spec"] == "P(None, 'model')"


@pytest.mark.multiprocess
def test_explicit_axes_are_read_from_traced_types(devices):
    got = devices["explicit"]
    assert got["explicit"] and got["rows"] == ["data"] and got["classes"] == ["model"]


@pytest.mark.multiprocess
def test_inside_a_user_shard_map(devices):
    got = devices["shard_map"]
    assert got["layout"] is None  # local shards: the call runs on them as on one device
    assert got["carry_varies"] == ["data"]
    assert got["reduced"] == [28.0] * 3  # Σ_i x_i over the 8 shards of arange(8)
