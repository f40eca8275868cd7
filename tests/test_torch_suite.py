"""torch's own MultiheadAttention tests, re-expressed against noxton on every path, both front ends.

Sources (read, re-expressed, not copied): the OpInfo samples of
``F.multi_head_attention_forward`` (``common_methods_invocations``), in all four
dtypes with ``test/test_transformers.py``'s ``get_tolerances``, each sample through the
front end of its layout (batched: Haiku; unbatched: Equinox);
``test/nn/test_multihead_attention.py``; ``test/test_native_mha.py``; and the MHA
tests of ``test/test_transformers.py``. Every case runs through one jitted program
per shape structure (``torch_suite.runner``) holding every path that can run it,
the Haiku module on batched inputs and the Equinox layer under ``jax.vmap``.

Where torch's cases depend on what noxton deliberately does differently, the
difference is asserted instead: a query row whose keys are all masked gives NaN
in torch and a zero attention result in noxton (its output is ``out_proj.bias``);
``static_k``/``static_v`` (the ``saved_kv`` variants) have no noxton counterpart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_suite as ts
from helpers import assert_close, requires_torch, torch

import noxton.haiku as nxhk
from noxton.nn import MultiheadAttention

pytestmark = requires_torch

LOW = ("bfloat16", "float16")


# The OpInfo samples, in all four dtypes ------------------------------------------------------


GROUPS = [(b, m) for b in (False, True) for m in (None, "2d", "3d")]
GROUP_IDS = [f"{'batched' if b else 'unbatched'}-{m or 'nomask'}" for b, m in GROUPS]


def _errors(dtype, group):
    """Per (front end, path, need_weights): noxton's result, torch's float64 and ``dtype`` results, per sample."""
    table = {}
    for sample in ts.opinfo_samples(group=group):
        sample = ts.rounded_sample(sample, dtype)
        refs = {nw: ts.torch_forward(sample, "float64", nw) for nw in (False, True)}
        lows = {nw: ts.torch_forward(sample, dtype, nw) for nw in (False, True)}
        for key, (out, w) in ts.run_noxton(sample, dtype, ts.paths_for(dtype)).items():
            nw = key[2]
            table.setdefault(key, []).append((sample["id"], out, w, refs[nw], lows[nw]))
    return table


@pytest.mark.cross_product
@pytest.mark.parametrize("group", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("dtype", LOW)
def test_opinfo_samples_low_precision(dtype, group):
    """No larger error than torch's in the median, and within torch's tolerance on every sample.

    The tolerance is ``test_transformers.get_tolerances`` of torch's own low-precision
    result against float64, with the fudge factor of torch's SDPA output checks (4):
    at 1, a one-ulp flip of an intermediate rounding in either library decides
    (measured: at most 1 sample of 96 per path, in both directions). The median is
    taken over each group's 16 samples (a stricter check than over all 96).
    """
    for key, rows in _errors(dtype, group).items():
        ratios = []
        for sid, out, w, (ref, ref_w), (low, low_w) in rows:
            atol, rtol = ts.get_tolerances(ref, low, dtype, fudge_factor=4.0)
            assert ts.within(out, ref, atol, rtol), (key, sid, np.abs(out - ref).max(), np.abs(low - ref).max())
            if w is not None:
                atol, rtol = ts.get_tolerances(ref_w, low_w, dtype, fudge_factor=4.0)
                assert ts.within(w, ref_w, atol, rtol), (key, sid, "weights")
            ratios.append(np.abs(out - ref).mean() / max(np.abs(low - ref).mean(), 1e-300))
        assert np.median(ratios) <= 1.0, (key, np.median(ratios))


@pytest.mark.cross_product
@pytest.mark.parametrize("group", GROUPS, ids=GROUP_IDS)
def test_opinfo_samples_float32(group):
    for key, rows in _errors("float32", group).items():
        for sid, out, w, (ref, ref_w), (low, low_w) in rows:
            atol, rtol = ts.get_tolerances(ref, low, "float32")
            assert ts.within(out, ref, 2 * atol, 2 * rtol), (key, sid, np.abs(out - ref).max(), np.abs(low - ref).max())
            if w is not None:
                atol, rtol = ts.get_tolerances(ref_w, low_w, "float32")
                assert ts.within(w, ref_w, 2 * atol, 2 * rtol), (key, sid, "weights")


@pytest.mark.cross_product
@pytest.mark.parametrize("group", GROUPS, ids=GROUP_IDS)
def test_opinfo_samples_float64(group, x64):
    for key, rows in _errors("float64", group).items():
        for sid, out, w, (ref, ref_w), _ in rows:
            assert_close(out, ref, 1e-12 * max(1.0, np.abs(ref).max()), f"{key} {sid}")
            if w is not None:
                assert_close(w, ref_w, 1e-13, f"{key} {sid} weights")


def test_fused_refuses_float64(x64):
    mha = MultiheadAttention(4, 2, key=jax.random.PRNGKey(0), dtype=jnp.float64)
    x = jnp.ones((3, 4), jnp.float64)
    with pytest.raises(ValueError, match=r"implementation='fused' cannot keep float64.*'dense' or 'blockwise'"):
        mha(x, x, x, need_weights=False, implementation="fused")
    out, _ = mha(x, x, x, need_weights=False, implementation="auto")
    assert out.dtype == jnp.float64


@pytest.mark.parametrize("dtype", LOW)
def test_fused_low_precision_under_jit(dtype):
    """A forced fused path compiles under ``eqx.filter_jit`` on every backend (it crashed in float16 on CPU)."""
    import equinox as eqx

    mha = MultiheadAttention(8, 2, key=jax.random.PRNGKey(0), dtype=jnp.dtype(dtype))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8)).astype(dtype)
    fused = eqx.filter_jit(lambda m, x: m(x, x, x, need_weights=False, implementation="fused")[0])(mha, x)
    dense = eqx.filter_jit(lambda m, x: m(x, x, x, need_weights=False, implementation="dense")[0])(mha, x)
    assert fused.dtype == jnp.dtype(dtype)
    assert_close(fused, dense, 4 * float(jnp.finfo(dtype).eps) * float(jnp.abs(dense.astype(jnp.float32)).max()))


# test/nn/test_multihead_attention.py --------------------------------------------------------


def _torch_module(embed_dim, heads, seed=0, dtype="float32", **options):
    torch.manual_seed(seed)
    return torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True, dtype=ts.torch_dtype(dtype), **options)


def _run_all(module, dtype, q, k, v, kpm=None, mask=None, average=True, paths=ts.PATHS, self_attn=False, options=()):
    """noxton on every path and both front ends with ``module``'s weights; float64 NumPy results."""
    batched = q.ndim == 3
    emb, heads = module.embed_dim, module.num_heads
    call = (("average_attn_weights", average),)
    f, run = ts.runner(emb, heads, dtype, batched, tuple(paths), tuple(options), call)
    dt = jnp.dtype(dtype)
    jq = jnp.asarray(q, dt)
    jk = None if self_attn else jnp.asarray(k, dt)
    jv = None if self_attn else jnp.asarray(v, dt)
    jkpm = None if kpm is None else jnp.asarray(kpm)
    jm = None if mask is None else jnp.asarray(mask)
    sd = {n: t.detach().to(torch.float64).numpy() for n, t in module.state_dict().items()}
    hk_params, layer = ts.load(f, emb, heads, dtype, sd, tuple(options), jq, jk, jv, jkpm, jm)
    return ts.to_numpy(run(hk_params, layer, jq, jk, jv, jkpm, jm))


