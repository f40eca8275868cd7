"""``noxton.nn`` Transformer layers: the Equinox front ends of the Haiku modules.

Each holds its submodules under torch's names (``layer.self_attn``,
``layer.linear1``, ``layer.norm1``, ``encoder.layers[0]``, ``model.encoder.norm``)
and runs the corresponding ``noxton.haiku`` module's ``apply`` on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from noxton.functional._checks import (
    check_array,
    check_dropout_key,
    check_inference,
    check_positive_int,
    check_prng_key,
    check_transformer_config,
    is_hashable,
)
from noxton.functional._transformer import square_subsequent_mask
from noxton.haiku import _transformer as hkt
from noxton.haiku._common import resolve_dtype
from noxton.interop._from_torch import (
    transformer_config_from_torch,
    transformer_layer_config_from_torch,
    transformer_stack_config_from_torch,
)
from noxton.interop._state_dict import haiku_state_dict
from noxton.nn._adapter import HaikuLayer, from_torch_weights, transformed
from noxton.nn._attention import MultiheadAttention
from noxton.nn._linear import LayerNorm, Linear

Mask = Bool[ArrayLike, "..."] | Float[ArrayLike, "..."] | None

_LAYER_CONFIG = (
    "d_model",
    "nhead",
    "dim_feedforward",
    "dropout",
    "activation",
    "layer_norm_eps",
    "norm_first",
    "bias",
    "dtype",
)


def _sub(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _check_unbatched(name: str, x, d_model: int, layout: str) -> None:
    check_array(name, x, min_rank=2, max_rank=2, layout=layout)
    if x.shape[-1] != d_model:
        raise ValueError(f"`{name}` must have d_model={d_model} features in its last axis, got shape {tuple(x.shape)}.")


def _dropout_key(module, dropout_key):
    inference = check_inference(module.inference, "equinox")
    return inference, check_dropout_key(0.0 if inference else module.dropout, dropout_key, "equinox")


def _norm_config(norm: LayerNorm | None, dtype) -> tuple | None:
    if norm is None:
        return None
    return (
        ("normalized_shape", norm.weight.shape[0]),
        ("eps", norm.eps),
        ("bias", norm.bias is not None),
        ("dtype", dtype),
    )


class _Layer(HaikuLayer):
    """The configuration shared by the encoder and decoder layers, as static fields."""

    d_model: int = eqx.field(static=True)
    nhead: int = eqx.field(static=True)
    dim_feedforward: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    activation: Callable[[Array], Array] = eqx.field(static=True)
    layer_norm_eps: float = eqx.field(static=True)
    norm_first: bool = eqx.field(static=True)
    bias: bool = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    _attentions = ()
    _norms = ()

    def _init_layer(
        self,
        d_model,
        nhead,
        dim_feedforward,
        dropout,
        activation,
        layer_norm_eps,
        norm_first,
        bias,
        inference,
        key,
        dtype,
    ):
        c = check_transformer_config(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, norm_first, bias
        )
        if not is_hashable(c["activation"]):
            raise TypeError(
                "`activation` must be hashable, as a static field of an Equinox module is (a function such as "
                f"jax.nn.relu), got the unhashable {type(c['activation']).__name__} {c['activation']!r}."
            )
        for name, value in c.items():
            setattr(self, name, value)
        self.dtype = resolve_dtype(dtype)
        self.inference = check_inference(inference, "equinox")
        sd = self._initial_state_dict(key)
        for name, child in self._children(sd, self.layer_config(), self.inference).items():
            setattr(self, name, child)

    @classmethod
    def _children(cls, sd, config, inference) -> dict[str, Any]:
        out = {}
        for attn in cls._attentions:
            out[attn] = MultiheadAttention._from_state_dict(
                _sub(sd, attn + "."),
                embed_dim=config["d_model"],
                num_heads=config["nhead"],
                dropout=config["dropout"],
                bias=config["bias"],
                inference=inference,
                dtype=config["dtype"],
            )
        for lin in ("linear1", "linear2"):
            out[lin] = Linear(sd[f"{lin}.weight"], sd.get(f"{lin}.bias"))
        for norm in cls._norms:
            out[norm] = LayerNorm._from_arrays(sd[f"{norm}.weight"], sd.get(f"{norm}.bias"), config["layer_norm_eps"])
        return out

    @classmethod
    def _from_state_dict(cls, sd, config, inference):
        """A layer holding ``sd`` (its torch keys) with ``config``, without a random initialisation."""
        return cls._from_fields(**config, **cls._children(sd, config, inference), inference=inference)

    def layer_config(self) -> dict[str, Any]:
        """The constructor's configuration (activation as its JAX function) and dtype."""
        return {name: getattr(self, name) for name in _LAYER_CONFIG}

    def _config(self) -> tuple[tuple[str, Any], ...]:
        return tuple(self.layer_config().items())

    @classmethod
    def _from_torch(cls, module, decoder):
        config = transformer_layer_config_from_torch(module, decoder)
        # `cls` is a concrete layer class, whose __init__ pyright cannot see from the base.
        layer_cls: Any = cls
        return from_torch_weights(module, lambda key: layer_cls(**config, inference=not module.training, key=key))


