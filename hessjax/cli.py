"""The ``hessjax`` command line: ``finetune``, ``measure`` and ``demo``.

``hessjax finetune`` fine-tunes a model (MobileNetV2 with ImageNet weights, or a tiny CNN) on
a small, optionally noisy, training set with a method by name and writes config.json,
checkpoints (orbax), metrics and results.json into an output directory; the same command run
again resumes. ``hessjax measure`` loads a run's checkpoint and prints the per-layer Hessian
distance report and the theorem's bound. ``hessjax demo`` compares plain fine-tuning with the
paper's algorithm on Fashion-MNIST with 40% symmetric label noise. Every option is in
``hessjax <command> --help``.

References:
  Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based
  Generalization Guarantees", ICML 2022.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Run",
    "git_commit",
    "load_run",
    "main",
    "measure_run",
    "run_finetune",
    "use_compilation_cache",
]

_NOISE_TYPES = ("symmetric", "uniform", "pair")
# Radii for MobileNetV2 (D, s, D_head): chosen a priori (not tuned on validation data; the
# paper does not publish its radii). Override with --radius, --radius-scale, --head-radius.
_MOBILENET_RADII = (0.5, 1.5, 2.0)


# ------------------------------------------------------------------------------ helpers
def _devices_arg(text: str) -> int | str:
    """``--devices``: a positive int or ``all``."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive int or 'all', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {value}")
    return value


def _int_at_least(lo: int, *, all_ok: bool = False):
    """An argparse type: an int >= ``lo`` (or ``all`` when ``all_ok``)."""

    def parse(text: str):
        if all_ok and text == "all":
            return None
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            extra = " or 'all'" if all_ok else ""
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}{extra}, got {text!r}")
        return value

    parse.__name__ = f"int >= {lo}"
    return parse


def _float_in(lo: float, hi: float | None = None, *, open_lo: bool = False):
    """An argparse type: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = np.isfinite(value) and (value > lo if open_lo else value >= lo)
        ok = ok and (hi is None or value <= hi)
        if not ok:
            where = f"{'(' if open_lo else '['}{lo}, {'inf)' if hi is None else f'{hi}]'}"
            raise argparse.ArgumentTypeError(f"expected a number in {where}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


_POSITIVE = _int_at_least(1)
_NONNEG = _int_at_least(0)
_POSITIVE_FLOAT = _float_in(0.0, open_lo=True)


def _mesh(devices: int | str | None):
    """The data-parallel mesh for ``--devices`` (None: one device, no mesh)."""
    if devices is None:
        return None
    from hessjax.sharding import make_mesh

    return make_mesh(None if devices == "all" else devices)


def _transition(kind: str, rate: float, k: int):
    from hessjax.noise import (
        pair_flip_transition,
        symmetric_transition,
        uniform_replacement_transition,
    )

    if kind not in _NOISE_TYPES:
        raise ValueError(f"noise_type: expected one of {_NOISE_TYPES}, got {kind!r}")
    if rate == 0:
        return None
    fn = {"symmetric": symmetric_transition, "uniform": uniform_replacement_transition,
          "pair": pair_flip_transition}[kind]  # fmt: skip
    return np.asarray(fn(rate, num_classes=k))


def _memo(cache: dict, key, limit: int, compute):
    """``cache[key]``, computed by ``compute()`` on a miss; the oldest entry goes past ``limit``."""
    if key not in cache:
        if len(cache) >= limit:
            cache.pop(next(iter(cache)))
        cache[key] = compute()
    return cache[key]


# Frozen-trunk outputs already computed in this process, by (first block, image bytes).
_TRUNK_CACHE: dict[tuple[int, str], np.ndarray] = {}


def _trunk(images: np.ndarray, first_block: int) -> np.ndarray:
    """``mobilenet_v2_trunk(images, first_block)``, memoised on the images' bytes."""
    import hashlib

    from hessjax.models import mobilenet_v2_trunk

    key = (first_block, hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest())
    return _memo(_TRUNK_CACHE, key, 32, lambda: mobilenet_v2_trunk(images, first_block))


def _first_block(cfg: dict) -> int:
    fb = cfg.get("train_from", 0) or 0
    if fb and cfg["model"] != "mobilenet_v2":
        raise ValueError(
            f"train_from: only mobilenet_v2 can be split, got {fb} with {cfg['model']!r}"
        )
    if not 0 <= fb <= 18:
        raise ValueError(f"train_from: expected a block index in [0, 18], got {fb}")
    return fb