def _torch_call(module, q, k, v, kpm=None, mask=None, need_weights=True, average=True):
    def t(x):
        return None if x is None else torch.as_tensor(x)

    with torch.no_grad():
        out, w = module(
            t(q),
            t(k),
            t(v),
            key_padding_mask=t(kpm),
            attn_mask=t(mask),
            need_weights=need_weights,
            average_attn_weights=average,
        )
    return out.double().numpy(), None if w is None else w.double().numpy()


def _numpy_mha(module, q, k, v, kpm, mask):
    """float64 NumPy attention for a module without appended keys; a (head, query) with no visible key gives 0."""
    sd = {n: t.detach().double().numpy() for n, t in module.state_dict().items()}
    E, H = module.embed_dim, module.num_heads
    if "in_proj_weight" in sd:
        ws = np.split(sd["in_proj_weight"], 3)
    else:
        ws = [sd[f"{n}_proj_weight"] for n in "qkv"]
    bs = np.split(sd.get("in_proj_bias", np.zeros(3 * E)), 3)
    Q, K, V = (x @ wi.T + bi for x, wi, bi in zip((q, k, v), ws, bs, strict=False))
    B, L, S, D = q.shape[0], q.shape[1], k.shape[1], E // H
    Q, K, V = (x.reshape(B, -1, H, D) for x in (Q, K, V))
    scores = np.einsum("blhd,bshd->bhls", Q, K) / np.sqrt(D)
    for m, shape in ((mask, None), (kpm, (B, 1, 1, S))):
        if m is not None:
            m = np.where(m, -np.inf, 0.0) if m.dtype == bool else m.astype(np.float64)
            scores = scores + (m if shape is None else m.reshape(shape))
    top = scores.max(-1, keepdims=True)
    e = np.exp(scores - np.where(np.isinf(top), 0.0, top))
    p = e / np.where(e.sum(-1, keepdims=True) == 0, 1.0, e.sum(-1, keepdims=True))
    out = np.einsum("bhls,bshd->blhd", p, V).reshape(B, L, E) @ sd["out_proj.weight"].T
    return out + sd.get("out_proj.bias", np.zeros(E))


