"""linear_cross_entropy: the fused head against the unfused loss, its memory, and its errors.

Exactness is checked in float64 (x64 on for this module, see conftest.py) against ``jax.grad``
of an unfused reference written plainly below. Every test runs the head as users do (columns in
blocks of ``_kernel.K_BLOCK``) except ``test_row_and_class_remainders``, which takes K past two
blocks of 3 columns so the inner class loops run whole blocks and a remainder
(tests/test_kernel.py drives those loops directly).
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close, host_rng, rel_err
from jax.test_util import check_grads

from softmax_jax import _head, _kernel
from softmax_jax._head import linear_cross_entropy

# Exactness checks against float64 references: x64 on for this module (scoped, see conftest).
pytestmark = pytest.mark.x64

# The gradients must equal the unfused reference to 1e-10 relative in float64 (the bar);
# they agree to ~1e-15, so the helper's float64 tolerance (1e-12) is used where nothing says more.
RTOL64 = 1e-10


def reference(
    Z, W, y, *, bias=None, weights=None, reduction="mean", label_smoothing=0.0, z_loss=0.0,
    ignore_index=-100, softcap=None, weight_layout="dk",
):  # fmt: skip
    """The unfused loss, written from the definition: (N, K) logits, one-hot targets; ignored
    tokens are dropped from the sum and the mean's denominator."""
    lead = y.shape
    Wd = W if weight_layout == "dk" else W.T
    Z, y = Z.reshape(-1, Z.shape[-1]), y.reshape(-1)
    A = Z @ Wd if bias is None else Z @ Wd + bias
    if softcap is not None:
        A = softcap * jnp.tanh(A / softcap)
    k = Wd.shape[1]
    keep = jnp.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    lse = jax.nn.logsumexp(A, axis=1)
    T = optax.smooth_labels(
        jax.nn.one_hot(jnp.where(keep, y, 0), k, dtype=A.dtype), label_smoothing
    )
    per = lse - jnp.sum(T * A, axis=1) + z_loss * lse**2
    s = jnp.ones_like(per) if weights is None else weights.reshape(-1).astype(per.dtype)
    s = jnp.where(keep, s, 0.0)
    per = jnp.where(keep, per, 0.0)
    if reduction == "none":
        return (s * per).reshape(lead)
    if reduction == "sum":
        return jnp.sum(s * per)
    total = jnp.sum(s)
    return jnp.sum(s * per) / jnp.where(total > 0, total, 1)


def make(key, n=8, d=4, k=6, dtype=jnp.float64, scale=1.0):
    rng = host_rng(key)  # NumPy: jax.random compiles a program per shape
    Z = rng.standard_normal((n, d))
    W = scale * rng.standard_normal((d, k))
    b = rng.standard_normal(k)
    y = rng.integers(0, k, n)  # JAX's default integer (int64 under x64), as jax.random.randint
    s = rng.uniform(0.0, 2.0, n)
    # jax.device_put: the same arrays as jnp.asarray, which compiles a program per shape
    return jax.device_put((*(x.astype(dtype) for x in (Z, W, b)), y, s.astype(dtype)))


OPTIONS = {
    "plain": {},
    "bias+mask": {"bias": True, "weights": "bool"},
    "weights": {"weights": "float"},
    "smoothing+z_loss": {"label_smoothing": 0.1, "z_loss": 1e-3},
    "softcap": {"softcap": 1.5},
    "kd+ignore": {"weight_layout": "kd", "ignore": True},
    "all": {"bias": True, "weights": "float", "label_smoothing": 0.2, "z_loss": 1e-2},
    # The conventions of LM training with every other option: (2, 4, D) tokens, -100 padding,
    # a tied (K, D) table, a softcap.
    "lm+all": {"bias": True, "weights": "float", "label_smoothing": 0.2, "z_loss": 1e-2,
               "softcap": 2.0, "weight_layout": "kd", "ignore": True, "lead": (2, 4)},
}  # fmt: skip
# Every option with row chunks (8 rows: two chunks of 4); the single-chunk path (chunk_size=None,
# or larger than N) and the default ("auto") for the combination of all options; several class
# blocks and remainders (N, K not multiples) in test_row_and_class_remainders. Each case compiles its own program (loops cost most of the
# compile time): the matrix is kept to distinct paths.
CASES = [(opt, 4) for opt in OPTIONS] + [("all", None), ("plain", 32), ("lm+all", "auto")]


@functools.partial(jax.jit, static_argnames=("reduction", "options"))
def _reference_vjp(args, y, mask, ct, *, reduction, options):
    """The unfused reference's value and its VJP along ``ct``: one compiled program (run eagerly,
    each of its operations compiles its own), shared by the cases that differ in chunk_size only.
    ``options``: the reference's other keyword arguments, as sorted (name, value) pairs."""

    def unfused(a):
        return reference(
            a["Z"], a["W"], y, bias=a.get("bias"), weights=a.get("weights", mask),
            reduction=reduction, **dict(options),
        )  # fmt: skip

    value, vjp = jax.vjp(unfused, args)
    (grads,) = vjp(ct)
    return value, grads


