"""The fused path: ``jax.nn.dot_product_attention`` with torch's masks.

``jax.nn.dot_product_attention`` is called with ``implementation=None``: JAX
chooses. Up to at least JAX 0.10 that is XLA's composition of einsums and
softmax on every backend (which holds the scores); cuDNN's fused kernel runs only
when named (``implementation="cudnn"``). Its contract differs from torch's in two
places, both handled here:

- masks: noxton's additive masks are split into a bool ``mask`` (a key is
  visible where the additive mask is not ``-inf``) and a finite ``bias`` (the
  rest), so no ``-inf`` ever enters the kernel; the causal mask is passed as
  ``is_causal`` when no keys were appended (appended keys stay visible to
  torch's causal mask, which ``is_causal`` cannot express) and folded into the
  bool mask otherwise;
- fully masked rows: the kernel gives them uniform weights; they are replaced
  by zeros (with zero, hence finite, gradients), as on the dense path.

No dropout: ``jax.nn.dot_product_attention`` has none; no float64 either (its
softmax runs in float32), which ``select_implementation`` refuses.

Its XLA composition computes float16/bfloat16 scores with an explicit dot
algorithm (``F16_F16_F32``/``BF16_BF16_F32``) and falls back to the default only
on errors raised while tracing; XLA's CPU and TPU backends reject
``F16_F16_F32`` when they compile, after that fallback, so a jitted float16 call
crashed there. Off the GPU, float16 inputs are therefore passed as float32
(exactly, every float16 is a float32): the same float32 scores and softmax, and
the result is cast back.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax import lax

from noxton.functional._checks import dot_precision, lift, softmax_dtype
from noxton.functional._masks import Masks


def _to4(x):
    """A mask broadcastable to ``[*B, H, L, S']`` as ``[N|1, H|1, L|1, S']``."""
    return lift(x, 4) if x.ndim < 4 else x.reshape(-1, *x.shape[-3:])


def _runs_natively(dtype, backend: str) -> bool:
    """Whether ``jax.nn.dot_product_attention`` compiles for ``dtype`` inputs on ``backend``."""
    return jnp.dtype(dtype) != jnp.dtype(jnp.float16) or backend in ("gpu", "cuda", "rocm")


def fused_attention(q, k, v, masks: Masks, *, scale: float = 1.0, backend: str | None = None):
    """Same contract as ``dense_attention`` with ``need_weights=False`` and no dropout.

    Args:
        q: ``[*B, L, H, D]``.
        k: ``[*B, S', H, D]``.
        v: ``[*B, S', H, D]``.
        masks: canonical masks for ``S'`` keys.
        scale: multiplies ``q @ k^T`` in float32, before the masks are added.
        backend: the backend it compiles for (``jax.default_backend()`` unless given).

    Returns:
        ``[*B, L, H, D]`` in the input dtype.
    """
    if jnp.dtype(q.dtype).itemsize > 4:
        raise ValueError(
            f"fused_attention cannot keep {q.dtype} precision (jax.nn.dot_product_attention runs its softmax in "
            "float32): use dense_attention or blockwise_attention."
        )
    in_dtype = q.dtype
    backend = jax.default_backend() if backend is None else backend
    if not _runs_natively(in_dtype, backend):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    batch_shape = q.shape[:-3]
    tgt_len, heads, head_dim = q.shape[-3:]
    total_len = k.shape[-3]
    n = math.prod(batch_shape)
    sdtype = softmax_dtype(q.dtype)
    q4 = q.reshape(n, tgt_len, heads, head_dim)
    k4 = k.reshape(n, total_len, heads, head_dim)
    v4 = v.reshape(n, total_len, heads, v.shape[-1])

    bias = visible = None
    additive = masks.dense(tgt_len, total_len, sdtype, causal=False)
    if additive is not None:
        bias = _to4(additive)
        visible = jnp.logical_not(jnp.isneginf(bias))
        bias = jnp.where(visible, bias, 0.0).astype(sdtype)
    # jax's is_causal is top-left aligned like torch's, but cannot keep appended keys visible.
    use_is_causal = masks.causal and total_len == masks.src_len
    allowed = visible
    if masks.causal:
        c = jnp.logical_not(masks.causal_mask(tgt_len, total_len)).reshape(1, 1, tgt_len, total_len)
        allowed = c if visible is None else jnp.logical_and(visible, c)
        if not use_is_causal:
            visible = allowed
    if bias is not None and q.dtype != sdtype:
        bias = bias.astype(q.dtype)
    # jax's own code promotes bfloat16/float16 with float32 implicitly: give it the standard
    # promotion rules even when the caller runs with jax_numpy_dtype_promotion="strict".
    # XLA's composition multiplies at the default precision (or the user's, which is in force here): float32
    # is kept float32 as in every other path.
    full = dot_precision(in_dtype) == lax.Precision.HIGHEST
    precision = jax.default_matmul_precision("highest") if full else contextlib.nullcontext()
    with jax.numpy_dtype_promotion("standard"), precision:
        out = jax.nn.dot_product_attention(q4, k4, v4, bias=bias, mask=visible, scale=scale, is_causal=use_is_causal)
    if allowed is not None:
        # The kernel spreads a fully masked row uniformly; torch's semantics here are zeros.
        row_ok = jnp.transpose(jnp.any(allowed, axis=-1), (0, 2, 1))[..., None]  # [N|1, L, H|1, 1]
        row_ok = jnp.broadcast_to(row_ok, (n, tgt_len, heads, 1))
        out = jnp.where(row_ok, out, jnp.zeros((), out.dtype))
    return out.astype(in_dtype).reshape(*batch_shape, tgt_len, heads, v.shape[-1])
