"""Hessian-vector products over params pytrees.

All products are forward-over-reverse: ``H v = d/dt grad L(params + t v) |_{t=0}``, i.e.
``jax.jvp`` of ``jax.grad``. On CPU this costs about 2x a gradient (reverse-over-reverse costs
about 7x). :func:`hvp_fn` linearises the gradient once (``jax.linearize``) so that repeated
products at the same point re-use the forward pass; :func:`batch_matvec` applies any matvec to a
stack of probes, vmapped within chunks of ``chunk_size`` and ``lax.map``-ped across chunks so that
memory stays bounded; :func:`block_hvp` gives the diagonal per-layer blocks ``H_ii v_i`` of every
layer of a :class:`~hessjax.partition.Partition` at once, without forming ``H``.

Conventions: ``loss_fn(params, *args)`` returns a real scalar; ``v`` has exactly the tree
structure, shapes and dtypes of ``params``; a "matvec" is a function ``v -> H v``.

References:
  Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
  Ju, Li & Zhang, ICML 2022 (arXiv:2206.02659).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessjax.mapping import chunked_vmap, compile_once, num_rows
from hessjax.partition import Partition, path_name

PyTree = Any
Matvec = Callable[[PyTree], PyTree]


# --------------------------------------------------------------------------- validation
def check_like(params: PyTree, v: PyTree, name: str = "v", *, batch_dims: int = 0) -> None:
    """Raises if ``v`` does not have the tree structure, shapes and dtypes of ``params``.

    Args:
      params: the reference pytree.
      v: the pytree to check.
      name: the argument name used in error messages.
      batch_dims: number of leading (probe) axes every leaf of ``v`` has in front of the
        params shape; these must agree across leaves.

    Raises:
      ValueError: a different tree structure, leaf shape or leading (batch) size.
      TypeError: a different leaf dtype.
    """
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
    v_leaves, v_def = jax.tree_util.tree_flatten(v)
    if p_def != v_def:
        raise ValueError(
            f"{name} must have the same tree structure as params; got {v_def}, expected {p_def}"
        )
    lead = None
    for (path, p), x in zip(p_flat, v_leaves, strict=True):
        xs, ps = jnp.shape(x), jnp.shape(p)
        if len(xs) != len(ps) + batch_dims or tuple(xs[batch_dims:]) != tuple(ps):
            expected = f"(batch..., *{ps})" if batch_dims else f"{ps}"
            raise ValueError(
                f"{name} leaf {path_name(path)!r} has shape {xs}, expected {expected} "
                "(the shape of the matching params leaf)"
            )
        if batch_dims:
            if lead is None:
                lead = tuple(xs[:batch_dims])
            elif tuple(xs[:batch_dims]) != lead:
                raise ValueError(
                    f"{name} leaves must share their leading {batch_dims} axes; leaf "
                    f"{path_name(path)!r} has {tuple(xs[:batch_dims])}, others {lead}"
                )
        if jnp.result_type(x) != jnp.result_type(p):
            raise TypeError(
                f"{name} leaf {path_name(path)!r} has dtype {jnp.result_type(x)}, expected "
                f"{jnp.result_type(p)} (the dtype of the matching params leaf)"
            )


def check_scalar_loss(loss_fn: Callable[..., jax.Array], params: PyTree, *args: Any) -> None:
    """Raises ``ValueError``/``TypeError`` unless ``loss_fn(params, *args)`` is a real scalar.

    Uses ``jax.eval_shape``: no computation is done, and it works under ``jit``.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    out = jax.eval_shape(loss_fn, params, *args)
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"loss_fn must return a scalar, got output of shape/type {shape}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"loss_fn must return a real floating scalar, got dtype {out.dtype}")