class TransformerEncoderLayer(_Layer):
    """A 1-to-1 JAX/Equinox port of ``torch.nn.TransformerEncoderLayer``.

    Self-attention then a feed-forward network, each with a residual connection
    and a LayerNorm: post-norm (``norm_first=False``, torch's default)
    ``x = norm1(x + dropout1(self_attn(x))); x = norm2(x + dropout2(ff(x)))``, or
    pre-norm ``x = x + dropout1(self_attn(norm1(x))); x = x + dropout2(ff(norm2(x)))``,
    where ``ff(x) = linear2(dropout(activation(linear1(x))))``. Inputs are
    unbatched, as every ``eqx.nn`` layer's: batch with ``jax.vmap``.

    Args:
        d_model: ``E``, the model width.
        nhead: attention heads; ``d_model`` must be divisible by it.
        dim_feedforward: the feed-forward width. Default 2048.
        dropout: the probability of all four dropouts (attention weights,
            ``dropout1``, ``dropout``, ``dropout2``). Default 0.1, as torch's.
        activation: ``"relu"`` (default), ``"gelu"`` (exact erf, as torch's) or a JAX callable.
        layer_norm_eps: the norms' ``eps``. Default ``1e-5``.
        norm_first: pre-norm instead of post-norm.
        bias: biases in the attention, the linears and the norms.
        inference: disable dropout (``eqx.nn.inference_mode`` toggles it).
        key: PRNG key for parameter initialisation.
        dtype: parameter dtype; ``None`` is float32 (float64 under ``jax_enable_x64``).

    Attributes:
        self_attn: a [`MultiheadAttention`][noxton.nn.MultiheadAttention].
        linear1: a [`Linear`][noxton.nn.Linear], ``weight`` ``(F, E)``.
        linear2: a [`Linear`][noxton.nn.Linear], ``weight`` ``(E, F)``.
        norm1: a [`LayerNorm`][noxton.nn.LayerNorm].
        norm2: a [`LayerNorm`][noxton.nn.LayerNorm].


    Shape:
        - src: ``(S, E)``; output: ``(S, E)``.
        - src_mask: ``(S, S)`` or ``(nhead, S, S)``; src_key_padding_mask: ``(S,)``.

    Differences from torch:
        - Unbatched ``(S, E)`` inputs (``jax.vmap`` for ``N``); no ``batch_first``.
        - torch's inference fast path (``eval()`` without gradients, padded batches
          inside ``nn.TransformerEncoder``) returns zeros at padded positions; this
          layer always computes them as torch's reference path does. Non-padded
          positions agree.
        - ``is_causal=True`` without ``src_mask`` builds the causal mask (torch needs the mask).

    Example:
        >>> import jax
        >>> from noxton.nn import TransformerEncoderLayer
        >>> key = jax.random.PRNGKey(0)
        >>> layer = TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, key=key)
        >>> x = jax.random.normal(key, (10, 16))
        >>> layer(x, is_causal=True, dropout_key=key).shape
        (10, 16)
        >>> " ".join(sorted(layer.state_dict())[:3])
        'linear1.bias linear1.weight linear2.bias'
    """

    self_attn: MultiheadAttention
    linear1: Linear
    linear2: Linear
    norm1: LayerNorm
    norm2: LayerNorm
    inference: bool

    haiku_cls = hkt.TransformerEncoderLayer
    haiku_name = "transformer_encoder_layer"
    _attentions = ("self_attn",)
    _norms = ("norm1", "norm2")

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Array], Array] = "relu",
        layer_norm_eps: float = 1e-5,
        norm_first: bool = False,
        bias: bool = True,
        inference: bool = False,
        *,
        key: PRNGKeyArray,
        dtype=None,
    ):
        self._init_layer(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            norm_first,
            bias,
            inference,
            key,
            dtype,
        )

    @classmethod
    def from_torch(cls, module) -> TransformerEncoderLayer:
        """A layer with the configuration (activation mapped to its exact JAX function,
        ``inference = not module.training``) and the weights of a torch ``nn.TransformerEncoderLayer``.

        Example:
            >>> import torch
            >>> from noxton.nn import TransformerEncoderLayer
            >>> torch_layer = torch.nn.TransformerEncoderLayer(16, 4, 32, activation="gelu")
            >>> layer = TransformerEncoderLayer.from_torch(torch_layer)
            >>> layer.activation.__name__, layer.linear1.weight.shape, layer.inference
            ('gelu', (32, 16), False)
        """
        return cls._from_torch(module, False)

    def __call__(
        self,
        src: Float[ArrayLike, "src_len d_model"],
        src_mask: Mask = None,
        src_key_padding_mask: Mask = None,
        is_causal: bool = False,
        dropout_key: PRNGKeyArray | None = None,
        *,
        implementation: str = "auto",
    ) -> Float[Array, "src_len d_model"]:
        """Encode ``src``.

        Args:
            src: ``(S, E)``.
            src_mask: ``(S, S)`` or ``(nhead, S, S)``, bool (True = not allowed) or float (added).
            src_key_padding_mask: ``(S,)``, bool (True = padding) or float.
            is_causal: without ``src_mask``, the causal mask; with it, a hint (the mask is used).
            dropout_key: PRNG key, needed when ``dropout > 0`` and not ``inference``.
            implementation: the attention path; ``"auto"`` takes the memory-efficient
                blockwise path for long sequences (see [`MultiheadAttention`][noxton.nn.MultiheadAttention]).
        """
        inference, dropout_key = _dropout_key(self, dropout_key)
        _check_unbatched("src", src, self.d_model, "(S, E)")
        return self._apply(
            dropout_key,
            src,
            src_mask,
            src_key_padding_mask,
            is_causal,
            inference=inference,
            implementation=implementation,
        )


