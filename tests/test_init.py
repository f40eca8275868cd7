"""Initialisation exactly as torch's, tested statistically against torch's own initialisers.

torch ``nn.MultiheadAttention``: ``in_proj_weight`` Xavier-uniform over the
packed ``(3E, E)`` shape (or ``q/k/v_proj_weight`` each, when kdim/vdim differ),
``in_proj_bias`` and ``out_proj.bias`` zero, ``out_proj.weight`` ``nn.Linear``'s
default (Kaiming-uniform with ``a=sqrt(5)``, i.e. ``U(-1/sqrt(E), 1/sqrt(E))``),
``bias_k``/``bias_v`` Xavier-normal. torchvision ``SqueezeExcitation``: two
``nn.Conv2d`` 1x1 with torch's default weight and bias. Checked for both front
ends: support bounds (and that they are reached), means, variances, a
two-sample Kolmogorov-Smirnov test against the same parameter of a fresh torch
layer, the requested dtype, and that every parameter has its own key.
"""

from __future__ import annotations

import itertools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import requires_torch, torch

import noxton.haiku as nxhk
from noxton.nn import MultiheadAttention, SqueezeExcitation

stats = pytest.importorskip("scipy.stats", reason="scipy is needed for the two-sample tests")

E_BIG, H_BIG = 512, 8  # in_proj_weight: 786432 draws; bias_k/bias_v: 512 each


def xavier_uniform_bound(fan_in, fan_out):
    return math.sqrt(6.0 / (fan_in + fan_out))


def torch_default_bound(fan_in):
    return 1.0 / math.sqrt(fan_in)


def expected_distributions(E, kdim, vdim, bias, add_bias_kv):
    """``{torch key: ("uniform", bound) | ("normal", std) | ("zeros", None)}``, from torch's rules."""
    d = {}
    if kdim == E and vdim == E:
        d["in_proj_weight"] = ("uniform", xavier_uniform_bound(E, 3 * E))
    else:
        d["q_proj_weight"] = ("uniform", xavier_uniform_bound(E, E))
        d["k_proj_weight"] = ("uniform", xavier_uniform_bound(kdim, E))
        d["v_proj_weight"] = ("uniform", xavier_uniform_bound(vdim, E))
    if bias:
        d["in_proj_bias"] = ("zeros", None)
        d["out_proj.bias"] = ("zeros", None)
    if add_bias_kv:
        # shape (1, 1, E): fan_in = 1 * E, fan_out = 1 * E
        d["bias_k"] = ("normal", math.sqrt(2.0 / (2 * E)))
        d["bias_v"] = ("normal", math.sqrt(2.0 / (2 * E)))
    d["out_proj.weight"] = ("uniform", torch_default_bound(E))
    return d


def check_moments(x, kind, scale, name):
    """Bounds, mean and variance within 6 standard errors of the theoretical values."""
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    if kind == "zeros":
        assert (x == 0).all(), f"{name} must be zeros"
        return
    if kind == "uniform":
        assert np.abs(x).max() <= scale * (1 + 1e-6), f"{name} exceeds the bound {scale}"
        if n >= 1000:
            assert np.abs(x).max() >= scale * (1 - 20.0 / n), f"{name} does not reach its bound {scale}"
        var, var_of_x2 = scale**2 / 3, 4 * scale**4 / 45
    else:
        var, var_of_x2 = scale**2, 2 * scale**4
    assert abs(x.mean()) <= 6 * math.sqrt(var / n), f"{name} mean {x.mean()}"
    assert abs(np.mean(x**2) - var) <= 6 * math.sqrt(var_of_x2 / n), f"{name} variance {np.mean(x**2)} != {var}"


def ks_same(a, b, name):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    p = stats.ks_2samp(a, b).pvalue
    assert p > 1e-4, f"{name}: two-sample KS test against torch rejects (p={p:.2e})"


CONFIGS = {
    "packed": dict(embed_dim=E_BIG, num_heads=H_BIG),
    "separate": dict(embed_dim=E_BIG, num_heads=H_BIG, kdim=96, vdim=E_BIG, add_bias_kv=True),
    "nobias": dict(embed_dim=E_BIG, num_heads=H_BIG, bias=False, add_bias_kv=True, vdim=64),
}


