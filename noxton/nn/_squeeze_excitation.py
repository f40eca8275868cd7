"""``noxton.nn.SqueezeExcitation``: the Equinox front end of the Haiku module."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from noxton.functional._checks import check_array, check_positive_int
from noxton.haiku import SqueezeExcitation as HaikuSqueezeExcitation
from noxton.haiku._common import resolve_dtype
from noxton.nn._adapter import HaikuLayer


class SqueezeExcitation(HaikuLayer):
    """Squeeze-and-Excitation channel attention (Hu et al., 2018), as torchvision's.

    Globally pools the spatial dimensions, passes the result through two 1x1
    convolutions to get a per-channel scale, and multiplies it back into the input::

        scale = sigmoid(fc2(relu(fc1(avgpool(x)))))
        output = scale * x

    Args:
        input_channels: ``C``, channels of the input feature map.
        squeeze_channels: bottleneck width (typically ``C // reduction_ratio``).
        key: PRNG key for parameter initialisation.
        dtype: parameter dtype; ``None`` is float32 (float64 under ``jax_enable_x64``).

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

    input_channels: int = eqx.field(static=True)
    squeeze_channels: int = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    haiku_cls = HaikuSqueezeExcitation
    haiku_name = "squeeze_excitation"

    def __init__(self, input_channels: int, squeeze_channels: int, *, key: PRNGKeyArray, dtype=None):
        self.input_channels = check_positive_int("input_channels", input_channels)
        self.squeeze_channels = check_positive_int("squeeze_channels", squeeze_channels)
        self.dtype = resolve_dtype(dtype)
        self.params = self._init_params(key)

    def _config(self):
        return (
            ("input_channels", self.input_channels),
            ("squeeze_channels", self.squeeze_channels),
            ("dtype", self.dtype),
        )

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        activation: Callable[[Array], Array] = jax.nn.relu,
        scale_activation: Callable[[Array], Array] = jax.nn.sigmoid,
    ) -> Float[Array, "channels height width"]:
        """Rescale the channels of ``x`` ``(C, H, W)``; returns the same shape."""
        check_array("x", x, min_rank=3, max_rank=3, layout="(C, H, W)")
        for name, fn in (("activation", activation), ("scale_activation", scale_activation)):
            if not callable(fn):
                raise TypeError(f"`{name}` must be callable (e.g. jax.nn.relu), got {fn!r}.")
        return self._apply(None, x, activation, scale_activation)
