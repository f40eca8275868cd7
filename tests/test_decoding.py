"""Decoding with a key/value cache (``init_cache``/``decode``), both front ends: every position equals
the full forward with the causal target mask (torch's, through ``from_torch``), for prefills of every
length, padded prompts, a cache reordered for beam search, and past ``max_len``."""

from __future__ import annotations

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, grid, requires_torch, torch

import noxton.haiku as nxhk
import noxton.nn as nx

E, H, F, S, T = 8, 2, 16, 5, 64  # d_model, heads, feed-forward width, memory length, positions decoded
PREFILL = 8

# Every decoder configuration of the Transformer parity cross-product. The memory key padding is in
# every case, as a batch of two: the first example without padding, the second with.
DECODER_CASES = grid(
    norm_first=[False, True], activation=["relu", "gelu"], bias=[True, False], memory_mask=[False, True]
)


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def _torch_decoder(cfg, dtype, layers=1):
    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(
        E, H, F, dropout=0.1, activation=cfg["activation"], norm_first=cfg["norm_first"], bias=cfg["bias"]
    )
    return torch.nn.TransformerDecoder(layer, layers, norm=torch.nn.LayerNorm(E, bias=cfg["bias"])).to(dtype).eval()


def _inputs(cfg, dtype, batch=2, length=T, seed=0):
    rng = np.random.default_rng(seed)
    tgt = rng.standard_normal((batch, length, E)).astype(dtype)
    memory = rng.standard_normal((batch, S, E)).astype(dtype)
    padding = np.zeros((batch, S), bool)
    padding[-1, -2:] = True
    mask = rng.standard_normal((length, S)).astype(dtype) if cfg.get("memory_mask") else None
    return tgt, memory, padding, mask


def _torch_full(module, tgt, memory, padding, mask):
    """torch's full forward with the causal target mask, batch first."""
    length = tgt.shape[1]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=module.layers[0].linear1.weight.dtype)
    with torch.no_grad():
        out = module(
            torch.tensor(tgt).transpose(0, 1),
            torch.tensor(memory).transpose(0, 1),
            tgt_mask=causal,
            tgt_is_causal=True,
            memory_mask=None if mask is None else torch.tensor(mask),
            memory_key_padding_mask=torch.tensor(padding),
        )
    return out.transpose(0, 1).numpy()


def _equinox_decode(model, tgt, memory, padding, mask, prefill=PREFILL, max_len=None):
    """Prefill ``prefill`` positions in one call, then one at a time in one jitted ``lax.scan``."""
    max_len = tgt.shape[1] if max_len is None else max_len

    def init(m, p):
        return model.init_cache(m, max_len, memory_mask=mask, memory_key_padding_mask=p)

    cache = jax.vmap(init)(memory, padding)
    first, cache = eqx.filter_jit(lambda t, c: jax.vmap(model.decode)(t, c))(tgt[:, :prefill], cache)

    @eqx.filter_jit
    def rest(cache, steps):
        def step(cache, x):
            y, cache = jax.vmap(model.decode)(x[:, None], cache)
            return cache, y[:, 0]

        return jax.lax.scan(step, cache, steps)

    cache, ys = rest(cache, jnp.moveaxis(tgt[:, prefill:], 1, 0))
    return np.concatenate([first, np.moveaxis(np.asarray(ys), 0, 1)], axis=1), cache


def _haiku_fns(make, max_len):
    """``prefill(memory, tgt, padding, mask)`` and ``step(tgt)`` of the Haiku module ``make()``, sharing its state."""

    def prefill(memory, tgt, padding, mask):
        module = make()
        module.init_cache(memory, max_len, memory_mask=mask, memory_key_padding_mask=padding)
        return module.decode(tgt)

    def step(tgt):
        return make().decode(tgt)

    return hk.transform_with_state(prefill), hk.transform_with_state(step)


def _haiku_decode(make, tgt, memory, padding, mask, prefill=PREFILL):
    pre, step = _haiku_fns(make, tgt.shape[1])
    params, _ = pre.init(jax.random.PRNGKey(0), memory, tgt[:, :prefill], padding, mask)
    first, state = jax.jit(pre.apply)(params, {}, None, memory, tgt[:, :prefill], padding, mask)

    @jax.jit
    def rest(state, steps):
        def one(state, x):
            y, state = step.apply(params, state, None, x[:, None])
            return state, y[:, 0]

        return jax.lax.scan(one, state, steps)

    _, ys = rest(state, jnp.moveaxis(tgt[:, prefill:], 1, 0))
    return np.concatenate([first, np.moveaxis(np.asarray(ys), 0, 1)], axis=1)


