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
            raise ValueError(
                f"`weight` must be an array of shape (out, in), got {getattr(self.weight, 'shape', self.weight)}."
            )
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


class LayerNorm(eqx.Module):
    """torch's ``nn.LayerNorm(normalized_shape, eps, bias=bias)`` over the last axis, in torch's layout.

    ``weight`` starts at ones and ``bias`` at zeros, as torch's; the Transformer
    layers hold theirs as ``norm1``, ``norm2``... Unlike ``eqx.nn.LayerNorm`` it
    normalises the last axis of any ``[..., E]`` input and computes its
    statistics in float32 for low-precision inputs.

    Args:
        normalized_shape: ``E``.
        eps: added to the variance. Default ``1e-5``.
        bias: a learnable ``bias``. Default ``True``.
        dtype: parameter dtype; ``None`` is float32 (float64 under ``jax_enable_x64``).

    Attributes:
        weight: ``(E,)``.
        bias: ``(E,)``, or ``None``.

    Shape:
        - x: ``(..., E)``; output: ``(..., E)``.

    Example:
        >>> from noxton.nn import LayerNorm
        >>> import jax.numpy as jnp
        >>> y = LayerNorm(4)(jnp.arange(4.0))
        >>> y.shape, float(y.mean()), round(float(y.std()), 4)
        ((4,), 0.0, 1.0)
    """

    weight: Float[Array, " normalized_shape"]
    bias: Float[Array, " normalized_shape"] | None
    eps: float = eqx.field(static=True)

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True, *, dtype=None):
        from noxton.functional._checks import check_bool, check_positive_float, check_positive_int
        from noxton.haiku._common import resolve_dtype

        n = check_positive_int("normalized_shape", normalized_shape)
        dtype = resolve_dtype(dtype)
        self.eps = check_positive_float("eps", eps)
        self.weight = jnp.ones((n,), dtype)
        self.bias = jnp.zeros((n,), dtype) if check_bool("bias", bias) else None

    @classmethod
    def _from_arrays(cls, weight, bias, eps: float) -> LayerNorm:
        obj = object.__new__(cls)
        object.__setattr__(obj, "weight", weight)
        object.__setattr__(obj, "bias", bias)
        object.__setattr__(obj, "eps", eps)
        return obj

    def __call__(self, x: Float[Array, "*batch normalized_shape"], *, key: jax.Array | None = None) -> Array:
        """torch's ``F.layer_norm`` of ``x`` over its last axis; ``key`` is accepted and ignored."""
        from noxton.functional import layer_norm

        del key
        return layer_norm(x, self.weight, self.bias, self.eps)
