"""Measurement: medians of interleaved runs in one process, and one process per long-sequence run."""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import contenders
from benchmarks.contenders import DENSE, build


def samples(
    calls: dict[Any, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    settle: int = 0,
    library: Callable[[Any], str] | None = None,
    counter: Callable[[], int] | None = None,
) -> dict[Any, list[tuple[float, int]]]:
    """Each key's timed calls: seconds, and how much ``counter`` (a count that only grows, such as the
    process's minor page faults; 0 without one) grew over the call. ``warmup`` calls each come first
    (compilation included there).

    The repeats are interleaved, so that noise from the machine hits every contender alike, and each
    repeat runs the calls in a new order (shuffled, with a fixed seed): torch's OpenMP threads spin
    for a while after each call, which slows whichever call comes next (measured: a 1.0 ms JAX call
    took 1.5 ms right after torch's). A rotation of one order would keep the same call after torch's
    in every repeat (a rotation keeps the cyclic order): measured, two compilations of the same
    program gave 1.28x and 1.00x torch's time, the slower one always run right after torch.

    ``settle`` untimed calls of the same key come before a timed call: before every one, or with ``library``
    (each key's library, ``"torch"`` or ``"jax"``) only before one that comes right after another library's, so
    that no call is timed in the wake of the other library's threads (docs/differences.md, "Timing beside
    torch in one process", has the figures).
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    timed: dict[Any, list[tuple[float, int]]] = {k: [] for k in calls}
    order = list(calls.items())
    rng = random.Random(0)
    previous = None
    count = counter or (lambda: 0)
    for _ in range(reps):
        rng.shuffle(order)
        for k, call in order:
            if library is None or (previous is not None and library(k) != library(previous)):
                for _ in range(settle):
                    call()
            previous = k
            c, t = count(), time.perf_counter()
            call()
            timed[k].append((time.perf_counter() - t, count() - c))
    return timed


def medians(
    calls: dict[Any, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    settle: int = 0,
    library: Callable[[Any], str] | None = None,
) -> dict[Any, float]:
    """Median seconds per call of :func:`samples`."""
    return {k: statistics.median(t for t, _ in v) for k, v in samples(calls, reps, warmup, settle, library).items()}


def elapsed(args) -> float:
    """Seconds since the run started (when its arguments were parsed): the clock of ``--deadline-s``."""
    return time.monotonic() - args.started_at


def time_left(args) -> float | None:
    """Seconds left of the run's ``--deadline-s`` (``None``: it has none)."""
    return None if args.deadline_s is None else args.deadline_s - elapsed(args)


def room_for(args, seconds: float = 0.0) -> bool:
    """More than ``seconds`` are left before the run's ``--deadline-s`` (always, without one): a table starts
    a point or a row only then, and otherwise records it with :func:`not_run`."""
    left = time_left(args)
    return left is None or left > seconds


def not_run(args, results: dict, what: str) -> None:
    """Record in the run's figures that ``what`` was not run, or was stopped, for the run's ``--deadline-s``."""
    results["deadline_s"] = args.deadline_s
    results.setdefault("not_run", []).append(what)


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gib() -> float:
    # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec, so a child would report its parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_device_peak(name: str) -> None:
    """Start a new peak-memory count on the device of contender ``name`` (torch on CUDA only)."""
    if name.startswith("torch"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def device_peak_gib(name: str) -> float | None:
    """Peak memory of the accelerator ``name`` ran on, or ``None`` on the CPU (where peak RSS says it).

    torch: ``max_memory_allocated`` since the last reset; JAX: ``peak_bytes_in_use`` of its first
    device's ``memory_stats()`` (since the process started; there is no reset), which the CPU does not
    report.
    """
    if name.startswith("torch"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    import jax

    stats = jax.devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


LONG_E, LONG_H, LONG_B = 256, 8, 1


def child(name: str, mode: str, L: int, reps: int) -> None:
    """In the child process: time one contender at one length, print its figures as one JSON line."""
    call = build(name, LONG_B, L, LONG_E, LONG_H, mode)
    reset_device_peak(name)
    base = rss_gib()
    t0 = time.perf_counter()
    call()  # warm-up (and compilation)
    first = time.perf_counter() - t0
    median = medians({name: call}, reps, warmup=0)[name]
    record: dict[str, Any] = dict(name=name, mode=mode, L=L, dtype=contenders.DTYPE, median_s=median, first_s=first)
    record.update(peak_gib=peak_gib(), base_gib=base)
    record["device_peak_gib"] = device_peak_gib(name)
    print(json.dumps(record))


def over_budget(name: str, mode: str, L: int, mem_budget_gib: float) -> str | None:
    """Why a long-sequence row is not started, if its contender's scores would exceed the memory budget."""
    # Dense contenders hold several (H, L, L) float32 arrays (more in backward).
    est = LONG_B * LONG_H * L * L * 4 * (3 if mode == "fwd" else 6) / 2**30
    if name in DENSE and est > mem_budget_gib:
        return f"not run: est. {est:.0f} GiB > budget {mem_budget_gib} GiB"
    return None


def long_run(name: str, mode: str, L: int, reps: int, timeout_s: float) -> dict:
    """One (contender, mode, L) in its own process: its figures, or ``{"skipped": why}`` (with ``"timed_out"`` when
    the process ran past ``timeout_s``). The caller has checked :func:`over_budget` first."""
    cmd = [sys.executable, "-m", "benchmarks", "--dtype", contenders.DTYPE, "--child", name, mode, str(L), str(reps)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=root)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timeout > {timeout_s:g} s", "timed_out": True}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"skipped": f"failed (rc {p.returncode}): {p.stderr.strip()[-120:]}"}
    return json.loads(lines[-1])
