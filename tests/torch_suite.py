"""torch's own MultiheadAttention test cases, re-expressed for noxton (shared by the suite tests).

- ``opinfo_samples``: the samples of the OpInfo for ``F.multi_head_attention_forward``
  (``sample_inputs_multi_head_attention_forward`` in torch's
  ``common_methods_invocations``; that module cannot be imported here, it needs
  ``expecttest``), regenerated with the same grid and the same value range as
  ``make_tensor`` (uniform in ``[-9, 9)``). The dropout samples run with dropout
  off, as they would in eval mode.
- ``get_tolerances``: the tolerances of torch's ``test/test_transformers.py``: the
  low-precision torch result's own deviation from a float64 evaluation, floored at
  torch's default tolerances for that dtype.
- ``runner``: one jitted program per shape structure that runs a sample on every
  path that can run it, through both front ends (the Haiku module on the batched
  inputs and the Equinox layer under ``jax.vmap``) or one of them.
"""

from __future__ import annotations

import functools
import itertools

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from helpers import torch

import noxton.haiku as nxhk
from noxton.haiku import state_dict_to_params
from noxton.nn import MultiheadAttention

XS, S = 3, 5  # torch.testing._internal.opinfo.core
BSZ = 2

DEFAULT_ATOL = {"float16": 1e-3, "bfloat16": 1e-3, "float32": 1e-5}
DEFAULT_RTOL = {"float16": 1e-3, "bfloat16": 1.6e-2, "float32": 1.3e-6}

#: (implementation, need_weights) pairs: every path, with weights on the one that returns them
#: (dense with need_weights=False runs the same code, less the weights' return).
PATHS = (("dense", True), ("blockwise", False), ("fused", False))
FRONTS = ("haiku", "equinox")


def paths_for(dtype: str):
    """The paths that can run a ``dtype`` sample (fused refuses float64: its softmax is float32)."""
    return tuple(p for p in PATHS if not (dtype == "float64" and p[0] == "fused"))


def torch_dtype(dtype: str):
    return getattr(torch, dtype)


def opinfo_samples(seed: int = 0, group=None):
    """The dropout-free OpInfo samples as dicts of float64 NumPy arrays (the low dtypes round them).

    ``group``: only the samples with this ``(batched, mask_type)`` (16 of the 96, 8 shape structures).
    """
    grid = itertools.product((False, True), (False, True), (None, "2d", "3d"), (2, 4), (XS,), (XS, S), (1, 2))
    for index, (batched, separate, mask_type, emb, src_len, tgt_len, heads) in enumerate(grid):
        if group is not None and (batched, mask_type) != tuple(group):
            continue
        rng = np.random.default_rng([seed, index])

        def make(*shape, rng=rng):
            return rng.uniform(-9.0, 9.0, size=shape)

        attn_mask = None
        if mask_type == "2d":
            attn_mask = make(src_len, tgt_len)
        elif mask_type == "3d":
            attn_mask = make((BSZ if batched else 1) * heads, src_len, tgt_len)
        lead = (BSZ,) if batched else ()
        # torch's layout is (L, N, E); noxton's is (N, L, E): the same numbers, transposed.
        q, k, v = make(*lead, src_len, emb), make(*lead, tgt_len, emb), make(*lead, tgt_len, emb)
        if separate:
            in_proj = {
                "q_proj_weight": make(emb, emb),
                "k_proj_weight": make(emb, emb),
                "v_proj_weight": make(emb, emb),
            }
        else:
            in_proj = {"in_proj_weight": make(3 * emb, emb)}
        params = dict(
            in_proj,
            bias_k=make(emb),
            bias_v=make(emb),
            in_proj_bias=make(3 * emb),
            out_proj_weight=make(emb, emb),
            out_proj_bias=make(emb),
        )
        yield dict(
            id=f"{'b' if batched else 'u'}-{'sep' if separate else 'packed'}-{mask_type}"
            f"-E{emb}-L{src_len}-S{tgt_len}-H{heads}",
            batched=batched,
            separate=separate,
            emb=emb,
            heads=heads,
            q=q,
            k=k,
            v=v,
            attn_mask=attn_mask,
            params=params,
        )


def _rounded(x, dtype: str):
    """``x`` rounded to ``dtype`` and back to float64: what every side of a comparison sees."""
    return torch.tensor(x).to(torch_dtype(dtype)).to(torch.float64).numpy()


