"""torch's ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``, ``nn.TransformerEncoder``,
``nn.TransformerDecoder`` and ``nn.Transformer`` as Haiku modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
from jaxtyping import Array, ArrayLike, Bool, Float

from noxton.functional import _transformer as F
from noxton.functional._checks import (
    check_array,
    check_dropout_key,
    check_inference,
    check_positive_int,
    check_transformer_config,
)
from noxton.haiku import _initializers as init
from noxton.haiku._attention import MultiheadAttention
from noxton.haiku._common import Affine, LayerNorm, TorchModule, resolve_dtype
from noxton.interop._from_torch import (
    state_dict_from_torch,
    transformer_config_from_torch,
    transformer_layer_config_from_torch,
    transformer_stack_config_from_torch,
)
from noxton.interop._keys import haiku_module_name

Mask = Bool[ArrayLike, "..."] | Float[ArrayLike, "..."] | None


def _dropout_key(module, inference: bool):
    inference = check_inference(inference, "haiku")
    p = 0.0 if inference else module.dropout
    return p, check_dropout_key(p, hk.maybe_next_rng_key() if p > 0.0 else None, "haiku")


def _check_input(name, x, d_model, layout):
    check_array(name, x, min_rank=2, layout=layout)
    if x.shape[-1] != d_model:
        raise ValueError(f"`{name}` must have d_model={d_model} features in its last axis, got shape {tuple(x.shape)}.")


class _Layer(TorchModule):
    """Shared by the encoder and decoder layers: configuration, feed-forward and norms."""

    _norms: tuple[str, ...] = ()
    _attentions: tuple[str, ...] = ()

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[jax.Array], jax.Array] = "relu",
        layer_norm_eps: float = 1e-5,
        norm_first: bool = False,
        bias: bool = True,
        *,
        dtype=None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        c = check_transformer_config(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, norm_first, bias
        )
        self.d_model, self.nhead, self.dim_feedforward = c["d_model"], c["nhead"], c["dim_feedforward"]
        self.dropout, self.activation, self.layer_norm_eps = c["dropout"], c["activation"], c["layer_norm_eps"]
        self.norm_first, self.bias = c["norm_first"], c["bias"]
        self.dtype = resolve_dtype(dtype)
        d, f, dt = self.d_model, self.dim_feedforward, self.dtype
        for attn in self._attentions:
            setattr(self, attn, MultiheadAttention(d, self.nhead, self.dropout, bias=self.bias, dtype=dt, name=attn))
        self.linear1 = Affine(f, d, bias=self.bias, dtype=dt, name="linear1")
        self.linear2 = Affine(d, f, bias=self.bias, dtype=dt, name="linear2")
        for norm in self._norms:
            setattr(self, norm, LayerNorm(d, self.layer_norm_eps, bias=self.bias, dtype=dt, name=norm))

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments (activation as its JAX function)."""
        return dict(
            d_model=self.d_model,
            nhead=self.nhead,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            activation=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            norm_first=self.norm_first,
            bias=self.bias,
            dtype=self.dtype,
        )

    def state_dict_params(self) -> dict[str, jax.Array]:
        """Get (creating on first use) this layer's parameters, keyed by torch's names."""
        p = {}
        for attn in self._attentions:
            p.update({f"{attn}.{k}": v for k, v in getattr(self, attn).state_dict_params().items()})
        for sub in ("linear1", "linear2", *self._norms):
            p.update({f"{sub}.{k}": v for k, v in getattr(self, sub).params().items()})
        return p

    def _functional_kwargs(self, dropout_p, dropout_key, implementation) -> dict[str, Any]:
        return dict(
            num_heads=self.nhead,
            activation=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            norm_first=self.norm_first,
            dropout_p=dropout_p,
            dropout_key=dropout_key,
            implementation=implementation,
        )