def _with_trunk(splits, first_block: int):
    """The splits with every image replaced by the frozen trunk's output (``--train-from``)."""
    if not first_block:
        return splits
    parts = (splits.train_images, splits.val_images, splits.test_images)
    feats = _trunk(np.concatenate(parts), first_block)  # one pass, one compiled shape
    ends = np.cumsum([len(p) for p in parts])
    train, val, test = np.split(feats, ends[:-1])
    return splits._replace(train_images=train, val_images=val, test_images=test)


def _make_model(cfg: dict, splits):
    from hessjax.train import make_model

    return make_model(cfg["model"], splits.num_classes, seed=cfg["seed"],
                      in_channels=splits.train_images.shape[-1],
                      first_block=_first_block(cfg))  # fmt: skip


_SPLITS_CACHE: dict[str, tuple[Any, Any]] = {}
_SPLIT_KEYS = ("dataset", "seed", "val_size", "n_per_class", "test_size", "image_size", "model",
               "noise_type", "noise_rate", "data_dir")  # fmt: skip


def _splits(cfg: dict):
    """The run's data (noisy training labels, raw images) and the true T (memoised)."""
    key = json.dumps([cfg[k] for k in _SPLIT_KEYS], default=str)
    return _memo(_SPLITS_CACHE, key, 8, lambda: _load_splits(cfg))


def _load_splits(cfg: dict):
    from hessjax.data import load_splits

    if not 0 <= cfg["noise_rate"] <= 1:
        raise ValueError(f"noise_rate: expected a number in [0, 1], got {cfg['noise_rate']}")
    probe = load_splits(
        cfg["dataset"], seed=cfg["seed"], val_size=cfg["val_size"], n_per_class=1,
        test_size=None, data_dir=cfg["data_dir"],
    )  # fmt: skip
    k = probe.num_classes
    del probe
    t = _transition(cfg["noise_type"], cfg["noise_rate"], k)
    splits = load_splits(
        cfg["dataset"],
        seed=cfg["seed"],
        val_size=cfg["val_size"],
        n_per_class=cfg["n_per_class"],
        test_size=cfg["test_size"],
        image_size=cfg["image_size"],
        imagenet=cfg["model"] == "mobilenet_v2",
        transition=t,
        data_dir=cfg["data_dir"],
    )
    return splits, t


def _save_tree(path: Path, tree) -> None:
    from hessjax.train import save_tree

    save_tree(path, tree)


def _load_tree(path: Path, target):
    from hessjax.train import load_tree

    return load_tree(path, target)


def _write_json(path: Path, value) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    import os

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)


def _read_config(run: Path) -> dict:
    """A run's config.json, or a ValueError naming the file."""
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


# Options that may change between a run and its continuation; every other option changes the
# data or the trajectory, so a run directory only accepts the values it was started with.
_RESUMABLE_OPTIONS = ("epochs", "max_steps", "checkpoint_every", "eval_batch_size",
                      "output_dir", "resume", "devices", "no_progress", "distributed",
                      "debug")  # fmt: skip
_REQUIRED_CONFIG = ("dataset", "model", "seed", "val_size", "n_per_class", "test_size",
                    "image_size", "noise_type", "noise_rate", "method")  # fmt: skip


def run_fingerprint(cfg: dict) -> dict:
    """The options a run directory is bound to: all but :data:`_RESUMABLE_OPTIONS`."""
    return {k: v for k, v in sorted(cfg.items()) if k not in _RESUMABLE_OPTIONS}


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
    saved = _read_config(out)
    a, b = run_fingerprint(saved), run_fingerprint(cfg)
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


