"""The paper's Hessian distance measure ``sum_i sqrt(calH_i / n)`` (canonical and reference).

References:
  Ju, Li & Zhang, ICML 2022 (arXiv:2206.02659), Theorem 2.1; reference code
  VirtuosoResearch/Robust-Fine-Tuning.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessjax.hessian import block_forms_fn, block_vhv_fn, hvp
from hessjax.mapping import MapFn, check_map_fn, place
from hessjax.measures import screening
from hessjax.measures._checks import (
    check_finite_losses,
    check_n,
    check_static_int,
    displacement,
    num_examples,
    resolve_partition,
)
from hessjax.partition import Partition

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

VARIANTS = ("canonical", "reference")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["per_layer", "argmax", "distances", "n", "losses", "refined", "num_refined"],
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
      refined: with screening (canonical, the default), for each layer the number of
        examples whose Lanczos value had to be computed for that layer, shape ``(L,)``;
        ``None`` without screening.
      num_refined: with screening, the number of distinct examples refined (each costs as
        much as one example of brute force); ``None`` without screening.
    """

    names: tuple[str, ...]
    variant: str
    per_layer: jax.Array
    argmax: jax.Array
    distances: jax.Array
    n: jax.Array
    losses: jax.Array
    refined: jax.Array | None = None
    num_refined: jax.Array | None = None

    @property
    def contributions(self) -> jax.Array:
        """``sqrt(max(calH_i, 0) / n)`` per layer, shape ``(L,)``."""
        return jnp.sqrt(jnp.maximum(self.per_layer, 0.0) / self.n)

    @property
    def measure(self) -> jax.Array:
        """``sum_i sqrt(calH_i / n)`` (negative ``calH_i`` of the reference variant count 0)."""
        return jnp.sum(self.contributions)


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
    chunk_size: int | None = 1,
    layer_chunk_size: int | None = None,
    variant: str = "canonical",
    batch_size: int = 4,
    map_fn: MapFn | None = None,
    screening: bool = True,
    screen_chunk_size: int | None = 16,
    psd_blocks: bool = False,
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

    Screening (``screening=True``, the default, canonical variant) gives the SAME result as
    brute force (``screening=False``: Lanczos for every example, kept as the reference),
    faster when the brackets rule examples out (see the measured caveat below). For every
    example and layer one block product with the shared ``v_i`` (batched over
    ``screen_chunk_size`` examples, :func:`hessjax.hessian.block_forms_fn`) brackets the
    ``num_iters``-step quadrature value ``Q``::

        max(v_i^T H_i v_i, 0)  <=  Q  <=  ||v_i|| ||H_i v_i||

    (Gauss quadrature with weights ``w_j >= 0``, ``sum w_j = 1``, ``sum w_j theta_j =
    q^T H q`` and ``sum w_j theta_j^2 = ||H q||^2``, ``q = v_i / ||v_i||``: Jensen for the
    lower bound, Cauchy-Schwarz for the upper; the proof is in
    :mod:`hessjax.measures.screening`). Lanczos then runs, exactly as in brute force and for
    all layers at once, only on examples whose upper bound (with a relative slack of
    ``eps ** 0.25`` for rounding) reaches the best value found so far for some layer, the
    highest lower bounds first, until none is left. Examples never refined cannot be the
    maximiser or tie with it, so ``per_layer`` and ``argmax`` equal brute force (to float
    tolerance). ``refined`` and ``num_refined`` record the work done.

    Cost (canonical, brute force): per example one linearisation plus ``num_iters`` block
    products of ``L`` Hessian-vector products each, i.e. ``L * num_iters`` HVPs per example,
    vmapped over ``chunk_size`` examples (and ``layer_chunk_size`` layers) at a time. Memory:
    about ``chunk_size * (L + num_iters)`` params-sized vectors. Reference: one HVP per
    batch. Screening: ``L`` HVPs per example batched over examples (on CPU about 10x cheaper
    per HVP than Lanczos's per-example products; MobileNetV2, 53 layers: 0.019 s vs 0.196 s
    per example), plus the brute-force cost of the ``num_refined`` examples refined; memory
    ``screen_chunk_size`` examples' activations. The compiled screen unrolls the layers
    (compile time grows with ``L``). Measured caveat (2 CPU cores, MobileNetV2 at 32x32, all
    53 layers displaced at random, 64 examples, ``num_iters=8``): the first-moment brackets
    ruled out few examples (27-64 of 64 refined per layer; the upper bound is loose by about
    ``sqrt(dim / rank)`` for an isotropic ``v``), and the unrolled program took 8.5 minutes
    to compile, so screening was not faster there; it pays off when a few examples dominate.

    PSD blocks (``psd_blocks=True``, implies screening): for a network that is piecewise
    linear in each layer's weights (ReLU / ReLU6 / leaky ReLU, max or average pooling,
    residual sums, BatchNorm in eval mode, linear heads: MobileNetV2, ResNets, the
    :class:`~hessjax.models.TinyCNN`) under a loss convex in the logits (cross-entropy), each
    example's layer block is exactly its Gauss-Newton part ``J_i^T A J_i`` (the second
    derivative of the logits with respect to one layer's weights vanishes between the kinks),
    hence positive semi-definite: ``H_i^+ = H_i`` and every Ritz value is ``>= 0``, so the
    ``num_iters``-step quadrature equals ``v_i^T H_i v_i`` for every ``num_iters``. The value is
    then ``v_i^T H_i v_i`` of every example, computed forward-over-forward with ``v`` shared
    (:func:`hessjax.hessian.block_vhv_fn`: no reverse pass, batched over
    ``screen_chunk_size`` examples), and Lanczos runs only on each layer's maximiser
    (one program for all layers: the layer is a 0/1 mask of the tangent), as a check done
    outside ``jit`` (under ``jit`` the value is returned unchecked): if its quadrature differs
    from ``v_i^T H_i v_i`` by more than the rounding slack, the block is not PSD and a ValueError
    names the layer (use ``psd_blocks=False``; smooth activations such as tanh, GELU, softmax
    attention or LayerNorm make the blocks indefinite). Cost: two forward-mode passes per
    example and layer (MobileNetV2 at 32x32, 53 layers, 2 CPU cores: 0.013 s per example, the
    program compiles in about 70 s) plus one brute-force example per layer for the check.

    Sharded (``map_fn=hessjax.sharding.mesh_map(mesh)``): the examples (canonical) or batches
    (reference) are split over the mesh's data axis (:func:`hessjax.sharding.sharded_map`:
    padded to a multiple of the device count ``D``, the padding dropped before any
    reduction), params and ``v`` are replicated (``map_fn.place``), and each device runs
    ``ceil(m / D)`` examples, ``chunk_size`` at a time. The max and argmax then run over all
    ``m`` true examples of all shards, so the result equals the single-device one (to float
    tolerance) for any ``m``.

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
        all. The default 1 runs examples one after another (layers still vmapped): on CPU
        this was several times faster for conv nets than also vmapping examples (MobileNetV2
        at 32x32, 14 layers: 0.44 s vs 3 s per example with chunks of 8), since vmapping both
        examples and per-layer kernel tangents makes XLA emit batched-kernel convolutions.
        On accelerators, larger chunks may batch better: benchmark.
      layer_chunk_size: layers whose block products are vmapped at once; ``None``: all.
      variant: ``"canonical"`` or ``"reference"``.
      batch_size: examples per batch for the reference variant (the reference code uses 4).
      map_fn: keyword-only, the map over examples (:mod:`hessjax.mapping`); ``None``
        (default): :func:`hessjax.chunked_vmap` on one device. ``hessjax.sharding.mesh_map(mesh)``
        splits the examples over a device mesh; with screening both the screen and each
        refinement round are split (a round refines ``chunk_size`` examples per device).
      screening: keyword-only (canonical variant): bracket every example from one batched
        block product and run Lanczos only where needed (True, default), or run Lanczos on
        every example (False, the brute-force reference). Same result either way.
      screen_chunk_size: keyword-only, examples vmapped at once in the screen (``None``:
        all); memory grows with it.
      psd_blocks: keyword-only (canonical variant): the layer blocks are positive
        semi-definite (see "PSD blocks" above); the value is ``v_i^T H_i v_i``, checked at
        each layer's maximiser against Lanczos.

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
    part = resolve_partition(params, partition)
    m = num_examples(examples)
    n_arr = check_n(n)
    num_iters = check_static_int(num_iters, "num_iters")
    batch_size = check_static_int(batch_size, "batch_size")
    if chunk_size is not None:
        check_static_int(chunk_size, "chunk_size")
    if layer_chunk_size is not None:
        check_static_int(layer_chunk_size, "layer_chunk_size")
    if screen_chunk_size is not None:
        check_static_int(screen_chunk_size, "screen_chunk_size")
    for flag, value in (("screening", screening), ("psd_blocks", psd_blocks)):
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
    if psd_blocks and variant != "canonical":
        raise ValueError(f"psd_blocks: only the canonical variant has PSD blocks, got {variant!r}")
    map_fn = check_map_fn(map_fn)
    params, v = place(map_fn, (params, v))
    refined = num_refined = None
    if variant == "canonical":
        kwargs = dict(
            num_iters=num_iters,
            truncate=bool(truncate),
            chunk_size=chunk_size,
            layer_chunk_size=layer_chunk_size,
            map_fn=map_fn,
        )
        if psd_blocks:
            per_layer, argmax, losses, refined, num_refined = _psd_path(
                loss_fn, params, v, examples, part, num_iters=num_iters,
                truncate=bool(truncate), screen_chunk_size=screen_chunk_size, map_fn=map_fn,
            )  # fmt: skip
        elif screening:
            per_layer, argmax, losses, refined, num_refined = _screened(
                loss_fn, params, v, examples, part, screen_chunk_size=screen_chunk_size, **kwargs
            )
        else:
            per_layer, argmax, losses = _canonical(loss_fn, params, v, examples, part, **kwargs)
        check_finite_losses(losses, "examples")
    else:
        per_layer, argmax, losses = _reference(
            loss_fn,
            params,
            v,
            examples,
            part,
            m=m,
            batch_size=batch_size,
            chunk_size=chunk_size,
            map_fn=map_fn,
        )
        check_finite_losses(losses, "batches")
    return HessianDistance(
        names=part.names,
        variant=variant,
        per_layer=per_layer,
        argmax=argmax,
        distances=jnp.sqrt(part.sq_norms(v)),
        n=n_arr,
        losses=losses,
        refined=refined,
        num_refined=num_refined,
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
        "map_fn",
    ),
)
def _canonical(
    loss_fn,
    params,
    v,
    examples,
    partition,
    *,
    num_iters,
    truncate,
    chunk_size,
    layer_chunk_size,
    map_fn=None,
):
    v = partition.restrict(v)
    one = screening.example_value_fn(
        loss_fn,
        params,
        v,
        partition,
        num_iters=num_iters,
        truncate=truncate,
        layer_chunk_size=layer_chunk_size,
    )
    values, losses = _map_rows(one, examples, chunk_size, map_fn)
    return jnp.max(values, axis=0), jnp.argmax(values, axis=0), losses


