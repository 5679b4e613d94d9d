"""Noisy labels under the reference protocol: the paper's algorithm, its variants, 8 baselines.

Protocol (:mod:`hessjax.experiment.protocol`): EVERY method is trained by the same loop and
optimizer (Adam, step decay x0.1 every ``lr_decay_every`` epochs), evaluated on the CLEAN
validation set each epoch, keeps its best-validation checkpoint and stops after ``patience``
epochs without improvement; each method's own hyperparameters (L2-SP lambda, smoothing, GCE q,
SCE alpha/beta, rho of the assumed symmetric T, body radius D and head radius) are chosen on
clean validation accuracy on the tuning seed from :data:`hessjax.experiment.GRIDS` (>= 4 values
each, one coordinate at a time, ``passes`` sweeps at most (default 1; a sweep that changes
nothing ends it); a choice at an end of its grid widens it, up to ``widen`` more
values), then run on fresh seeds; the test accuracy reported is the
best-validation checkpoint's. Methods: plain, l2sp, label_smoothing, gce, sce, forward,
backward (T symmetric at the tuned rho), constraint, ``robust`` (the paper's algorithm:
layerwise constraint + backward correction at the tuned rho) and ``robust_dualt`` (T by
Dual-T); the same constraint composed with other losses (``robust_clipped``: backward
correction with pinv(T)'s negative weights clipped, ``robust_forward``, ``robust_gce``,
``robust_sce``; :mod:`hessjax.train.methods`). Reported: clean test accuracy mean +- std over
the seeds, the paired (by seed) difference of each of hessjax's methods to the best baseline
with a 95% t interval (the paper: +3.26 points), the Hessian distance measure of every
reported model (all fine-tuned layers, max over ``examples`` training examples, None = all)
and its ratios to plain and to the algorithm.

    .venv/bin/python experiments/noisy_labels.py                      # cpu_partial
    .venv/bin/python experiments/noisy_labels.py --noises symmetric0.4  # one setting
    .venv/bin/python experiments/noisy_labels.py --preset cpu_image_full | cpu_text
    .venv/bin/python experiments/noisy_labels.py --preset gpu | gpu_text
    .venv/bin/python experiments/noisy_labels.py --preset smoke --out /tmp/nl   # seconds

Presets (``PRESETS``): ``cpu_partial`` (alias ``cpu``; the cheap regime) MobileNetV2 blocks
14-18 + head on Fashion-MNIST 32x32, 30 noisy images per class; ``cpu_image_full`` every layer
at 64x64, 50 per class; ``cpu_text`` all of MiniLM on 500 Amazon reviews; ``gpu`` every layer at
96x96, 100 per class, 30 epochs, patience 10; ``gpu_text`` 1000 reviews. Writes config.json,
metrics.json, table.md, accuracy.png and measure.png into ``--out`` (default
``experiments/results/noisy_labels_<preset>``); runs are resumable (one directory per
configuration; finished runs and measures are reused), ``--summary-only`` tabulates what is
finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import hessjax.experiment as hexp

METHODS = ["plain", "l2sp", "label_smoothing", "gce", "sce", "forward", "backward",
           "constraint", "robust", "robust_dualt", "robust_clipped", "robust_forward",
           "robust_gce", "robust_sce"]  # fmt: skip
# hessjax's methods (the paper's algorithm and the constraint composed with other losses,
# issue 16); every other method is a baseline, and each of these is compared with the best
OURS = ("robust", "robust_dualt", "robust_clipped", "robust_forward", "robust_gce", "robust_sce")
NOISES = [("symmetric", 0.2), ("symmetric", 0.4), ("symmetric", 0.6), ("symmetric", 0.8),
          ("pair", 0.4)]  # fmt: skip
_BASE = dict(methods=METHODS, noises=NOISES, batch_size=32, lr_decay_every=10, radius_scale=1.5,
             tune_seed=0, seeds=[1, 2, 3, 4, 5], grids=None, widen=2, passes=1, layers=None,
             chunk_size=1)  # fmt: skip
_MOBILE = _BASE | dict(dataset="fashion_mnist", model="mobilenet_v2")
# The text tasks have k = 2 classes: a symmetric T is singular at rho = (k-1)/k = 0.5 and
# inverts the labels above it, so the assumed rates of GRIDS (0.1-0.7, for k = 10) become
# 0.1-0.4 there.
_TEXT_GRIDS = {m: {k: ((0.1, 0.2, 0.3, 0.4) if k == "assumed_rate" else v) for k, v in g.items()}
               for m, g in hexp.GRIDS.items()}  # fmt: skip
PRESETS = {
    "smoke": _BASE | dict(dataset="digits", model="tiny_cnn", image_size=8, train_from=0,
                          n_per_class=6, val_size=30, test_size=60, batch_size=8, lr=1e-2,
                          epochs=3, patience=2, seeds=[1, 2], methods=["plain", "robust"],
                          noises=[("symmetric", 0.4)], examples=4, num_iters=3,
                          grids={"plain": {}, "robust": {"radius": (0.1, 1.0)}}, widen=1),
    # the cheap regime: partial fine-tuning; patience 5 (the reference: 10) to fit the CPU,
    # the best epoch is 1-3 here
    "cpu_partial": _MOBILE | dict(image_size=32, train_from=14, n_per_class=30, val_size=200,
                                  test_size=500, lr=1e-3, epochs=20, patience=5,
                                  examples=None, num_iters=4),
    # every layer at 64x64 (defined; not run on the 2-core CPU in this session)
    "cpu_image_full": _MOBILE | dict(image_size=64, train_from=0, n_per_class=50,
                                     val_size=200, test_size=500, lr=1e-4, epochs=15,
                                     patience=5, examples=None, num_iters=8, layers="kernel"),
    "cpu_text": _BASE | dict(dataset="amazon_reviews:64", model="minilm", image_size=32,
                             train_from=0, n_per_class=250, val_size=200, test_size=500,
                             optimizer="adamw", lr=2e-5, batch_size=16, epochs=6, patience=3,
                             noises=[("symmetric", 0.2), ("symmetric", 0.4)], examples=32,
                             num_iters=4, grids=_TEXT_GRIDS),
    "gpu": _MOBILE | dict(image_size=96, train_from=0, n_per_class=100, val_size=1000,
                          test_size=5000, lr=1e-4, epochs=30, patience=10, examples=None,
                          num_iters=8, layers="kernel"),
    "gpu_text": _BASE | dict(dataset="amazon_reviews:128", model="minilm", image_size=32,
                             train_from=0, n_per_class=500, val_size=500, test_size=1000,
                             optimizer="adamw", lr=2e-5, batch_size=16, epochs=20,
                             patience=10, noises=[("symmetric", 0.2), ("symmetric", 0.4)],
                             examples=None, num_iters=8, grids=_TEXT_GRIDS),
}  # fmt: skip
PRESETS["cpu"] = PRESETS["cpu_partial"]


# what each result keeps of its measure.json (loss_bound_C: the largest training loss)
_MEASURED = ("num_examples", "num_iters", "num_layers", "layers", "train_loss", "test_loss",
             "gap", "loss_bound_C")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: a preset, the noise settings and the output folder."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu_partial", choices=sorted(PRESETS))
    p.add_argument("--noises", nargs="+", default=None,
                   help="e.g. symmetric0.4 pair0.4 (default: the preset's)")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=None, help="default: the preset's")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="the reported seeds (default: the preset's; a reduction is recorded "
                   "in config.json)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="default experiments/results/...")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="train nothing: tabulate the finished runs and list the missing ones",
    )
    p.add_argument(
        "--skip-measure",
        action="store_true",
        help="fine-tune and tabulate accuracy only (measures not yet taken: NaN)",
    )
    p.add_argument("--grids", type=json.loads, default=None,
                   help="JSON {method: {name: [values]}} replacing those methods' grids (a "
                   "reduction; recorded in config.json)")  # fmt: skip
    p.add_argument("--widen", type=int, default=None,
                   help="grid extensions per hyperparameter (default: the preset's)")  # fmt: skip
    p.add_argument("--passes", type=int, default=None,
                   help="sweeps of the coordinate search, repeated until one changes nothing "
                   "(default: the preset's, 1)")  # fmt: skip
    p.add_argument("--compilation-cache", default="runs/.xla_cache",
                   help="XLA's persistent compilation cache ('' for none)")  # fmt: skip
    return p.parse_args(argv)


def _noise_name(noise) -> str:
    return f"{noise[0]}{noise[1]}"


def _parse_noise(text: str) -> tuple:
    for kind in ("symmetric", "pair", "uniform"):
        if text.startswith(kind):
            return (kind, float(text[len(kind) :]))
    raise SystemExit(f"--noises: expected e.g. symmetric0.4 or pair0.4, got {text!r}")


def run_config(c: dict, out: Path, noise: tuple, hp: dict, seed: int) -> dict:
    """The RunConfig fields of one (method, hyperparameters, seed): the protocol's options."""
    hp = dict(hp)
    method = hp.pop("method")
    name = "_".join(f"{k}{v}" for k, v in sorted(hp.items())) or "default"
    transition = "dual_t" if method == "robust_dualt" else "true"
    if "assumed_rate" in hp:
        transition = "symmetric"  # T symmetric at the tuned rho
    opt = {k: c[k] for k in ("dataset", "model", "n_per_class", "val_size", "test_size",
                             "image_size", "train_from", "epochs", "lr", "batch_size",
                             "lr_decay_every", "patience", "radius_scale") if k in c}  # fmt: skip
    return hexp.RunConfig().to_dict() | opt | hp | dict(
        noise_type=noise[0], noise_rate=noise[1], seed=seed, optimizer=c.get("optimizer", "adam"),
        method="robust" if method == "robust_dualt" else method, transition=transition,
        early_stopping=True,  # the protocol: every method
        output_dir=str(out / "runs" / _noise_name(noise) / method / f"{name}_s{seed}"),
    )  # fmt: skip


