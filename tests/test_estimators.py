"""Tests of hessjax.estimators against dense matrices with known spectra (numpy references).

Operators are ``A = Q diag(lam) Q^T`` with a random orthogonal ``Q`` (numpy), wrapped as matvecs
over small params pytrees (a dict of two arrays, so the pytree path is exercised), and as
block-diagonal operators over a real :class:`~hessjax.partition.Partition` (two kernel layers
and a bias that belongs to no layer). References come from ``numpy.linalg.eigh`` and closed
forms, never from the code under test.
"""

from __future__ import annotations

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from hessjax import estimators as E
from hessjax import partition as P

make_partition = P.layer_partition

SHAPES = {"a": (3, 4), "b": (5,)}  # n = 17, one pytree with two leaves
BLOCK_SHAPES = {"a": (3, 4), "b": (2, 3), "c": (4,)}  # layers a (12), b (6); c in no layer
N = 17
DTYPES = [("f32", np.float32), ("f64", np.float64)]


# --------------------------------------------------------------------------- helpers
def precision(dtype):
    return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


def tol(dtype, f32=2e-4, f64=1e-9):
    return f64 if dtype == np.float64 else f32


def orthogonal(rng, n):
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def dense(rng, lam):
    q = orthogonal(rng, len(lam))
    return (q * lam) @ q.T, q


def like(shapes, dtype):
    return {k: jnp.zeros(s, dtype) for k, s in shapes.items()}


def to_tree(x, shapes, dtype):
    out, i = {}, 0
    for k, s in shapes.items():
        size = int(np.prod(s))
        out[k] = jnp.asarray(np.asarray(x[i : i + size]).reshape(s), dtype)
        i += size
    return out


def to_flat(tree):
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(tree)])


def dense_matvec(a, shapes, dtype):
    aj = jnp.asarray(a, dtype)

    def matvec(v):
        x = jnp.concatenate([v[k].ravel() for k in shapes])
        y, out, i = aj @ x, {}, 0
        for k, s in shapes.items():
            size = int(np.prod(s))
            out[k] = y[i : i + size].reshape(s)
            i += size
        return out

    return matvec


def block_problem(rng, dtype, lam1=None, lam2=None):
    """Block-diagonal operator over BLOCK_SHAPES: layers a (12) and b (6); c maps to 0."""
    lam1 = rng.normal(size=12) if lam1 is None else lam1
    lam2 = rng.normal(size=6) if lam2 is None else lam2
    a1, _ = dense(rng, lam1)
    a2, _ = dense(rng, lam2)
    b1, b2 = jnp.asarray(a1, dtype), jnp.asarray(a2, dtype)

    def matvec(v):
        return {
            "a": (b1 @ v["a"].ravel()).reshape(3, 4),
            "b": (b2 @ v["b"].ravel()).reshape(2, 3),
            "c": jnp.zeros_like(v["c"]),
        }

    part = make_partition(like(BLOCK_SHAPES, dtype))
    assert part.names == ("a", "b") and part.sizes == (12, 6)
    return matvec, part, (a1, a2), (lam1, lam2)


def psd_part(a):
    w, u = np.linalg.eigh(a)
    return (u * np.maximum(w, 0)) @ u.T


# --------------------------------------------------------------------------- Lanczos
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


# --------------------------------------------------------------------------- quadratic forms
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


def flat_jnp(v):
    return jnp.concatenate([v["a"].ravel(), v["b"]])


def to_tree_jnp(x):
    return {"a": x[:12].reshape(3, 4), "b": x[12:]}


