"""torch ``state_dict`` <-> an Equinox model, key by key.

A model's torch key is the dotted path of attribute names and list/tuple
indices that leads to a parameter, exactly as torch names a module tree
(``encoder.layers.0.self_attn.in_proj_weight``). Static fields, ``None`` and
non-array leaves (flags, functions) are not parameters. Three Equinox layers
differ from torch and are handled here: ``eqx.nn.Sequential``'s ``layers`` is
transparent, as ``nn.Sequential``'s children (``mlp.0.weight``); a convolution's
bias is ``(C, 1, ...)`` in Equinox and ``(C,)`` in torch; BatchNorm keeps its
running statistics in ``eqx.nn.State``, which a model alone does not hold, so it
is refused with an error that says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np

from noxton.interop._keys import haiku_location, match_state_dict


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str
    get: Callable[[Any], Any]  # model -> the leaf
    leaf: Any
    torch_shape: tuple[int, ...]


def _join(prefix: str, name: object) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _attr(get, name):
    return lambda m: getattr(get(m), name)


def _item(get, index):
    return lambda m: get(m)[index]


def _walk(node: Any, key: str, get: Callable) -> Iterator[_Entry]:
    if node is None:
        return
    if isinstance(node, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        yield _Entry(key, get, node, tuple(node.shape))
    elif isinstance(node, eqx.nn.StateIndex):
        return  # state (a cache, running statistics) lives in `eqx.nn.State`, not in the model's parameters
    elif isinstance(node, eqx.nn.BatchNorm):
        raise ValueError(
            f"{key or 'the model'} is an {type(node).__name__}: its running statistics live in `eqx.nn.State`, "
            "which load_torch_state_dict/torch_state_dict do not handle. Load them into the state by hand "
            "(`state.set(bn.state_index, (mean, var))`) and the other weights with a model without BatchNorm."
        )
    elif isinstance(node, eqx.nn.Sequential):
        yield from _walk(node.layers, key, _attr(get, "layers"))
    elif isinstance(node, eqx.nn.ConvTranspose):
        raise ValueError(
            f"{key or 'the model'}: eqx.nn.ConvTranspose is not supported (its weight layout is not torch's)."
        )
    elif isinstance(node, eqx.Module):
        for field in dataclasses.fields(node):
            if field.metadata.get("static", False):
                continue
            child = getattr(node, field.name, None)
            if isinstance(node, eqx.nn.Conv) and field.name == "bias" and child is not None:
                yield _Entry(_join(key, "bias"), _attr(get, "bias"), child, tuple(child.shape[:1]))
            else:
                yield from _walk(child, _join(key, field.name), _attr(get, field.name))
    elif isinstance(node, (list, tuple)):
        for i, child in enumerate(node):
            yield from _walk(child, _join(key, i), _item(get, i))
    elif isinstance(node, dict):
        for name, child in node.items():
            yield from _walk(child, _join(key, name), _item(get, name))


def _entries(model: Any) -> list[_Entry]:
    if isinstance(model, (jax.Array, np.ndarray)):
        raise TypeError("`model` must be an Equinox module (or a list/dict of them), got a bare array.")
    return list(_walk(model, "", lambda m: m))


def _concrete(entries: list[_Entry], what: str, then: str) -> list[_Entry]:
    """``entries``, refused with a ``TypeError`` when a leaf is abstract (``eqx.filter_eval_shape``'s skeleton)."""
    abstract = [e.key for e in entries if isinstance(e.leaf, jax.ShapeDtypeStruct)]
    if abstract:
        raise TypeError(
            f"{what} holds abstract parameters (jax.ShapeDtypeStruct, as eqx.filter_eval_shape builds) at "
            f"{', '.join(abstract[:4])}{', ...' if len(abstract) > 4 else ''}: {then}."
        )
    return entries


def torch_state_dict(model: Any) -> dict[str, np.ndarray]:
    """The torch ``state_dict`` of an Equinox model: ``{dotted key: np.ndarray}`` in torch's layouts.

    Loadable by the corresponding torch model's ``load_state_dict(strict=True)``
    (``{k: torch.from_numpy(v) ...}``). Also works on the gradient
    ``eqx.filter_grad`` returns, so gradients compare with torch's ``param.grad`` by name.

    Example:
        >>> import jax
        >>> import noxton
        >>> mha = noxton.nn.MultiheadAttention(8, 2, key=jax.random.PRNGKey(0))
        >>> sorted(noxton.interop.torch_state_dict(mha))
        ['in_proj_bias', 'in_proj_weight', 'out_proj.bias', 'out_proj.weight']
    """
    entries = _concrete(_entries(model), "`model`", "they have no values to export: load a state_dict into it first")
    # np.array copies: torch.from_numpy takes the result as is, writable.
    return {e.key: np.array(e.leaf).reshape(e.torch_shape) for e in entries}


def load_torch_state_dict(model: Any, state_dict: Mapping[str, Any], *, prefix: str = "") -> Any:
    """A copy of ``model`` with every parameter taken from a torch ``state_dict``.

    Strict, as ``torch.nn.Module.load_state_dict``: missing, unexpected and
    mis-shaped keys raise one ``ValueError`` listing every problem, and naming the
    prefix that would make the keys match when there is one; nothing is loaded
    half-way. Values (torch tensors or arrays) are cast to the model's dtypes.

    Args:
        model: an Equinox model: noxton's layers, ``eqx.nn.Linear``,
            ``Conv1d/2d/3d``, ``LayerNorm``, ``GroupNorm``, ``Embedding``,
            ``Sequential``, plain array attributes, and lists, tuples and dicts of them;
            initialised, or abstract as ``eqx.filter_eval_shape`` builds it (no
            initialiser runs, as with torch's ``device="meta"``): either loads the same.
        state_dict: a torch ``state_dict`` (tensors or arrays).
        prefix: read the keys ``prefix + key`` and ignore the others, e.g.
            ``"encoder.layers.0.self_attention."`` to load one layer of a whole
            model's ``state_dict``.

    Example:
        >>> import jax, torch
        >>> import noxton
        >>> torch_model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> import equinox as eqx
        >>> model = eqx.nn.Sequential([eqx.nn.Linear(4, 8, key=jax.random.PRNGKey(0)),
        ...                            eqx.nn.Lambda(jax.nn.relu),
        ...                            eqx.nn.Linear(8, 2, key=jax.random.PRNGKey(1))])
        >>> model = noxton.interop.load_torch_state_dict(model, torch_model.state_dict())
        >>> sorted(noxton.interop.torch_state_dict(model))
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    entries = _entries(model)
    expected = {e.key: (e.torch_shape, e.leaf.dtype) for e in entries}
    values = match_state_dict(expected, state_dict, prefix=prefix, what=type(model).__name__)
    if not entries:
        return model
    return eqx.tree_at(
        lambda m: [e.get(m) for e in entries], model, [values[e.key].reshape(e.leaf.shape) for e in entries]
    )


def haiku_params(layer: Any, root: str) -> dict[str, dict[str, Any]]:
    """The Haiku params tree of a noxton Equinox layer, whose Haiku module is at path ``root``."""
    params: dict[str, dict[str, Any]] = {}
    entries = _concrete(_entries(layer), type(layer).__name__, "load a state_dict into it before calling it")
    for e in entries:
        path, name = haiku_location(root, e.key)
        params.setdefault(path, {})[name] = e.leaf
    return params
