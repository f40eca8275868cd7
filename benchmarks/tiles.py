"""The blockwise path's tile sizes, side by side: ``python -m benchmarks.tiles B,E,H L[,L...] MODE TILES``.

``TILES`` is a comma-separated list of ``log2(BLOCK_SCORES):MAX_BLOCK_Q:MAX_BLOCK_K``, for example
``23:512:1024,23:256:512``. For each length, every tiling is timed against torch's MHA (and any
``--peers``) in one process, the repeats interleaved; each row also gives the memory that one call
faults in (the process's minor page faults times the page size): glibc serves every allocation of
32 MiB or more with a fresh ``mmap``, so a program whose temporaries reach that size faults its pages
in again on every call. These are the figures behind ``noxton/functional/_blockwise.py``'s tile sizes.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tiles", description=__doc__)
    ap.add_argument("shape", help="B,E,H")
    ap.add_argument("lengths", help="L=S values, comma-separated")
    ap.add_argument("mode", choices=("fwd", "fwd_bwd"))
    ap.add_argument("tiles", help="log2(BLOCK_SCORES):MAX_BLOCK_Q:MAX_BLOCK_K, comma-separated")
    ap.add_argument("--peers", default="torch,eqx", help="contenders timed alongside (the first is the reference)")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")
    import torch

    import noxton.functional._blockwise as blockwise
    from benchmarks.contenders import THREADS, build

    torch.set_num_threads(THREADS)
    B, E, H = (int(x) for x in args.shape.split(","))
    tiles = [tuple(int(v) for v in t.split(":")) for t in args.tiles.split(",")]
    peers = args.peers.split(",")
    page = os.sysconf("SC_PAGE_SIZE")

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    saved = blockwise.BLOCK_SCORES, blockwise.MAX_BLOCK_Q, blockwise.MAX_BLOCK_K
    for L in (int(x) for x in args.lengths.split(",")):
        calls = {n: build(n, B, L, E, H, args.mode) for n in peers}
        for log2, max_q, max_k in tiles:
            blockwise.BLOCK_SCORES, blockwise.MAX_BLOCK_Q, blockwise.MAX_BLOCK_K = 2**log2, max_q, max_k
            call = build("noxton_eqx_blockwise", B, L, E, H, args.mode)
            call()  # compiles with these tile sizes
            calls[f"blockwise {log2}:{max_q}:{max_k} -> {blockwise.block_sizes(B * H, L, L)}"] = call
        blockwise.BLOCK_SCORES, blockwise.MAX_BLOCK_Q, blockwise.MAX_BLOCK_K = saved
        for call in calls.values():
            call()
        times: dict[str, list[float]] = {n: [] for n in calls}
        faulted: dict[str, list[int]] = {n: [] for n in calls}
        order = list(calls.items())
        for rep in range(args.reps):  # rotated, as in measure.medians
            for n, call in order[rep % len(order) :] + order[: rep % len(order)]:
                f, t = faults(), time.perf_counter()
                call()
                times[n].append(time.perf_counter() - t)
                faulted[n].append(faults() - f)
        ref = statistics.median(times[peers[0]])
        print(f"B={B} E={E} H={H} L=S={L} {args.mode}, medians of {args.reps} (load {os.getloadavg()[0]:.2f}):")
        for n in calls:
            m = statistics.median(times[n])
            mib = statistics.median(faulted[n]) * page / 2**20
            print(f"  {n:44s} {m * 1e3:9.1f} ms  {m / ref:5.2f}x  {mib:6.0f} MiB faulted per call", flush=True)


if __name__ == "__main__":
    main()