class TransformerEncoderLayer(_Layer):
    """torch's ``nn.TransformerEncoderLayer``: self-attention and a feed-forward network, exactly, as a Haiku module.

    Post-norm (``norm_first=False``, torch's default)::

        x = norm1(x + dropout1(self_attn(x, x, x)))
        x = norm2(x + dropout2(linear2(dropout(activation(linear1(x))))))

    or pre-norm (``norm_first=True``): ``x = x + dropout1(self_attn(norm1(x)))``, then
    ``x = x + dropout2(ff(norm2(x)))``.

    Args:
        d_model: ``E``, the model width.
        nhead: the number of attention heads; ``d_model`` must be divisible by it.
        dim_feedforward: the feed-forward width. Default 2048.
        dropout: every dropout of the layer (attention weights, after attention,
            inside and after the feed-forward). Default 0.1, as torch's.
        activation: ``"relu"`` (default), ``"gelu"`` (exact erf, torch's ``F.gelu``) or a JAX callable.
        layer_norm_eps: the norms' ``eps``. Default ``1e-5``.
        norm_first: pre-norm instead of post-norm.
        bias: biases in the attention, the linears and the norms (torch's ``bias``).
        dtype: parameter dtype; ``None`` is float32 (float64 under ``jax_enable_x64``).
        name: the Haiku module name.

    Parameters, named and initialised as torch's ``state_dict``: ``self_attn.*``
    (a [`MultiheadAttention`][noxton.haiku.MultiheadAttention]), ``linear1.weight``
    ``(F, E)``, ``linear1.bias``, ``linear2.weight`` ``(E, F)``, ``linear2.bias``
    (torch's Linear initialisation), ``norm1.weight``/``norm2.weight`` (ones) and
    ``norm1.bias``/``norm2.bias`` (zeros).

    Shape:
        - src: ``[..., S, E]``; output: ``[..., S, E]``.
        - src_mask: ``(S, S)``, ``(nhead, S, S)`` or ``[..., nhead, S, S]``; src_key_padding_mask: ``[..., S]``.

    Dropout draws from ``hk.next_rng_key()`` unless ``inference=True`` (torch's ``eval()``).

    Example:
        >>> import haiku as hk, jax
        >>> from noxton.haiku import TransformerEncoderLayer
        >>> f = hk.transform(lambda x: TransformerEncoderLayer(16, 4, 32)(x, inference=True))
        >>> x = jax.numpy.ones((2, 5, 16))
        >>> params = f.init(jax.random.PRNGKey(0), x)
        >>> f.apply(params, None, x).shape
        (2, 5, 16)
    """

    _attentions = ("self_attn",)
    _norms = ("norm1", "norm2")

    @classmethod
    def from_torch(cls, module, *, name: str | None = None) -> TransformerEncoderLayer:
        """A layer with the configuration of the torch ``nn.TransformerEncoderLayer`` ``module``
        (activation mapped to its exact JAX function), whose ``init`` returns its weights.
        Pass ``inference=True`` to calls for torch's ``eval()``."""
        layer = cls(**transformer_layer_config_from_torch(module), name=name)
        layer.set_initial_state_dict(state_dict_from_torch(module))
        return layer

    def __call__(
        self,
        src: Float[ArrayLike, "*batch src_len d_model"],
        src_mask: Mask = None,
        src_key_padding_mask: Mask = None,
        is_causal: bool = False,
        *,
        inference: bool = False,
        implementation: str = "auto",
    ) -> Float[Array, "*batch src_len d_model"]:
        """Encode ``src``.

        Args:
            src: ``[..., S, E]``.
            src_mask: ``(S, S)`` or per head/batch; bool (True = not allowed) or float (added).
            src_key_padding_mask: ``[..., S]``; bool (True = padding) or float.
            is_causal: without ``src_mask``, the causal mask; with it, a hint (the mask is used).
            inference: switch dropout off.
            implementation: the attention path (``"auto"``: the memory-efficient
                blockwise path for long sequences; see [`MultiheadAttention`][noxton.haiku.MultiheadAttention]).
        """
        p, key = _dropout_key(self, inference)
        _check_input("src", src, self.d_model, "(..., S, E)")
        return F.transformer_encoder_layer(
            src,
            self.state_dict_params(),
            src_mask=src_mask,
            src_key_padding_mask=src_key_padding_mask,
            is_causal=is_causal,
            **self._functional_kwargs(p, key, implementation),
        )


