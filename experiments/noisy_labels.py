"""Noisy labels: the paper's robust fine-tuning against ten other methods.

For every noise setting (symmetric 20/40/60/80% and pair-flip 40%) and seed, fine-tunes the
pretrained network with plain, early stopping, L2-SP, label smoothing, GCE, SCE, forward,
backward, constraint only, and the paper's algorithm with the known T (``robust``) and with T
estimated by Dual-T (``robust_dualt``); records the clean test accuracy and the Hessian
distance measure of every final model; reports mean +- std over seeds, the algorithm's
average gain over the best other method (the paper: +3.26%) and how much it reduces the
measure. The radius D of the constrained methods is chosen per noise setting on the CLEAN
validation set (first seed) from a small grid and reported; the noise rate rho of ``robust``
is the true one (T known), Dual-T estimates T from a plain fine-tuned model.

    .venv/bin/python experiments/noisy_labels.py                    # CPU default
    .venv/bin/python experiments/noisy_labels.py --preset cpu_digits  # second dataset
    .venv/bin/python experiments/noisy_labels.py --preset gpu       # full scale
    .venv/bin/python experiments/noisy_labels.py --preset smoke --out /tmp/nl   # seconds

Presets (``PRESETS``): ``cpu`` MobileNetV2 on Fashion-MNIST at 32x32, 20 images per class,
3 epochs, 3 seeds, measure over 8 examples (scaled down to fit ~90 minutes on 2 cores, an
estimate); ``cpu_digits`` scikit-learn digits with the tiny CNN (8x8); ``gpu`` 96x96, 100 per
class, 30 epochs with early stopping patience 5, 5 seeds, 64 examples. Writes config.json,
metrics.json, table.md and accuracy.png/measure.png into ``--out`` (default
``experiments/results/noisy_labels[_digits]``); runs are resumable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import hessjax.experiment as hexp

METHODS = ["plain", "plain_es", "l2sp", "label_smoothing", "gce", "sce", "forward", "backward",
           "constraint", "robust", "robust_dualt"]  # fmt: skip
CONSTRAINED = ("constraint", "robust", "robust_dualt")
NOISES = [("symmetric", 0.2), ("symmetric", 0.4), ("symmetric", 0.6), ("symmetric", 0.8),
          ("pair", 0.4)]  # fmt: skip
_BASE = dict(methods=METHODS, noises=NOISES, val_size=300, test_size=1000, batch_size=32,
             lr=1e-4, radius_scale=1.5, head_radius=2.0, num_iters=4, train_from=0)  # fmt: skip
PRESETS = {
    "smoke": _BASE | dict(dataset="digits", model="tiny_cnn", image_size=8, n_per_class=6,
                          epochs=2, seeds=[0], methods=["plain", "robust"],
                          noises=[("symmetric", 0.4)], radii=[0.1, 1.0], val_size=30,
                          test_size=60, batch_size=8, lr=1e-2, examples=4, num_iters=3),
    "cpu": _BASE | dict(dataset="fashion_mnist", model="mobilenet_v2", image_size=32,
                        train_from=14, n_per_class=30, epochs=10, seeds=[0, 1, 2],
                        radii=[0.5, 1.0], lr=1e-3, val_size=200, test_size=500, examples=16,
                        num_iters=4),
    "cpu_digits": _BASE | dict(dataset="digits", model="mobilenet_v2", image_size=32,
                               train_from=14, n_per_class=30, epochs=10, seeds=[0, 1, 2],
                               radii=[0.5, 1.0], lr=1e-3, val_size=200, test_size=360,
                               examples=16, num_iters=4,
                               noises=[("symmetric", 0.4), ("symmetric", 0.8), ("pair", 0.4)]),
    "gpu": _BASE | dict(dataset="fashion_mnist", model="mobilenet_v2", image_size=96,
                        n_per_class=100, epochs=30, seeds=[0, 1, 2, 3, 4],
                        radii=[0.25, 0.5, 1.0, 2.0], val_size=1000, test_size=5000,
                        examples=64, num_iters=8),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: a preset and the output folder."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--out", type=Path, default=None, help="default experiments/results/...")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: tabulate the finished runs (of a run cut short) and "
                   "list the missing ones")  # fmt: skip
    p.add_argument("--compilation-cache", default="runs/.xla_cache",
                   help="XLA's persistent compilation cache ('' for none)")  # fmt: skip
    return p.parse_args(argv)


def finetune(c: dict, out: Path, noise: tuple, method: str, seed: int, radius: float,
             progress: bool, summary_only: bool = False) -> dict:  # fmt: skip
    """One fine-tuning run through :func:`hessjax.experiment.finetune` (resumable).

    With ``summary_only`` nothing is trained: a finished run's results.json, else
    ``{"missing": output_dir}``.
    """
    from hessjax.experiment import RunConfig
    from hessjax.experiment import finetune as finetune_run

    kind, rate = noise
    cfg = RunConfig().to_dict() | dict(
        dataset=c["dataset"], model=c["model"], n_per_class=c["n_per_class"],
        val_size=c["val_size"], test_size=c["test_size"], image_size=c["image_size"],
        noise_type=kind, noise_rate=rate, epochs=c["epochs"], lr=c["lr"],
        batch_size=c["batch_size"], seed=seed, radius=radius, radius_scale=c["radius_scale"],
        head_radius=c["head_radius"], lr_decay_every=None,
        method="robust" if method == "robust_dualt" else method,
        transition="dual_t" if method == "robust_dualt" else "true",
        early_stopping=method == "plain_es" or c.get("early_stopping", False),
        train_from=c["train_from"],
        output_dir=str(out / "runs" / f"{kind}{rate}" / f"{method}_D{radius}_s{seed}"),
    )  # fmt: skip
    if summary_only:
        done = Path(cfg["output_dir"]) / "results.json"
        if not done.exists():
            return {"missing": cfg["output_dir"], "output_dir": cfg["output_dir"]}
        return json.loads(done.read_text()) | {"output_dir": cfg["output_dir"]}
    try:
        res = finetune_run(cfg, progress=progress)
    except ValueError as err:  # e.g. a Dual-T estimate of T that is not invertible
        if not str(err).startswith("transition:"):
            raise
        return {"error": str(err), "output_dir": cfg["output_dir"]}
    res["output_dir"] = cfg["output_dir"]
    return res


def main(argv=None) -> dict:
    """Run the experiment; return the metrics (also written to ``<out>/metrics.json``)."""
    from hessjax.experiment import measure_run

    args = parse_args(argv)
    if args.compilation_cache:
        hexp.use_compilation_cache(args.compilation_cache)
    c = PRESETS[args.preset]
    out = args.out or Path("experiments/results") / (
        "noisy_labels_digits" if args.preset == "cpu_digits" else "noisy_labels"
    )
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    config = dict(preset=args.preset, settings=c, seeds=c["seeds"],
                  command=" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                  commit=hexp.git_commit())  # fmt: skip
    if not args.summary_only:  # config.json keeps the command and commit that trained
        (out / "config.json").write_text(json.dumps(config, indent=2, default=list))
    t_start = time.perf_counter()
    chosen, selection, results, failures, missing = {}, {}, [], [], []
    run = lambda noise, method, seed, radius: finetune(
        c, out, noise, method, seed, radius, progress, args.summary_only
    )
    for noise in c["noises"]:
        key = f"{noise[0]}{noise[1]}"
        chosen[key], selection[key] = {}, {}
        for method in c["methods"]:
            radius = c["radii"][-1]
            if method in CONSTRAINED:  # choose D on clean validation accuracy, first seed
                runs = {r: run(noise, method, c["seeds"][0], r) for r in c["radii"]}
                val = {r: res.get("val_accuracy", float("nan")) for r, res in runs.items()}
                ok = {r: v for r, v in val.items() if v == v}
                radius = max(ok, key=ok.get) if ok else c["radii"][-1]
                selection[key][method] = {str(r): v for r, v in val.items()}
                chosen[key][method] = radius
            for seed in c["seeds"]:
                print(f"== {key} {method} seed {seed}", flush=True)
                res = run(noise, method, seed, radius)
                if "missing" in res:
                    missing.append(res["missing"])
                    continue
                if "error" in res:  # reported, not silently dropped
                    failures.append(dict(noise=key, method=method, seed=seed, radius=radius,
                                         error=res["error"]))  # fmt: skip
                    continue
                cache = Path(res["output_dir"]) / "measure.json"
                m = json.loads(cache.read_text()) if cache.exists() else {}
                wanted = (min(c["examples"], res["n_train"]), c["num_iters"])
                if (m.get("num_examples"), m.get("num_iters")) != wanted:  # not measured yet
                    if args.summary_only:
                        missing.append(res["output_dir"] + " (measure)")
                        continue
                    m = measure_run(res["output_dir"], num_examples=c["examples"],
                                    num_iters=c["num_iters"], seed=seed)  # fmt: skip
                    cache.write_text(json.dumps(m, indent=2))
                results.append(dict(noise=key, method=method, seed=seed, radius=radius,
                                    test_accuracy=res["test_accuracy"],
                                    val_accuracy=res["val_accuracy"], measure=m["measure"],
                                    gap=res["gap"]))  # fmt: skip
    summary = summarize(results, c)
    # a --summary-only pass trains nothing: its seconds are not the experiment's
    summary["wall_seconds"] = None if args.summary_only else time.perf_counter() - t_start
    summary["summary_only"] = args.summary_only
    rows = summary.pop("rows")
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    metrics = dict(results=results, rows=rows, chosen_radius=chosen, selection=selection,
                   summary=summary, failures=failures, missing=missing,
                   partial=bool(missing))  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots(rows, c, out)
    print(text)
    print(json.dumps(summary | {"chosen_radius": chosen}, indent=2))
    return metrics


def summarize(results: list[dict], c: dict) -> dict:
    """Mean +- std per (noise, method); the algorithm's gain and measure reduction."""
    rows, gains, reductions = [], {}, {}
    for noise in sorted({r["noise"] for r in results}):
        stats = {}
        for method in c["methods"]:
            sel = [r for r in results if r["noise"] == noise and r["method"] == method]
            if not sel:  # every seed failed (listed under "failures" in metrics.json)
                continue
            acc = np.array([r["test_accuracy"] for r in sel])
            mea = np.array([r["measure"] for r in sel])
            stats[method] = dict(noise=noise, method=method, acc_mean=float(acc.mean()),
                                 acc_std=float(acc.std()), measure_mean=float(mea.mean()),
                                 measure_std=float(mea.std()), seeds=len(sel))  # fmt: skip
            rows.append(stats[method])
        ours = [m for m in ("robust", "robust_dualt") if m in stats]
        others = [m for m in stats if m not in ours]
        if ours and others:
            best = max(others, key=lambda m: stats[m]["acc_mean"])
            gains[noise] = {m: stats[m]["acc_mean"] - stats[best]["acc_mean"] for m in ours}
            gains[noise]["best_other"] = best
            reductions[noise] = {
                m: {o: stats[o]["measure_mean"] / max(stats[m]["measure_mean"], 1e-30)
                    for o in others} for m in ours
            }  # fmt: skip
    ours = [m for m in ("robust", "robust_dualt") if any(m in g for g in gains.values())]
    avg = {m: float(np.mean([g[m] for g in gains.values() if m in g])) for m in ours}
    return dict(rows=rows, gain_over_best_other=gains, average_gain=avg,
                paper_average_gain=0.0326, measure_ratio_other_over_ours=reductions)  # fmt: skip


def table(rows: list[dict]) -> str:
    """Markdown: one row per (noise, method), accuracy and measure as mean +- std."""
    lines = ["| noise | method | clean test accuracy | Hessian measure | seeds |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['noise']} | {r['method']} | {100 * r['acc_mean']:.2f} +- "
                     f"{100 * r['acc_std']:.2f} | {r['measure_mean']:.4g} +- "
                     f"{r['measure_std']:.2g} | {r['seeds']} |")  # fmt: skip
    return "\n".join(lines)


def plots(rows: list[dict], c: dict, out: Path) -> None:
    """accuracy.png and measure.png: grouped bars per noise setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = sorted({r["noise"] for r in rows})
    methods = c["methods"]
    w = 0.8 / len(methods)
    for field, name, label in (("acc", "accuracy.png", "clean test accuracy"),
                               ("measure", "measure.png", "Hessian distance measure")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(noises)), 4))
        for j, m in enumerate(methods):
            nan = {f"{field}_mean": np.nan, f"{field}_std": np.nan}  # a method not run (yet)
            sel = [next((r for r in rows if r["noise"] == n and r["method"] == m), nan)
                   for n in noises]  # fmt: skip
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