@pytest.mark.parametrize("option,chunk_size", CASES)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_matches_unfused_reference(getkey, reduction, chunk_size, option):
    opts = dict(OPTIONS[option])
    # The inputs are prepared in NumPy on the host (an eager JAX operation compiles a program).
    Z, W, b, y, s = (np.array(x) for x in make(getkey()))
    if opts.pop("ignore", False):
        y[[1, 6]] = -100
    lead = opts.pop("lead", None)
    if lead is not None:
        Z, y, s = Z.reshape(*lead, -1), y.reshape(lead), s.reshape(lead)
    if opts.get("weight_layout") == "kd":
        W = W.T
    mask = s > 1.0
    Z, W, b, y, s, mask = jax.device_put((Z, W, b, y, s, mask))
    args = {"Z": Z, "W": W}
    if opts.pop("bias", False):
        args["bias"] = b
    kind = opts.pop("weights", None)
    if kind == "float":
        args["weights"] = s
    if kind != "bool":
        mask = None

    def fused(**a):
        return linear_cross_entropy(
            a["Z"], a["W"], y, bias=a.get("bias"), weights=a.get("weights", mask),
            reduction=reduction, chunk_size=chunk_size, **opts,
        )  # fmt: skip

    value, vjp = jax.vjp(lambda a: fused(**a), args)
    # A random cotangent: for "none" that is a per-sample weighting of the gradient.
    ct = jax.random.normal(getkey(), value.shape, value.dtype)
    ref_value, ref_grads = _reference_vjp(
        args, y, mask, ct, reduction=reduction, options=tuple(sorted(opts.items()))
    )
    assert value.shape == ref_value.shape
    assert_close(value, ref_value, rtol=RTOL64)
    (grads,) = vjp(ct)
    assert grads.keys() == args.keys()
    for name in args:
        assert grads[name].shape == args[name].shape and grads[name].dtype == args[name].dtype
        assert rel_err(grads[name], ref_grads[name]) <= RTOL64, name


def test_equals_optax_integer_label_loss(getkey):
    Z, W, _, y, _ = make(getkey(), n=9, k=5)

    def ref(Z, W):
        return optax.softmax_cross_entropy_with_integer_labels(Z @ W, y).mean()

    value, grads = jax.value_and_grad(lambda Z, W: linear_cross_entropy(Z, W, y), (0, 1))(Z, W)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(ref, (0, 1)))(Z, W)
    assert_close(value, ref_value)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


# Columns come in blocks of K_BLOCK, here SMALL_BLOCK (the `small_column_blocks` fixture: the
# same loops as 2048-column blocks, at a fraction of the compile and run time): K = 2 blocks + 5
# runs the class loop over whole blocks and a remainder, K = 1 block + 3 one whole block
# (inlined) and a remainder, K = 1 a single partial block; N = 11 in chunks of 4 a row
# remainder, N = 1 a lone partial chunk.
SMALL_BLOCK = 3
TWO_BLOCKS, ONE_BLOCK = 2 * SMALL_BLOCK + 5, SMALL_BLOCK + 3


@pytest.fixture
def small_column_blocks(monkeypatch):
    monkeypatch.setattr(_kernel, "K_BLOCK", SMALL_BLOCK)


REMAINDER_OPTIONS = {
    "smoothing": {"label_smoothing": 0.1},
    "softcap+z_loss+kd": {"label_smoothing": 0.1, "softcap": 3.0, "z_loss": 1e-2,
                          "weight_layout": "kd"},
}  # fmt: skip


@pytest.mark.parametrize(
    "n,chunk_size,k,reduction,option",
    [
        (11, 4, TWO_BLOCKS, "sum", "smoothing"),
        (11, 4, TWO_BLOCKS, "none", "softcap+z_loss+kd"),
        (1, 4, ONE_BLOCK, "mean", "softcap+z_loss+kd"),
        (9, 9, 1, "sum", "smoothing"),
    ],
)
def test_row_and_class_remainders(getkey, small_column_blocks, n, chunk_size, k, reduction, option):
    opts = REMAINDER_OPTIONS[option]
    Z, W, b, y, s = make(getkey(), n=n, k=k)
    W = W.T if opts.get("weight_layout") == "kd" else W
    ct = jnp.linspace(-1.0, 2.0, n) if reduction == "none" else 1.0

    def f(fn):
        def loss(Z, W, b):
            out = fn(Z, W, y, bias=b, weights=s, reduction=reduction, **opts)
            return jnp.sum(ct * out)

        return loss

    @jax.jit  # the references: one compiled program
    def unfused(Z, W, b):
        value, grads = jax.value_and_grad(f(reference), (0, 1, 2))(Z, W, b)
        A = Z @ (W.T if opts.get("weight_layout") == "kd" else W) + b
        A = A if "softcap" not in opts else opts["softcap"] * jnp.tanh(A / opts["softcap"])
        return value, grads, jax.nn.logsumexp(A, axis=1), jnp.argmax(A, axis=1)

    ref_value, want, ref_lse, ref_predictions = unfused(Z, W, b)
    fused = f(lambda *a, **kw: linear_cross_entropy(*a, chunk_size=chunk_size, **kw))
    assert_close(fused(Z, W, b), ref_value)
    got = jax.grad(fused, (0, 1, 2))(Z, W, b)
    for g, r in zip(got, want):
        assert_close(g, r)
    # The row statistics over every block: the log-sum-exp and the first argmax.
    _, aux = linear_cross_entropy(Z, W, y, bias=b, chunk_size=chunk_size, return_aux=True, **opts)
    assert_close(aux.lse, ref_lse)
    np.testing.assert_array_equal(aux.predictions, ref_predictions)


def test_finite_differences(getkey):
    Z, W, b, y, s = make(getkey(), d=3)

    def f(Z, W, b, s):
        return linear_cross_entropy(
            Z, W, y, bias=b, weights=s, chunk_size=4, label_smoothing=0.1, z_loss=0.01
        )

    check_grads(f, (Z, W, b, s), order=1, modes=["rev"])


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_all_masked_batch_is_zero_not_nan(getkey, reduction):
    Z, W, b, y, _ = make(getkey())
    zero = jnp.zeros(y.shape)

    def f(Z, W, b):
        out = linear_cross_entropy(Z, W, y, bias=b, weights=zero, reduction=reduction, chunk_size=4)
        return jnp.sum(out), out

    (_, out), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(Z, W, b)
    np.testing.assert_array_equal(out, jnp.zeros_like(out))
    for g in grads:
        np.testing.assert_array_equal(g, jnp.zeros_like(g))