class TransformerDecoderLayer(_Layer):
    """torch's ``nn.TransformerDecoderLayer``: self-attention, attention to ``memory`` and a feed-forward network.

    Post-norm (torch's default)::

        x = norm1(x + dropout1(self_attn(x, x, x)))
        x = norm2(x + dropout2(multihead_attn(x, memory, memory)))
        x = norm3(x + dropout3(linear2(dropout(activation(linear1(x))))))

    or pre-norm with ``norm_first=True``. Arguments, dropout and parameters as
    [`TransformerEncoderLayer`][noxton.haiku.TransformerEncoderLayer], plus
    ``multihead_attn.*`` and ``norm3.*``.

    Shape:
        - tgt: ``[..., L, E]``; memory: ``[..., S, E]``; output: ``[..., L, E]``.
        - tgt_mask: ``(L, L)``; memory_mask: ``(L, S)`` (or per head/batch);
          tgt_key_padding_mask: ``[..., L]``; memory_key_padding_mask: ``[..., S]``.

    Example:
        >>> import haiku as hk, jax
        >>> from noxton.haiku import TransformerDecoderLayer
        >>> f = hk.transform(lambda t, m: TransformerDecoderLayer(16, 4, 32)(t, m, tgt_is_causal=True, inference=True))
        >>> t, m = jax.numpy.ones((2, 3, 16)), jax.numpy.ones((2, 5, 16))
        >>> params = f.init(jax.random.PRNGKey(0), t, m)
        >>> f.apply(params, None, t, m).shape
        (2, 3, 16)
    """

    _attentions = ("self_attn", "multihead_attn")
    _norms = ("norm1", "norm2", "norm3")

    @classmethod
    def from_torch(cls, module, *, name: str | None = None) -> TransformerDecoderLayer:
        """A layer with the configuration of the torch ``nn.TransformerDecoderLayer`` ``module``,
        whose ``init`` returns its weights."""
        layer = cls(**transformer_layer_config_from_torch(module, decoder=True), name=name)
        layer.set_initial_state_dict(state_dict_from_torch(module))
        return layer

    def __call__(
        self,
        tgt: Float[ArrayLike, "*batch tgt_len d_model"],
        memory: Float[ArrayLike, "*batch src_len d_model"],
        tgt_mask: Mask = None,
        memory_mask: Mask = None,
        tgt_key_padding_mask: Mask = None,
        memory_key_padding_mask: Mask = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        inference: bool = False,
        implementation: str = "auto",
    ) -> Float[Array, "*batch tgt_len d_model"]:
        """Decode ``tgt`` attending to ``memory``; masks and hints as torch's (see the class docstring)."""
        p, key = _dropout_key(self, inference)
        _check_input("tgt", tgt, self.d_model, "(..., L, E)")
        _check_input("memory", memory, self.d_model, "(..., S, E)")
        return F.transformer_decoder_layer(
            tgt,
            memory,
            self.state_dict_params(),
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
            **self._functional_kwargs(p, key, implementation),
        )


