"""noxton's layers as Equinox modules, used like ``eqx.nn`` layers."""

from noxton.nn._attention import MultiheadAttention as MultiheadAttention
from noxton.nn._linear import Linear as Linear
from noxton.nn._linear import PointwiseConv2d as PointwiseConv2d
from noxton.nn._squeeze_excitation import SqueezeExcitation as SqueezeExcitation

__all__ = ["Linear", "MultiheadAttention", "PointwiseConv2d", "SqueezeExcitation"]
