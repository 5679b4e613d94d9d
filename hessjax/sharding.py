"""Scaling out over a device mesh with JAX's own SPMD engine (``jax.sharding``).

One mesh axis (``"data"`` by default) splits a leading axis: the examples of the Hessian
distance measure, the probes of the stochastic estimators, the batch of a training step.
Parameters are replicated by default (:func:`replicate`); large ones can be split along one
axis, FSDP-style (:func:`fsdp_sharding`), and ``jit`` (GSPMD) inserts the collectives.

* :func:`make_mesh` builds a 1-D ``Mesh`` from the available devices (all hosts' devices after
  :func:`initialize_distributed`).
* :func:`shard_batch` pads a batch to a multiple of the device count (repeating the last row,
  so padded rows stay finite) and places it with a ``NamedSharding``; it returns a mask of the
  true rows so reductions stay exact (a max ignores padded rows, a mean divides by the true
  count).
* :func:`sharded_map` is :func:`hessjax.chunked_vmap` with the rows split over the mesh: each
  device maps its own rows (``jax.shard_map``), ``chunk_size`` at a time, and the outputs come
  back in the original order, replicated.

Multi-host: call :func:`initialize_distributed` (``jax.distributed.initialize``) once per
process before anything else touches JAX; :func:`make_mesh` then spans every host's devices and
the same code runs unchanged (each process must hold the same host data).

References:
  JAX documentation, "Distributed arrays and automatic parallelization" and "Manual
  parallelism with shard_map"; Xu et al., "GSPMD: general and scalable parallelization for ML
  computation graphs", 2021; Zhao et al., "PyTorch FSDP", VLDB 2023 (the FSDP layout).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hessjax.mapping import check_chunk_size, chunked_vmap, num_rows

PyTree = Any

__all__ = [
    "make_mesh",
    "mesh_size",
    "shard_batch",
    "replicate",
    "fsdp_sharding",
    "sharded_map",
    "MeshMap",
    "mesh_map",
    "put",
    "row_sharding",
    "initialize_distributed",
]

# Environment variables read by :func:`initialize_distributed`.
ENV_COORDINATOR = "HESSJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "HESSJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "HESSJAX_PROCESS_ID"


def make_mesh(
    devices: int | Sequence[jax.Device] | None = None, *, axis_name: str = "data"
) -> Mesh:
    """A 1-D device mesh with one named axis (the data-parallel axis).

    Args:
      devices: ``None`` for every device (of every process after
        :func:`initialize_distributed`), an int ``N`` for the first ``N`` of ``jax.devices()``,
        or an explicit sequence of devices.
      axis_name: keyword-only, the name of the mesh axis.

    Returns:
      ``jax.sharding.Mesh`` of shape ``(N,)`` with axis ``axis_name``.

    Raises:
      ValueError: ``devices`` is an int < 1 or larger than the number of devices (the message
        says how to simulate CPU devices), an empty or repeated sequence, or an empty
        ``axis_name``.
      TypeError: ``devices`` of another type.

    Example:
      >>> mesh = make_mesh(1)
      >>> mesh.axis_names, mesh.devices.shape
      (('data',), (1,))
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"axis_name must be a non-empty str, got {axis_name!r}")
    available = jax.devices()
    if devices is None:
        chosen = list(available)
    elif isinstance(devices, bool):
        raise TypeError(f"devices must be None, an int or a sequence of devices, got {devices!r}")
    elif isinstance(devices, int | np.integer):
        if devices < 1 or devices > len(available):
            raise ValueError(
                f"devices must be between 1 and the {len(available)} available "
                f"{available[0].platform} device(s), got {int(devices)} (on CPU, simulate "
                "more with XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
            )
        chosen = list(available[: int(devices)])
    elif isinstance(devices, Sequence) and not isinstance(devices, str):
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices must not be an empty sequence")
        if len({d.id for d in chosen}) != len(chosen):
            raise ValueError(f"devices must not repeat a device, got {chosen}")
    else:
        raise TypeError(
            f"devices must be None, an int or a sequence of devices, got {type(devices).__name__}"
        )
    return Mesh(np.array(chosen, dtype=object), (axis_name,))


def _axis(mesh: Mesh, axis_name: str | None) -> str:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name is None:
        return "data" if "data" in mesh.axis_names else mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    return axis_name


