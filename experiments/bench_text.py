"""Benchmark: MiniLM on text, a fine-tuning step and the Hessian distance measure per example.

All-MiniLM-L6-v2 with a 2-class zero head (:func:`hessjax.bert_classifier`, mean pooling) on
Amazon reviews tokenised to ``--max-length`` tokens:

* the fine-tuning step: one jitted AdamW step (forward, backward with dropout, update) on a
  batch of ``--batch-size`` reviews, the median of ``--steps`` timed steps after compilation;
* the forward pass alone (eval mode) on the same batch;
* the measure: :func:`hessjax.hessian_distance` (canonical) per example, over
  ``--examples`` reviews, for the default measured layers (every attention / FFN kernel and
  the head: 37 layers) and for the last encoder layer's kernels plus the head, with the anchor
  displaced by small random noise (the cost does not depend on the displacement).

    nice -n 5 .venv/bin/python experiments/bench_text.py      # ~10 min on 2 CPU cores

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

    # The measure: one example's loss in eval mode; anchor = params displaced by noise.
    pdict = nnx.to_pure_dict(params)
    leaves, treedef = jax.tree.flatten(pdict)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    anchor = jax.tree.unflatten(
        treedef,
        [
            a + 1e-3 * jax.random.normal(k, a.shape, a.dtype)
            for a, k in zip(leaves, keys, strict=True)
        ],
    )

    def example_loss(p, ex):
        s = jax.tree.map(lambda a: a, params)
        nnx.replace_by_pure_dict(s, p)
        return cross_entropy(nnx.merge(geval, s, rest)(ex[0][None]), ex[1][None])[0]

    examples = (jnp.asarray(x[: args.examples]), jnp.asarray(y[: args.examples]))
    selections = {  # label: (selector, layer_chunk_size)
        "last layer's 6 kernels and the head (7 layers)": (
            lambda n: n == "classifier/kernel" or (bert_measured_layer(n) and "/layer/5/" in n),
            None,
        ),
        "default (37 layers: attention/FFN kernels and the head), 1 layer at a time": (
            bert_measured_layer,
            1,
        ),
    }
    if args.skip_full:
        selections.popitem()
    for label, (select, layer_chunk) in selections.items():
        part = layer_partition(pdict, select=lambda n, leaf, s=select: s(n))
        one = (examples[0][:1], examples[1][:1])

        def measure(ex, part=part, layer_chunk=layer_chunk):
            return hessian_distance(example_loss, pdict, anchor, ex, n=1000, partition=part,
                                    num_iters=args.num_iters,
                                    layer_chunk_size=layer_chunk).measure  # fmt: skip

        _, compile_and_first = timed(measure, one)
        hd, t = timed(measure, examples)
        row = {
            "layers": label,
            "num_layers": part.num_layers,
            "num_iters": args.num_iters,
            "layer_chunk_size": layer_chunk,
            "num_examples": args.examples,
            "seconds_per_example": t / args.examples,
            "first_call_seconds_one_example": compile_and_first,
            "measure": float(hd),
        }
        result["measure"].append(row)
        print(json.dumps(row), flush=True)
        save()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
