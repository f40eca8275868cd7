"""torch's ``nn.Transformer*`` maths: pure functions of torch-keyed parameter mappings.

Parameters are keyed as the torch module's ``state_dict`` (``self_attn.in_proj_weight``,
``linear1.weight``, ``norm1.weight``; ``layers.0.`` ... in a stack; ``encoder.`` and
``decoder.`` in a whole Transformer), in torch's layouts. Shapes: ``*B`` leading
batch dimensions (possibly none), ``S`` source length, ``L`` target length,
``E = d_model``.

Dropout: one key per call; an encoder layer splits it four ways (attention
weights, after attention, inside the feed-forward, after it), a decoder layer
six ways, a stack once per layer, so that every site draws its own pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from noxton.functional._attention import _linear, multi_head_attention
from noxton.functional._checks import (
    check_array,
    check_dropout_key,
    check_is_causal,
    check_positive_float,
    check_positive_int,
    check_probability,
    is_hashable,
    lift,
    softmax_dtype,
)


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


def _sub(params: Mapping[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _need(params: Mapping[str, jax.Array], *names: str) -> None:
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"`params` must contain {', '.join(map(repr, missing))}; got keys {sorted(params)}.")


def _keys(dropout_p: float, key, n: int):
    return list(jax.random.split(key, n)) if dropout_p > 0.0 else [None] * n


def _check_common(name, x, params, layout):
    x = check_array(name, x, min_rank=2, layout=layout)
    d_model = params["linear2.weight"].shape[0]
    if x.shape[-1] != d_model:
        raise ValueError(f"`{name}` must have d_model={d_model} features in its last axis, got shape {x.shape}.")
    return x


def _norm(params, name, x, eps):
    return layer_norm(x, params.get(f"{name}.weight"), params.get(f"{name}.bias"), eps)


def _feed_forward(params, x, activation, dropout_p, k_inner, k_out):
    h = activation(_linear(x, params["linear1.weight"], params.get("linear1.bias")))
    h = dropout(h, dropout_p, k_inner)
    return dropout(_linear(h, params["linear2.weight"], params.get("linear2.bias")), dropout_p, k_out)


def _attention_block(params, prefix, q, kv, mask, padding, is_causal, num_heads, dropout_p, keys, implementation):
    out, _ = multi_head_attention(
        q,
        kv,
        kv,
        _sub(params, prefix),
        num_heads=num_heads,
        key_padding_mask=padding,
        need_weights=False,
        attn_mask=mask,
        is_causal=is_causal,
        dropout_p=dropout_p,
        dropout_key=keys[0],
        implementation=implementation,
    )
    return dropout(out, dropout_p, keys[1])


_ENCODER_LAYER_KEYS = ("self_attn.out_proj.weight", "linear1.weight", "linear2.weight")
_DECODER_LAYER_KEYS = (*_ENCODER_LAYER_KEYS, "multihead_attn.out_proj.weight")


def transformer_encoder_layer(
    src,
    params: Mapping[str, jax.Array],
    *,
    num_heads: int,
    activation: Callable = jax.nn.relu,
    layer_norm_eps: float = 1e-5,
    norm_first: bool = False,
    src_mask=None,
    src_key_padding_mask=None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    dropout_key=None,
    implementation: str = "auto",
):
    """torch's ``nn.TransformerEncoderLayer.forward`` (its reference path) for ``[*B, S, E]`` inputs.

    Post-norm: ``x = norm1(x + sa(x)); x = norm2(x + ff(x))``; with ``norm_first``:
    ``x = x + sa(norm1(x)); x = x + ff(norm2(x))``, where ``ff(x) =
    dropout2(linear2(dropout(activation(linear1(x)))))`` and ``sa`` is
    self-attention followed by ``dropout1``.

    Args:
        src: ``[*B, S, E]``.
        params: torch ``state_dict``-named parameters: ``self_attn.*``, ``linear1.*``,
            ``linear2.*``, ``norm1.*``, ``norm2.*``.
        num_heads: ``nhead``.
        activation: applied after ``linear1``.
        layer_norm_eps: the norms' ``eps``.
        norm_first: pre-norm instead of post-norm.
        src_mask: ``(S, S)``, ``(H, S, S)`` or ``[*B, H, S, S]``, bool (True = not allowed) or float (added).
        src_key_padding_mask: ``[*B, S]``, bool (True = padding) or float.
        is_causal: without ``src_mask``, the causal mask; with one, a hint (the mask is used).
        dropout_p: the probability of every dropout of the layer.
        dropout_key: required when ``dropout_p > 0``.
        implementation: the attention path (see ``multi_head_attention``).

    Returns:
        ``[*B, S, E]``.
    """
    _need(params, *_ENCODER_LAYER_KEYS)
    src = _check_common("src", src, params, "(..., S, E)")
    dropout_p = check_probability("dropout", dropout_p)
    dropout_key = check_dropout_key(dropout_p, dropout_key, "functional")
    is_causal = check_is_causal("is_causal", is_causal)
    eps = check_positive_float("layer_norm_eps", layer_norm_eps)
    k = _keys(dropout_p, dropout_key, 4)

    def sa(x):
        return _attention_block(
            params,
            "self_attn.",
            x,
            x,
            src_mask,
            src_key_padding_mask,
            is_causal,
            num_heads,
            dropout_p,
            k[:2],
            implementation,
        )

    def ff(x):
        return _feed_forward(params, x, activation, dropout_p, k[2], k[3])

    x = src
    if norm_first:
        x = x + sa(_norm(params, "norm1", x, eps))
        return x + ff(_norm(params, "norm2", x, eps))
    x = _norm(params, "norm1", x + sa(x), eps)
    return _norm(params, "norm2", x + ff(x), eps)


def transformer_decoder_layer(
    tgt,
    memory,
    params: Mapping[str, jax.Array],
    *,
    num_heads: int,
    activation: Callable = jax.nn.relu,
    layer_norm_eps: float = 1e-5,
    norm_first: bool = False,
    tgt_mask=None,
    memory_mask=None,
    tgt_key_padding_mask=None,
    memory_key_padding_mask=None,
    tgt_is_causal: bool = False,
    memory_is_causal: bool = False,
    dropout_p: float = 0.0,
    dropout_key=None,
    implementation: str = "auto",
):
    """torch's ``nn.TransformerDecoderLayer.forward`` for ``[*B, L, E]`` targets and ``[*B, S, E]`` memory.

    Self-attention (``self_attn``, ``dropout1``, ``norm1``), cross-attention to
    ``memory`` (``multihead_attn``, ``dropout2``, ``norm2``) and the feed-forward
    (``dropout3``, ``norm3``), post-norm or, with ``norm_first``, pre-norm.

    ``num_heads``, ``activation``, ``layer_norm_eps``, ``norm_first``, ``dropout_p``,
    ``dropout_key``, ``implementation``, as for
    [`transformer_encoder_layer`][noxton.functional.transformer_encoder_layer].

    Args:
        tgt: ``[*B, L, E]``.
        memory: ``[*B, S, E]``.
        params: torch ``state_dict``-named: ``self_attn.*``, ``multihead_attn.*``,
            ``linear1.*``, ``linear2.*``, ``norm1.*``, ``norm2.*``, ``norm3.*``.
        tgt_mask: ``(L, L)`` (or per head/batch), bool or float.
        memory_mask: ``(L, S)`` (or per head/batch), bool or float.
        tgt_key_padding_mask: ``[*B, L]``.
        memory_key_padding_mask: ``[*B, S]``.
        tgt_is_causal: without ``tgt_mask``, the causal mask; with one, a hint.
        memory_is_causal: likewise for ``memory_mask``.

    Returns:
        ``[*B, L, E]``.
    """
    _need(params, *_DECODER_LAYER_KEYS)
    tgt = _check_common("tgt", tgt, params, "(..., L, E)")
    memory = _check_common("memory", memory, params, "(..., S, E)")
    dropout_p = check_probability("dropout", dropout_p)
    dropout_key = check_dropout_key(dropout_p, dropout_key, "functional")
    tgt_is_causal = check_is_causal("tgt_is_causal", tgt_is_causal)
    memory_is_causal = check_is_causal("memory_is_causal", memory_is_causal)
    eps = check_positive_float("layer_norm_eps", layer_norm_eps)
    k = _keys(dropout_p, dropout_key, 6)

    def sa(x):
        return _attention_block(
            params,
            "self_attn.",
            x,
            x,
            tgt_mask,
            tgt_key_padding_mask,
            tgt_is_causal,
            num_heads,
            dropout_p,
            k[:2],
            implementation,
        )

    def mha(x):
        return _attention_block(
            params,
            "multihead_attn.",
            x,
            memory,
            memory_mask,
            memory_key_padding_mask,
            memory_is_causal,
            num_heads,
            dropout_p,
            k[2:4],
            implementation,
        )

    def ff(x):
        return _feed_forward(params, x, activation, dropout_p, k[4], k[5])

    x = tgt
    if norm_first:
        x = x + sa(_norm(params, "norm1", x, eps))
        x = x + mha(_norm(params, "norm2", x, eps))
        return x + ff(_norm(params, "norm3", x, eps))
    x = _norm(params, "norm1", x + sa(x), eps)
    x = _norm(params, "norm2", x + mha(x), eps)
    return _norm(params, "norm3", x + ff(x), eps)


def layer_params(params: Mapping[str, jax.Array], num_layers: int) -> list[dict[str, jax.Array]]:
    """``layers.{i}.k`` -> the ``i``-th of ``num_layers`` mappings of ``k``: each layer's parameters."""
    num_layers = check_positive_int("num_layers", num_layers)
    first = _sub(params, "layers.0.")
    if not first:
        raise ValueError(
            f"`params` must hold the keys 'layers.0.*' ... 'layers.{num_layers - 1}.*'; got {sorted(params)}."
        )
    names = sorted(first)
    missing = [f"layers.{i}.{n}" for i in range(num_layers) for n in names if f"layers.{i}.{n}" not in params]
    if missing or f"layers.{num_layers}.{names[0]}" in params:
        raise ValueError(
            f"`params` must hold the same keys for each of num_layers={num_layers} layers; missing: "
            f"{', '.join(missing) or 'none'}"
            + (f"; it also holds layers.{num_layers}.*" if f"layers.{num_layers}.{names[0]}" in params else "")
            + "."
        )
    return [{n: params[f"layers.{i}.{n}"] for n in names} for i in range(num_layers)]


