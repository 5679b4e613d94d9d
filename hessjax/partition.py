"""Named layer groups of a params pytree, and per-layer views of vectors.

The paper's quantities are per *layer*: the displacement ``v_i = W_i - W_i^(s)`` of layer ``i``
and the diagonal Hessian block ``H_i``. A :class:`Partition` names the layers of any params
pytree (a plain dict, linen params, a ``flax.nnx.State``) from the paths of its leaves
(:func:`layer_partition`), and gives the per-layer operations the estimators need: per-layer
inner products, per-layer scaling, restriction to one layer, and stacking a vector into one
copy per layer.

A partition is static: it records the tree structure and which layer each leaf belongs to
(``-1`` for leaves in no layer), so it can be passed as a static argument or closed over under
``jax.jit``. Layers are disjoint, so a block-diagonal operator ``blockdiag(H_11, ..., H_LL)``
acts on an ordinary params-shaped pytree: that is how the per-layer estimators run all layers
at once.

Reference: Ju, Li & Zhang, ICML 2022 (arXiv:2206.02659), section 2 (layers ``i = 1..L``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Selector = str | Callable[[str, Any], bool] | None
Grouper = str | Callable[[str], str | None] | None


def path_name(path: Sequence[Any]) -> str:
    """The slash-joined name of a pytree path, e.g. ``"features/3/conv/kernel"``.

    Dict keys, attribute names and sequence indices are joined with ``/``. A trailing
    ``.value`` (the array inside a ``flax.nnx.Variable``) is dropped, so the names of an
    ``nnx.State`` read like those of a plain dict.

    Args:
      path: a key path from ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      The name as a string.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.ones((2, 3))}}
      >>> [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
      ['dense/kernel']
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:  # pragma: no cover - future key types
            parts.append(str(key))
    if len(parts) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def leaf_names(tree: PyTree) -> list[str]:
    """The :func:`path_name` of every leaf of ``tree``, in ``jax.tree_util`` leaf order."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _as_selector(arg: Selector, what: str) -> Callable[[str, Any], bool] | None:
    if arg is None:
        return None
    if isinstance(arg, str):
        pattern = re.compile(arg)
        return lambda name, leaf: pattern.search(name) is not None
    if callable(arg):
        return arg
    raise TypeError(
        f"{what} must be None, a regular expression string or a callable (name, leaf) -> bool; "
        f"got {type(arg).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class Partition:
    """Disjoint named layers of a params pytree (static metadata, hashable).

    Attributes:
      treedef: the tree structure of the params it was built from.
      names: the layer names, in order of first appearance among the leaves.
      leaf_layer: for every leaf (in leaf order) the index of its layer, or -1 if the leaf
        belongs to no layer.
      leaf_shapes: the shape of every leaf.
      leaf_names: the path name of every leaf.
    """

    treedef: Any
    names: tuple[str, ...]
    leaf_layer: tuple[int, ...]
    leaf_shapes: tuple[tuple[int, ...], ...]
    leaf_names: tuple[str, ...]

    # ----------------------------------------------------------------- sizes and checks
    @property
    def num_layers(self) -> int:
        """The number of layers ``L``."""
        return len(self.names)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The number of scalars in each layer (the dimension of each block ``H_ii``)."""
        out = [0] * self.num_layers
        for layer, shape in zip(self.leaf_layer, self.leaf_shapes, strict=True):
            if layer >= 0:
                out[layer] += int(np.prod(shape, dtype=np.int64))
        return tuple(out)

    def layer_leaves(self, layer: int) -> tuple[int, ...]:
        """Indices of the leaves that make up ``layer``."""
        return tuple(j for j, g in enumerate(self.leaf_layer) if g == layer)

    def check(self, tree: PyTree, name: str = "tree", *, batch_dims: int = 0) -> list[Any]:
        """Checks that ``tree`` has this partition's structure; returns its leaves.

        Args:
          tree: a pytree to check.
          name: the argument name used in error messages.
          batch_dims: number of leading axes every leaf carries in front of the params shape.

        Raises:
          ValueError: if the tree structure or a leaf shape differs.
        """
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if treedef != self.treedef:
            raise ValueError(
                f"{name} must have the tree structure of the params the partition was built "
                f"from; got {treedef}, expected {self.treedef}"
            )
        for leaf, shape, lname in zip(leaves, self.leaf_shapes, self.leaf_names, strict=True):
            if tuple(jnp.shape(leaf)[batch_dims:]) != shape:
                raise ValueError(
                    f"{name} leaf {lname!r} has shape {jnp.shape(leaf)}, expected "
                    f"{'(batch..., ) + ' if batch_dims else ''}{shape}"
                )
        return leaves

    # ----------------------------------------------------------------- per-layer views
    def dot(self, x: PyTree, y: PyTree) -> jax.Array:
        """Per-layer inner products ``<x_i, y_i>``, an array of shape ``(L,)``.

        Cost: one pass over the leaves. Leaves in no layer are ignored.
        """
        xs, ys = self.check(x, "x"), self.check(y, "y")
        dtype = jnp.result_type(*xs) if xs else jnp.float32
        out = jnp.zeros((self.num_layers,), dtype)
        for a, b, layer in zip(xs, ys, self.leaf_layer, strict=True):
            if layer >= 0:
                # in the common dtype: a bfloat16 leaf's products summed in float32
                prod = jnp.vdot(a.astype(dtype), b.astype(dtype))
                out = out.at[layer].add(prod.real.astype(dtype))
        return out

    def sq_norms(self, x: PyTree) -> jax.Array:
        """Per-layer squared Euclidean (Frobenius) norms ``||x_i||^2``, shape ``(L,)``."""
        return self.dot(x, x)

    def scale(self, x: PyTree, c: jax.Array) -> PyTree:
        """Multiplies layer ``i`` of ``x`` by ``c[i]``; leaves in no layer become zero."""
        leaves = self.check(x, "x")
        c = jnp.asarray(c)
        if c.shape != (self.num_layers,):
            raise ValueError(f"c must have shape ({self.num_layers},), got {c.shape}")
        out = [
            (leaf * c[layer].astype(leaf.dtype)) if layer >= 0 else jnp.zeros_like(leaf)
            for leaf, layer in zip(leaves, self.leaf_layer, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def restrict(self, x: PyTree, layer: int | None = None) -> PyTree:
        """Zeroes the leaves outside all layers (or, with ``layer``, outside that layer)."""
        leaves = self.check(x, "x")
        keep = (lambda g: g >= 0) if layer is None else (lambda g: g == layer)
        out = [
            leaf if keep(g) else jnp.zeros_like(leaf)
            for leaf, g in zip(leaves, self.leaf_layer, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def stack(self, x: PyTree) -> PyTree:
        """One copy of ``x`` per layer, each restricted to its layer: leaves get a leading ``L``.

        ``stack(x)[i]`` (on every leaf) equals ``restrict(x, i)``. Memory: ``L`` times ``x``.
        """
        leaves = self.check(x, "x")
        eye = np.eye(self.num_layers, dtype=bool)
        out = []
        for leaf, g in zip(leaves, self.leaf_layer, strict=True):
            if g >= 0:
                mask = jnp.asarray(eye[g]).reshape((-1,) + (1,) * jnp.ndim(leaf))
                out.append(jnp.where(mask, leaf[None], jnp.zeros_like(leaf)[None]))
            else:
                out.append(jnp.zeros((self.num_layers,) + jnp.shape(leaf), leaf.dtype))
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def unstack(self, stacked: PyTree) -> PyTree:
        """Inverse of :meth:`stack` on block-diagonal results: leaf ``j`` of layer ``g`` is
        taken from copy ``g``; leaves in no layer become zero."""
        leaves = self.check(stacked, "stacked", batch_dims=1)
        out = [
            leaf[g] if g >= 0 else jnp.zeros_like(leaf[0])
            for leaf, g in zip(leaves, self.leaf_layer, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def split(self, x: PyTree) -> dict[str, list[jax.Array]]:
        """The leaves of each layer of ``x``, as ``{layer name: [leaves]}``."""
        leaves = self.check(x, "x")
        out: dict[str, list[jax.Array]] = {name: [] for name in self.names}
        for leaf, g in zip(leaves, self.leaf_layer, strict=True):
            if g >= 0:
                out[self.names[g]].append(leaf)
        return out

    def mask(self) -> PyTree:
        """A params-shaped pytree of Python bools: True on leaves that belong to a layer.

        Usable with ``optax.masked``.
        """
        return jax.tree_util.tree_unflatten(self.treedef, [g >= 0 for g in self.leaf_layer])


def layer_partition(
    params: PyTree,
    *,
    select: Selector = None,
    exclude: Selector = None,
    group: Grouper = None,
) -> Partition:
    """Names the layers of a params pytree from the paths of its leaves.

    By default every leaf with ``ndim >= 2`` (kernels, embeddings, conv filters) is a layer of
    its own, named by its path (:func:`path_name`); biases and normalisation scales belong to
    no layer. ``select`` and ``exclude`` filter leaves by path; ``group`` merges leaves into
    one layer, e.g. a kernel with its bias.

    Args:
      params: the params pytree (dict, linen params, ``nnx.State``).
      select: which leaves belong to some layer: ``None`` (``ndim >= 2``), a regular
        expression searched in the path name, or a callable ``(name, leaf) -> bool``.
      exclude: leaves to drop after ``select``: a regular expression or a callable.
      group: how selected leaves form layers: ``None`` (one layer per leaf), ``"module"``
        (leaves sharing the parent path, e.g. ``dense/kernel`` and ``dense/bias``), or a
        callable ``name -> layer name`` (``None`` drops the leaf).

    Returns:
      A :class:`Partition`.

    Raises:
      TypeError: if ``select``, ``exclude`` or ``group`` has the wrong type.
      ValueError: if no leaf is selected.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
      ...           "out": {"kernel": jnp.ones((3, 1)), "bias": jnp.ones(1)}}
      >>> layer_partition(params).names
      ('dense/kernel', 'out/kernel')
      >>> layer_partition(params, select="kernel|bias", group="module").names
      ('dense', 'out')

    References:
      Ju, Li & Zhang, ICML 2022, section 2 (per-layer displacements and Hessian blocks).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    sel = _as_selector(select, "select") or (lambda name, leaf: jnp.ndim(leaf) >= 2)
    exc = _as_selector(exclude, "exclude") or (lambda name, leaf: False)
    if group is None:
        grouper: Callable[[str], str | None] = lambda name: name
    elif group == "module":
        grouper = lambda name: name.rsplit("/", 1)[0] if "/" in name else name
    elif callable(group):
        grouper = group
    else:
        raise TypeError(f"group must be None, 'module' or a callable name -> str; got {group!r}")

    names: list[str] = []
    leaf_layer: list[int] = []
    lnames: list[str] = []
    for path, leaf in flat:
        name = path_name(path)
        lnames.append(name)
        layer = -1
        if sel(name, leaf) and not exc(name, leaf):
            gname = grouper(name)
            if gname is not None:
                if gname not in names:
                    names.append(gname)
                layer = names.index(gname)
        leaf_layer.append(layer)
    if not names:
        raise ValueError(
            "partition selected no leaf of params (select/exclude/group matched nothing); "
            f"leaf names are {lnames[:10]}{'...' if len(lnames) > 10 else ''}"
        )
    return Partition(
        treedef=treedef,
        names=tuple(names),
        leaf_layer=tuple(leaf_layer),
        leaf_shapes=tuple(tuple(jnp.shape(leaf)) for _, leaf in flat),
        leaf_names=tuple(lnames),
    )
