"""Model surgery as torch users do it: a child wrapped in LoRA, a subclassed layer, a stack of mixed layers,
children seen by Haiku's interceptors. What a module holds is what runs, in both front ends, with torch's
numbers and gradients by torch name (torch running the same surgery)."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TorchSqueezeExcitation, assert_close, requires_torch, torch
from jaxtyping import Array

import noxton.haiku as nxhk
import noxton.nn as nx
from noxton.interop import torch_state_dict

pytestmark = requires_torch

E, H, FF, S, R = 8, 2, 16, 5, 3  # d_model, heads, feed-forward, length, LoRA rank


def _randomised(m, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.5, 0.5)
    return m


class TorchLoRA(torch.nn.Module if torch else object):
    """``base(x) + x @ a.T @ b.T``: a low-rank update of a linear or 1x1 convolution."""

    def __init__(self, base, rank, seed, conv=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        fan_in, fan_out = base.weight.shape[1], base.weight.shape[0]
        self.base, self.conv = base, conv
        self.a = torch.nn.Parameter(0.3 * torch.randn(rank, fan_in, generator=g))
        self.b = torch.nn.Parameter(0.3 * torch.randn(fan_out, rank, generator=g))

    def forward(self, x):
        if self.conv:  # (N, C, H, W): the update acts on the channels
            return self.base(x) + torch.einsum("nchw,rc,or->nohw", x, self.a, self.b)
        return self.base(x) + x @ self.a.T @ self.b.T


class LoRA(eqx.Module):
    """The same in Equinox: any module with the wrapped child's call."""

    base: Any
    a: Array
    b: Array
    conv: bool = eqx.field(static=True, default=False)

    def __call__(self, x, *, key=None):
        if self.conv:  # (C, H, W)
            return self.base(x) + jnp.einsum("chw,rc,or->ohw", x, self.a, self.b)
        return self.base(x) + x @ self.a.T @ self.b.T


def _lora_of(torch_lora, base, conv=False):
    return LoRA(base, jnp.asarray(torch_lora.a.detach().numpy()), jnp.asarray(torch_lora.b.detach().numpy()), conv)


def _torch_grads(tm, x, ct, *args):
    tm.zero_grad()
    out = tm(torch.from_numpy(x), *args)
    (out * torch.from_numpy(ct)).sum().backward()
    return out.detach().numpy(), {n: p.grad.numpy() for n, p in tm.named_parameters()}


def _equinox_grads(model, x, ct, call=lambda m, x: m(x)):
    def loss(m):
        out = jax.vmap(lambda x: call(m, x))(jnp.asarray(x))
        return jnp.sum(out * ct), out

    (_, out), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
    return out, torch_state_dict(grads)


def _check(out, grads, t_out, t_grads, what):
    assert_close(out, t_out, 1e-5, f"{what} output")
    assert sorted(grads) == sorted(t_grads), what
    for n in t_grads:
        assert_close(grads[n], t_grads[n], 1e-4, f"{what} grad {n}")


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def test_lora_in_a_transformer_layer_runs_with_torchs_numbers_and_gradients():
    """``layer.linear1`` wrapped in LoRA (Equinox: ``eqx.tree_at``), as torch's forward calls ``self.linear1``."""
    tm = _randomised(torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True))
    layer = nx.TransformerEncoderLayer.from_torch(tm)
    tm.linear1 = TorchLoRA(tm.linear1, R, seed=1)
    x, ct = _inputs((2, S, E))
    t_out, t_grads = _torch_grads(tm, x, ct)
    model = eqx.tree_at(lambda m: m.linear1, layer, _lora_of(tm.linear1, layer.linear1))
    out, grads = _equinox_grads(model, x, ct)
    _check(out, grads, t_out, t_grads, "equinox LoRA")
    assert "linear1.a" in grads and "linear1.base.weight" in grads
    assert not np.allclose(out, jax.vmap(layer)(jnp.asarray(x)), atol=1e-3)  # the wrapper changed the result