# ------------------------------------------------------------------------------ finetune
def run_finetune(cfg: dict, *, progress: bool = True, splits=None) -> dict[str, Any]:
    """Run one fine-tuning experiment from a dict of CLI options; write it to ``output_dir``.

    Files: ``config.json``, ``anchor/`` and ``final/`` (orbax), ``checkpoints/{last,best}``,
    ``metrics.json``/``metrics.csv`` (per epoch) and ``results.json`` (train loss on the noisy
    training labels, clean validation/test loss and accuracy, generalization gap).

    Args:
      cfg: the options of ``hessjax finetune`` (see ``--help``) as a dict.
      progress: tqdm bars.
      splits: already loaded :class:`hessjax.Splits` (must match ``cfg``), to share data.
        ``cfg["devices"]`` (``--devices``: an int or ``"all"``; absent/None: one device)
        splits every training batch over a data-parallel mesh
        (:func:`hessjax.sharding.make_mesh`, :func:`hessjax.train.fit` ``mesh=``).

    Reruns: the options are checked against the directory's ``config.json`` before anything
    is written (every option but the resumable ones, :data:`_RESUMABLE_OPTIONS`, must be the
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
        return _run_finetune(out, cfg, progress=progress, splits=splits)


def _train_config(cfg: dict):
    from hessjax.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in cfg.items() if k in names})


def _run_finetune(out: Path, cfg: dict, *, progress: bool, splits) -> dict[str, Any]:
    import jax.numpy as jnp
    from flax import nnx

    from hessjax.bounds import generalization_gap
    from hessjax.noise import dual_t_transition, symmetric_transition
    from hessjax.train import build_method, evaluate, fit, split_model

    if splits is None:
        splits, true_t = _splits(cfg)
    else:
        true_t = _transition(cfg["noise_type"], cfg["noise_rate"], splits.num_classes)
    raw, splits = splits, _with_trunk(splits, _first_block(cfg))
    k = splits.num_classes
    tcfg = _train_config(cfg)
    _write_json(out / "config.json", cfg)
    train = (splits.train_images, splits.train_labels)
    val = (splits.val_images, splits.val_labels)

    transition = None
    if cfg["method"] in ("forward", "backward", "robust"):
        if cfg["transition"] == "true":
            transition = true_t if true_t is not None else np.eye(k, dtype=np.float32)
        elif cfg["transition"] == "symmetric":
            rate = cfg["assumed_rate"] if cfg["assumed_rate"] is not None else cfg["noise_rate"]
            transition = np.asarray(symmetric_transition(rate, num_classes=k))
        else:  # dual_t: plain fine-tuning first, then estimate T from its predictions
            pcfg = dict(cfg, method="plain", output_dir=str(out / "dual_t_plain"))
            plain = run_finetune(pcfg, progress=progress, splits=raw)
            model = _make_model(cfg, splits)
            _load_into(model, _load_tree(out / "dual_t_plain" / "final", _pure_state(model)))
            probs = _predict_probs(model, splits.train_images)
            transition = np.asarray(dual_t_transition(jnp.asarray(probs), splits.train_labels))
            del plain
        _write_json(out / "transition.json", np.asarray(transition).tolist())

    model = _make_model(cfg, splits)
    anchor = _pure_state(model)
    if not (out / "anchor").exists():
        _save_tree(out / "anchor", anchor)
    spe = len(splits.train_labels) // tcfg.batch_size
    params = split_model(model)[2]
    method = build_method(
        tcfg,
        nnx.to_pure_dict(params),
        num_classes=k,
        steps_per_epoch=max(spe, 1),
        transition=transition,
    )
    fingerprint = run_fingerprint(dict(cfg, train_from=_first_block(cfg)))
    t0 = time.perf_counter()
    result = fit(model, method.loss, method.tx, train, val, config=tcfg, workdir=out,
                 resume=cfg["resume"], fingerprint=fingerprint, progress=progress,
                 mesh=_mesh(cfg.get("devices")))  # fmt: skip
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
    _write_json(out / "results.json", res)
    return res


# ------------------------------------------------------------------------------ measure
def _mobilenet_layers(name: str) -> bool:
    parts = name.split("/")
    if parts[-1] != "kernel":
        return False
    if parts[0] == "classifier":
        return True
    return parts[0] == "features" and int(parts[1]) >= 14


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


# One loss function per model structure (graphdef): measures jitted with a static loss_fn
# are then traced and compiled once per process for all runs of the same model.
_STATE_LOSSES: dict[Any, Any] = {}


def _state_loss(geval, params_state, rest_state):
    """``f({"params": p, "rest": r}, (x, y))``: one example's cross-entropy, eval mode."""
    import jax
    from flax import nnx

    from hessjax.train import cross_entropy

    if geval not in _STATE_LOSSES:
        # Only the structure of these templates is used: every value is replaced below.
        ps_template, rs_template = params_state, rest_state

        def state_loss(state, ex):
            ps = jax.tree.map(lambda a: a, ps_template)
            rs = jax.tree.map(lambda a: a, rs_template)
            nnx.replace_by_pure_dict(ps, state["params"])
            nnx.replace_by_pure_dict(rs, state["rest"])
            logits = nnx.merge(geval, ps, rs)(ex[0][None])
            return cross_entropy(logits, ex[1][None])[0]

        _STATE_LOSSES[geval] = state_loss
    return _STATE_LOSSES[geval]


