"""Tests of hessjax.hessian against dense Hessians (jax.hessian on the ravelled params)."""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import hessjax.hessian as H
from hessjax.partition import layer_partition as partition
from tests import _models as M

MODELS = tuple(M.FACTORIES)
ACTIVATIONS = ("tanh", "relu")
DTYPES = ("float32", "float64")
# Relative tolerance of a product against the dense reference, scaled by max|H v|.
RTOL = {"float32": 2e-5, "float64": 1e-12}

_CACHE: dict = {}


def _problem(name: str, activation: str, dtype: str):
    """(loss_fn, params, batch, dense H as float64 numpy); call inside the dtype's x64 context."""
    key = (name, activation, dtype)
    if key not in _CACHE:
        loss_fn, params, batch = M.FACTORIES[name](dtype=jnp.dtype(dtype), activation=activation)
        dense = np.asarray(M.dense_hessian(loss_fn, params, batch), np.float64)
        _CACHE[key] = (loss_fn, params, batch, dense)
    return _CACHE[key]


def _random_like(params, dtype: str, seed: int, num: int | None = None):
    """A random vector like ``params`` (or ``num`` of them stacked) and its flat numpy form."""
    size = M.ravel(params).size
    rng = np.random.default_rng(seed)
    if num is None:
        flat = rng.normal(size=size)
        return M.unravel(params, jnp.asarray(flat, dtype)), flat.astype(dtype)
    flat = rng.normal(size=(num, size))
    stacked = jax.vmap(lambda f: M.unravel(params, f))(jnp.asarray(flat, dtype))
    return stacked, flat.astype(dtype)


def _assert_close(got, ref, dtype: str):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = max(np.abs(ref).max(), 1e-30)
    np.testing.assert_allclose(got, ref, rtol=0, atol=RTOL[dtype] * scale)


def _flat_stacked(tree) -> np.ndarray:
    return np.asarray(jax.vmap(M.ravel)(tree))


def _case(name, activation, dtype):
    return dict(
        testcase_name=f"{name}_{activation}_{dtype}", name=name, activation=activation, dtype=dtype
    )


# Default cases: every model with both activations and both dtypes, every (activation, dtype)
# pair on a dict and an nnx model. The rest of the full product runs with -m slow.
_DEFAULT = [
    ("dict_mlp", "tanh", "float32"),
    ("dict_mlp", "relu", "float64"),
    ("dict_cnn", "relu", "float32"),
    ("dict_cnn", "tanh", "float64"),
    ("nnx_mlp", "relu", "float32"),
    ("nnx_mlp", "tanh", "float64"),
    ("nnx_cnn", "tanh", "float32"),
    ("nnx_cnn", "relu", "float64"),
]
_REST = [c for c in itertools.product(MODELS, ACTIVATIONS, DTYPES) if c not in _DEFAULT]
# Heavier checks (several chunk sizes, two partitions) by default on one case per model.
_DEFAULT_HEAVY = [c for c in _DEFAULT if (c[1], c[2]) in {("tanh", "float32"), ("relu", "float64")}]


def _dense_reference_tests(cases, heavy_cases, batched_cases):
    """A test class checking every product against the dense Hessian on ``cases``."""
    cases = [_case(*c) for c in cases]
    heavy_cases = [_case(*c) for c in heavy_cases]
    batched_cases = [_case(*c) for c in batched_cases]

    class DenseReference(chex.TestCase):
        def _setup(self, name, activation, dtype):
            self.enter_context(jax.enable_x64(dtype == "float64"))
            return _problem(name, activation, dtype)

        @chex.variants(with_jit=True, without_jit=True)
        @parameterized.named_parameters(*cases)
        def test_hvp(self, name, activation, dtype):
            loss_fn, params, batch, dense = self._setup(name, activation, dtype)
            v, flat = _random_like(params, dtype, seed=1)
            out = self.variant(functools.partial(H.hvp, loss_fn))(params, v, batch)
            chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
            _assert_close(M.ravel(out), dense @ flat, dtype)

        @chex.variants(with_jit=True, without_jit=True)
        @parameterized.named_parameters(*cases)
        def test_hvp_fn_reused_across_vectors(self, name, activation, dtype):
            loss_fn, params, batch, dense = self._setup(name, activation, dtype)
            (v1, f1), (v2, f2) = (_random_like(params, dtype, seed=s) for s in (2, 3))

            def two_products(params, v1, v2, batch):
                matvec = H.hvp_fn(loss_fn, params, batch)
                return matvec(v1), matvec(v2)

            out1, out2 = self.variant(two_products)(params, v1, v2, batch)
            chex.assert_trees_all_equal_shapes_and_dtypes(out1, params)
            _assert_close(M.ravel(out1), dense @ f1, dtype)
            _assert_close(M.ravel(out2), dense @ f2, dtype)

        @chex.variants(with_jit=True, without_jit=True)
        @parameterized.named_parameters(*batched_cases)
        def test_batched_hvp_chunks_equal_unbatched(self, name, activation, dtype):
            loss_fn, params, batch, dense = self._setup(name, activation, dtype)
            vs, flat = _random_like(params, dtype, seed=4, num=7)
            matvec = H.hvp_fn(loss_fn, params, batch)
            single = np.stack([M.ravel(matvec(jax.tree.map(lambda x: x[i], vs))) for i in range(7)])
            _assert_close(single, flat @ dense.T, dtype)
            for chunk_size in (None, 3):  # 3 does not divide 7
                fn = lambda p, vs, b: H.batched_hvp(loss_fn, p, vs, b, chunk_size=chunk_size)
                out = self.variant(fn)(params, vs, batch)
                chex.assert_trees_all_equal_shapes_and_dtypes(out, vs)
                # Same linear map and arithmetic as the single products, up to the summation
                # order of a batched matmul: at most a few ulps of the largest entry.
                got = _flat_stacked(out)
                eps = np.finfo(dtype).eps
                np.testing.assert_allclose(got, single, rtol=0, atol=8 * eps * np.abs(single).max())

        @chex.variants(with_jit=True, without_jit=True)
        @parameterized.named_parameters(*heavy_cases)
        def test_block_hvp(self, name, activation, dtype):
            loss_fn, params, batch, dense = self._setup(name, activation, dtype)
            v, flat = _random_like(params, dtype, seed=5)
            for part in (
                partition(params),  # kernels only, one layer each
                partition(params, select="kernel|bias|scale", group="module"),
            ):
                mask = M.block_mask(part, params)
                fn = lambda p, v, b: H.block_hvp(loss_fn, p, v, part, b, chunk_size=2)
                out = self.variant(fn)(params, v, batch)
                chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
                _assert_close(M.ravel(out), (dense * mask) @ flat, dtype)
                # The off-diagonal blocks matter: the full product differs from the blocks'.
                assert np.abs((dense * (1 - mask)) @ flat).max() > 1e-3

    return DenseReference


