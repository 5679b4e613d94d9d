"""The fit loop: jitted steps over an optax chain, clean validation, orbax checkpoints, resume.

Determinism: the data order of epoch e is a function of (seed, e)
(:func:`hessjax.iterate_batches`) and the dropout key of step t is ``fold_in(key(seed), t)``,
so a run restored from a checkpoint at step t replays exactly the steps an uninterrupted run
would take, and ends with the same parameters.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from hessjax.data import iterate_batches
from hessjax.partition import path_name
from hessjax.train.methods import TrainConfig, cross_entropy

PyTree = Any

__all__ = ["FitResult", "evaluate", "fit", "split_model"]

# Config fields that may change between a run and its resumption.
_RESUMABLE_FIELDS = ("epochs", "max_steps", "checkpoint_every", "eval_batch_size")


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


def _check_data(data, name):
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ValueError(f"{name}: expected a pair (images, labels), got {type(data).__name__}")
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if x.shape[:1] != y.shape or y.ndim != 1 or x.shape[0] == 0:
        raise ValueError(
            f"{name}: expected images (n, ...) and labels (n,) with n >= 1, got shapes "
            f"{x.shape} and {y.shape}"
        )
    return x, y.astype(np.int32)


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
    x, y = _check_data((images, labels), "images/labels")
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
        total, correct, worst = total + float(s), correct + float(c), max(worst, float(w))
    return {"loss": total / n, "accuracy": correct / n, "max_loss": worst}


# ------------------------------------------------------------------------------ checkpoints
def _shapes(tree) -> dict[str, list[int]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(p): list(np.shape(v)) for p, v in leaves}


def _managers(workdir: Path):
    opts = dict(enable_async_checkpointing=False, create=True)
    last = ocp.CheckpointManager(
        workdir / "checkpoints" / "last",
        options=ocp.CheckpointManagerOptions(max_to_keep=2, **opts),
        item_names=("state", "meta"),
    )
    best = ocp.CheckpointManager(
        workdir / "checkpoints" / "best",
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts),
        item_names=("state", "meta"),
    )
    return last, best


def _compare_fingerprint(saved: dict, current: dict, where: Path) -> None:
    problems = []
    if saved.get("params") != current["params"]:
        s, c = saved.get("params", {}), current["params"]
        diff = sorted(set(s) ^ set(c))[:5] or [k for k in c if s.get(k) != c[k]][:5]
        problems.append(
            f"the model differs (parameter names/shapes, e.g. {diff}: checkpoint "
            f"{[s.get(k) for k in diff]} vs model {[c.get(k) for k in diff]})"
        )
    for key in sorted(set(saved.get("config", {})) | set(current["config"])):
        a, b = saved.get("config", {}).get(key), current["config"].get(key)
        if a != b:
            problems.append(f"config.{key} = {a!r} in the checkpoint, {b!r} now")
    for key in sorted(set(saved.get("extra", {})) | set(current["extra"])):
        a, b = saved.get("extra", {}).get(key), current["extra"].get(key)
        if a != b:
            problems.append(f"{key} = {a!r} in the checkpoint, {b!r} now")
    if problems:
        raise ValueError(
            f"checkpoint in {where} does not match this run (use another output directory or "
            "start afresh): " + "; ".join(problems)
        )


def restore_checkpoint(
    manager: ocp.CheckpointManager, target: PyTree, fingerprint: dict | None = None
) -> tuple[PyTree, dict]:
    """Restore ``(state, meta)`` of the latest step of an orbax manager into ``target``'s shape.

    Args:
      manager: an ``ocp.CheckpointManager`` with items ``state`` (StandardSave) and ``meta``
        (JsonSave).
      target: a pytree like the saved state (its shapes and dtypes are used).
      fingerprint: when given, compared with the saved ``meta["fingerprint"]`` first.

    Returns:
      The restored state and meta dict.

    Raises:
      ValueError: no checkpoint; a mismatched fingerprint (names the differences); an
        unreadable/corrupt checkpoint (names the directory and the error).
    """
    step = manager.latest_step()
    where = Path(manager.directory)
    if step is None:
        raise ValueError(f"checkpoint: no checkpoint found in {where}")
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        raise ValueError(
            f"checkpoint: {where}/{step} is corrupt or unreadable (metadata): {e}"
        ) from e
    if fingerprint is not None:
        _compare_fingerprint(meta.get("fingerprint", {}), fingerprint, where / str(step))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        state = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"checkpoint: {where}/{step} is corrupt or does not match the model: {e}"
        ) from e
    return state, meta


def _place_on_mesh(mesh, params, rest, opt_state, fsdp_min_size):
    """Replicated (or FSDP-sharded) state and a function placing a batch over the data axis."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from hessjax.sharding import _axis, _place, fsdp_sharding, replicate

    if fsdp_min_size is None:
        params, opt_state = replicate((params, opt_state), mesh)
    else:
        params = _place(params, fsdp_sharding(params, mesh, min_size=fsdp_min_size))
        opt_state = _place(opt_state, fsdp_sharding(opt_state, mesh, min_size=fsdp_min_size))
    rest = replicate(rest, mesh)
    rows = NamedSharding(mesh, P(_axis(mesh, None)))
    return params, rest, opt_state, lambda xb, yb: _place((xb, yb), rows)


