"""``noxton.nn.SqueezeExcitation``: torchvision's block as an Equinox module that calls its ``fc1`` and ``fc2``."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from noxton.functional import squeeze_excitation
from noxton.functional._activations import check_activation
from noxton.functional._checks import check_positive_int, check_prng_key
from noxton.functional._squeeze_excitation import check_feature_map
from noxton.haiku._common import resolve_dtype
from noxton.interop._from_torch import se_config_from_torch
from noxton.nn._adapter import Module, from_torch_weights
from noxton.nn._linear import PointwiseConv2d


class SqueezeExcitation(Module):
    """Squeeze-and-Excitation channel attention (Hu et al., 2018), as torchvision's.

    Globally pools the spatial dimensions, passes the result through two 1x1
    convolutions to get a per-channel scale, and multiplies it back into the input::

        scale = scale_activation(fc2(activation(fc1(avgpool(x)))))
        output = scale * x

    Args:
        input_channels: ``C``, channels of the input feature map.
        squeeze_channels: bottleneck width (typically ``C // reduction_ratio``).
        key: PRNG key for parameter initialisation.
        dtype: parameter dtype; ``None`` is float32 (float64 under ``jax_enable_x64``).
        activation: applied after ``fc1``; default ``jax.nn.relu`` (torchvision's
            MobileNetV3 uses ``jax.nn.relu``, EfficientNet ``jax.nn.silu``).
        scale_activation: applied after ``fc2``; default ``jax.nn.sigmoid``
            (MobileNetV3: ``jax.nn.hard_sigmoid``).

    Attributes:
        fc1: a [`PointwiseConv2d`][noxton.nn.PointwiseConv2d], ``weight`` ``(Q, C, 1, 1)``, ``bias`` ``(Q,)``.
        fc2: a [`PointwiseConv2d`][noxton.nn.PointwiseConv2d], ``weight`` ``(C, Q, 1, 1)``, ``bias`` ``(C,)``.

    Shape:
        - x: ``(C, H, W)``, unbatched (use ``jax.vmap``); output: ``(C, H, W)``.

    Example:
        >>> import jax
        >>> from noxton.nn import SqueezeExcitation
        >>> key = jax.random.PRNGKey(0)
        >>> se = SqueezeExcitation(input_channels=64, squeeze_channels=16, key=key)
        >>> x = jax.random.normal(key, (64, 28, 28))
        >>> se(x).shape
        (64, 28, 28)
    """

    fc1: PointwiseConv2d
    fc2: PointwiseConv2d
    input_channels: int = eqx.field(static=True)
    squeeze_channels: int = eqx.field(static=True)
    activation: Callable[[Array], Array] = eqx.field(static=True)
    scale_activation: Callable[[Array], Array] = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        *,
        key: PRNGKeyArray,
        dtype=None,
        activation: Callable[[Array], Array] = jax.nn.relu,
        scale_activation: Callable[[Array], Array] = jax.nn.sigmoid,
    ):
        self.input_channels = check_positive_int("input_channels", input_channels)
        self.squeeze_channels = check_positive_int("squeeze_channels", squeeze_channels)
        self.activation = check_activation("activation", activation)
        self.scale_activation = check_activation("scale_activation", scale_activation)
        self.dtype = resolve_dtype(dtype)
        k1, k2 = jax.random.split(check_prng_key("key", key))
        self.fc1 = PointwiseConv2d(self.input_channels, self.squeeze_channels, key=k1, dtype=self.dtype)
        self.fc2 = PointwiseConv2d(self.squeeze_channels, self.input_channels, key=k2, dtype=self.dtype)

    @classmethod
    def from_torch(cls, module) -> SqueezeExcitation:
        """A layer with the configuration and weights of a torch squeeze-excitation block.

        ``module`` is recognised by its structure (``fc1``/``fc2`` 1x1 convolutions,
        ``activation``, ``scale_activation`` modules), as torchvision's
        ``SqueezeExcitation``; its activations become their exact JAX functions
        (ReLU, ReLU6, SiLU, GELU, Hardsigmoid, Hardswish, Sigmoid, Tanh, Identity).
        """
        config = se_config_from_torch(module)
        return from_torch_weights(module, lambda key: cls(**config, key=key))

    def __call__(
        self,
        x: Float[ArrayLike, "channels height width"],
        activation: Callable[[Array], Array] | None = None,
        scale_activation: Callable[[Array], Array] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "channels height width"]:
        """Rescale the channels of ``x`` ``(C, H, W)``; returns the same shape.

        Args:
            x: the feature map.
            activation: overrides the layer's ``activation`` for this call.
            scale_activation: overrides the layer's ``scale_activation`` for this call.
            key: accepted and ignored (no randomness), so the layer works in ``eqx.nn.Sequential``.
        """
        del key
        check_feature_map(x, self.input_channels, batched=False)
        return squeeze_excitation(
            x,
            self.fc1,
            self.fc2,
            activation=self.activation if activation is None else activation,
            scale_activation=self.scale_activation if scale_activation is None else scale_activation,
        )
