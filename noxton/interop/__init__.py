"""torch interop: ``state_dict``s <-> Equinox models and Haiku params, and torch configurations.

Nothing here imports torch: tensors are recognised by their ``detach`` method
and modules by their attributes.
"""

from noxton.interop._equinox import load_torch_state_dict as load_torch_state_dict
from noxton.interop._equinox import torch_state_dict as torch_state_dict
from noxton.interop._from_torch import activation_from_torch as activation_from_torch
from noxton.interop._keys import to_numpy as to_numpy
from noxton.interop._state_dict import params_to_state_dict as params_to_state_dict
from noxton.interop._state_dict import state_dict_to_params as state_dict_to_params

__all__ = [
    "activation_from_torch",
    "load_torch_state_dict",
    "params_to_state_dict",
    "state_dict_to_params",
    "to_numpy",
    "torch_state_dict",
]
