"""Parameter holders in torch's layout, the submodules of noxton's Equinox layers."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from noxton.functional._attention import _linear


def _check_bias(weight, bias) -> None:
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:1]):
        raise ValueError(f"`bias` must have shape {tuple(weight.shape[:1])}, got {tuple(bias.shape)}.")


class Linear(eqx.Module):
    """torch's ``nn.Linear`` parameters, in torch's layout: ``y = x @ weight.T + bias``.

    The layers build it (``mha.out_proj``); build one yourself from arrays,
    ``Linear(weight, bias)``.

    Attributes:
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)``, or ``None``.

    Shape:
        - x: ``(..., in_features)``; output: ``(..., out_features)``.
    """

    weight: Float[Array, "out_features in_features"]
    bias: Float[Array, " out_features"] | None = None

    def __check_init__(self):
        if getattr(self.weight, "ndim", None) != 2:
            raise ValueError(f"`weight` must be an array of shape (out, in), got {getattr(self.weight, 'shape', self.weight)}.")
        _check_bias(self.weight, self.bias)

    def __call__(self, x: Float[Array, "*batch in_features"], *, key: jax.Array | None = None) -> Array:
        """``x @ weight.T + bias``; ``key`` is accepted and ignored, as in ``eqx.nn`` layers."""
        del key
        return _linear(x, self.weight, self.bias)


class PointwiseConv2d(eqx.Module):
    """torch's 1x1 ``nn.Conv2d`` parameters, in torch's layout (``fc1``/``fc2`` of squeeze-excitation).

    Attributes:
        weight: ``(out_channels, in_channels, 1, 1)``.
        bias: ``(out_channels,)``, or ``None``.

    Shape:
        - x: ``(in_channels, H, W)``; output: ``(out_channels, H, W)``.
    """

    weight: Float[Array, "out_channels in_channels 1 1"]
    bias: Float[Array, " out_channels"] | None = None

    def __check_init__(self):
        if getattr(self.weight, "ndim", None) != 4 or tuple(self.weight.shape[2:]) != (1, 1):
            raise ValueError(
                f"`weight` must be an array of shape (out, in, 1, 1), got {getattr(self.weight, 'shape', self.weight)}."
            )
        _check_bias(self.weight, self.bias)

    def __call__(self, x: Float[Array, "in_channels height width"], *, key: jax.Array | None = None) -> Array:
        """The 1x1 convolution of ``x``; ``key`` is accepted and ignored."""
        del key
        y = _linear(jnp.moveaxis(x, -3, -1), self.weight[:, :, 0, 0], self.bias)
        return jnp.moveaxis(y, -1, -3)
