"""Trace-time validation helpers shared by every layer.

Every check raises a ``ValueError`` or ``TypeError`` that names the argument,
says what was expected and what came, so that a user reading the message knows
how to fix the call without opening the source.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


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


def dot_precision(dtype):
    """The precision of the matrix products (and convolutions) of a call on ``dtype`` inputs: torch's arithmetic.

    torch multiplies float32 matrices in float32 unless told otherwise (``allow_tf32`` is off), but JAX's
    default on a GPU is TensorFloat-32, which rounds the operands to 10 bits of mantissa: measured on an
    H200 (jax 0.11.2), ``python -m noxton``'s attention rows were 2.5e-04 off NumPy's float64 at the
    default. So float32 (and float64) inputs ask for ``HIGHEST``; on the CPU, XLA computes float32 in
    float32 either way (compiled programs the same but for the attribute, times level). float16/bfloat16
    inputs keep the default, the matrix units with float32 accumulation, as torch's, in every product of
    the call (also those whose operands were widened to float32). Where the user has set
    ``jax_default_matmul_precision`` (JAX's counterpart of torch's ``allow_tf32``), theirs, in every dtype.
    Decided once, where the call is traced, and passed to each product: a backward rule traced later (after
    the user's ``with jax.default_matmul_precision(...)`` has closed) takes the same.
    """
    user = jax.config.jax_default_matmul_precision  # pyright: ignore[reportAttributeAccessIssue]  (context's too)
    if user is not None:
        return user
    return lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None


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


#: How to supply a dropout key, or switch dropout off, in each front end.
_DROPOUT_KEY_FIX = {
    "equinox": "pass `dropout_key=`, or switch dropout off with `eqx.nn.inference_mode(layer)`",
    "haiku": "pass a key as `rng` to `apply`, or call the module with `inference=True`",
    "functional": "pass `dropout_key=`, or `dropout_p=0.0`",
}


def check_dropout_key(dropout_p: float, key: Any, frontend: str) -> Any:
    """Active dropout needs a PRNG key; the message says how to pass one in ``frontend``."""
    if dropout_p > 0.0 and key is None:
        raise ValueError(f"dropout={dropout_p} is active but no dropout key was given: {_DROPOUT_KEY_FIX[frontend]}.")
    return key if key is None else check_prng_key("dropout_key", key)


def check_inference(value: Any, frontend: str) -> bool:
    """The ``inference`` flag must be a Python bool (a traced one cannot switch dropout)."""
    if not isinstance(value, (bool, np.bool_)):
        hint = (
            " Under `jax.jit` every leaf is traced, this flag included: use `eqx.filter_jit`, which keeps it static."
            if frontend == "equinox"
            else ""
        )
        raise TypeError(f"`inference` must be a Python bool, got {value!r} of type {type(value).__name__}.{hint}")
    return bool(value)


def check_heads(embed_dim: int, num_heads: int, names: tuple[str, str] = ("embed_dim", "num_heads")) -> None:
    """The width must split evenly over the heads (``names``: how the caller's API calls the two)."""
    if embed_dim % num_heads:
        e, h = names
        raise ValueError(f"`{e}` must be divisible by `{h}`, got {e}={embed_dim} and {h}={num_heads}.")


def check_mha_config(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim) -> dict:
    """Validate ``MultiheadAttention`` hyperparameters (both front ends); return them canonicalised, by name."""
    embed_dim = check_positive_int("embed_dim", embed_dim)
    num_heads = check_positive_int("num_heads", num_heads)
    check_heads(embed_dim, num_heads)
    return dict(
        embed_dim=embed_dim,
        num_heads=num_heads,
        dropout=check_probability("dropout", dropout),
        bias=check_bool("bias", bias),
        add_bias_kv=check_bool("add_bias_kv", add_bias_kv),
        add_zero_attn=check_bool("add_zero_attn", add_zero_attn),
        kdim=embed_dim if kdim is None else check_positive_int("kdim", kdim),
        vdim=embed_dim if vdim is None else check_positive_int("vdim", vdim),
    )


def is_hashable(obj: Any) -> bool:
    """Whether ``obj`` can be a static argument of ``jax.jit`` or an Equinox module's static field."""
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a positive float, got {value!r} of type {type(value).__name__}.")
    if not value > 0:
        raise ValueError(f"`{name}` must be a positive float, got {value}.")
    return float(value)


def check_transformer_config(
    d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, norm_first, bias
) -> dict:
    """Validate a ``TransformerEncoderLayer``/``TransformerDecoderLayer`` configuration (both front ends);
    return it canonicalised, by name, the activation resolved to a JAX function."""
    from noxton.functional._activations import transformer_activation

    d_model = check_positive_int("d_model", d_model)
    nhead = check_positive_int("nhead", nhead)
    check_heads(d_model, nhead, ("d_model", "nhead"))
    return dict(
        d_model=d_model,
        nhead=nhead,
        dim_feedforward=check_positive_int("dim_feedforward", dim_feedforward),
        dropout=check_probability("dropout", dropout),
        activation=transformer_activation("activation", activation),
        layer_norm_eps=check_positive_float("layer_norm_eps", layer_norm_eps),
        norm_first=check_bool("norm_first", norm_first),
        bias=check_bool("bias", bias),
    )


def check_is_causal(name: str, value: Any) -> bool:
    """An ``is_causal`` hint: a Python bool, or ``None`` (torch's "detect it": the mask is used as given)."""
    if value is None:
        return False
    return check_bool(name, value)