@requires_torch
@pytest.mark.cross_product
@pytest.mark.parametrize("cfg", DECODER_CASES, ids=_case_id)
def test_equinox_decoding_equals_torch_full_forward(cfg, x64):
    """Prefill 8, then one position at a time to 64: every position is torch's full causal forward (float64),
    with and without memory key padding."""
    module = _torch_decoder(cfg, torch.float64)
    tgt, memory, padding, mask = _inputs(cfg, np.float64)
    out, _ = _equinox_decode(nx.TransformerDecoder.from_torch(module), tgt, memory, padding, mask)
    assert_close(out, _torch_full(module, tgt, memory, padding, mask), 1e-12)


@requires_torch
@pytest.mark.cross_product
@pytest.mark.parametrize("cfg", DECODER_CASES[::6], ids=_case_id)
def test_haiku_decoding_equals_torch_full_forward(cfg, x64):
    """The Haiku front end, its cache in Haiku state, batched: the same positions (float64), two layers."""
    module = _torch_decoder(cfg, torch.float64, layers=2)
    tgt, memory, padding, mask = _inputs(cfg, np.float64)
    out = _haiku_decode(lambda: nxhk.TransformerDecoder.from_torch(module), tgt, memory, padding, mask)
    assert_close(out, _torch_full(module, tgt, memory, padding, mask), 1e-12)


@requires_torch
def test_float32_decoding_both_front_ends():
    cfg = dict(norm_first=False, activation="gelu", bias=True, memory_mask=True)
    module = _torch_decoder(cfg, torch.float32, layers=2)
    tgt, memory, padding, mask = _inputs(cfg, np.float32)
    ref = _torch_full(module, tgt, memory, padding, mask)
    out, _ = _equinox_decode(nx.TransformerDecoder.from_torch(module), tgt, memory, padding, mask)
    assert_close(out, ref, 1e-5)
    out = _haiku_decode(lambda: nxhk.TransformerDecoder.from_torch(module), tgt, memory, padding, mask)
    assert_close(out, ref, 1e-5)


@requires_torch
def test_prefill_of_every_length(x64):
    """Prefill p positions at once, then the rest in a second call, for every p: the same positions."""
    cfg = dict(norm_first=True, activation="relu", bias=True, memory_mask=True)
    module = _torch_decoder(cfg, torch.float64)
    length = 10
    tgt, memory, padding, mask = _inputs(cfg, np.float64, length=length)
    ref = _torch_full(module, tgt, memory, padding, mask)
    model = nx.TransformerDecoder.from_torch(module)
    cache = jax.vmap(lambda m, p: model.init_cache(m, length, mask, p))(memory, padding)
    decode = jax.jit(jax.vmap(model.decode))
    for p in range(1, length):
        first, after = decode(tgt[:, :p], cache)
        rest, _ = decode(tgt[:, p:], after)
        assert_close(np.concatenate([first, rest], 1), ref, 1e-12, name=f"prefill {p}")


@requires_torch
def test_transformer_encodes_once_and_decodes(x64):
    """``nn.Transformer``: ``init_cache`` encodes ``src`` (with its masks), ``decode`` is the decoder's."""
    torch.manual_seed(0)
    tm = torch.nn.Transformer(E, H, 2, 2, F, dropout=0.1).double()  # training mode: decoding is inference anyway
    rng = np.random.default_rng(1)
    src, tgt = rng.standard_normal((2, 6, E)), rng.standard_normal((2, 10, E))
    src_padding = np.zeros((2, 6), bool)
    src_padding[0, -1] = True
    with torch.no_grad():
        ref = (
            tm.eval()(
                torch.tensor(src).transpose(0, 1),
                torch.tensor(tgt).transpose(0, 1),
                tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(10, dtype=torch.float64),
                src_key_padding_mask=torch.tensor(src_padding),
                memory_key_padding_mask=torch.tensor(src_padding),
            )
            .transpose(0, 1)
            .numpy()
        )
    model = nx.Transformer.from_torch(tm.train())
    assert not model.encoder.layers[0].inference

    def init(s, p):
        return model.init_cache(s, 10, src_key_padding_mask=p, memory_key_padding_mask=p)

    cache = jax.vmap(init)(src, src_padding)
    first, cache = jax.vmap(model.decode)(tgt[:, :4], cache)
    rest, _ = jax.vmap(model.decode)(tgt[:, 4:], cache)
    assert_close(np.concatenate([first, rest], 1), ref, 1e-12)

    def hk_fn(s, t, p):
        m = nxhk.Transformer.from_torch(tm)
        m.init_cache(s, 10, src_key_padding_mask=p, memory_key_padding_mask=p)
        return m.decode(t)

    f = hk.transform_with_state(hk_fn)
    params, _ = f.init(jax.random.PRNGKey(0), src, tgt, src_padding)
    assert_close(f.apply(params, {}, None, src, tgt, src_padding)[0], ref, 1e-12)


