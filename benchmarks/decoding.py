"""Decoding with a key/value cache (issue 22): ``python -m benchmarks.decoding [--quick] [sizes]``.

A ``--layers``-layer post-norm decoder (torch's ``TransformerDecoder`` of ``TransformerDecoderLayer``s,
relu, no final norm, eval) generates ``--steps`` positions for a batch of ``--batch`` memories of
``--memory`` positions. Each generated position's output is fed back as the next position's input
(``y -> next tgt``: no embedding or argmax, the data dependency of greedy decoding), from a random
first input. Contenders, timed side by side in one process (medians of interleaved repeats, after a
warm-up that compiles), as time per generated position (per token, the whole batch):

- ``noxton_cached``: ``noxton.nn.TransformerDecoder``: ``init_cache`` then one jitted ``lax.scan`` of
  ``jax.vmap(decoder.decode)`` over the steps; the whole jitted call (``init_cache`` included) / steps.
- ``noxton_cached_shared_index``: as ``noxton_cached``, but vmapped with ``in_axes`` ``None`` at the
  caches' ``index`` (every example is at the same position): under a plain ``jax.vmap`` the index is one
  per example and each cache write a scatter; with one index it stays a ``dynamic_update_slice``.
- ``noxton_recompute``: the same decoder recomputing the full forward at every step, at fixed shape (the
  whole ``steps``-long buffer with the causal ``tgt_mask``: what a ``lax.scan`` without a cache runs):
  ``steps`` x one jitted full forward over ``(B, steps, E)``, so per token = one full forward.
- ``torch_recompute``: ``torch.nn.TransformerDecoder`` (the same weights, ``batch_first=True``, eval,
  ``no_grad``) over the growing prefix: per token = the mean over t = 1..steps of one forward over t
  positions with the causal mask, linearly interpolated between a few timed lengths (the trapezoid rule).
- ``flax_nnx_cached``: the same decoder built from ``flax.nnx`` (the same weights):
  ``nnx.MultiHeadAttention(decode=True)`` causal self-attention with its cache, an
  ``nnx.MultiHeadAttention`` cross-attention (which projects the memory's keys and values in every step:
  the module takes no projected keys; XLA's loop-invariant code motion hoists that projection out of the
  scan, as the compiled HLO shows at the issue's sizes), two ``nnx.Linear``, three ``nnx.LayerNorm``; one jitted
  ``lax.scan``, one position per step, the cache carried and the parameters closed over (``nnx.split``).
- ``flax_nnx_cached_memkv``: as ``flax_nnx_cached``, with the cross-attention's memory keys and values
  projected once before the scan by hand (its ``key``/``value`` sub-modules, then
  ``nnx.dot_product_attention`` and ``out``): the same work as noxton's memory cache.

Before timing, every contender's outputs are checked against noxton's cached ones (float32, 1e-4).
It runs unchanged on a CUDA machine, as ``python -m benchmarks`` does (``benchmarks.contenders``): JAX on
its default device, torch on CUDA when it sees it, every timed call waiting for its device, and float32
is full float32 in every library (the JAX contenders compiled under ``jax.default_matmul_precision``
``"highest"`` off the CPU, torch's TF32 off). Also reported: the bytes of noxton's cache for the batch at
``max_len = steps`` and ``2 * steps``, and XLA's buffer sizes (``memory_analysis``) of the jitted calls.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any

import numpy as np

from benchmarks import contenders, report
from benchmarks.contenders import THREADS
from benchmarks.measure import medians

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Decoding with a key/value cache"
TOL = 1e-4
TORCH_LENGTHS = 8  # prefix lengths timed for torch's recompute


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.decoding", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="one timed repeat (and fewer torch prefix lengths)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--nhead", type=int, default=8)
    ap.add_argument("--ff", type=int, default=2048, help="dim_feedforward")
    ap.add_argument("--memory", type=int, default=128, help="memory length S")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=256, help="positions generated (the cache's max_len)")
    ap.add_argument("--repeats", type=int, help="timed repeats (default 5; --quick: 1)")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="decoding.md and decoding.json")
    ap.add_argument(
        "--page",
        help="write the table as the section '" + SECTION[3:] + "' of this page (docs/performance.md), in place of "
        "that section or at its end; `python -m benchmarks --page` keeps it",
    )
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    return args


def torch_decoder(args):
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(args.d_model, args.nhead, args.ff, dropout=0.1, batch_first=True)
    return torch.nn.TransformerDecoder(layer, args.layers).eval()


class FlaxDecoder:
    """The decoder of ``flax.nnx`` modules, built lazily (so that importing this module needs no flax)."""

    @staticmethod
    def build(args, state_dict: dict[str, np.ndarray]):
        import jax.numpy as jnp
        from flax import nnx

        E, H, F = args.d_model, args.nhead, args.ff
        D = E // H

        class Layer(nnx.Module):
            def __init__(self, rngs):
                def mha(decode):
                    return nnx.MultiHeadAttention(H, E, decode=decode, deterministic=True, dropout_rate=0.0, rngs=rngs)

                self.self_attn, self.cross_attn = mha(True), mha(False)
                self.linear1, self.linear2 = nnx.Linear(E, F, rngs=rngs), nnx.Linear(F, E, rngs=rngs)
                self.norm1, self.norm2, self.norm3 = (nnx.LayerNorm(E, epsilon=1e-5, rngs=rngs) for _ in range(3))

            def __call__(self, x, memory, memory_kv=None):
                x = self.norm1(x + self.self_attn(x))
                if memory_kv is None:
                    cross = self.cross_attn(x, memory)
                else:
                    att = self.cross_attn
                    cross = att.out(nnx.dot_product_attention(att.query(x), *memory_kv))
                x = self.norm2(x + cross)
                return self.norm3(x + self.linear2(nnx.relu(self.linear1(x))))

        class Decoder(nnx.Module):
            def __init__(self, rngs):
                self.layers = nnx.List([Layer(rngs) for _ in range(args.layers)])

            def __call__(self, x, memory, memory_kvs=None):
                for i, layer in enumerate(self.layers):
                    x = layer(x, memory, None if memory_kvs is None else memory_kvs[i])
                return x

        model = Decoder(nnx.Rngs(0))

        def put(var, value):
            assert var[...].shape == value.shape, (var[...].shape, value.shape)
            var[...] = jnp.asarray(value)

        for i, layer in enumerate(model.layers):
            p = {k.split(f"layers.{i}.", 1)[1]: v for k, v in state_dict.items() if k.startswith(f"layers.{i}.")}
            for name, att in (("self_attn", layer.self_attn), ("multihead_attn", layer.cross_attn)):
                w, b = p[f"{name}.in_proj_weight"], p[f"{name}.in_proj_bias"]
                for j, proj in enumerate((att.query, att.key, att.value)):
                    put(proj.kernel, w[j * E : (j + 1) * E].T.reshape(E, H, D))
                    put(proj.bias, b[j * E : (j + 1) * E].reshape(H, D))
                put(att.out.kernel, p[f"{name}.out_proj.weight"].T.reshape(H, D, E))
                put(att.out.bias, p[f"{name}.out_proj.bias"])
            for name in ("linear1", "linear2"):
                put(getattr(layer, name).kernel, p[f"{name}.weight"].T)
                put(getattr(layer, name).bias, p[f"{name}.bias"])
            for name in ("norm1", "norm2", "norm3"):
                put(getattr(layer, name).scale, p[f"{name}.weight"])
                put(getattr(layer, name).bias, p[f"{name}.bias"])
        return model


def nbytes(tree) -> int:
    import jax

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_figures(compiled) -> dict[str, int] | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return None
    if m is None:
        return None
    return {f: int(getattr(m, f)) for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def run(args) -> tuple[str, dict[str, Any]]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from jax import lax

    import noxton.nn as nx

    B, T, S, E = args.batch, args.steps, args.memory, args.d_model
    tmodel = torch_decoder(args)
    decoder = nx.TransformerDecoder.from_torch(tmodel)  # eval -> inference=True: no dropout
    state_dict = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    device = torch.device(contenders.torch_device())  # CUDA where torch sees it (TF32 off), as the attention benchmark
    tmodel = tmodel.to(device)
    fmodel = FlaxDecoder.build(args, state_dict)
    rng = np.random.default_rng(0)
    memory_np = rng.standard_normal((B, S, E)).astype(np.float32)
    x0_np = rng.standard_normal((B, 1, E)).astype(np.float32)
    memory, x0 = jnp.asarray(memory_np), jnp.asarray(x0_np)
    tmemory = torch.from_numpy(memory_np).to(device)
    params, static = eqx.partition(decoder, eqx.is_array)

    # 1. noxton, cached: init_cache, then one lax.scan of the vmapped decode, each output the next input
    def noxton_generate(params, memory, x0, shared_index=False):
        model = eqx.combine(params, static)
        cache = jax.vmap(lambda m: model.init_cache(m, T))(memory)
        decode = jax.vmap(model.decode)
        if shared_index:  # every example is at the same position: one index, not one per example
            axes = [{a: {k: None if k == "index" else 0 for k in c} for a, c in layer.items()} for layer in cache]
            cache = [{a: {**c, "index": c["index"][0]} for a, c in layer.items()} for layer in cache]
            decode = jax.vmap(model.decode, in_axes=(0, axes), out_axes=(0, axes))

        def step(carry, _):
            x, cache = carry
            y, cache = decode(x, cache)
            return (y, cache), y[:, 0]

        _, ys = lax.scan(step, (x0, cache), None, length=T)
        return jnp.moveaxis(ys, 0, 1)  # (B, T, E)

    # 2. noxton, recompute: one full forward over the (B, T, E) buffer with the causal mask
    causal = nx.Transformer.generate_square_subsequent_mask(T)

    def noxton_full(params, tgt, memory):
        model = eqx.combine(params, static)
        return jax.vmap(lambda t, m: model(t, m, tgt_mask=causal, tgt_is_causal=True))(tgt, memory)

    # 4. flax.nnx, cached: the cache carried through the scan, the parameters closed over
    def flax_generate(fstate, memory, x0, hoist):
        model = nnx.merge(fgraph, fstate)
        for layer in model.layers:
            layer.self_attn.init_cache((B, T, E))
        kvs = None
        if hoist:
            kvs = [(layer.cross_attn.key(memory), layer.cross_attn.value(memory)) for layer in model.layers]
        graph, cache, rest = nnx.split(model, nnx.Cache, ...)

        def step(carry, _):
            x, cache = carry
            m = nnx.merge(graph, cache, rest)
            y = m(x, memory, kvs)
            return (y, nnx.state(m, nnx.Cache)), y[:, 0]

        _, ys = lax.scan(step, (x0, cache), None, length=T)
        return jnp.moveaxis(ys, 0, 1)

    fgraph, fstate = nnx.split(fmodel)

    # float32 in full float32 off the CPU, as torch's: flax's products would take JAX's default there (TF32 on
    # a GPU); noxton's ask for it themselves. The precision is read when the calls are traced, here.
    t0 = time.perf_counter()
    with contenders.precision_scope("float32"):
        compiled = {
            "noxton_cached": jax.jit(noxton_generate).lower(params, memory, x0).compile(),
            "noxton_cached_shared_index": jax.jit(lambda p, m, x: noxton_generate(p, m, x, True))
            .lower(params, memory, x0)
            .compile(),
            "noxton_recompute": jax.jit(noxton_full).lower(params, jnp.zeros((B, T, E)), memory).compile(),
            "flax_nnx_cached": jax.jit(lambda s, m, x: flax_generate(s, m, x, False))
            .lower(fstate, memory, x0)
            .compile(),
            "flax_nnx_cached_memkv": jax.jit(lambda s, m, x: flax_generate(s, m, x, True))
            .lower(fstate, memory, x0)
            .compile(),
        }
    print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    # The check: each contender's outputs against noxton's cached ones, for the inputs those fed back.
    ys = np.asarray(compiled["noxton_cached"](params, memory, x0))
    xs = np.concatenate([x0_np, ys[:, :-1]], axis=1)  # the inputs the cached decoding saw
    full = np.asarray(compiled["noxton_recompute"](params, jnp.asarray(xs), memory))
    with torch.no_grad():
        tfull = (
            tmodel(
                torch.from_numpy(xs).to(device),
                tmemory,
                tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(T, device=device),
                tgt_is_causal=True,
            )
            .cpu()
            .numpy()
        )
    n_check = min(T, 8)  # fed back, the flax sequence drifts from noxton's by rounding: compare its first steps
    checks = {
        "noxton_cached_shared_index": float(
            np.abs(np.asarray(compiled["noxton_cached_shared_index"](params, memory, x0)) - ys).max()
        ),
        "noxton_recompute": float(np.abs(full - ys).max()),
        "torch_recompute": float(np.abs(tfull - ys).max()),
        **{
            name: float(np.abs(np.asarray(compiled[name](fstate, memory, x0))[:, :n_check] - ys[:, :n_check]).max())
            for name in ("flax_nnx_cached", "flax_nnx_cached_memkv")
        },
    }
    print("max |difference| from noxton_cached: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()), flush=True)
    bad = {k: v for k, v in checks.items() if not v <= TOL}
    if bad:
        raise SystemExit(f"outputs differ from noxton's cached decoding by more than {TOL}: {bad}")

    # The timed calls, each synchronised.
    tgt = jnp.asarray(xs)
    calls: dict[Any, Any] = {
        "noxton_cached": lambda: jax.block_until_ready(compiled["noxton_cached"](params, memory, x0)),
        "noxton_cached_shared_index": lambda: jax.block_until_ready(
            compiled["noxton_cached_shared_index"](params, memory, x0)
        ),
        "noxton_recompute": lambda: jax.block_until_ready(compiled["noxton_recompute"](params, tgt, memory)),
        "flax_nnx_cached": lambda: jax.block_until_ready(compiled["flax_nnx_cached"](fstate, memory, x0)),
        "flax_nnx_cached_memkv": lambda: jax.block_until_ready(compiled["flax_nnx_cached_memkv"](fstate, memory, x0)),
    }
    n_lengths = 3 if args.quick else TORCH_LENGTHS
    lengths = sorted({int(round(v)) for v in np.linspace(1, T, min(n_lengths, T))})
    ttgt = torch.from_numpy(xs).to(device)
    tmasks = {t: torch.nn.Transformer.generate_square_subsequent_mask(t, device=device) for t in lengths}

    def torch_call(t):
        def call():
            with torch.no_grad():
                out = tmodel(ttgt[:, :t], tmemory, tgt_mask=tmasks[t], tgt_is_causal=True)
            contenders.torch_sync()
            return out

        return call

    for t in lengths:
        calls[("torch", t)] = torch_call(t)
    med = medians(calls, args.repeats)

    per_token = {
        "noxton_cached": med["noxton_cached"] / T,
        "noxton_cached_shared_index": med["noxton_cached_shared_index"] / T,
        "noxton_recompute": med["noxton_recompute"],  # T steps x one full forward, / T
        "torch_recompute": float(
            np.mean(np.interp(np.arange(1, T + 1), lengths, [med[("torch", t)] for t in lengths]))
        ),
        "flax_nnx_cached": med["flax_nnx_cached"] / T,
        "flax_nnx_cached_memkv": med["flax_nnx_cached_memkv"] / T,
    }
    how = {
        "noxton_cached": f"jitted `init_cache` + `lax.scan` of `jax.vmap(decode)`, {T} steps; call / {T}",
        "noxton_cached_shared_index": "as above, `jax.vmap(decode, in_axes=(0, axes))` with `axes` None at the "
        "caches' `index` (one position for the batch: `dynamic_update_slice`, not a scatter); call / "
        f"{T}",
        "noxton_recompute": f"{T} x one jitted full forward over ({B}, {T}, {E}), causal `tgt_mask`; / {T}",
        "torch_recompute": f"forward over the prefix t = 1..{T}, causal mask; mean over t, "
        f"interpolated between t = {', '.join(map(str, lengths))}",
        "flax_nnx_cached": "jitted `lax.scan`, `MultiHeadAttention(decode=True)`; memory K/V projected in the "
        f"step (XLA hoists it out of the loop); call / {T}",
        "flax_nnx_cached_memkv": f"as above, memory K/V projected once before the scan; call / {T}",
    }
    ref = per_token["noxton_cached"]
    rows = [
        [f"`{name}`", f"{t * 1e3:.2f}", f"{t / ref:.2f}x", f"{checks[name]:.0e}" if name in checks else "-", how[name]]
        for name, t in per_token.items()
    ]
    table = report.md_table(
        ["contender", "ms per token", "vs noxton_cached", "max abs diff", "how"],
        rows,
    )

    # Memory: noxton's cache for the batch at max_len and 2 max_len (shapes only), and XLA's buffers.
    def cache_shapes(max_len):
        return jax.eval_shape(lambda m: jax.vmap(lambda mi: decoder.init_cache(mi, max_len))(m), memory)

    def split_bytes(cache):
        self_part = nbytes([c["self_attn"] for c in cache])
        return self_part, nbytes(cache) - self_part

    cache_rows, cache_figs = [], {}
    for max_len in (T, 2 * T):
        self_b, mem_b = split_bytes(cache_shapes(max_len))
        flax_b = args.layers * 2 * B * max_len * E * 4
        cache_figs[max_len] = dict(noxton_self=self_b, noxton_memory=mem_b, flax=flax_b)
        row = [max_len, f"{self_b + mem_b:,} ({mib(self_b + mem_b)} MiB)", mib(self_b), mib(mem_b), mib(flax_b)]
        cache_rows.append(row)
    cache_table = report.md_table(
        [
            "max_len",
            "noxton cache bytes",
            "self-attention K/V MiB",
            "memory K/V MiB",
            "flax nnx cache MiB (self-attention only)",
        ],
        cache_rows,
    )
    xla = {name: memory_figures(c) for name, c in compiled.items()}
    xla_rows = [
        [f"`{name}`", *(mib(m[f]) for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"))]
        for name, m in xla.items()
        if m is not None
    ]
    xla_table = report.md_table(["jitted call", "arguments MiB", "outputs MiB", "temporaries MiB"], xla_rows)

    speedups = {
        "vs noxton_cached_shared_index": per_token["noxton_cached_shared_index"] / ref,
        "vs noxton_recompute": per_token["noxton_recompute"] / ref,
        "vs torch_recompute": per_token["torch_recompute"] / ref,
        "vs flax_nnx_cached": per_token["flax_nnx_cached"] / ref,
        "vs flax_nnx_cached_memkv": per_token["flax_nnx_cached_memkv"] / ref,
    }
    text = (
        f"{args.layers}-layer post-norm decoder, d_model {E}, nhead {args.nhead}, dim_feedforward {args.ff}, "
        f"memory length {S}, batch {B}, {T} positions generated (each output fed back as the next input), "
        f"float32. Medians of {args.repeats} interleaved repeats after a warm-up; ms per token = per generated "
        "position, for the whole batch. Every contender runs the same weights; max abs diff = the largest "
        "difference of its outputs from `noxton_cached`'s (the flax rows: over the first "
        f"{n_check} steps, which they generate themselves).\n\n"
        + table
        + "\n\nCache of `noxton_cached` for the batch (the sum of the cache pytree's `nbytes`): the "
        "self-attention keys and values grow with `max_len`, the memory's keys and values (projected once by "
        "`init_cache`) do not. flax's `decode=True` cache holds the self-attention keys and values only.\n\n"
        + cache_table
        + "\n\nXLA's buffers of each jitted call (`compiled.memory_analysis()`; `noxton_recompute` is one full "
        "forward):\n\n" + xla_table
    )
    figures = dict(
        sizes=dict(layers=args.layers, d_model=E, nhead=args.nhead, ff=args.ff, memory=S, batch=B, steps=T),
        per_token_s=per_token,
        median_s={str(k): v for k, v in med.items()},
        speedups=speedups,
        max_abs_diff=checks,
        cache_bytes=cache_figs,
        xla_memory=xla,
    )
    return text, figures


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    shown = [a for i, a in enumerate(argv) if not (a.startswith("--note") or (i and argv[i - 1] == "--note"))]
    command = shlex.join(["python", "-m", "benchmarks.decoding", *shown])
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), report.load_average()
    text, figures = run(args)
    conditions = (
        (f"**{args.note}**\n\n" if args.note else "")
        + f"`{command}`, started {started}. Machine: {report.machine()}. Load average (1, 5, 15 min) at the "
        f"start: {load_start}; at the end: {report.load_average()}."
    )
    speedups = "`noxton_cached` per token: " + ", ".join(
        f"{v:.1f}x faster than `{k[3:]}`" if v >= 1 else f"{1 / v:.2f}x slower than `{k[3:]}`"
        for k, v in figures["speedups"].items()
    )
    body = (
        "Written by `python -m benchmarks.decoding --page docs/performance.md` (issue 22's sizes are its "
        "defaults; `--help` describes the contenders); `python -m benchmarks` keeps this section when it "
        f"rewrites the page.\n\n{conditions}\n\n{text}\n\n{speedups}."
    )
    print(f"\n{SECTION}\n\n{body}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decoding.md"), "w") as f:
        f.write(f"{SECTION}\n\n{body}\n")
    with open(os.path.join(args.out, "decoding.json"), "w") as f:
        json.dump(dict(command=command, started=started, **figures), f, indent=1)
    if args.page:
        report.splice(args.page, SECTION, body)
        print(f"\nwrote {args.out} and the section of {args.page}")


if __name__ == "__main__":
    main()
