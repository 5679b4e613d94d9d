"""Tests of hessjax.measures against dense references (jax.hessian + numpy.linalg.eigh)."""

from __future__ import annotations

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import hessjax
from hessjax import measures
from tests import _models


def _problem(name, activation="tanh", dtype=jnp.float64, seed=0, scale=0.3):
    """Per-example problem plus an anchor at a random displacement from params."""
    loss, params, examples = _models.example_problem(
        name, dtype=dtype, activation=activation, seed=seed
    )
    rng = np.random.default_rng(seed + 100)
    anchor = jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), params
    )
    return loss, params, anchor, examples


def _rows(examples, i):
    return jax.tree_util.tree_map(lambda x: x[i], examples)


def _num(examples):
    return jax.tree_util.tree_leaves(examples)[0].shape[0]


def per_example_hessians(loss, params, examples):
    """Dense Hessian of every example's loss, (m, P, P): one vmapped jax.hessian, no hessjax."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    hess = jax.vmap(jax.hessian(lambda w, ex: loss(unravel(w), ex)), in_axes=(None, 0))
    return np.asarray(jax.jit(hess)(flat, examples), np.float64)


def dense_measure(loss, params, anchor, examples, part, n, truncate=True):
    """calH_i from dense per-example Hessians, eigendecomposed block by block."""
    ids = _models.layer_ids(part, params)
    v = np.asarray(_models.ravel(params) - _models.ravel(anchor), np.float64)
    values = np.zeros((_num(examples), part.num_layers))
    for e, hess in enumerate(per_example_hessians(loss, params, examples)):
        for i in range(part.num_layers):
            idx = np.flatnonzero(ids == i)
            block, vi = hess[np.ix_(idx, idx)], v[idx]
            if truncate:
                lam, vecs = np.linalg.eigh(block)
                values[e, i] = vi @ (vecs * np.maximum(lam, 0.0)) @ vecs.T @ vi
            else:
                values[e, i] = max(vi @ block @ vi, 0.0)
    per_layer = values.max(axis=0)
    return per_layer, values, np.sum(np.sqrt(per_layer / n))


def dense_reference(loss, params, anchor, examples, part, batch_size):
    """The reference code's number: full H v with all layers' v, per batch mean loss."""
    ids = _models.layer_ids(part, params)
    v = np.asarray(_models.ravel(params) - _models.ravel(anchor), np.float64)
    v = np.where(ids >= 0, v, 0.0)
    m = _num(examples)
    out = []
    for start in range(0, m, batch_size):
        idx = np.arange(start, min(start + batch_size, m))
        batch = jax.tree_util.tree_map(lambda x: x[idx], examples)

        k = len(idx)

        def batch_loss(p, batch=batch, k=k):
            return sum(loss(p, _rows(batch, j)) for j in range(k)) / k

        hv = np.asarray(_models.dense_hessian(batch_loss, params), np.float64) @ v
        out.append([v[ids == i] @ hv[ids == i] for i in range(part.num_layers)])
    return np.max(np.asarray(out), axis=0)


def max_layer_size(part):
    return max(part.sizes)


# ----------------------------------------------------------------------------- canonical
class TestCanonical(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_dense(self):
        for name, activation in (("dict_mlp", "relu"), ("dict_cnn", "tanh"), ("nnx_cnn", "relu")):
            with jax.enable_x64(True):
                loss, params, anchor, examples = _problem(name, activation)
                part = hessjax.layer_partition(params)
                k = max_layer_size(part)
                fn = self.variant(
                    lambda p, a, ex, loss=loss, part=part, k=k: measures.hessian_distance(
                        loss, p, a, ex, n=50, partition=part, num_iters=k, chunk_size=3
                    )
                )
                r = fn(params, anchor, examples)
                want, values, measure = dense_measure(loss, params, anchor, examples, part, 50)
                np.testing.assert_allclose(r.per_layer, want, rtol=1e-7, atol=1e-10)
                np.testing.assert_allclose(r.measure, measure, rtol=1e-7)
                np.testing.assert_array_equal(r.argmax, values.argmax(axis=0))
                assert r.names == part.names

    def test_truncation_changes_the_value_somewhere(self):
        # The truncated and untruncated dense values differ on these models, so the
        # comparison above does check the truncation.
        with jax.enable_x64(True):
            loss, params, anchor, examples = _problem("dict_mlp", "tanh")
            part = hessjax.layer_partition(params)
            _, trunc, _ = dense_measure(loss, params, anchor, examples, part, 1)
            _, clip, _ = dense_measure(loss, params, anchor, examples, part, 1, truncate=False)
            assert np.max(np.abs(trunc - clip)) > 1e-6
            r = measures.hessian_distance(
                loss, params, anchor, examples, n=1, partition=part, truncate=False
            )
            np.testing.assert_allclose(r.per_layer, clip.max(axis=0), rtol=1e-7, atol=1e-12)

    def test_grouped_partition_and_nnx_relu(self):
        with jax.enable_x64(True):
            loss, params, anchor, examples = _problem("nnx_cnn", "relu")
            examples = jax.tree_util.tree_map(lambda x: x[:3], examples)
            part = hessjax.layer_partition(params, select="kernel|bias|scale", group="module")
            r = measures.hessian_distance(
                loss, params, anchor, examples, n=7, partition=part, num_iters=max(part.sizes)
            )
            want, _, measure = dense_measure(loss, params, anchor, examples, part, 7)
            np.testing.assert_allclose(r.per_layer, want, rtol=1e-7, atol=1e-10)
            np.testing.assert_allclose(r.measure, measure, rtol=1e-7)

    def test_float32_close_to_float64_dense(self):
        with jax.enable_x64(True):
            loss, params, anchor, examples = _problem("dict_mlp", "tanh")
            part = hessjax.layer_partition(params)
            want, _, measure = dense_measure(loss, params, anchor, examples, part, 10)
        loss, params, anchor, examples = _problem("dict_mlp", "tanh", dtype=jnp.float32)
        part = hessjax.layer_partition(params)
        r = measures.hessian_distance(loss, params, anchor, examples, n=10, num_iters=30)
        assert r.per_layer.dtype == jnp.float32
        np.testing.assert_allclose(r.per_layer, want, rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose(r.measure, measure, rtol=2e-3)


# ----------------------------------------------------------------------------- reference
class TestReference(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_dense(self):
        for name in ("dict_mlp", "nnx_cnn"):
            with jax.enable_x64(True):
                loss, params, anchor, examples = _problem(name, "tanh")
                part = hessjax.layer_partition(params)
                fn = self.variant(
                    lambda p, a, ex, loss=loss: measures.hessian_distance(
                        loss, p, a, ex, n=9, variant="reference", batch_size=3
                    )
                )
                r = fn(params, anchor, examples)  # 8 examples: batches of 3, 3, 2
                want = dense_reference(loss, params, anchor, examples, part, 3)
                np.testing.assert_allclose(r.per_layer, want, rtol=1e-7, atol=1e-10)
                np.testing.assert_allclose(
                    r.measure, np.sum(np.sqrt(np.maximum(want, 0) / 9)), rtol=1e-7
                )
                assert r.losses.shape == (3,)


# ----------------------------------------------------------------------------- properties
def test_zero_when_params_equal_anchor():
    loss, params, _, examples = _problem("dict_cnn", dtype=jnp.float32)
    for variant in measures.VARIANTS:
        r = measures.hessian_distance(loss, params, params, examples, n=5, variant=variant)
        assert float(r.measure) == 0.0
        assert np.all(np.isfinite(r.per_layer))


def test_scaling_v_by_t_scales_calh_by_t_squared():
    with jax.enable_x64(True):
        loss, params, anchor, examples = _problem("dict_mlp", "tanh")
        v = jax.tree_util.tree_map(jnp.subtract, params, anchor)
        r1 = measures.hessian_distance(loss, params, anchor, examples, n=3, num_iters=40)
        for t in (0.5, 3.0):
            anchor_t = jax.tree_util.tree_map(lambda p, d, t=t: p - t * d, params, v)
            rt = measures.hessian_distance(loss, params, anchor_t, examples, n=3, num_iters=40)
            np.testing.assert_allclose(rt.per_layer, t**2 * r1.per_layer, rtol=1e-8, atol=1e-14)
            np.testing.assert_allclose(rt.measure, t * r1.measure, rtol=1e-8)


def test_adding_an_example_never_decreases_the_measure():
    with jax.enable_x64(True):
        loss, params, anchor, examples = _problem("dict_cnn", "relu")
        previous = -np.inf
        for m in (1, 4, _num(examples)):
            sub = jax.tree_util.tree_map(lambda x, m=m: x[:m], examples)
            r = measures.hessian_distance(loss, params, anchor, sub, n=8, num_iters=8)
            assert float(r.measure) >= previous - 1e-12
            previous = float(r.measure)


def test_chunking_does_not_change_the_result():
    loss, params, anchor, examples = _problem("dict_mlp", dtype=jnp.float32)
    a = measures.hessian_distance(loss, params, anchor, examples, n=4, chunk_size=None)
    b = measures.hessian_distance(
        loss, params, anchor, examples, n=4, chunk_size=3, layer_chunk_size=2
    )
    np.testing.assert_allclose(a.per_layer, b.per_layer, rtol=1e-6)
    np.testing.assert_array_equal(a.argmax, b.argmax)


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    loss, params, anchor, examples = _problem("dict_mlp", dtype=jnp.float32)
    bad_shape = jax.tree_util.tree_map(lambda x: x, anchor)
    first = next(iter(bad_shape))
    bad_shape[first] = dict(bad_shape[first])
    key = next(iter(bad_shape[first]))
    bad_shape[first][key] = jnp.zeros((7, 7), jnp.float32)
    with pytest.raises(ValueError, match=f"anchor leaf '{first}/{key}' has shape"):
        measures.hessian_distance(loss, params, bad_shape, examples, n=4)
    with pytest.raises(ValueError, match="anchor must have the same tree structure"):
        measures.hessian_distance(loss, params, {"x": jnp.zeros(3)}, examples, n=4)
    with pytest.raises(TypeError, match="anchor leaf .* dtype"):
        measures.hessian_distance(
            loss,
            params,
            jax.tree_util.tree_map(lambda x: x.astype(jnp.float16), anchor),
            examples,
            n=4,
        )
    for n in (0, -3, 0.5, float("nan")):
        with pytest.raises(ValueError, match="n \\(the training-set size\\)"):
            measures.hessian_distance(loss, params, anchor, examples, n=n)
    empty = jax.tree_util.tree_map(lambda x: x[:0], examples)
    with pytest.raises(ValueError, match="examples is empty"):
        measures.hessian_distance(loss, params, anchor, empty, n=4)
    with pytest.raises(ValueError, match="variant must be one of"):
        measures.hessian_distance(loss, params, anchor, examples, n=4, variant="paper")
    with pytest.raises(ValueError, match="num_iters must be an int >= 1"):
        measures.hessian_distance(loss, params, anchor, examples, n=4, num_iters=0)
    nan_examples = jax.tree_util.tree_map(
        lambda x: x.at[2].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x, examples
    )
    for variant in measures.VARIANTS:
        with pytest.raises(ValueError, match="non-finite loss"):
            measures.hessian_distance(loss, params, anchor, nan_examples, n=4, variant=variant)


# ----------------------------------------------------------------------------- companions
def test_distances_and_spectral_norms_match_numpy():
    loss, params, anchor, _ = _problem("dict_cnn", dtype=jnp.float32)
    part = hessjax.layer_partition(params)
    d = measures.distances(params, anchor)
    want = [
        np.linalg.norm(np.asarray(a) - np.asarray(b))
        for a, b in zip(part.split(params).values(), part.split(anchor).values(), strict=True)
    ]
    np.testing.assert_allclose(d, np.ravel(want), rtol=1e-5)
    s = measures.spectral_norms(params)
    want = [
        np.linalg.svd(np.asarray(x[0]).reshape(-1, x[0].shape[-1]), compute_uv=False)[0]
        for x in part.split(params).values()
    ]
    np.testing.assert_allclose(s, want, rtol=1e-4)
    grouped = hessjax.layer_partition(params, select="kernel|bias|w|b", group="module")
    for name, leaves in grouped.split(params).items():
        mat = np.concatenate([np.asarray(x).reshape(-1, x.shape[-1]) for x in leaves])
        i = grouped.names.index(name)
        np.testing.assert_allclose(
            measures.spectral_norms(params, partition=grouped)[i],
            np.linalg.svd(mat, compute_uv=False)[0],
            rtol=1e-4,
        )


def _diag_problem():
    """Per-example loss with diagonal, indefinite layer blocks: H = diag(c(x))."""
    params = {"a": jnp.array([[1.0, -2.0], [0.5, 1.5]]), "b": jnp.array([[2.0, 1.0, -1.0]])}
    coeff = {"a": jnp.array([[1.0, -3.0], [2.0, 0.5]]), "b": jnp.array([[-1.0, 4.0, 2.0]])}
    xs = jnp.array([1.0, -1.0, 2.0])

    def loss(p, x):
        return 0.5 * sum(jnp.sum(x * coeff[k] * p[k] ** 2) for k in p)

    truth = np.array(
        [
            [np.sum(np.maximum(x * np.asarray(coeff[k]), 0)) for k in ("a", "b")]
            for x in np.asarray(xs)
        ]
    )
    return loss, params, xs, truth


def test_layer_traces_exact_on_diagonal_blocks():
    loss, params, xs, truth = _diag_problem()
    t = measures.layer_traces(loss, params, xs, jax.random.key(3), num_probes=3, num_iters=4)
    np.testing.assert_allclose(t.per_example, truth, rtol=1e-5)
    np.testing.assert_allclose(t.max, truth.max(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(t.argmax, truth.argmax(axis=0))
    np.testing.assert_allclose(t.mean, truth.mean(axis=0), rtol=1e-5)


def test_layer_traces_within_four_stderr_of_dense():
    with jax.enable_x64(True):
        loss, params, _, examples = _problem("dict_mlp", "tanh")
        part = hessjax.layer_partition(params)
        ids = _models.layer_ids(part, params)
        num_probes = 48
        for seed in range(2):
            t = measures.layer_traces(
                loss,
                params,
                examples,
                jax.random.key(seed),
                num_probes=num_probes,
                num_iters=max(part.sizes),
            )
            for e, hess in enumerate(per_example_hessians(loss, params, examples)):
                for i in range(part.num_layers):
                    idx = np.flatnonzero(ids == i)
                    lam, vecs = np.linalg.eigh(hess[np.ix_(idx, idx)])
                    a = (vecs * np.maximum(lam, 0)) @ vecs.T
                    # Exact variance of the Rademacher estimator: 2 (||A||_F^2 - sum A_jj^2).
                    var = 2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / num_probes
                    err = abs(float(t.per_example[e, i]) - np.trace(a))
                    assert err <= 4 * np.sqrt(var) + 1e-9, (seed, e, i, err, np.sqrt(var))


def test_noise_stability_matches_trace_prediction():
    with jax.enable_x64(True):
        loss, params, batch = _models.dict_mlp(dtype=jnp.float64, activation="tanh")
        part = hessjax.layer_partition(params)
        ids = _models.layer_ids(part, params)
        hess = np.asarray(_models.dense_hessian(loss, params, batch))
        sigma = 1e-2
        truth = 0.5 * sigma**2 * np.trace(hess[np.ix_(ids >= 0, ids >= 0)])
        r = measures.noise_stability(
            loss, params, batch, jax.random.key(0), sigma=sigma, num_draws=400, num_probes=64
        )
        assert abs(float(r.predicted) - truth) <= 4 * float(r.predicted_stderr) + 1e-12
        # Antithetic pairs cancel the first-order term: what is left is O(sigma^2).
        assert abs(float(r.value) - truth) <= 4 * float(r.stderr) + 0.05 * abs(truth)
    with pytest.raises(ValueError, match="num_draws must be an int >= 2"):
        measures.noise_stability(loss, params, batch, jax.random.key(0), sigma=1.0, num_draws=1)


def test_report_table_and_json():
    loss, params, anchor, examples = _problem("dict_mlp", dtype=jnp.float32)
    r = measures.hessian_distance(loss, params, anchor, examples, n=4)
    t = measures.layer_traces(loss, params, examples, jax.random.key(0), num_probes=2)
    rep = measures.report(r, t)
    text = str(rep)
    for name in r.names:
        assert name in text
    assert "max Tr H+" in text and "measure" in text
    d = __import__("json").loads(rep.to_json())
    assert [row["layer"] for row in d["layers"]] == list(r.names)
    np.testing.assert_allclose(sum(row["share"] for row in d["layers"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(d["measure"], float(r.measure), rtol=1e-6)
    other = measures.LayerTraces(("x",), t.max[:1], t.argmax[:1], t.mean[:1], t.per_example)
    with pytest.raises(ValueError, match="traces are for layers"):
        measures.report(r, other)


def test_hessian_distance_is_not_retraced():
    loss, params, anchor, examples = _problem("dict_mlp", dtype=jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def measure(p, a, ex):
        return measures.hessian_distance(loss, p, a, ex, n=4, num_iters=4).measure

    first = measure(params, anchor, examples)
    anchor2 = jax.tree_util.tree_map(lambda x: 0.9 * x, anchor)
    second = measure(params, anchor2, examples)
    assert np.isfinite(first) and np.isfinite(second) and float(first) != float(second)
