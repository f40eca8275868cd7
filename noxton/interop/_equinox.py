"""torch ``state_dict`` <-> an Equinox model, key by key.

A model's torch key is the dotted path of attribute names and list/tuple
indices that leads to a parameter, exactly as torch names a module tree
(``encoder.layers.0.self_attn.in_proj_weight``). Static fields, ``None`` and
non-array leaves (flags, functions) are not parameters. ``noxton.nn.Sequential``
names its children as torch's (``mlp.c_fc.weight``, ``mlp.0.weight``), and noxton's
BatchNorm keeps torch's buffers in the ``eqx.nn.State`` (read and written when
``state=`` is passed). Three Equinox layers differ from torch and are handled here:
``eqx.nn.Sequential``'s ``layers`` is transparent, as ``nn.Sequential``'s children
(``mlp.0.weight``); a convolution's bias is ``(C, 1, ...)`` in Equinox and ``(C,)``
in torch; ``eqx.nn.BatchNorm`` (whose statistics are not torch's) is refused with an
error that names noxton's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np

from noxton.interop._keys import haiku_location, match_state_dict

#: The Haiku name of an adapted layer's module inside its transformed pair (``noxton.nn._adapter.ROOT``).
ROOT = "module"


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str
    get: Callable[[Any], Any]  # model -> the leaf
    leaf: Any
    torch_shape: tuple[int, ...]
    #: a torch buffer (BatchNorm's ``running_mean``): the ``eqx.nn.StateIndex`` of its layer and its name
    index: Any = None
    buffer: str = ""


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
            f"{key or 'the model'} is an eqx.nn.BatchNorm, whose running statistics are not torch's (its momentum "
            "is the old statistics' weight, its running variance biased, and training normalises by the running "
            "statistics): use noxton.nn.BatchNorm1d/BatchNorm2d, torch's BatchNorm, and pass "
            "load_torch_state_dict(model, state_dict, state=state)."
        )
    elif isinstance(node, eqx.nn.Sequential):
        yield from _walk(node.layers, key, _attr(get, "layers"))
    elif getattr(node, "torch_container", False):  # noxton.nn.Sequential: children by torch's names
        for i, (name, child) in enumerate(zip(node.names, node.layers, strict=True)):
            yield from _walk(child, _join(key, name), _item(_attr(get, "layers"), i))
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
        for name in getattr(node, "torch_buffers", ()):  # kept in the eqx.nn.State, under the layer's index
            index = node.state_index  # pyright: ignore[reportAttributeAccessIssue]
            yield _Entry(_join(key, name), _attr(get, "state_index"), None, (), index, name)
    elif isinstance(node, (list, tuple)):
        for i, child in enumerate(node):
            yield from _walk(child, _join(key, i), _item(get, i))
    elif isinstance(node, dict):
        for name, child in node.items():
            yield from _walk(child, _join(key, name), _item(get, name))


def _entries(model: Any, state: Any = None, *, buffers: bool = True) -> list[_Entry]:
    """The model's parameters and, with ``buffers``, its torch buffers, read from ``state``."""
    if isinstance(model, (jax.Array, np.ndarray)):
        raise TypeError("`model` must be an Equinox module (or a list/dict of them), got a bare array.")
    out = []
    for e in _walk(model, "", lambda m: m):
        if e.index is None:
            out.append(e)
        elif buffers:
            if not isinstance(state, eqx.nn.State):
                raise TypeError(
                    f"`state` must be the model's eqx.nn.State (from eqx.nn.make_with_state): the model keeps torch "
                    f"buffers there ({e.key}, BatchNorm's running statistics), got {type(state).__name__}. "
                    "Call load_torch_state_dict(model, state_dict, state=state), which returns (model, state)."
                )
            leaf = state.get(e.index)[ROOT][e.buffer]
            out.append(dataclasses.replace(e, leaf=leaf, torch_shape=tuple(leaf.shape)))
    return out


