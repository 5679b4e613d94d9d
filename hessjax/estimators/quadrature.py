"""Lanczos (Gauss) quadrature: v^T f(H) v, Tr f(H) and the spectral density.

References:
  Golub & Meurant, "Matrices, moments and quadrature with applications", 2010.
  Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature",
  SIAM J. Matrix Anal. Appl. 2017.
  Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian
  eigenvalue density", ICML 2019.
  Ju, Li & Zhang, ICML 2022 (arXiv:2206.02659): the truncated forms ``v_i^T H_i^+ v_i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessjax.estimators._base import (
    Estimate,
    Matvec,
    PyTree,
    check_chunk,
    check_int,
    draw_flat,
    draw_probes,
    flat_layout,
    host_loops,
    layout,
    map_probes,
    memo_compile,
    probe_layout,
    probe_stats,
    run_compiled,
    squeeze_layers,
)
from hessjax.estimators.lanczos import LanczosResult, lanczos_run, ritz_values
from hessjax.mapping import MapFn
from hessjax.partition import Partition


class SpectralDensity(NamedTuple):
    """The output of :func:`spectral_density`.

    Attributes:
      grid: the points ``t`` at which the density is evaluated, shape ``(num_grid,)``.
      density: the Gaussian-broadened density at ``grid``; it integrates to ~1.
      nodes: the Ritz values of every probe, shape ``(num_probes, m)`` (``m`` the number of
        Lanczos steps); entries of an exhausted Krylov space are 0 with weight 0.
      weights: the squared first components of the Ritz vectors (each row sums to 1).
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array


def positive_part(x: jax.Array) -> jax.Array:
    """``max(x, 0)`` elementwise: with :func:`quadratic_form` it gives ``v^T H^+ v``.

    Example:
      >>> import jax.numpy as jnp
      >>> positive_part(jnp.array([-1.0, 2.0]))
      Array([0., 2.], dtype=float32)
    """
    return jnp.maximum(x, 0)


def _gauss_quadrature(res: LanczosResult, sq_norm: jax.Array, fn: Callable) -> jax.Array:
    theta, vectors, genuine = ritz_values(res)
    weights = jnp.where(genuine, vectors[..., 0, :] ** 2, 0)
    values = jnp.where(genuine, fn(jnp.where(genuine, theta, 0)), 0)
    return sq_norm * jnp.sum(weights * values, axis=-1)


def _host_probes(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    num: int,
    num_iters: int,
    part: Partition,
    finish: Callable,
    reorthogonalize: bool | str = "partial",
) -> PyTree | None:
    """``finish(lanczos(z_p), ||z_p||^2 per layer)`` for ``num`` Rademacher probes (those of
    :func:`draw_probes`), stacked; the Lanczos steps of one probe after another from Python
    (one compiled step for all; ``None`` under a trace). One layer of every leaf: the probes
    are drawn raveled (:func:`draw_flat`) and never built as pytrees."""
    flat = flat_layout(part, like)
    probes = draw_flat(key, like, num) if flat else draw_probes(key, like, part, num)
    pick = lambda xs, p: jax.tree_util.tree_map(
        lambda x: jax.lax.dynamic_index_in_dim(x, p, keepdims=False), xs
    )
    take = memo_compile(("probe_row", layout(probes)), pick, probes, np.int32(0))
    if take is None:
        return None
    sq = (lambda x: jnp.dot(x, x)[None]) if flat else part.sq_norms
    out = []
    for p in range(num):
        z = take(probes, np.int32(p))
        if flat:
            res = lanczos_run(matvec, like, num_iters, part, host=True, keep_basis=False,
                              flat_start=z, reorthogonalize=reorthogonalize)  # fmt: skip
        else:
            res = lanczos_run(matvec, z, num_iters, part, host=True, keep_basis=False,
                              reorthogonalize=reorthogonalize)  # fmt: skip
        out.append(run_compiled(lambda r, x: finish(r, sq(x)), res, z))
    return run_compiled(lambda xs: jax.tree_util.tree_map(lambda *r: jnp.stack(r), *xs), out)


