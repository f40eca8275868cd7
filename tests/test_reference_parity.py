"""Parity against the plain NumPy reference: runs everywhere, torch or not (e.g. the newest JAX on 3.12)."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import grid, random_bool_mask, random_float_mask

import noxton.haiku as nxhk
from noxton._reference import mha_reference, se_reference
from noxton.nn import MultiheadAttention, SqueezeExcitation

CASES = grid(
    bias=[True, False],
    add_bias_kv=[False, True],
    add_zero_attn=[False, True],
    kv=[False, True],
    masks=["none", "bool", "float", "causal"],
)


@pytest.mark.parametrize("c", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_mha_matches_numpy(c, key, x64):
    rng = np.random.default_rng(0)
    kdim, vdim = (3, 5) if c["kv"] else (None, None)
    mha = MultiheadAttention(
        8,
        2,
        bias=c["bias"],
        add_bias_kv=c["add_bias_kv"],
        add_zero_attn=c["add_zero_attn"],
        kdim=kdim,
        vdim=vdim,
        key=key,
    )
    sd = {k: rng.uniform(-0.5, 0.5, v.shape) for k, v in mha.state_dict().items()}
    mha = mha.load_state_dict(sd)
    q = rng.normal(size=(4, 8))
    k = rng.normal(size=(6, kdim or 8))
    v = rng.normal(size=(6, vdim or 8))
    kpm = attn = None
    if c["masks"] == "bool":
        kpm, attn = random_bool_mask(rng, (6,)), random_bool_mask(rng, (2, 4, 6))
    elif c["masks"] == "float":
        kpm, attn = random_float_mask(rng, (6,)), random_float_mask(rng, (4, 6))
    causal = c["masks"] == "causal"
    for average in (True, False):
        want_out, want_w = mha_reference(
            q,
            k,
            v,
            sd,
            2,
            key_padding_mask=kpm,
            attn_mask=attn,
            is_causal=causal,
            add_zero_attn=c["add_zero_attn"],
            average=average,
        )
        j = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
        out, w = mha(
            j(q), j(k), j(v), key_padding_mask=j(kpm), attn_mask=j(attn), is_causal=causal, average_attn_weights=average
        )
        np.testing.assert_allclose(out, want_out, atol=1e-10)
        np.testing.assert_allclose(w, want_w, atol=1e-10)


def test_haiku_mha_matches_numpy(key):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(3, 4, 8)).astype(np.float32)
    f = hk.transform(lambda q: nxhk.MultiheadAttention(8, 2)(q, q, q, is_causal=True))
    params = f.init(key, q)
    out, w = f.apply(params, None, q)
    sd = nxhk.params_to_state_dict(params, "multihead_attention")
    for i in range(3):
        want_out, want_w = mha_reference(q[i], q[i], q[i], sd, 2, is_causal=True)
        np.testing.assert_allclose(out[i], want_out, atol=1e-5)
        np.testing.assert_allclose(w[i], want_w, atol=1e-5)


def test_se_matches_numpy(key):
    se = SqueezeExcitation(6, 2, key=key)
    x = jax.random.normal(key, (6, 5, 4))
    np.testing.assert_allclose(se(x), se_reference(x, se.state_dict()), atol=1e-5)