@pytest.mark.parametrize("front_end", ["equinox", "haiku"])
def test_padding_in_the_prompt(front_end, x64):
    """A left-padded prompt (``tgt_key_padding_mask`` in the prefill): every position equals the full
    forward with that padding and the causal mask, the padded ones included (zeros there, NaN-free)."""
    layer = nx.TransformerDecoderLayer(E, H, F, key=jax.random.PRNGKey(0), dtype=jnp.float64, inference=True)
    rng = np.random.default_rng(2)
    tgt, memory = rng.standard_normal((2, 9, E)), rng.standard_normal((2, S, E))
    padding = np.zeros((2, 9), bool)
    padding[0, :3] = True  # the first prompt is two positions shorter than the second: left-padded
    padding[1, :1] = True
    mask = nx.Transformer.generate_square_subsequent_mask(9, jnp.float64)
    ref = jax.vmap(lambda t, m, p: layer(t, m, tgt_mask=mask, tgt_key_padding_mask=p))(tgt, memory, padding)
    if front_end == "equinox":
        cache = jax.vmap(lambda m: layer.init_cache(m, 9))(memory)
        first, cache = jax.vmap(layer.decode)(tgt[:, :5], cache, padding[:, :5])
        rest, _ = jax.vmap(layer.decode)(tgt[:, 5:], cache)
        out = np.concatenate([first, rest], 1)
    else:
        sd = layer.state_dict()

        def f(t, m, p):
            module = nxhk.TransformerDecoderLayer(E, H, F, dtype=jnp.float64)
            module.init_cache(m, 9)
            first = module.decode(t[:, :5], tgt_key_padding_mask=p)
            return jnp.concatenate([first, module.decode(t[:, 5:])], 1)

        f = hk.transform_with_state(f)
        template, _ = f.init(jax.random.PRNGKey(1), tgt, memory, padding[:, :5])
        params = nxhk.state_dict_to_params(template, sd, "transformer_decoder_layer")
        out = f.apply(params, {}, None, tgt, memory, padding[:, :5])[0]
    assert np.isfinite(out).all()
    assert_close(out, ref, 1e-12)


def test_cache_reordered_for_beam_search(x64):
    """``jax.tree.map(lambda a: a[beams], cache)`` mid-sequence: the beams continue from the chosen histories."""
    layer = nx.TransformerDecoderLayer(E, H, F, key=jax.random.PRNGKey(0), dtype=jnp.float64, inference=True)
    decoder = nx.TransformerDecoder(layer, 2, nx.LayerNorm(E, dtype=jnp.float64))
    rng = np.random.default_rng(3)
    tgt, memory = rng.standard_normal((2, 10, E)), rng.standard_normal((S, E))
    cache = jax.vmap(lambda _: decoder.init_cache(memory, 10))(np.arange(2))
    _, cache = jax.vmap(decoder.decode)(tgt[:, :6], cache)
    beams = np.array([1, 1])  # both beams continue the second history
    cache = jax.tree.map(lambda a: a[beams], cache)
    out, _ = jax.vmap(decoder.decode)(tgt[:, 6:], cache)
    mask = nx.Transformer.generate_square_subsequent_mask(10, jnp.float64)
    for b in range(2):
        history = np.concatenate([tgt[1, :6], tgt[b, 6:]])
        assert_close(out[b], decoder(history, memory, tgt_mask=mask)[6:], 1e-12, name=f"beam {b}")

    # Haiku: the state's leaves have the batch axis, but for the position written (``index``), shared by the batch
    memory2 = np.broadcast_to(memory, (2, S, E))
    template = hk.transform(lambda t, m: _haiku_decoder()(t, m, inference=True))
    params = nxhk.state_dict_to_params(
        template.init(jax.random.PRNGKey(0), tgt, memory2), decoder.state_dict(), "transformer_decoder"
    )

    def prefill(t, m):
        module = _haiku_decoder()
        module.init_cache(m, 10)
        return module.decode(t)

    step = hk.transform_with_state(lambda t: _haiku_decoder().decode(t))
    _, state = hk.transform_with_state(prefill).apply(params, {}, None, tgt[:, :6], memory2)
    state = jax.tree.map(lambda a: a[beams] if a.ndim else a, state)
    out_hk, _ = step.apply(params, state, None, tgt[:, 6:])
    assert_close(out_hk, out, 1e-12)