_DEFAULT_BATCHED = [("dict_mlp", "tanh", "float32"), ("nnx_mlp", "tanh", "float64")]
DenseReferenceTest = _dense_reference_tests(_DEFAULT, _DEFAULT_HEAVY, _DEFAULT_BATCHED)
DenseReferenceSlowTest = pytest.mark.slow(
    _dense_reference_tests(
        _REST,
        [c for c in _DEFAULT + _REST if c not in _DEFAULT_HEAVY],
        [c for c in _DEFAULT + _REST if c not in _DEFAULT_BATCHED],
    )
)


def test_block_hvp_fn_equals_block_hvp_and_any_chunk():
    loss_fn, params, batch, dense = _problem("nnx_cnn", "tanh", "float32")
    part = partition(params, select="kernel|bias", group="module")
    v, flat = _random_like(params, "float32", seed=6)
    ref = (dense * M.block_mask(part, params)) @ flat
    for chunk_size in (None, 1, 3):  # 4 layers; 3 does not divide 4
        blocks = jax.jit(H.block_hvp_fn(loss_fn, params, part, batch, chunk_size=chunk_size))
        _assert_close(M.ravel(blocks(v)), ref, "float32")
    _assert_close(M.ravel(H.block_hvp(loss_fn, params, v, part, batch)), ref, "float32")


def test_batch_matvec_dense_matrix_any_chunk():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(5, 5)), jnp.float32)
    vs = {"x": jnp.asarray(rng.normal(size=(11, 2)), jnp.float32), "y": jnp.ones((11, 3))}

    def matvec(v):
        flat = jnp.concatenate([v["x"], v["y"]])
        out = a @ flat
        return {"x": out[:2], "y": out[2:]}

    single = [matvec(jax.tree.map(lambda x: x[i], vs)) for i in range(11)]
    single = jax.tree.map(lambda *xs: np.stack(xs), *single)
    for chunk_size in (None, 1, 4, 12):
        out = H.batch_matvec(matvec, vs, chunk_size=chunk_size)
        for k in ("x", "y"):
            np.testing.assert_allclose(out[k], single[k], rtol=1e-6, atol=1e-6)


def test_per_example_problem_is_consistent_with_the_batch():
    """The shared fixture: mean of per-example Hessians is the batch Hessian."""
    loss_fn, params, batch, dense = _problem("nnx_cnn", "tanh", "float32")
    example_loss, params2, examples = M.example_problem("nnx_cnn")
    chex.assert_trees_all_equal(params, params2)
    chex.assert_trees_all_equal(batch, examples)
    per = jax.vmap(lambda ex: M.dense_hessian(example_loss, params, ex))(examples)
    assert per.shape == (M.NUM_EXAMPLES,) + dense.shape
    np.testing.assert_allclose(np.mean(per, axis=0), dense, atol=2e-6)


