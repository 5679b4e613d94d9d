"""Shared pieces of the estimators: the Estimate type, validation, probes, statistics."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessjax.mapping import check_map_fn, compile_once, drives_host_loop
from hessjax.partition import Partition, path_name

PyTree = Any
Matvec = Callable[[PyTree], PyTree]


class Estimate(NamedTuple):
    """A stochastic estimate and its standard error.

    Attributes:
      value: the estimate (a scalar, or shape ``(L,)`` per layer).
      stderr: the standard error of ``value``: the sample standard deviation of the per-probe
        terms (``ddof=1``) over ``sqrt(number of probes)``; NaN with a single probe. Zero for a
        deterministic part (e.g. the exact trace of a diagonal operator).
    """

    value: jax.Array
    stderr: jax.Array


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_chunk(chunk_size: Any) -> None:
    if chunk_size is not None:
        check_int("chunk_size", chunk_size)


def probe_layout(like: PyTree, partition: Partition | None, name: str) -> tuple[Partition, bool]:
    """The partition to compute with: ``partition`` itself, or one layer of all leaves.

    Returns ``(partition, per_layer)``; ``per_layer`` is False for the single-layer stand-in,
    whose ``(1,)``-shaped results are squeezed by the caller.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    if not flat:
        raise ValueError(f"{name} must have at least one leaf, got {like!r}")
    for path, leaf in flat:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"{name} leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}, "
                "expected a real floating dtype"
            )
    if partition is None:
        part = Partition(
            treedef=treedef,
            names=("all",),
            leaf_layer=(0,) * len(flat),
            leaf_shapes=tuple(tuple(jnp.shape(x)) for _, x in flat),
            leaf_names=tuple(path_name(p) for p, _ in flat),
        )
        return part, False
    if not isinstance(partition, Partition):
        raise TypeError(
            f"partition must be a hessjax.partition.Partition or None, got "
            f"{type(partition).__name__}"
        )
    partition.check(like, name)
    return partition, True


def tree_dtype(tree: PyTree) -> Any:
    return jnp.result_type(*jax.tree_util.tree_leaves(tree))


def squeeze_layers(x: Any, per_layer: bool) -> Any:
    return x if per_layer else jax.tree_util.tree_map(lambda a: a[0], x)


