"""Conversion between torch ``state_dict``s and Haiku params trees.

noxton's Haiku modules name their parameters and submodules after torch's
``state_dict`` keys and keep torch's layouts, so a conversion is a renaming:
the Haiku module path ``root/~/out_proj`` with parameter ``weight`` is the torch
key ``out_proj.weight``. ``root`` is the module's path in the params tree, e.g.
``"multihead_attention"`` or, inside a user's module, ``"encoder/multihead_attention"``. Nothing here imports torch; tensors are recognised by
their ``detach`` method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np


def _relative_prefix(module_path: str, root: str) -> str | None:
    """``"root/~/out_proj"`` (or ``"root/out_proj"``) relative to ``"root"`` is ``"out_proj."``."""
    if module_path == root:
        return ""
    if not module_path.startswith(root + "/"):
        return None
    parts = [p for p in module_path[len(root) + 1 :].split("/") if p and p != "~"]
    return ".".join(parts) + "."


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy copy of a torch tensor (any device, bfloat16 included) or array-like."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return np.asarray(jnp.asarray(value.float().numpy(), dtype=jnp.bfloat16))
        return value.numpy().copy()
    return np.asarray(value)


def params_to_state_dict(params: Mapping[str, Mapping[str, Any]], module: str) -> dict[str, np.ndarray]:
    """The torch ``state_dict`` of the noxton module at Haiku path ``module``.

    Args:
        params: a Haiku params tree (from ``init``) or a gradient of one.
        module: the Haiku module path, e.g. ``"multihead_attention"`` or
            ``"encoder/multihead_attention"``.

    Returns:
        ``{torch key: np.ndarray}`` for every parameter of ``module`` and its submodules.
    """
    out: dict[str, np.ndarray] = {}
    for path in params:
        prefix = _relative_prefix(path, module)
        if prefix is None:
            continue
        for name, value in params[path].items():
            out[prefix + name] = np.array(value)  # a writable copy: torch.from_numpy takes it as is
    if not out:
        raise ValueError(f"`module` {module!r} matches no module in `params`, whose modules are {sorted(params)}.")
    return out


def state_dict_to_params(
    params: Mapping[str, Mapping[str, Any]],
    state_dict: Mapping[str, Any],
    module: str,
) -> dict[str, dict[str, Any]]:
    """Load a torch ``state_dict`` into the noxton module at Haiku path ``module``.

    Strict as ``torch.nn.Module.load_state_dict``: missing keys, unexpected keys
    and shape mismatches raise one ``ValueError`` that lists every problem. Values
    (torch tensors or arrays) are cast to the dtype of the parameter they replace.

    Args:
        params: a Haiku params tree holding the module (from ``init``): the template.
        state_dict: torch ``state_dict`` of the corresponding torch module.
        module: the Haiku module path of the noxton module within ``params``.

    Returns:
        A new params tree; ``params`` itself is not modified.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping of torch keys to tensors, got {type(state_dict).__name__}.")
    expected: dict[str, tuple[str, str]] = {}
    for path in params:
        prefix = _relative_prefix(path, module)
        if prefix is not None:
            for name in params[path]:
                expected[prefix + name] = (path, name)
    if not expected:
        raise ValueError(f"`module` {module!r} matches no module in `params`, whose modules are {sorted(params)}.")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = []
    new = {path: dict(entries) for path, entries in params.items()}
    for k, (path, name) in expected.items():
        if k not in state_dict:
            continue
        value = to_numpy(state_dict[k])
        template = params[path][name]
        if tuple(value.shape) != tuple(template.shape):
            mismatched.append(
                f"size mismatch for {k}: expected shape {tuple(template.shape)}, got {tuple(value.shape)}"
            )
            continue
        new[path][name] = jnp.asarray(value, dtype=template.dtype)
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    problems.extend(mismatched)
    if problems:
        raise ValueError(
            f"Error(s) in loading `state_dict` into {module!r} (expected keys {sorted(expected)}):\n  "
            + "\n  ".join(problems)
        )
    return new