@functools.partial(
    jax.jit,
    static_argnames=(
        "loss_fn",
        "partition",
        "num_iters",
        "truncate",
        "chunk_size",
        "layer_chunk_size",
        "screen_chunk_size",
        "map_fn",
    ),
)
def _screened(
    loss_fn,
    params,
    v,
    examples,
    partition,
    *,
    num_iters,
    truncate,
    chunk_size,
    layer_chunk_size,
    screen_chunk_size,
    map_fn=None,
):
    v = partition.restrict(v)
    forms = _map_rows(
        block_forms_fn(loss_fn, params, v, partition), examples, screen_chunk_size, map_fn
    )
    v_sq = partition.sq_norms(v)
    lower, upper = screening.brackets(forms, v_sq, truncate=truncate)
    if not truncate:  # the value is max(v^T H v, 0) = lower itself: nothing to refine
        zeros = jnp.zeros((partition.num_layers,), jnp.int32)
        return jnp.max(lower, axis=0), jnp.argmax(lower, axis=0), forms.losses, zeros, zeros[0]
    m = lower.shape[0]
    per_layer, argmax, refined, num_refined = screening.refine_layers(
        loss_fn,
        params,
        v,
        partition,
        examples,
        lower,
        upper,
        num_iters=min(num_iters, max(partition.sizes)),
        refine_size=screening.refine_size_for(screen_chunk_size, m, map_fn),
        rtol=screening.default_rtol(lower.dtype),
        map_fn=map_fn,
    )
    return per_layer, argmax, forms.losses, refined, num_refined