# --------------------------------------------------------------------------- products
def hvp(loss_fn: Callable[..., jax.Array], params: PyTree, v: PyTree, *args: Any) -> PyTree:
    """Hessian-vector product ``H v`` by forward-over-reverse differentiation.

    Maths: ``H v = d/dt grad_params loss_fn(params + t v, *args) |_{t=0}``, computed as
    ``jax.jvp(jax.grad(loss_fn), (params,), (v,))``.

    Cost: one forward and one backward pass with tangents, about 2x a gradient; memory as a
    gradient plus one tangent.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point at which the Hessian is taken (any pytree of float arrays).
      v: the vector, a pytree with the structure, shapes and dtypes of ``params``.
      *args: further arguments of ``loss_fn`` (a batch, say); not differentiated.

    Returns:
      ``H v``, a pytree like ``params``.

    Raises:
      ValueError: ``v`` does not match ``params``, or the loss is not a scalar.
      TypeError: dtypes differ, or the loss is not real.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p: jnp.sum(p["w"] ** 3)
      >>> hvp(loss, {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([1.0, 1.0])})
      {'w': Array([ 6., 12.], dtype=float32)}

    References:
      Pearlmutter 1994; Ju, Li & Zhang, ICML 2022.
    """
    check_like(params, v, "v")
    check_scalar_loss(loss_fn, params, *args)
    grad = lambda p: jax.grad(loss_fn)(p, *args)
    return jax.jvp(grad, (params,), (v,))[1]


def hvp_fn(loss_fn: Callable[..., jax.Array], params: PyTree, *args: Any) -> Matvec:
    """A matvec ``v -> H v`` that linearises the gradient once and re-uses it.

    Maths: ``jax.linearize(grad loss_fn, params)`` evaluates the forward and backward passes
    once and stores the residuals; each product then runs only the linear (tangent) part.

    Cost: one gradient-with-residuals up front; each product about 1-1.5x a gradient instead
    of 2x. Memory: the residuals of the linearisation stay alive as long as the returned
    function does. Outside ``jit`` the linearisation runs as ONE compiled program
    (:func:`hessjax.mapping.compile_once`: compiled once per computation and shapes, shared
    by later calls at other params or batches, which retrace it but compile nothing) instead
    of op by op: MobileNetV2 at 32x32, batch 32, 21 s in a first process (compile included)
    and 4 s in a later call (the retrace), against 46 s eagerly. Inside ``jit`` it is traced
    as usual.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point at which the Hessian is taken.
      *args: further arguments of ``loss_fn``.

    Returns:
      A function ``matvec(v) -> H v``; it checks ``v`` against ``params`` and can be vmapped
      (see :func:`batch_matvec`).

    Example:
      >>> import jax.numpy as jnp
      >>> matvec = hvp_fn(lambda p: jnp.sum(p ** 3), jnp.array([1.0, 2.0]))
      >>> matvec(jnp.array([1.0, 0.0]))
      Array([6., 0.], dtype=float32)

    References:
      Ju, Li & Zhang, ICML 2022; JAX autodiff cookbook (``jax.linearize``).
    """
    check_scalar_loss(loss_fn, params, *args)
    linear = _linearized(lambda p: jax.grad(loss_fn)(p, *args), params)

    def matvec(v: PyTree) -> PyTree:
        check_like(params, v, "v")
        return linear(v)

    return matvec


def _linearized(fn: Callable, point: PyTree) -> Callable:
    """``jax.linearize(fn, point)[1]``, its residuals computed by ONE compiled program.

    Outside a trace, a program (:func:`hessjax.mapping.compile_once`: compiled once per
    computation and shapes, whatever ``fn`` closes over) returns the constants of the linear
    map's jaxpr (the residuals), and the map is that jaxpr evaluated on them; ``jax.linearize``
    itself would run the forward and backward passes op by op (MobileNetV2 at 32x32, batch
    32: 46 s). Under a trace (``point`` or the closure of ``fn`` traced) it is
    ``jax.linearize`` in that trace.
    """
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), point)
    traced: dict[str, Any] = {}  # the linear map's jaxpr and output tree, set while tracing

    def residuals(p):  # what fn closes over becomes arguments of the program (compile_once)
        linear = jax.linearize(fn, p)[1]
        closed, out = jax.make_jaxpr(linear, return_shape=True)(like)
        traced["jaxpr"], traced["out"] = closed.jaxpr, jax.tree_util.tree_structure(out)
        return list(closed.consts)

    call = compile_once(residuals, point)
    if call is None:
        return jax.linearize(fn, point)[1]
    consts = call(point)
    jaxpr, out_tree = traced["jaxpr"], traced["out"]

    def linear(v: PyTree) -> PyTree:
        out = jax.core.eval_jaxpr(jaxpr, consts, *jax.tree_util.tree_leaves(v))
        return jax.tree_util.tree_unflatten(out_tree, out)

    return linear


