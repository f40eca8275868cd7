"""torch's Transformer layers: parity with torch 2.13 (outputs and gradients by torch name, both front ends),
from_torch, initialisation, dropout, and how a stack's program holds its layers (their errors: test_errors.py).

Every module is built by ``from_torch`` from a torch module with batch_first=True (so its
``(N, S, E)`` layout is the Haiku modules' and the Equinox layers' under ``jax.vmap``) and
with every parameter randomised. Runs are eager (no per-case jit): each primitive compiles
once for the whole file, which keeps the cross-product fast (a stack jits its layer, once per
configuration).
"""

from __future__ import annotations

import functools
import warnings

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, grid, requires_torch, torch

import noxton.functional as nxF
import noxton.haiku as nxhk
import noxton.nn as nx
from noxton.interop import torch_state_dict

pytestmark = requires_torch

E, H, FF, N, S, L = 8, 2, 16, 2, 6, 5  # d_model, heads, feed-forward, batch, source and target lengths
HAIKU_NAMES = {
    "encoder_layer": "transformer_encoder_layer",
    "decoder_layer": "transformer_decoder_layer",
    "encoder": "transformer_encoder",
    "decoder": "transformer_decoder",
    "transformer": "transformer",
}
NX = {
    "encoder_layer": (nx.TransformerEncoderLayer, nxhk.TransformerEncoderLayer),
    "decoder_layer": (nx.TransformerDecoderLayer, nxhk.TransformerDecoderLayer),
    "encoder": (nx.TransformerEncoder, nxhk.TransformerEncoder),
    "decoder": (nx.TransformerDecoder, nxhk.TransformerDecoder),
    "transformer": (nx.Transformer, nxhk.Transformer),
}

#: Mask cases: padding (right-padded keys), causal through the mask / the flag / both,
#: a whole batch element padded, and an explicit (non-causal) memory/source mask.
MASKS = {
    "none": dict(),
    "padding": dict(pad=True),
    "causal_mask": dict(causal="mask"),
    "causal_flag": dict(causal="flag"),
    "causal_both": dict(causal="both"),
    "padding_causal": dict(pad=True, causal="both"),
    "fully_padded": dict(pad=True, full=True),
    "fully_padded_causal": dict(pad=True, full=True, causal="both"),
    "attn_mask": dict(attn=True),
}


def _torch_activation(name):
    return {"relu": "relu", "gelu": "gelu", "silu": torch.nn.functional.silu}[name]


def torch_module(kind, norm_first=False, activation="relu", bias=True, dtype=None, layers=2, seed=0):
    """A torch module of ``kind`` with every parameter randomised (norm weights around 1)."""
    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    kw = dict(
        dim_feedforward=FF,
        dropout=0.0,
        activation=_torch_activation(activation),
        norm_first=norm_first,
        bias=bias,
        batch_first=True,
        dtype=dtype,
    )
    nn = torch.nn
    with warnings.catch_warnings():  # torch's notes on why its nested-tensor fast path is off
        warnings.simplefilter("ignore", UserWarning)
        m = _build(nn, kind, kw, bias, dtype, layers)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.uniform_(-0.5, 0.5)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return m


def _build(nn, kind, kw, bias, dtype, layers):
    if kind == "encoder_layer":
        m = nn.TransformerEncoderLayer(E, H, **kw)
    elif kind == "decoder_layer":
        m = nn.TransformerDecoderLayer(E, H, **kw)
    elif kind == "encoder":
        m = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(E, H, **kw), layers, norm=nn.LayerNorm(E, bias=bias, dtype=dtype)
        )
    elif kind == "decoder":
        m = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(E, H, **kw), layers, norm=nn.LayerNorm(E, bias=bias, dtype=dtype)
        )
    else:
        m = nn.Transformer(E, H, layers, layers, **kw)
    return m


