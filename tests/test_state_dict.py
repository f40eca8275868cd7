"""state_dict interop: torch keys, strict loading, bit-for-bit round trips."""

from __future__ import annotations

import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TorchSqueezeExcitation, grid, requires_torch, torch

import noxton.haiku as nxhk
from noxton.nn import MultiheadAttention, SqueezeExcitation

MHA_CONFIGS = grid(bias=[True, False], add_bias_kv=[False, True], kdims=[None, (3, 5)])


def build(cfg, key):
    kdim, vdim = cfg["kdims"] or (None, None)
    return MultiheadAttention(8, 2, bias=cfg["bias"], add_bias_kv=cfg["add_bias_kv"], kdim=kdim, vdim=vdim, key=key)


@requires_torch
@pytest.mark.parametrize("cfg", MHA_CONFIGS, ids=str)
def test_mha_keys_and_shapes_match_torch(cfg, key):
    kdim, vdim = cfg["kdims"] or (None, None)
    tm = torch.nn.MultiheadAttention(8, 2, bias=cfg["bias"], add_bias_kv=cfg["add_bias_kv"], kdim=kdim, vdim=vdim)
    ours = build(cfg, key).state_dict()
    theirs = tm.state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].shape == tuple(theirs[k].shape), k
        assert isinstance(ours[k], np.ndarray)


@requires_torch
@pytest.mark.parametrize("cfg", MHA_CONFIGS, ids=str)
def test_mha_round_trip_through_torch_is_bit_exact(cfg, key):
    kdim, vdim = cfg["kdims"] or (None, None)
    mha = build(cfg, key)
    tm = torch.nn.MultiheadAttention(8, 2, bias=cfg["bias"], add_bias_kv=cfg["add_bias_kv"], kdim=kdim, vdim=vdim)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in mha.state_dict().items()})
    back = build(cfg, jax.random.PRNGKey(1)).load_state_dict(tm.state_dict())
    for k, v in mha.state_dict().items():
        assert np.array_equal(back.state_dict()[k], v), k
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(mha)


@requires_torch
def test_se_round_trip_through_torch_is_bit_exact(key):
    se = SqueezeExcitation(8, 2, key=key)
    tm = TorchSqueezeExcitation(8, 2)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in se.state_dict().items()})
    assert sorted(tm.state_dict()) == sorted(se.state_dict())
    back = SqueezeExcitation(8, 2, key=jax.random.PRNGKey(3)).load_state_dict(tm.state_dict())
    for k, v in se.state_dict().items():
        assert np.array_equal(back.state_dict()[k], v), k


def test_load_accepts_numpy_and_casts_to_parameter_dtype(key):
    mha = MultiheadAttention(8, 2, key=key)
    sd = {k: v.astype(np.float64) for k, v in mha.state_dict().items()}
    loaded = mha.load_state_dict(sd)
    for k, v in loaded.state_dict().items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, mha.state_dict()[k])


def test_load_is_strict_and_lists_every_problem(key):
    mha = MultiheadAttention(8, 2, key=key)
    sd = dict(mha.state_dict())
    del sd["in_proj_bias"]
    del sd["out_proj.bias"]
    sd["bias_k"] = np.zeros((1, 1, 8), np.float32)
    sd["out_proj.weight"] = np.zeros((8, 4), np.float32)
    with pytest.raises(ValueError) as e:
        mha.load_state_dict(sd)
    msg = str(e.value)
    assert "missing keys: in_proj_bias, out_proj.bias" in msg
    assert "unexpected keys: bias_k" in msg
    assert re.search(r"size mismatch for out_proj.weight: expected shape \(8, 8\), got \(8, 4\)", msg)


def test_state_dict_of_gradient(key):
    import equinox as eqx

    mha = MultiheadAttention(8, 2, key=key)
    q = jax.random.normal(key, (3, 8))
    g = eqx.filter_grad(lambda m: jnp.sum(m(q, q, q)[0]))(mha)
    sd = g.state_dict()
    assert sorted(sd) == sorted(mha.state_dict())
    assert all(np.isfinite(v).all() for v in sd.values())
    assert np.abs(sd["out_proj.bias"] - 3.0).max() < 1e-6  # d sum(out) / d out_bias = L


def test_haiku_nested_module_path(key):
    def model(x):
        return Encoder()(x)

    class Encoder(hk.Module):
        def __call__(self, x):
            se = nxhk.SqueezeExcitation(8, 2)(x.T[None, :, :, None])[0, :, :, 0].T
            return nxhk.MultiheadAttention(8, 2)(se, se, se)[0]

    f = hk.transform(model)
    x = jnp.ones((4, 8))
    params = f.init(key, x)
    sd = nxhk.params_to_state_dict(params, "encoder/multihead_attention")
    assert sorted(sd) == ["in_proj_bias", "in_proj_weight", "out_proj.bias", "out_proj.weight"]
    sd = {k: v + 1 for k, v in sd.items()}
    new = nxhk.state_dict_to_params(params, sd, "encoder/multihead_attention")
    assert np.array_equal(new["encoder/multihead_attention"]["in_proj_weight"], sd["in_proj_weight"])
    # the other module is untouched, and so is the input tree
    assert new["encoder/squeeze_excitation/~/fc1"] is not None
    assert np.array_equal(
        new["encoder/squeeze_excitation/~/fc1"]["weight"], params["encoder/squeeze_excitation/~/fc1"]["weight"]
    )
    assert not np.array_equal(params["encoder/multihead_attention"]["in_proj_weight"], sd["in_proj_weight"])
