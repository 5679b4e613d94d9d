"""Hutchinson and Hutch++ traces (hessjax.estimators.trace) against exact traces."""

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
    flat_jnp,
    like,
    precision,
    psd_part,
    to_tree_jnp,
    tol,
)


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
            # 256 seeds, one trace each: a coverage rate and the bias, not one lucky draw
            # (Hutch++ at 20 probes leaves g = 8 Hutchinson samples: its stderr is itself
            # noisy, and about 2% of its estimates lie beyond 4 stderr, measured)
            keys = jax.random.split(jax.random.key(0), 256)
            results = [(jax.vmap(hutch)(keys), lam.sum()), (jax.vmap(hpp)(keys), lam.sum())]
            results.append((jax.vmap(tslq)(keys), np.maximum(lam, 0).sum()))
        for est, truth in results:
            assert est.value.shape == (256,) and est.value.dtype == dtype
            value = np.asarray(est.value, np.float64)
            err = np.abs(value - truth)
            assert np.mean(err > 4 * np.asarray(est.stderr)) <= 0.05
            assert abs(value.mean() - truth) <= 4 * value.std() / np.sqrt(len(value))

    @chex.variants(with_jit=True)
    def test_per_layer(self):
        rng = np.random.default_rng(11)
        lam1 = 4.0 * 0.5 ** np.arange(12) - 0.2
        lam2 = np.array([3.0, 1.0, -1.0, 0.5, 0.2, 0.1])
        matvec, part, mats, _ = block_problem(rng, np.float32, lam1, lam2)
        like_ = like(BLOCK_SHAPES, np.float32)
        truth = np.array([lam1.sum(), lam2.sum()])
        truth_pos = np.array([np.maximum(lam1, 0).sum(), np.maximum(lam2, 0).sum()])

        def exact_sd(blocks, num_probes):  # Rademacher: Var z^T A z = 2 (||A||_F^2 - sum A_jj^2)
            var = [2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) for a in blocks]
            return np.sqrt(np.asarray(var) / num_probes)

        sd_hutch = exact_sd(mats, 30)
        sd_tslq = exact_sd([psd_part(a) for a in mats], 16)  # 12 steps: exact per probe
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
        for fn, ref, sd in (
            (hutch, truth, sd_hutch),
            (hpp, truth, None),
            (tslq, truth_pos, sd_tslq),
        ):
            est = jax.vmap(fn)(keys)
            assert est.value.shape == est.stderr.shape == (3, 2)
            # within 4 standard deviations: the exact one where known (Hutch++: the estimate)
            scale = est.stderr if sd is None else sd
            assert np.all(np.abs(est.value - ref) <= 4 * scale + 1e-4)

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
