"""Fully masked query rows: zero attention, zero weights, finite gradients, in every path."""

from __future__ import annotations

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import requires_torch, torch, torch_mha

import noxton.haiku as nxhk
from noxton.nn import MultiheadAttention

L, S, E = 4, 5, 8


def masks(kind):
    """(key_padding_mask, attn_mask, fully masked rows) for a given way of masking."""
    if kind == "kpm_all":
        return jnp.ones((S,), bool), None, [0, 1, 2, 3]
    if kind == "kpm_all_float":
        return jnp.full((S,), -jnp.inf), None, [0, 1, 2, 3]
    rows = np.zeros((L, S), bool)
    rows[1] = True
    if kind == "attn_row":
        return None, jnp.asarray(rows), [1]
    if kind == "attn_row_float":
        return None, jnp.where(jnp.asarray(rows), -jnp.inf, 0.0), [1]
    if kind == "heads_row":
        per_head = np.zeros((2, L, S), bool)
        per_head[:, 2] = True
        return None, jnp.asarray(per_head), [2]
    if kind == "kpm_and_attn":
        kpm = np.array([False, False, True, True, True])
        rows = np.zeros((L, S), bool)
        rows[3, :2] = True  # row 3 loses keys 0,1 to attn_mask and 2..4 to the padding mask
        return jnp.asarray(kpm), jnp.asarray(rows), [3]
    raise AssertionError(kind)


KINDS = ["kpm_all", "kpm_all_float", "attn_row", "attn_row_float", "heads_row", "kpm_and_attn"]
MODES = [(True, True), (True, False), (False, True)]


@pytest.mark.parametrize("need_weights, average", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_equinox_fully_masked_rows(key, kind, need_weights, average):
    mha = MultiheadAttention(E, 2, key=key)
    mha = mha.load_state_dict({**mha.state_dict(), "out_proj.bias": np.arange(E, dtype=np.float32)})
    kpm, attn, dead = masks(kind)
    q = jax.random.normal(key, (L, E))
    kv = jax.random.normal(jax.random.PRNGKey(1), (S, E))
    out, w = mha(
        q, kv, kv, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights, average_attn_weights=average
    )
    for r in dead:
        np.testing.assert_array_equal(out[r], np.arange(E, dtype=np.float32))
        if need_weights:
            np.testing.assert_array_equal(w[..., r, :], 0.0)
    alive = [r for r in range(L) if r not in dead]
    assert np.isfinite(out).all()
    if need_weights and alive:
        np.testing.assert_allclose(np.asarray(w)[..., alive, :].sum(-1), 1.0, rtol=1e-6)

    def loss(args):
        m, q, kv = args
        o, ww = m(q, kv, kv, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
        return jnp.sum(o**2) + (0.0 if ww is None else jnp.sum(ww**2))

    g = eqx.filter_grad(loss)((mha, q, kv))
    leaves = jax.tree_util.tree_leaves(eqx.filter(g, eqx.is_array))
    assert all(np.isfinite(a).all() for a in leaves)
    np.testing.assert_array_equal(g[1][jnp.asarray(dead)], 0.0)  # a dead row's query gets no gradient


@pytest.mark.parametrize("kind", ["kpm_all", "attn_row_float"])
def test_haiku_fully_masked_rows(key, kind):
    kpm, attn, dead = masks(kind)
    f = hk.transform(lambda q, kv: nxhk.MultiheadAttention(E, 2)(q, kv, kv, key_padding_mask=kpm, attn_mask=attn))
    q = jax.random.normal(key, (L, E))
    kv = jax.random.normal(key, (S, E))
    params = f.init(key, q, kv)
    out, w = f.apply(params, None, q, kv)
    bias = params["multihead_attention/~/out_proj"]["bias"]
    for r in dead:
        np.testing.assert_array_equal(out[r], bias)
        np.testing.assert_array_equal(w[r], 0.0)
    g = jax.grad(lambda p, q: jnp.sum(f.apply(p, None, q, kv)[0] ** 2), argnums=(0, 1))(params, q)
    assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(g))


@requires_torch
@pytest.mark.parametrize("kind", ["kpm_all", "attn_row", "heads_row", "kpm_and_attn"])
def test_documented_difference_from_torch(key, kind):
    """torch: NaN rows with need_weights=True, the output bias with need_weights=False; noxton: the latter always."""
    kpm, attn, dead = masks(kind)
    tm = torch_mha(dict(embed_dim=E, num_heads=2, bias=True, add_bias_kv=False, add_zero_attn=False), torch.float32)
    mha = MultiheadAttention(E, 2, key=key).load_state_dict(tm.state_dict())
    q = np.random.default_rng(0).normal(size=(L, E)).astype(np.float32)
    kv = np.random.default_rng(1).normal(size=(S, E)).astype(np.float32)
    t = lambda a: None if a is None else torch.tensor(np.asarray(a))  # noqa: E731
    t_attn = t(attn)
    with torch.no_grad():
        t_out_w, t_w = tm(t(q), t(kv), t(kv), key_padding_mask=t(kpm), attn_mask=t_attn, need_weights=True)
        t_out_now, _ = tm(t(q), t(kv), t(kv), key_padding_mask=t(kpm), attn_mask=t_attn, need_weights=False)
    results = {}
    for need_weights in (True, False):
        results[need_weights] = mha(
            jnp.asarray(q),
            jnp.asarray(kv),
            jnp.asarray(kv),
            key_padding_mask=kpm,
            attn_mask=attn,
            need_weights=need_weights,
        )
        np.testing.assert_allclose(results[need_weights][0], t_out_now.numpy(), atol=1e-5)
    out, w = results[True]
    nan_rows = np.isnan(t_out_w.numpy()).any(-1)
    assert sorted(np.flatnonzero(nan_rows)) == dead
    alive = ~nan_rows
    np.testing.assert_allclose(np.asarray(out)[alive], t_out_w.numpy()[alive], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(w)[nan_rows], 0.0)
