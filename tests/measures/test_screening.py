"""Screening in hessian_distance: the same result as brute force, and brackets that hold.

References: brute force (``screening=False``: Lanczos on every example) and, for the bracket
property, dense eigendecompositions with numpy (no hessjax code on the reference side).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessjax
from hessjax import estimators, measures
from hessjax.hessian import block_vhv_fn, per_example_block_forms
from hessjax.measures import screening
from tests import _models

MODELS = (("dict_mlp", "relu"), ("dict_mlp", "tanh"), ("dict_cnn", "tanh"), ("nnx_cnn", "relu"))


def _problem(name, activation, dtype=jnp.float64, seed=0, scale=0.3, outlier=3.0):
    """A per-example problem with 11 examples (one an outlier) and a random displacement."""
    loss, params, examples = _models.example_problem(
        name, dtype=dtype, activation=activation, seed=seed
    )
    rng = np.random.default_rng(seed + 7)
    extra = jax.tree_util.tree_map(lambda x: x[:3], examples)
    extra["x"] = extra["x"] * 1.7 + jnp.asarray(rng.normal(size=extra["x"].shape), dtype)
    examples = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), examples, extra)
    examples["x"] = examples["x"].at[5].multiply(outlier)  # one example dominates somewhere
    anchor = jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), params
    )
    return loss, params, anchor, examples


def _both(loss, params, anchor, examples, **kw):
    a = measures.hessian_distance(loss, params, anchor, examples, n=11, screening=True, **kw)
    b = measures.hessian_distance(loss, params, anchor, examples, n=11, screening=False, **kw)
    return a, b


def _sweep(variant, models, seeds, iters):
    pruned = 0
    for name, activation in models:
        for seed in seeds:
            for num_iters in iters:
                with jax.enable_x64(True):
                    loss, params, anchor, examples = _problem(name, activation, seed=seed)
                    fn = variant(
                        lambda p, a, ex, loss=loss, k=num_iters: measures.hessian_distance(
                            loss, p, a, ex, n=11, num_iters=k, screen_chunk_size=3,
                            screening=True,
                        )
                    )  # fmt: skip
                    got = fn(params, anchor, examples)
                    want = measures.hessian_distance(
                        loss, params, anchor, examples, n=11, num_iters=num_iters,
                        screening=False,
                    )  # fmt: skip
                    np.testing.assert_allclose(got.per_layer, want.per_layer, rtol=1e-6)
                    np.testing.assert_array_equal(got.argmax, want.argmax)
                    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-10)
                    assert want.refined is None and got.refined.shape == want.argmax.shape
                    pruned += int(np.sum(11 - np.asarray(got.refined)))
    assert pruned > 0  # the brackets did rule examples out, so the pruning path ran


class TestScreenedEqualsBruteForce(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_float64_mlp_and_batchnorm_cnn(self):
        _sweep(self.variant, (MODELS[1], MODELS[3]), (0,), (3,))

    def test_float32(self):
        loss, params, anchor, examples = _problem("nnx_cnn", "relu", dtype=jnp.float32)
        a, b = _both(loss, params, anchor, examples, num_iters=4)
        assert a.per_layer.dtype == jnp.float32
        np.testing.assert_allclose(a.per_layer, b.per_layer, rtol=1e-5)
        np.testing.assert_array_equal(a.argmax, b.argmax)

    def test_untruncated_and_chunk_sizes(self):
        with jax.enable_x64(True):
            loss, params, anchor, examples = _problem("dict_cnn", "tanh")
            a, b = _both(loss, params, anchor, examples, truncate=False)
            np.testing.assert_allclose(a.per_layer, b.per_layer, rtol=1e-10)
            np.testing.assert_array_equal(a.argmax, b.argmax)
            c = measures.hessian_distance(
                loss,
                params,
                anchor,
                examples,
                n=11,
                num_iters=4,
                screen_chunk_size=None,
                screening=True,
            )
            d = measures.hessian_distance(
                loss,
                params,
                anchor,
                examples,
                n=11,
                num_iters=4,
                screen_chunk_size=4,
                screening=True,
            )
            np.testing.assert_allclose(c.per_layer, d.per_layer, rtol=1e-10)
            np.testing.assert_array_equal(c.argmax, d.argmax)


@pytest.mark.slow
def test_float64_all_models_seeds_and_steps():
    for variant in (lambda f: f, jax.jit):
        _sweep(variant, MODELS, (0, 1, 2), (2, 5))


def test_ties_and_undisplaced_layers():
    with jax.enable_x64(True):
        loss, params, anchor, examples = _problem("dict_mlp", "tanh")
        # duplicate examples tie exactly: the argmax must be the first, as jnp.argmax gives
        examples = jax.tree_util.tree_map(lambda x: jnp.concatenate([x[5:6], x, x[5:6]]), examples)
        anchor["hidden2"] = jax.tree_util.tree_map(jnp.copy, params["hidden2"])  # v = 0 there
        part = hessjax.layer_partition(params)
        a, b = _both(loss, params, anchor, examples, num_iters=3, partition=part)
        np.testing.assert_allclose(a.per_layer, b.per_layer, rtol=1e-6)
        np.testing.assert_array_equal(a.argmax, b.argmax)
        zero = part.names.index("hidden2/kernel")
        assert float(a.per_layer[zero]) == 0.0 and int(a.argmax[zero]) == 0
        assert int(a.refined[zero]) == 0


@pytest.mark.slow
def test_brackets_hold_for_every_example_and_num_iters():
    # lower = max(v^T H v, 0) <= Q_k <= ||v|| ||H v|| = upper for the k-step quadrature Q_k
    # (not only for the exact v^T H^+ v), per example and layer.
    with jax.enable_x64(True):
        for name, activation in (MODELS[2],):
            loss, params, anchor, examples = _problem(name, activation, seed=3, scale=1.0)
            part = hessjax.layer_partition(params)
            v = part.restrict(jax.tree_util.tree_map(jnp.subtract, params, anchor))
            forms = per_example_block_forms(loss, params, v, part, examples, chunk_size=4)
            lower, upper = screening.brackets(forms, part.sq_norms(v), truncate=True)
            for k in (2, 3, max(part.sizes)):
                one = screening.example_value_fn(
                    loss, params, v, part, num_iters=k, truncate=True, layer_chunk_size=None
                )
                q = jax.lax.map(lambda ex, one=one: one(ex)[0], examples)
                tol = 1e-10 * np.max(np.asarray(upper))
                assert np.all(np.asarray(lower) <= np.asarray(q) + tol), (name, k)
                assert np.all(np.asarray(q) <= np.asarray(upper) + tol), (name, k)


def test_brackets_hold_on_dense_indefinite_matrices():
    # Independent reference: numpy matrices with known spectra, the quadrature from hessjax.
    rng = np.random.default_rng(0)

    @functools.partial(jax.jit, static_argnums=2)
    def quad(h, v, k):
        return estimators.positive_quadratic_form(lambda x: h @ x, v, num_iters=k)

    with jax.enable_x64(True):
        for trial in range(12):
            d = (4, 7)[trial % 2]
            basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
            lam = rng.normal(size=d) * rng.choice([0.1, 1.0, 10.0])
            lam[: int(rng.integers(0, d))] *= -1.0
            h = (basis * lam) @ basis.T
            v = rng.normal(size=d)
            exact = v @ (basis * np.maximum(lam, 0)) @ basis.T @ v
            lower, upper = max(v @ h @ v, 0.0), np.linalg.norm(v) * np.linalg.norm(h @ v)
            for k in (2, 3, d):
                q = float(quad(jnp.asarray(h), jnp.asarray(v), k))
                tol = 1e-12 * upper
                assert lower - tol <= q <= upper + tol, (trial, k, lower, q, upper)
            assert lower - 1e-9 * upper <= exact <= upper * (1 + 1e-9)
            np.testing.assert_allclose(q, exact, rtol=1e-7, atol=1e-9 * upper)


def test_per_example_block_forms_match_dense():
    with jax.enable_x64(True):
        loss, params, anchor, examples = _problem("dict_mlp", "tanh")
        part = hessjax.layer_partition(params)
        v = jax.tree_util.tree_map(jnp.subtract, params, anchor)
        got = per_example_block_forms(loss, params, v, part, examples, chunk_size=4)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        hess = jax.vmap(jax.hessian(lambda w, ex: loss(unravel(w), ex)), in_axes=(None, 0))
        hess = np.asarray(hess(flat, examples))
        ids = _models.layer_ids(part, params)
        vf = np.asarray(_models.ravel(v))
        for e in range(hess.shape[0]):
            for i in range(part.num_layers):
                idx = np.flatnonzero(ids == i)
                hv = hess[e][np.ix_(idx, idx)] @ vf[idx]
                np.testing.assert_allclose(got.vhv[e, i], vf[idx] @ hv, rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(got.hv_sq_norms[e, i], hv @ hv, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.losses, jax.vmap(lambda ex: loss(params, ex))(examples))


class TestBlockVhv(chex.TestCase):
    """Forward-over-forward ``v_i^T H_ii v_i`` against dense per-example blocks (numpy)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_dense(self):
        cases = ((jnp.float64, 1e-9, (("dict_mlp", "tanh"), ("nnx_cnn", "relu"))),
                 (jnp.float32, 2e-4, (("nnx_cnn", "relu"),)))  # fmt: skip
        for dtype, rtol, models in cases:
            with jax.enable_x64(dtype == jnp.float64):
                for name, activation in models:
                    loss, params, anchor, examples = _problem(name, activation, dtype=dtype)
                    part = hessjax.layer_partition(params)
                    v = jax.tree_util.tree_map(jnp.subtract, params, anchor)
                    one = block_vhv_fn(loss, params, v, part)
                    vhv, losses = self.variant(jax.vmap(one))(examples)
                    assert vhv.dtype == dtype and vhv.shape == (11, part.num_layers)
                    ids = _models.layer_ids(part, params)
                    vf = np.asarray(_models.ravel(v), np.float64)
                    flat, unravel = jax.flatten_util.ravel_pytree(params)
                    flat_loss = lambda w, ex, loss=loss, u=unravel: loss(u(w), ex)
                    hess = jax.jit(jax.vmap(jax.hessian(flat_loss), in_axes=(None, 0)))
                    hess = np.asarray(hess(flat, examples), np.float64)
                    for e in range(11):
                        for i in range(part.num_layers):
                            idx = np.flatnonzero(ids == i)
                            block = hess[e][np.ix_(idx, idx)]
                            want = vf[idx] @ block @ vf[idx]
                            scale = np.abs(vf[idx]) @ np.abs(block) @ np.abs(vf[idx])
                            got = float(vhv[e, i])
                            assert abs(got - want) <= rtol * scale + 1e-30, (name, e, i, got)
                    want_losses = jax.vmap(lambda ex, loss=loss, p=params: loss(p, ex))(examples)
                    np.testing.assert_allclose(losses, want_losses, rtol=rtol)


