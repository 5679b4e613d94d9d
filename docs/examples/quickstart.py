"""Measure a fine-tuned model, then fine-tune robustly with an optax chain (seconds on a CPU).

The landing page shows this file (between the fmt markers, kept under 80 columns: the page's
code width) and its output: the documentation build runs it (tests/test_docs.py). A small CNN
stands in for a pretrained model and scikit-learn's digits for the data: it runs offline.
"""

# ruff: noqa: I001 (the imports are laid out by hand, like everything below)
# fmt: off
import optax
from flax import nnx

import hessjax
from hessjax.models import default_depth, make_model
from hessjax.train import TrainConfig, cross_entropy, evaluate, fit

T = hessjax.symmetric_transition(0.4, num_classes=10)  # 40% labels flipped
data = hessjax.load_splits(
    "digits", seed=0, n_per_class=30, test_size=200, transition=T
)
train = (data.train_images, data.train_labels)
val = (data.val_images, data.val_labels)


def finetune_and_measure(name, loss, make_tx):
    model = make_model("tiny_cnn", 10, seed=0, in_channels=1)
    anchor = nnx.state(nnx.clone(model), nnx.Param)  # pretrained weights
    cfg = TrainConfig(epochs=15, batch_size=16)
    fit(model, loss, make_tx(anchor), train, val, config=cfg, progress=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def example_loss(p, example):  # the loss of ONE example
        x, y = example
        logits = nnx.merge(graphdef, p, rest)(x[None])
        return cross_entropy(logits, y[None])[0]

    examples, n = (train[0][:32], train[1][:32]), len(train[1])
    hd = hessjax.hessian_distance(
        example_loss, params, anchor, examples, n=n, num_iters=8
    )
    fitted = evaluate(model, *train)  # mean and max loss on the training set
    bound = hessjax.hessian_bound(
        fitted["loss"], hd.measure, n, loss_bound=fitted["max_loss"]
    )
    test = evaluate(model, data.test_images, data.test_labels)
    print(f"{name + ':':8}measure {hd.measure:.4f}  bound {bound.value:.3f}  "
          f"test accuracy {test['accuracy']:.3f}")
    return hd


# 1. Plain fine-tuning (Adam), measured: the per-layer report, Theorem 2.1.
hd = finetune_and_measure("plain", cross_entropy, lambda a: optax.adam(1e-2))
print(hessjax.report(hd))


# 2. The paper's algorithm: a backward-corrected loss, and after the optimizer
#    a projection of every layer onto a ball around its pretrained weights
#    (LAST in the chain).
def robust_tx(anchor):
    radii = hessjax.layerwise_radii(
        nnx.to_pure_dict(anchor), 0.5, scale_factor=1.5,
        depth_fn=default_depth, head_radius=2.0,
    )
    return optax.chain(optax.adam(1e-2), hessjax.project_to_anchor(radii))


def robust_loss(logits, labels):
    return hessjax.backward_corrected_cross_entropy(logits, labels, T)


finetune_and_measure("robust", robust_loss, robust_tx)
# fmt: on
