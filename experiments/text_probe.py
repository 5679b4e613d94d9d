"""Text: do the imported MiniLM weights work? Linear probe and full fine-tuning on Amazon reviews.

All-MiniLM-L6-v2 (:func:`hessjax.bert_classifier`, mean pooling, zero head) against the same
architecture randomly initialised, on ``amazon_reviews`` (1000 training reviews, 500 per
class, with 0 % and 40 % symmetric label noise on the training labels only; clean 500
validation and the 1000 clean test reviews):

* linear probe: frozen mean-pooled features, a standardised logistic regression (C on a
  log grid 1e-4 .. 100, chosen on the clean validation set), reported as fitted on the
  balanced subsample and with its intercept corrected to the class prior of the clean
  validation set (65/35, the training file's), plus the test ROC AUC; the same probe on a
  tf-idf bag of the same WordPiece tokens is the baseline that needs no encoder;
* full fine-tuning: :func:`hessjax.train.fit` with the ``plain`` method (AdamW, constant
  learning rate, batch 16, a few epochs, dropout 0.1), keeping the best clean-validation
  epoch; the test accuracy of that checkpoint is reported.

    nice -n 5 .venv/bin/python experiments/text_probe.py          # ~1 h on 2 CPU cores
    .venv/bin/python experiments/text_probe.py --only --out experiments/results/text_probe_linear
        # the probes alone (no fine-tuning): ~10 min
    .venv/bin/python experiments/text_probe.py --n-per-class 8 --max-length 16 --epochs 1 \
        --n-val 16 --out /tmp/text_probe                            # smoke run

Writes ``<out>/config.json`` and ``<out>/metrics.json`` (updated after every run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import scipy.sparse as sp
from scipy.special import log_expit, log_softmax
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from hessjax.data import load_splits
from hessjax.experiment import git_commit
from hessjax.models import bert_classifier
from hessjax.noise import symmetric_transition
from hessjax.train import TrainConfig, build_method, evaluate, fit, split_model

VOCAB_SIZE = 30522  # the BERT uncased WordPiece vocabulary of MiniLM


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-per-class", type=int, default=500)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.4])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--c-grid", type=float, nargs="+",
                   default=[float(c) for c in np.logspace(-4, 2, 13)])  # fmt: skip
    p.add_argument("--skip-finetune-random", action="store_true")
    p.add_argument("--skip-probe", action="store_true")
    p.add_argument("--only", nargs="*", default=None,
                   help="fine-tune only these runs, e.g. pretrained/0.4 random/0")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("experiments/results/text_probe"))
    return p.parse_args(argv)


def features(model, x, batch_size=64):
    _, geval, params, rest = split_model(model)
    from flax import nnx

    fn = jax.jit(lambda p, r, xb: nnx.merge(geval, p, r).features(xb))
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        pad = batch_size - len(xb)
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)]) if pad else xb
        out.append(np.asarray(fn(params, rest, xb))[: batch_size - pad])
    return np.concatenate(out)


def bag_of_wordpieces(x, vocab_size):
    """Sparse counts ``(n, vocab)`` of the token ids under the attention mask, without the
    special tokens ([PAD] 0, [CLS] 101, [SEP] 102 in the BERT vocabulary)."""
    ids = np.where(x[:, 1] > 0, x[:, 0], 0)
    ids = np.where(np.isin(ids, (101, 102)), 0, ids)
    rows = np.repeat(np.arange(len(x)), x.shape[2])
    m = sp.csr_matrix((np.ones(ids.size), (rows, ids.ravel())), shape=(len(x), vocab_size))
    m[:, 0] = 0
    m.eliminate_zeros()
    return m


def log_probs(scores):
    """Log-probabilities from logistic-regression scores, finite even where a probability
    rounds to 0 (``predict_log_proba`` gives -inf there): (n,) binary or (n, k) logits."""
    if scores.ndim == 1:
        return np.stack([log_expit(-scores), log_expit(scores)], 1)
    return log_softmax(scores, axis=1)


def probe(feats, splits, c_grid, *, standardise=True):
    """Logistic regression on frozen features, ``C`` chosen on the clean validation set.

    Reported twice: as fitted (the intercept learned on the balanced training subsample, 50/50)
    and prior-corrected (log-probabilities shifted by ``log(prior) - log(train prior)``, the
    prior being the class frequencies of the clean validation set, which is stratified from
    the training file: 65/35). ``C`` is chosen separately for each on validation accuracy; the
    test ROC AUC (threshold-free, so unaffected by the prior) is that of the first.
    """
    if standardise:
        scaler = StandardScaler().fit(feats["train"])
        feats = {k: scaler.transform(v) for k, v in feats.items()}
    k = splits.num_classes
    train_prior = np.bincount(splits.train_labels, minlength=k) / len(splits.train_labels)
    prior = np.bincount(splits.val_labels, minlength=k) / len(splits.val_labels)
    shift = np.log(prior) - np.log(train_prior)
    grid, fits = [], []
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=10000).fit(feats["train"], splits.train_labels)
        logp = {s: log_probs(clf.decision_function(feats[s])) for s in ("val", "test")}
        pred = {s: (np.argmax(v, 1), np.argmax(v + shift, 1)) for s, v in logp.items()}
        yv = splits.val_labels
        row = {
            "C": float(c),
            "train_accuracy": float(clf.score(feats["train"], splits.train_labels)),
            "val_accuracy": float(np.mean(pred["val"][0] == yv)),
            "val_accuracy_prior_corrected": float(np.mean(pred["val"][1] == yv)),
            "iterations": int(np.max(clf.n_iter_)),
        }
        grid.append(row)
        fits.append((pred["test"], logp["test"]))
    best = max(range(len(grid)), key=lambda i: grid[i]["val_accuracy"])  # first max: small C
    best_pc = max(range(len(grid)), key=lambda i: grid[i]["val_accuracy_prior_corrected"])
    (test_pred, _), test_logp = fits[best]
    y = splits.test_labels
    auc = roc_auc_score(y, test_logp[:, 1]) if k == 2 else float("nan")
    return {
        "C": grid[best]["C"],
        "val_accuracy": grid[best]["val_accuracy"],
        "test_accuracy": float(np.mean(test_pred == y)),
        "test_auc": float(auc),
        "test_predicted_counts": np.bincount(test_pred, minlength=k).tolist(),
        "prior_corrected": {
            "C": grid[best_pc]["C"],
            "val_accuracy": grid[best_pc]["val_accuracy_prior_corrected"],
            "test_accuracy": float(np.mean(fits[best_pc][0][1] == y)),
            "prior": prior.tolist(),
        },
        "grid": grid,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"amazon_reviews:{args.max_length}"
    config = dict(vars(args), out=str(args.out), dataset=name, commit=git_commit(),
                  command=" ".join(["python", *sys.argv]))  # fmt: skip
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    metrics: dict = {"probe": {}, "finetune": {}}

    def save():
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    cache: dict = {}  # init -> features; the subsets do not depend on the noise (same seed)
    for noise in [] if args.skip_probe else args.noise:
        t = symmetric_transition(noise, num_classes=2) if noise > 0 else None
        splits = load_splits(name, seed=args.seed, val_size=args.n_val,
                             n_per_class=args.n_per_class, transition=t)  # fmt: skip
        tag = f"noise_{noise:g}"
        metrics.setdefault("actual_noise", {})[tag] = float(
            np.mean(splits.train_labels != splits.train_clean_labels)
        )
        xs = {"train": splits.train_images, "val": splits.val_images, "test": splits.test_images}
        for init in ("pretrained", "random", "bag_of_wordpieces"):
            t0 = time.perf_counter()
            hit = cache.get(init)
            if hit is not None and all(np.array_equal(hit[0][k], xs[k]) for k in xs):
                feats = hit[1]
            elif init == "bag_of_wordpieces":
                counts = {k: bag_of_wordpieces(x, VOCAB_SIZE) for k, x in xs.items()}
                tfidf = TfidfTransformer(sublinear_tf=True).fit(counts["train"])
                feats = {k: tfidf.transform(v) for k, v in counts.items()}
            else:
                model = bert_classifier(2, pretrained=init == "pretrained", seed=args.seed)
                feats = {k: features(model, x) for k, x in xs.items()}
            cache[init] = (xs, feats)
            r = probe(feats, splits, args.c_grid, standardise=init != "bag_of_wordpieces")
            r["seconds"] = time.perf_counter() - t0
            metrics["probe"][f"{init}/{tag}"] = r
            print("probe", init, tag, {k: v for k, v in r.items() if k != "grid"}, flush=True)
            save()
    for noise in args.noise:
        t = symmetric_transition(noise, num_classes=2) if noise > 0 else None
        splits = load_splits(name, seed=args.seed, val_size=args.n_val,
                             n_per_class=args.n_per_class, transition=t)  # fmt: skip
        for init in ("pretrained", "random"):
            if init == "random" and args.skip_finetune_random:
                continue
            if args.only is not None and f"{init}/{noise:g}" not in args.only:
                continue
            tag = f"noise_{noise:g}"
            model = bert_classifier(2, pretrained=init == "pretrained", seed=args.seed)
            cfg = TrainConfig(method="plain", epochs=args.epochs, batch_size=args.batch_size,
                              lr=args.lr, optimizer="adamw", weight_decay=0.01,
                              lr_decay_every=None, early_stopping=True,
                              patience=args.epochs, seed=args.seed,
                              eval_batch_size=100)  # fmt: skip
            from flax import nnx

            params = nnx.to_pure_dict(split_model(model)[2])
            spe = len(splits.train_labels) // args.batch_size
            method = build_method(cfg, params, num_classes=2, steps_per_epoch=spe)
            t0 = time.perf_counter()
            train = (splits.train_images, splits.train_labels)
            val = (splits.val_images, splits.val_labels)
            res = fit(model, method.loss, method.tx, train, val, config=cfg, progress=False)
            wall = time.perf_counter() - t0
            te = evaluate(res.model, splits.test_images, splits.test_labels, batch_size=100)
            metrics["finetune"][f"{init}/{tag}"] = {
                "test_accuracy": te["accuracy"],
                "test_loss": te["loss"],
                "best_val_accuracy": res.best_val_accuracy,
                "best_epoch": res.best_epoch,
                "steps": res.step,
                "fit_seconds": wall,
                "seconds_per_step": wall / max(res.step, 1),
                "history": res.history,
            }
            print("finetune", init, tag, metrics["finetune"][f"{init}/{tag}"]["test_accuracy"],
                  f"{wall:.0f}s", flush=True)  # fmt: skip
            save()


if __name__ == "__main__":
    main()
