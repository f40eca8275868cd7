"""What the test files share: torch (when installed), tolerances, torch reference modules, random
masks, and the MultiheadAttention parity runners of both front ends.

``conftest.py`` holds only pytest's configuration (fixtures, options, hypothesis profiles, devices).
"""

from __future__ import annotations

import functools
import itertools
import os

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noxton.haiku as nxhk
from benchmarks.reference import TorchSqueezeExcitation  # noqa: F401  (the one copy, shared with the benchmark)
from noxton.nn import MultiheadAttention

try:
    import torch
except ImportError:  # torch==2.13.0's CPU wheel exists for Python 3.11 only: elsewhere the torch tests skip
    torch = None
else:
    torch.set_num_threads(int(os.environ.get("NOXTON_TEST_TORCH_THREADS", "1")))

requires_torch = pytest.mark.skipif(
    torch is None, reason="torch==2.13.0 is not installed (its CPU wheel exists for Python 3.11 only)"
)


def assert_close(actual, expected, atol, name="", rtol=0.0):
    """``actual`` equals ``expected`` within ``atol + rtol * |expected|``, as float64, with equal shapes."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def trees_equal(a, b) -> bool:
    """Two pytrees of the same structure whose leaves have equal dtypes and equal values, bit for bit."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


def grid(**axes):
    """The cross-product of named options, as a list of dicts."""
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]


def random_bool_mask(rng, shape):
    """True = masked; every row keeps its first key visible, so that torch stays finite."""
    m = rng.random(shape) < 0.4
    m[..., 0] = False
    return m


def random_float_mask(rng, shape):
    """An additive mask with some ``-inf``; every row keeps its first key visible."""
    m = rng.normal(size=shape)
    m[rng.random(shape) < 0.2] = -np.inf
    m[..., 0] = 0.0
    return m


def torch_mha(cfg, dtype, seed=0):
    """A torch MHA (batch_first, eval mode) with every parameter randomised (torch zero-initialises biases)."""
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(
        cfg["embed_dim"],
        cfg["num_heads"],
        bias=cfg["bias"],
        add_bias_kv=cfg["add_bias_kv"],
        add_zero_attn=cfg["add_zero_attn"],
        kdim=cfg.get("kdim"),
        vdim=cfg.get("vdim"),
        batch_first=True,
        dtype=dtype,
    )
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.5, 0.5)
    return m.eval()


# MultiheadAttention parity runners ------------------------------------------------------------
#
# Both take batched NumPy inputs ``q (N, L, E)``, ``k``/``v`` (``None`` for self-attention),
# ``key_padding_mask (N, S)`` and ``attn_mask`` (``(L, S)``, ``(H, L, S)`` or ``(N, H, L, S)``),
# load the torch ``state_dict`` ``sd``, and return ``(out, weights, grads)`` for the loss
# ``<out, r_out> + <weights, r_w>``: ``grads`` by name, ``query``/``key``/``value`` and
# ``param.<torch key>``. Output and gradients come from one pass (``value_and_grad`` with the
# outputs as auxiliary data). Runs are eager: each primitive compiles once per shape for the
# whole session, and every case has its own structure (masks given or not, bool or float, the
# weights returned or not), so jitting each case's program costs a compilation per case:
# measured on 2 cores, one value-and-gradient of a self-attention case under ``jax.vmap`` takes
# 23-36 ms eager with warm primitives, against 290 ms jitted and 200 ms jitted with XLA's cheaper
# optimisation levels (``jax_disable_most_optimizations``, or ``--xla_backend_optimization_level=0``).


def _loss(out, w, r_out, r_w):
    total = jnp.sum(out * r_out)
    return total if w is None else total + jnp.sum(w * r_w)


def _named_grads(g_inputs, self_attn, param_grads):
    gq, gk, gv = g_inputs
    grads = {"query": gq} if self_attn else {"query": gq, "key": gk, "value": gv}
    grads.update({f"param.{n}": a for n, a in param_grads.items()})
    return grads


def _arrays(*xs):
    return tuple(None if x is None else jnp.asarray(x) for x in xs)


# A layer's structure depends only on its configuration: each runner builds it abstractly once per
# configuration (an ``eval_shape`` traces the initialisation) and loads every case's ``state_dict`` into it.


@functools.cache
def _abstract_layer(cfg, dtype):
    return eqx.filter_eval_shape(MultiheadAttention, **dict(cfg), key=jax.random.PRNGKey(0), dtype=dtype)


@functools.cache
def _params_template(cfg, dtype, q_shape, k_shape, v_shape):
    f = hk.transform(lambda q, k, v: nxhk.MultiheadAttention(**dict(cfg), dtype=dtype)(q, k, v))
    args = (jax.ShapeDtypeStruct(shape, dtype) for shape in (q_shape, k_shape, v_shape))
    return jax.eval_shape(f.init, jax.random.PRNGKey(0), *args)


def run_equinox(cfg, sd, dtype, q, k, v, kpm, attn, call, r_out, r_w):
    """The Equinox layer, built abstractly and loaded from ``sd``, under ``jax.vmap`` over the batch (a 4-D
    ``attn_mask`` is mapped too)."""
    self_attn = k is None
    layer = _abstract_layer(tuple(cfg.items()), np.dtype(dtype)).load_state_dict(sd)
    q, k, v, kpm, attn = _arrays(q, q if self_attn else k, q if self_attn else v, kpm, attn)
    attn_axis = 0 if attn is not None and attn.ndim == 4 else None

    def loss(args):
        m, q, k, v = args

        def one(q, k, v, kpm, attn):
            if self_attn:
                k = v = q
            return m(q, k, v, key_padding_mask=kpm, attn_mask=attn, **call)

        out, w = jax.vmap(one, in_axes=(0, 0, 0, 0, attn_axis))(q, k, v, kpm, attn)
        return _loss(out, w, r_out, r_w), (out, w)

    (_, (out, w)), (g_m, *g_inputs) = eqx.filter_value_and_grad(loss, has_aux=True)((layer, q, k, v))
    return out, w, _named_grads(g_inputs, self_attn, g_m.state_dict())


def run_haiku(cfg, sd, dtype, q, k, v, kpm, attn, call, r_out, r_w):
    """The Haiku module on the batched inputs; its params built from ``sd`` on an abstract ``init``."""
    self_attn = k is None
    q, k, v, kpm, attn = _arrays(q, q if self_attn else k, q if self_attn else v, kpm, attn)

    def forward(q, k, v):
        if self_attn:
            k = v = q
        mha = nxhk.MultiheadAttention(**cfg, dtype=dtype)
        return mha(q, k, v, key_padding_mask=kpm, attn_mask=attn, **call)

    f = hk.transform(forward)
    template = _params_template(tuple(cfg.items()), np.dtype(dtype), q.shape, k.shape, v.shape)
    params = nxhk.state_dict_to_params(template, sd, "multihead_attention")

    def loss(p, q, k, v):
        out, w = f.apply(p, None, q, k, v)
        return _loss(out, w, r_out, r_w), (out, w)

    (_, (out, w)), (g_p, *g_inputs) = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(params, q, k, v)
    return out, w, _named_grads(g_inputs, self_attn, nxhk.params_to_state_dict(g_p, "multihead_attention"))


MHA_RUNNERS = {"equinox": run_equinox, "haiku": run_haiku}
