"""Tests of hessjax.bounds: closed forms, jit/no jit, validation, the corollary's ordering."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessjax
from hessjax import bounds, measures
from tests import _models


class TestClosedForms(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hessian_bound(self):
        fn = self.variant(lambda t, m, n, c, e: bounds.hessian_bound(t, m, n, loss_bound=c, eps=e))
        for dtype in (jnp.float32, jnp.float64):
            with jax.enable_x64(dtype == jnp.float64):
                args = [jnp.asarray(a, dtype) for a in (0.3, 0.7, 200.0, 2.5, 0.1)]
                b = fn(*args)
                want = 1.1 * 0.3 + 1.1 * np.sqrt(2.5) * 0.7
                np.testing.assert_allclose(b.value, want, rtol=1e-6)
                np.testing.assert_allclose(b.xi, 200.0**-0.75, rtol=1e-6)
                assert b.value.dtype == dtype

    @chex.variants(with_jit=True, without_jit=True)
    def test_corollary_bound(self):
        fn = self.variant(
            lambda t, r, tr, n: bounds.corollary_bound(t, r, tr, n, loss_bound=4.0, eps=0.5)
        )
        radii, traces = np.array([0.5, 1.0, 2.0]), np.array([3.0, 0.2, 10.0])
        b = fn(0.2, jnp.asarray(radii), jnp.asarray(traces), 50.0)
        want = 1.5 * 0.2 + 1.5 * 2.0 * np.sum(radii * np.sqrt(traces / 50.0))
        np.testing.assert_allclose(b.value, want, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_spectral_norm_bound_matches_numpy_formula(self):
        s, d = np.array([1.5, 2.0, 0.8]), np.array([0.3, 0.1, 0.4])
        n, B, gamma, h, delta = 1000.0, 2.0, 0.5, 16, 0.05
        fn = self.variant(
            lambda t, s, d: bounds.spectral_norm_bound(
                t, s, d, n, input_norm=B, margin=gamma, width=h, delta=delta
            )
        )
        b = fn(0.1, jnp.asarray(s), jnp.asarray(d))
        dd = len(s)
        num = B**2 * dd**2 * h * np.log(dd * h) * np.prod(s**2) * np.sum(d**2 / s**2)
        num += np.log(dd * n / delta)
        np.testing.assert_allclose(b.value, 0.1 + np.sqrt(num / (gamma**2 * n)), rtol=1e-5)
        assert float(b.xi) == 0.0

    def test_generalization_gap(self):
        np.testing.assert_allclose(bounds.generalization_gap(0.25, 1.0), 0.75)
        np.testing.assert_allclose(
            jax.jit(bounds.generalization_gap)(jnp.array([0.1, 0.2]), jnp.array([0.4, 0.1])),
            [0.3, -0.1],
            rtol=1e-6,
        )


def test_spectral_norm_bound_overflow_is_reported_in_log_space():
    s, d = np.full(60, 20.0), np.full(60, 1.0)
    b = bounds.spectral_norm_bound(0.0, s, d, 1000, input_norm=1.0, margin=1.0, width=512)
    log10 = bounds.log10_spectral_norm_bound_term(s, d, 1000, input_norm=1.0, margin=1.0, width=512)
    dd = 60
    log_num = (
        2 * np.log(dd)
        + np.log(512)
        + np.log(np.log(dd * 512))
        + 2 * 60 * np.log(20.0)
        + np.log(60 / 400.0)
    )
    want = 0.5 * (log_num - np.log(1000)) / np.log(10)
    np.testing.assert_allclose(log10, want, rtol=1e-5)
    assert float(log10) > 70  # vacuous by ~70 orders of magnitude
    assert not np.isfinite(float(b.value)) or float(b.value) > 1e70


def test_validation_errors():
    with pytest.raises(ValueError, match="n must be >= 1"):
        bounds.hessian_bound(0.1, 0.2, 0, loss_bound=1.0)
    with pytest.raises(ValueError, match="loss_bound must be > 0"):
        bounds.hessian_bound(0.1, 0.2, 10, loss_bound=0.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        bounds.hessian_bound(0.1, 0.2, 10, loss_bound=1.0, eps=-0.1)
    with pytest.raises(ValueError, match="measure must be >= 0"):
        bounds.hessian_bound(0.1, -0.2, 10, loss_bound=1.0)
    with pytest.raises(ValueError, match="train_loss must be finite"):
        bounds.hessian_bound(float("nan"), 0.2, 10, loss_bound=1.0)
    with pytest.raises(ValueError, match="radii and max_traces must be vectors of one shape"):
        bounds.corollary_bound(0.1, [1.0, 2.0], [1.0], 10, loss_bound=1.0)
    with pytest.raises(ValueError, match="max_traces must be >= 0"):
        bounds.corollary_bound(0.1, [1.0], [-1.0], 10, loss_bound=1.0)
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        bounds.spectral_norm_bound(0.0, [1.0], [1.0], 10, input_norm=1.0, margin=1.0, width=0)
    with pytest.raises(ValueError, match="delta must be in"):
        bounds.spectral_norm_bound(
            0.0, [1.0], [1.0], 10, input_norm=1.0, margin=1.0, width=1, delta=1.5
        )
    with pytest.raises(ValueError, match="spectral_norms must be > 0"):
        bounds.spectral_norm_bound(0.0, [0.0], [1.0], 10, input_norm=1.0, margin=1.0, width=1)


def test_corollary_bound_dominates_the_measure_bound_inside_the_radii():
    """calH_i <= ||v_i||^2 max Tr H_i^+ <= alpha_i^2 max Tr H_i^+ (dense traces)."""
    with jax.enable_x64(True):
        loss, params, examples = _models.example_problem(
            "dict_mlp", dtype=jnp.float64, activation="tanh"
        )
        rng = np.random.default_rng(0)
        anchor = jax.tree_util.tree_map(
            lambda x: x + jnp.asarray(0.5 * rng.standard_normal(x.shape)), params
        )
        part = hessjax.layer_partition(params)
        ids = _models.layer_ids(part, params)
        r = measures.hessian_distance(loss, params, anchor, examples, n=20, num_iters=30)
        max_traces = np.zeros(part.num_layers)
        m = jax.tree_util.tree_leaves(examples)[0].shape[0]
        for e in range(m):
            ex = jax.tree_util.tree_map(lambda x, e=e: x[e], examples)
            hess = np.asarray(_models.dense_hessian(loss, params, ex))
            for i in range(part.num_layers):
                lam = np.linalg.eigvalsh(hess[np.ix_(ids == i, ids == i)])
                max_traces[i] = max(max_traces[i], np.sum(np.maximum(lam, 0)))
        for slack in (1.0, 1.3):
            radii = slack * np.asarray(r.distances)
            cor = bounds.corollary_bound(0.1, radii, max_traces, 20, loss_bound=3.0)
            thm = bounds.hessian_bound(0.1, r.measure, 20, loss_bound=3.0)
            assert float(cor.value) >= float(thm.value) - 1e-12