def test_extreme_logits(getkey):
    # |a| ~ 1e4: exp overflows without the max shift, even in float64.
    Z, W, b, y, _ = make(getkey(), scale=3e3)
    A = np.asarray(Z) @ np.asarray(W)  # on the host
    assert 5e3 < float(np.max(np.abs(A))) < 1e5

    def f(fn, **kw):
        return lambda Z, W: fn(Z, W, y, bias=b, **kw)

    fused = f(linear_cross_entropy, chunk_size=4, z_loss=1e-6)
    value, grads = jax.value_and_grad(fused, (0, 1))(Z, W)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(f(reference, z_loss=1e-6), (0, 1)))(Z, W)
    assert np.isfinite(value) and float(value) > 1e3
    assert_close(value, ref_value)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)
    # float32 stays finite at the same scale.
    g32 = jax.grad(fused, 1)(Z.astype(jnp.float32), W.astype(jnp.float32))
    assert g32.dtype == jnp.float32 and bool(np.all(np.isfinite(g32)))


# Tolerances against the float64 reference evaluated on the same rounded inputs:
#  float32: unit roundoff 6e-8; sums over ≤ 64 rows and 7 classes: 1e-5 leaves a wide margin.
#  bfloat16/float16: the GEMMs take G rounded to the input dtype (unit roundoff 3.9e-3 for bf16,
#  4.9e-4 for f16) and accumulate in float32; a few roundoffs relative to the largest entry:
#  2e-2 (bf16) and 5e-3 (f16). The loss itself is computed from float32 logits: 1e-5 (bf16 Z W
#  products are exact in float32, only the summation order differs).
LOW_PRECISION = {
    jnp.float32: (1e-5, 1e-5),
    jnp.bfloat16: (1e-5, 2e-2),
    jnp.float16: (1e-5, 5e-3),
}


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_accumulates_in_float32(getkey, dtype):
    Z, W, b, y, s = make(getkey(), n=32, d=16, k=6, dtype=dtype)

    def f(fn, **kw):
        return lambda Z, W, b: fn(Z, W, y, bias=b, weights=s, label_smoothing=0.1, **kw)

    @jax.jit  # the float64 reference on the same rounded inputs: one compiled program
    def unfused(Z, W, b):
        up = [x.astype(jnp.float64) for x in (Z, W, b)]
        return jax.value_and_grad(f(reference), (0, 1, 2))(*up)

    value, grads = jax.value_and_grad(f(linear_cross_entropy, chunk_size=16), (0, 1, 2))(Z, W, b)
    ref_value, ref_grads = unfused(Z, W, b)
    assert value.dtype == jnp.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    tol_value, tol_grad = LOW_PRECISION[dtype]
    assert_close(value, ref_value, rtol=tol_value)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, rtol=tol_grad)


def test_gradients_only_where_asked(getkey):
    # symbolic zeros: jax.grad wrt W alone never forms dZ (one GEMM fewer), and vice versa.
    Z, W, _, y, _ = make(getkey())

    def f(Z, W):
        return linear_cross_entropy(Z, W, y, chunk_size=4)

    def ref(Z, W):
        return reference(Z, W, y)

    all_argnums = (0, 1, (0, 1))
    wants = jax.jit(lambda Z, W: [jax.grad(ref, a)(Z, W) for a in all_argnums])(Z, W)
    for argnums, want in zip(all_argnums, wants):
        got = jax.grad(f, argnums)(Z, W)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert_close(g, r)

    def dots(argnums):
        text = str(jax.make_jaxpr(jax.grad(f, argnums))(Z, W))
        return text.count("dot_general")

    assert dots(0) < dots((0, 1)) and dots(1) < dots((0, 1))


def test_jit_vmap_and_closed_over_labels(getkey):
    Z, W, b, y, _ = make(getkey())

    def f(W, Z):  # y is a concrete array closed over inside jit: still validated, still exact.
        return linear_cross_entropy(Z, W, y, bias=b, chunk_size=4)

    def ref(W, Z):
        return reference(Z, W, y, bias=b)

    Ws = jnp.stack([W, 0.5 * W])

    @jax.jit  # the references: one compiled program
    def unfused(W, Ws, Z):
        return jax.grad(ref)(W, Z), jax.vmap(jax.grad(ref), (0, None))(Ws, Z)

    want, want_vmap = unfused(W, Ws, Z)
    assert_close(jax.jit(jax.grad(f))(W, Z), want)
    assert_close(jax.vmap(jax.grad(f), (0, None))(Ws, Z), want_vmap)


def test_traced_out_of_range_label_gives_nan(getkey):
    Z, W, _, y, _ = make(getkey())
    bad = np.array(y)  # set on the host (an eager JAX operation compiles a program)
    bad[3] = W.shape[1]
    bad = jax.device_put(bad)

    @jax.jit
    def f(W, y):
        return jax.value_and_grad(lambda W: linear_cross_entropy(Z, W, y, chunk_size=4))(W)

    value, g = f(W, bad)
    assert np.isnan(value) and bool(np.all(np.isnan(g)))
    value, g = f(W, y)
    assert np.isfinite(value) and bool(np.all(np.isfinite(g)))


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _shapes(sub)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_no_array_as_large_as_the_logits(getkey, reduction):
    n, d, k, chunk = 32, 3, 12, 8
    Z, W, b, y, _ = make(getkey(), n=n, d=d, k=k)

    def f(Z, W, b):
        out = linear_cross_entropy(Z, W, y, bias=b, reduction=reduction, chunk_size=chunk)
        return jnp.sum(out * jnp.arange(out.size))

    jaxpr = jax.make_jaxpr(jax.value_and_grad(f, (0, 1, 2)))(Z, W, b).jaxpr
    largest = max(int(np.prod(s)) for s in _shapes(jaxpr))
    assert largest <= max(chunk * k, n * d, d * k) < n * k