def test_bad_input():
    loss, params, anchor, examples = _problem("dict_mlp", "tanh", dtype=jnp.float32)
    with pytest.raises(ValueError, match="screen_chunk_size"):
        measures.hessian_distance(loss, params, anchor, examples, n=4, screen_chunk_size=0)
    with pytest.raises(TypeError, match="screening"):
        measures.hessian_distance(loss, params, anchor, examples, n=4, screening="yes")
    part = hessjax.layer_partition(params)
    with pytest.raises(ValueError, match="layer"):
        hessjax.hessian.layer_hvp_fn(loss, params, part, part.num_layers, _rows(examples))


def _rows(examples, i=0):
    return jax.tree_util.tree_map(lambda x: x[i], examples)


@pytest.mark.slow
def test_mobilenet_later_blocks_equal_brute_force():
    """MobileNetV2 blocks 14-18 + head (ImageNet weights), random displacements, 2 seeds."""
    from flax import nnx

    model = hessjax.pretrained_mobilenet_v2(10, first_block=14)
    model.eval()
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    base = nnx.to_pure_dict(state)

    def loss(p, ex):
        logits = nnx.merge(graphdef, nnx.State(p), rest)(ex[0][None])[0]
        return -jax.nn.log_softmax(logits)[ex[1]]

    for seed in (0, 1):
        keys = jax.random.split(jax.random.key(seed), 4)
        leaves, treedef = jax.tree_util.tree_flatten(base)
        noise = jax.random.split(keys[0], len(leaves))
        params = jax.tree_util.tree_unflatten(
            treedef,
            [
                x + 0.05 * (jnp.std(x) + 0.01) * jax.random.normal(k, x.shape)
                for x, k in zip(leaves, noise, strict=True)
            ],
        )
        anchor = base
        m = 13  # not a multiple of the chunk sizes
        examples = (
            jax.random.normal(keys[1], (m, 2, 2, 96)),
            jax.random.randint(keys[2], (m,), 0, 10),
        )
        examples = (examples[0].at[3].multiply(2.5), examples[1])
        a = measures.hessian_distance(
            loss,
            params,
            anchor,
            examples,
            n=100,
            num_iters=6,
            screen_chunk_size=4,
            screening=True,
        )
        b = measures.hessian_distance(
            loss, params, anchor, examples, n=100, num_iters=6, screening=False
        )
        np.testing.assert_allclose(a.per_layer, b.per_layer, rtol=2e-4)
        np.testing.assert_array_equal(a.argmax, b.argmax)
        # MobileNetV2 is piecewise linear in each layer: psd_blocks gives the same
        c = measures.hessian_distance(loss, params, anchor, examples, n=100, num_iters=6,
                                      screen_chunk_size=4, psd_blocks=True)  # fmt: skip
        np.testing.assert_allclose(c.per_layer, b.per_layer, rtol=2e-4)
        np.testing.assert_array_equal(c.argmax, b.argmax)


