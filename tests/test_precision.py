"""Low and high precision: bfloat16/float16 work, with scores and softmax in float32 and the
result cast back, within a tested bound of a float64 reference; float64 works under
``jax_enable_x64``; inputs of magnitude 1e4 neither overflow nor give NaN.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noxton.haiku as nxhk
from noxton.nn import MultiheadAttention, SqueezeExcitation

E, H, L, S = 16, 4, 5, 7
LOW = ["bfloat16", "float16"]
# Bound on |noxton(low) - float64 reference| in units of the low dtype's epsilon, relative to the
# reference's largest magnitude: a handful of roundings of O(1) values, and far below what a
# softmax in the low dtype gives (see test_scores_and_softmax_run_in_float32).
EPS_UNITS = 8


def _params(seed=0):
    rng = np.random.default_rng(seed)
    layer = MultiheadAttention(E, H, add_bias_kv=True, key=jax.random.PRNGKey(0))
    return {k: rng.uniform(-0.5, 0.5, size=v.shape) for k, v in layer.state_dict().items()}


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(L, E)), rng.normal(size=(S, E))


def _round(a, dtype):
    return np.asarray(jnp.asarray(a, dtype), np.float64)


def _run(dtype, sd, q, kv, **kw):
    mha = MultiheadAttention(E, H, add_bias_kv=True, key=jax.random.PRNGKey(0), dtype=jnp.dtype(dtype)).load_state_dict(
        sd
    )
    return mha(jnp.asarray(q, dtype), jnp.asarray(kv, dtype), jnp.asarray(kv, dtype), **kw)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_within_bound_of_float64(dtype, x64):
    sd, (q, kv) = _params(), _inputs()
    kpm = np.array([False, True, False, False, False, True, False])
    out, w = _run(dtype, sd, q, kv, key_padding_mask=jnp.asarray(kpm), average_attn_weights=False)
    assert out.dtype == jnp.dtype(dtype) and w.dtype == jnp.dtype(dtype)
    # the reference sees exactly the low-precision parameters and inputs, computed in float64
    sd_r = {k: _round(v, dtype) for k, v in sd.items()}
    ref_out, ref_w = _run(
        "float64",
        sd_r,
        _round(q, dtype),
        _round(kv, dtype),
        key_padding_mask=jnp.asarray(kpm),
        average_attn_weights=False,
    )
    eps = float(jnp.finfo(dtype).eps)
    err_out = np.abs(np.asarray(out, np.float64) - np.asarray(ref_out)).max() / np.abs(ref_out).max()
    err_w = np.abs(np.asarray(w, np.float64) - np.asarray(ref_w)).max()
    assert err_out <= EPS_UNITS * eps, f"output error {err_out / eps:.1f} eps"
    assert err_w <= 2 * eps, f"weights error {err_w / eps:.1f} eps"
    assert (np.asarray(w, np.float64)[..., :S][..., kpm] == 0).all()  # bias_k is the last key


@pytest.mark.parametrize("dtype", LOW)
def test_haiku_low_precision(dtype):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, L, E)), dtype)
    f = hk.transform(lambda x: nxhk.MultiheadAttention(E, H, dtype=jnp.dtype(dtype))(x, x, x, is_causal=True))
    params = f.init(jax.random.PRNGKey(0), x)
    assert all(a.dtype == jnp.dtype(dtype) for a in jax.tree_util.tree_leaves(params))
    out, w = f.apply(params, None, x)
    assert out.dtype == jnp.dtype(dtype) and w.dtype == jnp.dtype(dtype)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_allclose(np.asarray(w, np.float32).sum(-1), 1.0, atol=4 * float(jnp.finfo(dtype).eps) * S)


def _exp_and_dot_dtypes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = {"exp": [], "dot_general": []}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in found:
                found[name].append(eqn.outvars[0].aval.dtype)
            for p in eqn.params.values():
                if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                    walk(p.jaxpr)
                elif hasattr(p, "eqns"):
                    walk(p)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("dtype", LOW)
def test_scores_and_softmax_run_in_float32(dtype):
    mha = MultiheadAttention(E, H, key=jax.random.PRNGKey(0), dtype=jnp.dtype(dtype))
    q = jnp.ones((L, E), dtype)
    found = _exp_and_dot_dtypes(lambda q: mha(q, q, q), q)
    assert found["exp"], "no exp in the program"
    assert all(d == jnp.float32 for d in found["exp"]), f"softmax exp runs in {found['exp']}"
    assert jnp.dtype(jnp.float32) in found["dot_general"], "no float32 score matmul"


def test_float64_under_x64(x64):
    sd, (q, kv) = _params(), _inputs()
    out, w = _run("float64", sd, q, kv)
    assert out.dtype == jnp.float64 and w.dtype == jnp.float64
    found = _exp_and_dot_dtypes(lambda q: _run("float64", sd, q, kv), jnp.asarray(q))
    assert all(d == jnp.float64 for d in found["exp"])
    out32, _ = _run("float32", sd, q.astype(np.float32), kv.astype(np.float32))
    diff = np.abs(np.asarray(out) - np.asarray(out32, np.float64)).max()
    assert 0 < diff < 1e-5  # float64 really is more precise than float32, and agrees with it
    se = SqueezeExcitation(E, 4, key=jax.random.PRNGKey(0), dtype=jnp.float64)
    assert se(jnp.ones((E, 3, 3), jnp.float64)).dtype == jnp.float64


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_inputs_do_not_overflow(dtype):
    sd, (q, kv) = _params(), _inputs()
    q, kv = 1e4 * q, 1e4 * kv
    kpm = jnp.asarray(np.array([False, True, False, False, False, False, True]))
    for kw in (dict(), dict(key_padding_mask=kpm, is_causal=True), dict(average_attn_weights=False)):
        out, w = _run(dtype, sd, q, kv, **kw)
        out64, w64 = np.asarray(out, np.float64), np.asarray(w, np.float64)
        assert np.isfinite(out64).all() and np.isfinite(w64).all(), kw
        assert (w64 >= 0).all()
        np.testing.assert_allclose(w64.sum(-1), 1.0, atol=0.02 if dtype == "bfloat16" else 1e-5)
    # gradients too
    mha = MultiheadAttention(E, H, add_bias_kv=True, key=jax.random.PRNGKey(0), dtype=jnp.dtype(dtype)).load_state_dict(
        sd
    )
    qj, kvj = jnp.asarray(q, dtype), jnp.asarray(kv, dtype)
    g = jax.grad(lambda q, kv: jnp.sum(mha(q, kv, kv)[0].astype(jnp.float32)), argnums=(0, 1))(qj, kvj)
    assert all(np.isfinite(np.asarray(a, np.float64)).all() for a in g)


@pytest.mark.parametrize("dtype", LOW)
def test_squeeze_excitation_low_precision(dtype, x64):
    rng = np.random.default_rng(0)
    C, Q = 16, 4
    sd = {
        "fc1.weight": rng.uniform(-0.5, 0.5, (Q, C, 1, 1)),
        "fc1.bias": rng.uniform(-0.5, 0.5, (Q,)),
        "fc2.weight": rng.uniform(-0.5, 0.5, (C, Q, 1, 1)),
        "fc2.bias": rng.uniform(-0.5, 0.5, (C,)),
    }
    x = rng.normal(size=(C, 9, 9))
    se = SqueezeExcitation(C, Q, key=jax.random.PRNGKey(0), dtype=jnp.dtype(dtype)).load_state_dict(sd)
    out = se(jnp.asarray(x, dtype))
    assert out.dtype == jnp.dtype(dtype)
    ref_se = SqueezeExcitation(C, Q, key=jax.random.PRNGKey(0), dtype=jnp.float64).load_state_dict(
        {k: _round(v, dtype) for k, v in sd.items()}
    )
    ref = np.asarray(ref_se(jnp.asarray(_round(x, dtype))))
    err = np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max()
    assert err <= 4 * float(jnp.finfo(dtype).eps), f"{err / float(jnp.finfo(dtype).eps):.1f} eps"
    # large inputs: the pooled mean is accumulated in float32, no overflow in float16
    big = se(jnp.full((C, 64, 64), 6e4, dtype))
    assert np.isfinite(np.asarray(big, np.float64)).all()


def _products(f, *args):
    """``(precision, operand dtypes)`` of every matrix product and convolution in ``f``'s jaxpr, the programs
    inside it (scans, conds, custom rules, nested jits) included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.append((eqn.params["precision"], tuple(jnp.dtype(v.aval.dtype) for v in eqn.invars)))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    if hasattr(sub, "eqns"):  # a Jaxpr
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub, "consts"):  # a ClosedJaxpr
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(f)(*args).jaxpr)
    return found


