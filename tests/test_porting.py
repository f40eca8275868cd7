"""Porting torch models: from_torch for every MultiheadAttention configuration, whole models
through load_torch_state_dict / torch_state_dict, and the errors a port meets."""

from __future__ import annotations

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TorchSqueezeExcitation, assert_close, grid, requires_torch, torch, trees_equal

import noxton
import noxton.haiku as nxhk
from noxton.interop import load_torch_state_dict, torch_state_dict
from noxton.nn import MultiheadAttention, SqueezeExcitation

pytestmark = requires_torch

MHA_OPTIONS = grid(
    bias=[True, False], add_bias_kv=[False, True], add_zero_attn=[False, True], dims=[None, (5, 7)], dropout=[0.0, 0.25]
)


def _mha_id(o):
    return "-".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("options", MHA_OPTIONS, ids=_mha_id)
def test_mha_from_torch_takes_config_and_weights(options):
    kdim, vdim = options["dims"] or (None, None)
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(
        8,
        2,
        dropout=options["dropout"],
        bias=options["bias"],
        add_bias_kv=options["add_bias_kv"],
        add_zero_attn=options["add_zero_attn"],
        kdim=kdim,
        vdim=vdim,
    ).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.uniform_(-0.5, 0.5)
    mha = MultiheadAttention.from_torch(tm)
    assert (mha.embed_dim, mha.num_heads, mha.dropout, mha.bias) == (8, 2, options["dropout"], options["bias"])
    assert (mha.add_bias_kv, mha.add_zero_attn, mha.kdim, mha.vdim) == (
        options["add_bias_kv"],
        options["add_zero_attn"],
        kdim or 8,
        vdim or 8,
    )
    assert mha.inference and mha.dtype == jnp.float32
    assert not MultiheadAttention.from_torch(tm.train()).inference
    tm.eval()
    for k, v in tm.state_dict().items():
        assert np.array_equal(torch_state_dict(mha)[k], v.numpy()), k

    rng = np.random.default_rng(0)
    q = rng.normal(size=(4, 8)).astype(np.float32)
    k = rng.normal(size=(5, kdim or 8)).astype(np.float32)
    v = rng.normal(size=(5, vdim or 8)).astype(np.float32)
    t_out, t_w = tm(*(torch.from_numpy(a) for a in (q, k, v)))
    out, w = mha(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    assert_close(out, t_out.detach().numpy(), 1e-5, "equinox output")
    assert_close(w, t_w.detach().numpy(), 1e-6, "equinox weights")

    f = hk.transform(lambda q, k, v: nxhk.MultiheadAttention.from_torch(tm)(q, k, v, inference=True))
    params = f.init(None, q, k, v)
    assert nxhk.params_to_state_dict(params, "multihead_attention").keys() == tm.state_dict().keys()
    h_out, h_w = f.apply(params, None, q, k, v)
    assert_close(h_out, t_out.detach().numpy(), 1e-5, "haiku output")
    assert_close(h_w, t_w.detach().numpy(), 1e-6, "haiku weights")


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_from_torch_keeps_the_dtype(dtype, x64):
    tm = torch.nn.MultiheadAttention(8, 2, dtype=getattr(torch, dtype))
    mha = MultiheadAttention.from_torch(tm)
    assert mha.dtype == jnp.dtype(dtype) and mha.in_proj_weight.dtype == jnp.dtype(dtype)
    se = SqueezeExcitation.from_torch(TorchSqueezeExcitation(8, 2).to(getattr(torch, dtype)))
    assert se.fc1.weight.dtype == jnp.dtype(dtype)


# --- whole models ------------------------------------------------------------------------------

P, E, H, C, CLASSES = 4, 16, 2, 3, 5  # patch size, width, heads, image channels, classes


class TorchViT(torch.nn.Module if torch is not None else object):
    """A small ViT-style encoder, named as torchvision's: conv_proj, class_token, encoder.pos_embedding,
    encoder.layers.N.{ln_1, self_attention, ln_2, mlp}, encoder.ln, heads.head."""

    def __init__(self, depth=2, image=8):
        super().__init__()
        self.conv_proj = torch.nn.Conv2d(C, E, P, stride=P)
        self.class_token = torch.nn.Parameter(torch.randn(1, 1, E))
        self.encoder = torch.nn.Module()
        self.encoder.pos_embedding = torch.nn.Parameter(torch.randn(1, (image // P) ** 2 + 1, E) * 0.02)
        self.encoder.layers = torch.nn.ModuleList()
        for _ in range(depth):
            block = torch.nn.Module()
            block.ln_1 = torch.nn.LayerNorm(E, eps=1e-6)
            block.self_attention = torch.nn.MultiheadAttention(E, H, batch_first=True)
            block.ln_2 = torch.nn.LayerNorm(E, eps=1e-6)
            block.mlp = torch.nn.Sequential(torch.nn.Linear(E, 2 * E), torch.nn.GELU(), torch.nn.Linear(2 * E, E))
            self.encoder.layers.append(block)
        self.encoder.ln = torch.nn.LayerNorm(E, eps=1e-6)
        self.heads = torch.nn.Sequential()
        self.heads.add_module("head", torch.nn.Linear(E, CLASSES))

    def forward(self, x):  # (N, C, H, W)
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.encoder.pos_embedding
        for b in self.encoder.layers:
            y = b.ln_1(x)
            x = x + b.self_attention(y, y, y, need_weights=False)[0]
            x = x + b.mlp(b.ln_2(x))
        return self.heads.head(self.encoder.ln(x)[:, 0])


class Block(eqx.Module):
    ln_1: eqx.nn.LayerNorm
    self_attention: MultiheadAttention
    ln_2: eqx.nn.LayerNorm
    mlp: eqx.nn.Sequential

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.ln_1 = eqx.nn.LayerNorm(E, eps=1e-6)
        self.self_attention = MultiheadAttention(E, H, key=k1)
        self.ln_2 = eqx.nn.LayerNorm(E, eps=1e-6)
        self.mlp = eqx.nn.Sequential(
            [eqx.nn.Linear(E, 2 * E, key=k2), eqx.nn.Lambda(noxton.functional.gelu), eqx.nn.Linear(2 * E, E, key=k3)]
        )

    def __call__(self, x):  # (T, E)
        y = jax.vmap(self.ln_1)(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + jax.vmap(self.mlp)(jax.vmap(self.ln_2)(x))


class Encoder(eqx.Module):
    pos_embedding: jax.Array
    layers: list
    ln: eqx.nn.LayerNorm


class ViT(eqx.Module):
    conv_proj: eqx.nn.Conv2d
    class_token: jax.Array
    encoder: Encoder
    heads: dict

    def __init__(self, key, depth=2, image=8):
        keys = jax.random.split(key, depth + 2)
        self.conv_proj = eqx.nn.Conv2d(C, E, P, stride=P, key=keys[0])
        self.class_token = jnp.zeros((1, 1, E))
        self.encoder = Encoder(
            jnp.zeros((1, (image // P) ** 2 + 1, E)), [Block(k) for k in keys[2:]], eqx.nn.LayerNorm(E, eps=1e-6)
        )
        self.heads = {"head": eqx.nn.Linear(E, CLASSES, key=keys[1])}

    def __call__(self, x):  # (C, H, W)
        x = self.conv_proj(x).reshape(E, -1).T
        x = jnp.concatenate([self.class_token[0], x]) + self.encoder.pos_embedding[0]
        for block in self.encoder.layers:
            x = block(x)
        return self.heads["head"](self.encoder.ln(x[0]))


def test_whole_vit_loads_matches_and_exports():
    """The port in one line, into a model built abstractly (no random initialisation, as torch's meta device)."""
    torch.manual_seed(0)
    tm = TorchViT()
    model = load_torch_state_dict(eqx.filter_eval_shape(ViT, jax.random.PRNGKey(0)), tm.state_dict())
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    x = np.random.default_rng(0).normal(size=(2, C, 8, 8)).astype(np.float32)
    tx = torch.from_numpy(x)
    t_out = tm(tx)
    out = jax.vmap(model)(jnp.asarray(x))
    assert_close(out, t_out.detach().numpy(), 1e-5, "output")

    t_out.sum().backward()
    grads = torch_state_dict(eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(jnp.asarray(x))))(model))
    t_grads = {n: p.grad.numpy() for n, p in tm.named_parameters()}
    assert sorted(grads) == sorted(t_grads)
    for n in t_grads:
        assert_close(grads[n], t_grads[n], 1e-4, n)

    exported = torch_state_dict(model)
    fresh = TorchViT()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for k, v in tm.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


class EncoderLayer(eqx.Module):
    """torch's nn.TransformerEncoderLayer (post-norm, relu), named as torch's state_dict."""

    self_attn: MultiheadAttention
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear
    norm1: eqx.nn.LayerNorm
    norm2: eqx.nn.LayerNorm

    def __init__(self, d, nhead, ff, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.self_attn = MultiheadAttention(d, nhead, key=k1)
        self.linear1 = eqx.nn.Linear(d, ff, key=k2)
        self.linear2 = eqx.nn.Linear(ff, d, key=k3)
        self.norm1 = eqx.nn.LayerNorm(d)
        self.norm2 = eqx.nn.LayerNorm(d)

    def __call__(self, x, key_padding_mask):
        x = jax.vmap(self.norm1)(x + self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0])
        ff = jax.vmap(lambda t: self.linear2(jax.nn.relu(self.linear1(t))))(x)
        return jax.vmap(self.norm2)(x + ff)


def test_transformer_encoder_layer_block_and_prefix():
    torch.manual_seed(0)
    stack = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0), 2, enable_nested_tensor=False
    )
    tl = stack.layers[1]
    layer = load_torch_state_dict(
        EncoderLayer(16, 4, 32, jax.random.PRNGKey(0)), stack.state_dict(), prefix="layers.1."
    )
    x = np.random.default_rng(0).normal(size=(5, 2, 16)).astype(np.float32)  # torch's (L, N, E)
    kpm = np.zeros((2, 5), bool)
    kpm[1, 3:] = True
    tx = torch.from_numpy(x).requires_grad_(True)
    t_out = tl(tx, src_key_padding_mask=torch.from_numpy(kpm))
    run = jax.vmap(layer, in_axes=(1, 0), out_axes=1)
    out = run(jnp.asarray(x), jnp.asarray(kpm))
    assert_close(out, t_out.detach().numpy(), 1e-5, "output")
    t_out.sum().backward()
    g = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m, in_axes=(1, 0), out_axes=1)(jnp.asarray(x), jnp.asarray(kpm))))(
        layer
    )
    grads = torch_state_dict(g)
    for n, p in tl.named_parameters():
        assert_close(grads[n], p.grad.numpy(), 1e-4, n)


def test_conv_embedding_groupnorm_sequential_round_trip():
    torch.manual_seed(0)
    tm = torch.nn.Sequential(
        torch.nn.Conv1d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Embedding(6, 4), torch.nn.Conv3d(2, 2, 1)
    )
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    model = eqx.nn.Sequential(
        [
            eqx.nn.Conv1d(3, 4, 3, key=k[0]),
            eqx.nn.GroupNorm(2, 4),
            eqx.nn.Embedding(6, 4, key=k[1]),
            eqx.nn.Conv3d(2, 2, 1, key=k[2]),
        ]
    )
    model = load_torch_state_dict(model, tm.state_dict())
    assert model.layers[0].bias.shape == (4, 1) and model.layers[3].bias.shape == (2, 1, 1, 1)
    np.testing.assert_array_equal(model.layers[0].bias[:, 0], tm[0].bias.detach().numpy())
    x = np.random.default_rng(0).normal(size=(3, 9)).astype(np.float32)
    assert_close(model.layers[0](jnp.asarray(x)), tm[0](torch.from_numpy(x)).detach().numpy(), 1e-5, "conv1d")
    exported = torch_state_dict(model)
    assert {k: v.shape for k, v in exported.items()} == {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    for k, v in tm.state_dict().items():
        assert np.array_equal(exported[k], v.numpy()), k


def test_abstract_model_loads_as_a_concrete_one():
    """``eqx.filter_eval_shape`` builds a model without initialising it; loading a state_dict into it gives the
    same model, leaf for leaf, as loading into an initialised one. Until then it is refused where it needs values."""
    sd = _sd()
    skeleton = eqx.filter_eval_shape(_model)
    assert isinstance(skeleton["attn"].in_proj_weight, jax.ShapeDtypeStruct)
    assert trees_equal(load_torch_state_dict(skeleton, sd), load_torch_state_dict(_model(), sd))
    one, concrete = (
        skeleton["attn"].load_state_dict(sd, prefix="attn."),
        _model()["attn"].load_state_dict(sd, prefix="attn."),
    )
    assert trees_equal(one, concrete)
    with pytest.raises(TypeError, match=r"`model` holds abstract .* attn\.in_proj_weight, .*load a state_dict into it"):
        torch_state_dict(skeleton)
    x = jnp.ones((3, 8))
    with pytest.raises(TypeError, match=r"MultiheadAttention holds abstract parameters .* before calling it"):
        skeleton["attn"](x, x, x)


def _model():
    return {
        "attn": MultiheadAttention(8, 2, key=jax.random.PRNGKey(0)),
        "proj": eqx.nn.Linear(8, 3, key=jax.random.PRNGKey(1)),
    }


def _sd(prefix=""):
    return {prefix + k: torch.from_numpy(v) for k, v in torch_state_dict(_model()).items()}


@pytest.mark.parametrize(
    "state_dict, kwargs, pattern",
    [
        (_sd("encoder.") if torch else None, {}, r'(?s)missing keys: attn\.in_proj_weight.*pass prefix="encoder\."'),
        (_sd() if torch else None, {"prefix": "encoder."}, r"missing keys: encoder\.attn\.in_proj_weight"),
        ({k: v for k, v in (_sd() if torch else {}).items() if k != "proj.bias"}, {}, r"missing keys: proj\.bias$"),
    ],
    ids=["needs_prefix", "wrong_prefix", "missing"],
)
def test_load_errors_name_every_problem(state_dict, kwargs, pattern):
    model = _model()
    with pytest.raises(ValueError, match=pattern):
        load_torch_state_dict(model, state_dict, **kwargs)


def test_prefix_hint_in_the_other_direction():
    with pytest.raises(ValueError, match=r'under "attn\.": add "attn\." to the state_dict'):
        load_torch_state_dict(_model(), MultiheadAttention(8, 2, key=jax.random.PRNGKey(0)).state_dict())


def test_batchnorm_is_named_in_a_clear_error():
    model, _ = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, "batch", mode="batch")
    with pytest.raises(
        ValueError,
        match=r"bn is an eqx.nn.BatchNorm, whose running statistics are not torch's.*"
        r"noxton.nn.BatchNorm1d/BatchNorm2d",
    ):
        torch_state_dict({"bn": model})


def test_torch_activation_gets_the_jax_name():
    with pytest.raises(
        TypeError, match=r"`scale_activation` must be a JAX function.*Hardsigmoid: pass jax\.nn\.hard_sigmoid"
    ):
        SqueezeExcitation(8, 2, key=jax.random.PRNGKey(0), scale_activation=torch.nn.Hardsigmoid())
    with pytest.raises(TypeError, match=r"torch class SiLU: pass jax\.nn\.silu"):
        SqueezeExcitation(8, 2, key=jax.random.PRNGKey(0))(jnp.ones((8, 2, 2)), torch.nn.SiLU)


def test_unknown_torch_activation_is_refused():
    with pytest.raises(ValueError, match=r"`activation`: torch's LeakyReLU has no exact JAX counterpart"):
        SqueezeExcitation.from_torch(TorchSqueezeExcitation(8, 2, activation=torch.nn.LeakyReLU()))


def test_from_torch_refuses_other_modules():
    with pytest.raises(TypeError, match=r"`module` must be a torch.nn.MultiheadAttention, got Linear"):
        MultiheadAttention.from_torch(torch.nn.Linear(2, 2))
    bad = TorchSqueezeExcitation(8, 2)
    bad.fc1 = torch.nn.Conv2d(8, 2, 3)
    with pytest.raises(ValueError, match=r"`module\.fc1` must be a 1x1 nn\.Conv2d.*weight shape \(2, 8, 3, 3\)"):
        SqueezeExcitation.from_torch(bad)
