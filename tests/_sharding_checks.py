"""Multi-device checks of hessjax.sharding, run by tests/test_sharding.py in a subprocess.

The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (so that only this
process sees 4 CPU devices) and reads the JSON this script prints on its last line: for each
check, the largest difference between the sharded and the single-device result.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hessjax
from hessjax.hessian import hvp_fn
from hessjax.models import TinyCNN
from hessjax.sharding import fsdp_sharding, make_mesh, mesh_map, shard_batch
from hessjax.train import TrainConfig, cross_entropy, fit


def _err(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _compare(a, b) -> dict:
    """How far the sharded measure ``b`` is from the unsharded ``a``."""
    return {
        "per_layer_rel": _err(a.per_layer, b.per_layer) / float(jnp.max(a.per_layer)),
        "argmax_equal": bool(jnp.all(a.argmax == b.argmax)),
        "losses": _err(a.losses, b.losses),
        "losses_shape_equal": a.losses.shape == b.losses.shape,
        "measure": [float(a.measure), float(b.measure)],
    }


def _loss(p, ex):
    x, y = ex
    return -jax.nn.log_softmax(jnp.tanh(x @ p["w1"]) @ p["w2"])[y]


def main() -> dict:
    out: dict = {"num_devices": jax.device_count()}
    mesh4, mesh3 = make_mesh(4), make_mesh(3)
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": 0.5 * jax.random.normal(k[0], (5, 6)),
        "w2": 0.5 * jax.random.normal(k[1], (6, 3)),
    }
    anchor = jax.tree.map(lambda a: 0.7 * a, params)
    m = 11  # not a multiple of 4 or 3: uneven last shard
    ex = (jax.random.normal(k[2], (m, 5)), jax.random.randint(k[3], (m,), 0, 3))

    # the measure, both variants, two device counts
    for variant, meshes in (("canonical", (mesh4, mesh3)), ("reference", (mesh4,))):
        kw = dict(n=100, variant=variant, batch_size=3, chunk_size=2, num_iters=6)
        a = hessjax.hessian_distance(_loss, params, anchor, ex, **kw)
        for mesh in meshes:
            name = str(mesh.devices.size)
            b = hessjax.hessian_distance(_loss, params, anchor, ex, map_fn=mesh_map(mesh), **kw)
            out[f"measure_{variant}_{name}"] = _compare(a, b)
    # screening, and psd_blocks (on a ReLU network, whose layer blocks are PSD), sharded over
    # 4 and 3 devices == brute force on one device
    relu_loss = lambda p, e: -jax.nn.log_softmax(jax.nn.relu(e[0] @ p["w1"]) @ p["w2"])[e[1]]
    kw = dict(n=100, chunk_size=2, num_iters=6, screen_chunk_size=2)
    for label, loss, fast in (("screened", _loss, dict(screening=True)),
                              ("psd", relu_loss, dict(psd_blocks=True))):  # fmt: skip
        a = hessjax.hessian_distance(loss, params, anchor, ex, **kw)
        for mesh in (mesh4, mesh3):
            b = hessjax.hessian_distance(loss, params, anchor, ex, map_fn=mesh_map(mesh),
                                         **fast, **kw)  # fmt: skip
            out[f"measure_{label}_{mesh.devices.size}"] = _compare(a, b)
    # the maximising example in the last (padded) shard must still win: make it the max
    big = (ex[0].at[m - 1].multiply(3.0), ex[1])
    a = hessjax.hessian_distance(_loss, params, anchor, big, n=100, num_iters=6)
    b = hessjax.hessian_distance(
        _loss, params, anchor, big, n=100, num_iters=6, map_fn=mesh_map(mesh4)
    )
    out["measure_last_shard"] = {
        "argmax": np.asarray(a.argmax).tolist(),
        "argmax_sharded": np.asarray(b.argmax).tolist(),
        "per_layer": _err(a.per_layer, b.per_layer),
    }

    # estimators over the probe axis, same keys
    matvec = hvp_fn(lambda p: jnp.mean(jax.vmap(lambda e: _loss(p, e))(ex)), params)
    part = hessjax.layer_partition(params)
    key = jax.random.key(1)
    # (hutchpp_trace and trace_of_function share this code path; compiles are the cost here)
    kw = dict(num_probes=10, chunk_size=3, partition=part)
    a = hessjax.hutchinson_trace(matvec, params, key, **kw)
    b = hessjax.hutchinson_trace(matvec, params, key, map_fn=mesh_map(mesh4), **kw)
    out["hutchinson_trace"] = {"value": _err(a.value, b.value), "stderr": _err(a.stderr, b.stderr)}
    kw = dict(num_probes=7, num_iters=5, chunk_size=2)
    a = hessjax.spectral_density(matvec, params, key, **kw)
    b = hessjax.spectral_density(matvec, params, key, map_fn=mesh_map(mesh4), **kw)
    out["spectral_density"] = {
        "nodes": _err(a.nodes, b.nodes),
        "weights": _err(a.weights, b.weights),
        "density_rel": _err(a.density, b.density) / float(jnp.max(a.density)),
    }
    jitted = jax.jit(
        lambda p, mesh: (
            hessjax.hutchinson_trace(
                hvp_fn(lambda q: jnp.mean(jax.vmap(lambda e: _loss(q, e))(ex)), p),
                p,
                key,
                num_probes=6,
                map_fn=mesh_map(mesh),
            ).value
        ),
        static_argnums=1,
    )
    out["hutchinson_jit"] = _err(jitted(params, None), jitted(params, mesh4))

    # placement of an uneven batch
    xs, mask = shard_batch((np.arange(6.0), np.arange(12.0).reshape(6, 2)), mesh4)
    out["shard_batch"] = {
        "shape": list(xs[0].shape),
        "mask": np.asarray(mask).tolist(),
        "rows_per_device": sorted({s.data.shape[0] for s in xs[0].addressable_shards}),
        "padding": np.asarray(xs[0]).tolist(),
    }

    # fsdp placement
    shardings = fsdp_sharding({"w": jnp.ones((6, 8)), "b": jnp.ones(8), "u": jnp.ones((5, 7))},
                              mesh4, min_size=16)  # fmt: skip
    placed = jax.device_put({"w": jnp.ones((6, 8)), "b": jnp.ones(8), "u": jnp.ones((5, 7))},
                            shardings)  # fmt: skip
    out["fsdp"] = {
        name: [str(s.spec), list(placed[name].addressable_shards[0].data.shape)]
        for name, s in shardings.items()
    }

    # training: 3 steps, TinyCNN with BatchNorm (batch statistics across shards)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 4, 40).astype(np.int32)

    def run(mesh, fsdp=None):
        model = TinyCNN(4, 1, rngs=nnx.Rngs(0))
        cfg = TrainConfig(epochs=1, batch_size=12, max_steps=3)
        r = fit(model, cross_entropy, optax.sgd(0.1), (x, y), None, config=cfg, progress=False,
                mesh=mesh, fsdp_min_size=fsdp)  # fmt: skip
        state = (
            nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
        )
        return r.step, state

    steps, ref = run(None)
    steps4, sharded = run(mesh4)
    _, fsdp = run(mesh4, fsdp=64)
    moved = _err(ref[0], nnx.to_pure_dict(nnx.state(TinyCNN(4, 1, rngs=nnx.Rngs(0)), nnx.Param)))
    out["fit"] = {
        "steps": [steps, steps4],
        "params": _err(ref[0], sharded[0]),
        "batch_stats": _err(ref[1], sharded[1]),
        "fsdp_params": _err(ref[0], fsdp[0]),
        "moved": moved,
        "fsdp_specs": sorted({str(a.sharding.spec) for a in jax.tree.leaves(fsdp[0])}),
    }
    try:
        model = TinyCNN(4, 1, rngs=nnx.Rngs(0))
        fit(model, cross_entropy, optax.sgd(0.1), (x, y), None, progress=False, mesh=mesh4,
            config=TrainConfig(epochs=1, batch_size=10, max_steps=1))  # fmt: skip
        out["fit_uneven_batch_error"] = None
    except ValueError as e:
        out["fit_uneven_batch_error"] = str(e)
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