def batch_matvec(matvec: Matvec, vs: PyTree, *, chunk_size: int | None = None) -> PyTree:
    """Applies ``matvec`` to a stack of vectors (leading axis ``m`` on every leaf).

    Results equal ``[matvec(vs[i]) for i in range(m)]``, computed by :func:`chunked_vmap`:
    vmapped within chunks of ``chunk_size``, ``lax.map``-ped across chunks.

    Cost: ``m`` matvecs; memory ``chunk_size`` (or ``m``) times that of one matvec.

    Args:
      matvec: a function ``v -> H v`` over one vector.
      vs: a pytree whose leaves have a shared leading axis ``m >= 1``.
      chunk_size: keyword-only; ``None`` vmaps all ``m`` at once.

    Returns:
      The stacked products, leading axis ``m``.

    Example:
      >>> import jax.numpy as jnp
      >>> batch_matvec(lambda v: 2.0 * v, jnp.eye(3), chunk_size=2)[2]
      Array([0., 0., 2.], dtype=float32)
    """
    num_rows(vs, "vs")  # errors name this function's argument
    return chunked_vmap(matvec, vs, chunk_size=chunk_size)


def batched_hvp(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    vs: PyTree,
    *args: Any,
    chunk_size: int | None = None,
) -> PyTree:
    """``H v`` for a stack of probes ``vs`` (leading axis ``m``), linearising once.

    Equivalent to ``batch_matvec(hvp_fn(loss_fn, params, *args), vs, chunk_size=...)``.

    Cost: one linearisation plus ``m`` linear products; memory bounded by ``chunk_size``.

    Example:
      >>> import jax.numpy as jnp
      >>> batched_hvp(lambda p: jnp.sum(p ** 2), jnp.zeros(2), jnp.eye(2))
      Array([[2., 0.],
             [0., 2.]], dtype=float32)
    """
    check_like(params, vs, "vs", batch_dims=1)
    return batch_matvec(hvp_fn(loss_fn, params, *args), vs, chunk_size=chunk_size)


def block_hvp_fn(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    partition: Partition,
    *args: Any,
    chunk_size: int | None = None,
) -> Matvec:
    """A matvec ``v -> blockdiag(H_11, ..., H_LL) v`` over the layers of ``partition``.

    Maths: for every layer ``i``, ``(H_ii v_i)`` where ``H_ii`` is the diagonal block of the
    Hessian for the leaves of layer ``i`` and ``v_i`` the restriction of ``v`` to them. The
    result holds ``H_ii v_i`` in the leaves of layer ``i`` and zeros in leaves that belong to
    no layer. Layers are disjoint, so one params-shaped pytree holds all blocks' products.

    Computation: the gradient is taken with respect to the partition's leaves only (the other
    leaves are constants) and linearised once; ``v`` is stacked into ``L`` copies each
    restricted to one layer, all ``L`` copies go through the linearised gradient (vmapped,
    ``chunk_size`` layers at a time), and each layer keeps its own part.

    Cost: one linearisation, then ``L`` Hessian products per call. Because leaves outside the
    partition are not differentiated, each product runs the tangent forward pass from the
    first selected layer only and the backward pass down to it only: measuring the later
    layers of a deep network is correspondingly cheaper. Memory: ``L`` (or ``chunk_size``)
    tangents of the selected leaves. ``H`` is never formed.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point at which the Hessian is taken.
      partition: the layers (built from ``params`` with :func:`hessjax.layer_partition`).
      *args: further arguments of ``loss_fn``.
      chunk_size: keyword-only; how many layers' products are vmapped at once.

    Returns:
      A function ``v -> block products``, a pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from hessjax.partition import layer_partition
      >>> params = {"a": jnp.ones((1, 1)), "b": jnp.ones((1, 1))}
      >>> loss = lambda p: jnp.sum(p["a"] * p["b"]) ** 2   # H = [[2, 4], [4, 2]]
      >>> blocks = block_hvp_fn(loss, params, layer_partition(params))
      >>> {k: float(x[0, 0]) for k, x in blocks({"a": jnp.ones((1, 1)),
      ...                                        "b": jnp.ones((1, 1))}).items()}
      {'a': 2.0, 'b': 2.0}

    References:
      Ju, Li & Zhang, ICML 2022, section 2 (the per-layer blocks ``H_i``).
    """
    leaves = partition.check(params, "params")
    check_scalar_loss(loss_fn, params, *args)
    treedef = partition.treedef
    selected = [j for j, g in enumerate(partition.leaf_layer) if g >= 0]
    layer_of = np.asarray([partition.leaf_layer[j] for j in selected])
    eye = np.eye(partition.num_layers, dtype=bool)

    def loss_of_selected(xs: list[jax.Array]) -> jax.Array:
        full = list(leaves)
        for j, x in zip(selected, xs, strict=True):
            full[j] = x
        return loss_fn(jax.tree_util.tree_unflatten(treedef, full), *args)

    # Differentiate w.r.t. the partition's leaves only: the other leaves are constants, so the
    # forward tangents start at the first selected layer and the backward pass stops there.
    linear = _linearized(jax.grad(loss_of_selected), [leaves[j] for j in selected])

    def blocks(v: PyTree) -> PyTree:
        check_like(params, v, "v")
        v_leaves = jax.tree_util.tree_leaves(v)
        stacked = [
            jnp.where(
                jnp.asarray(eye[g]).reshape((-1,) + (1,) * jnp.ndim(v_leaves[j])),
                v_leaves[j][None],
                jnp.zeros_like(v_leaves[j])[None],
            )
            for j, g in zip(selected, layer_of, strict=True)
        ]
        products = batch_matvec(linear, stacked, chunk_size=chunk_size)
        out = [jnp.zeros_like(x) for x in v_leaves]
        for t, (j, g) in enumerate(zip(selected, layer_of, strict=True)):
            out[j] = products[t][g]
        return jax.tree_util.tree_unflatten(treedef, out)

    return blocks


