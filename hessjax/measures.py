"""The paper's Hessian distance measure and its companion measures.

For a fine-tuned model ``params`` and its pretrained ``anchor``, with ``v_i = W_i - anchor_i``
the displacement of layer ``i`` (layers from a :class:`~hessjax.partition.Partition`):

    calH_i  = max over examples (x, y) of  v_i^T H_i^+[loss(params, (x, y))] v_i
    measure = sum_i sqrt(calH_i / n)

where ``H_i`` is the diagonal Hessian block of layer ``i`` for ONE example's loss, ``H^+`` its
positive part (negative eigenvalues set to zero) and ``n`` the training-set size. The positive
part is applied by Lanczos (Gauss) quadrature started at ``v_i``, exact once the number of
Lanczos steps reaches the layer's dimension (or its Krylov space is exhausted).

Companions: per-layer distances from the anchor, per-layer maximal and mean traces of
``H_i^+`` (for the distance-constraint corollary), the spectral norms used by the classical
baseline bound, and noise stability under Gaussian weight noise with its Hessian-trace
prediction. :func:`report` turns the results into a per-layer table that prints and serialises.

References:
  Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based
  Generalization Guarantees", ICML 2022 (arXiv:2206.02659), Theorem 2.1, Corollary, Lemma.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessjax import estimators
from hessjax.hvp import block_hvp_fn, check_like, chunked_vmap, hvp
from hessjax.partition import Partition, layer_partition

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

VARIANTS = ("canonical", "reference")


# --------------------------------------------------------------------------- results
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["per_layer", "argmax", "distances", "n", "losses"],
    meta_fields=["names", "variant"],
)
@dataclasses.dataclass(frozen=True)
class HessianDistance:
    """The Hessian distance measure, per layer (a pytree: it can leave ``jax.jit``).

    Attributes:
      names: layer names (from the partition).
      variant: ``"canonical"`` (the paper's) or ``"reference"`` (the reference code's).
      per_layer: ``calH_i``, shape ``(L,)``. For the reference variant the untruncated
        ``max_b <v_i, (H_b v)_i>``, which can be negative.
      argmax: for each layer the index of the maximising example (canonical) or batch
        (reference), shape ``(L,)``.
      distances: ``||v_i||_F``, shape ``(L,)``.
      n: the training-set size used in the measure.
      losses: the loss of every example (canonical) or batch (reference).
    """

    names: tuple[str, ...]
    variant: str
    per_layer: jax.Array
    argmax: jax.Array
    distances: jax.Array
    n: jax.Array
    losses: jax.Array

    @property
    def contributions(self) -> jax.Array:
        """``sqrt(max(calH_i, 0) / n)`` per layer, shape ``(L,)``."""
        return jnp.sqrt(jnp.maximum(self.per_layer, 0.0) / self.n)

    @property
    def measure(self) -> jax.Array:
        """``sum_i sqrt(calH_i / n)`` (negative ``calH_i`` of the reference variant count 0)."""
        return jnp.sum(self.contributions)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["max", "argmax", "mean", "per_example"],
    meta_fields=["names"],
)
@dataclasses.dataclass(frozen=True)
class LayerTraces:
    """Per-layer traces of ``f(H_i)`` over examples (``f`` = positive part by default).

    Attributes:
      names: layer names.
      max: ``max_x Tr f(H_i[x])``, shape ``(L,)``.
      argmax: maximising example per layer, shape ``(L,)``.
      mean: mean over examples, shape ``(L,)``.
      per_example: the estimates, shape ``(m, L)``.
    """

    names: tuple[str, ...]
    max: jax.Array
    argmax: jax.Array
    mean: jax.Array
    per_example: jax.Array


class NoiseStability(NamedTuple):
    """Loss change under Gaussian weight noise and its Hessian-trace prediction.

    Attributes:
      value: ``E_U[loss(W + U)] - loss(W)`` estimated from the draws.
      stderr: standard error of ``value``.
      predicted: ``sigma^2 / 2 * Tr H`` (Hutchinson, on the perturbed leaves).
      predicted_stderr: standard error of ``predicted``.
    """

    value: jax.Array
    stderr: jax.Array
    predicted: jax.Array
    predicted_stderr: jax.Array


# --------------------------------------------------------------------------- validation
def _is_concrete(x: Any) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def _num_examples(examples: PyTree, name: str = "examples") -> int:
    leaves = jax.tree_util.tree_leaves(examples)
    if not leaves:
        raise ValueError(f"{name} must be a pytree with at least one array leaf, got {examples!r}")
    sizes = {int(jnp.shape(x)[0]) if jnp.ndim(x) else -1 for x in leaves}
    if -1 in sizes or len(sizes) != 1:
        raise ValueError(
            f"every leaf of {name} must have the same leading (example) axis; got sizes {sizes}"
        )
    m = sizes.pop()
    if m < 1:
        raise ValueError(f"{name} is empty (leading size 0): at least one example is needed")
    return m


def _check_n(n: Any) -> jax.Array:
    if _is_concrete(n):
        n_arr = np.asarray(n)
        if n_arr.shape != () or not np.isfinite(n_arr) or n_arr < 1:
            raise ValueError(f"n (the training-set size) must be a scalar >= 1, got {n!r}")
    return jnp.asarray(n, dtype=jnp.result_type(float))


def _check_static_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _resolve_partition(params: PyTree, partition: Partition | None) -> Partition:
    if partition is None:
        return layer_partition(params)
    if not isinstance(partition, Partition):
        raise TypeError(f"partition must be a hessjax.Partition, got {type(partition).__name__}")
    partition.check(params, "params")
    return partition


def _check_finite_losses(losses: jax.Array, what: str) -> None:
    if _is_concrete(losses):
        bad = np.flatnonzero(~np.isfinite(np.asarray(losses)))
        if bad.size:
            raise ValueError(
                f"loss_fn returned a non-finite loss (NaN/inf) for {what} {bad[:10].tolist()}"
                f"{' ...' if bad.size > 10 else ''}: the measure would be meaningless"
            )


def displacement(params: PyTree, anchor: PyTree) -> PyTree:
    """``v = params - anchor``, after checking that ``anchor`` matches ``params`` exactly.

    Raises:
      ValueError: tree structure or a leaf shape differs (the message names the leaf).
      TypeError: a leaf dtype differs.
    """
    check_like(params, anchor, "anchor")
    return jax.tree_util.tree_map(jnp.subtract, params, anchor)


# --------------------------------------------------------------------------- the measure
def hessian_distance(
    loss_fn: LossFn,
    params: PyTree,
    anchor: PyTree,
    examples: PyTree,
    *,
    n: Any,
    partition: Partition | None = None,
    num_iters: int = 16,
    truncate: bool = True,
    chunk_size: int | None = 8,
    layer_chunk_size: int | None = None,
    variant: str = "canonical",
    batch_size: int = 4,
) -> HessianDistance:
    """The paper's Hessian distance measure ``sum_i sqrt(calH_i / n)``, per layer.

    Maths (``variant="canonical"``, the paper's definition)::

        v_i     = params_i - anchor_i
        calH_i  = max_{x in examples} v_i^T H_i^+[loss_fn(params, x)] v_i
        measure = sum_i sqrt(calH_i / n)

    ``H_i[.]`` is the diagonal block of layer ``i`` of ONE example's Hessian and ``H^+`` its
    positive part. ``v_i^T H_i^+ v_i`` is computed by Lanczos quadrature started at ``v_i``
    (:func:`hessjax.estimators.positive_quadratic_form`) with ``num_iters`` steps: exact once
    ``num_iters`` reaches the layer's dimension, otherwise the ``num_iters``-point Gauss rule
    (which is exact for the untruncated ``v_i^T H_i v_i`` at any ``num_iters``).
    ``truncate=False`` skips the truncation and clips ``v_i^T H_i v_i`` at zero instead.

    ``variant="reference"`` reproduces the reference code's number: the examples are cut
    into consecutive batches of ``batch_size`` (a last, shorter batch keeps its true mean);
    for each batch one full-Hessian product ``H_b v`` of the batch-mean loss with ALL layers'
    ``v`` at once (so cross-layer terms enter), and ``calH_i = max_b <v_i, (H_b v)_i>``,
    untruncated (it can be negative; the measure counts negative values as 0).

    Cost (canonical): per example one linearisation plus ``num_iters`` block products of
    ``L`` Hessian-vector products each, i.e. ``L * num_iters`` HVPs per example, vmapped over
    ``chunk_size`` examples (and ``layer_chunk_size`` layers) at a time. Memory: about
    ``chunk_size * (L + num_iters)`` params-sized vectors. Reference: one HVP per batch.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example (for the
        reference variant the batch loss is the mean of these).
      params: the fine-tuned params (any pytree: dict, linen params, ``nnx.State``).
      anchor: the pretrained params; must match ``params`` exactly (tree, shapes, dtypes).
      examples: a pytree of examples with a shared leading axis ``m >= 1``, e.g.
        ``(images, labels)``.
      n: the training-set size (scalar >= 1; may be an array).
      partition: the layers; default :func:`hessjax.layer_partition` of ``params`` (every leaf
        with ``ndim >= 2``).
      num_iters: Lanczos steps for the truncation (static).
      truncate: use ``H^+`` (True) or clip ``v^T H v`` at zero (False).
      chunk_size: examples (canonical) or batches (reference) vmapped at once; ``None``:
        all.
      layer_chunk_size: layers whose block products are vmapped at once; ``None``: all.
      variant: ``"canonical"`` or ``"reference"``.
      batch_size: examples per batch for the reference variant (the reference code uses 4).

    Returns:
      A :class:`HessianDistance` (``.measure``, ``.per_layer``, ``.argmax``, ...).

    Raises:
      ValueError: a mismatched anchor (naming the leaf), ``n < 1``, an empty batch, an
        unknown variant, bad sizes, or (outside ``jit``) a non-finite example loss.
      TypeError: a dtype mismatch between anchor and params, a bad partition.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p, ex: 0.5 * jnp.sum((p["w"] @ ex[0] - ex[1]) ** 2)
      >>> anchor = {"w": jnp.zeros((1, 2))}
      >>> params = {"w": jnp.array([[1.0, 0.0]])}
      >>> examples = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.zeros((2, 1)))
      >>> r = hessian_distance(loss, params, anchor, examples, n=4)
      >>> float(r.per_layer[0]), float(r.measure)   # max(1, 0), sqrt(1 / 4)
      (1.0, 0.5)

    References:
      Ju, Li & Zhang, ICML 2022, Theorem 2.1 (the measure) and the reference code
      (VirtuosoResearch/Robust-Fine-Tuning) for ``variant="reference"``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    v = displacement(params, anchor)
    part = _resolve_partition(params, partition)
    m = _num_examples(examples)
    n_arr = _check_n(n)
    num_iters = _check_static_int(num_iters, "num_iters")
    batch_size = _check_static_int(batch_size, "batch_size")
    if chunk_size is not None:
        _check_static_int(chunk_size, "chunk_size")
    if layer_chunk_size is not None:
        _check_static_int(layer_chunk_size, "layer_chunk_size")
    if variant == "canonical":
        per_layer, argmax, losses = _canonical(
            loss_fn,
            params,
            v,
            examples,
            part,
            num_iters=num_iters,
            truncate=bool(truncate),
            chunk_size=chunk_size,
            layer_chunk_size=layer_chunk_size,
        )
        _check_finite_losses(losses, "examples")
    else:
        per_layer, argmax, losses = _reference(
            loss_fn, params, v, examples, part, m=m, batch_size=batch_size, chunk_size=chunk_size
        )
        _check_finite_losses(losses, "batches")
    return HessianDistance(
        names=part.names,
        variant=variant,
        per_layer=per_layer,
        argmax=argmax,
        distances=jnp.sqrt(part.sq_norms(v)),
        n=n_arr,
        losses=losses,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "loss_fn",
        "partition",
        "num_iters",
        "truncate",
        "chunk_size",
        "layer_chunk_size",
    ),
)
def _canonical(
    loss_fn, params, v, examples, partition, *, num_iters, truncate, chunk_size, layer_chunk_size
):
    v = partition.restrict(v)

    def one(example):
        blocks = block_hvp_fn(loss_fn, params, partition, example, chunk_size=layer_chunk_size)
        if truncate:
            q = estimators.positive_quadratic_form(
                blocks, v, num_iters=num_iters, partition=partition
            )
        else:
            q = jnp.maximum(partition.dot(v, blocks(v)), 0.0)
        return q, loss_fn(params, example)

    values, losses = chunked_vmap(one, examples, chunk_size=chunk_size)
    return jnp.max(values, axis=0), jnp.argmax(values, axis=0), losses


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "partition", "m", "batch_size", "chunk_size")
)
def _reference(loss_fn, params, v, examples, partition, *, m, batch_size, chunk_size):
    v = partition.restrict(v)
    num_batches = -(-m // batch_size)
    pad = num_batches * batch_size - m

    def to_batches(x):
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
        return x.reshape((num_batches, batch_size) + x.shape[1:])

    weights = (jnp.arange(num_batches * batch_size) < m).reshape(num_batches, batch_size)
    batches = jax.tree_util.tree_map(to_batches, examples)

    def one(args):
        batch, w = args
        w = w.astype(jnp.result_type(*jax.tree_util.tree_leaves(params)))

        def batch_loss(p):
            losses = jax.vmap(lambda ex: loss_fn(p, ex))(batch)
            return jnp.sum(w * losses) / jnp.sum(w)

        return partition.dot(v, hvp(batch_loss, params, v)), batch_loss(params)

    values, losses = chunked_vmap(one, (batches, weights), chunk_size=chunk_size)
    return jnp.max(values, axis=0), jnp.argmax(values, axis=0), losses


# --------------------------------------------------------------------------- companions
def distances(params: PyTree, anchor: PyTree, *, partition: Partition | None = None):
    """Per-layer Frobenius distances ``||W_i - anchor_i||_F`` from the anchor, shape ``(L,)``.

    Cost: one pass over the leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> distances({"w": jnp.ones((2, 2))}, {"w": jnp.zeros((2, 2))})
      Array([2.], dtype=float32)

    References:
      Ju, Li & Zhang, ICML 2022, Corollary (distance constraints ``||W_i - W_i^(s)||_F <=
      alpha_i``).
    """
    v = displacement(params, anchor)
    return jnp.sqrt(_resolve_partition(params, partition).sq_norms(v))


def layer_traces(
    loss_fn: LossFn,
    params: PyTree,
    examples: PyTree,
    key: jax.Array,
    *,
    partition: Partition | None = None,
    num_probes: int = 8,
    num_iters: int = 16,
    positive: bool = True,
    chunk_size: int | None = 8,
) -> LayerTraces:
    """Per-layer traces ``Tr f(H_i[x])`` for every example, their max and mean.

    Maths: for each example ``x`` and layer ``i``, ``Tr f(H_i)`` with ``f`` the positive part
    (``positive=True``, giving ``Tr H_i^+`` of the Corollary) or the identity, estimated by
    stochastic Lanczos quadrature with ``num_probes`` Rademacher probes (the same probes for
    every example) and ``num_iters`` Lanczos steps; exact in expectation for ``f`` = identity.
    Then ``max_x`` (the Corollary's ``max Tr[H_i^+]``) and the mean over examples.

    Cost: ``num_probes * num_iters * L`` HVPs per example (``num_probes * L`` for the
    identity, which needs no Lanczos), vmapped over ``chunk_size`` examples.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example.
      params: the params.
      examples: examples with a leading axis.
      key: PRNG key for the probes.
      partition: the layers (default: leaves with ``ndim >= 2``).
      num_probes: probes per example (static).
      num_iters: Lanczos steps (static; unused when ``positive=False``).
      positive: trace of ``H_i^+`` (True) or of ``H_i`` (False).
      chunk_size: examples vmapped at once.

    Returns:
      A :class:`LayerTraces`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, x: 0.5 * jnp.sum((p["w"] @ x) ** 2)   # H = x x^T (per output row)
      >>> t = layer_traces(loss, {"w": jnp.ones((1, 2))}, jnp.array([[1.0, 0.0], [0.0, 3.0]]),
      ...                  jax.random.key(0), num_probes=4, num_iters=2)
      >>> float(t.max[0]), float(t.mean[0])
      (9.0, 5.0)

    References:
      Ju, Li & Zhang, ICML 2022, Corollary; Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl.
      2017 (stochastic Lanczos quadrature).
    """
    part = _resolve_partition(params, partition)
    _num_examples(examples)
    num_probes = _check_static_int(num_probes, "num_probes")
    num_iters = _check_static_int(num_iters, "num_iters")
    per_example = _layer_traces(
        loss_fn,
        params,
        examples,
        key,
        part,
        num_probes=num_probes,
        num_iters=num_iters,
        positive=bool(positive),
        chunk_size=chunk_size,
    )
    return LayerTraces(
        names=part.names,
        max=jnp.max(per_example, axis=0),
        argmax=jnp.argmax(per_example, axis=0),
        mean=jnp.mean(per_example, axis=0),
        per_example=per_example,
    )


@functools.partial(
    jax.jit,
    static_argnames=("loss_fn", "partition", "num_probes", "num_iters", "positive", "chunk_size"),
)
def _layer_traces(
    loss_fn, params, examples, key, partition, *, num_probes, num_iters, positive, chunk_size
):
    def one(example):
        blocks = block_hvp_fn(loss_fn, params, partition, example)
        if positive:
            est = estimators.trace_of_function(
                blocks,
                params,
                key,
                estimators.positive_part,
                num_probes=num_probes,
                num_iters=num_iters,
                partition=partition,
            )
        else:
            est = estimators.hutchinson_trace(
                blocks, params, key, num_probes=num_probes, partition=partition
            )
        return est.value

    return chunked_vmap(one, examples, chunk_size=chunk_size)


def spectral_norms(params: PyTree, *, partition: Partition | None = None) -> jax.Array:
    """Per-layer spectral norms ``||W_i||_2`` of the layers' weight matrices, shape ``(L,)``.

    A layer's leaves are reshaped to matrices with the last axis (outputs, flax's layout
    ``(..., in, out)``) as columns and stacked along rows: a dense kernel ``(in, out)`` with
    its bias ``(out,)`` gives the affine matrix ``(in + 1, out)``; a conv kernel
    ``(kh, kw, in, out)`` gives ``(kh * kw * in, out)`` (the usual proxy for the operator norm
    of a convolution, which it bounds up to a factor ``sqrt(kh * kw)``).

    Cost: one SVD per layer.

    Raises:
      ValueError: leaves of one layer with different output sizes.

    Example:
      >>> import jax.numpy as jnp
      >>> spectral_norms({"w": jnp.diag(jnp.array([3.0, 1.0]))})
      Array([3.], dtype=float32)

    References:
      Neyshabur, Bhojanapalli & Srebro, "A PAC-Bayesian approach to spectrally-normalized
      margin bounds for neural networks", ICLR 2018.
    """
    part = _resolve_partition(params, partition)
    norms = []
    for name, leaves in part.split(params).items():
        outs = {jnp.shape(x)[-1] for x in leaves}
        if len(outs) != 1:
            raise ValueError(
                f"layer {name!r} has leaves with different output sizes {sorted(outs)}; "
                "spectral_norms needs one matrix per layer"
            )
        mat = jnp.concatenate([jnp.reshape(x, (-1, jnp.shape(x)[-1])) for x in leaves], axis=0)
        norms.append(jnp.linalg.norm(mat, ord=2))
    return jnp.stack(norms)


def noise_stability(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    *,
    sigma: Any,
    num_draws: int = 20,
    num_probes: int = 20,
    partition: Partition | None = None,
) -> NoiseStability:
    """Noise stability ``E_U[loss(W + U)] - loss(W)`` and its prediction ``sigma^2/2 Tr H``.

    Maths: ``U`` is Gaussian noise ``N(0, sigma^2 I)`` on the leaves of the partition's layers
    (weights only by default; other leaves untouched). By Taylor expansion,
    ``E_U loss(W + U) - loss(W) = sigma^2 / 2 * Tr H + O(sigma^3)`` with ``H`` the Hessian
    restricted to the perturbed leaves (the paper's Lemma, with ``Sigma_i = sigma^2 I``).
    The change is averaged over ``num_draws`` antithetic pairs ``(U, -U)``: the pair mean
    ``(loss(W + U) + loss(W - U)) / 2 - loss(W)`` has the same expectation as one draw but no
    first-order (gradient) noise, which otherwise dominates the variance at small ``sigma``.
    ``Tr H`` is estimated by Hutchinson with ``num_probes`` probes. The reference code uses
    ``sigma = 1e-3`` and 20 plain draws.

    Cost: ``2 * num_draws`` loss evaluations and ``num_probes`` HVPs.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (a batch loss).
      params: the params.
      batch: the data passed to ``loss_fn``.
      key: PRNG key (split for the draws and the probes).
      sigma: noise standard deviation (may be an array).
      num_draws: antithetic noise pairs (static, >= 2).
      num_probes: Hutchinson probes for the prediction (static).
      partition: the perturbed layers (default: leaves with ``ndim >= 2``).

    Returns:
      A :class:`NoiseStability`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, b: jnp.sum(p["w"] ** 2)   # Tr H = 2 * 4
      >>> r = noise_stability(loss, {"w": jnp.ones((2, 2))}, None, jax.random.key(0),
      ...                     sigma=0.1, num_draws=2000, num_probes=4)
      >>> round(float(r.predicted), 4)
      0.04

    References:
      Ju, Li & Zhang, ICML 2022, Lemma (noise stability); the reference code
      (VirtuosoResearch/Robust-Fine-Tuning).
    """
    part = _resolve_partition(params, partition)
    num_draws = _check_static_int(num_draws, "num_draws", 2)
    num_probes = _check_static_int(num_probes, "num_probes")
    return _noise_stability(
        loss_fn, params, batch, key, sigma, part, num_draws=num_draws, num_probes=num_probes
    )


@functools.partial(jax.jit, static_argnames=("loss_fn", "partition", "num_draws", "num_probes"))
def _noise_stability(loss_fn, params, batch, key, sigma, partition, *, num_draws, num_probes):
    draw_key, probe_key = jax.random.split(key)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    base = loss_fn(params, batch)

    def perturbed(k):
        keys = jax.random.split(k, len(leaves))
        noise = [
            sigma * jax.random.normal(kk, jnp.shape(x), x.dtype) if g >= 0 else jnp.zeros_like(x)
            for x, kk, g in zip(leaves, keys, partition.leaf_layer, strict=True)
        ]
        plus = [x + u for x, u in zip(leaves, noise, strict=True)]
        minus = [x - u for x, u in zip(leaves, noise, strict=True)]
        loss_plus = loss_fn(jax.tree_util.tree_unflatten(treedef, plus), batch)
        loss_minus = loss_fn(jax.tree_util.tree_unflatten(treedef, minus), batch)
        return 0.5 * (loss_plus + loss_minus) - base

    changes = jax.lax.map(perturbed, jax.random.split(draw_key, num_draws))
    matvec = lambda u: partition.restrict(hvp(loss_fn, params, partition.restrict(u), batch))
    trace = estimators.hutchinson_trace(matvec, params, probe_key, num_probes=num_probes)
    half_var = 0.5 * jnp.asarray(sigma) ** 2
    return NoiseStability(
        value=jnp.mean(changes),
        stderr=jnp.std(changes, ddof=1) / jnp.sqrt(num_draws),
        predicted=half_var * trace.value,
        predicted_stderr=half_var * trace.stderr,
    )


# --------------------------------------------------------------------------- report
@dataclasses.dataclass(frozen=True)
class Report:
    """A per-layer table of the Hessian distance measure (prints as text, serialises to JSON).

    Columns: layer, ``||v_i||_F``, ``calH_i``, ``max Tr H_i^+`` (when traces were given), and
    the layer's share of the measure ``sqrt(calH_i / n) / measure``.
    """

    rows: tuple[dict[str, Any], ...]
    measure: float
    n: float
    variant: str

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-serialisable)."""
        return {
            "variant": self.variant,
            "n": self.n,
            "measure": self.measure,
            "layers": [dict(r) for r in self.rows],
        }

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict`; keyword arguments go to ``json.dumps``."""
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        has_trace = any("max_trace" in r for r in self.rows)
        width = max([5] + [len(r["layer"]) for r in self.rows])
        head = f"{'layer':<{width}}  {'||v_i||':>10}  {'calH_i':>11}"
        head += f"  {'max Tr H+':>11}" if has_trace else ""
        head += f"  {'share':>6}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            line = f"{r['layer']:<{width}}  {r['distance']:>10.4g}  {r['calH']:>11.4g}"
            if has_trace:
                line += f"  {r.get('max_trace', float('nan')):>11.4g}"
            line += f"  {100 * r['share']:>5.1f}%"
            lines.append(line)
        lines.append("-" * len(head))
        lines.append(f"measure = sum_i sqrt(calH_i / n) = {self.measure:.6g}  (n = {self.n:g})")
        return "\n".join(lines)


