"""Mapping a function over the rows of a batch: the one loop every estimator and measure uses.

The probe estimators map a matvec over probe vectors and the measures map a per-example
computation over examples. Both take a *map function* ``map_fn(fn, xs, *, chunk_size)`` that
returns ``jax.vmap(fn)(xs)``, computed however it likes:

* :func:`chunked_vmap` (the loop inside one program; what :func:`host_map` becomes under a
  trace): vmapped ``chunk_size`` rows at a time, chunks one after another with ``lax.map``, on
  one device;
* :func:`host_map` (the default, on every backend): a Python loop over chunks that calls ONE
  compiled program per chunk (:func:`compile_once`); under a trace (inside ``jit``) it is
  :func:`chunked_vmap`;
* :class:`hessjax.sharding.MeshMap` (``hessjax.sharding.mesh_map(mesh)``): the rows split over a
  device mesh, each device running :func:`chunked_vmap` on its share.

Why a host loop on CPU: XLA:CPU runs the same Hessian-vector product about 3-4x slower as the
body of a compiled loop (``lax.map``, ``scan``, ``fori_loop``, ``while_loop``) than as a program
of its own (MobileNetV2 at 32x32, batch 32: 0.25 s alone, 0.67-0.75 s per product in a 4-step
``lax.map``/``fori_loop``, 0.16 s per product unrolled), and vmapping probes through
convolutions is no faster than one probe after another. A Python loop over a compiled step
costs one dispatch (microseconds) per step.

On a GPU (one NVIDIA H200, the same MobileNetV2 problem, ``experiments/bench_peers.py --map-fn
host | vmap``, results in ``experiments/results/bench_peers_gpu_host.json``): the host loop ran
every estimator at 0.62-1.21x of its products (one product 0.019 s; the loop overlaps each
dispatch with the previous product), first calls 4-6 s; the loop inside one program
(:func:`chunked_vmap`, all 100 Hutchinson probes vmapped) took 109 s for its first Hutchinson
call, asked XLA for 66-88 GiB, and did not finish the other tasks' first calls within the 4
minutes left. So :func:`default_map_fn` is :func:`host_map` on every backend; pass
:func:`chunked_vmap` (with a ``chunk_size``) to keep a loop in one program, and any map
function inside ``jit`` runs as :func:`chunked_vmap`.
Estimators that loop themselves (Lanczos, power iteration) check :func:`drives_host_loop` and
then drive their steps from Python too.

The finding is about products of a BATCH loss (``noise_stability``'s too: eagerly it loops
over its draws and probes from Python, one jitted program each). The per-example measures
(``layer_traces``, the canonical ``hessian_distance``) stay single compiled programs on CPU:
there the vmapped per-example block products with the linearisation fused ran at 0.55x of
their products called one by one (MobileNetV2's later blocks, 2 examples), and a Python loop
over compiled steps, which traces each example's linearisation anew, was 2.8-4x slower.

A map function may carry two optional attributes the measures read: ``num_devices`` (how many
rows run in parallel per chunk step, default 1; used to size refinement rounds) and
``place(tree)`` (where values closed over by ``fn`` should live, default: unchanged). The core
(``estimators``, ``measures``) depends only on this protocol, never on the sharding module.
A map function is a static argument of jitted code: it must be hashable (functions and frozen
dataclasses are).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "MapFn",
    "chunked_vmap",
    "host_map",
    "compile_once",
    "default_map_fn",
    "drives_host_loop",
    "num_rows",
    "check_chunk_size",
    "check_map_fn",
    "num_devices",
    "place",
]


class MapFn(Protocol):
    """``map_fn(fn, xs, *, chunk_size=None) -> jax.vmap(fn)(xs)`` (see the module docstring)."""

    def __call__(
        self, fn: Callable[[PyTree], PyTree], xs: PyTree, *, chunk_size: int | None = None
    ) -> PyTree: ...


def num_rows(xs: PyTree, name: str) -> int:
    """The shared leading size ``m >= 1`` of the leaves of ``xs``; raises naming ``name``.

    Example:
      >>> import jax.numpy as jnp
      >>> num_rows({"x": jnp.ones((3, 2)), "y": jnp.ones(3)}, "batch")
      3
    """
    leaves = jax.tree_util.tree_leaves(xs)
    if not leaves:
        raise ValueError(f"{name} must have at least one leaf")
    if any(jnp.ndim(x) < 1 for x in leaves):
        raise ValueError(f"every leaf of {name} must have a leading (batch) axis")
    m = jnp.shape(leaves[0])[0]
    if any(jnp.shape(x)[0] != m for x in leaves):
        sizes = sorted({jnp.shape(x)[0] for x in leaves})
        raise ValueError(f"leaves of {name} must share one leading size, got sizes {sizes}")
    if m < 1:
        raise ValueError(f"{name} must hold at least one row, got leading size 0")
    return m


def check_chunk_size(chunk_size: Any, name: str = "chunk_size") -> None:
    """Raises unless ``chunk_size`` is ``None`` or an int ``>= 1``."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"{name} must be a positive int or None, got {chunk_size!r}")


