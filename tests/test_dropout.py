"""Dropout on the attention weights: the weights returned are the dropped ones, and a rate near one."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from noxton.nn import MultiheadAttention


@pytest.fixture
def layers(key):
    mha = MultiheadAttention(8, 2, dropout=0.4, key=key)
    plain = MultiheadAttention(8, 2, key=key).load_state_dict(mha.state_dict())
    return mha, plain


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