def _layer_calls(dtype):
    """The layers' forward and gradient calls in ``dtype``: attention on each path (the blockwise path's
    whole-key chunks, and with dropout its key-block loop, which the GPU runs), both front ends, a
    Transformer layer, a convolution and squeeze-excitation."""
    import equinox as eqx

    from noxton.nn import Conv2d, TransformerEncoderLayer

    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (3, 64, E), dtype)
    mha = eqx.nn.inference_mode(MultiheadAttention(E, H, key=key, dtype=jnp.dtype(dtype)))
    dropping = MultiheadAttention(E, H, dropout=0.25, key=key, dtype=jnp.dtype(dtype))
    conv = Conv2d(8, 6, 3, padding=1, key=key, dtype=jnp.dtype(dtype))
    hk_mha = hk.without_apply_rng(hk.transform(lambda x: nxhk.MultiheadAttention(E, H)(x, x, x, need_weights=False)))
    layer = TransformerEncoderLayer(E, H, 32, dropout=0.0, key=key, dtype=jnp.dtype(dtype))
    se = SqueezeExcitation(8, 4, key=key, dtype=jnp.dtype(dtype))
    img = jax.random.normal(key, (2, 8, 5, 5), dtype)
    calls = {
        f"mha {impl}": (
            lambda x, impl=impl: jax.vmap(lambda xi: mha(xi, xi, xi, need_weights=False, implementation=impl)[0])(x),
            x,
        )
        for impl in ("dense", "blockwise", "fused")
    }
    calls["mha blockwise, dropout"] = (
        lambda x: jax.vmap(
            lambda xi, k: dropping(xi, xi, xi, need_weights=False, dropout_key=k, implementation="blockwise")[0]
        )(x, jax.random.split(key, x.shape[0])),
        x,
    )
    params = hk_mha.init(key, x)
    calls["haiku mha"] = (lambda x: hk_mha.apply(params, x)[0], x)
    calls["encoder layer"] = (lambda x: jax.vmap(layer)(x), x)
    calls["squeeze-excitation"] = (lambda img: jax.vmap(se)(img), img)
    calls["conv"] = (lambda img: jax.vmap(conv)(img), img)
    out = {}
    for name, (f, arg) in calls.items():
        out[f"{name} forward"] = (f, arg)
        out[f"{name} gradient"] = (jax.grad(lambda a, f=f: f(a).astype(jnp.float32).sum()), arg)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_products_keep_float32_in_float32(dtype):
    # torch multiplies float32 in float32 (TF32 off); JAX's default on a GPU is TF32. Every product of a call
    # on float32 inputs asks for HIGHEST (the CPU computes float32 either way), every product of a call on
    # bfloat16 inputs keeps the default (also those whose operands were widened to float32): read off the
    # programs, forward and gradient, so that this holds on every backend.
    highest = (jax.lax.Precision.HIGHEST,) * 2
    for name, (f, arg) in _layer_calls(dtype).items():
        products = _products(f, arg)
        assert products, name
        # squeeze-excitation's children run on the pooled map in float32 (torchvision's block, exactly rounded)
        float32_children = name.startswith("squeeze-excitation")
        for precision, dtypes in products:
            if dtype == "float32" or float32_children:
                assert precision == highest, (name, dtypes, precision)
            else:  # the default (jax.nn.dot_product_attention names its own bfloat16 algorithm)
                assert precision != highest, (name, dtypes, precision)
    if dtype == "bfloat16":  # products of operands widened to float32 are among those checked
        assert any(all(d == jnp.float32 for d in ds) for _, ds in _products(*_layer_calls(dtype)["mha dense forward"]))


