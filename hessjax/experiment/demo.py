"""The demo: plain fine-tuning vs the paper's algorithm under label noise, measured."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hessjax.experiment.config import DemoConfig, RunConfig
from hessjax.experiment.env import git_commit
from hessjax.experiment.runs import DEFAULT_CACHE, finetune, measure_run

__all__ = ["demo", "demo_table"]


def demo(
    config: DemoConfig | None = None, *, progress: bool = True, command: str | None = None
) -> dict[str, Any]:
    """Plain fine-tuning vs the paper's algorithm on noisy labels, then the measure and bound.

    Fine-tunes ``config.model`` twice on the same noisy training set (``plain``, and
    ``robust``: the layerwise Frobenius constraint with radii ``D * s^stage`` and head radius
    ``D_head`` plus backward correction with the true T), measures both
    (:func:`measure_run`), prints a table and writes ``demo.json`` and ``demo.png`` into
    ``config.output_dir``. Reruns resume (each run is a :func:`finetune` directory).

    Args:
      config: the demo's settings (default :class:`DemoConfig`).
      progress: progress bars / epoch lines.
      command: the command line recorded in ``demo.json`` (default: ``sys.argv``).

    Returns:
      The summary written to ``demo.json``.
    """
    import dataclasses

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_start = time.perf_counter()
    opts = DemoConfig() if config is None else config
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    d, s, dh = opts.radius, opts.radius_scale, opts.head_radius
    base = RunConfig(
        dataset=opts.dataset, data_dir=opts.data_dir, model=opts.model,
        n_per_class=opts.n_per_class, val_size=opts.val_size, test_size=opts.test_size,
        noise_rate=opts.noise_rate, noise_type="symmetric", epochs=opts.epochs, lr=opts.lr,
        batch_size=opts.batch_size, image_size=opts.image_size, seed=opts.seed,
        radius=d, radius_scale=s, head_radius=dh, transition="true", resume=True,
        lr_decay_every=10,  # the reference code's step decay (x0.1 every 10 epochs)
    ).to_dict()  # fmt: skip
    t0 = time.perf_counter()
    splits, _ = DEFAULT_CACHE.splits(base)
    t_data = time.perf_counter() - t0
    results, measures = {}, {}
    for method in ("plain", "robust"):
        run = dict(base, method=method, output_dir=str(out / method))
        print(f"== fine-tuning: {method}", flush=True)
        results[method] = finetune(run, progress=progress, splits=splits)
        print(f"== measuring: {method}", flush=True)
        measures[method] = measure_run(
            out / method,
            num_examples=opts.examples,
            num_iters=opts.num_iters,
            chunk_size=opts.chunk_size,
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
    table = demo_table(rows)
    m0 = measures["plain"]
    psd = " (PSD blocks: the value is v^T H v, checked at the maximisers)" * m0["psd_blocks"]
    note = (
        f"Fashion-MNIST, {opts.n_per_class}/class ({results['plain']['n_train']} train), "
        f"{opts.image_size}x{opts.image_size}, {int(100 * opts.noise_rate)}% symmetric label "
        f"noise (train only), {opts.epochs} epochs, Adam lr {opts.lr}, batch {opts.batch_size}. "
        f"Robust = layerwise Frobenius constraint (D={d}, s={s}, D_head={dh}) + backward "
        f"correction with the true symmetric T. Loss = cross-entropy; train loss on the noisy "
        f"training labels, test loss on clean labels. Measure over {m0['layers']} "
        f"({m0['num_layers']} layers), max over {m0['num_examples']} of {m0['n']} training "
        f"examples, {m0['num_iters']} Lanczos steps{psd}; bound = train loss + sqrt(C) * measure "
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
        "options": dataclasses.asdict(opts),
        "command": command if command is not None else " ".join(["hessjax", *sys.argv[1:]]),
        "commit": git_commit(),
        "seed": opts.seed,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def demo_table(rows: list[dict]) -> str:
    """The demo's result rows as a fixed-width text table."""
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