class TransformerDecoderLayer(_Layer):
    """A 1-to-1 JAX/Equinox port of ``torch.nn.TransformerDecoderLayer``.

    Self-attention (``self_attn``, ``dropout1``, ``norm1``), attention to the
    encoder's ``memory`` (``multihead_attn``, ``dropout2``, ``norm2``) and the
    feed-forward (``linear1``, ``dropout``, ``linear2``, ``dropout3``, ``norm3``),
    post-norm or, with ``norm_first``, pre-norm. Arguments as
    [`TransformerEncoderLayer`][noxton.nn.TransformerEncoderLayer]'s.

    Attributes:
        self_attn: a [`MultiheadAttention`][noxton.nn.MultiheadAttention].
        multihead_attn: a [`MultiheadAttention`][noxton.nn.MultiheadAttention].
        linear1: a [`Linear`][noxton.nn.Linear].
        linear2: a [`Linear`][noxton.nn.Linear].
        norm1: a [`LayerNorm`][noxton.nn.LayerNorm].
        norm2: a [`LayerNorm`][noxton.nn.LayerNorm].
        norm3: a [`LayerNorm`][noxton.nn.LayerNorm].

    Shape:
        - tgt: ``(L, E)``; memory: ``(S, E)``; output: ``(L, E)``.
        - tgt_mask: ``(L, L)``; memory_mask: ``(L, S)`` (or per head);
          tgt_key_padding_mask: ``(L,)``; memory_key_padding_mask: ``(S,)``.

    Example:
        >>> import jax
        >>> from noxton.nn import TransformerDecoderLayer
        >>> key = jax.random.PRNGKey(0)
        >>> layer = TransformerDecoderLayer(16, 4, 32, inference=True, key=key)
        >>> layer(jax.numpy.ones((3, 16)), jax.numpy.ones((5, 16)), tgt_is_causal=True).shape
        (3, 16)
    """

    self_attn: MultiheadAttention
    multihead_attn: MultiheadAttention
    linear1: Linear
    linear2: Linear
    norm1: LayerNorm
    norm2: LayerNorm
    norm3: LayerNorm
    inference: bool

    haiku_cls = hkt.TransformerDecoderLayer
    haiku_name = "transformer_decoder_layer"
    _attentions = ("self_attn", "multihead_attn")
    _norms = ("norm1", "norm2", "norm3")

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Array], Array] = "relu",
        layer_norm_eps: float = 1e-5,
        norm_first: bool = False,
        bias: bool = True,
        inference: bool = False,
        *,
        key: PRNGKeyArray,
        dtype=None,
    ):
        self._init_layer(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            norm_first,
            bias,
            inference,
            key,
            dtype,
        )

    @classmethod
    def from_torch(cls, module) -> TransformerDecoderLayer:
        """A layer with the configuration and weights of a torch ``nn.TransformerDecoderLayer``."""
        return cls._from_torch(module, True)

    def __call__(
        self,
        tgt: Float[ArrayLike, "tgt_len d_model"],
        memory: Float[ArrayLike, "src_len d_model"],
        tgt_mask: Mask = None,
        memory_mask: Mask = None,
        tgt_key_padding_mask: Mask = None,
        memory_key_padding_mask: Mask = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        dropout_key: PRNGKeyArray | None = None,
        *,
        implementation: str = "auto",
    ) -> Float[Array, "tgt_len d_model"]:
        """Decode ``tgt`` ``(L, E)`` attending to ``memory`` ``(S, E)``; masks and hints as torch's."""
        inference, dropout_key = _dropout_key(self, dropout_key)
        _check_unbatched("tgt", tgt, self.d_model, "(L, E)")
        _check_unbatched("memory", memory, self.d_model, "(S, E)")
        return self._apply(
            dropout_key,
            tgt,
            memory,
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            tgt_is_causal,
            memory_is_causal,
            inference=inference,
            implementation=implementation,
        )


