"""Matrix-free estimators for a symmetric operator given as a matvec ``v -> H v``.

Trace (Hutchinson, Hutch++), Lanczos with full reorthogonalisation, extreme eigenvalues,
spectral density (stochastic Lanczos quadrature), quadratic forms ``v^T f(H) v`` (Gauss
quadrature), ``Tr f(H)`` and a PyHessian-style power iteration for comparison.

Conventions (as in matfree): an estimator is a pure function that takes the operator as a
``matvec`` over params-shaped pytrees (any symmetric linear operator: a Hessian from
:func:`hessjax.hvp.hvp_fn`, the block-diagonal layer Hessian from
:func:`hessjax.hvp.block_hvp_fn`, a dense matrix), a ``like`` pytree that fixes the shapes, and,
where random, an explicit PRNG ``key``. Static sizes (``num_probes``, ``num_iters``, ``k``,
``chunk_size``) are keyword-only. Everything is jittable with the matvec closed over; probes are
vmapped in chunks of ``chunk_size`` (:func:`hessjax.hvp.chunked_vmap`). Random estimators return
an :class:`Estimate` ``(value, stderr)``.

Per-layer versions: given a :class:`~hessjax.partition.Partition` the matvec is assumed to be
block-diagonal over its layers (``v -> (H_11 v_1, ..., H_LL v_L)``). Layers are disjoint, so all
layers run at once on one params-shaped pytree: one matvec per step serves every layer, and the
per-layer scalars (inner products, norms, Lanczos coefficients) get a leading axis ``L``.
Leaves that belong to no layer are ignored (set to zero in probes and start vectors).

References:
  Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines", 1989.
  Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace estimation", SOSA 2021.
  Lanczos, 1950; Golub & Meurant, "Matrices, moments and quadrature", 1994/2010.
  Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature",
  SIAM J. Matrix Anal. Appl. 2017.
  Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian
  eigenvalue density", ICML 2019.
  Yao, Gholami, Keutzer & Mahoney, "PyHessian", 2020 (power iteration with deflation).
  Ju, Li & Zhang, ICML 2022 (arXiv:2206.02659): the truncated forms ``v_i^T H_i^+ v_i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hessjax.hvp import chunked_vmap
from hessjax.partition import Partition

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

# Lanczos breakdown: beta_j <= _BREAKDOWN_RTOL * sqrt(num_iters) * eps * scale, where ``scale``
# is the running maximum of ||H q_i|| (per layer), is taken as an exhausted Krylov space.
_BREAKDOWN_RTOL = 10.0


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


class LanczosResult(NamedTuple):
    """The output of :func:`lanczos` (leading ``(L,)`` on the scalars with a partition).

    Attributes:
      alphas: diagonal of the tridiagonal ``T``, shape ``(num_iters,)`` or ``(L, num_iters)``;
        zero from index ``num_valid`` on.
      betas: ``betas[j] = ||r_j||``, the coupling of ``q_j`` and ``q_{j+1}``, same shape;
        ``betas[:-1]`` are the off-diagonals of ``T`` and ``betas[-1]`` is the final residual
        norm. Exactly zero from index ``num_valid - 1`` on (Krylov space exhausted).
      basis: the orthonormal Lanczos vectors ``q_0, ..., q_{num_iters-1}`` as one pytree like
        ``v0`` with a leading axis ``num_iters`` (per layer: layer ``i`` of ``basis[j]`` is the
        ``j``-th vector of layer ``i``); zero from index ``num_valid`` on.
      num_valid: the dimension of the Krylov space found, ``<= num_iters`` (int32, scalar or
        ``(L,)``); 0 for a zero start vector.
    """

    alphas: jax.Array
    betas: jax.Array
    basis: PyTree
    num_valid: jax.Array


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


# --------------------------------------------------------------------------- validation
def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_chunk(chunk_size: Any) -> None:
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size)


def _layout(like: PyTree, partition: Partition | None, name: str) -> tuple[Partition, bool]:
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
        from hessjax.partition import path_name

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


def _dtype(tree: PyTree) -> Any:
    return jnp.result_type(*jax.tree_util.tree_leaves(tree))


def _squeeze(x: Any, per_layer: bool) -> Any:
    return x if per_layer else jax.tree_util.tree_map(lambda a: a[0], x)


def _random_tree(
    key: jax.Array, like: PyTree, part: Partition, num: int, kind: str = "rademacher"
) -> PyTree:
    """``num`` random vectors shaped like ``like`` (leading axis ``num``), zero off-layer.

    One draw for all leaves (one random-bits kernel: much cheaper to compile than one per
    leaf), sliced into the leaves in leaf order. ``kind`` is ``"rademacher"`` or ``"normal"``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves]
    dtype = jnp.result_type(*leaves)
    shape = (num, sum(sizes))
    if kind == "rademacher":
        flat = jax.random.rademacher(key, shape, dtype)
    else:
        flat = jax.random.normal(key, shape, dtype)
    out, start = [], 0
    for leaf, size, g in zip(leaves, sizes, part.leaf_layer, strict=True):
        piece = flat[:, start : start + size].reshape((num,) + jnp.shape(leaf))
        piece = piece.astype(jnp.result_type(leaf))
        out.append(piece if g >= 0 else jnp.zeros_like(piece))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def _stats(samples: jax.Array) -> Estimate:
    """Mean and standard error over the leading (probe) axis."""
    num = samples.shape[0]
    std = jnp.std(samples, axis=0, ddof=1) if num > 1 else jnp.full(samples.shape[1:], jnp.nan)
    return Estimate(jnp.mean(samples, axis=0), std.astype(samples.dtype) / math.sqrt(num))


