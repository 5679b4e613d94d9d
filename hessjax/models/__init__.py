"""flax.nnx MobileNetV2 and ResNets with torchvision names, and torch-free weight import.

Public API (also at ``hessjax.<name>``):

* :class:`MobileNetV2`, :class:`ResNet` (+ :func:`resnet18`, :func:`resnet50`): NHWC models in
  eval mode whose graph paths are torchvision's state-dict keys, with a zero-initialised head;
* :func:`pretrained_mobilenet_v2`, :func:`pretrained_resnet`: the same with imported weights;
* :func:`mobilenet_v2_trunk`: the frozen pretrained blocks' outputs, for partial fine-tuning
  (``pretrained_mobilenet_v2(first_block=k)`` is the rest of the network);
* :func:`load_state_dict` / :func:`save_state_dict`: ``.pth`` (legacy and zip ``torch.save``,
  through a restricted unpickler) and ``.safetensors`` files <-> ``{name: numpy array}``;
* :func:`load_torch_weights` / :func:`to_torch_state_dict`: state dict <-> model;
* :class:`BertModel` (Hugging Face names, built from ``config.json``), :class:`BertClassifier`
  (pooling, dropout, zero head), :func:`pretrained_bert`, :func:`bert_classifier`,
  :func:`bert_tokenizer` and :func:`minilm_path` (all-MiniLM-L6-v2, offline): text models.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from hessjax.models._layers import DepthwiseConv, depthwise_conv
from hessjax.models.bert import (
    BertClassifier,
    BertConfig,
    BertModel,
    bert_layer_depth,
    bert_measured_layer,
)
from hessjax.models.bert_io import (
    bert_classifier,
    bert_tokenizer,
    load_bert_state_dict,
    load_bert_weights,
    minilm_path,
    pretrained_bert,
    to_hf_state_dict,
)
from hessjax.models.mobilenet import (
    MOBILENET_V2_RADII,
    Frozen,
    InvertedResidual,
    MobileNetV2,
    check_first_block,
    mobilenet_v2_later_layer,
    mobilenet_v2_stage_depth,
)
from hessjax.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet50,
    resnet_stage_depth,
)
from hessjax.models.tiny import TinyCNN, tiny_cnn_depth
from hessjax.models.weights import (
    load_state_dict,
    load_torch_weights,
    mobilenet_v2_weights_path,
    save_state_dict,
    to_torch_state_dict,
)
from hessjax.models.zoo import (
    MODEL_SPECS,
    MODELS,
    ModelSpec,
    default_depth,
    make_model,
    model_spec,
)

__all__ = [
    "DepthwiseConv",
    "depthwise_conv",
    "MODELS",
    "MODEL_SPECS",
    "MOBILENET_V2_RADII",
    "ModelSpec",
    "TinyCNN",
    "default_depth",
    "make_model",
    "mobilenet_v2_later_layer",
    "mobilenet_v2_stage_depth",
    "model_spec",
    "resnet_stage_depth",
    "tiny_cnn_depth",
    "BasicBlock",
    "BertClassifier",
    "BertConfig",
    "BertModel",
    "bert_classifier",
    "bert_layer_depth",
    "bert_measured_layer",
    "bert_tokenizer",
    "load_bert_state_dict",
    "load_bert_weights",
    "minilm_path",
    "pretrained_bert",
    "to_hf_state_dict",
    "Bottleneck",
    "Frozen",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "load_state_dict",
    "load_torch_weights",
    "mobilenet_v2_trunk",
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
    first_block: int = 0,
    path: str | os.PathLike | None = None,
    dropout_rate: float = 0.2,
) -> MobileNetV2:
    """torchvision's ImageNet MobileNetV2, with a new zero head of ``num_classes`` outputs.

    Nothing random survives construction (every weight but the zero head is overwritten),
    so no key is needed. With ``first_block=k`` the model holds blocks ``k ..`` only (see
    :class:`MobileNetV2`) and takes :func:`mobilenet_v2_trunk`'s output as input: the two
    together compute the same logits as the whole network.

    Cost: reading a 14 MB file and building the model, about a second.

    Args:
        num_classes: None keeps the 1000-class ImageNet classifier; an integer replaces it
            by a zero-initialised ``Linear(1280, num_classes)`` (kernel and bias 0), so the
            fine-tuning anchor of the head is zero, as in the paper.
        first_block: the first block the model holds (0: all of them).
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
    build = lambda n: MobileNetV2(
        n, first_block=first_block, dropout_rate=dropout_rate, rngs=nnx.Rngs(0)
    )
    frozen = tuple(f"features.{i}." for i in range(first_block))
    if num_classes is None:
        return _load_into_abstract(lambda: build(1000), state_dict, frozen)
    return _load_into_abstract(lambda: build(num_classes), state_dict, ("classifier.1.", *frozen))


