"""Dense operators with known spectra for the estimator tests (numpy references only).

Operators are ``A = Q diag(lam) Q^T`` with a random orthogonal ``Q`` (numpy), wrapped as matvecs
over small params pytrees (a dict of two arrays, so the pytree path is exercised), and as
block-diagonal operators over a real :class:`~hessjax.partition.Partition` (two kernel layers
and a bias that belongs to no layer). References come from ``numpy.linalg.eigh`` and closed
forms, never from the code under test.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from hessjax import partition as P

make_partition = P.layer_partition

SHAPES = {"a": (3, 4), "b": (5,)}  # n = 17, one pytree with two leaves
BLOCK_SHAPES = {"a": (3, 4), "b": (2, 3), "c": (4,)}  # layers a (12), b (6); c in no layer
N = 17
DTYPES = [("f32", np.float32), ("f64", np.float64)]


# --------------------------------------------------------------------------- helpers
def precision(dtype):
    return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


def tol(dtype, f32=2e-4, f64=1e-9):
    return f64 if dtype == np.float64 else f32


def orthogonal(rng, n):
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def dense(rng, lam):
    q = orthogonal(rng, len(lam))
    return (q * lam) @ q.T, q


def like(shapes, dtype):
    return {k: jnp.zeros(s, dtype) for k, s in shapes.items()}


def to_tree(x, shapes, dtype):
    out, i = {}, 0
    for k, s in shapes.items():
        size = int(np.prod(s))
        out[k] = jnp.asarray(np.asarray(x[i : i + size]).reshape(s), dtype)
        i += size
    return out


def to_flat(tree):
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(tree)])


def dense_matvec(a, shapes, dtype):
    aj = jnp.asarray(a, dtype)

    def matvec(v):
        x = jnp.concatenate([v[k].ravel() for k in shapes])
        y, out, i = aj @ x, {}, 0
        for k, s in shapes.items():
            size = int(np.prod(s))
            out[k] = y[i : i + size].reshape(s)
            i += size
        return out

    return matvec


def block_problem(rng, dtype, lam1=None, lam2=None):
    """Block-diagonal operator over BLOCK_SHAPES: layers a (12) and b (6); c maps to 0."""
    lam1 = rng.normal(size=12) if lam1 is None else lam1
    lam2 = rng.normal(size=6) if lam2 is None else lam2
    a1, _ = dense(rng, lam1)
    a2, _ = dense(rng, lam2)
    b1, b2 = jnp.asarray(a1, dtype), jnp.asarray(a2, dtype)

    def matvec(v):
        return {
            "a": (b1 @ v["a"].ravel()).reshape(3, 4),
            "b": (b2 @ v["b"].ravel()).reshape(2, 3),
            "c": jnp.zeros_like(v["c"]),
        }

    part = make_partition(like(BLOCK_SHAPES, dtype))
    assert part.names == ("a", "b") and part.sizes == (12, 6)
    return matvec, part, (a1, a2), (lam1, lam2)


def psd_part(a):
    w, u = np.linalg.eigh(a)
    return (u * np.maximum(w, 0)) @ u.T


def flat_jnp(v):
    return jnp.concatenate([v["a"].ravel(), v["b"]])


def to_tree_jnp(x):
    return {"a": x[:12].reshape(3, 4), "b": x[12:]}