def mesh_size(mesh: Mesh, axis_name: str | None = None) -> int:
    """The number of devices along the data axis of ``mesh``.

    Example:
      >>> mesh_size(make_mesh(1))
      1
    """
    return int(mesh.shape[_axis(mesh, axis_name)])


def _place(tree: PyTree, sharding: Any) -> PyTree:
    """``device_put`` that also works across processes (identical host data everywhere).

    ``sharding`` is one ``NamedSharding`` for every leaf or a pytree of them like ``tree``.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    if isinstance(sharding, NamedSharding):
        return jax.tree_util.tree_map(lambda x: one(x, sharding), tree)
    return jax.tree_util.tree_map(one, tree, sharding)


def _pad_rows(xs: PyTree, multiple: int) -> tuple[PyTree, int, int]:
    """Pads the leading axis to a multiple of ``multiple`` by repeating the last row."""
    m = num_rows(xs, "batch")
    padded = -(-m // multiple) * multiple
    if padded == m:
        return xs, m, padded

    def pad(x):
        x = jnp.asarray(x) if isinstance(x, jax.core.Tracer) else np.asarray(x)
        lib = jnp if isinstance(x, jax.core.Tracer) else np
        return lib.concatenate([x, lib.repeat(x[-1:], padded - m, axis=0)])

    return jax.tree_util.tree_map(pad, xs), m, padded


def shard_batch(
    batch: PyTree, mesh: Mesh, *, axis_name: str | None = None
) -> tuple[PyTree, jax.Array]:
    """Pads a batch to a multiple of the device count and splits it over the mesh.

    The leading axis ``m`` of every leaf is padded to ``ceil(m / D) * D`` (``D`` the devices
    along ``axis_name``) by repeating the last row, so losses of padded rows stay finite, and
    the leaves are placed with ``NamedSharding(mesh, P(axis_name))``: device ``d`` holds rows
    ``d * m_pad / D ... (d + 1) * m_pad / D - 1``. The returned mask is True on the ``m``
    true rows: use it so padded rows never win a max (``where(mask, x, -inf)``) and never
    enter a mean (``sum(mask * x) / m``).

    Cost: one host-to-device copy of the batch (each device receives its rows only).

    Args:
      batch: a pytree whose leaves share a leading axis ``m >= 1`` (arrays or numpy).
      mesh: the mesh (:func:`make_mesh`).
      axis_name: keyword-only, the mesh axis to split over (default ``"data"``, or the first).

    Returns:
      ``(padded_batch, mask)``; ``mask`` is a boolean ``(m_pad,)`` array sharded like the rows.

    Raises:
      ValueError: leaves without or with different leading sizes, an empty batch, or an
        ``axis_name`` that is not in the mesh.

    Example:
      >>> import numpy as np
      >>> xs, mask = shard_batch(np.arange(3.0), make_mesh(1))
      >>> xs.tolist(), mask.tolist()
      ([0.0, 1.0, 2.0], [True, True, True])
    """
    axis = _axis(mesh, axis_name)
    padded, m, total = _pad_rows(batch, mesh_size(mesh, axis))
    sharding = NamedSharding(mesh, P(axis))
    mask = np.arange(total) < m
    return _place(padded, sharding), _place(mask, sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places a full copy of every leaf of ``tree`` on every device of ``mesh``.

    Cost: one copy of ``tree`` per device.

    Example:
      >>> import jax.numpy as jnp
      >>> p = replicate({"w": jnp.ones(2)}, make_mesh(1))
      >>> p["w"].sharding.spec
      P()
    """
    return _place(tree, NamedSharding(_check_mesh(mesh), P()))


def _check_mesh(mesh: Mesh) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    return mesh


