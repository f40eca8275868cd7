"""torch's ``nn.Transformer*`` forwards, written once against the layers' children.

torch's ``TransformerEncoderLayer.forward`` calls ``self.self_attn``, ``self.linear1``,
``self.linear2``, ``self.norm1``... and its ``TransformerEncoder`` loops ``for mod in
self.layers``. The classes here do the same: each holds one forward, and both front
ends' layers inherit it (``noxton.haiku``'s Haiku modules and ``noxton.nn``'s Equinox
modules), so that whatever a layer holds as a child (a LoRA wrapper, a subclass, a
layer of another configuration) is what runs. They import neither Haiku nor Equinox:
what differs between the front ends (where the dropout key comes from, the inputs'
rank, how a child is called) is a [`Run`][noxton.functional._transformer.Run], which
each front end builds at the start of a call from the call's options (Equinox:
``dropout_key``, ``key``, ``implementation``; Haiku: ``inference``, ``implementation``).

Shapes: ``*B`` leading batch dimensions (none in ``noxton.nn``, which batches with
``jax.vmap``), ``S`` source length, ``L`` target length, ``E = d_model``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float

from noxton.functional._attention import check_implementation
from noxton.functional._checks import (
    check_array,
    check_dropout_key,
    check_is_causal,
    check_positive_float,
    check_positive_int,
    lift,
    softmax_dtype,
)

Mask = Bool[ArrayLike, "..."] | Float[ArrayLike, "..."] | None


def square_subsequent_mask(sz: int, dtype=None) -> jax.Array:
    """torch's ``generate_square_subsequent_mask``: ``(sz, sz)``, ``-inf`` above the diagonal, ``0`` elsewhere.

    Example:
        >>> from noxton.functional import square_subsequent_mask
        >>> square_subsequent_mask(3)
        Array([[  0., -inf, -inf],
               [  0.,   0., -inf],
               [  0.,   0.,   0.]], dtype=float32)
    """
    sz = check_positive_int("sz", sz)
    dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
    upper = jnp.triu(jnp.ones((sz, sz), bool), k=1)
    return jnp.where(upper, -jnp.inf, 0.0).astype(dtype)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """torch's ``F.layer_norm`` over the last axis, statistics in float32 (float64 for float64 inputs).

    Args:
        x: ``[..., E]``.
        weight: ``(E,)`` or ``None``.
        bias: ``(E,)`` or ``None``.
        eps: added to the variance (biased, as torch's).
    """
    eps = check_positive_float("eps", eps)
    dtype = x.dtype
    c = softmax_dtype(dtype)
    xf = x.astype(c)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centred = xf - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * lax.rsqrt(var + eps)
    if weight is not None:
        y = y * lift(weight.astype(c), y.ndim)
    if bias is not None:
        y = y + lift(bias.astype(c), y.ndim)
    return y.astype(dtype)


def dropout(x, p: float, key):
    """Inverted dropout as torch's ``F.dropout`` in training: zero with probability ``p``, the rest scaled by 1/(1-p).
    ``p == 0`` returns ``x`` (and needs no key)."""
    if p == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0.0).astype(x.dtype)


class Run(abc.ABC):
    """One call of a layer: its dropout and how it calls its children, in one front end.

    Built by the layer's front end at the start of the call. Every dropout site of
    the layer and every child that draws randomness gets its own key, folded from
    the call's one key, in the order of torch's forward.

    Args:
        dropout_p: the layer's dropout probability, ``0.0`` when it is in inference mode.
        key: the call's PRNG key, or ``None``.
        implementation: the attention path passed to attention children (see
            [`multi_head_attention`][noxton.functional.multi_head_attention]).
    """

    #: Which front end's advice the errors give: "equinox" or "haiku".
    frontend: str

    def __init__(self, dropout_p: float, key: Any, implementation: str):
        self.dropout_p = dropout_p
        self.key = check_dropout_key(dropout_p, key, self.frontend)
        self.implementation = check_implementation(implementation)
        self._draws = 0

    def next_key(self) -> Any:
        """A fresh key folded from the call's key, or ``None`` when the call has none."""
        if self.key is None:
            return None
        self._draws += 1
        return jax.random.fold_in(self.key, self._draws)

    def dropout(self, x):
        """torch's ``self.dropout*(x)`` of the layer."""
        return x if self.dropout_p == 0.0 else dropout(x, self.dropout_p, self.next_key())

    @abc.abstractmethod
    def check(self, name: str, x: Any, d_model: int) -> None:
        """Validate an input ``[*B, T, d_model]`` with the front end's message."""

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """The front end's options of a child's call (its dropout key or inference flag, the attention path)."""

    def layer(self, layer: Any, *args, **kwargs):
        """Call a layer of a stack (a front end may jit it, so that a stack traces one layer once)."""
        return layer(*args, **kwargs, **self.options())

    # Decoding with a cache. A Haiku child keeps its cache in its Haiku state, so a Haiku run just
    # calls it; an Equinox run passes each child its part of the cache and collects the new parts.

    def init_cache(self, name: str | int, child: Any, method: str, *args, **kwargs) -> None:
        """``child.method(*args, **kwargs)``, making the cache of the child ``name``."""
        getattr(child, method)(*args, **kwargs)

    def decode(self, name: str | int, child: Any, method: str, *args, **kwargs) -> Any:
        """``child.method(*args, **kwargs)``, a decoding step of the child ``name`` through its cache."""
        return getattr(child, method)(*args, **kwargs)

    def decoded(self, out: Any) -> Any:
        """What a decoding step returns: Haiku ``out``, Equinox ``(out, the new cache)``."""
        return out

    def made_cache(self) -> Any:
        """What ``init_cache`` returns: Haiku nothing (the cache is in Haiku state), Equinox the cache."""
        return None

    def decoding_options(self) -> dict[str, Any]:
        """The options of a child's decoding step: the attention path."""
        return {} if self.implementation == "auto" else {"implementation": self.implementation}

    @abc.abstractmethod
    def in_inference(self, child: Any, *args, **kwargs) -> Any:
        """Call ``child`` in inference mode (no dropout): the encoder under ``init_cache``."""


def _attend(run: Run, attention, q, kv, mask, padding, is_causal: bool):
    """torch's ``self.dropout1(self.self_attn(q, kv, kv, ..., need_weights=False)[0])`` (``_sa_block``)."""
    out, _ = attention(
        q, kv, kv, key_padding_mask=padding, need_weights=False, attn_mask=mask, is_causal=is_causal, **run.options()
    )
    return run.dropout(out)


def _sublayers(x, norm_first: bool, *blocks: tuple[Callable, Callable]) -> Any:
    """Each ``(block, norm)`` with its residual: ``x + block(norm(x))`` pre-norm, ``norm(x + block(x))`` post-norm."""
    for block, norm in blocks:
        x = x + block(norm(x)) if norm_first else norm(x + block(x))
    return x


class TransformerLayerForward:
    """What the encoder and decoder layers share: their options and the feed-forward block."""

    d_model: int
    norm_first: bool
    activation: Callable
    # the children torch's forward calls (any module with their call)
    linear1: Any
    linear2: Any
    norm1: Any
    norm2: Any
    self_attn: Any
    _run: Callable[..., Run]  # the front end's Run of one call, from the call's options

    def _feed_forward(self, run: Run, x):
        """torch's ``_ff_block``: ``dropout2(linear2(dropout(activation(linear1(x)))))``."""
        return run.dropout(self.linear2(run.dropout(self.activation(self.linear1(x)))))


class EncoderLayerForward(TransformerLayerForward):
    """torch's ``nn.TransformerEncoderLayer.forward`` (its reference path), against ``self_attn``,
    ``linear1``, ``linear2``, ``norm1`` and ``norm2``."""

    def __call__(
        self,
        src: Float[ArrayLike, "*batch src_len d_model"],
        src_mask: Mask = None,
        src_key_padding_mask: Mask = None,
        is_causal: bool = False,
        **options: Any,
    ) -> Float[Array, "*batch src_len d_model"]:
        """Encode ``src``.

        Args:
            src: ``(S, E)`` in ``noxton.nn``; ``[..., S, E]`` in ``noxton.haiku``.
            src_mask: ``(S, S)`` or ``(nhead, S, S)`` (Haiku: also ``[..., nhead, S, S]``), bool
                (True = not allowed) or float (added to the scores).
            src_key_padding_mask: ``(S,)`` (Haiku: ``[..., S]``), bool (True = padding) or float.
            is_causal: without ``src_mask``, the causal mask; with it, a hint (the mask is used).
            **options: the front end's. ``noxton.nn``: ``dropout_key`` (needed when
                ``dropout > 0`` and not ``inference``; ``key`` is the same, for
                ``eqx.nn.Sequential``). ``noxton.haiku``: ``inference`` (switch dropout
                off; the key comes from ``hk.next_rng_key()``). Both: ``implementation``,
                the attention path (``"auto"``: the memory-efficient blockwise path for long
                sequences; see ``MultiheadAttention``).
        """
        run = self._run(**options)
        run.check("src", src, self.d_model)
        is_causal = check_is_causal("is_causal", is_causal)
        self_attn, norm1, norm2 = self.self_attn, self.norm1, self.norm2

        def sa(x):
            return _attend(run, self_attn, x, x, src_mask, src_key_padding_mask, is_causal)

        return _sublayers(src, self.norm_first, (sa, norm1), (lambda x: self._feed_forward(run, x), norm2))


class DecoderLayerForward(TransformerLayerForward):
    """torch's ``nn.TransformerDecoderLayer.forward``, against ``self_attn``, ``multihead_attn``,
    ``linear1``, ``linear2``, ``norm1``, ``norm2`` and ``norm3``."""

    multihead_attn: Any
    norm3: Any

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
        **options: Any,
    ) -> Float[Array, "*batch tgt_len d_model"]:
        """Decode ``tgt`` attending to ``memory``.

        Args:
            tgt: ``(L, E)`` (Haiku: ``[..., L, E]``).
            memory: ``(S, E)`` (Haiku: ``[..., S, E]``).
            tgt_mask: ``(L, L)`` (or per head), bool or float.
            memory_mask: ``(L, S)`` (or per head), bool or float.
            tgt_key_padding_mask: ``(L,)`` (Haiku: ``[..., L]``).
            memory_key_padding_mask: ``(S,)`` (Haiku: ``[..., S]``).
            tgt_is_causal: without ``tgt_mask``, the causal mask; with one, a hint.
            memory_is_causal: likewise for ``memory_mask``.
            **options: the front end's, as for the encoder layer.
        """
        run = self._run(**options)
        run.check("tgt", tgt, self.d_model)
        run.check("memory", memory, self.d_model)
        tgt_is_causal = check_is_causal("tgt_is_causal", tgt_is_causal)
        memory_is_causal = check_is_causal("memory_is_causal", memory_is_causal)
        self_attn, multihead_attn = self.self_attn, self.multihead_attn

        def sa(x):
            return _attend(run, self_attn, x, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)

        def mha(x):
            return _attend(run, multihead_attn, x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)

        def ff(x):
            return self._feed_forward(run, x)

        norms = self.norm1, self.norm2, self.norm3
        return _sublayers(tgt, self.norm_first, (sa, norms[0]), (mha, norms[1]), (ff, norms[2]))

    _decoding_run: Callable[..., Run]  # the front end's Run of a decoding call (no dropout; the cache)

    def init_cache(
        self,
        memory: Float[ArrayLike, "*batch src_len d_model"],
        max_len: int,
        memory_mask: Mask = None,
        memory_key_padding_mask: Mask = None,
    ) -> Any:
        """The cache for [`decode`][noxton.nn.TransformerDecoderLayer.decode] of up to ``max_len`` target
        positions against ``memory``: ``self_attn``'s keys and values (empty) and ``multihead_attn``'s
        projection of ``memory``, with ``memory_mask`` ``(max_len, S)`` (torch's ``(L, S)`` for every
        target position; or per head) and ``memory_key_padding_mask`` ``(S,)`` (Haiku: ``[..., S]``).

        ``noxton.nn`` returns the cache (a pytree of fixed shapes: ``{"self_attn": ...,
        "multihead_attn": ...}``); ``noxton.haiku`` keeps it in the attention modules' Haiku state.
        """
        run = self._decoding_run()
        run.check("memory", memory, self.d_model)
        memory = jnp.asarray(memory)
        batch_shape = tuple(memory.shape[:-2])
        run.init_cache("self_attn", self.self_attn, "init_cache", max_len, batch_shape=batch_shape, dtype=memory.dtype)
        run.init_cache(
            "multihead_attn",
            self.multihead_attn,
            "init_memory_cache",
            memory,
            max_len,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
        )
        return run.made_cache()

    def decode(
        self,
        tgt: Float[ArrayLike, "*batch n d_model"],
        cache: Any = None,
        tgt_key_padding_mask: Mask = None,
        *,
        implementation: str = "auto",
    ) -> Any:
        """Decode the next ``n >= 1`` target positions ``tgt`` ``(n, E)`` (Haiku: ``[..., n, E]``): exactly
        what the layer's forward over every position so far with the causal ``tgt_mask`` (and the masks given
        to ``init_cache``) returns at them. Dropout is off: decoding is inference.

        Args:
            tgt: the next positions.
            cache: ``noxton.nn``: the cache from ``init_cache`` or the last ``decode``; ``noxton.haiku``:
                none (the cache is in Haiku state).
            tgt_key_padding_mask: ``(n,)`` (Haiku ``[..., n]``): padded positions among ``tgt``, hidden
                from every later position, as torch's ``tgt_key_padding_mask``.
            implementation: the attention path (see ``MultiheadAttention``).

        Returns:
            ``noxton.nn``: ``(output (n, E), cache)``; ``noxton.haiku``: the output.
        """
        run = self._decoding_run(cache, implementation)
        run.check("tgt", tgt, self.d_model)
        options = run.decoding_options()

        def sa(x):
            return run.decode(
                "self_attn", self.self_attn, "decode", x, key_padding_mask=tgt_key_padding_mask, **options
            )

        def mha(x):
            return run.decode("multihead_attn", self.multihead_attn, "decode_memory", x, **options)

        def ff(x):
            return self._feed_forward(run, x)

        norms = self.norm1, self.norm2, self.norm3
        return run.decoded(_sublayers(tgt, self.norm_first, (sa, norms[0]), (mha, norms[1]), (ff, norms[2])))


