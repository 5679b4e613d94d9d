"""Noise-robust per-example classification losses: logits in, one loss per example out.

Every loss takes ``logits`` of shape (..., k) and integer ``labels`` of shape (...) and returns
shape (...); average them yourself. All are jittable; hyperparameters (rates, q, alpha, beta)
accept traced arrays and are range-checked when concrete; concrete labels are range-checked and
concrete transition matrices validated (:func:`hessjax.noise.validate_transition`).

Notation: p = softmax(logits), y the (possibly noisy) label, T[i, j] = P(noisy j | clean i).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessjax._util import concrete as _concrete
from hessjax.noise import validate_labels, validate_transition

__all__ = [
    "backward_corrected_cross_entropy",
    "bootstrapped_cross_entropy",
    "forward_corrected_cross_entropy",
    "generalized_cross_entropy",
    "label_smoothing_cross_entropy",
    "symmetric_cross_entropy",
]


def _prepare(logits: Any, labels: Any) -> tuple[jax.Array, jax.Array]:
    logits = jnp.asarray(logits)
    if logits.ndim < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits: expected a float array of shape (..., k), got {logits.dtype}")
    k = logits.shape[-1]
    validate_labels(labels, k)
    labels = jnp.asarray(labels)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels: expected shape {logits.shape[:-1]} (logits shape minus the class axis), "
            f"got {labels.shape}"
        )
    return jax.nn.log_softmax(logits, axis=-1), labels


def _pick(logp: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def _check_range(value: Any, name: str, lo: float, hi: float, lo_open: bool = False) -> None:
    v = _concrete(value)
    if v is None:
        return
    ok = np.all(np.isfinite(v)) and np.all(v <= hi) and np.all(v > lo if lo_open else v >= lo)
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name}: expected a number in {bracket}{lo}, {hi}], got {value!r}")


def backward_corrected_cross_entropy(
    logits: Any, labels: Any, transition: Any, *, clip_negative: bool = False
) -> jax.Array:
    """Backward-corrected cross-entropy: sum_j R[y, j] * (-log p_j), R = pinv(T).

    Unbiased: for a clean label c, E_{y ~ T[c]} loss(y) = sum_y T[c, y] sum_j R[y, j] (-log p_j)
    = sum_j (T R)[c, j] (-log p_j) = -log p_c when T is invertible. The weights R can be
    negative, so the loss can be negative and unbounded below; the paper and its reference code
    do not clip them. ``clip_negative=True`` sets negative entries of R to zero (biased, but
    bounded below). A concrete ``transition`` must be invertible with condition number <= 1e6.

    Cost: O(k^3) for the pseudo-inverse (once per call) plus O(k) per example.

    Args:
      logits: shape (..., k).
      labels: noisy integer labels, shape (...).
      transition: (k, k), T[i, j] = P(noisy j | clean i).
      clip_negative: clip negative weights of R at zero.

    Returns:
      Per-example losses, shape (...).

    Raises:
      ValueError: an invalid, singular or badly conditioned transition; labels out of range
        or of the wrong shape.

    Example:
      >>> from hessjax.noise import symmetric_transition
      >>> t = symmetric_transition(0.2, num_classes=3)
      >>> loss = backward_corrected_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 2]), t)
      >>> loss.shape, bool(jnp.allclose(loss, jnp.log(3.0)))
      ((2,), True)

    References:
      Patrini et al., "Making Deep Neural Networks Robust to Label Noise: a Loss Correction
      Approach", CVPR 2017; Natarajan et al., NeurIPS 2013; Ju, Li & Zhang, ICML 2022,
      section 3 (the statistically consistent loss).
    """
    logp, labels = _prepare(logits, labels)
    k = logp.shape[-1]
    validate_transition(transition, num_classes=k, invertible=True)
    weights = jnp.linalg.pinv(jnp.asarray(transition, logp.dtype))
    if clip_negative:
        weights = jnp.maximum(weights, 0)
    return -jnp.sum(weights[labels] * logp, axis=-1)


def forward_corrected_cross_entropy(logits: Any, labels: Any, transition: Any) -> jax.Array:
    """Forward-corrected cross-entropy: -log (p^T T)_y = -log sum_i p_i T[i, y].

    The model's clean posterior p is pushed through the noise before the loss; with T = I it is
    the cross-entropy. Computed in log space (logsumexp of log p_i + log T[i, y]) so that zero
    entries of T are exact. T need not be invertible.

    Cost: O(k) per example.

    Args:
      logits: shape (..., k).
      labels: noisy integer labels, shape (...).
      transition: (k, k), T[i, j] = P(noisy j | clean i).

    Returns:
      Per-example losses, shape (...).

    Raises:
      ValueError: an invalid transition; labels out of range or of the wrong shape.

    Example:
      >>> t = jnp.eye(2)
      >>> round(float(forward_corrected_cross_entropy(jnp.zeros(2), jnp.array(1), t)), 4)
      0.6931

    References:
      Patrini et al., CVPR 2017 (forward correction); Sukhbaatar et al., ICLR workshop 2015.
    """
    logp, labels = _prepare(logits, labels)
    k = logp.shape[-1]
    validate_transition(transition, num_classes=k)
    log_t = jnp.log(jnp.asarray(transition, logp.dtype))  # -inf for zero entries
    columns = jnp.moveaxis(log_t[:, labels], 0, -1)  # (..., k): log T[i, y]
    return -jax.nn.logsumexp(logp + columns, axis=-1)


def generalized_cross_entropy(logits: Any, labels: Any, *, q: Any = 0.7) -> jax.Array:
    """Generalized cross-entropy (L_q loss): (1 - p_y^q) / q.

    Interpolates between cross-entropy (q -> 0) and mean absolute error (q = 1, which is
    robust to symmetric noise). p_y^q = exp(q log p_y) for stability.

    Cost: O(k) per example.

    Args:
      logits: shape (..., k).
      labels: integer labels, shape (...).
      q: in (0, 1], may be traced.

    Returns:
      Per-example losses in [0, 1/q), shape (...).

    Raises:
      ValueError: q outside (0, 1]; labels out of range or of the wrong shape.

    Example:
      >>> float(generalized_cross_entropy(jnp.zeros(2), jnp.array(0), q=1.0))
      0.5

    References:
      Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural Networks with
      Noisy Labels", NeurIPS 2018.
    """
    _check_range(q, "q", 0.0, 1.0, lo_open=True)
    logp, labels = _prepare(logits, labels)
    q = jnp.asarray(q, logp.dtype)
    return (1 - jnp.exp(q * _pick(logp, labels))) / q


def symmetric_cross_entropy(
    logits: Any, labels: Any, *, alpha: Any = 0.1, beta: Any = 1.0, log_zero: Any = -4.0
) -> jax.Array:
    """Symmetric cross-entropy: alpha * CE + beta * RCE.

        CE  = -log p_y
        RCE = -sum_j p_j log onehot(y)_j = -log_zero * (1 - p_y)   (log 0 clipped to log_zero)

    Defaults are the paper's CIFAR-10 values (alpha = 0.1, beta = 1, A = log_zero = -4).

    Cost: O(k) per example.

    Args:
      logits: shape (..., k).
      labels: integer labels, shape (...).
      alpha: weight of the cross-entropy, >= 0.
      beta: weight of the reverse cross-entropy, >= 0.
      log_zero: the value A < 0 that replaces log 0.

    Returns:
      Per-example losses, shape (...).

    Raises:
      ValueError: negative alpha/beta, log_zero >= 0; labels out of range or wrong shape.

    Example:
      >>> round(float(symmetric_cross_entropy(jnp.zeros(2), jnp.array(0))), 4)
      2.0693

    References:
      Wang et al., "Symmetric Cross Entropy for Robust Learning with Noisy Labels", ICCV 2019.
    """
    _check_range(alpha, "alpha", 0.0, np.inf)
    _check_range(beta, "beta", 0.0, np.inf)
    lz = _concrete(log_zero)
    if lz is not None and not lz < 0:
        raise ValueError(f"log_zero: expected a negative number, got {log_zero!r}")
    logp, labels = _prepare(logits, labels)
    logp_y = _pick(logp, labels)
    rce = -jnp.asarray(log_zero, logp.dtype) * (1 - jnp.exp(logp_y))
    return alpha * -logp_y + beta * rce


def label_smoothing_cross_entropy(logits: Any, labels: Any, *, smoothing: Any = 0.1) -> jax.Array:
    """Cross-entropy against the smoothed target (1 - eps) onehot(y) + eps / k.

        loss = -(1 - eps) log p_y - (eps / k) sum_j log p_j

    Cost: O(k) per example.

    Args:
      logits: shape (..., k).
      labels: integer labels, shape (...).
      smoothing: eps in [0, 1], may be traced.

    Returns:
      Per-example losses, shape (...).

    Raises:
      ValueError: smoothing outside [0, 1]; labels out of range or of the wrong shape.

    Example:
      >>> round(float(label_smoothing_cross_entropy(jnp.zeros(4), jnp.array(1))), 4)
      1.3863

    References:
      Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016;
      Lukasik et al., "Does label smoothing mitigate label noise?", ICML 2020.
    """
    _check_range(smoothing, "smoothing", 0.0, 1.0)
    logp, labels = _prepare(logits, labels)
    eps = jnp.asarray(smoothing, logp.dtype)
    k = logp.shape[-1]
    return -(1 - eps) * _pick(logp, labels) - eps / k * jnp.sum(logp, axis=-1)


def bootstrapped_cross_entropy(
    logits: Any, labels: Any, *, beta: Any = None, mode: str = "soft"
) -> jax.Array:
    """Bootstrapping: cross-entropy against a mix of the label and the model's own prediction.

        soft: -sum_j (beta onehot(y)_j + (1 - beta) p_j) log p_j          (beta default 0.95)
        hard: -beta log p_y - (1 - beta) log p_{argmax p}                  (beta default 0.8)

    The prediction in the target is not stopped: soft bootstrapping is cross-entropy plus
    (1 - beta) times the entropy of p, the minimum-entropy reading of Reed et al. Wrap the
    logits in ``jax.lax.stop_gradient`` for a fixed target instead.

    Cost: O(k) per example.

    Args:
      logits: shape (..., k).
      labels: integer labels, shape (...).
      beta: weight of the given label in [0, 1]; None for the paper's default of ``mode``.
      mode: ``"soft"`` or ``"hard"`` (static).

    Returns:
      Per-example losses, shape (...).

    Raises:
      ValueError: unknown mode; beta outside [0, 1]; labels out of range or of wrong shape.

    Example:
      >>> round(float(bootstrapped_cross_entropy(jnp.zeros(2), jnp.array(0))), 4)
      0.6931

    References:
      Reed et al., "Training Deep Neural Networks on Noisy Labels with Bootstrapping", ICLR
      workshop 2015.
    """
    if mode not in ("soft", "hard"):
        raise ValueError(f"mode: expected 'soft' or 'hard', got {mode!r}")
    if beta is None:
        beta = 0.95 if mode == "soft" else 0.8
    _check_range(beta, "beta", 0.0, 1.0)
    logp, labels = _prepare(logits, labels)
    beta = jnp.asarray(beta, logp.dtype)
    if mode == "soft":
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return -beta * _pick(logp, labels) + (1 - beta) * entropy
    return -beta * _pick(logp, labels) - (1 - beta) * jnp.max(logp, axis=-1)
