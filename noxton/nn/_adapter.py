"""The thin adapter: Haiku modules' transformed pairs as Equinox modules, and the Equinox run of a call.

A leaf layer ([`Adapted`][noxton.nn._adapter.Adapted]: ``MultiheadAttention``,
``Linear``, ``PointwiseConv2d``, ``LayerNorm``) holds its parameters as attributes
named after torch's ``state_dict`` keys (``layer.in_proj_weight``,
``layer.out_proj.weight``) and every hyperparameter as a static field. Its
``__init__`` runs the Haiku module's ``init``; its call assembles the Haiku params
tree from the attributes through the one table of names in ``noxton.interop``
(torch key ``out_proj.weight`` <-> Haiku ``module/~/out_proj``, ``weight``), as Haiku's
own ``FlaxModule`` maps Haiku paths into Flax's structure, and runs the Haiku
module's ``apply``: one implementation for both front ends. The transformed pair
is not stored: a cached factory rebuilds it from the hyperparameters, so two layers
with the same settings share one function and hence one compiled program.

Composite layers (the Transformer layers and stacks, squeeze-excitation) hold their
children as attributes and call them, inheriting torch's forward from
``noxton.functional``, as the Haiku modules do: what a user sees in the tree is what runs.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import equinox as eqx
import haiku as hk
import jax
import numpy as np
from equinox import AbstractClassVar

from noxton.functional._checks import check_inference, check_prng_key
from noxton.functional._transformer import Run, check_input
from noxton.interop import load_torch_state_dict, torch_state_dict
from noxton.interop._equinox import ROOT, haiku_params
from noxton.interop._from_torch import state_dict_from_torch
from noxton.interop._state_dict import haiku_state_dict


def from_torch_weights(module: Any, build: Callable[[jax.Array], Any]) -> Any:
    """``build(key)``'s layer holding torch ``module``'s weights: built abstractly (``eqx.filter_eval_shape``,
    so no random initialisation runs), then loaded. How every ``from_torch`` builds its layer."""
    return load_torch_state_dict(eqx.filter_eval_shape(build, jax.random.PRNGKey(0)), state_dict_from_torch(module))


@functools.cache
def transformed(haiku_cls: type[hk.Module], config: tuple[tuple[str, Any], ...]) -> hk.TransformedWithState:
    """One ``hk.TransformedWithState`` per Haiku class and config.

    ``init(key)`` creates the parameters and the state without running the module (through
    its ``state_dict_params``, which also creates its state); ``apply(params, state, rng,
    method, *args, **kwargs)`` runs its method named ``method`` (``"__call__"``, ``"decode"`` ...).
    """

    def forward(method: str = "state_dict_params", *args, **kwargs):
        return getattr(haiku_cls(**dict(config), name=ROOT), method)(*args, **kwargs)

    return hk.transform_with_state(forward)


class EquinoxRun(Run):
    """A call of a ``noxton.nn`` layer: unbatched inputs, the dropout key passed in (``dropout_key``, or
    ``key`` as ``eqx.nn.Sequential`` passes it), one key per child; the layers of a stack jitted."""

    frontend = "equinox"

    def __init__(self, module: Any, dropout_key: Any, key: Any, implementation: str, *, decoding: bool = False):
        inference = decoding or check_inference(getattr(module, "inference", False), "equinox")
        p = 0.0 if inference else getattr(module, "dropout", 0.0)
        super().__init__(p, dropout_key if dropout_key is not None else key, implementation)
        self.cache: Any = None  # a decoding call's cache: a layer's dict or a stack's list, by child
        self.new_cache: dict[str | int, Any] = {}

    def check(self, name, x, d_model):
        check_input(name, x, d_model, batched=False)

    def options(self):
        out = {} if self.implementation == "auto" else {"implementation": self.implementation}
        key = self.next_key()
        return out if key is None else {**out, "dropout_key": key}

    def layer(self, layer, *args, **kwargs):
        return _jitted_call(layer, *args, **kwargs, **self.options())

    def in_inference(self, child, *args, **kwargs):
        return eqx.nn.inference_mode(child)(*args, **kwargs)

    def init_cache(self, name, child, method, *args, **kwargs):
        self.new_cache[name] = getattr(child, method)(*args, **kwargs)

    def decode(self, name, child, method, *args, **kwargs):
        try:
            part = self.cache[name]
        except (KeyError, IndexError, TypeError):
            raise TypeError(
                f"`cache` must be the cache that this module's init_cache made, got one without a part for {name!r}: "
                f"{_structure(self.cache)}."
            ) from None
        out, self.new_cache[name] = getattr(child, method)(*args, part, **kwargs)
        return out

    def made_cache(self):
        parts = self.new_cache
        return [parts[i] for i in range(len(parts))] if all(isinstance(k, int) for k in parts) else dict(parts)

    def decoded(self, out):
        return out, self.made_cache()


def _structure(cache) -> str:
    return str(jax.tree.map(lambda a: getattr(a, "shape", a), cache))


# Every layer of a stack is called through one jitted function. Layers of one configuration share its
# trace, so JAX traces, differentiates and batches one layer once whatever the depth, and the stack's
# program calls it once per layer (the compile-time table of docs/performance.md); a layer of another
# configuration or class (a subclass, a child replaced by a LoRA wrapper) is traced once more.
@eqx.filter_jit
def _jitted_call(layer, *args, **kwargs):
    return layer(*args, **kwargs)


class Module(eqx.Module):
    """Base of noxton's Equinox layers: torch's ``state_dict`` and ``load_state_dict``, and the run of a call."""

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

    def _run(self, dropout_key: Any = None, *, key: Any = None, implementation: str = "auto") -> "EquinoxRun":
        return EquinoxRun(self, dropout_key, key, implementation)

    def _decoding_run(self, cache: Any = None, implementation: str = "auto") -> "EquinoxRun":
        """A decoding call's run: inference (dropout off), each child's part of ``cache`` passed to it."""
        run = EquinoxRun(self, None, None, implementation, decoding=True)
        run.cache = cache
        return run


@functools.cache
def _haiku_arguments(haiku_cls: type) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(haiku_cls.__init__).parameters if p not in ("self", "name"))


class Adapted(Module):
    """A leaf layer: the Haiku module ``haiku_module``'s ``init`` and ``apply`` on torch-named attributes.

    Its static fields are the Haiku module's constructor arguments of the same names
    (``use_bias`` is the Haiku module's ``bias``, whose name the bias array takes here, as in ``eqx.nn``).

    State: a Haiku module with state (``hk.get_state``: a cache, running statistics) is adapted by a
    layer with a field ``state_index``, an ``eqx.nn.StateIndex`` holding the Haiku state ``init``
    made (see [`_initial_state`][noxton.nn._adapter.Adapted._initial_state]), as ``eqx.nn.BatchNorm``
    holds its statistics: such a layer is built with ``eqx.nn.make_with_state`` and its call takes and
    returns the ``eqx.nn.State`` ([`_apply`][noxton.nn._adapter.Adapted._apply] with ``state=``).
    """

    haiku_module: AbstractClassVar[type[hk.Module]]
    #: Static fields that are not the Haiku module's configuration (``batch_first``: the layer's call is
    #: unbatched, the field only says which axis to ``jax.vmap``).
    equinox_only: ClassVar[tuple[str, ...]] = ()

    def _transformed(self) -> hk.TransformedWithState:
        static = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("static") and f.name not in self.equinox_only
        }
        if "use_bias" in static:
            static["bias"] = static.pop("use_bias")
        config = tuple((name, static[name]) for name in _haiku_arguments(self.haiku_module) if name in static)
        return transformed(self.haiku_module, config)

    def _initial_state_dict(self, key) -> dict[str, Any]:
        """Freshly initialised parameters, keyed by torch's names (``__init__`` runs it once)."""
        params: Any = self._transformed().init(check_prng_key("key", key))[0]
        return haiku_state_dict(params, ROOT)

    def _initial_state(self, key) -> eqx.nn.StateIndex:
        """The Haiku module's initial state, as the ``eqx.nn.StateIndex`` of a stateful layer's ``state_index``."""
        return eqx.nn.StateIndex(self._transformed().init(check_prng_key("key", key))[1])

    def _apply(self, rng, *args, state: eqx.nn.State | None = None, **kwargs) -> Any:
        """The Haiku module's ``apply`` on this layer's parameters: its output; for a stateful layer,
        ``(output, state)`` with the layer's entry of the ``eqx.nn.State`` ``state`` updated."""
        f, params = self._transformed(), haiku_params(self, ROOT)
        index = getattr(self, "state_index", None)
        if index is None:
            if state is not None:
                raise TypeError(f"`state` must be None: {type(self).__name__} holds no state, got {state!r}.")
            return f.apply(params, {}, rng, "__call__", *args, **kwargs)[0]
        if not isinstance(state, eqx.nn.State):
            raise TypeError(
                "`state` must be the eqx.nn.State of the model (from eqx.nn.make_with_state), got "
                f"{type(state).__name__}."
            )
        out, new = f.apply(params, state.get(index), rng, "__call__", *args, **kwargs)
        return out, state.set(index, new)

    def _apply_method(self, method: str, state: Mapping[str, Any] | None, *args, **kwargs) -> tuple[Any, Any]:
        """The Haiku module's method ``method`` on this layer's parameters and on ``state``, the module's
        own Haiku state (a decoding cache): ``(output, the module's new state)``."""
        f = self._transformed()
        out, new = f.apply(
            haiku_params(self, ROOT), {} if state is None else {ROOT: state}, None, method, *args, **kwargs
        )
        return out, new.get(ROOT, {})