@functools.partial(jax.jit, static_argnames=("loss_fn", "partition", "chunk_size", "map_fn"))
def _block_vhv(loss_fn, params, v, examples, partition, *, chunk_size, map_fn=None):
    """``(v_i^T H_i v_i, loss)`` of every example and layer, forward-over-forward (one
    program)."""
    return _map_rows(block_vhv_fn(loss_fn, params, v, partition), examples, chunk_size, map_fn)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iters"))
def _masked_quadrature(loss_fn, params, v, mask, example, *, num_iters):
    """One example's ``num_iters``-step ``q^T H_i^+ q`` for the layer that ``mask`` (0/1, like
    params) selects, and ``||v_i|| ||H_i v_i||`` (the scale of its rounding error): Lanczos on
    ``w -> mask * H (mask * w)`` from ``mask * v``. Every layer uses the same program (the
    mask is an input), so it compiles once for all layers."""
    from hessjax.estimators import positive_quadratic_form
    from hessjax.hessian import hvp_fn

    matvec = hvp_fn(loss_fn, params, example)
    masked = lambda w: jax.tree_util.tree_map(jnp.multiply, mask, matvec(
        jax.tree_util.tree_map(jnp.multiply, mask, w)))  # fmt: skip
    start = jax.tree_util.tree_map(jnp.multiply, mask, v)
    sq = lambda t: sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(t))
    scale = jnp.sqrt(sq(start) * sq(masked(start)))
    return positive_quadratic_form(masked, start, num_iters=num_iters), scale


