"""Training: fine-tuning methods by name, the fit loop with orbax checkpoints, model factory.

* :mod:`hessjax.train.methods`: :class:`TrainConfig`, the method registry :data:`METHODS`,
  :func:`build_method` (a per-example loss and an optax chain), :func:`make_optimizer`,
  depth functions for the layerwise radii.
* :mod:`hessjax.train.loop`: :func:`fit` (jitted steps, clean validation, early stopping,
  checkpoints, exact resume), :func:`evaluate`.
* :mod:`hessjax.train.checkpoint`: :class:`Checkpointer` (the run directory's layout, one
  atomic commit record), :class:`RunLock` (one run per directory), :func:`save_tree`.
* :mod:`hessjax.train.zoo`: :func:`make_model` (``mobilenet_v2``, ``tiny_cnn``, ``minilm``).

References:
  Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based
  Generalization Guarantees", ICML 2022.
"""

from hessjax.train.checkpoint import Checkpointer, RunLock, load_tree, restore_checkpoint, save_tree
from hessjax.train.loop import RESUMABLE_FIELDS, FitResult, evaluate, fit, split_model
from hessjax.train.methods import (
    METHODS,
    Method,
    TrainConfig,
    build_method,
    cross_entropy,
    default_depth,
    make_optimizer,
    mobilenet_v2_stage_depth,
    register_method,
)
from hessjax.train.zoo import MODELS, TinyCNN, make_model

__all__ = [
    "METHODS",
    "RESUMABLE_FIELDS",
    "Checkpointer",
    "RunLock",
    "load_tree",
    "save_tree",
    "MODELS",
    "FitResult",
    "Method",
    "TinyCNN",
    "TrainConfig",
    "build_method",
    "cross_entropy",
    "default_depth",
    "evaluate",
    "fit",
    "make_model",
    "make_optimizer",
    "mobilenet_v2_stage_depth",
    "register_method",
    "restore_checkpoint",
    "split_model",
]