def random_tree(
    key: jax.Array, like: PyTree, part: Partition, num: int, kind: str = "rademacher"
) -> PyTree:
    """``num`` random vectors shaped like ``like`` (leading axis ``num``), zero off-layer.

    One draw for all leaves (one random-bits kernel: much cheaper to compile than one per
    leaf), sliced into the leaves in leaf order. ``kind`` is ``"rademacher"`` or ``"normal"``.
    Rademacher signs are the bits of 32-bit random words, 32 signs per word (exactly
    independent fair signs): for MobileNetV2's 2.2M parameters on CPU, 7 ms per probe against
    50 ms for ``jax.random.rademacher`` (a uniform float per sign), which was a quarter of a
    Hessian-vector product.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves]
    flat = random_flat(key, num, sum(sizes), jnp.result_type(*leaves), kind)
    out, start = [], 0
    for leaf, size, g in zip(leaves, sizes, part.leaf_layer, strict=True):
        piece = flat[:, start : start + size].reshape((num,) + jnp.shape(leaf))
        piece = piece.astype(jnp.result_type(leaf))
        out.append(piece if g >= 0 else jnp.zeros_like(piece))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def random_flat(key: jax.Array, num: int, n: int, dtype: Any, kind: str = "rademacher"):
    """``(num, n)`` random probe entries of ``dtype``, raveled: Rademacher or standard normal.

    Maths: ``kind="rademacher"``: independent fair signs +-1, taken as the 32 bits of each
    random 32-bit word (exactly fair and independent); ``kind="normal"``: N(0, 1). These are
    the vectors every estimator draws (:func:`random_tree` slices them into leaves), so one
    layer of all leaves gives ``ravel(probe p)`` as row ``p``.

    Cost: ``num * n / 32`` random words (a quarter of the random-number work of one float per
    sign: MobileNetV2's 2.2M parameters, 7 ms per probe on CPU against 50 ms for
    ``jax.random.rademacher``).

    Example:
      >>> import jax
      >>> z = random_flat(jax.random.key(0), 2, 5, "float32")
      >>> z.shape, sorted(set(z.ravel().tolist()))
      ((2, 5), [-1.0, 1.0])

    References:
      Hutchinson 1989 (Rademacher probes for trace estimation).
    """
    if kind == "rademacher":
        words = jax.random.bits(key, (num, -(-n // 32)), jnp.uint32)
        bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
        return (2 * bits.reshape(num, -1)[:, :n].astype(jnp.int32) - 1).astype(dtype)
    return jax.random.normal(key, (num, n), dtype)


def flat_layout(part: Partition, tree: PyTree) -> bool:
    """Whether the host loops may work on raveled vectors: one layer of every leaf, one dtype
    (then :func:`draw_flat` gives the probes raveled, without building their pytrees)."""
    return (
        part.num_layers == 1
        and all(g == 0 for g in part.leaf_layer)
        and len({jnp.result_type(x) for x in jax.tree_util.tree_leaves(tree)}) == 1
    )


def draw_flat(key: jax.Array, like: PyTree, num: int, kind: str = "rademacher") -> jax.Array:
    """:func:`random_flat` for the raveled ``like`` as one memoised program: the same numbers
    as :func:`draw_probes` over one layer of all leaves, raveled (row ``p`` is probe ``p``).

    Why: building the probes' pytree is a program with one slice per leaf (MobileNetV2's 158
    leaves: 1-4 s of compile on CPU) that the flat host loops would ravel again."""
    n, dtype = flat_size(like)
    fn = lambda k: random_flat(k, num, n, dtype, kind)
    call = memo_compile(("draw_flat", n, str(jnp.dtype(dtype)), num, kind), fn, key)
    return fn(key) if call is None else call(key)


def probe_stats(samples: jax.Array) -> Estimate:
    """Mean and standard error over the leading (probe) axis."""
    num = samples.shape[0]
    std = jnp.std(samples, axis=0, ddof=1) if num > 1 else jnp.full(samples.shape[1:], jnp.nan)
    return Estimate(jnp.mean(samples, axis=0), std.astype(samples.dtype) / math.sqrt(num))


def combine_basis(part: Partition, stacked: PyTree, coef: jax.Array) -> PyTree:
    """``sum_j coef[j, layer] * stacked[j]`` leafwise (zero on leaves in no layer)."""
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    out = []
    for leaf, g in zip(leaves, part.leaf_layer, strict=True):
        if g >= 0:
            out.append(jnp.tensordot(coef[:, g].astype(leaf.dtype), leaf, axes=1))
        else:
            out.append(jnp.zeros(leaf.shape[1:], leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def flat_size(tree: PyTree) -> tuple[int, Any]:
    """``(n, dtype)`` of ``tree`` raveled: its number of entries and the leaves' common dtype
    (``ravel_pytree``'s), from the shapes alone (arrays or ``jax.ShapeDtypeStruct``)."""
    leaves = jax.tree_util.tree_leaves(tree)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    return sum(math.prod(_shape(x)) for x in leaves), dtype


def flat_ravel(tree: PyTree, dtype: Any = None) -> jax.Array:
    """The leaves of ``tree`` raveled into one vector, in ``jax.flatten_util.ravel_pytree``'s
    order (``ravel_pytree(tree)[0]``, cast to ``dtype``), written into a zero vector by
    ``dynamic_update_slice`` rather than concatenated.

    Same numbers as ``ravel_pytree``; the reason is speed on XLA:CPU, whose concatenate of
    large operands runs at memory-copy speed divided by about 40 (measured: the 4.2M floats
    of a 3072-1024-1024-10 MLP, 0.24 s by concatenate, 6 ms by updates into zeros), which made
    the raveling cost three products per Lanczos step. Small leaves are concatenated in runs
    of at most ``_RUN`` entries first (fast at that size), each run written once: a program per
    leaf costs compile time (MobileNetV2's 158 leaves: 1.0 s to compile one update per leaf,
    0.1 s in runs). Cost: one write of the ``n`` floats.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    n, common = flat_size(tree)
    dtype = common if dtype is None else dtype
    out = jnp.zeros((n,), dtype)
    offset, run, run_size = 0, [], 0

    def flush(out, offset, run):
        piece = run[0] if len(run) == 1 else jnp.concatenate(run)
        return jax.lax.dynamic_update_slice(out, piece, (offset,))

    for x in leaves:
        size = int(np.size(x))
        if run and run_size + size > _RUN:
            out = flush(out, offset, run)
            offset, run, run_size = offset + run_size, [], 0
        run.append(jnp.ravel(x).astype(dtype))
        run_size += size
    return flush(out, offset, run) if run else out


_RUN = 1 << 16  # entries per concatenated run of small leaves in flat_ravel


def flat_unravel(like: PyTree) -> Callable[[jax.Array], PyTree]:
    """The inverse of :func:`flat_ravel` for trees shaped like ``like`` (arrays or
    ``jax.ShapeDtypeStruct``): static slices of the vector, reshaped and cast to each leaf's
    dtype. Unlike ``ravel_pytree(like)[1]`` it runs nothing eagerly (``ravel_pytree`` ravels
    ``like`` itself, a slow concatenate on XLA:CPU; see :func:`flat_ravel`)."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    shapes = [_shape(x) for x in leaves]
    dtypes = [jnp.result_type(x) for x in leaves]
    sizes = [math.prod(s) for s in shapes]
    starts = np.cumsum([0] + sizes[:-1]).tolist()

    def unravel(flat: jax.Array) -> PyTree:
        parts = [
            jax.lax.slice_in_dim(flat, a, a + m).reshape(shape).astype(dt)
            for a, m, shape, dt in zip(starts, sizes, shapes, dtypes, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, parts)

    return unravel


def layout(tree: PyTree) -> tuple:
    """A hashable description of a pytree's structure, shapes and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef,) + tuple((_shape(x), str(jnp.result_type(x))) for x in leaves)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


_STEPS: dict = {}
_STEPS_MAX = 512


def memo_compile(static: Any, fn: Callable, *args: Any, donate_argnums: tuple[int, ...] = ()):
    """:func:`hessjax.mapping.compile_once` memoised on ``static`` and the arguments' layout.

    For the small vector programs of the host loops, which close over no array: ``static``
    must name everything ``fn`` depends on besides its arguments (its role, the number of
    steps, the vectors' layout). A later estimator call of the same shapes then neither
    retraces nor re-prints the program (0.3-0.4 s per Lanczos call on MobileNetV2 otherwise).
    None (not memoised) under a trace, as ``compile_once``.
    """
    key = (static, tuple(donate_argnums), layout(args))
    call = _STEPS.get(key)
    if call is None:
        call = compile_once(fn, *args, donate_argnums=donate_argnums)
        if call is not None:
            if len(_STEPS) >= _STEPS_MAX:
                _STEPS.clear()
            _STEPS[key] = call
    return call


def safe_inverse(x: jax.Array, ok: jax.Array) -> jax.Array:
    return jnp.where(ok, 1.0 / jnp.where(ok, x, 1.0), 0.0).astype(x.dtype)


def map_probes(fn: Callable, xs: PyTree, chunk_size: int | None, map_fn: Any) -> PyTree:
    """``map_fn`` (default :func:`hessjax.chunked_vmap`) over the probe axis."""
    return check_map_fn(map_fn)(fn, xs, chunk_size=chunk_size)


def run_compiled(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` through :func:`hessjax.mapping.compile_once` (compiled once per
    computation and shapes); called directly under a trace."""
    call = compile_once(fn, *args)
    return fn(*args) if call is None else call(*args)


def host_loops(map_fn: Any, *trees: PyTree) -> bool:
    """Whether loops should run from Python over compiled steps: the map function asks for it
    (:func:`hessjax.mapping.drives_host_loop`; the default) and nothing is traced."""
    if not drives_host_loop(check_map_fn(map_fn)):
        return False
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(trees))


def draw_probes(
    key: jax.Array,
    like: PyTree,
    part: Partition,
    num: int,
    kind: str = "rademacher",
    *,
    single: bool = False,
) -> PyTree:
    """:func:`random_tree` as one compiled program (eagerly: not one small program per leaf),
    memoised on the layout (a later call of the same shapes does not retrace); ``single``:
    ``num = 1`` without the leading axis."""
    draw = lambda k: random_tree(k, like, part, num, kind)
    fn = (lambda k: jax.tree_util.tree_map(lambda x: x[0], draw(k))) if single else draw
    call = memo_compile(("draw", layout(like), part, num, kind, single), fn, key)
    return fn(key) if call is None else call(key)


_PRODUCTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_matvec(matvec: Matvec, v: PyTree) -> Callable | None:
    """The product ``v -> matvec(v)`` as ONE compiled program, memoised per matvec object.

    Every host loop (trace, Lanczos, quadrature, power iteration) calls this same program and
    does its own vector work in small programs of its own: the product runs exactly as a
    standalone jitted product (on CPU several times faster than inside a compiled loop), and
    it is compiled once per process for all estimators (once ever with the persistent cache).
    Like ``jax.jit``, the memo assumes the matvec does not change behind its identity.
    """
    key = (jax.tree_util.tree_structure(v),) + tuple(
        (jnp.shape(x), jnp.result_type(x)) for x in jax.tree_util.tree_leaves(v)
    )
    try:
        table = _PRODUCTS.setdefault(matvec, {})
    except TypeError:  # not weak-referenceable: no memo
        table = {}
    call = table.get(key)
    if call is None:
        call = compile_once(matvec, v)
        if call is not None:
            table[key] = call
    return call


def _index(xs: PyTree, i: jax.Array) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), xs)


