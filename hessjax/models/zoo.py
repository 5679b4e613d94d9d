"""The model zoo: every architecture the runs and the command line build by name, with the
conventions that belong to it (the depth function of its layerwise radii, its default radii,
the layers its measure covers by default).

Each architecture module owns its conventions (:mod:`hessjax.models.mobilenet`:
:func:`~hessjax.models.mobilenet.mobilenet_v2_stage_depth`; :mod:`hessjax.models.resnet`:
:func:`~hessjax.models.resnet.resnet_stage_depth`; :mod:`hessjax.models.bert`:
:func:`~hessjax.models.bert.bert_layer_depth`; :mod:`hessjax.models.tiny`); this module only
gathers them: :func:`model_spec` returns one :class:`ModelSpec`, :func:`make_model` builds the
model. Users' own flax models need none of this: pass their own ``depth_fn`` to
:func:`hessjax.layerwise_radii`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp  # noqa: F401  (doctest namespace)
from flax import nnx

from hessjax.models.bert import bert_layer_depth, bert_measured_layer
from hessjax.models.mobilenet import (
    MOBILENET_V2_RADII,
    mobilenet_v2_later_layer,
    mobilenet_v2_stage_depth,
)
from hessjax.models.resnet import resnet_stage_depth
from hessjax.models.tiny import TinyCNN, tiny_cnn_depth

__all__ = ["MODELS", "MODEL_SPECS", "ModelSpec", "default_depth", "make_model", "model_spec"]


def _kernel(name: str) -> bool:
    return name.split("/")[-1] == "kernel"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One architecture of the zoo and its conventions.

    Attributes:
      name: the name :func:`make_model` and ``hessjax finetune --model`` take.
      description: one line for people.
      depth_fn: ``path_name -> depth | None`` for :func:`hessjax.layerwise_radii` (None: free).
      radii: the default ``(D, s, D_head)`` of the constraint (radius, growth per depth, head).
      measured: ``path_name -> bool``, the kernels the measure covers by default.
      later: ``path_name -> bool``, the cheaper subset of later layers (``--later-only``), or
        None where the architecture has none.
      splittable: whether ``first_block`` (partial fine-tuning on a frozen trunk) applies.
      psd_blocks: whether the network is piecewise linear in each layer's weights (ReLU-family
        activations, pooling, BatchNorm in eval mode, linear head), so that every example's
        layer block of the cross-entropy Hessian is PSD and the measure can use
        :func:`hessjax.hessian_distance` ``psd_blocks=True``.
    """

    name: str
    description: str
    depth_fn: Callable[[str], int | None]
    radii: tuple[float, float, float]
    measured: Callable[[str], bool] = _kernel
    later: Callable[[str], bool] | None = None
    splittable: bool = False
    psd_blocks: bool = False


# Radii of the other architectures: the MobileNetV2 values, likewise chosen a priori (not
# tuned); the reproduction tunes D on a log grid per model family.
MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mobilenet_v2", "torchvision's ImageNet MobileNetV2, zero 1280->k head",
                  mobilenet_v2_stage_depth, MOBILENET_V2_RADII,
                  later=mobilenet_v2_later_layer, splittable=True, psd_blocks=True),
        ModelSpec("tiny_cnn", "a two-conv CNN for tests and smoke runs (random init)",
                  tiny_cnn_depth, MOBILENET_V2_RADII, psd_blocks=True),
        ModelSpec("minilm", "all-MiniLM-L6-v2 (6-layer BERT), mean pooling, zero head",
                  bert_layer_depth, MOBILENET_V2_RADII, measured=bert_measured_layer),
        ModelSpec("minilm_random", "the MiniLM architecture, randomly initialised",
                  bert_layer_depth, MOBILENET_V2_RADII, measured=bert_measured_layer),
    )
}  # fmt: skip
MODELS = tuple(MODEL_SPECS)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a zoo model.

    Raises:
      ValueError: an unknown name (the message lists the known ones).

    Example:
      >>> spec = model_spec("mobilenet_v2")
      >>> spec.depth_fn("features/15/conv/2/kernel"), spec.radii
      (3, (0.5, 1.5, 2.0))
    """
    if name not in MODEL_SPECS:
        raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
    return MODEL_SPECS[name]


def default_depth(name: str) -> int | None:
    """Depth function used when none is given: MobileNetV2 / ResNet stages, BERT's encoder
    layer index (:func:`hessjax.models.bert.bert_layer_depth`), else 0 for kernels.

    Example:
      >>> default_depth("layer4/0/conv1/kernel"), default_depth("conv1/kernel"), default_depth(
      ...     "conv1/bias")
      (2, 0, None)
      >>> default_depth("bert/encoder/layer/4/output/dense/kernel"), default_depth(
      ...     "bert/embeddings/word_embeddings/embedding")
      (4, None)
    """
    if name.startswith("features/"):
        return mobilenet_v2_stage_depth(name)
    parts = name.split("/")
    if "encoder" in parts or "embeddings" in parts:  # BERT-family text encoders
        return bert_layer_depth(name)
    if any(p in ("layer1", "layer2", "layer3", "layer4") for p in parts):
        return resnet_stage_depth(name)
    return 0 if parts[-1] == "kernel" else None


def make_model(
    name: str, num_classes: int, *, seed: int, in_channels: int = 3, first_block: int = 0
) -> nnx.Module:
    """Build a model by name; its initial parameters are the fine-tuning anchor.

    ``mobilenet_v2``: torchvision's ImageNet MobileNetV2 with a zero head
    (:func:`hessjax.pretrained_mobilenet_v2`; inputs ImageNet-normalised RGB). ``tiny_cnn``:
    :class:`TinyCNN` initialised from ``seed``. ``minilm``: all-MiniLM-L6-v2 with mean pooling,
    dropout 0.1 and a zero head (:func:`hessjax.bert_classifier`; inputs token arrays
    ``(n, 3, seq)`` from a text data set); ``minilm_random``: the same architecture randomly
    initialised from ``seed`` (the baseline a pretrained encoder must beat).

    Args:
      name: one of :data:`MODELS`.
      num_classes: outputs.
      seed: initialisation seed (tiny_cnn, minilm_random; the pretrained models have
        nothing random).
      in_channels: input channels (tiny_cnn; ignored by the others).
      first_block: MobileNetV2 only: the first block the model holds; its input is then
        :func:`hessjax.models.mobilenet_v2_trunk`'s output (partial fine-tuning).

    Returns:
      An ``nnx.Module`` in eval mode.

    Raises:
      ValueError: unknown name; ``first_block`` with a model other than MobileNetV2.

    Example:
      >>> make_model("tiny_cnn", 3, seed=0, in_channels=1)(jnp.zeros((1, 8, 8, 1))).shape
      (1, 3)
    """
    if name not in MODEL_SPECS:
        raise ValueError(f"name: expected one of {MODELS}, got {name!r}")
    if first_block and not MODEL_SPECS[name].splittable:
        raise ValueError(
            f"first_block: only mobilenet_v2 can be split, got {first_block} for {name!r}"
        )
    if name == "mobilenet_v2":
        from hessjax.models import pretrained_mobilenet_v2

        return pretrained_mobilenet_v2(num_classes, first_block=first_block)
    if name in ("minilm", "minilm_random"):
        from hessjax.models.bert_io import bert_classifier

        return bert_classifier(num_classes, pretrained=name == "minilm", seed=seed)
    return TinyCNN(num_classes, in_channels, rngs=nnx.Rngs(seed))
