"""Every JAX transformation: jit, vmap (nested), grad, checkpoint, scan over a stack of layers,
serialisation round trips, and reproducible dropout.

Each transformed result is compared with the plain eager result of the same layer.
"""

from __future__ import annotations

import io
import pickle

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import trees_equal
from jax.test_util import check_grads

import noxton.haiku as nxhk
from noxton.nn import MultiheadAttention, SqueezeExcitation

E, H, L, S = 8, 2, 3, 4


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _mha(**kw):
    layer = MultiheadAttention(E, H, key=jax.random.PRNGKey(0), **kw)
    # random biases, so that every parameter matters
    sd = {k: np.asarray(_normal(i + 10, v.shape, v.dtype)) * 0.3 for i, (k, v) in enumerate(layer.state_dict().items())}
    return layer.load_state_dict(sd)


def test_jit_matches_eager():
    mha = _mha(add_bias_kv=True)
    q, kv = _normal(1, (L, E)), _normal(2, (S, E))
    kpm = jnp.array([False, True, False, False])
    eager = mha(q, kv, kv, key_padding_mask=kpm, average_attn_weights=False)
    jitted = eqx.filter_jit(lambda m, q, kv: m(q, kv, kv, key_padding_mask=kpm, average_attn_weights=False))(mha, q, kv)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # plain jax.jit, with the layer closed over
    out = jax.jit(lambda q: mha(q, q, q, is_causal=True)[0])(q)
    np.testing.assert_allclose(out, mha(q, q, q, is_causal=True)[0], rtol=1e-6, atol=1e-6)
    se = SqueezeExcitation(E, 2, key=jax.random.PRNGKey(0))
    x = _normal(3, (E, 3, 3))
    np.testing.assert_allclose(eqx.filter_jit(lambda m, x: m(x))(se, x), se(x), rtol=1e-6, atol=1e-6)


def test_nested_vmap_batch_and_beam():
    mha = _mha()
    B, K = 2, 3
    q = _normal(1, (B, K, L, E))
    kv = _normal(2, (B, S, E))  # shared by every beam of a batch element
    kpm = jnp.array([[False, False, True, False], [True, False, False, False]])  # per batch element
    attn = jax.random.bernoulli(jax.random.PRNGKey(3), 0.3, (K, H, L, S)).at[..., 0].set(False)  # per beam

    def one(q, kv, kpm, attn):
        return mha(q, kv, kv, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=False)

    def one_averaged(q, kv, kpm, attn):
        return mha(q, kv, kv, key_padding_mask=kpm, attn_mask=attn)[1]

    def nested(f):
        return jax.vmap(jax.vmap(f, in_axes=(0, None, None, 0)), in_axes=(0, 0, 0, None))

    out, w = nested(one)(q, kv, kpm, attn)
    w_avg = nested(one_averaged)(q, kv, kpm, attn)
    assert out.shape == (B, K, L, E) and w.shape == (B, K, H, L, S)
    for b in range(B):
        for k in range(K):
            o, ww = one(q[b, k], kv[b], kpm[b], attn[k])
            np.testing.assert_allclose(out[b, k], o, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(w[b, k], ww, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(w_avg[b, k], one_averaged(q[b, k], kv[b], kpm[b], attn[k]), rtol=1e-6, atol=1e-6)


def test_vmap_squeeze_excitation_nested():
    se = SqueezeExcitation(E, 2, key=jax.random.PRNGKey(0))
    x = _normal(1, (2, 3, E, 4, 4))
    out = jax.vmap(jax.vmap(se))(x)
    np.testing.assert_allclose(out[1, 2], se(x[1, 2]), rtol=1e-6, atol=1e-6)


def test_grad_finite_differences(x64):
    mha = _mha(dtype=jnp.float64, add_zero_attn=True)
    q, kv = _normal(1, (L, E), jnp.float64), _normal(2, (S, E), jnp.float64)
    attn = jnp.array(np.random.default_rng(0).normal(size=(H, L, S)))

    @jax.jit
    def f(q, kv):
        out, w = mha(q, kv, kv, attn_mask=attn, average_attn_weights=False)
        return jnp.sum(jnp.sin(out)) + jnp.sum(w * w)

    check_grads(f, (q, kv), order=1, modes=("fwd", "rev"), eps=1e-4, atol=1e-6, rtol=1e-6)
    # and with respect to the parameters, through eqx.filter_grad, vs jax.jit(jax.grad)
    g_eager = eqx.filter_grad(lambda m: jnp.sum(m(q, kv, kv)[0] ** 2))(mha)
    g_jit = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(m(q, kv, kv)[0] ** 2)))(mha)
    for k, v in g_eager.state_dict().items():
        np.testing.assert_allclose(g_jit.state_dict()[k], v, rtol=1e-10, atol=1e-12, err_msg=k)


