"""Choosing a fine-tuning candidate by the Theorem-2.1 bound, from the training data alone.

:func:`select_by_bound` fine-tunes every candidate of a small grid (radii, methods, ...) into
its own resumable run directory, bounds each one's clean test loss with the training data only
(the backward-corrected training loss on the noisy labels plus ``sqrt(C)`` times the Hessian
distance measure over every training example; by default the positive part of that loss,
which cannot be driven below 0) and returns the candidate of the smallest bound,
with the table, also written to ``select.json``. No validation or test example enters the
choice; the runs' clean validation and test accuracies are only reported, in a separate column.

References:
  Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based
  Generalization Guarantees", ICML 2022, Theorem 2.1 and section 3.
"""

from __future__ import annotations

import itertools
import json
import numbers
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hessjax.experiment.config import RunConfig
from hessjax.experiment.data import noise_transition
from hessjax.experiment.env import git_commit
from hessjax.experiment.runs import DEFAULT_CACHE, finetune, load_run, measure_run, write_json

__all__ = ["CRITERIA", "GRID_OPTIONS", "select_by_bound"]

# criterion -> the table column minimised: the positive part of the backward-corrected loss
# (default: it bounds the clean risk from above and cannot be driven below 0 by overfitting
# the noisy labels), or the backward-corrected loss itself (the paper's consistent loss)
CRITERIA = {"positive": "bound_positive", "backward": "bound"}

# The options a candidate may change: the method and its hyperparameters. The data, the seed,
# the transition and where the runs go are the selection's, the same for every candidate (the
# bounds are compared on one training set, under one loss).
GRID_OPTIONS = ("method", "radius", "radius_scale", "head_radius", "norm", "penalty",
                "smoothing", "gce_q", "sce_alpha", "sce_beta", "lr", "epochs", "optimizer",
                "lr_decay_every", "batch_size")  # fmt: skip
_MEASURE_CACHE = "select_bound.json"


def _candidates(grid) -> list[dict[str, Any]]:
    """The grid as a list of option dicts: a sequence of dicts, or a dict of value lists."""
    if isinstance(grid, Mapping):
        if not grid:
            raise ValueError("grid: expected at least one option to vary, got an empty dict")
        for key, values in grid.items():
            if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"grid: {key!r} must map to a non-empty list, got {values!r}")
        keys = list(grid)
        cands = [dict(zip(keys, vs, strict=True)) for vs in itertools.product(*grid.values())]
    elif isinstance(grid, Sequence) and not isinstance(grid, str | bytes):
        cands = [dict(c) if isinstance(c, Mapping) else c for c in grid]
    else:
        raise ValueError(f"grid: expected a list of option dicts or a dict of lists, got {grid!r}")
    if not cands:
        raise ValueError("grid: expected at least one candidate, got an empty grid")
    for i, c in enumerate(cands):
        if not isinstance(c, dict):
            raise ValueError(f"grid[{i}]: expected a dict of options, got {c!r}")
        bad = sorted(set(c) - set(GRID_OPTIONS))
        if bad:
            raise ValueError(
                f"grid[{i}]: options {bad} cannot vary within a selection (allowed: "
                f"{list(GRID_OPTIONS)}); set them in config"
            )
    if len({json.dumps(c, sort_keys=True) for c in cands}) < len(cands):
        raise ValueError(f"grid: a candidate is listed twice in {cands}")
    return cands


def _run_name(cand: Mapping[str, Any]) -> str:
    """The candidate's run directory name, e.g. ``method-robust__radius-0.5``."""
    return "__".join(f"{k}-{v}" for k, v in cand.items()) or "base"


def _check(config, cands, out: Path) -> list[dict[str, Any]]:
    """Every candidate's run config, validated before anything is trained."""
    from hessjax.train import TrainConfig

    base = RunConfig.from_dict(config)
    if base.early_stopping or base.method == "plain_es":
        raise ValueError(
            "config.early_stopping: early stopping uses the clean validation set; the selection "
            "by the bound must not (turn it off, and method 'plain_es' with it)"
        )
    train_names = {f for f in TrainConfig.__dataclass_fields__}
    cfgs = []
    for i, cand in enumerate(cands):
        if cand.get("method") == "plain_es":
            raise ValueError(f"grid[{i}].method: 'plain_es' early-stops on clean validation data")
        for key in ("radius", "head_radius"):
            v = cand.get(key)
            real = isinstance(v, numbers.Real) and not isinstance(v, bool)
            if v is not None and not (real and np.isfinite(v) and v >= 0):
                raise ValueError(f"grid[{i}].{key}: expected a finite number >= 0, got {v!r}")
        try:
            cfg = base.replace(**cand, output_dir=str(out / _run_name(cand))).to_dict()
            TrainConfig(**{k: v for k, v in cfg.items() if k in train_names})
        except (TypeError, ValueError) as e:
            raise ValueError(f"grid[{i}]: {e}") from None
        cfgs.append(cfg)
    return cfgs


