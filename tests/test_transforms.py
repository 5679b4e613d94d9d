"""Tests of hessjax.transforms against numpy references and optax/nnx integration."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from hessjax.models import resnet_stage_depth
from hessjax.transforms import (
    anchor_penalty,
    layerwise_radii,
    project_to_anchor,
)

# ---------------------------------------------------------------------------------------------
# numpy references (no shared code path)


def np_project(w, anchor, radius, norm):
    """Projection of w onto the ball of ``radius`` around ``anchor``, written with loops."""
    w = np.asarray(w, np.float64)
    a = np.asarray(anchor, np.float64)
    t = w - a
    if norm == "frobenius":
        n = np.sqrt((t**2).sum())
        return a + t / max(1.0, n / radius)
    if norm == "elementwise":
        return a + np.minimum(np.maximum(t, -radius), radius)
    out = np.empty_like(t)  # inf_op: each output unit (last axis) by its own L1 norm
    for o in range(t.shape[-1]):
        col = t[..., o]
        out[..., o] = col / max(1.0, np.abs(col).sum() / radius)
    return a + out


def np_inf_op_norms(t):
    t = np.asarray(t, np.float64)
    return np.array([np.abs(t[..., o]).sum() for o in range(t.shape[-1])])


def make_params(key, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "conv": {
            "kernel": jax.random.normal(k1, (3, 3, 2, 4), dtype),
            "bias": jnp.zeros(4, dtype),
        },
        "bn": {"scale": 1.0 + 0.1 * jax.random.normal(k2, (4,), dtype)},
        "dense": {
            "kernel": jax.random.normal(k3, (5, 3), dtype),
            "bias": jax.random.normal(k4, (3,), dtype),
        },
    }


RADII = {
    "conv": {"kernel": 0.3, "bias": None},
    "bn": {"scale": None},
    "dense": {"kernel": 0.2, "bias": None},
}


def random_like(key, tree, scale=1.0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)],
    )


# ---------------------------------------------------------------------------------------------
# the shared check of every transform (optax style)

TRANSFORMS = {
    "project_frobenius": lambda: project_to_anchor(RADII, norm="frobenius"),
    "project_inf_op": lambda: project_to_anchor(RADII, norm="inf_op"),
    "project_elementwise": lambda: project_to_anchor(
        lambda n: 0.05 if n.endswith("scale") else None, norm="elementwise"
    ),
    "anchor_penalty": lambda: anchor_penalty(lambda n: 0.5 if "kernel" in n else None),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_shared_chain_jit_no_retrace(name, opt):
    """Every transform: pure init/update, chained after sgd/adam/adamw, jitted, not retraced."""
    base = {
        "sgd": optax.sgd(0.5),
        "adam": optax.adam(0.3),
        "adamw": optax.adamw(0.3, weight_decay=0.1),
    }[opt]
    tx = optax.chain(base, TRANSFORMS[name]())
    params = make_params(jax.random.key(0))
    state = tx.init(params)
    anchor_before = jax.tree.map(np.asarray, state[1].anchor)
    chex.clear_trace_counter()  # the counter is keyed by the function's code, shared by params

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p = params
    for i in range(4):
        p, state = step(p, state, random_like(jax.random.key(i + 1), params))
    chex.assert_trees_all_equal_shapes_and_dtypes(p, params)
    chex.assert_tree_all_finite(p)
    # the anchor in the state is the initial params (None at free leaves) and never changes
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state[1].anchor), anchor_before)
    for leaf, a in zip(
        jax.tree.leaves(params),
        jax.tree.leaves(state[1].anchor, is_leaf=lambda x: x is None),
        strict=True,
    ):
        if a is not None:
            np.testing.assert_array_equal(a, leaf)
    # update without params is a clear error
    with pytest.raises(ValueError, match="params"):
        TRANSFORMS[name]().update(params, TRANSFORMS[name]().init(params))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_shared_nnx_optimizer(name):
    """Every transform inside flax.nnx.Optimizer(model, tx, wrt=nnx.Param), jitted."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
            self.dense = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.dense(self.bn(self.conv(x)).mean(axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    opt = nnx.Optimizer(model, optax.chain(optax.adam(0.5), TRANSFORMS[name]()), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 2))

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        opt.update(model, grads)

    for _ in range(5):
        step(model, opt)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for group, leaf in [("conv", "kernel"), ("dense", "kernel")]:
        t = np.asarray(after[group][leaf]) - before[group][leaf]
        assert np.abs(t).max() > 0  # it trained
        if name == "project_frobenius":
            assert np.linalg.norm(t) <= RADII[group][leaf] * (1 + 1e-5)
        if name == "project_inf_op":
            assert np_inf_op_norms(t).max() <= RADII[group][leaf] * (1 + 1e-5)
    if name == "project_elementwise":
        t = np.asarray(after["bn"]["scale"]) - before["bn"]["scale"]
        assert np.abs(t).max() <= 0.05 * (1 + 1e-5)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_shared_masked_and_multi_transform(name):
    """Inside optax.masked and optax.multi_transform (masked params carry MaskedNode)."""
    params = make_params(jax.random.key(0))
    grads = random_like(jax.random.key(1), params, scale=3.0)
    mask = {"conv": {"kernel": True, "bias": True}, "bn": {"scale": True}, "dense": False}
    # masked: dense is left alone entirely; the transform sees only conv and bn
    tx = optax.chain(optax.sgd(1.0), optax.masked(TRANSFORMS[name](), mask))
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    np.testing.assert_array_equal(updates["dense"]["kernel"], -grads["dense"]["kernel"])
    # multi_transform: frozen dense, transform on the rest, applied to the same leaves
    labels = {"conv": {"kernel": "a", "bias": "a"}, "bn": {"scale": "a"}, "dense": "frozen"}
    tx2 = optax.multi_transform(
        {"a": optax.chain(optax.sgd(1.0), TRANSFORMS[name]()), "frozen": optax.set_to_zero()},
        labels,
    )
    updates2, _ = tx2.update(grads, tx2.init(params), params)
    np.testing.assert_array_equal(updates2["dense"]["kernel"], 0.0)
    chex.assert_trees_all_close(updates2["conv"], updates["conv"], rtol=1e-6)
    chex.assert_trees_all_close(updates2["bn"], updates["bn"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# project_to_anchor against numpy, with and without jit, float32 and float64


class ProjectTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        norm=["frobenius", "inf_op", "elementwise"], dtype=["float32", "float64"]
    )
    def test_matches_numpy(self, norm, dtype):
        with jax.enable_x64(dtype == "float64"):
            dt = jnp.dtype(dtype)
            params = make_params(jax.random.key(3), dt)
            anchor = random_like(jax.random.key(4), params, scale=0.1)
            updates = random_like(jax.random.key(5), params, scale=0.5)
            radii = {
                "conv": {"kernel": 0.4, "bias": 0.01},
                "bn": {"scale": jnp.asarray(0.02, dt)},  # a traced-able array radius
                "dense": None,
            }
            tx = project_to_anchor(radii, norm=norm, anchor=anchor)
            out, _ = self.variant(tx.update)(updates, tx.init(params), params)
            new = optax.apply_updates(params, out)
            tol = 1e-5 if dtype == "float32" else 1e-12
            for group, leaf, r in [
                ("conv", "kernel", 0.4),
                ("conv", "bias", 0.01),
                ("bn", "scale", 0.02),
            ]:
                assert out[group][leaf].dtype == dt
                expected = np_project(
                    params[group][leaf] + updates[group][leaf], anchor[group][leaf], r, norm
                )
                np.testing.assert_allclose(new[group][leaf], expected, rtol=tol, atol=tol)
            # free leaves: updates returned bit for bit
            for leaf in ("kernel", "bias"):
                np.testing.assert_array_equal(out["dense"][leaf], updates["dense"][leaf])

    @chex.variants(with_jit=True, without_jit=True)
    def test_frobenius_closed_form(self):
        # t = (3, 4) has norm 5; radius 1 gives (0.6, 0.8); a traced radius works under jit
        tx = project_to_anchor(1.0)
        params = {"w": jnp.zeros(2)}
        out, _ = self.variant(tx.update)({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
        np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-6)

        def traced(radius):
            t = project_to_anchor(radius)
            return t.update({"w": jnp.array([3.0, 4.0])}, t.init(params), params)[0]

        np.testing.assert_allclose(jax.jit(traced)(2.5)["w"], [1.5, 2.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_inf_op_kernel_layout(self):
        # flax (in, out) kernel: output unit o is column o, its L1 norm over the inputs
        t = jnp.array([[1.0, 0.1], [1.0, 0.1], [2.0, 0.1]])  # column L1 norms 4 and 0.3
        tx = project_to_anchor(1.0, norm="inf_op")
        params = jnp.zeros((3, 2))
        out, _ = self.variant(tx.update)(t, tx.init(params), params)
        np.testing.assert_allclose(out[:, 0], [0.25, 0.25, 0.5], rtol=1e-6)
        np.testing.assert_array_equal(out[:, 1], t[:, 1])  # inside: untouched
        # per-row reading (the transposed layout) would give different numbers
        assert not np.allclose(out, np_project(t.T, np.zeros((2, 3)), 1.0, "inf_op").T)


def test_zero_radius_and_anchor_given():
    anchor = {"w": jnp.array([1.0, 2.0])}
    tx = project_to_anchor(0.0, anchor=anchor)
    params = {"w": jnp.array([5.0, 5.0])}
    out, _ = tx.update({"w": jnp.array([1.0, 0.0])}, tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, out)["w"], [1.0, 2.0])
    assert np.all(np.isfinite(out["w"]))


def test_errors():
    params = make_params(jax.random.key(0))
    with pytest.raises(ValueError, match="norm"):
        project_to_anchor(1.0, norm="spectral")
    with pytest.raises(ValueError, match=r"radii.*>= 0.*dense/kernel"):
        project_to_anchor({"conv": None, "bn": None, "dense": {"kernel": -1.0, "bias": None}}).init(
            params
        )
    with pytest.raises(ValueError, match="radii.*convv"):
        project_to_anchor({"convv": 1.0}).init(params)
    with pytest.raises(ValueError, match="anchor.*shape"):
        bad = jax.tree.map(lambda x: jnp.zeros(x.shape + (1,)), params)
        project_to_anchor(1.0, anchor=bad).init(params)
    with pytest.raises(ValueError, match="strength.*finite"):
        anchor_penalty(float("nan")).init(params)
    tx = project_to_anchor(1.0)
    state = tx.init(params)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, state, {"other": jnp.zeros(3)})


# ---------------------------------------------------------------------------------------------
# properties (hypothesis)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    norm=st.sampled_from(["frobenius", "inf_op", "elementwise"]),
    radius=st.floats(1e-3, 5.0),
    steps=st.integers(1, 4),
    scale=st.floats(0.01, 10.0),
)
def test_property_stays_in_ball_free_untouched(seed, norm, radius, steps, scale):
    params = make_params(jax.random.key(seed))
    radii = {"conv": {"kernel": radius, "bias": None}, "bn": None, "dense": radius}
    tx = project_to_anchor(radii, norm=norm)
    state = tx.init(params)
    p = params
    for i in range(steps):
        u = random_like(jax.random.key(seed + 1000 * (i + 1)), params, scale)
        out, state = tx.update(u, state, p)
        # unconstrained leaves: updates untouched, bit for bit
        np.testing.assert_array_equal(out["conv"]["bias"], u["conv"]["bias"])
        np.testing.assert_array_equal(out["bn"]["scale"], u["bn"]["scale"])
        p = optax.apply_updates(p, out)
        for path in [("conv", "kernel"), ("dense", "kernel"), ("dense", "bias")]:
            t = np.asarray(p[path[0]][path[1]], np.float64) - np.asarray(
                params[path[0]][path[1]], np.float64
            )
            size = {
                "frobenius": np.sqrt((t**2).sum()),
                "inf_op": np_inf_op_norms(t).max(),
                "elementwise": np.abs(t).max(),
            }[norm]
            # float32 rounding of anchor + t: a few ulps of the params' magnitude
            slack = 1e-5 * (1 + np.abs(np.asarray(params[path[0]][path[1]])).sum())
            assert size <= radius * (1 + 1e-5) + slack
    # idempotent: projecting the projected point again (zero updates) moves it by rounding only
    zero = jax.tree.map(jnp.zeros_like, params)
    again, _ = tx.update(zero, state, p)
    chex.assert_trees_all_close(optax.apply_updates(p, again), p, atol=1e-5 * (1 + radius))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), norm=st.sampled_from(["frobenius", "inf_op", "elementwise"]))