def _write_metrics(workdir: Path, history: list[dict]) -> None:
    (workdir / "metrics.json").write_text(json.dumps(history, indent=2))
    if history:
        keys = list(history[0])
        with open(workdir / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)


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
      progress: show tqdm progress bars.
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
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model: expected an nnx.Module, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
    x, y = _check_data(train, "train")
    xv, yv = _check_data(val, "val") if val is not None else (None, None)
    n = x.shape[0]
    bs = config.batch_size
    if n < bs:
        raise ValueError(f"config.batch_size: {bs} is larger than the training set ({n})")
    spe = n // bs
    if mesh is not None:
        from hessjax.sharding import mesh_size

        if bs % mesh_size(mesh):
            raise ValueError(
                f"config.batch_size: {bs} is not a multiple of the mesh's {mesh_size(mesh)} "
                "devices (every step splits one batch evenly over the data axis)"
            )
    elif fsdp_min_size is not None:
        raise ValueError(f"fsdp_min_size: {fsdp_min_size!r} needs a mesh (mesh=None)")
    accepts_rngs = _accepts_rngs(model)
    gtrain, geval, params_state, rest_state = split_model(model)
    # The loop works on plain nested dicts of arrays (what optax and orbax see).
    params, rest = nnx.to_pure_dict(params_state), nnx.to_pure_dict(rest_state)

    def merge(graphdef, p, r):
        ps, rs = jax.tree.map(lambda a: a, params_state), jax.tree.map(lambda a: a, rest_state)
        nnx.replace_by_pure_dict(ps, p)
        nnx.replace_by_pure_dict(rs, r)
        return nnx.merge(graphdef, ps, rs)

    opt_state = tx.init(params)
    base_key = jax.random.key(config.seed)

    @jax.jit
    def train_step(params, rest, opt_state, xb, yb, step, base_key):
        # The key is an argument, not a constant: runs with other seeds reuse the compiled step.
        key = jax.random.fold_in(base_key, step)

        def objective(p):
            m = merge(gtrain, p, rest)  # fresh Variables at this trace level
            logits = _call(m, xb, key, accepts_rngs)
            new_rest = nnx.to_pure_dict(nnx.split(m, nnx.Param, ...)[2])
            return jnp.mean(loss_fn(logits, yb)), (new_rest, logits)

        (loss, (new_rest, logits)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        acc = jnp.mean((jnp.argmax(logits, -1) == yb).astype(jnp.float32))
        return params, new_rest, opt_state, loss, acc

    eval_step = _make_eval(lambda p, r: merge(geval, p, r), accepts_rngs)

    fp = {
        "config": {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE_FIELDS},
        "params": _shapes(params),
        "extra": dict(fingerprint or {}),
    }
    meta: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "epoch_loss": 0.0,
        "epoch_acc": 0.0,
        "best_val_accuracy": -1.0,
        "best_epoch": -1,
        "bad_epochs": 0,
        "history": [],
        "seed": config.seed,
        "fingerprint": fp,
    }
    last = best = None
    best_mem = None
    wd = None
    if workdir is not None:
        wd = Path(workdir).absolute()
        wd.mkdir(parents=True, exist_ok=True)
        last, best = _managers(wd)
        if last.latest_step() is not None:
            if not resume:
                raise ValueError(
                    f"workdir: {wd} already holds checkpoints; pass resume=True (CLI --resume) "
                    "to continue them or choose another directory"
                )
            target = {"params": params, "rest": rest, "opt_state": opt_state}
            state, meta = restore_checkpoint(last, target, fp)
            params, rest, opt_state = state["params"], state["rest"], state["opt_state"]
            meta["fingerprint"] = fp
    place_batch = lambda xb, yb: (xb, yb)
    if mesh is not None:
        params, rest, opt_state, place_batch = _place_on_mesh(
            mesh, params, rest, opt_state, fsdp_min_size
        )

    def save(manager, items, meta_):
        manager.save(
            meta_["step"],
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta_)
            ),
            force=True,
        )
        manager.wait_until_finished()

    def save_last():
        if last is not None and last.latest_step() != meta["step"]:
            save(last, {"params": params, "rest": rest, "opt_state": opt_state}, meta)

    stopped = "epochs"
    t0 = time.perf_counter()
    while meta["epoch"] < config.epochs and stopped == "epochs":
        epoch = meta["epoch"]
        done = meta["step"] - epoch * spe
        batches = list(
            iterate_batches(x, y, batch_size=bs, seed=config.seed, epoch=epoch, drop_last=True)
        )
        bar = tqdm(
            total=spe,
            initial=done,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=False,
        )
        for xb, yb in batches[done:]:
            xb, yb = place_batch(xb, yb)
            params, rest, opt_state, loss, acc = train_step(
                params, rest, opt_state, xb, yb, jnp.asarray(meta["step"], jnp.uint32), base_key
            )
            loss, acc = float(loss), float(acc)
            if not np.isfinite(loss):
                raise ValueError(f"loss_fn: non-finite training loss {loss} at step {meta['step']}")
            meta["step"] += 1
            meta["epoch_loss"] += loss
            meta["epoch_acc"] += acc
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if callback is not None:
                callback(meta["step"], {"loss": loss, "accuracy": acc})
            if config.checkpoint_every and meta["step"] % config.checkpoint_every == 0:
                save_last()
            if config.max_steps is not None and meta["step"] >= config.max_steps:
                stopped = "max_steps"
                break
        bar.close()
        if stopped == "max_steps" and meta["step"] - epoch * spe < spe:
            save_last()
            break
        row = {
            "epoch": epoch + 1,
            "step": meta["step"],
            "train_loss": meta["epoch_loss"] / spe,
            "train_accuracy": meta["epoch_acc"] / spe,
        }
        improved = False
        if xv is not None:
            ev = _evaluate(eval_step, params, rest, xv, yv, config.eval_batch_size)
            row["val_loss"], row["val_accuracy"] = ev["loss"], ev["accuracy"]
            improved = ev["accuracy"] > meta["best_val_accuracy"]
        row["time"] = time.perf_counter() - t0
        meta["history"].append(row)
        meta.update(epoch=epoch + 1, epoch_loss=0.0, epoch_acc=0.0)
        if improved:
            meta.update(best_val_accuracy=row["val_accuracy"], best_epoch=epoch + 1, bad_epochs=0)
            best_mem = (params, rest)
            if best is not None:
                save(best, {"params": params, "rest": rest}, meta)
        elif xv is not None:
            meta["bad_epochs"] += 1
        if config.early_stopping and meta["bad_epochs"] >= config.patience:
            stopped = "early_stopping"
        save_last()
        if wd is not None:
            _write_metrics(wd, meta["history"])
        if progress:
            tqdm.write(
                "  ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )
    if config.early_stopping and meta["best_epoch"] > 0 and stopped != "max_steps":
        if best_mem is not None:
            params, rest = best_mem
        elif best is not None:
            state, _ = restore_checkpoint(best, {"params": params, "rest": rest})
            params, rest = state["params"], state["rest"]
    nnx.replace_by_pure_dict(params_state, params)
    nnx.replace_by_pure_dict(rest_state, rest)
    nnx.update(model, params_state, rest_state)
    model.eval()
    for manager in (last, best):
        if manager is not None:
            manager.close()
    return FitResult(
        model=model,
        history=list(meta["history"]),
        step=meta["step"],
        best_epoch=meta["best_epoch"],
        best_val_accuracy=meta["best_val_accuracy"],
        stopped=stopped,
    )