class _Stack(HaikuLayer):
    num_layers: int = eqx.field(static=True)

    _layer_cls = _Layer  # the layer class: each stack sets its own

    def _init_stack(self, layer, num_layers, norm, arg):
        if not isinstance(layer, self._layer_cls):
            raise TypeError(f"`{arg}` must be a noxton.nn.{self._layer_cls.__name__}, got {type(layer).__name__}.")
        if norm is not None and not isinstance(norm, LayerNorm):
            raise TypeError(f"`norm` must be a noxton.nn.LayerNorm or None, got {type(norm).__name__}.")
        self.num_layers = check_positive_int("num_layers", num_layers)
        # torch's _get_clones: num_layers copies of `layer`, weights included.
        self.layers = [layer] * self.num_layers
        self.norm = norm
        self.inference = layer.inference

    @property
    def dropout(self) -> float:
        return self.layers[0].dropout

    @property
    def d_model(self) -> int:
        return self.layers[0].d_model

    def _config(self) -> tuple[tuple[str, Any], ...]:
        config = self.layers[0].layer_config()
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, self._layer_cls) or layer.layer_config() != config:
                raise ValueError(
                    f"`layers[{i}]` must be a {self._layer_cls.__name__} configured as layers[0] ({config}): a "
                    "stack's layers share one configuration, as torch's copies of one layer."
                )
        if len(self.layers) != self.num_layers:
            raise ValueError(f"`layers` must hold num_layers={self.num_layers} layers, got {len(self.layers)}.")
        return (
            ("layer", tuple(config.items())),
            ("num_layers", self.num_layers),
            ("norm", _norm_config(self.norm, config["dtype"])),
        )

    @classmethod
    def _from_state_dict(cls, sd, config, num_layers, norm_eps, inference):
        layers = [
            cls._layer_cls._from_state_dict(_sub(sd, f"layers.{i}."), config, inference) for i in range(num_layers)
        ]
        norm = None
        if "norm.weight" in sd:
            norm = LayerNorm._from_arrays(sd["norm.weight"], sd.get("norm.bias"), norm_eps)
        return cls._from_fields(layers=layers, norm=norm, num_layers=num_layers, inference=inference)

    @classmethod
    def _from_torch(cls, module, decoder):
        cfg = transformer_stack_config_from_torch(module, decoder)
        # `cls` and `cls._layer_cls` are concrete classes, whose __init__ pyright cannot see from the base.
        layer_cls: Any = cls._layer_cls

        def build(key):
            layer = layer_cls(**cfg["layer"], inference=not module.training, key=key)
            norm = None if cfg["norm"] is None else LayerNorm(**cfg["norm"], dtype=cfg["layer"]["dtype"])
            return cls(layer, cfg["num_layers"], norm)  # pyright: ignore[reportCallIssue, reportArgumentType]

        return from_torch_weights(module, build)


