"""Room for state: a Haiku module with state (``hk.get_state``) adapted to Equinox keeps it in
``eqx.nn.State``, as ``eqx.nn.BatchNorm`` does; the torch interop walks such a model without refusing it.

The stateful module here is the test's own (a running mean of its inputs, as BatchNorm keeps), built on
noxton's adapter as the library's stateful layers are."""

from __future__ import annotations

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array

from noxton.functional._checks import lift
from noxton.haiku import _initializers as init
from noxton.haiku._common import TorchModule, resolve_dtype
from noxton.interop import load_torch_state_dict, torch_state_dict
from noxton.nn._adapter import Adapted

F = 3


class HaikuRunningMean(TorchModule):
    """``x * weight + running_mean``; a training call first moves ``running_mean`` towards the batch's mean."""

    def __init__(self, features: int, momentum: float = 0.5, *, dtype=None, name=None):
        super().__init__(name=name)
        self.features, self.momentum, self.dtype = features, momentum, resolve_dtype(dtype)

    def params(self):
        hk.get_state("running_mean", (self.features,), self.dtype, init=init.zeros)
        return {"weight": self.param("weight", (self.features,), self.dtype, init.ones)}

    def __call__(self, x, training: bool = True):
        w = self.params()["weight"]
        mean = hk.get_state("running_mean")
        if training:
            mean = (1 - self.momentum) * mean + self.momentum * jnp.mean(x, axis=tuple(range(x.ndim - 1)))
            hk.set_state("running_mean", mean)
        return x * lift(w, x.ndim) + lift(mean, x.ndim)


class RunningMean(Adapted):
    weight: Array
    state_index: eqx.nn.StateIndex
    features: int = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    haiku_module = HaikuRunningMean

    def __init__(self, features, momentum=0.5, *, dtype=None):
        self.features, self.momentum, self.dtype = features, momentum, resolve_dtype(dtype)
        key = jax.random.PRNGKey(0)
        self.weight = self._initial_state_dict(key)["weight"]
        self.state_index = self._initial_state(key)

    def __call__(self, x, state, training=True):
        return self._apply(None, x, training, state=state)


def test_an_adapted_layer_keeps_its_haiku_state_in_eqx_state():
    model, state = eqx.nn.make_with_state(RunningMean)(F)
    x = jnp.arange(2 * F, dtype=jnp.float32).reshape(2, F)
    y, state = model(x, state)
    np.testing.assert_allclose(state.get(model.state_index)["module"]["running_mean"], 0.5 * x.mean(0))
    np.testing.assert_allclose(y, x + 0.5 * x.mean(0, keepdims=True))
    step = eqx.filter_jit(lambda m, x, s: m(x, s))
    _, state = step(model, x, state)  # jitted, the state threads through
    np.testing.assert_allclose(state.get(model.state_index)["module"]["running_mean"], 0.75 * x.mean(0))
    y_eval, same = model(x, state, training=False)
    np.testing.assert_allclose(y_eval, x + 0.75 * x.mean(0, keepdims=True))
    np.testing.assert_allclose(same.get(model.state_index)["module"]["running_mean"], 0.75 * x.mean(0))  # unchanged
    # the same module in Haiku, with hk.transform_with_state
    f = hk.transform_with_state(lambda x: HaikuRunningMean(F)(x))
    params, hk_state = f.init(None, x)
    _, hk_state = f.apply(params, hk_state, None, x)
    np.testing.assert_allclose(hk_state["haiku_running_mean"]["running_mean"], 0.5 * x.mean(0))


def test_interop_walks_a_model_that_holds_state():
    model, state = eqx.nn.make_with_state(lambda: {"stats": RunningMean(F), "scale": jnp.ones(2)})()
    assert sorted(torch_state_dict(model)) == ["scale", "stats.weight"]
    loaded = load_torch_state_dict(model, {"scale": np.full(2, 3.0), "stats.weight": np.full(F, 2.0)})
    np.testing.assert_array_equal(loaded["stats"].weight, np.full(F, 2.0))
    y, _ = loaded["stats"](jnp.ones((1, F)), state)
    np.testing.assert_allclose(y, np.full((1, F), 2.5))


@pytest.mark.own_errors
def test_state_errors_name_the_argument():
    model, state = eqx.nn.make_with_state(RunningMean)(F)
    with pytest.raises(TypeError, match=r"`state` must be the eqx.nn.State of the model .* got dict"):
        model(jnp.ones((1, F)), {})