# --------------------------------------------------------------------------- trace
def hutchinson_trace(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    *,
    num_probes: int,
    chunk_size: int | None = None,
    partition: Partition | None = None,
) -> Estimate:
    """Hutchinson's stochastic trace estimate of a symmetric operator.

    Maths: ``Tr H = E[z^T H z]`` for Rademacher ``z`` (i.i.d. +-1 entries); the estimate is the
    mean of ``z_p^T H z_p`` over ``num_probes`` probes, with variance
    ``2 (||H||_F^2 - sum_i H_ii^2) / num_probes``: exact (stderr 0) for a diagonal ``H``. With a
    ``partition`` the matvec is taken as block-diagonal and the per-layer traces
    ``Tr H_ii = E[z_i^T H_ii z_i]`` come from the same probes (``partition.dot``).

    Cost: ``num_probes`` matvecs, vmapped ``chunk_size`` at a time (memory ``chunk_size``
    matvecs and probes).

    Args:
      matvec: ``v -> H v`` over pytrees like ``like`` (block-diagonal with a partition).
      like: a pytree with the shapes and dtypes of the vectors (e.g. params).
      key: a PRNG key for the probes.
      num_probes: keyword-only, the number of probes ``>= 1``.
      chunk_size: keyword-only, how many probes are vmapped at once (``None``: all).
      partition: optional layers; then value and stderr have shape ``(L,)``.

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
    num_probes = _check_int("num_probes", num_probes)
    _check_chunk(chunk_size)
    part, per_layer = _layout(like, partition, "like")
    probes = _random_tree(key, like, part, num_probes)
    products = chunked_vmap(matvec, probes, chunk_size=chunk_size)
    samples = jax.vmap(part.dot)(probes, products)  # (num_probes, L)
    return _squeeze(_stats(samples), per_layer)


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
) -> Estimate:
    """Hutch++ trace estimate: an exact trace on a sketched top subspace plus Hutchinson.

    Maths (Meyer et al. 2021): with ``s = num_probes // 3`` Rademacher sketch vectors ``S``,
    ``Q = qr(H S)`` (orthonormal, ``n x s``) and ``g = num_probes - 2 s`` Rademacher ``G``,
    ``Tr H ~= Tr(Q^T H Q) + (1/g) sum_p g_p^T (I - QQ^T) H (I - QQ^T) g_p``.
    The first term is exact; the second is Hutchinson on the deflated operator, whose
    variance ``~ ||(I-QQ^T) H (I-QQ^T)||_F^2 / g`` is small when the spectrum decays: for a
    relative error ``eps`` Hutch++ needs ``O(1/eps)`` matvecs where Hutchinson needs
    ``O(1/eps^2)``. Computed on raveled vectors (``jax.flatten_util.ravel_pytree``). With a
    ``partition`` every layer gets its own ``Q_i = qr((H S)_i)``; the block-diagonal matvec
    serves all layers at once, so the cost does not grow with ``L``.

    Cost: exactly ``num_probes`` matvecs (``s`` + ``s`` + ``g``); memory ``num_probes`` raveled
    vectors plus ``chunk_size`` matvecs in flight; one QR of ``n_i x s`` per layer.

    Args:
      matvec: ``v -> H v`` over pytrees like ``like`` (block-diagonal with a partition).
      like: a pytree with the shapes and dtypes of the vectors.
      key: a PRNG key.
      num_probes: keyword-only, the total number of matvecs, ``>= 3``.
      chunk_size: keyword-only, how many vectors are vmapped at once (``None``: all).
      partition: optional layers; then value and stderr have shape ``(L,)``.

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
    num_probes = _check_int("num_probes", num_probes, minimum=3)
    _check_chunk(chunk_size)
    part, per_layer = _layout(like, partition, "like")
    flat, unravel = ravel_pytree(like)
    n, dtype, num_layers = flat.shape[0], flat.dtype, part.num_layers
    seg = _segments(part)
    mask = jnp.asarray(seg < num_layers, dtype)
    s = num_probes // 3
    g = num_probes - 2 * s

    def apply(rows: jax.Array) -> jax.Array:  # (m, n) -> (m, n): H applied to every row
        fn = lambda x: ravel_pytree(matvec(unravel(x)))[0].astype(dtype)
        return chunked_vmap(fn, rows, chunk_size=chunk_size)

    def per_layer_sum(x: jax.Array) -> jax.Array:  # (n, ...) -> (L, ...)
        return jax.ops.segment_sum(x, seg, num_segments=num_layers + 1)[:num_layers]

    draws = jax.random.rademacher(key, (s + g, n), dtype) * mask  # one draw: S and G
    sketch = apply(draws[:s])
    layers = [np.flatnonzero(seg == i) for i in range(num_layers)]
    basis = jnp.zeros((s, n), dtype)  # rows: the columns of the block-diagonal Q
    for idx in layers:
        q, _ = jnp.linalg.qr(sketch[:, idx].T)  # (n_i, min(n_i, s))
        basis = basis.at[: q.shape[1], idx].set(q.T)
    exact = per_layer_sum(jnp.sum(basis * apply(basis), axis=0))  # Tr(Q_i^T H_ii Q_i)

    probes = draws[s:]
    for idx in layers:
        q = basis[:, idx]  # (s, n_i)
        block = probes[:, idx]
        probes = probes.at[:, idx].set(block - (block @ q.T) @ q)
    samples = per_layer_sum((probes * apply(probes)).T).T  # (g, L)
    rest = _stats(samples)
    return _squeeze(Estimate(exact + rest.value, rest.stderr), per_layer)


