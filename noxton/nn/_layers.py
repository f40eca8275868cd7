"""torch-layout building blocks as Equinox modules: ``Conv1d``, ``Conv2d``, ``BatchNorm1d``, ``BatchNorm2d``,
``Dropout`` and the container ``Sequential``, adapted from (or calling) the Haiku modules of the same names."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from noxton.functional._checks import (
    check_bool,
    check_inference,
    check_positive_float,
    check_positive_int,
    check_prng_key,
    check_probability,
)
from noxton.functional._layers import check_conv_options
from noxton.functional._transformer import dropout
from noxton.haiku import _common as hkc
from noxton.haiku import _layers as hkl
from noxton.interop import _from_torch as cfg
from noxton.interop._keys import TORCH_BUFFERS
from noxton.nn._adapter import ROOT, Adapted, Module, from_torch_weights


class _ConvNd(Adapted):
    weight: Array
    bias: Array | None
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    kernel_size: tuple[int, ...] = eqx.field(static=True)
    stride: tuple[int, ...] = eqx.field(static=True)
    padding: str | tuple[int, ...] = eqx.field(static=True)
    dilation: tuple[int, ...] = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    _spatial: ClassVar[int]

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
        key: PRNGKeyArray,
        dtype=None,
    ):
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
        self.use_bias = check_bool("bias", bias)
        self.dtype = hkc.resolve_dtype(dtype)
        sd = self._initial_state_dict(key)
        self.weight, self.bias = sd["weight"], sd.get("bias")

    @classmethod
    def from_torch(cls, module):
        """A layer with the configuration and weights of the torch convolution (``padding_mode="zeros"``)."""
        config = cfg.conv_config_from_torch(module)
        return from_torch_weights(module, lambda key: cls(**config, key=key))

    def __call__(self, x: Float[ArrayLike, "channels ..."], *, key: PRNGKeyArray | None = None) -> Array:
        """torch's convolution of one example ``x``; ``key`` is accepted and ignored."""
        del key
        n = self._spatial
        if getattr(x, "ndim", None) != n + 1:
            layout = "(C, L)" if n == 1 else "(C, H, W)"
            raise ValueError(f"`x` must have shape {layout}, got {getattr(x, 'shape', x)!r}: batch it with `jax.vmap`.")
        return self._apply(None, x)


class Conv1d(_ConvNd):
    """torch's ``nn.Conv1d`` (``padding_mode="zeros"``), parameters in torch's layout.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: an int or one per spatial axis.
        stride: an int or one per spatial axis. Default 1.
        padding: an int, one per spatial axis, ``"same"`` or ``"valid"``. Default 0.
        dilation: an int or one per spatial axis. Default 1.
        groups: torch's ``groups`` (``in_channels`` for a depthwise convolution). Default 1.
        bias: a learnable ``bias``. Default ``True``.
        key: PRNG key for the initialisation (torch's).
        dtype: parameter dtype; ``None`` is float32.

    Attributes:
        weight: ``(out_channels, in_channels // groups, kernel_size)``.
        bias: ``(out_channels,)`` (torch's shape, unlike ``eqx.nn.Conv1d``'s ``(C, 1)``), or ``None``.

    Shape:
        - x: ``(C_in, L)`` (``jax.vmap`` for a batch); output: ``(C_out, L_out)``.
    """

    haiku_module = hkl.Conv1d
    _spatial = 1


class Conv2d(_ConvNd):
    """torch's ``nn.Conv2d`` (``padding_mode="zeros"``), parameters in torch's layout.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: an int or one per spatial axis.
        stride: an int or one per spatial axis. Default 1.
        padding: an int, one per spatial axis, ``"same"`` or ``"valid"``. Default 0.
        dilation: an int or one per spatial axis. Default 1.
        groups: torch's ``groups`` (``in_channels`` for a depthwise convolution). Default 1.
        bias: a learnable ``bias``. Default ``True``.
        key: PRNG key for the initialisation (torch's).
        dtype: parameter dtype; ``None`` is float32.

    Attributes:
        weight: ``(out_channels, in_channels // groups, kH, kW)``.
        bias: ``(out_channels,)``, or ``None``.

    Shape:
        - x: ``(C_in, H, W)`` (``jax.vmap`` for a batch); output: ``(C_out, H_out, W_out)``.

    Example:
        >>> import jax
        >>> from noxton.nn import Conv2d
        >>> conv = Conv2d(3, 8, 3, stride=2, padding=1, key=jax.random.PRNGKey(0))
        >>> conv(jax.numpy.ones((3, 16, 16))).shape, conv.weight.shape
        ((8, 8, 8), (8, 3, 3, 3))
    """

    haiku_module = hkl.Conv2d
    _spatial = 2


