"""The thin adapter: a Haiku module's transformed pair, bundled as an Equinox module.

An adapted layer holds its parameters as attributes named after torch's
``state_dict`` keys (``layer.in_proj_weight``, ``layer.out_proj.weight``) and every
hyperparameter as a static field. At call time the Haiku params tree is
assembled from those attributes through the one table of names in
``noxton.interop`` (torch key ``out_proj.weight`` <-> Haiku ``<name>/~/out_proj``,
``weight``), as Haiku's own ``FlaxModule`` maps Haiku paths into Flax's
structure, and the Haiku module's ``apply`` runs: one implementation for both
front ends. The ``hk.transform`` pair is not stored: a cached factory rebuilds it
from the hyperparameters, so two layers with the same settings share one
function and hence one compiled program under ``eqx.filter_jit``.
"""

import abc
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import haiku as hk
import jax
import numpy as np
from equinox import AbstractClassVar

from noxton.functional._checks import check_prng_key
from noxton.interop import load_torch_state_dict, torch_state_dict
from noxton.interop._equinox import haiku_params
from noxton.interop._from_torch import state_dict_from_torch
from noxton.interop._state_dict import haiku_state_dict


def from_torch_weights(module: Any, build: Callable[[jax.Array], Any]) -> Any:
    """``build(key)``'s layer holding torch ``module``'s weights: built abstractly (``eqx.filter_eval_shape``,
    so no random initialisation runs), then loaded. How every ``from_torch`` builds its layer."""
    return eqx.filter_eval_shape(build, jax.random.PRNGKey(0)).load_state_dict(state_dict_from_torch(module))


@functools.cache
def transformed(haiku_cls: type[hk.Module], name: str, config: tuple[tuple[str, Any], ...]) -> hk.Transformed:
    """One ``hk.Transformed`` per Haiku class, module name and config.

    ``init(key)`` creates the parameters without running the layer (through the
    module's ``state_dict_params``); ``apply(params, rng, *args, **kwargs)`` calls it.
    """
    kwargs = dict(config)

    def forward(*args, **kw):
        # Composites whose Haiku constructor takes template modules build from hashable configs instead.
        module = getattr(haiku_cls, "_from_config", haiku_cls)(**kwargs, name=name)
        return module(*args, **kw) if args else module.state_dict_params()

    return hk.transform(forward)


class HaikuLayer(eqx.Module):
    """Base of noxton's Equinox layers: torch-named parameter attributes, static hyperparameters.

    Subclasses set ``haiku_cls`` and ``haiku_name`` (the name of the Haiku module
    their parameters belong to) and implement ``_config`` (the Haiku module's
    constructor kwargs, all static).
    """

    haiku_cls: AbstractClassVar[type[hk.Module]]
    haiku_name: AbstractClassVar[str]

    @abc.abstractmethod
    def _config(self) -> tuple[tuple[str, Any], ...]:
        """The Haiku module's constructor kwargs, as a hashable tuple of pairs."""

    @classmethod
    def _from_fields(cls, **fields):
        """An instance holding ``fields`` as they are, without ``__init__``'s random initialisation:
        how a composite builds its children from its own initial ``state_dict``."""
        names = {f.name for f in dataclasses.fields(cls)}
        if set(fields) != names:
            raise TypeError(
                f"{cls.__name__}._from_fields needs exactly the fields {sorted(names)}, got {sorted(fields)}."
            )
        obj = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(obj, name, value)
        return obj

    def _initial_state_dict(self, key) -> dict[str, Any]:
        """Freshly initialised parameters, keyed by torch's names (run once, in ``__init__``)."""
        f = transformed(self.haiku_cls, self.haiku_name, self._config())
        return haiku_state_dict(f.init(check_prng_key("key", key)), self.haiku_name)

    def _apply(self, rng, *args, **kwargs):
        f = transformed(self.haiku_cls, self.haiku_name, self._config())
        return f.apply(haiku_params(self, self.haiku_name), rng, *args, **kwargs)

    def state_dict(self) -> dict[str, np.ndarray]:
        """torch ``state_dict`` of this layer (NumPy arrays keyed by torch's names).

        Also works on the gradient ``eqx.filter_grad`` returns for this layer, so
        gradients compare with torch's ``param.grad`` by name. The same as
        [`noxton.interop.torch_state_dict(layer)`][noxton.interop.torch_state_dict].
        """
        return torch_state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any], *, prefix: str = ""):
        """A copy of this layer with the weights of a torch ``state_dict`` (tensors or arrays).

        Strict, as torch's: missing keys, unexpected keys and shape mismatches
        raise one ``ValueError`` listing every problem. Values are cast to this
        layer's parameter dtype. The same as
        [`noxton.interop.load_torch_state_dict(layer, state_dict)`][noxton.interop.load_torch_state_dict].
        Only weights are loaded: use ``from_torch`` to also take a torch module's
        configuration (``num_heads``, ``dropout``, activations), which a
        ``state_dict`` does not hold.
        """
        return load_torch_state_dict(self, state_dict, prefix=prefix)