def quadratic_form(
    matvec: Matvec,
    v: PyTree,
    fn: Callable[[jax.Array], jax.Array],
    *,
    num_iters: int,
    partition: Partition | None = None,
    map_fn: MapFn | None = None,
    reorthogonalize: bool | str = "partial",
) -> jax.Array:
    """``v^T f(H) v`` by Lanczos (Gauss) quadrature started at ``v``.

    Maths: with Lanczos from ``v`` (``T = Q^T H Q``, ``T = Y diag(theta) Y^T``),
    ``v^T f(H) v ~= ||v||^2 e_1^T f(T) e_1 = ||v||^2 sum_j (e_1^T y_j)^2 f(theta_j)`` over the
    valid (non-exhausted) part of ``T``. This is ``m``-point Gauss quadrature of the spectral
    measure of ``v``: exact for polynomials ``f`` of degree ``< 2m`` and for any ``f`` once the
    Krylov space is exhausted (``num_iters >= dim``, or ``v`` in an invariant subspace of lower
    dimension). With ``fn = positive_part`` it is the paper's truncated form ``v^T H^+ v``.
    With a ``partition`` (block-diagonal matvec) the result is per layer:
    ``v_i^T f(H_ii) v_i``, shape ``(L,)``. Pure jnp with static shapes: vmap it over
    per-example matvecs freely.

    Cost: ``min(num_iters, largest layer size)`` matvecs; memory that many vectors; one
    ``eigh`` of an ``m x m`` tridiagonal per layer.

    Args:
      matvec: ``v -> H v``, symmetric (block-diagonal with a partition).
      v: the vector, a pytree (a zero ``v`` or zero layer gives 0, never NaN).
      fn: an elementwise jnp function of the eigenvalues (``jnp.exp``, :func:`positive_part`).
      num_iters: keyword-only, Lanczos steps ``>= 1``.
      partition: optional layers; the result then has shape ``(L,)``.
      map_fn: keyword-only, the loop strategy (:func:`hessjax.estimators.lanczos`); under
        ``vmap``/``jit`` always a ``lax`` loop.
      reorthogonalize: keyword-only; ``"partial"`` (the default): partial
        reorthogonalisation in the host loop of one layer of every leaf (Simon's estimates of
        the loss of orthogonality decide, step by step, whether the new vector is projected
        against the stored basis; the basis stays semi-orthogonal, ``|q_i^T q_k| <=
        sqrt(eps)``, which keeps Ritz values and the quadrature as accurate as with full
        reorthogonalisation, Simon 1984), full reorthogonalisation elsewhere (several layers,
        ``lax`` loops); on MobileNetV2, 2 probes x 40 steps, 28 of 80 steps projected, and
        the density's task time fell from 1.37x to 1.24x of its products. ``True``: every
        step projected. ``False``: Lanczos without reorthogonalisation
        (:func:`hessjax.estimators.lanczos`): no passes over the basis and, in the host loop,
        no stored basis (memory three vectors), at the price of ghost Ritz values, which the
        quadrature tolerates (Meurant & Strakos 2006), and of exactness at exhaustion. For a
        non-smooth ``fn`` it needs more steps: on MobileNetV2 (2.2M parameters, ``v`` = ones)
        ``positive_part`` was 28% off the reorthogonalised value at 20 steps and 3% at 120,
        while the identity agreed to float32 at every step count
        (``experiments/quadform_steps.py``); 1.06x instead of 1.38x of its products there.

    Returns:
      The scalar ``v^T f(H) v``, or the ``(L,)`` per-layer values.

    Raises:
      ValueError: ``num_iters < 1``, or ``v`` does not match ``partition``.
      TypeError: non-integer ``num_iters``, non-float ``v``.

    Example:
      >>> import jax.numpy as jnp
      >>> matvec = lambda v: jnp.array([-1.0, 2.0, 3.0]) * v
      >>> round(float(quadratic_form(matvec, jnp.ones(3), positive_part, num_iters=3)), 4)
      5.0

    References:
      Golub & Meurant, "Matrices, moments and quadrature with applications", 2010;
      Ju, Li & Zhang, ICML 2022 (``v_i^T H_i^+ v_i``).
    """
    num_iters = check_int("num_iters", num_iters)
    part, per_layer = probe_layout(v, partition, "v")
    num_iters = min(num_iters, max(part.sizes))
    host = host_loops(map_fn, v)
    res = lanczos_run(matvec, v, num_iters, part, host=host, keep_basis=False,
                      reorthogonalize=reorthogonalize)  # fmt: skip
    value = run_compiled(lambda res, v: _gauss_quadrature(res, part.sq_norms(v), fn), res, v)
    return value if per_layer else value[0]


def positive_quadratic_form(
    matvec: Matvec,
    v: PyTree,
    *,
    num_iters: int,
    partition: Partition | None = None,
    map_fn: MapFn | None = None,
) -> jax.Array:
    """The truncated quadratic form ``v^T H^+ v`` (``H^+``: negative eigenvalues set to 0).

    ``quadratic_form(matvec, v, positive_part, ...)``; see :func:`quadratic_form` for the maths,
    the cost and the per-layer version ``v_i^T H_ii^+ v_i``.

    Example:
      >>> import jax.numpy as jnp
      >>> matvec = lambda v: jnp.array([-1.0, 2.0]) * v
      >>> round(float(positive_quadratic_form(matvec, jnp.ones(2), num_iters=2)), 4)
      2.0

    References:
      Ju, Li & Zhang, ICML 2022, section 2 (``calH_i = max v_i^T H_i^+ v_i``).
    """
    return quadratic_form(
        matvec, v, positive_part, num_iters=num_iters, partition=partition, map_fn=map_fn
    )


