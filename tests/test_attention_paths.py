"""The fused and blockwise attention paths against the dense path.

Every case runs the Haiku module on batched inputs with ``implementation`` forced
to ``"dense"``, ``"blockwise"`` and ``"fused"`` in one jitted program, and compares
each path's outputs and gradients with respect to the inputs and every parameter
with the dense path's, to float32 rounding.
Block sizes are shrunk so that short sequences cross several query and key
blocks (including ragged last blocks).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from jax.test_util import check_grads

import noxton.functional._attention as attention_module
import noxton.functional._blockwise as blockwise_module
import noxton.haiku as nxhk
from noxton.functional import (
    Masks,
    blockwise_attention,
    canonical_masks,
    dense_attention,
    select_implementation,
)
from noxton.functional._attention import CPU_BLOCKWISE_MIN_SCORES, LARGE_SCORES
from noxton.functional._checks import lift
from noxton.nn import MultiheadAttention

E, H, N, L, S = 8, 2, 2, 9, 7
ATOL = 2e-5
PATHS = ("blockwise", "fused")  # each checked against the dense path

MASKS = [
    "none",
    "kpm_bool",
    "kpm_float",
    "attn_bool",
    "attn_float",
    "heads_bool",
    "heads_float",
    "batch_heads_float",
    "causal",
    "causal_kpm",
    "rows_masked",
    "all_masked",
]
STRUCTS = {
    "self": {"add_bias_kv": False, "add_zero_attn": False, "kdim": None, "vdim": None},
    "kv-biaskv-zeroattn": {
        "add_bias_kv": True,
        "add_zero_attn": True,
        "kdim": 5,
        "vdim": 3,
    },
    "cross-zeroattn": {
        "add_bias_kv": False,
        "add_zero_attn": True,
        "kdim": None,
        "vdim": None,
    },
}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise_module, "DEFAULT_BLOCK_Q", 4)
    monkeypatch.setattr(blockwise_module, "DEFAULT_BLOCK_K", 3)


def make_inputs(struct, mask_case, seed=0):
    rng = np.random.default_rng(seed)
    cfg = STRUCTS[struct]
    kdim = cfg["kdim"] or E
    vdim = cfg["vdim"] or E
    self_attn = struct == "self"
    src = L if self_attn else S
    q = rng.normal(size=(N, L, E)).astype(np.float32)
    k = q if self_attn else rng.normal(size=(N, src, kdim)).astype(np.float32)
    v = q if self_attn else rng.normal(size=(N, src, vdim)).astype(np.float32)
    kpm = attn = None
    causal = False
    if mask_case == "kpm_bool":
        kpm = rng.random((N, src)) < 0.3
    elif mask_case == "kpm_float":
        kpm = rng.normal(size=(N, src)).astype(np.float32)
    elif mask_case == "attn_bool":
        attn = rng.random((L, src)) < 0.3
    elif mask_case == "attn_float":
        attn = rng.normal(size=(L, src)).astype(np.float32)
    elif mask_case == "heads_bool":
        attn = rng.random((H, L, src)) < 0.3
    elif mask_case == "heads_float":
        attn = rng.normal(size=(H, L, src)).astype(np.float32)
    elif mask_case == "batch_heads_float":
        attn = rng.normal(size=(N, H, L, src)).astype(np.float32)
    elif mask_case == "causal":
        causal = True
    elif mask_case == "causal_kpm":
        causal = True
        kpm = rng.random((N, src)) < 0.4
        kpm[0, 0] = True  # query 0 of batch 0 sees no source key
    elif mask_case == "rows_masked":
        attn = rng.random((H, L, src)) < 0.3
        attn[:, 2] = True
        attn[1, 5] = True
    elif mask_case == "all_masked":
        kpm = np.ones((N, src), bool)
    return {
        "q": q,
        "k": k,
        "v": v,
        "kpm": kpm,
        "attn": attn,
        "causal": causal,
        "self_attn": self_attn,
    }, cfg


def run(struct, mask_case):
    inputs, cfg = make_inputs(struct, mask_case)
    f = hk.transform(
        lambda q, k, v, impl: nxhk.MultiheadAttention(E, H, **cfg)(
            q,
            k,
            v,
            key_padding_mask=None if inputs["kpm"] is None else jnp.asarray(inputs["kpm"]),
            need_weights=False,
            attn_mask=None if inputs["attn"] is None else jnp.asarray(inputs["attn"]),
            is_causal=inputs["causal"],
            implementation=impl,
        )[0]
    )
    q, k, v = (jnp.asarray(inputs[n]) for n in "qkv")
    params = f.init(jax.random.PRNGKey(0), q, k, v, "dense")
    # Non-zero biases everywhere, so every parameter's gradient is exercised.
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype),
        params,
    )
    r = jnp.asarray(np.random.default_rng(3).normal(size=(N, L, E)).astype(np.float32))

    def every_path(params, q, k, v):  # one compilation per case: the three paths side by side
        return {
            impl: jax.value_and_grad(lambda *a, impl=impl: loss(*a, impl), argnums=(0, 1, 2, 3), has_aux=True)(
                params, q, k, v
            )
            for impl in ("dense", *PATHS)
        }

    def primal(params, q, k, v):  # no gradient: the blockwise pass that writes its output over the queries
        return loss(params, q, k, v, "blockwise")[1]

    def loss(params, q, k, v, impl):
        if inputs["self_attn"]:
            k = v = q
        out = f.apply(params, None, q, k, v, impl)
        return jnp.sum(out * r), out

    results = {impl: (out, grads) for impl, ((_, out), grads) in jax.jit(every_path)(params, q, k, v).items()}
    return results | {"blockwise primal": (jax.jit(primal)(params, q, k, v), None)}


# Every mask on the richest structure (appended keys, kdim/vdim); the common ones on the rest.
CASES = [("kv-biaskv-zeroattn", m) for m in MASKS] + [
    (s, m) for s in ("self", "cross-zeroattn") for m in ("none", "kpm_bool", "causal_kpm", "rows_masked", "all_masked")
]


@pytest.mark.cross_product
@pytest.mark.parametrize(("struct", "mask_case"), CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_paths_match_dense(struct, mask_case):
    results = run(struct, mask_case)
    out_d, g_d = results["dense"]
    flat_d, _ = jax.tree_util.tree_flatten_with_path(g_d)
    for impl in PATHS:
        out_x, g_x = results[impl]
        assert np.all(np.isfinite(np.asarray(out_x))), impl
        assert_close(out_x, out_d, ATOL, f"{impl} output")
        flat_x, _ = jax.tree_util.tree_flatten_with_path(g_x)
        for (path, gd), (_, gx) in zip(flat_d, flat_x, strict=True):
            name = f"{impl} {jax.tree_util.keystr(path)}"
            assert np.all(np.isfinite(np.asarray(gx))), name
            assert_close(gx, gd, ATOL, name)


# The blockwise forward and backward with every key at once (``_forward_whole_keys`` and
# ``_backward_whole_keys``, what the CPU runs) in chunks made small enough to split examples (200 scores:
# 2 of the 4 rows), heads (81: one row of 9 x 9) and a row's queries (40: 5 of 9, the last chunk padded,
# the backward accumulating dK and dV over them); "long": past FUSED_KEYS_MAX keys, where a chunk takes
# at most LONG_CHUNK_Q queries (here 4 x 3 of 9 queries).
WHOLE_KEY_CASES = [
    ("kv-biaskv-zeroattn", m, budget)
    for budget in (81, 40)
    for m in ("none", "kpm_bool", "heads_float", "batch_heads_float", "causal_kpm", "rows_masked", "all_masked")
] + [("self", "causal_kpm", 200), ("cross-zeroattn", "attn_bool", 200), ("self", "causal_kpm", "long")]
# and past WHOLE_KEYS_MAX keys, the key loop with its own block sizes
WHOLE_KEY_CASES += [("kv-biaskv-zeroattn", "rows_masked", "beyond")]
# The AVX-512 forward's chunks (``forward_chunks``), with backward chunks of other shapes: "long-rows", past
# FUSED_KEYS_MAX keys one row of up to LONG_ROW_CHUNK_Q queries (here 5 of 9, the last chunk padded, against
# the backward's 3); "narrow", from half of FUSED_KEYS_MAX keys at a head size up to NARROW_HEAD, chunks of
# NARROW_CHUNK_SCORES (one row, against the backward's two); "one-chunk", a small call as one chunk (the
# backward in chunks of one row and 5 queries, the last padded); "one-chunk-vjp", the backward as one chunk (the
# forward's chunks of one row and 5 queries); "all-rows", from a quarter to half of FUSED_KEYS_MAX keys, chunks of
# every head of whole examples and ALL_ROWS_CHUNK_Q queries (here 5 of 9, the last padded; the backward's one row
# and 5 queries), all examples or ("all-rows-capped") as many as ALL_ROWS_MAX_SCORES holds.
WHOLE_KEY_CASES += [
    ("self", "causal_kpm", "long-rows"),
    ("self", "rows_masked", "narrow"),
    ("kv-biaskv-zeroattn", "rows_masked", "one-chunk"),
    ("kv-biaskv-zeroattn", "rows_masked", "one-chunk-vjp"),
    ("self", "causal_kpm", "all-rows"),
    ("cross-zeroattn", "attn_bool", "all-rows"),
    ("kv-biaskv-zeroattn", "rows_masked", "all-rows-capped"),
]
# Every case divides by the softmax's sum after the second product, ((P @ V) / l), as CPUs with AVX-512 do; these also
# before it (CPUs without it, and the chunks of NORMALISED_FIRST's shapes), masked rows and all-masked rows included.
WHOLE_KEY_CASES = (
    [(*case, False) for case in WHOLE_KEY_CASES]
    + [("kv-biaskv-zeroattn", m, 40, True) for m in ("none", "batch_heads_float", "rows_masked", "all_masked")]
    + [("self", "causal_kpm", "long", True)]
)


@pytest.mark.cross_product
@pytest.mark.parametrize(
    ("struct", "mask_case", "budget", "normalised_first"),
    WHOLE_KEY_CASES,
    ids=[f"{s}-{m}-{b}" + ("-normalised-first" if f else "") for s, m, b, f in WHOLE_KEY_CASES],
)
def test_whole_key_chunks_match_dense(struct, mask_case, budget, normalised_first, monkeypatch):
    monkeypatch.setattr(blockwise_module, "DEFAULT_BLOCK_Q", None)
    monkeypatch.setattr(blockwise_module, "DEFAULT_BLOCK_K", None)
    if budget == "beyond":
        monkeypatch.setattr(blockwise_module, "WHOLE_KEYS_MAX", 4)
        assert not blockwise_module._whole_keys(blockwise_module._Static(False, S, None, None), None, S + 2)
        budget = 40
    # the chunks are whole_key_chunks's, as on a CPU neither Intel nor with AVX-512, unless the case names a rule
    for name, value in blockwise_module.CHUNK_RULES_OFF.items():
        monkeypatch.setattr(blockwise_module, name, value)
    forward = backward = None
    if budget in ("long", "long-rows"):
        monkeypatch.setattr(blockwise_module, "FUSED_KEYS_MAX", 4)
        monkeypatch.setattr(blockwise_module, "LONG_CHUNK_Q", 4)
        if budget == "long-rows":
            monkeypatch.setattr(blockwise_module, "LONG_ROW_CHUNK_Q", 5)
            forward = (1, 1, 5)
        budget = 200 if budget == "long" else 40
    if budget == "narrow":
        monkeypatch.setattr(blockwise_module, "FUSED_KEYS_MAX", 16)
        monkeypatch.setattr(blockwise_module, "NARROW_CHUNK_SCORES", 81)
        forward, budget = (1, 1, L), 200
    if budget == "one-chunk":
        monkeypatch.setattr(blockwise_module, "ONE_CHUNK_SCORES", 2**22)
        forward, budget = (N, H, L), 40
    if budget in ("all-rows", "all-rows-capped"):
        monkeypatch.setattr(blockwise_module, "FUSED_KEYS_MAX", 24)  # 7 to 12 keys: every case's 8 or 9
        monkeypatch.setattr(blockwise_module, "ALL_ROWS_CHUNK_Q", 5)
        monkeypatch.setattr(blockwise_module, "ALL_ROWS_QUERIES", 16 if budget == "all-rows" else 8)
        if budget == "all-rows-capped":  # room for one example's heads only
            monkeypatch.setattr(blockwise_module, "ALL_ROWS_MAX_SCORES", H * 5 * 9)
        forward, budget = ((N if budget == "all-rows" else 1), H, 5), 40
    if budget == "one-chunk-vjp":
        monkeypatch.setattr(blockwise_module, "ONE_CHUNK_SCORES_VJP", 2**22)
        backward, budget = (N, H, L), 40
    monkeypatch.setattr(blockwise_module, "CHUNK_SCORES", budget)
    monkeypatch.setattr(blockwise_module, "CHUNK_SCORES_VJP", budget)  # the backward's chunks, the same here
    keys = {"self": L, "kv-biaskv-zeroattn": S + 2, "cross-zeroattn": S + 1}[struct]  # appended keys counted
    nb, hb, c = blockwise_module.whole_key_chunks(N, H, L, keys)
    assert (nb * hb, c) != (N * H, L), "the case must split the call into chunks"
    fwd_chunks = blockwise_module.forward_chunks(N, H, L, keys, E // H)
    assert fwd_chunks == ((nb, hb, c) if forward is None else forward), fwd_chunks
    bwd_chunks = blockwise_module.backward_chunks(N, H, L, keys)
    assert bwd_chunks == ((nb, hb, c) if backward is None else backward), bwd_chunks
    assert fwd_chunks != bwd_chunks or forward is backward is None, "the two passes must take other chunks"
    # chunks of this shape divide by the softmax's sum before the second product, (P / l) @ V, whatever the CPU
    monkeypatch.setattr(blockwise_module, "NORMALISE_AFTER", True)
    monkeypatch.setattr(blockwise_module, "NORMALISED_FIRST", frozenset({(c, keys)} if normalised_first else ()))
    results = run(struct, mask_case)
    out_d, g_d = results["dense"]
    out_b, g_b = results["blockwise"]
    assert np.all(np.isfinite(np.asarray(out_b)))
    assert_close(out_b, out_d, ATOL, "blockwise output")
    # without a gradient the chunks write their outputs over the queries (OUTPUT_OVER_QUERIES): the same numbers
    assert_close(results["blockwise primal"][0], out_b, 1e-6, "blockwise output without a gradient")
    for (path, gd), (_, gb) in zip(
        jax.tree_util.tree_flatten_with_path(g_d)[0], jax.tree_util.tree_flatten_with_path(g_b)[0], strict=True
    ):
        assert_close(gb, gd, ATOL, f"blockwise {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("vmapped", [False, True])
def test_output_over_queries_matches_the_stacked_chunks(vmapped, monkeypatch):
    """Without a gradient the whole-key pass writes each chunk's output over its own queries
    (``OUTPUT_OVER_QUERIES``): the same numbers as stacking the chunks' outputs, in chunks that split
    examples, heads and queries (the last chunk padded), under a causal mask, and under ``jax.vmap``."""
    monkeypatch.setattr(blockwise_module, "DEFAULT_BLOCK_Q", None)  # the whole-key pass, as the CPU runs it
    monkeypatch.setattr(blockwise_module, "DEFAULT_BLOCK_K", None)
    for name, value in blockwise_module.CHUNK_RULES_OFF.items():
        monkeypatch.setattr(blockwise_module, name, value)
    monkeypatch.setattr(blockwise_module, "CHUNK_SCORES", 40)  # chunks of one row and 5 of 9 queries (padded)
    n, h, length, d = 2, 3, 9, 4
    assert blockwise_module.forward_chunks(n, h, length, length, d) == (1, 1, 5)
    q, k, v = _raw((n, length, h, d), (n, length, h, d), 7)
    masks = Masks(key_padding=None, attn=None, causal=True, src_len=length)
    args = (q[None].repeat(2, 0), k[None].repeat(2, 0), v[None].repeat(2, 0)) if vmapped else (q, k, v)
    outs = {}
    for over in (False, True):
        monkeypatch.setattr(blockwise_module, "OUTPUT_OVER_QUERIES", over)

        def attend(q, k, v):  # a new function for each setting: JAX keeps a function's first trace
            return blockwise_attention(q, k, v, masks)

        f = jax.vmap(attend) if vmapped else attend
        jaxpr = str(jax.make_jaxpr(f)(*args))
        assert ("dynamic_update_slice" in jaxpr) == over, "the pass must write over the queries only when told"
        outs[over] = jax.jit(f)(*args)
        if over:  # the gradient's forward keeps the queries, and agrees
            out_grad, _ = jax.vjp(f, *args)
            assert "dynamic_update_slice" not in str(jax.make_jaxpr(lambda *a, f=f: jax.vjp(f, *a)[0])(*args))
            assert_close(out_grad, outs[True], 1e-6, "the gradient's forward")
    assert_close(outs[True], outs[False], 1e-6, "output over the queries")


def _loops(jaxpr) -> bool:
    """The program loops (``lax.fori_loop`` traces as ``scan`` with static bounds, else ``while``)."""
    return any(f" {name}[" in str(jaxpr) for name in ("scan", "while"))


# Weights returned in blocks of 4 of the 9 queries (the last block starts at 5 and rewrites query 5 to 7 alike):
# every mask on the richest structure, and the common ones on the rest; averaged over heads or not.
DENSE_BLOCK_CASES = [("kv-biaskv-zeroattn", m) for m in MASKS] + [
    (s, m) for s in ("self", "cross-zeroattn") for m in ("none", "causal_kpm", "all_masked")
]


@pytest.mark.cross_product
@pytest.mark.parametrize("average", [True, False], ids=["averaged", "per-head"])
@pytest.mark.parametrize(("struct", "mask_case"), DENSE_BLOCK_CASES, ids=[f"{s}-{m}" for s, m in DENSE_BLOCK_CASES])
def test_dense_weights_in_blocks_match_one_block(struct, mask_case, average, monkeypatch):
    """``need_weights=True`` on the CPU past ``DENSE_CHUNK_SCORES`` computes the weights a block of queries at a
    time: the outputs, the weights and every gradient (of a loss of both) are those of one block."""
    inputs, cfg = make_inputs(struct, mask_case)
    monkeypatch.setattr(attention_module, "DENSE_CHUNK_MIN_Q", 4)
    f = hk.transform(
        lambda q, k, v: nxhk.MultiheadAttention(E, H, **cfg)(
            q,
            k,
            v,
            key_padding_mask=None if inputs["kpm"] is None else jnp.asarray(inputs["kpm"]),
            attn_mask=None if inputs["attn"] is None else jnp.asarray(inputs["attn"]),
            is_causal=inputs["causal"],
            average_attn_weights=average,
        )
    )
    q, k, v = (jnp.asarray(inputs[n]) for n in "qkv")
    params = f.init(jax.random.PRNGKey(0), q, k, v)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
    r = jnp.asarray(np.random.default_rng(3).normal(size=(N, L, E)).astype(np.float32))

    def loss(params, q, k, v):  # of the output and the weights, each weighed by its own numbers
        if inputs["self_attn"]:
            k = v = q
        out, weights = f.apply(params, None, q, k, v)
        r_w = jnp.sin(jnp.arange(weights.size, dtype=weights.dtype)).reshape(weights.shape)
        return jnp.sum(out * r) + jnp.sum(weights * r_w), (out, weights)

    results = {}
    for budget in (2**40, 20):  # one block; blocks of 4 queries (DENSE_CHUNK_MIN_Q)
        monkeypatch.setattr(attention_module, "DENSE_CHUNK_SCORES", budget)
        grad = jax.value_and_grad(lambda *a: loss(*a), argnums=(0, 1, 2, 3), has_aux=True)  # a new trace each time
        assert _loops(jax.make_jaxpr(grad)(params, q, k, v)) == (budget == 20), "blocks only past DENSE_CHUNK_SCORES"
        (_, (out, weights)), grads = jax.jit(grad)(params, q, k, v)
        results[budget] = out, weights, grads
    (out_1, w_1, g_1), (out_b, w_b, g_b) = results[2**40], results[20]
    assert w_b.shape == ((N, L, w_1.shape[-1]) if average else (N, H, L, w_1.shape[-1]))
    assert_close(out_b, out_1, 1e-6, "output")
    assert_close(w_b, w_1, 1e-6, "weights")
    for (path, g1), (_, gb) in zip(
        jax.tree_util.tree_flatten_with_path(g_1)[0], jax.tree_util.tree_flatten_with_path(g_b)[0], strict=True
    ):
        assert_close(gb, g1, 1e-5, f"gradient {jax.tree_util.keystr(path)}")


def test_dense_weights_in_blocks_under_vmap(monkeypatch):
    """The Equinox layer under ``jax.vmap`` counts the mapped examples in its blocks' scores, and agrees with
    one block."""
    monkeypatch.setattr(attention_module, "DENSE_CHUNK_MIN_Q", 4)
    mha = MultiheadAttention(E, H, key=jax.random.PRNGKey(0), inference=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (N, L, E))
    results = {}
    for budget in (2**40, H * L * L):  # one example's scores: two examples make blocks of 4 queries
        monkeypatch.setattr(attention_module, "DENSE_CHUNK_SCORES", budget)

        def call(x):  # a new function for each setting: JAX keeps a function's first trace
            return jax.vmap(lambda xi: mha(xi, xi, xi, is_causal=True, attn_mask=jnp.triu(jnp.ones((L, L), bool), 1)))(
                x
            )

        assert _loops(jax.make_jaxpr(call)(x)) == (budget != 2**40)
        results[budget] = jax.jit(call)(x)
    assert_close(results[H * L * L][0], results[2**40][0], 1e-6, "output")
    assert_close(results[H * L * L][1], results[2**40][1], 1e-6, "weights")


def _raw(shape_q, shape_kv, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(ks[0], shape_q),
        jax.random.normal(ks[1], shape_kv),
        jax.random.normal(ks[2], shape_kv),
    )


@pytest.mark.parametrize("which", ["attn", "key_padding"])
def test_blockwise_gradient_of_float_masks(which):
    """A learned additive mask gets the dense path's gradient from the blockwise VJP."""
    q, k, v = _raw((N, L, H, 4), (N, S, H, 4), 0)
    shape = (H, L, S) if which == "attn" else (N, S)
    mask = jax.random.normal(jax.random.PRNGKey(5), shape)

    def loss(mask, path):
        masks = Masks(
            key_padding=mask if which == "key_padding" else None,
            attn=mask if which == "attn" else None,
            causal=True,
            src_len=S,
        )
        if path == "dense":
            out = dense_attention(q, k, v, masks, dropout_p=0.0, dropout_key=None, need_weights=False)[0]
        else:
            out = blockwise_attention(q, k, v, masks)
        return jnp.sum(jnp.sin(out))

    assert_close(jax.grad(loss)(mask, "blockwise"), jax.grad(loss)(mask, "dense"), ATOL, which)