def _temp_bytes(f, *specs, **options):
    compiled = jax.jit(f).lower(*specs).compile(compiler_options=options or None)
    analysis = compiled.memory_analysis()
    if analysis is None:  # pragma: no cover - backends without memory analysis
        pytest.skip("no compiled memory analysis on this backend")
    return analysis.temp_size_in_bytes


@pytest.mark.parametrize(
    "options",
    [{}, {"xla_cpu_experimental_ynn_fusion_type": ""}],
    ids=["default", "no-library-fusion"],
)
def test_memory_of_value_and_grad(options):
    """Compile only (no arrays allocated): XLA's buffer assignment is deterministic.

    At N=16384, D=1024, K=32768, float32, chunk 1024 the unfused loss holds the (N, K) logits and
    their gradient (2 × 2 GiB). The chunked head holds one (chunk, K) logits chunk (128 MiB) plus
    blocks of ``K_BLOCK`` columns: the chunk's slice of G, the matching columns of W and of the
    dW update (each ≤ max(chunk, D) × K_BLOCK × 4 bytes, three of them with slack), O(N + D)
    vectors, and the (D, K) dW accumulator: reverse mode transposes the custom_jvp's tangent
    ⟨dW, Ẇ⟩, so the gradient is ``ct · dW`` computed from it (one (D, K) temporary).

    On CPU, the ``no-library-fusion`` case turns off XLA's YNNPACK fusions, whose scratch memory
    the analysis cannot see; the bound must hold either way.
    """
    if jax.default_backend() != "cpu":
        options = {}
    n, d, k, chunk, f32 = 16384, 1024, 32768, 1024, 4
    specs = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, k), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def head(Z, W, y):
        return linear_cross_entropy(Z, W, y, chunk_size=chunk)

    def unfused(Z, W, y):
        return optax.softmax_cross_entropy_with_integer_labels(Z @ W, y).mean()

    fused = _temp_bytes(jax.value_and_grad(head, (0, 1)), *specs, **options)
    bound = (chunk + d) * k * f32 + 6 * max(chunk, d) * _kernel.K_BLOCK * f32 + 80 * (n + d) * f32
    assert fused <= bound, f"{fused / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
    baseline = _temp_bytes(jax.value_and_grad(unfused, (0, 1)), *specs, **options)
    assert baseline >= 2 * n * k * f32 * 0.9
    assert baseline / fused >= 13  # ≥ 15 with the default chunks: test_memory_with_default_...


# --------------------------------------------------------------------------------------------
# The conventions of LM training: ignore_index, weight-0 rows, leading dims, "kd", softcap, aux.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_ignored_and_weight0_rows_under_jit(getkey, reduction):
    """-100 labels and weight-0 rows with out-of-range labels contribute nothing, under jit:
    the loss and gradients equal the reference on the kept rows, all finite."""
    Z, W, b, y, s = make(getkey(), n=10)
    y, s = np.array(y), np.array(s)  # set on the host (an eager JAX operation compiles a program)
    y[[0, 3]], y[5], y[7] = -100, 99, -7
    s[[5, 7]] = 0.0
    y, s = jax.device_put((y, s))

    @jax.jit
    def f(Z, W, b, s, y):
        def loss(Z, W, b, s):
            out = linear_cross_entropy(Z, W, y, bias=b, weights=s, reduction=reduction,
                                       chunk_size=4, label_smoothing=0.1)  # fmt: skip
            return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape)), out

        return jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(Z, W, b, s)

    (_, out), grads = f(Z, W, b, s, y)
    keep = np.array([i not in (0, 3, 5, 7) for i in range(10)])

    @jax.jit  # the reference: one compiled program
    def unfused(Z, W, b, s):
        yk = jnp.where(keep, y, 0)

        def ref(Z, W, b, s):
            out = reference(Z, W, yk, bias=b, weights=jnp.where(keep, s, 0.0), reduction=reduction,
                            label_smoothing=0.1)  # fmt: skip
            return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape)), out

        return jax.value_and_grad(ref, (0, 1, 2, 3), has_aux=True)(Z, W, b, s)

    (_, ref_out), ref_grads = unfused(Z, W, b, s)
    assert_close(out, ref_out, rtol=RTOL64)
    for g, r in zip(grads[:3], ref_grads[:3]):
        assert_close(g, r, rtol=RTOL64)
    ds, ref_ds = np.asarray(grads[3]), np.asarray(ref_grads[3])  # no gradient for ignored rows
    assert float(np.max(np.abs(ds[[0, 3]]))) == 0.0
    assert_close(ds[keep], ref_ds[keep], rtol=RTOL64)
    assert bool(np.all(np.isfinite(ds)))


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_all_ignored_batch_is_zero(getkey, reduction):
    Z, W, b, _, _ = make(getkey())
    y = jnp.full((8,), -100)

    @jax.jit
    def f(Z, W, b):
        def loss(Z, W, b):
            out = linear_cross_entropy(Z, W, y, bias=b, reduction=reduction, chunk_size=4)
            return jnp.sum(out), out

        return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(Z, W, b)

    (_, out), grads = f(Z, W, b)
    np.testing.assert_array_equal(out, jnp.zeros_like(out))
    for g in grads:
        np.testing.assert_array_equal(g, jnp.zeros_like(g))


