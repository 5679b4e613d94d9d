"""flax.nnx MobileNetV2 and ResNets with torchvision names, and torch-free weight import.

Public API (also at ``hessjax.<name>``):

* :class:`MobileNetV2`, :class:`ResNet` (+ :func:`resnet18`, :func:`resnet50`): NHWC models in
  eval mode whose graph paths are torchvision's state-dict keys, with a zero-initialised head;
* :func:`pretrained_mobilenet_v2`, :func:`pretrained_resnet`: the same with imported weights;
* :func:`load_state_dict` / :func:`save_state_dict`: ``.pth`` (legacy and zip ``torch.save``,
  through a restricted unpickler) and ``.safetensors`` files <-> ``{name: numpy array}``;
* :func:`load_torch_weights` / :func:`to_torch_state_dict`: state dict <-> model.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from hessjax.models.mobilenet import InvertedResidual, MobileNetV2
from hessjax.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from hessjax.models.weights import (
    load_state_dict,
    load_torch_weights,
    mobilenet_v2_weights_path,
    save_state_dict,
    to_torch_state_dict,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "load_state_dict",
    "load_torch_weights",
    "mobilenet_v2_weights_path",
    "pretrained_mobilenet_v2",
    "pretrained_resnet",
    "resnet18",
    "resnet50",
    "save_state_dict",
    "to_torch_state_dict",
]


def _load_into_abstract(build, state_dict, skip: tuple[str, ...]):
    """Build the model abstractly (random draws cost one XLA compile per shape), then fill it.

    Every variable comes from ``state_dict`` except the new head under ``skip``, which our
    models zero-initialise (kernel and bias), so it is filled with zeros.
    """
    model = nnx.eval_shape(build)
    load_torch_weights(model, state_dict, skip=skip)
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            variable.set_value(jnp.zeros(value.shape, value.dtype))
    return model


def pretrained_mobilenet_v2(
    num_classes: int | None = None,
    *,
    path: str | os.PathLike | None = None,
    dropout_rate: float = 0.2,
) -> MobileNetV2:
    """torchvision's ImageNet MobileNetV2, with a new zero head of ``num_classes`` outputs.

    Nothing random survives construction (every weight but the zero head is overwritten),
    so no key is needed.

    Cost: reading a 14 MB file and building the model, about a second.

    Args:
        num_classes: None keeps the 1000-class ImageNet classifier; an integer replaces it
            by a zero-initialised ``Linear(1280, num_classes)`` (kernel and bias 0), so the
            fine-tuning anchor of the head is zero, as in the paper.
        path: the weights file; default :func:`mobilenet_v2_weights_path`.
        dropout_rate: dropout before the head in train mode.

    Returns:
        A :class:`MobileNetV2` in eval mode.

    Example:
        >>> model = pretrained_mobilenet_v2(10)
        >>> model(jnp.zeros((1, 64, 64, 3))).shape
        (1, 10)

    References:
        Ju, Li & Zhang, ICML 2022, section 5 (fine-tuning from a pretrained anchor).
    """
    state_dict = load_state_dict(mobilenet_v2_weights_path() if path is None else path)
    build = lambda n: MobileNetV2(n, dropout_rate=dropout_rate, rngs=nnx.Rngs(0))
    if num_classes is None:
        return _load_into_abstract(lambda: build(1000), state_dict, ())
    return _load_into_abstract(lambda: build(num_classes), state_dict, ("classifier.1.",))


def pretrained_resnet(
    depth: int, path: str | os.PathLike, num_classes: int | None = None
) -> ResNet:
    """A torchvision/timm ResNet from a ``.pth`` or ``.safetensors`` state dict.

    Args:
        depth: 18, 34, 50, 101 or 152.
        path: the weights file (torchvision or timm naming: ``conv1``, ``bn1``,
            ``layer1`` .. ``layer4``, ``fc``).
        num_classes: None keeps the file's ``fc`` (its size is read from the file); an
            integer gives a new zero-initialised ``fc``.

    Returns:
        A :class:`ResNet` in eval mode.

    Raises:
        ValueError: the file does not match the architecture (lists the keys).

    Example:
        >>> model = pretrained_resnet(18, "resnet18.safetensors", num_classes=5)  # doctest: +SKIP
    """
    state_dict = load_state_dict(path)
    if num_classes is None:
        if "fc.weight" not in state_dict:
            raise ValueError(f"{path} has no fc.weight; pass num_classes for a new head")
        size = int(state_dict["fc.weight"].shape[0])
        return _load_into_abstract(lambda: ResNet(depth, size, rngs=nnx.Rngs(0)), state_dict, ())
    build = lambda: ResNet(depth, num_classes, rngs=nnx.Rngs(0))
    return _load_into_abstract(build, state_dict, ("fc.",))