def host_rows(
    matvec: Matvec, rows: PyTree, finish: Callable, take: Callable = _index
) -> PyTree | None:
    """``[finish(z_i, matvec(z_i)) for z_i = take(rows, i)]`` stacked, by a Python loop.

    Three calls per row: ``take`` and ``finish`` (small compiled programs, the outputs written
    into a donated buffer) around :func:`compiled_matvec`. ``None`` under a trace.
    """
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(rows)):
        return None
    m = jax.tree_util.tree_leaves(rows)[0].shape[0]
    first = np.int32(0)
    pick = compile_once(take, rows, first)
    if pick is None:
        return None
    z = pick(rows, first)
    product = compiled_matvec(matvec, z)
    if product is None:
        return None
    hz = product(z)
    shapes = jax.eval_shape(finish, z, hz)
    out = jax.tree_util.tree_map(lambda s: jnp.zeros((m,) + s.shape, s.dtype), shapes)

    def store(out, z, hz, i):
        return jax.tree_util.tree_map(lambda o, y: o.at[i].set(y), out, finish(z, hz))

    put = compile_once(store, out, z, hz, first, donate_argnums=(0,))
    out = put(out, z, hz, first)
    for i in range(1, m):
        z = pick(rows, np.int32(i))
        out = put(out, z, product(z), np.int32(i))
    return out
