"""noxton.nn layers behave as Equinox modules: API.md examples, leaves, static fields, jit, vmap."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noxton.nn import MultiheadAttention, SqueezeExcitation


def test_api_md_example():
    # Verbatim from API.md.
    key = jax.random.PRNGKey(0)
    mha = MultiheadAttention(embed_dim=64, num_heads=4, key=key)
    q = jax.random.normal(key, (10, 64))  # (seq_len, embed_dim)
    out, weights = mha(q, q, q)  # self-attention
    assert out.shape == (10, 64)
    assert weights.shape == (10, 10)
    out, _ = mha(q, q, q, is_causal=True, need_weights=False)
    assert out.shape == (10, 64) and _ is None


def test_defaults_match_api_md(key):
    mha = MultiheadAttention(8, 2, key=key)
    assert (mha.dropout, mha.bias, mha.add_bias_kv, mha.add_zero_attn) == (0.0, True, False, False)
    assert (mha.kdim, mha.vdim, mha.inference, mha.dtype) == (8, 8, False, jnp.float32)


@pytest.mark.parametrize("average, expected", [(True, (5, 7)), (False, (2, 5, 7))])
def test_weight_shapes(key, average, expected):
    mha = MultiheadAttention(8, 2, kdim=3, vdim=4, key=key)
    q, k, v = jnp.ones((5, 8)), jnp.ones((7, 3)), jnp.ones((7, 4))
    out, w = mha(q, k, v, average_attn_weights=average)
    assert out.shape == (5, 8) and w.shape == expected


def test_extra_keys_widen_weights(key):
    mha = MultiheadAttention(8, 2, add_bias_kv=True, add_zero_attn=True, key=key)
    q = jnp.ones((5, 8))
    assert mha(q, q, q)[1].shape == (5, 7)


def test_only_array_leaves_are_params(key):
    for layer in (MultiheadAttention(8, 2, add_bias_kv=True, key=key), SqueezeExcitation(8, 2, key=key)):
        arrays = jax.tree_util.tree_leaves(eqx.filter(layer, eqx.is_array))
        params = jax.tree_util.tree_leaves(layer.params)
        assert len(arrays) == len(params) and all(a is b for a, b in zip(arrays, params))
    non_arrays = jax.tree_util.tree_leaves(eqx.filter(MultiheadAttention(8, 2, key=key), eqx.is_array, inverse=True))
    assert non_arrays == [False]  # the `inference` flag, which inference_mode flips


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_param_dtype(key, dtype):
    for layer in (MultiheadAttention(8, 2, key=key, dtype=dtype), SqueezeExcitation(8, 2, key=key, dtype=dtype)):
        assert {a.dtype for a in jax.tree_util.tree_leaves(layer.params)} == {jnp.dtype(dtype)}


def test_vmap_matches_loop(key):
    mha = MultiheadAttention(8, 2, key=key)
    q = jax.random.normal(key, (3, 5, 8))
    kpm = jnp.array([[False] * 5, [False, False, True, True, False], [True, False, False, False, False]])
    out, w = jax.vmap(lambda q, m: mha(q, q, q, key_padding_mask=m))(q, kpm)
    for i in range(3):
        o, ww = mha(q[i], q[i], q[i], key_padding_mask=kpm[i])
        np.testing.assert_allclose(out[i], o, atol=1e-6)
        np.testing.assert_allclose(w[i], ww, atol=1e-6)


def test_same_settings_share_one_compiled_function(key):
    traces = []

    @eqx.filter_jit
    def f(layer, x):
        traces.append(1)
        return layer(x, x, x)[0]

    a = MultiheadAttention(8, 2, key=jax.random.PRNGKey(1))
    b = MultiheadAttention(8, 2, key=jax.random.PRNGKey(2))
    x = jnp.ones((4, 8))
    ya, yb = f(a, x), f(b, x)
    assert len(traces) == 1
    assert not jnp.allclose(ya, yb)  # different weights, same program
    f(a.load_state_dict(b.state_dict()), x)
    assert len(traces) == 1
    f(MultiheadAttention(8, 4, key=key), x)  # different settings: a new program
    assert len(traces) == 2
    s1 = SqueezeExcitation(8, 2, key=jax.random.PRNGKey(1))
    s2 = SqueezeExcitation(8, 2, key=jax.random.PRNGKey(2))
    assert jax.tree_util.tree_structure(s1) == jax.tree_util.tree_structure(s2)


def test_inference_mode_switches_dropout_off(key):
    mha = MultiheadAttention(8, 2, dropout=0.5, key=key)
    q = jax.random.normal(key, (6, 8))
    plain = MultiheadAttention(8, 2, key=key).load_state_dict(mha.state_dict())
    inf = eqx.nn.inference_mode(mha)
    assert inf.inference and not mha.inference
    out, w = inf(q, q, q)  # no key needed
    ref_out, ref_w = plain(q, q, q)
    assert jnp.array_equal(out, ref_out) and jnp.array_equal(w, ref_w)
    back = eqx.nn.inference_mode(inf, value=False)
    with pytest.raises(ValueError, match="dropout=0.5 is active but no"):
        back(q, q, q)
    constructed = MultiheadAttention(8, 2, dropout=0.5, inference=True, key=key).load_state_dict(mha.state_dict())
    assert jnp.array_equal(constructed(q, q, q)[0], ref_out)


def test_grad_through_filter_jit(key):
    mha = MultiheadAttention(8, 2, key=key)
    q = jax.random.normal(key, (4, 8))

    @eqx.filter_jit
    @eqx.filter_grad
    def g(m):
        return jnp.sum(m(q, q, q, need_weights=False)[0] ** 2)

    grads = g(mha)
    assert sorted(grads.state_dict()) == sorted(mha.state_dict())
    assert all(np.isfinite(v).all() and np.abs(v).sum() > 0 for v in grads.state_dict().values())


def test_rank_errors_point_to_vmap(key):
    mha = MultiheadAttention(8, 2, key=key)
    with pytest.raises(ValueError, match=r"`query` must have shape \(L, E\), got shape \(2, 4, 8\).*jax.vmap"):
        mha(jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8)))
    se = SqueezeExcitation(8, 2, key=key)
    with pytest.raises(ValueError, match=r"`x` must have shape \(C, H, W\), got shape \(2, 8, 3, 3\).*jax.vmap"):
        se(jnp.ones((2, 8, 3, 3)))


def test_plain_jax_jit_explains_filter_jit(key):
    mha = MultiheadAttention(8, 2, key=key)
    q = jnp.ones((3, 8))
    with pytest.raises(TypeError, match="`inference` must be a Python bool.*use `eqx.filter_jit`"):
        jax.jit(lambda m, q: m(q, q, q))(mha, q)
    assert eqx.filter_jit(lambda m, q: m(q, q, q))(mha, q)[0].shape == (3, 8)


@pytest.mark.parametrize(
    "bad, got",
    [(None, "NoneType"), (jnp.ones((3,)), "an array of dtype float32 and shape \\(3,\\)"), (7, "int")],
    ids=["none", "float-array", "int"],
)
def test_keys_are_validated_and_named(key, bad, got):
    with pytest.raises(TypeError, match=f"`key` must be a PRNG key.*got {got}"):
        MultiheadAttention(8, 2, key=bad)
    with pytest.raises(TypeError, match=f"`key` must be a PRNG key.*got {got}"):
        SqueezeExcitation(8, 2, key=bad)
    mha = MultiheadAttention(8, 2, dropout=0.5, key=key)
    q = jnp.ones((3, 8))
    if bad is not None:
        with pytest.raises(TypeError, match=f"`dropout_key` must be a PRNG key.*got {got}"):
            mha(q, q, q, dropout_key=bad)
    assert mha(q, q, q, dropout_key=jax.random.key(1))[0].shape == (3, 8)  # typed keys work too


@pytest.mark.parametrize("arg", ["activation", "scale_activation"])
def test_se_activations_must_be_callable(key, arg):
    se = SqueezeExcitation(4, 2, key=key)
    with pytest.raises(TypeError, match=f"`{arg}` must be callable"):
        se(jnp.ones((4, 3, 3)), **{arg: None})
