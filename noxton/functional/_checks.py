"""Trace-time validation helpers shared by every layer.

Every check raises a ``ValueError`` or ``TypeError`` that names the argument,
says what was expected and what came, so that a user reading the message knows
how to fix the call without opening the source.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive int, got {value!r} of type {type(value).__name__}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value}.")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool, got {value!r} of type {type(value).__name__}.")
    return bool(value)


def check_probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a float in [0, 1), got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
    return value


def check_floating_dtype(name: str, dtype: Any) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"`{name}` must be a floating dtype such as jnp.float32, got {dtype!r}.") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a floating dtype such as jnp.float32, got {dtype}.")
    return dtype


def check_array(name: str, x: Any, *, min_rank: int, max_rank: int | None = None, layout: str) -> Any:
    """Check that ``x`` is a floating array of an allowed rank; return it unchanged."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"`{name}` must be an array of shape {layout}, got {type(x).__name__}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating dtype, got {x.dtype}; cast it with `.astype(jnp.float32)`.")
    rank = x.ndim
    if rank < min_rank or (max_rank is not None and rank > max_rank):
        hint = " Batch it with `jax.vmap`." if max_rank is not None and rank > max_rank else ""
        raise ValueError(f"`{name}` must have shape {layout}, got shape {tuple(x.shape)} (rank {rank}).{hint}")
    return x


def check_dim(name: str, shape: tuple[int, ...], axis: int, expected: int, what: str) -> None:
    if shape[axis] != expected:
        raise ValueError(
            f"`{name}` must have {what} {expected} in its last axis, got shape {tuple(shape)}."
            if axis == -1
            else f"`{name}` must have {what} {expected} at axis {axis}, got shape {tuple(shape)}."
        )


def lift(x, ndim: int):
    """Prepend unit axes so that ``x`` has rank ``ndim``: explicit, documented broadcasting."""
    return x.reshape((1,) * (ndim - x.ndim) + tuple(x.shape))


def finite_shift(row_max, dtype):
    """A row maximum made safe to subtract before ``exp``: ``-inf`` (a row whose
    every score is masked) becomes 0, so that row gives ``exp(-inf) = 0``, not NaN."""
    return jnp.where(jnp.isneginf(row_max), 0.0, row_max).astype(dtype)


def softmax_dtype(dtype):
    """Scores and softmax run in float32, or in float64 for float64 inputs."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype).itemsize > 4 else jnp.dtype(jnp.float32)


def check_prng_key(name: str, key: Any) -> Any:
    """A typed PRNG key (``jax.random.key``) or a raw one (``jax.random.PRNGKey``: uint32, shape (2,))."""
    import jax

    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        if key.dtype == jnp.uint32 and key.shape == (2,):
            return key
        got = f"an array of dtype {key.dtype} and shape {tuple(key.shape)}"
    else:
        got = type(key).__name__
    raise TypeError(f"`{name}` must be a PRNG key from `jax.random.PRNGKey` or `jax.random.key`, got {got}.")
