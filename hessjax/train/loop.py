"""The fit loop: jitted steps over an optax chain, clean validation, orbax checkpoints, resume.

Determinism: the data order of epoch e is a function of (seed, e)
(:func:`hessjax.iterate_batches`) and the dropout key of step t is ``fold_in(key(seed), t)``,
so a run restored from a checkpoint at step t replays exactly the steps an uninterrupted run
would take, and ends with the same parameters.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from hessjax.data import iterate_batches
from hessjax.train.checkpoint import Checkpointer, RunLock, shapes
from hessjax.train.methods import TrainConfig, cross_entropy

PyTree = Any

__all__ = ["RESUMABLE_FIELDS", "FitResult", "evaluate", "fit", "split_model"]

# Config fields that may change between a run and its resumption (everything else changes
# the data or the trajectory and is part of the fingerprint).
RESUMABLE_FIELDS = ("epochs", "max_steps", "checkpoint_every", "eval_batch_size")


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      model: the model, updated in place: the final parameters, or the best ones (by clean
        validation accuracy) when early stopping is on; in eval mode.
      history: one dict per finished epoch (epoch, step, lr-free metrics, time).
      step: optimizer steps taken in total.
      best_epoch: the epoch with the best validation accuracy (-1 without validation data).
      best_val_accuracy: that accuracy.
      stopped: ``"epochs"``, ``"early_stopping"`` or ``"max_steps"``.
    """

    model: nnx.Module
    history: list[dict[str, Any]]
    step: int
    best_epoch: int
    best_val_accuracy: float
    stopped: str


def split_model(model: nnx.Module) -> tuple[Any, Any, PyTree, PyTree]:
    """``(graphdef_train, graphdef_eval, params, rest)`` of an nnx model.

    ``params`` is the ``nnx.Param`` state, ``rest`` everything else (BatchNorm statistics,
    RNG counters). The two graph definitions differ only in the train/eval flags
    (``use_running_average``, ``deterministic``); the model is left in eval mode.

    Example:
      >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> gtrain, geval, params, rest = split_model(m)
      >>> sorted(params.keys())
      ['bias', 'kernel']
    """
    model.train()
    gtrain, _, _ = nnx.split(model, nnx.Param, ...)
    model.eval()
    geval, params, rest = nnx.split(model, nnx.Param, ...)
    return gtrain, geval, params, rest


def _call(model, x, key, accepts_rngs):
    if accepts_rngs and key is not None:
        return model(x, rngs=nnx.Rngs(dropout=key))
    return model(x)


def _accepts_rngs(model) -> bool:
    try:
        return "rngs" in inspect.signature(model.__call__).parameters
    except (TypeError, ValueError):
        return False


def _check_data(data, name, num_classes=None):
    """``(images, int32 labels)`` of a pair, or a ValueError/TypeError naming ``name``."""
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ValueError(f"{name}: expected a pair (images, labels), got {type(data).__name__}")
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if x.shape[:1] != y.shape or y.ndim != 1 or x.shape[0] == 0:
        raise ValueError(
            f"{name}: expected images (n, ...) and labels (n,) with n >= 1, got shapes "
            f"{x.shape} and {y.shape}"
        )
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise TypeError(f"{name}: expected integer labels, got dtype {y.dtype}")
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)]
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}) (the model's {num_classes} "
            f"logits), got {bad.size} outside, e.g. {int(bad[0])}"
        )
    return x, y.astype(np.int32)


def _num_classes(model, x) -> int | None:
    """The number of logits the model returns (traced abstractly on one example)."""
    try:
        out = nnx.eval_shape(lambda m, xb: m(xb), model, jax.ShapeDtypeStruct(x[:1].shape, x.dtype))
    except Exception:  # noqa: BLE001 - not every module traces abstractly; skip the check
        return None
    shape = getattr(out, "shape", ())
    return int(shape[-1]) if len(shape) == 2 else None


def _data_fingerprint(x, y) -> dict[str, Any]:
    """What a resumed run's data must match: sizes and the exact labels."""
    return {"shape": list(x.shape), "dtype": str(x.dtype),
            "labels_sha1": hashlib.sha1(np.ascontiguousarray(y).tobytes()).hexdigest()}  # fmt: skip