class _Stack(TorchModule):
    _layer_cls: type[_Layer]

    def __init__(self, layer, num_layers: int, norm: LayerNorm | None = None, *, name: str | None = None):
        super().__init__(name=name)
        what = self._layer_cls.__name__
        if not isinstance(layer, self._layer_cls):
            raise TypeError(
                f"`{'decoder_layer' if what.endswith('DecoderLayer') else 'encoder_layer'}` must be a "
                f"noxton.haiku.{what} (the template each layer copies, as torch's), got {type(layer).__name__}."
            )
        if norm is not None and not isinstance(norm, LayerNorm):
            raise TypeError(f"`norm` must be a noxton.haiku.LayerNorm or None, got {type(norm).__name__}.")
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.layer_config = layer.config()
        self.dropout = self.layer_config["dropout"]
        self.d_model = self.layer_config["d_model"]
        # torch's _get_clones: every layer starts as a copy of `layer`, its weights included.
        self.layers = [
            self._layer_cls(**self.layer_config, name=haiku_module_name("layers", i)) for i in range(num_layers)
        ]
        for item in self.layers:
            item.set_initial_state_dict(layer.initial_state_dict)
        self.norm = None
        if norm is not None:
            self.norm = LayerNorm(norm.normalized_shape, norm.eps, bias=norm.bias, dtype=norm.dtype, name="norm")
            self.norm.set_initial_state_dict(norm.initial_state_dict)

    @classmethod
    def _from_config(cls, *, layer, num_layers, norm, name):
        """Build from hashable configs (the Equinox adapter's route): ``layer`` and ``norm`` as tuples of pairs."""
        template = cls._layer_cls(**dict(layer))
        norm_module = None if norm is None else LayerNorm(**dict(norm))
        return cls(template, num_layers, norm_module, name=name)

    def state_dict_params(self) -> dict[str, jax.Array]:
        """Get (creating on first use) every layer's parameters (``layers.0.*`` ...) and ``norm.*``.

        At ``init``, layers after the first copy its initial values, as torch's
        deep copies do; under [`Transformer`][noxton.haiku.Transformer] only the
        vectors are copied and every matrix is drawn afresh (torch's Xavier re-initialisation).
        """
        p, first = {}, None
        for i, layer in enumerate(self.layers):
            if first is not None:
                clone = {k: v for k, v in first.items() if self.matrix_init is None or v.ndim <= 1}
                layer.set_initial_state_dict({**clone, **layer.initial_state_dict})
            params = layer.state_dict_params()
            first = params if first is None else first
            p.update({f"layers.{i}.{k}": v for k, v in params.items()})
        if self.norm is not None:
            p.update({f"norm.{k}": v for k, v in self.norm.params().items()})
        return p

    def _functional_kwargs(self, dropout_p, dropout_key, implementation) -> dict[str, Any]:
        c = self.layer_config
        return dict(
            num_layers=self.num_layers,
            num_heads=c["nhead"],
            activation=c["activation"],
            layer_norm_eps=c["layer_norm_eps"],
            norm_first=c["norm_first"],
            norm_eps=None if self.norm is None else self.norm.eps,
            dropout_p=dropout_p,
            dropout_key=dropout_key,
            implementation=implementation,
        )


def _stack_from_torch(cls, module, decoder, name):
    cfg = transformer_stack_config_from_torch(module, decoder)
    template = cls._layer_cls(**cfg["layer"])
    norm = None if cfg["norm"] is None else LayerNorm(**cfg["norm"], dtype=cfg["layer"]["dtype"])
    stack = cls(template, cfg["num_layers"], norm, name=name)
    stack.set_initial_state_dict(state_dict_from_torch(module))
    return stack


class TransformerEncoder(_Stack):
    """torch's ``nn.TransformerEncoder``: ``num_layers`` copies of ``encoder_layer``, then ``norm``.

    The layers run one after another in one program, each a call of one jitted layer
    function, so that JAX traces one layer once whatever the depth.

    Args:
        encoder_layer: a [`TransformerEncoderLayer`][noxton.haiku.TransformerEncoderLayer],
            the template: each layer has its configuration and starts from its
            initial weights (torch deep-copies it; the template itself holds no parameters).
        num_layers: the number of layers.
        norm: a [`LayerNorm`][noxton.haiku.LayerNorm] applied last, or ``None`` (torch's default).
        name: the Haiku module name.

    Parameters: ``layers.{i}.*`` (each an encoder layer's) and ``norm.weight``/``norm.bias``.

    Shape:
        - src: ``[..., S, E]``; output: ``[..., S, E]``.
        - mask: ``(S, S)`` or per head/batch; src_key_padding_mask: ``[..., S]``.

    Example:
        >>> import haiku as hk, jax
        >>> from noxton.haiku import LayerNorm, TransformerEncoder, TransformerEncoderLayer
        >>> def f(x):
        ...     enc = TransformerEncoder(TransformerEncoderLayer(16, 4, 32), num_layers=3, norm=LayerNorm(16))
        ...     return enc(x, inference=True)
        >>> f = hk.transform(f)
        >>> x = jax.numpy.ones((2, 5, 16))
        >>> params = f.init(jax.random.PRNGKey(0), x)
        >>> f.apply(params, None, x).shape
        (2, 5, 16)
        >>> " ".join(sorted(params)[:2])
        'transformer_encoder/~/layers__0/~/linear1 transformer_encoder/~/layers__0/~/linear2'
    """

    _layer_cls = TransformerEncoderLayer

    def __init__(
        self,
        encoder_layer: TransformerEncoderLayer,
        num_layers: int,
        norm: LayerNorm | None = None,
        *,
        name: str | None = None,
    ):
        super().__init__(encoder_layer, num_layers, norm, name=name)

    @classmethod
    def from_torch(cls, module, *, name: str | None = None) -> TransformerEncoder:
        """An encoder with the configuration (read from its first layer, its depth and its
        ``norm``) and weights of the torch ``nn.TransformerEncoder`` ``module``."""
        return _stack_from_torch(cls, module, False, name)

    def __call__(
        self,
        src: Float[ArrayLike, "*batch src_len d_model"],
        mask: Mask = None,
        src_key_padding_mask: Mask = None,
        is_causal: bool | None = None,
        *,
        inference: bool = False,
        implementation: str = "auto",
    ) -> Float[Array, "*batch src_len d_model"]:
        """Encode ``src`` through every layer, then ``norm``; arguments as
        [`TransformerEncoderLayer`][noxton.haiku.TransformerEncoderLayer]'s (``mask`` is its ``src_mask``)."""
        p, key = _dropout_key(self, inference)
        _check_input("src", src, self.d_model, "(..., S, E)")
        return F.transformer_encoder(
            src,
            self.state_dict_params(),
            mask=mask,
            src_key_padding_mask=src_key_padding_mask,
            is_causal=is_causal,
            **self._functional_kwargs(p, key, implementation),
        )


