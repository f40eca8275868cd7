"""Pieces shared by the Haiku modules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax.numpy as jnp

from noxton.functional._checks import check_floating_dtype
from noxton.haiku import _initializers as init


def resolve_dtype(dtype):
    """``None`` means the project default: float32, or float64 under ``jax_enable_x64``."""
    dtype = check_floating_dtype("dtype", dtype)
    return jnp.dtype(jnp.zeros(()).dtype) if dtype is None else dtype


class TorchModule(hk.Module):
    """A Haiku module whose parameters are named as a torch module's ``state_dict``.

    Parameters are created through [`param`][noxton.haiku._common.TorchModule.param],
    which takes its initial value from ``initial_state_dict`` (see
    [`set_initial_state_dict`][noxton.haiku._common.TorchModule.set_initial_state_dict])
    when that holds the key: that is how ``from_torch`` makes ``init`` return a torch
    module's weights. Submodules are created in ``__init__`` and named after torch's.
    """

    def __init__(self, name: str | None = None):
        super().__init__(name=name)
        self.initial_state_dict: Mapping[str, Any] = {}

    def set_initial_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Initialise from ``state_dict`` (torch keys relative to this module) instead of at random."""
        self.initial_state_dict = state_dict
        for attr, child in vars(self).items():
            if isinstance(child, TorchModule):
                n = len(attr) + 1
                child.set_initial_state_dict({k[n:]: v for k, v in state_dict.items() if k.startswith(attr + ".")})

    def param(self, name: str, shape: tuple[int, ...], dtype, initializer):
        """``hk.get_parameter`` with ``initializer``, or the value ``initial_state_dict`` holds for ``name``."""
        if name not in self.initial_state_dict:
            return hk.get_parameter(name, shape, dtype, init=initializer)
        value = self.initial_state_dict[name]

        def from_state_dict(shape, dtype):
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(value.shape)}.")
            return jnp.asarray(value, dtype)

        return hk.get_parameter(name, shape, dtype, init=from_state_dict)


class Affine(TorchModule):
    """A torch ``nn.Linear`` (``kernel=()``) or ``nn.Conv2d`` 1x1 (``kernel=(1, 1)``) parameter holder.

    Holds ``weight`` in torch's ``(out, in, *kernel)`` layout and, when ``bias``,
    ``bias`` of shape ``(out,)``; `params()` returns them for the maths.
    """

    def __init__(self, out_features, in_features, *, bias, kernel=(), bias_init=None, dtype, name):
        super().__init__(name=name)
        self.shape = (out_features, in_features, *kernel)
        self.bias = bias
        self.bias_init = bias_init if bias_init is not None else init.torch_default_bias(in_features * math.prod(kernel))
        self.dtype = dtype

    def params(self) -> dict:
        out = {"weight": self.param("weight", self.shape, self.dtype, init.torch_default_weight)}
        if self.bias:
            out["bias"] = self.param("bias", self.shape[:1], self.dtype, self.bias_init)
        return out
