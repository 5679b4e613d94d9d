"""A tiny CNN for tests, examples and smoke runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["TinyCNN", "tiny_cnn_depth"]


class TinyCNN(nnx.Module):
    """A small CNN for tests and smoke runs: conv-BN-relu, conv(stride 2)-relu, pool, head.

    The head ``head`` is zero-initialised (the convention for a new fine-tuning head), the
    model starts in eval mode.

    Args:
      num_classes: outputs.
      in_channels: input channels (NHWC).
      width: channels of the first conv (the second has twice as many).
      rngs: initialisation randomness.

    Example:
      >>> TinyCNN(10, 1, rngs=nnx.Rngs(0))(jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)
    """

    def __init__(self, num_classes: int, in_channels: int = 3, *, width: int = 8, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(
            2 * width,
            num_classes,
            kernel_init=nnx.initializers.zeros,
            bias_init=nnx.initializers.zeros,
            rngs=rngs,
        )
        self.eval()

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``(N, num_classes)``."""
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.conv2(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


def tiny_cnn_depth(name: str) -> int | None:
    """Depth of a :class:`TinyCNN` weight for layerwise radii: 0 for every kernel, else free.

    Example:
      >>> tiny_cnn_depth("conv2/kernel"), tiny_cnn_depth("bn1/scale")
      (0, None)
    """
    return 0 if name.split("/")[-1] == "kernel" else None