def test_label_checks_skip_ignored_and_weight0_rows():
    # Concrete: -100 and a weight-0 row are not errors; a counted out-of-range label is.
    y = jnp.array([0, -100, 7, 2])
    assert np.isfinite(float(linear_cross_entropy(Z0, W0, y, weights=jnp.array([1, 1, 0, 1]))))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, K\).*got 7 at index 2"):
        linear_cross_entropy(Z0, W0, y)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, K\) = \[0, 5\), got -100"):
        linear_cross_entropy(Z0, W0, jnp.array([0, -100, 1, 2]), ignore_index=None)
    with pytest.raises(ValueError, match=r"at index \(1, 0\)"):
        linear_cross_entropy(jnp.ones((2, 2, 3)), W0, jnp.array([[0, 1], [9, 2]]))


def test_leading_dims_equal_the_flattened_call(getkey):
    Z, W, b, y, s = make(getkey(), n=12)
    Z3 = jax.device_put(np.asarray(Z).reshape(2, 3, 2, -1))  # on the host
    y3, s3 = (jax.device_put(np.asarray(x).reshape(2, 3, 2)) for x in (y, s))

    def f(Z, y, s):
        return linear_cross_entropy(Z, W, y, bias=b, weights=s, reduction="none", chunk_size=5)

    out, vjp = jax.vjp(lambda Z: f(Z, y3, s3), Z3)
    flat, flat_vjp = jax.vjp(lambda Z: f(Z, y, s), Z)
    assert out.shape == (2, 3, 2)
    np.testing.assert_array_equal(out.reshape(-1), flat)
    (dZ,), (dZ_flat,) = vjp(jnp.ones_like(out)), flat_vjp(jnp.ones_like(flat))
    assert dZ.shape == Z3.shape
    np.testing.assert_array_equal(dZ.reshape(Z.shape), dZ_flat)


def test_kd_layout_makes_no_transposed_copy(getkey):
    """Layout "kd" reads W (K, D) through dot_general dimension numbers: no transpose."""
    Z, W, _, y, _ = make(getkey())
    E = W.T

    def f(Z, E):
        return linear_cross_entropy(Z, E, y, chunk_size=4, weight_layout="kd")

    text = str(jax.make_jaxpr(jax.value_and_grad(f, (0, 1)))(Z, E))
    assert "transpose" not in text
    dE = jax.grad(f, 1)(Z, E)
    assert dE.shape == E.shape
    assert_close(dE, jax.grad(lambda W: linear_cross_entropy(Z, W, y, chunk_size=4))(W).T)


def test_softcap_finite_differences(getkey):
    Z, W, b, y, s = make(getkey(), d=3, scale=2.0)

    def f(Z, W, b, s):
        return linear_cross_entropy(Z, W, y, bias=b, weights=s, chunk_size=4, softcap=1.0,
                                    label_smoothing=0.1, z_loss=0.01)  # fmt: skip

    check_grads(f, (Z, W, b, s), order=1, modes=["rev"])


def test_aux_lse_predictions_accuracy(getkey):
    Z, W, b, y, s = make(getkey(), n=12)

    @jax.jit  # the references: one compiled program
    def unfused(Z, W, b, y, s):
        A = Z @ W + b
        kept = y != -100
        hits = jnp.sum(jnp.where(kept & (jnp.argmax(A, axis=1) == y), s, 0.0))
        loss = reference(Z.reshape(3, 4, -1), W, y.reshape(3, 4), bias=b, weights=s.reshape(3, 4))
        accuracy = hits / jnp.sum(jnp.where(kept, s, 0.0))
        return loss, jax.nn.logsumexp(A, axis=1), jnp.argmax(A, axis=1), accuracy

    # Labels set on the host (an eager JAX operation compiles a program): row 2 ignored, rows 0, 1
    # and 4 classified right.
    predictions = np.asarray(unfused(Z, W, b, y, s)[2])
    y = np.array(y)
    y[2] = -100
    y[[0, 1, 4]] = predictions[[0, 1, 4]]
    y = jax.device_put(y)
    ref_loss, ref_lse, ref_predictions, ref_accuracy = unfused(Z, W, b, y, s)
    Z3 = jax.device_put(np.asarray(Z).reshape(3, 4, -1))
    y3, s3 = (jax.device_put(np.asarray(x).reshape(3, 4)) for x in (y, s))

    def f(Z, W, b, s):
        return linear_cross_entropy(Z, W, y3, bias=b, weights=s, chunk_size=5, return_aux=True)

    loss, aux = f(Z3, W, b, s3)
    assert_close(loss, ref_loss)
    assert aux.lse.shape == aux.predictions.shape == (3, 4)
    assert_close(aux.lse.reshape(-1), ref_lse)
    np.testing.assert_array_equal(aux.predictions.reshape(-1), ref_predictions)
    np.testing.assert_allclose(aux.accuracy, ref_accuracy, rtol=1e-14)
    assert 0.0 < float(aux.accuracy) < 1.0

    # No gradient flows through aux.
    def with_aux(Z, W, b, s):
        loss, aux = f(Z, W, b, s)
        return loss + jnp.sum(aux.lse) + aux.accuracy

    def plain(Z, W, b, s):
        return f(Z, W, b, s)[0]

    got = jax.grad(with_aux, (0, 1, 2, 3))(Z3, W, b, s3)
    want = jax.grad(plain, (0, 1, 2, 3))(Z3, W, b, s3)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_per_sample_loss_nonnegative_on_confident_rows(getkey):
    """The target logit comes from the same logits as the log-sum-exp: ℓ_i ≥ 0 exactly, even
    where the row is classified with probability 1 in float32."""

    @jax.jit  # the problem: one compiled program
    def problem(key):
        kz, kw = jax.random.split(key)
        Z = jax.random.normal(kz, (256, 64), jnp.float32)
        W = 30.0 * jax.random.normal(kw, (64, 1000), jnp.float32)
        return Z, W, jnp.argmax(Z @ W, axis=1)

    Z, W, y = problem(getkey())
    per = np.asarray(linear_cross_entropy(Z, W, y, reduction="none", chunk_size=64))
    assert float(np.min(per)) >= 0.0
    assert float(np.median(per)) < 1e-3  # the rows are confident