def make_run_fn(c: dict, out: Path, noise: tuple, progress: bool, summary_only: bool):
    """``run_fn(hparams, seed)`` for :func:`hessjax.experiment.tune_then_seeds`."""

    def run_fn(hp: dict, seed: int) -> dict:
        cfg = run_config(c, out, noise, hp, seed)
        if summary_only:
            done = Path(cfg["output_dir"]) / "results.json"
            if not done.exists():
                return {"missing": cfg["output_dir"], "output_dir": cfg["output_dir"]}
            return json.loads(done.read_text()) | {"output_dir": cfg["output_dir"]}
        print(f"== {_noise_name(noise)} {hp} seed {seed}", flush=True)
        try:
            res = hexp.finetune(cfg, progress=progress)
        except ValueError as err:  # e.g. a Dual-T estimate of T that is not invertible
            if not str(err).startswith("transition:"):
                raise
            return {"error": str(err), "output_dir": cfg["output_dir"]}
        return dict(res, output_dir=cfg["output_dir"])

    return run_fn


def measure(c: dict, res: dict, seed: int, summary_only: bool) -> dict | None:
    """The run's Hessian distance measure (cached in its measure.json); None if not taken."""
    cache = Path(res["output_dir"]) / "measure.json"
    m = json.loads(cache.read_text()) if cache.exists() else {}
    n = res["n_train"]
    wanted = (n if c["examples"] is None else min(c["examples"], n), c["num_iters"], c["layers"])
    if (m.get("num_examples"), m.get("num_iters"), m.get("layers_option")) == wanted:
        return m
    if summary_only:
        return None
    m = hexp.measure_run(res["output_dir"], num_examples=c["examples"],
                         num_iters=c["num_iters"], layers=c["layers"], seed=seed,
                         chunk_size=c["chunk_size"])  # fmt: skip
    m["layers_option"] = c["layers"]
    hexp.write_json(cache, m)
    return m


