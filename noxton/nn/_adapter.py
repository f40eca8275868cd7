"""The thin adapter: a Haiku module's transformed pair, bundled as an Equinox module.

An adapted layer stores the Haiku params tree as its only array leaves and
every hyperparameter as a static field. The ``hk.Transformed`` pair is not
stored: it is rebuilt from the hyperparameters by a cached factory, so two
layers with the same settings share one function, one treedef, and hence one
compiled program under ``eqx.filter_jit``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import equinox as eqx
import haiku as hk
import numpy as np

from noxton.functional._checks import check_prng_key
from noxton.interop import params_to_state_dict, state_dict_to_params


@functools.lru_cache(maxsize=None)
def transformed(haiku_cls: type[hk.Module], config: tuple[tuple[str, Any], ...]) -> tuple[Any, Any]:
    """``(init, apply)`` for ``haiku_cls(**dict(config))``, one pair per distinct config.

    ``init(key)`` creates the parameters without running the layer (through the
    module's ``state_dict_params``); ``apply(params, rng, *args, **kwargs)`` calls it.
    """
    kwargs = dict(config)
    init = hk.transform(lambda: haiku_cls(**kwargs).state_dict_params()).init
    apply = hk.transform(lambda *args, **kw: haiku_cls(**kwargs)(*args, **kw)).apply
    return init, apply


class HaikuLayer(eqx.Module):
    """Base of noxton's Equinox layers: Haiku params plus static hyperparameters.

    Subclasses set ``haiku_cls`` and ``haiku_name`` (the Haiku module path their
    params live under) and implement ``_config`` (the static constructor kwargs).
    """

    params: dict[str, dict[str, Any]]

    haiku_cls: ClassVar[type[hk.Module]]
    haiku_name: ClassVar[str]

    def _config(self) -> tuple[tuple[str, Any], ...]:
        raise NotImplementedError

    def _init_params(self, key) -> dict[str, dict[str, Any]]:
        init, _ = transformed(self.haiku_cls, self._config())
        return init(check_prng_key("key", key))

    def _apply(self, rng, *args, **kwargs):
        _, apply = transformed(self.haiku_cls, self._config())
        return apply(self.params, rng, *args, **kwargs)

    def state_dict(self) -> dict[str, np.ndarray]:
        """torch ``state_dict`` of this layer (NumPy arrays keyed by torch's names).

        Also works on the gradient ``eqx.filter_grad`` returns for this layer, so
        gradients compare with torch's ``param.grad`` by name.
        """
        return params_to_state_dict(self.params, self.haiku_name)

    def load_state_dict(self, state_dict: Mapping[str, Any]):
        """A copy of this layer with the weights of a torch ``state_dict`` (tensors or arrays).

        Strict, as torch's: missing keys, unexpected keys and shape mismatches
        raise one ``ValueError`` listing every problem. Values are cast to this
        layer's parameter dtype.
        """
        new = state_dict_to_params(self.params, state_dict, self.haiku_name)
        return eqx.tree_at(lambda m: m.params, self, new)