def test_property_identity_inside_ball(seed, norm):
    params = make_params(jax.random.key(seed))
    u = random_like(jax.random.key(seed + 1), params, scale=1e-3)
    tx = project_to_anchor(1e3, norm=norm)
    out, _ = tx.update(u, tx.init(params), params)
    chex.assert_trees_all_equal(out, u)


# ---------------------------------------------------------------------------------------------
# anchor_penalty, layerwise_radii


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_anchor_penalty_is_l2sp_gradient(dtype):
    """sgd(lr) after anchor_penalty(2 lam) is a gradient step on loss + lam ||W - W^(s)||^2."""
    with jax.enable_x64(dtype == "float64"):
        params = make_params(jax.random.key(0), jnp.dtype(dtype))
        anchor = random_like(jax.random.key(1), params, 0.5)
        lam = {"conv": 0.3, "bn": None, "dense": {"kernel": 0.1, "bias": 0.0}}
        grads = random_like(jax.random.key(2), params)

        def l2sp(p):
            pen = 0.3 * sum(
                jnp.sum((a - b) ** 2)
                for a, b in zip(
                    jax.tree.leaves(p["conv"]), jax.tree.leaves(anchor["conv"]), strict=True
                )
            )
            return pen + 0.1 * jnp.sum((p["dense"]["kernel"] - anchor["dense"]["kernel"]) ** 2)

        penalty_grads = jax.grad(l2sp)(params)
        strength = jax.tree.map(lambda s: None if s is None else 2 * s, lam)
        tx = optax.chain(anchor_penalty(strength, anchor=anchor), optax.sgd(0.1))
        out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        expected = jax.tree.map(lambda g, pg: -0.1 * (g + pg), grads, penalty_grads)
        tol = 1e-6 if dtype == "float32" else 1e-12
        chex.assert_trees_all_close(out, expected, rtol=tol, atol=tol)