class TransformerEncoder(_Stack):
    """A 1-to-1 JAX/Equinox port of ``torch.nn.TransformerEncoder``: ``num_layers`` encoder layers, then ``norm``.

    As torch's, the layers start as copies of ``encoder_layer`` (its weights
    included); they train apart. The layers run one after another in one program,
    each a call of one jitted layer function, so that JAX traces one layer once
    whatever the depth.

    Args:
        encoder_layer: a [`TransformerEncoderLayer`][noxton.nn.TransformerEncoderLayer].
        num_layers: the number of layers.
        norm: a [`LayerNorm`][noxton.nn.LayerNorm] applied last, or ``None``.

    Attributes:
        layers: a list of ``num_layers`` [`TransformerEncoderLayer`][noxton.nn.TransformerEncoderLayer]s,
            keys ``layers.0.self_attn.in_proj_weight`` ...
        norm: the [`LayerNorm`][noxton.nn.LayerNorm] or ``None``.

    Shape:
        - src: ``(S, E)``; mask: ``(S, S)`` or ``(nhead, S, S)``; src_key_padding_mask: ``(S,)``; output: ``(S, E)``.

    Differences from torch:
        - torch's ``enable_nested_tensor`` fast path (``eval()``, no gradients, a
          ``src_key_padding_mask``) returns zeros at padded positions; noxton always
          computes them (as torch with ``enable_nested_tensor=False``). Non-padded
          positions agree. ``enable_nested_tensor`` and ``mask_check`` are not arguments.

    Example:
        >>> import jax
        >>> from noxton.nn import LayerNorm, TransformerEncoder, TransformerEncoderLayer
        >>> key = jax.random.PRNGKey(0)
        >>> layer = TransformerEncoderLayer(16, 4, 32, inference=True, key=key)
        >>> encoder = TransformerEncoder(layer, num_layers=6, norm=LayerNorm(16))
        >>> encoder(jax.numpy.ones((10, 16))).shape
        (10, 16)
        >>> encoder.state_dict()["layers.5.norm2.weight"].shape
        (16,)
    """

    layers: list[TransformerEncoderLayer]
    norm: LayerNorm | None
    inference: bool

    haiku_cls = hkt.TransformerEncoder
    haiku_name = "transformer_encoder"
    _layer_cls = TransformerEncoderLayer

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: LayerNorm | None = None):
        self._init_stack(encoder_layer, num_layers, norm, "encoder_layer")

    @classmethod
    def from_torch(cls, module) -> TransformerEncoder:
        """An encoder with the configuration (its first layer's, its depth, its ``norm``) and
        weights of a torch ``nn.TransformerEncoder``."""
        return cls._from_torch(module, False)

    def __call__(
        self,
        src: Float[ArrayLike, "src_len d_model"],
        mask: Mask = None,
        src_key_padding_mask: Mask = None,
        is_causal: bool | None = None,
        dropout_key: PRNGKeyArray | None = None,
        *,
        implementation: str = "auto",
    ) -> Float[Array, "src_len d_model"]:
        """Encode ``src`` through every layer, then ``norm``; arguments as
        [`TransformerEncoderLayer`][noxton.nn.TransformerEncoderLayer]'s (``mask`` is its ``src_mask``)."""
        inference, dropout_key = _dropout_key(self, dropout_key)
        _check_unbatched("src", src, self.d_model, "(S, E)")
        return self._apply(
            dropout_key, src, mask, src_key_padding_mask, is_causal, inference=inference, implementation=implementation
        )


