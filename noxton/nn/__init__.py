"""noxton's layers as Equinox modules, used like ``eqx.nn`` layers."""

from noxton.nn._attention import MultiheadAttention as MultiheadAttention
from noxton.nn._linear import LayerNorm as LayerNorm
from noxton.nn._linear import Linear as Linear
from noxton.nn._linear import PointwiseConv2d as PointwiseConv2d
from noxton.nn._squeeze_excitation import SqueezeExcitation as SqueezeExcitation
from noxton.nn._transformer import Transformer as Transformer
from noxton.nn._transformer import TransformerDecoder as TransformerDecoder
from noxton.nn._transformer import TransformerDecoderLayer as TransformerDecoderLayer
from noxton.nn._transformer import TransformerEncoder as TransformerEncoder
from noxton.nn._transformer import TransformerEncoderLayer as TransformerEncoderLayer

__all__ = [
    "LayerNorm",
    "Linear",
    "MultiheadAttention",
    "PointwiseConv2d",
    "SqueezeExcitation",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
