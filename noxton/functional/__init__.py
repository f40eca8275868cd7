"""The maths both front ends run: pure functions of arrays (and of the children a layer calls),
no parameters, no Haiku, no Equinox."""

from noxton.functional._activations import gelu as gelu
from noxton.functional._activations import gelu_tanh as gelu_tanh
from noxton.functional._activations import identity as identity
from noxton.functional._activations import quick_gelu as quick_gelu
from noxton.functional._attention import dense_attention as dense_attention
from noxton.functional._attention import masked_softmax as masked_softmax
from noxton.functional._attention import multi_head_attention as multi_head_attention
from noxton.functional._attention import select_implementation as select_implementation
from noxton.functional._blockwise import blockwise_attention as blockwise_attention
from noxton.functional._fused import fused_attention as fused_attention
from noxton.functional._layers import batch_norm as batch_norm
from noxton.functional._layers import conv as conv
from noxton.functional._masks import Masks as Masks
from noxton.functional._masks import canonical_masks as canonical_masks
from noxton.functional._squeeze_excitation import squeeze_excitation as squeeze_excitation
from noxton.functional._transformer import dropout as dropout
from noxton.functional._transformer import layer_norm as layer_norm
from noxton.functional._transformer import square_subsequent_mask as square_subsequent_mask

__all__ = [
    "Masks",
    "batch_norm",
    "blockwise_attention",
    "canonical_masks",
    "conv",
    "dense_attention",
    "dropout",
    "fused_attention",
    "gelu",
    "gelu_tanh",
    "identity",
    "layer_norm",
    "masked_softmax",
    "multi_head_attention",
    "quick_gelu",
    "select_implementation",
    "square_subsequent_mask",
    "squeeze_excitation",
]