class TransformerDecoder(_Stack):
    """A 1-to-1 JAX/Equinox port of ``torch.nn.TransformerDecoder``: ``num_layers`` decoder layers, then ``norm``.

    Args:
        decoder_layer: a [`TransformerDecoderLayer`][noxton.nn.TransformerDecoderLayer]; the layers start as its copies.
        num_layers: the number of layers.
        norm: a [`LayerNorm`][noxton.nn.LayerNorm] applied last, or ``None``.

    Attributes:
        layers: a list of [`TransformerDecoderLayer`][noxton.nn.TransformerDecoderLayer]s.
        norm: the [`LayerNorm`][noxton.nn.LayerNorm] or ``None``.

    Shape:
        - tgt: ``(L, E)``; memory: ``(S, E)``; output: ``(L, E)``.

    Example:
        >>> import jax
        >>> from noxton.nn import TransformerDecoder, TransformerDecoderLayer
        >>> layer = TransformerDecoderLayer(16, 4, 32, inference=True, key=jax.random.PRNGKey(0))
        >>> TransformerDecoder(layer, 2)(jax.numpy.ones((3, 16)), jax.numpy.ones((5, 16))).shape
        (3, 16)
    """

    layers: list[TransformerDecoderLayer]
    norm: LayerNorm | None
    inference: bool

    haiku_cls = hkt.TransformerDecoder
    haiku_name = "transformer_decoder"
    _layer_cls = TransformerDecoderLayer

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int, norm: LayerNorm | None = None):
        self._init_stack(decoder_layer, num_layers, norm, "decoder_layer")

    @classmethod
    def from_torch(cls, module) -> TransformerDecoder:
        """A decoder with the configuration and weights of a torch ``nn.TransformerDecoder``."""
        return cls._from_torch(module, True)

    def __call__(
        self,
        tgt: Float[ArrayLike, "tgt_len d_model"],
        memory: Float[ArrayLike, "src_len d_model"],
        tgt_mask: Mask = None,
        memory_mask: Mask = None,
        tgt_key_padding_mask: Mask = None,
        memory_key_padding_mask: Mask = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
        dropout_key: PRNGKeyArray | None = None,
        *,
        implementation: str = "auto",
    ) -> Float[Array, "tgt_len d_model"]:
        """Decode ``tgt`` through every layer, then ``norm``; arguments as
        [`TransformerDecoderLayer`][noxton.nn.TransformerDecoderLayer]'s."""
        inference, dropout_key = _dropout_key(self, dropout_key)
        _check_unbatched("tgt", tgt, self.d_model, "(L, E)")
        _check_unbatched("memory", memory, self.d_model, "(S, E)")
        return self._apply(
            dropout_key,
            tgt,
            memory,
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            tgt_is_causal,
            memory_is_causal,
            inference=inference,
            implementation=implementation,
        )