def test_named_scope_in_the_program(getkey):
    Z, W, _, y, _ = make(getkey())
    text = jax.jit(lambda Z, W: linear_cross_entropy(Z, W, y)).lower(Z, W).as_text(debug_info=True)
    assert "linear_cross_entropy" in text


def test_default_chunk_is_frugal():
    """ "auto": the logits chunk about the size of the hidden-state block (Liger's rule), raised
    to GEMM_ROWS rows where that leaves at most MAX_CHUNKS chunks, at least MIN_ROWS rows, within
    the logits budget."""
    assert _head.rows_per_chunk("auto", 16384, 32768, 1024) == _head.GEMM_ROWS
    assert _head.rows_per_chunk("auto", 8192, 50257, 1024) == _head.GEMM_ROWS  # GPT-2's vocabulary
    assert _head.rows_per_chunk("auto", 4096, 50257, 1024) == 512  # MAX_CHUNKS chunks
    assert _head.rows_per_chunk("auto", 1024, 4096, 128) == 128  # a small LM
    assert _head.rows_per_chunk("auto", 256, 4096, 16) == 64  # MIN_ROWS, a power of two
    assert _head.rows_per_chunk("auto", 16384, 262144, 4096) == 256  # the logits budget
    assert _head.rows_per_chunk("auto", 50, 1000, 8) == 50  # fewer rows than one chunk
    assert _head.rows_per_chunk(None, 100, 10**6, 8) == 100
    for k in (50257, 70000, 262144):  # the largest power of two within the budget
        rows = _head.rows_per_chunk("auto", 10**6, k, 10**5)
        assert 4 * k * rows <= _head.LOGITS_BUDGET < 4 * k * 2 * rows, k


# Low precision at N = 65536 with reduction="mean": the mean's 1/N (1.5e-5) and the softmax
# entries (~1/K = 4e-3) multiply to ~6e-8 per residual entry, float16's smallest subnormal.
# Folding 1/N into the float16 residual flushed them (rel. error 0.18 on dW); with 1/N applied
# to the float32 GEMM result the error is that of the float16 operands (roundoff 4.9e-4,
# accumulated in float32) and of the output's rounding. dZ's entries are ~1/N themselves:
# float16 stores them as subnormals (spacing 2^-24 = 6e-8), a floor of 2^-24 / max|dZ| ≈ 5e-3
# whatever the algorithm, so dZ is checked to 1e-2 (twice the floor) and dW to 5e-3 (10×
# the roundoff). bfloat16 (roundoff 3.9e-3, float32's exponent range): 2e-2 for both.
LOW_N = 65536
LOW_TOL = {jnp.float16: (1e-2, 5e-3), jnp.bfloat16: (2e-2, 2e-2)}


@functools.partial(jax.jit, static_argnums=0)
def _low_problem(dtype):
    kz, kw, ky = jax.random.split(jax.random.key(9), 3)
    Z = jax.random.normal(kz, (LOW_N, 16)).astype(dtype)
    W = (0.1 * jax.random.normal(kw, (16, 256))).astype(dtype)
    y = jax.random.randint(ky, (LOW_N,), 0, 256)
    return Z, W, y


@pytest.mark.parametrize("dtype", LOW_TOL)
def test_low_precision_mean_at_large_n(dtype):
    import softmax_jax as sj

    Z, W, y = _low_problem(dtype)
    up = jax.device_put((np.asarray(Z, np.float64), np.asarray(W, np.float64)))  # on the host
    tol_dZ, tol_dW = LOW_TOL[dtype]

    def head(Z, W, y):
        return linear_cross_entropy(Z, W, y, chunk_size=16384)

    dZ, dW = jax.grad(head, (0, 1))(Z, W, y)
    rZ, rW = jax.jit(jax.grad(head, (0, 1)))(*up, y)  # the float64 reference: one program
    assert rel_err(dZ, rZ) <= tol_dZ and rel_err(dW, rW) <= tol_dW
    # The core's hand-written gradient, and the autodiff cross-check at its own tolerance.
    assert (
        rel_err(sj.grad(W, Z, y, reduction="mean"), sj.grad(*up[::-1], y, reduction="mean"))
        <= tol_dW
    )
    assert sj.check_grad(W, Z, y, reduction="mean").passed


