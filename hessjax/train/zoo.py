"""Models the command line can build by name: MobileNetV2 (ImageNet weights), MiniLM (text), a
tiny CNN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["MODELS", "TinyCNN", "make_model"]

MODELS = ("mobilenet_v2", "tiny_cnn", "minilm", "minilm_random")


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
    if name == "mobilenet_v2":
        from hessjax.models import pretrained_mobilenet_v2

        return pretrained_mobilenet_v2(num_classes, first_block=first_block)
    if name in ("minilm", "minilm_random") and not first_block:
        from hessjax.models import bert_classifier

        return bert_classifier(num_classes, pretrained=name == "minilm", seed=seed)
    if first_block:
        raise ValueError(
            f"first_block: only mobilenet_v2 can be split, got {first_block} for {name!r}"
        )
    if name == "tiny_cnn":
        return TinyCNN(num_classes, in_channels, rngs=nnx.Rngs(seed))
    raise ValueError(f"name: expected one of {MODELS}, got {name!r}")
