"""Benchmark: cost of the Hessian distance measure on a small CNN (issue 3).

Times :func:`hessjax.measures.hessian_distance` for 256 examples of a small CNN (three 3x3
convolutions on 32x32x3 inputs, then a dense head) on this machine, for a few Lanczos step
counts and example chunk sizes, and the reference-code variant. Writes JSON with the time per
example, the HVPs per example (``L * num_iters`` block products), the compile time and the peak
resident memory of the process.

With ``--model mobilenet_v2`` it times instead the demo's setting: the ImageNet-pretrained
MobileNetV2 (new 10-class head) at 32x32 inputs, the measure over 256 examples of the later
blocks (``features.14-18`` and the head, as ``hessjax measure`` does by default), with an anchor
displaced by small random noise (the cost does not depend on the displacement).

With ``--run DIR`` the model, weights, anchor and training examples come from a finished
``hessjax finetune`` run (e.g. the demo's plainly fine-tuned MobileNetV2, every layer displaced
from ImageNet), measured over every kernel (``--layers`` to choose). ``--psd-blocks`` times
``hessian_distance(psd_blocks=True)`` (exact for networks piecewise linear in each layer's
weights, such as MobileNetV2) in place of plain screening.

Usage::

    .venv/bin/python experiments/bench_measure.py [--out experiments/results/bench_measure.json]
    .venv/bin/python experiments/bench_measure.py --model mobilenet_v2 \
        --out experiments/results/bench_measure_mobilenet.json
    .venv/bin/python experiments/bench_measure.py --run runs/demo/plain --compare-screening \
        --psd-blocks --num-iters 8 16 --brute-subset 4 \
        --out experiments/results/bench_measure_psd_mobilenet.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import hessjax
from hessjax.experiment import git_commit


def small_cnn(key: jax.Array, num_classes: int = 10):
    """Params and per-example loss of a small CNN: conv16-conv32-conv32 (stride 2) -> dense."""
    ks = jax.random.split(key, 4)

    def conv_init(k, cin, cout):
        return jax.random.normal(k, (3, 3, cin, cout)) * np.sqrt(2.0 / (9 * cin))

    params = {
        "conv1": {"kernel": conv_init(ks[0], 3, 16), "bias": jnp.zeros(16)},
        "conv2": {"kernel": conv_init(ks[1], 16, 32), "bias": jnp.zeros(32)},
        "conv3": {"kernel": conv_init(ks[2], 32, 32), "bias": jnp.zeros(32)},
        "head": {
            "kernel": jax.random.normal(ks[3], (4 * 4 * 32, num_classes)) * 0.05,
            "bias": jnp.zeros(num_classes),
        },
    }

    def logits_fn(p, x):
        h = x[None]
        for name in ("conv1", "conv2", "conv3"):
            h = jax.lax.conv_general_dilated(
                h, p[name]["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            h = jnp.tanh(h + p[name]["bias"])
        return h.reshape(-1) @ p["head"]["kernel"] + p["head"]["bias"]

    def loss(p, example):
        x, y = example
        return -jax.nn.log_softmax(logits_fn(p, x))[y]

    return params, loss


def mobilenet(key: jax.Array, image_size: int, num_classes: int = 10):
    """Params (pure dict), per-example loss and layer selection of the pretrained MobileNetV2."""
    from flax import nnx

    from hessjax.models import pretrained_mobilenet_v2

    model = pretrained_mobilenet_v2(num_classes)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    # A non-zero head so the loss has curvature in every selected layer.
    params["classifier"][1]["kernel"] = 0.01 * jax.random.normal(
        key, params["classifier"][1]["kernel"].shape
    )

    def loss(p, example):
        x, y = example
        state = nnx.State(p) if not isinstance(p, nnx.State) else p
        logits = nnx.merge(graphdef, state, rest)(x[None])[0]
        return -jax.nn.log_softmax(logits)[y]

    def later_blocks(name, leaf):
        parts = name.split("/")
        if jnp.ndim(leaf) < 2:
            return False
        return parts[0] == "classifier" or (parts[0] == "features" and int(parts[1]) >= 14)

    return params, loss, later_blocks


def _time(fn, repeats: int) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    value = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times)), value


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and writes the JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="experiments/results/bench_measure.json")
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=("small_cnn", "mobilenet_v2"), default="small_cnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-iters", type=int, nargs="*", default=None)
    parser.add_argument("--chunk-size", type=int, default=1)
    parser.add_argument(
        "--compare-screening",
        action="store_true",
        help="time screening=True on all examples vs brute force on --brute-subset examples",
    )
    parser.add_argument("--brute-subset", type=int, default=8)
    parser.add_argument("--all-layers", action="store_true", help="mobilenet: every layer")
    parser.add_argument("--run", default=None, help="a hessjax finetune run to measure")
    parser.add_argument("--layers", default=".*kernel", help="with --run: measured kernels")
    parser.add_argument(
        "--psd-blocks", action="store_true", help="time psd_blocks=True, not screening"
    )
    args = parser.parse_args(argv)
    if args.run is not None:
        from hessjax.experiment import load_run

        r = load_run(args.run, layers=args.layers)
        m = min(args.num_examples, len(r.splits.train_labels))
        args.num_examples, args.model = m, f"run {args.run} ({r.cfg['model']})"
        args.image_size = r.cfg.get("image_size")
        examples = (jnp.asarray(r.splits.train_images[:m]), jnp.asarray(r.splits.train_labels[:m]))
        return _compare_screening(args, argv, r.example_loss, r.params, r.anchor, examples,
                                  r.partition, n=len(r.splits.train_labels))  # fmt: skip

    key = jax.random.key(args.seed)
    k_params, k_anchor, k_x, k_y = jax.random.split(key, 4)
    if args.model == "small_cnn":
        params, loss = small_cnn(k_params)
        select = None
    else:
        params, loss, select = mobilenet(k_params, args.image_size)
        if args.all_layers:
            select = None
    anchor = jax.tree_util.tree_map(
        lambda x, k: x - 0.05 * jax.random.normal(k, x.shape),
        params,
        jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(params),
            list(jax.random.split(k_anchor, len(jax.tree_util.tree_leaves(params)))),
        ),
    )
    m = args.num_examples
    examples = (
        jax.random.normal(k_x, (m, args.image_size, args.image_size, 3)),
        jax.random.randint(k_y, (m,), 0, 10),
    )
    part = hessjax.layer_partition(params, select=select)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    if args.compare_screening:
        return _compare_screening(args, argv, loss, params, anchor, examples, part)
    rows = []
    if args.num_iters is None:
        configs = [
            ("canonical", 4, 1),
            ("canonical", 8, 1),
            ("canonical", 16, 1),
            ("canonical", 8, 16),
            ("reference", 0, 16),
        ]
    else:
        configs = [("canonical", k, args.chunk_size) for k in args.num_iters]
        configs.append(("reference", 0, args.chunk_size))
    for variant, num_iters, chunk in configs:
        kwargs = dict(n=1000, partition=part, chunk_size=chunk, variant=variant)
        if variant == "canonical":  # brute force: Lanczos on every example (what is timed)
            kwargs.update(num_iters=num_iters, screening=False)
        first, median, value = _time(
            lambda kwargs=kwargs: (
                hessjax.measures.hessian_distance(loss, params, anchor, examples, **kwargs).measure
            ),
            args.repeats,
        )
        hvps = part.num_layers * num_iters if variant == "canonical" else 1.0 / 4
        row = {
            "variant": variant,
            "num_iters": num_iters if variant == "canonical" else None,
            "chunk_size": chunk,
            "seconds_total": median,
            "seconds_first_call_incl_compile": first,
            "seconds_per_example": median / m,
            "hvps_per_example": hvps,
            "ms_per_hvp": 1e3 * median / (m * hvps),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "measure_value": float(value),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    # Cost of one gradient of a batch of 256 for scale.
    batch_loss = jax.jit(jax.grad(lambda p: jnp.mean(jax.vmap(lambda ex: loss(p, ex))(examples))))
    _, grad_time, _ = _time(lambda: batch_loss(params), 5)
    result = {
        "benchmark": f"hessian_distance on {args.model}",
        "image_size": args.image_size,
        "command": " ".join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:])),
        "commit": git_commit(),
        "seed": args.seed,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "num_examples": m,
        "num_params": int(num_params),
        "layers": list(part.names),
        "layer_sizes": list(part.sizes),
        "seconds_gradient_batch_of_examples": grad_time,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


def _compare_screening(args, argv, loss, params, anchor, examples, part, n=1000) -> dict:
    """Screened measure on all examples vs brute force on a subset (extrapolated linearly);
    ``n``: the training-set size in the measure (a run's own; 1000 for random problems)."""
    m, sub = args.num_examples, min(args.brute_subset, args.num_examples)
    subset = jax.tree_util.tree_map(lambda x: x[:sub], examples)
    rows = []
    for num_iters in args.num_iters or [8, 16]:
        kw = dict(n=n, partition=part, num_iters=num_iters)
        fast = dict(psd_blocks=True) if args.psd_blocks else dict(screening=True)
        load = os.getloadavg()
        t0 = time.perf_counter()
        screened = hessjax.measures.hessian_distance(loss, params, anchor, examples, **fast, **kw)
        jax.block_until_ready(screened.per_layer)
        t_screened = time.perf_counter() - t0
        t0 = time.perf_counter()
        brute = hessjax.measures.hessian_distance(loss, params, anchor, subset, screening=False,
                                                  **kw)  # fmt: skip
        jax.block_until_ready(brute.per_layer)
        t_brute = time.perf_counter() - t0
        t0 = time.perf_counter()  # again, compiled: the steady-state cost of each
        again = hessjax.measures.hessian_distance(loss, params, anchor, examples, **fast, **kw)
        jax.block_until_ready(again.per_layer)
        t_screened_again = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(hessjax.measures.hessian_distance(
            loss, params, anchor, subset, screening=False, **kw).per_layer)  # fmt: skip
        t_brute_again = time.perf_counter() - t0
        screened_sub = hessjax.measures.hessian_distance(loss, params, anchor, subset, **fast, **kw)
        jax.block_until_ready(screened_sub.per_layer)
        rows.append(
            {
                "num_iters": num_iters,
                "seconds_screened_all_examples_incl_compile": t_screened,
                "seconds_brute_force_subset_incl_compile": t_brute,
                "brute_force_subset": sub,
                "seconds_brute_force_extrapolated_linearly": t_brute * m / sub,
                "speedup_vs_extrapolated_brute_force": t_brute * m / sub / t_screened,
                "seconds_screened_all_examples_compiled": t_screened_again,
                "seconds_brute_force_subset_compiled": t_brute_again,
                "seconds_brute_force_compiled_extrapolated_linearly": t_brute_again * m / sub,
                "speedup_compiled": t_brute_again * m / sub / t_screened_again,
                "speedup_incl_compile_brute_compile_counted_once": (
                    (t_brute - t_brute_again + t_brute_again * m / sub) / t_screened
                ),
                "refined_per_layer": np.asarray(screened.refined).tolist(),
                "num_refined_examples": int(screened.num_refined),
                "measure_screened": float(screened.measure),
                "subset_measure_screened": float(screened_sub.measure),
                "subset_measure_brute_force": float(brute.measure),
                "subset_max_rel_diff_per_layer": float(
                    np.max(
                        np.abs(np.asarray(screened_sub.per_layer) - np.asarray(brute.per_layer))
                        / np.maximum(np.asarray(brute.per_layer), 1e-30)
                    )
                ),
                "subset_argmax_equal": bool(np.all(screened_sub.argmax == brute.argmax)),
                "loadavg_before": load,
                "loadavg_after": os.getloadavg(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": f"hessian_distance {'psd_blocks' if args.psd_blocks else 'screening'} "
        f"vs brute force on {args.model}",
        "note": "brute force timed on the first brute_force_subset examples and extrapolated "
        "linearly to num_examples; each timed twice: the first call includes compile (the "
        "plain linear extrapolation over-counts brute-force compile; "
        "speedup_incl_compile_brute_compile_counted_once counts it once), the second is "
        "compiled (speedup_compiled: steady state)",
        "command": " ".join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:])),
        "commit": git_commit(),
        "seed": args.seed,
        "image_size": args.image_size,
        "num_examples": m,
        "n": n,
        "layers": list(part.names),
        "layer_sizes": list(part.sizes),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
