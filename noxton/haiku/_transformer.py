"""torch's ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``, ``nn.TransformerEncoder``,
``nn.TransformerDecoder`` and ``nn.Transformer`` as Haiku modules.

Each creates its submodules in ``__init__`` under torch's names and inherits torch's
forward from ``noxton.functional._transformer``, which calls them: ``hk.intercept_methods``,
``hk.custom_getter`` and a module put in place of a child see every call.
"""

from __future__ import annotations

from collections.abc import Callable

import haiku as hk
import jax
from jaxtyping import Array, Float

from noxton.functional import _transformer as F
from noxton.functional._checks import check_positive_int, check_transformer_config
from noxton.haiku import _initializers as init
from noxton.haiku._attention import MultiheadAttention
from noxton.haiku._common import HaikuRun, LayerNorm, Linear, TorchModule, clone, resolve_dtype
from noxton.interop._from_torch import (
    state_dict_from_torch,
    transformer_config_from_torch,
    transformer_layer_config_from_torch,
    transformer_stack_config_from_torch,
)
from noxton.interop._keys import haiku_module_name


class _Layer(TorchModule):
    """The encoder and decoder layers' constructor: the configuration and torch's children."""

    _attentions: tuple[str, ...] = ()
    _norms: tuple[str, ...] = ()

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
        for attr, value in c.items():  # each constructor argument as the attribute of its name (for clone)
            setattr(self, attr, value)
        self.dtype = dt = resolve_dtype(dtype)
        d, f, b, eps = c["d_model"], c["dim_feedforward"], c["bias"], c["layer_norm_eps"]
        for attn in self._attentions:
            setattr(self, attn, MultiheadAttention(d, c["nhead"], c["dropout"], bias=b, dtype=dt, name=attn))
        self.linear1 = Linear(d, f, b, dtype=dt, name="linear1")
        self.linear2 = Linear(f, d, b, dtype=dt, name="linear2")
        for norm in self._norms:
            setattr(self, norm, LayerNorm(d, eps, bias=b, dtype=dt, name=norm))