def _full(cfg):
    E = cfg["embed_dim"]
    return dict(
        kdim=cfg.get("kdim") or E,
        vdim=cfg.get("vdim") or E,
        bias=cfg.get("bias", True),
        add_bias_kv=cfg.get("add_bias_kv", False),
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mha_distributions(name):
    cfg = CONFIGS[name]
    sd = MultiheadAttention(**cfg, key=jax.random.PRNGKey(1)).state_dict()
    expected = expected_distributions(cfg["embed_dim"], **_full(cfg))
    assert sorted(sd) == sorted(expected)
    for k, (kind, scale) in expected.items():
        assert sd[k].dtype == np.float32
        check_moments(sd[k], kind, scale, k)


@requires_torch
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mha_matches_torch_initialisers(name):
    cfg = CONFIGS[name]
    sd = MultiheadAttention(**cfg, key=jax.random.PRNGKey(2)).state_dict()
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(**cfg, batch_first=True)
    tsd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    assert sorted(sd) == sorted(tsd)
    for k in tsd:
        assert sd[k].shape == tsd[k].shape, k
        if (tsd[k] == 0).all():
            assert (sd[k] == 0).all(), f"{k}: torch initialises it to zeros"
        else:
            ks_same(sd[k], tsd[k], k)


def test_haiku_front_end_same_distributions():
    cfg = CONFIGS["separate"]
    E, kdim, vdim = cfg["embed_dim"], cfg["kdim"], cfg["vdim"]
    f = hk.transform(lambda q, k, v: nxhk.MultiheadAttention(**cfg)(q, k, v))
    params = f.init(jax.random.PRNGKey(3), jnp.ones((1, E)), jnp.ones((1, kdim)), jnp.ones((1, vdim)))
    sd = nxhk.params_to_state_dict(params, "multihead_attention")
    expected = expected_distributions(E, **_full(cfg))
    assert sorted(sd) == sorted(expected)
    for k, (kind, scale) in expected.items():
        check_moments(sd[k], kind, scale, k)


SE_C, SE_Q = 2048, 512


def test_squeeze_excitation_distributions():
    sd = SqueezeExcitation(SE_C, SE_Q, key=jax.random.PRNGKey(4)).state_dict()
    expected = {
        "fc1.weight": ((SE_Q, SE_C, 1, 1), torch_default_bound(SE_C)),
        "fc1.bias": ((SE_Q,), torch_default_bound(SE_C)),
        "fc2.weight": ((SE_C, SE_Q, 1, 1), torch_default_bound(SE_Q)),
        "fc2.bias": ((SE_C,), torch_default_bound(SE_Q)),
    }
    assert sorted(sd) == sorted(expected)
    for k, (shape, bound) in expected.items():
        assert sd[k].shape == shape and sd[k].dtype == np.float32
        check_moments(sd[k], "uniform", bound, k)


@requires_torch
def test_squeeze_excitation_matches_torch_conv2d():
    from helpers import TorchSqueezeExcitation

    sd = SqueezeExcitation(SE_C, SE_Q, key=jax.random.PRNGKey(5)).state_dict()
    torch.manual_seed(0)
    tsd = {k: v.detach().numpy() for k, v in TorchSqueezeExcitation(SE_C, SE_Q).state_dict().items()}
    assert sorted(sd) == sorted(tsd)
    for k in tsd:
        assert sd[k].shape == tsd[k].shape
        ks_same(sd[k], tsd[k], k)


def _quantiles(x, kind, scale):
    """Map draws to U(0, 1) so that draws from one key would line up whatever their distribution."""
    x = np.asarray(x, np.float64).ravel()
    return (x / scale + 1) / 2 if kind == "uniform" else stats.norm.cdf(x / scale)


@pytest.mark.parametrize("front", ["equinox", "haiku"])
def test_every_parameter_has_its_own_key(front):
    """No two parameters come from the same key: their draws are uncorrelated, not equal or shifted."""
    E = 256
    cfg = dict(embed_dim=E, num_heads=4, kdim=E, vdim=32, add_bias_kv=True)  # q/k_proj_weight share a shape
    if front == "equinox":
        sd = MultiheadAttention(**cfg, key=jax.random.PRNGKey(6)).state_dict()
    else:
        f = hk.transform(lambda q, v: nxhk.MultiheadAttention(**cfg)(q, q, v))
        sd = nxhk.params_to_state_dict(
            f.init(jax.random.PRNGKey(6), jnp.ones((1, E)), jnp.ones((1, 32))), "multihead_attention"
        )
    dists = expected_distributions(E, **_full(cfg))
    random = {k: _quantiles(sd[k], *dists[k]) for k, (kind, _) in dists.items() if kind != "zeros"}
    for (a, x), (b, y) in itertools.combinations(random.items(), 2):
        n = min(x.size, y.size)
        r = np.corrcoef(x[:n], y[:n])[0, 1]
        assert abs(r) < 6 / math.sqrt(n), f"{a} and {b} look drawn from one key (correlation {r:.3f})"
    # the same within a SqueezeExcitation, whose four parameters all have fan_in 64
    random = {}
    se = SqueezeExcitation(64, 64, key=jax.random.PRNGKey(6)).state_dict()
    random.update({f"se.{k}": _quantiles(v, "uniform", torch_default_bound(64)) for k, v in se.items()})
    for (a, x), (b, y) in itertools.combinations(random.items(), 2):
        n = min(x.size, y.size)
        r = np.corrcoef(x[:n], y[:n])[0, 1]
        assert abs(r) < 6 / math.sqrt(n), f"{a} and {b} look drawn from one key (correlation {r:.3f})"


def test_same_key_same_layer_different_key_different_layer():
    a = MultiheadAttention(16, 2, add_bias_kv=True, key=jax.random.PRNGKey(7)).state_dict()
    b = MultiheadAttention(16, 2, add_bias_kv=True, key=jax.random.PRNGKey(7)).state_dict()
    c = MultiheadAttention(16, 2, add_bias_kv=True, key=jax.random.PRNGKey(8)).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        if not (a[k] == 0).all():
            assert not np.array_equal(a[k], c[k]), k


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_requested_dtype(dtype, x64):
    dt = jnp.dtype(dtype)
    E = 64
    sd = MultiheadAttention(E, 4, add_bias_kv=True, key=jax.random.PRNGKey(9), dtype=dt).state_dict()
    se = SqueezeExcitation(64, 16, key=jax.random.PRNGKey(9), dtype=dt).state_dict()
    for k, v in {**sd, **se}.items():
        assert v.dtype == dt, f"{k}: {v.dtype} != {dt}"
    expected = expected_distributions(E, E, E, True, True)
    for k, (kind, scale) in expected.items():
        if kind == "uniform":
            # the bound itself is rounded to the dtype before scaling
            assert np.abs(np.asarray(sd[k], np.float64)).max() <= float(jnp.asarray(scale, dt)) * (1 + 1e-6), k
        elif kind == "zeros":
            assert (np.asarray(sd[k], np.float64) == 0).all(), k
    # the draws are made in the requested dtype, not just cast: float64 has more than 2**24 values
    if dtype == "float64":
        w = np.asarray(sd["in_proj_weight"])
        assert not np.array_equal(w, w.astype(np.float32).astype(np.float64))
