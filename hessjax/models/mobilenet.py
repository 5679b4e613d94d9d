"""MobileNetV2 in flax.nnx with torchvision's exact structure and parameter names."""

from __future__ import annotations

import jax
from flax import nnx

from hessjax.models._layers import (
    ReLU6,
    Sequential,
    batch_norm,
    conv,
    global_avg_pool,
    zero_linear,
)

# (expansion t, output channels c, repeats n, first stride s), torchvision's table.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def conv_bn_relu6(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    groups: int = 1,
    rngs: nnx.Rngs,
) -> Sequential:
    """torchvision's ``Conv2dNormActivation``: ``[conv, BatchNorm, ReLU6]`` (names 0, 1, 2)."""
    return Sequential(
        [
            conv(in_channels, out_channels, kernel_size, stride=stride, groups=groups, rngs=rngs),
            batch_norm(out_channels, rngs=rngs),
            ReLU6(),
        ]
    )


class InvertedResidual(nnx.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ skip).

    ``y = conv(x) + x`` when ``stride == 1`` and the channel count is unchanged, else
    ``y = conv(x)``. ``conv`` is ``[expand, depthwise, project, BatchNorm]`` (the expansion is
    omitted when ``expand_ratio == 1``), exactly torchvision's ``InvertedResidual.conv``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, *, rngs
    ):
        hidden = int(round(in_channels * expand_ratio))
        layers = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, 1, rngs=rngs))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden, rngs=rngs),
            conv(hidden, out_channels, 1, rngs=rngs),
            batch_norm(out_channels, rngs=rngs),
        ]
        self.conv = Sequential(layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)
        return x + y if self.use_res_connect else y


NUM_BLOCKS = 19  # features.0 (stem) .. features.18 (the 1x1 conv to 1280 channels)


def check_first_block(first_block) -> int:
    """``first_block`` if it is an int in [0, 18], else a ValueError naming it."""
    if (
        isinstance(first_block, bool)
        or not isinstance(first_block, int)
        or not 0 <= first_block < NUM_BLOCKS
    ):
        raise ValueError(
            f"first_block: expected an int in [0, {NUM_BLOCKS - 1}], got {first_block!r}"
        )
    return first_block


class Frozen(nnx.Module):
    """A parameter-free stand-in for a block computed outside the model (identity).

    ``MobileNetV2(first_block=k)`` puts one in each of ``features.0 .. features.k-1``, so the
    remaining blocks keep torchvision's indices (and names) while the model takes the frozen
    trunk's output as its input.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class MobileNetV2(nnx.Module):
    """MobileNetV2 (Sandler et al., 2018), a layer-for-layer copy of ``torchvision``'s.

    ``features.0`` is the 3x3 stride-2 stem, ``features.1`` .. ``features.17`` the inverted
    residual blocks, ``features.18`` the 1x1 conv to 1280 channels; then global average
    pooling and ``classifier = [Dropout(0.2), Linear(1280, num_classes)]``. Parameter paths
    mirror torchvision's state-dict keys (``features.3.conv.1.0.weight`` is the kernel at
    ``('features', 3, 'conv', 1, 0, 'kernel')``), so :func:`hessjax.load_torch_weights` maps
    them one to one. Input is NHWC.

    The model is built in eval mode (BatchNorm uses running statistics, dropout is off), as
    every Hessian quantity in the paper is computed; call ``model.train()`` to change that.
    Convolutions get torchvision's Kaiming (fan-out) initialisation, BatchNorm scale 1 and
    bias 0, and the head ``classifier.1`` is ZERO (kernel and bias), the paper's new head.

    Partial fine-tuning: with ``first_block=k`` the blocks ``features.0 .. features.k-1``
    are :class:`Frozen` placeholders without parameters and the model maps the output of
    block ``k - 1`` (computed once per image by :func:`hessjax.models.mobilenet_v2_trunk`,
    the pretrained trunk in eval mode) to logits. Names of the remaining layers are
    unchanged, so radii, partitions and weight import work as for the whole network, and
    every parameter of the model is a fine-tuned one.

    Cost: about 300 MFLOPs per 224x224 image, 3.5M parameters (2.2M without the head);
    ``first_block=14``: 1.7M parameters (with a 10-class head) and, at 96x96, about 9% of the
    FLOPs of the whole network.

    Args:
        num_classes: size of the output layer.
        first_block: index of the first block in the model (0: the whole network; 1 to 18:
            the input is the trunk's output before that block).
        dropout_rate: dropout before the head in train mode (torchvision: 0.2).
        rngs: initialisation randomness.

    Example:
        >>> import jax.numpy as jnp
        >>> model = MobileNetV2(10, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 32, 32, 3))).shape
        (2, 10)
        >>> top = MobileNetV2(10, first_block=14, rngs=nnx.Rngs(0))  # input: block 13's output
        >>> top(jnp.zeros((2, 2, 2, 96))).shape
        (2, 10)

    References:
        Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018;
        torchvision.models.mobilenetv2.
    """

    head_path = ("classifier", 1)
    num_features = 1280

    num_blocks = NUM_BLOCKS

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        first_block: int = 0,
        dropout_rate: float = 0.2,
        rngs: nnx.Rngs,
    ):
        check_first_block(first_block)
        channels = 32
        builders = [lambda: conv_bn_relu6(3, 32, 3, stride=2, rngs=rngs)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                builders.append(
                    lambda c_in=channels, c=c, st=s if i == 0 else 1, t=t: InvertedResidual(
                        c_in, c, st, t, rngs=rngs
                    )
                )
                channels = c
        builders.append(lambda c_in=channels: conv_bn_relu6(c_in, self.num_features, 1, rngs=rngs))
        self.first_block = first_block
        self.features = Sequential(
            [Frozen() if i < first_block else build() for i, build in enumerate(builders)]
        )
        self.classifier = nnx.List(
            [
                nnx.Dropout(dropout_rate, deterministic=True),
                zero_linear(self.num_features, num_classes, rngs=rngs),
            ]
        )

    def embed(self, x: jax.Array) -> jax.Array:
        """Penultimate features: ``features(x)`` globally average-pooled, ``(N, 1280)``."""
        return global_avg_pool(self.features(x))

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits ``(N, num_classes)`` of an NHWC batch; ``rngs`` only for train-mode dropout."""
        return self.classifier[1](self.classifier[0](self.embed(x), rngs=rngs))


