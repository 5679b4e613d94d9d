"""Optax transforms for robust fine-tuning: projection onto anchor balls and the anchor penalty.

The paper's algorithm (Ju, Li & Zhang 2022, section 3) keeps every fine-tuned layer W_i within
a ball around its pretrained value W_i^(s), projecting after EVERY optimizer step:

    t = W - W^(s);   W <- W^(s) + t / max(1, ||t|| / D_i).

Here that projection is an optax transform, :func:`project_to_anchor`, placed LAST in a chain so
that ``optax.apply_updates(params, updates)`` lands inside every ball. :func:`anchor_penalty` is
the L2-SP variant (Li et al. 2018), placed before the optimizer's scaling like
``optax.add_decayed_weights``. :func:`layerwise_radii` builds the paper's depth-dependent radii.

Per-leaf values (radii, strengths) are given as a scalar (every leaf); a pytree matched to params
by path names (a dict works for an ``nnx.State``): a leaf takes the value at its own path or its
nearest ancestor's, and is free where there is none or the value is ``None``; or a callable of
the leaf's path name (:func:`hessjax.partition.path_name`, e.g. ``"layer3/conv1/kernel"``)
returning a value or ``None``.
The anchor lives in the transform's state (``None`` at free leaves), never in a closure.

BatchNorm. The reference code clips the effective BatchNorm scale gamma / sqrt(var) elementwise
to [-D, D] around its pretrained value. In flax the scale gamma is an ``nnx.Param`` while the
running variance is an ``nnx.BatchStat`` that optax never sees. With the statistics frozen (eval
mode), clipping gamma / sqrt(var + eps) to radius D equals clipping gamma elementwise to radius
D * sqrt(var + eps): use ``project_to_anchor(radii, norm="elementwise")`` on the ``scale`` leaves
with that per-channel radius array (or a plain D to clip gamma itself), chained with a second
``project_to_anchor`` for the weights. Each transform stores the anchor only for its own leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hessjax._util import concrete as _concrete
from hessjax.partition import path_name

PyTree = Any
PerLeaf = Any  # scalar | pytree prefix of params with None leaves | Callable[[str], value | None]

_NORMS = ("frobenius", "inf_op", "elementwise")

__all__ = [
    "AnchorPenaltyState",
    "ProjectToAnchorState",
    "anchor_penalty",
    "layerwise_radii",
    "project_to_anchor",
]


class ProjectToAnchorState(NamedTuple):
    """State of :func:`project_to_anchor`: the anchor (params-shaped, ``None`` at free leaves)."""

    anchor: PyTree


class AnchorPenaltyState(NamedTuple):
    """State of :func:`anchor_penalty`: the anchor (params-shaped, ``None`` at free leaves)."""

    anchor: PyTree


# --------------------------------------------------------------------------------------------
# helpers


def _unbox(tree: PyTree) -> PyTree:
    """Replace ``flax.nnx.Variable`` leaves by their arrays (``nnx.Optimizer`` inits with them)."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return tree
    is_var = lambda x: isinstance(x, nnx.Variable)
    return jax.tree.map(lambda x: x.get_value() if is_var(x) else x, tree, is_leaf=is_var)