def inputs(kind, case, dtype=np.float32, seed=0):
    """``(arrays, shared, flags, torch_extra, out_pad)``: batched arrays and key padding masks (leading N),
    shared (L, S) masks, noxton's causal flags, torch's extra keyword arguments (its flags, and the
    causal mask it needs with them), and the padded output positions (or None)."""
    rng = np.random.default_rng(seed)
    c = MASKS[case]
    arrays, shared, flags, tflags = {}, {}, {}, {}
    enc = kind in ("encoder_layer", "encoder")
    if kind in ("encoder_layer", "encoder", "transformer"):
        arrays["src"] = rng.normal(size=(N, S, E)).astype(dtype)
    if not enc:
        arrays["tgt"] = rng.normal(size=(N, L, E)).astype(dtype)
    if kind in ("decoder_layer", "decoder"):
        arrays["memory"] = rng.normal(size=(N, S, E)).astype(dtype)
    self_len = S if enc else L
    mask_name = {"encoder_layer": "src_mask", "encoder": "mask"}.get(kind, "tgt_mask")
    flag_name = {"encoder_layer": "is_causal", "encoder": "is_causal"}.get(kind, "tgt_is_causal")
    causal = c.get("causal")
    if causal in ("mask", "both"):
        shared[mask_name] = np.triu(np.full((self_len, self_len), -np.inf, dtype), 1)
    if causal in ("flag", "both"):
        flags[flag_name] = True
    if causal:  # torch needs the mask; its flag is a hint
        tflags[flag_name] = causal != "mask"
        tflags[mask_name] = np.triu(np.full((self_len, self_len), -np.inf, dtype), 1)
    out_pad = None
    if c.get("pad"):
        src_pad = np.zeros((N, S), bool)
        src_pad[1, S - 2 :] = True
        if c.get("full"):
            src_pad[1] = True
        if enc:
            arrays["src_key_padding_mask"] = src_pad
            out_pad = src_pad
        else:
            tgt_pad = np.zeros((N, L), bool)
            tgt_pad[0, L - 1 :] = True
            arrays["tgt_key_padding_mask"] = tgt_pad
            arrays["memory_key_padding_mask"] = src_pad
            if kind == "transformer":
                arrays["src_key_padding_mask"] = src_pad
            out_pad = tgt_pad
    if c.get("attn"):
        m = rng.random((L if not enc else S, S)) < 0.3
        m[:, 0] = False
        shared["memory_mask" if not enc else mask_name] = m
    return arrays, shared, flags, tflags, out_pad


def run_torch(tm, arrays, shared, extra, ct, grad):
    tm.train(grad)
    args = {
        k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in {**arrays, **shared, **extra}.items()
    }
    if not grad:
        with torch.no_grad():
            return tm(**args).numpy(), None
    tm.zero_grad()
    out = tm(**args)
    (out * torch.from_numpy(ct)).sum().backward()
    return out.detach().numpy(), {n: p.grad.numpy() for n, p in tm.named_parameters()}


def _eqx_loss(model, arrays, shared, flags, ct):
    names = list(arrays)
    out = jax.vmap(lambda *xs: model(**dict(zip(names, xs, strict=False)), **shared, **flags))(*arrays.values())
    return jnp.sum(out * ct), out


# Layers eager, as a user's first call: each primitive compiles once for the whole file. Stacks jitted:
# a stack jits its layer anyway, and one program per case compiles faster than the jitted layer's
# separate forward, residual and transposed programs in an eager gradient.
_eqx_grad = eqx.filter_value_and_grad(_eqx_loss, has_aux=True)
_eqx_grad_jit = eqx.filter_jit(_eqx_grad)
STACKS = ("encoder", "decoder", "transformer")


def run_equinox(kind, model, arrays, shared, flags, ct):
    (_, out), grads = (_eqx_grad_jit if kind in STACKS else _eqx_grad)(model, arrays, shared, flags, ct)
    return out, torch_state_dict(grads)


@functools.cache
def _haiku_grad(kind, config, flags):
    """The Haiku module's loss gradient for one configuration, built as a user would from it."""
    cfg = dict(config)

    def forward(kw):
        layer_cfg = {k: v for k, v in cfg.items() if k not in ("layers",)}
        if kind == "transformer":
            module = nxhk.Transformer(
                E,
                H,
                cfg["layers"],
                cfg["layers"],
                **{k: v for k, v in layer_cfg.items() if k not in ("d_model", "nhead")},
            )
        else:
            layer_cls = nxhk.TransformerEncoderLayer if kind.startswith("encoder") else nxhk.TransformerDecoderLayer
            module = layer_cls(**layer_cfg)
            if kind in ("encoder", "decoder"):
                stack = nxhk.TransformerEncoder if kind == "encoder" else nxhk.TransformerDecoder
                module = stack(module, cfg["layers"], nxhk.LayerNorm(E, bias=cfg["bias"], dtype=cfg["dtype"]))
        return module(**kw, **dict(flags), inference=False)

    f = hk.transform(forward)

    def loss(p, kw, ct):
        out = f.apply(p, None, kw)
        return jnp.sum(out * ct), out

    grad = jax.value_and_grad(loss, has_aux=True)
    return jax.jit(grad) if kind in STACKS else grad


