"""Benchmark of the curvature core: HVP costs relative to a gradient, and estimator matvec counts.

Writes one JSON file (default ``experiments/results/bench_curvature.json``) with:

* ``timings``: for an MLP (784-512-512-10) and a small CNN (3 convs on 32x32x3 + dense head)
  at batch 128, the median wall time (after a warm-up call, ``block_until_ready``, several
  repeats) of the loss, the gradient, :func:`hessjax.hvp`, one :func:`hessjax.hvp_fn` product
  after linearisation and the linearisation itself, the per-probe cost of vmapped products with
  8 and 32 probes (:func:`hessjax.batched_hvp`), and :func:`hessjax.block_hvp` over the layers
  of the default partition; each also as a ratio to the gradient time.
* ``trace``: the number of matvecs Hutchinson and Hutch++ need for 1% relative error of the trace
  of a dense operator with eigenvalues ``1/i^2`` (root-mean-square error over seeds).
* ``eigen``: the number of matvecs Lanczos (:func:`hessjax.estimators.eigenvalues`) and
  deflated power iteration need for the top-5 eigenvalues to 1e-3 relative error.
* ``targets``: hvp_fn product <= 1.5x a gradient; Hutch++ >= 3x fewer matvecs than
  Hutchinson; Lanczos >= 5x fewer matvecs than deflated power iteration.

Everything is compiled. ``hvp_fn_product`` calls the matvec that ``hvp_fn`` returns for the
jitted loss (the linearisation ran once; a call runs the compiled linear part on the stored
residuals); ``hvp_fn_product_jit`` is ``jax.jit`` of that matvec; ``hvp_fn_linearise`` is the
time of linearisation plus one product in one jitted call minus ``hvp_fn_product``.
Timings on a shared machine are noisy; compare ratios, and rerun on a quiet machine.

Usage::

    python experiments/bench_curvature.py [--out PATH] [--repeats 5] [--seeds 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import hessjax
from hessjax import estimators
from hessjax.hessian import batched_hvp, block_hvp, hvp, hvp_fn
from hessjax.partition import layer_partition

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_curvature.json"


# --------------------------------------------------------------------------- models
def mlp_problem(key: jax.Array, sizes: tuple[int, ...], batch_size: int):
    """A tanh MLP with cross-entropy loss on random data.

    Args:
      key: PRNG key for weights and data.
      sizes: layer widths, input first and number of classes last (e.g. 784, 512, 512, 10).
      batch_size: number of examples.

    Returns:
      ``(loss_fn, params, batch)`` with ``loss_fn(params, batch)`` a scalar.
    """
    keys = jax.random.split(key, len(sizes) + 1)
    params = {
        f"dense{i}": {
            "kernel": jax.random.normal(keys[i], (n_in, n_out)) / np.sqrt(n_in),
            "bias": jnp.zeros(n_out),
        }
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }
    x = jax.random.normal(keys[-2], (batch_size, sizes[0]))
    y = jax.random.randint(keys[-1], (batch_size,), 0, sizes[-1])

    def loss_fn(params, batch):
        h = batch["x"]
        names = sorted(params, key=lambda n: int(n[5:]))
        for i, name in enumerate(names):
            h = h @ params[name]["kernel"] + params[name]["bias"]
            if i < len(names) - 1:
                h = jnp.tanh(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=-1))

    return loss_fn, params, {"x": x, "y": y}


def cnn_problem(
    key: jax.Array, channels: tuple[int, ...], image: int, hidden: int, batch_size: int
):
    """A small relu CNN (3x3 convs, the 2nd and later with stride 2) with a dense head.

    Args:
      key: PRNG key for weights and data.
      channels: input channels then the output channels of each conv (e.g. 3, 16, 32, 64).
      image: input height and width.
      hidden: width of the hidden dense layer (10 classes after it).
      batch_size: number of examples.

    Returns:
      ``(loss_fn, params, batch)``.
    """
    keys = jax.random.split(key, len(channels) + 4)
    params = {}
    size = image
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        params[f"conv{i}"] = {
            "kernel": jax.random.normal(keys[i], (3, 3, c_in, c_out)) / np.sqrt(9 * c_in),
            "bias": jnp.zeros(c_out),
        }
        size = size if i == 0 else -(-size // 2)
    flat = size * size * channels[-1]
    params["dense"] = {
        "kernel": jax.random.normal(keys[-4], (flat, hidden)) / np.sqrt(flat),
        "bias": jnp.zeros(hidden),
    }
    params["head"] = {
        "kernel": jax.random.normal(keys[-3], (hidden, 10)) / np.sqrt(hidden),
        "bias": jnp.zeros(10),
    }
    x = jax.random.normal(keys[-2], (batch_size, image, image, channels[0]))
    y = jax.random.randint(keys[-1], (batch_size,), 0, 10)
    num_convs = len(channels) - 1

    def loss_fn(params, batch):
        h = batch["x"]
        for i in range(num_convs):
            p = params[f"conv{i}"]
            stride = (1, 1) if i == 0 else (2, 2)
            h = jax.lax.conv_general_dilated(
                h, p["kernel"], stride, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            h = jax.nn.relu(h + p["bias"])
        h = h.reshape(h.shape[0], -1)
        h = jax.nn.relu(h @ params["dense"]["kernel"] + params["dense"]["bias"])
        logits = h @ params["head"]["kernel"] + params["head"]["bias"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=-1))

    return loss_fn, params, {"x": x, "y": y}


# --------------------------------------------------------------------------- timing
def median_time(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Median wall time in seconds of ``fn(*args)`` over ``repeats`` calls after one warm-up.

    Every call is waited for with ``jax.block_until_ready``.
    """
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_like(key: jax.Array, params: Any, num: int | None = None) -> Any:
    """Gaussian vectors like ``params`` (with a leading axis ``num`` if given)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    lead = () if num is None else (num,)
    out = [jax.random.normal(k, lead + x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def time_products(loss_fn, params, batch, *, repeats: int, probes=(8, 32)) -> dict:
    """Times loss, gradient and the Hessian products of one model (all jitted).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the point.
      batch: the data.
      repeats: timed calls per measurement (median reported).
      probes: numbers of vmapped probes for the per-probe cost.

    Returns:
      A dict of seconds and of ratios to the gradient time.
    """
    key = jax.random.key(1)
    v = random_like(key, params)
    part = layer_partition(params)
    loss = jax.jit(loss_fn)
    grad = jax.jit(jax.grad(loss_fn))
    product = jax.jit(lambda p, v, b: hvp(loss_fn, p, v, b))

    one_shot = jax.jit(lambda p, v, b: hvp_fn(loss_fn, p, b)(v))
    batched = jax.jit(lambda p, vs, b: batched_hvp(loss_fn, p, vs, b))
    block = jax.jit(lambda p, v, b: block_hvp(loss_fn, p, v, part, b))

    out: dict[str, Any] = {
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
        "num_layers": part.num_layers,
    }
    t = {}
    t["loss"] = median_time(loss, params, batch, repeats=repeats)
    t["grad"] = median_time(grad, params, batch, repeats=repeats)
    t["hvp"] = median_time(product, params, v, batch, repeats=repeats)
    # hvp_fn of the jitted loss: the linearisation runs once (compiled), and every call of the
    # returned matvec runs only the compiled linear part on the stored residuals.
    matvec = hvp_fn(loss, params, batch)
    t["hvp_fn_product"] = median_time(matvec, v, repeats=repeats)
    t["hvp_fn_product_jit"] = median_time(jax.jit(matvec), v, repeats=repeats)
    t["hvp_fn_linearise_plus_one_product"] = median_time(
        one_shot, params, v, batch, repeats=repeats
    )
    t["hvp_fn_linearise"] = max(t["hvp_fn_linearise_plus_one_product"] - t["hvp_fn_product"], 0.0)
    for m in probes:
        total = median_time(batched, params, random_like(key, params, m), batch, repeats=repeats)
        t[f"batched_{m}_total"] = total
        t[f"batched_{m}_per_probe"] = total / m
    t["block_hvp"] = median_time(block, params, v, batch, repeats=repeats)
    t["block_hvp_per_layer"] = t["block_hvp"] / part.num_layers
    out["seconds"] = t
    out["ratio_to_grad"] = {k: val / t["grad"] for k, val in t.items()}
    return out


# --------------------------------------------------------------------------- estimators
def decaying_operator(dim: int, power: float, seed: int = 0):
    """A dense symmetric matrix ``Q diag(1/i^power) Q^T`` (random orthogonal ``Q``) as a matvec.

    Returns:
      ``(matvec, eigenvalues descending as numpy float64)``.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eig = 1.0 / np.arange(1, dim + 1) ** power
    a = jnp.asarray((q * eig) @ q.T, jnp.float32)
    return (lambda v: a @ v), eig


