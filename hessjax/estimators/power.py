"""Power iteration with deflation (PyHessian style), for comparison with Lanczos.

References:
  Yao, Gholami, Keutzer & Mahoney, "PyHessian: neural networks through the lens of the
  Hessian", 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hessjax.estimators._base import (
    Matvec,
    PyTree,
    check_int,
    compiled_matvec,
    draw_probes,
    flat_ravel,
    flat_size,
    flat_unravel,
    host_loops,
    probe_layout,
    run_compiled,
    safe_inverse,
    tree_dtype,
)
from hessjax.mapping import MapFn, compile_once


def power_iteration(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    *,
    k: int = 1,
    num_iters: int,
    tol: float = 1e-3,
    map_fn: MapFn | None = None,
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
      map_fn: keyword-only, the loop strategy (:func:`hessjax.estimators.lanczos`): with the
        default the steps run from Python over one compiled step shared by all ``k``
        eigenpairs (the test for convergence read back each step); inside ``jit`` a
        ``lax.while_loop``. Same numbers.

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
    k = check_int("k", k)
    num_iters = check_int("num_iters", num_iters)
    part, _ = probe_layout(like, None, "like")
    dim = part.sizes[0]
    if k > dim:
        raise ValueError(f"k must be <= the dimension {dim}, got k={k}")
    host = host_loops(map_fn, key)
    leaves = jax.tree_util.tree_leaves(like)
    flat = host and len({jnp.result_type(x) for x in leaves}) == 1
    if flat:  # the host loop on raveled vectors: a few large ops, not several per leaf
        n, dtype = flat_size(like)
        zeros = jax.ShapeDtypeStruct((n,), dtype)
        unravel = flat_unravel(like)
        ravel = flat_ravel
        flat_part, _ = probe_layout(zeros, None, "like")
        dot = lambda x, y: jnp.dot(x, y)
    else:
        unravel = ravel = lambda t: t
        dot = lambda x, y: part.dot(x, y)[0]

    def normalise(v: PyTree) -> PyTree:
        norm = jnp.sqrt(dot(v, v))
        return jax.tree_util.tree_map(lambda x: x * safe_inverse(norm, norm > 0), v)

    def orth(found: PyTree, num_found: jax.Array, v: PyTree) -> PyTree:
        # Gram-Schmidt against the first num_found rows of found, normalised. Raveled: one
        # classical pass as two matrix products (two reads of found, not 3 (k-1) vector
        # passes); pytrees: modified Gram-Schmidt, one row after another.
        if flat:
            coef = jnp.where(jnp.arange(k) < num_found, found @ v, 0)
            return normalise(v - coef @ found)
        for i in range(k - 1):
            u = jax.tree_util.tree_map(lambda x, i=i: x[i], found)
            c = jnp.where(i < num_found, dot(u, v), 0)
            v = jax.tree_util.tree_map(lambda x, y: x - c * y, v, u)
        return normalise(v)

    # The state: (steps, v, lambda, done, found, num_found); v is the next vector to multiply,
    # already orthogonalised and normalised, so a step is one product and what follows it.
    def after(state, v, hv):
        it, _, value, _, found, num_found = state
        new = dot(hv, v)
        done = (it > 0) & (jnp.abs(value - new) / (jnp.abs(value) + 1e-6) < tol)
        return it + 1, orth(found, num_found, hv), new, done, found, num_found

    def body(state):
        v = state[1]
        return after(state, v, ravel(matvec(unravel(v))))

    def start(starts, found, j):  # the initial state of eigenpair j
        v = jax.tree_util.tree_map(
            lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False), starts
        )
        zero = jnp.zeros((), tree_dtype(like))
        return (jnp.zeros((), jnp.int32), orth(found, j, v), zero, jnp.zeros((), bool), found, j)

    def store(state):  # orth(v) into row num_found of found
        _, v, _, _, found, j = state
        v = orth(found, j, v)
        return jax.tree_util.tree_map(lambda f, x: f.at[j].set(x), found, v)

    # One draw for all leaves in leaf order: raveled, the same numbers as the tree's.
    starts = draw_probes(key, zeros, flat_part, k, "normal") if flat else None
    if starts is None:
        starts = draw_probes(key, like, part, k, "normal")
    found = jax.tree_util.tree_map(jnp.zeros_like, starts)

    # The host loop: two calls per step, the shared compiled product and
    # ``post(found, small, Hv) -> (small, next v as a pytree)``; ``small`` is the state
    # without ``found`` (a program that returns an input unchanged copies it: k vectors).
    def post_step(found, small, hv):
        it, v, value, done, num_found = small
        out = after((it, v, value, done, found, num_found), v, ravel(hv))
        return out[:4] + (num_found,), unravel(out[1])

    def as_tree(small):
        return unravel(small[1])

    step = None
    if host:
        state0 = run_compiled(start, starts, found, np.int32(0))
        small0 = state0[:4] + (state0[5],)
        to_tree = compile_once(as_tree, small0)
        v0 = to_tree(small0)
        product = compiled_matvec(matvec, v0)
        if product is not None:
            post = compile_once(post_step, found, small0, jax.eval_shape(matvec, v0))
            step = lambda found, small, v: post(found, small, product(v))
    values, count = [], 0
    for j in range(k):
        state = run_compiled(start, starts, found, np.int32(j))
        if step is not None:
            it, done, small = 0, False, state[:4] + (state[5],)
            v = to_tree(small)
            while it < num_iters and not done:
                small, v = step(found, small, v)
                it, done = it + 1, bool(small[3])
            state = small[:4] + (found, small[4])
        else:
            cond = lambda st: (st[0] < num_iters) & ~st[3]
            state = jax.lax.while_loop(cond, body, state)
        found = run_compiled(store, state)
        values.append(state[2])
        count = count + state[0]
    if flat:
        found = run_compiled(jax.vmap(unravel), found)
    return run_compiled(lambda x: jnp.stack(x), values), found, jnp.asarray(count, jnp.int32)