def block_hvp(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    v: PyTree,
    partition: Partition,
    *args: Any,
    chunk_size: int | None = None,
) -> PyTree:
    """The diagonal-block products ``(H_ii v_i)`` of every layer, as one params-shaped pytree.

    See :func:`block_hvp_fn` (this is ``block_hvp_fn(...)(v)``).

    Cost: ``L`` Hessian products (vmapped), ``H`` never formed.

    Example:
      >>> import jax.numpy as jnp
      >>> from hessjax.partition import layer_partition
      >>> params = {"a": jnp.ones((1, 1)), "b": jnp.ones((1, 1))}
      >>> loss = lambda p: jnp.sum(p["a"] * p["b"]) ** 2
      >>> out = block_hvp(loss, params, params, layer_partition(params))
      >>> float(out["a"][0, 0])
      2.0
    """
    return block_hvp_fn(loss_fn, params, partition, *args, chunk_size=chunk_size)(v)


def layer_hvp_fn(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    partition: Partition,
    layer: int,
    *args: Any,
) -> Matvec:
    """A matvec ``w_i -> H_ii w_i`` on ONE layer's leaves, linearising once.

    Maths: ``H_ii`` is the diagonal block of layer ``i``; the gradient is taken with respect
    to that layer's leaves only (every other leaf is a constant) and linearised, so each
    product runs the tangent forward from layer ``i`` and the backward pass down to it only.
    Vectors are lists of the layer's leaves, in leaf order (``partition.layer_leaves``).

    Unlike :func:`block_hvp_fn` no layer axis is vmapped: vmapping this matvec over examples
    (with per-example vectors, as Lanczos needs) batches the tangent of ONE layer's kernel,
    so only that layer's convolution becomes a batched-kernel convolution; every other one
    keeps an unbatched kernel.

    Cost: one linearisation; then one Hessian product from layer ``i`` on per call.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point at which the Hessian is taken.
      partition: the layers.
      layer: the layer index ``i`` (static).
      *args: further arguments of ``loss_fn``.

    Returns:
      ``matvec(w) -> H_ii w`` over lists of the layer's leaves.

    Raises:
      ValueError: ``layer`` out of range, or ``params`` not matching the partition.

    Example:
      >>> import jax.numpy as jnp
      >>> from hessjax.partition import layer_partition
      >>> params = {"a": jnp.ones((1, 1)), "b": jnp.ones((1, 1))}
      >>> loss = lambda p: jnp.sum(p["a"] * p["b"]) ** 2   # H = [[2, 4], [4, 2]]
      >>> matvec = layer_hvp_fn(loss, params, layer_partition(params), 1)
      >>> float(matvec([jnp.ones((1, 1))])[0][0, 0])
      2.0

    References:
      Ju, Li & Zhang, ICML 2022, section 2 (the per-layer blocks ``H_i``).
    """
    leaves = partition.check(params, "params")
    if (
        isinstance(layer, bool)
        or not isinstance(layer, int)
        or not 0 <= layer < len(partition.names)
    ):
        raise ValueError(f"layer must be an int in [0, {partition.num_layers}), got {layer!r}")
    idx = partition.layer_leaves(layer)
    loss_of_layer = _layer_loss(loss_fn, leaves, partition.treedef, idx, args)
    linear = _linearized(jax.grad(loss_of_layer), [leaves[j] for j in idx])
    return linear