class StackForward:
    """What the encoder and decoder stacks share: ``layers`` called in turn, then ``norm`` when there is one."""

    layers: Any
    norm: Any
    _run: Callable[..., Run]

    def _through_layers(self, run: Run, x, *args, **kwargs) -> Any:
        for layer in self.layers:
            x = run.layer(layer, x, *args, **kwargs)
        return x if self.norm is None else self.norm(x)


class EncoderForward(StackForward):
    """torch's ``nn.TransformerEncoder.forward``: ``for mod in self.layers``, then ``self.norm``."""

    def __call__(
        self,
        src: Float[ArrayLike, "*batch src_len d_model"],
        mask: Mask = None,
        src_key_padding_mask: Mask = None,
        is_causal: bool | None = None,
        **options: Any,
    ) -> Float[Array, "*batch src_len d_model"]:
        """Encode ``src`` through every layer, then ``norm``; arguments as the encoder layer's
        (``mask`` is each layer's ``src_mask``; ``is_causal=None``, torch's default, uses ``mask`` as given)."""
        run = self._run(**options)
        is_causal = check_is_causal("is_causal", is_causal)
        return self._through_layers(
            run, src, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask
        )


class DecoderForward(StackForward):
    """torch's ``nn.TransformerDecoder.forward``: ``for mod in self.layers``, then ``self.norm``."""

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
        **options: Any,
    ) -> Float[Array, "*batch tgt_len d_model"]:
        """Decode ``tgt`` through every layer, then ``norm``; arguments as the decoder layer's."""
        run = self._run(**options)
        return self._through_layers(
            run,
            tgt,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=check_is_causal("tgt_is_causal", tgt_is_causal),
            memory_is_causal=check_is_causal("memory_is_causal", memory_is_causal),
        )

    _decoding_run: Callable[..., Run]

    def init_cache(
        self,
        memory: Float[ArrayLike, "*batch src_len d_model"],
        max_len: int,
        memory_mask: Mask = None,
        memory_key_padding_mask: Mask = None,
    ) -> Any:
        """The cache of every layer for [`decode`][noxton.nn.TransformerDecoder.decode]; arguments as the
        decoder layer's ``init_cache``. ``noxton.nn`` returns it (a list, a layer's cache each)."""
        run = self._decoding_run()
        for i, layer in enumerate(self.layers):
            run.init_cache(i, layer, "init_cache", memory, max_len, memory_mask, memory_key_padding_mask)
        return run.made_cache()

    def decode(
        self,
        tgt: Float[ArrayLike, "*batch n d_model"],
        cache: Any = None,
        tgt_key_padding_mask: Mask = None,
        *,
        implementation: str = "auto",
    ) -> Any:
        """Decode the next ``n`` positions through every layer, then ``norm``: exactly the stack's forward
        with the causal ``tgt_mask`` at those positions; arguments and returns as the decoder layer's ``decode``."""
        run = self._decoding_run(cache, implementation)
        x = tgt
        for i, layer in enumerate(self.layers):
            x = run.decode(i, layer, "decode", x, tgt_key_padding_mask=tgt_key_padding_mask, **run.decoding_options())
        return run.decoded(x if self.norm is None else self.norm(x))