def _make_eval(merge, accepts_rngs):
    @jax.jit
    def step(params, rest, x, y, mask):
        logits = _call(merge(params, rest), x, None, accepts_rngs)
        losses = cross_entropy(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return jnp.sum(losses * mask), jnp.sum(correct * mask), jnp.max(jnp.where(mask, losses, 0))

    return step


def evaluate(
    model: nnx.Module, images: Any, labels: Any, *, batch_size: int = 256
) -> dict[str, float]:
    """Mean cross-entropy, accuracy and maximal loss of ``model`` (eval mode) on a dataset.

    Batches have one shape (the last is padded and masked), so the step compiles once.

    Args:
      model: an nnx classifier returning logits.
      images: (n, ...) inputs.
      labels: (n,) integer labels.
      batch_size: examples per evaluation batch.

    Returns:
      ``{"loss": ..., "accuracy": ..., "max_loss": ...}``.

    Raises:
      ValueError: mismatched or empty data; ``batch_size`` < 1.

    Example:
      >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> sorted(evaluate(m, np.ones((5, 2)), np.zeros(5, int)))
      ['accuracy', 'loss', 'max_loss']
    """
    x, y = np.asarray(images), np.asarray(labels)
    model.eval()
    x, y = _check_data((x, y), "images/labels", _num_classes(model, x) if x.ndim else None)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
    _, geval, params, rest = split_model(model)
    merge = lambda p, r: nnx.merge(geval, jax.tree.map(lambda a: a, p), r)
    return _evaluate(_make_eval(merge, _accepts_rngs(model)), params, rest, x, y, batch_size)


def _evaluate(step, params, rest, x, y, batch_size):
    n = x.shape[0]
    bs = min(batch_size, n)
    total, correct, worst = 0.0, 0.0, 0.0
    for start in range(0, n, bs):
        xb, yb = x[start : start + bs], y[start : start + bs]
        m = xb.shape[0]
        mask = np.zeros(bs, np.float32)
        mask[:m] = 1
        if m < bs:
            xb = np.concatenate([xb, np.zeros((bs - m, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(bs - m, yb.dtype)])
        s, c, w = step(params, rest, xb, yb, mask)
        total, correct = total + float(s), correct + float(c)
        worst = float(w) if not np.isfinite(float(w)) or float(w) > worst else worst
    return {"loss": total / n, "accuracy": correct / n, "max_loss": worst}


def _place_on_mesh(mesh, state, fsdp_min_size):
    """Replicated (or FSDP-sharded) state and a function placing a batch over the data axis."""
    from hessjax.sharding import fsdp_sharding, put, replicate, row_sharding

    params, opt_state = state["params"], state["opt_state"]
    if fsdp_min_size is None:
        params, opt_state = replicate((params, opt_state), mesh)
    else:
        params = put(params, fsdp_sharding(params, mesh, min_size=fsdp_min_size))
        opt_state = put(opt_state, fsdp_sharding(opt_state, mesh, min_size=fsdp_min_size))
    state = {"params": params, "rest": replicate(state["rest"], mesh), "opt_state": opt_state}
    rows = row_sharding(mesh)
    return state, lambda xb, yb: put((xb, yb), rows)


def _write_metrics(workdir: Path, history: list[dict]) -> None:
    """``metrics.json`` and ``metrics.csv``, each replaced atomically."""
    tmp = workdir / f".metrics.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(history, indent=2))
    os.replace(tmp, workdir / "metrics.json")
    if history:
        tmp = workdir / f".metrics.csv.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)
        os.replace(tmp, workdir / "metrics.csv")


# ------------------------------------------------------------------------------ fit
def fit(
    model: nnx.Module,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    tx: optax.GradientTransformation,
    train: tuple[Any, Any],
    val: tuple[Any, Any] | None = None,
    *,
    config: TrainConfig,
    workdir: str | os.PathLike | None = None,
    resume: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    fingerprint: dict[str, Any] | None = None,
    progress: bool = True,
    mesh: Any = None,
    fsdp_min_size: int | None = None,
) -> FitResult:
    """Fine-tune any nnx classifier with a per-example loss and an optax chain.

    Each step minimises ``mean_b loss_fn(model(x_b), y_b)`` over a batch with BatchNorm and
    dropout in train mode (``graphdef`` of ``model.train()``), then applies ``tx`` (whose
    ``update`` gets ``params``, so projections work). After each epoch the model is evaluated
    in eval mode on the CLEAN validation data (cross-entropy, accuracy); the best epoch's
    parameters are checkpointed; early stopping (``config.early_stopping``) stops after
    ``config.patience`` epochs without improvement and returns the best parameters.

    Checkpoints (orbax ``CheckpointManager``, under ``workdir/checkpoints/{last,best}``): the
    params, optimizer state, BatchNorm statistics/other state, and JSON metadata (epoch,
    step, the running sums of the current epoch, best metric, patience counter, history, a
    fingerprint of the model and config). A run restarted with the same arguments resumes
    from the last checkpoint and ends with the same parameters as an uninterrupted run.
    Metrics go to ``workdir/metrics.json`` and ``metrics.csv`` after each epoch.

    Cost: one jitted step per batch (compiled once: the last partial batch of an epoch is
    dropped); one evaluation pass over the validation set per epoch.

    Data parallel (``mesh`` given): every batch is split over the mesh's data axis
    (``NamedSharding``), params, optimizer state and BatchNorm statistics are replicated (or,
    with ``fsdp_min_size``, leaves of at least that many elements split along one axis,
    :func:`hessjax.sharding.fsdp_sharding`), and the same jitted step runs under GSPMD: the
    batch mean of the loss, the gradient and BatchNorm's batch statistics are reduced over
    all shards by XLA, so the parameters equal the single-device run's (to float tolerance)
    and a resumed run may use another device count. Each device computes
    ``batch_size / D`` examples per step.

    Args:
      model: an ``nnx.Module`` mapping a batch of inputs to logits; updated in place.
      loss_fn: per-example ``loss_fn(logits, labels) -> (batch,)``.
      tx: an optax GradientTransformation (e.g. from :func:`hessjax.train.build_method`).
      train: ``(images, labels)`` training arrays (labels may be noisy).
      val: clean ``(images, labels)`` validation arrays, or None.
      config: a :class:`TrainConfig` (epochs, batch size, seed, patience, ...).
      workdir: where checkpoints and metrics go; None: no files.
      resume: continue from ``workdir``'s last checkpoint when there is one; with False an
        existing checkpoint is an error.
      callback: ``callback(step, {"loss": ..., "accuracy": ...})`` after every step (raising
        from it interrupts the run, as a kill would).
      fingerprint: extra JSON values (dataset, model name, ...) a resumed run must match.
      progress: report progress: tqdm bars (per epoch) when stderr is a terminal, plus one
        line of metrics per epoch (plain lines on stderr in logs and CI).
      mesh: keyword-only, a ``jax.sharding.Mesh`` (:func:`hessjax.sharding.make_mesh`) whose
        data axis splits every batch; ``config.batch_size`` must be a multiple of its size.
        ``None``: one device (the unsharded path).
      fsdp_min_size: keyword-only, with a ``mesh``: shard params and optimizer-state leaves
        with at least this many elements (FSDP-style); ``None``: replicate everything.

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError: bad data; fewer training examples than ``batch_size``; an existing
        checkpoint with ``resume=False``; a corrupt or mismatched checkpoint (names the
        problem); a non-finite training loss; a ``config.batch_size`` that the mesh's
        device count does not divide; ``fsdp_min_size`` without a mesh.

    Example:
      >>> import optax
      >>> m = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> x, y = np.ones((8, 4), np.float32), np.zeros(8, np.int32)
      >>> r = fit(m, cross_entropy, optax.sgd(0.1), (x, y), (x, y),
      ...         config=TrainConfig(epochs=2, batch_size=4), progress=False)
      >>> r.step, r.history[-1]["val_accuracy"]
      (4, 1.0)

    References:
      Ju, Li & Zhang, ICML 2022, section 4 and the reference code (early stopping on clean
      validation accuracy, step decay).
    """
    x, y, xv, yv = _check_fit_inputs(model, config, train, val, mesh, fsdp_min_size)
    spe = x.shape[0] // config.batch_size
    accepts_rngs = _accepts_rngs(model)
    gtrain, geval, params_state, rest_state = split_model(model)
    merge = _merger(params_state, rest_state)
    # The loop works on plain nested dicts of arrays (what optax and orbax see).
    params, rest = nnx.to_pure_dict(params_state), nnx.to_pure_dict(rest_state)
    state = {"params": params, "rest": rest, "opt_state": tx.init(params)}
    train_step = _make_train_step(lambda p, r: merge(gtrain, p, r), loss_fn, tx, accepts_rngs)
    eval_step = _make_eval(lambda p, r: merge(geval, p, r), accepts_rngs)
    fp = {
        "config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_FIELDS},
        "params": shapes(params),
        "data": {"train": _data_fingerprint(x, y)}
        | ({"val": _data_fingerprint(xv, yv)} if xv is not None else {}),
        "extra": dict(fingerprint or {}),
    }
    with contextlib.ExitStack() as stack:
        ckpt = None
        meta = _fresh_meta(config, fp)
        if workdir is not None:
            wd = Path(workdir).absolute()
            stack.enter_context(RunLock(wd))
            ckpt = Checkpointer(wd)
            stack.callback(ckpt.close)
            if ckpt.has_checkpoint() and not resume:
                raise ValueError(
                    f"workdir: {wd} already holds checkpoints; pass resume=True (CLI --resume) "
                    "to continue them or choose another directory"
                )
            restored = ckpt.restore_last(state, fp)
            ckpt.collect_garbage()  # versions a killed run left uncommitted
            if restored is not None:
                state, meta = dict(restored[0]), restored[1]
                meta["fingerprint"] = fp
                _write_metrics(wd, meta["history"])  # a kill may have come before the write
        place_batch = lambda xb, yb: (xb, yb)
        if mesh is not None:
            state, place_batch = _place_on_mesh(mesh, state, fsdp_min_size)
        loop = _Loop(config, train_step, eval_step, place_batch, ckpt, progress, callback)
        state, best_mem = loop.run(state, meta, (x, y), (xv, yv), spe)
        if config.early_stopping and meta["best_epoch"] > 0 and meta["stopped"] != "max_steps":
            if best_mem is None and ckpt is not None:
                best_mem = ckpt.restore_best({"params": state["params"], "rest": state["rest"]})[0]
            if best_mem is not None:
                state = dict(state, params=best_mem["params"], rest=best_mem["rest"])
    nnx.replace_by_pure_dict(params_state, state["params"])
    nnx.replace_by_pure_dict(rest_state, state["rest"])
    nnx.update(model, params_state, rest_state)
    model.eval()
    return FitResult(
        model=model,
        history=list(meta["history"]),
        step=meta["step"],
        best_epoch=meta["best_epoch"],
        best_val_accuracy=meta["best_val_accuracy"],
        stopped=meta["stopped"] or "epochs",
    )


def _check_fit_inputs(model, config, train, val, mesh, fsdp_min_size):
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model: expected an nnx.Module, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
    x = np.asarray(train[0]) if isinstance(train, tuple | list) and train else None
    model.eval()  # the logits' count, traced without dropout keys
    k = _num_classes(model, x) if x is not None and x.ndim else None
    x, y = _check_data(train, "train", k)
    xv, yv = _check_data(val, "val", k) if val is not None else (None, None)
    bs = config.batch_size
    if x.shape[0] < bs:
        raise ValueError(f"config.batch_size: {bs} is larger than the training set ({len(y)})")
    if mesh is not None:
        from hessjax.sharding import mesh_size

        if bs % mesh_size(mesh):
            raise ValueError(
                f"config.batch_size: {bs} is not a multiple of the mesh's {mesh_size(mesh)} "
                "devices (every step splits one batch evenly over the data axis)"
            )
    elif fsdp_min_size is not None:
        raise ValueError(f"fsdp_min_size: {fsdp_min_size!r} needs a mesh (mesh=None)")
    return x, y, xv, yv


def _merger(params_state, rest_state):
    """``merge(graphdef, params, rest)``: an nnx model from pure dicts (fresh Variables)."""

    def merge(graphdef, p, r):
        ps, rs = jax.tree.map(lambda a: a, params_state), jax.tree.map(lambda a: a, rest_state)
        nnx.replace_by_pure_dict(ps, p)
        nnx.replace_by_pure_dict(rs, r)
        return nnx.merge(graphdef, ps, rs)

    return merge


def _make_train_step(merge_train, loss_fn, tx, accepts_rngs):
    @jax.jit
    def train_step(state, xb, yb, step, base_key):
        # The key is an argument, not a constant: runs with other seeds reuse the compiled step.
        key = jax.random.fold_in(base_key, step)
        params, rest = state["params"], state["rest"]

        def objective(p):
            m = merge_train(p, rest)  # fresh Variables at this trace level
            logits = _call(m, xb, key, accepts_rngs)
            new_rest = nnx.to_pure_dict(nnx.split(m, nnx.Param, ...)[2])
            return jnp.mean(loss_fn(logits, yb)), (new_rest, logits)

        (loss, (new_rest, logits)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        acc = jnp.mean((jnp.argmax(logits, -1) == yb).astype(jnp.float32))
        return {"params": params, "rest": new_rest, "opt_state": opt_state}, loss, acc

    return train_step


def _fresh_meta(config, fp) -> dict[str, Any]:
    return {
        "step": 0,
        "epoch": 0,
        "epoch_loss": 0.0,
        "epoch_acc": 0.0,
        "best_val_accuracy": -1.0,
        "best_epoch": -1,
        "bad_epochs": 0,
        "stopped": None,
        "history": [],
        "seed": config.seed,
        "fingerprint": fp,
    }


class _Loop:
    """The epoch loop of :func:`fit`: steps, epoch-end validation, commits, early stopping."""

    def __init__(self, config, train_step, eval_step, place_batch, ckpt, progress, callback):
        self.config, self.train_step, self.eval_step = config, train_step, eval_step
        self.place_batch, self.ckpt, self.callback = place_batch, ckpt, callback
        self.progress = progress
        self.bars = progress and sys.stderr.isatty()  # plain epoch lines in logs

    def run(self, state, meta, train, val, spe):
        """Train from ``meta``'s position to the end; returns the state and best in memory."""
        cfg, best_mem = self.config, None
        meta.setdefault("stopped", None)
        if meta["stopped"] == "max_steps":
            meta["stopped"] = None  # a later run may go further
        key, t0 = jax.random.key(cfg.seed), time.perf_counter()
        while meta["epoch"] < cfg.epochs and meta["stopped"] is None:
            if cfg.max_steps is not None and meta["step"] >= cfg.max_steps:
                meta["stopped"] = "max_steps"
                break
            state = self._steps(state, meta, train, spe, key)
            if meta["stopped"] == "max_steps" and meta["step"] - meta["epoch"] * spe < spe:
                self._commit(state, meta)  # stopped inside the epoch
                break
            improved = self._end_epoch(state, meta, val, spe, time.perf_counter() - t0)
            if improved:
                best_mem = {"params": state["params"], "rest": state["rest"]}
        return state, best_mem

    def _steps(self, state, meta, train, spe, key):
        cfg, epoch = self.config, meta["epoch"]
        done = meta["step"] - epoch * spe
        batches = iterate_batches(*train, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                  drop_last=True)  # fmt: skip
        bar = tqdm(total=spe, initial=done, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not self.bars, leave=False)  # fmt: skip
        for i, (xb, yb) in enumerate(batches):
            if i < done:
                continue
            xb, yb = self.place_batch(xb, yb)
            step = jnp.asarray(meta["step"], jnp.uint32)
            state, loss, acc = self.train_step(state, xb, yb, step, key)
            loss, acc = float(loss), float(acc)
            if not np.isfinite(loss):
                raise ValueError(f"loss_fn: non-finite training loss {loss} at step {meta['step']}")
            meta["step"] += 1
            meta["epoch_loss"] += loss
            meta["epoch_acc"] += acc
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.callback is not None:
                self.callback(meta["step"], {"loss": loss, "accuracy": acc})
            if cfg.max_steps is not None and meta["step"] >= cfg.max_steps:
                meta["stopped"] = "max_steps"
                break
            last_of_epoch = meta["step"] - epoch * spe == spe  # the epoch end commits it
            if cfg.checkpoint_every and meta["step"] % cfg.checkpoint_every == 0:
                if not last_of_epoch:
                    self._commit(state, meta)
        bar.close()
        return state

    def _end_epoch(self, state, meta, val, spe, elapsed) -> bool:
        cfg, epoch = self.config, meta["epoch"]
        row = {
            "epoch": epoch + 1,
            "step": meta["step"],
            "train_loss": meta["epoch_loss"] / spe,
            "train_accuracy": meta["epoch_acc"] / spe,
        }
        improved = False
        if val[0] is not None:
            ev = _evaluate(self.eval_step, state["params"], state["rest"], *val,
                           cfg.eval_batch_size)  # fmt: skip
            row["val_loss"], row["val_accuracy"] = ev["loss"], ev["accuracy"]
            improved = ev["accuracy"] > meta["best_val_accuracy"]
        row["time"] = elapsed
        meta["history"].append(row)
        meta.update(epoch=epoch + 1, epoch_loss=0.0, epoch_acc=0.0)
        if improved:
            meta.update(best_val_accuracy=row["val_accuracy"], best_epoch=epoch + 1, bad_epochs=0)
        elif val[0] is not None:
            meta["bad_epochs"] += 1
        if cfg.early_stopping and meta["bad_epochs"] >= cfg.patience:
            meta["stopped"] = "early_stopping"
        if meta["stopped"] is None and cfg.max_steps is not None:
            if meta["step"] >= cfg.max_steps:
                meta["stopped"] = "max_steps"
        best = {"params": state["params"], "rest": state["rest"]} if improved else None
        self._commit(state, meta, best)
        if self.ckpt is not None:
            _write_metrics(self.ckpt.root.parent, meta["history"])
        if self.progress:
            line = "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            )
            tqdm.write(line) if self.bars else print(line, file=sys.stderr, flush=True)
        return improved

    def _commit(self, state, meta, best=None):
        if self.ckpt is not None:
            self.ckpt.commit(state, meta, best)