def trace_of_function(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    fn: Callable[[jax.Array], jax.Array],
    *,
    num_probes: int,
    num_iters: int,
    chunk_size: int | None = None,
    partition: Partition | None = None,
    map_fn: MapFn | None = None,
    reorthogonalize: bool | str = "partial",
) -> Estimate:
    """``Tr f(H)`` by stochastic Lanczos quadrature (e.g. ``Tr H^+`` per layer).

    Maths: ``Tr f(H) = E[z^T f(H) z]`` for Rademacher ``z``; each ``z_p^T f(H) z_p`` by
    :func:`quadratic_form` (Gauss quadrature with ``num_iters`` nodes). Unbiased up to the
    quadrature error, which vanishes once ``num_iters >= dim``.

    Cost: ``num_probes * min(num_iters, largest layer size)`` matvecs; memory ``chunk_size``
    (or ``num_probes``) Lanczos bases of ``num_iters`` vectors each.

    Args:
      matvec: ``v -> H v``, symmetric (block-diagonal with a partition).
      like: a pytree with the shapes and dtypes of the vectors.
      key: a PRNG key.
      fn: an elementwise jnp function of the eigenvalues.
      num_probes: keyword-only, ``>= 1``.
      num_iters: keyword-only, Lanczos steps per probe ``>= 1``.
      chunk_size: keyword-only, how many probes run vmapped at once (``None``: all) in the
        ``lax`` path; the host loop (the default) runs probes one after another.
      partition: optional layers; then value and stderr have shape ``(L,)``.
      map_fn: keyword-only, the map over probes (:mod:`hessjax.mapping`; ``None``:
        :func:`hessjax.mapping.default_map_fn`); ``hessjax.sharding.mesh_map(mesh)`` splits the
        probes (each with its own Lanczos run) over a mesh; same probes as without, so the same
        result for the same ``key`` (to float tolerance).
      reorthogonalize: keyword-only; ``"partial"`` (the default), ``True`` or ``False``
        (see :func:`quadratic_form`).

    Returns:
      ``Estimate(value, stderr)`` (stderr NaN for one probe).

    Raises:
      ValueError: a size ``< 1``, or ``like`` does not match ``partition``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> matvec = lambda v: jnp.array([-1.0, 2.0, 3.0]) * v
      >>> est = trace_of_function(matvec, jnp.zeros(3), jax.random.key(0), positive_part,
      ...                         num_probes=2, num_iters=3)
      >>> round(float(est.value), 4)
      5.0

    References:
      Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl. 2017; Ju, Li & Zhang, ICML 2022
      (``max Tr H_i^+`` in the distance-constrained bound).
    """
    num_probes = check_int("num_probes", num_probes)
    num_iters = check_int("num_iters", num_iters)
    check_chunk(chunk_size)
    part, per_layer = probe_layout(like, partition, "like")
    num_iters = min(num_iters, max(part.sizes))
    finish = lambda res, sq: _gauss_quadrature(res, sq, fn)
    samples = None
    if host_loops(map_fn, key):
        samples = _host_probes(
            matvec, like, key, num_probes, num_iters, part, finish, reorthogonalize
        )
    if samples is None:
        probes = draw_probes(key, like, part, num_probes)

        def one(z: PyTree) -> jax.Array:
            res = lanczos_run(matvec, z, num_iters, part, reorthogonalize=reorthogonalize)
            return finish(res, part.sq_norms(z))

        samples = map_probes(one, probes, chunk_size, map_fn)  # (num_probes, L)
    return run_compiled(lambda x: squeeze_layers(probe_stats(x), per_layer), samples)


