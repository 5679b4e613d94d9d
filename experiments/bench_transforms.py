"""Overhead of project_to_anchor: one jitted adam training step with and without it.

Model: an MLP 1024 -> 1536 -> 1024 -> 10 (about 3.1M parameters), batch 64, every weight and
the head constrained (layerwise radii), biases free. Steps are jitted with and without buffer
donation of params and optimizer state; single steps of all variants are interleaved after
warm-up and timed with ``block_until_ready``; the JSON has medians and minima.
Writes experiments/results/bench_transforms.json.

With ``--model mobilenet_v2`` the step is instead the demo's fine-tuning step: the pretrained
MobileNetV2 with a 10-class head (2.2M parameters), batch 32 at 32x32 (BatchNorm frozen in eval
mode), radii from :func:`hessjax.layerwise_radii` over the MobileNetV2 stages.

    python experiments/bench_transforms.py [--repeats 60] [--batch 64]
    python experiments/bench_transforms.py --model mobilenet_v2 --batch 32 --repeats 20 \
        --out experiments/results/bench_transforms_mobilenet.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hessjax
from hessjax.experiment import git_commit

SIZES = (1024, 1536, 1024, 10)


def init_params(key):
    params = {}
    keys = jax.random.split(key, len(SIZES) - 1)
    for i, (k, m, n) in enumerate(zip(keys, SIZES[:-1], SIZES[1:], strict=True)):
        name = "head" if i == len(SIZES) - 2 else f"layer{i + 1}"
        params[name] = {
            "kernel": jax.random.normal(k, (m, n)) / np.sqrt(m),
            "bias": jnp.zeros(n),
        }
    return params


def loss_fn(params, x, y):
    h = x
    for name in ("layer1", "layer2"):
        h = jax.nn.relu(h @ params[name]["kernel"] + params[name]["bias"])
    logits = h @ params["head"]["kernel"] + params["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def mobilenet_problem(batch: int):
    """The demo's fine-tuning step: params, loss, data and radii of the pretrained MobileNetV2."""
    from flax import nnx

    from hessjax.models import mobilenet_v2_stage_depth, pretrained_mobilenet_v2

    model = pretrained_mobilenet_v2(10)
    model.eval()
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(state)

    def loss(p, x, y):
        logits = nnx.merge(graphdef, nnx.State(p), rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch, 32, 32, 3))
    y = jax.random.randint(ky, (batch,), 0, 10)
    radii = hessjax.layerwise_radii(
        params, 0.5, scale_factor=1.5, depth_fn=mobilenet_v2_stage_depth, head_radius=2.0
    )
    return params, loss, x, y, radii


def make_step(tx, donate, loss_fn=loss_fn):
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def time_interleaved(variants, params, x, y, repeats, warmup=5, loss=loss_fn):
    """Seconds per step of each variant, alternating single steps so load hits all alike."""
    runs = {}
    for name, (tx, donate) in variants.items():
        step = make_step(tx, donate, loss)
        p, state = jax.tree.map(jnp.copy, params), tx.init(params)
        for _ in range(warmup):
            p, state = step(p, state, x, y)
        jax.block_until_ready(p)
        runs[name] = [step, p, state, []]
    for _ in range(repeats):
        for run in runs.values():
            step, p, state, times = run
            t0 = time.perf_counter()
            p, state = step(p, state, x, y)
            jax.block_until_ready(p)
            times.append(time.perf_counter() - t0)
            run[1], run[2] = p, state
    return {name: np.asarray(run[3]) for name, run in runs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="experiments/results/bench_transforms.json")
    parser.add_argument("--model", choices=("mlp", "mobilenet_v2"), default="mlp")
    args = parser.parse_args()

    if args.model == "mlp":
        params = init_params(jax.random.key(0))
        kx, ky = jax.random.split(jax.random.key(1))
        x = jax.random.normal(kx, (args.batch, SIZES[0]))
        y = jax.random.randint(ky, (args.batch,), 0, SIZES[-1])
        radii = hessjax.layerwise_radii(
            params, 0.05, scale_factor=2.0, depth_fn=hessjax.resnet_stage_depth, head_radius=0.1
        )
        loss, model_name = loss_fn, f"MLP {' -> '.join(map(str, SIZES))}"
    else:
        params, loss, x, y, radii = mobilenet_problem(args.batch)
        model_name = "pretrained MobileNetV2, 10-class head, 32x32, BatchNorm in eval mode"
    num_params = sum(x.size for x in jax.tree.leaves(params))
    load_before = os.getloadavg()[0]

    adam = optax.adam(1e-3)
    frob = optax.chain(optax.adam(1e-3), hessjax.project_to_anchor(radii, norm="frobenius"))
    inf_op = optax.chain(optax.adam(1e-3), hessjax.project_to_anchor(radii, norm="inf_op"))
    variants = {}
    for donate in (True, False):
        suffix = "" if donate else " (no donation)"
        variants["adam" + suffix] = (adam, donate)
        variants["adam+project_frobenius" + suffix] = (frob, donate)
        variants["adam+project_inf_op" + suffix] = (inf_op, donate)
    times = time_interleaved(variants, params, x, y, args.repeats, loss=loss)
    median_ms = {name: float(np.median(t) * 1e3) for name, t in times.items()}
    min_ms = {name: float(np.min(t) * 1e3) for name, t in times.items()}

    def overhead(stat):
        out = {}
        for name, ms in stat.items():
            if name.startswith("adam+"):
                base = stat["adam" + (" (no donation)" if "no donation" in name else "")]
                out[name] = 100.0 * (ms - base) / base
        return out

    result = {
        "model": model_name,
        "command": " ".join(["python", *sys.argv]),
        "commit": git_commit(),
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
        "num_params": int(num_params),
        "batch": args.batch,
        "repeats_per_variant": args.repeats,
        "median_step_ms": median_ms,
        "min_step_ms": min_ms,
        "overhead_percent_median": overhead(median_ms),
        "overhead_percent_min": overhead(min_ms),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "optax": optax.__version__,
        "machine": platform.machine(),
        "note": (
            "single steps of all variants interleaved after warm-up; 'donation' = "
            "jit(donate_argnums=(params, opt_state)), the usual training-loop setting; see "
            "load_average_1min_before_after for other load on the machine"
        ),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