@pytest.mark.parametrize(
    ("layout", "n", "d", "k", "ratio"),
    [("dk", 16384, 1024, 32768, 15), ("kd", 16384, 1024, 32768, 15), ("kd", 16 * 64, 128, 4096, 4)],
)
def test_memory_with_default_arguments(layout, n, d, k, ratio):
    """Compile only. Default arguments (chunk_size="auto") hold ≥ 15× less than the unfused
    loss at N=16384, D=1024, K=32768 and ≥ 4× less at a small LM's B=16, T=64, D=128, K=4096
    (tied); the tied (K, D) layout holds within 1.25× of (D, K) (no transposed copy of W)."""
    w_shape = (d, k) if layout == "dk" else (k, d)
    specs = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct(w_shape, jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def head(Z, W, y):
        return linear_cross_entropy(Z, W, y, weight_layout=layout)

    def unfused(Z, W, y):
        A = Z @ W if layout == "dk" else Z @ W.T
        return optax.softmax_cross_entropy_with_integer_labels(A, y).mean()

    fused = _temp_bytes(jax.value_and_grad(head, (0, 1)), *specs)
    assert _temp_bytes(jax.value_and_grad(unfused, (0, 1)), *specs) / fused >= ratio
    if layout == "kd" and ratio == 15:
        dk_specs = (specs[0], jax.ShapeDtypeStruct((d, k), jnp.float32), specs[2])
        dk = _temp_bytes(jax.value_and_grad(linear_cross_entropy, (0, 1)), *dk_specs)
        assert fused <= 1.25 * dk, f"kd {fused / 2**20:.1f} MiB vs dk {dk / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------------
# Inside a model.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("d_in", "hidden", "k"))
def _mlp_params(key, d_in=5, hidden=8, k=6):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "W1": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
        "b1": jnp.zeros(hidden),
        "W2": jax.random.normal(k2, (hidden, k)) / np.sqrt(hidden),
        "b2": 0.1 * jax.random.normal(k3, (k,)),
    }


def _head_chunk8(*args, **kwargs):
    return linear_cross_entropy(*args, chunk_size=8, **kwargs)


@jax.jit
@jax.value_and_grad
def _mlp_loss(params, x, y, head):
    """A two-layer MLP whose last layer is ``head`` (a Partial: a pytree, so jit can take it)."""
    h = jnp.tanh(x @ params["W1"] + params["b1"])
    return head(h, params["W2"], y, bias=params["b2"], label_smoothing=0.1)


def test_mlp_trained_with_optax(getkey):
    params = _mlp_params(getkey())
    x = jax.random.normal(getkey(), (32, 5))
    y = jax.random.randint(getkey(), (32,), 0, 6)
    fused = jax.tree_util.Partial(_head_chunk8)

    loss, got = _mlp_loss(params, x, y, fused)
    ref_loss, want = _mlp_loss(params, x, y, jax.tree_util.Partial(reference))
    assert_close(loss, ref_loss)
    for name in params:  # jax.grad of the whole model through the head
        assert rel_err(got[name], want[name]) <= RTOL64, name

    opt = optax.adam(0.1)

    @jax.jit  # the optimiser's step: one compiled program (eagerly, one per operation)
    def step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(opt.init)(params)
    losses = []
    for _ in range(25):
        loss, grads = _mlp_loss(params, x, y, fused)
        params, state = step(grads, state, params)
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0]  # trains: the head passes its gradient to W1


def test_equinox_model(getkey):
    import equinox as eqx  # in the test extra: a missing equinox fails here rather than skips

    class Classifier(eqx.Module):
        body: eqx.nn.MLP
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.body = eqx.nn.MLP(5, 8, 16, depth=1, key=k1)
            self.head = eqx.nn.Linear(8, 6, key=k2)

        def loss(self, x, y, head_loss):
            h = jax.vmap(self.body)(x)
            # eqx.nn.Linear stores (out, in): the head wants W as (D, K).
            return head_loss(h, self.head.weight.T, y, bias=self.head.bias, z_loss=1e-3)

    model = eqx.filter_jit(Classifier)(getkey())  # its initialisation: one compiled program
    x = jax.random.normal(getkey(), (24, 5))
    y = jax.random.randint(getkey(), (24,), 0, 6)
    fused = jax.tree_util.Partial(linear_cross_entropy, chunk_size=6)

    grad = eqx.filter_jit(eqx.filter_grad(lambda m, head: m.loss(x, y, head)))
    got = grad(model, fused)
    want = grad(model, jax.tree_util.Partial(reference))
    leaves = jax.tree.leaves(want)
    assert len(leaves) == 6  # MLP (2 layers) and head: weights and biases
    for g, w in zip(jax.tree.leaves(got), leaves):
        assert rel_err(g, w) <= RTOL64


# --------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------

Z0, W0, Y0 = jnp.ones((4, 3)), jnp.ones((3, 5)), jnp.array([0, 1, 2, 4])

BAD = [
    ({"labels": jnp.array([0, 1, 5, 2])}, ValueError, r"`labels` must lie in \[0, K\) = \[0, 5\) or ignore_index = -100, got 5 at index 2"),
    ({"labels": jnp.array([0, -1, 2, 2])}, ValueError, r"`labels` must lie in \[0, K\).*got -1 at index 1"),
    ({"labels": jnp.array([0, 1, 2])}, ValueError, r"`labels` must have shape \(\.\.\.\) = \(4,\).*got \(3,\)"),
    ({"labels": jnp.ones(4)}, TypeError, r"`labels` must have an integer dtype, got float"),
    ({"W": jnp.ones((2, 5))}, ValueError, r"feature dimension D.*\(D=3\).*\(D=2\)"),
    ({"Z": jnp.ones(())}, ValueError, r"`Z` must have shape \(\.\.\., D\), got \(\)"),
    ({"Z": jnp.ones((4, 3, 1))}, ValueError, r"feature dimension D.*\(D=1\).*\(D=3"),
    ({"W": jnp.ones(3)}, ValueError, r"`W` must have shape \(D, K\) \(weight_layout='dk'\), got \(3,\)"),
    ({"W": jnp.ones(3), "weight_layout": "kd"}, ValueError, r"`W` must have shape \(K, D\) \(weight_layout='kd'\), got \(3,\)"),
    ({"Z": jnp.ones((4, 3), jnp.int32)}, TypeError, r"`Z` must have a floating dtype, got int32"),
    ({"bias": jnp.ones(4)}, ValueError, r"`bias` must have shape \(K,\) = \(5,\).*got \(4,\)"),
    ({"weights": jnp.ones(5)}, ValueError, r"`weights` must have shape \(\.\.\.\) = \(4,\).*got \(5,\)"),
    ({"weights": jnp.ones(3)}, ValueError, r"`weights` must have shape \(\.\.\.\) = \(4,\).*got \(3,\)"),
    ({"weights": jnp.array([1.0, jnp.nan, 1.0, 1.0])}, ValueError, r"`weights` must be finite, got nan at flat index 1"),
    ({"weights": jnp.array([1.0, -1.0, 1.0, 1.0])}, ValueError, r"`weights` must be >= 0, got -1"),
    ({"chunk_size": 0}, ValueError, r"`chunk_size` must be a positive int, 'auto' or None, got 0"),
    ({"chunk_size": -3}, ValueError, r"`chunk_size` must be a positive int, 'auto' or None, got -3"),
    ({"chunk_size": 2.5}, TypeError, r"`chunk_size` must be a positive int, 'auto' or None, got float 2.5"),
    ({"chunk_size": True}, TypeError, r"`chunk_size` must be a positive int, 'auto' or None, got bool"),
    ({"label_smoothing": 1.0}, ValueError, r"`label_smoothing` must lie in \[0, 1\), got 1.0"),
    ({"label_smoothing": -0.1}, ValueError, r"`label_smoothing` must lie in \[0, 1\), got -0.1"),
    ({"z_loss": -1e-4}, ValueError, r"`z_loss` must be >= 0, got -0.0001"),
    ({"z_loss": float("nan")}, ValueError, r"`z_loss` must be >= 0, got nan"),
    ({"reduction": "avg"}, ValueError, r"`reduction` must be one of 'sum', 'mean', 'none', got 'avg'"),
]  # fmt: skip


