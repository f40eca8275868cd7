"""torch-layout building blocks as Equinox modules: ``Linear``, ``PointwiseConv2d`` and ``LayerNorm``,
adapted from the Haiku modules of the same names."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from noxton.functional._checks import check_bool, check_positive_float, check_positive_int
from noxton.functional._squeeze_excitation import check_feature_map
from noxton.haiku import _common as hkc
from noxton.interop._from_torch import layer_norm_config_from_torch, linear_config_from_torch
from noxton.nn._adapter import Adapted, from_torch_weights


def _from_arrays(cls, args: tuple, weight, bias, **kwargs):
    """A ``cls(*args, bias is not None, ...)`` holding ``weight`` and ``bias``: built through ``__init__``
    abstractly (``eqx.filter_eval_shape``: no initialiser runs), then given the arrays."""
    layer = eqx.filter_eval_shape(lambda: cls(*args, bias is not None, dtype=weight.dtype, **kwargs))
    if tuple(weight.shape) != tuple(layer.weight.shape):
        raise ValueError(f"`weight` must have shape {tuple(layer.weight.shape)}, got {tuple(weight.shape)}.")
    if bias is not None and tuple(bias.shape) != tuple(layer.bias.shape):
        raise ValueError(f"`bias` must have shape {tuple(layer.bias.shape)}, got {tuple(bias.shape)}.")
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, bias), is_leaf=lambda x: x is None)


def _check_weight(weight, rank: int, layout: str):
    if not hasattr(weight, "shape") or len(weight.shape) != rank:
        raise ValueError(f"`weight` must be an array of shape {layout}, got {getattr(weight, 'shape', weight)!r}.")
    return tuple(weight.shape)


class Linear(Adapted):
    """torch's ``nn.Linear``: ``y = x @ weight.T + bias``, parameters in torch's layout.

    The signature of ``torch.nn.Linear`` and ``eqx.nn.Linear``; works in ``eqx.nn.Sequential``.
    The Transformer layers hold theirs as ``linear1``/``linear2``, attention as ``out_proj``.

    Args:
        in_features: input width.
        out_features: output width.
        bias: a learnable ``bias``. Default ``True``.
        key: PRNG key for the initialisation, U(-1/sqrt(in), 1/sqrt(in)) as torch's.
        dtype: parameter dtype; ``None`` is float32 (float64 under ``jax_enable_x64``).

    Attributes:
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)``, or ``None``.

    Shape:
        - x: ``(..., in_features)``; output: ``(..., out_features)``.

    Example:
        >>> import jax
        >>> from noxton.nn import Linear
        >>> layer = Linear(4, 3, key=jax.random.PRNGKey(0))
        >>> layer(jax.numpy.ones(4)).shape, layer.weight.shape
        ((3,), (3, 4))
        >>> Linear.from_arrays(layer.weight, None).bias is None
        True
    """

    weight: Float[Array, "out_features in_features"]
    bias: Float[Array, " out_features"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    haiku_module = hkc.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, key: PRNGKeyArray, dtype=None):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.use_bias = check_bool("bias", bias)
        self.dtype = hkc.resolve_dtype(dtype)
        sd = self._initial_state_dict(key)
        self.weight, self.bias = sd["weight"], sd.get("bias")

    @classmethod
    def from_torch(cls, module) -> Linear:
        """A layer with the configuration (sizes, bias, dtype) and weights of a torch ``nn.Linear``."""
        config = linear_config_from_torch(module)
        return from_torch_weights(module, lambda key: cls(**config, key=key))

    @classmethod
    def from_arrays(cls, weight: Float[Array, "out in"], bias: Float[Array, " out"] | None = None) -> Linear:
        """A layer holding ``weight`` ``(out, in)`` and ``bias`` ``(out,)`` (or ``None``), of their dtype."""
        out_features, in_features = _check_weight(weight, 2, "(out_features, in_features)")
        return _from_arrays(cls, (in_features, out_features), weight, bias, key=jax.random.PRNGKey(0))

    def __call__(self, x: Float[ArrayLike, "*batch in_features"], *, key: PRNGKeyArray | None = None) -> Array:
        """``x @ weight.T + bias``; ``key`` is accepted and ignored, as in ``eqx.nn`` layers."""
        del key
        return self._apply(None, x)


class PointwiseConv2d(Adapted):
    """torch's 1x1 ``nn.Conv2d(in_channels, out_channels, 1)``, parameters in torch's layout
    (squeeze-excitation's ``fc1``/``fc2``).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        bias: a learnable ``bias``. Default ``True``.
        key: PRNG key for the initialisation (torch's ``Conv2d``).
        dtype: parameter dtype; ``None`` is float32.

    Attributes:
        weight: ``(out_channels, in_channels, 1, 1)``.
        bias: ``(out_channels,)``, or ``None``.

    Shape:
        - x: ``(in_channels, H, W)``; output: ``(out_channels, H, W)``.
    """

    weight: Float[Array, "out_channels in_channels 1 1"]
    bias: Float[Array, " out_channels"] | None
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    haiku_module = hkc.PointwiseConv2d

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, *, key: PRNGKeyArray, dtype=None):
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.use_bias = check_bool("bias", bias)
        self.dtype = hkc.resolve_dtype(dtype)
        sd = self._initial_state_dict(key)
        self.weight, self.bias = sd["weight"], sd.get("bias")

    @classmethod
    def from_arrays(
        cls, weight: Float[Array, "out in 1 1"], bias: Float[Array, " out"] | None = None
    ) -> PointwiseConv2d:
        """A layer holding ``weight`` ``(out, in, 1, 1)`` and ``bias`` ``(out,)`` (or ``None``)."""
        out_channels, in_channels, *_ = _check_weight(weight, 4, "(out_channels, in_channels, 1, 1)")
        return _from_arrays(cls, (in_channels, out_channels), weight, bias, key=jax.random.PRNGKey(0))

    def __call__(self, x: Float[ArrayLike, "in_channels height width"], *, key: PRNGKeyArray | None = None) -> Array:
        """The 1x1 convolution of ``x``; ``key`` is accepted and ignored."""
        del key
        check_feature_map(x, self.in_channels, batched=False, name="in_channels")
        return self._apply(None, x)


class LayerNorm(Adapted):
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
    normalized_shape: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    haiku_module = hkc.LayerNorm

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True, *, dtype=None):
        self.normalized_shape = check_positive_int("normalized_shape", normalized_shape)
        self.eps = check_positive_float("eps", eps)
        self.use_bias = check_bool("bias", bias)
        self.dtype = hkc.resolve_dtype(dtype)
        sd = self._initial_state_dict(jax.random.PRNGKey(0))  # ones and zeros: the key draws nothing
        self.weight, self.bias = sd["weight"], sd.get("bias")

    @classmethod
    def from_torch(cls, module) -> LayerNorm:
        """A layer with the configuration (``normalized_shape``, ``eps``, bias, dtype) and weights of a torch
        ``nn.LayerNorm`` over the last axis."""
        config = layer_norm_config_from_torch(module)
        return from_torch_weights(module, lambda key: cls(**config))

    @classmethod
    def from_arrays(
        cls, weight: Float[Array, " E"], bias: Float[Array, " E"] | None = None, eps: float = 1e-5
    ) -> LayerNorm:
        """A layer holding ``weight`` ``(E,)`` and ``bias`` ``(E,)`` (or ``None``)."""
        (n,) = _check_weight(weight, 1, "(E,)")
        return _from_arrays(cls, (n, eps), weight, bias)

    def __call__(self, x: Float[ArrayLike, "*batch normalized_shape"], *, key: PRNGKeyArray | None = None) -> Array:
        """torch's ``F.layer_norm`` of ``x`` over its last axis; ``key`` is accepted and ignored."""
        del key
        return self._apply(None, x)
