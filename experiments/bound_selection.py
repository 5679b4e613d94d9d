"""Bound-selected vs validation-selected fine-tuning radii, on the same final checkpoints.

For every seed, :func:`hessjax.experiment.select_by_bound` fine-tunes each candidate of a grid
(methods ``constraint`` and ``robust``, the paper's algorithm: layerwise constraint + backward
correction, at body radii D and head radii 4 D) for the preset's epochs WITHOUT early stopping
and bounds each final checkpoint by Theorem 2.1 from the training data alone (the
backward-corrected training loss on the noisy labels plus ``sqrt(C)`` x the Hessian distance
measure over every training example and every fine-tuned layer). From the same table three
candidates are picked:

* **bound-selected**: the smallest bound (training data only);
* **validation-selected**: the largest clean validation accuracy (200 clean images);
* **oracle (test)-selected**: the largest clean test accuracy. A REFERENCE LINE ONLY: it reads
  the test set, so it is no selection method; it shows how much the grid leaves on the table.

A fourth pick, a DIAGNOSTIC only (not the issue's criterion): the smallest bound of the plain
cross-entropy on the noisy labels (training CE + ``sqrt(c0)`` x the same measure), to tell the
measure term's preference from the backward-corrected loss's, which is unbounded below.

Reported: the clean test accuracy of each pick (mean +- sample std over seeds), the paired (by
seed) difference bound - validation with a 95% t interval (the issue's target: within 1 point
on average), how often each candidate is picked, and per seed the Spearman correlation across
candidates between the bound and the clean test loss / test error. Ties (validation
accuracies on 200 images often tie) go to the first candidate in grid order.

The transition: the bound's backward-corrected loss and the ``robust`` candidates use the
symmetric T at ``assumed_rate`` = 0.4, the TRUE noise rate: T is assumed known (the paper's
setting for the theorem), not estimated. ``constraint`` trains on the plain cross-entropy; its
bound uses the same T (one loss for every candidate).

    .venv/bin/python experiments/bound_selection.py                          # cpu_partial
    nice -n 19 .venv/bin/python experiments/bound_selection.py --no-progress  # as run here
    .venv/bin/python experiments/bound_selection.py --seeds 1 2 --summary-only
    .venv/bin/python experiments/bound_selection.py --preset smoke --out /tmp/bs   # seconds
    .venv/bin/python experiments/bound_selection.py --preset gpu   # defined, not run

Presets (``PRESETS``): ``cpu_partial`` (alias ``cpu``) the cheap regime of
``noisy_labels.py`` (its ``PRESETS["cpu_partial"]``: MobileNetV2 blocks 14-18 + head,
Fashion-MNIST 32x32, 30 noisy images per class, symmetric 40%, validation 200, test 500, Adam
1e-3 x0.1 every 10 epochs, 20 epochs; the measure over all 300 training examples, every
fine-tuned layer, 4 Lanczos steps); ``gpu`` the same from ``noisy_labels.py``'s ``gpu`` preset;
``smoke`` digits + tiny CNN (seconds). Writes config.json, metrics.json and table.md into
``--out`` (default ``experiments/results/bound_selection_<preset>``); the runs go to
``<out>/runs/seed<k>/<candidate>/`` with ``select.json`` per seed. Resumable: finished runs
and their cached bounds are reused, an interrupted run resumes; ``--summary-only`` trains
nothing and tabulates the seeds whose ``select.json`` holds the whole grid.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

import hessjax.experiment as hexp


def _sibling(name: str):
    """Another script of experiments/ as a module (this file may be loaded by path)."""
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bound_selection_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_NL = _sibling("noisy_labels").PRESETS
# the run options taken over from a noisy_labels preset (its protocol options, patience and
# the method list, do not apply: no early stopping here)
_RUN_KEYS = ("dataset", "model", "n_per_class", "val_size", "test_size", "image_size",
             "train_from", "epochs", "lr", "batch_size", "lr_decay_every", "radius_scale",
             "optimizer")  # fmt: skip


def _grid(radii, methods=("constraint", "robust"), head_factor=4.0) -> list[dict]:
    """Every method at every body radius D, with head radius ``head_factor * D``."""
    return [{"method": m, "radius": float(d), "head_radius": float(head_factor * d)}
            for m in methods for d in radii]  # fmt: skip


def _from_noisy_labels(name: str) -> dict:
    c = _NL[name]
    return {k: c[k] for k in _RUN_KEYS if k in c} | dict(
        num_iters=c["num_iters"], chunk_size=c["chunk_size"], layers=c["layers"]
    )


_NOISE = dict(noise_type="symmetric", noise_rate=0.4, transition="symmetric", assumed_rate=0.4)
PRESETS = {
    "smoke": dict(dataset="digits", model="tiny_cnn", image_size=8, train_from=0, n_per_class=6,
                  val_size=30, test_size=60, batch_size=8, lr=1e-2, epochs=3,
                  lr_decay_every=10, radius_scale=1.5, num_iters=3, chunk_size=1, layers=None,
                  seeds=[1, 2], grid=_grid((0.1, 1.0))) | _NOISE,
    # D = 1/16 .. 4 (x4 steps), head 4 D: from the tightest ball that binds every layer to a
    # ball no 20-epoch run reaches; 8 candidates per seed
    "cpu_partial": _from_noisy_labels("cpu_partial") | _NOISE
    | dict(seeds=[1, 2, 3, 4, 5], grid=_grid((0.0625, 0.25, 1.0, 4.0))),
    "gpu": _from_noisy_labels("gpu") | _NOISE
    | dict(seeds=[1, 2, 3, 4, 5], grid=_grid((0.0625, 0.25, 1.0, 4.0))),
}  # fmt: skip
PRESETS["cpu"] = PRESETS["cpu_partial"]
# a DIAGNOSTIC pick beside them (not the criterion): the Theorem-2.1 bound of the
# plain cross-entropy on the NOISY labels, train CE + sqrt(c0) x measure (c0: the clip level,
# the largest training CE over every label), i.e. the same measure without the backward
# correction's loss, which is unbounded below; it bounds the noisy-label risk, not the clean one
# "bound": select_by_bound's choice (its default criterion: the positive part of the
# backward-corrected loss, ``bound_positive``); "backward_bound": the bound of the
# backward-corrected loss itself (the paper's consistent loss; unbounded below)
_PICKS = ("bound", "backward_bound", "validation", "oracle", "noisy_ce_bound")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: a preset, the seeds, the output folder."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu_partial", choices=sorted(PRESETS))
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="default: the preset's (a reduction: recorded in config.json)")  # fmt: skip
    p.add_argument("--grid", type=json.loads, default=None,
                   help="JSON list of candidates replacing the preset's grid, e.g. "
                   '\'[{"method": "robust", "radius": 1.0, "head_radius": 4.0}]\'')  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="default experiments/results/...")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: tabulate finished seeds, list the missing")  # fmt: skip
    p.add_argument("--compilation-cache", default="runs/.xla_cache",
                   help="XLA's persistent compilation cache ('' for none)")  # fmt: skip
    return p.parse_args(argv)


def base_config(c: dict, out: Path, seed: int) -> hexp.RunConfig:
    """The RunConfig every candidate of one seed shares: no early stopping, final checkpoint."""
    opt = {k: c[k] for k in (*_RUN_KEYS, *_NOISE) if k in c}
    return hexp.RunConfig(**opt, method="robust", seed=seed, early_stopping=False,
                          output_dir=str(out / "runs" / f"seed{seed}"))  # fmt: skip


def name(cand: dict) -> str:
    """A candidate as text, e.g. ``robust D=0.25 head=1``."""
    rest = ", ".join(f"{k}={v:g}" for k, v in cand.items() if k not in ("method", "radius",
                                                                        "head_radius"))  # fmt: skip
    text = f"{cand.get('method', '?')} D={cand.get('radius', float('nan')):g}"
    if "head_radius" in cand:
        text += f" head={cand['head_radius']:g}"
    return text + (f" {rest}" if rest else "")


def _first_argmax(values) -> int:
    return int(np.argmax(np.asarray(values, float)))  # ties: the first in grid order


def _spearman(x, y) -> float | None:
    if len(x) < 3:
        return None
    rho = hexp.correlations(x, y)["spearman"]
    return None if rho != rho else float(rho)


def per_seed(selection: dict, seed: int) -> dict:
    """The three picks of one seed's select_by_bound table, and the bound's rank agreement."""
    table = selection["table"]
    column = selection.get("criterion_column", "bound")
    bounds = [r[column] for r in table]
    backward = [r["bound"] for r in table]
    val = [r["reported"]["val_accuracy"] for r in table]
    test = [r["reported"]["test_accuracy"] for r in table]
    loss = [r["reported"]["test_loss"] for r in table]
    noisy = [r["train_ce_noisy"] + float(np.sqrt(r["clip"])) * r["measure"] for r in table]
    idx = {"bound": int(np.argmin(bounds)), "backward_bound": int(np.argmin(backward)),
           "validation": _first_argmax(val),
           "oracle": _first_argmax(test), "noisy_ce_bound": int(np.argmin(noisy))}  # fmt: skip
    assert idx["bound"] == selection["chosen_index"], "select_by_bound chose another candidate"
    picks = {k: dict(index=i, candidate=table[i]["candidate"], name=name(table[i]["candidate"]),
                     test_accuracy=test[i], val_accuracy=val[i], bound=bounds[i])
             for k, i in idx.items()}  # fmt: skip
    candidates = [dict(candidate=r["candidate"], name=name(r["candidate"]), bound=r["bound"],
                       bound_positive=r.get("bound_positive", float("nan")),
                       train_loss_positive=r.get("train_loss_positive", float("nan")),
                       train_loss=r["train_loss"], measure=r["measure"], C=r["C"],
                       measure_term=float(np.sqrt(r["C"]) * r["measure"]),
                       train_ce_noisy=r["train_ce_noisy"], clip=r["clip"], noisy_ce_bound=nb,
                       measure_exact=r["measure_exact"], val_accuracy=v, test_accuracy=t,
                       test_loss=lo)
                  for r, v, t, lo, nb in zip(table, val, test, loss, noisy,
                                             strict=True)]  # fmt: skip
    return dict(
        seed=seed,
        criterion=column,
        picks=picks,
        val_ties=int(np.sum(np.asarray(val) == max(val))),
        spearman_bound_test_loss=_spearman(bounds, loss),
        spearman_bound_test_error=_spearman(bounds, [1 - t for t in test]),
        spearman_val_test_accuracy=_spearman(val, test),
        commit=selection.get("commit"),
        candidates=candidates,
    )


def _mean_std(x) -> dict:
    x = np.asarray(x, float)
    return dict(mean=float(x.mean()), std=float(x.std(ddof=1)) if len(x) > 1 else 0.0, n=len(x))


def summarize(seeds: list[dict], grid: list[dict]) -> dict:
    """Mean +- std of each pick's test accuracy, the paired differences, the pick counts."""
    if not seeds:
        return {}
    acc = {k: [s["picks"][k]["test_accuracy"] for s in seeds] for k in _PICKS}
    paired = {}
    pairs = (("bound", "validation"), ("bound", "oracle"), ("validation", "oracle"),
             ("backward_bound", "validation"), ("noisy_ce_bound", "validation"))  # fmt: skip
    for a, b in pairs:
        paired[f"{a}-{b}"] = (hexp.paired_difference(acc[a], acc[b]) if len(seeds) >= 2
                              else None)  # fmt: skip
    names = [name(c) for c in grid]
    counts = {k: {n: sum(s["picks"][k]["name"] == n for s in seeds) for n in names}
              for k in _PICKS}  # fmt: skip
    per_cand = []
    for i, n in enumerate(names):
        rows = [s["candidates"][i] for s in seeds]
        per_cand.append(dict(name=n, candidate=grid[i], **{
            f: _mean_std([r[f] for r in rows])["mean"]
            for f in ("bound", "bound_positive", "train_loss_positive", "train_loss", "measure",
                      "measure_term", "C", "val_accuracy",
                      "test_accuracy", "test_loss", "train_ce_noisy", "clip",
                      "noisy_ce_bound")}))  # fmt: skip
    rho = {f: [s[f] for s in seeds if s[f] is not None]
           for f in ("spearman_bound_test_loss", "spearman_bound_test_error",
                     "spearman_val_test_accuracy")}  # fmt: skip
    d = paired["bound-validation"]
    return dict(
        seeds=[s["seed"] for s in seeds],
        test_accuracy={k: _mean_std(v) for k, v in acc.items()},
        paired=paired,
        counts=counts,
        per_candidate=per_cand,
        spearman={f: dict(_mean_std(v) if v else {}, per_seed=v) for f, v in rho.items()},
        target="bound-selected within 1 point of validation-selected on average",
        target_reached_estimate=None if d is None else bool(d["mean"] >= -0.01),
        target_reached_interval=None if d is None else bool(d["low"] >= -0.01),
    )