def _concrete(entries: list[_Entry], what: str, then: str) -> list[_Entry]:
    """``entries``, refused with a ``TypeError`` when a leaf is abstract (``eqx.filter_eval_shape``'s skeleton)."""
    abstract = [e.key for e in entries if isinstance(e.leaf, jax.ShapeDtypeStruct)]
    if abstract:
        raise TypeError(
            f"{what} holds abstract parameters (jax.ShapeDtypeStruct, as eqx.filter_eval_shape builds) at "
            f"{', '.join(abstract[:4])}{', ...' if len(abstract) > 4 else ''}: {then}."
        )
    return entries


def torch_state_dict(model: Any, *, state: eqx.nn.State | None = None) -> dict[str, np.ndarray]:
    """The torch ``state_dict`` of an Equinox model: ``{dotted key: np.ndarray}`` in torch's layouts.

    Loadable by the corresponding torch model's ``load_state_dict(strict=True)``
    (``{k: torch.from_numpy(v) ...}``). Also works on the gradient
    ``eqx.filter_grad`` returns, so gradients compare with torch's ``param.grad`` by name.

    Without ``state`` these are the parameters (torch's ``named_parameters``); with the model's
    ``eqx.nn.State``, the torch buffers it holds too (BatchNorm's ``running_mean``, ``running_var`` and
    ``num_batches_tracked``, as int64): torch's whole ``state_dict``.

    Example:
        >>> import jax
        >>> import noxton
        >>> mha = noxton.nn.MultiheadAttention(8, 2, key=jax.random.PRNGKey(0))
        >>> sorted(noxton.interop.torch_state_dict(mha))
        ['in_proj_bias', 'in_proj_weight', 'out_proj.bias', 'out_proj.weight']
    """
    entries = _entries(model, state, buffers=state is not None)
    entries = _concrete(entries, "`model`", "they have no values to export: load a state_dict into it first")
    # np.array copies: torch.from_numpy takes the result as is, writable; counters as torch's int64.
    out = {e.key: np.array(e.leaf).reshape(e.torch_shape) for e in entries}
    return {k: out[k].astype(np.int64) if k.endswith("num_batches_tracked") else out[k] for k in out}


def load_torch_state_dict(
    model: Any, state_dict: Mapping[str, Any], *, prefix: str = "", state: eqx.nn.State | None = None
) -> Any:
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
        state: the model's ``eqx.nn.State`` (``eqx.nn.make_with_state``), needed when the model holds
            torch buffers (noxton's ``BatchNorm1d``/``BatchNorm2d``: ``running_mean``, ``running_var``,
            ``num_batches_tracked``, read strictly as torch's keys): they are loaded into it.

    Returns:
        The loaded model; ``(model, state)`` when ``state`` is given.

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
    entries = _entries(model, state, buffers=state is not None)
    expected = {e.key: (e.torch_shape, e.leaf.dtype) for e in entries}
    try:
        values = match_state_dict(
            expected, state_dict, prefix=prefix, what=type(model).__name__, buffers_in="eqx.nn.State: pass state="
        )
    except ValueError:
        _entries(model, state)  # a model with buffers and no state: say so first
        raise
    params = [e for e in entries if e.index is None]
    if params:
        model = eqx.tree_at(
            lambda m: [e.get(m) for e in params], model, [values[e.key].reshape(e.leaf.shape) for e in params]
        )
    if state is None:
        return model
    layers: dict[int, tuple[Any, dict[str, Any]]] = {}  # one State.set per layer: all its buffers at once
    for e in entries:
        if e.index is not None:
            layers.setdefault(id(e.index), (e.index, {}))[1][e.buffer] = values[e.key]
    for index, buffers in layers.values():
        stats = state.get(index)
        state = state.set(index, {**stats, ROOT: {**stats[ROOT], **buffers}})
    return model, state


def haiku_params(layer: Any, root: str) -> dict[str, dict[str, Any]]:
    """The Haiku params tree of a noxton Equinox layer, whose Haiku module is at path ``root``."""
    params: dict[str, dict[str, Any]] = {}
    entries = _entries(layer, buffers=False)
    entries = _concrete(entries, type(layer).__name__, "load a state_dict into it before calling it")
    for e in entries:
        path, name = haiku_location(root, e.key)
        params.setdefault(path, {})[name] = e.leaf
    return params
