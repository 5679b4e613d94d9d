"""The settings of a fine-tuning run and of the demo: frozen dataclasses with the defaults.

The command line's options are these fields (``--n-per-class`` is ``n_per_class``); their
defaults live here, and argparse reads them from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "MOBILENET_RADII",
    "NOISE_TYPES",
    "RESUMABLE_OPTIONS",
    "DemoConfig",
    "RunConfig",
    "run_fingerprint",
]

NOISE_TYPES = ("symmetric", "uniform", "pair")
# Radii for MobileNetV2 (D, s, D_head): chosen a priori (not tuned on validation data; the
# paper does not publish its radii).
MOBILENET_RADII = (0.5, 1.5, 2.0)
# Options that may change between a run and its continuation; every other option changes the
# data or the trajectory, so a run directory only accepts the values it was started with.
RESUMABLE_OPTIONS = ("epochs", "max_steps", "checkpoint_every", "eval_batch_size",
                     "output_dir", "resume", "devices", "no_progress", "distributed",
                     "debug")  # fmt: skip
# Display options older callers put into the dict of a run; they never change a run.
_DISPLAY = ("no_progress", "distributed", "debug", "func", "command")


@dataclasses.dataclass(frozen=True)
class _DataAndModel:
    """The fields a run and the demo share (data, model, optimisation, radii)."""

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    model: str = "mobilenet_v2"
    n_per_class: int = 50
    val_size: int = 500
    test_size: int = 1000
    image_size: int = 32
    noise_rate: float = 0.4
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    radius: float = MOBILENET_RADII[0]
    radius_scale: float = MOBILENET_RADII[1]
    head_radius: float = MOBILENET_RADII[2]


@dataclasses.dataclass(frozen=True)
class RunConfig(_DataAndModel):
    """One fine-tuning run: data, model, method, optimisation and where it goes.

    Attributes:
      dataset: ``fashion_mnist``, ``digits`` or ``tfds:<name>``.
      data_dir: where the dataset files are (None: the default place).
      model: a name of :data:`hessjax.models.MODELS`.
      train_from: MobileNetV2: fine-tune ``features.N-18`` and the head only (0: everything).
      n_per_class, val_size, test_size, image_size: the data sizes (training examples per
        class, clean validation examples carved from the training split, clean test
        examples, image side).
      noise_rate, noise_type: the training-label noise (``symmetric``, ``uniform``, ``pair``).
      method: a name of :data:`hessjax.train.METHODS`.
      transition: T for forward/backward/robust: ``true``, ``symmetric`` (at
        ``assumed_rate``) or ``dual_t`` (estimated from a plain fine-tuned model).
      epochs, lr, batch_size, seed, optimizer, lr_decay_every, early_stopping, patience:
        optimisation (see :class:`hessjax.train.TrainConfig`).
      radius, radius_scale, head_radius, norm: the layerwise constraint.
      penalty, smoothing, gce_q, sce_alpha, sce_beta: the other methods' hyperparameters.
      max_steps, checkpoint_every: stop after / checkpoint every this many steps.
      output_dir, resume, devices: where the run goes, whether to continue it, and the
        data-parallel device count (None: one device; ``"all"``).

    Example:
      >>> RunConfig(method="robust").replace(seed=3).seed
      3
    """

    train_from: int = 0
    noise_type: str = "symmetric"
    method: str = "plain"
    transition: str = "true"
    assumed_rate: float | None = None
    optimizer: str = "adam"
    lr_decay_every: int = 10
    early_stopping: bool = False
    patience: int = 5
    penalty: float = 1e-2
    smoothing: float = 0.1
    gce_q: float = 0.7
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    norm: str = "frobenius"
    max_steps: int | None = None
    checkpoint_every: int | None = None
    output_dir: str = "runs/finetune"
    resume: bool = True
    devices: int | str | None = None

    def __post_init__(self):
        if self.noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type: expected one of {NOISE_TYPES}, got {self.noise_type!r}")
        if self.transition not in ("true", "symmetric", "dual_t"):
            raise ValueError(
                f"transition: expected 'true', 'symmetric' or 'dual_t', got {self.transition!r}"
            )
        if not 0 <= self.noise_rate <= 1:
            raise ValueError(f"noise_rate: expected a number in [0, 1], got {self.noise_rate}")
        if self.method == "plain_es" and not self.early_stopping:
            object.__setattr__(self, "early_stopping", True)  # plain_es is plain + ES

    def replace(self, **changes) -> RunConfig:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """A config from a dict of fields (display options such as ``no_progress`` ignored).

        Raises:
          ValueError: an unknown key (named).
        """
        if isinstance(values, RunConfig):
            return values
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - set(_DISPLAY))
        if unknown:
            raise ValueError(f"config: unknown options {unknown} (known: {sorted(names)})")
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclasses.dataclass(frozen=True)
class DemoConfig(_DataAndModel):
    """The demo: plain, the paper's algorithm and the bound-selected constraint, on noisy labels.

    The regime is the cheap one of ``experiments/``: MobileNetV2's blocks 14-18 and a new head
    fine-tuned (``train_from``) on 30 Fashion-MNIST images per class at 32x32 with 40%
    symmetric label noise, Adam 1e-3 for 20 epochs. The data, model and optimisation fields
    mean what they mean in :class:`RunConfig`. The candidates: ``plain``; ``robust`` (the
    paper's algorithm) at ``radius`` / ``head_radius``; ``constraint`` at every body radius of
    ``radii`` with head radius ``head_factor`` times it. All are bounded on the training data
    (:func:`hessjax.experiment.select_by_bound`, the measure over every training example and
    fine-tuned layer, ``num_iters`` Lanczos steps, ``chunk_size`` examples vmapped at once).

    Example:
      >>> DemoConfig(radii=(0.25,)).radii
      (0.25,)
    """

    n_per_class: int = 30
    val_size: int = 200
    test_size: int = 500
    epochs: int = 20
    lr: float = 1e-3
    train_from: int = 14
    radius: float = 1.0
    head_radius: float = 4.0
    radii: tuple[float, ...] = (0.0625, 0.25, 1.0)
    head_factor: float = 4.0
    num_iters: int = 4
    chunk_size: int = 1
    output_dir: str = "runs/demo"

    def __post_init__(self):
        radii = tuple(float(r) for r in self.radii)
        if not radii or not all(np.isfinite(r) and r > 0 for r in radii):
            raise ValueError(f"radii: expected one or more finite numbers > 0, got {self.radii!r}")
        if not (np.isfinite(self.head_factor) and self.head_factor >= 0):
            raise ValueError(f"head_factor: expected a finite number >= 0, got {self.head_factor}")
        object.__setattr__(self, "radii", radii)


def run_fingerprint(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The options a run directory is bound to: all but :data:`RESUMABLE_OPTIONS`."""
    return {k: v for k, v in sorted(cfg.items()) if k not in RESUMABLE_OPTIONS}