def chunked_vmap(fn: Callable[[PyTree], PyTree], xs: PyTree, *, chunk_size: int | None = None):
    """``jax.vmap(fn)(xs)`` evaluated ``chunk_size`` rows at a time (memory-bounded vmap).

    Within a chunk the calls are vmapped; chunks run one after another with ``lax.map``, so at
    most ``chunk_size`` calls are in flight. The last chunk is padded with zeros and the padded
    rows dropped, so any leading size ``m`` works (``fn`` must tolerate all-zero inputs without
    raising; their outputs are discarded). This is the default map function (:class:`MapFn`)
    of every estimator and measure.

    Cost: ``m`` calls of ``fn``; memory ``chunk_size`` (or ``m``) times that of one call.

    Args:
      fn: a function of one row (a pytree without the leading axis).
      xs: a pytree whose leaves share a leading axis ``m >= 1``.
      chunk_size: keyword-only; ``None`` vmaps all ``m`` rows at once.

    Returns:
      The stacked outputs, leading axis ``m``.

    Raises:
      ValueError: no leaves, leaves without or with different leading sizes, ``m == 0``, or a
        ``chunk_size`` that is not a positive int.

    Example:
      >>> import jax.numpy as jnp
      >>> chunked_vmap(lambda x: x.sum(), jnp.arange(10.0).reshape(5, 2), chunk_size=2)
      Array([ 1.,  5.,  9., 13., 17.], dtype=float32)
    """
    m = num_rows(xs, "xs")
    check_chunk_size(chunk_size)
    batched = jax.vmap(fn)
    if chunk_size is None or chunk_size >= m:
        return batched(xs)
    num_chunks = -(-m // chunk_size)
    pad = num_chunks * chunk_size - m

    def to_chunks(x):
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        return x.reshape((num_chunks, chunk_size) + x.shape[1:])

    out = jax.lax.map(batched, jax.tree_util.tree_map(to_chunks, xs))
    return jax.tree_util.tree_map(lambda y: y.reshape((-1,) + y.shape[2:])[:m], out)


def check_map_fn(map_fn: Any) -> MapFn:
    """``map_fn``, or :func:`default_map_fn` for ``None``; raises unless it is a hashable callable.

    Example:
      >>> check_map_fn(None) is default_map_fn()
      True
    """
    if map_fn is None:
        return default_map_fn()
    if not callable(map_fn):
        raise TypeError(
            "map_fn must be a map function map_fn(fn, xs, *, chunk_size) such as "
            f"hessjax.chunked_vmap or hessjax.sharding.mesh_map(mesh), got {type(map_fn).__name__}"
        )
    try:
        hash(map_fn)
    except TypeError:
        raise TypeError("map_fn must be hashable (a function or a frozen dataclass)") from None
    return map_fn


def num_devices(map_fn: MapFn) -> int:
    """How many rows ``map_fn`` runs side by side per chunk step (its ``num_devices``, else 1).

    Example:
      >>> num_devices(chunked_vmap)
      1
    """
    return int(getattr(map_fn, "num_devices", 1))


def place(map_fn: MapFn, tree: PyTree) -> PyTree:
    """``map_fn.place(tree)`` (e.g. replicated over a mesh) if it has one, else ``tree``.

    Example:
      >>> place(chunked_vmap, 1.0)
      1.0
    """
    placer = getattr(map_fn, "place", None)
    return tree if placer is None else placer(tree)


# --------------------------------------------------------------------------- compile once
def _traced(leaves) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in leaves)


