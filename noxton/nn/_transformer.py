"""``noxton.nn``'s Transformer layers: Equinox modules holding torch's children and calling them.

Each inherits torch's forward from ``noxton.functional._transformer``, as the Haiku
modules do, and holds its children under torch's names (``layer.self_attn``,
``layer.linear1``, ``layer.norm1``, ``encoder.layers[0]``, ``model.encoder.norm``):
replace one (``eqx.tree_at``) and the replacement runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from noxton.functional import _transformer as F
from noxton.functional._checks import (
    check_inference,
    check_positive_int,
    check_prng_key,
    check_transformer_config,
    is_hashable,
)
from noxton.haiku._common import resolve_dtype
from noxton.interop._from_torch import (
    transformer_config_from_torch,
    transformer_layer_config_from_torch,
    transformer_stack_config_from_torch,
)
from noxton.nn._adapter import Module, from_torch_weights
from noxton.nn._attention import MultiheadAttention
from noxton.nn._linear import LayerNorm, Linear


class _Layer(Module):
    """The encoder and decoder layers' configuration (static fields) and constructor."""

    d_model: int = eqx.field(static=True)
    nhead: int = eqx.field(static=True)
    dim_feedforward: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    activation: Callable[[Array], Array] = eqx.field(static=True)
    layer_norm_eps: float = eqx.field(static=True)
    norm_first: bool = eqx.field(static=True)
    bias: bool = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    _attentions: ClassVar[tuple[str, ...]] = ()
    _norms: ClassVar[tuple[str, ...]] = ()
    _decoder: ClassVar[bool] = False

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
        self.dtype = dt = resolve_dtype(dtype)
        inference = check_inference(inference, "equinox")
        self.inference = inference
        keys = iter(jax.random.split(check_prng_key("key", key), 4))
        d, f, b = self.d_model, self.dim_feedforward, self.bias
        for attn in self._attentions:
            mha = MultiheadAttention(d, self.nhead, self.dropout, b, inference=inference, key=next(keys), dtype=dt)
            setattr(self, attn, mha)
        self.linear1 = Linear(d, f, b, key=next(keys), dtype=dt)
        self.linear2 = Linear(f, d, b, key=next(keys), dtype=dt)
        for norm in self._norms:
            setattr(self, norm, LayerNorm(d, self.layer_norm_eps, b, dtype=dt))

    @classmethod
    def from_torch(cls, module):
        """A layer with the configuration (activation mapped to its exact JAX function,
        ``inference = not module.training``) and the weights of the torch layer ``module``.

        Example:
            >>> import torch
            >>> from noxton.nn import TransformerEncoderLayer
            >>> torch_layer = torch.nn.TransformerEncoderLayer(16, 4, 32, activation="gelu")
            >>> layer = TransformerEncoderLayer.from_torch(torch_layer)
            >>> layer.activation.__name__, layer.linear1.weight.shape, layer.inference
            ('gelu', (32, 16), False)
        """
        config = transformer_layer_config_from_torch(module, cls._decoder)
        return from_torch_weights(module, lambda key: cls(**config, inference=not module.training, key=key))


class TransformerEncoderLayer(F.EncoderLayerForward, _Layer):
    """A 1-to-1 JAX/Equinox port of ``torch.nn.TransformerEncoderLayer``.

    Self-attention then a feed-forward network, each with a residual connection
    and a LayerNorm: post-norm (``norm_first=False``, torch's default)
    ``x = norm1(x + dropout1(self_attn(x))); x = norm2(x + dropout2(ff(x)))``, or
    pre-norm ``x = x + dropout1(self_attn(norm1(x))); x = x + dropout2(ff(norm2(x)))``,
    where ``ff(x) = linear2(dropout(activation(linear1(x))))``. Each of those names is
    an attribute, called there: replace one (``eqx.tree_at``) with any module of the
    same call and it runs. Inputs are unbatched, as every ``eqx.nn`` layer's: batch with ``jax.vmap``.

    Args:
        d_model: ``E``, the model width.
        nhead: attention heads; ``d_model`` must be divisible by it.
        dim_feedforward: the feed-forward width. Default 2048.
        dropout: the probability of all four dropouts (attention weights,
            ``dropout1``, ``dropout``, ``dropout2``). Default 0.1, as torch's.
        activation: ``"relu"`` (default), ``"gelu"`` (exact erf, as torch's) or a hashable JAX callable.
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
        - The dropout key is the keyword ``dropout_key`` (or ``key``, as ``eqx.nn.Sequential`` passes it).

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

    _attentions = ("self_attn",)
    _norms = ("norm1", "norm2")
    __init__ = _Layer.__init__  # declared, so that type checkers do not synthesise a dataclass one


class TransformerDecoderLayer(F.DecoderLayerForward, _Layer):
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

    _attentions = ("self_attn", "multihead_attn")
    _norms = ("norm1", "norm2", "norm3")
    _decoder = True
    __init__ = _Layer.__init__


class _Stack(Module):
    """The stacks' constructor: ``num_layers`` copies of the layer (torch's ``_get_clones``), and ``norm``."""

    layers: list[Any]
    norm: Any

    _layer_cls: ClassVar[type[_Layer]]
    _layer_arg: ClassVar[str]

    def __init__(self, layer: _Layer, num_layers: int, norm: LayerNorm | None = None):
        if not isinstance(layer, self._layer_cls):
            raise TypeError(
                f"`{self._layer_arg}` must be a noxton.nn.{self._layer_cls.__name__}, got {type(layer).__name__}."
            )
        if norm is not None and not isinstance(norm, eqx.Module):
            raise TypeError(
                f"`norm` must be an Equinox module (a noxton.nn.LayerNorm) or None, got {type(norm).__name__}."
            )
        # Arrays are immutable: the same layer num_layers times is torch's deep copies, which train apart.
        self.layers = [layer] * check_positive_int("num_layers", num_layers)
        self.norm = norm

    @property
    def num_layers(self) -> int:
        """``len(self.layers)``."""
        return len(self.layers)

    @classmethod
    def from_torch(cls, module):
        """A stack with the configuration (its first layer's, its depth, its ``norm``) and the weights
        of the torch stack ``module``; ``inference = not module.training``."""
        cfg = transformer_stack_config_from_torch(module, cls._layer_cls._decoder)
        layer_cls: Any = cls._layer_cls

        def build(key):
            layer = layer_cls(**cfg["layer"], inference=not module.training, key=key)
            norm = None if cfg["norm"] is None else LayerNorm(**cfg["norm"], dtype=cfg["layer"]["dtype"])
            return cls(layer, cfg["num_layers"], norm)

        return from_torch_weights(module, build)


class TransformerEncoder(F.EncoderForward, _Stack):
    """A 1-to-1 JAX/Equinox port of ``torch.nn.TransformerEncoder``: ``num_layers`` encoder layers called in
    turn, then ``norm``.

    As torch's, the layers start as copies of ``encoder_layer`` (its weights
    included); they train apart. ``layers`` is a list, as torch's ``ModuleList``: replace,
    add or remove layers (of any configuration, any module with the layer's call) and the
    stack runs what it holds. Each layer is called through one jitted function, so that
    JAX traces a layer once whatever the depth (once per configuration in a mixed stack).

    Args:
        encoder_layer: a [`TransformerEncoderLayer`][noxton.nn.TransformerEncoderLayer].
        num_layers: the number of layers.
        norm: a [`LayerNorm`][noxton.nn.LayerNorm] applied last, or ``None``.

    Attributes:
        layers: a list of [`TransformerEncoderLayer`][noxton.nn.TransformerEncoderLayer]s,
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

    _layer_cls = TransformerEncoderLayer
    _layer_arg = "encoder_layer"

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: LayerNorm | None = None):
        super().__init__(encoder_layer, num_layers, norm)


