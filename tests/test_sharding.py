"""More than one device: data parallel and head-sharded tensor parallel on 8 CPU devices.

``conftest.py`` gives the test session eight CPU devices. The test executes the
Python blocks of docs/multiple_devices.md verbatim (so the page stays true), then
checks the same patterns further: a layer with separate q/k/v projections and
``bias_k``/``bias_v``, a 2-D ``(data, heads)`` mesh, the Haiku front end with
head-sharded params, and SqueezeExcitation data parallel. Each sharded result
equals the single-device one, and the arrays are laid out as the page says.
"""

from __future__ import annotations

import os
import re

import equinox as eqx
import haiku as hk
import jax
import numpy as np
import pytest
from helpers import assert_close
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import noxton.haiku as nxhk
from noxton.nn import MultiheadAttention, SqueezeExcitation

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "multiple_devices.md")
TOL = 1e-6


def devices_of(a):
    return len({s.device for s in a.addressable_shards if s.data.size})


def shard_shapes(a):
    return sorted({tuple(s.data.shape) for s in a.addressable_shards})


@pytest.fixture(scope="module")
def page():
    """The namespace left by the page's Python blocks, run in order."""
    assert len(jax.devices()) == 8
    with open(PAGE, encoding="utf-8") as f:
        text = f.read()
    start = text.index("# Multiple devices")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start : end if end != -1 else len(text)], flags=re.S)
    assert blocks
    ns: dict = {"__name__": "multiple_devices"}
    for block in blocks:
        exec(compile(block, "docs/multiple_devices.md", "exec"), ns)  # noqa: S102
    return ns


def test_page_data_and_tensor_parallel(page):
    assert_close(page["out_dp"], page["reference"], TOL, "data parallel")
    assert_close(page["out_tp"], page["reference"], TOL, "tensor parallel")
    # the output batch of 16 is split 2 per device over 8 devices
    assert devices_of(page["out_dp"]) == 8 and shard_shapes(page["out_dp"]) == [(2, 10, 64)]
    # in_proj_weight (192, 64) in 8 row blocks of whole heads (3 x head_dim = 24 rows),
    # out_proj.weight (64, 64) in 8 column blocks of one head each
    tp = page["mha_tp"]
    assert devices_of(tp.in_proj_weight) == 8 and shard_shapes(tp.in_proj_weight) == [(24, 64)]
    assert shard_shapes(tp.out_proj.weight) == [(64, 8)]


def test_separate_projections_on_head_and_data_meshes(page):
    """Separate q/k/v projections, bias_k/bias_v, a padding mask and per-head weights."""
    shard_by_head = page["shard_by_head"]
    mha = MultiheadAttention(64, 8, kdim=24, vdim=40, add_bias_kv=True, key=jax.random.PRNGKey(2))
    x = page["x"]
    kv_k = jax.random.normal(jax.random.PRNGKey(3), (16, 12, 24))
    kv_v = jax.random.normal(jax.random.PRNGKey(4), (16, 12, 40))
    kpm = jax.random.bernoulli(jax.random.PRNGKey(5), 0.3, (16, 12))

    @eqx.filter_jit
    def cross(m, q, k, v, kpm):
        return jax.vmap(lambda q, k, v, p: m(q, k, v, key_padding_mask=p, average_attn_weights=False))(q, k, v, kpm)

    ref_out, ref_w = cross(mha, x, kv_k, kv_v, kpm)
    heads_only = shard_by_head(mha, page["head_mesh"])
    assert shard_shapes(heads_only.q_proj_weight) == [(8, 64)]
    out, w = cross(heads_only, x, kv_k, kv_v, kpm)
    assert_close(out, ref_out, TOL, "heads: output")
    assert_close(w, ref_w, TOL, "heads: weights")

    # 2-D mesh: the batch over "data", the heads over "heads".
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "heads"))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    out, w = cross(shard_by_head(mha, mesh), put(x), put(kv_k), put(kv_v), put(kpm))
    assert_close(out, ref_out, TOL, "data and heads: output")
    assert_close(w, ref_w, TOL, "data and heads: weights")
    assert devices_of(out) == 8


def test_haiku_params_sharded_by_the_same_specs(page):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "heads"))
    x = page["x"]
    f = hk.transform(lambda x: nxhk.MultiheadAttention(64, 8, add_bias_kv=True)(x, x, x, is_causal=True))
    params = f.init(jax.random.PRNGKey(6), x)
    ref_out, ref_w = jax.jit(f.apply)(params, None, x)
    torch_name = {"multihead_attention": "{}", "multihead_attention/~/out_proj": "out_proj.{}"}
    specs = page["HEAD_SPECS"]
    shardings = {m: {n: NamedSharding(mesh, specs[torch_name[m].format(n)]) for n in ps} for m, ps in params.items()}
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    out, w = jax.jit(f.apply)(jax.device_put(params, shardings), None, x_sharded)
    assert_close(out, ref_out, TOL, "output")
    assert_close(w, ref_w, TOL, "weights")
    assert devices_of(out) == 8


def test_squeeze_excitation_data_parallel(page):
    data_mesh = page["data_mesh"]
    se = SqueezeExcitation(16, 4, key=jax.random.PRNGKey(7))
    img = jax.random.normal(jax.random.PRNGKey(8), (16, 16, 6, 6))
    run = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
    ref = run(se, img)
    out = run(
        eqx.filter_shard(se, NamedSharding(data_mesh, P())), jax.device_put(img, NamedSharding(data_mesh, P("data")))
    )
    assert_close(out, ref, TOL)
    assert devices_of(out) == 8
