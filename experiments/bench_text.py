"""Benchmark: MiniLM on text, a fine-tuning step and the Hessian distance measure per example.

All-MiniLM-L6-v2 with a 2-class zero head (:func:`hessjax.bert_classifier`, mean pooling) on
Amazon reviews tokenised to ``--max-length`` tokens:

* the fine-tuning step: one jitted AdamW step (forward, backward with dropout, update) on a
  batch of ``--batch-size`` reviews, the median of ``--steps`` timed steps after compilation;
* the forward pass alone (eval mode) on the same batch;
* the measure: :func:`hessjax.hessian_distance` (canonical, ``--num-iters`` Lanczos steps)
  over ``--examples`` reviews, for the last encoder layer's kernels plus the head (7 layers)
  and for the whole encoder: the default measured layers (every attention / FFN kernel of
  the 6 blocks and the head, 37 layers), brute force and/or screening, ``layer_chunk_size``
  layers' block products vmapped at once (``--full brute:1 brute:all screening:1``). The
  anchor is the pretrained MiniLM (zero head) and the params are the weights after the
  ``1 + --steps`` timed AdamW steps (a real, small fine-tuning displacement). Each measure
  is called twice on the same examples: the first call (tracing, compilation and the run)
  and the second (the run alone), whose time divided by the examples is the per-example
  cost.

    nice -n 5 .venv/bin/python experiments/bench_text.py      # ~15 min on 2 CPU cores
    .venv/bin/python experiments/bench_text.py --steps 3 --full brute:1 screening:1 brute:all
        # the committed results/bench_text.json: 38 min at load average 7-14
    .venv/bin/python experiments/bench_text.py --skip-full --steps 3   # ~3 min

Writes JSON (``--out``, default ``experiments/results/bench_text.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hessjax import hessian_distance, layer_partition
from hessjax.data import load_dataset
from hessjax.experiment import git_commit
from hessjax.models import bert_classifier, bert_measured_layer
from hessjax.train import cross_entropy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--examples", type=int, default=2)
    p.add_argument("--num-iters", type=int, default=8)
    p.add_argument("--skip-full", action="store_true", help="only the 7-layer measure")
    p.add_argument(
        "--full",
        nargs="+",
        default=["brute:1"],
        help="whole-encoder runs, METHOD:LAYER_CHUNK with METHOD brute or screening "
        "and LAYER_CHUNK an int or 'all' (e.g. brute:1 brute:all screening:1)",
    )
    p.add_argument("--screen-chunk-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("experiments/results/bench_text.json"))
    return p.parse_args(argv)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    x, y = load_dataset(f"amazon_reviews:{args.max_length}", "train")
    xb, yb = x[: args.batch_size], y[: args.batch_size]
    model = bert_classifier(2)
    model.train()
    gtrain, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    geval = nnx.split(model, nnx.Param, ...)[0]
    tx = optax.adamw(5e-5, weight_decay=0.01)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb, key):
        def loss(p):
            logits = nnx.merge(gtrain, p, rest)(xb, rngs=nnx.Rngs(dropout=key))
            return jnp.mean(cross_entropy(logits, yb))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    forward = jax.jit(lambda p, xb: nnx.merge(geval, p, rest)(xb))
    key = jax.random.key(0)
    pretrained = params  # the anchor of the measure
    (params, opt, _), compile_step = timed(step, params, opt, xb, yb, key)
    times = []
    for i in range(args.steps):
        (params, opt, _), t = timed(step, params, opt, xb, yb, jax.random.fold_in(key, i))
        times.append(t)
    _, compile_fwd = timed(forward, params, xb)
    fwd = [timed(forward, params, xb)[1] for _ in range(args.steps)]
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    result = {
        "benchmark": "bench_text",
        "command": " ".join(["python", *sys.argv]),
        "commit": git_commit(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "model": "all-MiniLM-L6-v2 + zero 2-class head (mean pooling)",
        "num_params": n_params,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "train_step": {
            "seconds_median": float(np.median(times)),
            "seconds_all": times,
            "compile_seconds": compile_step,
            "examples_per_second": args.batch_size / float(np.median(times)),
        },
        "forward": {"seconds_median": float(np.median(fwd)), "compile_seconds": compile_fwd},
        "measure": [],
        "load_average_at_start": os.getloadavg(),
    }
    print(json.dumps(result["train_step"], indent=1), flush=True)

    def save():  # after every measurement, so an interrupted run keeps what it measured
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    save()

    # The measure: one example's loss in eval mode; anchor = the pretrained weights, params =
    # the weights after the AdamW steps above.
    pdict = nnx.to_pure_dict(params)
    anchor = nnx.to_pure_dict(pretrained)
    result["displacement"] = {
        "anchor": "pretrained all-MiniLM-L6-v2, zero head",
        "params": f"after {1 + args.steps} AdamW steps (lr 5e-5, batch {args.batch_size})",
        "norm": float(optax.tree_utils.tree_norm(jax.tree.map(jnp.subtract, pdict, anchor))),
    }

    def example_loss(p, ex):
        s = jax.tree.map(lambda a: a, params)
        nnx.replace_by_pure_dict(s, p)
        return cross_entropy(nnx.merge(geval, s, rest)(ex[0][None]), ex[1][None])[0]

    examples = (jnp.asarray(x[: args.examples]), jnp.asarray(y[: args.examples]))
    last = "last layer's 6 kernels and the head (7 layers)"
    full = "default (37 layers: attention/FFN kernels of the 6 blocks and the head)"
    runs = [(last, lambda n: n == "classifier/kernel" or (bert_measured_layer(n) and
             "/layer/5/" in n), None, False)]  # fmt: skip
    for spec in [] if args.skip_full else args.full:
        method, _, chunk = spec.partition(":")
        if method not in ("brute", "screening") or not (chunk == "all" or chunk.isdigit()):
            raise SystemExit(f"--full: expected METHOD:LAYER_CHUNK, got {spec!r}")
        runs.append((full, bert_measured_layer, None if chunk == "all" else int(chunk),
                     method == "screening"))  # fmt: skip
    for label, select, layer_chunk, screening in runs:
        part = layer_partition(pdict, select=lambda n, leaf, s=select: s(n))

        def measure(ex, part=part, layer_chunk=layer_chunk, screening=screening):
            return hessian_distance(example_loss, pdict, anchor, ex, n=1000, partition=part,
                                    num_iters=args.num_iters, layer_chunk_size=layer_chunk,
                                    screening=screening,
                                    screen_chunk_size=args.screen_chunk_size)  # fmt: skip

        t0 = time.perf_counter()
        first = measure(examples)
        first_measure = float(first.measure)  # waits for the result
        first_call = time.perf_counter() - t0
        t0 = time.perf_counter()
        hd = measure(examples)
        hd_measure = float(hd.measure)
        t = time.perf_counter() - t0
        row = {
            "layers": label,
            "num_layers": part.num_layers,
            "num_iters": args.num_iters,
            "layer_chunk_size": layer_chunk,
            "screening": screening,
            "num_examples": args.examples,
            "seconds_per_example": t / args.examples,
            "seconds_second_call": t,
            "first_call_seconds": first_call,
            "compile_seconds_estimate": first_call - t,
            "measure": hd_measure,
            "measure_first_call": first_measure,
            "argmax": [int(a) for a in np.asarray(hd.argmax)],
            "load_average": os.getloadavg(),
        }
        if screening:
            row["num_refined"] = np.asarray(hd.num_refined).tolist()
            row["refined_per_layer"] = np.asarray(hd.refined).tolist()
        result["measure"].append(row)
        print(json.dumps(row), flush=True)
        save()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