JAX_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": jax.nn.silu}


def run_haiku(kind, tm, arrays, shared, flags, ct, norm_first, activation, bias):
    """Parameters from ``from_torch`` (its init, without running the model), then the loss gradient
    of the module built from the same configuration (the gradient function is cached per configuration)."""
    init = hk.transform(lambda: NX[kind][1].from_torch(tm).state_dict_params()).init(None)
    cfg = dict(
        d_model=E,
        nhead=H,
        dim_feedforward=FF,
        dropout=0.0,
        activation=JAX_ACTIVATIONS[activation],
        norm_first=norm_first,
        bias=bias,
        dtype=jnp.dtype(ct.dtype),
        layers=2,
    )
    (_, out), grads = _haiku_grad(kind, tuple(cfg.items()), tuple(flags.items()))(init, {**arrays, **shared}, ct)
    return out, nxhk.params_to_state_dict(grads, HAIKU_NAMES[kind])


#: Tolerances per dtype: (outputs, gradients by torch name).
TOLERANCES = {"float32": (1e-5, 1e-4), "float64": (1e-10, 1e-10)}


def check_parity(kind, case, norm_first, activation, bias, dtype):
    """Parity in ``dtype``, "float32" or "float64", with that dtype's ``TOLERANCES``."""
    atol, gtol = TOLERANCES[dtype]
    np_dtype = np.dtype(dtype)
    tm = torch_module(kind, norm_first, activation, bias, getattr(torch, dtype))
    arrays, shared, flags, tflags, out_pad = inputs(kind, case, np_dtype)
    ct = np.random.default_rng(1).normal(size=(N, S if kind in ("encoder_layer", "encoder") else L, E)).astype(np_dtype)
    t_out, t_grads = run_torch(tm, arrays, shared, tflags, ct, grad=True)
    e_out, e_grads = run_equinox(kind, NX[kind][0].from_torch(tm.train()), arrays, shared, flags, ct)
    h_out, h_grads = run_haiku(kind, tm, arrays, shared, flags, ct, norm_first, activation, bias)
    for front, out, grads in (("equinox", e_out, e_grads), ("haiku", h_out, h_grads)):
        assert_close(out, t_out, atol, f"{front} train output")
        assert sorted(grads) == sorted(t_grads), front
        for n in t_grads:
            assert_close(grads[n], t_grads[n], gtol, f"{front} grad {n}")
    # Eval: torch takes its fast paths (native kernels; nested tensors in nn.TransformerEncoder,
    # which return zeros at padded positions: compare the non-padded ones; NaN where every key of
    # a query is padded, which its reference path and noxton give as zero attention). noxton's
    # inference mode runs the same program as training with dropout 0
    # (test_inference_is_training_without_dropout).
    t_eval, _ = run_torch(tm, arrays, shared, tflags, ct, grad=False)
    keep = np.ones(t_eval.shape[:2], bool) if out_pad is None else ~out_pad
    finite = np.isfinite(t_eval).all(-1)
    assert finite[0].all() and (finite.all() or MASKS[case].get("full")), "torch NaN outside a fully padded element"
    keep &= finite
    for front, out in (("equinox", e_out), ("haiku", h_out)):
        assert_close(np.asarray(out)[keep], t_eval[keep], atol, f"{front} output vs torch eval")


def _id(o):
    return "-".join(f"{k}={v}" for k, v in o.items())


# The layers: the whole cross-product of the options and the mask cases, 216 cases, in float32 and float64.
LAYER_GRID = grid(
    kind=["encoder_layer", "decoder_layer"],
    norm_first=[False, True],
    activation=["relu", "gelu", "silu"],
    bias=[True, False],
    mask=list(MASKS),
)


@pytest.mark.cross_product
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("o", LAYER_GRID, ids=_id)
def test_layer_parity(o, dtype, request):
    if dtype == "float64":
        request.getfixturevalue("x64")
    check_parity(o["kind"], o["mask"], o["norm_first"], o["activation"], o["bias"], dtype)


# Stacks of 2 layers: each test runs two mask cases of one structure (padding with the causal mask
# and flag; a batch element wholly padded too).
STACK_GRID = grid(kind=list(STACKS), norm_first=[False, True])


@pytest.mark.cross_product
@pytest.mark.parametrize("o", STACK_GRID, ids=_id)
def test_stack_parity_float32(o):
    for case in ("padding_causal", "fully_padded_causal"):
        check_parity(o["kind"], case, o["norm_first"], "gelu", not o["norm_first"], "float32")