def _psd_path(loss_fn, params, v, examples, partition, *, num_iters, truncate,
              screen_chunk_size, map_fn):  # fmt: skip
    """``psd_blocks=True``: the value is ``max(v_i^T H_i v_i, 0)`` (forward-over-forward);
    checked at each layer's maximiser by Lanczos (outside ``jit``), which must equal it up
    to rounding."""
    v = partition.restrict(v)
    vhv, losses = _block_vhv(loss_fn, params, v, examples, partition,
                             chunk_size=screen_chunk_size, map_fn=map_fn)  # fmt: skip
    lower = jnp.maximum(vhv, 0.0)
    argmax = jnp.argmax(lower, axis=0)
    per_layer = jnp.max(lower, axis=0)
    num_layers = partition.num_layers
    refined = jnp.zeros((num_layers,), jnp.int32)
    concrete = not any(isinstance(x, jax.core.Tracer)
                       for x in jax.tree_util.tree_leaves((params, v, examples)))  # fmt: skip
    if not (truncate and concrete):  # under jit: no host-side check (the value stands)
        return per_layer, argmax, losses, refined, jnp.asarray(0, jnp.int32)
    k = min(num_iters, max(partition.sizes))
    active = np.asarray(partition.sq_norms(v)) > 0
    arg = np.asarray(argmax)
    dtype = lower.dtype
    rtol = screening.default_rtol(dtype)
    eps, tiny = float(np.finfo(dtype).eps), float(np.finfo(dtype).tiny)
    values, bad = np.asarray(per_layer).copy(), []
    ones = jax.tree_util.tree_map(jnp.ones_like, v)
    for i in np.flatnonzero(active):
        mask = partition.restrict(ones, int(i))
        example = jax.tree_util.tree_map(lambda x, j=int(arg[i]): x[j], examples)
        q, scale = _masked_quadrature(loss_fn, params, v, mask, example, num_iters=k)
        q, slack, size = float(q), np.sqrt(eps) * float(scale), max(float(q), tiny)
        if abs(q - values[i]) - slack > rtol * size:
            bad.append((partition.names[i], (q - values[i]) / size))
        values[i] = q
    if bad:
        raise ValueError(
            "psd_blocks: the layer block is not positive semi-definite at its maximiser for "
            + ", ".join(f"{name!r} (quadrature differs from v^T H v by {100 * g:.3g}%)"
                        for name, g in bad[:5])
            + "; the network is not piecewise linear in these layers' weights: use "
            "psd_blocks=False"
        )  # fmt: skip
    refined = jnp.asarray(active.astype(np.int32))
    num_refined = jnp.asarray(len({int(arg[i]) for i in np.flatnonzero(active)}), jnp.int32)
    return jnp.asarray(values, dtype), argmax, losses, refined, num_refined


_map_rows = screening.map_rows


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "partition", "m", "batch_size", "chunk_size", "map_fn")
)
def _reference(loss_fn, params, v, examples, partition, *, m, batch_size, chunk_size, map_fn=None):
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

    values, losses = _map_rows(one, (batches, weights), chunk_size, map_fn)
    return jnp.max(values, axis=0), jnp.argmax(values, axis=0), losses
