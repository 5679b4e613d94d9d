"""Exact screening of the max over examples in the canonical measure (used by ``distance``).

The canonical measure needs, for every layer ``i``, ``calH_i = max_x Q_k(x, i)`` where
``Q_k(x, i)`` is the ``k``-step Lanczos (Gauss) quadrature of ``v_i^T H_ii[x]^+ v_i`` started
at ``v_i`` (``k = num_iters``). Brute force runs Lanczos for every example. Screening first
brackets every ``Q_k(x, i)`` from ONE block product per example with the shared tangent
``v_i`` (batched over examples, :func:`hessjax.hessian.block_forms_fn`), then runs Lanczos only
where the bracket cannot rule an example out. The result is the brute-force result, not an
approximation of it.

The bracket. Let ``q_0 = v / ||v||`` and ``T`` the ``k x k`` Lanczos tridiagonal from ``q_0``
(diagonal ``alpha_j``, off-diagonal ``beta_j``), ``T = Y diag(theta) Y^T``. The quadrature is
``Q_k = ||v||^2 sum_j w_j max(theta_j, 0)`` with weights ``w_j = (e_1^T y_j)^2 >= 0``. Then

* ``sum_j w_j = ||e_1||^2 = 1``;
* ``sum_j w_j theta_j = e_1^T T e_1 = alpha_0 = q_0^T H q_0``, so ``||v||^2 sum_j w_j theta_j
  = v^T H v``;
* ``sum_j w_j theta_j^2 = e_1^T T^2 e_1 = alpha_0^2 + beta_0^2 = ||H q_0||^2`` (``k >= 2``;
  for ``k = 1`` it is ``alpha_0^2 <= ||H q_0||^2``; an exhausted space has ``beta_0 = 0`` and
  ``H q_0 = alpha_0 q_0``), since ``H q_0 = alpha_0 q_0 + beta_0 q_1`` with ``q_1 _|_ q_0``.

``max(., 0)`` is convex, so by Jensen ``sum_j w_j max(theta_j, 0) >= max(alpha_0, 0)``; and
``max(t, 0) <= |t|`` with Cauchy-Schwarz gives ``sum_j w_j |theta_j| <= sqrt(sum_j w_j
theta_j^2) = ||H q_0||``. Hence, for EVERY ``k >= 1``::

    lower = max(v^T H v, 0)  <=  Q_k  <=  ||v|| ||H v||  = upper

(the same bracket holds for the exact ``v^T H^+ v``, the limit ``k -> dim``). With
``truncate=False`` the value is ``max(v^T H v, 0) = lower`` itself and ``upper = lower``.

The refinement. Per layer, the best exact value found so far ``b_i`` (``-inf`` at first). An
example ``x`` is pending for layer ``i`` while it is not refined and
``upper(x, i) * (1 + rtol) >= b_i``; ``rtol = eps ** 0.25`` of the dtype (``1.9e-2`` in
float32, ``1.2e-4`` in float64) covers the rounding between the batched screening products
and the Lanczos products, which take different code paths. Each round refines ``k`` examples
(the pending ones ranked highest by ``lower`` in any layer, so the likely maximiser comes
first) with exactly the brute-force computation for all layers, raises ``b_i``, and the loop
stops when nothing is pending. An example never refined for layer ``i`` has
``Q_k <= upper < b_i``, so it is neither the maximiser nor tied with it; every example tied
at the max is refined, and the argmax is the smallest such index, as ``jnp.argmax`` gives.
Layers with ``v_i = 0`` are 0 for every example (argmax 0) and refine nothing.

References:
  Golub & Meurant, "Matrices, moments and quadrature with applications", 2010 (Gauss
  quadrature from Lanczos, ``e_1^T T^p e_1`` moments); Ju, Li & Zhang, ICML 2022, Theorem 2.1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hessjax import estimators
from hessjax.hessian import BlockForms, block_hvp_fn, layer_hvp_fn
from hessjax.mapping import chunked_vmap, num_devices

PyTree = Any


def map_rows(fn, xs, chunk_size, map_fn):
    """``map_fn(fn, xs, chunk_size=chunk_size)``: the rows mapped (padding dropped: exact max)."""
    return map_fn(fn, xs, chunk_size=chunk_size)


def example_value_fn(
    loss_fn, params, v, partition, *, num_iters, truncate, layer_chunk_size
) -> Callable[[PyTree], tuple[jax.Array, jax.Array]]:
    """The brute-force value of ONE example: ``(Q_k(x, i) for all i, loss)`` (``v`` restricted)."""

    def one(example):
        blocks = block_hvp_fn(loss_fn, params, partition, example, chunk_size=layer_chunk_size)
        if truncate:
            q = estimators.positive_quadratic_form(
                blocks, v, num_iters=num_iters, partition=partition
            )
        else:
            q = jnp.maximum(partition.dot(v, blocks(v)), 0.0)
        return q, loss_fn(params, example)

    return one


def brackets(
    forms: BlockForms, v_sq_norms: jax.Array, *, truncate: bool
) -> tuple[jax.Array, jax.Array]:
    """``(lower, upper)``, each ``(m, L)``: ``max(v^T H v, 0) <= Q_k <= ||v|| ||H v||``.

    See the module docstring for the proof that the bracket holds for the ``k``-step Lanczos
    quadrature ``Q_k`` at every ``k >= 1`` (not only for the exact ``v^T H^+ v``). With
    ``truncate=False`` the value is ``lower`` itself, and ``upper = lower``.
    """
    lower = jnp.maximum(forms.vhv, 0.0)
    if not truncate:
        return lower, lower
    upper = jnp.sqrt(v_sq_norms)[None, :] * jnp.sqrt(jnp.maximum(forms.hv_sq_norms, 0.0))
    return lower, jnp.maximum(upper, lower)


def default_rtol(dtype: Any) -> float:
    """The pruning slack ``eps ** 0.25`` of ``dtype`` (float32: 1.9e-2, float64: 1.2e-4)."""
    return float(jnp.finfo(dtype).eps) ** 0.25


def layer_value_fn(loss_fn, params, v, partition, layer, *, num_iters):
    """``example -> Q_k(x, i)`` for ONE layer: Lanczos on ``H_ii[x]`` from ``v_i``.

    The same recurrence as brute force runs for layer ``i`` (brute force runs all layers'
    independent recurrences at once on one block-diagonal matvec); here the matvec is
    :func:`hessjax.hessian.layer_hvp_fn`, so vmapping over examples batches one layer's tangent.
    """
    v_sub = [jax.tree_util.tree_leaves(v)[j] for j in partition.layer_leaves(layer)]

    def value(example):
        matvec = layer_hvp_fn(loss_fn, params, partition, layer, example)
        return estimators.positive_quadratic_form(matvec, v_sub, num_iters=num_iters)

    return value


def refine_layer(
    value_fn: Callable[[PyTree], jax.Array],
    examples: PyTree,
    lower: jax.Array,
    upper: jax.Array,
    active: jax.Array,
    *,
    refine_size: int,
    rtol: float,
    map_fn: Any = chunked_vmap,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The exact ``(max, argmax)`` over examples for ONE layer, refining only what it must.

    Each round runs ``value_fn`` (the Lanczos value) on the ``refine_size`` pending examples
    with the highest ``lower`` (mapped by ``map_fn``, e.g. split over a mesh), raises the best value
    ``b`` and stops when no example with ``upper * (1 + rtol) >= b`` is left unrefined.

    Args:
      value_fn: ``example -> Q_k`` (scalar), the brute-force computation for this layer.
      examples: the examples (leading axis ``m``).
      lower, upper: the brackets, ``(m,)``.
      active: scalar bool, ``v_i != 0`` (otherwise every value is exactly 0).
      refine_size: examples refined per round (static).
      rtol: the relative slack on ``upper``.
      map_fn: the map over each round's examples (default :func:`hessjax.chunked_vmap`).

    Returns:
      ``(value, argmax, num_refined, refined_mask)``; ``refined_mask`` is ``(m,)`` bool.
    """
    m = lower.shape[0]
    dtype = lower.dtype
    k = min(refine_size, m)
    rank = (
        jnp.zeros((m,), jnp.int32)
        .at[jnp.argsort(-lower, stable=True)]
        .set(jnp.arange(m, dtype=jnp.int32))
    )
    threshold = upper * (1 + rtol)

    def pending(resolved, best):
        return ~resolved & (threshold >= best)

    def cond(state):
        return jnp.any(pending(state[0], state[1]))

    def body(state):
        resolved, best, arg, count = state
        p = pending(resolved, best)
        priority = jnp.where(p, rank, m + rank)  # fill a round with unrefined examples
        priority = jnp.where(resolved, 2 * m + rank, priority)
        _, idx = jax.lax.top_k(-priority, k)
        batch = jax.tree_util.tree_map(lambda x: x[idx], examples)
        values = map_rows(value_fn, batch, None, map_fn).astype(dtype)
        top = jnp.max(values)
        top_arg = jnp.min(jnp.where(values == top, idx, m)).astype(jnp.int32)
        arg = jnp.where(top > best, top_arg, jnp.where(top == best, jnp.minimum(arg, top_arg), arg))
        count = count + jnp.sum(p[idx], dtype=jnp.int32)
        return resolved.at[idx].set(True), jnp.maximum(best, top), arg, count

    state = (
        jnp.broadcast_to(~active, (m,)),
        jnp.where(active, -jnp.inf, 0.0).astype(dtype),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
    )
    resolved, best, arg, count = jax.lax.while_loop(cond, body, state)
    return best, arg, count, resolved & active


