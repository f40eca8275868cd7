"""Bad settings and inputs, exhaustively: each raises the documented error, naming the argument.

Every row of ``CASES`` is one bad constructor argument, call argument, mask,
dtype or ``state_dict``; it must raise the given exception type with a message
matching the pattern (which names the offending argument), and the layer it
was called on must be left exactly as it was (same parameters, bit for bit,
and the same output afterwards). No torch needed: ``state_dict`` rows use the
layers' own ``state_dict()``.
"""

from __future__ import annotations

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import torch, trees_equal

import noxton.haiku as nxhk
import noxton.nn as nx
from noxton.nn import MultiheadAttention, SqueezeExcitation

# Every row asserts noxton's own message, with the run-time type checks off (conftest.py).
pytestmark = pytest.mark.own_errors

E, H, L, S, C = 8, 2, 3, 4, 6
K0 = jax.random.PRNGKey(0)


def _layers():
    return {
        "mha": MultiheadAttention(E, H, key=K0),
        "mha_kv": MultiheadAttention(E, H, kdim=5, vdim=7, key=K0),
        "mha_drop": MultiheadAttention(E, H, dropout=0.5, key=K0),
        "se": SqueezeExcitation(C, 2, key=K0),
    }


def _inputs():
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    return (
        jax.random.normal(k[0], (L, E)),
        jax.random.normal(k[1], (S, E)),
        jax.random.normal(k[2], (S, E)),
    )


def _call(layer_name, **overrides):
    """A row that calls the named layer with good inputs, except for ``overrides``."""

    def run(layers):
        q, k, v = _inputs()
        args = dict(query=q, key=k, value=v)
        args.update(overrides)
        return layers[layer_name](**args)

    return layer_name, run


def _se_call(x=None, **kw):
    def run(layers):
        return layers["se"](jnp.ones((C, 3, 3)) if x is None else x, **kw)

    return "se", run


def _construct(cls, *args, **kw):
    kw.setdefault("key", K0)
    return None, lambda layers: cls(*args, **kw)


def _load(layer_name, edit):
    def run(layers):
        sd = dict(layers[layer_name].state_dict())
        return layers[layer_name].load_state_dict(edit(sd))

    return layer_name, run


def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _reshape(key, shape):
    return lambda sd: {**sd, key: np.zeros(shape, np.float32)}


def _haiku_init(fn, x):
    """A row that initialises a Haiku-transformed ``fn`` (the modules check their settings there)."""
    return None, lambda layers: hk.transform(fn).init(K0, x)


def _haiku_apply(module_kw, call_kw):
    """A row that applies a Haiku MultiheadAttention (params from a good init) with ``call_kw``."""

    def run(layers):
        x = jnp.ones((L, E))
        good = hk.transform(lambda x: nxhk.MultiheadAttention(E, H, **module_kw)(x, x, x, inference=True))
        bad = hk.transform(lambda x: nxhk.MultiheadAttention(E, H, **module_kw)(x, x, x, **call_kw))
        return bad.apply(good.init(K0, x), None, x)

    return None, run


def _interop(fn):
    """A row that passes a Haiku MultiheadAttention's params tree to an interop function."""

    def run(layers):
        x = jnp.ones((L, E))
        return fn(hk.transform(lambda x: nxhk.MultiheadAttention(E, H)(x, x, x)).init(K0, x))

    return None, run


class _UnhashableRelu:
    """relu, unfit as a static field of an Equinox module."""

    __hash__ = None  # type: ignore[assignment]

    def __call__(self, x):
        return jax.nn.relu(x)


FF = 16  # the Transformer rows' dim_feedforward (d_model E, nhead H, length S)


def _tf_layer(**kw):
    """A row that builds an Equinox encoder layer with ``kw`` over good settings."""
    return None, lambda layers: nx.TransformerEncoderLayer(
        **{"d_model": E, "nhead": H, "dim_feedforward": FF, **kw}, key=K0
    )


def _tf_call(**kw):
    """A row that calls an Equinox encoder layer (no dropout) with ``kw`` over a good ``src``."""

    def run(layers):
        return nx.TransformerEncoderLayer(E, H, FF, dropout=0.0, key=K0)(**{"src": jnp.ones((S, E)), **kw})

    return None, run


def _tf_haiku(build, x, **kw):
    """A row that initialises ``build()`` (a Haiku module) and calls it on ``x`` with ``kw``."""

    def run(layers):
        f = hk.transform(lambda x: build()(x, **kw))
        return f.apply(f.init(K0, x), None, x)

    return None, run


