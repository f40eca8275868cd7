"""Pieces shared by the Haiku modules."""

from __future__ import annotations

import math

import haiku as hk
import jax.numpy as jnp

from noxton.functional._checks import check_floating_dtype
from noxton.haiku import _initializers as init


def resolve_dtype(dtype):
    """``None`` means the project default: float32, or float64 under ``jax_enable_x64``."""
    dtype = check_floating_dtype("dtype", dtype)
    return jnp.dtype(jnp.zeros(()).dtype) if dtype is None else dtype


class Affine(hk.Module):
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
        out = {"weight": hk.get_parameter("weight", self.shape, self.dtype, init=init.torch_default_weight)}
        if self.bias:
            out["bias"] = hk.get_parameter("bias", self.shape[:1], self.dtype, init=self.bias_init)
        return out