def fsdp_sharding(
    params: PyTree, mesh: Mesh, *, min_size: int = 2**18, axis_name: str | None = None
) -> PyTree:
    """FSDP-style shardings: big leaves split along one axis, small ones replicated.

    A leaf with at least ``min_size`` elements is split over the mesh axis along its largest
    dimension divisible by the device count ``D`` (ties: the first); leaves below the
    threshold, or without a divisible dimension, are replicated. Place the params with
    ``jax.device_put(params, fsdp_sharding(params, mesh))``; under ``jit`` GSPMD all-gathers a
    split leaf where it is used and reduce-scatters its gradient, so results equal those with
    replicated params (to float tolerance) while each device stores about ``1 / D`` of the big
    leaves.

    Args:
      params: the params pytree (arrays or shape/dtype structs).
      mesh: the mesh.
      min_size: keyword-only, the smallest leaf (in elements) that is split, ``>= 1``.
      axis_name: keyword-only, the mesh axis (default ``"data"``, or the first).

    Returns:
      A pytree like ``params`` of ``NamedSharding``.

    Raises:
      ValueError: ``min_size < 1`` or an unknown ``axis_name``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = fsdp_sharding({"w": jnp.ones((4, 8)), "b": jnp.ones(8)}, make_mesh(1), min_size=16)
      >>> s["w"].spec, s["b"].spec
      (P(None, 'data'), P())
    """
    axis = _axis(mesh, axis_name)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be an int >= 1, got {min_size!r}")
    d = mesh_size(mesh, axis)

    def one(leaf):
        shape = tuple(np.shape(leaf))
        if int(np.prod(shape, dtype=np.int64)) < min_size:
            return NamedSharding(mesh, P())
        divisible = [i for i, s in enumerate(shape) if s % d == 0]
        if not divisible:
            return NamedSharding(mesh, P())
        i = max(divisible, key=lambda j: (shape[j], -j))
        spec = [None] * len(shape)
        spec[i] = axis
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map(one, params)


def sharded_map(
    fn: Callable[[PyTree], PyTree],
    xs: PyTree,
    mesh: Mesh,
    *,
    chunk_size: int | None = None,
    axis_name: str | None = None,
) -> PyTree:
    """``chunked_vmap(fn, xs, chunk_size=...)`` with the rows split over a mesh axis.

    The leading axis ``m`` is padded to a multiple of the device count ``D`` (repeating the
    last row), split over the axis, and every device maps its ``ceil(m / D)`` rows with
    :func:`hessjax.chunked_vmap` (``chunk_size`` at a time) inside ``jax.shard_map``; the
    padded rows are dropped and the outputs returned in the original row order, replicated on
    every device. Values ``fn`` closes over (params, a linearised Hessian) are replicated.
    No collective runs inside ``fn``: rows are independent, so the result equals the
    single-device map up to float reassociation. Works eagerly and under ``jit``.

    Cost: ``ceil(m / D)`` calls of ``fn`` per device, memory ``chunk_size`` calls per device;
    one all-gather of the outputs.

    Args:
      fn: a function of one row (no collectives).
      xs: a pytree whose leaves share a leading axis ``m >= 1``.
      mesh: the mesh.
      chunk_size: keyword-only, rows vmapped at once on each device (``None``: all).
      axis_name: keyword-only, the mesh axis (default ``"data"``, or the first).

    Returns:
      The stacked outputs, leading axis ``m``.

    Raises:
      ValueError: bad ``xs`` (see :func:`hessjax.chunked_vmap`), a bad ``chunk_size`` or an
        unknown ``axis_name``.

    Example:
      >>> import jax.numpy as jnp
      >>> sharded_map(lambda x: x.sum(), jnp.ones((5, 2)), make_mesh(1), chunk_size=2)
      Array([2., 2., 2., 2., 2.], dtype=float32)
    """
    axis = _axis(mesh, axis_name)
    check_chunk_size(chunk_size)
    m = num_rows(xs, "xs")
    rows = NamedSharding(mesh, P(axis))
    padded, _, _ = _pad_rows(xs, mesh_size(mesh, axis))
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(padded))
    padded = jax.lax.with_sharding_constraint(padded, rows) if traced else _place(padded, rows)
    body = lambda local: chunked_vmap(fn, local, chunk_size=chunk_size)
    out = jax.shard_map(body, mesh=mesh, in_specs=P(axis), out_specs=P(axis), check_vma=False)(
        padded
    )
    return _gather(out, m, mesh)


@functools.partial(jax.jit, static_argnames=("m", "mesh"))
def _gather_jit(out, *, m, mesh):
    out = jax.tree_util.tree_map(lambda y: y[:m], out)
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))


