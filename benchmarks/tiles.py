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
on every call. ``MODE`` is ``fwd`` (``need_weights=False``), ``fwd_w`` (``need_weights=True``, where
``noxton.functional._attention.DENSE_CHUNK_SCORES`` sets the dense path's blocks of queries; torch returns its
weights too, while eqx.nn, which has none, runs its plain forward) or ``fwd_bwd``.
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
``CPU_PACKED_ROWS`` rows, unless the weight has ``PACKED_WEIGHT_BYTES``). ``--row-max after,before`` times
the whole layer with the key loop's row maximum taken after the scale or before it (``before``: what
``noxton.functional._blockwise.MAX_BEFORE_SCALE`` turns on; the layer takes the key loop past ``WHOLE_KEYS_MAX``
keys).
``--set 'ONE_CHUNK_SCORES_VJP=0;ONE_CHUNK_SCORES_VJP=2**21'`` times the whole layer with any of
``noxton.functional._blockwise``'s (or ``noxton.functional._attention``'s) constants set, one variant per
``;``-separated group of ``NAME=VALUE`` pairs (``,`` between pairs; a value is an integer, ``2**N``, ``None``,
``True`` or ``False``). The flags before it are named spellings of such groups (``--row-max before`` is
``MAX_BEFORE_SCALE=True``, ``--weight-first-rows 0`` is ``CPU_WEIGHT_FIRST_ROWS=0``, ``--chunk-rule former`` is
``CHUNK_RULES_OFF``'s values), kept for the commands that the comments beside the constants quote.
``--settle 1`` makes one untimed call of the same variant before each timed one, so that no call is timed right
after another's (torch's OpenMP threads slow the call after theirs: docs/differences.md, "Timing beside torch in
one process"). These are
the figures behind ``noxton/functional/_blockwise.py``'s tile sizes, chunk budgets and normalisation, and behind
that constant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tiles", description=__doc__)
    ap.add_argument("shape", help="B,E,H")
    ap.add_argument("lengths", help="L=S values, comma-separated")
    ap.add_argument("mode", choices=("fwd", "fwd_w", "fwd_bwd"), help="fwd_w: need_weights=True")
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
        help="variants of the whole layer (auto) with constants of noxton.functional._blockwise or _attention set: "
        "NAME=VALUE pairs "
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
    try:
        plan = _plan(args, blockwise, attention)
    except ValueError as e:
        ap.error(str(e))
    if args.settle < 0:
        ap.error(f"--settle must be 0 or more, got {args.settle}")
    if not plan:
        ap.error(
            "give TILES, --chunk-scores, --weight-first-rows, --normalise, --chunk-rule, --avx512-rules, "
            "--in-projection, --row-max or --set"
        )
    peers = args.peers.split(",")
    page = os.sysconf("SC_PAGE_SIZE")

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    for L in (int(x) for x in args.lengths.split(",")):
        calls = {n: build(n, B, L, E, H, args.mode) for n in peers}
        for label, contender, values in plan:
            with _patched(values, (blockwise, attention)):
                if "BLOCK_SCORES" in values:
                    label += f" -> {blockwise.block_sizes(B * H, L, L)}"
                call = build(contender, B, L, E, H, args.mode)
                call()  # compiles with these values
            calls[label] = call
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


def _plan(args, blockwise, attention) -> list[tuple[str, str, dict]]:
    """Every variant the flags ask for, as ``(label, contender, {NAME: value})``. The older flags are spellings of
    ``--set`` groups (``--row-max before`` is ``MAX_BEFORE_SCALE=True``) under labels of their own; a choice called
    ``rule`` leaves the constants as this CPU takes them (``--normalise rule`` turns ``NORMALISE_AFTER`` on)."""
    budget = "CHUNK_SCORES" if args.mode == "fwd" else "CHUNK_SCORES_VJP"
    # flag -> (label of a choice, {choice: values})
    choices = {
        "normalise": (
            "auto normalised {}",
            {
                "before": {"NORMALISE_AFTER": False},
                "after": {"NORMALISE_AFTER": True, "NORMALISED_FIRST": frozenset()},
                "rule": {"NORMALISE_AFTER": True},
            },
        ),
        "chunk_rule": ("auto chunk rule {}", {"former": blockwise.CHUNK_RULES_OFF, "rule": {}}),
        "avx512_rules": ("auto AVX-512 rules {}", {"off": blockwise.AVX512_RULES_OFF, "rule": {}}),
        "in_projection": ("auto in-projection {}", {"packed": {"_packed_in_projection": lambda *_: True}, "rule": {}}),
        "row_max": (
            "auto row maximum {} the scale",
            {"after": {"MAX_BEFORE_SCALE": False}, "before": {"MAX_BEFORE_SCALE": True}},
        ),
    }
    plan = []
    for text in (t for t in args.tiles.split(",") if t):
        log2, max_q, max_k = (int(v) for v in text.split(":"))
        values = {"BLOCK_SCORES": 2**log2, "MAX_BLOCK_Q": max_q, "MAX_BLOCK_K": max_k}
        plan.append((f"blockwise {log2}:{max_q}:{max_k}", "noxton_eqx_blockwise", values))
    for log2 in (int(v) for v in args.chunk_scores.split(",") if v):
        values = {budget: 2**log2, **blockwise.CHUNK_RULES_OFF}
        plan.append((f"blockwise {budget}=2**{log2}", "noxton_eqx_blockwise", values))
    for n in (int(v) for v in args.weight_first_rows.split(",") if v):
        plan.append((f"auto CPU_WEIGHT_FIRST_ROWS={n}", "noxton_eqx", {"CPU_WEIGHT_FIRST_ROWS": n}))
    for flag, (label, table) in choices.items():
        for how in (v for v in getattr(args, flag).split(",") if v):
            if how not in table:
                name = "--" + flag.replace("_", "-")
                raise ValueError(f"{name} takes {', '.join(table)}, got {getattr(args, flag)!r}")
            plan.append((label.format(how), "noxton_eqx", dict(table[how])))
    for group in (g for g in args.set.split(";") if g):
        values = _settings(group, (blockwise, attention))
        plan.append(("auto " + ", ".join(f"{n}={v!r}" for n, v in values.items()), "noxton_eqx", values))
    return plan


@contextlib.contextmanager
def _patched(values: dict, modules):
    """Each ``NAME`` of ``values`` set in the first of ``modules`` that has it, for the ``with`` block."""
    owners = {name: next(m for m in modules if hasattr(m, name)) for name in values}
    saved = {name: getattr(owners[name], name) for name in values}
    try:
        for name, value in values.items():
            setattr(owners[name], name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(owners[name], name, value)


def _settings(group: str, modules) -> dict:
    """``"NAME=VALUE,NAME=VALUE"`` as ``{NAME: value}``, each name a constant of one of ``modules``."""
    out = {}
    for pair in group.split(","):
        name, sep, text = (part.strip() for part in pair.partition("="))
        if not sep or not name.isupper() or not any(hasattr(m, name) for m in modules):
            where = " or ".join(m.__name__ for m in modules)
            raise ValueError(f"--set: expected NAME=VALUE with NAME a constant of {where}, got {pair!r}")
        base, power, exponent = text.partition("**")
        try:
            if power:
                out[name] = int(base) ** int(exponent)
            else:
                out[name] = {"None": None, "True": True, "False": False}[text] if text[:1].isalpha() else int(text)
        except (KeyError, ValueError):
            raise ValueError(f"--set: {name}: expected an integer, 2**N, None, True or False, got {text!r}") from None
    return out


if __name__ == "__main__":
    main()