def _layer_loss(loss_fn, leaves, treedef, idx, args):
    """``sub -> loss_fn(params with layer leaves idx replaced by sub, *args)``."""

    def layer_loss(sub):
        full = list(leaves)
        for j, x in zip(idx, sub, strict=True):
            full[j] = x
        return loss_fn(jax.tree_util.tree_unflatten(treedef, full), *args)

    return layer_loss


class BlockForms(NamedTuple):
    """The output of :func:`per_example_block_forms` (leading axis ``m``: one row per example).

    Attributes:
      vhv: ``v_i^T H_ii[x] v_i`` per example and layer, shape ``(m, L)``.
      hv_sq_norms: ``||H_ii[x] v_i||^2`` per example and layer, shape ``(m, L)``.
      losses: ``loss_fn(params, x)`` per example, shape ``(m,)``.
    """

    vhv: jax.Array
    hv_sq_norms: jax.Array
    losses: jax.Array


def block_forms_fn(
    loss_fn: Callable[..., jax.Array], params: PyTree, v: PyTree, partition: Partition
) -> Callable[[PyTree], BlockForms]:
    """One example's ``(v_i^T H_ii v_i, ||H_ii v_i||^2)`` for every layer, with a SHARED ``v``.

    Maths: for the example ``x`` and every layer ``i`` of ``partition``,
    ``H_ii[x] v_i = d/dt grad_{W_i} loss_fn(params + t v_i, x) |_{t=0}`` (forward-over-reverse,
    differentiating with respect to layer ``i``'s leaves only); the function returns
    ``<v_i, H_ii v_i>``, ``||H_ii v_i||^2`` and the loss, without keeping ``H_ii v_i``.

    Why a separate function from :func:`block_hvp_fn`: here the tangent ``v`` is the same for
    every example, so ``jax.vmap`` of the returned function over examples batches only the
    data. Every convolution (or matmul) then sees an unbatched kernel and kernel tangent and
    XLA emits the ordinary batched convolution; vmapping :func:`block_hvp_fn` over examples
    with per-example tangents (as Lanczos needs) makes it emit batched-kernel convolutions,
    which on CPU were about 10x slower per example (MobileNetV2 at 32x32, 53 layers: 0.019 s
    vs 0.196 s per example and block product, chunks of 16 examples).

    Cost: per example and layer one Hessian-vector product whose tangent starts at layer
    ``i`` and whose backward pass stops there (``L`` products, the later layers cheaper),
    plus one loss. The layers are a static Python loop, so the compiled program grows with
    ``L`` (MobileNetV2, 53 layers: about a minute to compile on 2 CPU cores). Memory: one
    layer's tangents at a time, times the examples vmapped at once.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: the point at which the Hessians are taken.
      v: the shared vector, a pytree like ``params`` (leaves outside the partition ignored).
      partition: the layers (:func:`hessjax.layer_partition`).

    Returns:
      A function ``example -> BlockForms`` with ``vhv``, ``hv_sq_norms`` of shape ``(L,)``
      and a scalar ``losses``; vmap it (or use :func:`per_example_block_forms`).

    Raises:
      ValueError: ``v`` or ``params`` does not match the partition.
      TypeError: dtypes of ``v`` and ``params`` differ.

    Example:
      >>> import jax.numpy as jnp
      >>> from hessjax.partition import layer_partition
      >>> params = {"w": jnp.ones((1, 2))}
      >>> loss = lambda p, x: 0.5 * jnp.sum((p["w"] @ x) ** 2)  # H = x x^T
      >>> one = block_forms_fn(loss, params, params, layer_partition(params))
      >>> out = one(jnp.array([1.0, 2.0]))  # (v.x)^2, ||x||^2 (v.x)^2, loss
      >>> float(out.vhv[0]), float(out.hv_sq_norms[0]), float(out.losses)
      (9.0, 45.0, 4.5)

    References:
      Pearlmutter 1994; Ju, Li & Zhang, ICML 2022 (the per-example blocks ``H_i``).
    """

    def step(layer_loss, sub, tangent):
        (value, _), (_, hv) = jax.jvp(jax.value_and_grad(layer_loss), (sub,), (tangent,))
        vhv = sum(jnp.vdot(a, b) for a, b in zip(tangent, hv, strict=True))
        return value, (vhv, sum(jnp.vdot(b, b) for b in hv))

    per_layer = _per_layer_fn(loss_fn, params, v, partition, step, num_outputs=2)

    def one(example: PyTree) -> BlockForms:
        (vhv, sq), loss = per_layer(example)
        return BlockForms(vhv, sq, loss)

    return one


