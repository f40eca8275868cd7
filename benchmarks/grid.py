"""The grid: every contender at every (mode, batch, width, length), side by side, and its heat map.

At each point of the grid all contenders are built, warmed up (compiled) and timed in one round robin,
so that load on the machine enters every ratio at that point alike; a call right after another library's is
first made ``--grid-settle`` times untimed (``measure.medians``). A point is skipped when its
scores ``B * H * L * L`` exceed ``--grid-max-scores`` (its run would take too long); a dense
contender is not started where its score matrices would exceed the memory budget.
"""

from __future__ import annotations

import itertools
import sys

from benchmarks import report
from benchmarks.contenders import DENSE, build
from benchmarks.measure import device_peak_gib, elapsed, medians, not_run, reset_device_peak, room_for

#: noxton (both front ends, ``auto`` and each path), then its peers; ratios are to torch's time.
NOXTON = ["noxton_eqx", "noxton_haiku", "noxton_eqx_dense", "noxton_eqx_blockwise", "noxton_eqx_fused"]
PEERS = ["torch", "eqx", "haiku", "flax", "jax_dpa"]
JAX_PEERS = ["eqx", "haiku", "flax", "jax_dpa"]
GRID_CONTENDERS = ["torch", *NOXTON, *JAX_PEERS]
#: The heat map's subject: noxton's Equinox front end with ``implementation="auto"``.
SUBJECT = "noxton_eqx"
SHORT = {
    "torch": "torch",
    "noxton_eqx": "nx eqx auto",
    "noxton_haiku": "nx hk auto",
    "noxton_eqx_dense": "nx dense",
    "noxton_eqx_blockwise": "nx blockwise",
    "noxton_eqx_fused": "nx fused",
    "eqx": "eqx.nn",
    "haiku": "hk",
    "flax": "nnx",
    "jax_dpa": "jax dpa",
}

#: The grid's axes: lengths, batch sizes, (E, H) widths; ``--quick`` runs the smaller one.
FULL = ((128, 256, 512, 1024, 2048, 4096, 8192), (1, 8), ((256, 8), (512, 8), (1024, 16)))
QUICK = ((128, 512, 2048), (1, 8), ((256, 8), (1024, 16)))


def max_scores(args) -> int:
    """Grid points with more scores ``B * H * L * L`` than this are not run."""
    return args.grid_max_scores or (2**27 if args.quick else 2**31)


def points(args) -> list[tuple[str, int, int, int, int]]:
    """``(mode, B, E, H, L)`` of the grid: ``--grid-points`` as given, else the product of its axes."""
    if args.grid_points:
        shapes = [tuple(int(v) for v in p.split(",")) for p in args.grid_points.split(";")]
        return [(mode, B, E, H, L) for mode in ("fwd", "fwd_bwd") for B, L, E, H in shapes]
    lengths, batches, widths = QUICK if args.quick else FULL
    if args.grid_sizes:
        lengths = tuple(int(x) for x in args.grid_sizes.split(","))
    if args.grid_batches:
        batches = tuple(int(x) for x in args.grid_batches.split(","))
    if args.grid_widths:
        widths = tuple((int(w.split("/")[0]), int(w.split("/")[1])) for w in args.grid_widths.split(","))
    out = []
    for mode, B, (E, H), L in itertools.product(("fwd", "fwd_bwd"), batches, widths, lengths):
        if B * H * L * L <= max_scores(args):
            out.append((mode, B, E, H, L))
    return out


#: Contenders that hold the ``[B, H, L, S]`` scores (the fused path is XLA's composition off cuDNN).
GRID_DENSE = DENSE | {"haiku", "flax", "noxton_eqx_fused"}


def _fits(name: str, mode: str, B: int, H: int, L: int, budget_gib: float) -> bool:
    est = B * H * L * L * 4 * (3 if mode == "fwd" else 6) / 2**30
    return name not in GRID_DENSE or est <= budget_gib


def grid_contenders(args) -> list[str]:
    """``--grid-contenders`` in the grid's order, torch and ``SUBJECT`` always among them (all without it)."""
    if not args.grid_contenders:
        return list(GRID_CONTENDERS)
    asked = set(args.grid_contenders.split(","))
    unknown = sorted(asked - set(GRID_CONTENDERS))
    if unknown:
        raise SystemExit(f"--grid-contenders: unknown {unknown}; choose from {', '.join(GRID_CONTENDERS)}")
    return [n for n in GRID_CONTENDERS if n in asked | {"torch", SUBJECT}]


def library(name: str) -> str:
    """A contender's library, as ``measure.medians`` tells a switch between two."""
    return "torch" if name.startswith("torch") else "jax"


def settled(settle: int) -> str:
    """How the page says what ``--grid-settle`` did."""
    if not settle:
        return "each call timed as it came, right after another library's or not"
    times = "once" if settle == 1 else f"{settle} times"
    return (
        f"a call that came right after another library's was first made {times} untimed, since torch's "
        "OpenMP threads spin on a core for a few ms after each call and slowed the JAX call after it by up to 40%"
    )