# ---------------------------------------------------------------------------------------------
# Depth, default radii and measured layers (the architecture's conventions).

# (D, s, D_head) for MobileNetV2: chosen a priori, not tuned on validation data (the paper
# does not publish its radii); the run defaults of hessjax.experiment.
MOBILENET_V2_RADII = (0.5, 1.5, 2.0)


def mobilenet_v2_stage_depth(name: str) -> int | None:
    """Depth of a MobileNetV2 weight for the layerwise radii: ``features.*`` in 4 stages.

    Stages of torchvision's ``features`` indices (by resolution / width):
    1-3 (16-24 channels) -> 0, 4-6 (32) -> 1, 7-13 (64-96) -> 2, 14-18 (160-1280) -> 3.
    The stem ``features.0``, biases, BatchNorm parameters and anything outside ``features``
    return ``None`` (unconstrained), as the reference code leaves the stem and biases free.

    Args:
      name: a path name such as ``"features/15/conv/1/0/kernel"``.

    Returns:
      0..3 or ``None``.

    Example:
      >>> mobilenet_v2_stage_depth("features/15/conv/2/kernel"), mobilenet_v2_stage_depth(
      ...     "features/0/0/kernel")
      (3, None)

    References:
      Ju, Li & Zhang, ICML 2022, section 3 (radii growing with depth; the ResNet grouping
      layer1-2 / layer3 / layer4 of the reference code, here adapted to MobileNetV2).
    """
    parts = name.split("/")
    if parts[-1] != "kernel" or len(parts) < 2 or parts[0] != "features":
        return None
    idx = int(parts[1])
    if idx == 0:
        return None
    return 0 if idx <= 3 else 1 if idx <= 6 else 2 if idx <= 13 else 3


def mobilenet_v2_later_layer(name: str) -> bool:
    """Whether a weight is a kernel of MobileNetV2's later blocks (``features.14-18``) or head.

    The layers ``hessjax measure --later-only`` measures (the cheap subset of a full
    fine-tuning; the default measures every fine-tuned kernel).

    Example:
      >>> mobilenet_v2_later_layer("features/15/conv/2/kernel"), mobilenet_v2_later_layer(
      ...     "features/3/conv/0/0/kernel")
      (True, False)
    """
    parts = name.split("/")
    if parts[-1] != "kernel":
        return False
    if parts[0] == "classifier":
        return True
    return parts[0] == "features" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= 14