class _BatchNorm(Adapted, eqx.nn.StatefulLayer):
    weight: Array | None
    bias: Array | None
    state_index: eqx.nn.StateIndex
    inference: bool
    num_features: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    affine: bool = eqx.field(static=True)
    axis_name: Any = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    #: torch's buffers, kept in the ``eqx.nn.State``: ``load_torch_state_dict(..., state=)`` reads them there.
    torch_buffers: ClassVar[tuple[str, ...]] = TORCH_BUFFERS
    _rank: ClassVar[tuple[int, ...]]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        *,
        inference: bool = False,
        axis_name: Any = "batch",
        dtype=None,
    ):
        self.num_features = check_positive_int("num_features", num_features)
        self.eps = check_positive_float("eps", eps)
        self.momentum = None if momentum is None else check_probability("momentum", momentum)
        self.affine = check_bool("affine", affine)
        self.inference = check_inference(inference, "equinox")
        self.axis_name = axis_name
        self.dtype = hkc.resolve_dtype(dtype)
        key = jax.random.PRNGKey(0)  # ones, zeros: the key draws nothing
        sd = self._initial_state_dict(key)
        self.weight, self.bias = sd.get("weight"), sd.get("bias")
        self.state_index = self._initial_state(key)

    @classmethod
    def from_torch(cls, module):
        """A layer with the torch BatchNorm's configuration, weights and running statistics (the initial
        state: ``eqx.nn.State(model)`` holds them), ``inference = not module.training``."""
        config = cfg.batch_norm_config_from_torch(module)
        layer = cls(**config, inference=not module.training)
        sd = cfg.state_dict_from_torch(module)
        if layer.affine:
            layer = eqx.tree_at(
                lambda m: (m.weight, m.bias),
                layer,
                (jnp.asarray(sd["weight"], layer.dtype), jnp.asarray(sd["bias"], layer.dtype)),
            )
        stats = {n: jnp.asarray(sd[n], jnp.int32 if n == "num_batches_tracked" else layer.dtype) for n in TORCH_BUFFERS}
        return eqx.tree_at(lambda m: m.state_index, layer, eqx.nn.StateIndex({ROOT: stats}))

    def __call__(
        self,
        x: Float[ArrayLike, "channels ..."],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Array, eqx.nn.State]:
        """Normalise one example ``x``; returns ``(y, state)``.

        In training (``inference=False``, torch's ``train()``) the statistics are the batch's, over the
        ``jax.vmap`` axis named ``axis_name`` (``jax.vmap(bn, axis_name="batch", in_axes=(0, None),
        out_axes=(0, None))``, as ``eqx.nn.BatchNorm``), and the running ones in ``state`` move as torch's.
        In inference they are the running ones. ``key`` is accepted and ignored.
        """
        del key
        inference = self.inference if inference is None else check_bool("inference", inference)
        if getattr(x, "ndim", None) not in self._rank:
            raise ValueError(
                f"`x` must be one example of rank {' or '.join(map(str, self._rank))} (C, ...), got shape "
                f"{getattr(x, 'shape', x)!r}: batch it with `jax.vmap(..., axis_name={self.axis_name!r})`."
            )
        out, state = self._apply(None, jnp.asarray(x)[None], inference=inference, axis_name=self.axis_name, state=state)
        return out[0], state


class BatchNorm1d(_BatchNorm):
    """torch's ``nn.BatchNorm1d``, exactly, with its running statistics in ``eqx.nn.State``.

    Unlike ``eqx.nn.BatchNorm``: ``momentum`` is torch's (the weight of the new batch, default ``0.1``,
    ``None`` for the cumulative average); training normalises by the batch's statistics and updates the
    running variance with the **unbiased** batch variance; the running statistics start at zeros and ones
    (not at the first batch's); and ``num_batches_tracked`` is counted. Build with
    ``eqx.nn.make_with_state``; ``eqx.nn.inference_mode`` toggles ``inference`` (torch's ``eval()``).

    Args:
        num_features: ``C``.
        eps: added to the variance. Default ``1e-5`` (torchvision's MobileNetV3: ``1e-3``).
        momentum: torch's. Default ``0.1`` (MobileNetV3: ``0.01``).
        affine: learnable ``weight`` and ``bias``.
        inference: use the running statistics (torch's ``eval()``).
        axis_name: the ``jax.vmap`` axis of the batch in training.
        dtype: parameter dtype.

    Attributes:
        weight: ``(C,)`` or ``None``; bias: ``(C,)`` or ``None``.
        state_index: ``running_mean``, ``running_var``, ``num_batches_tracked`` in the ``eqx.nn.State``.

    Shape:
        - x: ``(C,)`` or ``(C, L)``, one example; output: the same.
    """

    haiku_module = hkl.BatchNorm1d
    _rank = (1, 2)


