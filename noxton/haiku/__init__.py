"""noxton's layers as Haiku modules, for use inside ``hk.transform``."""

from noxton.haiku._attention import MultiheadAttention as MultiheadAttention
from noxton.haiku._common import LayerNorm as LayerNorm
from noxton.haiku._common import Linear as Linear
from noxton.haiku._common import PointwiseConv2d as PointwiseConv2d
from noxton.haiku._layers import BatchNorm1d as BatchNorm1d
from noxton.haiku._layers import BatchNorm2d as BatchNorm2d
from noxton.haiku._layers import Conv1d as Conv1d
from noxton.haiku._layers import Conv2d as Conv2d
from noxton.haiku._layers import Dropout as Dropout
from noxton.haiku._layers import Sequential as Sequential
from noxton.haiku._layers import from_torch as from_torch
from noxton.haiku._squeeze_excitation import SqueezeExcitation as SqueezeExcitation
from noxton.haiku._transformer import Transformer as Transformer
from noxton.haiku._transformer import TransformerDecoder as TransformerDecoder
from noxton.haiku._transformer import TransformerDecoderLayer as TransformerDecoderLayer
from noxton.haiku._transformer import TransformerEncoder as TransformerEncoder
from noxton.haiku._transformer import TransformerEncoderLayer as TransformerEncoderLayer
from noxton.interop import params_to_state_dict as params_to_state_dict
from noxton.interop import state_dict_to_params as state_dict_to_params

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
    "params_to_state_dict",
    "state_dict_to_params",
]
