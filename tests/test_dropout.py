"""Dropout on the attention weights: keys, inference, and what is returned."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noxton.nn import MultiheadAttention


@pytest.fixture
def layers(key):
    mha = MultiheadAttention(8, 2, dropout=0.4, key=key)
    plain = MultiheadAttention(8, 2, key=key).load_state_dict(mha.state_dict())
    return mha, plain


def test_same_key_same_result_different_key_different(layers, key):
    mha, _ = layers
    q = jax.random.normal(key, (6, 8))
    a = mha(q, q, q, dropout_key=jax.random.PRNGKey(1))
    b = mha(q, q, q, dropout_key=jax.random.PRNGKey(1))
    c = mha(q, q, q, dropout_key=jax.random.PRNGKey(2))
    assert jnp.array_equal(a[0], b[0]) and jnp.array_equal(a[1], b[1])
    assert not jnp.array_equal(a[1], c[1])


def test_inference_equals_no_dropout(layers, key):
    mha, plain = layers
    q = jax.random.normal(key, (6, 8))
    got = eqx.nn.inference_mode(mha)(q, q, q, dropout_key=jax.random.PRNGKey(1))
    want = plain(q, q, q)
    assert jnp.array_equal(got[0], want[0]) and jnp.array_equal(got[1], want[1])


def test_returned_weights_are_the_dropped_ones(layers, key):
    """As torch: the weights returned are those after dropout, and they produce the output."""
    mha, plain = layers
    q = jax.random.normal(key, (6, 8))
    _, w = mha(q, q, q, average_attn_weights=False, dropout_key=jax.random.PRNGKey(3))
    _, w0 = plain(q, q, q, average_attn_weights=False)
    kept = np.asarray(w) != 0
    assert 0.3 < 1 - kept.mean() < 0.5
    np.testing.assert_allclose(np.asarray(w)[kept], np.asarray(w0)[kept] / 0.6, rtol=1e-6)
    # Recompute the output from the returned per-head weights and the torch-named parameters.
    sd = mha.state_dict()
    v = (np.asarray(q) @ sd["in_proj_weight"][16:].T + sd["in_proj_bias"][16:]).reshape(6, 2, 4)
    attn = np.einsum("hls,shd->lhd", np.asarray(w), v).reshape(6, 8)
    expected = attn @ sd["out_proj.weight"].T + sd["out_proj.bias"]
    out, _ = mha(q, q, q, dropout_key=jax.random.PRNGKey(3))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_dropout_near_one_drops_nearly_everything(key):
    mha = MultiheadAttention(8, 2, dropout=0.99, key=key)
    q = jax.random.normal(key, (32, 8))
    _, w = mha(q, q, q, average_attn_weights=False, dropout_key=jax.random.PRNGKey(5))
    assert (np.asarray(w) == 0).mean() > 0.97


def test_dropout_without_key_is_a_clear_error(layers, key):
    mha, _ = layers
    q = jnp.ones((3, 8))
    with pytest.raises(ValueError, match=r"dropout=0.4 is active but no dropout key was given: pass `dropout_key=`"):
        mha(q, q, q)


def test_dropout_mean_matches_no_dropout(layers, key):
    mha, plain = layers
    q = jax.random.normal(key, (6, 8))
    keys = jax.random.split(jax.random.PRNGKey(7), 2000)
    outs = jax.vmap(lambda k: mha(q, q, q, need_weights=False, dropout_key=k)[0])(keys)
    want = plain(q, q, q)[0]
    stderr = outs.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(outs.mean(0) - want) < 5 * stderr + 1e-6)
