"""Tests of hessjax.partition: layer selection and naming, per-layer views against numpy."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from hessjax.partition import Partition, leaf_names, path_name
from hessjax.partition import layer_partition as partition
from tests import _models as M


def _params(name: str):
    return M.FACTORIES[name]()[1]


def _random_like(params, seed: int):
    flat = np.random.default_rng(seed).normal(size=M.ravel(params).size).astype(np.float32)
    return M.unravel(params, jnp.asarray(flat)), flat


# --------------------------------------------------------------------------- selection, names
def test_default_selects_ndim_2_leaves_of_a_dict():
    part = partition(_params("dict_mlp"))
    assert part.names == ("hidden1/kernel", "hidden2/kernel", "out/kernel")
    assert part.leaf_names == (
        "hidden1/bias",
        "hidden1/kernel",
        "hidden2/bias",
        "hidden2/kernel",
        "out/bias",
        "out/kernel",
    )
    assert part.leaf_layer == (-1, 0, -1, 1, -1, 2)
    assert part.sizes == (15, 25, 15)
    assert part.num_layers == 3


def test_names_of_an_nnx_state_have_no_trailing_value():
    params = _params("nnx_cnn")
    names = leaf_names(params)
    assert names == [
        "bn/bias",
        "bn/scale",
        "conv1/bias",
        "conv1/kernel",
        "conv2/bias",
        "conv2/kernel",
        "out/bias",
        "out/kernel",
    ]
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert all(isinstance(p[-1], jax.tree_util.GetAttrKey) for p in paths)  # really `.value`
    part = partition(params)
    assert part.names == ("conv1/kernel", "conv2/kernel", "out/kernel")
    assert part.sizes == (54, 54, 24)


def test_path_name_of_sequences_and_attributes():
    params = {"layers": [{"w": jnp.ones((2, 2))}, (jnp.ones(3),)], "value": jnp.ones((1, 1))}
    assert leaf_names(params) == ["layers/0/w", "layers/1/0", "value"]
    path = (jax.tree_util.DictKey("a"), jax.tree_util.GetAttrKey("value"))
    assert path_name(path) == "a"
    assert path_name((jax.tree_util.GetAttrKey("value"),)) == "value"


def test_select_and_exclude_regex_and_callable():
    params = _params("dict_mlp")
    assert partition(params, select="bias").names == ("hidden1/bias", "hidden2/bias", "out/bias")
    assert partition(params, select=r"^hidden").names == (
        "hidden1/bias",
        "hidden1/kernel",
        "hidden2/bias",
        "hidden2/kernel",
    )
    by_size = partition(params, select=lambda name, leaf: leaf.size == 5)
    assert by_size.names == ("hidden1/bias", "hidden2/bias")
    assert partition(params, exclude="out").names == ("hidden1/kernel", "hidden2/kernel")
    excl = partition(params, exclude=lambda name, leaf: leaf.shape[0] == 5)
    assert excl.names == ("hidden1/kernel",)


def test_group_module_and_callable():
    params = _params("nnx_cnn")
    part = partition(params, select="kernel|bias|scale", group="module")
    assert part.names == ("bn", "conv1", "conv2", "out")
    assert part.leaf_layer == (0, 0, 1, 1, 2, 2, 3, 3)
    assert part.sizes == (6, 57, 56, 27)
    body = partition(
        params, select=lambda n, x: True, group=lambda n: None if n.startswith("out") else "body"
    )
    assert body.names == ("body",)
    assert body.leaf_layer == (0, 0, 0, 0, 0, 0, -1, -1)


def test_partition_is_static_and_hashable():
    params = _params("nnx_mlp")
    part = partition(params, group="module")
    assert hash(part) == hash(partition(params, group="module"))
    assert part == partition(params, group="module")
    traces = []

    @jax.jit
    def norms(x):
        traces.append(1)
        return part.sq_norms(x)

    x, flat = _random_like(params, 0)
    for _ in range(2):
        norms(x)
    assert len(traces) == 1
    f = jax.jit(lambda x, p: p.sq_norms(x), static_argnums=1)
    np.testing.assert_allclose(f(x, part), norms(x))


# --------------------------------------------------------------------------- views vs numpy
_VIEW_CASES = [
    dict(testcase_name="dict_cnn_default", name="dict_cnn", kw={}),
    dict(
        testcase_name="nnx_cnn_module",
        name="nnx_cnn",
        kw=dict(select="kernel|bias", group="module"),
    ),
    dict(
        testcase_name="nnx_mlp_excl", name="nnx_mlp", kw=dict(select="kernel|bias", exclude="out")
    ),
]


class ViewsTest(chex.TestCase):
    """dot/scale/restrict/stack/unstack equal the same operations on the ravelled vector."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_VIEW_CASES)
    def test_views(self, name, kw):
        params = _params(name)
        part: Partition = partition(params, **kw)
        ids = M.layer_ids(part, params)
        L = part.num_layers
        (x, fx), (y, fy) = _random_like(params, 1), _random_like(params, 2)
        c_np = np.arange(1.0, L + 1.0, dtype=np.float32)
        tol = dict(rtol=1e-5, atol=1e-5)

        dot = self.variant(part.dot)(x, y)
        np.testing.assert_allclose(dot, [fx[ids == i] @ fy[ids == i] for i in range(L)], **tol)
        sq = self.variant(part.sq_norms)(x)
        np.testing.assert_allclose(sq, [fx[ids == i] @ fx[ids == i] for i in range(L)], **tol)
        scaled = self.variant(part.scale)(x, jnp.asarray(c_np))
        np.testing.assert_allclose(M.ravel(scaled), np.where(ids >= 0, fx * c_np[ids], 0.0))
        restricted = self.variant(part.restrict)(x)
        np.testing.assert_array_equal(M.ravel(restricted), np.where(ids >= 0, fx, 0.0))
        for i in range(L):
            one = self.variant(lambda x: part.restrict(x, i))(x)
            np.testing.assert_array_equal(M.ravel(one), np.where(ids == i, fx, 0.0))
        stacked = self.variant(part.stack)(x)
        flat_stacked = np.asarray(jax.vmap(M.ravel)(stacked))
        np.testing.assert_array_equal(flat_stacked, [np.where(ids == i, fx, 0.0) for i in range(L)])
        np.testing.assert_array_equal(
            M.ravel(self.variant(part.unstack)(stacked)), np.where(ids >= 0, fx, 0.0)
        )
        # unstack takes each layer's leaves from its own copy, whatever the other copies hold.
        rng = np.random.default_rng(3)
        other = rng.normal(size=(L, fx.size)).astype(np.float32)
        other_tree = jax.vmap(lambda f: M.unravel(params, f))(jnp.asarray(other))
        expected = np.where(ids >= 0, other[np.maximum(ids, 0), np.arange(fx.size)], 0.0)
        np.testing.assert_array_equal(M.ravel(self.variant(part.unstack)(other_tree)), expected)
        split = part.split(x)
        assert list(split) == list(part.names)
        for i, layer in enumerate(part.names):
            got = np.concatenate([np.ravel(a) for a in split[layer]])
            np.testing.assert_array_equal(got, fx[ids == i])


