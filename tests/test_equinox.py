"""noxton.nn layers behave as Equinox modules: defaults, leaves, static fields, jit, inference mode
(vmap: test_transforms.py; the README's examples: test_readme.py and the tour, test_main.py)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noxton.nn import MultiheadAttention, SqueezeExcitation


def test_defaults_are_torchs(key):
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


def test_parameters_are_torch_named_attributes(key):
    mha = MultiheadAttention(8, 2, add_bias_kv=True, key=key)
    assert mha.in_proj_weight.shape == (24, 8) and mha.in_proj_bias.shape == (24,)
    assert mha.bias_k.shape == mha.bias_v.shape == (1, 1, 8)
    assert mha.q_proj_weight is None and mha.k_proj_weight is None and mha.v_proj_weight is None
    assert mha.out_proj.weight.shape == (8, 8) and mha.out_proj.bias.shape == (8,)
    kv = MultiheadAttention(8, 2, kdim=3, vdim=5, bias=False, key=key)
    assert (kv.q_proj_weight.shape, kv.k_proj_weight.shape, kv.v_proj_weight.shape) == ((8, 8), (8, 3), (8, 5))
    assert kv.in_proj_weight is None and kv.in_proj_bias is None and kv.out_proj.bias is None
    se = SqueezeExcitation(8, 2, key=key)
    assert (se.fc1.weight.shape, se.fc1.bias.shape, se.fc2.weight.shape) == ((2, 8, 1, 1), (2,), (8, 2, 1, 1))
    # The array leaves are exactly the torch state_dict's entries; the only other leaf is the inference flag.
    for layer in (mha, kv, se):
        arrays = jax.tree_util.tree_leaves(eqx.filter(layer, eqx.is_array))
        assert len(arrays) == len(layer.state_dict())
    non_arrays = jax.tree_util.tree_leaves(eqx.filter(mha, eqx.is_array, inverse=True))
    assert non_arrays == [False]  # the `inference` flag, which inference_mode flips


def test_attributes_drive_the_computation(key):
    """Editing an attribute with eqx.tree_at changes what the layer computes, as in torch."""
    mha = MultiheadAttention(8, 2, key=key)
    q = jax.random.normal(key, (3, 8))
    zeroed = eqx.tree_at(lambda m: m.out_proj.weight, mha, jnp.zeros((8, 8)))
    out, _ = zeroed(q, q, q)
    np.testing.assert_array_equal(out, jnp.broadcast_to(mha.out_proj.bias, (3, 8)))


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
    out, w = inf(q, q, q, dropout_key=jax.random.PRNGKey(1))  # a key given in inference mode is ignored
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
@pytest.mark.own_errors
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


def test_se_activations_are_stored_and_overridable(key):
    x = jax.random.normal(key, (4, 3, 3))
    relu = SqueezeExcitation(4, 2, key=key)
    hard = SqueezeExcitation(4, 2, key=key, activation=jax.nn.relu6, scale_activation=jax.nn.hard_sigmoid)
    assert (hard.activation, hard.scale_activation) == (jax.nn.relu6, jax.nn.hard_sigmoid)
    expected = relu(x, jax.nn.relu6, jax.nn.hard_sigmoid)  # call-time override of the defaults
    np.testing.assert_array_equal(hard(x), expected)
    assert not np.array_equal(relu(x), expected)
    np.testing.assert_array_equal(hard(x, scale_activation=jax.nn.sigmoid), relu(x, jax.nn.relu6))


def test_se_works_in_sequential(key):
    se = SqueezeExcitation(4, 2, key=key)
    model = eqx.nn.Sequential([se, eqx.nn.Lambda(jax.nn.relu)])
    x = jax.random.normal(key, (4, 3, 3))
    np.testing.assert_array_equal(model(x, key=key), jax.nn.relu(se(x)))