def _good_tf_layer():
    return nx.TransformerEncoderLayer(E, H, FF, key=K0)


CASES = [
    # --- constructor: MultiheadAttention -----------------------------------------
    ("embed_dim_zero", *_construct(MultiheadAttention, 0, 1), ValueError, r"`embed_dim` must be a positive int"),
    ("embed_dim_float", *_construct(MultiheadAttention, 8.0, 2), TypeError, r"`embed_dim` must be a positive int"),
    ("num_heads_zero", *_construct(MultiheadAttention, 8, 0), ValueError, r"`num_heads` must be a positive int"),
    ("num_heads_bool", *_construct(MultiheadAttention, 8, True), TypeError, r"`num_heads` must be a positive int"),
    (
        "not_divisible",
        *_construct(MultiheadAttention, 8, 3),
        ValueError,
        r"`embed_dim` must be divisible by `num_heads`",
    ),
    ("dropout_one", *_construct(MultiheadAttention, 8, 2, dropout=1.0), ValueError, r"`dropout` must be in \[0, 1\)"),
    ("dropout_negative", *_construct(MultiheadAttention, 8, 2, dropout=-0.1), ValueError, r"`dropout` must be in"),
    ("dropout_str", *_construct(MultiheadAttention, 8, 2, dropout="0.1"), TypeError, r"`dropout` must be a float"),
    ("bias_int", *_construct(MultiheadAttention, 8, 2, bias=1), TypeError, r"`bias` must be a bool"),
    (
        "add_bias_kv_str",
        *_construct(MultiheadAttention, 8, 2, add_bias_kv="yes"),
        TypeError,
        r"`add_bias_kv` must be a bool",
    ),
    (
        "add_zero_attn_none",
        *_construct(MultiheadAttention, 8, 2, add_zero_attn=None),
        TypeError,
        r"`add_zero_attn` must be a bool",
    ),
    ("kdim_zero", *_construct(MultiheadAttention, 8, 2, kdim=0), ValueError, r"`kdim` must be a positive int"),
    ("vdim_negative", *_construct(MultiheadAttention, 8, 2, vdim=-1), ValueError, r"`vdim` must be a positive int"),
    (
        "inference_int",
        *_construct(MultiheadAttention, 8, 2, inference=1),
        TypeError,
        r"`inference` must be a Python bool",
    ),
    (
        "dtype_int",
        *_construct(MultiheadAttention, 8, 2, dtype=jnp.int32),
        TypeError,
        r"`dtype` must be a floating dtype",
    ),
    (
        "dtype_junk",
        *_construct(MultiheadAttention, 8, 2, dtype="not-a-dtype"),
        TypeError,
        r"`dtype` must be a floating dtype",
    ),
    # --- constructor: SqueezeExcitation and the Haiku modules ----------------------
    ("se_channels_zero", *_construct(SqueezeExcitation, 0, 2), ValueError, r"`input_channels` must be a positive int"),
    (
        "se_squeeze_float",
        *_construct(SqueezeExcitation, 6, 2.5),
        TypeError,
        r"`squeeze_channels` must be a positive int",
    ),
    (
        "se_dtype_bool",
        *_construct(SqueezeExcitation, 6, 2, dtype=jnp.bool_),
        TypeError,
        r"`dtype` must be a floating dtype",
    ),
    (
        "haiku_num_heads_negative",
        *_haiku_init(lambda x: nxhk.MultiheadAttention(E, -2)(x, x, x), jnp.ones((L, E))),
        ValueError,
        r"`num_heads` must be a positive int",
    ),
    (
        "haiku_se_activation_str",
        *_haiku_init(lambda x: nxhk.SqueezeExcitation(C, 2, activation="relu")(x), jnp.ones((C, 3, 3))),
        TypeError,
        r"`activation` must be a callable",
    ),
    (
        "se_constructor_activation_str",
        *_construct(SqueezeExcitation, C, 2, activation="relu"),
        TypeError,
        r"`activation` must be a callable",
    ),
    # --- call: MultiheadAttention inputs -----------------------------------------------
    (
        "query_rank3",
        *_call("mha", query=jnp.ones((2, L, E))),
        ValueError,
        r"`query` must have shape \(L, E\), got shape \(2, 3, 8\).*jax\.vmap",
    ),
    ("query_rank1", *_call("mha", query=jnp.ones((E,))), ValueError, r"`query` must have shape \(L, E\)"),
    ("query_int", *_call("mha", query=jnp.ones((L, E), jnp.int32)), TypeError, r"`query` must have a floating dtype"),
    ("query_list", *_call("mha", query=[[0.0] * E] * L), TypeError, r"`query` must be an array"),
    ("query_embed_dim", *_call("mha", query=jnp.ones((L, E + 1))), ValueError, r"`query` must have embed_dim=8"),
    ("key_kdim", *_call("mha_kv", key=jnp.ones((S, 6)), value=jnp.ones((S, 7))), ValueError, r"`key` must have kdim=5"),
    (
        "value_vdim",
        *_call("mha_kv", key=jnp.ones((S, 5)), value=jnp.ones((S, 5))),
        ValueError,
        r"`value` must have vdim=7",
    ),
    (
        "key_value_lengths",
        *_call("mha", value=jnp.ones((S + 1, E))),
        ValueError,
        r"`key` and `value` must have the same sequence length",
    ),
    (
        "key_dtype",
        *_call("mha", key=jnp.ones((S, E), jnp.float16)),
        TypeError,
        r"`key` must have the same dtype as `query`",
    ),
    ("value_rank3", *_call("mha", value=jnp.ones((1, S, E))), ValueError, r"`value` must have shape \(S, vdim\)"),
    ("need_weights_str", *_call("mha", need_weights="yes"), TypeError, r"`need_weights` must be a bool"),
    ("average_none", *_call("mha", average_attn_weights=None), TypeError, r"`average_attn_weights` must be a bool"),
    ("is_causal_int", *_call("mha", is_causal=1), TypeError, r"`is_causal` must be a bool"),
    (
        "dropout_without_key",
        *_call("mha_drop"),
        ValueError,
        r"dropout=0\.5 is active but no dropout key was given: pass `dropout_key=`",
    ),
    # --- call: masks -----------------------------------------------------------------------
    (
        "kpm_shape",
        *_call("mha", key_padding_mask=jnp.zeros((S + 1,), bool)),
        ValueError,
        r"`key_padding_mask` must have shape \(4,\)",
    ),
    (
        "kpm_int",
        *_call("mha", key_padding_mask=jnp.zeros((S,), jnp.int32)),
        TypeError,
        r"`key_padding_mask` must be bool .* or floating",
    ),
    (
        "kpm_list",
        *_call("mha", key_padding_mask=[False] * S),
        TypeError,
        r"`key_padding_mask` must be a bool or floating array",
    ),
    (
        "attn_mask_shape",
        *_call("mha", attn_mask=jnp.zeros((L, S + 1), bool)),
        ValueError,
        r"`attn_mask` must have shape \(3, 4\) or \(2, 3, 4\)",
    ),
    (
        "attn_mask_heads",
        *_call("mha", attn_mask=jnp.zeros((H + 1, L, S), bool)),
        ValueError,
        r"`attn_mask` must have shape",
    ),
    ("attn_mask_rank1", *_call("mha", attn_mask=jnp.zeros((S,), bool)), ValueError, r"`attn_mask` must have shape"),
    (
        "attn_mask_uint8",
        *_call("mha", attn_mask=jnp.zeros((L, S), jnp.uint8)),
        TypeError,
        r"`attn_mask` must be bool .* or floating",
    ),
    # --- call: the Haiku module ---------------------------------------------------------
    (
        "haiku_dropout_without_rng",
        *_haiku_apply(dict(dropout=0.5), {}),
        ValueError,
        r"no dropout key.*`rng`.*`inference=True`",
    ),
    ("haiku_inference_str", *_haiku_apply({}, dict(inference="no")), TypeError, r"`inference` must be a Python bool"),
    # --- call: SqueezeExcitation --------------------------------------------------------
    ("se_x_rank2", *_se_call(jnp.ones((C, 3))), ValueError, r"`x` must have shape \(C, H, W\)"),
    (
        "se_x_rank4",
        *_se_call(jnp.ones((1, C, 3, 3))),
        ValueError,
        r"`x` must have shape \(C, H, W\), got shape \(1, 6, 3, 3\).*jax\.vmap",
    ),
    ("se_x_channels", *_se_call(jnp.ones((C + 1, 3, 3))), ValueError, r"`x` must have input_channels=6"),
    ("se_x_int", *_se_call(jnp.ones((C, 3, 3), jnp.int32)), TypeError, r"`x` must have a floating dtype"),
    ("se_activation_str", *_se_call(activation="relu"), TypeError, r"`activation` must be a callable"),
    ("se_scale_activation_int", *_se_call(scale_activation=3), TypeError, r"`scale_activation` must be a callable"),
    # --- state_dict loading --------------------------------------------------------------
    (
        "sd_packed_into_separate",
        *_load(
            "mha_kv",
            lambda sd: {
                **_drop("q_proj_weight")(_drop("k_proj_weight")(_drop("v_proj_weight")(sd))),
                "in_proj_weight": np.zeros((3 * E, E), np.float32),
            },
        ),
        ValueError,
        r"missing keys: q_proj_weight, k_proj_weight, v_proj_weight\n.*unexpected keys: in_proj_weight",
    ),
    ("sd_not_mapping", *_load("mha", lambda sd: list(sd.items())), TypeError, r"`state_dict` must be a mapping"),
    ("se_sd_missing", *_load("se", _drop("fc2.bias")), ValueError, r"missing keys: fc2\.bias"),
    (
        "se_sd_misshapen",
        *_load("se", _reshape("fc1.weight", (2, C))),
        ValueError,
        r"size mismatch for fc1\.weight: expected shape \(2, 6, 1, 1\), got \(2, 6\)",
    ),
    # --- the Transformer layers and the building blocks, both front ends ------------
    ("tf_nhead_divides", *_tf_layer(nhead=3), ValueError, r"`d_model` must be divisible by `nhead`, got d_model=8"),
    ("tf_nhead_zero", *_tf_layer(nhead=0), ValueError, r"`nhead` must be a positive int, got 0"),
    ("tf_dim_feedforward", *_tf_layer(dim_feedforward=2.5), TypeError, r"`dim_feedforward` must be a positive int"),
    ("tf_dropout", *_tf_layer(dropout=1.0), ValueError, r"`dropout` must be in \[0, 1\), got 1.0"),
    (
        "tf_activation_name",
        *_tf_layer(activation="tanh"),
        ValueError,
        r"`activation` must be 'relu', 'gelu' or a callable, got 'tanh'",
    ),
    *(
        [
            (
                "tf_activation_torch",
                *_tf_layer(activation=torch.nn.GELU()),
                TypeError,
                r"`activation` must be a JAX function, got the torch module GELU: pass noxton.functional.gelu",
            )
        ]
        if torch is not None
        else []
    ),
    (
        "tf_activation_unhashable",
        *_tf_layer(activation=_UnhashableRelu()),
        TypeError,
        r"`activation` must be hashable, as a static field of an Equinox module is .* got the unhashable "
        r"_UnhashableRelu",
    ),
    ("tf_layer_norm_eps", *_tf_layer(layer_norm_eps=0.0), ValueError, r"`layer_norm_eps` must be a positive float"),
    ("tf_norm_first", *_tf_layer(norm_first="yes"), TypeError, r"`norm_first` must be a bool, got 'yes'"),
    ("tf_key", *_construct(nx.TransformerEncoderLayer, E, H, FF, key=None), TypeError, r"`key` must be a PRNG key"),
    (
        "tf_num_layers",
        None,
        lambda layers: nx.TransformerEncoder(_good_tf_layer(), 0),
        ValueError,
        r"`num_layers` must be a positive int, got 0",
    ),
    (
        "tf_encoder_layer_type",
        None,
        lambda layers: nx.TransformerEncoder(nx.TransformerDecoderLayer(E, H, FF, key=K0), 2),
        TypeError,
        r"`encoder_layer` must be a noxton.nn.TransformerEncoderLayer, got TransformerDecoderLayer",
    ),
    (
        "tf_norm_type",
        None,
        lambda layers: nx.TransformerEncoder(_good_tf_layer(), 2, norm="layer_norm"),
        TypeError,
        r"`norm` must be an Equinox module \(a noxton.nn.LayerNorm\) or None, got str",
    ),
    (
        "tf_src_batched",
        *_tf_call(src=jnp.ones((2, S, E))),
        ValueError,
        r"`src` must have shape \(S, E\), got shape \(2, 4, 8\) \(rank 3\)\. Batch it with `jax.vmap`",
    ),
    (
        "tf_src_width",
        *_tf_call(src=jnp.ones((S, E + 1))),
        ValueError,
        r"`src` must have d_model=8 features in its last axis, got shape \(4, 9\)",
    ),
    ("tf_src_int", *_tf_call(src=jnp.ones((S, E), jnp.int32)), TypeError, r"`src` must have a floating dtype"),
    ("tf_is_causal", *_tf_call(is_causal="yes"), TypeError, r"`is_causal` must be a bool, got 'yes'"),
    ("tf_padding_shape", *_tf_call(src_key_padding_mask=jnp.zeros((S + 1,), bool)), ValueError, r"key_padding_mask"),
    ("tf_option", *_tf_call(inference=True), TypeError, r"unexpected keyword argument 'inference'"),
    (
        "tf_dropout_key",
        None,
        lambda layers: _good_tf_layer()(jnp.ones((S, E))),
        ValueError,
        r"dropout=0.1 is active but no dropout key was given: pass `dropout_key=`",
    ),
    (
        "tf_haiku_dropout_rng",
        *_tf_haiku(lambda: nxhk.TransformerEncoderLayer(E, H, FF), jnp.ones((2, S, E))),
        ValueError,
        r"no dropout key was given: pass a key as `rng` to `apply`",
    ),
    (
        "tf_haiku_template",
        None,
        lambda layers: hk.transform(lambda: nxhk.TransformerEncoder(nxhk.LayerNorm(E), 2)).init(K0),
        TypeError,
        r"`encoder_layer` must be a noxton.haiku.TransformerEncoderLayer .* got LayerNorm",
    ),
    (
        "tf_haiku_src_width",
        *_tf_haiku(lambda: nxhk.TransformerEncoderLayer(E, H, FF), jnp.ones((S, E + 1)), inference=True),
        ValueError,
        r"`src` must have d_model=8 features",
    ),
    ("linear_in_features", *_construct(nx.Linear, 0, 3), ValueError, r"`in_features` must be a positive int, got 0"),
    ("linear_bias", *_construct(nx.Linear, 2, 3, "yes"), TypeError, r"`bias` must be a bool, got 'yes'"),
    (
        "linear_from_arrays_bias",
        None,
        lambda layers: nx.Linear.from_arrays(jnp.ones((3, 2)), jnp.ones((2,))),
        ValueError,
        r"`bias` must have shape \(3,\), got \(2,\)",
    ),
    (
        "linear_from_arrays_weight",
        None,
        lambda layers: nx.Linear.from_arrays(jnp.ones((3,))),
        ValueError,
        r"`weight` must be an array of shape \(out_features, in_features\), got \(3,\)",
    ),
    ("layer_norm_eps", None, lambda layers: nx.LayerNorm(E, eps=-1.0), ValueError, r"`eps` must be a positive float"),
    (
        "conv_channels",
        None,
        lambda layers: nx.PointwiseConv2d(C, 2, key=K0)(jnp.ones((C + 1, 3, 3))),
        ValueError,
        r"`x` must have in_channels=6 channels at axis -3",
    ),
    (
        "interop_wrong_module",
        *_interop(lambda p: nxhk.state_dict_to_params(p, {}, "attention")),
        ValueError,
        r"`module` 'attention' matches no module",
    ),
    (
        "interop_export_wrong_module",
        *_interop(lambda p: nxhk.params_to_state_dict(p, "encoder")),
        ValueError,
        r"`module` 'encoder' matches no module",
    ),
]


def _snapshot(layer):
    return jax.tree_util.tree_map(lambda a: np.array(a, copy=True), eqx.filter(layer, eqx.is_array))


@pytest.fixture(scope="module")
def layers():
    return _layers()


def _reference_output(name, layer):
    if name == "se":
        return layer(jnp.ones((C, 3, 3)))
    q, k, v = _inputs()
    if name == "mha_kv":
        k, v = jnp.ones((S, 5)), jnp.ones((S, 7))
    return layer(q, k, v, dropout_key=K0)[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_leaves_layer_unchanged(case, layers):
    _, layer_name, run, exc, pattern = case
    layer = layers.get(layer_name) if layer_name else None
    if layer is not None:
        before = _snapshot(layer)
        before_out = np.asarray(_reference_output(layer_name, layer))
    with pytest.raises(exc, match=pattern):
        run(layers)
    if layer is not None:
        assert trees_equal(_snapshot(layer), before), "the failed call changed the layer's parameters"
        np.testing.assert_array_equal(np.asarray(_reference_output(layer_name, layer)), before_out)
