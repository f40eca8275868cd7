"""Whole models ported in one load call, both front ends: a MobileNetV3-small and a ViT written in torch.nn
with torchvision's module tree and names (torchvision itself needs another torch), BatchNorm and named
``nn.Sequential`` children included; outputs, running statistics and gradients compared by torch's names."""

from __future__ import annotations

import collections
import functools

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from helpers import assert_close, requires_torch, torch

import noxton.haiku as nxhk
import noxton.nn as nxn
from noxton.functional import gelu
from noxton.interop import load_torch_state_dict, torch_state_dict

pytestmark = requires_torch
TorchModule = torch.nn.Module if torch is not None else object
TorchSequential = torch.nn.Sequential if torch is not None else object

# --- torch: torchvision's MobileNetV3 tree, written out -----------------------------------------------------------

# (in, kernel, expanded, out, use_se, activation "RE"/"HS", stride), a tiny mobilenet_v3_small
BLOCKS = [(8, 3, 8, 8, True, "RE", 2), (8, 3, 16, 12, False, "RE", 2), (12, 5, 24, 12, True, "HS", 1)]
STEM, LAST, HIDDEN, CLASSES, IMAGE = 8, 24, 32, 5, 16


def _divisible(v: float, divisor: int = 8) -> int:  # torchvision's _make_divisible
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class TorchConvNormActivation(TorchSequential):  # torchvision.ops.Conv2dNormActivation
    def __init__(self, cin, cout, kernel, stride=1, groups=1, activation=None):
        layers = [
            torch.nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            torch.nn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class TorchSE(TorchModule):  # torchvision.ops.SqueezeExcitation
    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc1 = torch.nn.Conv2d(channels, squeeze, 1)
        self.fc2 = torch.nn.Conv2d(squeeze, channels, 1)
        self.activation = torch.nn.ReLU()
        self.scale_activation = torch.nn.Hardsigmoid()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class TorchInvertedResidual(TorchModule):
    def __init__(self, cin, kernel, expanded, cout, use_se, act, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        activation = torch.nn.Hardswish if act == "HS" else torch.nn.ReLU
        layers = []
        if expanded != cin:
            layers.append(TorchConvNormActivation(cin, expanded, 1, activation=activation))
        layers.append(TorchConvNormActivation(expanded, expanded, kernel, stride, expanded, activation))
        if use_se:
            layers.append(TorchSE(expanded, _divisible(expanded // 4)))
        layers.append(TorchConvNormActivation(expanded, cout, 1))
        self.block = torch.nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res_connect else y


class TorchMobileNetV3(TorchModule):
    def __init__(self):
        super().__init__()
        layers = [TorchConvNormActivation(3, STEM, 3, 2, activation=torch.nn.Hardswish)]
        layers += [TorchInvertedResidual(*b) for b in BLOCKS]
        layers.append(TorchConvNormActivation(BLOCKS[-1][3], LAST, 1, activation=torch.nn.Hardswish))
        self.features = torch.nn.Sequential(*layers)
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(LAST, HIDDEN), torch.nn.Hardswish(), torch.nn.Dropout(0.2), torch.nn.Linear(HIDDEN, CLASSES)
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def torch_mobilenet():
    torch.manual_seed(0)
    model = TorchMobileNetV3()
    with torch.no_grad():  # statistics and affine parameters away from their initial values
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.num_batches_tracked.fill_(7)
    return model


# --- Equinox mirror ---------------------------------------------------------------------------------------------


def conv_norm_activation(cin, cout, kernel, key, stride=1, groups=1, activation=None):
    layers = [
        nxn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False, key=key),
        nxn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
    ]
    return nxn.Sequential(layers if activation is None else [*layers, activation])


class InvertedResidual(eqx.nn.StatefulLayer):  # keeps state (its BatchNorms): Sequential passes it the State
    block: nxn.Sequential
    use_res_connect: bool = eqx.field(static=True)

    def __init__(self, cin, kernel, expanded, cout, use_se, act, stride, *, key):
        keys = iter(jax.random.split(key, 4))
        self.use_res_connect = stride == 1 and cin == cout
        activation = jax.nn.hard_swish if act == "HS" else jax.nn.relu
        layers = []
        if expanded != cin:
            layers.append(conv_norm_activation(cin, expanded, 1, next(keys), activation=activation))
        layers.append(conv_norm_activation(expanded, expanded, kernel, next(keys), stride, expanded, activation))
        if use_se:
            squeeze = _divisible(expanded // 4)
            se = nxn.SqueezeExcitation(expanded, squeeze, key=next(keys), scale_activation=jax.nn.hard_sigmoid)
            layers.append(se)
        layers.append(conv_norm_activation(expanded, cout, 1, next(keys)))
        self.block = nxn.Sequential(layers)

    def __call__(self, x, state, *, key=None):
        y, state = self.block(x, state)
        return (x + y if self.use_res_connect else y), state


class MobileNetV3(eqx.Module):
    features: nxn.Sequential
    classifier: nxn.Sequential

    def __init__(self, key, dropout=0.2):
        keys = jax.random.split(key, len(BLOCKS) + 4)
        layers = [conv_norm_activation(3, STEM, 3, keys[0], 2, activation=jax.nn.hard_swish)]
        layers += [InvertedResidual(*b, key=k) for b, k in zip(BLOCKS, keys[1:], strict=False)]
        layers.append(conv_norm_activation(BLOCKS[-1][3], LAST, 1, keys[-3], activation=jax.nn.hard_swish))
        self.features = nxn.Sequential(layers)
        self.classifier = nxn.Sequential(
            [
                nxn.Linear(LAST, HIDDEN, key=keys[-2]),
                jax.nn.hard_swish,
                nxn.Dropout(dropout),
                nxn.Linear(HIDDEN, CLASSES, key=keys[-1]),
            ]
        )

    def __call__(self, x, state, *, key=None):  # one image (C, H, W)
        x, state = self.features(x, state)
        return self.classifier(x.mean(axis=(1, 2)), key=key), state


# --- Haiku mirror -----------------------------------------------------------------------------------------------


def hk_conv_norm_activation(cin, cout, kernel, stride=1, groups=1, activation=None):
    layers = [
        nxhk.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nxhk.BatchNorm2d(cout, eps=0.001, momentum=0.01),
    ]
    return nxhk.Sequential(layers if activation is None else [*layers, activation])


class HkInvertedResidual(hk.Module):
    def __init__(self, cin, kernel, expanded, cout, use_se, act, stride, name=None):
        super().__init__(name=name)
        self.use_res_connect = stride == 1 and cin == cout
        activation = jax.nn.hard_swish if act == "HS" else jax.nn.relu
        layers = []
        if expanded != cin:
            layers.append(hk_conv_norm_activation(cin, expanded, 1, activation=activation))
        layers.append(hk_conv_norm_activation(expanded, expanded, kernel, stride, expanded, activation))
        if use_se:
            layers.append(
                nxhk.SqueezeExcitation(expanded, _divisible(expanded // 4), scale_activation=jax.nn.hard_sigmoid)
            )
        layers.append(hk_conv_norm_activation(expanded, cout, 1))
        self.block = nxhk.Sequential(layers, name="block")

    def __call__(self, x, *, inference=False):
        y = self.block(x, inference=inference)
        return x + y if self.use_res_connect else y


class HkMobileNetV3(hk.Module):
    def __init__(self, dropout=0.2, name="mobile_net"):
        super().__init__(name=name)
        layers = [hk_conv_norm_activation(3, STEM, 3, 2, activation=jax.nn.hard_swish)]
        layers += [functools.partial(HkInvertedResidual, *b) for b in BLOCKS]
        layers.append(hk_conv_norm_activation(BLOCKS[-1][3], LAST, 1, activation=jax.nn.hard_swish))
        self.features = nxhk.Sequential(layers, name="features")
        self.classifier = nxhk.Sequential(
            [nxhk.Linear(LAST, HIDDEN), jax.nn.hard_swish, nxhk.Dropout(dropout), nxhk.Linear(HIDDEN, CLASSES)],
            name="classifier",
        )

    def __call__(self, x, *, inference=False):  # (N, C, H, W)
        return self.classifier(self.features(x, inference=inference).mean(axis=(2, 3)), inference=inference)


def _images(n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, IMAGE, IMAGE)).astype(np.float32)


def test_mobilenet_equinox_one_load_eval_and_train():
    tm = torch_mobilenet()
    x = _images()
    # built abstractly (no initialiser runs), then loaded, parameters and running statistics, in one call
    model, state = eqx.filter_eval_shape(eqx.nn.make_with_state(MobileNetV3), jax.random.PRNGKey(0))
    model, state = load_torch_state_dict(model, tm.state_dict(), state=state)
    assert torch_state_dict(model, state=state).keys() == tm.state_dict().keys()

    predict = eqx.filter_jit(lambda m, x, s: jax.vmap(m, in_axes=(0, None), out_axes=(0, None))(x, s))
    with torch.no_grad():
        expected = tm.eval()(torch.from_numpy(x)).numpy()
    logits, same = predict(eqx.nn.inference_mode(model), x, state)
    assert_close(logits, expected, 1e-5, "eval logits")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state), strict=True))

    # training: batch statistics over the vmapped batch, torch's running-statistics update (dropout off in both)
    tm.train()
    tm.classifier[2].p = 0.0
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    train = eqx.tree_at(lambda m: m.classifier.layers[2], model, nxn.Dropout(0.0))  # as torch's, switched off
    step = eqx.filter_jit(lambda m, x, s: jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s))
    logits, state = step(train, x, state)
    assert_close(logits, expected, 1e-5, "train logits")
    exported = torch_state_dict(train, state=state)
    for name, value in tm.state_dict().items():
        assert_close(exported[name], value.numpy(), 1e-6, name)
    assert (
        exported["features.0.1.num_batches_tracked"] == 8
        and exported["features.0.1.num_batches_tracked"].dtype == np.int64
    )


def test_mobilenet_haiku_one_load_eval_and_train():
    tm = torch_mobilenet()
    x = _images()
    f = hk.transform_with_state(lambda x, inference: HkMobileNetV3(dropout=0.0)(x, inference=inference))
    params, state = jax.eval_shape(functools.partial(f.init, inference=True), jax.random.PRNGKey(0), x)
    params, state = nxhk.state_dict_to_params(params, tm.state_dict(), "mobile_net", state=state)
    assert "mobile_net/~/features/~/_1/~/block/~/_0/~/_1" in state  # features.1.block.0.1: torch's path, indices as _N
    apply = jax.jit(f.apply, static_argnums=4)
    with torch.no_grad():
        expected = tm.eval()(torch.from_numpy(x)).numpy()
    logits, _ = apply(params, state, None, x, True)
    assert_close(logits, expected, 1e-5, "eval logits")

    tm.train()
    tm.classifier[2].p = 0.0
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    logits, state = apply(params, state, None, x, False)
    assert_close(logits, expected, 1e-5, "train logits")
    exported = nxhk.params_to_state_dict(params, "mobile_net", state=state)
    for name, value in tm.state_dict().items():
        assert_close(exported[name], value.numpy(), 1e-6, name)


# --- torch: torchvision's VisionTransformer tree, written out -----------------------------------------------------

P, E, H, MLP, DEPTH, VIT_IMAGE = 4, 16, 2, 32, 2, 8
TOKENS = (VIT_IMAGE // P) ** 2 + 1


class TorchMLPBlock(TorchSequential):  # torchvision.ops.MLP as MLPBlock: keys mlp.0, mlp.3
    def __init__(self):
        super().__init__(
            torch.nn.Linear(E, MLP),
            torch.nn.GELU(),
            torch.nn.Dropout(0.0),
            torch.nn.Linear(MLP, E),
            torch.nn.Dropout(0.0),
        )


class TorchEncoderBlock(TorchModule):
    def __init__(self):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(E, eps=1e-6)
        self.self_attention = torch.nn.MultiheadAttention(E, H, batch_first=True)
        self.dropout = torch.nn.Dropout(0.0)
        self.ln_2 = torch.nn.LayerNorm(E, eps=1e-6)
        self.mlp = TorchMLPBlock()

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class TorchEncoder(TorchModule):
    def __init__(self):
        super().__init__()
        self.pos_embedding = torch.nn.Parameter(torch.randn(1, TOKENS, E) * 0.02)
        self.dropout = torch.nn.Dropout(0.0)
        self.layers = torch.nn.Sequential(
            collections.OrderedDict((f"encoder_layer_{i}", TorchEncoderBlock()) for i in range(DEPTH))
        )
        self.ln = torch.nn.LayerNorm(E, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class TorchViT(TorchModule):
    def __init__(self):
        super().__init__()
        self.conv_proj = torch.nn.Conv2d(3, E, P, stride=P)
        self.class_token = torch.nn.Parameter(torch.randn(1, 1, E))
        self.encoder = TorchEncoder()
        self.heads = torch.nn.Sequential(collections.OrderedDict(head=torch.nn.Linear(E, CLASSES)))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


# --- Equinox mirror: noxton's layers, no hand-written Linear, LayerNorm, container or activation table ----------


class EncoderBlock(eqx.Module):
    ln_1: nxn.LayerNorm
    self_attention: nxn.MultiheadAttention
    ln_2: nxn.LayerNorm
    mlp: nxn.Sequential

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.ln_1 = nxn.LayerNorm(E, eps=1e-6)
        self.self_attention = nxn.MultiheadAttention(E, H, key=k1)
        self.ln_2 = nxn.LayerNorm(E, eps=1e-6)
        self.mlp = nxn.Sequential(
            [nxn.Linear(E, MLP, key=k2), gelu, nxn.Dropout(0.0), nxn.Linear(MLP, E, key=k3)] + [nxn.Dropout(0.0)]
        )

    def __call__(self, x, *, key=None):  # (T, E)
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Encoder(eqx.Module):
    pos_embedding: jax.Array
    layers: nxn.Sequential
    ln: nxn.LayerNorm

    def __init__(self, key):
        self.pos_embedding = jnp.zeros((1, TOKENS, E))
        keys = jax.random.split(key, DEPTH)
        self.layers = nxn.Sequential({f"encoder_layer_{i}": EncoderBlock(keys[i]) for i in range(DEPTH)})
        self.ln = nxn.LayerNorm(E, eps=1e-6)


class ViT(eqx.Module):
    conv_proj: nxn.Conv2d
    class_token: jax.Array
    encoder: Encoder
    heads: nxn.Sequential

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv_proj = nxn.Conv2d(3, E, P, stride=P, key=k1)
        self.class_token = jnp.zeros((1, 1, E))
        self.encoder = Encoder(k2)
        self.heads = nxn.Sequential({"head": nxn.Linear(E, CLASSES, key=k3)})

    def __call__(self, x):  # (C, H, W)
        x = self.conv_proj(x).reshape(E, -1).T
        x = jnp.concatenate([self.class_token[0], x]) + self.encoder.pos_embedding[0]
        return self.heads(self.encoder.ln(self.encoder.layers(x))[0])


# --- Haiku mirror: torch's paths from noxton's modules and Sequential, no wrapper modules ------------------------


class HkEncoderBlock(hk.Module):
    def __init__(self, name=None):
        super().__init__(name=name)
        self.ln_1 = nxhk.LayerNorm(E, 1e-6, name="ln_1")
        self.self_attention = nxhk.MultiheadAttention(E, H, name="self_attention")
        self.ln_2 = nxhk.LayerNorm(E, 1e-6, name="ln_2")
        layers = [nxhk.Linear(E, MLP), gelu, nxhk.Dropout(0.0), nxhk.Linear(MLP, E), nxhk.Dropout(0.0)]
        self.mlp = nxhk.Sequential(layers, name="mlp")

    def __call__(self, x):  # (N, T, E)
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class HkViT(hk.Module):
    def __call__(self, x):  # (N, C, H, W)
        x = nxhk.Conv2d(3, E, P, stride=P, name="conv_proj")(x)
        x = x.reshape(x.shape[0], E, -1).transpose(0, 2, 1)
        token = hk.get_parameter("class_token", (1, 1, E), init=jnp.zeros)
        x = jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, E)), x], axis=1)
        with hk.name_scope("encoder"):
            x = x + hk.get_parameter("pos_embedding", (1, TOKENS, E), init=jnp.zeros)
            layers = {f"encoder_layer_{i}": HkEncoderBlock for i in range(DEPTH)}
            x = nxhk.LayerNorm(E, 1e-6, name="ln")(nxhk.Sequential(layers, name="layers")(x))
        return nxhk.Sequential({"head": nxhk.Linear(E, CLASSES)}, name="heads")(x[:, 0])


