"""Generalization bounds as pure, jittable scalar functions.

Each bound returns a :class:`Bound`: the computable ``value`` and, where the theorem has a
lower-order term with an unknown constant, its order ``xi`` (reported, never silently added
or dropped: the statement is ``L(f) <= value + c * xi`` for an unknown constant ``c``).

- :func:`hessian_bound`: the paper's Theorem 2.1 from the Hessian distance measure.
- :func:`corollary_bound`: the distance-constraint corollary from radii and maximal traces.
- :func:`spectral_norm_bound`: a classical baseline, the spectrally-normalised PAC-Bayes
  margin bound of Neyshabur et al. (2018) in its distance-from-initialisation form.
- :func:`generalization_gap`: test loss minus train loss.

All functions accept Python numbers or (traced) arrays; concrete arguments are validated
eagerly, traced ones are not (validate before ``jit`` if you need errors there).

References:
  Ju, Li & Zhang, ICML 2022 (arXiv:2206.02659).
  Neyshabur, Bhojanapalli & Srebro, ICLR 2018 (arXiv:1707.09564).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Bound(NamedTuple):
    """A generalization bound.

    Attributes:
      value: the computable part of the bound on the test loss.
      xi: the order of the remaining term whose constant the theorem leaves unknown
        (``n ** -0.75`` for the paper's bounds; 0 where there is none). The bound reads
        ``test loss <= value + c * xi``.
    """

    value: jax.Array
    xi: jax.Array


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check(name: str, x: Any, *, minimum: float | None = None, strict: bool = False) -> None:
    if not _concrete(x):
        return
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {x!r}")
    if minimum is not None:
        bad = np.any(arr <= minimum) if strict else np.any(arr < minimum)
        if bad:
            relation = ">" if strict else ">="
            raise ValueError(f"{name} must be {relation} {minimum}, got {x!r}")


def generalization_gap(train_loss: Any, test_loss: Any) -> jax.Array:
    """The generalization gap ``test_loss - train_loss``.

    Example:
      >>> float(generalization_gap(0.25, 1.0))
      0.75
    """
    _check("train_loss", train_loss)
    _check("test_loss", test_loss)
    return jnp.asarray(test_loss) - jnp.asarray(train_loss)


def hessian_bound(
    train_loss: Any, measure: Any, n: Any, *, loss_bound: Any, eps: Any = 0.0
) -> Bound:
    """The paper's Hessian-based generalization bound (Theorem 2.1).

    Maths: with probability >= 0.99, for any fixed ``eps`` near 0::

        L(f_W) <= (1 + eps) * Lhat(f_W) + (1 + eps) * sqrt(C) * sum_i sqrt(calH_i / n) + xi,
        xi = O(n^(-3/4))

    where ``measure = sum_i sqrt(calH_i / n)`` (:func:`hessjax.measures.hessian_distance`)
    and ``C`` bounds the loss. ``value`` is everything but ``xi``; ``xi`` is returned as
    ``n ** -0.75`` (its order; the constant is unknown).

    Cost: O(1).

    Args:
      train_loss: the empirical (training) loss ``Lhat``.
      measure: the Hessian distance measure.
      n: training-set size (>= 1).
      loss_bound: ``C``, an upper bound of the loss (> 0); for cross-entropy the maximal
        loss over the data, say.
      eps: the theorem's ``eps >= 0``.

    Returns:
      A :class:`Bound`.

    Raises:
      ValueError: (concrete arguments) ``n < 1``, ``loss_bound <= 0``, ``eps < 0``,
        ``measure < 0``, non-finite input.

    Example:
      >>> b = hessian_bound(0.1, 0.5, 100, loss_bound=4.0)
      >>> round(float(b.value), 6), round(float(b.xi), 6)
      (1.1, 0.031623)

    References:
      Ju, Li & Zhang, ICML 2022, Theorem 2.1.
    """
    _check("train_loss", train_loss)
    _check("measure", measure, minimum=0.0)
    _check("n", n, minimum=1.0)
    _check("loss_bound", loss_bound, minimum=0.0, strict=True)
    _check("eps", eps, minimum=0.0)
    scale = 1.0 + jnp.asarray(eps)
    value = scale * jnp.asarray(train_loss) + scale * jnp.sqrt(loss_bound) * jnp.asarray(measure)
    return Bound(value=value, xi=jnp.asarray(n, dtype=value.dtype) ** -0.75)


def corollary_bound(
    train_loss: Any,
    radii: Any,
    max_traces: Any,
    n: Any,
    *,
    loss_bound: Any,
    eps: Any = 0.0,
) -> Bound:
    """The distance-constraint corollary: a bound from radii and per-layer maximal traces.

    Maths: if ``||W_i - W_i^(s)||_F <= alpha_i`` for every layer, then
    ``calH_i <= alpha_i^2 * max_x Tr[H_i^+]``, so::

        L(f_W) <= (1 + eps) * Lhat + (1 + eps) * sqrt(C) * sum_i alpha_i sqrt(maxTr_i / n) + xi

    It upper-bounds :func:`hessian_bound`'s value whenever ``||v_i|| <= alpha_i``.

    Cost: O(L).

    Args:
      train_loss: the empirical loss.
      radii: ``alpha_i``, shape ``(L,)`` (>= 0).
      max_traces: ``max_x Tr[H_i^+]``, shape ``(L,)`` (>= 0), e.g.
        :func:`hessjax.measures.layer_traces` ``.max``.
      n: training-set size.
      loss_bound: ``C`` (> 0).
      eps: ``eps >= 0``.

    Returns:
      A :class:`Bound`.

    Raises:
      ValueError: shapes of ``radii`` and ``max_traces`` differ, negative entries, ...

    Example:
      >>> b = corollary_bound(0.1, [1.0, 2.0], [4.0, 1.0], 4, loss_bound=1.0)
      >>> round(float(b.value), 6)   # 0.1 + 1 * 1 + 2 * 0.5
      2.1

    References:
      Ju, Li & Zhang, ICML 2022, Corollary of Theorem 2.1.
    """
    radii, max_traces = jnp.asarray(radii), jnp.asarray(max_traces)
    if radii.shape != max_traces.shape or radii.ndim != 1:
        raise ValueError(
            f"radii and max_traces must be vectors of one shape (L,), got {radii.shape} and "
            f"{max_traces.shape}"
        )
    _check("train_loss", train_loss)
    _check("radii", radii, minimum=0.0)
    _check("max_traces", max_traces, minimum=0.0)
    _check("n", n, minimum=1.0)
    _check("loss_bound", loss_bound, minimum=0.0, strict=True)
    _check("eps", eps, minimum=0.0)
    term = jnp.sum(radii * jnp.sqrt(max_traces / n))
    scale = 1.0 + jnp.asarray(eps)
    value = scale * jnp.asarray(train_loss) + scale * jnp.sqrt(loss_bound) * term
    return Bound(value=value, xi=jnp.asarray(n, dtype=value.dtype) ** -0.75)


def spectral_norm_bound(
    train_margin_loss: Any,
    spectral_norms: Any,
    distances: Any,
    n: Any,
    *,
    input_norm: Any,
    margin: Any,
    width: int,
    delta: Any = 0.01,
) -> Bound:
    """Classical baseline: the spectrally-normalised PAC-Bayes margin bound, from the anchor.

    Maths (Neyshabur, Bhojanapalli & Srebro 2018, Theorem 1, with the distances
    ``||W_i - W_i^(s)||_F`` from the initialisation/anchor in place of ``||W_i||_F``, as the
    paper's remark allows), for a depth-``d`` network of width ``h``, inputs with norm
    ``<= B``, margin ``gamma``, with probability ``>= 1 - delta``::

        L_0 <= Lhat_gamma + sqrt( ( B^2 d^2 h ln(d h) prod_i ||W_i||_2^2
                                    * sum_i ||W_i - W_i^(s)||_F^2 / ||W_i||_2^2
                                    + ln(d n / delta) ) / (gamma^2 n) )

    The theorem's O(.) constant is set to 1 (favourable to the bound). The product of
    spectral norms grows exponentially with depth, which is why this bound is vacuous for
    deep networks (the paper reports ~3e74); it is computed in log-space so it does not
    overflow, and ``value`` may be ``inf`` in float32 when it exceeds the range.

    Cost: O(L).

    Args:
      train_margin_loss: ``Lhat_gamma``, the training margin loss (fraction of examples with
        margin ``<= gamma``).
      spectral_norms: ``||W_i||_2``, shape ``(L,)`` (> 0), e.g.
        :func:`hessjax.measures.spectral_norms`.
      distances: ``||W_i - W_i^(s)||_F``, shape ``(L,)``.
      n: training-set size.
      input_norm: ``B``, the maximal input norm (> 0).
      margin: ``gamma`` (> 0).
      width: ``h``, the maximal layer width (static int >= 1).
      delta: failure probability in (0, 1).

    Returns:
      A :class:`Bound` with ``xi = 0`` (no unknown lower-order term beyond the O(.)).

    Example:
      >>> b = spectral_norm_bound(0.0, [1.0], [0.0], 100, input_norm=1.0, margin=1.0, width=1)
      >>> round(float(b.value), 4)   # sqrt(ln(1 * 100 / 0.01) / 100)
      0.3035

    References:
      Neyshabur, Bhojanapalli & Srebro, ICLR 2018; Ju, Li & Zhang, ICML 2022 (comparison).
    """
    log_term = _log_spectral_term(
        spectral_norms,
        distances,
        n,
        input_norm=input_norm,
        margin=margin,
        width=width,
        delta=delta,
        train_margin_loss=train_margin_loss,
    )
    value = jnp.asarray(train_margin_loss) + jnp.exp(log_term)
    return Bound(value=value, xi=jnp.zeros_like(value))


def _log_spectral_term(
    spectral_norms, distances, n, *, input_norm, margin, width, delta, train_margin_loss=0.0
):
    """Validates the arguments; returns the natural log of the complexity term."""
    spectral_norms = jnp.asarray(spectral_norms, dtype=jnp.result_type(float))
    distances = jnp.asarray(distances, dtype=jnp.result_type(float))
    if spectral_norms.shape != distances.shape or spectral_norms.ndim != 1:
        raise ValueError(
            "spectral_norms and distances must be vectors of one shape (L,), got "
            f"{spectral_norms.shape} and {distances.shape}"
        )
    if isinstance(width, bool) or not isinstance(width, int | np.integer) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    _check("train_margin_loss", train_margin_loss, minimum=0.0)
    _check("spectral_norms", spectral_norms, minimum=0.0, strict=True)
    _check("distances", distances, minimum=0.0)
    _check("n", n, minimum=1.0)
    _check("input_norm", input_norm, minimum=0.0, strict=True)
    _check("margin", margin, minimum=0.0, strict=True)
    _check("delta", delta, minimum=0.0, strict=True)
    if _concrete(delta) and float(delta) >= 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    depth = spectral_norms.shape[0]
    dh = depth * width
    log_main = (
        2.0 * jnp.log(input_norm)
        + 2.0 * np.log(depth)
        + np.log(width)
        + np.log(np.log(dh) if dh > 1 else 1.0)
        + 2.0 * jnp.sum(jnp.log(spectral_norms))
        + jnp.log(jnp.sum(distances**2 / spectral_norms**2))
    )
    log_conf = jnp.log(jnp.log(depth * jnp.asarray(n) / delta))
    return 0.5 * (jnp.logaddexp(log_main, log_conf) - 2.0 * jnp.log(margin) - jnp.log(n))


def log10_spectral_norm_bound_term(
    spectral_norms: Any,
    distances: Any,
    n: Any,
    *,
    input_norm: Any,
    margin: Any,
    width: int,
    delta: Any = 0.01,
) -> jax.Array:
    """``log10`` of the complexity term of :func:`spectral_norm_bound` (never overflows).

    Use it to report how far the classical bound is off when ``value`` is ``inf``.

    Example:
      >>> t = log10_spectral_norm_bound_term([10.0] * 40, [1.0] * 40, 1000, input_norm=1.0,
      ...                                    margin=1.0, width=100)
      >>> bool(t > 30)
      True
    """
    log_term = _log_spectral_term(
        spectral_norms,
        distances,
        n,
        input_norm=input_norm,
        margin=margin,
        width=width,
        delta=delta,
    )
    return log_term / np.log(10.0)