@pytest.mark.cross_product
@pytest.mark.parametrize("o", grid(kind=list(STACKS), norm_first=[True]), ids=_id)
def test_stack_parity_float64(o, x64):
    check_parity(o["kind"], "fully_padded_causal", o["norm_first"], "gelu", True, "float64")


# --- inference, names, initialisation ------------------------------------------------------------


def test_inference_is_training_without_dropout():
    """Inference mode switches every dropout off: bit-identical to dropout=0 in training, both front ends."""
    tm = torch_module("decoder_layer")
    tm_drop = torch_module("decoder_layer")
    for mod in tm_drop.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.3
    arrays, shared, flags, _, _ = inputs("decoder_layer", "padding_causal")
    plain = nx.TransformerDecoderLayer.from_torch(tm)
    drop = eqx.nn.inference_mode(nx.TransformerDecoderLayer.from_torch(tm_drop))
    assert drop.dropout == 0.3 and drop.multihead_attn.inference
    names = list(arrays)

    def run(m):
        return jax.vmap(lambda *xs: m(**dict(zip(names, xs, strict=False)), **shared, **flags))(*arrays.values())

    assert jnp.array_equal(run(plain), run(drop))
    kw = {**arrays, **shared}
    f = hk.transform(
        lambda inference: nxhk.TransformerDecoderLayer.from_torch(tm_drop)(**kw, **flags, inference=inference)
    )
    params = f.init(None, True)
    assert jnp.array_equal(f.apply(params, None, True), run(plain))
    # inference_mode reaches the stacks and every layer in them
    training = nx.Transformer.from_torch(torch_module("transformer").train())
    model = eqx.nn.inference_mode(training)
    layers = [*model.encoder.layers, *model.decoder.layers]
    assert not any(layer.inference or layer.self_attn.inference for layer in training.encoder.layers)
    assert all(layer.inference and layer.self_attn.inference for layer in layers)


def test_state_dict_names_shapes_and_round_trip_into_torch():
    model = nx.Transformer(E, H, 2, 3, FF, key=jax.random.PRNGKey(0))
    tm = torch_module("transformer", layers=2)
    tm.decoder = torch.nn.TransformerDecoder(
        torch.nn.TransformerDecoderLayer(E, H, FF, batch_first=True), 3, norm=torch.nn.LayerNorm(E)
    )
    sd = model.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert model.encoder.layers[1].self_attn.in_proj_weight.shape == (3 * E, E)
    assert model.decoder.layers[2].multihead_attn.out_proj.bias.shape == (E,)
    f = hk.transform(lambda s, t: nxhk.Transformer(E, H, 2, 3, FF)(s, t, inference=True))
    params = f.init(jax.random.PRNGKey(0), jnp.ones((S, E)), jnp.ones((L, E)))
    assert "transformer/~/decoder/~/layers__2/~/multihead_attn/~/out_proj" in params
    assert sorted(nxhk.params_to_state_dict(params, "transformer")) == sorted(tm.state_dict())


@pytest.mark.parametrize("front", ["equinox", "haiku"])
def test_transformer_init_is_xavier_per_matrix_and_cloned_vectors(front):
    """nn.Transformer: _get_clones copies, then every p.dim() > 1 re-drawn Xavier-uniform."""
    d, ff = 32, 64
    if front == "equinox":
        sd = nx.Transformer(d, 4, 2, 2, ff, key=jax.random.PRNGKey(0)).state_dict()
    else:
        f = hk.transform(lambda s, t: nxhk.Transformer(d, 4, 2, 2, ff)(s, t, inference=True))
        sd = nxhk.params_to_state_dict(f.init(jax.random.PRNGKey(0), jnp.ones((3, d)), jnp.ones((3, d))), "transformer")
    for k, v in sd.items():
        if v.ndim > 1:
            bound = np.sqrt(6.0 / sum(v.shape))
            assert np.abs(v).max() <= bound and abs(v.std() - bound / np.sqrt(3)) < 0.1 * bound, k
    for part in ("encoder", "decoder"):
        a, b = f"{part}.layers.0.", f"{part}.layers.1."
        assert not np.array_equal(sd[a + "linear1.weight"], sd[b + "linear1.weight"])
        assert np.array_equal(sd[a + "linear1.bias"], sd[b + "linear1.bias"])  # vectors stay torch's clones
        assert np.abs(sd[a + "linear1.bias"]).max() <= 1 / np.sqrt(d) and sd[a + "linear1.bias"].std() > 0
        assert np.array_equal(sd[a + "self_attn.in_proj_bias"], np.zeros(3 * d))
        assert np.array_equal(sd[f"{part}.norm.weight"], np.ones(d))
        assert np.array_equal(sd[f"{part}.norm.bias"], np.zeros(d))


