"""The activations torch's layers use, as exact JAX functions, and the one check of an activation argument.

``TORCH_ACTIVATIONS`` maps the class name of a torch activation module to the
JAX function that computes exactly the same thing (torch is never imported: the
table is names only). Module-level functions, not lambdas or partials, so that
layers with the same activation share one compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def gelu(x):
    """torch's ``nn.GELU()`` (``approximate="none"``): ``x * Phi(x)`` with the exact erf."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    """torch's ``nn.GELU(approximate="tanh")``."""
    return jax.nn.gelu(x, approximate=True)


def quick_gelu(x):
    """open_clip's (OpenAI CLIP's) ``QuickGELU``: ``x * sigmoid(1.702 * x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def identity(x):
    """torch's ``nn.Identity()``."""
    return x


#: torch class name -> (exact JAX function, how to write it in JAX).
TORCH_ACTIVATIONS: dict[str, tuple[Callable, str]] = {
    "ReLU": (jax.nn.relu, "jax.nn.relu"),
    "ReLU6": (jax.nn.relu6, "jax.nn.relu6"),
    "SiLU": (jax.nn.silu, "jax.nn.silu"),
    "GELU": (gelu, "noxton.functional.gelu (exact; noxton.functional.gelu_tanh for approximate='tanh')"),
    "Hardsigmoid": (jax.nn.hard_sigmoid, "jax.nn.hard_sigmoid"),
    "Hardswish": (jax.nn.hard_swish, "jax.nn.hard_swish"),
    "Sigmoid": (jax.nn.sigmoid, "jax.nn.sigmoid"),
    "Tanh": (jnp.tanh, "jnp.tanh"),
    "Identity": (identity, "noxton.functional.identity"),
    "QuickGELU": (quick_gelu, "noxton.functional.quick_gelu (open_clip's, OpenAI CLIP's)"),
}


def _torch_module_class(obj: Any) -> type | None:
    """The class of a torch ``nn.Module`` instance or subclass, else ``None``."""
    cls = obj if isinstance(obj, type) else type(obj)
    for base in cls.__mro__:
        if base.__name__ == "Module" and base.__module__.startswith("torch.nn"):
            return cls
    return None


def activation_from_torch(name: str, module: Any) -> Callable:
    """The exact JAX function for the torch activation ``module`` (an ``nn.Module`` instance)."""
    cls = _torch_module_class(module)
    if cls is None or isinstance(module, type):
        raise TypeError(f"`{name}` must be a torch activation module such as nn.ReLU(), got {module!r}.")
    if cls.__name__ == "GELU":
        approximate = getattr(module, "approximate", "none")
        if approximate not in ("none", "tanh"):
            raise ValueError(f"`{name}`: nn.GELU(approximate={approximate!r}) is not one of 'none', 'tanh'.")
        return gelu if approximate == "none" else gelu_tanh
    if cls.__name__ not in TORCH_ACTIVATIONS:
        raise ValueError(
            f"`{name}`: torch's {cls.__name__} has no exact JAX counterpart in noxton; supported: "
            + ", ".join(TORCH_ACTIVATIONS)
            + ". Build the layer by hand with the JAX function you need."
        )
    return TORCH_ACTIVATIONS[cls.__name__][0]


def check_activation(name: str, fn: Any) -> Callable:
    """A JAX activation function; a torch module or class gets a ``TypeError`` naming the JAX function to pass."""
    cls = _torch_module_class(fn)
    if cls is not None:
        jax_name = TORCH_ACTIVATIONS.get(cls.__name__, (None, None))[1]
        fix = f"pass {jax_name} instead" if jax_name else "pass a JAX function instead"
        raise TypeError(
            f"`{name}` must be a JAX function, got the torch {'class' if isinstance(fn, type) else 'module'} "
            f"{cls.__name__}: {fix} (or build the layer with `from_torch`)."
        )
    if not callable(fn):
        raise TypeError(f"`{name}` must be a callable such as jax.nn.relu, got {fn!r}.")
    return fn


#: torch's ``_get_activation_fn``: the strings ``nn.Transformer*`` layers accept.
_TRANSFORMER_ACTIVATIONS: dict[str, Callable] = {"relu": jax.nn.relu, "gelu": gelu}

#: torch's functional activations, by name, as ``F.relu`` or ``F.gelu`` are passed to ``nn.Transformer*``.
_TORCH_FUNCTIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu": gelu,
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu6": jax.nn.relu6,
}


def transformer_activation(name: str, activation: Any) -> Callable:
    """``activation`` of a Transformer layer: ``"relu"``, ``"gelu"`` (exact erf, as torch's), or a JAX callable."""
    if isinstance(activation, str):
        if activation not in _TRANSFORMER_ACTIVATIONS:
            raise ValueError(f"`{name}` must be 'relu', 'gelu' or a callable, got {activation!r}.")
        return _TRANSFORMER_ACTIVATIONS[activation]
    return check_activation(name, activation)


def transformer_activation_from_torch(name: str, activation: Any) -> Callable:
    """The exact JAX function for a torch Transformer layer's ``activation``: a torch function
    (``F.relu``, ``F.gelu``, ...) or an activation module (``nn.GELU()``)."""
    if _torch_module_class(activation) is not None:
        return activation_from_torch(name, activation)
    module = getattr(activation, "__module__", None) or ""
    fn_name = getattr(activation, "__name__", None)
    if module.startswith("torch") and fn_name in _TORCH_FUNCTIONS:
        return _TORCH_FUNCTIONS[fn_name]
    raise ValueError(
        f"`{name}`: {activation!r} has no exact JAX counterpart known to noxton; supported: the torch functions "
        + ", ".join(f"F.{n}" for n in _TORCH_FUNCTIONS)
        + " and the modules "
        + ", ".join(TORCH_ACTIVATIONS)
        + ". Build the layer with the JAX function you need and load the weights with load_state_dict."
    )
