"""torch-layout building blocks as Haiku modules: ``Conv1d``, ``Conv2d``, ``BatchNorm1d``, ``BatchNorm2d``,
``Dropout`` and the container ``Sequential``, named and shaped as torch's."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from noxton.functional._checks import (
    check_array,
    check_bool,
    check_positive_float,
    check_positive_int,
    check_probability,
)
from noxton.functional._layers import batch_norm, check_conv_options, conv
from noxton.functional._transformer import dropout
from noxton.haiku import _initializers as init
from noxton.haiku._common import TorchModule, clone, resolve_dtype
from noxton.interop import _from_torch as cfg


class _ConvNd(TorchModule):
    _spatial: int

    _config_from_torch = staticmethod(cfg.conv_config_from_torch)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | str | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        dtype=None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        options = check_conv_options(self._spatial, kernel_size, stride, padding, dilation)
        self.kernel_size, self.stride = options["kernel_size"], options["stride"]
        self.padding, self.dilation = options["padding"], options["dilation"]
        self.groups = check_positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"`groups` must divide in_channels and out_channels, got groups={groups}, "
                f"in_channels={in_channels}, out_channels={out_channels}."
            )
        self.bias = check_bool("bias", bias)
        self.dtype = resolve_dtype(dtype)

    def params(self) -> dict[str, jax.Array]:
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        p = {"weight": self.param("weight", shape, self.dtype, init.torch_default_weight)}
        if self.bias:
            fan_in = math.prod(shape[1:])
            p["bias"] = self.param("bias", shape[:1], self.dtype, init.torch_default_bias(fan_in))
        return p

    def __call__(self, x: Float[ArrayLike, "*batch_c_spatial"]) -> Float[Array, "*batch_out_spatial"]:
        """torch's convolution of ``x`` ``[..., C, *spatial]`` (annotated with one variadic axis: jaxtyping 0.2
        allows no more)."""
        n = self._spatial
        x = jnp.asarray(check_array("x", x, min_rank=n + 1, layout=f"(..., C, {'L' if n == 1 else 'H, W'})"))
        if x.shape[-n - 1] != self.in_channels:
            raise ValueError(
                f"`x` must have in_channels={self.in_channels} channels at axis {-n - 1}, got shape {tuple(x.shape)}."
            )
        p = self.params()
        return conv(
            x,
            p["weight"],
            p.get("bias"),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )


class Conv1d(_ConvNd):
    """torch's ``nn.Conv1d`` (``padding_mode="zeros"``), in torch's layout.

    Parameters: ``weight`` ``(out_channels, in_channels // groups, kernel_size)`` and ``bias``
    ``(out_channels,)``, initialised as torch's. ``padding`` is an int, a tuple, ``"same"`` or ``"valid"``.

    Shape:
        - x: ``[..., C_in, L]``; output: ``[..., C_out, L_out]``.

    Example:
        >>> import haiku as hk, jax
        >>> from noxton.haiku import Conv1d
        >>> f = hk.transform(lambda x: Conv1d(3, 4, 3, padding=1)(x))
        >>> params = f.init(jax.random.PRNGKey(0), jax.numpy.ones((2, 3, 8)))
        >>> conv = params["conv1d"]
        >>> conv["weight"].shape
        (4, 3, 3)
    """

    _spatial = 1


class Conv2d(_ConvNd):
    """torch's ``nn.Conv2d`` (``padding_mode="zeros"``), in torch's layout.

    Parameters: ``weight`` ``(out_channels, in_channels // groups, kH, kW)`` and ``bias``
    ``(out_channels,)``, initialised as torch's. ``groups=in_channels`` is a depthwise convolution.

    Shape:
        - x: ``[..., C_in, H, W]``; output: ``[..., C_out, H_out, W_out]``.

    Example:
        >>> import haiku as hk, jax
        >>> from noxton.haiku import Conv2d
        >>> f = hk.transform(lambda x: Conv2d(3, 8, 3, stride=2, padding=1)(x))
        >>> x = jax.numpy.ones((2, 3, 16, 16))
        >>> params = f.init(jax.random.PRNGKey(0), x)
        >>> conv = params["conv2d"]
        >>> conv["weight"].shape, f.apply(params, None, x).shape
        ((8, 3, 3, 3), (2, 8, 8, 8))
    """

    _spatial = 2


class _BatchNorm(TorchModule):
    _ranks: tuple[int, int]
    _layout: str

    _config_from_torch = staticmethod(cfg.batch_norm_config_from_torch)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        *,
        dtype=None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.num_features = check_positive_int("num_features", num_features)
        self.eps = check_positive_float("eps", eps)
        self.momentum = None if momentum is None else check_probability("momentum", momentum)
        self.affine = check_bool("affine", affine)
        self.dtype = resolve_dtype(dtype)

    def params(self) -> dict[str, jax.Array]:
        shape = (self.num_features,)
        out = {}
        if self.affine:
            out = {"weight": self.param("weight", shape, self.dtype, init.ones)}
            out["bias"] = self.param("bias", shape, self.dtype, init.zeros)
        self.buffer("running_mean", shape, self.dtype, init.zeros)
        self.buffer("running_var", shape, self.dtype, init.ones)
        self.buffer("num_batches_tracked", (), jnp.int32, init.zeros)
        return out

    def __call__(
        self, x: Float[ArrayLike, "batch channels *spatial"], *, inference: bool = False, axis_name: Any = None
    ) -> Float[Array, "batch channels *spatial"]:
        """Normalise ``x``; in training (``inference=False``, torch's ``train()``) by the batch's statistics,
        updating the running ones in the Haiku state; in inference by the running ones.

        Args:
            x: the batch.
            inference: torch's ``eval()``.
            axis_name: a ``jax.vmap`` axis the batch is also mapped over (see ``noxton.functional.batch_norm``).
        """
        x = jnp.asarray(check_array("x", x, min_rank=self._ranks[0], max_rank=self._ranks[1], layout=self._layout))
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"`x` must have num_features={self.num_features} channels at axis 1 (layout {self._layout}), "
                f"got shape {tuple(x.shape)}."
            )
        p = self.params()
        training = not check_bool("inference", inference)
        names = ("running_mean", "running_var", "num_batches_tracked")
        y, new = batch_norm(
            x,
            hk.get_state("running_mean"),
            hk.get_state("running_var"),
            p.get("weight"),
            p.get("bias"),
            training=training,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=hk.get_state("num_batches_tracked"),
            axis_name=axis_name,
        )
        if training and not hk.running_init():
            for n, v in zip(names, new, strict=True):
                hk.set_state(n, v)
        return y


class BatchNorm1d(_BatchNorm):
    """torch's ``nn.BatchNorm1d``, exactly: torch's ``momentum`` (the weight of the new batch), its unbiased
    running variance, ``momentum=None`` as the cumulative average, and ``num_batches_tracked`` counted.

    Parameters (``affine``): ``weight`` ``(C,)`` ones, ``bias`` ``(C,)`` zeros. Haiku state (torch's buffers):
    ``running_mean`` ``(C,)`` zeros, ``running_var`` ``(C,)`` ones, ``num_batches_tracked`` ``()`` int32.
    Use ``hk.transform_with_state``; ``inference=True`` is torch's ``eval()``.

    Shape:
        - x: ``(N, C)`` or ``(N, C, L)``; output: the same.
    """

    _ranks, _layout = (2, 3), "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """torch's ``nn.BatchNorm2d``, exactly (see [`BatchNorm1d`][noxton.haiku.BatchNorm1d]).

    Shape:
        - x: ``(N, C, H, W)``; output: the same.

    Example:
        >>> import haiku as hk, jax, jax.numpy as jnp
        >>> from noxton.haiku import BatchNorm2d
        >>> def forward(x, inference):
        ...     return BatchNorm2d(3, eps=1e-3, momentum=0.01)(x, inference=inference)
        >>> f = hk.transform_with_state(forward)
        >>> x = jnp.ones((2, 3, 4, 4))
        >>> params, state = f.init(None, x, False)
        >>> _, state = f.apply(params, state, None, x, False)
        >>> stats = state["batch_norm2d"]
        >>> tuple(round(v, 4) for v in stats["running_mean"].tolist()), int(stats["num_batches_tracked"])
        ((0.01, 0.01, 0.01), 1)
    """

    _ranks, _layout = (4, 4), "(N, C, H, W)"


class Dropout(TorchModule):
    """torch's ``nn.Dropout(p)``: in training (``inference=False``) zeros with probability ``p`` and scales the
    rest by ``1 / (1 - p)``, drawing from ``hk.next_rng_key()``; the identity in inference or when ``p == 0``.

    Shape:
        - x: any; output: the same.
    """

    _config_from_torch = staticmethod(cfg.dropout_config_from_torch)

    def __init__(self, p: float = 0.5, *, name: str | None = None):
        super().__init__(name=name)
        self.p = check_probability("p", p)

    def __call__(self, x: Float[ArrayLike, "*shape"], *, inference: bool = False) -> Float[Array, "*shape"]:
        """``x`` with dropout (torch's training mode) unless ``inference``."""
        x = jnp.asarray(x)
        if check_bool("inference", inference) or self.p == 0.0:
            return x
        return dropout(x, self.p, hk.next_rng_key())


def _haiku_child_name(name: str) -> str:
    """The Haiku name of ``nn.Sequential``'s child ``name``: itself, or ``_0`` for the index ``0``
    (a Haiku name is a Python identifier); ``noxton.interop`` reads ``_0`` back as torch's ``0``."""
    return f"_{name}" if name.isdigit() else name


def _is_module_factory(layer: Any) -> bool:
    target = layer.func if isinstance(layer, functools.partial) else layer
    return isinstance(target, type) and issubclass(target, hk.Module)


class Sequential(TorchModule):
    """torch's ``nn.Sequential``: its layers called in the order given, each under torch's name.

    ``layers`` is a sequence (children ``0``, ``1``, ...) or a mapping of names to layers, as
    ``nn.Sequential(OrderedDict(...))`` (torchvision's ``encoder_layer_0``, open_clip's ``c_fc``);
    the layers run in the order given. Each child is created here, in this module's name scope, so
    its parameters sit at torch's path: ``mlp/~/c_fc`` (torch ``mlp.c_fc.weight``), and ``mlp/~/_0`` for
    the index ``0`` (torch ``mlp.0.weight``: a Haiku name is an identifier). A layer may be:

    - a noxton Haiku module (``Linear(4, 8)``): rebuilt here with its configuration (and any weights
      ``from_torch`` gave it);
    - a Haiku module class, or a ``functools.partial`` of one (``partial(Block, width=32)``), your own
      included: built here as ``factory(name=...)``;
    - a function (``jax.nn.relu``, ``noxton.functional.gelu``): called as is.

    A child whose call takes ``inference`` (``Dropout``, ``BatchNorm2d``, noxton's attention) is given the
    Sequential's ``inference``.

    Shape:
        - x: what the first layer takes; output: what the last returns.

    Example:
        >>> import collections, haiku as hk, jax
        >>> from noxton.haiku import Linear, Sequential
        >>> from noxton.functional import gelu
        >>> def forward(x):
        ...     layers = collections.OrderedDict(c_fc=Linear(4, 16), gelu=gelu, c_proj=Linear(16, 4))
        ...     return Sequential(layers, name="mlp")(x)
        >>> params = hk.transform(forward).init(jax.random.PRNGKey(0), jax.numpy.ones((2, 4)))
        >>> sorted(params)
        ['mlp/~/c_fc', 'mlp/~/c_proj']
    """

    def __init__(self, layers: Sequence[Any] | Mapping[str, Any], *, name: str | None = None):
        super().__init__(name=name)
        if isinstance(layers, Mapping):
            items = list(layers.items())
            bad = [k for k, _ in items if not isinstance(k, str) or not (k.isdigit() or k.isidentifier())]
            if bad:
                raise ValueError(
                    f"`layers` must be keyed by identifiers or indices as torch names children, got {bad}."
                )
        elif isinstance(layers, Sequence) and not isinstance(layers, str):
            items = [(str(i), layer) for i, layer in enumerate(layers)]
        else:
            raise TypeError(
                f"`layers` must be a sequence or a mapping of names to layers, got {type(layers).__name__}."
            )
        self.layers = layers  # what clone() rebuilds from
        self.names = tuple(k for k, _ in items)
        self.children_: list[Any] = []
        for key, layer in items:
            hk_name = _haiku_child_name(key)
            if isinstance(layer, TorchModule):
                self.children_.append(clone(layer, hk_name))
            elif _is_module_factory(layer):
                self.children_.append(layer(name=hk_name))
            elif isinstance(layer, hk.Module):
                raise TypeError(
                    f"`layers[{key!r}]` is a {type(layer).__name__} instance, built outside this Sequential, so its "
                    f"parameters cannot sit under torch's path: pass its class or a functools.partial of it "
                    f"(built here as factory(name={hk_name!r})), as torch's children live under their container."
                )
            elif callable(layer):
                self.children_.append(layer)
            else:
                raise TypeError(f"`layers[{key!r}]` must be a Haiku module or a function, got {layer!r}.")

    @classmethod
    def from_torch(cls, module, *, name: str | None = None):
        """A ``Sequential`` of the torch ``nn.Sequential``'s children converted one by one (``Linear``,
        ``Conv1d``/``Conv2d``, ``BatchNorm1d``/``BatchNorm2d``, ``LayerNorm``, ``Dropout``, activations, nested
        ``Sequential``s, ``MultiheadAttention``, torchvision's ``SqueezeExcitation``) with their weights."""
        layers = {k: from_torch(child) for k, child in cfg.sequential_children(module).items()}
        layer = cls(layers, name=name)
        layer.set_initial_state_dict(cfg.state_dict_from_torch(module))
        return layer

    def _children(self) -> dict[str, TorchModule]:
        return {k: c for k, c in zip(self.names, self.children_, strict=True) if isinstance(c, TorchModule)}

    def __getitem__(self, key: int | str) -> Any:
        """The child at index ``key`` or of torch name ``key``."""
        if isinstance(key, str):
            return self.children_[self.names.index(key)]
        return self.children_[key]

    def __len__(self) -> int:
        return len(self.children_)

    def __call__(self, x: Any, *, inference: bool = False) -> Any:
        """The layers applied in order; ``inference`` goes to each child whose call takes it."""
        child: Any
        for child in self.children_:
            if isinstance(child, hk.Module) and "inference" in _call_parameters(type(child)):
                x = child(x, inference=inference)  # pyright: ignore[reportCallIssue]
            else:
                x = child(x)  # pyright: ignore[reportCallIssue]
        return x


@functools.cache
def _call_parameters(cls: type) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.__call__).parameters)


def from_torch(module: Any, *, name: str | None = None) -> Any:
    """The noxton Haiku module (or JAX function, for an activation) of a torch module, with its configuration
    and, through ``init``, its weights: how [`Sequential.from_torch`][noxton.haiku.Sequential.from_torch]
    converts each child."""
    import noxton.haiku

    return cfg.layer_from_torch(module, noxton.haiku, name=name)