class _Program:
    """A traced function, equal to another when their printed jaxprs and trees are equal.

    Used as the static argument of one jitted evaluator, so that functions traced anew (fresh
    closures over other arrays of the same shapes) share one compiled executable: every array
    the function closes over is a *constant of the jaxpr* and is passed as an argument, never
    baked into the program.
    """

    __slots__ = ("jaxpr", "in_tree", "out_tree", "donate", "_key", "_hash")

    def __init__(self, jaxpr, in_tree, out_tree, donate: tuple[int, ...]):
        self.jaxpr, self.in_tree, self.out_tree, self.donate = jaxpr, in_tree, out_tree, donate
        self._key = (str(jaxpr), in_tree, out_tree, donate)
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Program) and self._key == other._key


def _evaluate(program: _Program, consts, kept, given):
    num = len(kept) + len(given)
    kept, given = iter(kept), iter(given)
    args = [next(given) if i in program.donate else next(kept) for i in range(num)]
    out = jax.core.eval_jaxpr(program.jaxpr, consts, *jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(program.out_tree, out)


_run = jax.jit(_evaluate, static_argnums=0)
_run_donating = jax.jit(_evaluate, static_argnums=0, donate_argnums=3)


def compile_once(fn: Callable, *args: Any, donate_argnums: tuple[int, ...] = ()):
    """``fn`` compiled for the shapes of ``args``, once per computation, not once per closure.

    Traces ``fn(*args)`` to a jaxpr whose constants (every array ``fn`` closes over: the
    residuals of a linearised gradient, a dense matrix) become arguments of one jitted
    evaluator keyed by the printed jaxpr. A later call with a fresh closure of the same
    computation and shapes (another ``hvp_fn`` at other params, another estimator call) runs
    the executable compiled the first time: nothing is retraced by ``jit`` and nothing
    recompiles. Positional args listed in ``donate_argnums`` are donated (updated in place:
    loop states such as a Lanczos basis); their values are invalid after the call.

    Cost: one abstract trace of ``fn`` and printing its jaxpr (milliseconds to a fraction of a
    second for a large network); the first call of a new computation compiles it.

    Args:
      fn: a function of arrays (pytrees) returning arrays.
      *args: example arguments (their shapes and dtypes fix the program; pass arrays, not
        Python numbers, for values that change between calls).
      donate_argnums: keyword-only, positions of ``args`` to donate.

    Returns:
      ``call(*args) -> fn(*args)``, or ``None`` when ``args`` or the closure of ``fn`` hold
      tracers (inside ``jit``/``vmap``: then the caller should use ``lax`` loops).

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.arange(3.0)
      >>> call = compile_once(lambda x: x * w, jnp.ones(3))
      >>> call(jnp.ones(3))
      Array([0., 1., 2.], dtype=float32)
    """
    if _traced(jax.tree_util.tree_leaves(args)):
        return None
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if _traced(closed.consts):
        return None
    donate = tuple(sorted({int(i) for i in donate_argnums}))
    program = _Program(
        closed.jaxpr, jax.tree_util.tree_structure(args), jax.tree_util.tree_structure(out_shape),
        donate,
    )  # fmt: skip
    consts = list(closed.consts)
    run = _run_donating if donate else _run

    def call(*new_args):
        kept = tuple(a for i, a in enumerate(new_args) if i not in donate)
        given = tuple(a for i, a in enumerate(new_args) if i in donate)
        return run(program, consts, kept, given)

    return call


# --------------------------------------------------------------------------- host loop
def _host_rows(fn: Callable, xs: PyTree, m: int, c: int):
    """The compiled chunk step of :func:`host_map`, or None under a trace."""

    def step(xs, out, start):
        rows = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, c), xs)
        if c == 1:  # no vmap: an unbatched product (vmap of a size-1 axis can change the kernels)
            ys = jax.tree_util.tree_map(
                lambda y: y[None], fn(jax.tree_util.tree_map(lambda x: x[0], rows))
            )
        else:
            ys = jax.vmap(fn)(rows)
        if out is None:
            return ys
        return jax.tree_util.tree_map(
            lambda o, y: jax.lax.dynamic_update_slice_in_dim(o, y.astype(o.dtype), start, 0),
            out,
            ys,
        )

    zero = np.int32(0)
    shapes = jax.eval_shape(lambda xs: step(xs, None, zero), xs)
    out = jax.tree_util.tree_map(lambda s: jnp.zeros((m,) + s.shape[1:], s.dtype), shapes)
    call = compile_once(step, xs, out, zero, donate_argnums=(1,))
    return call, out