def rounded_sample(sample, dtype: str):
    out = dict(sample)
    for name in ("q", "k", "v", "attn_mask"):
        if sample[name] is not None:
            out[name] = _rounded(sample[name], dtype)
    out["params"] = {n: _rounded(p, dtype) for n, p in sample["params"].items()}
    return out


def torch_forward(sample, dtype: str, need_weights: bool):
    """``F.multi_head_attention_forward`` in ``dtype`` on the sample (rounded to ``dtype`` first)."""
    td = torch_dtype(dtype)
    p = {n: torch.tensor(a, dtype=td) for n, a in sample["params"].items()}

    def seq_first(x):
        t = torch.tensor(x, dtype=td)
        return t.transpose(0, 1) if sample["batched"] else t

    separate = sample["separate"]
    out, w = torch.nn.functional.multi_head_attention_forward(
        seq_first(sample["q"]),
        seq_first(sample["k"]),
        seq_first(sample["v"]),
        sample["emb"],
        sample["heads"],
        None if separate else p["in_proj_weight"],
        p["in_proj_bias"],
        p["bias_k"],
        p["bias_v"],
        False,
        0.0,
        p["out_proj_weight"],
        p["out_proj_bias"],
        training=False,
        need_weights=need_weights,
        attn_mask=None if sample["attn_mask"] is None else torch.tensor(sample["attn_mask"], dtype=td),
        use_separate_proj_weight=separate,
        q_proj_weight=p.get("q_proj_weight"),
        k_proj_weight=p.get("k_proj_weight"),
        v_proj_weight=p.get("v_proj_weight"),
    )
    out = out.transpose(0, 1) if sample["batched"] else out
    return out.to(torch.float64).numpy(), None if w is None else w.to(torch.float64).numpy()


def state_dict(sample):
    """The sample's weights as a torch ``MultiheadAttention`` ``state_dict``.

    With ``kdim == vdim == embed_dim`` torch's module (and noxton's, which follows it)
    holds one packed ``in_proj_weight``; the separate-weights samples stack theirs
    into it: the same three projections, row blocks of one matrix.
    """
    p = sample["params"]
    if sample["separate"]:
        w = np.concatenate([p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]], axis=0)
    else:
        w = p["in_proj_weight"]
    emb = sample["emb"]
    return {
        "in_proj_weight": w,
        "in_proj_bias": p["in_proj_bias"],
        "bias_k": p["bias_k"].reshape(1, 1, emb),
        "bias_v": p["bias_v"].reshape(1, 1, emb),
        "out_proj.weight": p["out_proj_weight"],
        "out_proj.bias": p["out_proj_bias"],
    }


def noxton_mask(sample):
    """torch's ``(N * H, L, S)`` mask as noxton's ``(N, H, L, S)`` (``(H, L, S)`` unbatched)."""
    m = sample["attn_mask"]
    if m is None or m.ndim == 2:
        return m
    return m.reshape(BSZ, sample["heads"], *m.shape[1:]) if sample["batched"] else m


@functools.cache
def runner(
    emb: int,
    heads: int,
    dtype: str,
    batched: bool,
    paths: tuple,
    options: tuple = (),
    call: tuple = (),
    fronts: tuple = FRONTS,
):
    """``(transformed, run)``: ``run(haiku_params, layer, q, k, v, kpm, mask)`` gives
    ``{(front end, path, need_weights): (out, weights)}``.

    One jitted program per structure (sizes, dtype, batching, module ``options``,
    call options ``call``, and the shapes of what is passed), shared by every sample
    of that structure: every path and the front ends in ``fronts`` are compiled
    together. The Haiku module takes the batched inputs; the Equinox layer runs under
    ``jax.vmap`` when ``batched`` (a ``(N, H, L, S)`` mask is mapped, an ``(L, S)`` or
    ``(H, L, S)`` one is shared). ``k is None`` means self-attention: ``k = v = q``.
    """
    dt = jnp.dtype(dtype)
    opts, kw = dict(options), dict(call)
    f = hk.transform(
        lambda q, k, v, kpm, m, impl, nw: nxhk.MultiheadAttention(emb, heads, dtype=dt, **opts)(
            q, k, v, key_padding_mask=kpm, attn_mask=m, need_weights=nw, inference=True, implementation=impl, **kw
        )
    )

    @eqx.filter_jit
    def run(hk_params, layer, q, k, v, kpm, m):
        results = {}
        for impl, nw in paths:

            def one(q, k, v, kpm, m, impl=impl, nw=nw):
                if k is None:
                    k = v = q
                return layer(q, k, v, key_padding_mask=kpm, attn_mask=m, need_weights=nw, implementation=impl, **kw)

            kk, vv = (q, q) if k is None else (k, v)
            if "haiku" in fronts:
                results["haiku", impl, nw] = f.apply(hk_params, None, q, kk, vv, kpm, m, impl, nw)
            if "equinox" not in fronts:
                continue
            if batched:
                m_axis = 0 if m is not None and m.ndim == 4 else None
                in_axes = (0, None if k is None else 0, None if v is None else 0, None if kpm is None else 0, m_axis)
                results["equinox", impl, nw] = jax.vmap(one, in_axes=in_axes)(q, k, v, kpm, m)
            else:
                results["equinox", impl, nw] = one(q, k, v, kpm, m)
        return results

    return f, run