def _layer_selector(layers: str | None):
    """``name -> bool`` for ``--layers`` (None: the caller's default)."""
    if layers is None:
        return None
    try:
        pattern = re.compile(layers)
    except re.error as e:
        raise ValueError(f"layers: {layers!r} is not a regular expression ({e})") from None
    return lambda name: bool(pattern.search(name))


def load_run(run_dir: str | Path, *, checkpoint: str = "final", layers: str | None = None) -> Run:
    """Load a ``hessjax finetune`` run: data, weights, anchor, per-example loss and layers.

    Args:
      run_dir: a ``hessjax finetune`` output directory.
      checkpoint: ``"final"``, ``"best"`` or ``"anchor"`` (the pretrained weights).
      layers: a regular expression selecting the measured kernels (path names); default all
        kernels, or for MobileNetV2 ``features.14-18`` and the head (the later blocks).

    Returns:
      A :class:`Run`.

    Raises:
      ValueError: a missing/corrupt checkpoint, bad options.
    """
    import jax.numpy as jnp

    from hessjax.partition import layer_partition
    from hessjax.train import Checkpointer, split_model

    run = Path(run_dir)
    if checkpoint not in ("final", "best", "anchor"):
        raise ValueError(f"checkpoint: expected 'final', 'best' or 'anchor', got {checkpoint!r}")
    select = _layer_selector(layers)
    cfg = _read_config(run)
    splits = _with_trunk(_splits(cfg)[0], _first_block(cfg))
    model = _make_model(cfg, splits)
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
    state_loss = _state_loss(geval, params_state, rest_state)

    def example_loss(p, ex):
        return state_loss({"params": p, "rest": rest}, ex)

    params = state["params"]
    later = cfg["model"] == "mobilenet_v2" and not _first_block(cfg)
    if layers is None:
        select = _mobilenet_layers if later else (lambda n: "kernel" in n)
        layer_desc = "features.14-18 and the head (later blocks only)" if later else "all kernels"
        if _first_block(cfg):
            layer_desc = f"all fine-tuned kernels (features.{_first_block(cfg)}-18 and the head)"
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
    num_examples: int = 16,
    num_iters: int = 8,
    chunk_size: int | None = 1,
    layers: str | None = None,
    variant: str = "canonical",
    checkpoint: str = "final",
    seed: int = 0,
    devices: int | str | None = None,
    trace_probes: int = 0,
) -> dict[str, Any]:
    """The Hessian distance report and the theorem's bound of a ``hessjax finetune`` run.

    The loss is the cross-entropy of the model in eval mode on the run's (noisy) training
    labels; the examples are the first ``num_examples`` training examples of a permutation
    seeded by ``seed``; ``n`` is the training-set size; the bound is
    :func:`hessjax.hessian_bound` with C = the largest training loss.

    Cost: per example ``L * num_iters`` Hessian-vector products (``L`` measured layers), plus
    ``trace_probes * num_iters * L`` for the traces.

    Args:
      run_dir: a ``hessjax finetune`` output directory.
      num_examples: examples the max runs over (None: every training example).
      num_iters: Lanczos steps.
      chunk_size: examples vmapped at once.
      layers: a regular expression selecting the measured kernels (path names); default all
        kernels, or for MobileNetV2 ``features.14-18`` and the head (the later blocks).
      variant: ``"canonical"``, ``"reference"`` or ``"both"``.
      checkpoint: ``"final"`` or ``"best"``.
      seed: the example choice (and the trace probes).
      devices: split the examples over this many devices (an int, or ``"all"``) with
        :func:`hessjax.hessian_distance` ``mesh=``; None: one device. Same numbers.
      trace_probes: if > 0, also the per-layer ``max_x Tr[H_i^+]``
        (:func:`hessjax.layer_traces` with this many probes, in the report's rows as
        ``max_trace``) and the Corollary's bound (:func:`hessjax.corollary_bound`) with the
        radii ``alpha_i = ||W_i - W_i^(s)||_F`` (the distances themselves, the tightest
        radii the weights satisfy), under ``"corollary"``.

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
    mesh = _mesh(devices)
    out["devices"] = 1 if mesh is None else int(mesh.devices.size)
    for v in variants:
        t0 = time.perf_counter()
        hd = hessian_distance(r.state_loss, full, full_anchor, examples, n=n,
                              partition=full_part, num_iters=num_iters, chunk_size=chunk_size,
                              variant=v, mesh=mesh)  # fmt: skip
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


# ------------------------------------------------------------------------------ demo
def _demo(args) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    d, s, dh = args.radius, args.radius_scale, args.head_radius
    base = _finetune_defaults()
    base.update(
        dataset=args.dataset, data_dir=args.data_dir, model=args.model,
        n_per_class=args.n_per_class, val_size=args.val_size, test_size=args.test_size,
        noise_rate=args.noise_rate, noise_type="symmetric", epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, image_size=args.image_size, seed=args.seed,
        radius=d, radius_scale=s, head_radius=dh, transition="true", resume=True,
        lr_decay_every=10,  # the reference code's step decay (x0.1 every 10 epochs)
    )  # fmt: skip
    t0 = time.perf_counter()
    splits, _ = _splits(base)
    t_data = time.perf_counter() - t0
    results, measures = {}, {}
    for method in ("plain", "robust"):
        cfg = dict(base, method=method, output_dir=str(out / method))
        print(f"== fine-tuning: {method}", flush=True)
        results[method] = run_finetune(cfg, progress=not args.no_progress, splits=splits)
        print(f"== measuring: {method}", flush=True)
        measures[method] = measure_run(
            out / method,
            num_examples=args.examples,
            num_iters=args.num_iters,
            chunk_size=args.chunk_size,
        )
    rows = []
    for method in ("plain", "robust"):
        r, m = results[method], measures[method]
        rows.append({
            "method": method, "test_accuracy": r["test_accuracy"], "train_loss": r["train_loss"],
            "test_loss": r["test_loss"], "gap": r["gap"], "measure": m["measure"],
            "bound": m["bound"], "steps": r["steps"], "fit_seconds": r["fit_seconds"],
            "measure_seconds": m["canonical"]["seconds"],
        })  # fmt: skip
    table = _table(rows)
    m0 = measures["plain"]
    note = (
        f"Fashion-MNIST, {args.n_per_class}/class ({results['plain']['n_train']} train), "
        f"{args.image_size}x{args.image_size}, {int(100 * args.noise_rate)}% symmetric label "
        f"noise (train only), {args.epochs} epochs, Adam lr {args.lr}, batch {args.batch_size}. "
        f"Robust = layerwise Frobenius constraint (D={d}, s={s}, D_head={dh}) + backward "
        f"correction with the true symmetric T. Loss = cross-entropy; train loss on the noisy "
        f"training labels, test loss on clean labels. Measure over {m0['layers']} "
        f"({m0['num_layers']} layers), max over {m0['num_examples']} training examples, "
        f"{m0['num_iters']} Lanczos steps, n={m0['n']}; bound = train loss + sqrt(C) * measure "
        "(Theorem 2.1 without xi, C = max training loss)."
    )
    wall = time.perf_counter() - t_start
    print(note)
    print(table)
    print(f"wall time {wall:.1f} s (data {t_data:.1f} s)")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method in ("plain", "robust"):
        h = results[method]["history"]
        ep = [r["epoch"] for r in h]
        axes[0].plot(ep, [r["train_loss"] for r in h], marker="o", label=f"{method} train (noisy)")
        axes[0].plot(ep, [r["val_loss"] for r in h], ls="--", marker="o", label=f"{method} val")
        axes[1].plot(ep, [r["val_accuracy"] for r in h], marker="o", label=method)
    axes[0].set(xlabel="epoch", ylabel="training objective / val CE", title="loss")
    axes[1].set(xlabel="epoch", ylabel="clean val accuracy", title="validation accuracy")
    names = [r["method"] for r in rows]
    x = np.arange(len(names))
    axes[2].bar(x - 0.2, [r["gap"] for r in rows], 0.4, label="gap (test - train CE)")
    axes[2].bar(x + 0.2, [r["measure"] for r in rows], 0.4, label="Hessian measure")
    axes[2].set_xticks(x, names)
    axes[2].set_title("generalization gap vs measure")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=120)
    plt.close(fig)
    summary = {
        "note": note,
        "rows": rows,
        "table": table,
        "wall_seconds": wall,
        "data_seconds": t_data,
        "results": {k: {kk: vv for kk, vv in v.items()} for k, v in results.items()},
        "measures": measures,
        "options": vars(args) | {"func": None},
        "command": " ".join(["hessjax", *sys.argv[1:]]),
        "commit": git_commit(),
        "seed": args.seed,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def git_commit() -> str | None:
    """The git commit of the working tree the command runs from, if it is a checkout."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def use_compilation_cache(directory: str | Path) -> None:
    """Keep XLA's compiled programs in ``directory`` (JAX's persistent compilation cache).

    Experiments fine-tune many models of the same shapes; with the cache, a training step
    or evaluation compiled once (in this process or an earlier one) is read back instead of
    compiled again. Programs whose constants differ (another transition matrix, other
    BatchNorm statistics closed over by a loss) still compile. This sets global JAX options,
    so it belongs in scripts and the command line, never in library code.

    Args:
      directory: the cache folder (created if needed).
    """
    import jax

    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _table(rows: list[dict]) -> str:
    cols = [("method", "{:<8}"), ("test_accuracy", "{:>9.4f}"), ("train_loss", "{:>10.4f}"),
            ("test_loss", "{:>9.4f}"), ("gap", "{:>8.4f}"), ("measure", "{:>9.4g}"),
            ("bound", "{:>9.4g}")]  # fmt: skip
    heads = [
        "method  ",
        "test acc ",
        "train loss",
        "test loss",
        "     gap",
        "  measure",
        "    bound",
    ]
    lines = ["  ".join(heads), "-" * len("  ".join(heads))]
    for r in rows:
        lines.append("  ".join(fmt.format(r[c]) for c, fmt in cols))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ parser
