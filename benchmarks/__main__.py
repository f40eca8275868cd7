"""noxton against its peers, side by side: ``python -m benchmarks [--quick] ...``.

Prints Markdown tables; writes them, the raw figures (``results.json``), a heat map of the grid and a
plot of time and peak memory against sequence length to ``--out`` (``benchmarks/results/``), and the
documentation page ``docs/performance.md`` (``--page``) with its figures. Needs the ``torch`` and
``bench`` extras. Runs on the default device of each library (a GPU when there is one);
``--gpu-issue`` runs the sizes of the GPU issue in float32 and bfloat16.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import sys
import time
from typing import Any

from benchmarks import contenders, grid, report
from benchmarks.contenders import DTYPES, THREADS, build, label
from benchmarks.measure import (
    LONG_B,
    LONG_E,
    LONG_H,
    child,
    long_run,
    medians,
    not_run,
    over_budget,
    room_for,
    time_left,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODE_NAMES = {
    "fwd": "forward, need_weights=False",
    "fwd_w": "forward, need_weights=True",
    "fwd_bwd": "forward+backward",
}

# (mode, contender) rows of the main table, each compared with torch in the same mode.
MAIN_PLAN = [
    *[
        ("fwd", n)
        for n in (
            "torch",
            "noxton_eqx",
            "noxton_haiku",
            "noxton_eqx_dense",
            "noxton_eqx_fused",
            "eqx",
            "haiku",
            "flax",
            "jax_dpa",
            "matmul_only",
            "torch_matmul",
        )
    ],
    *[("fwd_w", n) for n in ("torch", "noxton_eqx", "noxton_haiku")],
    *[
        ("fwd_bwd", n)
        for n in ("torch", "noxton_eqx", "noxton_haiku", "noxton_eqx_dense", "eqx", "haiku", "flax", "matmul_only")
    ],
]
LONG_PLAN = {
    "fwd": ["torch", "noxton_eqx", "torch_batch_first", "noxton_eqx_dense", "eqx", "jax_dpa", "block_matmul_only"],
    "fwd_bwd": ["torch", "noxton_eqx", "noxton_eqx_dense", "eqx"],
}
LONG_CONTENDERS = list(dict.fromkeys(n for names in LONG_PLAN.values() for n in names))


def main_table(args, results):
    B, L, E, H = args.shape
    reps = 5 if args.quick else 15
    med = medians({(mode, name): build(name, B, L, E, H, mode) for mode, name in MAIN_PLAN}, reps)
    rows = []
    for mode, name in MAIN_PLAN:
        ratio = med[(mode, name)] / med[(mode, "torch")]
        rows.append([MODE_NAMES[mode], label(name), f"{med[(mode, name)] * 1e3:.1f}", f"{ratio:.2f}x"])
        results["main"].append(dict(mode=mode, name=name, median_s=med[(mode, name)], ratio_vs_torch=ratio))
    title = (
        f"## B={B}, L=S={L}, E={E}, H={H} self-attention\n\nMedians of {reps} interleaved runs after a warm-up; "
        "ratio = time / torch's time in the same mode.\n\n"
    )
    return title + report.md_table(["mode", "contender", "median ms", "vs torch"], rows)


def eager_table(args, results):
    import equinox as eqx
    import jax
    import torch

    from noxton.nn import MultiheadAttention

    L, E, H = 10, 64, 4
    reps = 50 if args.quick else 200
    key = jax.random.PRNGKey(0)
    nx, eq = MultiheadAttention(E, H, key=key), eqx.nn.MultiheadAttention(H, E, key=key)
    device = contenders.torch_device()
    tm = torch.nn.MultiheadAttention(E, H).to(device).eval()
    x, tx = jax.random.normal(key, (L, E)), torch.randn(L, 1, E, device=device)

    def torch_call():
        with torch.no_grad():
            out = tm(tx, tx, tx)
        contenders.torch_sync()
        return out

    eager = functools.partial(contenders.on_device, dtype="float32")
    calls = {
        "noxton.nn MultiheadAttention (eager)": functools.partial(eager(nx), x, x, x),
        "noxton.nn, need_weights=False (eager)": functools.partial(eager(nx), x, x, x, need_weights=False),
        "eqx.nn.MultiheadAttention (eager)": functools.partial(eager(eq), x, x, x),
        "torch MHA (eager, no_grad)": torch_call,
    }
    med = medians(calls, reps, warmup=3)
    ref = med["eqx.nn.MultiheadAttention (eager)"]
    results["eager"] = med
    rows = [[n, f"{t * 1e3:.2f}", f"{t / ref:.2f}x"] for n, t in med.items()]
    return f"## Eager call, L={L}, E={E}, H={H}\n\nNo jit; medians of {reps}.\n\n" + report.md_table(
        ["contender", "median ms", "vs eqx.nn"], rows
    )


#: (N, C, H=W) of the squeeze-excitation grid; the squeeze is C // 4 (torchvision's MobileNetV3 ratio).
SE_GRID = [(1, 64, 56), (8, 64, 56), (32, 64, 14), (1, 256, 28), (32, 256, 28), (8, 512, 14)]


def se_table(args, results):
    import equinox as eqx
    import jax
    import torch

    from benchmarks.reference import TorchSqueezeExcitation
    from noxton.nn import SqueezeExcitation

    reps = 10 if args.quick else 30
    batched = contenders.on_device(eqx.filter_jit(lambda se, x: jax.vmap(se)(x)), dtype="float32")
    device = contenders.torch_device()
    results["se"], rows, skipped = [], [], 0
    shapes = (
        SE_GRID if args.se_shapes is None else [tuple(int(v) for v in p.split(",")) for p in args.se_shapes.split(";")]
    )
    for N, C, HW in shapes:
        Q = C // 4
        if not room_for(args):
            rows.append([f"({N}, {C}, {HW}, {HW})", Q, *["-"] * 6])
            not_run(args, results, f"squeeze-excitation ({N}, {C}, {HW}, {HW})")
            skipped += 1
            continue
        se, tse = SqueezeExcitation(C, Q, key=jax.random.PRNGKey(0)), TorchSqueezeExcitation(C, Q).to(device).eval()
        x, tx = jax.random.normal(jax.random.PRNGKey(1), (N, C, HW, HW)), torch.randn(N, C, HW, HW, device=device)

        def torch_call(tse=tse, tx=tx):
            with torch.no_grad():
                out = tse(tx)
            contenders.torch_sync()
            return out

        def noxton_call(se=se, x=x):
            return batched(se, x)

        pair = {"torch": torch_call, "noxton": noxton_call}
        med = medians(pair, reps, warmup=2)
        # then each in a block of its own repeats, as in a program that calls only one of them
        alone = {name: medians({name: call}, reps, warmup=1)[name] for name, call in pair.items()}
        results["se"].append(dict(N=N, C=C, H=HW, W=HW, squeeze=Q, median_s=med, alone_median_s=alone))
        times = [f"{med['torch'] * 1e3:.2f}", f"{med['noxton'] * 1e3:.2f}", f"{med['noxton'] / med['torch']:.2f}x"]
        times += [
            f"{alone['torch'] * 1e3:.2f}",
            f"{alone['noxton'] * 1e3:.2f}",
            f"{alone['noxton'] / alone['torch']:.2f}x",
        ]
        rows.append([f"({N}, {C}, {HW}, {HW})", Q, *times])
    title = (
        "## SqueezeExcitation\n\ntorch's block (eval, `no_grad`) against `noxton.nn.SqueezeExcitation` "
        f"(`jax.vmap` over the batch, jitted) at each shape, medians of {reps}: first interleaved, side by side "
        "(noxton mostly right after torch, whose OpenMP threads keep spinning on a core for a few ms after each "
        "call), then each in a block of its own repeats, as in a program that calls only one of them.\n\n"
    )
    if skipped:
        title += (
            f"Not run (dashes): {skipped} of the shapes, past the run's `--deadline-s` of {args.deadline_s:g} s.\n\n"
        )
    headers = ["(N, C, H, W)", "squeeze", "torch ms", "noxton.nn ms", "noxton / torch"]
    headers += ["torch ms, alone", "noxton.nn ms, alone", "noxton / torch, alone"]
    return title + report.md_table(headers, rows)


def long_table(args, results):
    sizes = [1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    if args.sizes:
        sizes = sorted(int(x) for x in args.sizes.split(","))
    max_len = {"fwd": max(sizes), "fwd_bwd": 4096 if args.quick else 16384}
    rows = {}
    # Interleaved by length (every contender at L, then the next L), so that load drift on a shared
    # machine enters the ratios at one length rather than a contender-by-contender sweep.
    for mode, names in LONG_PLAN.items():
        names = [n for n in names if args.long_contenders is None or n in args.long_contenders]
        stopped = set()
        for L in sizes:
            if L > max_len[mode]:
                continue
            for name in names:
                if name in stopped:
                    continue
                r: dict = {}
                why, stop = over_budget(name, mode, L, args.mem_budget_gib), True  # as a failed run: no longer L
                if why is None and not room_for(args):
                    why, stop = f"not run: the run's --deadline-s {args.deadline_s:g}", False
                    not_run(args, results, f"long {contenders.DTYPE} {mode} {name} L={L}")
                if why is None:
                    left = time_left(args)  # a process still running at the deadline is stopped there
                    timeout = args.child_timeout if left is None else min(args.child_timeout, left)
                    reps = (2 if L <= 4096 else 1) if args.quick else (3 if L <= 16384 else 2 if L <= 32768 else 1)
                    r = long_run(name, mode, L, reps, timeout)
                    why = r.get("skipped")
                    if r.get("timed_out") and timeout < args.child_timeout:  # the deadline's doing, not the run's
                        why, stop = f"stopped at the run's --deadline-s {args.deadline_s:g}", False
                        not_run(args, results, f"long {contenders.DTYPE} {mode} {name} L={L} (stopped)")
                if why is not None:
                    if stop:
                        stopped.add(name)
                    rows[(mode, name, L)] = ["-", "-", "-", "-", why]
                    continue
                results["long"].append(r)
                print(
                    f"  long: {mode} {name} L={L}: {r['median_s']:.4g} s, peak {r['peak_gib']:.2f} GiB", file=sys.stderr
                )
                rows[(mode, name, L)] = [
                    f"{r['median_s']:.4g}",
                    r["median_s"],  # replaced by the ratio to torch below
                    f"{r['peak_gib']:.2f}",
                    f"{r['peak_gib'] - r['base_gib']:.2f}",
                    "",
                ]
    this_dtype = [r for r in results["long"] if r.get("dtype") == contenders.DTYPE]
    torch_s = {(r["mode"], r["L"]): r["median_s"] for r in this_dtype if r["name"] == "torch"}
    table = []
    for (mode, name, L), row in sorted(
        rows.items(), key=lambda kv: (kv[0][0], LONG_PLAN[kv[0][0]].index(kv[0][1]), kv[0][2])
    ):
        if isinstance(row[1], float):
            row[1] = f"{row[1] / torch_s[(mode, L)]:.2f}x" if (mode, L) in torch_s else "-"
        table.append([mode, label(name), L, *row])
    on_device = any(r.get("device_peak_gib") is not None for r in this_dtype)
    if on_device:
        device_peak = {(r["mode"], r["name"], r["L"]): r.get("device_peak_gib") for r in this_dtype}
        for row in table:
            key = (row[0], next(n for n in LONG_CONTENDERS if label(n) == row[1]), row[2])
            peak = device_peak.get(key)
            row.insert(-1, "-" if peak is None else f"{peak:.2f}")
    title = (
        f"## Long sequences: E={LONG_E}, H={LONG_H}, batch {LONG_B}, need_weights=False, {contenders.DTYPE}\n\n"
        "One process per row, contenders interleaved length by length; median of the runs after a warm-up "
        "(fewer at the longest lengths); peak = that process's peak RSS (VmHWM), library and inputs included; "
        "base = its RSS before the first call"
        + ("; device peak = torch's `max_memory_allocated`, JAX's `peak_bytes_in_use`" if on_device else "")
        + ".\n\n"
    )
    headers = ["mode", "contender", "L=S", "median s", "vs torch", "peak GiB", "peak - base GiB", "note"]
    if on_device:
        headers.insert(-1, "device peak GiB")
    return title + report.md_table(headers, table)


def compile_table(args, results):
    """Seconds to trace, lower and compile a TransformerEncoder against its depth, next to one layer's, and
    its compiled gradient's run time: a stack's layers call one jitted layer function, which JAX traces
    once whatever the depth."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import noxton.nn as nx

    _, _, E, H = args.shape  # the main table's width and heads
    F, N, S = 4 * E, 4, 128
    depths = sorted(int(d) for d in args.depths.split(","))
    reps = args.compile_repeats
    layer = nx.TransformerEncoderLayer(E, H, F, dropout=0.0, key=jax.random.PRNGKey(0))

    def first_call(model, grad, length):
        """Seconds to trace, lower and compile, the compiled program and its input."""

        def f(m, x):
            return jnp.sum(jax.vmap(m)(x))

        jitted: Any = eqx.filter_jit(eqx.filter_grad(f) if grad else f)  # has .lower, which pyright cannot see
        x = jnp.ones((N, length, E))
        t = time.perf_counter()
        compiled = jitted.lower(model, x).compile()
        return time.perf_counter() - t, compiled, x

    plan = [("one TransformerEncoderLayer", 1, layer)]
    plan += [("TransformerEncoder", d, nx.TransformerEncoder(layer, d)) for d in depths]
    rows, results["compile"], one = [], [], {}
    for what, depth, model in plan:
        row, figures = [what, depth], dict[str, Any](model=what, layers=depth)
        for grad in (False, True):
            # each repeat at another sequence length: a new program, which XLA has not cached
            calls = [first_call(model, grad, S + r) for r in range(reps)]
            name = "gradient_s" if grad else "forward_s"
            figures[name] = med = statistics.median(c[0] for c in calls)
            one.setdefault(name, med)
            row += [f"{med:.2f}", f"{med / one[name]:.1f}x"]
        _, compiled, x = calls[0]
        step = functools.partial(compiled, model, x)
        figures["gradient_run_s"] = run = medians({0: lambda step=step: jax.block_until_ready(step())}, 5)[0]
        row.append(f"{run * 1e3:.0f}")
        results["compile"].append(figures)
        rows.append(row)
    title = (
        f"## Compile time of Transformer stacks, d_model={E}, nhead={H}, dim_feedforward={F}\n\n"
        f"Seconds to trace, lower and compile `jax.vmap(model)` over a batch of {N}, and its gradient; median "
        f"of {reps}, each at another sequence length ({S} and up), so that XLA compiles anew; and against one "
        f"layer's. Then the compiled gradient's run time at length {S} (median of 5). A stack's layers call "
        "one jitted layer function, which JAX traces once whatever the depth; XLA compiles every call.\n\n"
    )
    headers = ["model", "layers", "forward s", "vs one layer", "gradient s", "vs one layer", "gradient run ms"]
    return title + report.md_table(headers, rows)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a few minutes)")
    ap.add_argument("--skip-long", action="store_true", help="skip the long-sequence table")
    ap.add_argument("--only-long", action="store_true", help="only the long-sequence table")
    ap.add_argument("--skip-grid", action="store_true", help="skip the grid")
    ap.add_argument("--only-grid", action="store_true", help="only the grid (and its heat map)")
    ap.add_argument("--se-shapes", help="squeeze-excitation shapes N,C,H separated by ';' (default: SE_GRID)")
    ap.add_argument("--grid-sizes", help="grid lengths L=S, comma-separated (default: 128 to 8192; --quick: fewer)")
    ap.add_argument("--grid-batches", help="grid batch sizes, comma-separated (default: 1,8)")
    ap.add_argument("--grid-widths", help="grid E/H pairs, comma-separated (default: 256/8,512/8,1024/16)")
    ap.add_argument("--grid-points", help="grid points B,L,E,H separated by ';' (instead of the product of the axes)")
    ap.add_argument(
        "--grid-contenders",
        help="grid contenders, comma-separated (default: all; torch and noxton_eqx are always timed)",
    )
    ap.add_argument("--grid-max-scores", type=int, help="skip grid points with more scores B*H*L*L than this")
    ap.add_argument("--grid-repeats", type=int, help="timed runs per grid point (default: 7; --quick: 3)")
    ap.add_argument(
        "--grid-settle",
        type=int,
        default=1,
        help="untimed calls of a grid contender before a timed one that comes right after another library's "
        "(default: 1; 0 times every call as it comes)",
    )
    ap.add_argument(
        "--dtype", default="float32", help=f"dtypes of the grid and long tables, comma-separated ({', '.join(DTYPES)})"
    )
    ap.add_argument(
        "--gpu-issue",
        action="store_true",
        help="the GPU issue's sizes, float32 and bfloat16: the grid at B8 L512 E512 H8 and B4 L4096 E1024 H16, "
        "long sequences at 16384 and 131072 (no compile or eager table; fewer contenders, to fit 10 minutes)",
    )
    ap.add_argument("--shape", default="8,512,512,8", help="B,L,E,H of the main table (default: 8,512,512,8)")
    ap.add_argument("--sizes", help="long-sequence lengths, comma-separated (default: 1024 to 65536)")
    ap.add_argument(
        "--long-contenders",
        help=f"long-sequence table contenders, comma-separated (default: every one: {', '.join(LONG_CONTENDERS)})",
    )
    ap.add_argument("--depths", default="2,6,12,24,48", help="Transformer stack depths of the compile-time table")
    ap.add_argument("--compile-repeats", type=int, default=3, help="compilations per figure of that table (median)")
    ap.add_argument("--mem-budget-gib", type=float, default=8.0, help="do not start dense runs estimated above this")
    ap.add_argument("--child-timeout", type=int, default=900, help="seconds per long-sequence process")
    ap.add_argument(
        "--deadline-s",
        type=float,
        help="seconds from the start after which the squeeze-excitation, grid and long-sequence tables start no "
        "further shape, point or process (nor a grid point that the longest so far would carry past it; a "
        "long-sequence process still running is stopped there), so that the page is written with what was "
        "measured, the rest marked not run (default: none; --gpu-issue: 540)",
    )
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile, written on the page")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="tables, JSON and plot")
    ap.add_argument("--page", default=os.path.join(ROOT, "docs", "performance.md"), help="the documentation page")
    ap.add_argument("--child", nargs=4, metavar=("NAME", "MODE", "L", "REPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.started_at = time.monotonic()  # the clock of --deadline-s
    if args.gpu_issue:
        # Sized from an H200's run (docs/performance.md, "On a GPU"): a grid point took about 6 s per contender
        # (compiling), a long-sequence row about 18 s (a process that initialises CUDA). So the grid's eight
        # points take six contenders (about 5 min), the long table two lengths and three contenders per dtype
        # (18 rows: forward+backward stops at 16384; about 5 min): an estimate from those costs, not yet a whole
        # run measured, and near the deadline below, which may cut the last rows (marked not run on the page).
        args.grid_points = args.grid_points or "8,512,512,8;4,4096,1024,16"
        args.grid_contenders = args.grid_contenders or "torch,noxton_eqx,noxton_haiku,noxton_eqx_fused,eqx,jax_dpa"
        args.dtype = "float32,bfloat16"
        args.sizes = args.sizes or "16384,131072"
        args.long_contenders = args.long_contenders or "torch,noxton_eqx,eqx"
        args.mem_budget_gib = max(args.mem_budget_gib, 64.0)
        # The costs above are one card's. With the deadline, a run starts no grid point after 540 s, nor one that
        # the longest point so far would carry past it, and stops a long-sequence process there.
        args.deadline_s = 540.0 if args.deadline_s is None else args.deadline_s
    args.dtypes = args.dtype.split(",")
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        ap.error(f"--dtype: unknown {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    if args.grid_settle < 0:
        ap.error(f"--grid-settle must be 0 or more, got {args.grid_settle}")
    args.shape = tuple(int(x) for x in args.shape.split(","))
    if args.long_contenders is not None:
        args.long_contenders = args.long_contenders.split(",")
        unknown = [n for n in args.long_contenders if n not in LONG_CONTENDERS]
        if unknown:
            ap.error(f"--long-contenders: unknown {', '.join(unknown)}; choose from {', '.join(LONG_CONTENDERS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    contenders.DTYPE = args.dtypes[0]
    if args.child:
        name, mode, L, reps = args.child
        child(name, mode, int(L), int(reps))
        return
    import torch

    torch.set_num_threads(THREADS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--note" in argv:  # what else ran is written on the page, not part of the command to repeat
        del argv[argv.index("--note") : argv.index("--note") + 2]
    argv = [a for a in argv if not a.startswith("--note=")]
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), report.load_average()
    print(f"Machine: {report.machine()}.", flush=True)
    results: dict = {"main": [], "long": [], "grid": []}
    sections = []
    tables = [main_table, eager_table, se_table, compile_table]
    if args.gpu_issue:
        tables = [se_table]
    if args.only_long or args.only_grid:
        tables = []
    for table in tables:
        sections.append(table(args, results))
        print("\n" + sections[-1], flush=True)
    for dtype in args.dtypes:  # the grid and the long sequences, once per dtype
        contenders.DTYPE = dtype
        per_dtype = [] if args.only_long or args.skip_grid else [grid.grid_table]
        per_dtype += [] if args.only_grid or args.skip_long else [long_table]
        for table in per_dtype:
            sections.append(table(args, results))
            print("\n" + sections[-1], flush=True)
    conditions = (
        (f"**{args.note}**\n\n" if args.note else "")
        + f"`{command}`, started {started}. Machine: {report.machine()}. Load average (1, 5, 15 min) at the start: "
        f"{load_start}; at the end: {report.load_average()}."
    )
    print("\n" + conditions)
    report.write(args.out, args.page, command, conditions, sections, results)
    print(f"\nwrote {args.out} and {args.page}")


if __name__ == "__main__":
    main()
