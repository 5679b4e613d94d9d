"""Fine-tuning methods by name: each a per-example loss and an optax chain built from a config.

A method is a composition of library pieces (:mod:`hessjax.losses`, :mod:`hessjax.transforms`)
with the optimizer of :func:`make_optimizer` (Adam with step decay, as the reference code):

==================  =====================================================================
name                loss / chain
==================  =====================================================================
``plain``           cross-entropy / optimizer
``plain_es``        cross-entropy / optimizer, early stopping on clean validation accuracy
``l2sp``            cross-entropy / chain(anchor_penalty(2 * penalty), optimizer)
``label_smoothing`` label_smoothing_cross_entropy(smoothing) / optimizer
``gce``             generalized_cross_entropy(q) / optimizer
``sce``             symmetric_cross_entropy(alpha, beta) / optimizer
``forward``         forward_corrected_cross_entropy(T) / optimizer
``backward``        backward_corrected_cross_entropy(T) / optimizer
``constraint``      cross-entropy / chain(optimizer, project_to_anchor(layerwise radii))
``robust``          backward_corrected_cross_entropy(T) / chain(optimizer, project_to_anchor)
``robust_clipped``  backward correction with negative weights of pinv(T) clipped / the same
``robust_forward``  forward_corrected_cross_entropy(T) / chain(optimizer, project_to_anchor)
``robust_gce``      generalized_cross_entropy(q) / chain(optimizer, project_to_anchor)
``robust_sce``      symmetric_cross_entropy(alpha, beta) / chain(optimizer, project_to_anchor)
==================  =====================================================================

``robust`` is the paper's algorithm (Ju, Li & Zhang 2022, section 3); the ``robust_*`` methods
are the same layerwise constraint composed with the other consistent or robust losses (the
paper's framework admits any loss; Theorem 2.1 asks for a bounded one, which the unclipped
backward correction is not). :data:`NEEDS_TRANSITION` names the methods that need T.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.losses

from hessjax import losses as L
from hessjax.models.zoo import default_depth
from hessjax.noise import symmetric_transition, validate_transition
from hessjax.transforms import anchor_penalty, layerwise_radii, project_to_anchor

PyTree = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

__all__ = [
    "METHODS",
    "NEEDS_TRANSITION",
    "Method",
    "TrainConfig",
    "build_method",
    "cross_entropy",
    "make_optimizer",
    "register_method",
]

_OPTIMIZERS = ("adam", "amsgrad", "adamw", "sgd")
_NORMS = ("frobenius", "inf_op")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one fine-tuning run (the fit loop's and the method's).

    Attributes:
      method: a name in :data:`METHODS`.
      epochs: training epochs.
      batch_size: examples per step (the last partial batch of an epoch is dropped, so every
        step has one shape and compiles once).
      lr: the initial learning rate (reference code: Adam, 1e-4).
      optimizer: ``"adam"``, ``"amsgrad"`` (the reference code), ``"adamw"`` or ``"sgd"``.
      weight_decay: for ``adamw``.
      lr_decay_every: multiply the learning rate by ``lr_decay_factor`` every this many epochs
        (reference code: 0.1 every 10); ``None`` keeps it constant.
      lr_decay_factor: the step-decay factor.
      early_stopping: stop after ``patience`` epochs without a better clean validation
        accuracy and return the best parameters (``plain_es`` turns it on).
      patience: epochs without improvement before stopping.
      seed: seeds the data order (a function of (seed, epoch)) and the dropout keys (a function
        of (seed, step)).
      penalty: L2-SP lambda in ``lambda * ||W - W^(s)||_F^2``.
      smoothing: label smoothing.
      gce_q: GCE exponent q.
      sce_alpha, sce_beta: SCE weights.
      radius: D, the constraint radius of the first stage.
      radius_scale: s, radii grow as D * s^depth.
      head_radius: the head's radius around its (zero) initial value; None leaves it free.
      norm: ``"frobenius"`` (the paper's runs) or ``"inf_op"``.
      noise_rate: symmetric rate rho giving T for forward/backward/robust when no transition
        is passed to :func:`build_method`.
      max_steps: stop (after a checkpoint) once this many steps were taken in total; None: no
        limit. Used to split a run into pieces, and by the resume test.
      checkpoint_every: also checkpoint every this many steps (None: at epoch ends only).
      eval_batch_size: examples per evaluation batch.
    """

    method: str = "plain"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 1e-4
    lr_decay_every: int | None = 10
    lr_decay_factor: float = 0.1
    early_stopping: bool = False
    patience: int = 5
    seed: int = 0
    penalty: float = 1e-2
    smoothing: float = 0.1
    gce_q: float = 0.7
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    radius: float = 1.0
    radius_scale: float = 1.5
    head_radius: float | None = 2.0
    norm: str = "frobenius"
    noise_rate: float | None = None
    max_steps: int | None = None
    checkpoint_every: int | None = None
    eval_batch_size: int = 256

    def __post_init__(self):
        def pos_int(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")

        for name in ("epochs", "batch_size", "patience", "eval_batch_size"):
            pos_int(name)
        for name in ("lr_decay_every", "max_steps", "checkpoint_every"):
            pos_int(name, allow_none=True)
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {sorted(METHODS)}, got {self.method!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.norm not in _NORMS:
            raise ValueError(f"norm: expected one of {_NORMS}, got {self.norm!r}")
        for name in ("lr", "radius", "radius_scale"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
        for name in ("penalty", "weight_decay", "lr_decay_factor"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        if self.head_radius is not None and not (
            np.isfinite(self.head_radius) and self.head_radius >= 0
        ):
            raise ValueError(f"head_radius: expected a number >= 0 or None, got {self.head_radius}")
        if self.noise_rate is not None and not 0 <= self.noise_rate <= 1:
            raise ValueError(
                f"noise_rate: expected a number in [0, 1] or None, got {self.noise_rate}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


class Method(NamedTuple):
    """A fine-tuning method: a per-example ``loss(logits, labels)`` and an optax chain."""

    loss: LossFn
    tx: optax.GradientTransformation


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy ``-log softmax(logits)[label]``.

    Example:
      >>> float(cross_entropy(jnp.zeros((1, 2)), jnp.array([1]))[0]) == float(jnp.log(2.0))
      True
    """
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer with step decay: lr * factor^floor(epoch / lr_decay_every).

    Args:
      config: a :class:`TrainConfig`.
      steps_per_epoch: optimizer steps per epoch (>= 1).

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: ``steps_per_epoch`` < 1.

    Example:
      >>> tx = make_optimizer(TrainConfig(lr=1e-3), steps_per_epoch=10)

    References:
      Ju, Li & Zhang, ICML 2022, reference code (Adam/AMSGrad lr 1e-4, x0.1 every 10 epochs).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: expected an int >= 1, got {steps_per_epoch}")
    lr: Any = config.lr
    if config.lr_decay_every is not None:
        lr = optax.exponential_decay(
            config.lr,
            transition_steps=config.lr_decay_every * steps_per_epoch,
            decay_rate=config.lr_decay_factor,
            staircase=True,
        )
    if config.optimizer == "adam":
        return optax.adam(lr)
    if config.optimizer == "amsgrad":
        return optax.amsgrad(lr)
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    return optax.sgd(lr, momentum=0.9)


# ------------------------------------------------------------------------------ the registry
Builder = Callable[..., Method]
METHODS: dict[str, Builder] = {}


def register_method(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder ``(config, params, *, optimizer, transition, depth_fn, anchor)``.

    ``anchor`` is the pretrained params (a pytree like ``params``) that anchored transforms
    must be centred on: pass it on as ``project_to_anchor(..., anchor=anchor)`` /
    ``anchor_penalty(..., anchor=anchor)``.

    Example:
      >>> @register_method("my_plain")
      ... def _(config, params, *, optimizer, transition, depth_fn, anchor):
      ...     return Method(cross_entropy, optimizer)
      >>> "my_plain" in METHODS
      True
    """

    def deco(fn: Builder) -> Builder:
        METHODS[name] = fn
        return fn

    return deco


def _needs_t(transition, name):
    if transition is None:
        raise ValueError(
            f"transition: method {name!r} needs a noise transition matrix (pass transition= or "
            "set config.noise_rate)"
        )
    return transition


def _radii(config, params, depth_fn):
    return layerwise_radii(
        params,
        config.radius,
        scale_factor=config.radius_scale,
        depth_fn=depth_fn,
        head_radius=config.head_radius,
    )


@register_method("plain")
def _plain(config, params, *, optimizer, transition, depth_fn, anchor):
    return Method(cross_entropy, optimizer)


@register_method("plain_es")
def _plain_es(config, params, *, optimizer, transition, depth_fn, anchor):
    return Method(cross_entropy, optimizer)


@register_method("l2sp")
def _l2sp(config, params, *, optimizer, transition, depth_fn, anchor):
    strength = lambda name: 2.0 * config.penalty if name.endswith("kernel") else None
    return Method(cross_entropy, optax.chain(anchor_penalty(strength, anchor=anchor), optimizer))


@register_method("label_smoothing")
def _ls(config, params, *, optimizer, transition, depth_fn, anchor):
    s = config.smoothing
    return Method(lambda lo, y: L.label_smoothing_cross_entropy(lo, y, smoothing=s), optimizer)


@register_method("gce")
def _gce(config, params, *, optimizer, transition, depth_fn, anchor):
    q = config.gce_q
    return Method(lambda lo, y: L.generalized_cross_entropy(lo, y, q=q), optimizer)


@register_method("sce")
def _sce(config, params, *, optimizer, transition, depth_fn, anchor):
    a, b = config.sce_alpha, config.sce_beta
    return Method(lambda lo, y: L.symmetric_cross_entropy(lo, y, alpha=a, beta=b), optimizer)


@register_method("forward")
def _forward(config, params, *, optimizer, transition, depth_fn, anchor):
    t = _needs_t(transition, "forward")
    return Method(lambda lo, y: L.forward_corrected_cross_entropy(lo, y, t), optimizer)


@register_method("backward")
def _backward(config, params, *, optimizer, transition, depth_fn, anchor):
    t = _needs_t(transition, "backward")
    return Method(lambda lo, y: L.backward_corrected_cross_entropy(lo, y, t), optimizer)


@register_method("constraint")
def _constraint(config, params, *, optimizer, transition, depth_fn, anchor):
    return _constrained(cross_entropy, config, params, optimizer, depth_fn, anchor)


def _constrained(loss, config, params, optimizer, depth_fn, anchor) -> Method:
    proj = project_to_anchor(_radii(config, params, depth_fn), norm=config.norm, anchor=anchor)
    return Method(loss, optax.chain(optimizer, proj))


@register_method("robust")
def _robust(config, params, *, optimizer, transition, depth_fn, anchor):
    t = _needs_t(transition, "robust")
    loss = lambda lo, y: L.backward_corrected_cross_entropy(lo, y, t)
    return _constrained(loss, config, params, optimizer, depth_fn, anchor)


@register_method("robust_clipped")
def _robust_clipped(config, params, *, optimizer, transition, depth_fn, anchor):
    t = _needs_t(transition, "robust_clipped")
    loss = lambda lo, y: L.backward_corrected_cross_entropy(lo, y, t, clip_negative=True)
    return _constrained(loss, config, params, optimizer, depth_fn, anchor)


@register_method("robust_forward")
def _robust_forward(config, params, *, optimizer, transition, depth_fn, anchor):
    t = _needs_t(transition, "robust_forward")
    loss = lambda lo, y: L.forward_corrected_cross_entropy(lo, y, t)
    return _constrained(loss, config, params, optimizer, depth_fn, anchor)


@register_method("robust_gce")
def _robust_gce(config, params, *, optimizer, transition, depth_fn, anchor):
    q = config.gce_q
    loss = lambda lo, y: L.generalized_cross_entropy(lo, y, q=q)
    return _constrained(loss, config, params, optimizer, depth_fn, anchor)


@register_method("robust_sce")
def _robust_sce(config, params, *, optimizer, transition, depth_fn, anchor):
    a, b = config.sce_alpha, config.sce_beta
    loss = lambda lo, y: L.symmetric_cross_entropy(lo, y, alpha=a, beta=b)
    return _constrained(loss, config, params, optimizer, depth_fn, anchor)


# The methods whose loss needs the noise transition matrix T.
NEEDS_TRANSITION = frozenset({"forward", "backward", "robust", "robust_clipped", "robust_forward"})


def build_method(
    config: TrainConfig,
    params: PyTree,
    *,
    num_classes: int,
    steps_per_epoch: int,
    transition: Any = None,
    depth_fn: Callable[[str], int | None] | None = None,
    anchor: PyTree | None = None,
) -> Method:
    """The loss and optax chain of ``config.method`` for the model whose params are given.

    Projections use layerwise radii ``D * s^depth(name)`` (:func:`hessjax.layerwise_radii`)
    with ``depth_fn`` (default :func:`default_depth`: MobileNetV2's four stages, ResNet's
    layer1-4, else 0 for kernels) and ``head_radius`` for the head (path components
    ``head``/``fc``/``classifier``). The transition T for forward/backward/robust is
    ``transition`` or ``symmetric_transition(config.noise_rate)``.

    The anchor of ``l2sp``, ``constraint`` and ``robust`` (the centre of the penalty and of the
    balls) is ``anchor``, the pretrained params, passed explicitly to
    :func:`hessjax.project_to_anchor` / :func:`hessjax.anchor_penalty`; ``None`` means
    ``params`` themselves (the weights the method is built from, before any step). Measure the
    fine-tuned model against the same object (:func:`hessjax.hessian_distance` ``anchor``).

    Cost: building the chain is free; ``tx.init`` copies the anchored leaves once.

    Args:
      config: a :class:`TrainConfig`.
      params: the model's ``nnx.Param`` state (radii are matched to it by path names).
      num_classes: k.
      steps_per_epoch: for the step decay.
      transition: (k, k) T[i, j] = P(noisy j | clean i), or None.
      depth_fn: ``path_name -> depth | None``.
      anchor: keyword-only, the pretrained params (a pytree like ``params``); default
        ``params``.

    Returns:
      A :class:`Method`.

    Raises:
      ValueError: unknown method; a method needing T without a transition or noise rate; a
        transition of the wrong size.

    Example:
      >>> params = {"body": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.zeros((2, 3))}}
      >>> m = build_method(TrainConfig(method="robust", noise_rate=0.2), params, num_classes=3,
      ...                  steps_per_epoch=1)
      >>> state = m.tx.init(params)

    References:
      Ju, Li & Zhang, ICML 2022, section 3.
    """
    if config.method not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {config.method!r}")
    if transition is None and config.noise_rate is not None:
        transition = symmetric_transition(config.noise_rate, num_classes=num_classes)
    if transition is not None:
        transition = jnp.asarray(transition, jnp.float32)
        validate_transition(transition, num_classes=num_classes)
    optimizer = make_optimizer(config, steps_per_epoch)
    return METHODS[config.method](
        config,
        params,
        optimizer=optimizer,
        transition=transition,
        depth_fn=default_depth if depth_fn is None else depth_fn,
        anchor=params if anchor is None else anchor,
    )