def _transition(cfg: Mapping[str, Any], runs: Sequence[Path], k: int) -> np.ndarray:
    """The T of the selection's loss: the runs' (config.transition), one for every candidate."""
    if cfg["transition"] == "dual_t":
        for run in runs:
            if (run / "transition.json").exists():
                return np.asarray(json.loads((run / "transition.json").read_text()), np.float64)
        raise ValueError(
            "config.transition: 'dual_t' is estimated by the runs of methods that use T, and no "
            "candidate has one; add such a method to the grid or use 'true' or 'symmetric'"
        )
    if cfg["transition"] == "symmetric":
        from hessjax.noise import symmetric_transition

        rate = cfg["assumed_rate"] if cfg["assumed_rate"] is not None else cfg["noise_rate"]
        return np.asarray(symmetric_transition(rate, num_classes=k), np.float64)
    t = noise_transition(cfg["noise_type"], cfg["noise_rate"], k)
    return np.eye(k) if t is None else np.asarray(t, np.float64)


def _train_logits(r, batch_size: int = 256) -> np.ndarray:
    import jax

    fn = jax.jit(lambda x: r.model(x))
    x = r.splits.train_images
    return np.concatenate(
        [np.asarray(fn(x[i : i + batch_size]), np.float64) for i in range(0, len(x), batch_size)]
    )


def _bound_row(run: Path, transition: np.ndarray, *, loss_bound, measure_options) -> dict:
    """The training-data-only bound of one finished run (cached in RUN/select_bound.json)."""
    from hessjax.bounds import hessian_bound
    from hessjax.losses import backward_corrected_cross_entropy
    from hessjax.models import model_spec

    results = json.loads((run / "results.json").read_text())
    key = {"version": 2, "measure": measure_options, "loss_bound": loss_bound,
           "transition": transition.tolist(), "steps": results["steps"],
           "config_end": results.get("config_end")}  # fmt: skip
    try:
        cached = json.loads((run / _MEASURE_CACHE).read_text())
        if cached.get("key") == key:
            return dict(cached["row"], measure_reused=True)
    except (OSError, ValueError):
        pass
    r = load_run(run, layers=measure_options["layers"])
    logits, labels = _train_logits(r), np.asarray(r.splits.train_labels)
    k = logits.shape[1]
    ce_all = -(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))  # (n, k)
    per_example = np.asarray(backward_corrected_cross_entropy(logits, labels, transition))
    train_loss = float(np.mean(per_example))
    train_loss_positive = float(np.mean(np.maximum(per_example, 0.0)))
    # clip level of the cross-entropy: at least its largest value on the training inputs over
    # every label, so the clip is inactive on the training set (loss and Hessians unchanged)
    clip = max(float(np.max(ce_all)), 0.0 if loss_bound is None else float(loss_bound))
    weights = np.linalg.pinv(transition)
    pos, neg = np.maximum(weights, 0).sum(1).max(), np.maximum(-weights, 0).sum(1).max()
    c = max(clip * float(pos + neg), 1e-12)
    c_positive = max(clip * float(pos), 1e-12)  # max(l~, 0) lies in [0, c0 P]
    m = measure_run(run, num_examples=None, **measure_options)
    n = m["n"]
    exact = bool(model_spec(r.cfg["model"]).psd_blocks) or np.allclose(transition, np.eye(k))
    row = {
        "run": str(run),
        "method": r.cfg["method"],
        "n": n,
        "train_loss": train_loss,
        "measure": m["measure"],
        "clip": clip,
        "C": c,
        "bound": float(hessian_bound(train_loss, m["measure"], n, loss_bound=c).value),
        "train_loss_positive": train_loss_positive,
        "C_positive": c_positive,
        "bound_positive": float(
            hessian_bound(train_loss_positive, m["measure"], n, loss_bound=c_positive).value
        ),
        "measure_exact": exact,
        "train_ce_noisy": m["train_loss"],
        "reported": {k: results.get(k) for k in ("val_accuracy", "test_accuracy", "test_loss")},
    }
    write_json(run / _MEASURE_CACHE, {"key": key, "row": row})
    return dict(row, measure_reused=False)


