"""Building blocks shared by the torchvision-compatible models (NHWC, torch padding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class Sequential(nnx.List):
    """A list of layers applied in turn; its items keep torch's integer names (``0``, ``1``)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x


class ReLU6(nnx.Module):
    """``min(max(x, 0), 6)``: a parameter-free layer so list indices match torchvision's."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu6(x)


class ReLU(nnx.Module):
    """``max(x, 0)`` as a layer."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """Depthwise 2-D convolution (NHWC, kernel ``(kh, kw, 1, C)``) as a sum of shifted taps.

    ``y[n, i, j, c] = sum_{a, b} x_pad[n, s_h i + a, s_w j + b, c] * kernel[a, b, 0, c]``,
    built from strided slices and multiply-adds that XLA fuses.

    Args:
        x: ``(N, H, W, C)`` inputs.
        kernel: ``(kh, kw, 1, C)``, one filter per channel (``nnx.Conv``'s layout).
        strides: ``(s_h, s_w)``.
        padding: ``((top, bottom), (left, right))`` zero padding.

    Returns:
        ``(N, H', W', C)`` with ``H' = (H + top + bottom - kh) // s_h + 1`` (likewise W').
    """
    kh, kw, _, channels = kernel.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    n, h, w, _ = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = None
    for a in range(kh):
        for b in range(kw):
            end = (n, a + (ho - 1) * sh + 1, b + (wo - 1) * sw + 1, channels)
            term = jax.lax.slice(x, (0, a, b, 0), end, (1, sh, sw, 1)) * kernel[a, b, 0]
            out = term if out is None else out + term
    return out


class DepthwiseConv(nnx.Conv):
    """A depthwise ``nnx.Conv`` (one filter per channel) computed by :func:`depthwise_conv`.

    The same parameters (``kernel`` of shape ``(kh, kw, 1, C)``, no bias) and the same result
    as ``nnx.Conv(..., feature_group_count=C)`` up to float rounding. On CPU this is 4-20x
    faster than the grouped convolution for forward and backward passes (and for the
    jvp-of-grad Hessian-vector products) at MobileNetV2's shapes, which XLA's CPU backend
    runs as a slow generic loop.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        strides = self.strides if isinstance(self.strides, tuple) else (self.strides,) * 2
        return depthwise_conv(inputs, self.kernel[...], strides, self.padding)


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    groups: int = 1,
    padding: int | None = None,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A bias-free ``nnx.Conv`` with torch's symmetric padding ``(k - 1) // 2``.

    Depthwise convolutions (``groups == in_channels == out_channels``) are a
    :class:`DepthwiseConv` (same parameters, faster on CPU).

    ('SAME' would pad stride-2 convolutions asymmetrically and differ from torch.)
    """
    pad = (kernel_size - 1) // 2 if padding is None else padding
    depthwise = groups > 1 and groups == in_channels == out_channels
    return (DepthwiseConv if depthwise else nnx.Conv)(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=kaiming_fan_out,
        rngs=rngs,
    )


def batch_norm(channels: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm with torch's defaults (eps 1e-5, momentum 0.1 => nnx momentum 0.9), eval mode."""
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, use_running_average=True, rngs=rngs)


def zero_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """A linear layer with zero kernel and bias (the new head for fine-tuning)."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=nnx.initializers.zeros,
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC batch: ``(N, H, W, C) -> (N, C)``."""
    return jnp.mean(x, axis=(1, 2))
