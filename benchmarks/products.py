"""Matrix products alone, XLA against torch, with the cores each keeps busy:
``python -m benchmarks.products [--shapes M,K,N;...] [--one-core] [--reps N]``.

At the grid's small points (one example, a few hundred positions) noxton's time is that of its matrix products: the
whole layer runs within a few percent of the JAX matmul-only lower bound of ``python -m benchmarks`` there. This
times the products on their own. For each ``(M, K, N)``, an ``[M, K]`` input times an ``[N, K]`` weight, as a
layer's projection: jitted in JAX (float32 at ``Precision.HIGHEST``, as noxton's projections ask), and
``torch.nn.functional.linear`` on as many threads as the process may use. Each library runs alone, in a block of
its own calls (torch's OpenMP threads keep a core spinning for a while after each call, which would slow, and count
as CPU time of, whatever ran next); each row gives the median call and, for each library, the process's CPU time
over wall time across its block: about 1 when a product runs on one core, 2 on two. ``--one-core`` pins the process
to one CPU before either library starts (``os.sched_setaffinity``), so that both run on one core: set side by side
with a run without it, this says whether a library's time at a shape is its arithmetic or how it spreads the
product over the cores. docs/differences.md ("Small products on the CPU") has a run.
"""

from __future__ import annotations

import argparse
import os
import time

#: The packed in-projections of E=256 and E=1024 (``3E`` outputs) at 128 to 2048 rows (B x L).
SHAPES = [(128, 256, 768), (512, 256, 768), (2048, 256, 768), (128, 1024, 3072), (512, 1024, 3072)]


def alone(call, reps: int) -> tuple[float, float]:
    """``call``'s median seconds over ``reps`` calls in a block of its own (``measure.medians`` of it alone, after two
    calls that compile), and the process's CPU time over wall time across that block."""
    from benchmarks.measure import medians

    call()
    call()
    wall, cpu = time.perf_counter(), time.process_time()
    median = medians({"call": call}, reps, warmup=0)["call"]
    return median, (time.process_time() - cpu) / (time.perf_counter() - wall)


def shapes(text: str | None) -> list[tuple[int, int, int]]:
    if not text:
        return list(SHAPES)
    out = []
    for part in text.split(";"):
        try:
            dims = tuple(int(v) for v in part.split(","))
        except ValueError:
            dims = ()
        if len(dims) != 3 or min(dims) < 1:
            raise SystemExit(f"--shapes: expected positive M,K,N triples separated by ';'; got {part!r}")
        out.append(dims)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--shapes", help="M,K,N triples separated by ';' (default: SHAPES)")
    ap.add_argument("--one-core", action="store_true", help="pin the process to one CPU first")
    ap.add_argument("--reps", type=int, default=51, help="timed calls per library and shape")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps: expected at least 1 timed call; got {args.reps}")
    todo = shapes(args.shapes)
    pinnable = hasattr(os, "sched_setaffinity")
    if args.one_core:  # before JAX and torch size their thread pools
        if not pinnable:
            raise SystemExit("--one-core: this platform cannot pin a process to a CPU (no os.sched_setaffinity)")
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cores = len(os.sched_getaffinity(0)) if pinnable else (os.cpu_count() or 1)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from jax import lax

    from benchmarks import contenders, report

    torch.set_num_threads(cores)
    device = contenders.torch_device()
    product = contenders.on_device(
        jax.jit(lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST))
    )
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in todo:
        x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
        jx, jw = jnp.asarray(x), jnp.asarray(w)
        tx, tw = torch.from_numpy(x).to(device), torch.from_numpy(w).to(device)

        def torch_call(tx=tx, tw=tw):
            with torch.no_grad():
                out = torch.nn.functional.linear(tx, tw)
            contenders.torch_sync()
            return out

        calls = {"xla": lambda jx=jx, jw=jw: product(jx, jw), "torch": torch_call}
        med, used = {}, {}
        for name, call in calls.items():
            med[name], used[name] = alone(call, args.reps)
        rows.append(
            [
                f"{m} x {k} x {n}",
                f"{2 * m * k * n / 1e6:.3g}",
                f"{med['xla'] * 1e3:.3f}",
                f"{used['xla']:.2f}",
                f"{med['torch'] * 1e3:.3f}",
                f"{used['torch']:.2f}",
                f"{med['xla'] / med['torch']:.2f}x",
            ]
        )
    headers = ["M x K x N", "MFLOP", "XLA ms", "XLA CPU / wall", "torch ms", "torch CPU / wall", "XLA / torch"]
    print(
        f"Products x @ W.T, float32, medians of {args.reps} calls, each library alone; {cores} core(s) "
        f"({'pinned' if args.one_core else 'all the process may use'}); {report.device()}; "
        f"load {report.load_average()}\n"
    )
    print(report.md_table(headers, rows))


if __name__ == "__main__":
    main()
