"""noxton against every peer, side by side, in one command.

    python benchmarks/run.py            # full run (about 20-30 minutes on 2 CPU cores)
    python benchmarks/run.py --quick    # fewer repeats and sizes (a few minutes)

Measures, in one process, medians over repeated runs after warm-up (and after
compilation for JAX): noxton's Equinox and Haiku front ends (jitted) against
``torch.nn.MultiheadAttention`` (eval + no_grad with need_weights False and
True; train mode forward+backward), ``eqx.nn.MultiheadAttention``,
``hk.MultiHeadAttention``, ``flax.nnx.MultiHeadAttention`` and a matmul-only
lower bound (the same matrix products, no softmax, no masking); eager calls;
``SqueezeExcitation`` against torch on an ``(N, C, H, W)`` batch. Then a
long-sequence table, each size and contender in its own process, with time and
peak resident memory (``ru_maxrss``), up to the longest length each contender
fits (peak = the child's VmHWM; dense contenders are not started where their estimated score memory
exceeds ``--mem-budget-gib``, so as not to push the machine into swap).

torch runs with ``torch.set_num_threads(n)``, ``n`` = the number of CPU cores
XLA's CPU client uses (``os.cpu_count()``), so both libraries use the same
cores. Prints Markdown tables; writes them, the raw figures (JSON) and a plot
(time and peak memory against sequence length, log-log) to benchmarks/results/.

Needs the ``bench`` extra (flax, matplotlib) and torch==2.13.0 (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THREADS = os.cpu_count() or 1


def rss_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gib():
    # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec, so a child would report its parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timeit(fn, sync, reps, warmup=1):
    for _ in range(warmup):
        sync(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# --------------------------------------------------------------------------------------------
# Contenders. Each builder returns (fn, sync): fn() runs one forward (or forward+backward).
# --------------------------------------------------------------------------------------------


def jax_sync(x):
    import jax

    jax.block_until_ready(x)


def torch_sync(x):
    pass  # CPU torch is synchronous


def build_torch(B, L, E, H, mode, batch_first=False):
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(E, H, batch_first=batch_first)
    x = torch.randn((B, L, E) if batch_first else (L, B, E))
    if mode in ("fwd", "fwd_w"):
        m.eval()
        need = mode == "fwd_w"

        def fn():
            with torch.no_grad():
                return m(x, x, x, need_weights=need)

        return fn, torch_sync
    m.train()
    xg = x.clone().requires_grad_()
    r = torch.randn_like(x)

    def fn():
        m.zero_grad(set_to_none=True)
        xg.grad = None
        out, _ = m(xg, xg, xg, need_weights=False)
        (out * r).sum().backward()
        return out

    return fn, torch_sync


def build_torch_matmul(B, L, E, H, mode):
    import torch

    torch.set_num_threads(THREADS)
    D = E // H
    x = torch.randn(B, L, E)
    w_in, w_out = torch.randn(3 * E, E) / E**0.5, torch.randn(E, E) / E**0.5

    def fwd():
        q, k, v = (x @ w_in.T).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2)
        return ((s @ v).transpose(1, 2).reshape(B, L, E)) @ w_out.T

    def fn():
        with torch.no_grad():
            return fwd()

    return fn, torch_sync


def _jax_grad(loss_fn, *args):
    import jax

    return jax.jit(jax.grad(loss_fn, argnums=tuple(range(len(args)))))


def build_noxton_eqx(B, L, E, H, mode, implementation="auto"):
    import equinox as eqx
    import jax

    from noxton.nn import MultiheadAttention

    m = MultiheadAttention(E, H, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, E))
    need = mode == "fwd_w"

    def fwd(m, x):
        return jax.vmap(lambda xi: m(xi, xi, xi, need_weights=need, implementation=implementation))(x)

    if mode in ("fwd", "fwd_w"):
        f = eqx.filter_jit(fwd)
        return (lambda: f(m, x)), jax_sync
    r = jax.random.normal(jax.random.PRNGKey(2), (B, L, E))
    g = eqx.filter_jit(eqx.filter_grad(lambda m, x: (fwd(m, x)[0] * r).sum()))
    return (lambda: g(m, x)), jax_sync


def build_noxton_haiku(B, L, E, H, mode, implementation="auto"):
    import haiku as hk
    import jax

    import noxton.haiku as nxhk

    need = mode == "fwd_w"
    f = hk.transform(lambda x: nxhk.MultiheadAttention(E, H)(x, x, x, need_weights=need, implementation=implementation))
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, E))
    params = f.init(jax.random.PRNGKey(0), x)
    if mode in ("fwd", "fwd_w"):
        a = jax.jit(f.apply)
        return (lambda: a(params, None, x)), jax_sync
    r = jax.random.normal(jax.random.PRNGKey(2), (B, L, E))
    g = jax.jit(jax.grad(lambda p, x: (f.apply(p, None, x)[0] * r).sum(), argnums=(0, 1)))
    return (lambda: g(params, x)), jax_sync


def build_eqx(B, L, E, H, mode):
    import equinox as eqx
    import jax

    m = eqx.nn.MultiheadAttention(H, E, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, E))

    def fwd(m, x):
        return jax.vmap(lambda xi: m(xi, xi, xi))(x)

    if mode == "fwd":
        f = eqx.filter_jit(fwd)
        return (lambda: f(m, x)), jax_sync
    r = jax.random.normal(jax.random.PRNGKey(2), (B, L, E))
    g = eqx.filter_jit(eqx.filter_grad(lambda m, x: (fwd(m, x) * r).sum()))
    return (lambda: g(m, x)), jax_sync


def build_haiku(B, L, E, H, mode):
    import haiku as hk
    import jax

    f = hk.transform(
        lambda x: hk.MultiHeadAttention(H, E // H, w_init=hk.initializers.VarianceScaling(1.0), model_size=E)(x, x, x)
    )
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, E))
    params = f.init(jax.random.PRNGKey(0), x)
    if mode == "fwd":
        a = jax.jit(f.apply)
        return (lambda: a(params, None, x)), jax_sync
    r = jax.random.normal(jax.random.PRNGKey(2), (B, L, E))
    g = jax.jit(jax.grad(lambda p, x: (f.apply(p, None, x) * r).sum(), argnums=(0, 1)))
    return (lambda: g(params, x)), jax_sync


def build_flax(B, L, E, H, mode):
    import jax
    from flax import nnx

    m = nnx.MultiHeadAttention(H, E, decode=False, deterministic=True, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, E))

    def fwd(state, x):
        return nnx.merge(graphdef, state)(x)

    if mode == "fwd":
        f = jax.jit(fwd)
        return (lambda: f(state, x)), jax_sync
    r = jax.random.normal(jax.random.PRNGKey(2), (B, L, E))
    g = jax.jit(jax.grad(lambda s, x: (fwd(s, x) * r).sum(), argnums=(0, 1)))
    return (lambda: g(state, x)), jax_sync


def build_jax_dpa(B, L, E, H, mode):
    """jax.nn.dot_product_attention with the same projections (what the "fused" path calls)."""
    import jax

    D = E // H
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    w_in = jax.random.normal(k0, (E, 3 * E)) / E**0.5
    w_out = jax.random.normal(k1, (E, E)) / E**0.5
    x = jax.random.normal(k2, (B, L, E))

    def fwd(w_in, w_out, x):
        q, k, v = (x @ w_in).reshape(B, L, 3, H, D).transpose(2, 0, 1, 3, 4)
        return jax.nn.dot_product_attention(q, k, v).reshape(B, L, E) @ w_out

    if mode == "fwd":
        f = jax.jit(fwd)
        return (lambda: f(w_in, w_out, x)), jax_sync
    g = jax.jit(jax.grad(lambda *a: fwd(*a).sum(), argnums=(0, 1, 2)))
    return (lambda: g(w_in, w_out, x)), jax_sync


def build_matmul(B, L, E, H, mode):
    """Lower bound: the same matrix products as attention, with no softmax and no masking."""
    import jax
    import jax.numpy as jnp

    D = E // H
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    w_in = jax.random.normal(k0, (3 * E, E)) / E**0.5
    w_out = jax.random.normal(k1, (E, E)) / E**0.5
    x = jax.random.normal(k2, (B, L, E))

    def fwd(w_in, w_out, x):
        q, k, v = jnp.split(jnp.einsum("ble,fe->blf", x, w_in).reshape(B, L, 3 * H, D), 3, axis=2)
        s = jnp.einsum("blhd,bshd->bhls", q, k)
        o = jnp.einsum("bhls,bshd->blhd", s, v).reshape(B, L, E)
        return jnp.einsum("ble,fe->blf", o, w_out)

    if mode in ("fwd", "fwd_w"):
        f = jax.jit(fwd)
        return (lambda: f(w_in, w_out, x)), jax_sync
    r = jax.random.normal(jax.random.PRNGKey(3), (B, L, E))
    g = jax.jit(jax.grad(lambda *a: (fwd(*a) * r).sum(), argnums=(0, 1, 2)))
    return (lambda: g(w_in, w_out, x)), jax_sync


def build_block_matmul(B, L, E, H, mode):
    """Lower bound for the blockwise path: its matrix products, in its blocks, with no softmax and no masking."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from noxton.functional._blockwise import block_sizes

    D = E // H
    bq, bk = block_sizes(B * H, L, L)
    nq, nk = -(-L // bq), -(-L // bk)
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    w_in = jax.random.normal(k0, (3 * E, E)) / E**0.5
    w_out = jax.random.normal(k1, (E, E)) / E**0.5
    x = jax.random.normal(k2, (B, nq * bq, E))

    def fwd(w_in, w_out, x):
        qkv = jnp.einsum("ble,fe->blf", x, w_in).reshape(B, nq * bq, 3, H, D)
        q, k, v = (jnp.moveaxis(qkv[:, :, i], 1, 2) for i in range(3))  # [B, H, L, D]
        kb = jnp.moveaxis(k[:, :, : nk * bk].reshape(B, H, nk, bk, D), 2, 0)
        vb = jnp.moveaxis(v[:, :, : nk * bk].reshape(B, H, nk, bk, D), 2, 0)

        def q_block(qb):
            def step(acc, kv):
                s = jnp.einsum("bhqd,bhkd->bhqk", qb, kv[0])
                return acc + jnp.einsum("bhqk,bhkd->bhqd", s, kv[1]), None

            return lax.scan(step, jnp.zeros_like(qb), (kb, vb))[0]

        o = lax.map(q_block, jnp.moveaxis(q.reshape(B, H, nq, bq, D), 2, 0))
        o = jnp.moveaxis(o, 0, 2).reshape(B, H, nq * bq, D)
        return jnp.einsum("ble,fe->blf", jnp.moveaxis(o, 1, 2).reshape(B, nq * bq, E), w_out)

    f = jax.jit(fwd)
    return (lambda: f(w_in, w_out, x)), jax_sync


BUILDERS = {
    "torch": build_torch,
    "torch_batch_first": lambda *a: build_torch(*a, batch_first=True),
    "torch_matmul": build_torch_matmul,
    "noxton_eqx": build_noxton_eqx,
    "noxton_eqx_dense": lambda *a: build_noxton_eqx(*a, implementation="dense"),
    "noxton_eqx_fused": lambda *a: build_noxton_eqx(*a, implementation="fused"),
    "noxton_eqx_blockwise": lambda *a: build_noxton_eqx(*a, implementation="blockwise"),
    "noxton_haiku": build_noxton_haiku,
    "eqx": build_eqx,
    "haiku": build_haiku,
    "flax": build_flax,
    "jax_dpa": build_jax_dpa,
    "matmul_only": build_matmul,
    "block_matmul_only": build_block_matmul,
}

LABELS = {
    "torch": "torch MHA (batch_first=False)",
    "torch_batch_first": "torch MHA (batch_first=True)",
    "torch_matmul": "torch matmul-only",
    "noxton_eqx": "noxton.nn (Equinox, auto)",
    "noxton_eqx_dense": "noxton.nn implementation='dense'",
    "noxton_eqx_fused": "noxton.nn implementation='fused'",
    "noxton_eqx_blockwise": "noxton.nn implementation='blockwise'",
    "noxton_haiku": "noxton.haiku (auto)",
    "eqx": "eqx.nn.MultiheadAttention",
    "haiku": "hk.MultiHeadAttention",
    "flax": "flax.nnx.MultiHeadAttention",
    "jax_dpa": "jax.nn.dot_product_attention",
    "matmul_only": "JAX matmul-only lower bound",
    "block_matmul_only": "JAX blockwise matmul-only lower bound",
}


def setup_jax():
    import jax

    jax.config.update("jax_platforms", "cpu")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def md_table(headers, rows):
    out = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main_table(args, results):
    B, L, E, H = 8, 512, 512, 8
    reps = 5 if args.quick else 15
    plan = [
        ("fwd", "torch", "torch"),
        ("fwd", "noxton_eqx", "torch"),
        ("fwd", "noxton_haiku", "torch"),
        ("fwd", "noxton_eqx_dense", "torch"),
        ("fwd", "noxton_eqx_fused", "torch"),
        ("fwd", "eqx", "torch"),
        ("fwd", "haiku", "torch"),
        ("fwd", "flax", "torch"),
        ("fwd", "jax_dpa", "torch"),
        ("fwd", "matmul_only", "torch"),
        ("fwd", "torch_matmul", "torch"),
        ("fwd_w", "torch", "torch"),
        ("fwd_w", "noxton_eqx", "torch"),
        ("fwd_w", "noxton_haiku", "torch"),
        ("fwd_bwd", "torch", "torch"),
        ("fwd_bwd", "noxton_eqx", "torch"),
        ("fwd_bwd", "noxton_haiku", "torch"),
        ("fwd_bwd", "noxton_eqx_dense", "torch"),
        ("fwd_bwd", "eqx", "torch"),
        ("fwd_bwd", "haiku", "torch"),
        ("fwd_bwd", "flax", "torch"),
        ("fwd_bwd", "matmul_only", "torch"),
    ]
    fns = {}
    for mode, name, _ in plan:
        fn, sync = BUILDERS[name](B, L, E, H, mode)
        sync(fn())  # compile / warm up
        fns[(mode, name)] = (fn, sync)
    # Interleave the repeats (round robin) so that machine noise hits every contender alike.
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, (fn, sync) in fns.items():
            t = time.perf_counter()
            sync(fn())
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    mode_name = {
        "fwd": "forward, need_weights=False",
        "fwd_w": "forward, need_weights=True",
        "fwd_bwd": "forward+backward",
    }
    for mode, name, ref in plan:
        r = med[(mode, name)] / med[(mode, ref)]
        rows.append(
            [
                mode_name[mode],
                LABELS[name],
                f"{med[(mode, name)] * 1e3:.1f}",
                f"{r:.2f}x",
            ]
        )
        results["main"].append(
            {
                "mode": mode,
                "name": name,
                "median_s": med[(mode, name)],
                "ratio_vs_torch": r,
            }
        )
    title = (
        f"### B={B}, L=S={L}, E={E}, H={H} self-attention (medians of {reps} interleaved runs after warm-up; "
        "ratio = time / torch's time in the same mode)\n\n"
    )
    return title + md_table(["mode", "contender", "median ms", "vs torch"], rows)


def eager_table(args, results):
    import equinox as eqx
    import jax
    import torch

    from noxton.nn import MultiheadAttention

    torch.set_num_threads(THREADS)
    L, E, H = 10, 64, 4
    reps = 50 if args.quick else 200
    key = jax.random.PRNGKey(0)
    nx = MultiheadAttention(E, H, key=key)
    eq = eqx.nn.MultiheadAttention(H, E, key=key)
    tm = torch.nn.MultiheadAttention(E, H).eval()
    x = jax.random.normal(key, (L, E))
    tx = torch.randn(L, 1, E)

    def tcall():
        with torch.no_grad():
            return tm(tx, tx, tx)

    cases = [
        ("noxton.nn MultiheadAttention (eager)", lambda: nx(x, x, x), jax_sync),
        (
            "noxton.nn, need_weights=False (eager)",
            lambda: nx(x, x, x, need_weights=False),
            jax_sync,
        ),
        ("eqx.nn.MultiheadAttention (eager)", lambda: eq(x, x, x), jax_sync),
        ("torch MHA (eager, no_grad)", tcall, torch_sync),
    ]
    med = {n: timeit(f, s, reps, warmup=3) for n, f, s in cases}
    ref = med["eqx.nn.MultiheadAttention (eager)"]
    rows = [[n, f"{t * 1e3:.2f}", f"{t / ref:.2f}x"] for n, t in med.items()]
    results["eager"] = {n: t for n, t in med.items()}
    return f"### Eager call, L={L}, E={E}, H={H} (no jit; median of {reps})\n\n" + md_table(
        ["contender", "median ms", "vs eqx.nn"], rows
    )


def se_table(args, results):
    import jax
    import torch

    from noxton.nn import SqueezeExcitation

    torch.set_num_threads(THREADS)
    N, C, Q, HW = 32, 256, 64, 28
    reps = 10 if args.quick else 30
    se = SqueezeExcitation(C, Q, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (N, C, HW, HW))

    class TorchSE(torch.nn.Module):  # torchvision.ops.SqueezeExcitation, from torch.nn
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Conv2d(C, Q, 1), torch.nn.Conv2d(Q, C, 1)

        def forward(self, x):
            s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
            return torch.sigmoid(self.fc2(torch.relu(self.fc1(s)))) * x

    tse = TorchSE().eval()
    tx = torch.randn(N, C, HW, HW)

    def tcall():
        with torch.no_grad():
            return tse(tx)

    import equinox as eqx

    fj = eqx.filter_jit(lambda se, x: jax.vmap(se)(x))
    med = {
        "torch SqueezeExcitation (eval, no_grad)": timeit(tcall, torch_sync, reps, 2),
        "noxton.nn SqueezeExcitation (vmap, jit)": timeit(lambda: fj(se, x), jax_sync, reps, 2),
    }
    ref = med["torch SqueezeExcitation (eval, no_grad)"]
    rows = [[n, f"{t * 1e3:.2f}", f"{t / ref:.2f}x"] for n, t in med.items()]
    results["se"] = med
    return (
        f"### SqueezeExcitation, (N, C, H, W) = ({N}, {C}, {HW}, {HW}), squeeze {Q} (median of {reps})\n\n"
        + md_table(["contender", "median ms", "vs torch"], rows)
    )


# --------------------------------------------------------------------------------------------
# Long sequences: one process per (contender, mode, L)
# --------------------------------------------------------------------------------------------

LONG_E, LONG_H, LONG_B = 256, 8, 1
DENSE = {"torch_batch_first", "noxton_eqx_dense", "eqx", "jax_dpa"}


def child(name, mode, L, reps):
    if name.startswith("torch"):
        import torch  # noqa: F401
    else:
        setup_jax()
    fn, sync = BUILDERS[name](LONG_B, L, LONG_E, LONG_H, mode)
    base = rss_gib()
    t0 = time.perf_counter()
    sync(fn())  # warm-up (and compilation)
    first = time.perf_counter() - t0
    t = timeit(fn, sync, reps, warmup=0)
    print(
        json.dumps(
            {
                "name": name,
                "mode": mode,
                "L": L,
                "median_s": t,
                "first_s": first,
                "peak_gib": peak_gib(),
                "base_gib": base,
            }
        )
    )


def long_row(args, mode, name, L, budget, results):
    """Run one (mode, contender, L) child process; its table row, the contender's name last."""
    # Dense contenders hold several (H, L, L) float32 arrays (more in backward).
    est = LONG_B * LONG_H * L * L * 4 * (3 if mode == "fwd" else 6) / 2**30
    if name in DENSE and est > budget:
        return [mode, LABELS[name], L, "-", "-", f"not run: est. {est:.0f} GiB > budget {budget} GiB", name]
    reps = 3 if L <= 16384 else (2 if L <= 32768 else 1)
    if args.quick:
        reps = 2 if L <= 4096 else 1
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, mode, str(L), str(reps)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, check=False)
    except subprocess.TimeoutExpired:
        return [mode, LABELS[name], L, "-", "-", f"timeout > {args.child_timeout} s", name]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return [mode, LABELS[name], L, "-", "-", f"failed (rc {p.returncode}): {p.stderr.strip()[-120:]}", name]
    r = json.loads(lines[-1])
    results["long"].append(r)
    print(f"  long: {mode} {name} L={L}: {r['median_s']:.3f} s, peak {r['peak_gib']:.2f} GiB", file=sys.stderr)
    return [
        mode,
        LABELS[name],
        L,
        f"{r['median_s']:.3f}",
        f"{r['peak_gib']:.2f}",
        f"{r['peak_gib'] - r['base_gib']:.2f}",
        name,
    ]


