"""Argument checks shared by the measures (private)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessjax.hessian import check_like
from hessjax.partition import Partition, layer_partition

PyTree = Any


def is_concrete(x: Any) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def num_examples(examples: PyTree, name: str = "examples") -> int:
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


def check_n(n: Any) -> jax.Array:
    if is_concrete(n):
        n_arr = np.asarray(n)
        if n_arr.shape != () or not np.isfinite(n_arr) or n_arr < 1:
            raise ValueError(f"n (the training-set size) must be a scalar >= 1, got {n!r}")
    return jnp.asarray(n, dtype=jnp.result_type(float))


def check_static_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def resolve_partition(params: PyTree, partition: Partition | None) -> Partition:
    if partition is None:
        return layer_partition(params)
    if not isinstance(partition, Partition):
        raise TypeError(f"partition must be a hessjax.Partition, got {type(partition).__name__}")
    partition.check(params, "params")
    return partition


def check_finite_losses(losses: jax.Array, what: str) -> None:
    if is_concrete(losses):
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
    for name, tree in (("params", params), ("anchor", anchor)):
        check_finite_tree(tree, name)
    return jax.tree_util.tree_map(jnp.subtract, params, anchor)


def check_finite_tree(tree: PyTree, name: str) -> None:
    """A ValueError naming the first leaves of a concrete ``tree`` that hold NaN or inf."""
    if not is_concrete(tree):
        return
    from hessjax.partition import path_name

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    floats = [
        (path, leaf) for path, leaf in flat if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if not floats or bool(_all_finite([leaf for _, leaf in floats])):
        return
    bad = [path_name(path) for path, leaf in floats if not bool(jnp.all(jnp.isfinite(leaf)))]
    raise ValueError(f"{name}: non-finite values (NaN/inf) in leaves {bad[:5]}")


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    """Whether every entry of every leaf is finite: ONE fused reduction over the leaves
    concatenated (MobileNetV2's 158 leaves: 0.3 s of compile and 3 ms a call, against one
    ``isfinite`` and one ``all`` program per leaf shape, 3-4 s of compile, eagerly)."""
    return jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in leaves])))