class Transformer(HaikuLayer):
    """A 1-to-1 JAX/Equinox port of ``torch.nn.Transformer``: an encoder and a decoder, each ending in a LayerNorm.

    Initialised as torch's: every parameter of rank > 1 Xavier-uniform
    (``_reset_parameters``), each drawn separately; vectors (biases, norms) equal
    across layers, as torch's cloned layers.

    Args:
        d_model: ``E``. Default 512.
        nhead: heads. Default 8.
        num_encoder_layers: Default 6.
        num_decoder_layers: Default 6.
        dim_feedforward: Default 2048.
        dropout: Default 0.1.
        activation: ``"relu"`` (default), ``"gelu"`` (exact) or a JAX callable.
        layer_norm_eps: Default ``1e-5``.
        norm_first: pre-norm layers.
        bias: biases in every attention, linear and norm.
        inference: disable dropout (``eqx.nn.inference_mode`` toggles it).
        key: PRNG key for parameter initialisation.
        dtype: parameter dtype; ``None`` is float32 (float64 under ``jax_enable_x64``).

    Attributes:
        encoder: a [`TransformerEncoder`][noxton.nn.TransformerEncoder] with a ``norm``.
        decoder: a [`TransformerDecoder`][noxton.nn.TransformerDecoder] with a ``norm``.

    Shape:
        - src: ``(S, E)``; tgt: ``(L, E)``; output: ``(L, E)``.
        - src_mask: ``(S, S)``; tgt_mask: ``(L, L)``; memory_mask: ``(L, S)`` (or per head).
        - src_key_padding_mask: ``(S,)``; tgt_key_padding_mask: ``(L,)``; memory_key_padding_mask: ``(S,)``.

    Differences from torch: no ``custom_encoder``/``custom_decoder`` (compose a
    [`TransformerEncoder`][noxton.nn.TransformerEncoder] and a
    [`TransformerDecoder`][noxton.nn.TransformerDecoder], or your own modules, instead)
    and no ``batch_first`` (inputs are unbatched).

    Example:
        >>> import jax
        >>> from noxton.nn import Transformer
        >>> model = Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
        ...                     dim_feedforward=32, inference=True, key=jax.random.PRNGKey(0))
        >>> src, tgt = jax.numpy.ones((7, 16)), jax.numpy.ones((5, 16))
        >>> model(src, tgt, tgt_mask=Transformer.generate_square_subsequent_mask(5)).shape
        (5, 16)
        >>> model.state_dict()["decoder.layers.1.multihead_attn.out_proj.bias"].shape
        (16,)
    """

    encoder: TransformerEncoder
    decoder: TransformerDecoder
    inference: bool
    d_model: int = eqx.field(static=True)
    nhead: int = eqx.field(static=True)

    haiku_cls = hkt.Transformer
    haiku_name = "transformer"

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Array], Array] = "relu",
        layer_norm_eps: float = 1e-5,
        norm_first: bool = False,
        bias: bool = True,
        inference: bool = False,
        *,
        key: PRNGKeyArray,
        dtype=None,
    ):
        c = check_transformer_config(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, norm_first, bias
        )
        n_enc = check_positive_int("num_encoder_layers", num_encoder_layers)
        n_dec = check_positive_int("num_decoder_layers", num_decoder_layers)
        self.d_model, self.nhead = c["d_model"], c["nhead"]
        self.inference = check_inference(inference, "equinox")
        layer_config = dict(c, dtype=resolve_dtype(dtype))
        haiku_config = (*layer_config.items(), ("num_encoder_layers", n_enc), ("num_decoder_layers", n_dec))
        # The Haiku module's init (through the adapter's cached factory): children are built from its state_dict.
        init = transformed(self.haiku_cls, self.haiku_name, haiku_config).init
        sd = haiku_state_dict(init(check_prng_key("key", key)), self.haiku_name)
        eps = c["layer_norm_eps"]
        self.encoder = TransformerEncoder._from_state_dict(
            _sub(sd, "encoder."), layer_config, n_enc, eps, self.inference
        )
        self.decoder = TransformerDecoder._from_state_dict(
            _sub(sd, "decoder."), layer_config, n_dec, eps, self.inference
        )

    @staticmethod
    def generate_square_subsequent_mask(sz: int, dtype=None) -> Float[Array, "sz sz"]:
        """The causal mask, as torch's: ``(sz, sz)``, ``-inf`` above the diagonal, ``0.0`` elsewhere."""
        return square_subsequent_mask(sz, dtype)

    @property
    def dropout(self) -> float:
        return self.encoder.dropout

    @classmethod
    def from_torch(cls, module) -> Transformer:
        """A model with the configuration and weights of a torch ``nn.Transformer`` (built without
        ``custom_encoder``/``custom_decoder``); ``inference = not module.training``.

        Example:
            >>> import torch
            >>> from noxton.nn import Transformer
            >>> model = Transformer.from_torch(torch.nn.Transformer(16, 4, 2, 1, 32).eval())
            >>> len(model.encoder.layers), len(model.decoder.layers), model.inference
            (2, 1, True)
        """
        config = transformer_config_from_torch(module)
        return from_torch_weights(module, lambda key: cls(**config, inference=not module.training, key=key))

    def _config(self) -> tuple[tuple[str, Any], ...]:
        enc, dec = self.encoder._config(), self.decoder._config()
        layer = dict(dict(enc)["layer"])
        norm = dict(dict(enc)["norm"] or ())
        expected_norm = dict(
            normalized_shape=layer["d_model"], eps=layer["layer_norm_eps"], bias=layer["bias"], dtype=layer["dtype"]
        )
        if dict(dict(dec)["layer"]) != layer or norm != expected_norm or dict(dict(dec)["norm"] or ()) != norm:
            raise ValueError(
                "`encoder` and `decoder` must share one layer configuration and each end in a LayerNorm(d_model, "
                "layer_norm_eps, bias), as built by Transformer(...): compose TransformerEncoder and "
                "TransformerDecoder yourself for other structures."
            )
        return (
            *layer.items(),
            ("num_encoder_layers", dict(enc)["num_layers"]),
            ("num_decoder_layers", dict(dec)["num_layers"]),
        )

    def __call__(
        self,
        src: Float[ArrayLike, "src_len d_model"],
        tgt: Float[ArrayLike, "tgt_len d_model"],
        src_mask: Mask = None,
        tgt_mask: Mask = None,
        memory_mask: Mask = None,
        src_key_padding_mask: Mask = None,
        tgt_key_padding_mask: Mask = None,
        memory_key_padding_mask: Mask = None,
        src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
        dropout_key: PRNGKeyArray | None = None,
        *,
        implementation: str = "auto",
    ) -> Float[Array, "tgt_len d_model"]:
        """``decoder(tgt, encoder(src))`` with torch's masks and hints (see the class docstring)."""
        inference, dropout_key = _dropout_key(self, dropout_key)
        _check_unbatched("src", src, self.d_model, "(S, E)")
        _check_unbatched("tgt", tgt, self.d_model, "(L, E)")
        return self._apply(
            dropout_key,
            src,
            tgt,
            src_mask,
            tgt_mask,
            memory_mask,
            src_key_padding_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            src_is_causal,
            tgt_is_causal,
            memory_is_causal,
            inference=inference,
            implementation=implementation,
        )
