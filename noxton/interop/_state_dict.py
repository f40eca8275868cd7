"""torch ``state_dict`` <-> Haiku params tree, for a noxton module anywhere in the tree."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from noxton.interop._keys import match_state_dict, torch_key


def _entries(params: Mapping[str, Mapping[str, Any]], module: str) -> dict[str, tuple[str, str]]:
    out = {}
    for path, entries in params.items():
        for name in entries:
            k = torch_key(module, path, name)
            if k is not None:
                out[k] = (path, name)
    if not out:
        raise ValueError(f"`module` {module!r} matches no module in `params`, whose modules are {sorted(params)}.")
    return out


def haiku_state_dict(params: Mapping[str, Mapping[str, Any]], module: str) -> dict[str, Any]:
    """``{torch key: array}`` for the noxton module at Haiku path ``module``, arrays as they are."""
    return {k: params[path][name] for k, (path, name) in _entries(params, module).items()}


def params_to_state_dict(
    params: Mapping[str, Mapping[str, Any]], module: str, *, state: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, np.ndarray]:
    """The torch ``state_dict`` of the noxton module at Haiku path ``module``.

    Args:
        params: a Haiku params tree (from ``init``) or a gradient of one.
        module: the Haiku module path, e.g. ``"multihead_attention"`` or
            ``"encoder/multihead_attention"``.
        state: the Haiku state (``hk.transform_with_state``): its torch buffers (BatchNorm's
            ``running_mean``, ``running_var``, ``num_batches_tracked``) are exported too, as in torch's
            ``state_dict``. Without it, the parameters only (torch's ``named_parameters``).

    Returns:
        ``{torch key: np.ndarray}`` for every parameter (and buffer) of ``module`` and its submodules.
    """
    tree = _merged(params, state)
    # np.array copies: torch.from_numpy takes the result as is, writable; counters as torch's int64.
    out = {k: np.array(v) for k, v in haiku_state_dict(tree, module).items()}
    return {k: v.astype(np.int64) if k.endswith("num_batches_tracked") else v for k, v in out.items()}


def _merged(params, state):
    if state is None:
        return params
    merged = {path: dict(v) for path, v in params.items()}
    for path, entries in state.items():
        clash = set(entries) & set(merged.get(path, {}))
        if clash:
            raise ValueError(f"`state` and `params` both hold {sorted(clash)} of Haiku module {path!r}.")
        merged.setdefault(path, {}).update(entries)
    return merged


def state_dict_to_params(
    params: Mapping[str, Mapping[str, Any]],
    state_dict: Mapping[str, Any],
    module: str,
    *,
    prefix: str = "",
    state: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """Load a torch ``state_dict`` into the noxton module at Haiku path ``module``.

    Strict as ``torch.nn.Module.load_state_dict``: missing keys, unexpected keys
    and shape mismatches raise one ``ValueError`` that lists every problem (and
    names the prefix that would make the keys match, when one would). Values
    (torch tensors or arrays) are cast to the dtype of the parameter they replace.

    Args:
        params: a Haiku params tree holding the module (from ``init``): the template.
        state_dict: torch ``state_dict`` of the corresponding torch module.
        module: the Haiku module path of the noxton module within ``params``.
        prefix: read the keys ``prefix + key`` of ``state_dict`` and ignore the
            others, e.g. ``"encoder.layers.0.self_attn."`` for one layer of a
            whole model's ``state_dict``.
        state: the Haiku state from ``init`` (``hk.transform_with_state``) of a model with torch buffers
            (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``): they are loaded into it.

    Returns:
        A new params tree, or ``(params, state)`` when ``state`` is given; the inputs are not modified.
    """
    tree = _merged(params, state)
    entries = _entries(tree, module)
    expected = {k: (tree[p][n].shape, tree[p][n].dtype) for k, (p, n) in entries.items()}
    values = match_state_dict(
        expected, state_dict, prefix=prefix, what=f"Haiku module {module!r}", buffers_in="Haiku state: pass state="
    )
    new = {path: dict(e) for path, e in params.items()}
    new_state = None if state is None else {path: dict(e) for path, e in state.items()}
    for k, value in values.items():
        path, name = entries[k]
        if new_state is not None and name in new_state.get(path, {}):
            new_state[path][name] = value
        else:
            new[path][name] = value
    return new if new_state is None else (new, new_state)