class TransformerDecoder(F.DecoderForward, _Stack):
    """A 1-to-1 JAX/Equinox port of ``torch.nn.TransformerDecoder``: ``num_layers`` decoder layers called in
    turn, then ``norm``; as [`TransformerEncoder`][noxton.nn.TransformerEncoder].

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

    _layer_cls = TransformerDecoderLayer
    _layer_arg = "decoder_layer"

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int, norm: LayerNorm | None = None):
        super().__init__(decoder_layer, num_layers, norm)


class Transformer(F.TransformerForward, Module):
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
        activation: ``"relu"`` (default), ``"gelu"`` (exact) or a hashable JAX callable.
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

    Differences from torch: no ``custom_encoder``/``custom_decoder`` arguments (replace
    ``model.encoder`` or ``model.decoder`` with ``eqx.tree_at`` instead: any module with
    their call) and no ``batch_first`` (inputs are unbatched).

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
        k_enc, k_dec, k_init = jax.random.split(check_prng_key("key", key), 3)
        layer: dict[str, Any] = dict(
            d_model=d_model,
            nhead=nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            layer_norm_eps=layer_norm_eps,
            norm_first=norm_first,
            bias=bias,
            inference=inference,
            dtype=dtype,
        )
        enc = TransformerEncoderLayer(**layer, key=k_enc)

        def norm():
            return LayerNorm(enc.d_model, enc.layer_norm_eps, enc.bias, dtype=enc.dtype)

        n_enc = check_positive_int("num_encoder_layers", num_encoder_layers)
        n_dec = check_positive_int("num_decoder_layers", num_decoder_layers)
        parts = (
            TransformerEncoder(enc, n_enc, norm()),
            TransformerDecoder(TransformerDecoderLayer(**layer, key=k_dec), n_dec, norm()),
        )
        self.encoder, self.decoder = _xavier_matrices(parts, k_init)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, dtype=None) -> Float[Array, "sz sz"]:
        """The causal mask, as torch's: ``(sz, sz)``, ``-inf`` above the diagonal, ``0.0`` elsewhere."""
        return F.square_subsequent_mask(sz, dtype)

    @classmethod
    def from_torch(cls, module) -> Transformer:
        """A model with the configuration and weights of a torch ``nn.Transformer`` (built without
        ``custom_encoder``/``custom_decoder``); ``inference = not module.training``.

        Example:
            >>> import torch
            >>> from noxton.nn import Transformer
            >>> model = Transformer.from_torch(torch.nn.Transformer(16, 4, 2, 1, 32).eval())
            >>> len(model.encoder.layers), len(model.decoder.layers), model.encoder.layers[0].inference
            (2, 1, True)
        """
        config = transformer_config_from_torch(module)
        return from_torch_weights(module, lambda key: cls(**config, inference=not module.training, key=key))


def _xavier_matrices(tree, key):
    """``tree`` with every array of rank > 1 drawn afresh, Xavier-uniform, each with its own key
    (``nn.Transformer._reset_parameters``; fans as torch's for ``(out, in)`` weights)."""
    xavier = jax.nn.initializers.glorot_uniform(in_axis=1, out_axis=0)
    arrays, static = eqx.partition(tree, eqx.is_array)
    leaves, treedef = jax.tree.flatten(arrays)
    keys = jax.random.split(key, len(leaves))
    leaves = [xavier(k, x.shape, x.dtype) if x.ndim > 1 else x for k, x in zip(keys, leaves, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)
