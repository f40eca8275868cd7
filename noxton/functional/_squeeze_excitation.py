"""Squeeze-and-excitation maths (Hu et al., 2018): pure functions, no parameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from noxton.functional._activations import check_activation
from noxton.functional._checks import check_array, lift, softmax_dtype


def squeeze_excitation(
    x,
    params: Mapping[str, jax.Array],
    *,
    activation: Callable = jax.nn.relu,
    scale_activation: Callable = jax.nn.sigmoid,
):
    """``scale_activation(fc2(activation(fc1(mean_hw(x))))) * x`` for ``[*B, C, H, W]``.

    Args:
        x: ``[*B, C, H, W]`` feature map.
        params: torch ``state_dict``-named 1x1 convolutions: ``fc1.weight``
            ``(Q, C, 1, 1)``, ``fc1.bias`` ``(Q,)``, ``fc2.weight`` ``(C, Q, 1, 1)``,
            ``fc2.bias`` ``(C,)``.
        activation: applied after ``fc1``.
        scale_activation: applied after ``fc2``.

    Returns:
        ``[*B, C, H, W]``, the input rescaled channel by channel.
    """
    w1, b1 = params["fc1.weight"], params["fc1.bias"]
    w2, b2 = params["fc2.weight"], params["fc2.bias"]
    channels = w1.shape[1]
    x = check_array("x", x, min_rank=3, layout="(..., C, H, W)")
    if x.shape[-3] != channels:
        raise ValueError(
            f"`x` must have input_channels={channels} channels at axis -3 (layout (..., C, H, W)), got shape {x.shape}."
        )
    activation = check_activation("activation", activation)
    scale_activation = check_activation("scale_activation", scale_activation)
    dtype = x.dtype
    sdtype = softmax_dtype(dtype)
    pooled = jnp.mean(x.astype(sdtype), axis=(-2, -1))  # [*B, C], accumulated in >= float32
    h = jnp.einsum("...c,qc->...q", pooled, w1[:, :, 0, 0].astype(sdtype))
    h = h + lift(b1.astype(sdtype), h.ndim)
    h = activation(h)
    s = jnp.einsum("...q,cq->...c", h, w2[:, :, 0, 0].astype(sdtype))
    s = s + lift(b2.astype(sdtype), s.ndim)
    s = scale_activation(s).astype(dtype)
    return x * s[..., None, None]
