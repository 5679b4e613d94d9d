"""Side-by-side benchmark: hessjax's estimators against the PyTorch Hessian tools (issue 18).

One model for everyone: torchvision's ImageNet MobileNetV2 with a new 10-class head (kernel
``0.01 * N(0, 1)`` from a fixed numpy seed, bias 0), inputs 32x32, one batch of 32 random images
and labels, eval mode (BatchNorm running statistics, no dropout), mean cross-entropy. The
weights file is the one :func:`hessjax.models.pretrained_mobilenet_v2` reads; the head and the
batch go to the torch side in a ``.npz`` file, so both sides compute the same loss (printed:
``loss`` in the JSON).

Tasks (each timed after a first call; ``first_call_s`` is the first call, compile included):

* ``hvp``: one Hessian-vector product (hessjax: the matvec of :func:`hessjax.hvp_fn`, compiled
  once; torch: double backward, ``torch.func`` ``jvp(grad)``, curvlinops, hessian-eigenthings);
* ``hutchinson``: Hutchinson with 100 Rademacher probes; ``hutchpp``: Hutch++ with 99 matvecs;
* ``top1`` / ``top5``: the largest eigenvalue(s) by Lanczos (hessjax ``eigenvalues``, 22 and 30
  steps; hessian-eigenthings ``lanczos`` with the same steps; PyHessian's power iteration);
* ``power5``: deflated power iteration, top 5 (hessjax ``power_iteration``, PyHessian);
* ``density``: stochastic Lanczos quadrature, 2 probes x 40 steps;
* ``measure_canonical`` / ``measure_reference``: :func:`hessjax.measures.hessian_distance` on
  ``--num-examples`` examples of the later blocks (``features.14-18`` and the head; hessjax only);
* ``layer_traces``: :func:`hessjax.measures.layer_traces` on the same examples and layers, 2
  probes x 4 steps (hessjax only; products: per-example block products, ``block_hvp``);
* ``noise_stability``: :func:`hessjax.measures.noise_stability`, 4 antithetic draws and 4
  probes (hessjax only; its ratio is over 4 products plus 9 loss evaluations, ``loss``);
* ``quadform``: one quadratic form ``v^T f(H) v`` by 20 Lanczos steps (hessjax only);
  ``density`` and ``quadform`` run the library's default (partial reorthogonalisation);
  ``quadform_full`` / ``density_full`` with ``reorthogonalize=True`` (every step projected),
  ``quadform_noreorth`` / ``density_noreorth`` with ``reorthogonalize=False`` (the three-term
  recurrence alone; hessjax only).

Values: the estimate; Hutchinson's as ``[estimate, stderr]`` where the tool gives per-probe
values (hessjax, PyHessian): two independent 100-probe estimates of the same trace should lie
within about 2 combined standard errors of each other (the probes differ between tools).

Every task reports its number of Hessian-vector products and ``ratio_to_products``: its time
over (products x the time of one product, measured in the same round). Rounds are interleaved
(hessjax round r, then the torch round r); the JSON keeps every round, the medians and
``os.getloadavg()`` before each round: on a shared machine compare ratios from the same run.

The torch side runs only with ``--torch-python PATH``, an interpreter that has torch,
torchvision, curvlinops-for-pytorch, pyhessian and hessian-eigenthings (torch is never a
dependency of hessjax); it runs this same file with ``--torch-worker``, on ``--threads``
threads (default: every core, as XLA:CPU uses them). PyHessian's density calls ``torch.eig``,
which torch 2 removed: the worker puts back an equivalent for its symmetric tridiagonal matrix
(``torch.linalg.eigh``; the Lanczos loop, the cost, is PyHessian's own).

JAX's persistent compilation cache is on (``hessjax.experiment.env.default_compilation_cache_dir``;
``--no-compilation-cache`` turns it off, which is how the first-call times are measured).

Usage::

    .venv/bin/python experiments/bench_peers.py --no-compilation-cache \
        [--torch-python /tmp/torchenv/bin/python] [--rounds 3] [--tasks hvp hutchinson ...] \
        [--out experiments/results/bench_peers.json]

On a GPU: ``--torch-device cuda`` runs the peers there too (the timed tasks end in a host read of
their value, which waits for the device; JAX's work is waited for the same way), and
``--map-fn host | vmap`` picks hessjax's loop strategy (the default,
:func:`hessjax.mapping.default_map_fn`, is the host loop on every backend), so one run per
strategy measures both (``experiments/bench_peers_gpu.sh``).

``speedup_vs_fastest_peer`` compares wall clock and seconds per product (PyHessian's trace and
power iteration stop early by a tolerance: the per-product figure is the fair one there);
``--resummarise`` recomputes it for an existing ``--out`` from its medians, running nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_peers.json"
TASKS = (
    "hvp",
    "hutchinson",
    "hutchpp",
    "top1",
    "top5",
    "density",
    "power5",
    "measure_reference",
    "measure_canonical",
    "layer_traces",
    "noise_stability",
    "quadform",
    "quadform_noreorth",
    "density_noreorth",
    "quadform_full",
    "density_full",
)
BATCH, IMAGE, CLASSES, SEED = 32, 32, 10, 0
MODELS = ("mobilenet_v2", "mlp", "minilm")
MLP_BATCH, TEXT_BATCH, TEXT_LENGTH = 256, 16, 64
NUM_PROBES, HUTCHPP, TOP1_STEPS, TOP5_STEPS = 100, 99, 22, 30
DENSITY_PROBES, DENSITY_STEPS, POWER_ITERS, POWER_TOL = 2, 40, 20, 1e-3
TRACE_PROBES, TRACE_STEPS, NOISE_DRAWS, NOISE_PROBES, QUAD_STEPS = 2, 4, 4, 4, 20


def shared_inputs(path: Path) -> None:
    """Writes the head kernel (torch layout (10, 1280)) and the batch (NHWC) to ``path``."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    head = (0.01 * rng.standard_normal((CLASSES, 1280))).astype(np.float32)
    x = rng.standard_normal((BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    y = (np.arange(BATCH) % CLASSES).astype(np.int32)
    np.savez(path, head=head, x=x, y=y)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------- hessjax side
def _first(tree) -> float:
    """The first entry of a pytree's first leaf (a task's printed value)."""
    import jax

    return float(jax.tree_util.tree_leaves(tree)[0].ravel()[0])


def problem(model_name: str, inputs: Path):
    """``(params, loss, example_loss, batch, later)`` of one benchmark model.

    ``mobilenet_v2``: the ImageNet MobileNetV2 with the shared head and batch of ``inputs``
    (the torch side's model); measured layers ``features.14-18`` and the head. ``mlp``: a user
    model of the benchmark's own, 3072-1024-1024-10 with GELU (4.2M parameters, not from the
    zoo), ``MLP_BATCH`` random 32x32x3 images; measured layers: its three kernels. ``minilm``:
    all-MiniLM-L6-v2 with a 2-class head (``0.01 N(0, 1)``), ``TEXT_BATCH`` random token
    sequences of ``TEXT_LENGTH`` tokens, eval mode; measured layers: the last encoder layer's
    six kernels and the head.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    rng = np.random.default_rng(SEED)
    if model_name == "mobilenet_v2":
        from hessjax.models import pretrained_mobilenet_v2

        data = np.load(inputs)
        model = pretrained_mobilenet_v2(CLASSES)
        model.eval()
        batch = (jnp.asarray(data["x"]), jnp.asarray(data["y"]))

        def set_head(p):
            p["classifier"][1]["kernel"] = jnp.asarray(data["head"].T)

        def later(name, leaf):
            parts = name.split("/")
            if jnp.ndim(leaf) < 2:
                return False
            return parts[0] == "classifier" or (parts[0] == "features" and int(parts[1]) >= 14)

    elif model_name == "mlp":

        class MLP(nnx.Module):
            def __init__(self, rngs):
                self.l1 = nnx.Linear(IMAGE * IMAGE * 3, 1024, rngs=rngs)
                self.l2 = nnx.Linear(1024, 1024, rngs=rngs)
                self.l3 = nnx.Linear(1024, CLASSES, rngs=rngs)

            def __call__(self, x):
                x = x.reshape(x.shape[0], -1)
                return self.l3(jax.nn.gelu(self.l2(jax.nn.gelu(self.l1(x)))))

        model = MLP(nnx.Rngs(SEED))
        x = rng.standard_normal((MLP_BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
        batch = (jnp.asarray(x), jnp.asarray(np.arange(MLP_BATCH) % CLASSES, jnp.int32))
        set_head = lambda p: None
        later = lambda name, leaf: jnp.ndim(leaf) == 2
    elif model_name == "minilm":
        from hessjax.models import bert_classifier, bert_measured_layer

        model = bert_classifier(2)
        ids = rng.integers(1000, 30000, (TEXT_BATCH, TEXT_LENGTH))
        x = np.stack([ids, np.ones_like(ids), np.zeros_like(ids)], axis=1).astype(np.int32)
        batch = (jnp.asarray(x), jnp.asarray(np.arange(TEXT_BATCH) % 2, jnp.int32))

        def set_head(p):
            k = p["classifier"]["kernel"]
            p["classifier"]["kernel"] = jnp.asarray(0.01 * rng.standard_normal(k.shape), k.dtype)

        last = f"/layer/{5}/"
        later = lambda name, leaf: (
            bert_measured_layer(name) and (name.startswith("classifier") or last in f"/{name}/")
        )
    else:
        raise ValueError(f"model: expected one of {MODELS}, got {model_name!r}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    set_head(params)

    def logits_fn(p, x):
        return nnx.merge(graphdef, nnx.State(p), rest)(x)

    def loss(p, batch):
        logp = jax.nn.log_softmax(logits_fn(p, batch[0]))
        return -jnp.mean(jnp.take_along_axis(logp, batch[1][:, None], axis=1))

    def example_loss(p, example):
        logp = jax.nn.log_softmax(logits_fn(p, example[0][None])[0])
        return -logp[example[1]]

    return params, loss, example_loss, batch, later


MAP_FNS = ("default", "host", "vmap")


def hessjax_side(inputs: Path, tasks: tuple[str, ...], num_examples: int,
                 model_name: str = "mobilenet_v2", map_fn: str = "default"):  # fmt: skip
    """Returns ``(info, {task: callable -> (value, products)})`` for the hessjax side.

    ``map_fn``: the loop strategy of the estimators (``default``: the backend's,
    :func:`hessjax.mapping.default_map_fn`; ``host``: :func:`hessjax.mapping.host_map`, a
    Python loop over the compiled product; ``vmap``: :func:`hessjax.mapping.chunked_vmap`, the
    loop inside one compiled program).
    """
    import jax
    import jax.numpy as jnp

    import hessjax
    from hessjax import estimators
    from hessjax.mapping import chunked_vmap, compile_once, default_map_fn, host_map

    if map_fn not in MAP_FNS:
        raise ValueError(f"map_fn: expected one of {MAP_FNS}, got {map_fn!r}")
    mf = {"default": None, "host": host_map, "vmap": chunked_vmap}[map_fn]

    params, loss, example_loss, batch, later = problem(model_name, inputs)
    setup_s, matvec = _timed(lambda: hessjax.hvp_fn(loss, params, batch))
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    product = compile_once(matvec, v)
    key = jax.random.key(SEED)
    block = lambda p, i: jax.block_until_ready(p)

    part = hessjax.layer_partition(params, select=later)
    anchor = jax.tree_util.tree_map(lambda x: x * 0.99, params)
    m = num_examples
    examples = (batch[0][:m], batch[1][:m])

    def measure(variant, **kw):
        out = hessjax.measures.hessian_distance(
            example_loss, params, anchor, examples, n=1000, partition=part, variant=variant, **kw
        )
        return float(block(out.measure, 0))

    ex0 = (examples[0][0], examples[1][0])
    block_mv = hessjax.block_hvp_fn(example_loss, params, part, ex0)
    block_product = compile_once(block_mv, part.restrict(v))
    loss_call = compile_once(loss, params, batch)
    runs = {
        "hvp": lambda: (_first(block(product(v), 0)), 1),
        "hutchinson": lambda: (
            _estimate(
                estimators.hutchinson_trace(matvec, params, key, num_probes=NUM_PROBES, map_fn=mf)
            ),
            NUM_PROBES,
        ),
        "hutchpp": lambda: (
            float(
                estimators.hutchpp_trace(matvec, params, key, num_probes=HUTCHPP, map_fn=mf).value
            ),
            HUTCHPP,
        ),
        "top1": lambda: (
            float(
                estimators.eigenvalues(matvec, params, key, k=1, num_iters=TOP1_STEPS, map_fn=mf)[0]
            ),
            TOP1_STEPS,
        ),
        "top5": lambda: (
            [
                float(x)
                for x in estimators.eigenvalues(
                    matvec, params, key, k=5, num_iters=TOP5_STEPS, map_fn=mf
                )
            ],
            TOP5_STEPS,
        ),
        "density": lambda: _density(estimators, matvec, params, key, map_fn=mf),
        "density_noreorth": lambda: _density(estimators, matvec, params, key, False, mf),
        "density_full": lambda: _density(estimators, matvec, params, key, True, mf),
        "power5": lambda: _power(estimators, matvec, params, key, mf),
        "measure_canonical": lambda: (measure("canonical", num_iters=8), m * 8),
        "measure_reference": lambda: (measure("reference"), m / 4),
        "layer_traces": lambda: (
            float(
                hessjax.measures.layer_traces(
                    example_loss,
                    params,
                    examples,
                    key,
                    partition=part,
                    num_probes=TRACE_PROBES,
                    num_iters=TRACE_STEPS,
                ).max.sum()
            ),
            m * TRACE_PROBES * TRACE_STEPS,
        ),  # fmt: skip
        "noise_stability": lambda: (
            float(
                hessjax.measures.noise_stability(
                    loss,
                    params,
                    batch,
                    key,
                    sigma=1e-3,
                    num_draws=NOISE_DRAWS,
                    num_probes=NOISE_PROBES,
                ).predicted
            ),
            NOISE_PROBES,
        ),  # fmt: skip
        "quadform": lambda: _quadform(estimators, matvec, v, mf),
        "quadform_noreorth": lambda: _quadform(estimators, matvec, v, mf, False),
        "quadform_full": lambda: _quadform(estimators, matvec, v, mf, True),
        "block_hvp": lambda: (
            _first(block(block_product(part.restrict(v)), 0)),
            1,
        ),
        "loss": lambda: (float(block(loss_call(params, batch), 0)), 1),
    }
    info = {
        "model": model_name,
        "loss": float(jax.jit(loss)(params, batch)),
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
        "hvp_fn_setup_s": setup_s,
        "measure_layers": list(part.names),
        "num_examples": m,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "map_fn": map_fn,
        "map_fn_used": (mf or default_map_fn()).__name__,
    }
    return info, {t: runs[t] for t in tasks + ("block_hvp", "hvp", "loss") if t in runs}


def _quadform(estimators, matvec, v, map_fn=None, reorthogonalize=None):
    """``v^T H^+ v`` by QUAD_STEPS Lanczos steps (``reorthogonalize=None``: the default)."""
    kw = {} if reorthogonalize is None else {"reorthogonalize": reorthogonalize}
    out = estimators.quadratic_form(
        matvec, v, estimators.positive_part, num_iters=QUAD_STEPS, map_fn=map_fn, **kw
    )
    return float(out), QUAD_STEPS


def _density(estimators, matvec, params, key, reorthogonalize=None, map_fn=None):
    kw = {} if reorthogonalize is None else {"reorthogonalize": reorthogonalize}
    out = estimators.spectral_density(
        matvec, params, key, num_probes=DENSITY_PROBES, num_iters=DENSITY_STEPS,
        map_fn=map_fn, **kw,
    )  # fmt: skip
    return float(out.nodes.max()), DENSITY_PROBES * DENSITY_STEPS


def _power(estimators, matvec, params, key, map_fn=None):
    vals, _, count = estimators.power_iteration(
        matvec, params, key, k=5, num_iters=POWER_ITERS, tol=POWER_TOL, map_fn=map_fn
    )
    return [float(x) for x in vals], int(count)


# --------------------------------------------------------------------------- torch side
def _torch_worker(
    inputs: str, weights: str, tasks: list[str], threads: int, full: bool, device: str = "cpu"
) -> None:
    """The torch peers, driven by lines on stdin ("round") and answering JSON lines; ``device``:
    where the model, the batch and the vectors live (``cpu`` or ``cuda``; every timed task ends
    in a host read of its value, which waits for the device)."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # the peers' own prints must not mix with the answers
    import numpy as np
    import torch
    import torchvision

    torch.set_num_threads(threads)
    data = np.load(inputs)
    model = torchvision.models.mobilenet_v2()
    state = torch.load(weights, map_location="cpu", weights_only=False)
    model.load_state_dict(state)
    model.classifier[1] = torch.nn.Linear(1280, CLASSES)
    with torch.no_grad():
        model.classifier[1].weight.copy_(torch.from_numpy(data["head"]))
        model.classifier[1].bias.zero_()
    model.eval()
    model.to(device)
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(data["y"]).long().to(device)
    crit = torch.nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        loss0 = float(crit(model(x), y))
    v = [torch.ones_like(p) for p in params]
    runs = {}

    def double_backward():
        loss = crit(model(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(g, params, grad_outputs=v)
        return float(hv[-1][0]), 1

    from torch.func import functional_call, grad, jvp

    buffers = dict(model.named_buffers())
    pdict = {n: p.detach() for n, p in zip(names, params, strict=True)}

    def floss(p):
        return crit(functional_call(model, (p, buffers), (x,)), y)

    vdict = {n: t for n, t in zip(names, v, strict=True)}

    def torch_func():
        _, hv = jvp(grad(floss), (pdict,), (vdict,))
        return float(hv[names[-1]][0]), 1

    runs["hvp/torch_double_backward"] = double_backward
    runs["hvp/torch_func"] = torch_func
    try:
        import curvlinops

        H = curvlinops.HessianLinearOperator(
            model, crit, params, [(x, y)], check_deterministic=False
        )
        flat_v = torch.cat([t.flatten() for t in v])
        runs["hvp/curvlinops"] = lambda: (float((H @ flat_v)[-CLASSES]), 1)
        runs["hutchinson/curvlinops"] = lambda: (
            float(curvlinops.hutchinson_trace(H, NUM_PROBES)), NUM_PROBES,
        )  # fmt: skip
        runs["hutchpp/curvlinops"] = lambda: (float(curvlinops.hutchpp_trace(H, HUTCHPP)), HUTCHPP)
    except Exception as e:  # noqa: BLE001  (a peer that fails is reported, not fatal)
        runs["curvlinops_error"] = repr(e)
    try:
        import hessian_eigenthings as he

        op = he.HessianOperator(model, [(x, y)], lambda mdl, b: crit(mdl(b[0]), b[1]))
        flat = torch.cat([t.flatten() for t in v])
        runs["hvp/hessian_eigenthings"] = lambda: (float(op.matvec(flat)[-CLASSES]), 1)
        if full:
            runs["hutchinson/hessian_eigenthings"] = lambda: (
                float(he.hutchinson(op, num_samples=NUM_PROBES, seed=SEED).estimate), NUM_PROBES,
            )  # fmt: skip
            runs["hutchpp/hessian_eigenthings"] = lambda: (
                float(he.hutch_plus_plus(op, num_matvecs=HUTCHPP, seed=SEED).estimate), HUTCHPP,
            )  # fmt: skip
        runs["top1/hessian_eigenthings"] = lambda: (
            [float(t) for t in he.lanczos(op, k=1, max_iter=TOP1_STEPS, seed=SEED).eigenvalues],
            TOP1_STEPS,
        )
        runs["top5/hessian_eigenthings"] = lambda: (
            [float(t) for t in he.lanczos(op, k=5, max_iter=TOP5_STEPS, seed=SEED).eigenvalues],
            TOP5_STEPS,
        )
        runs["density/hessian_eigenthings"] = lambda: (
            float(torch.nan_to_num(  # its nodes per run, NaN-padded
                he.spectral_density(op, num_runs=DENSITY_PROBES, lanczos_steps=DENSITY_STEPS,
                                    seed=SEED).raw_eigenvalues, nan=-torch.inf).max()),
            DENSITY_PROBES * DENSITY_STEPS,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001
        runs["hessian_eigenthings_error"] = repr(e)
    try:
        import pyhessian

        def old_eig(a, eigenvectors=False):  # torch.eig (removed in torch 2), which PyHessian's
            w, q = torch.linalg.eigh(a)  # density calls on its symmetric tridiagonal matrix:
            e = torch.stack([w, torch.zeros_like(w)], 1)  # (n, 2) real and imaginary parts
            return e, (q if eigenvectors else torch.empty(0))

        torch.eig = old_eig
        ph_module = sys.modules["pyhessian.hessian"]

        counter = [0]
        original = ph_module.hessian_vector_product

        def counted(*a, **k):
            counter[0] += 1
            return original(*a, **k)

        ph_module.hessian_vector_product = counted

        def ph(method, **kw):
            counter[0] = 0
            h = pyhessian.hessian(model, crit, data=(x, y), cuda=device == "cuda")
            out = getattr(h, method)(**kw)
            return out, counter[0]

        def ph_trace():
            # PyHessian stops when |mean - previous| / (previous + 1e-6) < tol: the denominator
            # is signed, so a negative running mean (an indefinite Hessian's first probes) stops
            # it at any tol >= 0 after two probes; tol = -inf runs all NUM_PROBES
            out, n = ph("trace", maxIter=NUM_PROBES, tol=float("-inf"))
            return [float(np.mean(out)), float(np.std(out, ddof=1) / np.sqrt(len(out)))], n

        def ph_top(k):
            out, n = ph("eigenvalues", maxIter=POWER_ITERS, tol=POWER_TOL, top_n=k)
            return [float(t) for t in out[0]], n

        def ph_density():
            out, n = ph("density", iter=DENSITY_STEPS, n_v=DENSITY_PROBES)
            return float(max(max(r) for r in out[0])), n

        runs["hutchinson/pyhessian"] = ph_trace
        runs["top1/pyhessian"] = lambda: ph_top(1)
        runs["power5/pyhessian"] = lambda: ph_top(5)
        if full:
            runs["density/pyhessian"] = ph_density
    except Exception as e:  # noqa: BLE001
        runs["pyhessian_error"] = repr(e)
    errors = {k: v for k, v in runs.items() if isinstance(v, str)}
    runs = {k: v for k, v in runs.items() if not isinstance(v, str) and k.split("/")[0] in tasks}
    info = {"loss": loss0, "torch": torch.__version__, "threads": threads, "errors": errors,
            "device": device}  # fmt: skip
    print(json.dumps({"info": info}), file=protocol, flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        out = {}
        for name, fn in runs.items():
            try:
                dt, (value, products) = _timed(fn)
                out[name] = {"s": dt, "value": value, "products": products}
            except Exception as e:  # noqa: BLE001
                out[name] = {"error": repr(e)}
        print(json.dumps({"round": out}), file=protocol, flush=True)


# --------------------------------------------------------------------------- driver
def _answer(worker: subprocess.Popen) -> dict:
    """The next JSON line of the torch worker (other lines skipped)."""
    for line in worker.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"the torch worker ended (exit status {worker.wait()})")


def _estimate(est) -> list[float]:
    """[value, stderr] of a hessjax trace estimate (the peers' traces report theirs alike where
    they have one: PyHessian's per-probe values; curvlinops gives the value alone)."""
    return [float(est.value), float(est.stderr)]


def _base(name: str) -> str:
    """The product a task's time is compared with: hessjax's own, or the peer's own."""
    if "/" not in name:
        return "hvp"
    peer = name.split("/", 1)[1]
    return {"pyhessian": "hvp/torch_double_backward"}.get(peer, f"hvp/{peer}")


def _summarise(rounds: list[dict], skip_first: bool = True) -> dict:
    """Per task: first call, median after it, products, ratio to products (same rounds)."""
    names = sorted({n for r in rounds for n in r if "s" in r[n]})
    summary = {}
    for name in names:
        times = [r[name]["s"] for r in rounds if "s" in r.get(name, {})]
        ratios = []
        for r in rounds[1:] if skip_first and len(rounds) > 1 else rounds:
            row, base = r.get(name, {}), r.get(_base(name), {})
            if "s" in row and "s" in base and row.get("products"):
                ratios.append(row["s"] / (row["products"] * base["s"]))
        last = [r[name] for r in rounds if name in r][-1]
        summary[name] = {
            "first_call_s": times[0],
            "median_s": statistics.median(times[1:] if skip_first and len(times) > 1 else times),
            "products": last.get("products"),
            "ratio_to_products": statistics.median(ratios) if ratios else None,
            "value": last.get("value"),
        }
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rounds", type=int, default=3, help="first call + (rounds - 1) timed")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    parser.add_argument("--torch-python", default=None, help="interpreter with the torch peers")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads (OMP too); default: all cores, as JAX")  # fmt: skip
    parser.add_argument("--torch-device", default="cpu", choices=("cpu", "cuda"),
                        help="where the torch peers run")  # fmt: skip
    parser.add_argument("--map-fn", default="default", choices=MAP_FNS,
                        help="hessjax's loop strategy: the backend's default, a host loop over "
                        "the compiled product, or the loop inside one program (vmap)")  # fmt: skip
    parser.add_argument("--torch-rounds", type=int, default=None, help="torch: the last N rounds")
    parser.add_argument("--all-peers", action="store_true",
                        help="also eigenthings' traces, PyHessian's density")  # fmt: skip
    parser.add_argument("--num-examples", type=int, default=8, help="examples of the measures")
    parser.add_argument("--no-compilation-cache", action="store_true")
    parser.add_argument("--model", default="mobilenet_v2", choices=MODELS,
                        help="the hessjax side model (torch: mobilenet_v2 only)")  # fmt: skip
    parser.add_argument(
        "--torch-worker", nargs=2, metavar=("INPUTS", "WEIGHTS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--resummarise", action="store_true",
                        help="recompute --out's speedups; run nothing")  # fmt: skip
    args = parser.parse_args(argv)
    if args.resummarise:
        return resummarise(args.out)
    tasks = tuple(args.tasks)
    if args.torch_python and args.model != "mobilenet_v2":
        parser.error(f"--torch-python: the peers run MobileNetV2 only, not --model {args.model}")
    if args.torch_worker:
        _torch_worker(
            *args.torch_worker, list(tasks), args.threads, args.all_peers, args.torch_device
        )
        return {}

    import hessjax.experiment as hexp
    from hessjax.models import mobilenet_v2_weights_path

    cache = None if args.no_compilation_cache else hexp.use_compilation_cache()
    inputs = Path(tempfile.mkdtemp()) / "inputs.npz"
    shared_inputs(inputs)
    worker, torch_info = None, None
    if args.torch_python:
        weights = str(mobilenet_v2_weights_path())
        cmd = [args.torch_python, __file__, "--torch-worker", str(inputs), weights]
        cmd += ["--threads", str(args.threads), "--tasks", *tasks]
        cmd += ["--torch-device", args.torch_device]
        cmd += ["--all-peers"] if args.all_peers else []
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        worker = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        torch_info = _answer(worker)["info"]
    info, runs = hessjax_side(inputs, tasks, args.num_examples, args.model, args.map_fn)
    rounds_j, rounds_t, loads = [], [], []
    for r in range(args.rounds):
        loads.append(os.getloadavg())
        out = {}
        for name, fn in runs.items():
            dt, (value, products) = _timed(fn)
            out[name] = {"s": dt, "value": value, "products": products}
            print(f"round {r} hessjax {name}: {dt:.3f} s, {products} products", flush=True)
        rounds_j.append(out)
        torch_rounds = args.rounds if args.torch_rounds is None else args.torch_rounds
        if worker is not None and r >= args.rounds - torch_rounds:
            worker.stdin.write("round\n")
            worker.stdin.flush()
            rounds_t.append(_answer(worker)["round"])
            done = rounds_t[-1].items()
            line = ", ".join(f"{k} {v.get('s', float('nan')):.2f}s" for k, v in done)
            print(f"round {r} torch: {line}", flush=True)
        _write(args, argv, cache, info, rounds_j, loads, torch_info, rounds_t)
    if worker is not None:
        worker.stdin.close()
        worker.wait()
    return _write(args, argv, cache, info, rounds_j, loads, torch_info, rounds_t)


def _write(args, argv, cache, info, rounds_j, loads, torch_info, rounds_t) -> dict:
    """Summarises the rounds so far and writes the JSON (after every round: partial results)."""
    import hessjax.experiment as hexp

    summary = _summarise(rounds_j)
    for name in ("measure_canonical", "measure_reference", "layer_traces"):  # block products
        if name in summary:
            ratios = [
                r[name]["s"] / (r[name]["products"] * r["block_hvp"]["s"]) for r in rounds_j[1:]
            ]
            summary[name]["ratio_to_products"] = statistics.median(ratios) if ratios else None
            summary[name]["product"] = "one per-example block product (block_hvp)"
    if "noise_stability" in summary:  # products and 2 x draws + 1 losses
        budget = lambda r: NOISE_PROBES * r["hvp"]["s"] + (2 * NOISE_DRAWS + 1) * r["loss"]["s"]
        ratios = [r["noise_stability"]["s"] / budget(r) for r in rounds_j[1:]]
        summary["noise_stability"]["ratio_to_products"] = (
            statistics.median(ratios) if ratios else None
        )
        summary["noise_stability"]["product"] = "4 products + 9 loss evaluations"
    result = {
        "benchmark": _TITLES[args.model],
        "command": " ".join(
            [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])
        ),
        "commit": hexp.git_commit(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before_rounds": loads,
        "compilation_cache": str(cache) if cache else None,
        "hessjax": {"info": info, "summary": summary, "rounds": rounds_j},
    }
    if rounds_t:
        result["torch"] = {
            "info": torch_info,
            "summary": _summarise(rounds_t, skip_first=len(rounds_t) > 1),
            "rounds": rounds_t,
        }
        result["speedup_vs_fastest_peer"] = _speedups(summary, result["torch"]["summary"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _dump(args.out, result)
    print(
        json.dumps({"hessjax": summary, "speedup": result.get("speedup_vs_fastest_peer")}, indent=1)
    )
    return result


_TITLES = {
    "mobilenet_v2": "hessjax vs PyTorch Hessian tools, MobileNetV2 32x32 batch 32",
    "mlp": f"hessjax, MLP 3072-1024-1024-10 (GELU), batch {MLP_BATCH}",
    "minilm": f"hessjax, MiniLM-L6 + 2-class head, batch {TEXT_BATCH} x {TEXT_LENGTH} tokens",
}


def _speedups(ours: dict, peers: dict) -> dict:
    """Per task, the fastest peer by wall clock and by seconds per Hessian-vector product.

    ``speedup`` is the peer's time over hessjax's; ``speedup_per_product`` divides each by its
    own number of products first, which is the fair figure when the two sides ran different
    numbers of them (PyHessian's trace and power iteration stop early by a tolerance).
    """
    out = {}
    for task, row in ours.items():
        times = {
            k: v["median_s"] for k, v in peers.items() if k.split("/")[0] == task and v["median_s"]
        }
        if not times or not row["median_s"]:
            continue
        best = min(times, key=times.get)
        out[task] = {"fastest_peer": best, "peer_s": times[best], "hessjax_s": row["median_s"],
                     "speedup": times[best] / row["median_s"]}  # fmt: skip
        per = {k: t / peers[k]["products"] for k, t in times.items() if peers[k].get("products")}
        if per and row.get("products"):
            best_pp = min(per, key=per.get)
            ours_pp = row["median_s"] / row["products"]
            out[task].update(
                fastest_peer_per_product=best_pp,
                peer_products=peers[best_pp]["products"],
                hessjax_products=row["products"],
                peer_s_per_product=per[best_pp],
                hessjax_s_per_product=ours_pp,
                speedup_per_product=per[best_pp] / ours_pp,
            )
    return out


def resummarise(path: Path) -> dict:
    """Recomputes ``speedup_vs_fastest_peer`` of a written JSON from its own medians (no rerun)."""
    result = json.loads(path.read_text())
    if "torch" not in result:
        raise ValueError(f"--resummarise: {path} has no torch side (run with --torch-python)")
    result["speedup_vs_fastest_peer"] = _speedups(
        result["hessjax"]["summary"], result["torch"]["summary"]
    )
    _dump(path, result)
    return result


def _dump(path: Path, result: dict) -> None:
    """Writes the JSON beside ``path`` and renames it over: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