# The layers of a stack run one after another, each a call of one jitted layer function. Every layer calls
# it with arguments of the same shapes, so JAX traces, differentiates, batches and lowers one layer once and
# the stack's program calls it ``num_layers`` times; XLA then compiles every call (the compile-time table of
# ``docs/performance.md``). This replaced a ``lax.scan`` over the layers' parameters, which must be stacked
# at call time since they are stored per layer as torch's ``state_dict``. Measured side by side with that
# table before the scan went (2 cores, d_model 512), the jitted layers compiled an encoder's gradient faster
# (6 layers: 0.90 s against 2.09 s; 48: 4.14 against 5.71; one layer: 0.59) and the compiled gradient ran
# faster (6 layers: 375 against 450 ms; 48: 3107 against 3818). Outside an enclosing ``jax.jit`` the layer
# runs as one compiled program, cached by the configuration below, which must be hashable (with an
# activation that is not, each layer runs unjitted).
_STATIC = ("num_heads", "activation", "layer_norm_eps", "norm_first", "dropout_p", "implementation")
_jitted_encoder_layer = jax.jit(transformer_encoder_layer, static_argnames=(*_STATIC, "is_causal"))
_jitted_decoder_layer = jax.jit(
    transformer_decoder_layer, static_argnames=(*_STATIC, "tgt_is_causal", "memory_is_causal")
)


