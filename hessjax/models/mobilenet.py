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

    Cost: about 300 MFLOPs per 224x224 image, 3.5M parameters (2.2M without the head).

    Args:
        num_classes: size of the output layer.
        dropout_rate: dropout before the head in train mode (torchvision: 0.2).
        rngs: initialisation randomness.

    Example:
        >>> import jax.numpy as jnp
        >>> model = MobileNetV2(10, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 32, 32, 3))).shape
        (2, 10)

    References:
        Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018;
        torchvision.models.mobilenetv2.
    """

    head_path = ("classifier", 1)
    num_features = 1280

    def __init__(self, num_classes: int = 1000, *, dropout_rate: float = 0.2, rngs: nnx.Rngs):
        channels = 32
        features = [conv_bn_relu6(3, channels, 3, stride=2, rngs=rngs)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(channels, c, s if i == 0 else 1, t, rngs=rngs))
                channels = c
        features.append(conv_bn_relu6(channels, self.num_features, 1, rngs=rngs))
        self.features = Sequential(features)
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
