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
        self.matrix_init = None

    def _children(self) -> dict[str, TorchModule]:
        """Submodules by their torch key prefix (``ModuleList`` items as ``layers.0``)."""
        out = {}
        for attr, child in vars(self).items():
            if isinstance(child, TorchModule):
                out[attr] = child
            elif isinstance(child, list):
                out.update({f"{attr}.{i}": c for i, c in enumerate(child) if isinstance(c, TorchModule)})
        return out

    def set_matrix_init(self, initializer) -> None:
        """Initialise every parameter of rank > 1 here and below with ``initializer``
        (``nn.Transformer._reset_parameters``' Xavier re-initialisation)."""
        self.matrix_init = initializer
        for child in self._children().values():
            child.set_matrix_init(initializer)

    def set_initial_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Initialise from ``state_dict`` (torch keys relative to this module) instead of at random."""
        self.initial_state_dict = state_dict
        for attr, child in self._children().items():
            n = len(attr) + 1
            child.set_initial_state_dict({k[n:]: v for k, v in state_dict.items() if k.startswith(attr + ".")})

    def param(self, name: str, shape: tuple[int, ...], dtype, initializer):
        """``hk.get_parameter`` with ``initializer`` (``matrix_init`` when set and ``shape`` has rank > 1),
        or the value ``initial_state_dict`` holds for ``name``."""
        if self.matrix_init is not None and len(shape) > 1:
            initializer = self.matrix_init
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
        self.bias_init = (
            bias_init if bias_init is not None else init.torch_default_bias(in_features * math.prod(kernel))
        )
        self.dtype = dtype

    def params(self) -> dict:
        out = {"weight": self.param("weight", self.shape, self.dtype, init.torch_default_weight)}
        if self.bias:
            out["bias"] = self.param("bias", self.shape[:1], self.dtype, self.bias_init)
        return out


class LayerNorm(TorchModule):
    """A torch ``nn.LayerNorm(normalized_shape, eps, bias=bias)`` parameter holder over the last axis:
    ``weight`` ``(E,)``, ones, and when ``bias``, ``bias`` ``(E,)``, zeros."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, *, bias: bool = True, dtype=None, name=None):
        from noxton.functional._checks import check_bool, check_positive_float, check_positive_int

        super().__init__(name=name)
        self.normalized_shape = check_positive_int("normalized_shape", normalized_shape)
        self.eps = check_positive_float("eps", eps)
        self.bias = check_bool("bias", bias)
        self.dtype = resolve_dtype(dtype)

    def params(self) -> dict:
        shape = (self.normalized_shape,)
        out = {"weight": self.param("weight", shape, self.dtype, init.ones)}
        if self.bias:
            out["bias"] = self.param("bias", shape, self.dtype, init.zeros)
        return out

    def state_dict_params(self) -> dict:
        """Get (creating on first use) ``weight`` and ``bias``."""
        return self.params()

    def __call__(self, x):
        """torch's ``F.layer_norm`` of ``x`` ``[..., E]`` over its last axis."""
        from noxton.functional import layer_norm

        p = self.params()
        return layer_norm(x, p["weight"], p.get("bias"), self.eps)
