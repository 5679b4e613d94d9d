"""Lanczos with full reorthogonalisation (all layers at once) and extreme eigenvalues.

References:
  Lanczos, 1950; Golub & Van Loan, "Matrix computations", chapter 10.
  Ghorbani, Krishnan & Xiao, ICML 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessjax.estimators._base import (
    Matvec,
    PyTree,
    check_int,
    combine_basis,
    compiled_matvec,
    draw_flat,
    draw_probes,
    flat_layout,
    flat_ravel,
    flat_size,
    flat_unravel,
    host_loops,
    layout,
    memo_compile,
    probe_layout,
    safe_inverse,
    squeeze_layers,
    tree_dtype,
)
from hessjax.mapping import MapFn
from hessjax.partition import Partition

# Lanczos breakdown: beta_j <= _BREAKDOWN_RTOL * sqrt(num_iters) * eps * scale, where ``scale``
# is the running maximum of ||H q_i|| (per layer), is taken as an exhausted Krylov space.
_BREAKDOWN_RTOL = 10.0


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


def _lanczos_init(v0: PyTree, num_iters: int, part: Partition) -> tuple:
    dtype = tree_dtype(v0)
    num_layers = part.num_layers
    norm0 = jnp.sqrt(part.sq_norms(v0))
    active0 = norm0 > 0
    q0 = part.scale(v0, safe_inverse(norm0, active0))
    basis = jax.tree_util.tree_map(
        lambda x: jnp.zeros((num_iters,) + x.shape, x.dtype).at[0].set(x), q0
    )
    zeros = jnp.zeros((num_iters, num_layers), dtype)
    return (
        basis,
        zeros,
        zeros,
        active0,
        jnp.zeros((num_layers,), jnp.int32),
        jnp.zeros((num_layers,), dtype),
    )


def _lanczos_next(part: Partition, num_iters: int, dtype, reorthogonalize: bool = True) -> Any:
    """Step ``j`` of the recurrence given ``w = H q_j``, except writing ``q_{j+1}`` into the
    basis: ``next(j, state, w) -> (alphas, betas, active, num_valid, scale), q_{j+1}``;
    ``reorthogonalize=False``: the three-term recurrence alone."""
    tol = _BREAKDOWN_RTOL * math.sqrt(num_iters) * float(jnp.finfo(dtype).eps)
    dots = jax.vmap(part.dot, in_axes=(0, None))

    def next_vector(j, state, w):
        basis, alphas, betas, active, num_valid, scale = state
        q = jax.tree_util.tree_map(lambda x: x[j], basis)
        alpha = part.dot(q, w)
        scale = jnp.maximum(scale, jnp.sqrt(part.sq_norms(w)))
        if reorthogonalize:  # full reorthogonalisation: classical Gram-Schmidt, twice
            for _ in range(2):
                coefs = dots(basis, w)
                w = jax.tree_util.tree_map(jnp.subtract, w, combine_basis(part, basis, coefs))
        else:  # w - alpha_j q_j - beta_{j-1} q_{j-1}
            prev = jnp.maximum(j - 1, 0)
            q_prev = jax.tree_util.tree_map(lambda x: x[prev], basis)
            beta_prev = jnp.where(j > 0, betas[prev], 0)
            w = jax.tree_util.tree_map(jnp.subtract, w, part.scale(q, alpha))
            w = jax.tree_util.tree_map(jnp.subtract, w, part.scale(q_prev, beta_prev))
        beta = jnp.sqrt(part.sq_norms(w))
        ok = active & (beta > tol * scale)
        alphas = alphas.at[j].set(jnp.where(active, alpha, 0))
        betas = betas.at[j].set(jnp.where(ok, beta, 0))
        q_next = part.scale(w, safe_inverse(beta, ok))
        return (alphas, betas, ok, num_valid + active.astype(jnp.int32), scale), q_next

    return next_vector


def _put_rows(basis: PyTree, j: jax.Array, q_next: PyTree) -> PyTree:
    """``basis`` with row ``j + 1`` of every leaf set to ``q_next`` (nothing past the end)."""
    return jax.tree_util.tree_map(lambda x, y: x.at[j + 1].set(y, mode="drop"), basis, q_next)


def _lanczos_update(part: Partition, num_iters: int, dtype, reorthogonalize: bool = True) -> Any:
    """Step ``j`` of the recurrence given ``w = H q_j``: everything but the product."""
    next_vector = _lanczos_next(part, num_iters, dtype, reorthogonalize)

    def update(j, state, w):
        scalars, q_next = next_vector(j, state, w)
        return (_put_rows(state[0], j, q_next),) + scalars

    return update


def _lanczos_result(state: tuple) -> LanczosResult:
    basis, alphas, betas, _, num_valid, _ = state
    return LanczosResult(alphas.T, betas.T, basis, num_valid)


def _row(basis: PyTree, j: jax.Array) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False), basis
    )


_BLOCK = 8  # rows per block of the raveled host-loop basis
_DGKS = 1 / math.sqrt(2)  # a second Gram-Schmidt pass when a pass keeps less than this


def _flat_steps(num_iters: int, dtype, ravel: Any) -> tuple:
    """One Lanczos step for one layer on raveled vectors (the CPU host loop, :func:`_flat_host`),
    as three programs run in turn from Python:

    * ``prepare(j, scalars, hq, q, q_prev) -> (w, alpha, scale, norm)``: the three-term
      recurrence ``w = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}``;
    * ``project(blocks, w) -> (w, norm)``: one classical Gram-Schmidt pass against every
      stored vector (``blocks``: the FILLED ``(_BLOCK, n)`` blocks of the basis, zero rows after
      row ``j``); run again when a pass keeps less than ``1/sqrt(2)`` of the norm (the DGKS
      criterion, "twice is enough": Daniel, Gragg, Kaufman & Stewart 1976; as ARPACK does);
    * ``finish(j, scalars, w, alpha, scale) -> (scalars, q_{j+1})``: the breakdown test and
      the normalisation.

    Full reorthogonalisation as :func:`_lanczos_update`, at one read of the filled blocks per
    pass (one pass almost always) instead of four reads of the whole basis. All of it is
    memory-bound on CPU, and XLA:CPU is slow on three patterns it avoids (MobileNetV2,
    2.2M floats, 40 x n basis; measured): a program that both reads the basis and writes a row
    into it copies the basis (0.2 s per step against 0.05 s; the row is written by the donated
    :func:`_put_row`); a slice ``basis[:rows]`` is copied first; and the projections run 2.5x
    slower on a vector computed in the same program than on a program argument (hence three
    programs). Blocks of 4 rows were slower than blocks of 8.
    """
    tol = _BREAKDOWN_RTOL * math.sqrt(num_iters) * float(jnp.finfo(dtype).eps)

    def prepare(j, scalars, hq, q, q_prev):
        _, betas, _, _, scale = scalars  # (m, 1), (m, 1), (1,), (1,), (1,)
        w = ravel(hq)
        alpha = jnp.dot(q, w)[None]
        scale = jnp.maximum(scale, jnp.sqrt(jnp.dot(w, w)))
        beta_prev = jnp.where(j > 0, betas[jnp.maximum(j - 1, 0)], 0)
        w = w - alpha * q - beta_prev * q_prev
        return w, alpha, scale, jnp.sqrt(jnp.dot(w, w))

    def project(blocks, w):  # one subtraction of the summed projections (one pass)
        coefs = [b @ w for b in blocks]
        w = w - sum(c @ b for b, c in zip(blocks, coefs, strict=True))
        return w, jnp.sqrt(jnp.dot(w, w))

    def finish(j, scalars, w, alpha, scale):
        alphas, betas, active, num_valid, _ = scalars
        beta = jnp.sqrt(jnp.dot(w, w))[None]
        ok = active & (beta > tol * scale)
        alphas = alphas.at[j].set(jnp.where(active, alpha, 0))
        betas = betas.at[j].set(jnp.where(ok, beta, 0))
        scalars = (alphas, betas, ok, num_valid + active.astype(jnp.int32), scale)
        return scalars, w * safe_inverse(beta, ok)

    return prepare, project, finish


class _Omega:
    """Simon's estimates ``omega_{j+1,k} ~ q_{j+1}^T q_k`` of the loss of orthogonality of
    Lanczos vectors, from the recurrence's scalars alone (host floats, O(j) per step), for
    partial reorthogonalisation (Simon 1984; Larsen's PROPACK): with ``||H||`` estimated by
    ``scale = max_i ||H q_i||`` and unit roundoff ``eps``,
    ``beta_j omega_{j+1,k} = beta_k omega_{j,k+1} + (alpha_k - alpha_j) omega_{j,k}
    + beta_{k-1} omega_{j,k-1} - beta_{j-1} omega_{j-1,k} +- eps scale`` (the rounding term
    taken with the sign of the rest, a bound), ``omega_{j+1,j} = eps scale / beta_j`` and
    ``omega_{j,j} = 1``. When ``max_k |omega_{j+1,k}| > sqrt(eps)`` the new vector is projected
    against every stored one, and so is the next (the recurrence couples two consecutive
    vectors); ``omega_{j+1,j}`` alone passes ``sqrt(eps)`` exactly when
    ``beta_j < sqrt(eps) scale``, so a step near exhaustion (its residual mostly lost
    components) is always projected and the breakdown test sees the true residual; each
    projection resets its row to ``eps``. Semi-orthogonality (``|q_i^T q_k| <~ sqrt(eps)``)
    keeps the tridiagonal matrix an exact projection to working precision: Ritz values and
    Gauss quadrature as accurate as with full reorthogonalisation, and no ghost copies
    (Simon 1984). The rounding term ``eps scale`` is the typical local error, not a bound:
    in float32 on a uniform 200-point spectrum with one outlier, 260 steps, the true loss
    reached 4.8e-3 (14 sqrt(eps); Ritz error 2e-5 against 1.4e-6 with full
    reorthogonalisation). PROPACK's worst-case ``sqrt(n) eps scale`` would project 78 of 80
    steps of the SLQ density on MobileNetV2 (2.2M parameters; 28 of 80 with ``eps scale``,
    the same nodes to 1e-6 relative), i.e. full reorthogonalisation; the quadrature, which
    tolerates no reorthogonalisation at all (Knizhnerman 1996), is where it is the default.
    """

    def __init__(self, num_iters: int, eps: float):
        self.eps, self.limit = eps, math.sqrt(eps)
        self.alphas = np.zeros(num_iters)
        self.betas = np.zeros(num_iters)
        self.cur = np.zeros(num_iters + 1)  # omega_{j, k}, k = 0..j
        self.cur[0] = 1.0
        self.prev = np.zeros(num_iters + 1)  # omega_{j-1, k}
        self.force = False  # the previous step reorthogonalised: this one does too

    def step(self, j: int, alpha: float, beta: float, scale: float) -> bool:
        """Records ``alpha_j`` and ``beta_j`` (before any projection); whether to project."""
        self.alphas[j], self.betas[j] = alpha, beta
        new = np.zeros_like(self.cur)
        if beta > 0 and j > 0:
            a, b, w, wp = self.alphas, self.betas, self.cur, self.prev
            k = np.arange(j)
            t = b[k] * w[k + 1] + (a[k] - alpha) * w[k]
            t[1:] += b[k[1:] - 1] * w[k[1:] - 1]
            t -= (b[j - 1] if j > 0 else 0.0) * wp[k]
            t += np.where(t >= 0, 1.0, -1.0) * self.eps * scale
            new[:j] = t / beta
        new[j] = self.eps * scale / beta if beta > 0 else 0.0
        new[j + 1] = 1.0
        self.prev, self.cur = self.cur, new
        run = self.force or bool(np.max(np.abs(new[: j + 1])) > self.limit)
        self.force = run and not self.force
        return run

    def reset(self, j: int, beta: float) -> None:
        """After a projection of ``q_{j+1}``: its estimates back to ``eps``, its ``beta_j``."""
        self.betas[j] = beta
        self.cur[: j + 1] = self.eps


def _stack_rows(num_iters: int, unravel: Callable) -> Callable:
    """``blocks -> the first num_iters rows as stacked pytrees``, by row writes into zeros
    (no concatenate: slow on XLA:CPU, see :func:`~hessjax.estimators._base.flat_ravel`)."""

    def stack(blocks):
        rows = blocks[0].shape[0]
        out = jnp.zeros((len(blocks) * rows, blocks[0].shape[1]), blocks[0].dtype)
        for b, block in enumerate(blocks):
            out = jax.lax.dynamic_update_slice_in_dim(out, block, b * rows, 0)
        return jax.vmap(unravel)(out[:num_iters])

    return stack


def _put_row(block: jax.Array, i: jax.Array, row: jax.Array) -> jax.Array:
    """``block`` with row ``i`` set to ``row``; donated, so in place."""
    return jax.lax.dynamic_update_index_in_dim(block, row.astype(block.dtype), i, 0)


def _flat_host(
    matvec: Matvec,
    v0: PyTree,
    num_iters: int,
    part: Partition,
    keep_basis: bool = True,
    flat_start: jax.Array | None = None,
    reorthogonalize: bool = True,
) -> Any:
    """The host loop of one layer over every leaf, on raveled vectors (see :func:`_flat_steps`):
    per step ``q_j`` as a pytree, the shared product, prepare, one (rarely two) projection
    passes, finish, the row write. Same numbers as the ``lax`` loop to rounding.
    ``flat_start``: the start vector already raveled (``v0`` then only gives the shapes).
    ``reorthogonalize=False``: no projection passes; without ``keep_basis`` no basis is stored
    either (three vectors of memory)."""
    unravel, ravel = flat_unravel(v0), flat_ravel
    n, dtype = flat_size(v0)
    num_blocks = -(-num_iters // _BLOCK)
    static = ("lanczos_flat", num_iters, str(jnp.dtype(dtype)), layout(v0))
    prepare, project, finish = _flat_steps(num_iters, dtype, ravel)

    def init(v):
        x = v if flat_start is not None else ravel(v)
        norm0 = jnp.sqrt(jnp.dot(x, x))[None]
        active0 = norm0 > 0
        zeros = jnp.zeros((num_iters, 1), dtype)
        scalars = (zeros, zeros, active0, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), dtype))
        return scalars, x * safe_inverse(norm0, active0)

    x0 = v0 if flat_start is None else flat_start
    start = memo_compile(static + ("init", flat_start is None), init, x0)
    product = compiled_matvec(matvec, v0)
    if start is None or product is None:
        return None
    scalars, q = start(x0)
    partial = isinstance(reorthogonalize, str)  # "partial" (checked by lanczos_run)
    store = keep_basis or bool(reorthogonalize)  # else three vectors: q_prev, q, w
    if store:
        block = jnp.zeros((_BLOCK, n), dtype)
        put = memo_compile(static + ("put",), _put_row, block, np.int32(0), q, donate_argnums=(0,))
        blocks = [put(block, np.int32(0), q)] + [
            jnp.zeros((_BLOCK, n), dtype) for _ in range(1, num_blocks)
        ]
    tree = memo_compile(static + ("unravel",), unravel, q)
    first = np.int32(0)
    hq = product(tree(q))
    prepare = memo_compile(static + ("prepare",), prepare, first, scalars, hq, q, q)
    finish_step = None  # compiled (or found) at its first call
    projections = {}  # number of filled blocks -> the pass
    q_prev = jnp.zeros_like(q)
    omega = _Omega(num_iters, float(jnp.finfo(dtype).eps)) if partial else None
    for j in range(num_iters):
        filled = j // _BLOCK + 1
        if j:
            hq = product(tree(q))
        w, alpha, scale, before = prepare(np.int32(j), scalars, hq, q, q_prev)
        run = bool(reorthogonalize)
        if partial:  # only when the estimated loss of orthogonality passes sqrt(eps)
            run = omega.step(j, float(alpha[0]), float(before[()]), float(scale[0]))
        if run and filled not in projections:
            projections[filled] = memo_compile(
                static + ("project",), project, blocks[:filled], w
            )  # fmt: skip
        if run:
            w, after = projections[filled](blocks[:filled], w)
            if float(after[()]) < _DGKS * float(before[()]):
                w, after = projections[filled](blocks[:filled], w)
            if partial:
                omega.reset(j, float(after[()]))
        if finish_step is None:
            finish_step = memo_compile(
                static + ("finish",), finish, np.int32(j), scalars, w, alpha, scale
            )  # fmt: skip
        scalars, q_next = finish_step(np.int32(j), scalars, w, alpha, scale)
        if store and j + 1 < num_iters:
            b, i = divmod(j + 1, _BLOCK)
            blocks[b] = put(blocks[b], np.int32(i), q_next)
        q_prev, q = q, q_next
    alphas, betas, _, num_valid, _ = scalars
    basis = None  # not asked for: the blocks are never copied into a pytree
    if keep_basis:
        basis = memo_compile(static + ("basis",), _stack_rows(num_iters, unravel), blocks)(blocks)
    return LanczosResult(alphas.T, betas.T, basis, num_valid)


def _lanczos_host(
    matvec: Matvec,
    v0: PyTree,
    num_iters: int,
    part: Partition,
    keep_basis: bool = True,
    flat_start: jax.Array | None = None,
    reorthogonalize: bool = True,
) -> Any:
    """The steps from Python: per step ``q_j`` (small program), ``H q_j`` (the shared product
    program, :func:`compiled_matvec`), the next vector (small program), its row written into
    the basis (small program, basis donated)."""
    if flat_layout(part, v0):
        return _flat_host(matvec, v0, num_iters, part, keep_basis, flat_start, reorthogonalize)
    reorthogonalize = bool(reorthogonalize)  # "partial": full reorthogonalisation here
    if flat_start is not None:
        raise ValueError("flat_start: only for one layer of every leaf, of one dtype")
    dtype = tree_dtype(v0)
    next_vector = _lanczos_next(part, num_iters, dtype, reorthogonalize)
    static = ("lanczos_layers", num_iters, str(jnp.dtype(dtype)), part, reorthogonalize)
    init = memo_compile(static + ("init",), lambda v: _lanczos_init(v, num_iters, part), v0)
    product = compiled_matvec(matvec, v0)
    if init is None or product is None:
        return None
    state = init(v0)
    first = np.int32(0)
    row = memo_compile(static + ("row",), _row, state[0], first)
    w = product(row(state[0], first))
    # the basis is read by one program and its new row written by another (donated): XLA:CPU
    # copies an array that one program both reads and updates (see _flat_steps)
    step = memo_compile(static + ("step",), next_vector, first, state, w)
    put = memo_compile(static + ("put",), _put_rows, state[0], first, w, donate_argnums=(0,))
    for j in range(num_iters):
        j = np.int32(j)
        if j:
            w = product(row(state[0], j))
        scalars, q_next = step(j, state, w)
        state = (put(state[0], j, q_next),) + scalars
    return _lanczos_result(state)


def lanczos_run(
    matvec: Matvec,
    v0: PyTree,
    num_iters: int,
    part: Partition,
    *,
    host: bool = False,
    keep_basis: bool = True,
    flat_start: jax.Array | None = None,
    reorthogonalize: bool = True,
) -> LanczosResult:
    """Lanczos on the layers of ``part`` at once; scalars with a leading ``(L,)`` axis.

    ``host=True`` (and nothing traced) runs the steps from Python (:func:`_lanczos_host`): on
    CPU the product is several times slower as the body of ``lax.fori_loop``, and the product
    program is shared with every other estimator. Same numbers either way (to rounding).
    ``keep_basis=False`` lets the host loop return ``basis=None`` (callers that need only the
    tridiagonal matrix: quadrature, eigenvalues without vectors). ``flat_start``: the start
    vector raveled (``flat_layout(part, v0)``; ``v0`` then gives only the shapes and dtypes),
    for callers that drew it raveled (:func:`~hessjax.estimators._base.draw_flat`).
    ``reorthogonalize=False``: the three-term recurrence alone (see :func:`lanczos`).
    """
    partial = isinstance(reorthogonalize, str) and reorthogonalize == "partial"
    if not (isinstance(reorthogonalize, (bool, np.bool_)) or partial):
        raise TypeError(f"reorthogonalize: expected a bool or 'partial', got {reorthogonalize!r}")
    if host:
        res = _lanczos_host(matvec, v0, num_iters, part, keep_basis, flat_start, reorthogonalize)
        if res is not None:
            return res
    if flat_start is not None:
        v0 = flat_unravel(v0)(flat_start)
    # "partial" needs the host's step-by-step decisions: full reorthogonalisation in lax loops
    update = _lanczos_update(part, num_iters, tree_dtype(v0), bool(reorthogonalize))

    def body(j, state):
        return update(j, state, matvec(jax.tree_util.tree_map(lambda x: x[j], state[0])))

    state = _lanczos_init(v0, num_iters, part)
    return _lanczos_result(jax.lax.fori_loop(0, num_iters, body, state))


def lanczos(
    matvec: Matvec,
    v0: PyTree,
    *,
    num_iters: int,
    partition: Partition | None = None,
    map_fn: MapFn | None = None,
    reorthogonalize: bool = True,
) -> LanczosResult:
    """Lanczos tridiagonalisation with full reorthogonalisation, started at ``v0``.

    Maths: builds an orthonormal basis ``Q = [q_0, ..., q_{m-1}]`` of the Krylov space
    ``span{v0, H v0, ..., H^{m-1} v0}`` with ``q_0 = v0 / ||v0||`` and ``Q^T H Q = T``
    tridiagonal (``diag(alphas)``, off-diagonals ``betas[:-1]``). Each new vector is
    orthogonalised against ALL stored vectors by classical Gram-Schmidt, so the basis stays
    orthonormal to working precision (no ghost eigenvalues): two passes in the ``lax`` loop;
    in the host loop of one layer (the CPU default) the three-term recurrence first, then one
    pass and a second only when the first kept less than ``1/sqrt(2)`` of the norm (DGKS),
    which halves the memory traffic. When the Krylov space
    is exhausted (``beta_j <= 10 sqrt(m) eps max_i ||H q_i||``, ``eps`` the dtype's machine
    epsilon) ``beta_j`` is set to exactly 0, the remaining vectors and alphas are 0, and
    ``num_valid = j + 1``: the Ritz values of the valid block are then exact eigenvalues of
    ``H`` (with ``num_iters >= dim`` and a generic start, all of them). With a ``partition`` the
    matvec is taken as block-diagonal and every layer runs its own recurrence, all at once on
    one pytree (per-layer inner products and breakdowns). ``reorthogonalize=False`` keeps only
    the three-term recurrence ``beta_j q_{j+1} = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}``
    (Lanczos' original method): in exact arithmetic the same ``T``; in floating point the basis
    loses orthogonality as Ritz values converge and converged ones reappear as copies ("ghosts",
    Paige 1976), and exhaustion is no longer detected reliably. Its Gauss quadrature stays
    accurate (Knizhnerman 1996; Meurant & Strakos, Acta Numerica 2006), which is why the
    quadrature estimators offer it: no vector passes over the basis, and in the host loop
    without ``basis`` no stored basis at all.

    Cost: ``num_iters`` matvecs (one per step for all layers); memory ``num_iters`` vectors
    (the basis) plus O(num_iters) work per step for the reorthogonalisation (``4 num_iters``
    vector operations in the ``lax`` loop; about ``2 (j + 8)`` at step ``j`` in the host
    loop; ``reorthogonalize=False``: 3 per step). On CPU, MobileNetV2 at 32x32 (2.2M
    parameters), 40 steps took about 1.4x their 40 products (``experiments/bench_peers.py``).

    Args:
      matvec: ``v -> H v``, symmetric (block-diagonal with a partition).
      v0: the start vector, a pytree (need not be normalised; zero gives all zeros).
      num_iters: keyword-only, the number of steps ``m >= 1``.
      partition: optional layers; then every scalar output has a leading axis ``L``.
      map_fn: keyword-only, the loop strategy (:mod:`hessjax.mapping`; ``None``:
        :func:`hessjax.mapping.default_map_fn`). With :func:`hessjax.mapping.host_map` (the
        default) and no tracers, the steps run from Python, each one call of a step
        compiled once per shapes; inside ``jit`` a ``lax.fori_loop``. Same numbers.
      reorthogonalize: keyword-only, ``False`` for the plain three-term recurrence (above);
        ``"partial"``: in the host loop of one layer of every leaf, a step is projected
        against the basis only when Simon's recurrence estimates that its orthogonality is
        lost beyond ``sqrt(eps)`` (and the step after it): the basis stays semi-orthogonal,
        which keeps ``T`` and its Ritz values accurate to working precision without ghosts
        (Simon 1984), at a fraction of the passes (on a 300-dimensional test operator,
        150 steps: 97 projected in float32, 58 in float64); elsewhere full.

    Returns:
      A :class:`LanczosResult` ``(alphas, betas, basis, num_valid)``.

    Raises:
      ValueError: ``num_iters < 1``, ``v0`` does not match ``partition`` or holds NaN/inf.
      TypeError: non-integer ``num_iters``, non-float ``v0``.

    Example:
      >>> import jax.numpy as jnp
      >>> matvec = lambda v: jnp.array([1.0, 2.0, 3.0]) * v
      >>> res = lanczos(matvec, jnp.ones(3), num_iters=5)
      >>> int(res.num_valid), float(res.betas[2])   # exhausted after 3 steps
      (3, 0.0)

    References:
      Lanczos 1950; Golub & Van Loan, "Matrix computations", section 10.1 (full
      reorthogonalisation); Paige, "Error analysis of the Lanczos algorithm", 1976; Meurant &
      Strakos, "The Lanczos and conjugate gradient algorithms in finite precision
      arithmetic", Acta Numerica 2006; Simon, "The Lanczos algorithm with partial
      reorthogonalization", Math. Comp. 1984; Ju, Li & Zhang, ICML 2022.
    """
    num_iters = check_int("num_iters", num_iters)
    part, per_layer = probe_layout(v0, partition, "v0")
    leaves = jax.tree.leaves(v0)
    if not any(isinstance(x, jax.core.Tracer) for x in leaves):
        if not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves):
            raise ValueError("v0: the start vector holds NaN or inf values")
    host = host_loops(map_fn, v0)
    res = lanczos_run(matvec, v0, num_iters, part, host=host, reorthogonalize=reorthogonalize)
    if per_layer:
        return res
    return LanczosResult(res.alphas[0], res.betas[0], res.basis, res.num_valid[0])


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """``(..., m), (..., m) -> (..., m, m)`` symmetric tridiagonal with off-diagonal betas[:-1]."""
    m = alphas.shape[-1]
    off = betas[..., :-1]
    eye = jnp.eye(m, dtype=alphas.dtype)
    up = jnp.eye(m, k=1, dtype=alphas.dtype)
    pad = jnp.concatenate([off, jnp.zeros_like(betas[..., :1])], axis=-1)  # length m, m >= 1
    return alphas[..., None] * eye + pad[..., :, None] * up + pad[..., None, :] * up.T


def ritz_values(res: LanczosResult) -> tuple[jax.Array, jax.Array, jax.Array]:
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
    map_fn: MapFn | None = None,
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
      map_fn: keyword-only, the loop strategy, as in :func:`lanczos` (default: the
        steps from Python over one compiled step).

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
    k = check_int("k", k)
    part, per_layer = probe_layout(like, partition, "like")
    dim = min(part.sizes)
    if k > dim:
        what = "the smallest layer size" if per_layer else "the dimension"
        raise ValueError(f"k must be <= {what} {dim}, got k={k}")
    if num_iters is None:
        num_iters = min(max(part.sizes), 2 * k + 20)
    num_iters = check_int("num_iters", num_iters)
    if num_iters < k:
        raise ValueError(f"num_iters must be >= k={k}, got {num_iters}")
    num_iters = min(num_iters, max(part.sizes))

    host = host_loops(map_fn, key)
    if host and flat_layout(part, like):  # the start raveled: no pytree to build and ravel
        x0 = draw_flat(key, like, 1, "normal")[0]
        res = lanczos_run(matvec, like, num_iters, part, host=True, keep_basis=return_vectors,
                          flat_start=x0)  # fmt: skip
    else:
        v0 = draw_probes(key, like, part, 1, "normal", single=True)
        res = lanczos_run(matvec, v0, num_iters, part, host=host, keep_basis=return_vectors)
    pick = lambda res: _pick_eigen(res, part, k, which, return_vectors, per_layer)
    call = memo_compile(("pick_eigen", part, k, which, return_vectors, per_layer), pick, res)
    return pick(res) if call is None else call(res)


def _pick_eigen(
    res: LanczosResult, part: Partition, k: int, which: str, return_vectors: bool, per_layer: bool
) -> Any:
    """The top/bottom ``k`` Ritz values (and vectors) of a Lanczos run (see eigenvalues)."""
    theta, vectors, _ = ritz_values(res)  # (L, m), (L, m, m)
    m = res.alphas.shape[-1]
    t = jnp.arange(k)
    found = t < res.num_valid[:, None]  # (L, k)

    def pick(index: jax.Array) -> Any:  # index: (L, k) positions in the ascending order
        values = jnp.where(found, jnp.take_along_axis(theta, index, axis=-1), jnp.nan)
        values = squeeze_layers(values, per_layer)
        if not return_vectors:
            return values
        coef = jnp.take_along_axis(vectors, index[:, None, :], axis=-1)  # (L, m, k)
        coef = jnp.where(found[:, None, :], coef, jnp.nan)
        stacked = [combine_basis(part, res.basis, coef[:, :, j].T) for j in range(k)]
        vecs = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *stacked)
        return values, vecs

    top = pick(jnp.broadcast_to(m - 1 - t, found.shape))
    bottom_index = jnp.minimum(m - res.num_valid[:, None] + t, m - 1)
    if which == "top":
        return top
    if which == "bottom":
        return pick(bottom_index)
    return top, pick(bottom_index)