def _per_leaf(spec: PerLeaf, params: PyTree, argname: str) -> list[Any]:
    """Values of ``spec`` for each leaf of ``params``, in ``jax.tree_util`` leaf order.

    A pytree spec is matched by path names, not by pytree type, so a plain dict works for an
    ``nnx.State``: each leaf takes the value of the longest spec path that is the leaf's path or
    an ancestor of it; leaves that no spec path covers are free (``None``).
    """
    named = [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    if callable(spec):
        return [spec(name) for name, _ in named]
    entries = [
        (path_name(p), v)
        for p, v in jax.tree_util.tree_flatten_with_path(spec, is_leaf=lambda x: x is None)[0]
    ]
    covers = lambda prefix, name: prefix == "" or name == prefix or name.startswith(prefix + "/")
    out: list[Any] = []
    used: set[str] = set()
    for name, _ in named:
        best = max(
            (e for e in entries if covers(e[0], name)), key=lambda e: len(e[0]), default=None
        )
        out.append(None if best is None else best[1])
        used.update(e[0] for e in entries if covers(e[0], name))
    masked = any(
        isinstance(x, optax.MaskedNode)
        for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    )
    unused = [e[0] for e in entries if e[0] not in used]
    if unused and not masked:  # under optax.masked the masked-out leaves are absent
        raise ValueError(
            f"{argname}: the paths {unused[:5]} name no leaf of params (leaves: "
            f"{[n for n, _ in named][:8]}...); expected a scalar, a pytree whose paths are "
            "params paths or their ancestors, or a callable of the path name"
        )
    return out


def _check_nonnegative(values: Sequence[Any], names: Sequence[str], argname: str) -> None:
    for value, name in zip(values, names, strict=True):
        if value is None:
            continue
        arr = _concrete(value)
        if arr is None:
            continue
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
            raise ValueError(f"{argname}: expected finite numbers, got {value!r} for {name!r}")
        if np.any(arr < 0):
            raise ValueError(f"{argname}: expected values >= 0, got {value!r} for {name!r}")


def _anchor_tree(params: PyTree, anchor: PyTree | None, values: list[Any], argname: str):
    """A copy of ``anchor`` (default ``params``) with ``None`` where ``values`` is None."""
    source = params if anchor is None else _unbox(anchor)
    if anchor is not None:
        if jax.tree.structure(source) != jax.tree.structure(params):
            raise ValueError(
                f"anchor: expected the structure of params {jax.tree.structure(params)}, "
                f"got {jax.tree.structure(source)}"
            )
        for (path, a), p in zip(
            jax.tree_util.tree_flatten_with_path(source)[0], jax.tree.leaves(params), strict=True
        ):
            if jnp.shape(a) != jnp.shape(p):
                raise ValueError(
                    f"anchor: leaf {path_name(path)!r} has shape {jnp.shape(a)}, "
                    f"expected the shape of params {jnp.shape(p)}"
                )
    leaves, treedef = jax.tree.flatten(source)
    stored = [
        None if v is None else jnp.array(a, copy=True) for a, v in zip(leaves, values, strict=True)
    ]
    return jax.tree.unflatten(treedef, stored)


def _flat_anchor(state_anchor: PyTree, num_leaves: int, name: str) -> list[Any]:
    anchors = jax.tree.leaves(state_anchor, is_leaf=lambda x: x is None)
    if len(anchors) != num_leaves:
        raise ValueError(
            f"{name}: params have {num_leaves} leaves but the anchor in the state has "
            f"{len(anchors)}; was the transform initialised with these params?"
        )
    return anchors


def _flat_params(updates: PyTree, params: PyTree | None, name: str):
    if params is None:
        raise ValueError(f"{name}: update needs params (call tx.update(updates, state, params))")
    params = _unbox(params)
    u_leaves, treedef = jax.tree.flatten(updates)
    p_leaves, p_treedef = jax.tree.flatten(params)
    if treedef != p_treedef:
        raise ValueError(f"params: expected the structure of updates {treedef}, got {p_treedef}")
    return u_leaves, p_leaves, treedef


def _project_leaf(u: jax.Array, p: jax.Array, a: jax.Array, radius: Any, norm: str) -> jax.Array:
    """The update that moves ``p`` to the projection of ``p + u`` onto the ball around ``a``."""
    dtype = jnp.result_type(p, u, jnp.float32)  # norms in at least float32
    t = (p + u).astype(dtype) - a.astype(dtype)
    r = jnp.asarray(radius, dtype)
    if norm == "elementwise":
        inside = jnp.abs(t) <= r
        target = a.astype(dtype) + jnp.clip(t, -r, r)
    else:
        if norm == "frobenius":
            n = jnp.sqrt(jnp.sum(jnp.square(t)))
        else:  # inf_op: L1 norm of each output unit (last axis of a flax kernel)
            n = jnp.sum(jnp.abs(t), axis=tuple(range(t.ndim - 1)), keepdims=True)
        inside = n <= r
        scale = r / jnp.where(inside, 1.0, n)
        target = a.astype(dtype) + t * jnp.where(inside, 1.0, scale)
    return jnp.where(inside, u, (target - p.astype(dtype)).astype(u.dtype))


# --------------------------------------------------------------------------------------------
# public


def _anchored_transform(name, per_leaf, what, anchor, state_cls, leaf_fn, value_shapes=None):
    """The shared shape of the anchor transforms: per-leaf values, the anchor in the state.

    ``leaf_fn(update, param, anchor, value)`` maps one constrained leaf's update; leaves whose
    value is ``None`` (free) keep their update. ``value_shapes(param_shape)``, when given,
    lists the value shapes that have a meaning for a leaf of that shape.
    """

    def init_fn(params):
        params = _unbox(params)
        values = _per_leaf(per_leaf, params, what)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        names = [path_name(p) for p, _ in flat]
        _check_nonnegative(values, names, what)
        if value_shapes is not None:
            for lname, (_, p), v in zip(names, flat, values, strict=True):
                ok = value_shapes(jnp.shape(p))
                if v is not None and jnp.shape(v) not in ok:
                    raise ValueError(
                        f"{what}: the value for {lname!r} has shape {jnp.shape(v)}; for a leaf "
                        f"of shape {jnp.shape(p)} this norm takes shapes {sorted(set(ok))}"
                    )
        return state_cls(anchor=_anchor_tree(params, anchor, values, "anchor"))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        u_leaves, p_leaves, treedef = _flat_params(updates, params, name)
        values = _per_leaf(per_leaf, jax.tree.unflatten(treedef, p_leaves), what)
        anchors = _flat_anchor(state.anchor, len(u_leaves), name)
        out = [
            u if value is None or a is None else leaf_fn(u, p, a, value)
            for u, p, a, value in zip(u_leaves, p_leaves, anchors, values, strict=True)
        ]
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def project_to_anchor(
    radii: PerLeaf,
    *,
    norm: str = "frobenius",
    anchor: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Project every constrained layer onto a ball around its anchor; place LAST in a chain.

    For each leaf W with radius D, let t = (params + updates) - anchor. The returned updates
    move params to

        frobenius:    anchor + t / max(1, ||t||_F / D)
        inf_op:       each output unit o (last axis, flax's (..., in, out) kernel layout)
                      scaled separately: t[..., o] / max(1, ||t[..., o]||_1 / D), so that
                      ||t||_{inf->inf} = max_o ||t[..., o]||_1 <= D
        elementwise:  anchor + clip(t, -D, D)  (BatchNorm scales; D may be an array)

    Inside the ball the updates are returned unchanged (bit for bit), so the projection is the
    identity there and idempotent. Leaves with radius ``None`` are untouched. The anchor is a
    copy of ``params`` at ``init`` unless given, and lives in the state (``None`` at free
    leaves, so two chained projections do not both store every leaf).

    Cost: one pass over the constrained leaves (a norm and an axpy each); memory: one copy of
    the constrained leaves (the anchor).

    Args:
      radii: the radius D of each leaf: a scalar (every leaf), a pytree matched by path names
        (``None`` or absent: free; a value at an inner node covers its subtree), or a callable
        ``path_name -> radius | None``.
        Radii may be traced arrays; concrete ones must be finite and >= 0. For ``inf_op`` and
        ``elementwise`` a radius may be an array broadcastable to the per-unit norms.
      norm: ``"frobenius"`` (the paper's runs), ``"inf_op"`` or ``"elementwise"``.
      anchor: the centre of the balls, a pytree like params; default: params at ``init``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires ``params``.

    Raises:
      ValueError: unknown ``norm``; negative or non-finite radius; ``radii`` or ``anchor`` not
        matching params; ``update`` called without params.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
      >>> tx = optax.chain(optax.sgd(1.0), project_to_anchor({"w": 0.5, "b": None}))
      >>> state = tx.init(params)
      >>> grads = {"w": -jnp.ones(3), "b": -jnp.ones(2)}
      >>> updates, state = tx.update(grads, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> round(float(jnp.linalg.norm(new["w"])), 4), new["b"].tolist()
      (0.5, [1.0, 1.0])

    References:
      Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based
      Generalization Guarantees", ICML 2022, section 3 (layerwise projection after every step;
      reference code VirtuosoResearch/Robust-Fine-Tuning, FrobeniusConstraint and
      LInfLipschitzConstraint). Gouk et al., "Distance-Based Regularisation of Deep Networks
      for Fine-Tuning", ICLR 2021 (the projection and the inf-op norm).
    """
    if norm not in _NORMS:
        raise ValueError(f"norm: expected one of {_NORMS}, got {norm!r}")
    return _anchored_transform(
        "project_to_anchor",
        radii,
        "radii",
        anchor,
        ProjectToAnchorState,
        lambda u, p, a, r: _project_leaf(u, p, a, r, norm),
        value_shapes=lambda shape: _RADIUS_SHAPES[norm](shape),
    )


# The radius shapes each norm gives a meaning to: one ball per leaf (Frobenius), one per
# output unit (inf-op: the last axis of a flax kernel), one interval per entry (elementwise).
_RADIUS_SHAPES = {
    "frobenius": lambda shape: [()],
    "inf_op": lambda shape: [(), (shape[-1],) if shape else ()],
    "elementwise": lambda shape: [(), tuple(shape)] + ([(shape[-1],)] if shape else []),
}


def anchor_penalty(
    strength: PerLeaf,
    *,
    anchor: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Add ``strength * (params - anchor)`` to the updates: the L2-SP penalty as a transform.

    The added term is the gradient of (strength / 2) * ||W - W^(s)||_F^2 per leaf, so the
    paper's penalty lambda * ||W - W^(s)||_F^2 is ``strength = 2 * lambda``. Place it before
    the optimizer's scaling (like ``optax.add_decayed_weights``): with ``sgd`` this is exactly
    L2-SP; with ``adam`` the penalty is preconditioned like the gradient; chaining it after
    ``optax.scale_by_adam`` gives the decoupled (AdamW-style) variant. Leaves with strength
    ``None`` are untouched.

    Cost: one axpy per penalised leaf; memory: one copy of the penalised leaves (the anchor).

    Args:
      strength: per-leaf strength: a scalar, a pytree matched by path names (``None`` or
        absent: free), or a callable ``path_name -> strength | None``. May be traced;
        concrete values must be finite and >= 0.
      anchor: the pretrained weights, a pytree like params; default: params at ``init``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires ``params``.

    Raises:
      ValueError: negative or non-finite strength; ``strength`` or ``anchor`` not matching
        params; ``update`` called without params.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = anchor_penalty(0.1, anchor={"w": jnp.zeros(2)})
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
      >>> [round(x, 3) for x in updates["w"].tolist()]
      [0.1, -0.2]

    References:
      Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with
      Convolutional Networks", ICML 2018 (L2-SP). Ju, Li & Zhang, ICML 2022, section 3 (the
      penalty variant of the robust algorithm).
    """
    return _anchored_transform(
        "anchor_penalty",
        strength,
        "strength",
        anchor,
        AnchorPenaltyState,
        lambda u, p, a, s: (u + jnp.asarray(s, u.dtype) * (p - a).astype(u.dtype)).astype(u.dtype),
    )


def layerwise_radii(
    params: PyTree,
    base: Any,
    *,
    scale_factor: Any,
    depth_fn: Callable[[str], int | None],
    head_radius: Any = None,
    head: str | Sequence[str] | Callable[[str], bool] = ("head", "fc", "pred_head", "classifier"),
) -> PyTree:
    """Radii that grow geometrically with depth: D * s^depth, and the head with its own radius.

        radius(leaf) = head_radius               if the leaf is a head kernel (ndim >= 2)
                     = base * scale_factor ** d  if d = depth_fn(path_name) is not None
                     = None (free)               otherwise

    ``depth_fn`` is the architecture's convention (each model module owns one, and
    :func:`hessjax.models.model_spec` returns it with the model):
    :func:`hessjax.resnet_stage_depth` is the reference code (ResNet stages layer1, layer2: D;
    layer3: D*s; layer4: D*s^2; stem, biases and BatchNorm free),
    :func:`hessjax.mobilenet_v2_stage_depth` and :func:`hessjax.bert_layer_depth` the same idea
    for MobileNetV2 and BERT. The head is projected around
    its own anchor (its initial value, zero for a zero-initialised head, as in the reference).

    Cost: one pass over the leaf names; no arrays are allocated.

    Args:
      params: the params pytree (a dict or an ``nnx.State``).
      base: D, may be a traced array.
      scale_factor: s, may be a traced array.
      depth_fn: ``path_name -> int | None``.
      head_radius: D_head; ``None`` leaves the head free.
      head: a path component (or several) naming the head, or a predicate of the path name.

    Returns:
      A pytree like ``params`` with a radius or ``None`` at each leaf, for
      :func:`project_to_anchor` (``nnx.State`` params give an ``nnx.State``).

    Raises:
      TypeError: ``depth_fn`` returns something other than an int or None.

    Example:
      >>> import jax.numpy as jnp
      >>> from hessjax.models import resnet_stage_depth
      >>> params = {"layer1": {"kernel": jnp.ones((3, 3))}, "layer4": {"kernel": jnp.ones(2)},
      ...           "fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> r = layerwise_radii(params, 1.0, scale_factor=2.0, depth_fn=resnet_stage_depth,
      ...                     head_radius=10.0)
      >>> r["layer1"]["kernel"], r["layer4"]["kernel"], r["fc"]["kernel"], r["fc"]["bias"]
      (1.0, 4.0, 10.0, None)

    References:
      Ju, Li & Zhang, ICML 2022, section 3 (radii growing with depth).
    """
    for argname, value in (("base", base), ("scale_factor", scale_factor),
                           ("head_radius", head_radius)):  # fmt: skip
        if value is not None:
            _check_nonnegative([value], [argname], argname)
    if callable(head):
        is_head = head
    else:
        heads = (head,) if isinstance(head, str) else tuple(head)
        is_head = lambda n: any(part in heads for part in n.split("/"))

    def radius(path, leaf):
        name = path_name(path)
        if is_head(name):
            return head_radius if jnp.ndim(leaf) >= 2 else None
        depth = depth_fn(name)
        if depth is None:
            return None
        if not isinstance(depth, int | np.integer):
            raise TypeError(f"depth_fn: expected an int or None, got {depth!r} for {name!r}")
        return base * scale_factor ** int(depth)

    return jax.tree_util.tree_map_with_path(radius, _unbox(params))
