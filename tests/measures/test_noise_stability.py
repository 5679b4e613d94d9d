"""noise_stability: the host loop (eager) and the traced computation (inside ``jit``) give the
same numbers, and a second eager call of the same shapes compiles nothing.

The numbers themselves are checked against the dense Hessian's trace in
``test_distance.py::test_noise_stability_matches_trace_prediction``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessjax
from hessjax import measures
from tests import _models

_COMPILES: list[str] = []


def _listen(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(kwargs.get("fun_name", "?"))


jax.monitoring.register_event_duration_secs_listener(_listen)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_host_loop_equals_jit(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        loss, params, batch = _models.dict_cnn(dtype=dtype)
        part = hessjax.layer_partition(params)
        call = lambda p, key: measures.noise_stability(
            loss, p, batch, key, sigma=0.05, num_draws=3, num_probes=4, partition=part
        )
        key = jax.random.key(5)
        eager = call(params, key)
        jitted = jax.jit(call)(params, key)
        rtol = 1e-4 if dtype == jnp.float32 else 1e-10
        for a, b in zip(eager, jitted, strict=True):
            assert a.dtype == dtype
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * 1e-2)
        assert np.isfinite(float(eager.predicted_stderr)) and float(eager.stderr) > 0


def test_second_eager_call_compiles_nothing():
    loss, params, batch = _models.dict_cnn()
    kw = dict(sigma=0.05, num_draws=3, num_probes=2)
    jax.block_until_ready(measures.noise_stability(loss, params, batch, jax.random.key(0), **kw))
    other = jax.tree_util.tree_map(lambda x: 1.1 * x, params)  # other params, same shapes
    jax.block_until_ready(other)
    del _COMPILES[:]
    r = measures.noise_stability(loss, other, batch, jax.random.key(1), **kw)
    jax.block_until_ready(r)
    assert _COMPILES == [], f"noise_stability compiled again: {_COMPILES}"
