"""What the Haiku modules share: torch-named parameters, cloning, the run of one call, and the
torch-layout building blocks (``Linear``, ``PointwiseConv2d``, ``LayerNorm``)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from noxton.functional._attention import _linear
from noxton.functional._checks import (
    check_bool,
    check_floating_dtype,
    check_inference,
    check_positive_float,
    check_positive_int,
)
from noxton.functional._squeeze_excitation import check_feature_map
from noxton.functional._transformer import Run, check_input, layer_norm
from noxton.haiku import _initializers as init
from noxton.interop._from_torch import layer_norm_config_from_torch, linear_config_from_torch, state_dict_from_torch


def resolve_dtype(dtype):
    """``None`` means the project default: float32, or float64 under ``jax_enable_x64``."""
    dtype = check_floating_dtype("dtype", dtype)
    return jnp.dtype(jnp.zeros(()).dtype) if dtype is None else dtype


class HaikuRun(Run):
    """A call of a Haiku module: the dropout key from ``hk.next_rng_key()``, children told ``inference``."""

    frontend = "haiku"

    def __init__(self, dropout: float, inference: bool, implementation: str):
        self.inference = check_inference(inference, "haiku")
        p = 0.0 if self.inference else dropout
        super().__init__(p, hk.maybe_next_rng_key() if p > 0.0 else None, implementation)

    def check(self, name, x, d_model):
        check_input(name, x, d_model, batched=True)

    def options(self):
        extra = {} if self.implementation == "auto" else {"implementation": self.implementation}
        return {"inference": self.inference, **extra}

    def in_inference(self, child, *args, **kwargs):
        return child(*args, **kwargs, inference=True)


class TorchModule(hk.Module):
    """A Haiku module whose parameters are named as a torch module's ``state_dict``.

    Parameters are created through [`param`][noxton.haiku._common.TorchModule.param],
    which takes its initial value from ``initial_state_dict`` when that holds the key
    (how ``from_torch`` makes ``init`` return a torch module's weights). Submodules are
    created in ``__init__`` under torch's names and called where torch's forward calls them.
    Every constructor argument is kept as the attribute of the same name, so that
    [`clone`][noxton.haiku._common.clone] can rebuild the module (torch's ``copy.deepcopy``).
    """

    #: Reads a torch module's configuration as this class's constructor kwargs (``from_torch``).
    _config_from_torch: Callable[[Any], dict[str, Any]]

    def __init__(self, name: str | None = None):
        super().__init__(name=name)
        self.initial_state_dict: Mapping[str, Any] = {}
        self.matrix_init = None

    @classmethod
    def from_torch(cls, module, *, name: str | None = None):
        """A module with the configuration of the torch ``module`` (activations mapped to their exact
        JAX functions), whose ``init`` returns ``module``'s weights.

        Dropout follows the module's ``dropout``: pass ``inference=True`` to a call for torch's ``eval()``.
        """
        layer = cls(**cls._config_from_torch(module), name=name)  # pyright: ignore[reportCallIssue]
        layer.set_initial_state_dict(state_dict_from_torch(module))
        return layer

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

    def buffer(self, name: str, shape: tuple[int, ...], dtype, initializer):
        """``hk.get_state`` of a torch buffer (BatchNorm's ``running_mean``): its value in
        ``initial_state_dict`` when that holds ``name``, else ``initializer``'s."""
        if name in self.initial_state_dict:
            value = self.initial_state_dict[name]
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(value.shape)}.")
            return hk.get_state(name, shape, dtype, init=lambda shape, dtype: jnp.asarray(value, dtype))
        return hk.get_state(name, shape, dtype, init=initializer)

    def params(self) -> dict[str, jax.Array]:
        """This module's own parameters (creating them on first use), by torch name; none for a composite."""
        return {}

    def state_dict_params(self) -> dict[str, jax.Array]:
        """Get (creating on first use) the parameters of this module and its submodules, keyed as torch's
        ``state_dict``, without running the module (a module with state creates it in ``params`` too)."""
        out = dict(self.params())
        for attr, child in self._children().items():
            out.update({f"{attr}.{k}": v for k, v in child.state_dict_params().items()})
        return out

    def _run(self, *, inference: bool = False, implementation: str = "auto") -> HaikuRun:
        return HaikuRun(getattr(self, "dropout", 0.0), inference, implementation)

    def _decoding_run(self, cache: Any = None, implementation: str = "auto") -> HaikuRun:
        """A decoding call's run: inference, the cache in the children's Haiku state."""
        if cache is not None:
            raise TypeError(
                "`cache` must be None in noxton.haiku: its modules keep their cache in Haiku state "
                f"(hk.transform_with_state), got {type(cache).__name__}."
            )
        return HaikuRun(0.0, True, implementation)


def clone(module: TorchModule, name: str) -> TorchModule:
    """A new module of ``module``'s class and configuration, named ``name`` in the current scope, that
    ``init`` starts from ``module``'s initial values: torch's ``copy.deepcopy`` of a template layer.

    A function, not a method: Haiku runs a module's methods in its name scope, and the copy belongs
    to the caller's (a stack's ``layers__0``), not to the template's.
    """
    names = [p for p in inspect.signature(type(module).__init__).parameters if p not in ("self", "name")]
    copy = type(module)(**{n: getattr(module, n) for n in names}, name=name)
    copy.set_initial_state_dict(module.initial_state_dict)
    if module.matrix_init is not None:
        copy.set_matrix_init(module.matrix_init)
    return copy


class Linear(TorchModule):
    """torch's ``nn.Linear``, in torch's layout: ``y = x @ weight.T + bias``.

    Parameters: ``weight`` ``(out_features, in_features)`` and, when ``bias``,
    ``bias`` ``(out_features,)``, both U(-1/sqrt(in), 1/sqrt(in)) as torch's (``w_init``
    and ``b_init`` replace them, as in ``hk.Linear``). Products accumulate in float32
    (float64 for float64) and round once, as torch's ``addmm``.

    Shape:
        - x: ``[..., in_features]``; output: ``[..., out_features]``.

    Example:
        >>> import haiku as hk, jax
        >>> from noxton.haiku import Linear
        >>> f = hk.transform(lambda x: Linear(4, 3)(x))
        >>> params = f.init(jax.random.PRNGKey(0), jax.numpy.ones((2, 4)))
        >>> linear = params["linear"]
        >>> linear["weight"].shape
        (3, 4)
    """

    _config_from_torch = staticmethod(linear_config_from_torch)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        w_init=None,
        b_init=None,
        dtype=None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.bias = check_bool("bias", bias)
        self.w_init, self.b_init = w_init, b_init
        self.dtype = resolve_dtype(dtype)

    def _shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def params(self) -> dict[str, jax.Array]:
        shape = self._shape()
        p = {"weight": self.param("weight", shape, self.dtype, self.w_init or init.torch_default_weight)}
        if self.bias:
            fan_in = math.prod(shape[1:])
            p["bias"] = self.param("bias", shape[:1], self.dtype, self.b_init or init.torch_default_bias(fan_in))
        return p

    def __call__(self, x: Float[ArrayLike, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        """``x @ weight.T + bias``."""
        p = self.params()
        return _linear(x, p["weight"], p.get("bias"))


class PointwiseConv2d(Linear):
    """torch's 1x1 ``nn.Conv2d(in_channels, out_channels, 1)`` (squeeze-excitation's ``fc1``/``fc2``).

    Parameters: ``weight`` ``(out_channels, in_channels, 1, 1)`` and ``bias``
    ``(out_channels,)``, initialised as torch's ``Conv2d``.

    Shape:
        - x: ``[..., in_channels, H, W]``; output: ``[..., out_channels, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, *, dtype=None, name: str | None = None):
        super().__init__(in_channels, out_channels, bias, dtype=dtype, name=name)
        self.in_channels, self.out_channels = self.in_features, self.out_features

    def _shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, 1, 1)

    def __call__(
        self, x: Float[ArrayLike, "*batch in_channels height width"]
    ) -> Float[Array, "*batch out height width"]:
        """The 1x1 convolution of ``x``."""
        check_feature_map(x, self.in_channels, batched=True, name="in_channels")
        p = self.params()
        return _linear(jnp.asarray(x), p["weight"][:, :, 0, 0], p.get("bias"), axis=-3)


class LayerNorm(TorchModule):
    """torch's ``nn.LayerNorm(normalized_shape, eps, bias=bias)`` over the last axis.

    Parameters: ``weight`` ``(E,)``, ones, and when ``bias``, ``bias`` ``(E,)``, zeros.
    Statistics in float32 for low-precision inputs.

    Shape:
        - x: ``[..., E]``; output: ``[..., E]``.
    """

    _config_from_torch = staticmethod(layer_norm_config_from_torch)

    def __init__(self, normalized_shape: int, eps: float = 1e-5, *, bias: bool = True, dtype=None, name=None):
        super().__init__(name=name)
        self.normalized_shape = check_positive_int("normalized_shape", normalized_shape)
        self.eps = check_positive_float("eps", eps)
        self.bias = check_bool("bias", bias)
        self.dtype = resolve_dtype(dtype)

    def params(self) -> dict[str, jax.Array]:
        shape = (self.normalized_shape,)
        out = {"weight": self.param("weight", shape, self.dtype, init.ones)}
        if self.bias:
            out["bias"] = self.param("bias", shape, self.dtype, init.zeros)
        return out

    def __call__(self, x: Float[ArrayLike, "*batch normalized_shape"]) -> Float[Array, "*batch normalized_shape"]:
        """torch's ``F.layer_norm`` of ``x`` over its last axis."""
        p = self.params()
        return layer_norm(jnp.asarray(x), p["weight"], p.get("bias"), self.eps)
