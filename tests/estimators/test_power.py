"""Deflated power iteration (hessjax.estimators.power) against numpy eigh."""

from __future__ import annotations

import chex
import jax
import numpy as np

from hessjax import estimators as E
from tests.estimators._dense import (
    SHAPES,
    N,
    dense,
    dense_matvec,
    like,
    precision,
    to_flat,
)


class PowerIterationTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_power_iteration_top_k(self):
        rng = np.random.default_rng(14)
        lam = np.concatenate([[10.0, -6.0, 3.0], 0.5 * rng.uniform(-1, 1, N - 3)])
        a, q = dense(rng, lam)
        with precision(np.float64):
            matvec = dense_matvec(a, SHAPES, np.float64)
            vals, vecs, count = self.variant(
                lambda k: E.power_iteration(
                    matvec, like(SHAPES, np.float64), k, k=3, num_iters=500, tol=1e-10
                )
            )(jax.random.key(0))
        np.testing.assert_allclose(vals, lam[:3], rtol=1e-6)
        assert 3 <= int(count) <= 1500
        for j in range(3):
            u = to_flat(jax.tree.map(lambda x, j=j: x[j], vecs))
            assert abs(abs(u @ q[:, j]) - 1) < 1e-4