def _geometric_grid(start: int, stop: int, factor: float) -> list[int]:
    grid, m = [], float(start)
    while m <= stop:
        if not grid or int(round(m)) > grid[-1]:
            grid.append(int(round(m)))
        m *= factor
    return grid


def trace_counts(
    dim: int, *, seeds: int, rel_tol: float = 0.01, max_probes: int = 32768, factor: float = 1.25
) -> dict:
    """Matvecs Hutchinson and Hutch++ need for ``rel_tol`` RMS relative error of the trace.

    For ``num_probes`` on a geometric grid the trace of the ``1/i^2`` operator is estimated with
    ``seeds`` keys; the count is the first grid value whose root-mean-square relative error over
    the seeds is ``<= rel_tol`` (the smallest per-seed counts are reported too, averaged).
    """
    matvec, eig = decaying_operator(dim, 2.0)
    truth = float(eig.sum())
    like = jnp.zeros(dim, jnp.float32)
    result: dict[str, Any] = {"dim": dim, "spectrum": "1/i^2", "rel_tol": rel_tol, "seeds": seeds}
    for name, fn, start in (
        ("hutchinson", estimators.hutchinson_trace, 2),
        ("hutchpp", estimators.hutchpp_trace, 3),
    ):
        run = jax.jit(
            lambda key, m, fn=fn: fn(matvec, like, key, num_probes=m, chunk_size=4096).value,
            static_argnums=1,
        )
        keys = jax.random.split(jax.random.key(123), seeds)
        first_ok = [None] * seeds
        count, rms_at = None, {}
        for m in _geometric_grid(start, max_probes, factor):
            errs = np.array([abs(float(run(k, m)) - truth) / truth for k in keys])
            rms = float(np.sqrt(np.mean(errs**2)))
            rms_at[m] = rms
            for s in range(seeds):
                if first_ok[s] is None and errs[s] <= rel_tol:
                    first_ok[s] = m
            if rms <= rel_tol:
                count = m
                break
        result[name] = {
            "matvecs_rms": count,
            "matvecs_first_hit_mean": float(np.mean([c for c in first_ok if c is not None]))
            if any(c is not None for c in first_ok)
            else None,
            "rms_rel_error_by_matvecs": rms_at,
        }
    # Rademacher Hutchinson variance 2 (||A||_F^2 - sum A_ii^2) / m, with sum A_ii^2 ~ 0:
    result["hutchinson_predicted_matvecs"] = float(2 * np.sum(eig**2) / (rel_tol * truth) ** 2)
    h, p = result["hutchinson"]["matvecs_rms"], result["hutchpp"]["matvecs_rms"]
    result["ratio"] = (h / p) if h and p else None
    return result