def _gather(out: PyTree, m: int, mesh: Mesh) -> PyTree:
    return _gather_jit(out, m=m, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class MeshMap:
    """A map function (:class:`hessjax.mapping.MapFn`) that splits the rows over a mesh axis.

    ``MeshMap(mesh)(fn, xs, chunk_size=c)`` is :func:`sharded_map` ``(fn, xs, mesh,
    chunk_size=c)``; pass it as ``map_fn=`` to any estimator or measure to run it
    data-parallel. ``num_devices`` is the device count along the axis; ``place(tree)``
    replicates values closed over by the mapped function. Frozen and hashable, so it can be a
    static argument of ``jit``.

    Example:
      >>> import jax.numpy as jnp
      >>> MeshMap(make_mesh(1))(lambda x: 2 * x, jnp.arange(3.0)).tolist()
      [0.0, 2.0, 4.0]
    """

    mesh: Mesh
    axis_name: str | None = None

    def __post_init__(self) -> None:
        _axis(self.mesh, self.axis_name)  # raises naming the mesh or the axis

    @property
    def num_devices(self) -> int:
        return mesh_size(self.mesh, self.axis_name)

    def place(self, tree: PyTree) -> PyTree:
        return replicate(tree, self.mesh)

    def __call__(
        self, fn: Callable[[PyTree], PyTree], xs: PyTree, *, chunk_size: int | None = None
    ) -> PyTree:
        return sharded_map(fn, xs, self.mesh, chunk_size=chunk_size, axis_name=self.axis_name)


def mesh_map(mesh: Mesh | None, axis_name: str | None = None) -> Any:
    """The map function for ``mesh``: :class:`MeshMap`, or :func:`hessjax.chunked_vmap` for None.

    Example:
      >>> from hessjax.mapping import chunked_vmap
      >>> mesh_map(None) is chunked_vmap
      True
    """
    return chunked_vmap if mesh is None else MeshMap(mesh, axis_name)


def put(tree: PyTree, sharding: Any) -> PyTree:
    """``jax.device_put(tree, sharding)`` that also works across processes.

    Every process must hold the same host data (as after :func:`initialize_distributed`).
    ``sharding`` is one ``NamedSharding`` for every leaf or a pytree of them like ``tree``
    (e.g. :func:`fsdp_sharding`).

    Example:
      >>> import jax.numpy as jnp
      >>> put(jnp.ones(2), row_sharding(make_mesh(1))).sharding.spec
      P('data',)
    """
    return _place(tree, sharding)


def row_sharding(mesh: Mesh, axis_name: str | None = None) -> NamedSharding:
    """``NamedSharding(mesh, P(axis))``: the leading (row) axis split over the data axis.

    Example:
      >>> row_sharding(make_mesh(1)).spec
      P('data',)
    """
    return NamedSharding(mesh, P(_axis(mesh, axis_name)))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-host job (``jax.distributed.initialize``); a no-op for one process.

    Arguments left ``None`` are read from the environment variables
    ``HESSJAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``HESSJAX_NUM_PROCESSES``
    and ``HESSJAX_PROCESS_ID``. When none is given anywhere, ``jax.distributed.initialize()``
    is called without arguments only if JAX can detect a cluster itself (SLURM, Open MPI,
    Cloud TPU: ``JAX_COORDINATOR_ADDRESS`` or a scheduler's variables); otherwise nothing
    happens and ``False`` is returned. Call it once per process, before any other JAX call.

    Args:
      coordinator_address: ``"host:port"`` of process 0.
      num_processes: the number of processes ``>= 1``.
      process_id: this process, ``0 <= process_id < num_processes``.

    Returns:
      True when ``jax.distributed.initialize`` was called.

    Raises:
      ValueError: a non-integer or out-of-range ``num_processes``/``process_id`` (from the
        arguments or the environment), or ``num_processes > 1`` without a coordinator.

    Example:
      >>> initialize_distributed(num_processes=1)   # one process: nothing to do
      False

    References:
      JAX documentation, "Multi-host and multi-process environments".
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    num_processes = _env_int(num_processes, ENV_NUM_PROCESSES, "num_processes")
    process_id = _env_int(process_id, ENV_PROCESS_ID, "process_id")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        return False
    if num_processes is None and coordinator_address is None:
        detected = any(
            k in env for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
        )
        if not detected:
            return False
        jax.distributed.initialize()
        return True
    if coordinator_address is None:
        raise ValueError(
            f"coordinator_address (or {ENV_COORDINATOR}) is required with "
            f"num_processes={num_processes}"
        )
    if process_id is not None and num_processes is not None:
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True


def _env_int(value: int | None, var: str, name: str) -> int | None:
    if value is None:
        raw = os.environ.get(var)
        if raw is None or raw == "":
            return None
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name} ({var}) must be an int, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)
