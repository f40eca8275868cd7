"""torch interop: ``state_dict`` <-> Haiku params. Imports neither torch nor Haiku."""

from noxton.interop._state_dict import params_to_state_dict as params_to_state_dict
from noxton.interop._state_dict import state_dict_to_params as state_dict_to_params
from noxton.interop._state_dict import to_numpy as to_numpy

__all__ = ["params_to_state_dict", "state_dict_to_params", "to_numpy"]