def table(seeds: list[dict], summary: dict) -> str:
    """Markdown: per seed the three picks, then the summary and the per-candidate means."""
    if not seeds:
        return "(no finished seed)"
    lines = ["| seed | bound-selected | test % | validation-selected | test % | "
             "oracle (test; reference only) | test % | Spearman bound vs test loss / error |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in seeds:
        p = s["picks"]
        rho = [s["spearman_bound_test_loss"], s["spearman_bound_test_error"]]
        rho = " / ".join("-" if r is None else f"{r:+.2f}" for r in rho)
        lines.append(f"| {s['seed']} | {p['bound']['name']} | "
                     f"{100 * p['bound']['test_accuracy']:.1f} | {p['validation']['name']} | "
                     f"{100 * p['validation']['test_accuracy']:.1f} | {p['oracle']['name']} | "
                     f"{100 * p['oracle']['test_accuracy']:.1f} | {rho} |")  # fmt: skip
    ta = summary["test_accuracy"]
    lines += ["", "| pick | clean test accuracy % (mean +- std) | seeds |", "|---|---|---|"]
    for k, label in (("bound", "bound-selected (training data only; positive part)"),
                     ("backward_bound", "bound of the backward-corrected loss (the paper's)"),
                     ("validation", "validation-selected (clean val)"),
                     ("oracle", "oracle, test-selected (REFERENCE ONLY)"),
                     ("noisy_ce_bound", "diagnostic: noisy-CE bound (no criterion)")):  # fmt: skip
        lines.append(f"| {label} | {100 * ta[k]['mean']:.1f} +- {100 * ta[k]['std']:.1f} | "
                     f"{ta[k]['n']} |")  # fmt: skip
    lines += ["", "| paired by seed | mean (points) | 95% t interval | n |", "|---|---|---|---|"]
    for key, d in summary["paired"].items():
        if d is not None:
            ci = f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
            lines.append(f"| {key} | {100 * d['mean']:+.1f} | {ci} | {d['n']} |")
    lines += ["", "| candidate | bound (positive part) | its train loss | bound (backward) | "
              "train loss (backward) | sqrt(C) x measure | measure | "
              "val % | test % | noisy-CE bound (diagnostic) | "
              "picked by bound / backward bound / val / oracle / noisy-CE bound |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    cnt = summary["counts"]
    for r in summary["per_candidate"]:
        n = r["name"]
        picked = " / ".join(str(cnt[k][n]) for k in _PICKS)
        lines.append(f"| {n} | {r['bound_positive']:.3g} | {r['train_loss_positive']:.3f} | "
                     f"{r['bound']:.3g} | {r['train_loss']:.3f} | "
                     f"{r['measure_term']:.3g} | {r['measure']:.3g} | "
                     f"{100 * r['val_accuracy']:.1f} | {100 * r['test_accuracy']:.1f} | "
                     f"{r['noisy_ce_bound']:.3g} | {picked} |")  # fmt: skip
    return "\n".join(lines)


def _finished(path: Path, grid: list[dict]) -> dict | None:
    """A seed's select.json if it holds exactly this grid (else None: not finished)."""
    try:
        sel = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return sel if [r["candidate"] for r in sel["table"]] == grid else None


def main(argv=None) -> dict:
    """Run the comparison; return the metrics (also written to ``<out>/metrics.json``)."""
    args = parse_args(argv)
    if args.compilation_cache:
        hexp.use_compilation_cache(args.compilation_cache)
    c = dict(PRESETS[args.preset])
    if args.seeds:
        c["seeds"] = args.seeds
    if args.grid is not None:
        c["grid"] = [dict(g) for g in args.grid]
    grid = c["grid"]
    out = args.out or Path("experiments/results") / f"bound_selection_{args.preset}"
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    measure_options = {k: c[k] for k in ("num_iters", "chunk_size", "layers")}
    config = dict(preset=args.preset, settings=c, seeds=c["seeds"], grid=grid,
                  transition=dict(type=c["transition"], assumed_rate=c["assumed_rate"],
                                  note="symmetric T at the TRUE noise rate: T assumed known"),
                  measure_options=measure_options, early_stopping=False,
                  command=command, commit=hexp.git_commit())  # fmt: skip
    if not args.summary_only:  # config.json keeps the command and commit that trained
        hexp.write_json(out / "config.json", config)
    t_start = time.perf_counter()
    seeds, missing, seconds = [], [], {}
    for seed in c["seeds"]:
        cfg = base_config(c, out, seed)
        path = Path(cfg.output_dir) / "select.json"
        if args.summary_only:
            sel = _finished(path, grid)
            if sel is None:
                missing.append(seed)
                continue
        else:
            print(f"== seed {seed}: {len(grid)} candidates", flush=True)
            t0 = time.perf_counter()
            sel = hexp.select_by_bound(cfg, grid, progress=not args.no_progress,
                                       command=command, **measure_options)  # fmt: skip
            seconds[seed] = time.perf_counter() - t0
        seeds.append(per_seed(sel, seed))
    summary = summarize(seeds, grid)
    text = table(seeds, summary)
    (out / "table.md").write_text(text + "\n")
    wall = None if args.summary_only else time.perf_counter() - t_start
    metrics = dict(seeds=seeds, summary=summary, missing_seeds=missing,
                   partial=bool(missing), summary_only=args.summary_only,
                   seconds_per_seed=seconds, wall_seconds=wall)  # fmt: skip
    hexp.write_json(out / "metrics.json", metrics)
    print(text)
    return metrics


if __name__ == "__main__":
    main()