# --------------------------------------------------------------------------- Lanczos
def _combine(part: Partition, stacked: PyTree, coef: jax.Array) -> PyTree:
    """``sum_j coef[j, layer] * stacked[j]`` leafwise (zero on leaves in no layer)."""
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    out = []
    for leaf, g in zip(leaves, part.leaf_layer, strict=True):
        if g >= 0:
            out.append(jnp.tensordot(coef[:, g].astype(leaf.dtype), leaf, axes=1))
        else:
            out.append(jnp.zeros(leaf.shape[1:], leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _safe_inverse(x: jax.Array, ok: jax.Array) -> jax.Array:
    return jnp.where(ok, 1.0 / jnp.where(ok, x, 1.0), 0.0).astype(x.dtype)


def _lanczos(matvec: Matvec, v0: PyTree, num_iters: int, part: Partition) -> LanczosResult:
    """Lanczos on the layers of ``part`` at once; scalars with a leading ``(L,)`` axis."""
    dtype = _dtype(v0)
    num_layers = part.num_layers
    tol = _BREAKDOWN_RTOL * math.sqrt(num_iters) * float(jnp.finfo(dtype).eps)
    norm0 = jnp.sqrt(part.sq_norms(v0))
    active0 = norm0 > 0
    q0 = part.scale(v0, _safe_inverse(norm0, active0))
    basis = jax.tree_util.tree_map(
        lambda x: jnp.zeros((num_iters,) + x.shape, x.dtype).at[0].set(x), q0
    )
    dots = jax.vmap(part.dot, in_axes=(0, None))

    def body(j, state):
        basis, alphas, betas, active, num_valid, scale = state
        q = jax.tree_util.tree_map(lambda x: x[j], basis)
        w = matvec(q)
        alpha = part.dot(q, w)
        scale = jnp.maximum(scale, jnp.sqrt(part.sq_norms(w)))
        for _ in range(2):  # full reorthogonalisation: classical Gram-Schmidt, twice
            w = jax.tree_util.tree_map(jnp.subtract, w, _combine(part, basis, dots(basis, w)))
        beta = jnp.sqrt(part.sq_norms(w))
        ok = active & (beta > tol * scale)
        alphas = alphas.at[j].set(jnp.where(active, alpha, 0))
        betas = betas.at[j].set(jnp.where(ok, beta, 0))
        q_next = part.scale(w, _safe_inverse(beta, ok))
        basis = jax.tree_util.tree_map(lambda x, y: x.at[j + 1].set(y, mode="drop"), basis, q_next)
        return basis, alphas, betas, ok, num_valid + active.astype(jnp.int32), scale

    zeros = jnp.zeros((num_iters, num_layers), dtype)
    state = (
        basis,
        zeros,
        zeros,
        active0,
        jnp.zeros((num_layers,), jnp.int32),
        jnp.zeros((num_layers,), dtype),
    )
    basis, alphas, betas, _, num_valid, _ = jax.lax.fori_loop(0, num_iters, body, state)
    return LanczosResult(alphas.T, betas.T, basis, num_valid)


def lanczos(
    matvec: Matvec,
    v0: PyTree,
    *,
    num_iters: int,
    partition: Partition | None = None,
) -> LanczosResult:
    """Lanczos tridiagonalisation with full reorthogonalisation, started at ``v0``.

    Maths: builds an orthonormal basis ``Q = [q_0, ..., q_{m-1}]`` of the Krylov space
    ``span{v0, H v0, ..., H^{m-1} v0}`` with ``q_0 = v0 / ||v0||`` and ``Q^T H Q = T``
    tridiagonal (``diag(alphas)``, off-diagonals ``betas[:-1]``). Each new vector is
    orthogonalised against ALL stored vectors by two passes of classical Gram-Schmidt, so the
    basis stays orthonormal to working precision (no ghost eigenvalues). When the Krylov space
    is exhausted (``beta_j <= 10 sqrt(m) eps max_i ||H q_i||``, ``eps`` the dtype's machine
    epsilon) ``beta_j`` is set to exactly 0, the remaining vectors and alphas are 0, and
    ``num_valid = j + 1``: the Ritz values of the valid block are then exact eigenvalues of
    ``H`` (with ``num_iters >= dim`` and a generic start, all of them). With a ``partition`` the
    matvec is taken as block-diagonal and every layer runs its own recurrence, all at once on
    one pytree (per-layer inner products and breakdowns).

    Cost: ``num_iters`` matvecs (one per step for all layers); memory ``num_iters`` vectors
    (the basis) plus O(num_iters) work per step for the reorthogonalisation (``4 num_iters``
    vector operations).

    Args:
      matvec: ``v -> H v``, symmetric (block-diagonal with a partition).
      v0: the start vector, a pytree (need not be normalised; zero gives all zeros).
      num_iters: keyword-only, the number of steps ``m >= 1``.
      partition: optional layers; then every scalar output has a leading axis ``L``.

    Returns:
      A :class:`LanczosResult` ``(alphas, betas, basis, num_valid)``.

    Raises:
      ValueError: ``num_iters < 1``, or ``v0`` does not match ``partition``.
      TypeError: non-integer ``num_iters``, non-float ``v0``.

    Example:
      >>> import jax.numpy as jnp
      >>> matvec = lambda v: jnp.array([1.0, 2.0, 3.0]) * v
      >>> res = lanczos(matvec, jnp.ones(3), num_iters=5)
      >>> int(res.num_valid), float(res.betas[2])   # exhausted after 3 steps
      (3, 0.0)

    References:
      Lanczos 1950; Golub & Van Loan, "Matrix computations", section 10.1 (full
      reorthogonalisation); Ju, Li & Zhang, ICML 2022.
    """
    num_iters = _check_int("num_iters", num_iters)
    part, per_layer = _layout(v0, partition, "v0")
    res = _lanczos(matvec, v0, num_iters, part)
    if per_layer:
        return res
    return LanczosResult(res.alphas[0], res.betas[0], res.basis, res.num_valid[0])


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """``(..., m), (..., m) -> (..., m, m)`` symmetric tridiagonal with off-diagonal betas[:-1]."""
    m = alphas.shape[-1]
    off = betas[..., :-1]
    eye = jnp.eye(m, dtype=alphas.dtype)
    up = jnp.eye(m, k=1, dtype=alphas.dtype)
    pad = jnp.concatenate([off, jnp.zeros_like(off[..., :1])], axis=-1)
    return alphas[..., None] * eye + pad[..., :, None] * up + pad[..., None, :] * up.T


def _ritz(res: LanczosResult) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eigen-decomposition of ``T``, spurious (exhausted) entries moved to the front.

    Returns ``(theta, vectors, genuine)``: ascending Ritz values ``(..., m)``, eigenvectors of
    ``T`` as columns ``(..., m, m)``, and a mask of the genuine ones (the last ``num_valid``).
    Entries past ``num_valid`` get a diagonal sentinel below every genuine Ritz value
    (Gershgorin), so they sort first and never mix with genuine ones.
    """
    alphas, betas = res.alphas, res.betas
    m = alphas.shape[-1]
    index = jnp.arange(m)
    valid = index < res.num_valid[..., None]
    radius = jnp.max(jnp.abs(jnp.where(valid, alphas, 0)), axis=-1) + 2 * jnp.max(
        jnp.abs(betas), axis=-1
    )
    sentinel = -2 * radius - 1
    diag = jnp.where(valid, alphas, sentinel[..., None])
    theta, vectors = jnp.linalg.eigh(_tridiagonal(diag, betas))
    genuine = index >= m - res.num_valid[..., None]
    return theta, vectors, genuine


def _gauss_quadrature(res: LanczosResult, sq_norm: jax.Array, fn: Callable) -> jax.Array:
    theta, vectors, genuine = _ritz(res)
    weights = jnp.where(genuine, vectors[..., 0, :] ** 2, 0)
    values = jnp.where(genuine, fn(jnp.where(genuine, theta, 0)), 0)
    return sq_norm * jnp.sum(weights * values, axis=-1)


# --------------------------------------------------------------------------- quadratic forms
def quadratic_form(
    matvec: Matvec,
    v: PyTree,
    fn: Callable[[jax.Array], jax.Array],
    *,
    num_iters: int,
    partition: Partition | None = None,
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
    num_iters = _check_int("num_iters", num_iters)
    part, per_layer = _layout(v, partition, "v")
    num_iters = min(num_iters, max(part.sizes))
    res = _lanczos(matvec, v, num_iters, part)
    value = _gauss_quadrature(res, part.sq_norms(v), fn)
    return value if per_layer else value[0]


def positive_quadratic_form(
    matvec: Matvec,
    v: PyTree,
    *,
    num_iters: int,
    partition: Partition | None = None,
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
    return quadratic_form(matvec, v, positive_part, num_iters=num_iters, partition=partition)


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
      chunk_size: keyword-only, how many probes run vmapped at once (``None``: all).
      partition: optional layers; then value and stderr have shape ``(L,)``.

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
    num_probes = _check_int("num_probes", num_probes)
    num_iters = _check_int("num_iters", num_iters)
    _check_chunk(chunk_size)
    part, per_layer = _layout(like, partition, "like")
    num_iters = min(num_iters, max(part.sizes))
    probes = _random_tree(key, like, part, num_probes)

    def one(z: PyTree) -> jax.Array:
        return _gauss_quadrature(_lanczos(matvec, z, num_iters, part), part.sq_norms(z), fn)

    samples = chunked_vmap(one, probes, chunk_size=chunk_size)  # (num_probes, L)
    return _squeeze(_stats(samples), per_layer)


# --------------------------------------------------------------------------- eigenvalues
def eigenvalues(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    *,
    k: int,
    which: str = "top",
    num_iters: int | None = None,
    return_vectors: bool = False,
    partition: Partition | None = None,
) -> Any:
    """The ``k`` largest and/or smallest eigenvalues by Lanczos from a random start.

    Maths: Lanczos (full reorthogonalisation) from a Gaussian ``v0``; the Ritz values (the
    eigenvalues of the valid part of ``T``) converge to the extreme eigenvalues first, at a
    rate set by the relative gaps (Kaniel-Paige); with ``num_iters >= dim`` they are the exact
    spectrum. Eigenvectors are the Ritz vectors ``Q y_j``. If the Krylov space is exhausted
    after ``r < k`` steps (``H`` has fewer than ``k`` distinct eigenvalues, or the start is
    orthogonal to the rest), the missing values (and vectors) are NaN.

    Cost: ``num_iters`` matvecs (default ``min(dim, 2 k + 20)``, capped at the largest layer
    size); memory ``num_iters`` vectors.

    Args:
      matvec: ``v -> H v``, symmetric (block-diagonal with a partition).
      like: a pytree with the shapes and dtypes of the vectors.
      key: a PRNG key for the start vector.
      k: keyword-only, how many eigenvalues, ``1 <= k <= dim`` (per layer: the smallest layer).
      which: ``"top"`` (descending), ``"bottom"`` (ascending) or ``"both"``.
      num_iters: keyword-only, Lanczos steps ``>= k``.
      return_vectors: also return the eigenvectors (pytrees like ``like`` stacked on a leading
        axis ``k``; per layer, leaf ``i`` of vector ``j`` is layer ``i``'s ``j``-th vector).
      partition: optional layers; eigenvalues then have shape ``(L, k)``.

    Returns:
      ``values`` (shape ``(k,)`` or ``(L, k)``), or ``(values, vectors)`` with
      ``return_vectors``; for ``which="both"`` a pair ``(top, bottom)`` of these.

    Raises:
      ValueError: ``k < 1``, ``k`` larger than the dimension, ``num_iters < k``, an unknown
        ``which``, or ``like`` that does not match ``partition``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> matvec = lambda v: jnp.array([1.0, 2.0, 3.0, 4.0]) * v
      >>> top = eigenvalues(matvec, jnp.zeros(4), jax.random.key(0), k=2, num_iters=4)
      >>> [round(float(x), 4) for x in top]
      [4.0, 3.0]

    References:
      Lanczos 1950; Golub & Van Loan, "Matrix computations", chapter 10; Ghorbani et al.,
      ICML 2019.
    """
    if which not in ("top", "bottom", "both"):
        raise ValueError(f"which must be 'top', 'bottom' or 'both', got {which!r}")
    k = _check_int("k", k)
    part, per_layer = _layout(like, partition, "like")
    dim = min(part.sizes)
    if k > dim:
        what = "the smallest layer size" if per_layer else "the dimension"
        raise ValueError(f"k must be <= {what} {dim}, got k={k}")
    if num_iters is None:
        num_iters = min(max(part.sizes), 2 * k + 20)
    num_iters = _check_int("num_iters", num_iters)
    if num_iters < k:
        raise ValueError(f"num_iters must be >= k={k}, got {num_iters}")
    num_iters = min(num_iters, max(part.sizes))

    v0 = jax.tree_util.tree_map(lambda x: x[0], _random_tree(key, like, part, 1, "normal"))
    res = _lanczos(matvec, v0, num_iters, part)
    theta, vectors, _ = _ritz(res)  # (L, m), (L, m, m)
    m = num_iters
    t = jnp.arange(k)
    found = t < res.num_valid[:, None]  # (L, k)

    def pick(index: jax.Array) -> Any:  # index: (L, k) positions in the ascending order
        values = jnp.where(found, jnp.take_along_axis(theta, index, axis=-1), jnp.nan)
        values = _squeeze(values, per_layer)
        if not return_vectors:
            return values
        coef = jnp.take_along_axis(vectors, index[:, None, :], axis=-1)  # (L, m, k)
        coef = jnp.where(found[:, None, :], coef, jnp.nan)
        stacked = [_combine(part, res.basis, coef[:, :, j].T) for j in range(k)]
        vecs = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *stacked)
        return values, vecs

    top = pick(jnp.broadcast_to(m - 1 - t, found.shape))
    bottom_index = jnp.minimum(m - res.num_valid[:, None] + t, m - 1)
    if which == "top":
        return top
    if which == "bottom":
        return pick(bottom_index)
    return top, pick(bottom_index)


# --------------------------------------------------------------------------- density
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
      chunk_size: keyword-only, how many probes run vmapped at once.

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
    num_probes = _check_int("num_probes", num_probes)
    num_iters = _check_int("num_iters", num_iters)
    num_grid = _check_int("num_grid", num_grid, minimum=2)
    _check_chunk(chunk_size)
    if sigma is not None and isinstance(sigma, int | float) and not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if grid is not None and jnp.ndim(grid) != 1:
        raise ValueError(f"grid must be 1-D, got shape {jnp.shape(grid)}")
    part, _ = _layout(like, None, "like")
    num_iters = min(num_iters, max(part.sizes))
    probes = _random_tree(key, like, part, num_probes)

    def one(z: PyTree) -> tuple[jax.Array, jax.Array]:
        theta, vectors, genuine = _ritz(_lanczos(matvec, z, num_iters, part))
        weights = jnp.where(genuine, vectors[..., 0, :] ** 2, 0)[0]
        return jnp.where(genuine, theta, 0)[0], weights

    nodes, weights = chunked_vmap(one, probes, chunk_size=chunk_size)
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


# --------------------------------------------------------------------------- power iteration
def power_iteration(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    *,
    k: int = 1,
    num_iters: int,
    tol: float = 1e-3,
) -> tuple[jax.Array, PyTree, jax.Array]:
    """Power iteration with deflation (PyHessian style), for comparison with Lanczos.

    Maths: for ``j = 1..k``: from a Gaussian start, repeat ``v <- orth(v)`` (Gram-Schmidt
    against the eigenvectors found so far), ``lambda <- v^T H v``, ``v <- H v / ||H v||``
    until ``|lambda - lambda_prev| / (|lambda_prev| + 1e-6) < tol`` or ``num_iters`` steps.
    Finds the eigenvalues of largest MAGNITUDE (a large negative one comes first); converges at
    rate ``|lambda_{j+1} / lambda_j|`` per step, so slowly for close eigenvalues, and the
    relative-change test stops early on slow convergence. Prefer :func:`eigenvalues`.

    Cost: at most ``k * num_iters`` matvecs (``num_matvecs`` reports the count); memory ``k``
    vectors.

    Args:
      matvec: ``v -> H v``, symmetric.
      like: a pytree with the shapes and dtypes of the vectors.
      key: a PRNG key for the start vectors.
      k: keyword-only, the number of eigenpairs, ``1 <= k <= dim``.
      num_iters: keyword-only, the maximum number of steps per eigenpair.
      tol: the relative-change stopping tolerance.

    Returns:
      ``(eigenvalues (k,), vectors (pytree, leading axis k), num_matvecs)``, in the order
      found.

    Raises:
      ValueError: ``k`` outside ``[1, dim]`` or ``num_iters < 1``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> matvec = lambda v: jnp.array([1.0, 10.0]) * v
      >>> vals, _, count = power_iteration(matvec, jnp.zeros(2), jax.random.key(0),
      ...                                  num_iters=50, tol=1e-6)
      >>> round(float(vals[0]), 3)
      10.0

    References:
      Yao, Gholami, Keutzer & Mahoney, "PyHessian: neural networks through the lens of the
      Hessian", 2020; reference code of Ju, Li & Zhang, ICML 2022.
    """
    k = _check_int("k", k)
    num_iters = _check_int("num_iters", num_iters)
    part, _ = _layout(like, None, "like")
    dim = part.sizes[0]
    if k > dim:
        raise ValueError(f"k must be <= the dimension {dim}, got k={k}")
    dot = lambda x, y: part.dot(x, y)[0]

    def normalise(v: PyTree) -> PyTree:
        norm = jnp.sqrt(dot(v, v))
        return jax.tree_util.tree_map(lambda x: x * _safe_inverse(norm, norm > 0), v)

    starts = _random_tree(key, like, part, k, "normal")
    found: list[PyTree] = []
    values = []
    count = jnp.zeros((), jnp.int32)
    for j in range(k):
        v = jax.tree_util.tree_map(lambda x, j=j: x[j], starts)

        def orth(v: PyTree) -> PyTree:
            for u in found:
                c = dot(u, v)
                v = jax.tree_util.tree_map(lambda x, y: x - c * y, v, u)
            return normalise(v)

        def cond(state):
            it, _, _, done = state
            return (it < num_iters) & ~done

        def body(state):
            it, v, value, _ = state
            v = orth(v)
            hv = matvec(v)
            new = dot(hv, v)
            done = (it > 0) & (jnp.abs(value - new) / (jnp.abs(value) + 1e-6) < tol)
            return it + 1, normalise(hv), new, done

        zero = jnp.zeros((), _dtype(like))
        state = (jnp.zeros((), jnp.int32), normalise(v), zero, jnp.zeros((), bool))
        it, v, value, _ = jax.lax.while_loop(cond, body, state)
        found.append(orth(v))
        values.append(value)
        count = count + it
    vectors = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *found)
    return jnp.stack(values), vectors, count