class BatchNorm2d(_BatchNorm):
    """torch's ``nn.BatchNorm2d``, exactly (see [`BatchNorm1d`][noxton.nn.BatchNorm1d]).

    Shape:
        - x: ``(C, H, W)``, one example; output: the same.

    Example:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> from noxton.nn import BatchNorm2d
        >>> bn, state = eqx.nn.make_with_state(BatchNorm2d)(3, eps=1e-3, momentum=0.01)
        >>> x = jnp.ones((2, 3, 4, 4))
        >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        >>> _, state = train(x, state)
        >>> stats = state.get(bn.state_index)["module"]
        >>> tuple(round(v, 4) for v in stats["running_mean"].tolist())
        (0.01, 0.01, 0.01)
    """

    haiku_module = hkl.BatchNorm2d
    _rank = (3,)


class Dropout(Module):
    """torch's ``nn.Dropout(p)``: zeros with probability ``p`` and scales the rest by ``1 / (1 - p)`` unless
    ``inference`` (``eqx.nn.inference_mode`` toggles it); the identity when ``p == 0``.

    Shape:
        - x: any; output: the same.
    """

    inference: bool
    p: float = eqx.field(static=True)

    def __init__(self, p: float = 0.5, *, inference: bool = False):
        self.p = check_probability("p", p)
        self.inference = check_inference(inference, "equinox")

    @classmethod
    def from_torch(cls, module) -> Dropout:
        """``Dropout(module.p, inference=not module.training)``."""
        return cls(**cfg.dropout_config_from_torch(module), inference=not module.training)

    def __call__(
        self, x: Float[ArrayLike, "*shape"], *, key: PRNGKeyArray | None = None, inference: bool | None = None
    ) -> Array:
        """``x`` with dropout, drawn from ``key``, unless in inference or ``p == 0``."""
        inference = self.inference if inference is None else check_bool("inference", inference)
        x = jnp.asarray(x)
        if inference or self.p == 0.0:
            return x
        return dropout(x, self.p, check_prng_key("key", key))


_NO_STATE = object()