@pytest.mark.parametrize("inside", [False, True])
def test_products_follow_a_users_matmul_precision(inside):
    # JAX's counterpart of torch's allow_tf32: a precision the user sets holds over noxton's HIGHEST, set
    # around the whole call, or inside a differentiated function (then the backward rules, traced after
    # the user's `with` block has closed, keep it too).
    def under_tf32(f):
        def g(a):
            with jax.default_matmul_precision("tensorfloat32"):
                return f(a)

        return g

    tf32 = (jax.lax.Precision.HIGH,) * 2  # what JAX makes of "tensorfloat32"
    for name, (f, arg) in _layer_calls("float32").items():
        if inside and not name.endswith("forward"):
            continue
        g = jax.grad(lambda a, f=f: under_tf32(f)(a).astype(jnp.float32).sum()) if inside else under_tf32(f)
        products = _products(g, arg)
        assert products and all(p == tf32 for p, _ in products), (name, products)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_convolution_gradients(dtype):
    # A float16/bfloat16 convolution accumulates in float32. JAX 0.4.38 cannot differentiate that form (its
    # transpose convolves a float32 cotangent with a bfloat16 operand: a TypeError); noxton widens there.
    # Either way the gradient is the float32 computation's on the same values, rounded.
    import equinox as eqx

    from noxton.nn import Conv2d

    conv = Conv2d(3, 4, 3, padding=1, key=jax.random.PRNGKey(0), dtype=jnp.dtype(dtype))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 6), dtype)

    def grads(conv, x):
        return eqx.filter_grad(lambda cx: cx[0](cx[1]).astype(jnp.float32).sum())((conv, x))

    low = jax.tree.leaves(grads(conv, x))
    wide = jax.tree.leaves(grads(*jax.tree.map(lambda a: a.astype(jnp.float32), (conv, x))))
    assert len(low) == len(wide) == 3  # weight, bias, input
    for g, ref in zip(low, wide, strict=True):
        assert g.dtype == jnp.dtype(dtype)
        ref = np.asarray(ref, np.float64)
        np.testing.assert_allclose(
            np.asarray(g, np.float64), ref, rtol=0, atol=2 * float(jnp.finfo(dtype).eps) * np.abs(ref).max()
        )