@pytest.mark.parametrize("name", ["dict_mlp", "nnx_cnn"])
def test_mask_with_optax_masked(name):
    params = _params(name)
    part = partition(params)
    mask = part.mask()
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    tx = optax.masked(optax.set_to_zero(), mask)
    g, fg = _random_like(params, 4)
    updates, _ = tx.update(g, tx.init(params), params)
    ids = M.layer_ids(part, params)
    np.testing.assert_array_equal(M.ravel(updates), np.where(ids >= 0, 0.0, fg))


# --------------------------------------------------------------------------- bad input
def test_empty_selection():
    params = _params("dict_mlp")
    with pytest.raises(ValueError, match=r"selected no leaf.*select/exclude/group"):
        partition(params, select="nothing_matches")
    with pytest.raises(ValueError, match=r"selected no leaf"):
        partition(params, exclude="kernel")
    with pytest.raises(ValueError, match=r"selected no leaf"):
        partition(params, group=lambda name: None)
    with pytest.raises(ValueError, match=r"selected no leaf"):
        partition({"b": jnp.ones(3)})  # no leaf with ndim >= 2


def test_bad_select_exclude_group_types():
    params = _params("dict_mlp")
    with pytest.raises(TypeError, match=r"\bselect must be None, a regular expression"):
        partition(params, select=3)
    with pytest.raises(TypeError, match=r"\bexclude must be None, a regular expression"):
        partition(params, exclude=["out"])
    with pytest.raises(TypeError, match=r"\bgroup must be None, 'module' or a callable"):
        partition(params, group="layer")


def test_views_reject_other_trees():
    params = _params("dict_mlp")
    part = partition(params)
    x = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match=r"\bx must have the tree structure"):
        part.dot({"w": jnp.ones((2, 2))}, x)
    with pytest.raises(ValueError, match=r"\by must have the tree structure"):
        part.dot(x, {"w": jnp.ones((2, 2))})
    bad = dict(x, out={"bias": jnp.zeros(3), "kernel": jnp.zeros((3, 5))})
    with pytest.raises(ValueError, match=r"\bx leaf 'out/kernel' has shape \(3, 5\)"):
        part.restrict(bad)
    with pytest.raises(ValueError, match=r"\bc must have shape \(3,\)"):
        part.scale(x, jnp.ones(2))
    with pytest.raises(ValueError, match=r"\bstacked leaf"):
        part.unstack(x)  # no leading layer axis


def test_dot_sums_a_bfloat16_leaf_in_the_common_dtype():
    """One layer of a bfloat16 and a float32 leaf: the inner product in float32 (the float64
    sum of the same bfloat16 values to 1e-6), not rounded to bfloat16 (about 4e-3 off)."""
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.normal(size=(40, 50)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)
    x = {"a": a, "b": b}
    part = partition(x, group=lambda name: "all")
    got = part.dot(x, x)
    truth = np.sum(np.asarray(a, np.float64) ** 2) + np.sum(np.asarray(b, np.float64) ** 2)
    assert got.dtype == jnp.float32 and part.num_layers == 1
    np.testing.assert_allclose(float(got[0]), truth, rtol=1e-6)