def grid_table(args, results) -> str:
    """Time every contender at every grid point; a Markdown table of ratios to torch, and the figures."""
    from benchmarks import contenders

    reps = args.grid_repeats or (3 if args.quick else 7)
    dtype = contenders.DTYPE
    chosen = grid_contenders(args)
    rows, skipped, longest = [], [], 0.0
    for mode, B, E, H, L in points(args):
        if not room_for(args, longest):  # a point is not started unless the longest one so far would end in time
            skipped.append(f"{mode} B={B} E/H={E}/{H} L={L}")
            not_run(args, results, f"grid {dtype} {skipped[-1]}")
            continue
        started = elapsed(args)
        names = [n for n in chosen if _fits(n, mode, B, H, L, args.mem_budget_gib)]
        calls = {}
        peaks = {}
        for n in names:
            calls[n] = build(n, B, L, E, H, mode)
            reset_device_peak(n)
            calls[n]()  # compiles
            if n.startswith("torch"):  # JAX's peak counts from the process's start: not one contender's
                peaks[n] = device_peak_gib(n)
        med = medians(calls, reps, settle=args.grid_settle, library=library)
        torch_s = med["torch"]
        point = dict(mode=mode, B=B, E=E, H=H, L=L, dtype=dtype, median_s=med, device_peak_gib=peaks)
        results["grid"].append(point)
        fastest = min(PEERS, key=lambda n: med.get(n, float("inf")))
        jax_best = min((med[n] for n in JAX_PEERS if n in med), default=float("inf"))
        print(
            f"  grid: {mode} B={B} E={E} H={H} L={L}: torch {torch_s * 1e3:.1f} ms, auto "
            f"{med[SUBJECT] / torch_s:.2f}x torch, {med[SUBJECT] / jax_best:.2f}x the fastest JAX peer; ms: "
            + ", ".join(f"{SHORT[n]} {t * 1e3:.2f}" for n, t in med.items()),
            file=sys.stderr,
            flush=True,
        )
        row = [mode, B, f"{E}/{H}", L, f"{torch_s * 1e3:.1f}"]
        row += [f"{med[n] / torch_s:.2f}" if n in med else "-" for n in chosen[1:]]
        row += [f"{med[SUBJECT] / med[fastest]:.2f}", SHORT[fastest]]
        if any(v is not None for v in peaks.values()):
            row.append(" ".join(f"{SHORT[n]} {v:.2f}" for n, v in peaks.items() if v is not None))
        rows.append(row)
        longest = max(longest, elapsed(args) - started)
    headers = ["mode", "B", "E/H", "L=S", "torch ms", *(SHORT[n] for n in chosen[1:])]
    headers += ["auto / fastest", "fastest"]
    if any(len(r) > len(headers) for r in rows):
        headers.append("device peak GiB")
        rows = [r + [""] * (len(headers) - len(r)) for r in rows]
    title = (
        f"## The grid: self-attention, need_weights=False, {dtype}\n\n"
        f"At each point every contender is compiled, then timed in one round robin (median of {reps}; "
        + settled(args.grid_settle)
        + "); ratios are to torch's time at that point (below 1: faster than torch). `auto / fastest` is noxton's "
        "Equinox front end with `implementation='auto'` against the fastest of torch and the JAX peers "
        "(eqx.nn, hk, flax.nnx, jax.nn.dot_product_attention). A dash: not run (its score matrices would "
        f"exceed {args.mem_budget_gib} GiB). Points whose B·H·L² exceeds {max_scores(args):.2g} are not "
        "run. On an accelerator, the last column is torch's peak device memory (`max_memory_allocated`); "
        "JAX's `peak_bytes_in_use` counts from the start of the process, so the JAX contenders' peaks are "
        "in the long-sequence table, one process per row.\n\n"
    )
    if skipped:
        title += (
            f"Not run: {len(skipped)} of the grid's points ({', '.join(skipped)}), which would have started after "
            f"the run's `--deadline-s` of {args.deadline_s:g} s or run past it.\n\n"
        )
    return title + report.md_table(headers, rows)


def heatmap(grid: list[dict], path: str, device: str) -> None:
    """noxton ``auto``'s time over the fastest peer's at each grid point: one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    modes = [m for m in ("fwd", "fwd_bwd") if any(p["mode"] == m for p in grid)]
    lengths = sorted({p["L"] for p in grid})
    rows = sorted({(p["B"], p["E"], p["H"]) for p in grid})
    fig, axes = plt.subplots(1, len(modes), figsize=(1.1 * len(lengths) * len(modes) + 2, 0.7 * len(rows) + 2))
    axes = [axes] if len(modes) == 1 else list(axes)
    norm = TwoSlopeNorm(vmin=0.5, vcenter=1.0, vmax=2.0)
    image = None
    for ax, mode in zip(axes, modes, strict=True):
        data = [[float("nan")] * len(lengths) for _ in rows]
        for p in grid:
            if p["mode"] != mode or p["dtype"] != grid[0]["dtype"]:
                continue
            med = p["median_s"]
            best = min(med[n] for n in PEERS if n in med)
            data[rows.index((p["B"], p["E"], p["H"]))][lengths.index(p["L"])] = med[SUBJECT] / best
        image = ax.imshow(data, cmap="RdYlGn_r", norm=norm, aspect="auto")
        for i, j in itertools.product(range(len(rows)), range(len(lengths))):
            if data[i][j] == data[i][j]:  # not NaN
                ax.text(j, i, f"{data[i][j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(rows)), [f"B={b} E={e} H={h}" for b, e, h in rows] if ax is axes[0] else [])
        ax.set_xlabel("L = S")
        ax.set_title("forward" if mode == "fwd" else "forward+backward")
    assert image is not None  # one panel at least
    fig.colorbar(image, ax=axes, label="noxton auto / fastest peer (time)")
    title = f"noxton.nn (auto) against the fastest of torch and the JAX peers, {grid[0]['dtype']}; {device}"
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
