"""Autoregressive decoding with a key/value cache: the maths of both front ends' ``decode``.

Decoding positions ``t .. t+n-1`` returns what the full forward over positions
``0 .. t+n-1`` with the causal target mask returns at those positions: the keys and
values of earlier positions are projected once, kept in a cache of ``max_len``
positions, and read with a mask of the positions written so far (``j <= t + i`` for
query ``i``, and no padded position). A prompt is prefilled in one call (``n > 1``)
and then extended a position at a time. Attention to a fixed ``memory`` (the
decoder's cross-attention) projects the memory's keys and values once.

A cache is a ``dict`` of arrays of fixed shapes (so a jitted step compiles once for
every position), the Haiku state of the attention module that owns it; ``noxton.nn``
passes it in and returns it. ``*B`` are leading batch dimensions (none in
``noxton.nn``, whose caches ``jax.vmap`` batches), ``T = max_len``, ``H`` heads of ``D = E / H`` features.
Keys and values are kept heads first, the layout the attention reads, so that a step reads them in place:

- self-attention ([`self_attention_cache`][noxton.functional._decoding.self_attention_cache]):
  ``key``, ``value`` ``[*B, H, T, D]`` (zeros where not written yet); ``padding``
  ``[*B, T]``, added to the scores (``-inf`` at a padded position); ``index``, the number
  of positions written (int32).
- attention to a memory ([`memory_cache`][noxton.functional._decoding.memory_cache]):
  ``key``, ``value`` ``[*B, H, S, D]``; ``padding`` ``[*B, S]``; ``mask``, the rows of
  ``memory_mask`` for every target position, ``(T, S)``, ``(H, T, S)`` or ``[*B, H, T, S]``
  (shape ``[*B, 0]`` when there is none), added to the scores; ``index``.

Going past ``max_len`` raises ``ValueError`` where the position is known (outside
``jit``); under ``jit`` it cannot be checked, and every output at a position past
``max_len`` is NaN (and so is everything computed from it), never a silently wrong value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from noxton.functional._attention import _in_projection, _linear, _split_in_proj, attend_projected, split_heads
from noxton.functional._checks import check_array, check_heads, check_positive_int, lift, softmax_dtype
from noxton.functional._masks import canonical_masks

SELF_ATTENTION_CACHE = ("index", "key", "padding", "value")
MEMORY_CACHE = ("index", "key", "mask", "padding", "value")


def self_attention_cache(
    max_len: int, embed_dim: int, num_heads: int, *, batch_shape=(), dtype=jnp.float32
) -> dict[str, jax.Array]:
    """An empty cache of ``max_len`` positions for causal self-attention (see the module docstring)."""
    max_len = check_positive_int("max_len", max_len)
    batch_shape = _check_batch_shape(batch_shape)
    check_heads(embed_dim, num_heads)
    dtype = jnp.dtype(dtype)
    shape = (*batch_shape, num_heads, max_len, embed_dim // num_heads)
    return {
        "key": jnp.zeros(shape, dtype),
        "value": jnp.zeros(shape, dtype),
        "padding": jnp.zeros((*batch_shape, max_len), softmax_dtype(dtype)),
        "index": jnp.zeros((), jnp.int32),
    }


def memory_cache(
    memory, params: Mapping[str, jax.Array], max_len: int, *, num_heads: int, attn_mask=None, key_padding_mask=None
) -> dict[str, jax.Array]:
    """The cache of attention to ``memory`` ``[*B, S, kdim]``: its keys and values, projected once, and the
    masks: ``attn_mask`` ``(T, S)``, ``(H, T, S)`` or ``[*B, H, T, S]`` (torch's ``memory_mask`` for ``T =
    max_len`` target positions), ``key_padding_mask`` ``[*B, S]``, each bool (True = hidden) or float (added)."""
    max_len = check_positive_int("max_len", max_len)
    memory = check_array("memory", memory, min_rank=2, layout="(..., S, E)")
    _, (wk, bk), (wv, bv) = _split_in_proj(params)
    if memory.shape[-1] != wk.shape[1] or memory.shape[-1] != wv.shape[1]:
        raise ValueError(
            f"`memory` must have kdim=vdim={wk.shape[1]} features in its last axis, got shape {memory.shape}."
        )
    embed_dim = params["out_proj.weight"].shape[0]
    check_heads(embed_dim, num_heads)
    batch_shape, src_len = memory.shape[:-2], memory.shape[-2]
    sdtype = softmax_dtype(memory.dtype)
    masks = canonical_masks(
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        is_causal=False,
        batch_shape=batch_shape,
        num_heads=num_heads,
        tgt_len=max_len,
        src_len=src_len,
        extra=0,
        dtype=sdtype,
    )
    return {
        "key": split_heads(_linear(memory, wk, bk), num_heads, heads_first=True),
        "value": split_heads(_linear(memory, wv, bv), num_heads, heads_first=True),
        "padding": jnp.zeros((*batch_shape, src_len), sdtype) if masks.key_padding is None else masks.key_padding,
        "mask": jnp.zeros((*batch_shape, 0), sdtype) if masks.attn is None else masks.attn,
        "index": jnp.zeros((), jnp.int32),
    }


def decode_self_attention(
    x,
    params: Mapping[str, jax.Array],
    cache: Mapping[str, Any],
    *,
    num_heads: int,
    add_zero_attn: bool = False,
    key_padding_mask=None,
    implementation: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal self-attention of the next ``n`` positions ``x`` ``[*B, n, E]``, through ``cache``.

    ``key_padding_mask`` ``[*B, n]`` marks padded positions among them (bool True, or float
    added), hidden from every later query as torch's ``tgt_key_padding_mask``.
    Returns ``(out [*B, n, E], the cache with these positions written)``.
    """
    cache = check_cache("cache", cache, SELF_ATTENTION_CACHE)
    x = _check_step(x, cache)
    batch_shape, n = x.shape[:-2], x.shape[-2]
    max_len, index = cache["key"].shape[-2], cache["index"]
    _check_room(index, n, max_len)
    masks = canonical_masks(
        key_padding_mask=key_padding_mask,
        attn_mask=None,
        is_causal=False,
        batch_shape=batch_shape,
        num_heads=num_heads,
        tgt_len=n,
        src_len=n,
        extra=0,
        dtype=cache["padding"].dtype,
    )
    q, k, v = _in_projection(x, x, x, params)
    k, v = (split_heads(a, num_heads, heads_first=True) for a in (k, v))
    cache = {
        "key": lax.dynamic_update_slice_in_dim(cache["key"], k, index, axis=-2),
        "value": lax.dynamic_update_slice_in_dim(cache["value"], v, index, axis=-2),
        "padding": cache["padding"]
        if masks.key_padding is None
        else lax.dynamic_update_slice_in_dim(cache["padding"], masks.key_padding, index, axis=-1),
        "index": index + n,
    }
    positions = index + jnp.arange(n, dtype=index.dtype)
    # query i (position index + i) sees the keys j <= index + i: written, and not in its future
    future = jnp.arange(max_len, dtype=index.dtype)[None, :] > positions[:, None]
    out = _attend(q, cache, params, num_heads, add_zero_attn, future, implementation)
    return _past_end(out, positions, max_len), cache