def per_example_block_forms(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    v: PyTree,
    partition: Partition,
    examples: PyTree,
    *,
    chunk_size: int | None = 16,
) -> BlockForms:
    """``v_i^T H_ii[x] v_i`` and ``||H_ii[x] v_i||^2`` for every example ``x`` and layer ``i``.

    :func:`block_forms_fn` mapped over the leading axis of ``examples`` by
    :func:`chunked_vmap`: ``chunk_size`` examples vmapped at once with the tangent ``v``
    shared (unbatched), chunks one after another.

    Cost: ``m * L`` Hessian-vector products (see :func:`block_forms_fn`), batched over
    ``chunk_size`` examples; memory ``chunk_size`` examples' activations and one layer's
    tangents. ``H`` is never formed and no per-example vector is kept.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example.
      params: the point at which the Hessians are taken.
      v: the shared vector, a pytree like ``params``.
      partition: the layers.
      examples: a pytree with a leading axis ``m >= 1``.
      chunk_size: keyword-only, examples vmapped at once (``None``: all).

    Returns:
      :class:`BlockForms` with ``vhv`` and ``hv_sq_norms`` of shape ``(m, L)`` and
      ``losses`` of shape ``(m,)``.

    Raises:
      ValueError: bad ``examples`` or ``chunk_size``, or ``v`` not matching ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from hessjax.partition import layer_partition
      >>> params = {"w": jnp.ones((1, 2))}
      >>> loss = lambda p, x: 0.5 * jnp.sum((p["w"] @ x) ** 2)
      >>> xs = jnp.array([[1.0, 0.0], [1.0, 2.0]])
      >>> per_example_block_forms(loss, params, params, layer_partition(params), xs).vhv
      Array([[1.],
             [9.]], dtype=float32)

    References:
      Ju, Li & Zhang, ICML 2022.
    """
    num_rows(examples, "examples")
    one = block_forms_fn(loss_fn, params, v, partition)
    return chunked_vmap(one, examples, chunk_size=chunk_size)