def test_checkpoint_same_value_and_grad():
    mha = _mha(add_bias_kv=True)
    q = _normal(1, (L, E))

    def loss(m, q):
        return jnp.sum(m(q, q, q, is_causal=True)[0] ** 2)

    def loss_ckpt(m, q):
        params, static = eqx.partition(m, eqx.is_array)
        return jax.checkpoint(lambda p, q: loss(eqx.combine(p, static), q))(params, q)

    np.testing.assert_allclose(loss_ckpt(mha, q), loss(mha, q), rtol=1e-6)
    g1 = eqx.filter_grad(loss)(mha, q)
    g2 = eqx.filter_jit(eqx.filter_grad(loss_ckpt))(mha, q)
    for k, v in g1.state_dict().items():
        np.testing.assert_allclose(g2.state_dict()[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # the remat is really in the program
    params, static = eqx.partition(mha, eqx.is_array)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss_ckpt(eqx.combine(p, static), q)))(params)
    assert any("remat" in str(eqn.primitive) or "checkpoint" in str(eqn.primitive) for eqn in jaxpr.jaxpr.eqns)


def test_scan_over_a_stack_of_layers():
    depth = 3
    keys = jax.random.split(jax.random.PRNGKey(5), depth)
    stack = eqx.filter_vmap(lambda k: MultiheadAttention(E, H, key=k))(keys)
    assert stack.in_proj_weight.shape == (depth, 3 * E, E)
    params, static = eqx.partition(stack, eqx.is_array)
    x = _normal(1, (L, E))

    def block(x, p):
        layer = eqx.combine(p, static)
        out, _ = layer(x, x, x, need_weights=False)
        return x + out, None

    scanned, _ = jax.lax.scan(block, x, params)
    looped = x
    for i in range(depth):
        layer = MultiheadAttention(E, H, key=keys[i])
        looped = looped + layer(looped, looped, looped, need_weights=False)[0]
    np.testing.assert_allclose(scanned, looped, rtol=1e-5, atol=1e-6)
    # and the gradient through the scan
    g = jax.grad(lambda p: jnp.sum(jax.lax.scan(block, x, p)[0]))(params)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(g))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_equinox_serialisation_round_trip_bit_for_bit(dtype, tmp_path):
    mha = _mha(add_bias_kv=True, dtype=jnp.dtype(dtype))
    se = SqueezeExcitation(E, 2, key=jax.random.PRNGKey(1), dtype=jnp.dtype(dtype))
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, (mha, se))
    like = (
        MultiheadAttention(E, H, add_bias_kv=True, key=jax.random.PRNGKey(99), dtype=jnp.dtype(dtype)),
        SqueezeExcitation(E, 2, key=jax.random.PRNGKey(98), dtype=jnp.dtype(dtype)),
    )
    assert not trees_equal(like[0], mha)
    mha2, se2 = eqx.tree_deserialise_leaves(path, like)
    assert trees_equal(mha2, mha) and trees_equal(se2, se)
    q = _normal(1, (L, E), jnp.dtype(dtype))
    np.testing.assert_array_equal(np.asarray(mha2(q, q, q)[0]), np.asarray(mha(q, q, q)[0]))
    # in memory too
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, mha)
    buf.seek(0)
    assert trees_equal(eqx.tree_deserialise_leaves(buf, like[0]), mha)