def eigen_counts(dim: int, *, seeds: int, power: float, k: int = 5, rel_tol: float = 1e-3) -> dict:
    """Matvecs Lanczos and deflated power iteration need for the top-``k`` eigenvalues.

    Lanczos: the smallest ``num_iters`` (each one matvec) whose top-``k`` Ritz values are all
    within ``rel_tol``. Power iteration: over stopping tolerances ``1e-2 .. 1e-9`` the smallest
    reported ``num_matvecs`` whose ``k`` values (sorted) are all within ``rel_tol``. Both
    averaged over ``seeds`` start keys, on the ``1/i^power`` operator.
    """
    matvec, eig = decaying_operator(dim, power, seed=1)
    top = eig[:k]
    like = jnp.zeros(dim, jnp.float32)
    max_iters = min(dim, 200)
    lanczos = jax.jit(
        lambda key: estimators.lanczos(
            matvec, jax.random.normal(key, (dim,), jnp.float32), num_iters=max_iters
        )
    )
    power_it = jax.jit(
        lambda key, tol: estimators.power_iteration(
            matvec, like, key, k=k, num_iters=5000, tol=tol
        ),
    )
    lanczos_counts, power_counts = [], []
    for key in jax.random.split(jax.random.key(7), seeds):
        # The Ritz values after n steps are the eigenvalues of the leading n x n block of T
        # (Lanczos is prefix-consistent), so one run of max_iters steps gives every n.
        res = lanczos(key)
        alphas = np.asarray(res.alphas, np.float64)
        betas = np.asarray(res.betas, np.float64)
        for n in range(k, int(res.num_valid) + 1):
            t = np.diag(alphas[:n]) + np.diag(betas[: n - 1], 1) + np.diag(betas[: n - 1], -1)
            vals = np.linalg.eigvalsh(t)[::-1][:k]
            if np.all(np.abs(vals - top) / top <= rel_tol):
                lanczos_counts.append(n)
                break
        else:
            lanczos_counts.append(np.nan)
        best = None
        for tol in 10.0 ** -np.arange(2, 10):
            vals, _, count = power_it(key, jnp.float32(tol))
            vals = np.sort(np.asarray(vals, np.float64))[::-1]
            if np.all(np.abs(vals - top) / top <= rel_tol):
                best = int(count)
                break
        power_counts.append(best)
    ok = [c for c in power_counts if c is not None]
    # Cross-check with the public eigenvalues() at the mean count (rounded up).
    n_check = int(np.ceil(np.nanmean(lanczos_counts)))
    got = estimators.eigenvalues(matvec, like, jax.random.key(0), k=k, num_iters=n_check)
    check = {
        "num_iters": n_check,
        "max_rel_error": float(np.max(np.abs(np.asarray(got, np.float64) - top) / top)),
    }
    out = {
        "dim": dim,
        "spectrum": f"1/i^{power:g}",
        "k": k,
        "rel_tol": rel_tol,
        "seeds": seeds,
        "lanczos_matvecs_mean": float(np.mean(lanczos_counts)),
        "lanczos_check_eigenvalues": check,
        "power_iteration_matvecs_mean": float(np.mean(ok)) if ok else None,
        "power_iteration_failures": len(power_counts) - len(ok),
    }
    out["ratio"] = out["power_iteration_matvecs_mean"] / out["lanczos_matvecs_mean"] if ok else None
    return out


