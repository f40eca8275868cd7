"""The torch-layout building blocks (Conv1d/2d, BatchNorm1d/2d, Dropout, Sequential, from_torch) against torch,
and the errors a port meets with them."""

from __future__ import annotations

import collections

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, requires_torch, torch

import noxton.haiku as nxhk
import noxton.nn as nxn
from noxton.interop import load_torch_state_dict, torch_state_dict

pytestmark = requires_torch


@pytest.mark.parametrize(
    ("shape", "momentum"), [((5, 3), 0.1), ((4, 3, 6), None)], ids=["NC-momentum=0.1", "NCL-momentum=None"]
)
def test_batch_norm1d_trains_and_evaluates_as_torch(shape, momentum):
    """Two training steps (running statistics with the unbiased variance, the counter), then evaluation."""
    torch.manual_seed(0)
    tm = torch.nn.BatchNorm1d(3, momentum=momentum)
    with torch.no_grad():
        tm.weight.uniform_(0.5, 1.5)
        tm.bias.uniform_(-0.5, 0.5)
    xs = [np.random.default_rng(i).normal(size=shape).astype(np.float32) for i in range(3)]
    f = hk.transform_with_state(lambda x, inference: nxhk.BatchNorm1d.from_torch(tm)(x, inference=inference))
    params, state = f.init(None, xs[0], True)
    layer = nxn.BatchNorm1d.from_torch(tm)
    eqx_state = eqx.nn.State(layer)
    train = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    for x in xs[:2]:
        expected = tm(torch.from_numpy(x)).detach().numpy()
        y, state = f.apply(params, state, None, x, False)
        assert_close(y, expected, 1e-5, "haiku train")
        y, eqx_state = train(x, eqx_state)
        assert_close(y, expected, 1e-5, "equinox train")
    tm.eval()
    expected = tm(torch.from_numpy(xs[2])).detach().numpy()
    assert_close(f.apply(params, state, None, xs[2], True)[0], expected, 1e-5, "haiku eval")
    evaluate = jax.vmap(eqx.nn.inference_mode(layer), in_axes=(0, None), out_axes=(0, None))
    assert_close(evaluate(xs[2], eqx_state)[0], expected, 1e-5, "equinox eval")
    for name, value in tm.state_dict().items():
        assert_close(nxhk.params_to_state_dict(params, "batch_norm1d", state=state)[name], value.numpy(), 1e-6, name)
        assert_close(torch_state_dict(layer, state=eqx_state)[name], value.numpy(), 1e-6, name)


@pytest.mark.parametrize(
    "options",
    [dict(stride=2, padding=1, groups=2, dilation=1), dict(stride=1, padding="same", dilation=2, groups=1)],
    ids=["strided-grouped", "same-dilated"],
)
def test_conv_from_torch_matches_torch(options):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for tm, x in [
        (torch.nn.Conv1d(4, 6, 3, **options), rng.normal(size=(2, 4, 9)).astype(np.float32)),
        (torch.nn.Conv2d(4, 6, (3, 2), **options), rng.normal(size=(2, 4, 7, 6)).astype(np.float32)),
    ]:
        expected = tm(torch.from_numpy(x)).detach().numpy()
        layer = nxn.from_torch(tm)
        assert layer.bias.shape == (6,)
        assert_close(jax.vmap(layer)(x), expected, 1e-5, f"equinox {type(tm).__name__}")
        f = hk.transform(lambda x, tm=tm: nxhk.from_torch(tm)(x))
        assert_close(f.apply(f.init(None, x), None, x), expected, 1e-5, f"haiku {type(tm).__name__}")


def test_sequential_from_torch_keeps_names_and_dropout_follows_the_mode():
    tm = torch.nn.Sequential(
        collections.OrderedDict(c_fc=torch.nn.Linear(4, 8), gelu=torch.nn.GELU(), drop=torch.nn.Dropout(0.5))
    ).train()
    seq = nxn.Sequential.from_torch(tm)
    assert seq.names == ("c_fc", "gelu", "drop") and not seq.drop.inference
    assert list(seq.state_dict()) == list(tm.state_dict())
    x = jnp.ones(4)
    dropped = seq(x, key=jax.random.PRNGKey(0))
    kept = eqx.nn.inference_mode(seq)(x)
    assert np.all((np.asarray(dropped) == 0) | np.isclose(dropped, 2 * kept))
    with torch.no_grad():
        assert_close(kept, tm.eval()(torch.from_numpy(np.ones(4, np.float32))).numpy(), 1e-6, "eval")


@pytest.mark.own_errors
def test_index_against_name_is_explained():
    model = nxn.Sequential({"c_fc": nxn.Linear(2, 2, key=jax.random.PRNGKey(0))})
    with pytest.raises(
        ValueError, match=r"child 'c_fc' of the model is the state_dict's '0': a name where torch has an index"
    ):
        load_torch_state_dict(model, {"0.weight": np.zeros((2, 2)), "0.bias": np.zeros(2)})
    model = {"mlp": nxn.Sequential([nxn.Linear(2, 2, key=jax.random.PRNGKey(0))])}
    with pytest.raises(
        ValueError, match=r"child '0' of mlp is the state_dict's 'c_fc': an index where torch has a name"
    ):
        load_torch_state_dict(model, {"mlp.c_fc.weight": np.zeros((2, 2)), "mlp.c_fc.bias": np.zeros(2)})


