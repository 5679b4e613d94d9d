"""Quadratic forms, Tr f(H) and the spectral density (hessjax.estimators.quadrature) against
numpy eigh and closed forms."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from hessjax import estimators as E
from hessjax import partition as P
from tests.estimators._dense import (
    BLOCK_SHAPES,
    DTYPES,
    SHAPES,
    N,
    block_problem,
    dense,
    dense_matvec,
    flat_jnp,
    like,
    precision,
    psd_part,
    to_flat,
    to_tree,
    to_tree_jnp,
    tol,
)


class QuadraticFormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*DTYPES)
    def test_identity_and_positive_part(self, dtype):
        rng = np.random.default_rng(4)
        lam = rng.normal(size=N)
        a, _ = dense(rng, lam)
        x = rng.normal(size=N)
        with precision(dtype):
            matvec = dense_matvec(a, SHAPES, dtype)
            v = to_tree(x, SHAPES, dtype)
            lin = self.variant(lambda v: E.quadratic_form(matvec, v, lambda t: t, num_iters=N))(v)
            pos = self.variant(lambda v: E.positive_quadratic_form(matvec, v, num_iters=40))(v)
            exp = self.variant(lambda v: E.quadratic_form(matvec, v, jnp.exp, num_iters=2 * N))(v)
        assert lin.shape == () and lin.dtype == dtype
        np.testing.assert_allclose(lin, x @ a @ x, rtol=tol(dtype), atol=tol(dtype))
        np.testing.assert_allclose(pos, x @ psd_part(a) @ x, rtol=tol(dtype), atol=tol(dtype))
        w, u = np.linalg.eigh(a)
        np.testing.assert_allclose(exp, x @ (u * np.exp(w)) @ u.T @ x, rtol=tol(dtype))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*DTYPES)
    def test_early_exhaustion_is_exact(self, dtype):
        rng = np.random.default_rng(5)
        lam = np.linspace(-2.0, 3.0, N)
        a, q = dense(rng, lam)
        x = q[:, [0, 7, 16]] @ np.array([1.0, -2.0, 0.5])  # invariant subspace of dim 3
        with precision(dtype):
            matvec = dense_matvec(a, SHAPES, dtype)
            v = to_tree(x, SHAPES, dtype)
            res = E.lanczos(matvec, v, num_iters=8)
            pos = self.variant(lambda v: E.positive_quadratic_form(matvec, v, num_iters=8))(v)
        assert int(res.num_valid) == 3
        ref = 0.0 * 1.0 + 4.0 * max(lam[7], 0) + 0.25 * lam[16]
        np.testing.assert_allclose(pos, ref, rtol=tol(dtype, 1e-5))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*DTYPES)
    def test_per_layer(self, dtype):
        rng = np.random.default_rng(6)
        with precision(dtype):
            matvec, part, (a1, a2), _ = block_problem(rng, dtype)
            x = rng.normal(size=22)
            v = to_tree(x, BLOCK_SHAPES, dtype)
            pos = self.variant(
                lambda v: E.positive_quadratic_form(matvec, v, num_iters=12, partition=part)
            )(v)
            zero_b = self.variant(
                lambda v: E.positive_quadratic_form(matvec, v, num_iters=12, partition=part)
            )(dict(v, b=jnp.zeros((2, 3), dtype)))
            sq = self.variant(  # without reorthogonalisation: exact for degree 2 < 2 x 2
                lambda v: E.quadratic_form(
                    matvec, v, lambda t: t**2, num_iters=2, partition=part,
                    reorthogonalize=False,
                )
            )(v)  # fmt: skip
        np.testing.assert_allclose(
            sq, [x[:12] @ a1 @ a1 @ x[:12], x[12:18] @ a2 @ a2 @ x[12:18]], rtol=tol(dtype)
        )
        assert pos.shape == (2,)
        ref = [x[:12] @ psd_part(a1) @ x[:12], x[12:18] @ psd_part(a2) @ x[12:18]]
        np.testing.assert_allclose(pos, ref, rtol=tol(dtype), atol=tol(dtype))
        np.testing.assert_allclose(zero_b, [ref[0], 0.0], rtol=tol(dtype), atol=tol(dtype))

    def test_zero_vector_gives_zero_not_nan(self):
        rng = np.random.default_rng(7)
        a, _ = dense(rng, rng.normal(size=N))
        matvec = dense_matvec(a, SHAPES, np.float32)
        for fn in (E.positive_part, jnp.log):  # log(0) = -inf must not leak
            out = jax.jit(lambda v, fn=fn: E.quadratic_form(matvec, v, fn, num_iters=5))(
                like(SHAPES, np.float32)
            )
            assert float(out) == 0.0

    def test_vmap_over_per_example_operators(self):
        rng = np.random.default_rng(8)
        mats = np.stack([dense(rng, rng.normal(size=N))[0] for _ in range(4)])
        xs = rng.normal(size=(4, N))

        def one(m, x):
            matvec = lambda v: to_tree_jnp(m @ flat_jnp(v))
            return E.positive_quadratic_form(matvec, to_tree_jnp(x), num_iters=N)

        out = jax.jit(jax.vmap(one))(jnp.asarray(mats, jnp.float32), jnp.asarray(xs, jnp.float32))
        ref = [x @ psd_part(m) @ x for m, x in zip(mats, xs, strict=True)]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)

    def test_no_retrace(self):
        rng = np.random.default_rng(9)
        a, _ = dense(rng, rng.normal(size=N))
        matvec = dense_matvec(a, SHAPES, np.float32)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def measure(v):
            return E.positive_quadratic_form(matvec, v, num_iters=6)

        for seed in range(3):
            measure(to_tree(np.random.default_rng(seed).normal(size=N), SHAPES, np.float32))


# --------------------------------------------------------------------------- density
class DensityTest(chex.TestCase):
    @chex.variants(with_jit=True)
    @parameterized.named_parameters(("f32", np.float32))  # f64: see the Lanczos tests
    def test_spectral_density(self, dtype):
        rng = np.random.default_rng(13)
        lam = rng.normal(size=N)
        a, _ = dense(rng, lam)
        with precision(dtype):
            matvec = dense_matvec(a, SHAPES, dtype)
            out = self.variant(
                lambda k: E.spectral_density(
                    matvec, like(SHAPES, dtype), k, num_probes=3, num_iters=N, chunk_size=2
                )
            )(jax.random.key(0))
        assert out.nodes.shape == out.weights.shape == (3, N)
        np.testing.assert_allclose(np.trapezoid(out.density, out.grid), 1.0, atol=1e-3)
        np.testing.assert_allclose(np.asarray(out.weights).sum(axis=1), 1.0, rtol=tol(dtype, 1e-5))
        for nodes in np.asarray(out.nodes):
            np.testing.assert_allclose(np.sort(nodes), np.sort(lam), atol=tol(dtype))
        # the density with a given grid and sigma: the closed form of the broadened measure
        sigma, grid = 0.3, np.linspace(-4, 4, 9)
        with precision(dtype):
            fixed = self.variant(
                lambda k: E.spectral_density(
                    matvec, like(SHAPES, dtype), k, num_probes=2, num_iters=N,
                    grid=jnp.asarray(grid, dtype), sigma=sigma,
                )
            )(jax.random.key(1))  # fmt: skip
        w = np.asarray(fixed.weights, np.float64)
        ref = np.sum(
            w[None] * np.exp(-0.5 * ((grid[:, None, None] - np.asarray(fixed.nodes)) / sigma) ** 2),
            axis=(1, 2),
        ) / (2 * sigma * np.sqrt(2 * np.pi))
        np.testing.assert_allclose(fixed.density, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_one_step_quadrature_is_the_clipped_form_per_layer(jit):
    """With num_iters=1 the Gauss rule has one node, v^T H v / ||v||^2: Q = max(v^T H v, 0)
    for every layer (this used to fail with a partition: an empty tridiagonal matrix)."""
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((3, 2))}
    part = P.layer_partition(params)
    matvec = lambda v: {"a": 2.0 * v["a"], "b": -v["b"]}  # layer a: 2I, layer b: -I
    fn = lambda p: E.positive_quadratic_form(matvec, p, num_iters=1, partition=part)
    got = jax.jit(fn)(params) if jit else fn(params)
    np.testing.assert_allclose(got, [8.0, 0.0], rtol=1e-6)
    one = E.positive_quadratic_form(lambda v: 3.0 * v, jnp.ones(3), num_iters=1)
    np.testing.assert_allclose(one, 9.0, rtol=1e-6)


# ------------------------------------------------------- without reorthogonalisation
class NoReorthogonalisationTest(chex.TestCase):
    """``reorthogonalize=False`` (three-term recurrence only) against the dense references:
    the Gauss rule is exact for polynomials of degree < 2m, and with m = dim the positive part
    and exp are the eigh values; the host loop (no jit, the CPU default) and the lax loop."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*DTYPES)
    def test_quadratic_forms(self, dtype):
        rng = np.random.default_rng(4)
        a, _ = dense(rng, rng.normal(size=N))
        x = rng.normal(size=N)
        w, u = np.linalg.eigh(a)
        with precision(dtype):
            matvec = dense_matvec(a, SHAPES, dtype)
            v = to_tree(x, SHAPES, dtype)

            def form(fn, steps):
                return self.variant(
                    lambda v: E.quadratic_form(
                        matvec, v, fn, num_iters=steps, reorthogonalize=False
                    )
                )(v)

            cubic = form(lambda t: t**3, 2)  # degree 3 < 2 x 2: exact
            pos = form(E.positive_part, N)
            exp = form(jnp.exp, N)
        assert cubic.dtype == dtype
        np.testing.assert_allclose(cubic, x @ a @ a @ a @ x, rtol=tol(dtype))
        np.testing.assert_allclose(pos, x @ psd_part(a) @ x, rtol=tol(dtype), atol=tol(dtype))
        np.testing.assert_allclose(exp, x @ (u * np.exp(w)) @ u.T @ x, rtol=tol(dtype))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*DTYPES)
    def test_trace_and_density_match_full_reorthogonalisation(self, dtype):
        """Same probes (same key), so the same samples as with full reorthogonalisation; both
        against Tr H^+ from eigh within the estimator's own standard error."""
        rng = np.random.default_rng(12)
        lam = rng.normal(size=N)
        a, _ = dense(rng, lam)
        with precision(dtype):
            matvec = dense_matvec(a, SHAPES, dtype)

            def trace(reo):
                return self.variant(
                    lambda k: E.trace_of_function(
                        matvec, like(SHAPES, dtype), k, E.positive_part, num_probes=8,
                        num_iters=N, reorthogonalize=reo,
                    )
                )(jax.random.key(3))  # fmt: skip

            plain, full = trace(False), trace(True)

            def density(reo):  # a smooth kernel: Gauss quadrature is accurate for it
                return self.variant(
                    lambda k: E.spectral_density(
                        matvec, like(SHAPES, dtype), k, num_probes=2, num_iters=N,
                        grid=jnp.linspace(-4.0, 4.0, 33, dtype=dtype), sigma=0.5,
                        reorthogonalize=reo,
                    )
                )(jax.random.key(1))  # fmt: skip

            dens, dens_full = density(False), density(True)
        np.testing.assert_allclose(plain.value, full.value, rtol=tol(dtype))
        np.testing.assert_allclose(plain.stderr, full.stderr, rtol=tol(dtype, 1e-3))
        assert abs(float(plain.value) - np.maximum(lam, 0).sum()) < 4 * float(plain.stderr)
        np.testing.assert_allclose(np.asarray(dens.weights).sum(axis=1), 1.0, rtol=tol(dtype))
        np.testing.assert_allclose(dens.density, dens_full.density, atol=tol(dtype))

    def test_lanczos_keeps_the_same_tridiagonal(self):
        rng = np.random.default_rng(2)
        a, _ = dense(rng, rng.normal(size=N))
        matvec = dense_matvec(a, SHAPES, np.float32)
        v = to_tree(rng.normal(size=N), SHAPES, np.float32)
        full = E.lanczos(matvec, v, num_iters=5)
        plain = E.lanczos(matvec, v, num_iters=5, reorthogonalize=False)
        np.testing.assert_allclose(plain.alphas, full.alphas, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(plain.betas, full.betas, rtol=1e-4, atol=1e-5)
        with pytest.raises(TypeError, match="reorthogonalize"):
            E.quadratic_form(matvec, v, E.positive_part, num_iters=3, reorthogonalize="no")


# ------------------------------------------------------ partial reorthogonalisation
class PartialReorthogonalisationTest(chex.TestCase):
    """``reorthogonalize="partial"`` (Simon's omega recurrence; the host loop of one layer):
    on a 300-dimensional operator whose top eigenvalues converge long before 150 steps end,
    the three-term recurrence alone loses orthogonality and repeats lambda_1 (ghosts); partial
    reorthogonalisation keeps the basis semi-orthogonal (|q_i^T q_k| about sqrt(eps)), the
    Ritz values equal eigh's and the top one appears once; under jit (the lax loop) "partial"
    is full reorthogonalisation."""

    SHAPES300 = {"a": (10, 20), "b": (100,)}

    def _problem(self):
        rng = np.random.default_rng(21)
        lam = np.concatenate([[100.0, 60.0, 40.0], rng.uniform(-1.0, 1.0, 297)])
        a, _ = dense(rng, lam)
        return rng, a, lam

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*DTYPES)
    def test_semi_orthogonal_no_ghosts(self, dtype):
        rng, a, lam = self._problem()
        shapes, steps = self.SHAPES300, 150
        with precision(dtype):
            matvec = dense_matvec(a, shapes, dtype)
            v = to_tree(rng.normal(size=300), shapes, dtype)
            run = lambda reo: self.variant(
                lambda v: E.lanczos(matvec, v, num_iters=steps, reorthogonalize=reo)
            )(v)
            partial, plain = run("partial"), run(False)
        eps = float(np.finfo(dtype).eps)
        top = np.sort(lam)[::-1][:3]
        for res, name in ((partial, "partial"), (plain, "plain")):
            assert res.alphas.dtype == dtype, name
        basis = np.stack(
            [to_flat(jax.tree.map(lambda x, j=j: x[j], partial.basis)) for j in range(steps)]
        )
        off = np.abs(basis @ basis.T - np.eye(steps)).max()
        assert off <= 30 * np.sqrt(eps), off
        t = lambda r: (
            np.diag(np.asarray(r.alphas, np.float64))
            + np.diag(np.asarray(r.betas[:-1], np.float64), 1)
            + np.diag(np.asarray(r.betas[:-1], np.float64), -1)
        )
        ritz = np.sort(np.linalg.eigvalsh(t(partial)))[::-1]
        np.testing.assert_allclose(ritz[:3], top, rtol=tol(dtype, 1e-5, 1e-12))
        copies = lambda r: int(np.sum(np.abs(np.linalg.eigvalsh(t(r)) - top[0]) < 1e-3 * top[0]))
        assert copies(partial) == 1
        assert copies(plain) > 1  # the premise: without reorthogonalisation lambda_1 repeats

    @parameterized.named_parameters(*DTYPES)
    def test_exhaustion_detected(self, dtype):
        """num_iters > dim: the breakdown is found as with full reorthogonalisation
        (num_valid, exact zeros after it, eigh's eigenvalues as Ritz values)."""
        rng = np.random.default_rng(22)
        lam = rng.normal(size=N) * 3
        a, _ = dense(rng, lam)
        with precision(dtype):
            matvec = dense_matvec(a, SHAPES, dtype)
            run = lambda x, steps: E.lanczos(
                matvec, to_tree(x, SHAPES, dtype), num_iters=steps, reorthogonalize="partial"
            )
            whole = run(rng.normal(size=N), N + 4)
        for res, dim, vals in ((whole, N, lam),):
            assert int(res.num_valid) == dim
            np.testing.assert_array_equal(np.asarray(res.betas[dim - 1 :]), 0)
            t = (
                np.diag(np.asarray(res.alphas[:dim], np.float64))
                + np.diag(np.asarray(res.betas[: dim - 1], np.float64), 1)
                + np.diag(np.asarray(res.betas[: dim - 1], np.float64), -1)
            )
            np.testing.assert_allclose(
                np.linalg.eigvalsh(t), np.sort(vals), atol=tol(dtype, 1e-5, 1e-12) * 30
            )

    @parameterized.named_parameters(*DTYPES)
    def test_quadrature_matches_full(self, dtype):
        """Same key, so the same probes: trace of the positive part and density nodes as with
        full reorthogonalisation, both within stderr of eigh's Tr H^+."""
        rng, a, lam = self._problem()
        shapes = self.SHAPES300
        with precision(dtype):
            matvec = dense_matvec(a, shapes, dtype)
            trace = lambda reo: E.trace_of_function(
                matvec, like(shapes, dtype), jax.random.key(5), E.positive_part,
                num_probes=6, num_iters=60, reorthogonalize=reo,
            )  # fmt: skip
            partial, full = trace("partial"), trace(True)
            dens = lambda reo: E.spectral_density(
                matvec, like(shapes, dtype), jax.random.key(6), num_probes=2, num_iters=60,
                reorthogonalize=reo,
            )  # fmt: skip
            d_partial, d_full = dens("partial"), dens(True)
        truth = np.maximum(lam, 0).sum()
        np.testing.assert_allclose(partial.value, full.value, rtol=tol(dtype, 1e-3, 1e-8))
        assert abs(float(partial.value) - truth) <= 4 * float(partial.stderr)
        np.testing.assert_allclose(
            np.asarray(d_partial.nodes).max(), lam.max(), rtol=tol(dtype, 1e-5, 1e-12)
        )
        np.testing.assert_allclose(
            np.trapezoid(np.asarray(d_partial.density), np.asarray(d_partial.grid)),
            1.0,
            atol=1e-2,
        )
        np.testing.assert_allclose(
            np.sort(np.asarray(d_partial.nodes).ravel())[-3:],
            np.sort(np.asarray(d_full.nodes).ravel())[-3:], rtol=tol(dtype, 1e-4, 1e-10),
        )  # fmt: skip
