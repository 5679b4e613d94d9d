"""Linear probe: do the imported ImageNet MobileNetV2 weights carry useful features?

Penultimate (global-pooled, 1280-d) features of torchvision's pretrained MobileNetV2 and of
the same network randomly initialised, on Fashion-MNIST images (resized, grey replicated to
RGB, ImageNet-normalised); a standardised logistic regression (C chosen on a clean validation
set) is fitted on each. Correctly imported weights give a clearly higher test accuracy.

The same is repeated with fewer labelled images per class (``--curve``), where pretrained
features matter most. Also records the ImageNet class the pretrained 1000-way head predicts
most often for each Fashion-MNIST class, and the jitted forward time of a batch of 32 images.

    .venv/bin/python experiments/linear_probe.py            # ~5 minutes on 2 CPU cores
    .venv/bin/python experiments/linear_probe.py --n-per-class 5 --n-test 50 --size 32 \
        --out /tmp/probe                                     # smoke run

Writes ``<out>/config.json`` and ``<out>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from hessjax.data import iterate_batches, load_splits, subsample_per_class
from hessjax.models import MobileNetV2, pretrained_mobilenet_v2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--n-per-class", type=int, default=300, help="training images per class")
    p.add_argument("--n-val", type=int, default=1000, help="validation images (choose C)")
    p.add_argument("--n-test", type=int, default=2000, help="test images")
    p.add_argument("--size", type=int, default=96, help="input height and width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--c-grid", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    p.add_argument(
        "--curve",
        type=int,
        nargs="*",
        default=[10, 30, 100],
        help="also probe with these smaller numbers of training images per class",
    )
    p.add_argument("--out", type=Path, default=Path("experiments/results/linear_probe"))
    return p.parse_args(argv)


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *OWN_PATHS],
            capture_output=True,
            text=True,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


OWN_PATHS = ("hessjax/models", "hessjax/data.py", "hessjax/_torch_pickle.py", __file__)
embed_fn = nnx.jit(lambda model, x: model.embed(x))


def embed(model, images: np.ndarray, batch_size: int, desc: str) -> np.ndarray:
    """Penultimate features in fixed-size batches (the last one zero-padded: one compile)."""
    out = []
    batches = iterate_batches(images, batch_size=batch_size, seed=None)
    for (x,) in tqdm(batches, total=-(-len(images) // batch_size), desc=desc, leave=False):
        n = len(x)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
        out.append(np.asarray(embed_fn(model, jnp.asarray(x)))[:n])
    return np.concatenate(out)


def probe(features, splits, c_grid, seed, subset=None):
    """Standardised multinomial logistic regression; C picked by validation accuracy."""
    train, val, test = features
    train_labels = splits.train_labels
    if subset is not None:
        train, train_labels = train[subset], train_labels[subset]
    scaler = StandardScaler().fit(train)
    train, val, test = (scaler.transform(f) for f in (train, val, test))
    best = None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        clf.fit(train, train_labels)
        val_acc = clf.score(val, splits.val_labels)
        if best is None or val_acc > best[1]:
            best = (c, val_acc, clf)
    c, val_acc, clf = best
    return {
        "C": c,
        "n_train": int(len(train_labels)),
        "val_accuracy": float(val_acc),
        "train_accuracy": float(clf.score(train, train_labels)),
        "test_accuracy": float(clf.score(test, splits.test_labels)),
    }


def forward_seconds(model, size: int, repeats: int = 5) -> float:
    """Median wall time of a jitted forward pass on a batch of 32 (after compilation)."""
    fn = nnx.jit(lambda m, x: m(x))
    x = jax.random.normal(jax.random.key(0), (32, size, size, 3))
    fn(model, x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(model, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    config["git_commit"] = git_commit()
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    start = time.perf_counter()
    splits = load_splits(
        args.dataset,
        seed=args.seed,
        val_size=args.n_val,
        n_per_class=args.n_per_class,
        test_size=args.n_test,
        image_size=args.size,
        imagenet=True,
    )
    images = (splits.train_images, splits.val_images, splits.test_images)
    models = {
        "pretrained": pretrained_mobilenet_v2(),  # keeps the 1000-way ImageNet head
        "random": MobileNetV2(1000, rngs=nnx.Rngs(args.seed)),
    }
    metrics: dict = {"seconds": {"data": time.perf_counter() - start}}
    features = {}
    for name, model in models.items():
        start = time.perf_counter()
        features[name] = [embed(model, x, args.batch_size, name) for x in images]
        metrics["seconds"][f"features_{name}"] = time.perf_counter() - start
        metrics[name] = probe(features[name], splits, args.c_grid, args.seed)
        print(f"{name}: {metrics[name]}", flush=True)

    # Learning curve: fewer labelled images per class (same val/test sets, seeded subsets).
    metrics["curve"] = {}
    for n in sorted(n for n in args.curve if n < args.n_per_class):
        subset = subsample_per_class(splits.train_labels, n, seed=args.seed)
        metrics["curve"][str(n)] = {
            name: probe(features[name], splits, args.c_grid, args.seed, subset)["test_accuracy"]
            for name in models
        }
        print(f"{n} per class: {metrics['curve'][str(n)]}", flush=True)

    # The pretrained ImageNet head on the test features: which ImageNet class per class?
    head = models["pretrained"].classifier[1]
    imagenet_pred = np.asarray(jnp.argmax(head(jnp.asarray(features["pretrained"][2])), -1))
    counts = np.bincount(imagenet_pred, minlength=1000)
    per_class = {}
    for c in range(splits.num_classes):
        pred = imagenet_pred[splits.test_labels == c]
        top = np.bincount(pred, minlength=1000).argmax()
        per_class[str(c)] = {"imagenet_class": int(top), "share": float((pred == top).mean())}
    metrics["imagenet_head_on_test"] = {
        "distinct_predicted_classes": int((counts > 0).sum()),
        "largest_class_share": float(counts.max() / counts.sum()),
        "logits_finite": bool(
            np.isfinite(np.asarray(head(jnp.asarray(features["pretrained"][2])))).all()
        ),
        "top_imagenet_class_per_label": per_class,
    }
    metrics["forward_seconds_per_batch32"] = {
        str(size): forward_seconds(models["pretrained"], size) for size in (32, 64)
    }
    metrics.update(
        dataset=args.dataset,
        resolution=args.size,
        n_train=int(len(splits.train_labels)),
        n_val=int(len(splits.val_labels)),
        n_test=int(len(splits.test_labels)),
        num_classes=splits.num_classes,
        seed=args.seed,
        accuracy_gain=metrics["pretrained"]["test_accuracy"] - metrics["random"]["test_accuracy"],
        command=config["command"],
        git_commit=config["git_commit"],
        jax_version=jax.__version__,
        device=str(jax.devices()[0]),
    )
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: metrics[k] for k in ("pretrained", "random", "accuracy_gain")}))
    return metrics


if __name__ == "__main__":
    main()