def test_lora_in_a_haiku_layer_runs_with_torchs_numbers():
    """In Haiku, a user's own module put in place of ``linear1`` before the call is what the layer calls."""
    tm = _randomised(torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True))
    x, _ = _inputs((2, S, E))
    base = torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True)
    base.load_state_dict(tm.state_dict())
    tm.linear1 = TorchLoRA(tm.linear1, R, seed=1)
    a, b = (jnp.asarray(p.detach().numpy()) for p in (tm.linear1.a, tm.linear1.b))

    class HaikuLoRA(hk.Module):
        def __init__(self, inner):
            super().__init__(name="lora")
            self.inner = inner

        def __call__(self, x):
            pa = hk.get_parameter("a", a.shape, init=lambda *_: a)
            pb = hk.get_parameter("b", b.shape, init=lambda *_: b)
            return self.inner(x) + x @ pa.T @ pb.T

    def forward(x):
        layer = nxhk.TransformerEncoderLayer.from_torch(base)
        layer.linear1 = HaikuLoRA(layer.linear1)
        return layer(x, inference=True)

    f = hk.transform(forward)
    params = f.init(None, jnp.asarray(x))
    assert set(params["lora"]) == {"a", "b"}
    with torch.no_grad():
        expected = tm.train()(
            torch.from_numpy(x)
        ).numpy()  # train mode, dropout 0: eval's fast path reads linear1.weight
        assert_close(f.apply(params, None, jnp.asarray(x)), expected, 1e-5, "haiku")


def test_lora_in_squeeze_excitation_fc1():
    """torchvision's SE calls ``self.fc1``: so does noxton's, in both front ends."""
    C, Q = 6, 3
    tm = _randomised(TorchSqueezeExcitation(C, Q))
    se = nx.SqueezeExcitation.from_torch(tm)
    tm.fc1 = TorchLoRA(tm.fc1, 2, seed=2, conv=True)
    x, ct = _inputs((2, C, 4, 4))
    t_out, t_grads = _torch_grads(tm, x, ct)
    model = eqx.tree_at(lambda m: m.fc1, se, _lora_of(tm.fc1, se.fc1, conv=True))
    out, grads = _equinox_grads(model, x, ct)
    _check(out, grads, t_out, t_grads, "equinox SE LoRA")


class _Doubled(nx.TransformerEncoderLayer):
    """A subclass whose call doubles the layer's output."""

    def __call__(self, src, *args, **kwargs):
        return 2.0 * super().__call__(src, *args, **kwargs)


class _TorchDoubled(torch.nn.TransformerEncoderLayer if torch else object):
    def forward(self, src, *args, **kwargs):
        return 2.0 * super().forward(src, *args, **kwargs)


def test_a_stack_calls_what_it_holds_subclasses_and_mixed_configurations():
    """torch's encoder loops over ``self.layers``: a subclass and a layer of another width run there."""
    kw = dict(dropout=0.0, batch_first=True)
    tm = _randomised(torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(E, H, FF, **kw), 3), seed=3)
    doubled = _TorchDoubled(E, H, FF, **kw)
    doubled.load_state_dict(tm.layers[0].state_dict())
    tm.layers[0] = doubled
    tm.layers[1] = _randomised(torch.nn.TransformerEncoderLayer(E, H, 2 * FF, norm_first=True, **kw), seed=4)
    encoder = nx.TransformerEncoder.from_torch(
        torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(E, H, FF, **kw), 3, enable_nested_tensor=False)
    )
    first = _Doubled(E, H, FF, dropout=0.0, key=jax.random.PRNGKey(0))
    encoder = eqx.tree_at(
        lambda m: (m.layers[0], m.layers[1]),
        encoder,
        (first, nx.TransformerEncoderLayer.from_torch(tm.layers[1])),
    )
    encoder = encoder.load_state_dict(tm.state_dict())
    assert encoder.layers[1].dim_feedforward == 2 * FF and type(encoder.layers[0]) is _Doubled
    x, ct = _inputs((2, S, E))
    t_out, t_grads = _torch_grads(tm, x, ct)
    out, grads = _equinox_grads(encoder, x, ct)
    _check(out, grads, t_out, t_grads, "mixed stack")
    # and the stack's jitted call is what a user jits: the whole thing again under eqx.filter_jit
    out_jit = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(encoder, jnp.asarray(x))
    assert_close(out_jit, t_out, 1e-5, "jitted mixed stack")


