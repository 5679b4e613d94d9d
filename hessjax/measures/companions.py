"""Companion measures: distances from the anchor, per-layer traces, spectral norms, noise
stability.

References:
  Ju, Li & Zhang, ICML 2022 (arXiv:2206.02659), Corollary and Lemma.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessjax import estimators
from hessjax.hessian import block_hvp_fn, hvp
from hessjax.mapping import chunked_vmap
from hessjax.measures._checks import (
    check_static_int,
    displacement,
    is_concrete,
    num_examples,
    resolve_partition,
)
from hessjax.partition import Partition

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


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
    return jnp.sqrt(resolve_partition(params, partition).sq_norms(v))


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
    identity, which needs no Lanczos), vmapped over ``chunk_size`` examples, all in one
    compiled program. Unlike the estimators on a batch loss this stays one program on CPU:
    on MobileNetV2's later blocks (14 layers, 2 examples, 2 probes x 4 steps) it ran in 0.55x
    the time of its 16 per-example block products called one by one (layers and examples
    vmapped, the linearisation fused), and a Python loop over compiled steps took 2.8x.

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
      >>> round(float(t.max[0]), 4), round(float(t.mean[0]), 4)
      (9.0, 5.0)

    References:
      Ju, Li & Zhang, ICML 2022, Corollary; Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl.
      2017 (stochastic Lanczos quadrature).
    """
    part = resolve_partition(params, partition)
    num_examples(examples)
    num_probes = check_static_int(num_probes, "num_probes")
    num_iters = check_static_int(num_iters, "num_iters")
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
    part = resolve_partition(params, partition)
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

    Cost: ``2 * num_draws + 1`` loss evaluations, one linearisation of the gradient (a
    forward and a backward pass) and ``num_probes`` products through the linear map (as
    :func:`hessjax.hessian.hvp_fn`). Eagerly (nothing traced) they run from Python over
    jitted programs, each compiled once per loss function, partition and shapes (no retrace
    on a later call). Inside ``jit`` it is one traced computation (``lax.map`` over the draws
    and the probes, forward-over-reverse products: the same numbers to rounding). MobileNetV2
    at 32x32, batch 32, 4 draws and 4 probes on 2 busy CPU cores (load 3.3-3.6): first call
    40 s, compile included (it was 72-82 s as one program whose compile alone took 65 s);
    later calls 1.2-1.3 s, 1.2-1.4x its 4 products and 9 losses called one by one (2.4x as
    one program).

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
    part = resolve_partition(params, partition)
    num_draws = check_static_int(num_draws, "num_draws", 2)
    num_probes = check_static_int(num_probes, "num_probes")
    if is_concrete(sigma):
        s_arr = np.asarray(sigma)
        if (
            not np.issubdtype(s_arr.dtype, np.number)
            or not np.all(np.isfinite(s_arr))
            or np.any(s_arr < 0)
        ):
            raise ValueError(f"sigma: expected a finite noise scale >= 0, got {sigma!r}")
    if is_concrete((params, batch, key, sigma)):
        return _host_noise_stability(
            loss_fn, params, batch, key, sigma, part, num_draws, num_probes
        )
    return _noise_stability(
        loss_fn, params, batch, key, sigma, part, num_draws=num_draws, num_probes=num_probes
    )


def _split_flat(flat, params, partition):
    """``flat`` (one entry per parameter, leaf order) sliced into ``params``-shaped leaves;
    ``None`` for the leaves in no layer of ``partition``."""
    leaves, _ = jax.tree_util.tree_flatten(params)
    sizes = [int(np.size(x)) for x in leaves]
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    return [
        flat[a : a + m].reshape(jnp.shape(x)).astype(x.dtype) if g >= 0 else None
        for x, a, m, g in zip(leaves, starts, sizes, partition.leaf_layer, strict=True)
    ]


def _gaussian(key, params):
    """One Gaussian draw for all leaves, raveled (sliced into them by :func:`_shifted`): one
    random kernel, not one per leaf (which made the compile of MobileNetV2's 158 leaves take
    2 minutes)."""
    leaves = jax.tree_util.tree_leaves(params)
    n = sum(int(np.size(x)) for x in leaves)
    return jax.random.normal(key, (n,), jnp.result_type(*leaves))


def _shifted(loss_fn, params, batch, flat, scale, partition):
    """``loss(W + scale * U)`` with ``U`` the raveled ``flat`` on the partition's leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    noise = _split_flat(flat, params, partition)
    moved = [x if u is None else x + scale * u for x, u in zip(leaves, noise, strict=True)]
    return loss_fn(jax.tree_util.tree_unflatten(treedef, moved), batch)


def _pair_change(loss_fn, params, batch, key, sigma, base, partition):
    """``(loss(W + U) + loss(W - U)) / 2 - base`` for ``U = sigma * N(0, I)`` on the
    partition's leaves."""
    flat = _gaussian(key, params)
    plus = _shifted(loss_fn, params, batch, flat, sigma, partition)
    minus = _shifted(loss_fn, params, batch, flat, -sigma, partition)
    return 0.5 * (plus + minus) - base


def _rademacher(key, params, partition):
    """One Rademacher probe (:func:`hessjax.estimators.random_flat`) on the partition's
    leaves (0 elsewhere), as a list of leaves."""
    leaves = jax.tree_util.tree_leaves(params)
    n = sum(int(np.size(x)) for x in leaves)
    signs = estimators.random_flat(key, 1, n, jnp.result_type(*leaves))[0]
    return [
        jnp.zeros_like(x) if u is None else u
        for x, u in zip(leaves, _split_flat(signs, params, partition), strict=True)
    ]