def block_vhv_fn(
    loss_fn: Callable[..., jax.Array], params: PyTree, v: PyTree, partition: Partition
) -> Callable[[PyTree], tuple[jax.Array, jax.Array]]:
    """One example's ``v_i^T H_ii v_i`` for every layer, forward-over-forward, with a SHARED ``v``.

    Maths: for the example ``x`` and every layer ``i`` of ``partition``,
    ``v_i^T H_ii[x] v_i = d^2/dt^2 loss_fn(params + t v_i, x) |_{t=0}``, the second
    directional derivative along ``v_i`` alone, computed as a ``jvp`` of a ``jvp`` (no reverse
    pass). The same numbers as :func:`block_forms_fn`'s ``vhv`` (which also gives
    ``||H_ii v_i||^2`` and needs a reverse pass for it).

    Why: when only ``v_i^T H_ii v_i`` is needed (the measure of networks whose layer blocks
    are positive semi-definite, :func:`hessjax.hessian_distance` ``psd_blocks=True``), two
    forward-mode passes from layer ``i`` on replace a forward-over-reverse product. Measured
    (MobileNetV2 at 32x32, 53 layers, 16 examples vmapped with the tangent shared, 2 CPU
    cores): 0.013 s per example for all layers, and the unrolled program of 53 layers compiles
    in about 70 s (the forward-over-reverse :func:`block_forms_fn`: several minutes).

    Cost: per example and layer two forward-mode passes from layer ``i`` to the loss (the
    primal forward shared), plus one loss; vmapping over examples with ``v`` unbatched keeps
    every kernel unbatched. The layers are a static Python loop (the compiled program grows
    with ``L``). Memory: one forward pass's activations and two tangents, per example.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: the point at which the Hessians are taken.
      v: the shared vector, a pytree like ``params`` (leaves outside the partition ignored).
      partition: the layers (:func:`hessjax.layer_partition`).

    Returns:
      A function ``example -> (vhv, loss)`` with ``vhv`` of shape ``(L,)``; vmap it over
      examples.

    Raises:
      ValueError: ``v`` or ``params`` does not match the partition.
      TypeError: dtypes of ``v`` and ``params`` differ.

    Example:
      >>> import jax.numpy as jnp
      >>> from hessjax.partition import layer_partition
      >>> params = {"w": jnp.ones((1, 2))}
      >>> loss = lambda p, x: 0.5 * jnp.sum((p["w"] @ x) ** 2)  # H = x x^T
      >>> vhv, value = block_vhv_fn(loss, params, params, layer_partition(params))(
      ...     jnp.array([1.0, 2.0]))
      >>> float(vhv[0]), float(value)  # (v . x)^2, loss
      (9.0, 4.5)

    References:
      Griewank & Walther, Evaluating Derivatives (2008), ch. 13 (second directional
      derivatives by forward mode); Ju, Li & Zhang, ICML 2022 (the per-example blocks ``H_i``).
    """

    def step(layer_loss, sub, tangent):
        first = lambda s: jax.jvp(layer_loss, (s,), (tangent,))
        (value, _), (_, second) = jax.jvp(first, (sub,), (tangent,))
        return value, (second,)

    per_layer = _per_layer_fn(loss_fn, params, v, partition, step, num_outputs=1)

    def one(example: PyTree) -> tuple[jax.Array, jax.Array]:
        (vhv,), loss = per_layer(example)
        return vhv, loss

    return one


def _per_layer_fn(loss_fn, params, v, partition, step, *, num_outputs):
    """``example -> (per-layer outputs, loss)``: ``step(layer_loss, sub, tangent) -> (loss,
    outputs)`` for every layer in a static loop (``layer_loss`` differentiates only that
    layer's leaves ``sub``, ``tangent`` is ``v`` there), each of the ``num_outputs`` outputs
    stacked to ``(L,)`` in the params' dtype; the loss from the first layer (or one
    evaluation if there is none)."""
    leaves = partition.check(params, "params")
    check_like(params, v, "v")
    v_leaves = jax.tree_util.tree_leaves(v)
    treedef = partition.treedef
    layers = [partition.layer_leaves(i) for i in range(partition.num_layers)]
    dtype = jnp.result_type(*leaves)

    def one(example: PyTree):
        rows, loss = [], None
        for idx in layers:
            layer_loss = _layer_loss(loss_fn, leaves, treedef, idx, (example,))
            tangent = [v_leaves[j] for j in idx]
            value, outs = step(layer_loss, [leaves[j] for j in idx], tangent)
            loss = value if loss is None else loss
            rows.append(outs)
        if loss is None:  # no layers
            loss = loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), example)
            return (jnp.zeros((0,), dtype),) * num_outputs, jnp.asarray(loss)
        stacked = tuple(jnp.stack(col).astype(dtype) for col in zip(*rows, strict=True))
        return stacked, jnp.asarray(loss)

    return one