def test_a_stack_can_grow_and_shrink():
    layer = nx.TransformerEncoderLayer(E, H, FF, inference=True, key=jax.random.PRNGKey(0))
    encoder = nx.TransformerEncoder(layer, 2)
    x = jnp.ones((S, E))
    grown = eqx.tree_at(lambda m: m.layers, encoder, [*encoder.layers, layer])
    assert grown.num_layers == 3 and sorted(grown.state_dict())[-1].startswith("layers.2.")
    assert_close(grown(x), layer(layer(layer(x))), 1e-5, "three layers")
    assert_close(eqx.tree_at(lambda m: m.layers, encoder, [layer])(x), layer(x), 1e-6, "one layer")


def test_haiku_interceptors_see_every_child_call():
    """``hk.intercept_methods`` sees the stack call each layer and each layer call its children."""
    seen = []

    def interceptor(method, args, kwargs, context):
        if context.method_name == "__call__":
            seen.append(context.module.module_name)
        return method(*args, **kwargs)

    def forward(x):
        with hk.intercept_methods(interceptor):
            enc = nxhk.TransformerEncoder(nxhk.TransformerEncoderLayer(E, H, FF), 2, nxhk.LayerNorm(E))
            return enc(x, inference=True)

    f = hk.transform(forward)
    x = jnp.ones((2, S, E))
    params = f.init(jax.random.PRNGKey(0), x)
    seen.clear()
    f.apply(params, None, x)
    for i in range(2):
        layer = f"transformer_encoder/~/layers__{i}"
        for child in ("self_attn", "linear1", "linear2", "norm1", "norm2"):
            assert f"{layer}/~/{child}" in seen, (child, seen)
        assert layer in seen
    assert "transformer_encoder/~/norm" in seen


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_a_stack_traces_each_configuration_once(kind):
    """Every layer of one configuration shares one trace (a relu that counts its traces sees one per
    configuration); a layer of another configuration is traced once more."""

    class CountingRelu:
        traces = 0

        def __call__(self, x):
            CountingRelu.traces += 1
            return jax.nn.relu(x)

        def __hash__(self):
            return 0

        def __eq__(self, other):
            return isinstance(other, CountingRelu)

    relu = CountingRelu()
    layer_cls = nx.TransformerEncoderLayer if kind == "encoder" else nx.TransformerDecoderLayer
    stack_cls = nx.TransformerEncoder if kind == "encoder" else nx.TransformerDecoder
    layer = layer_cls(E, H, FF, activation=relu, inference=True, key=jax.random.PRNGKey(0))
    stack = stack_cls(layer, 6)
    args = (jnp.ones((S, E)),) if kind == "encoder" else (jnp.ones((S, E)), jnp.ones((S + 1, E)))
    eqx.filter_jit(lambda m, *a: m(*a))(stack, *args)
    assert CountingRelu.traces == 1
    other = layer_cls(E, H, 2 * FF, activation=relu, inference=True, key=jax.random.PRNGKey(1))
    eqx.filter_jit(lambda m, *a: m(*a))(eqx.tree_at(lambda m: m.layers[3], stack, other), *args)
    assert CountingRelu.traces == 2


def test_haiku_squeeze_excitation_calls_its_children_and_custom_getters_see_their_parameters():
    """In Haiku, an ``fc1`` replaced before the call runs (torch running the same LoRA), and a
    ``hk.custom_getter`` sees every parameter the block's children read."""
    C, Q = 6, 3
    tm = _randomised(TorchSqueezeExcitation(C, Q))
    base = TorchSqueezeExcitation(C, Q)
    base.load_state_dict(tm.state_dict())
    tm.fc1 = TorchLoRA(tm.fc1, 2, seed=2, conv=True)
    a, b = (jnp.asarray(p.detach().numpy()) for p in (tm.fc1.a, tm.fc1.b))
    read = []

    def getter(next_getter, value, context):
        read.append(context.full_name)
        return next_getter(value)

    def forward(x):
        se = nxhk.SqueezeExcitation.from_torch(base)
        fc1 = se.fc1
        se.fc1 = lambda h: fc1(h) + jnp.einsum("nchw,rc,or->nohw", h, a, b)
        with hk.custom_getter(getter):
            return se(x)

    f = hk.transform(forward)
    x, _ = _inputs((2, C, 4, 4))
    params = f.init(None, jnp.asarray(x))
    read.clear()
    out = f.apply(params, None, jnp.asarray(x))
    with torch.no_grad():
        assert_close(out, tm(torch.from_numpy(x)).numpy(), 1e-5, "haiku SE LoRA")
    assert sorted(read) == sorted(f"squeeze_excitation/~/{fc}/{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias"))