def spectral_density(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    *,
    num_probes: int,
    num_iters: int,
    grid: jax.Array | None = None,
    sigma: float | jax.Array | None = None,
    num_grid: int = 1000,
    chunk_size: int | None = None,
    map_fn: MapFn | None = None,
    reorthogonalize: bool | str = "partial",
) -> SpectralDensity:
    """The eigenvalue density of ``H`` by stochastic Lanczos quadrature, Gaussian-broadened.

    Maths: the spectral density ``phi(t) = (1/n) sum_i delta(t - lambda_i)``. For a unit
    Rademacher probe ``z``, ``z^T delta(t - H) z`` is approximated by Gauss quadrature with the
    Ritz values ``theta_j`` (nodes) and squared first eigenvector components ``tau_j``
    (weights, summing to 1) of Lanczos from ``z``; averaged over probes and smoothed with a
    Gaussian of width ``sigma``:
    ``phi_sigma(t) = (1/P) sum_p sum_j tau_pj N(t; theta_pj, sigma^2)``. It integrates to 1
    (up to the mass outside ``grid``).

    Cost: ``num_probes * min(num_iters, dim)`` matvecs; memory ``chunk_size`` (or
    ``num_probes``) Lanczos bases.

    Args:
      matvec: ``v -> H v``, symmetric.
      like: a pytree with the shapes and dtypes of the vectors.
      key: a PRNG key for the probes.
      num_probes: keyword-only, ``>= 1``.
      num_iters: keyword-only, Lanczos steps per probe ``>= 1``.
      grid: points at which to evaluate the density (1-D); default ``num_grid`` points from
        ``min theta - 5 sigma`` to ``max theta + 5 sigma``.
      sigma: the Gaussian width; default 1% of the range of the nodes (1% of ``|theta|`` or
        0.01 when the range is 0).
      num_grid: the number of default grid points.
      chunk_size: keyword-only, how many probes run vmapped at once (per device with a mesh
        map) in the ``lax`` path; the host loop (the default) runs probes one by one.
      map_fn: keyword-only, the map over probes (:mod:`hessjax.mapping`; ``None``:
        :func:`hessjax.mapping.default_map_fn`); ``hessjax.sharding.mesh_map(mesh)`` splits the
        probes (each with its own Lanczos run) over a mesh; same probes as without, so the same
        result for the same ``key`` (to float tolerance).
      reorthogonalize: keyword-only; ``"partial"`` (the default), ``True`` or ``False``
        (see :func:`quadratic_form`); ``False``: no reorthogonalisation (a ghost copy of a
        converged Ritz value splits its weight, so the density is unchanged to the
        quadrature's accuracy).

    Returns:
      A :class:`SpectralDensity` ``(grid, density, nodes, weights)``.

    Raises:
      ValueError: a size ``< 1``, a non-positive concrete ``sigma``, a grid that is not 1-D.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> matvec = lambda v: jnp.array([1.0, 2.0, 3.0]) * v
      >>> out = spectral_density(matvec, jnp.zeros(3), jax.random.key(0),
      ...                        num_probes=2, num_iters=3)
      >>> round(float(jnp.trapezoid(out.density, out.grid)), 3)
      1.0

    References:
      Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl. 2017; Ghorbani, Krishnan & Xiao,
      ICML 2019; Lin, Saad & Yang, "Approximating spectral densities of large matrices",
      SIAM Review 2016.
    """
    num_probes = check_int("num_probes", num_probes)
    num_iters = check_int("num_iters", num_iters)
    num_grid = check_int("num_grid", num_grid, minimum=2)
    check_chunk(chunk_size)
    if sigma is not None and not isinstance(sigma, jax.core.Tracer):
        s_arr = np.asarray(sigma)
        if s_arr.shape != () or not np.isfinite(s_arr) or not s_arr > 0:
            raise ValueError(f"sigma: expected a finite scalar > 0, got {sigma!r}")
    if grid is not None and jnp.ndim(grid) != 1:
        raise ValueError(f"grid must be 1-D, got shape {jnp.shape(grid)}")
    part, _ = probe_layout(like, None, "like")
    num_iters = min(num_iters, max(part.sizes))

    def finish(res: LanczosResult, sq: jax.Array) -> tuple[jax.Array, jax.Array]:
        theta, vectors, genuine = ritz_values(res)
        weights = jnp.where(genuine, vectors[..., 0, :] ** 2, 0)[0]
        return jnp.where(genuine, theta, 0)[0], weights

    out = None
    if host_loops(map_fn, key):
        out = _host_probes(matvec, like, key, num_probes, num_iters, part, finish, reorthogonalize)
    if out is None:
        probes = draw_probes(key, like, part, num_probes)
        run = lambda z: lanczos_run(matvec, z, num_iters, part, reorthogonalize=reorthogonalize)
        out = map_probes(
            lambda z: finish(run(z), None),
            probes,
            chunk_size,
            map_fn,
        )
    nodes, weights = out
    dtype = nodes.dtype
    has = weights > 0
    lo = jnp.min(jnp.where(has, nodes, jnp.inf))
    hi = jnp.max(jnp.where(has, nodes, -jnp.inf))
    if sigma is None:
        span = hi - lo
        sigma = 0.01 * jnp.where(span > 0, span, jnp.where(hi != 0, jnp.abs(hi), 1.0))
    sigma = jnp.asarray(sigma, dtype)
    if grid is None:
        grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_grid, dtype=dtype)
    grid = jnp.asarray(grid, dtype)
    z = (grid[:, None, None] - nodes[None]) / sigma
    kernel = jnp.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    density = jnp.sum(kernel * weights[None], axis=(1, 2)) / num_probes
    return SpectralDensity(grid, density, nodes, weights)
