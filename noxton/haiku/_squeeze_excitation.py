"""torchvision's ``SqueezeExcitation`` as a Haiku module."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jaxtyping import Array, ArrayLike, Float

from noxton.functional import squeeze_excitation
from noxton.functional._activations import check_activation
from noxton.functional._checks import check_positive_int
from noxton.functional._squeeze_excitation import check_feature_map
from noxton.haiku._common import PointwiseConv2d, TorchModule, resolve_dtype
from noxton.interop._from_torch import se_config_from_torch


class SqueezeExcitation(TorchModule):
    """Squeeze-and-Excitation block (Hu et al., 2018), exactly torchvision's.

    ``scale = scale_activation(fc2(activation(fc1(avgpool(x)))))``; ``out = scale * x``,
    calling the submodules ``fc1`` and ``fc2``, each a
    [`PointwiseConv2d`][noxton.haiku.PointwiseConv2d] (1x1 convolution) holding
    ``weight`` ``(out, in, 1, 1)`` and ``bias`` ``(out,)``, named and initialised as
    torchvision's ``state_dict``.

    Shape:
        - x: ``[..., C, H, W]`` with ``C = input_channels``; output: the same.

    Example:
        >>> import haiku as hk, jax
        >>> from noxton.haiku import SqueezeExcitation
        >>> f = hk.transform(lambda x: SqueezeExcitation(64, 16)(x))
        >>> x = jax.numpy.ones((8, 64, 28, 28))
        >>> params = f.init(jax.random.PRNGKey(0), x)
        >>> f.apply(params, None, x).shape
        (8, 64, 28, 28)
    """

    _config_from_torch = staticmethod(se_config_from_torch)

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        *,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        scale_activation: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid,
        dtype=None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.input_channels = check_positive_int("input_channels", input_channels)
        self.squeeze_channels = check_positive_int("squeeze_channels", squeeze_channels)
        self.activation = check_activation("activation", activation)
        self.scale_activation = check_activation("scale_activation", scale_activation)
        self.dtype = resolve_dtype(dtype)
        self.fc1 = PointwiseConv2d(self.input_channels, self.squeeze_channels, dtype=self.dtype, name="fc1")
        self.fc2 = PointwiseConv2d(self.squeeze_channels, self.input_channels, dtype=self.dtype, name="fc2")

    def __call__(
        self,
        x: Float[ArrayLike, "*batch channels height width"],
        activation: Callable[[jax.Array], jax.Array] | None = None,
        scale_activation: Callable[[jax.Array], jax.Array] | None = None,
    ) -> Float[Array, "*batch channels height width"]:
        """Rescale the channels of ``x`` (``[..., C, H, W]``).

        Args:
            x: the feature map.
            activation: overrides the constructor's ``activation`` for this call.
            scale_activation: overrides the constructor's ``scale_activation``.
        """
        check_feature_map(x, self.input_channels, batched=True)
        return squeeze_excitation(
            x,
            self.fc1,
            self.fc2,
            activation=self.activation if activation is None else activation,
            scale_activation=self.scale_activation if scale_activation is None else scale_activation,
        )