def main(argv=None) -> dict:
    """Run the experiment; return the metrics (also written to ``<out>/metrics.json``)."""
    args = parse_args(argv)
    if args.compilation_cache:
        hexp.use_compilation_cache(args.compilation_cache)
    c = dict(PRESETS[args.preset])
    if args.noises:
        c["noises"] = [_parse_noise(t) for t in args.noises]
    if args.methods:
        c["methods"] = args.methods
    if args.seeds:
        c["seeds"] = args.seeds
    grids = dict(c["grids"] or hexp.GRIDS)
    if args.grids:
        grids |= {m: {k: tuple(v) for k, v in g.items()} for m, g in args.grids.items()}
    if args.widen is not None:
        c["widen"] = args.widen
    if args.passes is not None:
        c["passes"] = args.passes
    out = args.out or Path("experiments/results") / f"noisy_labels_{args.preset}"
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    config = dict(preset=args.preset, settings=c | {"grids": grids}, seeds=c["seeds"],
                  tune_seed=c["tune_seed"],
                  command=" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                  commit=hexp.git_commit())  # fmt: skip
    if not args.summary_only:  # config.json keeps the command and commit that trained
        hexp.write_json(out / "config.json", config)
    t_start = time.perf_counter()
    results, protocol, failures, missing = [], {}, [], []
    for noise in c["noises"]:
        key = _noise_name(noise)
        run_fn = make_run_fn(c, out, noise, progress, args.summary_only)
        tuned = hexp.tune_then_seeds(run_fn, c["methods"], tune_seed=c["tune_seed"],
                                     seeds=c["seeds"], grids=grids, widen=c["widen"],
                                     passes=c["passes"])  # fmt: skip
        protocol[key] = {m: {k: v for k, v in t.items() if k != "runs"} for m, t in tuned.items()}
        for method, t in tuned.items():
            unfinished = [
                tr
                for tr in t["trials"]
                if tr["val_accuracy"] != tr["val_accuracy"] and "error" not in tr
            ]
            missing += [tr["hparams"] | {"method": method, "noise": key} for tr in unfinished]
            for seed, res in t["runs"].items():
                if "missing" in res:
                    missing.append(res["missing"])
                    continue
                if "error" in res:  # reported, not silently dropped
                    failures.append(dict(noise=key, method=method, seed=seed, error=res["error"]))
                    continue
                m = measure(c, res, seed, args.summary_only or args.skip_measure)
                if m is None and args.skip_measure:
                    m = dict.fromkeys(_MEASURED, None) | {"measure": float("nan")}
                elif m is None:
                    missing.append(res["output_dir"] + " (measure)")
                    continue
                results.append(dict(noise=key, method=method, seed=seed, hparams=t["chosen"],
                                    test_accuracy=res["test_accuracy"],
                                    val_accuracy=res["val_accuracy"],
                                    best_epoch=res["best_epoch"], stopped=res["stopped"],
                                    measure=m["measure"],
                                    **{k: m[k] for k in _MEASURED}))  # fmt: skip
    summary = summarize(results, c, protocol)
    summary["wall_seconds"] = None if args.summary_only else time.perf_counter() - t_start
    summary["summary_only"] = args.summary_only
    text = table(summary["rows"], summary["comparison"])
    (out / "table.md").write_text(text + "\n")
    metrics = dict(results=results, protocol=protocol, summary=summary, failures=failures,
                   missing=missing, partial=bool(missing) or args.skip_measure)  # fmt: skip
    hexp.write_json(out / "metrics.json", metrics)
    plots(summary["rows"], c, out)
    print(text)
    return metrics


def summarize(results: list[dict], c: dict, protocol: dict) -> dict:
    """Mean +- std per (noise, method); the algorithm vs the best other; measure ratios."""
    rows, comparison = [], {}
    for noise in sorted({r["noise"] for r in results}):
        per = {m: [r for r in results if r["noise"] == noise and r["method"] == m]
               for m in c["methods"]}  # fmt: skip
        per = {m: sorted(v, key=lambda r: r["seed"]) for m, v in per.items() if v}
        stats = {}
        for m, sel in per.items():
            acc = np.array([r["test_accuracy"] for r in sel])
            mea = np.array([r["measure"] for r in sel])
            stats[m] = dict(noise=noise, method=m, hparams=protocol[noise][m]["chosen"],
                            edges=protocol[noise][m]["edges"], acc_mean=float(acc.mean()),
                            acc_std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                            measure_mean=float(mea.mean()), measure_std=float(mea.std()),
                            seeds=len(sel))  # fmt: skip
        if "plain" in stats:
            for s in stats.values():
                s["measure_over_plain"] = s["measure_mean"] / max(stats["plain"]["measure_mean"],
                                                                  1e-30)  # fmt: skip
        rows += list(stats.values())
        ours = [m for m in OURS if m in stats]
        others = [m for m in stats if m not in OURS]
        if not (ours and others):
            continue
        best = max(others, key=lambda m: stats[m]["acc_mean"])  # best by mean test accuracy
        comparison[noise] = {"best_other": best}
        for m in ours:
            a = {r["seed"]: r["test_accuracy"] for r in per[m]}
            b = {r["seed"]: r["test_accuracy"] for r in per[best]}
            common = sorted(set(a) & set(b))
            diff = (hexp.paired_difference([a[s] for s in common], [b[s] for s in common])
                    if len(common) >= 2 else None)  # fmt: skip
            comparison[noise][m] = dict(
                gain=stats[m]["acc_mean"] - stats[best]["acc_mean"], paired=diff,
                measure_other_over_ours={o: stats[o]["measure_mean"]
                                         / max(stats[m]["measure_mean"], 1e-30) for o in others},
            )  # fmt: skip
    avg = {m: float(np.mean([v[m]["gain"] for v in comparison.values() if m in v]))
           for m in OURS if any(m in v for v in comparison.values())}  # fmt: skip
    return dict(rows=rows, comparison=comparison, average_gain=avg, paper_average_gain=0.0326,
                paper_measure_reduction=6.0)  # fmt: skip


def _hp(h: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in h.items()) or "-"


def table(rows: list[dict], comparison: dict) -> str:
    """Markdown: one row per (noise, method), then the algorithm vs the best other."""
    lines = ["| noise | method | chosen (clean val, tuning seed) | clean test accuracy % | "
             "Hessian measure | measure / plain | seeds |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['noise']} | {r['method']} | {_hp(r['hparams'])} | "
                     f"{100 * r['acc_mean']:.1f} +- {100 * r['acc_std']:.1f} | "
                     f"{r['measure_mean']:.3g} +- {r['measure_std']:.2g} | "
                     f"{r.get('measure_over_plain', np.nan):.2f} | {r['seeds']} |")  # fmt: skip
    lines += ["", "| noise | ours | best other | gain (points) | paired diff, 95% CI | "
              "other/ours measure (min-max) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for noise, comp in comparison.items():
        for m in OURS:
            if m not in comp:
                continue
            v, p = comp[m], comp[m]["paired"]
            ci = f"[{100 * p['low']:.1f}, {100 * p['high']:.1f}]" if p else "-"
            ratios = list(v["measure_other_over_ours"].values())
            lines.append(f"| {noise} | {m} | {comp['best_other']} | {100 * v['gain']:+.1f} | "
                         f"{ci} | {min(ratios):.2f}-{max(ratios):.2f} |")  # fmt: skip
    return "\n".join(lines)


def plots(rows: list[dict], c: dict, out: Path) -> None:
    """accuracy.png and measure.png: grouped bars per noise setting (a figure with no value,
    e.g. the measure under ``--skip-measure``, is not drawn, and a stale one is removed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = sorted({r["noise"] for r in rows})
    methods = c["methods"]
    w = 0.8 / len(methods)
    for field, name, label in (("acc", "accuracy.png", "clean test accuracy"),
                               ("measure", "measure.png", "Hessian distance measure")):  # fmt: skip
        nan = {f"{field}_mean": np.nan, f"{field}_std": np.nan}  # a method not run (yet)
        cells = {m: [next((r for r in rows if r["noise"] == n and r["method"] == m), nan)
                     for n in noises] for m in methods}  # fmt: skip
        if not np.isfinite([r[f"{field}_mean"] for sel in cells.values() for r in sel]).any():
            (out / name).unlink(missing_ok=True)
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(noises)), 4))
        for j, (m, sel) in enumerate(cells.items()):
            ax.bar(np.arange(len(noises)) + j * w, [r[f"{field}_mean"] for r in sel], w,
                   yerr=[r[f"{field}_std"] for r in sel], label=m,
                   color=plt.cm.tab20(j % 20))  # fmt: skip
        ax.set_xticks(np.arange(len(noises)) + 0.4 - w / 2, noises)
        ax.set(ylabel=label)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