def report(result: HessianDistance, traces: LayerTraces | None = None) -> Report:
    """Builds the per-layer :class:`Report` of a :func:`hessian_distance` result.

    Args:
      result: the measure.
      traces: optional :func:`layer_traces` of the same layers (adds ``max Tr H_i^+``).

    Returns:
      A :class:`Report`; ``print(report(r))`` shows the table, ``report(r).to_json()`` the
      JSON.

    Raises:
      ValueError: ``traces`` for other layers.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p, x: 0.5 * jnp.sum((p["w"] @ x) ** 2)
      >>> r = hessian_distance(loss, {"w": jnp.ones((1, 2))}, {"w": jnp.zeros((1, 2))},
      ...                      jnp.eye(2), n=1)
      >>> report(r).to_dict()["layers"][0]["calH"]
      1.0

    References:
      Ju, Li & Zhang, ICML 2022.
    """
    if traces is not None and tuple(traces.names) != tuple(result.names):
        raise ValueError(
            f"traces are for layers {traces.names}, the result for {result.names}: they must match"
        )
    contrib = np.asarray(result.contributions, dtype=np.float64)
    total = float(contrib.sum())
    rows = []
    for i, name in enumerate(result.names):
        row = {
            "layer": name,
            "distance": float(result.distances[i]),
            "calH": float(result.per_layer[i]),
            "argmax": int(result.argmax[i]),
            "contribution": float(contrib[i]),
            "share": float(contrib[i] / total) if total > 0 else 0.0,
        }
        if traces is not None:
            row["max_trace"] = float(traces.max[i])
            row["mean_trace"] = float(traces.mean[i])
        rows.append(row)
    return Report(rows=tuple(rows), measure=total, n=float(result.n), variant=result.variant)