class TransformerDecoder(_Stack):
    """torch's ``nn.TransformerDecoder``: ``num_layers`` copies of ``decoder_layer``, then ``norm``.

    The layers run as [`TransformerEncoder`][noxton.haiku.TransformerEncoder]'s.

    Args:
        decoder_layer: a [`TransformerDecoderLayer`][noxton.haiku.TransformerDecoderLayer], the template.
        num_layers: the number of layers.
        norm: a [`LayerNorm`][noxton.haiku.LayerNorm] applied last, or ``None``.
        name: the Haiku module name.

    Shape:
        - tgt: ``[..., L, E]``; memory: ``[..., S, E]``; output: ``[..., L, E]``.

    Example:
        >>> import haiku as hk, jax
        >>> from noxton.haiku import TransformerDecoder, TransformerDecoderLayer
        >>> decoder = lambda: TransformerDecoder(TransformerDecoderLayer(16, 4, 32), 2)
        >>> f = hk.transform(lambda t, m: decoder()(t, m, inference=True))
        >>> t, m = jax.numpy.ones((3, 16)), jax.numpy.ones((5, 16))
        >>> f.apply(f.init(jax.random.PRNGKey(0), t, m), None, t, m).shape
        (3, 16)
    """

    _layer_cls = TransformerDecoderLayer

    def __init__(
        self,
        decoder_layer: TransformerDecoderLayer,
        num_layers: int,
        norm: LayerNorm | None = None,
        *,
        name: str | None = None,
    ):
        super().__init__(decoder_layer, num_layers, norm, name=name)

    @classmethod
    def from_torch(cls, module, *, name: str | None = None) -> TransformerDecoder:
        """A decoder with the configuration and weights of the torch ``nn.TransformerDecoder`` ``module``."""
        return _stack_from_torch(cls, module, True, name)

    def __call__(
        self,
        tgt: Float[ArrayLike, "*batch tgt_len d_model"],
        memory: Float[ArrayLike, "*batch src_len d_model"],
        tgt_mask: Mask = None,
        memory_mask: Mask = None,
        tgt_key_padding_mask: Mask = None,
        memory_key_padding_mask: Mask = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
        *,
        inference: bool = False,
        implementation: str = "auto",
    ) -> Float[Array, "*batch tgt_len d_model"]:
        """Decode ``tgt`` through every layer, then ``norm``; arguments as
        [`TransformerDecoderLayer`][noxton.haiku.TransformerDecoderLayer]'s."""
        p, key = _dropout_key(self, inference)
        _check_input("tgt", tgt, self.d_model, "(..., L, E)")
        _check_input("memory", memory, self.d_model, "(..., S, E)")
        return F.transformer_decoder(
            tgt,
            memory,
            self.state_dict_params(),
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
            **self._functional_kwargs(p, key, implementation),
        )