class Sequential(Module, eqx.nn.StatefulLayer):
    """torch's ``nn.Sequential``: layers called in the order given, named as torch names them.

    ``layers`` is a sequence (children ``0``, ``1``, ...) or a mapping of names to layers, as
    ``nn.Sequential(OrderedDict(...))`` (torchvision's ``encoder_layer_0``, ``head``; open_clip's ``c_fc``).
    The layers are held in a tuple, so they run in the order given under ``jax.jit`` and after
    ``load_torch_state_dict`` (a dict of layers would be flattened, and run, in sorted key order:
    ``encoder_layer_10`` before ``encoder_layer_2``), and ``torch_state_dict``/``load_torch_state_dict``
    name them as torch does (``mlp.c_fc.weight``, ``mlp.0.weight``). A child is reached as torch's:
    ``seq[0]``, ``seq["c_fc"]`` or ``seq.c_fc``.

    As ``eqx.nn.Sequential``: ``key`` is split, one per layer, and passed as ``key=``; ``state`` (an
    ``eqx.nn.State``) is threaded through the stateful layers (BatchNorm) and returned. A plain function
    (``jax.nn.relu``) is called as is.

    Shape:
        - x: what the first layer takes; output: what the last returns.

    Example:
        >>> import collections, jax
        >>> from noxton.nn import Linear, Sequential
        >>> from noxton.functional import gelu
        >>> k1, k2 = jax.random.split(jax.random.PRNGKey(0))
        >>> layers = collections.OrderedDict(c_fc=Linear(4, 16, key=k1), gelu=gelu, c_proj=Linear(16, 4, key=k2))
        >>> mlp = Sequential(layers)
        >>> mlp(jax.numpy.ones(4)).shape, sorted(mlp.state_dict())
        ((4,), ['c_fc.bias', 'c_fc.weight', 'c_proj.bias', 'c_proj.weight'])
    """

    layers: tuple
    names: tuple[str, ...] = eqx.field(static=True)

    #: ``noxton.interop`` names child ``layers[i]`` by ``names[i]``, as torch's ``nn.Sequential``.
    torch_container: ClassVar[bool] = True

    def __init__(self, layers: Sequence[Callable] | Mapping[str, Callable]):
        if isinstance(layers, Mapping):
            items = list(layers.items())
            bad = [k for k, _ in items if not isinstance(k, str) or not k or "." in k]
            if bad:
                raise ValueError(f"`layers` must be keyed by torch's child names (str, no '.'), got {bad}.")
        elif isinstance(layers, Sequence) and not isinstance(layers, str):
            items = [(str(i), layer) for i, layer in enumerate(layers)]
        else:
            raise TypeError(
                f"`layers` must be a sequence or a mapping of names to layers, got {type(layers).__name__}."
            )
        not_callable = [k for k, layer in items if not callable(layer)]
        if not_callable:
            raise TypeError(f"`layers` must hold callables, got non-callable children {not_callable}.")
        self.layers = tuple(layer for _, layer in items)
        self.names = tuple(k for k, _ in items)

    @classmethod
    def from_torch(cls, module) -> Sequential:
        """A ``Sequential`` of the torch ``nn.Sequential``'s children converted one by one
        (see [`noxton.nn.from_torch`][noxton.nn.from_torch]), with their names."""
        return cls({k: from_torch(child) for k, child in cfg.sequential_children(module).items()})

    def is_stateful(self) -> bool:
        return any(isinstance(x, eqx.nn.StatefulLayer) and x.is_stateful() for x in self.layers)

    def __call__(self, x: Any, state: Any = _NO_STATE, *, key: PRNGKeyArray | None = None) -> Any:
        """The layers applied in order: the output, or ``(output, state)`` when ``state`` is given."""
        keys = [None] * len(self.layers) if key is None else list(jax.random.split(key, len(self.layers)))
        layer: Any
        for layer, k in zip(self.layers, keys, strict=True):
            if isinstance(layer, eqx.nn.StatefulLayer) and layer.is_stateful():
                if state is _NO_STATE:
                    raise TypeError(
                        f"`state` must be given: {type(layer).__name__} keeps state (build the model with "
                        "eqx.nn.make_with_state and call it with its eqx.nn.State)."
                    )
                x, state = layer(x, state=state, key=k)
            elif isinstance(layer, eqx.Module):
                x = layer(x, key=k)  # pyright: ignore[reportCallIssue]
            else:
                x = layer(x)
        return x if state is _NO_STATE else (x, state)

    def __getitem__(self, key: int | str) -> Any:
        """The child at index ``key``, or of torch name ``key``."""
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(f"{key!r} is not a child of this Sequential, whose children are {list(self.names)}.")
            return self.layers[self.names.index(key)]
        return self.layers[key]

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_") and name not in ("layers", "names") and name in self.__dict__.get("names", ()):
            return self.layers[self.names.index(name)]
        raise AttributeError(f"{type(self).__name__} has no attribute or child {name!r}.")

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        yield from self.layers


def from_torch(module: Any) -> Any:
    """The noxton Equinox layer (or JAX function, for an activation) of a torch module: ``Linear``,
    ``Conv1d``/``Conv2d``, ``BatchNorm1d``/``BatchNorm2d`` (its running statistics in the initial state:
    ``eqx.nn.State(model)``), ``LayerNorm``, ``Dropout``, ``MultiheadAttention``, torchvision's
    ``SqueezeExcitation``, ``Sequential`` (recursively, names kept) and the activations (their exact JAX
    functions, as [`activation_from_torch`][noxton.interop.activation_from_torch]).

    Example:
        >>> import torch
        >>> import noxton
        >>> block = noxton.nn.from_torch(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        ...                                                  torch.nn.Hardswish()).eval())
        >>> [type(layer).__name__ for layer in block.layers], block[1].inference
        (['Conv2d', 'BatchNorm2d', 'PjitFunction'], True)
    """
    import noxton.nn

    return cfg.layer_from_torch(module, noxton.nn)
