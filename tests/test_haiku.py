"""noxton.haiku modules behave as Haiku layers inside hk.transform."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noxton.haiku as nxhk


def shapes(params):
    return jax.tree_util.tree_map(lambda a: a.shape, params)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (
            {},
            {
                "multihead_attention": {"in_proj_weight": (24, 8), "in_proj_bias": (24,)},
                "multihead_attention/~/out_proj": {"weight": (8, 8), "bias": (8,)},
            },
        ),
        (
            {"kdim": 3, "vdim": 5, "bias": False, "add_bias_kv": True},
            {
                "multihead_attention": {
                    "q_proj_weight": (8, 8),
                    "k_proj_weight": (8, 3),
                    "v_proj_weight": (8, 5),
                    "bias_k": (1, 1, 8),
                    "bias_v": (1, 1, 8),
                },
                "multihead_attention/~/out_proj": {"weight": (8, 8)},
            },
        ),
    ],
    ids=["default", "kv-nobias-biaskv"],
)
def test_params_tree_has_torch_names(key, kwargs, expected):
    kdim, vdim = kwargs.get("kdim", 8), kwargs.get("vdim", 8)
    f = hk.transform(lambda q, k, v: nxhk.MultiheadAttention(8, 2, **kwargs)(q, k, v))
    params = f.init(key, jnp.ones((4, 8)), jnp.ones((6, kdim)), jnp.ones((6, vdim)))
    assert shapes(params) == expected


def test_leading_batch_dims(key):
    q = jax.random.normal(key, (2, 3, 5, 8))
    kpm = jax.random.bernoulli(key, 0.3, (2, 3, 5)).at[..., 0].set(False)
    f = hk.transform(
        lambda q, m: nxhk.MultiheadAttention(8, 2)(q, q, q, key_padding_mask=m, average_attn_weights=False)
    )
    params = f.init(key, q, kpm)
    out, w = f.apply(params, None, q, kpm)
    assert out.shape == (2, 3, 5, 8) and w.shape == (2, 3, 2, 5, 5)
    flat_out, flat_w = f.apply(params, None, q.reshape(6, 5, 8), kpm.reshape(6, 5))
    np.testing.assert_allclose(out, flat_out.reshape(out.shape), atol=1e-6)
    single_out, _ = f.apply(params, None, q[1, 2], kpm[1, 2])
    np.testing.assert_allclose(out[1, 2], single_out, atol=1e-6)


def test_batched_per_example_attn_mask(key):
    q = jax.random.normal(key, (3, 4, 8))
    masks = jax.random.bernoulli(key, 0.4, (3, 2, 4, 4)).at[..., 0].set(False)
    f = hk.transform(lambda q, m: nxhk.MultiheadAttention(8, 2)(q, q, q, attn_mask=m))
    params = f.init(key, q, masks)
    out, _ = f.apply(params, None, q, masks)
    for i in range(3):
        np.testing.assert_allclose(out[i], f.apply(params, None, q[i], masks[i])[0], atol=1e-6)


def test_dropout_key_comes_from_rng(key):
    f = hk.transform(lambda q: nxhk.MultiheadAttention(8, 2, dropout=0.5)(q, q, q))
    q = jax.random.normal(key, (6, 8))
    params = f.init(key, q)
    a = f.apply(params, jax.random.PRNGKey(1), q)
    b = f.apply(params, jax.random.PRNGKey(1), q)
    c = f.apply(params, jax.random.PRNGKey(2), q)
    assert jnp.array_equal(a[0], b[0]) and not jnp.allclose(a[0], c[0])


def test_inference_flag_needs_no_key(key):
    q = jax.random.normal(key, (6, 8))
    f = hk.transform(lambda q, inf: nxhk.MultiheadAttention(8, 2, dropout=0.5)(q, q, q, inference=inf))
    g = hk.transform(lambda q: nxhk.MultiheadAttention(8, 2)(q, q, q))
    params = f.init(key, q, True)
    assert jnp.array_equal(f.apply(params, None, q, True)[0], g.apply(params, None, q)[0])


def test_two_modules_get_unique_names(key):
    def model(x):
        a = nxhk.MultiheadAttention(8, 2)(x, x, x)[0]
        return nxhk.MultiheadAttention(8, 2)(a, a, a)[0]

    params = hk.transform(model).init(key, jnp.ones((3, 8)))
    assert sorted(params) == [
        "multihead_attention",
        "multihead_attention/~/out_proj",
        "multihead_attention_1",
        "multihead_attention_1/~/out_proj",
    ]
    sd = nxhk.params_to_state_dict(params, "multihead_attention_1")
    assert sorted(sd) == ["in_proj_bias", "in_proj_weight", "out_proj.bias", "out_proj.weight"]


def test_jit_and_grad(key):
    f = hk.transform(lambda q: nxhk.MultiheadAttention(8, 2)(q, q, q, need_weights=False)[0])
    q = jax.random.normal(key, (4, 8))
    params = f.init(key, q)
    g = jax.jit(jax.grad(lambda p: jnp.sum(f.apply(p, None, q) ** 2)))(params)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