def _compare(results, torch_module, q, k, v, kpm=None, mask=None, average=True, atol=1e-5, torch_mask=None):
    """Every result against torch. Rows that torch leaves NaN (a head whose keys are all masked)
    are checked against a NumPy evaluation in which such a head contributes zero, noxton's rule."""
    for (front, impl, nw), (out, w) in results.items():
        t_out, t_w = _torch_call(torch_module, q, k, v, kpm, mask if torch_mask is None else torch_mask, nw, average)
        dead = np.isnan(t_out).any(-1)
        assert_close(np.where(dead[..., None], 0.0, out), np.nan_to_num(t_out), atol, f"{front} {impl} {nw}")
        if dead.any():
            assert torch_module.bias_k is None and not torch_module.add_zero_attn
            expected = _numpy_mha(torch_module, q, k, v, kpm, mask)
            assert_close(out[dead], expected[dead], atol, f"{front} {impl} rows with a fully masked head")
        if nw:
            t_rows = np.isnan(t_w).any(-1)
            assert_close(np.where(t_rows[..., None], 0.0, w), np.nan_to_num(t_w), atol, f"{front} {impl} weights")


HELPER_VARIANTS = {
    # name: (add_key_padding_mask, add_bias_kv, add_zero_attn, same_embed_dim)
    "no_masking": (False, False, False, False),
    "add_bias_kv": (False, True, False, False),
    "add_zero_attn": (False, False, True, False),
    "key_padding_mask": (True, False, False, False),
    "add_bias_kv_zero_attn": (True, True, True, False),
    "all_arguments3": (True, False, True, True),
}


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("variant", sorted(HELPER_VARIANTS))
def test_multihead_attn_helper(variant, average):
    """``_multihead_attn_test_helper``: one decoder step attending to a source, kdim/vdim, masks (float32)."""
    add_kpm, add_bias_kv, add_zero_attn, same_embed_dim = HELPER_VARIANTS[variant]
    rng = np.random.default_rng(sorted(HELPER_VARIANTS).index(variant))
    batch, seq_len, d_head, heads = 3, 6, 3, 4
    d_model = d_head * heads
    kv_dim = d_model if same_embed_dim else 7
    options = (("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn), ("kdim", kv_dim), ("vdim", kv_dim))
    module = _torch_module(d_model, heads, **dict(options))
    kpm = None
    if add_kpm:
        kpm = np.repeat(rng.integers(0, 2, (1, seq_len)) == 1, batch, axis=0)
    q = rng.random((batch, 1, d_model)).astype(np.float32)
    kv = rng.random((batch, seq_len, kv_dim)).astype(np.float32)
    mask = np.where(rng.integers(0, 2, (1, seq_len)) == 0, -np.inf, 0.0).astype(np.float32)
    results = _run_all(module, "float32", q, kv, kv, kpm, mask, average, options=options)
    _compare(results, module, q, kv, kv, kpm, mask, average)


def test_multihead_attn_3d_attn_mask():
    """A per-example mask, as torch's ``(N * H, T, S)`` mask, equals the 2-D mask per example."""
    N, T, S, E, H = 8, 2, 3, 8, 4
    rng = np.random.default_rng(0)
    module = _torch_module(E, H)
    q = rng.random((N, T, E)).astype(np.float32)
    kv = rng.random((N, S, E)).astype(np.float32)
    mask = np.where(rng.integers(0, 2, (N, T, S)) == 0, -np.inf, 0.0).astype(np.float32)
    noxton_mask = np.repeat(mask[:, None], H, axis=1)  # (N, H, T, S): torch's repeat_interleave, unflattened
    results = _run_all(module, "float32", q, kv, kv, mask=noxton_mask)
    _compare(results, module, q, kv, kv, torch_mask=np.repeat(mask, H, axis=0))
    # ... and the same as the 2-D mask of each example, through the Equinox layer.
    sd = {n: t.detach().double().numpy() for n, t in module.state_dict().items()}
    layer = MultiheadAttention(E, H, key=jax.random.PRNGKey(0)).load_state_dict(sd)
    for i in range(2):
        out_i, _ = layer(jnp.asarray(q[i]), jnp.asarray(kv[i]), jnp.asarray(kv[i]), attn_mask=jnp.asarray(mask[i]))
        assert_close(out_i, results["equinox", "dense", True][0][i], 1e-6, f"example {i}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_multihead_attn_no_bias_and_separate_weights(dtype, x64):
    """``test_multihead_attn_no_bias``, ``..._in_proj_bias_none`` and ``..._in_proj_weight_none``."""
    rng = np.random.default_rng(1)
    module = _torch_module(8, 4, bias=False, dtype=dtype)
    assert set(module.state_dict()) == {"in_proj_weight", "out_proj.weight"}
    layer = MultiheadAttention(8, 4, bias=False, key=jax.random.PRNGKey(0), dtype=jnp.dtype(dtype))
    assert set(layer.state_dict()) == {"in_proj_weight", "out_proj.weight"}
    x = rng.random((2, 2, 8)).astype(dtype)
    _compare(
        _run_all(module, dtype, x, x, x, paths=ts.paths_for(dtype), self_attn=True, options=(("bias", False),)),
        module,
        x,
        x,
        x,
        atol=1e-12 if dtype == "float64" else 1e-5,
    )
    options = (("kdim", 2), ("vdim", 2))
    module = _torch_module(4, 4, dtype=dtype, **dict(options))
    q, kv = rng.random((4, 4, 4)).astype(dtype), rng.random((4, 4, 2)).astype(dtype)
    _compare(
        _run_all(module, dtype, q, kv, kv, paths=ts.paths_for(dtype), options=options),
        module,
        q,
        kv,
        kv,
        atol=1e-12 if dtype == "float64" else 1e-5,
    )


@pytest.mark.own_errors
def test_multihead_attn_invalid_shape():
    """``test_multihead_attn_invalid_shape``: each malformed call is refused at trace time, naming the argument."""
    mha = MultiheadAttention(4, 4, key=jax.random.PRNGKey(0))
    x = jnp.ones((4, 4))
    with pytest.raises(ValueError, match="`key`"):
        mha(x, jnp.ones((4, 4, 4)), x)
    with pytest.raises(ValueError, match="`value`"):
        mha(x, x, jnp.ones((4, 4, 4)))
    with pytest.raises(ValueError, match="`key_padding_mask`"):
        mha(x, x, x, key_padding_mask=jnp.zeros((1, 8), bool))
    with pytest.raises(ValueError, match="`attn_mask`"):
        mha(x, x, x, attn_mask=jnp.zeros((4,), bool))
    with pytest.raises(ValueError, match=r"`attn_mask` must have shape .*\(4, 4, 4\)"):
        mha(x, x, x, attn_mask=jnp.zeros((5, 4, 4), bool))
    import haiku as hk

    def batched(key, value, **kw):
        return hk.transform(lambda q, k, v: nxhk.MultiheadAttention(4, 4)(q, k, v, inference=True, **kw)).init(
            jax.random.PRNGKey(0), jnp.ones((4, 4, 4)), key, value
        )

    xb = jnp.ones((4, 4, 4))
    with pytest.raises(ValueError, match="`key`"):
        batched(jnp.ones((4, 4)), xb)
    with pytest.raises(ValueError, match="`value`"):
        batched(xb, jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="`key_padding_mask`"):
        batched(xb, xb, key_padding_mask=jnp.array([False, False, True, True]))
    with pytest.raises(ValueError, match="`attn_mask`"):
        batched(xb, xb, attn_mask=jnp.array([False, False, True, True]))


def test_multihead_self_attn_two_masks():
    """``test_multihead_self_attn_two_masks_fast_path``: bool attn_mask and key_padding_mask together."""
    E, H, B, S = 14, 7, 8, 5
    rng = np.random.default_rng(2)
    module = _torch_module(E, H)
    x = rng.random((B, S, E)).astype(np.float32)
    mask = rng.integers(0, 2, (S, S)).astype(bool)
    kpm = rng.integers(0, 2, (B, S)).astype(bool)
    _compare(_run_all(module, "float32", x, x, x, kpm, mask, self_attn=True), module, x, x, x, kpm, mask)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_multihead_attention_dtype(dtype, x64):
    """``test_multihead_attention_dtype[_batch_first]``: shape and dtype kept on every path, values close to torch."""
    E, H, sl, bs = 128, 8, 10, 8
    module = _torch_module(E, H, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(bs, sl, E, generator=gen).to(ts.torch_dtype(dtype)).double().numpy() for _ in range(3))
    results = _run_all(module, dtype, q, k, v, paths=ts.paths_for(dtype))
    t_module = _torch_module(E, H, dtype="float64")
    t_module.load_state_dict({n: t.double() for n, t in module.state_dict().items()})
    ref, _ = _torch_call(t_module, q, k, v, need_weights=False)
    low, _ = _torch_call(module, *(torch.tensor(a, dtype=ts.torch_dtype(dtype)) for a in (q, k, v)), need_weights=False)
    for key, (out, _) in results.items():
        assert out.shape == (bs, sl, E), key
        if dtype == "float64":
            assert_close(out, ref, 1e-12, str(key))
        else:
            atol, rtol = ts.get_tolerances(ref, low, dtype, fudge_factor=4.0)
            assert ts.within(out, ref, atol, rtol), (key, np.abs(out - ref).max(), np.abs(low - ref).max())


# test/test_native_mha.py ---------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["none", "one", "all"])
@pytest.mark.parametrize("mode", ["self", "encdec", "generic"])
def test_native_multihead_attention(mode, padding):
    """``_test_multihead_attention_impl``: E=64, H=4, 16 x 8, padded last keys, with and without weights."""
    E, H, bs, sl = 64, 4, 16, 8
    gen = torch.Generator().manual_seed(9343)
    q = (6 * torch.rand(bs, sl, E, generator=gen) - 3).numpy()
    kpm = None
    if padding != "none":
        kpm = np.zeros((bs, sl), bool)
        if padding == "all":
            q[:, -1] = 0.0
            kpm[:, -1] = True
        else:
            q[0, -1] = 0.0
            kpm[0, -1] = True
    k = q if mode == "self" else (6 * torch.rand(bs, sl, E, generator=gen) - 3).numpy()
    v = k if mode != "generic" else (6 * torch.rand(bs, sl, E, generator=gen) - 3).numpy()
    module = _torch_module(E, H)
    for average in (False, True):
        results = _run_all(module, "float32", q, k, v, kpm, average=average, self_attn=mode == "self")
        for (front, impl, nw), (out, w) in results.items():
            t_out, t_w = _torch_call(module, q, k, v, kpm, None, nw, average)
            np.testing.assert_allclose(out, t_out, atol=2e-5, rtol=2e-3, err_msg=f"{front} {impl} {nw}")
            if nw:
                np.testing.assert_allclose(w, t_w, atol=5e-4, rtol=5e-4, err_msg=f"{front} {impl} weights")


# test/test_transformers.py -------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", ["bool", "float32"])
@pytest.mark.parametrize("key_padding_mask_dim", [2, None])
@pytest.mark.parametrize("attn_mask_dim", [2, 3, None])
def test_multiheadattention_fastpath_attn_mask(attn_mask_dim, key_padding_mask_dim, mask_dtype):
    """Masks of every rank and kind, as ``make_tensor`` draws them (bool: random; float: uniform in [-9, 9))."""
    B, L, D, H = 2, 4, 8, 4
    rng = np.random.default_rng(attn_mask_dim or 0)

    def make(shape):
        return (
            rng.integers(0, 2, shape).astype(bool)
            if mask_dtype == "bool"
            else rng.uniform(-9, 9, shape).astype(np.float32)
        )

    mask = None if attn_mask_dim is None else make((L, L) if attn_mask_dim == 2 else (B * H, L, L))
    kpm = None if key_padding_mask_dim is None else make((B, L))
    module = _torch_module(D, H)
    x = np.random.default_rng(5).standard_normal((B, L, D)).astype(np.float32)
    noxton_mask = mask if mask is None or mask.ndim == 2 else mask.reshape(B, H, L, L)
    results = _run_all(module, "float32", x, x, x, kpm, noxton_mask, self_attn=True)
    _compare(results, module, x, x, x, kpm, noxton_mask, torch_mask=mask)


# Trained-model-like weights: every parameter random, biases included -------------------------


@pytest.mark.parametrize("dtype", LOW)
def test_random_draws_with_biases_no_less_exact_than_torch(dtype):
    """20 draws of a module with every parameter random (``helpers.torch_mha``): against float64,
    noxton's mean error is no larger than torch's in the median, on every path and front end."""
    from helpers import torch_mha

    cfg = dict(embed_dim=16, num_heads=4, bias=True, add_bias_kv=False, add_zero_attn=False)
    ratios = {}
    for seed in range(20):
        module = torch_mha(cfg, ts.torch_dtype(dtype), seed=seed)
        rng = np.random.default_rng(seed)
        q, kv = (
            torch.tensor(rng.normal(size=s)).to(ts.torch_dtype(dtype)).double().numpy()
            for s in ((2, 5, 16), (2, 7, 16))
        )
        ref_module = torch_mha(cfg, torch.float64, seed=seed)
        ref_module.load_state_dict({n: t.double() for n, t in module.state_dict().items()})
        ref, _ = _torch_call(ref_module, q, kv, kv, need_weights=False)
        low, _ = _torch_call(
            module, *(torch.tensor(a, dtype=ts.torch_dtype(dtype)) for a in (q, kv, kv)), need_weights=False
        )
        for key, (out, _) in _run_all(module, dtype, q, kv, kv).items():
            ratios.setdefault(key, []).append(np.abs(out - ref).mean() / np.abs(low - ref).mean())
    for key, r in ratios.items():
        assert np.median(r) <= 1.0, (key, np.median(r), np.sum(np.array(r) > 1))