class TransformerForward:
    """torch's ``nn.Transformer.forward``: ``self.decoder(tgt, self.encoder(src))``."""

    encoder: Any
    decoder: Any
    _run: Callable[..., Run]

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
        **options: Any,
    ) -> Float[Array, "*batch tgt_len d_model"]:
        """``decoder(tgt, encoder(src))`` with torch's masks and hints: ``src_*`` go to the encoder,
        ``tgt_*`` and ``memory_*`` to the decoder; options as the layers'."""
        run = self._run(**options)
        memory = self.encoder(
            src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal, **run.options()
        )
        return self.decoder(
            tgt,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
            **run.options(),
        )

    _decoding_run: Callable[..., Run]

    def init_cache(
        self,
        src: Float[ArrayLike, "*batch src_len d_model"],
        max_len: int,
        src_mask: Mask = None,
        src_key_padding_mask: Mask = None,
        memory_mask: Mask = None,
        memory_key_padding_mask: Mask = None,
        src_is_causal: bool | None = None,
    ) -> Any:
        """Encode ``src`` once (in inference mode) and make the decoder's cache for
        [`decode`][noxton.nn.Transformer.decode] of up to ``max_len`` target positions; masks as the call's."""
        run = self._decoding_run()
        memory = run.in_inference(
            self.encoder, src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal
        )
        return self.decoder.init_cache(memory, max_len, memory_mask, memory_key_padding_mask)

    def decode(
        self,
        tgt: Float[ArrayLike, "*batch n d_model"],
        cache: Any = None,
        tgt_key_padding_mask: Mask = None,
        *,
        implementation: str = "auto",
    ) -> Any:
        """The decoder's [`decode`][noxton.nn.TransformerDecoder.decode]: the next positions of the target,
        exactly as the full forward with the causal ``tgt_mask`` returns them."""
        return self.decoder.decode(tgt, cache, tgt_key_padding_mask, implementation=implementation)


#: The sequence axis of each input of the Transformer layers, as their docstrings name it.
_LENGTHS = {"src": "S", "memory": "S", "tgt": "L"}


def check_input(name: str, x: Any, d_model: int, *, batched: bool) -> None:
    """``x`` is a floating array ``(T, E)`` (``[..., T, E]`` when ``batched``) with ``d_model`` features."""
    layout = f"({'..., ' if batched else ''}{_LENGTHS.get(name, 'T')}, E)"
    check_array(name, x, min_rank=2, max_rank=None if batched else 2, layout=layout)
    if x.shape[-1] != d_model:
        raise ValueError(f"`{name}` must have d_model={d_model} features in its last axis, got shape {tuple(x.shape)}.")