@pytest.mark.parametrize("change,error,match", BAD)
def test_bad_input(change, error, match):
    args = {"Z": Z0, "W": W0, "labels": Y0, **change}
    Z, W, labels = args.pop("Z"), args.pop("W"), args.pop("labels")
    with pytest.raises(error, match=match):
        linear_cross_entropy(Z, W, labels, **args)


def test_arrays_by_position_or_name_options_by_name_only():
    ref = linear_cross_entropy(Z0, W0, Y0)
    assert linear_cross_entropy(Z=Z0, W=W0, labels=Y0) == ref
    with pytest.raises(TypeError, match="positional"):
        linear_cross_entropy(Z0, W0, Y0, None)  # the bias (every option) by keyword only


def test_traced_configuration_is_rejected():
    with pytest.raises(TypeError, match=r"`label_smoothing` must be a Python float"):
        jax.jit(lambda ls: linear_cross_entropy(Z0, W0, Y0, label_smoothing=ls))(0.1)


def test_docstring_examples(monkeypatch):
    import doctest

    import softmax_jax

    # The example uses the public name; until __init__ re-exports it, provide it here.
    monkeypatch.setattr(softmax_jax, "linear_cross_entropy", linear_cross_entropy, raising=False)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(linear_cross_entropy, "linear_cross_entropy", globs={}):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 5 and results.failed == 0


LABEL_DTYPES = ("int8", "int16", "int32", "uint8", "uint16", "uint32")


@pytest.mark.parametrize(
    "dtype",
    [*LABEL_DTYPES, pytest.param("int64", marks=pytest.mark.x64),
     pytest.param("uint64", marks=pytest.mark.x64)],
)  # fmt: skip
def test_labels_of_every_integer_dtype(getkey, dtype):
    """Every integer dtype gives the int32 result, eagerly and under jit: ``-100`` as the dtype
    holds it (65436 in uint16) is ignored; a counted label outside [0, K) is the same clear
    error eagerly, whatever the dtype (no wrap-around into range through a narrower dtype)."""
    Z, W, _, y, _ = make(getkey(), n=9, d=4, k=6)
    y = np.asarray(y).copy()
    y[[1, 4]] = -100
    ref = linear_cross_entropy(Z, W, jnp.asarray(y, jnp.int32), reduction="none")
    held = y.astype(dtype)  # -100's bit pattern in unsigned dtypes
    eager = linear_cross_entropy(Z, W, held, reduction="none")
    traced = jax.jit(lambda Z, W, y: linear_cross_entropy(Z, W, y, reduction="none"))(Z, W, held)
    for got in (eager, traced):
        assert np.all(np.isfinite(got))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    bad = held.copy()
    bad[2] = np.iinfo(dtype).max  # not a class, not ignore_index
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, K\)"):
        linear_cross_entropy(Z, W, bad)


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.float64))
@pytest.mark.parametrize("smoothing", (0.0, 0.2))
def test_huge_equal_tied_logits_do_not_cancel(dtype, smoothing):
    """Z ≈ 1e30 against equal columns of a tied table: every logit equal and huge, so the
    exact loss is log K per row (smoothing or not) and the gradient (softmax − targets) Zᵀ;
    lse − a_y would round to 0 (m + log K = m in floating point)."""
    k, d = 10, 4
    E = jnp.ones((k, d), dtype)
    h = jnp.full((3, d), 2.5e29, dtype)
    y = jnp.array([0, 3, 9])
    per = linear_cross_entropy(h, E, y, weight_layout="kd", reduction="none",
                               label_smoothing=smoothing)  # fmt: skip
    np.testing.assert_allclose(np.asarray(per), np.log(k), rtol=1e-6)
    dE = jax.grad(lambda E: linear_cross_entropy(h, E, y, weight_layout="kd",
                                                 label_smoothing=smoothing))(E)  # fmt: skip
    t = (1 - smoothing) * np.eye(k)[np.asarray(y)] + smoothing / k
    ref = (1.0 / k - t).T @ np.asarray(h, np.float64) / 3
    np.testing.assert_allclose(np.asarray(dE, np.float64), ref, rtol=1e-5)