class TransformerEncoderLayer(F.EncoderLayerForward, _Layer):
    """torch's ``nn.TransformerEncoderLayer``: self-attention and a feed-forward network, exactly, as a Haiku module.

    Post-norm (``norm_first=False``, torch's default)::

        x = norm1(x + dropout1(self_attn(x, x, x)))
        x = norm2(x + dropout2(linear2(dropout(activation(linear1(x))))))

    or pre-norm (``norm_first=True``): ``x = x + dropout1(self_attn(norm1(x)))``, then
    ``x = x + dropout2(ff(norm2(x)))``. Each name is a submodule, called there.

    Arguments as [`noxton.nn.TransformerEncoderLayer`][noxton.nn.TransformerEncoderLayer]'s (torch's:
    ``d_model``, ``nhead``, ``dim_feedforward=2048``, ``dropout=0.1``, ``activation="relu"``,
    ``layer_norm_eps=1e-5``, ``norm_first=False``, ``bias=True``; keyword-only ``dtype``), plus the
    Haiku module ``name``; no ``inference`` or ``key`` (pass ``inference=True`` to a call).

    Submodules, named as torch's: ``self_attn`` (a [`MultiheadAttention`][noxton.haiku.MultiheadAttention]),
    ``linear1`` and ``linear2`` ([`Linear`][noxton.haiku.Linear]s, ``weight`` ``(F, E)`` and ``(E, F)``),
    ``norm1`` and ``norm2`` ([`LayerNorm`][noxton.haiku.LayerNorm]s).

    Shape:
        - src: ``[..., S, E]``; output: ``[..., S, E]``.
        - src_mask: ``(S, S)``, ``(nhead, S, S)`` or ``[..., nhead, S, S]``; src_key_padding_mask: ``[..., S]``.

    Dropout draws from ``hk.next_rng_key()`` unless the call passes ``inference=True`` (torch's ``eval()``).

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
    __call__ = F.EncoderLayerForward.__call__  # in the class body, so that Haiku wraps it in the module's scope
    _config_from_torch = staticmethod(transformer_layer_config_from_torch)


class TransformerDecoderLayer(F.DecoderLayerForward, _Layer):
    """torch's ``nn.TransformerDecoderLayer``: self-attention, attention to ``memory`` and a feed-forward network.

    Post-norm (torch's default)::

        x = norm1(x + dropout1(self_attn(x, x, x)))
        x = norm2(x + dropout2(multihead_attn(x, memory, memory)))
        x = norm3(x + dropout3(linear2(dropout(activation(linear1(x))))))

    or pre-norm with ``norm_first=True``. Arguments, dropout and submodules as
    [`TransformerEncoderLayer`][noxton.haiku.TransformerEncoderLayer], plus
    ``multihead_attn`` and ``norm3``.

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
    __call__ = F.DecoderLayerForward.__call__
    init_cache = F.DecoderLayerForward.init_cache
    decode = F.DecoderLayerForward.decode

    @staticmethod
    def _config_from_torch(module):
        return transformer_layer_config_from_torch(module, decoder=True)


class _StackRun(HaikuRun):
    """A stack's call: at ``init``, each layer after the first starts from the first's values (torch's
    clones), its matrices drawn afresh under ``nn.Transformer``'s re-initialisation."""

    def __init__(self, stack: _Stack, inference: bool, implementation: str):
        super().__init__(0.0, inference, implementation)
        self.stack, self.first = stack, None

    def layer(self, layer, *args, **kwargs):
        if hk.running_init() and isinstance(layer, TorchModule):
            if self.first is not None:
                fresh = self.stack.matrix_init is not None
                clone = {k: v for k, v in self.first.items() if not fresh or v.ndim <= 1}
                layer.set_initial_state_dict({**clone, **layer.initial_state_dict})
            out = super().layer(layer, *args, **kwargs)
            if self.first is None:
                self.first = layer.state_dict_params()
            return out
        return super().layer(layer, *args, **kwargs)


class _Stack(TorchModule):
    """The stacks' constructor: ``num_layers`` clones of the template layer named ``layers__{i}``, and ``norm``."""

    _layer_cls: type[_Layer]
    _layer_arg: str

    def __init__(self, layer: _Layer, num_layers: int, norm: LayerNorm | None = None, *, name: str | None = None):
        super().__init__(name=name)
        if not isinstance(layer, self._layer_cls):
            raise TypeError(
                f"`{self._layer_arg}` must be a noxton.haiku.{self._layer_cls.__name__} (the template each layer "
                f"copies, as torch's), got {type(layer).__name__}."
            )
        if norm is not None and not isinstance(norm, LayerNorm):
            raise TypeError(f"`norm` must be a noxton.haiku.LayerNorm or None, got {type(norm).__name__}.")
        self.num_layers = check_positive_int("num_layers", num_layers)
        # torch's _get_clones: every layer starts as a copy of the template (which itself holds no parameters).
        self.layers = [clone(layer, haiku_module_name("layers", i)) for i in range(self.num_layers)]
        self.norm = None if norm is None else clone(norm, "norm")

    def _run(self, *, inference: bool = False, implementation: str = "auto") -> HaikuRun:
        return _StackRun(self, inference, implementation)


class TransformerEncoder(F.EncoderForward, _Stack):
    """torch's ``nn.TransformerEncoder``: ``num_layers`` copies of ``encoder_layer``, called in turn, then ``norm``.

    Args:
        encoder_layer: a [`TransformerEncoderLayer`][noxton.haiku.TransformerEncoderLayer],
            the template: each layer has its configuration and starts from its
            initial weights (torch deep-copies it; the template itself holds no parameters).
        num_layers: the number of layers.
        norm: a [`LayerNorm`][noxton.haiku.LayerNorm] applied last, or ``None`` (torch's default).
        name: the Haiku module name.

    Submodules: ``layers`` (a list; Haiku names ``layers__0``, ``layers__1`` ...; torch keys
    ``layers.0.*``) and ``norm``. Replace ``layers[i]`` before the first call to mix layers.

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
    _layer_arg = "encoder_layer"
    __call__ = F.EncoderForward.__call__

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm=None, *, name=None):
        super().__init__(encoder_layer, num_layers, norm, name=name)

    @classmethod
    def from_torch(cls, module, *, name: str | None = None) -> TransformerEncoder:
        """An encoder with the configuration (its first layer's, its depth and its ``norm``) and
        the weights of the torch ``nn.TransformerEncoder`` ``module``."""
        return _stack_from_torch(cls, module, False, name)


class TransformerDecoder(F.DecoderForward, _Stack):
    """torch's ``nn.TransformerDecoder``: ``num_layers`` copies of ``decoder_layer``, called in turn, then ``norm``.

    Arguments and submodules as [`TransformerEncoder`][noxton.haiku.TransformerEncoder]'s, with a
    [`TransformerDecoderLayer`][noxton.haiku.TransformerDecoderLayer] template.

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
    _layer_arg = "decoder_layer"
    __call__ = F.DecoderForward.__call__
    init_cache = F.DecoderForward.init_cache
    decode = F.DecoderForward.decode

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int, norm=None, *, name=None):
        super().__init__(decoder_layer, num_layers, norm, name=name)

    @classmethod
    def from_torch(cls, module, *, name: str | None = None) -> TransformerDecoder:
        """A decoder with the configuration and weights of the torch ``nn.TransformerDecoder`` ``module``."""
        return _stack_from_torch(cls, module, True, name)


def _stack_from_torch(cls, module, decoder, name):
    cfg = transformer_stack_config_from_torch(module, decoder)
    norm = None if cfg["norm"] is None else LayerNorm(**cfg["norm"], dtype=cfg["layer"]["dtype"])
    stack = cls(cls._layer_cls(**cfg["layer"]), cfg["num_layers"], norm, name=name)
    stack.set_initial_state_dict(state_dict_from_torch(module))
    return stack


class Transformer(F.TransformerForward, TorchModule):
    """torch's ``nn.Transformer``: an encoder and a decoder, each ending in a LayerNorm, exactly.

    Arguments as [`noxton.nn.Transformer`][noxton.nn.Transformer]'s (torch's: ``d_model=512``,
    ``nhead=8``, ``num_encoder_layers=6``, ``num_decoder_layers=6``, ``dim_feedforward=2048``,
    ``dropout=0.1``, ``activation="relu"``, ``layer_norm_eps=1e-5``, ``norm_first=False``,
    ``bias=True``; keyword-only ``dtype``), plus the Haiku module ``name``.

    Submodules ``encoder`` and ``decoder``; parameters as ``nn.Transformer``'s ``state_dict``
    (``encoder.layers.{i}.*``, ``encoder.norm.*``, ``decoder.layers.{i}.*``, ``decoder.norm.*``). As
    torch's ``_reset_parameters``, every parameter of rank > 1 is Xavier-uniform, each drawn
    separately; vectors (biases, norms) are the same in every layer, as torch's cloned layers.

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

    _config_from_torch = staticmethod(transformer_config_from_torch)
    __call__ = F.TransformerForward.__call__
    init_cache = F.TransformerForward.init_cache
    decode = F.TransformerForward.decode

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
