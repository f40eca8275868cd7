"""noxton's layers as Haiku modules, for use inside ``hk.transform``."""

from noxton.haiku._attention import MultiheadAttention as MultiheadAttention
from noxton.haiku._squeeze_excitation import SqueezeExcitation as SqueezeExcitation
from noxton.interop import params_to_state_dict as params_to_state_dict
from noxton.interop import state_dict_to_params as state_dict_to_params

__all__ = ["MultiheadAttention", "SqueezeExcitation", "params_to_state_dict", "state_dict_to_params"]
