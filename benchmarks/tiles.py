"""The blockwise path's tile sizes, side by side: ``python -m benchmarks.tiles B,E,H L[,L...] MODE [TILES]``.

``TILES`` is a comma-separated list of ``log2(BLOCK_SCORES):MAX_BLOCK_Q:MAX_BLOCK_K``, for example
``23:512:1024,23:256:512``; ``--chunk-scores 21,19`` instead (or as well) times the CPU's whole-key passes
with chunks of ``2**21`` and ``2**19`` scores: ``CHUNK_SCORES`` for ``fwd``, ``CHUNK_SCORES_VJP`` for
``fwd_bwd`` (the forward keeps its own), with the chunk rules of ``forward_chunks`` and ``backward_chunks``
(``CHUNK_RULES_OFF``: the AVX-512 forward's and the backward's one chunk) off, so that the budget alone sets the
chunks. For each length, every variant is compiled once and timed against torch's MHA (and any ``--peers``) in
one process, the repeats interleaved and their order shuffled; each row also gives the memory that one call
faults in (the process's minor page faults times the page size): glibc serves every allocation of more than
its ``mmap`` threshold with a fresh ``mmap``, so a program whose temporaries pass it faults its pages in again
on every call.
``--weight-first-rows 0,256`` times the whole layer (``implementation="auto"``) with
``noxton.functional._attention.CPU_WEIGHT_FIRST_ROWS`` at each value: the projections of fewer rows
than it run ``W @ x.T`` on the CPU, 0 turns that off. ``--normalise before,rule`` times the whole layer with
every whole-key chunk dividing by the softmax's sum before the second product (``before``: what
``noxton.functional._blockwise.NORMALISE_AFTER`` turns off), after it (``after``), or after it except for
``NORMALISED_FIRST``'s chunks (``rule``: what ``NORMALISE_AFTER``, on CPUs with AVX-512, turns on).
``--chunk-rule former,rule`` times the whole layer with the whole-key chunks of ``whole_key_chunks``
alone (``former``) or of ``forward_chunks`` and ``backward_chunks`` (``rule``: with AVX-512, one row of
up to ``LONG_ROW_CHUNK_Q`` queries past ``FUSED_KEYS_MAX`` keys, one row from half of it at head sizes up
to ``NARROW_HEAD``, small calls as one chunk, and chunks of every head of whole examples from 257 to 512 keys,
``ALL_ROWS_QUERIES``; on Intel CPUs and with AVX-512, the backward's small calls as one chunk).
``--avx512-rules off,rule`` times the whole layer with the forward's rules that AVX-512 turns on
(``noxton.functional._blockwise.AVX512``) off, as CPUs without it take them, or as this CPU takes them.
``--in-projection packed,rule``
times the whole layer with self-attention's in-projection as one ``(3E, E)`` product at every size (``packed``) or as
``noxton.functional._attention._packed_in_projection`` decides (``rule``: on the CPU, three products from
``CPU_WEIGHT_FIRST_ROWS`` rows). ``--row-max after,before`` times the whole layer with the key loop's row maximum
taken after the scale or before it (``before``: what ``noxton.functional._blockwise.MAX_BEFORE_SCALE`` turns on;
the layer takes the key loop past ``WHOLE_KEYS_MAX`` keys).
``--set 'ONE_CHUNK_SCORES_VJP=0;ONE_CHUNK_SCORES_VJP=2**21'`` times the whole layer with any of
``noxton.functional._blockwise``'s constants set, one variant per ``;``-separated group of ``NAME=VALUE`` pairs
(``,`` between pairs; a value is an integer, ``2**N``, ``None``, ``True`` or ``False``). ``--settle 1`` makes one
untimed call of the same variant before each timed one, so that no call is timed right after another's (torch's
OpenMP threads slow the call after theirs: docs/differences.md, "Timing beside torch in one process"). These are
the figures behind ``noxton/functional/_blockwise.py``'s tile sizes, chunk budgets and normalisation, and behind
that constant.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tiles", description=__doc__)
    ap.add_argument("shape", help="B,E,H")
    ap.add_argument("lengths", help="L=S values, comma-separated")
    ap.add_argument("mode", choices=("fwd", "fwd_bwd"))
    ap.add_argument("tiles", nargs="?", default="", help="log2(BLOCK_SCORES):MAX_BLOCK_Q:MAX_BLOCK_K, comma-separated")
    ap.add_argument(
        "--chunk-scores",
        default="",
        help="log2 of the whole-key chunks' budget, comma-separated (CHUNK_SCORES; CHUNK_SCORES_VJP for fwd_bwd)",
    )
    ap.add_argument(
        "--weight-first-rows",
        default="",
        help="values of CPU_WEIGHT_FIRST_ROWS, comma-separated (the whole layer, auto, at each)",
    )
    ap.add_argument(
        "--normalise",
        default="",
        help="whole-key chunks divide by the softmax's sum before the second product, after it, or after it "
        "except for NORMALISED_FIRST's chunks (before, after, rule; comma-separated; the whole layer, auto, at each)",
    )
    ap.add_argument(
        "--chunk-rule",
        default="",
        help="the whole-key chunks: whole_key_chunks alone, or the rules of forward_chunks and backward_chunks "
        "(former, rule; comma-separated; the whole layer, auto, at each)",
    )
    ap.add_argument(
        "--avx512-rules",
        default="",
        help="the forward's rules that AVX-512 turns on: off (as CPUs without it), or as this CPU takes them (off, "
        "rule; comma-separated; the whole layer, auto, at each)",
    )
    ap.add_argument(
        "--in-projection",
        default="",
        help="self-attention's in-projection: one packed product always, or as the rule decides (packed, rule; "
        "comma-separated; the whole layer, auto, at each)",
    )
    ap.add_argument(
        "--row-max",
        default="",
        help="the key loop's row maximum taken after the scale or before it (after, before; comma-separated; the "
        "whole layer, auto, at each)",
    )
    ap.add_argument(
        "--set",
        default="",
        help="variants of the whole layer (auto) with noxton.functional._blockwise constants set: NAME=VALUE pairs "
        "separated by ',', variants by ';' (a value: an integer, 2**N, None, True or False)",
    )
    ap.add_argument(
        "--settle",
        type=int,
        default=0,
        help="untimed calls of the same variant before each timed one (default 0)",
    )
    ap.add_argument("--peers", default="torch,eqx", help="contenders timed alongside (the first is the reference)")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")
    import torch

    import noxton.functional._attention as attention
    import noxton.functional._blockwise as blockwise
    from benchmarks.contenders import THREADS, build
    from benchmarks.measure import samples

    torch.set_num_threads(THREADS)
    B, E, H = (int(x) for x in args.shape.split(","))
    tiles = [tuple(int(v) for v in t.split(":")) for t in args.tiles.split(",") if t]
    chunks = [int(v) for v in args.chunk_scores.split(",") if v]
    rows = [int(v) for v in args.weight_first_rows.split(",") if v]
    normalise = [v for v in args.normalise.split(",") if v]
    if set(normalise) - {"before", "after", "rule"}:
        ap.error(f"--normalise takes before, after and rule, got {args.normalise!r}")
    chunk_rule = [v for v in args.chunk_rule.split(",") if v]
    if set(chunk_rule) - {"former", "rule"}:
        ap.error(f"--chunk-rule takes former and rule, got {args.chunk_rule!r}")
    avx512_rules = [v for v in args.avx512_rules.split(",") if v]
    if set(avx512_rules) - {"off", "rule"}:
        ap.error(f"--avx512-rules takes off and rule, got {args.avx512_rules!r}")
    in_projection = [v for v in args.in_projection.split(",") if v]
    if set(in_projection) - {"packed", "rule"}:
        ap.error(f"--in-projection takes packed and rule, got {args.in_projection!r}")
    row_max = [v for v in args.row_max.split(",") if v]
    if set(row_max) - {"after", "before"}:
        ap.error(f"--row-max takes after and before, got {args.row_max!r}")
    try:
        settings = [_settings(group, blockwise) for group in args.set.split(";") if group]
    except ValueError as e:
        ap.error(f"--set: {e}")
    if args.settle < 0:
        ap.error(f"--settle must be 0 or more, got {args.settle}")
    if not any((tiles, chunks, rows, normalise, chunk_rule, avx512_rules, in_projection, row_max, settings)):
        ap.error(
            "give TILES, --chunk-scores, --weight-first-rows, --normalise, --chunk-rule, --avx512-rules, "
            "--in-projection, --row-max or --set"
        )
    budget = "CHUNK_SCORES" if args.mode == "fwd" else "CHUNK_SCORES_VJP"
    peers = args.peers.split(",")
    page = os.sysconf("SC_PAGE_SIZE")

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    names = (
        *("BLOCK_SCORES", "MAX_BLOCK_Q", "MAX_BLOCK_K", budget),
        *("NORMALISE_AFTER", "NORMALISED_FIRST", "MAX_BEFORE_SCALE"),
        *blockwise.CHUNK_RULES_OFF,
        *blockwise.AVX512_RULES_OFF,
        *(name for values in settings for name in values),
    )
    saved = {n: getattr(blockwise, n) for n in names}
    saved_rows = attention.CPU_WEIGHT_FIRST_ROWS
    saved_packed = attention._packed_in_projection

    def variant(label, contender="noxton_eqx_blockwise", **values):
        blockwise.__dict__.update(values)
        try:
            if "BLOCK_SCORES" in values:
                label += f" -> {blockwise.block_sizes(B * H, L, L)}"
            call = build(contender, B, L, E, H, args.mode)
            call()  # compiles with these values
        finally:
            blockwise.__dict__.update(saved)
            attention.CPU_WEIGHT_FIRST_ROWS = saved_rows
            attention._packed_in_projection = saved_packed
        calls[label] = call

    for L in (int(x) for x in args.lengths.split(",")):
        calls = {n: build(n, B, L, E, H, args.mode) for n in peers}
        for log2, max_q, max_k in tiles:
            variant(f"blockwise {log2}:{max_q}:{max_k}", BLOCK_SCORES=2**log2, MAX_BLOCK_Q=max_q, MAX_BLOCK_K=max_k)
        for log2 in chunks:
            variant(f"blockwise {budget}=2**{log2}", **{budget: 2**log2}, **blockwise.CHUNK_RULES_OFF)
        for n in rows:
            attention.CPU_WEIGHT_FIRST_ROWS = n
            variant(f"auto CPU_WEIGHT_FIRST_ROWS={n}", "noxton_eqx")
        for how in normalise:
            after = {"NORMALISE_AFTER": how != "before"} | ({"NORMALISED_FIRST": frozenset()} if how == "after" else {})
            variant(f"auto normalised {how}", "noxton_eqx", **after)
        for how in chunk_rule:
            variant(f"auto chunk rule {how}", "noxton_eqx", **(blockwise.CHUNK_RULES_OFF if how == "former" else {}))
        for how in avx512_rules:
            variant(f"auto AVX-512 rules {how}", "noxton_eqx", **(blockwise.AVX512_RULES_OFF if how == "off" else {}))
        for how in in_projection:
            if how == "packed":
                attention._packed_in_projection = lambda x: True
            variant(f"auto in-projection {how}", "noxton_eqx")
        for how in row_max:
            variant(f"auto row maximum {how} the scale", "noxton_eqx", MAX_BEFORE_SCALE=how == "before")
        for values in settings:
            variant("auto " + ", ".join(f"{n}={v!r}" for n, v in values.items()), "noxton_eqx", **values)
        timed = samples(calls, args.reps, settle=args.settle, counter=faults)
        times = {n: [t for t, _ in v] for n, v in timed.items()}
        faulted = {n: [f for _, f in v] for n, v in timed.items()}
        ref = statistics.median(times[peers[0]])
        settled = f", each after {args.settle} untimed call(s) of its own" if args.settle else ""
        print(
            f"B={B} E={E} H={H} L=S={L} {args.mode}, medians of {args.reps}{settled} (load {os.getloadavg()[0]:.2f}):"
        )
        for n in calls:
            m = statistics.median(times[n])
            mib = statistics.median(faulted[n]) * page / 2**20
            print(f"  {n:44s} {m * 1e3:9.1f} ms  {m / ref:5.2f}x  {mib:6.0f} MiB faulted per call", flush=True)


def _settings(group: str, module) -> dict:
    """``"NAME=VALUE,NAME=VALUE"`` as ``{NAME: value}``, each name a constant of ``module``."""
    out = {}
    for pair in group.split(","):
        name, sep, text = (part.strip() for part in pair.partition("="))
        if not sep or not hasattr(module, name) or not name.isupper():
            raise ValueError(f"expected NAME=VALUE with NAME a constant of {module.__name__}, got {pair!r}")
        base, power, exponent = text.partition("**")
        try:
            if power:
                out[name] = int(base) ** int(exponent)
            else:
                out[name] = {"None": None, "True": True, "False": False}[text] if text[:1].isalpha() else int(text)
        except (KeyError, ValueError):
            raise ValueError(f"{name}: expected an integer, 2**N, None, True or False, got {text!r}") from None
    return out


if __name__ == "__main__":
    main()