class Transformer(TorchModule):
    """torch's ``nn.Transformer``: an encoder and a decoder, each ending in a LayerNorm, exactly.

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
        dtype: parameter dtype; ``None`` is float32 (float64 under ``jax_enable_x64``).
        name: the Haiku module name.

    Parameters, as ``nn.Transformer``'s ``state_dict``: ``encoder.layers.{i}.*``,
    ``encoder.norm.*``, ``decoder.layers.{i}.*``, ``decoder.norm.*``. As torch's
    ``_reset_parameters``, every parameter of rank > 1 is Xavier-uniform, each
    drawn separately; vectors (biases, norms) are the same in every layer, as
    torch's cloned layers.

    Shape:
        - src: ``[..., S, E]``; tgt: ``[..., L, E]``; output: ``[..., L, E]``.
        - src_mask: ``(S, S)``; tgt_mask: ``(L, L)``; memory_mask: ``(L, S)`` (or per head/batch).
        - src_key_padding_mask: ``[..., S]``; tgt_key_padding_mask: ``[..., L]``;
          memory_key_padding_mask: ``[..., S]``.

    Example:
        >>> import haiku as hk, jax
        >>> from noxton.haiku import Transformer
        >>> def f(src, tgt):
        ...     mask = Transformer.generate_square_subsequent_mask(tgt.shape[-2])
        ...     model = Transformer(16, 4, 2, 2, 32)
        ...     return model(src, tgt, tgt_mask=mask, inference=True)
        >>> f = hk.transform(f)
        >>> src, tgt = jax.numpy.ones((2, 7, 16)), jax.numpy.ones((2, 5, 16))
        >>> f.apply(f.init(jax.random.PRNGKey(0), src, tgt), None, src, tgt).shape
        (2, 5, 16)
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[jax.Array], jax.Array] = "relu",
        layer_norm_eps: float = 1e-5,
        norm_first: bool = False,
        bias: bool = True,
        *,
        dtype=None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        c = check_transformer_config(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, norm_first, bias
        )
        dtype = resolve_dtype(dtype)
        self.d_model, self.nhead = c["d_model"], c["nhead"]
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(**c, dtype=dtype),
            check_positive_int("num_encoder_layers", num_encoder_layers),
            LayerNorm(c["d_model"], c["layer_norm_eps"], bias=c["bias"], dtype=dtype),
            name="encoder",
        )
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(**c, dtype=dtype),
            check_positive_int("num_decoder_layers", num_decoder_layers),
            LayerNorm(c["d_model"], c["layer_norm_eps"], bias=c["bias"], dtype=dtype),
            name="decoder",
        )
        self.set_matrix_init(init.xavier_uniform)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, dtype=None) -> Float[Array, "sz sz"]:
        """The causal mask, as torch's: ``(sz, sz)``, ``-inf`` above the diagonal, ``0.0`` elsewhere."""
        return F.square_subsequent_mask(sz, dtype)

    @classmethod
    def from_torch(cls, module, *, name: str | None = None) -> Transformer:
        """A model with the configuration and weights of the torch ``nn.Transformer`` ``module``
        (built without ``custom_encoder``/``custom_decoder``: port those parts separately)."""
        model = cls(**transformer_config_from_torch(module), name=name)
        model.set_initial_state_dict(state_dict_from_torch(module))
        return model

    def state_dict_params(self) -> dict[str, jax.Array]:
        """Get (creating on first use) every parameter, keyed by torch's names."""
        p = {f"encoder.{k}": v for k, v in self.encoder.state_dict_params().items()}
        p.update({f"decoder.{k}": v for k, v in self.decoder.state_dict_params().items()})
        return p

    def __call__(
        self,
        src: Float[ArrayLike, "*batch src_len d_model"],
        tgt: Float[ArrayLike, "*batch tgt_len d_model"],
        src_mask: Mask = None,
        tgt_mask: Mask = None,
        memory_mask: Mask = None,
        src_key_padding_mask: Mask = None,
        tgt_key_padding_mask: Mask = None,
        memory_key_padding_mask: Mask = None,
        src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
        *,
        inference: bool = False,
        implementation: str = "auto",
    ) -> Float[Array, "*batch tgt_len d_model"]:
        """``decoder(tgt, encoder(src))`` with torch's masks and hints (see the class docstring)."""
        memory = self.encoder(
            src, src_mask, src_key_padding_mask, src_is_causal, inference=inference, implementation=implementation
        )
        return self.decoder(
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
