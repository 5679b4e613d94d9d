"""Depthwise convolutions: shifted taps (hessjax's DepthwiseConv) vs XLA's grouped convolution.

For every depthwise convolution of MobileNetV2 at an input size (its channel count, spatial
size and stride), times jitted (a) the gradient of a scalar loss w.r.t. input and kernel and
(b) a jvp-of-grad Hessian-vector product w.r.t. the kernel, with
:func:`hessjax.models.depthwise_conv` and with ``lax.conv_general_dilated(...,
feature_group_count=C)``; then one gradient step of the whole pretrained network (batch 32)
with each implementation (the grouped one by calling ``nnx.Conv.__call__`` on the same
modules). Variants are interleaved after warm-up; medians in milliseconds. Writes
experiments/results/bench_depthwise.json with the command, commit and load average.

    .venv/bin/python experiments/bench_depthwise.py [--image-size 32] [--batch 32]
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
from flax import nnx

from hessjax.experiment import git_commit
from hessjax.models import DepthwiseConv, depthwise_conv, pretrained_mobilenet_v2


def grouped(x, k, stride):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
    )  # fmt: skip


def taps(x, k, stride):
    return depthwise_conv(x, k, (stride, stride), ((1, 1), (1, 1)))


def median_ms(fns: dict, args: dict, repeats: int) -> dict:
    """Interleaved timings: ``{name: median ms}`` after one warm-up call each."""
    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[name]))
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: float(np.median(t)) for name, t in times.items()}


def depthwise_shapes(image_size: int) -> list[tuple[int, int, int]]:
    """(spatial size, channels, stride) of every depthwise conv of MobileNetV2 at this input."""
    model = nnx.eval_shape(lambda: pretrained_mobilenet_v2(10))
    shapes, size = [], image_size // 2  # after the stride-2 stem
    for block in list(model.features)[1:18]:
        layers = list(block.conv)
        dw = next(
            m[0] for m in layers if hasattr(m, "__getitem__") and isinstance(m[0], DepthwiseConv)
        )
        stride = dw.strides if isinstance(dw.strides, int) else dw.strides[0]
        shapes.append((size, dw.kernel.shape[-1], stride))
        size = -(-size // stride)
    return shapes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="experiments/results/bench_depthwise.json")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    layers = []
    for size, channels, stride in sorted(set(depthwise_shapes(args.image_size))):
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, channels)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(3, 3, 1, channels)), jnp.float32)
        t = jnp.asarray(rng.normal(size=k.shape), jnp.float32)
        row = dict(spatial=size, channels=channels, stride=stride)
        for kind in ("grad", "hvp"):
            fns = {}
            for name, conv in (("taps", taps), ("grouped", grouped)):
                loss = lambda k, x, conv=conv: jnp.sum(jnp.tanh(conv(x, k, stride)) ** 2)
                if kind == "grad":
                    fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1)))
                else:
                    fns[name] = jax.jit(
                        lambda k, x, t, loss=loss: jax.jvp(
                            lambda k: jax.grad(loss)(k, x), (k,), (t,)
                        )[1]
                    )
            a = (k, x) if kind == "grad" else (k, x, t)
            ms = median_ms(fns, {"taps": a, "grouped": a}, args.repeats)
            row[f"{kind}_ms"] = ms
            row[f"{kind}_speedup"] = ms["grouped"] / ms["taps"]
        layers.append(row)
        print(json.dumps(row), flush=True)

    # The whole network: one gradient step, batch `args.batch`, with each implementation.
    model = pretrained_mobilenet_v2(10)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(rng.normal(size=(args.batch, args.image_size, args.image_size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch))

    def step_fn():
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(args.batch), y])

        return jax.jit(jax.grad(loss))

    fast = step_fn()
    jax.block_until_ready(fast(params))
    original = DepthwiseConv.__call__
    DepthwiseConv.__call__ = nnx.Conv.__call__  # the same modules through XLA's grouped conv
    try:
        slow = step_fn()
        jax.block_until_ready(slow(params))
    finally:
        DepthwiseConv.__call__ = original
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(fast(params)), jax.tree.leaves(slow(params)), strict=True)
    )
    whole = median_ms({"taps": fast, "grouped": slow}, {"taps": (params,), "grouped": (params,)},
                      args.repeats)  # fmt: skip
    result = {
        "what": "depthwise convolutions of MobileNetV2: shifted taps vs XLA grouped conv (CPU)",
        "command": " ".join([pathlib.Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "image_size": args.image_size,
        "batch": args.batch,
        "repeats": args.repeats,
        "layers": layers,
        "whole_network_grad_step_ms": whole,
        "whole_network_speedup": whole["grouped"] / whole["taps"],
        "whole_network_max_abs_grad_difference": diff,
        "platform": platform.platform(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "commit": git_commit(),
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=2))
    return result


if __name__ == "__main__":
    main()