def select_by_bound(
    config: RunConfig | Mapping[str, Any],
    grid: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    *,
    loss_bound: float | None = None,
    criterion: str = "positive",
    num_iters: int = 8,
    chunk_size: int | None = 1,
    layers: str | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Fine-tune every candidate of ``grid``; choose the one of the smallest Theorem-2.1 bound.

    Only the training data (with its noisy labels) decides; no clean validation or test example
    is read for the choice. Every candidate ``c`` is ``config`` with the options of ``c``
    (:data:`hessjax.experiment.select.GRID_OPTIONS`: radii, method, ...), fine-tuned by
    :func:`~hessjax.experiment.finetune` into ``config.output_dir/<c's options>`` and bounded by::

        bound(c) = Lhat(c) + sqrt(C(c)) * measure(c)
        Lhat(c)  = mean_b sum_j R[y~_b, j] * min(CE(f(x_b), j), c0),   R = pinv(T)
        measure  = sum_i sqrt(calH_i / n)   (over every training example)

    (:func:`~hessjax.experiment.measure_run` ``num_examples=None``).

    The loss is one for every candidate, whatever loss it was trained with: the
    backward-corrected cross-entropy under the runs' transition ``T`` (``config.transition``;
    the identity at noise rate 0), whose expectation over the label noise is the clean loss, so
    ``bound(c)`` bounds the CLEAN test risk of the cross-entropy clipped at ``c0``.

    The choice of C. Theorem 2.1 needs ``0 <= loss <= C`` for every input and label; the
    backward-corrected loss is unbounded (above, and below through negative weights of R), so
    the cross-entropy is clipped at ``c0`` first: then the loss lies in
    ``[-c0 N, c0 P]`` with ``P = max_y sum_j max(R[y, j], 0)``, ``N = max_y sum_j
    max(-R[y, j], 0)``; shifted by ``c0 N`` (which changes neither side's difference nor a
    Hessian) it is in ``[0, C]`` with ``C = c0 (P + N)`` (``C = c0`` when ``T = I``). ``c0`` is
    the candidate's largest cross-entropy over the training inputs and EVERY label (or
    ``loss_bound`` if larger): the clip is then inactive on the training set, so ``Lhat`` and
    the measure are those of the unclipped loss, and the clipped loss is bounded everywhere.
    Give ``loss_bound`` at least every candidate's ``c0`` for one C shared by all.

    The criterion. ``"backward"`` minimises ``bound(c)`` above. Its loss is unbounded below
    (negative weights of ``R``), and a model that memorises the noisy labels drives ``Lhat``
    far below 0 (measured: -35 to -48 on MobileNetV2 with 40% symmetric noise, bounds below
    0), so that bound rewards overfitting. ``"positive"`` (default) minimises the same bound
    for the positive part ``max(l~, 0)`` of the backward-corrected loss ``l~``: by Jensen,
    ``E_noise max(l~, 0) >= max(E_noise l~, 0) = ``the clean clipped cross-entropy, so its
    risk is still an upper bound of the clean risk; the loss lies in ``[0, c0 P]``, so
    ``C_positive = c0 P`` (no shift); its Hessian is ``l~``'s where ``l~ > 0`` and 0 elsewhere,
    so the measure of ``l~`` (below) is an upper bound of its measure::

        bound_positive(c) = mean_b max(l~_b, 0) + sqrt(c0 P) * measure(c)

    Caveats: each bound holds with probability >= 0.99, so all ``G`` candidates' at once with
    probability >= 1 - 0.01 G (a union bound); the theorem's ``xi = O(n^(-3/4))`` is left out
    (``n`` is the same for every candidate); ``c0`` is chosen after seeing the training inputs.

    The measure is that of the cross-entropy on the noisy labels. It is the measure of the
    backward-corrected loss exactly when ``T = I`` or the network is piecewise
    linear in each layer's weights (:class:`~hessjax.models.ModelSpec` ``psd_blocks``: the tiny
    CNN, MobileNetV2): a layer's Hessian block is then ``J_i^T (diag(p) - p p^T) J_i`` for
    every label, and ``sum_j R[y, j] = 1``. Otherwise the column ``measure_exact`` is False.

    Cost: one fine-tuning per candidate (a finished run is reused, an interrupted one resumes),
    then per candidate one forward pass over the training set and
    :func:`~hessjax.experiment.measure_run` over all ``n`` training examples (``n * L *
    num_iters`` Hessian-vector products for ``L`` measured layers; with ``psd_blocks``, ``L``
    batched products per example). Measures are cached in
    each run directory, so a rerun recomputes nothing.

    Args:
      config: the base :class:`~hessjax.experiment.RunConfig` (or dict); ``output_dir``
        holds one run per candidate and ``select.json``. Early stopping must be off (it reads
        clean validation data); the final checkpoint of each run is the one bounded.
      grid: a list of option dicts (``[{"radius": 0.5}, {"method": "robust_forward"}]``) or a
        dict of value lists whose product is the grid (``{"radius": [0.5, 1, 2]}``).
      loss_bound: a floor for the clip level ``c0`` of the cross-entropy (None: each
        candidate's own largest training cross-entropy over all labels).
      criterion: ``"positive"`` (``bound_positive``) or ``"backward"`` (``bound``); see
        above. Both columns are in the table whichever is chosen.
      num_iters, chunk_size, layers: :func:`~hessjax.experiment.measure_run`'s options.
      progress: progress bars while fine-tuning.
      command: recorded in ``select.json`` (default: this process's command line).

    Returns:
      A dict (also ``output_dir/select.json``): ``chosen`` (the candidate's options),
      ``chosen_index``, ``chosen_run``, ``table`` (one row per candidate: ``candidate``,
      ``run``, ``train_loss``, ``measure``, ``clip``, ``C``, ``bound``,
      ``train_loss_positive``, ``C_positive``, ``bound_positive``, ``measure_exact``,
      ``train_ce_noisy``, ``reused``, and under ``reported`` the run's clean ``val_accuracy``,
      ``test_accuracy``, ``test_loss``, never used in the choice), ``transition``,
      ``command``, ``seed``, ``commit``.

    Raises:
      ValueError: an unknown criterion, an empty grid, an option that may not vary, a bad
        value (naming ``grid[i]`` and the option: an unknown method, a negative radius),
        early stopping on, a ``dual_t`` transition no candidate estimates;
        :func:`~hessjax.experiment.finetune`'s errors.

    Example:
      >>> cfg = RunConfig(dataset="digits", model="tiny_cnn", image_size=8, n_per_class=4,
      ...                 method="robust", epochs=1, output_dir="/tmp/select")
      >>> out = select_by_bound(cfg, {"head_radius": [0.0, 1.0]})  # doctest: +SKIP
      >>> out["chosen"]  # doctest: +SKIP
      {'head_radius': 0.0}

    References:
      Ju, Li & Zhang, ICML 2022, Theorem 2.1 (the bound) and section 3 (the consistent loss);
      Patrini et al., CVPR 2017 (backward correction).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {sorted(CRITERIA)}, got {criterion!r}")
    cands = _candidates(grid)
    base = RunConfig.from_dict(config)
    out = Path(base.output_dir)
    cfgs = _check(base, cands, out)
    if loss_bound is not None and not (np.isfinite(loss_bound) and loss_bound > 0):
        raise ValueError(f"loss_bound: expected a finite number > 0 or None, got {loss_bound!r}")
    options = {"num_iters": num_iters, "chunk_size": chunk_size, "layers": layers}
    results = [finetune(cfg, progress=progress) for cfg in cfgs]
    runs = [Path(cfg["output_dir"]) for cfg in cfgs]
    k = DEFAULT_CACHE.splits(cfgs[0])[0].num_classes
    transition = _transition(cfgs[0], runs, k)
    table = []
    for cand, run, res in zip(cands, runs, results, strict=True):
        row = _bound_row(run, transition, loss_bound=loss_bound, measure_options=options)
        table.append({"candidate": cand, **row, "reused": bool(res.get("already_finished"))})
    column = CRITERIA[criterion]
    best = int(np.argmin([row[column] for row in table]))
    summary = {
        "chosen": cands[best],
        "chosen_index": best,
        "chosen_run": table[best]["run"],
        "criterion": criterion,
        "criterion_column": column,
        "criterion_text": f"min over candidates of {column} (Theorem 2.1, no xi), training data "
        "only; 'reported' columns are not used",
        "table": table,
        "transition": transition.tolist(),
        "loss_bound": loss_bound,
        "measure_options": options,
        "config": base.to_dict(),
        "command": shlex.join(sys.argv) if command is None else command,
        "seed": base.seed,
        "commit": git_commit(),
    }
    write_json(out / "select.json", summary)
    return summary
