"""``implementation="auto"`` decides from the whole batch, ``jax.vmap`` axes included.

The Haiku module takes a batch along leading axes; the Equinox layer sees one
example and is batched with ``jax.vmap``. Both must hand ``select_implementation``
the same number of examples, hence take the same path for the same work, and the
gradients through the vmapped call must be those of the path taken.

``LARGE_SCORES`` is lowered so that small shapes cross it: B=8, H=2, L=S=16 holds
8 * 512 scores, above it, while one example's 512 is below it (and below the CPU
blockwise threshold), so a decision from one example would pick dense.
"""

from __future__ import annotations

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

import noxton.functional._attention as attention_module
import noxton.haiku as nxhk
from noxton.functional._vmapped import vmapped_size
from noxton.nn import MultiheadAttention

E, H, L = 8, 2, 16


@pytest.fixture
def decisions(monkeypatch):
    """Every ``(batch, path)`` that ``multi_head_attention`` asks ``select_implementation`` for."""
    calls = []
    real = attention_module.select_implementation

    def spy(implementation, **kw):
        path = real(implementation, **kw)
        calls.append((kw["batch"], path))
        return path

    monkeypatch.setattr(attention_module, "select_implementation", spy)
    monkeypatch.setattr(attention_module, "LARGE_SCORES", 2**12)
    return calls


def _layer():
    return MultiheadAttention(E, H, key=jax.random.PRNGKey(0))


def _haiku(x, impl="auto"):
    f = hk.transform(lambda x: nxhk.MultiheadAttention(E, H)(x, x, x, need_weights=False, implementation=impl)[0])
    return f.apply(f.init(jax.random.PRNGKey(0), x), None, x)


def _equinox(layer, x, impl="auto"):
    def one(x):
        return layer(x, x, x, need_weights=False, implementation=impl)[0]

    for _ in range(x.ndim - 2):
        one = jax.vmap(one)
    return one(x)


@pytest.mark.parametrize(("shape", "path"), [((8,), "blockwise"), ((2, 4), "blockwise"), ((4,), "dense")])
def test_both_front_ends_take_the_same_path(decisions, shape, path):
    x = jax.random.normal(jax.random.PRNGKey(1), (*shape, L, E))
    _haiku(x)
    haiku_calls = list(decisions)
    decisions.clear()
    eqx.filter_jit(_equinox)(_layer(), x)
    assert haiku_calls[-1] == decisions[-1] == (int(np.prod(shape)), path)


def test_vmapped_size_counts_every_mapping_axis():
    seen = []

    def f(x, y):
        seen.append(vmapped_size(x, y))
        return x.sum() + y.sum()

    x, y = jnp.ones(3), jnp.ones(2)
    f(x, y)
    jax.vmap(f)(jnp.ones((4, 3)), jnp.ones((4, 2)))
    jax.vmap(f, in_axes=(None, 0))(x, jnp.ones((6, 2)))  # one mapped argument is enough
    jax.vmap(jax.vmap(f), in_axes=(0, None))(jnp.ones((5, 4, 3)), jnp.ones((4, 2)))
    jax.jit(jax.vmap(f))(jnp.ones((4, 3)), jnp.ones((4, 2)))
    jax.vmap(jax.grad(f))(jnp.ones((4, 3)), jnp.ones((4, 2)))
    assert seen == [1, 4, 6, 20, 4, 4]


def test_gradients_through_the_vmapped_equinox_call(decisions):
    """``jax.grad`` of a vmapped auto call (blockwise, from the batch) equals the dense path's, and per-example."""
    layer = _layer()
    x = jax.random.normal(jax.random.PRNGKey(2), (8, L, E))
    r = jax.random.normal(jax.random.PRNGKey(3), (8, L, E))

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(layer, x, impl):
        return jnp.sum(_equinox(layer, x, impl) * r)

    auto, dense = grads(layer, x, "auto"), grads(layer, x, "dense")
    assert ("blockwise" in {p for _, p in decisions}) and (8, "blockwise") in decisions
    for a, d in zip(jax.tree.leaves(auto), jax.tree.leaves(dense), strict=False):
        assert_close(a, d, 2e-5, "parameter gradient")

    def per_example(x, r, impl):
        return jax.grad(lambda x: jnp.sum(layer(x, x, x, need_weights=False, implementation=impl)[0] * r))(x)

    g_auto = jax.jit(jax.vmap(lambda x, r: per_example(x, r, "auto")))(x, r)
    g_dense = jax.jit(jax.vmap(lambda x, r: per_example(x, r, "dense")))(x, r)
    assert_close(g_auto, g_dense, 2e-5, "per-example input gradient")