def test_layerwise_radii_reference_stages():
    z = jnp.zeros((3, 3))
    params = {
        "conv1": {"kernel": z},
        "layer1": {"0": {"conv1": {"kernel": z}, "bn1": {"scale": jnp.ones(3)}}},
        "layer2": {"0": {"conv1": {"kernel": z, "bias": jnp.zeros(3)}}},
        "layer3": {"1": {"conv2": {"kernel": z}}},
        "layer4": {"0": {"downsample": {"kernel": z}}},
        "fc": {"kernel": z, "bias": jnp.zeros(3)},
    }
    r = layerwise_radii(params, 0.5, scale_factor=3.0, depth_fn=resnet_stage_depth, head_radius=7.0)
    assert r["conv1"]["kernel"] is None
    assert r["layer1"]["0"]["conv1"]["kernel"] == 0.5
    assert r["layer1"]["0"]["bn1"]["scale"] is None
    assert r["layer2"]["0"]["conv1"]["kernel"] == 0.5
    assert r["layer2"]["0"]["conv1"]["bias"] is None
    assert r["layer3"]["1"]["conv2"]["kernel"] == 1.5
    assert r["layer4"]["0"]["downsample"]["kernel"] == 4.5
    assert r["fc"]["kernel"] == 7.0 and r["fc"]["bias"] is None
    # it plugs into project_to_anchor; traced base and scale work under jit
    tx = project_to_anchor(r)
    state = tx.init(params)
    assert state.anchor["conv1"]["kernel"] is None
    assert state.anchor["fc"]["kernel"] is not None

    def step(base, s):
        radii = layerwise_radii(
            params, base, scale_factor=s, depth_fn=resnet_stage_depth, head_radius=1.0
        )
        t = project_to_anchor(radii)
        tens = jax.tree.map(lambda x: jnp.full_like(x, 10.0), params)
        return t.update(tens, t.init(params), params)[0]

    out = jax.jit(step)(0.5, 3.0)
    norm = lambda x: float(np.linalg.norm(x))
    np.testing.assert_allclose(norm(out["layer4"]["0"]["downsample"]["kernel"]), 4.5, rtol=1e-6)
    np.testing.assert_allclose(norm(out["layer3"]["1"]["conv2"]["kernel"]), 1.5, rtol=1e-6)
    np.testing.assert_allclose(norm(out["layer1"]["0"]["conv1"]["kernel"]), 0.5, rtol=1e-6)
    np.testing.assert_array_equal(out["conv1"]["kernel"], 10.0)
    assert resnet_stage_depth("layer3/0/bn1/var") is None
    with pytest.raises(TypeError, match="depth_fn"):
        layerwise_radii(params, 1.0, scale_factor=2.0, depth_fn=lambda n: "deep")


def test_layerwise_radii_nnx_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layer3 = nnx.Linear(2, 2, rngs=rngs)
            self.head = nnx.Linear(2, 2, rngs=rngs)

    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    r = nnx.to_pure_dict(
        layerwise_radii(state, 1.0, scale_factor=2.0, depth_fn=resnet_stage_depth, head_radius=3.0)
    )
    assert r["layer3"]["kernel"] == 2.0 and r["head"]["kernel"] == 3.0
    assert r["layer3"]["bias"] is None