def decode_memory_attention(
    x,
    params: Mapping[str, jax.Array],
    cache: Mapping[str, Any],
    *,
    num_heads: int,
    add_zero_attn: bool = False,
    implementation: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Attention of the next ``n`` target positions ``x`` ``[*B, n, E]`` to the memory in ``cache``
    (from [`memory_cache`][noxton.functional._decoding.memory_cache]), with its masks' rows for those positions."""
    cache = check_cache("cache", cache, MEMORY_CACHE)
    x = _check_step(x, cache)
    n, index = x.shape[-2], cache["index"]
    mask = cache["mask"]
    rows = None
    if mask.shape[-1] > 0:
        max_len = mask.shape[-2]
        _check_room(index, n, max_len)
        rows = lax.dynamic_slice_in_dim(mask, jnp.minimum(index, max_len - n), n, axis=-2)
    (wq, bq), _, _ = _split_in_proj(params)
    out = _attend(_linear(x, wq, bq), cache, params, num_heads, add_zero_attn, rows, implementation)
    if rows is not None:
        out = _past_end(out, index + jnp.arange(n, dtype=index.dtype), mask.shape[-2])
    return out, {**cache, "index": index + n}


def _attend(q, cache, params, num_heads, add_zero_attn, attn_mask, implementation):
    out, _ = attend_projected(
        q,
        cache["key"],
        cache["value"],
        params,
        num_heads=num_heads,
        add_zero_attn=add_zero_attn,
        key_padding_mask=cache["padding"],
        need_weights=False,
        attn_mask=attn_mask,
        average_attn_weights=True,
        is_causal=False,
        dropout_p=0.0,
        dropout_key=None,
        implementation=implementation,
        kv_heads_first=True,
    )
    return out


def _past_end(out, positions, max_len: int):
    """NaN at every position past the cache's end (under ``jit``, where no error can be raised)."""
    inside = lift((positions < max_len)[:, None], out.ndim)
    return jnp.where(inside, out, jnp.asarray(jnp.nan, out.dtype))


def _check_room(index, n: int, max_len: int) -> None:
    if n > max_len:
        raise ValueError(f"`x` holds {n} positions, more than the cache's max_len={max_len}.")
    try:
        written = int(index)
    except jax.errors.ConcretizationTypeError:
        return  # under jit (or vmap): positions past max_len come out NaN (see the module docstring)
    if written + n > max_len:
        raise ValueError(
            f"the cache holds max_len={max_len} positions and {written} are written: decoding {n} more would pass "
            "its end. Make the cache with a larger max_len."
        )


def check_cache(name: str, cache: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(cache, Mapping) or tuple(sorted(cache)) != keys:
        got = sorted(cache) if isinstance(cache, Mapping) else type(cache).__name__
        raise TypeError(
            f"`{name}` must be the cache that init_cache made (a dict with keys {list(keys)}), got {got}. "
            "Self-attention and attention to a memory keep different caches."
        )
    return dict(cache)


def _check_step(x, cache):
    x = check_array("x", x, min_rank=2, layout="(..., n, E)")
    k = cache["key"]  # [*B, H, T, D]
    embed_dim = k.shape[-3] * k.shape[-1]
    if x.shape[:-2] != k.shape[:-3] or x.shape[-1] != embed_dim:
        raise ValueError(
            f"`x` must have shape (*batch, n, E) = {(*k.shape[:-3], 'n', embed_dim)} to match its cache, got "
            f"{tuple(x.shape)}."
        )
    if x.dtype != k.dtype:
        raise TypeError(
            f"`x` must have the cache's dtype {k.dtype}, got {x.dtype}: make the cache with dtype={x.dtype}."
        )
    return x


def _check_batch_shape(batch_shape) -> tuple[int, ...]:
    if not isinstance(batch_shape, tuple | list) or not all(isinstance(d, int) and d > 0 for d in batch_shape):
        raise TypeError(f"`batch_shape` must be a tuple of positive ints, got {batch_shape!r}.")
    return tuple(batch_shape)
