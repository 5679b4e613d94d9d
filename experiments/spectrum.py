"""Curvature spectra of the pretrained and the fine-tuned network.

Fine-tunes the pretrained network once (plain, through :func:`hessjax.experiment.finetune`), then
for the anchor (pretrained weights, new zero head) and the fine-tuned weights computes, on a
batch of training examples with the model in eval mode:
per-layer traces ``max_x Tr[H_i^+]`` and ``mean_x Tr[H_i^+]`` (:func:`hessjax.layer_traces`),
the top eigenvalues of each layer's diagonal block of the batch-loss Hessian
(:func:`hessjax.estimators.eigenvalues` over :func:`hessjax.hessian.block_hvp_fn`) and the
spectral density of the full batch-loss Hessian (:func:`hessjax.estimators.spectral_density`).

    .venv/bin/python experiments/spectrum.py                      # CPU default
    .venv/bin/python experiments/spectrum.py --preset gpu         # full scale
    .venv/bin/python experiments/spectrum.py --preset smoke --out /tmp/sp   # seconds

Presets (``PRESETS``): ``cpu`` MobileNetV2 on clean Fashion-MNIST at 32x32, 50 per class,
5 epochs, 32 examples, 4 trace probes, top-5 eigenvalues, 8 density probes of 32 Lanczos
steps (well within ~90 minutes on 2 cores, an estimate); ``gpu`` 96x96, 100 per class, 30
epochs, 256 examples, 32 probes, 80 steps; ``smoke`` digits + tiny_cnn. Writes config.json,
metrics.json, table.md, traces.png, eigenvalues.png and density.png into ``--out`` (default
``experiments/results/spectrum``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import hessjax.experiment as hexp

PRESETS = {
    "smoke": dict(dataset="digits", model="tiny_cnn", image_size=8, n_per_class=6, epochs=2,
                  val_size=30, test_size=60, batch_size=8, lr=1e-2, examples=4, trace_probes=2,
                  num_iters=4, top_k=2, density_probes=2, density_iters=8),
    "cpu": dict(dataset="fashion_mnist", model="mobilenet_v2", image_size=32, n_per_class=50,
                epochs=5, val_size=300, test_size=1000, batch_size=32, lr=1e-4, examples=32,
                trace_probes=4, num_iters=8, top_k=5, density_probes=8, density_iters=32),
    "gpu": dict(dataset="fashion_mnist", model="mobilenet_v2", image_size=96, n_per_class=100,
                epochs=30, val_size=1000, test_size=5000, batch_size=32, lr=1e-4,
                examples=256, trace_probes=32, num_iters=16, top_k=10, density_probes=32,
                density_iters=80),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: a preset, the output folder, the seed, optional layers."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--out", type=Path, default=Path("experiments/results/spectrum"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default=None, help="regex of kernels (default as hessjax measure)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def curvature(run_dir: Path, checkpoint: str, c: dict, seed: int, layers: str | None) -> dict:
    """Per-layer traces, per-layer top eigenvalues and the full spectral density of one model."""
    import jax
    import jax.numpy as jnp

    from hessjax.estimators import eigenvalues, spectral_density
    from hessjax.experiment import load_run
    from hessjax.hessian import block_hvp_fn, hvp_fn
    from hessjax.measures import layer_traces

    r = load_run(run_dir, checkpoint=checkpoint, layers=layers)
    n = len(r.splits.train_labels)
    idx = np.random.default_rng(seed).permutation(n)[: c["examples"]]
    batch = (jnp.asarray(r.splits.train_images[idx]), jnp.asarray(r.splits.train_labels[idx]))

    def batch_loss(p, b):
        return jnp.mean(jax.vmap(lambda x, y: r.example_loss(p, (x, y)))(*b))

    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    t0 = time.perf_counter()
    tr = layer_traces(r.example_loss, r.params, batch, k1, partition=r.partition,
                      num_probes=c["trace_probes"], num_iters=c["num_iters"],
                      chunk_size=1)  # fmt: skip
    block = block_hvp_fn(batch_loss, r.params, r.partition, batch)
    top = eigenvalues(block, r.params, k2, k=c["top_k"], partition=r.partition)
    sd = spectral_density(hvp_fn(batch_loss, r.params, batch), r.params, k3,
                          num_probes=c["density_probes"], num_iters=c["density_iters"],
                          num_grid=400)  # fmt: skip
    return dict(layers=list(r.partition.names), max_trace=np.asarray(tr.max).tolist(),
                mean_trace=np.asarray(tr.mean).tolist(), top_eigenvalues=np.asarray(top).tolist(),
                density_grid=np.asarray(sd.grid).tolist(),
                density=np.asarray(sd.density).tolist(),
                seconds=time.perf_counter() - t0)  # fmt: skip


def plots(res: dict, out: Path) -> None:
    """traces.png, eigenvalues.png and density.png for both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = res["pretrained"]["layers"]
    x = np.arange(len(names))
    kinds = (("max_trace", "traces.png", "max_x Tr[H_i^+]"),
             ("top_eigenvalues", "eigenvalues.png", "top eigenvalue"))  # fmt: skip
    for field, fname, ylabel in kinds:
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names)), 4))
        for j, model in enumerate(("pretrained", "finetuned")):
            vals = np.asarray(res[model][field], dtype=float)
            vals = vals[:, 0] if vals.ndim == 2 else vals
            ax.bar(x + 0.4 * j, np.abs(vals) + 1e-30, 0.4, label=model)
        ax.set_yscale("log")
        ax.set_xticks(x + 0.2, names, rotation=90, fontsize=6)
        ax.set(ylabel=ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for model in ("pretrained", "finetuned"):
        ax.semilogy(res[model]["density_grid"], np.asarray(res[model]["density"]) + 1e-12,
                    label=model)  # fmt: skip
    ax.set(xlabel="eigenvalue", ylabel="density (SLQ, broadened)", title="Hessian spectrum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "density.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run the experiment; return the metrics (also written to ``<out>/metrics.json``)."""
    from hessjax.experiment import RunConfig, finetune

    args = parse_args(argv)
    c = PRESETS[args.preset]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    config = dict(preset=args.preset, settings=c, seed=args.seed, layers=args.layers,
                  command=" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                  commit=hexp.git_commit())  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    run_dir = out / "run"
    cfg = RunConfig().to_dict() | dict(
        dataset=c["dataset"], model=c["model"], n_per_class=c["n_per_class"],
        val_size=c["val_size"], test_size=c["test_size"], image_size=c["image_size"],
        noise_rate=0.0, epochs=c["epochs"], lr=c["lr"], batch_size=c["batch_size"],
        seed=args.seed, method="plain", lr_decay_every=None, output_dir=str(run_dir),
    )  # fmt: skip
    fit = finetune(cfg, progress=not args.no_progress)
    res = {"fit": {k: v for k, v in fit.items() if k != "history"}}
    for model, ckpt in (("pretrained", "anchor"), ("finetuned", "final")):
        print(f"== curvature: {model}", flush=True)
        res[model] = curvature(run_dir, ckpt, c, args.seed, args.layers)
    lines = ["| layer | max Tr H+ (pre) | max Tr H+ (ft) | top eig (pre) | top eig (ft) |",
             "|---|---|---|---|---|"]  # fmt: skip
    pre, ft = res["pretrained"], res["finetuned"]
    for i, name in enumerate(pre["layers"]):
        top_pre, top_ft = pre["top_eigenvalues"][i][0], ft["top_eigenvalues"][i][0]
        lines.append(f"| {name} | {pre['max_trace'][i]:.4g} | {ft['max_trace'][i]:.4g} | "
                     f"{top_pre:.4g} | {top_ft:.4g} |")  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "metrics.json").write_text(json.dumps(res, indent=2))
    plots(res, out)
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
