"""Label-noise models: transition matrices, corrupting labels, estimating the transition matrix.

Convention: ``transition[i, j] = P(noisy label = j | clean label = i)``; rows sum to one. The
noise is class-conditional and independent of the input (Ju, Li & Zhang 2022, section 3).
Transition matrices are validated eagerly (on concrete arrays) by :func:`validate_transition`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessjax._util import concrete as _concrete

__all__ = [
    "confusion_counts",
    "corrupt_labels",
    "dual_t_transition",
    "anchor_transition",
    "pair_flip_transition",
    "replace_labels",
    "symmetric_transition",
    "transition_from_counts",
    "uniform_replacement_transition",
    "validate_labels",
    "validate_transition",
]


def _check_rate(rate: Any, name: str = "rate") -> None:
    r = _concrete(rate)
    if r is not None and (r.ndim != 0 or not np.isfinite(r) or r < 0 or r > 1):
        raise ValueError(f"{name}: expected a scalar in [0, 1], got {rate!r}")


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise TypeError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    return int(num_classes)


def validate_labels(labels: Any, num_classes: int, *, name: str = "labels") -> None:
    """Raise if concrete ``labels`` are not integers in ``[0, num_classes)``; no-op when traced.

    Args:
      labels: integer class labels, any shape.
      num_classes: k.
      name: the argument name used in the error message.

    Raises:
      TypeError: non-integer labels.
      ValueError: a label outside ``[0, num_classes)``.

    Example:
      >>> validate_labels(jnp.array([0, 2]), 3)
    """
    arr = _concrete(labels)
    if arr is None:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected integer class labels, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        bad = arr[(arr < 0) | (arr >= num_classes)]
        raise ValueError(
            f"{name}: expected labels in [0, {num_classes}), got out-of-range values "
            f"{np.unique(bad)[:5].tolist()}"
        )


def validate_transition(
    transition: Any,
    *,
    num_classes: int | None = None,
    invertible: bool = False,
    max_condition: float = 1e6,
    atol: float = 1e-4,
) -> Any:
    """Check that a concrete ``transition`` is a row-stochastic k x k matrix; return it.

    Checks, in order: a square 2-D matrix (of size ``num_classes`` if given); finite entries; no
    negative entry (beyond -atol); every row summing to 1 within ``atol``; and, with
    ``invertible=True``, a condition number cond_2(T) <= ``max_condition`` (backward correction
    multiplies by T^-1, so a singular T, e.g. symmetric noise at rho = (k-1)/k, gives no
    consistent loss). A traced matrix is returned unchecked.

    Cost: O(k^2), plus an O(k^3) SVD with ``invertible=True``.

    Args:
      transition: T[i, j] = P(noisy j | clean i).
      num_classes: the expected k, or None.
      invertible: also require a well-conditioned matrix.
      max_condition: the largest accepted condition number.
      atol: tolerance for the row sums and negative entries.

    Returns:
      ``transition`` unchanged.

    Raises:
      ValueError: naming the first failed check and the offending rows/values.

    Example:
      >>> t = validate_transition(symmetric_transition(0.2, num_classes=3), invertible=True)
      >>> validate_transition(  # doctest: +ELLIPSIS
      ...     symmetric_transition(2 / 3, num_classes=3), invertible=True)
      Traceback (most recent call last):
      ...
      ValueError: transition: singular or badly conditioned ...
    """
    t = _concrete(transition)
    if t is None:
        return transition
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"transition: expected a square (k, k) matrix, got shape {t.shape}")
    if num_classes is not None and t.shape[0] != num_classes:
        raise ValueError(
            f"transition: expected shape ({num_classes}, {num_classes}), got {t.shape}"
        )
    t = t.astype(np.float64)
    if not np.all(np.isfinite(t)):
        raise ValueError("transition: expected finite entries, got NaN or inf")
    if np.any(t < -atol):
        i, j = np.argwhere(t < -atol)[0]
        raise ValueError(
            f"transition: expected non-negative entries, got T[{i}, {j}] = {t[i, j]:.6g}"
        )
    sums = t.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > atol)
    if bad.size:
        shown = dict(zip(bad[:5].tolist(), np.round(sums[bad[:5]], 6).tolist(), strict=True))
        raise ValueError(
            "transition: expected rows summing to 1 (T[i, j] = P(noisy j | clean i)), got "
            f"row sums {shown}"
        )
    if invertible:
        s = np.linalg.svd(t, compute_uv=False)
        cond = np.inf if s[-1] <= 0 else s[0] / s[-1]
        if not cond <= max_condition:
            raise ValueError(
                f"transition: singular or badly conditioned (condition number {cond:.3g} > "
                f"max_condition={max_condition:g}); backward correction needs an invertible "
                "T. For symmetric noise this happens at rate = (k-1)/k."
            )
    return transition


def symmetric_transition(rate: Any, *, num_classes: int, dtype: Any = jnp.float32) -> jax.Array:
    """Symmetric noise: T_ii = 1 - rho, T_ij = rho / (k - 1) for i != j.

    Singular at rho = (k-1)/k (every row equals 1/k). Cost: O(k^2).

    Args:
      rate: rho in [0, 1], may be traced.
      num_classes: k >= 2.
      dtype: the result dtype.

    Returns:
      A (k, k) row-stochastic matrix.

    Raises:
      ValueError: concrete rate outside [0, 1]; num_classes < 2.

    Example:
      >>> np.round(np.asarray(symmetric_transition(0.3, num_classes=4)[0], float), 3).tolist()
      [0.7, 0.1, 0.1, 0.1]

    References:
      Ju, Li & Zhang, ICML 2022, section 3; Patrini et al., CVPR 2017.
    """
    k = _check_num_classes(num_classes)
    _check_rate(rate)
    rate = jnp.asarray(rate, dtype)
    eye = jnp.eye(k, dtype=dtype)
    return eye * (1 - rate) + (1 - eye) * rate / (k - 1)


def uniform_replacement_transition(
    rate: Any, *, num_classes: int, dtype: Any = jnp.float32
) -> jax.Array:
    """The reference code's noise: a fraction rho of labels is redrawn uniformly over k classes.

        T = (1 - rho) I + (rho / k) 1 1^T,  so T_ii = 1 - rho + rho/k and the flip rate is
        rho (k-1)/k.

    Singular at rho = 1. Cost: O(k^2).

    Args:
      rate: rho in [0, 1], may be traced.
      num_classes: k >= 2.
      dtype: the result dtype.

    Returns:
      A (k, k) row-stochastic matrix.

    Raises:
      ValueError: concrete rate outside [0, 1]; num_classes < 2.

    Example:
      >>> t = uniform_replacement_transition(0.4, num_classes=2)
      >>> np.round(np.asarray(t, float), 3).tolist()
      [[0.8, 0.2], [0.2, 0.8]]

    References:
      Ju, Li & Zhang, ICML 2022, section 4 (reference code ``label_noise``).
    """
    k = _check_num_classes(num_classes)
    _check_rate(rate)
    rate = jnp.asarray(rate, dtype)
    return jnp.eye(k, dtype=dtype) * (1 - rate) + rate / k


def pair_flip_transition(rate: Any, *, num_classes: int, dtype: Any = jnp.float32) -> jax.Array:
    """Pair-flip (asymmetric) noise: class i flips to i + 1 (mod k) with probability rho.

        T_ii = 1 - rho,  T_{i, (i+1) mod k} = rho.

    Singular at rho = 1/2 for even k. Cost: O(k^2).

    Args:
      rate: rho in [0, 1], may be traced.
      num_classes: k >= 2.
      dtype: the result dtype.

    Returns:
      A (k, k) row-stochastic matrix.

    Raises:
      ValueError: concrete rate outside [0, 1]; num_classes < 2.

    Example:
      >>> pair_flip_transition(0.25, num_classes=3).tolist()
      [[0.75, 0.25, 0.0], [0.0, 0.75, 0.25], [0.25, 0.0, 0.75]]

    References:
      Han et al., "Co-teaching: Robust Training of Deep Neural Networks with Extremely Noisy
      Labels", NeurIPS 2018 (pair flipping).
    """
    k = _check_num_classes(num_classes)
    _check_rate(rate)
    rate = jnp.asarray(rate, dtype)
    eye = jnp.eye(k, dtype=dtype)
    return eye * (1 - rate) + jnp.roll(eye, 1, axis=1) * rate


def confusion_counts(labels: Any, noisy_labels: Any, *, num_classes: int) -> jax.Array:
    """Counts C[i, j] = #{n : labels_n = i and noisy_labels_n = j}.

    Cost: O(n + k^2). Jittable (label validation only on concrete inputs).

    Args:
      labels: integer labels (rows), shape (n,).
      noisy_labels: integer labels (columns), shape (n,).
      num_classes: k.

    Returns:
      A (k, k) float32 count matrix.

    Raises:
      ValueError/TypeError: labels out of range, not integers, or of different shapes.

    Example:
      >>> confusion_counts(jnp.array([0, 0, 1]), jnp.array([0, 1, 1]), num_classes=2).tolist()
      [[1.0, 1.0], [0.0, 1.0]]
    """
    k = _check_num_classes(num_classes)
    validate_labels(labels, k, name="labels")
    validate_labels(noisy_labels, k, name="noisy_labels")
    if jnp.shape(labels) != jnp.shape(noisy_labels):
        raise ValueError(
            f"noisy_labels: expected the shape of labels {jnp.shape(labels)}, "
            f"got {jnp.shape(noisy_labels)}"
        )
    flat = jnp.ravel(labels) * k + jnp.ravel(noisy_labels)
    return jnp.bincount(flat, length=k * k).reshape(k, k).astype(jnp.float32)


def transition_from_counts(counts: Any) -> jax.Array:
    """Row-normalised counts: T[i, j] = C[i, j] / sum_j C[i, j]; an empty row becomes e_i.

    An empty row (class i never seen) carries no evidence; it becomes the identity row so that
    T stays row-stochastic (the reference code leaves a zero row there).

    Cost: O(k^2). Jittable.

    Args:
      counts: a (k, k) matrix of non-negative counts.

    Returns:
      A (k, k) row-stochastic matrix.

    Raises:
      ValueError: not a square matrix, or negative/non-finite concrete counts.

    Example:
      >>> transition_from_counts(jnp.array([[3.0, 1.0], [0.0, 0.0]])).tolist()
      [[0.75, 0.25], [0.0, 1.0]]
    """
    c = _concrete(counts)
    if jnp.ndim(counts) != 2 or jnp.shape(counts)[0] != jnp.shape(counts)[1]:
        raise ValueError(f"counts: expected a square (k, k) matrix, got shape {jnp.shape(counts)}")
    if c is not None and (not np.all(np.isfinite(c)) or np.any(c < 0)):
        raise ValueError("counts: expected finite non-negative counts")
    counts = jnp.asarray(counts, jnp.result_type(counts, jnp.float32))
    sums = counts.sum(axis=1, keepdims=True)
    eye = jnp.eye(counts.shape[0], dtype=counts.dtype)
    return jnp.where(sums > 0, counts / jnp.where(sums > 0, sums, 1), eye)


def corrupt_labels(key: jax.Array, labels: Any, transition: Any) -> jax.Array:
    """Draw noisy labels: noisy_n ~ Categorical(T[labels_n]), independently per example.

    Cost: O(n k). Jittable; ``transition`` is validated when concrete.

    Args:
      key: a PRNG key.
      labels: clean integer labels, any shape.
      transition: T[i, j] = P(noisy j | clean i).

    Returns:
      Noisy labels, same shape and dtype as ``labels``.

    Raises:
      ValueError: an invalid transition matrix or labels out of range.

    Example:
      >>> import jax
      >>> t = pair_flip_transition(1.0, num_classes=3)
      >>> corrupt_labels(jax.random.key(0), jnp.array([0, 1, 2]), t).tolist()
      [1, 2, 0]

    References:
      Patrini et al., "Making Deep Neural Networks Robust to Label Noise: a Loss Correction
      Approach", CVPR 2017 (class-conditional noise).
    """
    validate_transition(transition)
    k = jnp.shape(transition)[0]
    validate_labels(labels, k)
    labels = jnp.asarray(labels)
    logp = jnp.log(jnp.asarray(transition, jnp.float32))[labels]
    return jax.random.categorical(key, logp, axis=-1).astype(labels.dtype)


def replace_labels(key: jax.Array, labels: Any, rate: float, *, num_classes: int) -> jax.Array:
    """The reference code's noise: exactly floor(rho n) labels, chosen without replacement, are
    replaced by uniform draws over all k classes (so about rho (k-1)/k of labels change).

    In expectation this is :func:`uniform_replacement_transition`. ``rate`` must be concrete
    (it sets a size); the labels may not be traced either.

    Cost: O(n).

    Args:
      key: a PRNG key.
      labels: clean integer labels, shape (n,).
      rate: rho in [0, 1], a concrete number.
      num_classes: k.

    Returns:
      Noisy labels, same shape and dtype as ``labels``.

    Raises:
      ValueError: rate outside [0, 1] or traced; labels out of range or not 1-D.

    Example:
      >>> import jax
      >>> noisy = replace_labels(jax.random.key(0), jnp.zeros(10, jnp.int32), 0.5, num_classes=3)
      >>> int((noisy != 0).sum()) <= 5
      True

    References:
      Ju, Li & Zhang, ICML 2022, section 4 (reference code ``label_noise``).
    """
    k = _check_num_classes(num_classes)
    r = _concrete(rate)
    if r is None:
        raise ValueError("rate: expected a concrete number (it sets how many labels change)")
    _check_rate(rate)
    validate_labels(labels, k)
    labels = jnp.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected shape (n,), got {labels.shape}")
    n = labels.shape[0]
    m = int(float(r) * n)
    key_idx, key_new = jax.random.split(key)
    idx = jax.random.choice(key_idx, n, shape=(m,), replace=False)
    new = jax.random.randint(key_new, (m,), 0, k, dtype=labels.dtype)
    return labels.at[idx].set(new)


def _check_probs(probs: Any) -> jax.Array:
    if jnp.ndim(probs) != 2 or jnp.shape(probs)[1] < 2:
        raise ValueError(f"probs: expected shape (n, k) with k >= 2, got {jnp.shape(probs)}")
    p = _concrete(probs)
    if p is not None and (not np.all(np.isfinite(p)) or np.any(p < 0)):
        raise ValueError("probs: expected finite non-negative probabilities")
    return jnp.asarray(probs, jnp.result_type(probs, jnp.float32))


def anchor_transition(probs: Any, *, percentile: float | None = 97.0) -> jax.Array:
    """Anchor-point estimate of T from predicted noisy-class probabilities.

    For each class i pick the example x_i with the largest p_i(x) among those below the
    ``percentile``-th percentile of p_i (``method="higher"``, as numpy's 'higher'
    interpolation in the reference code); the row T[i] = p(x_i). If x_i is an anchor point of
    class i (P(clean = i | x_i) = 1) and p(x) = P(noisy | x), then p(x_i) = T[i] exactly.
    ``percentile=None`` takes the plain argmax (no outlier filter).

    Cost: O(n k) plus k percentiles (a sort per class). Jittable.

    Args:
      probs: (n, k) predicted probabilities of a model trained on noisy labels.
      percentile: the outlier filter in (0, 100], or None.

    Returns:
      A (k, k) estimate of T (rows are probability vectors if probs rows are).

    Raises:
      ValueError: probs not (n, k) or negative; percentile outside (0, 100].

    Example:
      >>> p = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
      >>> np.round(np.asarray(anchor_transition(p, percentile=None), float), 3).tolist()
      [[0.9, 0.1], [0.2, 0.8]]

    References:
      Patrini et al., CVPR 2017; Xia et al., "Are Anchor Points Really Indispensable in
      Label-Noise Learning?", NeurIPS 2019; Ju, Li & Zhang, ICML 2022, section 3.
    """
    probs = _check_probs(probs)
    if percentile is None:
        idx = jnp.argmax(probs, axis=0)
    else:
        if not 0 < percentile <= 100:
            raise ValueError(
                f"percentile: expected a number in (0, 100] or None, got {percentile!r}"
            )
        thresh = jnp.percentile(probs, percentile, axis=0, method="higher")
        idx = jnp.argmax(jnp.where(probs >= thresh, -jnp.inf, probs), axis=0)
    return probs[idx]


def dual_t_transition(
    probs: Any, noisy_labels: Any, *, percentile: float | None = 97.0
) -> jax.Array:
    """Dual-T estimate of T: T_anchor @ T_pred.

        T_pred[a, b] = P(noisy = b | predicted = a), row-normalised counts of
                       (argmax_j p_j(x_n), noisy_labels_n) (an empty row becomes e_a);
        T_anchor     = :func:`anchor_transition` (probs, percentile).

    The intermediate class (the prediction) splits T into a factor estimated by counting (no
    posterior-estimation error) and a factor estimated from anchor points.

    Cost: O(n k) plus k percentiles and a k x k product. Jittable.

    Args:
      probs: (n, k) predicted probabilities of a model fine-tuned plainly on noisy labels.
      noisy_labels: (n,) the noisy training labels.
      percentile: the anchor outlier filter, or None.

    Returns:
      A (k, k) estimate of T.

    Raises:
      ValueError: probs not (n, k); labels out of range or of the wrong shape.

    Example:
      >>> p = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
      >>> dual_t_transition(p, jnp.array([0, 1, 1]), percentile=None).shape
      (2, 2)

    References:
      Yao et al., "Dual T: Reducing Estimation Error for Transition Matrix in Label-noise
      Learning", NeurIPS 2020; Ju, Li & Zhang, ICML 2022, section 3 (reference code
      ``get_transition_matrices``, ``compose_T_matrices``).
    """
    probs = _check_probs(probs)
    k = probs.shape[1]
    if jnp.shape(noisy_labels) != probs.shape[:1]:
        raise ValueError(
            f"noisy_labels: expected shape {probs.shape[:1]}, got {jnp.shape(noisy_labels)}"
        )
    predicted = jnp.argmax(probs, axis=1).astype(jnp.asarray(noisy_labels).dtype)
    t_pred = transition_from_counts(confusion_counts(predicted, noisy_labels, num_classes=k))
    return anchor_transition(probs, percentile=percentile) @ t_pred.astype(probs.dtype)