# --------------------------------------------------------------------------- tracing
def test_jitted_hvp_is_not_retraced_for_new_vectors():
    loss_fn, params, batch, _ = _problem("dict_mlp", "tanh", "float32")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, v, batch):
        return H.hvp(loss_fn, params, v, batch)

    for seed in range(3):
        v, _ = _random_like(params, "float32", seed=seed)
        step(params, v, batch)
    moved = jax.tree.map(lambda x: x + 0.1, params)
    step(moved, v, batch)  # new params values: still one trace
    with pytest.raises(AssertionError, match="traced > 1 times"):  # and the check can fail
        step(jax.tree.map(lambda x: x.astype(jnp.float16), params), v, batch)


def test_jitted_linearised_matvec_is_not_retraced():
    loss_fn, params, batch, _ = _problem("nnx_cnn", "tanh", "float32")
    matvec = H.hvp_fn(loss_fn, params, batch)
    apply = jax.jit(chex.assert_max_traces(matvec, n=1))
    for seed in range(3):
        v, _ = _random_like(params, "float32", seed=seed)
        apply(v)


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def mlp():
    loss_fn, params, batch, _ = _problem("dict_mlp", "tanh", "float32")
    return loss_fn, params, batch


def test_v_with_other_tree_structure(mlp):
    loss_fn, params, batch = mlp
    v = dict(params)
    del v["out"]
    with pytest.raises(ValueError, match=r"\bv must have the same tree structure"):
        H.hvp(loss_fn, params, v, batch)
    with pytest.raises(ValueError, match=r"\bv must have the same tree structure"):
        H.hvp_fn(loss_fn, params, batch)(v)
    with pytest.raises(ValueError, match=r"\bv must have the same tree structure"):
        H.block_hvp(loss_fn, params, v, partition(params), batch)


def test_v_with_other_shape(mlp):
    loss_fn, params, batch = mlp
    v = jax.tree.map(jnp.zeros_like, params)
    v["hidden2"]["kernel"] = jnp.zeros((5, 4))
    with pytest.raises(ValueError, match=r"v leaf 'hidden2/kernel' has shape \(5, 4\)"):
        H.hvp(loss_fn, params, v, batch)
    with pytest.raises(ValueError, match=r"v leaf 'hidden2/kernel' has shape"):
        H.hvp_fn(loss_fn, params, batch)(v)


def test_v_with_other_dtype(mlp):
    loss_fn, params, batch = mlp
    v = jax.tree.map(jnp.zeros_like, params)
    v["out"]["bias"] = v["out"]["bias"].astype(jnp.bfloat16)
    with pytest.raises(TypeError, match=r"v leaf 'out/bias' has dtype bfloat16"):
        H.hvp(loss_fn, params, v, batch)
    with pytest.raises(TypeError, match=r"v leaf 'out/bias' has dtype"):
        H.hvp_fn(loss_fn, params, batch)(v)


def test_vs_without_or_with_mismatched_probe_axis(mlp):
    loss_fn, params, batch = mlp
    with pytest.raises(ValueError, match=r"\bvs leaf"):
        H.batched_hvp(loss_fn, params, params, batch)  # no leading probe axis
    vs = jax.tree.map(lambda x: jnp.zeros((3,) + x.shape), params)
    vs["out"]["bias"] = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"\bvs leaves must share"):
        H.batched_hvp(loss_fn, params, vs, batch)
    with pytest.raises(ValueError, match=r"leaves of vs must share one leading size.*\[3, 4\]"):
        H.batch_matvec(lambda v: v, vs)
    with pytest.raises(ValueError, match=r"every leaf of vs must have a leading"):
        H.batch_matvec(lambda v: v, {"a": jnp.zeros(())})
    with pytest.raises(ValueError, match=r"\bvs must hold at least one row"):
        H.batch_matvec(lambda v: v, {"a": jnp.zeros((0, 2))})


def test_non_scalar_or_integer_or_non_callable_loss(mlp):
    _, params, batch = mlp
    v = jax.tree.map(jnp.zeros_like, params)
    vector_loss = lambda p, b: b["x"] @ p["hidden1"]["kernel"]
    int_loss = lambda p, b: jnp.sum(b["y"])
    for fn in (H.hvp, lambda f, p, v, b: H.hvp_fn(f, p, b)):
        with pytest.raises(ValueError, match=r"loss_fn must return a scalar.*\(8, 5\)"):
            fn(vector_loss, params, v, batch)
        with pytest.raises(TypeError, match=r"loss_fn must return a real floating.*int32"):
            fn(int_loss, params, v, batch)
    with pytest.raises(TypeError, match=r"loss_fn must be callable"):
        H.hvp(None, params, v, batch)


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, True, "4"])
def test_bad_chunk_size(mlp, chunk_size):
    loss_fn, params, batch = mlp
    vs = jax.tree.map(lambda x: jnp.zeros((3,) + x.shape), params)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        H.batched_hvp(loss_fn, params, vs, batch, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        H.batch_matvec(lambda v: v, vs, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        H.block_hvp(loss_fn, params, params, partition(params), batch, chunk_size=chunk_size)


def test_partition_of_other_params(mlp):
    loss_fn, params, batch = mlp
    other = partition({"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"\bparams must have the tree structure"):
        H.block_hvp(loss_fn, params, params, other, batch)
