"""Squeeze-and-excitation maths (Hu et al., 2018): pure functions, no parameters."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from noxton.functional._activations import check_activation
from noxton.functional._checks import check_array, softmax_dtype


def check_feature_map(x, channels: int, *, batched: bool, name: str = "input_channels"):
    """``x`` is a floating ``(C, H, W)`` (``[..., C, H, W]`` when ``batched``) with ``channels`` channels."""
    layout = "(..., C, H, W)" if batched else "(C, H, W)"
    check_array("x", x, min_rank=3, max_rank=None if batched else 3, layout=layout)
    if x.shape[-3] != channels:
        raise ValueError(
            f"`x` must have {name}={channels} channels at axis -3 (layout {layout}), got shape {tuple(x.shape)}."
        )
    return x


def squeeze_excitation(
    x,
    fc1: Callable[[jax.Array], jax.Array],
    fc2: Callable[[jax.Array], jax.Array],
    *,
    activation: Callable = jax.nn.relu,
    scale_activation: Callable = jax.nn.sigmoid,
):
    """torchvision's ``SqueezeExcitation.forward``: ``scale_activation(fc2(activation(fc1(avgpool(x))))) * x``.

    Both front ends' layers call it with their children ``fc1`` and ``fc2``, so a child
    replaced by another module (a LoRA wrapper, a quantised convolution) is what runs.

    Args:
        x: ``[*B, C, H, W]`` feature map.
        fc1: ``[*B, C, 1, 1] -> [*B, Q, 1, 1]``, torchvision's 1x1 convolution ``fc1``.
        fc2: ``[*B, Q, 1, 1] -> [*B, C, 1, 1]``.
        activation: applied after ``fc1``.
        scale_activation: applied after ``fc2``.

    Returns:
        ``[*B, C, H, W]``, the input rescaled channel by channel. The pooling and both
        convolutions run in float32 (float64 for float64) and the scale rounds once to
        ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from noxton.functional import squeeze_excitation
        >>> x = jnp.ones((4, 3, 3))
        >>> squeeze_excitation(x, lambda h: h[:2], lambda h: jnp.concatenate([h, h]), scale_activation=jnp.tanh).shape
        (4, 3, 3)
    """
    x = check_array("x", x, min_rank=3, layout="(..., C, H, W)")
    activation = check_activation("activation", activation)
    scale_activation = check_activation("scale_activation", scale_activation)
    dtype = x.dtype
    pooled = jnp.mean(x.astype(softmax_dtype(dtype)), axis=(-2, -1), keepdims=True)  # [*B, C, 1, 1]
    scale = scale_activation(fc2(activation(fc1(pooled))))
    if scale.shape != pooled.shape:
        raise ValueError(
            f"`fc2(activation(fc1(pooled)))` must have the pooled input's shape {pooled.shape} (C = {x.shape[-3]} "
            f"channels), got {scale.shape}: check fc1's and fc2's channels."
        )
    return x * scale.astype(dtype)
