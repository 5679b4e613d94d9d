"""Training: fine-tuning methods by name, the fit loop with orbax checkpoints.

* :mod:`hessjax.train.methods`: :class:`TrainConfig`, the method registry :data:`METHODS`,
  :func:`build_method` (a per-example loss and an optax chain), :func:`make_optimizer`.
* :mod:`hessjax.train.loop`: :func:`fit` (jitted steps, clean validation, early stopping,
  checkpoints, exact resume), :func:`evaluate`.
* :mod:`hessjax.train.checkpoint`: :class:`Checkpointer` (the run directory's layout, one
  atomic commit record), :class:`RunLock` (one run per directory), :func:`save_tree`.

The models themselves (the zoo, :func:`hessjax.models.make_model`, and each architecture's
depth function and default radii) live in :mod:`hessjax.models`.

References:
  Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based
  Generalization Guarantees", ICML 2022.
"""

from hessjax.train.checkpoint import Checkpointer, RunLock, load_tree, restore_checkpoint, save_tree
from hessjax.train.loop import RESUMABLE_FIELDS, FitResult, evaluate, fit, split_model
from hessjax.train.methods import (
    METHODS,
    NEEDS_TRANSITION,
    Method,
    TrainConfig,
    build_method,
    cross_entropy,
    make_optimizer,
    register_method,
)

__all__ = [
    "METHODS",
    "NEEDS_TRANSITION",
    "RESUMABLE_FIELDS",
    "Checkpointer",
    "RunLock",
    "load_tree",
    "save_tree",
    "FitResult",
    "Method",
    "TrainConfig",
    "build_method",
    "cross_entropy",
    "evaluate",
    "fit",
    "make_optimizer",
    "register_method",
    "restore_checkpoint",
    "split_model",
]
