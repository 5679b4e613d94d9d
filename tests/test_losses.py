"""Tests of hessjax.losses against numpy formulas, closed forms and the unbiasedness identity."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from hessjax.losses import (
    backward_corrected_cross_entropy,
    bootstrapped_cross_entropy,
    forward_corrected_cross_entropy,
    generalized_cross_entropy,
    label_smoothing_cross_entropy,
    symmetric_cross_entropy,
)
from hessjax.noise import pair_flip_transition, symmetric_transition

K = 4


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def random_transition(rng, k):
    t = rng.uniform(0.0, 1.0, (k, k)) + 3 * np.eye(k)  # diagonally dominant: invertible
    return t / t.sum(1, keepdims=True)


# numpy references, one example at a time
def np_backward(z, y, t, clip=False):
    r = np.linalg.inv(np.asarray(t, np.float64))
    if clip:
        r = np.maximum(r, 0)
    return -(r[y] * np.log(np_softmax(z))).sum()


def np_forward(z, y, t):
    return -np.log(np_softmax(z) @ np.asarray(t, np.float64))[y]


def np_gce(z, y, q):
    return (1 - np_softmax(z)[y] ** q) / q


def np_sce(z, y, alpha, beta, a):
    p = np_softmax(z)
    onehot = np.eye(len(z))[y]
    log_q = np.where(onehot > 0, 0.0, a)  # log of the one-hot target, log 0 := a
    return alpha * -np.log(p[y]) + beta * -(p * log_q).sum()


def np_smooth(z, y, eps):
    target = (1 - eps) * np.eye(len(z))[y] + eps / len(z)
    return -(target * np.log(np_softmax(z))).sum()


def np_boot(z, y, beta, mode):
    p = np_softmax(z)
    if mode == "soft":
        target = beta * np.eye(len(z))[y] + (1 - beta) * p
    else:
        target = beta * np.eye(len(z))[y] + (1 - beta) * np.eye(len(z))[p.argmax()]
    return -(target * np.log(p)).sum()


T_NP = random_transition(np.random.default_rng(0), K)

CASES = {
    "backward": (
        lambda z, y: backward_corrected_cross_entropy(z, y, jnp.asarray(T_NP, z.dtype)),
        lambda z, y: np_backward(z, y, T_NP),
    ),
    "backward_clip": (
        lambda z, y: backward_corrected_cross_entropy(
            z, y, jnp.asarray(T_NP, z.dtype), clip_negative=True
        ),
        lambda z, y: np_backward(z, y, T_NP, clip=True),
    ),
    "forward": (
        lambda z, y: forward_corrected_cross_entropy(z, y, jnp.asarray(T_NP, z.dtype)),
        lambda z, y: np_forward(z, y, T_NP),
    ),
    "gce": (
        lambda z, y: generalized_cross_entropy(z, y, q=0.7),
        lambda z, y: np_gce(z, y, 0.7),
    ),
    "sce": (
        lambda z, y: symmetric_cross_entropy(z, y, alpha=0.3, beta=0.8, log_zero=-4.0),
        lambda z, y: np_sce(z, y, 0.3, 0.8, -4.0),
    ),
    "smoothing": (
        lambda z, y: label_smoothing_cross_entropy(z, y, smoothing=0.2),
        lambda z, y: np_smooth(z, y, 0.2),
    ),
    "boot_soft": (
        lambda z, y: bootstrapped_cross_entropy(z, y),
        lambda z, y: np_boot(z, y, 0.95, "soft"),
    ),
    "boot_hard": (
        lambda z, y: bootstrapped_cross_entropy(z, y, mode="hard"),
        lambda z, y: np_boot(z, y, 0.8, "hard"),
    ),
}


class LossesMatchNumpy(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(name=sorted(CASES), dtype=["float32", "float64"])
    def test_matches_numpy(self, name, dtype):
        loss_fn, reference = CASES[name]
        with jax.enable_x64(dtype == "float64"):
            rng = np.random.default_rng(1)
            z = rng.normal(size=(2, 3, K)) * 2
            y = rng.integers(0, K, size=(2, 3))
            out = self.variant(loss_fn)(jnp.asarray(z, dtype), jnp.asarray(y, jnp.int32))
            assert out.shape == (2, 3) and out.dtype == jnp.dtype(dtype)
            expected = np.array([[reference(z[i, j], y[i, j]) for j in range(3)] for i in range(2)])
            tol = 2e-5 if dtype == "float32" else 1e-10
            np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "transition",
    [
        np.asarray(symmetric_transition(0.4, num_classes=K)),
        np.asarray(pair_flip_transition(0.3, num_classes=K)),
        T_NP,
    ],
    ids=["symmetric", "pair_flip", "random"],
)
def test_backward_is_unbiased(transition, dtype):
    """sum_noisy T[c, noisy] * loss(noisy) == -log p_c, exactly (a sum, no sampling)."""
    with jax.enable_x64(dtype == "float64"):
        t = jnp.asarray(np.asarray(transition), dtype)
        logits = jnp.asarray(np.random.default_rng(2).normal(size=(5, K)) * 3, dtype)
        per_noisy = jnp.stack(
            [backward_corrected_cross_entropy(logits, jnp.full(5, j), t) for j in range(K)], -1
        )  # (5, K): loss if the noisy label were j
        clean = np.repeat(np.arange(K), 2)[:5]
        expected_loss = (np.asarray(t, np.float64)[clean] * np.asarray(per_noisy)).sum(-1)
        ce = -np.log(np_softmax(np.asarray(logits)))[np.arange(5), clean]
        tol = 1e-4 if dtype == "float32" else 1e-10
        np.testing.assert_allclose(expected_loss, ce, rtol=tol, atol=tol)
        # and the clipped version is NOT unbiased for this T (a check that can fail)
        if np.asarray(np.linalg.inv(np.asarray(transition)) < -1e-3).any():
            clipped = jnp.stack(
                [
                    backward_corrected_cross_entropy(logits, jnp.full(5, j), t, clip_negative=True)
                    for j in range(K)
                ],
                -1,
            )
            biased = (np.asarray(t, np.float64)[clean] * np.asarray(clipped)).sum(-1)
            assert not np.allclose(biased, ce, rtol=1e-3)


def test_forward_identity_is_cross_entropy_and_grads_finite():
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.normal(size=(6, K)), jnp.float32)
    y = jnp.asarray(rng.integers(0, K, 6))
    ce = -np.log(np_softmax(np.asarray(z)))[np.arange(6), np.asarray(y)]
    np.testing.assert_allclose(forward_corrected_cross_entropy(z, y, jnp.eye(K)), ce, rtol=1e-5)
    # zero entries of T (pair flip) give finite losses and gradients
    t = pair_flip_transition(0.3, num_classes=K)
    g = jax.grad(lambda z: forward_corrected_cross_entropy(z, y, t).sum())(z)
    assert np.all(np.isfinite(g))


def test_limits_and_extreme_logits():
    z = jnp.array([[50.0, -50.0, 0.0, 0.0]])
    y = jnp.array([1])
    for fn in [
        lambda z, y: generalized_cross_entropy(z, y, q=0.5),
        lambda z, y: symmetric_cross_entropy(z, y),
        lambda z, y: label_smoothing_cross_entropy(z, y),
        lambda z, y: bootstrapped_cross_entropy(z, y),
        lambda z, y: forward_corrected_cross_entropy(
            z, y, symmetric_transition(0.2, num_classes=K)
        ),
    ]:
        out, g = jax.value_and_grad(lambda z: fn(z, y).sum())(z)
        assert np.isfinite(out) and np.all(np.isfinite(g))
    # GCE: q -> 0 approaches cross-entropy, q = 1 is MAE-like 1 - p_y
    z = jnp.array([[1.0, 2.0, 0.5, -1.0]])
    ce = float(-jax.nn.log_softmax(z)[0, 1])
    assert abs(float(generalized_cross_entropy(z, y, q=1e-4)[0]) - ce) < 1e-3
    p1 = float(jax.nn.softmax(z)[0, 1])
    np.testing.assert_allclose(generalized_cross_entropy(z, y, q=1.0)[0], 1 - p1, rtol=1e-6)
    # smoothing 0 and bootstrapping beta 1 are cross-entropy
    np.testing.assert_allclose(label_smoothing_cross_entropy(z, y, smoothing=0.0)[0], ce, rtol=1e-6)
    np.testing.assert_allclose(bootstrapped_cross_entropy(z, y, beta=1.0)[0], ce, rtol=1e-6)


def test_errors():
    z = jnp.zeros((3, K))
    y = jnp.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"labels.*\[0, 4\).*\[7\]"):
        generalized_cross_entropy(z, jnp.array([0, 1, 7]))
    with pytest.raises(TypeError, match="labels.*integer"):
        generalized_cross_entropy(z, jnp.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="labels.*shape"):
        generalized_cross_entropy(z, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="singular or badly conditioned"):
        backward_corrected_cross_entropy(z, y, symmetric_transition(0.75, num_classes=K))
    with pytest.raises(ValueError, match="rows summing to 1"):
        forward_corrected_cross_entropy(z, y, jnp.ones((K, K)))
    with pytest.raises(ValueError, match=r"transition: expected shape \(4, 4\)"):
        forward_corrected_cross_entropy(z, y, jnp.eye(3))
    with pytest.raises(ValueError, match="q"):
        generalized_cross_entropy(z, y, q=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        label_smoothing_cross_entropy(z, y, smoothing=1.5)
    with pytest.raises(ValueError, match="mode"):
        bootstrapped_cross_entropy(z, y, mode="medium")
    with pytest.raises(ValueError, match="log_zero"):
        symmetric_cross_entropy(z, y, log_zero=0.0)


def test_traced_hyperparameters_no_retrace():
    z = jnp.asarray(np.random.default_rng(4).normal(size=(3, K)), jnp.float32)
    y = jnp.array([0, 1, 3])
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, eps, t):
        return (
            generalized_cross_entropy(z, y, q=q)
            + label_smoothing_cross_entropy(z, y, smoothing=eps)
            + backward_corrected_cross_entropy(z, y, t)
        )

    for rate in (0.1, 0.2, 0.3):
        out = f(0.5 + rate, rate, symmetric_transition(rate, num_classes=K))
        expected = [
            np_gce(np.asarray(z[i]), int(y[i]), 0.5 + rate)
            + np_smooth(np.asarray(z[i]), int(y[i]), rate)
            + np_backward(np.asarray(z[i]), int(y[i]), symmetric_transition(rate, num_classes=K))
            for i in range(3)
        ]
        np.testing.assert_allclose(out, expected, rtol=2e-5)