def refine_layers(
    loss_fn,
    params,
    v,
    partition,
    examples,
    lower,
    upper,
    *,
    num_iters: int,
    refine_size: int,
    rtol: float,
    map_fn: Any = chunked_vmap,
):
    """:func:`refine_layer` for every layer (a static loop): ``(per_layer, argmax, refined,
    num_refined)`` with ``refined[i]`` the examples refined for layer ``i`` and
    ``num_refined`` the distinct examples refined in any layer."""
    active = partition.sq_norms(v) > 0
    outs = [
        refine_layer(
            layer_value_fn(loss_fn, params, v, partition, i, num_iters=num_iters),
            examples,
            lower[:, i],
            upper[:, i],
            active[i],
            refine_size=refine_size,
            rtol=rtol,
            map_fn=map_fn,
        )
        for i in range(partition.num_layers)
    ]
    best, arg, count, mask = (jnp.stack(x) for x in zip(*outs, strict=True))
    return best, arg, count, jnp.sum(jnp.any(mask, axis=0), dtype=jnp.int32)


def refine_size_for(chunk_size: int | None, m: int, map_fn: Any) -> int:
    """Examples per refinement round: ``chunk_size`` (all ``m`` if None) per device."""
    per_device = m if chunk_size is None else chunk_size
    return per_device * num_devices(map_fn)