def _haiku_decoder():
    layer = nxhk.TransformerDecoderLayer(E, H, F, dtype=jnp.float64)
    return nxhk.TransformerDecoder(layer, 2, nxhk.LayerNorm(E, dtype=jnp.float64))


@pytest.mark.parametrize("front_end", ["equinox", "haiku"])
def test_causal_self_attention_sees_every_earlier_position(front_end):
    """flax #5591: a one-position step of causal self-attention attends to every earlier position (and only
    those), as the full causal forward: its output equals it, and depends on every earlier input."""
    mha = nx.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (7, E))
    full, _ = mha(x, x, x, is_causal=True, need_weights=False)
    if front_end == "equinox":

        def last(x):
            cache = mha.init_cache(7)
            for t in range(7):
                y, cache = mha.decode(x[t : t + 1], cache)
            return y[0]
    else:

        def step(x):
            m = nxhk.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True)
            m.init_cache(7)
            return [m.decode(x[t : t + 1]) for t in range(7)][-1][0]

        f = hk.transform_with_state(step)
        template, _ = f.init(jax.random.PRNGKey(1), x)
        params = nxhk.state_dict_to_params(template, mha.state_dict(), "multihead_attention")

        def last(x):
            return f.apply(params, {}, None, x)[0]

    assert_close(last(x), full[6], 1e-6)
    sensitivity = jnp.abs(jax.jit(jax.jacobian(last))(x)).sum(axis=(0, 2))
    assert (sensitivity > 0).all(), sensitivity  # position 6 reads all seven positions


def test_past_max_len():
    """Eager: a ``ValueError``. Under ``jit``: NaN at every position past the end (never a wrong value)."""
    mha = nx.MultiheadAttention(E, H, key=jax.random.PRNGKey(0))
    x = jnp.ones((3, E))
    cache = mha.init_cache(4)
    _, cache = mha.decode(x, cache)
    with pytest.raises(ValueError, match="max_len=4 positions and 3 are written"):
        mha.decode(x[:2], cache)
    step = eqx.filter_jit(lambda x, c: mha.decode(x, c))
    out, cache = step(x[:2], cache)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    out, _ = step(x[:1], cache)
    assert np.isnan(out).all()
    with pytest.raises(ValueError, match="more than the cache's max_len=4"):
        mha.decode(jnp.ones((5, E)), mha.init_cache(4))

    def step(x):
        m = nxhk.MultiheadAttention(E, H)
        m.init_cache(2)
        return m.decode(x)

    f = hk.transform_with_state(step)
    params, _ = f.init(jax.random.PRNGKey(0), x[:2])
    with pytest.raises(ValueError, match="max_len=2"):
        f.apply(params, {}, None, x)


@pytest.mark.own_errors
def test_decoding_errors():
    layer = nx.TransformerDecoderLayer(E, H, F, key=jax.random.PRNGKey(0))
    memory = jnp.ones((S, E))
    cache = layer.init_cache(memory, 4)
    with pytest.raises(TypeError, match="`cache` must be the cache that this module's init_cache made"):
        layer.decode(jnp.ones((1, E)))
    with pytest.raises(TypeError, match="`cache` must be the cache that init_cache made"):
        layer.decode(jnp.ones((1, E)), {"self_attn": cache["multihead_attn"], "multihead_attn": cache["self_attn"]})
    with pytest.raises(TypeError, match="`x` must have the cache's dtype float32, got bfloat16"):
        layer.self_attn.decode(jnp.ones((1, E), jnp.bfloat16), cache["self_attn"])
    with pytest.raises(ValueError, match=r"`tgt` must have d_model=8 features"):
        layer.decode(jnp.ones((1, E + 1)), cache)
    with pytest.raises(ValueError, match="`max_len` must be a positive int"):
        layer.init_cache(memory, 0)

    def haiku(fn):
        return hk.transform_with_state(fn).init(jax.random.PRNGKey(0), jnp.ones((2, 1, E)))

    with pytest.raises(TypeError, match="`cache` must be None in noxton.haiku"):
        haiku(lambda x: nxhk.MultiheadAttention(E, H).decode(x, {}))
    with pytest.raises(ValueError, match="has no cache in its Haiku state: call init_cache"):
        haiku(lambda x: nxhk.MultiheadAttention(E, H).decode(x))
    with pytest.raises(ValueError, match=r"`x` must have shape \(\*batch, n, E\) = \(3, 'n', 8\)"):
        haiku(lambda x: _init_then_decode(x, batch_shape=(3,)))


def _init_then_decode(x, batch_shape):
    m = nxhk.MultiheadAttention(E, H)
    m.init_cache(4, batch_shape=batch_shape)
    return m.decode(x)