def test_blockwise_dropout_single_block_matches_hand_computation():
    """One block: the kernel's keep mask is reproducible, so the result is checked exactly."""
    q, k, v = _raw((N, L, H, 4), (N, S, H, 4), 1)
    masks = canonical_masks(
        key_padding_mask=None,
        attn_mask=None,
        is_causal=True,
        batch_shape=(N,),
        num_heads=H,
        tgt_len=L,
        src_len=S,
        extra=0,
        dtype=jnp.float32,
    )
    key, p = jax.random.PRNGKey(7), 0.4
    out = blockwise_attention(q, k, v, masks, dropout_p=p, dropout_key=key, block_q=L, block_k=S)
    scores = jnp.einsum("nlhd,nshd->nhls", q, k) + lift(masks.dense(L, S, jnp.float32), 4)
    w = jax.nn.softmax(scores, axis=-1)
    keep = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, 0), 0), 1.0 - p, (N, H, L, S))
    w = jnp.where(keep, w / (1.0 - p), 0.0)
    assert_close(out, jnp.einsum("nhls,nshd->nlhd", w, v), ATOL, "dropout output")


def test_blockwise_dropout_gradients(x64):
    """The recomputed backward regenerates the forward's dropout pattern (numerical check)."""
    q, k, v = (x.astype(jnp.float64) for x in _raw((1, 6, 2, 3), (1, 5, 2, 3), 2))
    masks = canonical_masks(
        key_padding_mask=jnp.array([[False, True, False, False, False]]),
        attn_mask=None,
        is_causal=False,
        batch_shape=(1,),
        num_heads=2,
        tgt_len=6,
        src_len=5,
        extra=0,
        dtype=jnp.float64,
    )
    key = jax.random.PRNGKey(3)

    def f(q, k, v):
        return blockwise_attention(q, k, v, masks, dropout_p=0.3, dropout_key=key, block_q=4, block_k=2)

    check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
    assert not np.allclose(f(q, k, v), blockwise_attention(q, k, v, masks, block_q=4, block_k=2))