def _finetune_defaults() -> dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(["finetune"])
    d = vars(args)
    for key in ("func", "command", "debug"):
        d.pop(key, None)
    return d


def _add_data_options(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    p.add_argument(
        "--dataset",
        default="fashion_mnist",
        help="fashion_mnist, digits (scikit-learn) or tfds:<name> (default %(default)s)",
    )
    p.add_argument("--data-dir", default=None, help="where the dataset files are")
    p.add_argument(
        "--model",
        default="mobilenet_v2",
        choices=("mobilenet_v2", "tiny_cnn"),
        help="mobilenet_v2 (ImageNet weights, new zero head) or tiny_cnn (tests)",
    )
    p.add_argument(
        "--train-from",
        type=_NONNEG,
        default=0,
        help="mobilenet_v2: fine-tune features.N-18 and the head only; blocks 0..N-1 stay at "
        "their pretrained weights (eval mode) and their outputs are computed once per image "
        "(0: fine-tune everything)",
    )
    p.add_argument(
        "--n-per-class",
        type=_POSITIVE,
        default=50,
        help="training examples per class (default %(default)s)",
    )
    p.add_argument(
        "--val-size",
        type=_POSITIVE,
        default=500,
        help="clean validation examples carved from the training split",
    )
    p.add_argument("--test-size", type=_POSITIVE, default=1000, help="clean test examples kept")
    p.add_argument(
        "--image-size",
        type=_POSITIVE,
        default=32,
        help="resize images to this size (default %(default)s)",
    )
    p.add_argument(
        "--noise-rate",
        type=_float_in(0.0, 1.0),
        default=0.4,
        help="label-noise rate rho of the training labels (default %(default)s)",
    )
    p.add_argument("--epochs", type=_POSITIVE, default=15 if demo else 10, help="training epochs")
    p.add_argument(
        "--lr", type=_POSITIVE_FLOAT, default=1e-4, help="learning rate (default %(default)s)"
    )
    p.add_argument("--batch-size", type=_POSITIVE, default=32, help="examples per step")
    p.add_argument("--seed", type=_NONNEG, default=0, help="seeds data, noise, order, dropout")
    p.add_argument(
        "--radius",
        type=_POSITIVE_FLOAT,
        default=_MOBILENET_RADII[0],
        help="constraint radius D of the first stage (default %(default)s)",
    )
    p.add_argument(
        "--radius-scale",
        type=_POSITIVE_FLOAT,
        default=_MOBILENET_RADII[1],
        help="radius growth s per stage: D * s^stage (default %(default)s)",
    )
    p.add_argument(
        "--head-radius",
        type=_POSITIVE_FLOAT,
        default=_MOBILENET_RADII[2],
        help="radius of the new head around zero (default %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_mesh_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--devices",
        type=_devices_arg,
        default=None,
        help="data-parallel over this many devices (an int or 'all'; on CPU simulate N with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N); default: one device",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize first (coordinator, number of "
        "processes and process id from HESSJAX_COORDINATOR_ADDRESS, HESSJAX_NUM_PROCESSES, "
        "HESSJAX_PROCESS_ID, or auto-detected); --devices then counts all hosts' devices",
    )


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the traceback instead of one line")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    from hessjax.train.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="hessjax",
        description="Robust fine-tuning and Hessian-based generalization measures "
        "(Ju, Li & Zhang, ICML 2022).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="fine-tune a model with a method; resumable",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    _add_data_options(f)
    f.add_argument(
        "--noise-type",
        default="symmetric",
        choices=_NOISE_TYPES,
        help="symmetric: flip to another class; uniform: redraw over all classes; "
        "pair: flip class i to i+1",
    )
    f.add_argument("--method", default="plain", choices=sorted(METHODS), help="the method")
    f.add_argument(
        "--transition",
        default="true",
        choices=("true", "symmetric", "dual_t"),
        help="T for forward/backward/robust: the true noise T, symmetric at "
        "--assumed-rate, or estimated by Dual-T from a plain fine-tuned model",
    )
    f.add_argument(
        "--assumed-rate",
        type=_float_in(0.0, 1.0),
        default=None,
        help="rate of the symmetric T (default: --noise-rate)",
    )
    f.add_argument("--optimizer", default="adam", choices=("adam", "amsgrad", "adamw", "sgd"))
    f.add_argument(
        "--lr-decay-every",
        type=_POSITIVE,
        default=10,
        help="multiply the learning rate by 0.1 every this many epochs",
    )
    f.add_argument(
        "--early-stopping",
        action="store_true",
        help="stop after --patience epochs without better clean val accuracy "
        "(always on for plain_es) and keep the best parameters",
    )
    f.add_argument("--patience", type=_POSITIVE, default=5, help="early-stopping patience")
    f.add_argument("--penalty", type=_float_in(0.0), default=1e-2, help="L2-SP lambda")
    f.add_argument("--smoothing", type=_float_in(0.0, 1.0), default=0.1, help="label smoothing")
    f.add_argument("--gce-q", type=_float_in(0.0, 1.0, open_lo=True), default=0.7, help="GCE q")
    f.add_argument(
        "--norm",
        default="frobenius",
        choices=("frobenius", "inf_op"),
        help="norm of the distance constraint",
    )
    f.add_argument(
        "--max-steps",
        type=_POSITIVE,
        default=None,
        help="stop (after a checkpoint) at this many steps; rerun to continue",
    )
    f.add_argument(
        "--checkpoint-every",
        type=_POSITIVE,
        default=None,
        help="also checkpoint every this many steps",
    )
    f.add_argument("--output-dir", default="runs/finetune", help="where everything goes")
    f.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the output directory's last checkpoint",
    )
    _add_mesh_options(f)
    _add_debug(f)
    f.set_defaults(func=_cmd_finetune)

    m = sub.add_parser("measure", help="Hessian distance report and bound of a finetune run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    m.add_argument("run", help="a `hessjax finetune` output directory")
    m.add_argument(
        "--examples",
        type=_int_at_least(1, all_ok=True),
        default=16,
        help="training examples the max over examples runs over (an int or 'all')",
    )
    m.add_argument("--num-iters", type=_POSITIVE, default=8, help="Lanczos steps")
    m.add_argument("--chunk-size", type=_POSITIVE, default=1,
                   help="examples vmapped at once (1 is fastest on CPU for conv nets)")  # fmt: skip
    m.add_argument(
        "--layers",
        default=None,
        help="regex selecting measured kernels (default: all; MobileNetV2: "
        "features.14-18 and the head)",
    )
    m.add_argument(
        "--variant",
        default="canonical",
        choices=("canonical", "reference", "both"),
        help="the paper's measure, the reference code's, or both",
    )
    m.add_argument("--checkpoint", default="final", choices=("final", "best"))
    m.add_argument("--seed", type=_NONNEG, default=0, help="which training examples")
    m.add_argument("--output", default=None, help="JSON file (default: RUN/measure.json)")
    _add_mesh_options(m)
    _add_debug(m)
    m.set_defaults(func=_cmd_measure)

    d = sub.add_parser("demo", help="plain vs robust fine-tuning of MobileNetV2 on noisy "
                       "Fashion-MNIST; table, plot and JSON",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    _add_data_options(d, demo=True)
    d.add_argument("--examples", type=_POSITIVE, default=64, help="examples for the measure")
    d.add_argument("--num-iters", type=_POSITIVE, default=4, help="Lanczos steps for the measure")
    d.add_argument("--chunk-size", type=_POSITIVE, default=1,
                   help="examples vmapped at once (1 is fastest on CPU for conv nets)")  # fmt: skip
    d.add_argument("--output-dir", default="runs/demo", help="where everything goes")
    _add_debug(d)
    d.set_defaults(func=_cmd_demo)
    return parser


def _cmd_finetune(args) -> int:
    cfg = vars(args).copy()
    cfg.pop("func")
    cfg.pop("command")
    progress = not cfg.pop("no_progress")
    cfg.pop("distributed", None)
    cfg.pop("debug", None)
    if cfg["method"] == "plain_es":
        cfg["early_stopping"] = True
    res = run_finetune(cfg, progress=progress)
    if res.get("already_finished"):
        print(f"hessjax finetune: {cfg['output_dir']} already holds this run, finished; "
              "its results:", file=sys.stderr)  # fmt: skip
    print(json.dumps({k: v for k, v in res.items() if k != "history"}, indent=2))
    return 0


def _output_file(path: Path) -> Path:
    """Check, before any computation, that ``path`` can be written (names ``--output``)."""
    import os

    parent = path.absolute().parent
    if path.is_dir():
        raise ValueError(f"--output: {path} is a directory; give a file name")
    if not parent.is_dir():
        raise ValueError(f"--output: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--output: {path} is not writable")
    return path


def _cmd_measure(args) -> int:
    path = _output_file(Path(args.output) if args.output else Path(args.run) / "measure.json")
    out = measure_run(args.run, num_examples=args.examples, num_iters=args.num_iters,
                      chunk_size=args.chunk_size, layers=args.layers, variant=args.variant,
                      checkpoint=args.checkpoint, seed=args.seed,
                      devices=args.devices)  # fmt: skip
    for v in ("canonical", "reference"):
        if v in out:
            print(f"[{v}] layers: {out['layers']}; max over {out['num_examples']} examples")
            print(out[v]["table"])
            print(f"bound (Theorem 2.1, no xi): {out[v]['bound']:.6g}  "
                  f"train loss {out['train_loss']:.4g}, test loss {out['test_loss']:.4g}, "
                  f"gap {out['gap']:.4g}, C {out['loss_bound_C']:.4g}")  # fmt: skip
    _write_json(path, out)
    return 0


def _cmd_demo(args) -> int:
    _demo(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hessjax`` console script.

    Args:
      argv: the arguments (default ``sys.argv[1:]``).

    Returns:
      The exit status: 0, or 2 for an error (one line on stderr naming the option or file;
      with ``--debug`` the exception propagates with its traceback).

    Example:
      >>> main(["finetune", "--dataset", "digits", "--model", "tiny_cnn", "--epochs", "1",
      ...       "--output-dir", "/tmp/x"])  # doctest: +SKIP
    """
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if getattr(args, "distributed", False):
        from hessjax.sharding import initialize_distributed

        initialize_distributed()
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        if args.debug:
            raise
        print(f"hessjax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """An exception as one line: the message, or for an OSError its file and reason."""
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