def long_table(args, results):
    sizes = [1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    if args.sizes:
        sizes = sorted(int(x) for x in args.sizes.split(","))
    plan = {
        "fwd": [
            "torch",
            "noxton_eqx",
            "torch_batch_first",
            "noxton_eqx_dense",
            "eqx",
            "jax_dpa",
            "block_matmul_only",
        ],
        "fwd_bwd": ["torch", "noxton_eqx", "noxton_eqx_dense", "eqx"],
    }
    max_len = {"fwd": max(sizes), "fwd_bwd": 16384 if not args.quick else 4096}
    budget = args.mem_budget_gib
    rows = []
    # Interleaved by length (every contender at L, then the next L), so that load drift on
    # a shared machine enters the ratios at one length less than a contender-by-contender sweep.
    for mode, names in plan.items():
        stopped = set()
        for L in sizes:
            if L > max_len[mode]:
                continue
            for name in names:
                if name in stopped:
                    continue
                row = long_row(args, mode, name, L, budget, results)
                rows.append(row)
                if row[3] == "-":
                    stopped.add(name)
    rows.sort(key=lambda r: (r[0] != "fwd", plan[r[0]].index(r[-1]), r[2]))
    rows = [r[:-1] for r in rows]
    # Ratios against torch (batch_first=False) at equal (mode, L)
    ref = {(r["mode"], r["L"]): r["median_s"] for r in results["long"] if r["name"] == "torch"}
    for row in rows:
        key_ = ("fwd" if row[0] == "fwd" else "fwd_bwd", row[2])
        if row[3] != "-" and key_ in ref:
            row.insert(4, f"{float(row[3]) / ref[key_]:.2f}x")
        else:
            row.insert(4, "-")
    title = (
        f"### Long sequences: E={LONG_E}, H={LONG_H}, batch {LONG_B}, need_weights=False "
        "(one process per row; median of 3 runs after a warm-up up to L=16384, 2 at 32768, 1 at 65536; "
        "peak = that process's peak RSS (VmHWM), library and inputs included; base = RSS before the first call)\n\n"
    )
    return title + md_table(
        [
            "mode",
            "contender",
            "L=S",
            "median s",
            "vs torch",
            "peak GiB",
            "peak - base GiB",
        ],
        rows,
    )


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for r in results["long"]:
        series.setdefault((r["name"], r["mode"]), []).append(r)
    for (name, mode), rs in sorted(series.items()):
        rs.sort(key=lambda r: r["L"])
        lab = f"{LABELS[name]} [{mode}]"
        style = "-" if mode == "fwd" else "--"
        ax1.plot(
            [r["L"] for r in rs],
            [r["median_s"] for r in rs],
            style,
            marker="o",
            label=lab,
        )
        ax2.plot(
            [r["L"] for r in rs],
            [r["peak_gib"] for r in rs],
            style,
            marker="o",
            label=lab,
        )
    for ax, yl in ((ax1, "median time (s)"), (ax2, "peak RSS (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L = S")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(f"MHA, E={LONG_E}, H={LONG_H}, batch {LONG_B}, {THREADS} CPU threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    ap.add_argument("--skip-long", action="store_true", help="skip the long-sequence table")
    ap.add_argument("--only-long", action="store_true", help="only the long-sequence table")
    ap.add_argument(
        "--mem-budget-gib",
        type=float,
        default=8.0,
        help="do not start dense runs estimated above this",
    )
    ap.add_argument(
        "--child-timeout",
        type=int,
        default=900,
        help="seconds per long-sequence process",
    )
    ap.add_argument("--sizes", help="long-sequence lengths, comma-separated (default: 1024 to 65536)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument(
        "--child",
        nargs=4,
        metavar=("NAME", "MODE", "L", "REPS"),
        help=argparse.SUPPRESS,
    )
    args = ap.parse_args()
    if args.child:
        name, mode, L, reps = args.child
        child(name, mode, int(L), int(reps))
        return
    setup_jax()
    import jax

    os.makedirs(args.out, exist_ok=True)
    results = {"main": [], "long": []}
    import torch

    torch.set_num_threads(THREADS)
    header = (
        f"Machine: {platform.processor() or platform.machine()}, {THREADS} CPU cores, "
        f"Python {platform.python_version()}, jax {jax.__version__}, torch {torch.__version__}, "
        f"torch.set_num_threads({THREADS}) (XLA's CPU client uses all {THREADS} cores). "
        "Load average (1, 5, 15 min) at the start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + "."
    )
    sections = [header]
    print(header, flush=True)
    if not args.only_long:
        for f in (main_table, eager_table, se_table):
            s = f(args, results)
            print("\n" + s, flush=True)
            sections.append(s)
    if not args.skip_long:
        s = long_table(args, results)
        print("\n" + s, flush=True)
        sections.append(s)
        if results["long"]:
            plot(results, os.path.join(args.out, "long_sequences.png"))
            print(f"\nplot: {os.path.join(args.out, 'long_sequences.png')}")
    load = "Load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + "."
    print("\n" + load)
    sections.append(load)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n\n".join(sections) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