@pytest.mark.parametrize("front", ["equinox", "haiku"])
def test_encoder_layers_start_as_copies_of_the_layer(front):
    """nn.TransformerEncoder deep-copies its layer: every layer starts with its weights."""
    if front == "equinox":
        layer = nx.TransformerDecoderLayer(E, H, FF, key=jax.random.PRNGKey(0))
        sd = nx.TransformerDecoder(layer, 3).state_dict()
        one = layer.state_dict()
    else:

        def f(t, m):
            return nxhk.TransformerDecoder(nxhk.TransformerDecoderLayer(E, H, FF), 3)(t, m, inference=True)

        sd = nxhk.params_to_state_dict(
            hk.transform(f).init(jax.random.PRNGKey(0), jnp.ones((L, E)), jnp.ones((S, E))), "transformer_decoder"
        )
        one = {k[len("layers.0.") :]: v for k, v in sd.items() if k.startswith("layers.0.")}
    assert len(sd) == 3 * len(one) == 3 * 18
    for i in range(3):
        for k, v in one.items():
            assert np.array_equal(sd[f"layers.{i}.{k}"], v), (i, k)
    # torch's Linear init for the feed-forward, Xavier for the attention, ones/zeros for the norms.
    assert np.abs(one["linear2.weight"]).max() <= 1 / np.sqrt(FF)
    assert np.abs(one["self_attn.in_proj_weight"]).max() <= np.sqrt(6 / (4 * E))
    assert np.array_equal(one["norm3.weight"], np.ones(E)) and "norm3.bias" in one


def test_generate_square_subsequent_mask_is_torchs():
    for cls in (nx.Transformer, nxhk.Transformer):
        np.testing.assert_array_equal(
            cls.generate_square_subsequent_mask(5), torch.nn.Transformer.generate_square_subsequent_mask(5).numpy()
        )
    assert nx.Transformer.generate_square_subsequent_mask(3, jnp.bfloat16).dtype == jnp.bfloat16


# --- from_torch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh_module", "silu"])
def test_from_torch_takes_the_configuration(activation, x64):
    act = {"gelu_tanh_module": torch.nn.GELU(approximate="tanh"), "silu": torch.nn.functional.silu}.get(
        activation, activation
    )
    tl = torch.nn.TransformerEncoderLayer(
        E, H, FF, dropout=0.25, activation=act, layer_norm_eps=1e-6, norm_first=True, bias=False
    )
    layer = nx.TransformerEncoderLayer.from_torch(tl.eval())
    want = {"relu": jax.nn.relu, "gelu": nxF.gelu, "gelu_tanh_module": nxF.gelu_tanh, "silu": jax.nn.silu}[activation]
    assert layer.activation is want
    assert (layer.d_model, layer.nhead, layer.dim_feedforward, layer.dropout) == (E, H, FF, 0.25)
    assert (layer.layer_norm_eps, layer.norm_first, layer.bias, layer.inference) == (1e-6, True, False, True)
    assert layer.linear1.bias is None and layer.norm1.bias is None and layer.self_attn.dropout == 0.25
    enc = nx.TransformerEncoder.from_torch(torch.nn.TransformerEncoder(tl, 4, enable_nested_tensor=False))
    assert enc.num_layers == 4 and enc.norm is None and not enc.layers[3].inference
    if activation == "gelu_tanh_module":
        # torch's deep copies of a TransformerDecoderLayer lose a module activation (its __setstate__
        # restores F.relu), so such an nn.Transformer's decoder runs relu: from_torch takes what runs.
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tt = torch.nn.Transformer(E, H, 1, 3, FF, 0.0, act, layer_norm_eps=1e-6, dtype=torch.float64)
    model = nx.Transformer.from_torch(tt)
    assert model.decoder.num_layers == 3 and model.encoder.norm.eps == 1e-6
    assert model.decoder.layers[0].linear1.weight.dtype == jnp.float64


