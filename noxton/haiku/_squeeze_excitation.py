"""torchvision's ``SqueezeExcitation`` as a Haiku module."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.typing import ArrayLike

from noxton.functional import squeeze_excitation
from noxton.functional._activations import check_activation
from noxton.functional._checks import check_positive_int
from noxton.haiku._common import Affine, TorchModule, resolve_dtype
from noxton.interop._from_torch import se_config_from_torch, state_dict_from_torch


class SqueezeExcitation(TorchModule):
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
        C, Q = self.input_channels, self.squeeze_channels
        self.fc1 = Affine(Q, C, bias=True, kernel=(1, 1), dtype=self.dtype, name="fc1")
        self.fc2 = Affine(C, Q, bias=True, kernel=(1, 1), dtype=self.dtype, name="fc2")

    @classmethod
    def from_torch(cls, module, *, name: str | None = None) -> SqueezeExcitation:
        """A module with the configuration of torch squeeze-excitation ``module`` (channels and
        activations, mapped to their exact JAX functions), whose ``init`` returns its weights.

        ``module`` is recognised by its structure (``fc1``/``fc2`` 1x1 convolutions,
        ``activation``, ``scale_activation``), as torchvision's ``SqueezeExcitation``.
        """
        layer = cls(**se_config_from_torch(module), name=name)
        layer.set_initial_state_dict(state_dict_from_torch(module))
        return layer

    def state_dict_params(self) -> dict[str, jax.Array]:
        """Get (creating on first use) the parameters, keyed by torch's names."""
        return {f"{name}.{k}": v for name in ("fc1", "fc2") for k, v in getattr(self, name).params().items()}

    def __call__(
        self,
        x: ArrayLike,
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