def _run_stack(layer_fn, x, params, num_layers, dropout_p, dropout_key):
    """``num_layers`` layers one after another, layer ``i`` with the ``i``-th of ``num_layers`` dropout keys."""
    layers = layer_params(params, num_layers)
    keys = jax.random.split(dropout_key, num_layers) if dropout_p > 0.0 else None
    for i, p in enumerate(layers):
        x = layer_fn(x, p, None if keys is None else keys[i])
    return x


def transformer_encoder(
    src,
    params: Mapping[str, jax.Array],
    *,
    num_layers: int,
    num_heads: int,
    activation: Callable = jax.nn.relu,
    layer_norm_eps: float = 1e-5,
    norm_first: bool = False,
    norm_eps: float | None = None,
    mask=None,
    src_key_padding_mask=None,
    is_causal: bool | None = None,
    dropout_p: float = 0.0,
    dropout_key=None,
    implementation: str = "auto",
):
    """torch's ``nn.TransformerEncoder.forward``: ``num_layers`` encoder layers, then ``norm`` when ``params`` has one.

    The layers run one after another in one program, each a call of one jitted layer
    function, so that JAX traces one layer once whatever the depth.

    ``num_heads``, ``activation``, ``layer_norm_eps``, ``norm_first``, ``dropout_p``,
    ``dropout_key``, ``implementation``, as for
    [`transformer_encoder_layer`][noxton.functional.transformer_encoder_layer].

    Args:
        src: ``[*B, S, E]``.
        params: ``layers.{i}.*`` (each an encoder layer's keys) and optionally
            ``norm.weight``/``norm.bias``, the final LayerNorm.
        num_layers: the number of layers.
        norm_eps: the final norm's ``eps`` (default ``layer_norm_eps``).
        mask: ``src_mask`` of every layer.
        src_key_padding_mask: of every layer.
        is_causal: of every layer (``is_causal=None``, torch's default, uses ``mask`` as given).

    Returns:
        ``[*B, S, E]``.
    """
    dropout_p = check_probability("dropout", dropout_p)
    dropout_key = check_dropout_key(dropout_p, dropout_key, "functional")
    is_causal = check_is_causal("is_causal", is_causal)

    encoder_layer = _jitted_encoder_layer if is_hashable(activation) else transformer_encoder_layer

    def layer(h, p, k):
        return encoder_layer(
            h,
            p,
            num_heads=num_heads,
            activation=activation,
            layer_norm_eps=layer_norm_eps,
            norm_first=norm_first,
            src_mask=mask,
            src_key_padding_mask=src_key_padding_mask,
            is_causal=is_causal,
            dropout_p=dropout_p,
            dropout_key=k,
            implementation=implementation,
        )

    x = _run_stack(layer, src, params, num_layers, dropout_p, dropout_key)
    if "norm.weight" in params:
        x = _norm(params, "norm", x, layer_norm_eps if norm_eps is None else norm_eps)
    return x


