"""The one table of names: torch ``state_dict`` keys <-> Haiku params locations.

noxton's Haiku modules name their parameters and submodules after torch's
``state_dict`` keys and create every submodule in ``__init__``, so the torch key
``out_proj.weight`` of the module at Haiku path ``root`` is the parameter
``weight`` of the Haiku module ``root/~/out_proj``, and ``in_proj_weight`` is the
parameter ``in_proj_weight`` of ``root`` itself. The Equinox layers hold the same
keys as attribute paths (``layer.out_proj.weight``). This module holds that rule
and the strict key matching shared by every loader.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

#: Joins a ``ModuleList`` attribute and an index into one Haiku module name: ``layers.0`` <-> ``layers__0``.
INDEX_SEPARATOR = "__"
_INDEXED = re.compile(r"(.+)__(\d+)")
#: A child of a Haiku ``Sequential`` at torch index ``0`` is named ``_0`` (a Haiku name is an identifier).
_SEQUENTIAL_INDEX = re.compile(r"_(\d+)")


def haiku_module_name(attr: str, index: int) -> str:
    """The Haiku name of item ``index`` of the torch ``ModuleList`` ``attr`` (``layers``, 0 -> ``layers__0``)."""
    return f"{attr}{INDEX_SEPARATOR}{index}"


def haiku_location(root: str, key: str) -> tuple[str, str]:
    """``(module path, parameter name)`` of torch key ``key`` under Haiku module ``root``."""
    *parts, name = key.split(".")
    modules: list[str] = []
    for part in parts:
        if part.isdigit() and modules:
            modules[-1] = haiku_module_name(modules[-1], int(part))
        else:
            modules.append(part)
    return "/~/".join([root, *modules]), name


def torch_key(root: str, module_path: str, name: str) -> str | None:
    """The torch key of parameter ``name`` of Haiku module ``module_path`` relative to ``root``
    (``None`` when ``module_path`` is not ``root`` or below it)."""
    if module_path == root:
        return name
    if not module_path.startswith(root + "/"):
        return None
    parts = [p for p in module_path[len(root) + 1 :].split("/") if p and p != "~"]
    parts = [(lambda m: f"{m[1]}.{m[2]}" if m else p)(_INDEXED.fullmatch(p)) for p in parts]
    parts = [(lambda m: m[1] if m else p)(_SEQUENTIAL_INDEX.fullmatch(p)) for p in parts]
    return ".".join([*parts, name])


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy copy of a torch tensor (any device, bfloat16 included) or array-like."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return np.asarray(jnp.asarray(value.float().numpy(), dtype=jnp.bfloat16))
        return value.numpy().copy()
    return np.asarray(value)


def _prefix_hint(expected: list[str], given: list[str]) -> str:
    """A sentence saying which prefix would make the keys match, or ``""``."""
    if not expected or not given:
        return ""
    given_set, expected_set = set(given), set(expected)
    first = expected[0]
    for g in given:  # the state_dict has extra leading names: strip them
        if g.endswith("." + first):
            p = g[: -len(first)]
            if all(p + e in given_set for e in expected):
                return f' Its keys match under the prefix "{p}": pass prefix="{p}" (or strip "{p}" from the keys).'
    for e in expected:  # the model expects leading names the state_dict lacks
        if e.endswith("." + given[0]):
            p = e[: -len(given[0])]
            if all(p + g in expected_set for g in given):
                return f' The model\'s keys are the state_dict\'s under "{p}": add "{p}" to the state_dict\'s keys.'
    return ""


#: The buffers of torch's BatchNorm, kept in each front end's state (Haiku state, ``eqx.nn.State``).
TORCH_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _naming_hint(missing: list[str], unexpected: list[str]) -> str:
    """A sentence for keys that differ in one part, an index on one side and a name on the other
    (``mlp.0.weight`` against ``mlp.c_fc.weight``): a ``Sequential`` named or indexed unlike torch's."""
    for m in missing:
        mp = m.split(".")
        for u in unexpected:
            up = u.split(".")
            if len(mp) != len(up):
                continue
            diff = [i for i, (a, b) in enumerate(zip(mp, up, strict=True)) if a != b]
            if len(diff) == 1 and mp[diff[0]].isdigit() != up[diff[0]].isdigit():
                i = diff[0]
                where = ".".join(mp[:i]) or "the model"
                model_kind, sd_kind = ("an index", "a name") if mp[i].isdigit() else ("a name", "an index")
                return (
                    f" The model's child {mp[i]!r} of {where} is the state_dict's {up[i]!r}: {model_kind} where "
                    f"torch has {sd_kind}. torch's nn.Sequential names its "
                    f"children 0, 1, ... or by an OrderedDict: build noxton's Sequential the same way "
                    f"(a list, or a mapping of torch's names to layers)."
                )
    return ""


def match_state_dict(
    expected: Mapping[str, tuple[tuple[int, ...], Any]],
    state_dict: Any,
    *,
    prefix: str = "",
    what: str,
    buffers_in: str = "",
) -> dict[str, Any]:
    """Strictly match a torch ``state_dict`` against ``expected`` ``{key: (shape, dtype)}``.

    Keys of ``state_dict`` are ``prefix + key``; keys outside ``prefix`` are ignored
    (as torch does when loading a submodule). Missing, unexpected and mis-shaped
    keys raise one ``ValueError`` listing every problem, with the prefix that would
    make the keys match when there is one; otherwise returns ``{key: array}`` cast
    to the expected dtypes.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping of torch keys to tensors, got {type(state_dict).__name__}.")
    if not isinstance(prefix, str):
        raise TypeError(f"`prefix` must be a str such as 'encoder.', got {prefix!r}.")
    given = {k[len(prefix) :]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(prefix)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    out, problems = {}, []
    for k, (shape, dtype) in expected.items():
        if k not in given:
            continue
        value = to_numpy(given[k])
        if tuple(value.shape) != tuple(shape):
            problems.append(f"size mismatch for {prefix}{k}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
        else:
            out[k] = jnp.asarray(value, dtype=dtype)
    if missing:
        problems.insert(0, "missing keys: " + ", ".join(prefix + k for k in missing))
    if unexpected:
        problems.insert(1 if missing else 0, "unexpected keys: " + ", ".join(prefix + k for k in unexpected))
    if problems:
        hint = _prefix_hint(list(expected), list(state_dict)) if missing else ""
        hint += _naming_hint([prefix + k for k in missing], [prefix + k for k in unexpected])
        buffers = [k for k in unexpected if k.rsplit(".", 1)[-1] in TORCH_BUFFERS]
        if buffers and buffers_in:
            hint += (
                f" {prefix}{buffers[0]}{' and the like' if len(buffers) > 1 else ''} are torch buffers (BatchNorm's "
                f"running statistics), which the model keeps in its {buffers_in}."
            )
        raise ValueError(
            f"Error(s) in loading `state_dict` into {what} ({len(expected)} expected keys):\n  "
            + "\n  ".join(problems)
            + hint
        )
    return out