def _haiku_mha_fn(x):
    return nxhk.MultiheadAttention(E, H, add_bias_kv=True)(x, x, x)


def test_haiku_params_pickle_and_savez(tmp_path):
    f = hk.transform(_haiku_mha_fn)
    x = _normal(1, (2, L, E))
    params = f.init(jax.random.PRNGKey(0), x)
    out = f.apply(params, None, x)[0]
    # pickle
    restored = pickle.loads(pickle.dumps(params))
    assert trees_equal(restored, params)
    np.testing.assert_array_equal(np.asarray(f.apply(restored, None, x)[0]), np.asarray(out))
    # np.savez of the torch-named state_dict, loaded back through the interop
    path = tmp_path / "params.npz"
    np.savez(path, **nxhk.params_to_state_dict(params, "multihead_attention"))
    with np.load(path) as npz:
        loaded = nxhk.state_dict_to_params(f.init(jax.random.PRNGKey(7), x), dict(npz), "multihead_attention")
    assert trees_equal(loaded, params)
    np.testing.assert_array_equal(np.asarray(f.apply(loaded, None, x)[0]), np.asarray(out))
    # np.savez of the raw Haiku tree, flattened by path
    flat = {f"{m}|{n}": np.asarray(v) for m, d in params.items() for n, v in d.items()}
    np.savez(path, **flat)
    with np.load(path) as npz:
        rebuilt = {}
        for name in npz.files:
            m, n = name.split("|")
            rebuilt.setdefault(m, {})[n] = jnp.asarray(npz[name])
    assert trees_equal(rebuilt, params)


DROP = 0.5


def test_dropout_reproducible_and_key_dependent():
    mha = _mha(dropout=DROP)
    q = _normal(1, (L, E))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    o1, w1 = mha(q, q, q, average_attn_weights=False, dropout_key=k1)
    o1b, w1b = mha(q, q, q, average_attn_weights=False, dropout_key=k1)
    _, w2 = mha(q, q, q, average_attn_weights=False, dropout_key=k2)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o1b))
    np.testing.assert_array_equal(np.asarray(w1), np.asarray(w1b))
    assert not np.array_equal(np.asarray(w1) == 0, np.asarray(w2) == 0), "different keys must give different masks"
    # same under jit
    o1j = eqx.filter_jit(lambda m, q, k: m(q, q, q, dropout_key=k)[0])(mha, q, k1)
    np.testing.assert_allclose(o1j, o1, rtol=1e-6, atol=1e-6)


def test_dropout_mean_matches_dropout_free_output():
    mha = _mha(dropout=DROP)
    q = _normal(1, (L, E))
    n = 4000
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    outs, ws = eqx.filter_jit(
        lambda m, q, keys: jax.vmap(lambda k: m(q, q, q, average_attn_weights=False, dropout_key=k))(keys)
    )(mha, q, keys)
    ref_out, ref_w = eqx.nn.inference_mode(mha)(q, q, q, average_attn_weights=False)
    for name, samples, ref in (("output", outs, ref_out), ("weights", ws, ref_w)):
        samples = np.asarray(samples, np.float64)
        se = samples.std(axis=0) / np.sqrt(n) + 1e-12
        z = (samples.mean(axis=0) - np.asarray(ref, np.float64)) / se
        assert np.abs(z).max() < 5.5, f"{name}: dropout mean is {np.abs(z).max():.1f} standard errors off"
    dropped = np.mean(np.asarray(ws) == 0)
    assert abs(dropped - DROP) < 0.01, f"dropped fraction {dropped}"


def test_no_key_needed_without_dropout():
    q = _normal(1, (L, E))
    # dropout=0: no key, and a key changes nothing
    m0 = _mha()
    np.testing.assert_array_equal(
        np.asarray(m0(q, q, q)[0]), np.asarray(m0(q, q, q, dropout_key=jax.random.PRNGKey(1))[0])
    )
