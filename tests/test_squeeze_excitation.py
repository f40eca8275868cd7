"""SqueezeExcitation against torch (torchvision's block rebuilt from torch.nn), both front ends."""

from __future__ import annotations

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TorchSqueezeExcitation, assert_close, requires_torch, torch

import noxton.haiku as nxhk
from noxton.nn import SqueezeExcitation

# (activation, scale_activation) as torch modules: together every activation from_torch maps.
ACTIVATIONS = {
    "relu-sigmoid": ("ReLU", {}, "Sigmoid", {}),
    "relu6-hardsigmoid": ("ReLU6", {}, "Hardsigmoid", {}),
    "silu-tanh": ("SiLU", {}, "Tanh", {}),
    "gelu-sigmoid": ("GELU", {}, "Sigmoid", {}),
    "gelutanh-identity": ("GELU", {"approximate": "tanh"}, "Identity", {}),
    "hardswish-hardsigmoid": ("Hardswish", {}, "Hardsigmoid", {}),
}


def torch_se(C, Q, acts, dtype):
    act, act_kw, scale, scale_kw = ACTIVATIONS[acts]
    torch.manual_seed(0)
    return TorchSqueezeExcitation(C, Q, getattr(torch.nn, act)(**act_kw), getattr(torch.nn, scale)(**scale_kw)).to(
        dtype
    )


@requires_torch
@pytest.mark.parametrize("acts", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(6, 3, 5), (3, 1, 1)], ids=str)
@pytest.mark.parametrize("front", ["equinox", "haiku"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_from_torch_parity(front, shape, acts, precision, request):
    """from_torch takes channels, activations and weights; outputs and gradients match torch's by name."""
    if precision == "float64":
        request.getfixturevalue("x64")
    np_dtype, t_dtype = (np.float32, torch.float32) if precision == "float32" else (np.float64, torch.float64)
    atol, gatol = (1e-5, 1e-4) if precision == "float32" else (1e-10, 1e-10)
    if precision == "float64" and "hardsigmoid" in acts:
        # torch's float64 Hardsigmoid backward is inexact (slope 1/6 + 5e-9, a relative 3e-8); noxton's is 1/6.
        gatol = 1e-7
    C, Hh, W = shape
    tm = torch_se(C, max(1, C // 4), acts, t_dtype)
    x = np.random.default_rng(0).normal(size=(2, C, Hh, W)).astype(np_dtype)
    r = np.random.default_rng(1).normal(size=x.shape).astype(np_dtype)
    tx = torch.tensor(x, requires_grad=True)
    t_out = tm(tx)
    (t_out * torch.tensor(r)).sum().backward()
    t_grads = {"x": tx.grad.numpy(), **{f"param.{n}": p.grad.numpy() for n, p in tm.named_parameters()}}

    if front == "equinox":
        se = SqueezeExcitation.from_torch(tm)
        assert se.dtype == np_dtype

        def run(se, x):
            return jax.vmap(se)(x)

        out = run(se, jnp.asarray(x))
        g_se, gx = eqx.filter_grad(lambda a: jnp.sum(run(*a) * r))((se, jnp.asarray(x)))
        grads = {"x": gx, **{f"param.{n}": v for n, v in g_se.state_dict().items()}}
    else:
        f = hk.transform(lambda x: nxhk.SqueezeExcitation.from_torch(tm)(x))
        params = f.init(None, jnp.asarray(x))
        out = f.apply(params, None, jnp.asarray(x))
        gp, gx = jax.grad(lambda p, x: jnp.sum(f.apply(p, None, x) * r), argnums=(0, 1))(params, jnp.asarray(x))
        grads = {"x": gx, **{f"param.{n}": v for n, v in nxhk.params_to_state_dict(gp, "squeeze_excitation").items()}}
    assert_close(out, t_out.detach().numpy(), atol, "output")
    assert sorted(grads) == sorted(t_grads)
    for n in t_grads:
        assert_close(grads[n], t_grads[n], gatol, n)


def test_haiku_call_activation_overrides_constructor(key):
    x = jax.random.normal(key, (2, 4, 3, 3))

    def f(x, override):
        se = nxhk.SqueezeExcitation(4, 2, activation=jax.nn.tanh)
        return se(x, activation=jax.nn.relu) if override else se(x)

    t = hk.transform(f)
    params = t.init(key, x, False)
    expected_relu = hk.transform(lambda x: nxhk.SqueezeExcitation(4, 2)(x)).apply(params, None, x)
    assert jnp.array_equal(t.apply(params, None, x, True), expected_relu)
    assert not jnp.allclose(t.apply(params, None, x, False), expected_relu)


def test_haiku_leading_batch_dims(key):
    x = jax.random.normal(key, (2, 3, 8, 5, 5))
    f = hk.transform(lambda x: nxhk.SqueezeExcitation(8, 2)(x))
    params = f.init(key, x)
    out = f.apply(params, None, x)
    flat = f.apply(params, None, x.reshape(6, 8, 5, 5)).reshape(x.shape)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, flat, rtol=1e-6, atol=1e-6)


def test_params_tree_reads_like_torch(key):
    x = jnp.ones((8, 3, 3))
    params = hk.transform(lambda x: nxhk.SqueezeExcitation(8, 2)(x)).init(key, x)
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
    assert shapes == {
        "squeeze_excitation/~/fc1": {"weight": (2, 8, 1, 1), "bias": (2,)},
        "squeeze_excitation/~/fc2": {"weight": (8, 2, 1, 1), "bias": (8,)},
    }
