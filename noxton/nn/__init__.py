"""noxton's layers as Equinox modules, used like ``eqx.nn`` layers."""

from noxton.nn._attention import MultiheadAttention as MultiheadAttention
from noxton.nn._layers import BatchNorm1d as BatchNorm1d
from noxton.nn._layers import BatchNorm2d as BatchNorm2d
from noxton.nn._layers import Conv1d as Conv1d
from noxton.nn._layers import Conv2d as Conv2d
from noxton.nn._layers import Dropout as Dropout
from noxton.nn._layers import Sequential as Sequential
from noxton.nn._layers import from_torch as from_torch
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
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv1d",
    "Conv2d",
    "Dropout",
    "LayerNorm",
    "Linear",
    "MultiheadAttention",
    "PointwiseConv2d",
    "Sequential",
    "SqueezeExcitation",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "from_torch",
]