def transformer_decoder(
    tgt,
    memory,
    params: Mapping[str, jax.Array],
    *,
    num_layers: int,
    num_heads: int,
    activation: Callable = jax.nn.relu,
    layer_norm_eps: float = 1e-5,
    norm_first: bool = False,
    norm_eps: float | None = None,
    tgt_mask=None,
    memory_mask=None,
    tgt_key_padding_mask=None,
    memory_key_padding_mask=None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
    dropout_p: float = 0.0,
    dropout_key=None,
    implementation: str = "auto",
):
    """torch's ``nn.TransformerDecoder.forward``: ``num_layers`` decoder layers, then ``norm``.

    The other arguments, as for
    [`transformer_decoder_layer`][noxton.functional.transformer_decoder_layer] and
    [`transformer_encoder`][noxton.functional.transformer_encoder].

    Args:
        tgt: ``[*B, L, E]``.
        memory: ``[*B, S, E]``.
        params: ``layers.{i}.*`` (decoder layers) and optionally ``norm.weight``/``norm.bias``.

    Returns:
        ``[*B, L, E]``.
    """
    dropout_p = check_probability("dropout", dropout_p)
    dropout_key = check_dropout_key(dropout_p, dropout_key, "functional")
    tgt_is_causal = check_is_causal("tgt_is_causal", tgt_is_causal)

    decoder_layer = _jitted_decoder_layer if is_hashable(activation) else transformer_decoder_layer

    def layer(h, p, k):
        return decoder_layer(
            h,
            memory,
            p,
            num_heads=num_heads,
            activation=activation,
            layer_norm_eps=layer_norm_eps,
            norm_first=norm_first,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
            dropout_p=dropout_p,
            dropout_key=k,
            implementation=implementation,
        )

    x = _run_stack(layer, tgt, params, num_layers, dropout_p, dropout_key)
    if "norm.weight" in params:
        x = _norm(params, "norm", x, layer_norm_eps if norm_eps is None else norm_eps)
    return x


