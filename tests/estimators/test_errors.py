"""Argument checks and public names of hessjax.estimators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessjax import estimators as E
from tests.estimators._dense import (
    BLOCK_SHAPES,
    SHAPES,
    like,
    make_partition,
)


# --------------------------------------------------------------------------- errors
def _errors():
    mv = lambda v: v
    lk = like(SHAPES, np.float32)
    key = jax.random.key(0)
    bad_like = like(BLOCK_SHAPES, np.float32)
    part = make_partition(bad_like)
    return [
        ("num_probes", lambda: E.hutchinson_trace(mv, lk, key, num_probes=0)),
        ("num_probes", lambda: E.hutchpp_trace(mv, lk, key, num_probes=2)),
        (
            "num_probes",
            lambda: E.trace_of_function(mv, lk, key, jnp.abs, num_probes=0, num_iters=2),
        ),
        ("num_iters", lambda: E.lanczos(mv, lk, num_iters=0)),
        ("num_iters", lambda: E.quadratic_form(mv, lk, jnp.abs, num_iters=0)),
        ("num_iters", lambda: E.spectral_density(mv, lk, key, num_probes=1, num_iters=0)),
        ("num_iters", lambda: E.power_iteration(mv, lk, key, num_iters=0)),
        ("k must be <= the dimension 17, got k=18", lambda: E.eigenvalues(mv, lk, key, k=18)),
        (
            "smallest layer size 6, got k=7",
            lambda: E.eigenvalues(mv, bad_like, key, k=7, partition=part),
        ),
        ("k must be >= 1, got 0", lambda: E.eigenvalues(mv, lk, key, k=0)),
        ("num_iters must be >= k=5, got 3", lambda: E.eigenvalues(mv, lk, key, k=5, num_iters=3)),
        ("which", lambda: E.eigenvalues(mv, lk, key, k=1, which="largest")),
        ("k must be <= the dimension", lambda: E.power_iteration(mv, lk, key, k=18, num_iters=3)),
        ("like", lambda: E.hutchinson_trace(mv, lk, key, num_probes=3, partition=part)),
        ("like", lambda: E.hutchpp_trace(mv, lk, key, num_probes=3, partition=part)),
        ("v0", lambda: E.lanczos(mv, lk, num_iters=3, partition=part)),
        (
            "v leaf 'b'",
            lambda: E.quadratic_form(
                mv, dict(bad_like, b=jnp.zeros(6)), jnp.abs, num_iters=3, partition=part
            ),
        ),
        ("chunk_size", lambda: E.hutchinson_trace(mv, lk, key, num_probes=3, chunk_size=0)),
        ("sigma", lambda: E.spectral_density(mv, lk, key, num_probes=1, num_iters=2, sigma=0.0)),
    ]


@pytest.mark.parametrize("index", range(19))
def test_errors(index):
    message, call = _errors()[index]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call()


def test_type_errors():
    with pytest.raises(TypeError, match="num_probes must be an int"):
        E.hutchinson_trace(lambda v: v, jnp.zeros(3), jax.random.key(0), num_probes=2.0)
    with pytest.raises(TypeError, match="like leaf .* dtype int32"):
        E.hutchinson_trace(lambda v: v, jnp.zeros(3, jnp.int32), jax.random.key(0), num_probes=2)


def test_public_names():
    import hessjax

    for name in ("Estimate", "lanczos", "quadratic_form", "positive_quadratic_form"):
        assert getattr(hessjax, name) is getattr(E, name)
