"""Benchmark: data-parallel throughput of the measure, Hutchinson, HVPs and training (issue 7).

For each device count ``D`` in ``--devices`` (default 1, 2, 4) a fresh subprocess runs with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (simulated CPU devices sharing this
machine's cores: no speed-up is expected, the numbers check that the scaling code runs and
what it costs) and times, after one compile-and-warm-up call:

* the Hessian distance measure (``hessian_distance(..., map_fn=mesh_map(mesh))``) of a small
  MLP over ``--examples`` examples: examples/s;
* Hutchinson's trace (``hutchinson_trace(..., map_fn=mesh_map(mesh))``, jitted) with
  ``--probes`` probes: probes/s;
* Hessian-vector products of the mean loss over a batch, one per probe, the probes split over
  the mesh (``sharded_map`` of ``hvp_fn``): HVPs/s;
* training steps of :func:`hessjax.train.fit` (TinyCNN, batch ``--batch-size`` split over the
  mesh): steps/s, timed from the step callback after the first two steps.

Each rate is also divided by ``D`` (per device). The measure and the trace of every ``D`` are
recorded, so the JSON shows they agree with ``D = 1``.

``--real`` instead runs once on the machine's actual devices (e.g. a GPU: ``D`` = all of
them) with the same workloads, to compare with the CPU figures.

Usage::

    .venv/bin/python experiments/bench_sharding.py              # 1, 2, 4 simulated devices
    .venv/bin/python experiments/bench_sharding.py --real \
        --out experiments/results/bench_sharding_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import hessjax
    from hessjax.hessian import hvp_fn
    from hessjax.models import TinyCNN
    from hessjax.sharding import make_mesh, mesh_map, sharded_map
    from hessjax.train import TrainConfig, cross_entropy, fit

    mesh = make_mesh()
    d = mesh.devices.size
    k = jax.random.split(jax.random.key(0), 5)
    width = args.width
    params = {
        "w1": jax.random.normal(k[0], (32, width)) / np.sqrt(32),
        "w2": jax.random.normal(k[1], (width, width)) / np.sqrt(width),
        "w3": jax.random.normal(k[2], (width, 10)) / np.sqrt(width),
    }
    anchor = jax.tree.map(lambda a: 0.9 * a, params)

    def loss(p, ex):
        h = jnp.tanh(ex[0] @ p["w1"])
        h = jnp.tanh(h @ p["w2"])
        return -jax.nn.log_softmax(h @ p["w3"])[ex[1]]

    m = args.examples
    ex = (jax.random.normal(k[3], (m, 32)), jax.random.randint(k[4], (m,), 0, 10))

    def timed(fn, repeats):
        jax.block_until_ready(fn())  # compile and warm up
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = jax.block_until_ready(fn())
        return (time.perf_counter() - t0) / repeats, out

    out = {"devices": d, "platform": jax.devices()[0].platform}

    t, hd = timed(
        lambda: hessjax.hessian_distance(
            loss,
            params,
            anchor,
            ex,
            n=1000,
            num_iters=8,
            chunk_size=args.chunk,
            map_fn=mesh_map(mesh),
        ),
        args.repeats,
    )
    out["measure_seconds"] = t
    out["measure_examples_per_s"] = m / t
    out["measure"] = float(hd.measure)

    mean_loss = lambda p: jnp.mean(jax.vmap(lambda e: loss(p, e))(ex))
    key = jax.random.key(1)

    @jax.jit
    def trace(p):
        return hessjax.hutchinson_trace(
            hvp_fn(mean_loss, p),
            p,
            key,
            num_probes=args.probes,
            chunk_size=args.chunk,
            map_fn=mesh_map(mesh),
        ).value

    t, value = timed(lambda: trace(params), args.repeats)
    out["hutchinson_seconds"] = t
    out["hutchinson_probes_per_s"] = args.probes / t
    out["hutchinson"] = float(value)

    probes = jax.tree.map(
        lambda a: jax.random.normal(key, (args.probes,) + a.shape, a.dtype), params
    )

    @jax.jit
    def hvps(p, vs):
        return sharded_map(hvp_fn(mean_loss, p), vs, mesh, chunk_size=args.chunk)

    t, _ = timed(lambda: hvps(params, probes), args.repeats)
    out["hvp_per_s"] = args.probes / t

    rng = np.random.default_rng(0)
    n = args.batch_size * (args.steps + 1)
    x = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    stamps = []
    fit(
        TinyCNN(10, 3, rngs=nnx.Rngs(0)),
        cross_entropy,
        optax.sgd(0.01),
        (x, y),
        None,
        config=TrainConfig(epochs=1, batch_size=args.batch_size, max_steps=args.steps),
        progress=False,
        mesh=mesh,
        callback=lambda step, metrics: stamps.append(time.perf_counter()),
    )
    timed_steps = len(stamps) - 2
    out["train_steps_per_s"] = timed_steps / (stamps[-1] - stamps[1])
    out["train_examples_per_s"] = out["train_steps_per_s"] * args.batch_size
    for key_ in (
        "measure_examples_per_s",
        "hutchinson_probes_per_s",
        "hvp_per_s",
        "train_steps_per_s",
        "train_examples_per_s",
    ):
        out[key_ + "_per_device"] = out[key_] / d
    return out


def _run_worker(argv: list[str], env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", *argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4", help="simulated CPU device counts")
    parser.add_argument("--real", action="store_true", help="the actual devices, once")
    parser.add_argument("--examples", type=int, default=128, help="examples of the measure")
    parser.add_argument("--probes", type=int, default=128, help="Hutchinson probes / HVPs")
    parser.add_argument("--width", type=int, default=128, help="MLP hidden width")
    parser.add_argument("--chunk", type=int, default=8, help="chunk_size (per device)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--steps", type=int, default=12, help="training steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after warm-up")
    parser.add_argument(
        "--out", default=os.path.join(ROOT, "experiments/results/bench_sharding.json")
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    passthrough = [
        f"--examples={args.examples}",
        f"--probes={args.probes}",
        f"--width={args.width}",
        f"--chunk={args.chunk}",
        f"--batch-size={args.batch_size}",
        f"--steps={args.steps}",
        f"--repeats={args.repeats}",
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    results = []
    if args.real:
        results.append(_run_worker(passthrough, env))
    else:
        for count in [int(c) for c in args.devices.split(",")]:
            wenv = dict(env, JAX_PLATFORMS="cpu")
            wenv["XLA_FLAGS"] = (
                wenv.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
            ).strip()
            results.append(_run_worker(passthrough, wenv))
            print(json.dumps(results[-1]), flush=True)
    base = results[0]
    for r in results:
        r["measure_rel_diff_vs_first"] = abs(r["measure"] - base["measure"]) / abs(base["measure"])
        r["hutchinson_rel_diff_vs_first"] = abs(r["hutchinson"] - base["hutchinson"]) / abs(
            base["hutchinson"]
        )
    import jax

    from hessjax.experiment import git_commit

    commit = git_commit()
    report = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "commit": commit,
        "jax_version": jax.__version__,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
        },
        "settings": vars(args) | {"worker": None},
        "note": "simulated CPU devices share the same cores: per-device throughput is expected "
        "to fall as D grows; the figures check the scaling code, not a speed-up",
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