def test_from_torch_refuses_what_it_cannot_port():
    with pytest.raises(TypeError, match=r"`module` must be a torch.nn.TransformerEncoderLayer, got Linear"):
        nx.TransformerEncoderLayer.from_torch(torch.nn.Linear(2, 2))
    tl = torch.nn.TransformerEncoderLayer(E, H, FF, activation=lambda x: x * 2)
    with pytest.raises(ValueError, match=r"`activation`: .* has no exact JAX counterpart.*F\.relu"):
        nx.TransformerEncoderLayer.from_torch(tl)
    custom = torch.nn.Transformer(
        E,
        H,
        1,
        1,
        FF,
        custom_encoder=torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(E, H, FF), 1, enable_nested_tensor=False
        ),
    )
    with pytest.raises(ValueError, match=r"encoder.norm None.*TransformerEncoder.from_torch"):
        nxhk.Transformer.from_torch(custom)


# --- dropout ------------------------------------------------------------------------------------


def test_dropout_function_statistics():
    x = jnp.ones((200_000,))
    y = np.asarray(nxF._transformer.dropout(x, 0.3, jax.random.PRNGKey(0)))
    assert abs((y == 0).mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / y.size)
    np.testing.assert_array_equal(np.unique(y), np.array([0.0, 1 / 0.7], np.float32))


@pytest.mark.parametrize("kind", ["encoder_layer", "decoder_layer"])
def test_dropout_matches_torchs_in_expectation(kind):
    """Every dropout site and probability as torch's: the mean over many draws matches torch's mean."""
    p, draws = 0.2, 4000
    tm = torch_module(kind)
    for mod in tm.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = p
        if isinstance(mod, torch.nn.MultiheadAttention):
            mod.dropout = p
    arrays, shared, flags, extra, _ = inputs(kind, "padding_causal")
    one = {k: v[:1] for k, v in arrays.items()}  # the first batch element, repeated: independent draws
    rep = {k: np.repeat(v, draws, axis=0) for k, v in one.items()}
    tm.train()
    with torch.no_grad():
        t_out = tm(
            **{
                k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                for k, v in {**rep, **shared, **extra}.items()
            }
        ).numpy()
    model = NX[kind][0].from_torch(tm)
    assert model.dropout == p
    x = {k: v[0] for k, v in one.items()}
    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    outs = np.asarray(eqx.filter_jit(jax.vmap(lambda k: model(**x, **shared, **flags, dropout_key=k)))(keys))
    se = np.sqrt(outs.var(0) / draws + t_out.var(0) / draws)
    assert np.all(np.abs(outs.mean(0) - t_out.mean(0)) < 5 * se + 1e-6)
    # and it is dropout: the spread is torch's spread
    np.testing.assert_allclose(outs.std(0).mean(), t_out.std(0).mean(), rtol=0.1)


def test_dropout_is_reproducible_by_key_in_both_front_ends():
    tm = torch_module("transformer")
    for mod in tm.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.3
    model = nx.Transformer.from_torch(tm)
    src, tgt = jnp.ones((S, E)), jnp.ones((L, E))
    run = eqx.filter_jit(lambda m, k: m(src, tgt, dropout_key=k))
    a = run(model, jax.random.PRNGKey(1))
    assert jnp.array_equal(a, run(model, jax.random.PRNGKey(1)))
    assert not jnp.array_equal(a, run(model, jax.random.PRNGKey(2)))
    layer = tm.decoder.layers[0]
    f = hk.transform(lambda t, m: nxhk.TransformerDecoderLayer.from_torch(layer)(t, m))
    params = f.init(jax.random.PRNGKey(0), tgt, src)
    b = f.apply(params, jax.random.PRNGKey(1), tgt, src)
    assert jnp.array_equal(b, f.apply(params, jax.random.PRNGKey(1), tgt, src))
    assert not jnp.array_equal(b, f.apply(params, jax.random.PRNGKey(2), tgt, src))


# --- stacks: one jitted layer, called once per layer (tests/test_surgery.py: traced once per configuration) ---


def _encoder_program(num_layers):
    layer = nx.TransformerEncoderLayer(E, H, FF, inference=True, key=jax.random.PRNGKey(0))
    enc = nx.TransformerEncoder(layer, num_layers, nx.LayerNorm(E))
    fn = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
    return fn.lower(enc, jnp.ones((N, S, E))).as_text()


def test_a_stack_program_holds_one_layer_called_once_per_layer():
    """Whatever the depth, the program holds one layer's function (its matrix products once), called once
    per layer, and no loop."""
    programs = {n: _encoder_program(n) for n in (1, 3, 24)}
    for n, text in programs.items():
        assert "stablehlo.while" not in text
        assert text.count("call @_jitted_call(") == n
        assert text.count("dot_general") == programs[1].count("dot_general")