# --------------------------------------------------------------------------- traces
class TraceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*DTYPES)
    def test_hutchinson_exact_for_diagonal(self, dtype):
        d = np.arange(1.0, N + 1) - 5.0
        with precision(dtype):
            dj = jnp.asarray(d, dtype)
            matvec = lambda v: to_tree_jnp(dj * flat_jnp(v))
            est = self.variant(
                lambda k: E.hutchinson_trace(
                    matvec, like(SHAPES, dtype), k, num_probes=5, chunk_size=2
                )
            )(jax.random.key(0))
        assert est.value.dtype == dtype
        np.testing.assert_allclose(est.value, d.sum(), rtol=tol(dtype, 1e-6))
        np.testing.assert_allclose(est.stderr, 0.0, atol=tol(dtype, 1e-5))

    @chex.variants(with_jit=True)
    @parameterized.named_parameters(("f32", np.float32))  # f64: see the Lanczos tests
    def test_within_four_stderr(self, dtype):
        rng = np.random.default_rng(10)
        lam = 5.0 * 0.6 ** np.arange(N) + 0.1 * rng.normal(size=N)
        a, _ = dense(rng, lam)
        with precision(dtype):
            matvec = dense_matvec(a, SHAPES, dtype)
            hutch = self.variant(
                lambda k: E.hutchinson_trace(matvec, like(SHAPES, dtype), k, num_probes=20)
            )
            hpp = self.variant(
                lambda k: E.hutchpp_trace(
                    matvec, like(SHAPES, dtype), k, num_probes=20, chunk_size=3
                )
            )
            tslq = self.variant(
                lambda k: E.trace_of_function(
                    matvec, like(SHAPES, dtype), k, E.positive_part, num_probes=10, num_iters=N
                )
            )
            keys = jax.random.split(jax.random.key(0), 4)  # four seeds, one trace each
            results = [(jax.vmap(hutch)(keys), lam.sum()), (jax.vmap(hpp)(keys), lam.sum())]
            results.append((jax.vmap(tslq)(keys), np.maximum(lam, 0).sum()))
        for est, truth in results:
            assert est.value.shape == (4,) and est.value.dtype == dtype
            assert np.all(np.abs(np.asarray(est.value) - truth) <= 4 * np.asarray(est.stderr))

    @chex.variants(with_jit=True)
    def test_per_layer(self):
        rng = np.random.default_rng(11)
        lam1 = 4.0 * 0.5 ** np.arange(12) - 0.2
        lam2 = np.array([3.0, 1.0, -1.0, 0.5, 0.2, 0.1])
        matvec, part, _, _ = block_problem(rng, np.float32, lam1, lam2)
        like_ = like(BLOCK_SHAPES, np.float32)
        truth = np.array([lam1.sum(), lam2.sum()])
        truth_pos = np.array([np.maximum(lam1, 0).sum(), np.maximum(lam2, 0).sum()])
        hutch = self.variant(
            lambda k: E.hutchinson_trace(matvec, like_, k, num_probes=30, partition=part)
        )
        hpp = self.variant(
            lambda k: E.hutchpp_trace(matvec, like_, k, num_probes=30, partition=part)
        )
        tslq = self.variant(
            lambda k: E.trace_of_function(
                matvec, like_, k, E.positive_part, num_probes=16, num_iters=12, partition=part
            )
        )
        keys = jax.random.split(jax.random.key(1), 3)
        for fn, ref in ((hutch, truth), (hpp, truth), (tslq, truth_pos)):
            est = jax.vmap(fn)(keys)
            assert est.value.shape == est.stderr.shape == (3, 2)
            assert np.all(np.abs(est.value - ref) <= 4 * est.stderr + 1e-4)

    def test_hutchpp_exact_when_sketch_spans(self):
        rng = np.random.default_rng(12)
        lam = np.zeros(N)
        lam[:3] = [5.0, -2.0, 1.0]  # rank 3: a sketch of 3 vectors captures H exactly
        a, _ = dense(rng, lam)
        matvec = dense_matvec(a, SHAPES, np.float32)
        est = jax.jit(
            lambda k: E.hutchpp_trace(matvec, like(SHAPES, np.float32), k, num_probes=11)
        )(jax.random.key(0))
        np.testing.assert_allclose(est.value, 4.0, atol=1e-4)
        np.testing.assert_allclose(est.stderr, 0.0, atol=1e-4)

    def test_single_probe_stderr_is_nan(self):
        matvec = lambda v: v
        est = E.hutchinson_trace(matvec, like(SHAPES, np.float32), jax.random.key(0), num_probes=1)
        assert float(est.value) == N and np.isnan(est.stderr)


# --------------------------------------------------------------------------- density, power
class DensityAndPowerTest(chex.TestCase):
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


# --------------------------------------------------------------------------- errors
def _errors():
    mv = lambda v: v
    lk = like(SHAPES, np.float32)
    key = jax.random.key(0)
    bad_like = like(BLOCK_SHAPES, np.float32)
    part = make_partition(bad_like)
    return [
        ("num_probes", lambda: E.hutchinson_trace(mv, lk, key, num_probes=0)),
        ("num_probes", lambda: E.hutchpp_trace(mv, lk, key, num_probes=2)),
        (
            "num_probes",
            lambda: E.trace_of_function(mv, lk, key, jnp.abs, num_probes=0, num_iters=2),
        ),
        ("num_iters", lambda: E.lanczos(mv, lk, num_iters=0)),
        ("num_iters", lambda: E.quadratic_form(mv, lk, jnp.abs, num_iters=0)),
        ("num_iters", lambda: E.spectral_density(mv, lk, key, num_probes=1, num_iters=0)),
        ("num_iters", lambda: E.power_iteration(mv, lk, key, num_iters=0)),
        ("k must be <= the dimension 17, got k=18", lambda: E.eigenvalues(mv, lk, key, k=18)),
        (
            "smallest layer size 6, got k=7",
            lambda: E.eigenvalues(mv, bad_like, key, k=7, partition=part),
        ),
        ("k must be >= 1, got 0", lambda: E.eigenvalues(mv, lk, key, k=0)),
        ("num_iters must be >= k=5, got 3", lambda: E.eigenvalues(mv, lk, key, k=5, num_iters=3)),
        ("which", lambda: E.eigenvalues(mv, lk, key, k=1, which="largest")),
        ("k must be <= the dimension", lambda: E.power_iteration(mv, lk, key, k=18, num_iters=3)),
        ("like", lambda: E.hutchinson_trace(mv, lk, key, num_probes=3, partition=part)),
        ("like", lambda: E.hutchpp_trace(mv, lk, key, num_probes=3, partition=part)),
        ("v0", lambda: E.lanczos(mv, lk, num_iters=3, partition=part)),
        (
            "v leaf 'b'",
            lambda: E.quadratic_form(
                mv, dict(bad_like, b=jnp.zeros(6)), jnp.abs, num_iters=3, partition=part
            ),
        ),
        ("chunk_size", lambda: E.hutchinson_trace(mv, lk, key, num_probes=3, chunk_size=0)),
        ("sigma", lambda: E.spectral_density(mv, lk, key, num_probes=1, num_iters=2, sigma=0.0)),
    ]


@pytest.mark.parametrize("index", range(19))
def test_errors(index):
    message, call = _errors()[index]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call()


def test_type_errors():
    with pytest.raises(TypeError, match="num_probes must be an int"):
        E.hutchinson_trace(lambda v: v, jnp.zeros(3), jax.random.key(0), num_probes=2.0)
    with pytest.raises(TypeError, match="like leaf .* dtype int32"):
        E.hutchinson_trace(lambda v: v, jnp.zeros(3, jnp.int32), jax.random.key(0), num_probes=2)


def test_public_names():
    import hessjax

    for name in ("Estimate", "lanczos", "quadratic_form", "positive_quadratic_form"):
        assert getattr(hessjax, name) is getattr(E, name)
