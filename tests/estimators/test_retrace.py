"""Compile once: a second call of the same shapes neither retraces nor recompiles.

Eagerly (the host loop, the default on CPU) every estimator runs one program per computation
(:func:`hessjax.mapping.compile_once`); a second call with another key, or with a fresh
``hvp_fn`` at other params of the same shapes, must not compile anything. Inside ``jit`` the
estimator is traced once (``chex.assert_max_traces``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessjax import estimators
from hessjax.hessian import hvp_fn
from hessjax.mapping import _run, _run_donating, chunked_vmap, host_map

_COMPILES: list[str] = []


def _listen(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(kwargs.get("fun_name", "?"))


jax.monitoring.register_event_duration_secs_listener(_listen)


def _problem(seed: int):
    """A small conv net + dense head with a cross-entropy loss, params from ``seed``."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "conv": jax.random.normal(k[0], (3, 3, 2, 4)) * 0.3,
        "dense": jax.random.normal(k[1], (4 * 4 * 4, 3)) * 0.3,
        "bias": jnp.zeros(3),
    }
    x = jax.random.normal(jax.random.key(7), (5, 4, 4, 2))
    y = jnp.arange(5) % 3

    def loss(p, x, y):
        h = jax.lax.conv_general_dilated(
            x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        logits = jnp.tanh(h).reshape(5, -1) @ p["dense"] + p["bias"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return params, hvp_fn(loss, params, x, y)


CALLS = {
    "hutchinson": lambda mv, p, key: estimators.hutchinson_trace(mv, p, key, num_probes=4).value,
    "hutchinson_chunked": lambda mv, p, key: (
        estimators.hutchinson_trace(mv, p, key, num_probes=5, chunk_size=2).value
    ),
    "hutchpp": lambda mv, p, key: estimators.hutchpp_trace(mv, p, key, num_probes=9).value,
    "eigenvalues": lambda mv, p, key: estimators.eigenvalues(mv, p, key, k=2, num_iters=6),
    "lanczos": lambda mv, p, key: (
        estimators.lanczos(
            mv,
            jax.tree_util.tree_map(lambda x: jnp.ones_like(x) + jax.random.normal(key), p),
            num_iters=5,
        ).alphas
    ),  # fmt: skip
    "density": lambda mv, p, key: (
        estimators.spectral_density(mv, p, key, num_probes=2, num_iters=5).density
    ),
    "trace_of_function": lambda mv, p, key: (
        estimators.trace_of_function(
            mv, p, key, estimators.positive_part, num_probes=2, num_iters=4
        ).value
    ),
    "quadratic_form": lambda mv, p, key: estimators.positive_quadratic_form(
        mv, jax.tree_util.tree_map(lambda x: x + jax.random.normal(key), p), num_iters=4
    ),
    "power": lambda mv, p, key: estimators.power_iteration(mv, p, key, k=2, num_iters=5, tol=0.0)[
        0
    ],
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_second_call_compiles_nothing(name):
    call = CALLS[name]
    params, matvec = _problem(0)
    jax.block_until_ready(call(matvec, params, jax.random.key(0)))  # compiles
    sizes = (_run._cache_size(), _run_donating._cache_size())
    params2, matvec2 = _problem(1)  # a fresh closure: other params, same shapes
    del _COMPILES[:]
    jax.block_until_ready(call(matvec, params, jax.random.key(1)))
    jax.block_until_ready(call(matvec2, params2, jax.random.key(2)))
    assert _COMPILES == [], f"{name} compiled again: {_COMPILES}"
    assert (_run._cache_size(), _run_donating._cache_size()) == sizes  # no retrace by jit


@pytest.mark.parametrize("name", ["hutchinson", "eigenvalues", "density", "power"])
def test_jitted_estimator_traces_once(name):
    call = CALLS[name]
    params, matvec = _problem(0)
    chex.clear_trace_counter()
    fn = jax.jit(chex.assert_max_traces(lambda key: call(matvec, params, key), n=1))
    a = fn(jax.random.key(0))
    b = fn(jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(a))) and np.all(np.isfinite(np.asarray(b)))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_host_loop_equals_lax_loop(name):
    """The host loop and the compiled lax loops give the same numbers (same probes)."""
    call = CALLS[name]
    params, matvec = _problem(0)
    key = jax.random.key(3)
    eager = call(matvec, params, key)
    jitted = jax.jit(lambda key: call(matvec, params, key))(key)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=2e-4, atol=1e-5)


def test_host_map_matches_chunked_vmap():
    w = jnp.arange(6.0).reshape(3, 2)
    fn = lambda x: jnp.tanh(w @ x)
    xs = jnp.linspace(-1, 1, 14).reshape(7, 2)
    for chunk in (None, 1, 3, 7, 9):
        np.testing.assert_allclose(
            host_map(fn, xs, chunk_size=chunk), chunked_vmap(fn, xs, chunk_size=chunk), rtol=1e-6
        )


def test_second_lanczos_call_traces_nothing(monkeypatch):
    """The host loop's vector programs are memoised on their layout (``memo_compile``): a
    second call with the same matvec traces no program at all; a fresh matvec only its
    product."""
    from hessjax.estimators import _base

    params, matvec = _problem(0)
    call = CALLS["eigenvalues"]
    first = np.asarray(call(matvec, params, jax.random.key(0)))
    traced = []
    real = _base.compile_once
    monkeypatch.setattr(
        _base, "compile_once", lambda fn, *a, **k: traced.append(fn) or real(fn, *a, **k)
    )
    again = np.asarray(call(matvec, params, jax.random.key(0)))
    assert traced == []
    np.testing.assert_array_equal(again, first)
    params2, matvec2 = _problem(1)
    call(matvec2, params2, jax.random.key(0))
    assert traced == [matvec2]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("jit", [False, True])
def test_flat_ravel_and_unravel_match_ravel_pytree(dtype, jit):
    from jax.flatten_util import ravel_pytree

    from hessjax.estimators._base import flat_ravel, flat_unravel

    with jax.enable_x64(dtype == jnp.float64):
        keys = jax.random.split(jax.random.key(0), 5)
        tree = {
            "a": jax.random.normal(keys[0], (3, 4), dtype),
            "b": [jax.random.normal(keys[1], (5,), dtype), jnp.zeros((0, 2), dtype)],
            "c": jax.random.normal(keys[2], (), dtype),
            # leaves above flat_ravel's run length: runs are flushed between and around them
            "d": [jax.random.normal(keys[3], (300, 250), dtype), jnp.ones((7,), dtype)],
            "e": jax.random.normal(keys[4], (66000,), dtype),
        }
        ravel = jax.jit(flat_ravel) if jit else flat_ravel
        flat = ravel(tree)
        ref, ref_unravel = ravel_pytree(tree)
        assert flat.dtype == ref.dtype == dtype
        np.testing.assert_array_equal(np.asarray(flat), np.asarray(ref))
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        unravel = flat_unravel(shapes)
        back = (jax.jit(unravel) if jit else unravel)(flat)
        chex.assert_trees_all_equal(back, ref_unravel(ref), tree)
        chex.assert_trees_all_equal_dtypes(back, tree)