def test_equinox_layer_paths_agree_under_vmap_and_jit():
    mha = MultiheadAttention(E, H, add_zero_attn=True, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (N, L, E))

    @eqx_jit
    def call(m, x, impl):
        return jax.vmap(lambda xi: m(xi, xi, xi, need_weights=False, is_causal=True, implementation=impl)[0])(x)

    dense = call(mha, x, "dense")
    for impl in ("blockwise", "fused", "auto"):
        assert_close(call(mha, x, impl), dense, ATOL, impl)


def eqx_jit(f):
    import equinox as eqx

    return eqx.filter_jit(f)


def test_float64_blockwise_runs_in_float64(x64):
    q, k, v = (x.astype(jnp.float64) for x in _raw((L, H, 4), (S, H, 4), 4))
    masks = Masks(key_padding=None, attn=None, causal=False, src_len=S)
    out = blockwise_attention(q, k, v, masks)
    dense = dense_attention(q, k, v, masks, dropout_p=0.0, dropout_key=None, need_weights=False)[0]
    assert out.dtype == jnp.float64
    assert_close(out, dense, 1e-12, "float64")


# The selection rule --------------------------------------------------------------------------


def select(impl="auto", **kw):
    args = {
        "need_weights": False,
        "dropout_p": 0.0,
        "batch": 1,
        "num_heads": 8,
        "tgt_len": 512,
        "src_len": 512,
        "dtype": jnp.float32,
        "backend": "cpu",
    }
    args.update(kw)
    return select_implementation(impl, **args)


