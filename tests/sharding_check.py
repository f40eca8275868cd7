"""Run the "Multiple devices" page's code on 8 (simulated) devices and report on it as JSON.

Started by ``tests/test_sharding.py`` in its own process, with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in the environment:
the flag only works when it is set before JAX starts. It executes the Python
blocks of docs/multiple_devices.md verbatim (so the page stays true), then checks
the same patterns further: the Haiku front end with head-sharded params, a
layer with separate q/k/v projections and ``bias_k``/``bias_v``, a 2-D
``(data, heads)`` mesh, and SqueezeExcitation data parallel. It prints one JSON
object; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, os.pardir, "docs", "multiple_devices.md")


def page_blocks() -> list[str]:
    text = open(PAGE, encoding="utf-8").read()
    start = text.index("# Multiple devices")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def main() -> dict:
    blocks = page_blocks()
    ns: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "docs/multiple_devices.md", "exec"), ns)  # noqa: S102

    import equinox as eqx
    import haiku as hk
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import noxton.haiku as nxhk
    from noxton.nn import MultiheadAttention, SqueezeExcitation

    report: dict = {"readme_blocks": len(blocks), "devices": len(jax.devices()), "errors": {}, "checks": {}}

    def err(name, a, b):
        report["errors"][name] = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    def devices_of(a):
        return len({s.device for s in a.addressable_shards if s.data.size})

    def shard_shapes(a):
        return sorted({tuple(s.data.shape) for s in a.addressable_shards})

    ref, out_dp, out_tp = ns["reference"], ns["out_dp"], ns["out_tp"]
    err("readme_data_parallel", out_dp, ref)
    err("readme_tensor_parallel", out_tp, ref)
    report["checks"]["out_dp_devices"] = devices_of(out_dp)
    report["checks"]["out_dp_shard_shapes"] = shard_shapes(out_dp)
    tp = ns["mha_tp"]
    report["checks"]["in_proj_weight_shards"] = shard_shapes(tp.in_proj_weight)
    report["checks"]["out_proj_weight_shards"] = shard_shapes(tp.out_proj.weight)
    report["checks"]["in_proj_weight_devices"] = devices_of(tp.in_proj_weight)

    shard_by_head, head_mesh, data_mesh = ns["shard_by_head"], ns["head_mesh"], ns["data_mesh"]
    specs = ns["HEAD_SPECS"]
    x = ns["x"]

    # Separate q/k/v projections, bias_k/bias_v, masks and weights: tensor parallel.
    mha = MultiheadAttention(64, 8, kdim=24, vdim=40, add_bias_kv=True, key=jax.random.PRNGKey(2))
    kv_k = jax.random.normal(jax.random.PRNGKey(3), (16, 12, 24))
    kv_v = jax.random.normal(jax.random.PRNGKey(4), (16, 12, 40))
    kpm = jax.random.bernoulli(jax.random.PRNGKey(5), 0.3, (16, 12))

    @eqx.filter_jit
    def cross(m, q, k, v, kpm):
        return jax.vmap(lambda q, k, v, p: m(q, k, v, key_padding_mask=p, average_attn_weights=False))(q, k, v, kpm)

    ref_out, ref_w = cross(mha, x, kv_k, kv_v, kpm)
    mha_tp = shard_by_head(mha, head_mesh)
    report["checks"]["q_proj_weight_shards"] = shard_shapes(mha_tp.q_proj_weight)
    out, w = cross(mha_tp, x, kv_k, kv_v, kpm)
    err("separate_tensor_parallel_out", out, ref_out)
    err("separate_tensor_parallel_weights", w, ref_w)

    # 2-D mesh: batch over "data", heads over "heads".
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "heads"))
    both = shard_by_head(mha, mesh2)
    put = lambda a: jax.device_put(a, NamedSharding(mesh2, P("data")))  # noqa: E731
    out, w = cross(both, put(x), put(kv_k), put(kv_v), put(kpm))
    err("data_and_heads_out", out, ref_out)
    err("data_and_heads_weights", w, ref_w)
    report["checks"]["data_and_heads_out_devices"] = devices_of(out)

    # Haiku: the same specs on an hk.transform'ed model, batch sharded too.
    f = hk.transform(lambda x: nxhk.MultiheadAttention(64, 8, add_bias_kv=True)(x, x, x, is_causal=True))
    params = f.init(jax.random.PRNGKey(6), x)
    ref_out, ref_w = jax.jit(f.apply)(params, None, x)
    torch_name = {"multihead_attention": "{}", "multihead_attention/~/out_proj": "out_proj.{}"}
    shardings = {m: {n: NamedSharding(mesh2, specs[torch_name[m].format(n)]) for n in ps} for m, ps in params.items()}
    params_tp = jax.device_put(params, shardings)
    out, w = jax.jit(f.apply)(params_tp, None, put(x))
    err("haiku_data_and_heads_out", out, ref_out)
    err("haiku_data_and_heads_weights", w, ref_w)

    # SqueezeExcitation, data parallel.
    se = SqueezeExcitation(16, 4, key=jax.random.PRNGKey(7))
    img = jax.random.normal(jax.random.PRNGKey(8), (16, 16, 6, 6))
    run_se = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
    ref_se = run_se(se, img)
    out = run_se(
        eqx.filter_shard(se, NamedSharding(data_mesh, P())), jax.device_put(img, NamedSharding(data_mesh, P("data")))
    )
    err("squeeze_excitation_data_parallel", out, ref_se)
    report["checks"]["se_out_devices"] = devices_of(out)
    return report


if __name__ == "__main__":
    print("SHARDING_REPORT " + json.dumps(main()))
    sys.stdout.flush()
