"""torch's convolution and batch normalisation: pure functions, no parameters (both front ends run them)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from noxton.functional._checks import check_array, dot_precision, lift, softmax_dtype


@functools.cache
def _differentiates_widened_conv() -> bool:
    """Whether this JAX differentiates a bfloat16 convolution that accumulates in float32
    (``preferred_element_type``). JAX 0.4.38 does not: its transpose convolves the float32 cotangent with the
    bfloat16 operand and raises a ``TypeError``, for the input's gradient and the weight's alike."""

    def f(x, w):
        return lax.conv_general_dilated(x, w, (1,), "VALID", preferred_element_type=jnp.float32).sum()

    one = jax.ShapeDtypeStruct((1, 1, 1), jnp.bfloat16)  # traced only: no array is made
    try:
        jax.eval_shape(jax.grad(f, argnums=(0, 1)), one, one)
    except TypeError:
        return False
    return True


def conv(
    x,
    weight,
    bias=None,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
):
    """torch's ``F.conv1d`` / ``F.conv2d`` (``padding_mode="zeros"``), channels first, in torch's layout.

    Args:
        x: ``[*B, C_in, *spatial]`` with one or two spatial axes (``len(weight.shape) - 2``).
        weight: ``(C_out, C_in // groups, *kernel)``, torch's layout.
        bias: ``(C_out,)`` or ``None``.
        stride: an int, or one per spatial axis.
        padding: an int, or one per spatial axis (zeros on both sides), or ``"same"`` / ``"valid"`` as torch's.
        dilation: an int, or one per spatial axis.
        groups: torch's ``groups`` (``C_in`` for a depthwise convolution).

    Returns:
        ``[*B, C_out, *spatial_out]``, accumulated in float32 (float64 for float64) and rounded once.

    Example:
        >>> import jax.numpy as jnp
        >>> from noxton.functional import conv
        >>> conv(jnp.ones((3, 8, 8)), jnp.ones((4, 3, 3, 3)), stride=(2, 2), padding=(1, 1)).shape
        (4, 4, 4)
    """
    n = weight.ndim - 2
    x = check_array("x", x, min_rank=n + 1, layout=f"(..., C, {', '.join('HW'[-n:] if n <= 2 else 'DHW')})")
    options = check_conv_options(n, tuple(weight.shape[2:]), stride, padding, dilation)
    batch = x.shape[: x.ndim - n - 1]
    y = x.reshape((-1, *x.shape[x.ndim - n - 1 :]))
    pad = options["padding"]
    pad = pad.upper() if isinstance(pad, str) else [(p, p) for p in pad]
    spec = ("NCH", "OIH", "NCH") if n == 1 else ("NCHW", "OIHW", "NCHW")
    acc = softmax_dtype(x.dtype)
    weight = weight.astype(x.dtype)
    if jnp.dtype(x.dtype).itemsize < acc.itemsize and not _differentiates_widened_conv():
        # Widened first, where this JAX could not differentiate the low-precision form: the products of
        # float16/bfloat16 values are exact in float32 and accumulate there, as preferred_element_type has them.
        y, weight = y.astype(acc), weight.astype(acc)
    out = lax.conv_general_dilated(
        y,
        weight,
        window_strides=options["stride"],
        padding=pad,
        rhs_dilation=options["dilation"],
        dimension_numbers=spec,
        feature_group_count=groups,
        precision=dot_precision(x.dtype),
        preferred_element_type=acc,
    )
    if bias is not None:
        out = out + lift(bias.astype(x.dtype).astype(acc)[(...,) + (None,) * n], out.ndim)
    return out.astype(x.dtype).reshape((*batch, *out.shape[1:]))


def batch_norm(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked=None,
    axis_name=None,
):
    """torch's ``F.batch_norm`` over ``(N, C, *spatial)``, with its running-statistics update.

    In training the batch's statistics normalise (the biased variance), and the running ones move
    towards them as torch's: ``running = (1 - momentum) * running + momentum * batch`` with the
    **unbiased** batch variance (``momentum=None``: the cumulative average, ``1 / num_batches_tracked``).
    In evaluation the running statistics normalise and nothing changes.

    Args:
        x: ``(N, C, *spatial)``.
        running_mean: ``(C,)``.
        running_var: ``(C,)``.
        weight: ``(C,)`` or ``None``.
        bias: ``(C,)`` or ``None``.
        training: use and update the batch's statistics (torch's ``module.training``).
        momentum: torch's ``momentum`` (the weight of the new batch), or ``None``.
        eps: added to the variance.
        num_batches_tracked: the batches seen so far (``()`` int), or ``None``; counted up in training.
        axis_name: a ``jax.vmap`` axis the batch is also mapped over (the Equinox layers' unbatched
            calls): its statistics are the whole batch's (``lax.pmean``).

    Returns:
        ``(y, (running_mean, running_var, num_batches_tracked))``, the new statistics when ``training``.

    Example:
        >>> import jax.numpy as jnp
        >>> from noxton.functional import batch_norm
        >>> x = jnp.arange(8.0).reshape(4, 2)
        >>> y, (mean, var, _) = batch_norm(x, jnp.zeros(2), jnp.ones(2), training=True)  # var: 0.9 + 0.1 * 20 / 3
        >>> mean.tolist(), [round(v, 4) for v in var.tolist()]
        ([0.30000001192092896, 0.4000000059604645], [1.5667, 1.5667])
    """
    x = check_array("x", x, min_rank=2, layout="(N, C, ...)")
    axes = (0, *range(2, x.ndim))
    acc = softmax_dtype(x.dtype)
    xs = x.astype(acc)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    new = (running_mean, running_var, num_batches_tracked)
    if training:
        mean = jnp.mean(xs, axis=axes)
        count = jnp.asarray(x.size // x.shape[1], acc)
        if axis_name is not None:
            mean = lax.pmean(mean, axis_name)
        var = jnp.mean(jnp.square(xs - mean.reshape(shape)), axis=axes)
        if axis_name is not None:
            var = lax.pmean(var, axis_name)
            count = lax.psum(count, axis_name)
        tracked = None if num_batches_tracked is None else num_batches_tracked + 1
        if momentum is None:
            if tracked is None:
                raise ValueError("`num_batches_tracked` must be given with momentum=None (the cumulative average).")
            factor = 1.0 / tracked.astype(acc)
        else:
            factor = jnp.asarray(momentum, acc)
        unbiased = var * count / jnp.maximum(count - 1, 1)
        new_mean = (1 - factor) * running_mean.astype(acc) + factor * mean
        new_var = (1 - factor) * running_var.astype(acc) + factor * unbiased
        new = (new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype), tracked)
    else:
        mean, var = running_mean.astype(acc), running_var.astype(acc)
    y = (xs - mean.reshape(shape)) * lax.rsqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.astype(acc).reshape(shape)
    if bias is not None:
        y = y + bias.astype(acc).reshape(shape)
    return y.astype(x.dtype), new


def check_conv_options(n: int, kernel_size, stride, padding, dilation) -> dict:
    """torch's ``kernel_size``, ``stride``, ``padding``, ``dilation`` (an int or ``n`` ints; ``padding`` also
    ``"same"``/``"valid"``) as tuples of ``n`` ints; a ``ValueError``/``TypeError`` naming the argument otherwise."""

    def ints(name, value, minimum):
        values = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
        if (
            not isinstance(values, (tuple, list))
            or len(values) != n
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        ):
            raise TypeError(f"`{name}` must be an int or a tuple of {n} ints, got {value!r}.")
        if any(v < minimum for v in values):
            raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}.")
        return tuple(values)

    out: dict[str, Any] = dict(
        kernel_size=ints("kernel_size", kernel_size, 1),
        stride=ints("stride", stride, 1),
        dilation=ints("dilation", dilation, 1),
    )
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"`padding` must be 'same', 'valid', an int or a tuple of {n} ints, got {padding!r}.")
        if padding == "same" and out["stride"] != (1,) * n:
            raise ValueError(f"`padding='same'` needs stride 1 (as torch), got stride={stride!r}.")
        out["padding"] = padding
    else:
        out["padding"] = ints("padding", padding, 0)
    return out