@pytest.mark.own_errors
def test_state_errors_say_what_to_pass():
    bn, state = eqx.nn.make_with_state(nxn.BatchNorm2d)(2)
    sd = torch.nn.BatchNorm2d(2).state_dict()
    with pytest.raises(TypeError, match=r"`state` must be the model's eqx.nn.State .* \(running_mean, BatchNorm's"):
        load_torch_state_dict(bn, sd)
    with pytest.raises(TypeError, match=r"`state` must be given: BatchNorm2d keeps state"):
        nxn.Sequential([bn])(jnp.ones((2, 3, 3)))
    f = hk.transform_with_state(lambda x: nxhk.BatchNorm2d(2)(x))
    params, hk_state = f.init(None, jnp.ones((1, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"running_mean and the like are torch buffers .* Haiku state: pass state="):
        nxhk.state_dict_to_params(params, sd, "batch_norm2d")
    with pytest.raises(ValueError, match=r"`x` must have num_features=2 channels at axis 1"):
        f.apply(params, hk_state, None, jnp.ones((1, 3, 3, 3)))


@pytest.mark.own_errors
def test_construction_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"`kernel_size` must be an int or a tuple of 2 ints, got \(3, 3, 3\)"):
        nxn.Conv2d(2, 2, (3, 3, 3), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"`groups` must divide in_channels and out_channels"):
        nxn.Conv2d(3, 2, 1, groups=2, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"`padding='same'` needs stride 1"):
        nxn.Conv1d(2, 2, 3, stride=2, padding="same", key=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match=r"`module` must be a torch module that noxton converts .* got Embedding"):
        nxn.from_torch(torch.nn.Embedding(3, 2))
    with pytest.raises(ValueError, match=r"`module.padding_mode` must be 'zeros', got 'reflect'"):
        nxn.from_torch(torch.nn.Conv1d(2, 2, 3, padding_mode="reflect"))

    def built_outside():
        linear = hk.Linear(2)
        return nxhk.Sequential([linear])

    with pytest.raises(TypeError, match=r"`layers\['0'\]` is a Linear instance, built outside this Sequential"):
        hk.transform(built_outside).init(None)


@pytest.mark.parametrize("batch_first", [False, True])
def test_batch_first_is_carried_by_from_torch(batch_first):
    """torch's layout as the torch module takes it; (L, N, E) with L == N, where a wrong axis runs silently."""
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    x = np.random.default_rng(0).normal(size=(4, 4, 8)).astype(np.float32)
    t_out, t_w = (t.detach().numpy() for t in tm(*(torch.from_numpy(x),) * 3))
    mha = nxn.MultiheadAttention.from_torch(tm)
    assert mha.batch_first is batch_first and mha.batch_axis == (0 if batch_first else 1)
    out, w = jax.vmap(lambda x: mha(x, x, x), in_axes=mha.batch_axis, out_axes=(mha.batch_axis, 0))(x)
    assert_close(out, t_out, 1e-5, "equinox output")
    assert_close(w, t_w, 1e-6, "equinox weights")
    f = hk.transform(lambda x: nxhk.MultiheadAttention.from_torch(tm)(x, x, x, inference=True))
    out, w = f.apply(f.init(None, x), None, x)
    assert_close(out, t_out, 1e-5, "haiku output")
    assert_close(w, t_w, 1e-6, "haiku weights")


@pytest.mark.own_errors
def test_batch_first_errors():
    with pytest.raises(TypeError, match=r"`batch_first` must be None, True or False"):
        nxn.MultiheadAttention(8, 2, batch_first=1, key=jax.random.PRNGKey(0))
    f = hk.transform(lambda x: nxhk.MultiheadAttention(8, 2, batch_first=False)(x, x, x))
    with pytest.raises(ValueError, match=r"With batch_first=False, query, key and value must be torch's \(L, N, E\)"):
        f.init(jax.random.PRNGKey(0), jnp.ones((2, 3, 4, 8)))


class QuickGELU(torch.nn.Module if torch is not None else object):  # open_clip's (OpenAI CLIP's), by name
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def test_open_clip_mlp_from_torch_in_both_front_ends():
    """open_clip's ``mlp``: an ``nn.Sequential(OrderedDict(c_fc=..., gelu=QuickGELU(), c_proj=...))``."""
    torch.manual_seed(0)
    tm = torch.nn.Sequential(
        collections.OrderedDict(c_fc=torch.nn.Linear(4, 16), gelu=QuickGELU(), c_proj=torch.nn.Linear(16, 4))
    )
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    expected = tm(torch.from_numpy(x)).detach().numpy()
    assert_close(nxn.from_torch(tm)(x), expected, 1e-6, "equinox")
    f = hk.transform(lambda x: nxhk.Sequential.from_torch(tm, name="mlp")(x))
    params = f.init(None, x)
    assert sorted(params) == ["mlp/~/c_fc", "mlp/~/c_proj"]
    assert_close(f.apply(params, None, x), expected, 1e-6, "haiku")
