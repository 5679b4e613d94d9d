"""Lanczos and eigenvalues (hessjax.estimators.lanczos) against numpy eigh."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from hessjax import estimators as E
from tests.estimators._dense import (
    BLOCK_SHAPES,
    DTYPES,
    SHAPES,
    N,
    block_problem,
    dense,
    dense_matvec,
    like,
    precision,
    to_flat,
    to_tree,
    tol,
)


class LanczosTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*DTYPES)
    def test_full_spectrum_and_basis(self, dtype):
        rng = np.random.default_rng(0)
        lam = rng.normal(size=N) * 3
        a, _ = dense(rng, lam)
        with precision(dtype):
            matvec = dense_matvec(a, SHAPES, dtype)
            v0 = to_tree(rng.normal(size=N), SHAPES, dtype)
            res = self.variant(lambda v: E.lanczos(matvec, v, num_iters=N + 4))(v0)
            vals = self.variant(
                lambda k: E.eigenvalues(matvec, like(SHAPES, dtype), k, k=N, which="bottom")
            )(jax.random.key(1))
        assert res.alphas.shape == (N + 4,) and res.alphas.dtype == dtype
        assert int(res.num_valid) == N
        np.testing.assert_array_equal(np.asarray(res.betas[N - 1 :]), 0)
        np.testing.assert_array_equal(np.asarray(res.alphas[N:]), 0)
        basis = np.stack([to_flat(jax.tree.map(lambda x, j=j: x[j], res.basis)) for j in range(N)])
        np.testing.assert_allclose(basis @ basis.T, np.eye(N), atol=50 * tol(dtype, 1e-6, 1e-14))
        t = (
            np.diag(res.alphas[:N])
            + np.diag(res.betas[: N - 1], 1)
            + np.diag(res.betas[: N - 1], -1)
        )
        np.testing.assert_allclose(basis @ a @ basis.T, t, atol=10 * tol(dtype, 1e-5, 1e-13))
        np.testing.assert_allclose(vals, np.sort(lam), atol=tol(dtype, 1e-5, 1e-12) * 3 * 10)
        np.testing.assert_allclose(
            np.linalg.eigvalsh(t), np.sort(lam), atol=tol(dtype, 1e-5, 1e-12) * 30
        )

    @chex.variants(with_jit=True)
    @parameterized.named_parameters(*DTYPES)
    def test_per_layer_equals_block_eigh(self, dtype):
        rng = np.random.default_rng(1)
        with precision(dtype):
            matvec, part, (a1, a2), (lam1, lam2) = block_problem(rng, dtype)
            v0 = to_tree(rng.normal(size=22), BLOCK_SHAPES, dtype)
            res = self.variant(lambda v: E.lanczos(matvec, v, num_iters=12, partition=part))(v0)
            top, bottom = self.variant(
                lambda k: E.eigenvalues(
                    matvec, like(BLOCK_SHAPES, dtype), k, k=6, which="both", partition=part
                )
            )(jax.random.key(0))
        assert res.alphas.shape == (2, 12) and res.num_valid.shape == (2,)
        np.testing.assert_array_equal(res.num_valid, [12, 6])
        np.testing.assert_array_equal(np.asarray(res.betas[1, 5:]), 0)
        assert not np.any(np.asarray(res.basis["c"]))  # the bias is in no layer
        for i, lam in enumerate((lam1, lam2)):
            nv = int(res.num_valid[i])
            t = np.diag(res.alphas[i, :nv]) + np.diag(res.betas[i, : nv - 1], 1)
            t = t + np.diag(res.betas[i, : nv - 1], -1)
            np.testing.assert_allclose(np.linalg.eigvalsh(t), np.sort(lam), atol=tol(dtype))
        assert top.shape == bottom.shape == (2, 6)
        np.testing.assert_allclose(top[0], np.sort(lam1)[::-1][:6], atol=tol(dtype))
        np.testing.assert_allclose(top[1], np.sort(lam2)[::-1], atol=tol(dtype))
        np.testing.assert_allclose(bottom[0], np.sort(lam1)[:6], atol=tol(dtype))
        np.testing.assert_allclose(bottom[1], np.sort(lam2), atol=tol(dtype))

    def test_top_k_decaying_spectrum_and_vectors(self):
        rng = np.random.default_rng(2)
        shapes = {"a": (10, 10), "b": (100,)}
        lam = 10.0 * 0.7 ** np.arange(200) * rng.choice([-1.0, 1.0], 200)
        lam[:5] = np.abs(lam[:5])
        a, q = dense(rng, lam)
        with precision(np.float64):
            matvec = dense_matvec(a, shapes, np.float64)
            vals, vecs = jax.jit(
                lambda k: E.eigenvalues(
                    matvec, like(shapes, np.float64), k, k=5, num_iters=30, return_vectors=True
                )
            )(jax.random.key(3))
        np.testing.assert_allclose(vals, lam[:5], rtol=1e-8)
        for j in range(5):
            u = to_flat(jax.tree.map(lambda x, j=j: x[j], vecs))
            ref = q[:, j]
            # to_flat orders leaves by key (a, b): same as the dense layout
            assert abs(abs(u @ ref) - 1) < 1e-6
            np.testing.assert_allclose(a @ u, lam[j] * u, atol=1e-6)

    def test_zero_start_and_zero_layer_give_zeros(self):
        rng = np.random.default_rng(3)
        matvec, part, _, _ = block_problem(rng, np.float32)
        v0 = like(BLOCK_SHAPES, np.float32)
        res = E.lanczos(matvec, v0, num_iters=5)
        assert int(res.num_valid) == 0
        for x in jax.tree.leaves(res):
            assert np.all(np.isfinite(x)) and not np.any(np.asarray(x))
        v0 = dict(v0, a=jnp.ones((3, 4)))  # layer b zero
        res = E.lanczos(matvec, v0, num_iters=5, partition=part)
        np.testing.assert_array_equal(res.num_valid, [5, 0])
        assert np.all(np.isfinite(res.alphas)) and not np.any(np.asarray(res.alphas[1]))
        assert not np.any(np.asarray(res.basis["b"]))

    def test_fewer_distinct_eigenvalues_than_k_gives_nan(self):
        matvec = lambda v: jax.tree.map(lambda x: 2.0 * x, v)  # 2 I: Krylov dimension 1
        vals = jax.jit(lambda k: E.eigenvalues(matvec, like(SHAPES, np.float32), k, k=2))(
            jax.random.key(0)
        )
        np.testing.assert_allclose(vals[0], 2.0, rtol=1e-6)
        assert np.isnan(vals[1])