def mobilenet_v2_trunk(
    images,
    first_block: int,
    *,
    batch_size: int = 256,
    path: str | os.PathLike | None = None,
):
    """Outputs of the pretrained MobileNetV2's blocks ``0 .. first_block - 1`` (eval mode).

    The frozen part of a partially fine-tuned network, computed once per image:
    ``pretrained_mobilenet_v2(k, first_block=b)(mobilenet_v2_trunk(x, b))`` equals
    ``pretrained_mobilenet_v2(k)(x)``. Fine-tuning then trains, and the Hessian measures
    then see, blocks ``first_block ..`` and the head only; the frozen blocks' displacement
    from the anchor is zero, so they add nothing to the distance measure.

    Cost: one forward pass of the frozen blocks per image (jitted, ``batch_size`` images
    at a time; the last batch is padded so that one shape is compiled).

    Args:
        images: ``(N, H, W, 3)`` ImageNet-normalised images (NHWC), e.g. from
            :func:`hessjax.load_splits` with ``imagenet=True``.
        first_block: the first trained block, 1 to 18 (0 returns ``images`` unchanged).
        batch_size: images per forward pass.
        path: the weights file; default :func:`mobilenet_v2_weights_path`.

    Returns:
        A float32 numpy array ``(N, h, w, c)``: block ``first_block - 1``'s output.

    Raises:
        ValueError: ``first_block`` outside [0, 18] or images that are not ``(N, H, W, 3)``.

    Example:
        >>> x = jnp.zeros((2, 32, 32, 3))
        >>> mobilenet_v2_trunk(x, 14).shape
        (2, 2, 2, 96)
        >>> top, whole = pretrained_mobilenet_v2(10, first_block=14), pretrained_mobilenet_v2(10)
        >>> bool(jnp.allclose(top(mobilenet_v2_trunk(x, 14)), whole(x)))
        True

    References:
        Ju, Li & Zhang, ICML 2022 (the measure sums over the fine-tuned layers).
    """
    import numpy as np

    check_first_block(first_block)
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected (N, H, W, 3) NHWC, got shape {images.shape}")
    if first_block == 0 or len(images) == 0:
        return images
    forward, state = _trunk_forward(first_block, None if path is None else os.fspath(path))
    size = min(batch_size, len(images))  # one compiled shape: the last batch is padded
    out = []
    for i in range(0, len(images), size):
        chunk = images[i : i + size]
        padded = np.concatenate(
            [chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), np.float32)]
        )
        out.append(np.asarray(forward(state, padded))[: len(chunk)])
    return np.concatenate(out)


@functools.lru_cache(maxsize=4)
def _trunk_forward(first_block: int, path: str | None):
    """The jitted forward pass of the first blocks and their weights (built once per process)."""
    whole = pretrained_mobilenet_v2(None, path=path)
    graphdef, state = nnx.split(nnx.List([whole.features[i] for i in range(first_block)]))

    @jax.jit
    def forward(state, x):
        for block in nnx.merge(graphdef, state):
            x = block(x)
        return x

    return forward, state


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