def _spec(x):
    return None if x is None else (tuple(x.shape), str(x.dtype))


@functools.cache
def _templates(f, emb, heads, dtype, options, q, k, v, kpm, m):
    """A Haiku params template and an Equinox layer for one structure (built once, loaded per sample)."""

    def arg(spec):
        return None if spec is None else jax.ShapeDtypeStruct(spec[0], spec[1])

    q, k, v, kpm, m = (arg(x) for x in (q, k, v, kpm, m))
    kk, vv = (q, q) if k is None else (k, v)
    template = jax.eval_shape(lambda *a: f.init(*a, "dense", True), jax.random.PRNGKey(0), q, kk, vv, kpm, m)
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    layer = MultiheadAttention(emb, heads, key=jax.random.PRNGKey(0), dtype=jnp.dtype(dtype), **dict(options))
    return template, layer


def load(f, emb, heads, dtype, sd, options, q, k, v, kpm, m):
    """Haiku params and an Equinox layer holding the torch ``state_dict`` ``sd``."""
    template, layer = _templates(f, emb, heads, dtype, tuple(options), *(_spec(x) for x in (q, k, v, kpm, m)))
    return state_dict_to_params(template, sd, "multihead_attention"), layer.load_state_dict(sd)


def to_numpy(results):
    return {
        key: (np.asarray(o, np.float64), None if w is None else np.asarray(w, np.float64))
        for key, (o, w) in results.items()
    }


def run_noxton(sample, dtype: str, paths):
    """Every path on an OpInfo sample in ``dtype``, through the front end whose layout the sample has:
    ``{key: (out, weights)}`` as float64 NumPy.

    A batched sample runs through the Haiku module (leading batch dimensions), an unbatched one
    through the Equinox layer (unbatched, as every ``eqx.nn`` layer), so that each sample compiles
    once, not once per front end. Both front ends run the same Haiku module (the Equinox layer
    through the adapter). The Equinox layer on batched inputs (under ``jax.vmap``) is checked
    against torch in all four dtypes on every path by ``test_multihead_attention_dtype`` and
    ``test_random_draws_with_biases_no_less_exact_than_torch``; the Haiku module on one example
    equals its batched result (``test_haiku.test_leading_batch_dims``).
    """
    emb, heads = sample["emb"], sample["heads"]
    options = (("add_bias_kv", True),)
    fronts = ("haiku",) if sample["batched"] else ("equinox",)
    f, run = runner(emb, heads, dtype, sample["batched"], tuple(paths), options, (), fronts)
    dt = jnp.dtype(dtype)
    q, k, v = (jnp.asarray(sample[n], dt) for n in "qkv")
    m = noxton_mask(sample)
    m = None if m is None else jnp.asarray(m, dt)
    hk_params, layer = load(f, emb, heads, dtype, state_dict(sample), options, q, k, v, None, m)
    return to_numpy(run(hk_params, layer, q, k, v, None, m))


def get_tolerances(true_value, computed_value, dtype: str, fudge_factor: float = 1.0):
    """``(atol, rtol)`` as torch's ``test_transformers.get_tolerances``: the deviation of
    ``computed_value`` (torch in ``dtype``) from ``true_value``, floored at torch's defaults."""
    deviation = np.abs(true_value - computed_value)
    atol = deviation.max()
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = deviation / np.abs(true_value)
    rtol = np.nan_to_num(rel, nan=DEFAULT_RTOL[dtype]).max()
    atol = fudge_factor * max(atol, DEFAULT_ATOL[dtype])
    rtol = fudge_factor * max(rtol, DEFAULT_RTOL[dtype])
    if rtol > 1e30:
        rtol = DEFAULT_RTOL[dtype]
    return atol, rtol


def within(actual, expected, atol, rtol) -> bool:
    return bool(np.all(np.abs(actual - expected) <= atol + rtol * np.abs(expected)))
