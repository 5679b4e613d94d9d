"""ResNet-18/34/50/101/152 in flax.nnx with torchvision's structure and parameter names."""

from __future__ import annotations

import jax
from flax import nnx

from hessjax.models._layers import (
    Sequential,
    batch_norm,
    conv,
    global_avg_pool,
    zero_linear,
)

# depth -> (block type, blocks per stage)
_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _downsample(in_channels, out_channels, stride, rngs) -> Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return Sequential(
        [
            conv(in_channels, out_channels, 1, stride=stride, rngs=rngs),
            batch_norm(out_channels, rngs=rngs),
        ]
    )


class BasicBlock(nnx.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.conv1 = conv(in_channels, planes, 3, stride=stride, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, rngs=rngs)
        self.bn2 = batch_norm(planes, rngs=rngs)
        self.downsample = _downsample(in_channels, planes, stride, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (carrying the stride, torchvision's "v1.5"), 1x1 expand by 4, + skip."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, *, rngs: nnx.Rngs):
        out = planes * self.expansion
        self.conv1 = conv(in_channels, planes, 1, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, stride=stride, rngs=rngs)
        self.bn2 = batch_norm(planes, rngs=rngs)
        self.conv3 = conv(planes, out, 1, rngs=rngs)
        self.bn3 = batch_norm(out, rngs=rngs)
        self.downsample = _downsample(in_channels, out, stride, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
    """ResNet (He et al., 2016) with torchvision's layout and names, NHWC input.

    ``conv1`` (7x7, stride 2) -> ``bn1`` -> ReLU -> 3x3 max-pool (stride 2) -> ``layer1`` ..
    ``layer4`` (lists of BasicBlock / Bottleneck; the first block of layers 2-4 halves the
    resolution, with a ``downsample = [1x1 conv, BatchNorm]`` shortcut) -> global average
    pool -> ``fc``. Parameter paths mirror the torchvision / timm state-dict keys
    (``layer2.0.downsample.0.weight`` is ``('layer2', 0, 'downsample', 0, 'kernel')``).

    Built in eval mode (BatchNorm running statistics); ``fc`` is ZERO-initialised (the new
    head of the paper), convolutions get Kaiming fan-out initialisation.

    Cost: ResNet-18 1.8 GFLOPs / 11.7M parameters, ResNet-50 4.1 GFLOPs / 25.6M per 224x224
    image.

    Args:
        depth: 18, 34, 50, 101 or 152.
        num_classes: output size of ``fc``.
        rngs: initialisation randomness.

    Example:
        >>> import jax.numpy as jnp
        >>> model = ResNet(18, 10, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((1, 32, 32, 3))).shape
        (1, 10)

    References:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016;
        torchvision.models.resnet.
    """

    head_path = ("fc",)

    def __init__(self, depth: int = 18, num_classes: int = 1000, *, rngs: nnx.Rngs):
        if depth not in _DEPTHS:
            raise ValueError(f"depth must be one of {sorted(_DEPTHS)}, got {depth!r}")
        kind, counts = _DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.conv1 = conv(3, 64, 7, stride=2, rngs=rngs)
        self.bn1 = batch_norm(64, rngs=rngs)
        channels = 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            blocks = []
            for i in range(count):
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(block(channels, planes, stride, rngs=rngs))
                channels = planes * block.expansion
            setattr(self, f"layer{stage + 1}", Sequential(blocks))
        self.num_features = channels
        self.fc = zero_linear(channels, num_classes, rngs=rngs)

    def embed(self, x: jax.Array) -> jax.Array:
        """Penultimate features (after global average pooling), ``(N, 512 or 2048)``."""
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
        return global_avg_pool(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``(N, num_classes)`` of an NHWC batch."""
        return self.fc(self.embed(x))


def resnet18(num_classes: int = 1000, *, rngs: nnx.Rngs) -> ResNet:
    """``ResNet(18, num_classes)``; see :class:`ResNet`."""
    return ResNet(18, num_classes, rngs=rngs)


def resnet50(num_classes: int = 1000, *, rngs: nnx.Rngs) -> ResNet:
    """``ResNet(50, num_classes)``; see :class:`ResNet`."""
    return ResNet(50, num_classes, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Depth (the architecture's convention for layerwise radii).


def resnet_stage_depth(name: str) -> int | None:
    """The reference code's depth of a ResNet weight: layer1/layer2 -> 0, layer3 -> 1, layer4 -> 2.

    Only multi-dimensional weights are meant (pass kernels): the function looks at the path
    name alone and returns ``None`` (unconstrained) for anything outside ``layer1..layer4``
    (the stem, the head) and for names ending in ``bias``, ``scale`` or ``mean``/``var``.

    Args:
      name: a path name such as ``"layer3/0/conv1/kernel"``.

    Returns:
      0, 1, 2 or ``None``.

    Example:
      >>> resnet_stage_depth("layer4/1/conv2/kernel"), resnet_stage_depth("conv1/kernel")
      (2, None)

    References:
      Ju, Li & Zhang, ICML 2022, section 3; reference code ``ConstraintTrainer.add_constraint``.
    """
    parts = name.split("/")
    if parts[-1] in ("bias", "scale", "mean", "var"):
        return None
    depths = {"layer1": 0, "layer2": 0, "layer3": 1, "layer4": 2}
    for part in parts:
        if part in depths:
            return depths[part]
    return None