def test_auto_picks_blockwise_for_large_score_matrices():
    big = int(np.sqrt(LARGE_SCORES // 8)) + 1
    for backend in ("cpu", "gpu", "tpu"):
        assert select(tgt_len=big, src_len=big, backend=backend) == "blockwise"
        # ... training included (blockwise dropout), where dense would hold the scores.
        assert select(tgt_len=big, src_len=big, backend=backend, dropout_p=0.1) == "blockwise"
    # A GPU in float32 at B=64, L=2048, H=8: 2.1e9 scores (the batch counts, vmap axes included).
    assert select(batch=64, tgt_len=2048, src_len=2048, backend="gpu") == "blockwise"
    # The fused path (XLA's composition unless cuDNN is named) holds the scores: half precision too.
    assert select(tgt_len=big, src_len=big, backend="gpu", dtype=jnp.bfloat16) == "blockwise"


def test_auto_small_and_medium():
    # CPU: blockwise measured fastest from CPU_BLOCKWISE_MIN_SCORES; dense below it.
    assert select(num_heads=1, tgt_len=10, src_len=10) == "dense"
    side = int(np.sqrt(CPU_BLOCKWISE_MIN_SCORES // 8)) + 1
    assert select(tgt_len=side, src_len=side) == "blockwise"
    assert select(tgt_len=side, src_len=side, dropout_p=0.1) == "dense"
    # GPU/TPU: the fused kernel.
    assert select(backend="gpu") == "fused"
    assert select(backend="tpu") == "fused"
    assert select(tgt_len=2048, src_len=2048, backend="gpu", dtype=jnp.bfloat16) == "fused"
    # float64 never goes fused: its softmax would run in float32.
    for backend in ("gpu", "tpu"):
        assert select(tgt_len=2048, src_len=2048, backend=backend, dtype=jnp.float64) == "dense"
    assert select(backend="gpu", dropout_p=0.1) == "dense"
    # Weights are only materialised by the dense path.
    for backend in ("cpu", "gpu"):
        assert select(need_weights=True, backend=backend, tgt_len=10**5, src_len=10**5) == "dense"
    for impl in ("dense", "fused", "blockwise"):
        assert select(impl, tgt_len=10**5, src_len=10**5) == impl


@pytest.mark.parametrize("impl", ["fused", "blockwise"])
def test_forced_path_with_need_weights_raises(impl):
    with pytest.raises(ValueError, match=r"implementation=.*need_weights=False"):
        select(impl, need_weights=True)
    mha = MultiheadAttention(E, H, key=jax.random.PRNGKey(0))
    x = jnp.ones((L, E))
    with pytest.raises(ValueError, match="need_weights=False"):
        mha(x, x, x, implementation=impl)


def test_fused_with_dropout_raises():
    with pytest.raises(ValueError, match="implementation='fused' has no dropout"):
        select("fused", dropout_p=0.1)


@pytest.mark.own_errors
@pytest.mark.parametrize("bad", ["flash", "", None, 3, "Dense"])
def test_bad_implementation_raises(bad):
    with pytest.raises(
        ValueError,
        match=r"`implementation` must be one of 'auto', 'dense', 'fused', 'blockwise'",
    ):
        select(bad)
    mha = MultiheadAttention(E, H, key=jax.random.PRNGKey(0))
    x = jnp.ones((L, E))
    with pytest.raises(ValueError, match="`implementation`"):
        mha(x, x, x, need_weights=False, implementation=bad)
    f = hk.transform(lambda x: nxhk.MultiheadAttention(E, H)(x, x, x, implementation=bad))
    with pytest.raises(ValueError, match="`implementation`"):
        f.init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("axis", [-1, -3])
def test_linear_weight_first_and_input_first_agree(monkeypatch, dtype, axis):
    """On the CPU, products of fewer than ``CPU_WEIGHT_FIRST_ROWS`` rows (vmapped rows counted) run as
    ``W @ x.T``: both forms give torch's linear, values and gradients, against float64 NumPy, over the
    last axis (``Linear``) and over the channels of a ``(C, H, W)`` map (``PointwiseConv2d``)."""
    rng = np.random.default_rng(0)
    # (2, 5, 12) features last, or (2, 12, 5, 1) channels first: 2 x 5 rows of 12 features either way
    shape = (2, 5, 12) if axis == -1 else (2, 12, 5, 1)
    arrays = rng.normal(size=shape), rng.normal(size=(7, 12)) / 4, rng.normal(size=7)
    x, w, b = (jnp.asarray(a, dtype) for a in arrays)
    x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, b))
    last = (lambda a: a) if axis == -1 else (lambda a: np.moveaxis(a, 1, -1)[..., 0, :])  # rows last: (2, 5, .)
    r = rng.normal(size=(2, 5, 7))
    r_out = r if axis == -1 else np.moveaxis(r, -1, 1)[..., None]

    tol = 1e-5 if dtype == "float32" else 3e-2
    programs = {}
    for rows in (0, 256):  # 0: every product input first; 256: these 2 x 5 rows weight first
        monkeypatch.setattr(attention_module, "CPU_WEIGHT_FIRST_ROWS", rows)

        def loss(x, w):  # a new function for each value: JAX caches a function's trace
            y = jax.vmap(lambda xi: attention_module._linear(xi, w, b, axis=axis))(x)
            return (y.astype(jnp.float32) * r_out).sum(), y

        programs[rows] = str(jax.make_jaxpr(loss)(x, w))
        (_, y), (gx, gw) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
        assert y.shape == r_out.shape
        assert_close(
            last(np.asarray(y, np.float64)), last(x64) @ w64.T + b64, atol=tol, rtol=tol, name=f"value, rows={rows}"
        )
        assert_close(last(np.asarray(gx, np.float64)), r @ w64, atol=tol, rtol=tol, name=f"grad x, rows={rows}")
        gw64 = np.einsum("blo,bli->oi", r, last(x64))
        assert_close(gw, gw64, atol=tol * 10, rtol=tol, name=f"grad w, rows={rows}")
    if jax.default_backend() == "cpu":
        assert programs[0] != programs[256]  # the rule took the other form


def test_self_attention_in_projection_packed_and_split_agree(monkeypatch):
    """Self-attention projects with one ``(3E, E)`` product below ``CPU_PACKED_ROWS`` rows on the CPU or when
    ``in_proj_weight`` has ``PACKED_WEIGHT_BYTES`` bytes, and with three ``(E, E)`` products otherwise
    (``_packed_in_projection``): the same values and gradients, ``in_proj_weight``'s and ``in_proj_bias``'s included."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N, L, E)).astype(np.float32))
    r = jnp.asarray(rng.normal(size=(N, L, E)).astype(np.float32))
    f = hk.transform(lambda x: nxhk.MultiheadAttention(E, H, batch_first=True)(x, x, x, need_weights=False)[0])
    params = f.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
    results, programs = {}, {}
    # (weight-first rows, packed rows, packed weight bytes): every product input first, so three of them; these
    # N x L rows weight first and packed; weight first, three products; input first, packed for its weight's bytes.
    settings = ((0, 256, 2**40), (256, 256, 2**40), (256, 0, 2**40), (0, 0, 0))
    for setting in settings:
        for name, value in zip(
            ("CPU_WEIGHT_FIRST_ROWS", "CPU_PACKED_ROWS", "PACKED_WEIGHT_BYTES"), setting, strict=True
        ):
            monkeypatch.setattr(attention_module, name, value)

        def loss(params, x):  # a new function for each value: JAX caches a function's trace
            return jnp.sum(f.apply(params, None, x) * r)

        programs[setting] = str(jax.make_jaxpr(loss)(params, x))
        results[setting] = jax.value_and_grad(loss, (0, 1))(params, x)
    v0, g0 = results[settings[1]]
    for setting in (settings[0], *settings[2:]):
        v1, g1 = results[setting]
        assert_close(v1, v0, 1e-4, f"loss, {setting}")
        for (path, a), (_, b) in zip(
            jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree_util.tree_flatten_with_path(g0)[0], strict=True
        ):
            assert_close(a, b, ATOL, f"{setting} {jax.tree_util.keystr(path)}")
    if jax.default_backend() == "cpu":  # three products, not one, unless the weight's bytes ask for one
        dots = {setting: programs[setting].count("dot_general") for setting in settings}
        assert dots[settings[0]] == dots[settings[2]] == dots[settings[1]] + 2 == dots[settings[3]] + 2


def _operations(jaxpr) -> list[tuple[str, tuple[str, ...]]]:
    """Every operation of ``jaxpr`` and of the programs inside it, as (primitive, output types), sorted: a
    program's content without its printed form (which names functions by address on some JAX versions)."""
    found = []
    for eqn in jaxpr.eqns:
        found.append((eqn.primitive.name, tuple(str(v.aval) for v in eqn.outvars)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a closed program's own
                if hasattr(sub, "eqns"):
                    found += _operations(sub)
    return sorted(found)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("masks", ["none", "causal", "key_padding"])
@pytest.mark.parametrize("scale", [0.25, 1.0, 3.0, -0.5])
def test_key_loop_row_maximum_before_the_scale_is_bit_for_bit(monkeypatch, dtype, masks, scale):
    """The key loop's forward takes each block's row maximum before the scale where that is the same number
    (``MAX_BEFORE_SCALE``: no additive mask, a positive scale; hidden keys and padded blocks included): its
    output, and the gradients through it, equal those with the maximum taken after the scale, bit for bit."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(N, n, H, 4)) * 3, dtype) for n in (L, S, S))
    kp = jnp.asarray(np.where(rng.random((N, S)) < 0.3, -np.inf, 0.0)) if masks == "key_padding" else None
    m = Masks(kp, None, masks == "causal", S)
    results, programs = {}, {}
    for before in (False, True):
        monkeypatch.setattr(blockwise_module, "MAX_BEFORE_SCALE", before)

        def f(q, k, v):  # a new function for each value: JAX caches a function's trace
            return blockwise_attention(q, k, v, m, block_q=4, block_k=3, scale=scale)  # 3 x 3 blocks, padded

        programs[before] = _operations(jax.make_jaxpr(f)(q, k, v).jaxpr)
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        results[before] = (out, *vjp(jnp.ones_like(out)))
    for a, b in zip(results[False], results[True], strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # the rule moves the maximum exactly where no additive mask is added and the scale is positive (a scale
    # of 1 is no multiply, so there the two programs are one)
    assert (programs[False] != programs[True]) == (masks != "key_padding" and scale > 0 and scale != 1.0)


def test_the_cpu_facts_the_rules_are_keyed_on(tmp_path):
    info = tmp_path / "cpuinfo"
    flags = "fpu vme sse2 avx2 avx512f avx512dq avx512bw"
    info.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert blockwise_module.cpu_info("vendor_id", str(info)) == "AuthenticAMD"
    assert blockwise_module.has_avx512(str(info))
    info.write_text("vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512_vnni_like\n")
    assert not blockwise_module.has_avx512(str(info))  # the foundation flag itself, not a name that contains it
    assert not blockwise_module.has_avx512(str(tmp_path / "missing"))
    # the forward's rules follow this CPU's AVX-512, the backward's budget its vendor, its one chunk both
    assert blockwise_module.AVX512 == blockwise_module.has_avx512()
    assert blockwise_module.INTEL == (blockwise_module.cpu_vendor() == "GenuineIntel")
    for name, off in blockwise_module.AVX512_RULES_OFF.items():
        assert (getattr(blockwise_module, name) == off) is not blockwise_module.AVX512, name
    one_chunk_vjp = 2**21 if blockwise_module.INTEL else 2**20 if blockwise_module.AVX512 else 0
    assert blockwise_module.ONE_CHUNK_SCORES_VJP == one_chunk_vjp
    assert blockwise_module.CHUNK_SCORES_VJP == (2**20 if blockwise_module.INTEL else 2**19)


# the values with AVX-512 (the forward's rules, and the backward's one chunk of 2**20 scores) and on Intel CPUs (the
# backward's one chunk of 2**21), and with neither (the rules off)
AVX512_CHUNK_RULES = {"LONG_ROW_CHUNK_Q": 1024, "NARROW_CHUNK_SCORES": 2**20, "ONE_CHUNK_SCORES": 2**22}
AVX512_CHUNK_RULES |= {"ALL_ROWS_QUERIES": 4096, "ONE_CHUNK_SCORES_VJP": 2**20}
INTEL_CHUNK_RULES = {"ONE_CHUNK_SCORES_VJP": 2**21}
OTHER_CHUNK_RULES = blockwise_module.CHUNK_RULES_OFF
# a new rule is pinned both on and off
assert (AVX512_CHUNK_RULES | INTEL_CHUNK_RULES).keys() == OTHER_CHUNK_RULES.keys()
assert AVX512_CHUNK_RULES.keys() - {"ONE_CHUNK_SCORES_VJP"} < blockwise_module.AVX512_RULES_OFF.keys()


@pytest.mark.parametrize("avx512", [False, True])
@pytest.mark.parametrize("intel", [False, True])
def test_forward_and_backward_chunks(monkeypatch, avx512, intel):
    """The whole-key passes' chunks with the forward's rules on (a CPU with AVX-512) or off, and the backward's one
    chunk for an Intel CPU, for AVX-512 or off, in each of the four combinations; off, a pass's chunks are
    ``whole_key_chunks``'s (forward with ``CHUNK_SCORES``, backward with ``CHUNK_SCORES_VJP``)."""
    rules = OTHER_CHUNK_RULES | (AVX512_CHUNK_RULES if avx512 else {}) | (INTEL_CHUNK_RULES if intel else {})
    for name, value in rules.items():
        monkeypatch.setattr(blockwise_module, name, value)
    monkeypatch.setattr(blockwise_module, "CHUNK_SCORES", 2**21)
    monkeypatch.setattr(blockwise_module, "CHUNK_SCORES_VJP", 2**19)
    monkeypatch.setattr(blockwise_module, "LONG_ROW_MAX_SCORES", 0 if intel else 2**21)  # the long rows' limit
    forward, backward = blockwise_module.forward_chunks, blockwise_module.backward_chunks
    whole_key_chunks = blockwise_module.whole_key_chunks
    shapes = [(1, 8, 2048, 2048, 32), (1, 8, 8192, 8192, 32), (2, 8, 300, 2048, 32), (1, 8, 1024, 1024, 32)]
    shapes += [(1, 8, 4096, 4096, 32), (1, 8, 3000, 3000, 64)]
    shapes += [(1, 8, 1024, 1024, 64), (8, 8, 64, 768, 32), (8, 8, 256, 256, 32), (8, 16, 128, 128, 64)]
    shapes += [(8, 16, 256, 256, 64), (1, 16, 512, 512, 64), (8, 8, 512, 512, 64), (8, 8, 512, 512, 32)]
    shapes += [(4, 8, 512, 512, 64), (4, 16, 384, 384, 64), (8, 8, 768, 768, 64), (8, 8, 256, 512, 64)]
    shapes += [(4, 8, 512, 512, 32), (8, 8, 400, 400, 64), (64, 16, 512, 512, 64), (8, 8, 512, 512, 128)]
    shapes += [(8, 8, 128, 128, 64)]
    got = {s: (forward(*s), backward(*s[:4])) for s in shapes}
    off = {s: (whole_key_chunks(*s[:4]), whole_key_chunks(*s[:4], 2**19)) for s in shapes}
    if not avx512:
        assert {s: g[0] for s, g in got.items()} == {s: o[0] for s, o in off.items()}
    if not (intel or avx512):
        assert {s: g[1] for s, g in got.items()} == {s: o[1] for s, o in off.items()}
    if intel or avx512:
        assert off[8, 8, 128, 128, 64][1] == (4, 8, 128)  # 2**19 scores a chunk
        assert got[8, 8, 128, 128, 64][1] == (8, 8, 128)  # the backward: one chunk up to 2**20 scores
        one_chunk = (8, 16, 128) if intel else off[8, 16, 128, 128, 64][1]
        assert got[8, 16, 128, 128, 64][1] == one_chunk  # and up to 2**21 on Intel CPUs
    if intel:
        assert got[8, 16, 256, 256, 64][1] == whole_key_chunks(8, 16, 256, 256, 2**19)
        assert got[1, 8, 2048, 2048, 32][1] == whole_key_chunks(1, 8, 2048, 2048, 2**19)  # the backward's long chunks
    if not avx512:
        return
    assert got[1, 8, 2048, 2048, 32][0] == (1, 1, 1024)  # past FUSED_KEYS_MAX: one row of 1024 queries
    # off Intel, at most LONG_ROW_MAX_SCORES scores a row: fewer queries from 2049 keys (at least LONG_CHUNK_Q)
    assert got[1, 8, 8192, 8192, 32][0] == ((1, 1, 1024) if intel else (1, 1, 256))
    assert got[1, 8, 4096, 4096, 32][0] == ((1, 1, 1024) if intel else (1, 1, 512))
    assert got[1, 8, 3000, 3000, 64][0] == ((1, 1, 1000) if intel else (1, 1, 600))  # 2**21 // 3000 = 699: 5 x 600
    assert got[2, 8, 300, 2048, 32][0] == (1, 2, 300)  # fewer queries: as many rows as CHUNK_SCORES holds
    assert got[1, 8, 1024, 1024, 32][0] == (1, 1, 1024)  # narrow heads: one row
    assert got[1, 8, 1024, 1024, 64][0] == (1, 2, 1024)  # wider heads: CHUNK_SCORES
    assert got[8, 8, 64, 768, 32][0] == (8, 8, 64)  # few queries: not the narrow rule, but one chunk
    assert got[8, 8, 256, 256, 32][0] == (8, 8, 256)  # a small call is one chunk
    assert got[8, 16, 256, 256, 64][0] == whole_key_chunks(8, 16, 256, 256)  # 2**23 scores: too many for one
    assert got[1, 16, 512, 512, 64][0] == (1, 8, 512)  # 512 queries: not one chunk; 16 rows: not every row
    assert got[8, 8, 512, 512, 64][0] == (8, 8, 64)  # 257 to 512 keys: every row, 64 queries at 512 keys x D=64
    assert got[8, 8, 512, 512, 32][0] == (8, 8, 128)  # and 128 below
    assert got[4, 16, 384, 384, 64][0] == (4, 16, 128)
    assert got[4, 8, 512, 512, 64][0] == whole_key_chunks(4, 8, 512, 512)  # 32 x 64 queries: too few for every row
    assert got[8, 8, 768, 768, 64][0] == whole_key_chunks(8, 8, 768, 768)  # past 512 keys
    assert got[8, 8, 256, 512, 64][0] == whole_key_chunks(8, 8, 256, 512)  # fewer queries than keys
    assert got[4, 8, 512, 512, 32][0] == (4, 8, 128)  # exactly ALL_ROWS_QUERIES
    assert got[8, 8, 400, 400, 64][0] == (8, 8, 100)  # 4 equal chunks of queries, none padded
    assert got[64, 16, 512, 512, 64][0] == (8, 16, 64)  # at most ALL_ROWS_MAX_SCORES: 8 of 64 examples
    assert got[8, 8, 512, 512, 128][0] == whole_key_chunks(8, 8, 512, 512)  # head wider than ALL_ROWS_MAX_HEAD
