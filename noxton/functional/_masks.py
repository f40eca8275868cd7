"""One place that validates and canonicalises attention masks.

Masks arrive in torch's conventions: ``key_padding_mask`` of shape ``[..., S]``
and ``attn_mask`` of shape ``(L, S)``, ``(H, L, S)`` or ``[..., H, L, S]``,
each either bool (``True`` = not allowed to attend) or floating (added to the
scores). They leave as additive masks in the scores' dtype (``-inf`` where a
bool mask forbids), padded with allowed columns for any keys the layer appends
(``bias_k``/``bias_v`` and ``add_zero_attn``), plus a flag for the causal mask,
which is never materialised here so that blockwise kernels can generate it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from noxton.functional._checks import check_bool, lift


@dataclasses.dataclass(frozen=True)
class Masks:
    """Canonical masks for keys of total length ``S + extra``.

    Attributes:
        key_padding: additive float mask ``[*B, S + extra]`` or ``None``.
        attn: additive float mask ``(L, S + extra)``, ``(H, L, S + extra)`` or
            ``(*B, H, L, S + extra)``, or ``None``.
        causal: when ``True``, key ``j < src_len`` is hidden from query ``i``
            whenever ``j > i`` (top-left aligned, as torch's ``is_causal``);
            appended keys stay visible.
        src_len: ``S``, the number of keys before any were appended.
    """

    key_padding: jnp.ndarray | None
    attn: jnp.ndarray | None
    causal: bool
    src_len: int

    def causal_mask(self, tgt_len: int, total_len: int) -> jnp.ndarray:
        """Bool ``(L, S + extra)``, ``True`` where the causal rule hides a key."""
        rows = jnp.arange(tgt_len)[:, None]
        cols = jnp.arange(total_len)[None, :]
        return (cols > rows) & (cols < self.src_len)

    def dense(self, tgt_len: int, total_len: int, dtype, *, causal: bool = True) -> jnp.ndarray | None:
        """All masks summed into one additive mask broadcastable to ``[*B, H, L, S']`` (or ``None``).

        With ``causal=False`` the causal mask is left out, for kernels that take it
        as a flag.
        """
        parts = []
        if self.attn is not None:
            parts.append(self.attn)
        if self.key_padding is not None:
            parts.append(self.key_padding[..., None, None, :])
        if causal and self.causal:
            parts.append(jnp.where(self.causal_mask(tgt_len, total_len), -jnp.inf, 0.0).astype(dtype))
        if not parts:
            return None
        ndim = max(p.ndim for p in parts)
        out = lift(parts[0], ndim)
        for p in parts[1:]:
            out = out + lift(p, ndim)
        return out


def _additive(name: str, mask, dtype):
    if not hasattr(mask, "dtype") or not hasattr(mask, "shape"):
        raise TypeError(f"`{name}` must be a bool or floating array, got {type(mask).__name__}.")
    mask = jnp.asarray(mask)  # a NumPy mask becomes a JAX array here, as Masks holds
    if mask.dtype == jnp.bool_:
        return jnp.where(mask, -jnp.inf, 0.0).astype(dtype)
    if jnp.issubdtype(mask.dtype, jnp.floating):
        return mask.astype(dtype)
    raise TypeError(
        f"`{name}` must be bool (True = not allowed) or floating (added to the scores), got dtype {mask.dtype}."
    )


def canonical_masks(
    *,
    key_padding_mask,
    attn_mask,
    is_causal,
    batch_shape: tuple[int, ...],
    num_heads: int,
    tgt_len: int,
    src_len: int,
    extra: int,
    dtype,
) -> Masks:
    """Validate torch-style masks and return [`Masks`][noxton.functional.Masks] (see the module docstring)."""
    is_causal = check_bool("is_causal", is_causal)
    b = tuple(batch_shape)
    kp = None
    if key_padding_mask is not None:
        expected = (*b, src_len)
        kp = _additive("key_padding_mask", key_padding_mask, dtype)
        if tuple(kp.shape) != expected:
            raise ValueError(
                f"`key_padding_mask` must have shape {expected} (batch..., S), got {tuple(key_padding_mask.shape)}."
            )
        if extra:
            kp = jnp.pad(kp, [(0, 0)] * len(b) + [(0, extra)])
    am = None
    if attn_mask is not None:
        am = _additive("attn_mask", attn_mask, dtype)
        allowed = [(tgt_len, src_len), (num_heads, tgt_len, src_len)]
        if b:
            allowed.append((*b, num_heads, tgt_len, src_len))
        if tuple(am.shape) not in allowed:
            raise ValueError(
                "`attn_mask` must have shape "
                + " or ".join(str(s) for s in allowed)
                + f" ((L, S), (H, L, S){' or (batch..., H, L, S)' if b else ''}), got {tuple(attn_mask.shape)}."
            )
        if extra:
            am = jnp.pad(am, [(0, 0)] * (am.ndim - 1) + [(0, extra)])
    # torch: with an explicit attn_mask, is_causal is only a hint and the mask is used.
    causal = is_causal and attn_mask is None
    return Masks(key_padding=kp, attn=am, causal=causal, src_len=src_len)