def transformer(
    src,
    tgt,
    params: Mapping[str, jax.Array],
    *,
    num_encoder_layers: int,
    num_decoder_layers: int,
    num_heads: int,
    activation: Callable = jax.nn.relu,
    layer_norm_eps: float = 1e-5,
    norm_first: bool = False,
    src_mask=None,
    tgt_mask=None,
    memory_mask=None,
    src_key_padding_mask=None,
    tgt_key_padding_mask=None,
    memory_key_padding_mask=None,
    src_is_causal: bool | None = None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
    dropout_p: float = 0.0,
    dropout_key=None,
    implementation: str = "auto",
):
    """torch's ``nn.Transformer.forward``: ``decoder(tgt, encoder(src))``.

    The masks and hints, as torch's, passed to
    [`transformer_encoder`][noxton.functional.transformer_encoder] (``src_*``) and
    [`transformer_decoder`][noxton.functional.transformer_decoder] (``tgt_*``, ``memory_*``).

    Args:
        src: ``[*B, S, E]``.
        tgt: ``[*B, L, E]``.
        params: ``encoder.*`` and ``decoder.*``, as ``nn.Transformer``'s ``state_dict``.

    Returns:
        ``[*B, L, E]``.
    """
    dropout_p = check_probability("dropout", dropout_p)
    dropout_key = check_dropout_key(dropout_p, dropout_key, "functional")
    k_enc, k_dec = _keys(dropout_p, dropout_key, 2)
    common: dict[str, Any] = dict(
        num_heads=num_heads,
        activation=activation,
        layer_norm_eps=layer_norm_eps,
        norm_first=norm_first,
        dropout_p=dropout_p,
        implementation=implementation,
    )
    memory = transformer_encoder(
        src,
        _sub(params, "encoder."),
        num_layers=num_encoder_layers,
        mask=src_mask,
        src_key_padding_mask=src_key_padding_mask,
        is_causal=src_is_causal,
        dropout_key=k_enc,
        **common,
    )
    return transformer_decoder(
        tgt,
        memory,
        _sub(params, "decoder."),
        num_layers=num_decoder_layers,
        tgt_mask=tgt_mask,
        memory_mask=memory_mask,
        tgt_key_padding_mask=tgt_key_padding_mask,
        memory_key_padding_mask=memory_key_padding_mask,
        tgt_is_causal=tgt_is_causal,
        memory_is_causal=memory_is_causal,
        dropout_key=k_dec,
        **common,
    )