# --------------------------------------------------------------------------- main
def metadata(argv: list[str]) -> dict:
    """Versions, device, CPU count, commit hash and command line of this run."""
    from hessjax.experiment import git_commit

    commit = git_commit()
    return {
        "jax_version": jax.__version__,
        "hessjax_version": hessjax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit,
        "command": " ".join(["python", *argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "wall-clock timings; noisy on a shared machine, compare ratios",
    }


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and writes the JSON; returns the results dict."""
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--batch", type=int, default=128, help="batch size of the models")
    parser.add_argument("--seeds", type=int, default=10, help="seeds for the estimator counts")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = parser.parse_args(argv[1:])

    if args.quick:
        mlp = mlp_problem(jax.random.key(0), (20, 16, 16, 10), 8)
        cnn = cnn_problem(jax.random.key(0), (3, 4, 4, 8), 8, 8, 8)
        dim, seeds, repeats, probes, max_probes = 60, 3, 1, (2, 4), 2048
    else:
        mlp = mlp_problem(jax.random.key(0), (784, 512, 512, 10), args.batch)
        cnn = cnn_problem(jax.random.key(0), (3, 16, 32, 64), 32, 64, args.batch)
        dim, seeds, repeats, probes, max_probes = 500, args.seeds, args.repeats, (8, 32), 32768

    results: dict[str, Any] = {"meta": metadata(argv)}
    results["timings"] = {
        "mlp_784_512_512_10" if not args.quick else "mlp_tiny": time_products(
            *mlp, repeats=repeats, probes=probes
        ),
        "cnn_3conv_32x32x3" if not args.quick else "cnn_tiny": time_products(
            *cnn, repeats=repeats, probes=probes
        ),
    }
    results["trace"] = trace_counts(dim, seeds=seeds, max_probes=max_probes)
    results["eigen"] = [
        eigen_counts(dim, seeds=seeds, power=2.0),
        eigen_counts(dim, seeds=seeds, power=1.0),
    ]
    product_ratio = max(m["ratio_to_grad"]["hvp_fn_product"] for m in results["timings"].values())
    trace_ratio = results["trace"]["ratio"]
    eigen_ratios = {e["spectrum"]: e["ratio"] for e in results["eigen"]}
    results["targets"] = {
        "hvp_fn_product_over_grad": {
            "value": product_ratio,
            "target": "<= 1.5",
            "met": product_ratio <= 1.5,
        },
        "hutchinson_over_hutchpp_matvecs": {
            "value": trace_ratio,
            "target": ">= 3",
            "met": bool(trace_ratio and trace_ratio >= 3),
        },
        "power_over_lanczos_matvecs": {
            "value": eigen_ratios,
            "target": ">= 5",
            "met": {k: bool(r and r >= 5) for k, r in eigen_ratios.items()},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    out = main()
    print(json.dumps(out["targets"], indent=2))