def _vit_data():
    torch.manual_seed(0)
    tm = TorchViT().train()  # training mode: dropout 0.0, as torchvision's default
    x = np.random.default_rng(0).normal(size=(2, 3, VIT_IMAGE, VIT_IMAGE)).astype(np.float32)
    out = tm(torch.from_numpy(x))
    out.square().sum().backward()
    grads = {n: p.grad.numpy() for n, p in tm.named_parameters()}
    return tm, x, out.detach().numpy(), grads


def test_vit_equinox_named_children_in_order_and_gradients_by_torch_name():
    tm, x, expected, t_grads = _vit_data()
    model = load_torch_state_dict(eqx.filter_eval_shape(ViT, jax.random.PRNGKey(0)), tm.state_dict())

    def loss(m):
        out = jax.vmap(m)(jnp.asarray(x))
        return jnp.sum(jnp.square(out)), out

    (_, out), grads = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(model)
    assert_close(out, expected, 1e-5, "logits")
    grads = torch_state_dict(grads)
    assert grads.keys() == t_grads.keys()
    for name, g in t_grads.items():
        assert_close(grads[name], g, 1e-4, name)
    assert model.encoder.layers.encoder_layer_1 is model.encoder.layers["encoder_layer_1"]


def test_vit_haiku_reaches_torch_paths_and_gradients_by_torch_name():
    tm, x, expected, t_grads = _vit_data()
    f = hk.transform(lambda x: HkViT(name="vit")(x))
    params = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
    assert "vit/encoder/layers/~/encoder_layer_1/~/mlp/~/_3" in params  # torch: encoder.layers.encoder_layer_1.mlp.3
    params = nxhk.state_dict_to_params(params, tm.state_dict(), "vit")

    def loss(p):
        out = f.apply(p, None, x)
        return jnp.sum(jnp.square(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert_close(out, expected, 1e-5, "logits")
    grads = nxhk.params_to_state_dict(grads, "vit")
    assert grads.keys() == t_grads.keys()
    for name, g in t_grads.items():
        assert_close(grads[name], g, 1e-4, name)


def test_named_sequential_runs_in_the_order_given_under_jit_and_after_loading():
    """Twelve named layers: a dict of them would run encoder_layer_10 before encoder_layer_2 once flattened."""
    torch.manual_seed(0)
    names = [f"encoder_layer_{i}" for i in range(12)]
    tm = torch.nn.Sequential(collections.OrderedDict((n, torch.nn.Linear(3, 3)) for n in names))
    keys = jax.random.split(jax.random.PRNGKey(0), 12)
    model = nxn.Sequential({n: nxn.Linear(3, 3, key=k) for n, k in zip(names, keys, strict=True)})
    model = load_torch_state_dict(model, tm.state_dict())
    assert list(torch_state_dict(model)) == list(tm.state_dict())
    x = np.arange(3, dtype=np.float32)
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    assert_close(eqx.filter_jit(lambda m, x: m(x))(model, x), expected, 1e-5, "jitted")
    assert_close(model(x), expected, 1e-5, "eager")

    f = hk.transform(lambda x: nxhk.Sequential({n: nxhk.Linear(3, 3) for n in names}, name="layers")(x))
    params = nxhk.state_dict_to_params(f.init(jax.random.PRNGKey(0), x), tm.state_dict(), "layers")
    assert_close(jax.jit(f.apply)(params, None, x), expected, 1e-5, "haiku")