def host_map(fn: Callable[[PyTree], PyTree], xs: PyTree, *, chunk_size: int | None = None):
    """``jax.vmap(fn)(xs)`` by a Python loop over chunks, each chunk ONE compiled call.

    The map function (:class:`MapFn`) for CPU: ``fn`` runs on ``chunk_size`` rows at a time
    (vmapped; one row unvmapped), the chunks one after another from Python, all through one
    program compiled once per computation and shapes (:func:`compile_once`): the rows are
    sliced and the outputs written into a preallocated (donated) result on the device, so a
    step costs one dispatch. Inside ``jit`` or ``vmap`` (``xs`` or the closure of ``fn`` hold
    tracers) it is :func:`chunked_vmap`. When ``chunk_size`` does not divide ``m`` the last
    chunk starts at ``m - chunk_size`` (its first rows are computed twice, same values).

    Cost: ``m`` calls of ``fn`` (plus at most ``chunk_size - 1`` repeated in the last chunk);
    memory ``chunk_size`` calls and the outputs.

    Args:
      fn: a function of one row.
      xs: a pytree whose leaves share a leading axis ``m >= 1``.
      chunk_size: keyword-only, rows per compiled call; ``None``: 1 (fastest on CPU for conv
        nets; vmapping probes through convolutions did not pay there).

    Returns:
      The stacked outputs, leading axis ``m`` (as ``jax.vmap(fn)(xs)``).

    Example:
      >>> import jax.numpy as jnp
      >>> host_map(lambda x: x.sum(), jnp.arange(10.0).reshape(5, 2), chunk_size=2)
      Array([ 1.,  5.,  9., 13., 17.], dtype=float32)
    """
    m = num_rows(xs, "xs")
    check_chunk_size(chunk_size)
    if _traced(jax.tree_util.tree_leaves(xs)):
        return chunked_vmap(fn, xs, chunk_size=chunk_size)
    c = min(1 if chunk_size is None else chunk_size, m)
    call, out = _host_rows(fn, xs, m, c)
    if call is None:
        return chunked_vmap(fn, xs, chunk_size=chunk_size)
    for start in range(0, m, c):
        out = call(xs, out, np.int32(min(start, m - c)))
    return out


host_map.drives_host_loop = True


def drives_host_loop(map_fn: MapFn) -> bool:
    """Whether ``map_fn`` asks loops to run from Python over compiled steps (:func:`host_map`).

    Example:
      >>> drives_host_loop(host_map), drives_host_loop(chunked_vmap)
      (True, False)
    """
    return bool(getattr(map_fn, "drives_host_loop", False))


def default_map_fn() -> MapFn:
    """The map function of ``map_fn=None``: :func:`host_map`, on every backend.

    Chosen by measurement on CPU and on one GPU (see the module docstring: a host loop over the
    compiled product ran every estimator within 1.25x of its products on both, the loop inside
    one program up to 4x slower on CPU and with 100x longer first calls on the GPU). Under a
    trace (inside ``jit``) it runs as :func:`chunked_vmap`. Not measured on TPU.

    Example:
      >>> default_map_fn() is host_map
      True
    """
    return host_map
