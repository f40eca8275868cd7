"""torchvision's ``SqueezeExcitation`` as a Haiku module."""

from __future__ import annotations

from collections.abc import Callable

import haiku as hk
import jax

from noxton.functional import squeeze_excitation
from noxton.functional._checks import check_positive_int
from noxton.haiku._common import Affine, resolve_dtype


class SqueezeExcitation(hk.Module):
    """Squeeze-and-Excitation block (Hu et al., 2018), exactly torchvision's.

    ``scale = scale_activation(fc2(activation(fc1(avgpool(x)))))``; ``out = scale * x``.

    Parameters, named as torchvision's ``state_dict``: submodules ``fc1`` and
    ``fc2``, each a 1x1 convolution holding ``weight`` ``(out, in, 1, 1)`` and
    ``bias`` ``(out,)``, initialised as torch's ``Conv2d``.

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

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        scale_activation: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid,
        *,
        dtype=None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.input_channels = check_positive_int("input_channels", input_channels)
        self.squeeze_channels = check_positive_int("squeeze_channels", squeeze_channels)
        for arg, fn in (("activation", activation), ("scale_activation", scale_activation)):
            if not callable(fn):
                raise TypeError(f"`{arg}` must be callable, got {fn!r}.")
        self.activation = activation
        self.scale_activation = scale_activation
        self.dtype = resolve_dtype(dtype)
        C, Q = self.input_channels, self.squeeze_channels
        self.fc1 = Affine(Q, C, bias=True, kernel=(1, 1), dtype=self.dtype, name="fc1")
        self.fc2 = Affine(C, Q, bias=True, kernel=(1, 1), dtype=self.dtype, name="fc2")

    def state_dict_params(self) -> dict[str, jax.Array]:
        """Get (creating on first use) the parameters, keyed by torch's names."""
        return {f"{name}.{k}": v for name in ("fc1", "fc2") for k, v in getattr(self, name).params().items()}

    def __call__(
        self,
        x: jax.Array,
        activation: Callable[[jax.Array], jax.Array] | None = None,
        scale_activation: Callable[[jax.Array], jax.Array] | None = None,
    ) -> jax.Array:
        """Rescale the channels of ``x`` (``[..., C, H, W]``).

        Args:
            x: the feature map.
            activation: overrides the constructor's ``activation`` for this call.
            scale_activation: overrides the constructor's ``scale_activation``.
        """
        return squeeze_excitation(
            x,
            self.state_dict_params(),
            activation=self.activation if activation is None else activation,
            scale_activation=self.scale_activation if scale_activation is None else scale_activation,
        )
