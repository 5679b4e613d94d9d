"""Fine-tuning runs as directories: :func:`finetune`, :func:`load_run`, :func:`measure_run`.

A run directory holds ``config.json``, ``anchor/`` and ``final/`` (orbax), the checkpoints
(:class:`hessjax.train.Checkpointer`), ``metrics.json``/``metrics.csv`` and ``results.json``.

References:
  Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based
  Generalization Guarantees", ICML 2022.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hessjax.experiment.config import RunConfig, run_fingerprint
from hessjax.experiment.data import RunCache, first_block, make_run_model, noise_transition
from hessjax.experiment.env import data_mesh

__all__ = [
    "DEFAULT_CACHE",
    "Run",
    "finetune",
    "load_run",
    "measure_run",
    "read_config",
    "write_json",
]

# This process's cache of splits, trunk features and per-model losses.
DEFAULT_CACHE = RunCache()


def _save_tree(path: Path, tree) -> None:
    from hessjax.train import save_tree

    save_tree(path, tree)


def _load_tree(path: Path, target):
    from hessjax.train import load_tree

    return load_tree(path, target)


def write_json(path: str | Path, value) -> None:
    """Write ``value`` as JSON to ``path`` atomically (a temporary file renamed into place)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)


def read_config(run: str | Path) -> dict:
    """A run's config.json, or a ValueError naming the file."""
    run = Path(run)
    path = run / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"run: {run} has no config.json (not a `hessjax finetune` directory)"
        ) from None
    except (OSError, ValueError) as e:
        raise ValueError(f"config: {path} is unreadable or not JSON ({e})") from None
    missing = [k for k in _REQUIRED_CONFIG if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(
            f"config: {path} is not a `hessjax finetune` config (missing {missing[:5]})"
        )
    return cfg


_REQUIRED_CONFIG = ("dataset", "model", "seed", "val_size", "n_per_class", "test_size",
                    "image_size", "noise_type", "noise_rate", "method")  # fmt: skip


def _accept(out: Path, cfg: dict) -> dict | None:
    """Check that ``out`` may take this run, before anything is written into it.

    Returns the finished run's results when ``out`` holds the same run already finished
    (same options, resumable ones included), else None. Raises a ValueError naming every
    option that differs from the run the directory holds.
    """
    if not (out / "config.json").exists():
        if out.exists() and not out.is_dir():
            raise ValueError(f"output_dir: {out} exists and is not a directory")
        return None
    saved = read_config(out)
    # an option added after the run was made holds its default there
    saved_full = RunConfig().to_dict() | saved
    a, b = run_fingerprint(saved_full), run_fingerprint(cfg)
    diff = [f"config.{k} = {a.get(k)!r} in {out}, {b.get(k)!r} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]  # fmt: skip
    if diff:
        raise ValueError(
            f"output_dir: {out} holds another run (use another output directory or start "
            "afresh): " + "; ".join(diff)
        )
    try:
        res = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    # results.json of an older version has no config_end: config.json's values made it
    end = res.get("config_end", {k: saved.get(k) for k in _TRAJECTORY_END})
    finished = end == {k: cfg.get(k) for k in _TRAJECTORY_END}
    return res if finished else None


# The resumable options that decide where a run ends: a finished run rerun with the same ones
# is a no-op.
_TRAJECTORY_END = ("epochs", "max_steps")


def _pure_state(model):
    from flax import nnx

    from hessjax.train import split_model

    _, _, params, rest = split_model(model)
    return {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}


def _load_into(model, tree) -> None:
    from flax import nnx

    from hessjax.train import split_model

    _, _, params, rest = split_model(model)
    nnx.replace_by_pure_dict(params, tree["params"])
    nnx.replace_by_pure_dict(rest, tree["rest"])
    nnx.update(model, params, rest)


def _predict_probs(model, images, batch_size=256):
    import jax

    fn = jax.jit(lambda x: jax.nn.softmax(model(x), -1))
    return np.concatenate(
        [np.asarray(fn(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )


def finetune(
    config: RunConfig | Mapping[str, Any],
    *,
    progress: bool = True,
    splits=None,
    cache: RunCache | None = None,
) -> dict[str, Any]:
    """Run one fine-tuning experiment; write it to ``config.output_dir``.

    Files: ``config.json``, ``anchor/`` and ``final/`` (orbax), ``checkpoints/{last,best}``,
    ``metrics.json``/``metrics.csv`` (per epoch) and ``results.json`` (train loss on the noisy
    training labels, clean validation/test loss and accuracy, generalization gap).

    Args:
      config: a :class:`RunConfig` (or a dict of its fields: the options of
        ``hessjax finetune``).
      progress: bars on a terminal and one line per epoch (see :func:`hessjax.train.fit`).
      splits: already loaded :class:`hessjax.Splits` (must match ``config``), to share data.
      cache: the :class:`RunCache` for splits and trunk features (default: this process's).

    ``config.devices`` (``--devices``: an int or ``"all"``; None: one device) splits every
    training batch over a data-parallel mesh (:func:`hessjax.sharding.make_mesh`,
    :func:`hessjax.train.fit` ``mesh=``).

    Reruns: the options are checked against the directory's ``config.json`` before anything
    is written (every option but :data:`~hessjax.experiment.RESUMABLE_OPTIONS` must be the
    same); a finished run rerun with the same options is a no-op that returns its results
    (with ``"already_finished": True``); an interrupted one resumes exactly. One process at a
    time: :class:`hessjax.train.RunLock` on the directory.

    Returns:
      The results dict (also in ``results.json``).

    Raises:
      ValueError: bad options (naming them), a directory holding another run or in use by
        another process, a mismatched or corrupt checkpoint.
    """
    from hessjax.train import RunLock

    cfg = RunConfig.from_dict(config).to_dict()
    cache = DEFAULT_CACHE if cache is None else cache
    _train_config(cfg)  # bad options fail before the directory is touched
    out = Path(cfg["output_dir"])
    done = _accept(out, cfg)
    if done is not None:
        return dict(done, already_finished=True)
    with RunLock(out):
        if (out / "config.json").exists():
            done = _accept(out, cfg)  # another process may have finished it meanwhile
            if done is not None:
                return dict(done, already_finished=True)
        return _run_finetune(out, cfg, progress=progress, splits=splits, cache=cache)


def _train_config(cfg: dict):
    from hessjax.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in cfg.items() if k in names})


def _run_finetune(out: Path, cfg: dict, *, progress: bool, splits, cache) -> dict[str, Any]:
    import jax.numpy as jnp
    from flax import nnx

    from hessjax.bounds import generalization_gap
    from hessjax.noise import dual_t_transition, symmetric_transition
    from hessjax.train import NEEDS_TRANSITION, build_method, evaluate, fit, split_model

    if splits is None:
        splits, true_t = cache.splits(cfg)
    else:
        true_t = noise_transition(cfg["noise_type"], cfg["noise_rate"], splits.num_classes)
    raw, splits = splits, cache.with_trunk(splits, first_block(cfg))
    k = splits.num_classes
    tcfg = _train_config(cfg)
    write_json(out / "config.json", cfg)
    train = (splits.train_images, splits.train_labels)
    val = (splits.val_images, splits.val_labels)

    transition = None
    if cfg["method"] in NEEDS_TRANSITION:
        if cfg["transition"] == "true":
            transition = true_t if true_t is not None else np.eye(k, dtype=np.float32)
        elif cfg["transition"] == "symmetric":
            rate = cfg["assumed_rate"] if cfg["assumed_rate"] is not None else cfg["noise_rate"]
            transition = np.asarray(symmetric_transition(rate, num_classes=k))
        else:  # dual_t: plain fine-tuning first, then estimate T from its predictions
            pcfg = dict(cfg, method="plain", output_dir=str(out / "dual_t_plain"))
            plain = finetune(pcfg, progress=progress, splits=raw, cache=cache)
            model = make_run_model(cfg, splits)
            _load_into(model, _load_tree(out / "dual_t_plain" / "final", _pure_state(model)))
            probs = _predict_probs(model, splits.train_images)
            transition = np.asarray(dual_t_transition(jnp.asarray(probs), splits.train_labels))
            del plain
        write_json(out / "transition.json", np.asarray(transition).tolist())

    model = make_run_model(cfg, splits)
    anchor = _pure_state(model)
    if not (out / "anchor").exists():
        _save_tree(out / "anchor", anchor)
    spe = len(splits.train_labels) // tcfg.batch_size
    pretrained = nnx.to_pure_dict(split_model(model)[2])  # the anchor of every method
    method = build_method(
        tcfg,
        pretrained,
        num_classes=k,
        steps_per_epoch=max(spe, 1),
        transition=transition,
        anchor=pretrained,
    )
    fingerprint = run_fingerprint(dict(cfg, train_from=first_block(cfg)))
    t0 = time.perf_counter()
    result = fit(model, method.loss, method.tx, train, val, config=tcfg, workdir=out,
                 resume=cfg["resume"], fingerprint=fingerprint, progress=progress,
                 mesh=data_mesh(cfg.get("devices")))  # fmt: skip
    wall = time.perf_counter() - t0
    _save_tree(out / "final", _pure_state(result.model))
    tr = evaluate(result.model, *train)
    te = evaluate(result.model, splits.test_images, splits.test_labels)
    va = evaluate(result.model, *val)
    res = {
        "method": cfg["method"],
        "steps": result.step,
        "stopped": result.stopped,
        "best_epoch": result.best_epoch,
        "train_loss": tr["loss"],
        "train_accuracy_noisy": tr["accuracy"],
        "train_max_loss": tr["max_loss"],
        "val_accuracy": va["accuracy"],
        "test_loss": te["loss"],
        "test_accuracy": te["accuracy"],
        "gap": float(generalization_gap(tr["loss"], te["loss"])),
        "n_train": len(splits.train_labels),
        "fit_seconds": wall,
        "history": result.history,
        "config_end": {k: cfg.get(k) for k in _TRAJECTORY_END},
    }
    write_json(out / "results.json", res)
    return res


class Run(NamedTuple):
    """A loaded ``hessjax finetune`` run (see :func:`load_run`).

    Attributes:
      cfg: the run's config.json.
      splits: its data (the same noisy training labels).
      model: the model with the checkpoint's weights, in eval mode.
      params: the checkpoint's parameters (a pure dict).
      anchor: the anchor's (pretrained) parameters (a pure dict).
      example_loss: ``example_loss(params, (x, y))``, the cross-entropy of ONE example with
        the model in eval mode (the checkpoint's BatchNorm statistics).
      partition: the measured layers (:func:`hessjax.layer_partition`).
      layers: a description of the measured layers.
      rest: the checkpoint's other state (BatchNorm statistics), a pure dict.
      state_loss: ``state_loss({"params": params, "rest": rest}, (x, y))``, the same loss
        with the statistics as an argument: one object per model structure, so jitted
        measures (static ``loss_fn``) are compiled once for every run of that model.
    """

    cfg: dict
    splits: Any
    model: Any
    params: Any
    anchor: Any
    example_loss: Any
    partition: Any
    layers: str
    rest: Any = None
    state_loss: Any = None


def _layer_selector(layers: str | None):
    """``name -> bool`` for ``--layers`` (None: the caller's default)."""
    if layers is None:
        return None
    try:
        pattern = re.compile(layers)
    except re.error as e:
        raise ValueError(f"layers: {layers!r} is not a regular expression ({e})") from None
    return lambda name: bool(pattern.search(name))


def load_run(
    run_dir: str | Path,
    *,
    checkpoint: str = "final",
    layers: str | None = None,
    cache: RunCache | None = None,
) -> Run:
    """Load a ``hessjax finetune`` run: data, weights, anchor, per-example loss and layers.

    Args:
      run_dir: a ``hessjax finetune`` output directory.
      checkpoint: ``"final"``, ``"best"`` or ``"anchor"`` (the pretrained weights).
      layers: a regular expression selecting the measured kernels (path names), or
        ``"later"`` for the architecture's later blocks (:class:`~hessjax.models.ModelSpec`
        ``later``; MobileNetV2: ``features.14-18`` and the head); default every fine-tuned
        kernel (the theorem's measure of the whole fine-tuned network).

    Returns:
      A :class:`Run`.

    Raises:
      ValueError: a missing/corrupt checkpoint, bad options.
    """
    import jax.numpy as jnp

    from hessjax.models import model_spec
    from hessjax.partition import layer_partition
    from hessjax.train import Checkpointer, split_model

    run = Path(run_dir)
    if checkpoint not in ("final", "best", "anchor"):
        raise ValueError(f"checkpoint: expected 'final', 'best' or 'anchor', got {checkpoint!r}")
    select = None if layers == "later" else _layer_selector(layers)
    cfg = read_config(run)
    cache = DEFAULT_CACHE if cache is None else cache
    splits = cache.with_trunk(cache.splits(cfg)[0], first_block(cfg))
    model = make_run_model(cfg, splits)
    anchor = _pure_state(model)
    saved_anchor = _load_tree(run / "anchor", anchor)
    if checkpoint == "final":
        state = _load_tree(run / "final", anchor)
    elif checkpoint == "anchor":
        state = saved_anchor
    else:
        ckpt = Checkpointer(run)
        try:
            state = ckpt.restore_best(anchor)[0]
        finally:
            ckpt.close()
    _load_into(model, state)
    _, geval, params_state, rest_state = split_model(model)
    rest = state["rest"]
    state_loss = cache.state_loss(geval, params_state, rest_state)

    def example_loss(p, ex):
        return state_loss({"params": p, "rest": rest}, ex)

    params = state["params"]
    spec, fb = model_spec(cfg["model"]), first_block(cfg)
    if layers == "later":
        if spec.later is None:
            raise ValueError(f"layers: 'later' names no layers of {cfg['model']!r}")
        select = spec.later
        layer_desc = "the later blocks only (features.14-18 and the head)"
    elif layers is None:
        select = lambda n: "kernel" in n  # noqa: E731
        layer_desc = "all fine-tuned kernels" + (f" (features.{fb}-18 and the head)" if fb else "")
    else:
        layer_desc = f"kernels matching {layers!r}"
    try:
        part = layer_partition(params, select=lambda n, leaf: jnp.ndim(leaf) >= 2 and select(n))
    except ValueError as e:
        raise ValueError(f"layers: {layers!r} selects no kernel of the model ({e})") from None
    return Run(cfg, splits, model, params, saved_anchor["params"], example_loss, part, layer_desc,
               rest, state_loss)  # fmt: skip


def measure_run(
    run_dir: str | Path,
    *,
    num_examples: int | None = None,
    num_iters: int = 8,
    chunk_size: int | None = 1,
    layers: str | None = None,
    variant: str = "canonical",
    checkpoint: str = "final",
    seed: int = 0,
    devices: int | str | None = None,
    trace_probes: int = 0,
    psd_blocks: bool | None = None,
) -> dict[str, Any]:
    """The Hessian distance report and the theorem's bound of a ``hessjax finetune`` run.

    The loss is the cross-entropy of the model in eval mode on the run's (noisy) training
    labels; the examples are the first ``num_examples`` training examples of a permutation
    seeded by ``seed``; ``n`` is the training-set size; the bound is
    :func:`hessjax.hessian_bound` with C = the largest training loss.

    Cost: per example ``L * num_iters`` Hessian-vector products (``L`` measured layers), plus
    ``trace_probes * num_iters * L`` for the traces; with ``psd_blocks`` (the default for
    networks piecewise linear in each layer's weights: MobileNetV2, the tiny CNN) ``L`` batched
    products per example plus one brute-force example per layer, the same values.

    Args:
      run_dir: a ``hessjax finetune`` output directory.
      num_examples: examples the max runs over (None: every training example).
      num_iters: Lanczos steps.
      chunk_size: examples vmapped at once.
      layers: a regular expression selecting the measured kernels (path names), or
        ``"later"`` (the architecture's later blocks); default every fine-tuned kernel.
      variant: ``"canonical"``, ``"reference"`` or ``"both"``.
      checkpoint: ``"final"`` or ``"best"``.
      seed: the example choice (and the trace probes).
      devices: split the examples over this many devices (an int, or ``"all"``) with
        :func:`hessjax.hessian_distance` ``map_fn=mesh_map(mesh)``; None: one device. Same numbers.
      trace_probes: if > 0, also the per-layer ``max_x Tr[H_i^+]``
        (:func:`hessjax.layer_traces` with this many probes, in the report's rows as
        ``max_trace``) and the Corollary's bound (:func:`hessjax.corollary_bound`) with the
        radii ``alpha_i = ||W_i - W_i^(s)||_F`` (the distances themselves, the tightest
        radii the weights satisfy), under ``"corollary"``.
      psd_blocks: the canonical measure by :func:`hessjax.hessian_distance` ``psd_blocks=True``
        (exact for piecewise-linear networks, checked at the maximisers); None: the model's
        :class:`~hessjax.models.ModelSpec` ``psd_blocks``.

    Returns:
      A dict with the report(s), the bound, train/test loss and the timing.

    Raises:
      ValueError: a missing/corrupt checkpoint, bad options.
    """
    import jax
    import jax.numpy as jnp

    from hessjax.bounds import corollary_bound, hessian_bound
    from hessjax.measures import distances, hessian_distance, layer_traces, report
    from hessjax.partition import layer_partition

    if variant not in ("canonical", "reference", "both"):
        raise ValueError(f"variant: expected canonical, reference or both, got {variant!r}")
    if checkpoint not in ("final", "best"):
        raise ValueError(f"checkpoint: expected 'final' or 'best', got {checkpoint!r}")
    _check_measure_options(num_examples, num_iters, chunk_size, seed, trace_probes)
    r = load_run(run_dir, checkpoint=checkpoint, layers=layers)
    splits, model, params, part = r.splits, r.model, r.params, r.partition
    if psd_blocks is None:
        from hessjax.models import model_spec

        psd_blocks = model_spec(r.cfg["model"]).psd_blocks
    n = len(splits.train_labels)
    m = n if num_examples is None else min(num_examples, n)
    idx = np.random.default_rng(seed).permutation(n)[:m]
    examples = (jnp.asarray(splits.train_images[idx]), jnp.asarray(splits.train_labels[idx]))
    from hessjax.train import evaluate

    tr = evaluate(model, splits.train_images, splits.train_labels)
    te = evaluate(model, splits.test_images, splits.test_labels)
    out: dict[str, Any] = {
        "run": str(run_dir),
        "checkpoint": checkpoint,
        "layers": r.layers,
        "num_layers": part.num_layers,
        "num_examples": m,
        "num_iters": num_iters,
        "psd_blocks": bool(psd_blocks),
        "n": n,
        "train_loss": tr["loss"],
        "test_loss": te["loss"],
        "test_accuracy": te["accuracy"],
        "gap": te["loss"] - tr["loss"],
        "loss_bound_C": tr["max_loss"],
    }
    if not (np.isfinite(tr["loss"]) and np.isfinite(tr["max_loss"])):
        raise ValueError(
            f"run: the model of {run_dir} has a non-finite training loss (mean "
            f"{tr['loss']}, max {tr['max_loss']}): no measure or bound"
        )
    c = max(tr["max_loss"], 1e-12)
    # The measures run on {"params", "rest"} with the run's stable state_loss (compiled once
    # per model structure); the partition selects the same kernels under "params/".
    full, full_anchor = {"params": params, "rest": r.rest}, {"params": r.anchor, "rest": r.rest}
    layer_of = dict(zip(part.leaf_names, part.leaf_layer, strict=True))
    full_part = layer_partition(
        full,
        select=lambda name, leaf: (
            name.startswith("params/") and layer_of.get(name.removeprefix("params/"), -1) >= 0
        ),
        group=lambda name: part.names[layer_of[name.removeprefix("params/")]],
    )
    traces = None
    if trace_probes > 0:
        t0 = time.perf_counter()
        traces = layer_traces(r.state_loss, full, examples, jax.random.key(seed),
                              partition=full_part, num_probes=trace_probes, num_iters=num_iters,
                              chunk_size=chunk_size)  # fmt: skip
        dist = distances(params, r.anchor, partition=part)
        cb = corollary_bound(tr["loss"], dist, traces.max, n, loss_bound=c)
        out["corollary"] = {
            "bound": float(cb.value),
            "radii": np.asarray(dist).tolist(),
            "max_traces": np.asarray(traces.max).tolist(),
            "num_probes": trace_probes,
            "seconds": time.perf_counter() - t0,
        }
    variants = ("canonical", "reference") if variant == "both" else (variant,)
    from hessjax.sharding import mesh_map

    mesh = data_mesh(devices)
    out["devices"] = 1 if mesh is None else int(mesh.devices.size)
    for v in variants:
        t0 = time.perf_counter()
        hd = hessian_distance(r.state_loss, full, full_anchor, examples, n=n,
                              partition=full_part, num_iters=num_iters, chunk_size=chunk_size,
                              variant=v, map_fn=mesh_map(mesh),
                              psd_blocks=bool(psd_blocks) and v == "canonical")  # fmt: skip
        rep = report(hd, traces)
        seconds = time.perf_counter() - t0
        bound = hessian_bound(tr["loss"], rep.measure, n, loss_bound=c)
        out[v] = {
            "report": rep.to_dict(),
            "table": str(rep),
            "measure": rep.measure,
            "bound": float(bound.value),
            "xi_order": float(bound.xi),
            "seconds": seconds,
        }
    out["measure"] = out[variants[0]]["measure"]
    out["bound"] = out[variants[0]]["bound"]
    return out


def _check_measure_options(num_examples, num_iters, chunk_size, seed, trace_probes) -> None:
    for name, value, lo, none_ok in (("num_examples", num_examples, 1, True),
                                     ("num_iters", num_iters, 1, False),
                                     ("chunk_size", chunk_size, 1, True),
                                     ("seed", seed, 0, False),
                                     ("trace_probes", trace_probes, 0, False)):  # fmt: skip
        if value is None and none_ok:
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