def _form(z, hz, partition):
    on = [g >= 0 for g in partition.leaf_layer]
    return sum(jnp.vdot(a, b) for a, b, keep in zip(z, hz, on, strict=True) if keep)


def _probe_form(loss_fn, params, batch, key, partition):
    """``z^T H z`` for one Rademacher probe ``z`` (:func:`_rademacher`), one
    forward-over-reverse product (the traced path)."""
    z = _rademacher(key, params, partition)
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), z)
    return _form(z, jax.tree_util.tree_leaves(hvp(loss_fn, params, tree, batch)), partition)


def _layout(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef,) + tuple((jnp.shape(x), str(jnp.result_type(x))) for x in leaves)


_LINEAR: dict = {}  # (loss_fn, partition, layouts) -> (residuals, form), both jitted


def _linear_steps(loss_fn, params, batch, partition):
    """Two jitted programs for the eager path, memoised on the loss, partition and layouts:
    ``residuals(params, batch)``, the constants of the linearised gradient (one forward and
    backward pass, as :func:`hessjax.hessian.hvp_fn`), and ``form(consts, params, key)``, one
    probe's ``z^T H z`` through the linear map alone (1-1.5x a gradient instead of 2x). The
    linear map's jaxpr is recorded while ``residuals`` is traced; ``jax.jit`` retraces only
    for other layouts, which have their own entry, so the jaxpr always matches the
    constants (a fresh ``hvp_fn`` would retrace the linearisation every call: 4 s on
    MobileNetV2)."""
    key = (loss_fn, partition, _layout(params), _layout(batch))
    entry = _LINEAR.get(key)
    if entry is not None:
        return entry
    traced: dict = {}
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), params)

    def residuals(p, b):
        linear = jax.linearize(lambda q: jax.grad(loss_fn)(q, b), p)[1]
        closed = jax.make_jaxpr(linear)(like)
        traced["jaxpr"] = closed.jaxpr
        return list(closed.consts)

    def form(consts, p, k):
        z = _rademacher(k, p, partition)
        hz = jax.core.eval_jaxpr(traced["jaxpr"], consts, *z)
        return _form(z, hz, partition)

    entry = (jax.jit(residuals), jax.jit(form))
    if len(_LINEAR) >= 64:
        _LINEAR.clear()
    _LINEAR[key] = entry
    return entry


_jit_base = jax.jit(lambda loss_fn, params, batch: loss_fn(params, batch), static_argnums=0)
_jit_gaussian = jax.jit(_gaussian)
_jit_shifted = jax.jit(_shifted, static_argnames=("loss_fn", "partition"))


def _host_noise_stability(loss_fn, params, batch, key, sigma, part, num_draws, num_probes):
    """:func:`noise_stability` eagerly: Python loops over jitted programs, each compiled once
    per loss function, partition and shapes (no retrace on a later call): the base loss, the
    noise draw, the loss at shifted weights, the linearisation's residuals, one probe's
    ``z^T H z``."""
    draw_keys, probe_keys = _keys(key, num_draws, num_probes)
    sigma = jnp.asarray(sigma)
    base = _jit_base(loss_fn, params, batch)
    changes = []  # one loss program for both signs: half the compile of a pair program
    for d in range(num_draws):
        flat = _jit_gaussian(draw_keys[d], params)
        plus = _jit_shifted(loss_fn, params, batch, flat, sigma, partition=part)
        minus = _jit_shifted(loss_fn, params, batch, flat, -sigma, partition=part)
        changes.append(0.5 * (plus + minus) - base)
    residuals, form = _linear_steps(loss_fn, params, batch, part)
    consts = residuals(params, batch)
    forms = [form(consts, params, probe_keys[i]) for i in range(num_probes)]
    del consts
    return _summary(jnp.stack(changes), jnp.stack(forms), sigma)


@functools.partial(jax.jit, static_argnames=("num_draws", "num_probes"))
def _keys(key, num_draws, num_probes):
    draw_key, probe_key = jax.random.split(key)
    return jax.random.split(draw_key, num_draws), jax.random.split(probe_key, num_probes)


@functools.partial(jax.jit, static_argnames=("loss_fn", "partition", "num_draws", "num_probes"))
def _noise_stability(loss_fn, params, batch, key, sigma, partition, *, num_draws, num_probes):
    """:func:`noise_stability` as one traced computation (``lax.map`` over draws and probes:
    the same numbers as the host loop)."""
    draw_keys, probe_keys = _keys(key, num_draws, num_probes)
    base = loss_fn(params, batch)
    changes = jax.lax.map(
        lambda k: _pair_change(loss_fn, params, batch, k, sigma, base, partition), draw_keys
    )
    forms = jax.lax.map(lambda k: _probe_form(loss_fn, params, batch, k, partition), probe_keys)
    return _summary(changes, forms, jnp.asarray(sigma))


@jax.jit
def _summary(changes, forms, sigma):
    half_var = 0.5 * sigma**2
    num_probes = forms.shape[0]
    probe_std = jnp.std(forms, ddof=1) if num_probes > 1 else jnp.full((), jnp.nan, forms.dtype)
    return NoiseStability(
        value=jnp.mean(changes),
        stderr=jnp.std(changes, ddof=1) / jnp.sqrt(changes.shape[0]),
        predicted=half_var * jnp.mean(forms),
        predicted_stderr=half_var * probe_std / np.sqrt(num_probes),
    )