# ------------------------------------------------------------------ PSD blocks (psd_blocks)
class TestPsdBlocks(chex.TestCase):
    """Networks piecewise linear in each layer's weights: every example's layer block is its
    Gauss-Newton part, PSD, so the quadrature is v^T H v and ``psd_blocks`` gives brute force's
    result; a smooth network is caught at its maximisers."""

    def test_relu_blocks_are_psd_dense(self):
        # the property itself, on dense per-example blocks (numpy eigvalsh)
        with jax.enable_x64(True):
            for name in ("dict_mlp", "nnx_cnn"):
                loss, params, _, examples = _problem(name, "relu")
                part = hessjax.layer_partition(params)
                ids = _models.layer_ids(part, params)
                for j in (0, 5, 9):
                    ex = jax.tree_util.tree_map(lambda x, j=j: x[j], examples)
                    h = np.asarray(_models.dense_hessian(loss, params, ex))
                    for i in range(part.num_layers):
                        block = h[np.ix_(ids == i, ids == i)]
                        lam = np.linalg.eigvalsh(block)
                        assert lam.min() >= -1e-10 * max(1.0, lam.max()), (name, j, i, lam.min())

    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_brute_force_float64(self):
        with jax.enable_x64(True):
            for name in ("dict_mlp", "nnx_cnn"):
                for seed, num_iters in ((0, 3), (1, 6)):
                    loss, params, anchor, examples = _problem(name, "relu", seed=seed)
                    fn = self.variant(
                        lambda p, a, ex, loss=loss, k=num_iters: measures.hessian_distance(
                            loss, p, a, ex, n=11, num_iters=k, screen_chunk_size=4,
                            psd_blocks=True,
                        )
                    )  # fmt: skip
                    got = fn(params, anchor, examples)
                    want = measures.hessian_distance(loss, params, anchor, examples, n=11,
                                                     num_iters=num_iters)  # fmt: skip
                    np.testing.assert_allclose(got.per_layer, want.per_layer, rtol=1e-6)
                    np.testing.assert_array_equal(got.argmax, want.argmax)
                    assert np.all(np.asarray(got.refined) <= 4)  # one refinement round only

    def test_equals_brute_force_float32(self):
        loss, params, anchor, examples = _problem("nnx_cnn", "relu", dtype=jnp.float32)
        got = measures.hessian_distance(loss, params, anchor, examples, n=11, num_iters=4,
                                        psd_blocks=True, screen_chunk_size=5)  # fmt: skip
        want = measures.hessian_distance(loss, params, anchor, examples, n=11, num_iters=4)
        np.testing.assert_allclose(got.per_layer, want.per_layer, rtol=2e-4)
        np.testing.assert_array_equal(got.argmax, want.argmax)

    def test_smooth_network_is_refused(self):
        with jax.enable_x64(True):
            loss, params, anchor, examples = _problem("dict_mlp", "tanh")
            with pytest.raises(ValueError, match="psd_blocks.*not positive semi-definite"):
                measures.hessian_distance(loss, params, anchor, examples, n=11, num_iters=6,
                                          psd_blocks=True)  # fmt: skip

    def test_bad_arguments(self):
        loss, params, anchor, examples = _problem("dict_mlp", "relu", dtype=jnp.float32)
        with pytest.raises(TypeError, match="psd_blocks"):
            measures.hessian_distance(loss, params, anchor, examples, n=11, psd_blocks=1)
        with pytest.raises(ValueError, match="psd_blocks"):
            measures.hessian_distance(loss, params, anchor, examples, n=11, psd_blocks=True,
                                      variant="reference")  # fmt: skip
