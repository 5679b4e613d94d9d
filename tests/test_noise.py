"""Tests of hessjax.noise: transition matrices, corruption, estimation, validation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from hessjax.noise import (
    anchor_transition,
    confusion_counts,
    corrupt_labels,
    dual_t_transition,
    pair_flip_transition,
    replace_labels,
    symmetric_transition,
    transition_from_counts,
    uniform_replacement_transition,
    validate_transition,
)


def np_symmetric(rate, k):
    t = np.full((k, k), rate / (k - 1))
    np.fill_diagonal(t, 1 - rate)
    return t


def np_uniform(rate, k):
    t = np.full((k, k), rate / k)
    np.fill_diagonal(t, 1 - rate + rate / k)
    return t


def np_pair(rate, k):
    t = np.zeros((k, k))
    for i in range(k):
        t[i, i] = 1 - rate
        t[i, (i + 1) % k] += rate
    return t


class TransitionMatrices(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(kind=["symmetric", "uniform", "pair"], dtype=["float32", "float64"])
    def test_matches_numpy(self, kind, dtype):
        fn, ref = {
            "symmetric": (symmetric_transition, np_symmetric),
            "uniform": (uniform_replacement_transition, np_uniform),
            "pair": (pair_flip_transition, np_pair),
        }[kind]
        with jax.enable_x64(dtype == "float64"):
            out = self.variant(lambda r: fn(r, num_classes=5, dtype=jnp.dtype(dtype)))(0.3)
            assert out.dtype == jnp.dtype(dtype)
            np.testing.assert_allclose(out, ref(0.3, 5), rtol=1e-6)
            validate_transition(out)


def test_counts_and_from_counts():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, 50)
    b = rng.integers(0, 3, 50)
    c = confusion_counts(jnp.asarray(a), jnp.asarray(b), num_classes=4)
    ref = np.zeros((4, 4))
    for i, j in zip(a, b, strict=True):
        ref[i, j] += 1
    np.testing.assert_array_equal(c, ref)
    t = transition_from_counts(c)
    np.testing.assert_allclose(t[:3], ref[:3] / ref[:3].sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(t[3], [0, 0, 0, 1])  # class 3 never seen: identity row
    validate_transition(t)


def test_corrupt_labels_matches_transition():
    """Empirical P(noisy j | clean i) over 20k draws per class within 4 binomial stderrs."""
    k, n = 4, 20000
    t = np.asarray(pair_flip_transition(0.3, num_classes=k)) * 0.5 + 0.5 * np_symmetric(0.4, k)
    clean = jnp.repeat(jnp.arange(k), n)
    noisy = jax.jit(corrupt_labels)(jax.random.key(0), clean, jnp.asarray(t, jnp.float32))
    assert noisy.shape == clean.shape and noisy.dtype == clean.dtype
    emp = np.asarray(confusion_counts(clean, noisy, num_classes=k)) / n
    stderr = np.sqrt(t * (1 - t) / n)
    assert np.all(np.abs(emp - t) <= 4 * stderr + 1e-12), np.abs(emp - t).max()
    # zero-probability entries are never drawn
    t0 = pair_flip_transition(0.3, num_classes=k)
    noisy0 = corrupt_labels(jax.random.key(1), clean, t0)
    assert np.all(
        np.asarray(confusion_counts(clean, noisy0, num_classes=k))[np.asarray(t0) == 0] == 0
    )


def test_replace_labels_reference_scheme():
    k, n, rate = 5, 10000, 0.4
    clean = jnp.asarray(np.random.default_rng(1).integers(0, k, n), jnp.int32)
    noisy = replace_labels(jax.random.key(2), clean, rate, num_classes=k)
    changed = float((noisy != clean).mean())
    # exactly int(rate n) labels are redrawn; a redraw keeps the label w.p. 1/k
    m = int(rate * n)
    expected, sd = rate * (k - 1) / k, np.sqrt(m * (1 / k) * (1 - 1 / k)) / n
    assert abs(changed - expected) <= 4 * sd
    assert changed <= rate
    emp = np.asarray(transition_from_counts(confusion_counts(clean, noisy, num_classes=k)))
    np.testing.assert_allclose(
        emp, np.asarray(uniform_replacement_transition(rate, num_classes=k)), atol=0.03
    )


def synthetic_posteriors(key, t, n, anchors_per_class):
    """Noisy posteriors p = c @ T from clean posteriors c, with near-anchor points.

    n examples have c ~ Dirichlet(1); for each class i, ``anchors_per_class`` near-anchors have
    c = (1 - d) e_i + d u with u ~ Dirichlet(1) and purity gap d ~ Uniform(0, 0.02). (Exact
    anchors would all tie at the top and be dropped by the percentile filter.)
    """
    k = t.shape[0]
    k1, k2, k3 = jax.random.split(key, 3)
    clean = jax.random.dirichlet(k1, jnp.ones(k), (n,))
    m = k * anchors_per_class
    d = jax.random.uniform(k2, (m, 1), maxval=0.02)
    u = jax.random.dirichlet(k3, jnp.ones(k), (m,))
    near = (1 - d) * jnp.repeat(jnp.eye(k), anchors_per_class, axis=0) + d * u
    return jnp.concatenate([clean, near]) @ t


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
def test_anchor_recovers_transition(kind):
    k = 5
    t = jnp.asarray(np_symmetric(0.4, k) if kind == "symmetric" else np_pair(0.3, k), jnp.float32)
    probs = synthetic_posteriors(jax.random.key(0), t, 1000, anchors_per_class=100)
    est = anchor_transition(probs)  # drops the top 3% (45 of the 100 near-anchors per class)
    err = float(jnp.abs(est - t).max())
    assert err < 0.01, err
    # without near-anchors the estimate is clearly worse (the check can fail)
    probs_no = synthetic_posteriors(jax.random.key(0), t, 1000, anchors_per_class=0)
    err_no = float(jnp.abs(anchor_transition(probs_no) - t).max())
    assert err_no > 3 * err, (err, err_no)


def test_anchor_matches_numpy_loop():
    """Against a numpy transcription of the percentile rule (independent code path)."""
    probs = np.asarray(jax.random.dirichlet(jax.random.key(3), jnp.ones(4), (257,)))
    ref = np.empty((4, 4))
    for i in range(4):
        col = probs[:, i].copy()
        thresh = np.percentile(col, 97, method="higher")
        col[col >= thresh] = 0.0
        ref[i] = probs[np.argmax(col)]
    np.testing.assert_allclose(anchor_transition(jnp.asarray(probs)), ref, rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(anchor_transition, static_argnames="percentile")(
            jnp.asarray(probs), percentile=None
        ),
        probs[probs.argmax(0)],
        rtol=1e-6,
    )


def test_dual_t_recovers_transition():
    """Dual-T on data drawn from its own model: clean c -> predicted a (T_anchor) -> noisy b.

    Most examples are predicted confidently (probs ~ one-hot at a, a ~ A[c]) and their noisy
    label is drawn from B[a]; anchor examples of class i have probs = A[i]. Then T = A @ B.
    """
    k, n = 4, 20000
    rng = np.random.default_rng(5)
    a_mat = 0.8 * np.eye(k) + 0.2 * rng.dirichlet(np.ones(k), k)
    b_mat = np_pair(0.25, k)
    key = jax.random.key(6)
    k1, k2, k3 = jax.random.split(key, 3)
    clean = jax.random.randint(k1, (n,), 0, k)
    pred = corrupt_labels(k2, clean, jnp.asarray(a_mat))
    probs = 0.98 * jax.nn.one_hot(pred, k) + 0.02 / k
    noisy = corrupt_labels(k3, pred, jnp.asarray(b_mat))
    anchors = jnp.repeat(jnp.asarray(a_mat, jnp.float32), 40, axis=0)
    anchor_noisy = corrupt_labels(
        jax.random.key(7), jnp.repeat(jnp.arange(k), 40), jnp.asarray(a_mat @ b_mat)
    )
    est = dual_t_transition(
        jnp.concatenate([probs, anchors]), jnp.concatenate([noisy, anchor_noisy])
    )
    truth = a_mat @ b_mat
    err = float(np.abs(np.asarray(est) - truth).max())
    assert err < 0.03, err
    # the counting factor matters: T_anchor alone (A) is far from T
    assert np.abs(a_mat - truth).max() > 0.1


def test_dual_t_matches_numpy_reference():
    rng = np.random.default_rng(8)
    probs = rng.dirichlet(np.ones(3), 300)
    noisy = rng.integers(0, 3, 300)
    pred = probs.argmax(1)
    counts = np.zeros((3, 3))
    for a, b in zip(pred, noisy, strict=True):
        counts[a, b] += 1
    t_pred = counts / counts.sum(1, keepdims=True)
    ref = np.asarray(anchor_transition(jnp.asarray(probs))) @ t_pred
    np.testing.assert_allclose(
        dual_t_transition(jnp.asarray(probs), jnp.asarray(noisy)), ref, rtol=1e-5
    )


def test_validation_errors():
    with pytest.raises(ValueError, match="rows summing to 1"):
        validate_transition(np.array([[0.5, 0.4], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"non-negative.*T\[0, 1\]"):
        validate_transition(np.array([[1.2, -0.2], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        validate_transition(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="finite"):
        validate_transition(np.array([[np.nan, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="singular or badly conditioned.*rate = \\(k-1\\)/k"):
        validate_transition(symmetric_transition(4 / 5, num_classes=5), invertible=True)
    with pytest.raises(ValueError, match="singular"):
        validate_transition(symmetric_transition(0.8 - 1e-8, num_classes=5), invertible=True)
    validate_transition(symmetric_transition(4 / 5, num_classes=5))  # fine for forward use
    with pytest.raises(ValueError, match=r"rate.*\[0, 1\].*1.5"):
        symmetric_transition(1.5, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        symmetric_transition(0.1, num_classes=1)
    with pytest.raises(ValueError, match=r"labels.*\[0, 3\).*\[3\]"):
        corrupt_labels(
            jax.random.key(0), jnp.array([0, 3]), symmetric_transition(0.1, num_classes=3)
        )
    with pytest.raises(ValueError, match="rows summing to 1"):
        corrupt_labels(jax.random.key(0), jnp.array([0, 1]), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="rate.*concrete"):
        jax.jit(
            lambda r: replace_labels(jax.random.key(0), jnp.zeros(4, jnp.int32), r, num_classes=2)
        )(0.5)
    with pytest.raises(ValueError, match="probs"):
        anchor_transition(jnp.ones(3))
    with pytest.raises(ValueError, match="noisy_labels.*shape"):
        dual_t_transition(jnp.ones((4, 2)) / 2, jnp.zeros(3, jnp.int32))
