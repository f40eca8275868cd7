"""torch's default initialisers as Haiku initialisers (``init(shape, dtype)``).

Each draws from ``hk.next_rng_key()``, so every parameter gets its own key.
Fans follow ``torch.nn.init._calculate_fan_in_and_fan_out``: for a weight of
shape ``(out, in, *k)``, ``fan_in = in * prod(k)`` and ``fan_out = out * prod(k)``.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp


def _fans(shape) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"fan_in and fan_out need a weight of rank >= 2, got shape {shape}.")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def xavier_uniform(shape, dtype):
    """``torch.nn.init.xavier_uniform_``: U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(shape)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(hk.next_rng_key(), shape, dtype, -bound, bound)


def xavier_normal(shape, dtype):
    """``torch.nn.init.xavier_normal_``: N(0, 2 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(shape)
    std = math.sqrt(2.0 / (fan_in + fan_out))
    return std * jax.random.normal(hk.next_rng_key(), shape, dtype)


def torch_default_weight(shape, dtype):
    """``nn.Linear``/``nn.Conv2d`` weight: ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    fan_in, _ = _fans(shape)
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return jax.random.uniform(hk.next_rng_key(), shape, dtype, -bound, bound)


def torch_default_bias(fan_in: int):
    """``nn.Linear``/``nn.Conv2d`` bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(shape, dtype):
        return jax.random.uniform(hk.next_rng_key(), shape, dtype, -bound, bound)

    return init


def zeros(shape, dtype):
    return jnp.zeros(shape, dtype)


def ones(shape, dtype):
    return jnp.ones(shape, dtype)
