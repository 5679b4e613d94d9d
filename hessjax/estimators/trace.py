"""Stochastic trace estimators: Hutchinson and Hutch++ (whole operator or per layer).

References:
  Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines", 1989.
  Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace estimation", SOSA 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hessjax.estimators._base import (
    Estimate,
    Matvec,
    PyTree,
    check_chunk,
    check_int,
    draw_probes,
    flat_ravel,
    flat_size,
    flat_unravel,
    host_loops,
    host_rows,
    map_probes,
    probe_layout,
    probe_stats,
    random_flat,
    run_compiled,
    squeeze_layers,
)
from hessjax.mapping import MapFn
from hessjax.partition import Partition


def hutchinson_trace(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    *,
    num_probes: int,
    chunk_size: int | None = None,
    partition: Partition | None = None,
    map_fn: MapFn | None = None,
) -> Estimate:
    """Hutchinson's stochastic trace estimate of a symmetric operator.

    Maths: ``Tr H = E[z^T H z]`` for Rademacher ``z`` (i.i.d. +-1 entries); the estimate is the
    mean of ``z_p^T H z_p`` over ``num_probes`` probes, with variance
    ``2 (||H||_F^2 - sum_i H_ii^2) / num_probes``: exact (stderr 0) for a diagonal ``H``. With a
    ``partition`` the matvec is taken as block-diagonal and the per-layer traces
    ``Tr H_ii = E[z_i^T H_ii z_i]`` come from the same probes (``partition.dot``).

    Cost: ``num_probes`` matvecs, vmapped ``chunk_size`` at a time (memory ``chunk_size``
    matvecs and probes); with ``map_fn`` over ``D`` devices ``ceil(num_probes / D)`` per device.

    Args:
      matvec: ``v -> H v`` over pytrees like ``like`` (block-diagonal with a partition).
      like: a pytree with the shapes and dtypes of the vectors (e.g. params).
      key: a PRNG key for the probes.
      num_probes: keyword-only, the number of probes ``>= 1``.
      chunk_size: keyword-only, how many probes are vmapped at once (``None``: all).
      partition: optional layers; then value and stderr have shape ``(L,)``.
      map_fn: keyword-only, the map over probes (:mod:`hessjax.mapping`); ``None``:
        :func:`hessjax.mapping.default_map_fn`, on one device. ``hessjax.sharding.mesh_map(mesh)``
        splits the probes over a mesh's data axis (any ``num_probes``; ``chunk_size`` then applies
        per device). The probes are drawn as without it, so the estimate equals the single-device
        one for the same ``key`` (to float tolerance).

    Returns:
      ``Estimate(value, stderr)``; ``stderr`` is ``std(ddof=1) / sqrt(num_probes)``, NaN when
      ``num_probes == 1``.

    Raises:
      ValueError: ``num_probes < 1``, or ``like`` does not match ``partition``.
      TypeError: non-integer sizes, non-float ``like``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> matvec = lambda v: jnp.array([1.0, 2.0, 3.0]) * v
      >>> est = hutchinson_trace(matvec, jnp.zeros(3), jax.random.key(0), num_probes=4)
      >>> float(est.value), float(est.stderr)
      (6.0, 0.0)

    References:
      Hutchinson 1989; Ju, Li & Zhang, ICML 2022 (per-layer traces ``Tr H_i``).
    """
    num_probes = check_int("num_probes", num_probes)
    check_chunk(chunk_size)
    part, per_layer = probe_layout(like, partition, "like")
    probes = draw_probes(key, like, part, num_probes)
    samples = host_rows(matvec, probes, part.dot) if host_loops(map_fn, key) else None
    if samples is None:
        samples = map_probes(lambda z: part.dot(z, matvec(z)), probes, chunk_size, map_fn)
    return run_compiled(lambda x: squeeze_layers(probe_stats(x), per_layer), samples)


def _segments(part: Partition) -> np.ndarray:
    """The layer of every coordinate of the raveled vector (``L`` for no layer)."""
    out = [
        np.full(int(np.prod(shape, dtype=np.int64)), g if g >= 0 else part.num_layers, np.int32)
        for shape, g in zip(part.leaf_shapes, part.leaf_layer, strict=True)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.int32)


def hutchpp_trace(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    *,
    num_probes: int,
    chunk_size: int | None = None,
    partition: Partition | None = None,
    map_fn: MapFn | None = None,
) -> Estimate:
    """Hutch++ trace estimate: an exact trace on a sketched top subspace plus Hutchinson.

    Maths (Meyer et al. 2021): with ``s = num_probes // 3`` Rademacher sketch vectors ``S``,
    ``Q = qr(H S)`` (orthonormal, ``n x s``) and ``g = num_probes - 2 s`` Rademacher ``G``,
    ``Tr H ~= Tr(Q^T H Q) + (1/g) sum_p g_p^T (I - QQ^T) H (I - QQ^T) g_p``.
    The first term is exact; the second is Hutchinson on the deflated operator, whose
    variance ``~ ||(I-QQ^T) H (I-QQ^T)||_F^2 / g`` is small when the spectrum decays: for a
    relative error ``eps`` Hutch++ needs ``O(1/eps)`` matvecs where Hutchinson needs
    ``O(1/eps^2)``. Computed on raveled vectors (``ravel_pytree``'s order). With a
    ``partition`` every layer gets its own ``Q_i = qr((H S)_i)``; the block-diagonal matvec
    serves all layers at once, so the cost does not grow with ``L``.

    Cost: exactly ``num_probes`` matvecs (``s`` + ``s`` + ``g``); memory ``num_probes + s``
    raveled vectors (the draws, the sketch ``H S``, the basis) plus ``chunk_size`` matvecs in
    flight: the ``s + g`` products with ``Q`` and ``G`` are reduced to their quadratic forms as
    they are made; one QR of ``n_i x s`` per layer.

    Args:
      matvec: ``v -> H v`` over pytrees like ``like`` (block-diagonal with a partition).
      like: a pytree with the shapes and dtypes of the vectors.
      key: a PRNG key.
      num_probes: keyword-only, the total number of matvecs, ``>= 3``.
      chunk_size: keyword-only, how many vectors are vmapped at once (``None``: all).
      partition: optional layers; then value and stderr have shape ``(L,)``.
      map_fn: keyword-only, the map over vectors (:mod:`hessjax.mapping`; ``None``:
        :func:`hessjax.mapping.default_map_fn`); with ``hessjax.sharding.mesh_map(mesh)`` the ``s``,
        ``s`` and ``g`` matvecs of each stage are split over the mesh (same estimate as without,
        for the same ``key``).

    Returns:
      ``Estimate(value, stderr)``; ``stderr`` is that of the Hutchinson part (the sketch part
      is treated as fixed), NaN when ``g == 1`` (``num_probes`` 3).

    Raises:
      ValueError: ``num_probes < 3``, or ``like`` does not match ``partition``.
      TypeError: non-integer sizes, non-float ``like``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> matvec = lambda v: jnp.array([1.0, 2.0, 3.0]) * v
      >>> est = hutchpp_trace(matvec, jnp.zeros(3), jax.random.key(0), num_probes=9)
      >>> round(float(est.value), 4)   # s = 3 >= n: the sketch part is already exact
      6.0

    References:
      Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace estimation",
      SOSA 2021.
    """
    num_probes = check_int("num_probes", num_probes, minimum=3)
    check_chunk(chunk_size)
    part, per_layer = probe_layout(like, partition, "like")
    unravel = flat_unravel(like)  # nothing eager: ravel_pytree(like) would concatenate it
    n, dtype = flat_size(like)
    num_layers = part.num_layers
    seg = _segments(part)
    mask = jnp.asarray(seg < num_layers, dtype)
    s = num_probes // 3
    g = num_probes - 2 * s

    host = host_loops(map_fn, key)
    ravel = lambda hv: flat_ravel(hv, dtype)

    def apply(rows: jax.Array) -> jax.Array:  # (m, n) -> (m, n): H applied to every row
        if host:
            take = lambda rows, i: unravel(jax.lax.dynamic_index_in_dim(rows, i, keepdims=False))
            out = host_rows(matvec, rows, lambda z, hz: ravel(hz), take)
            if out is not None:
                return out
        return map_probes(lambda x: ravel(matvec(unravel(x))), rows, chunk_size, map_fn)

    def forms(rows: jax.Array) -> jax.Array:  # (m, n) -> (m, L): per-layer z_i^T H_ii z_i
        # of every row; the products are reduced where they are made, never stored (two
        # stages of three keep no product vectors: 2s fewer raveled rows in memory)
        if host:
            take = lambda rows, i: unravel(jax.lax.dynamic_index_in_dim(rows, i, keepdims=False))
            out = host_rows(matvec, rows, part.dot, take)
            if out is not None:
                return out
        return map_probes(
            lambda x: (lambda z: part.dot(z, matvec(z)))(unravel(x)), rows, chunk_size, map_fn
        )

    # Each layer's entries: a static slice when contiguous (always for one layer of all
    # leaves), else an index array. A gather and scatter of (s, n) rows where a slice would
    # do cost about a product each on MobileNetV2.
    layers = []
    for i in range(num_layers):
        idx = np.flatnonzero(seg == i)
        contiguous = idx.size and idx[-1] - idx[0] + 1 == idx.size
        layers.append(slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx)

    def sketch_basis(sketch: jax.Array) -> jax.Array:  # rows: the columns of block-diagonal Q
        if len(layers) == 1 and layers[0] == slice(0, n):
            q, _ = jnp.linalg.qr(sketch.T)
            return jnp.zeros((s, n), dtype).at[: q.shape[1]].set(q.T)
        basis = jnp.zeros((s, n), dtype)
        for idx in layers:
            q, _ = jnp.linalg.qr(sketch[:, idx].T)  # (n_i, min(n_i, s))
            basis = basis.at[: q.shape[1], idx].set(q.T)
        return basis

    def deflate(basis: jax.Array, probes: jax.Array) -> jax.Array:
        if len(layers) == 1 and layers[0] == slice(0, n):
            return probes - (probes @ basis.T) @ basis
        for idx in layers:
            q = basis[:, idx]  # (s, n_i)
            block = probes[:, idx]
            probes = probes.at[:, idx].set(block - (block @ q.T) @ q)
        return probes

    def combine(basis_forms, probe_forms) -> Estimate:
        exact = jnp.sum(basis_forms, axis=0)  # Tr(Q_i^T H_ii Q_i), (L,)
        rest = probe_stats(probe_forms)  # samples (g, L)
        return squeeze_layers(Estimate(exact + rest.value, rest.stderr), per_layer)

    # one draw for S and G, 32 signs per random word (random_flat: a float per sign cost
    # about a second for 99 probes of MobileNetV2 on CPU, a tenth of the products)
    draws = run_compiled(lambda k: random_flat(k, s + g, n, dtype) * mask, key)
    basis = run_compiled(sketch_basis, apply(draws[:s]))
    basis_forms = forms(basis)
    probes = run_compiled(deflate, basis, draws[s:])
    return run_compiled(combine, basis_forms, forms(probes))
