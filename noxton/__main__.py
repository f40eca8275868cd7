"""``python -m noxton``: a short tour of both layers through both front ends.

Builds each layer on the README's examples from Equinox (``noxton.nn``) and from
Haiku (``noxton.haiku`` inside ``hk.transform``), checks the results against a
plain NumPy float64 reference, and prints a table of shapes, largest
differences and timings. Exits non-zero if any difference exceeds tolerance.
"""

from __future__ import annotations

import statistics
import sys
import time

import equinox as eqx
import haiku as hk
import jax
import numpy as np

import noxton
import noxton.haiku as nxhk
from noxton._reference import mha_reference, se_reference
from noxton.nn import MultiheadAttention, SqueezeExcitation

TOLERANCE = 1e-5


def _timed(fn, *args, repeats=20):
    """``(result, first call incl. compilation in ms, median of later calls in ms)``."""
    t0 = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return result, first * 1e3, statistics.median(times) * 1e3


def _shape(x):
    return "None" if x is None else str(tuple(x.shape))


def _diff(got, want):
    if got is None and want is None:
        return 0.0
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)))


def _row(layer, front, call, fn, args, ref):
    """One table row: run ``fn(*args)`` timed and compare it with ``ref``, both ``(out, weights)`` for
    MultiheadAttention, or an output alone for a layer without attention weights."""
    result, first, med = _timed(fn, *args)
    if not isinstance(result, tuple):
        return layer, front, call, _shape(result), "-", _diff(result, ref), first, med
    (out, w), (ref_out, ref_w) = result, ref
    return layer, front, call, _shape(out), _shape(w), max(_diff(out, ref_out), _diff(w, ref_w)), first, med


def main() -> int:
    key = jax.random.PRNGKey(0)
    rows = []

    # MultiheadAttention, the README's example: embed_dim=64, num_heads=4, q (10, 64).
    mha = MultiheadAttention(embed_dim=64, num_heads=4, key=key)
    q = jax.random.normal(key, (10, 64))
    sd = mha.state_dict()
    ref_out, ref_w = mha_reference(q, q, q, sd, 4)
    ref_causal, _ = mha_reference(q, q, q, sd, 4, is_causal=True)

    eqx_call = eqx.filter_jit(lambda m, q: m(q, q, q))
    eqx_causal = eqx.filter_jit(lambda m, q: m(q, q, q, is_causal=True, need_weights=False))
    for label, fn, ref in (
        ("mha(q, q, q)", eqx_call, (ref_out, ref_w)),
        ("mha(q, q, q, is_causal=True, need_weights=False)", eqx_causal, (ref_causal, None)),
    ):
        rows.append(_row("MultiheadAttention", "Equinox", label, fn, (mha, q), ref))

    def haiku_mha(q, causal):
        return nxhk.MultiheadAttention(64, 4)(q, q, q, is_causal=causal, need_weights=not causal)

    f = hk.transform(haiku_mha)
    params = nxhk.state_dict_to_params(f.init(key, q, False), sd, "multihead_attention")
    for causal, ref in ((False, (ref_out, ref_w)), (True, (ref_causal, None))):
        apply = jax.jit(lambda p, q, c=causal: f.apply(p, None, q, c))
        label = "hk.transform: mha(q, q, q" + (", is_causal=True, need_weights=False)" if causal else ")")
        rows.append(_row("MultiheadAttention", "Haiku", label, apply, (params, q), ref))

    # SqueezeExcitation, the README's example: 64 channels squeezed to 16, x (64, 28, 28).
    se = SqueezeExcitation(input_channels=64, squeeze_channels=16, key=key)
    x = jax.random.normal(key, (64, 28, 28))
    ref_se = se_reference(x, se.state_dict())
    se_call = eqx.filter_jit(lambda m, x: m(x))
    rows.append(_row("SqueezeExcitation", "Equinox", "se(x)", se_call, (se, x), ref_se))
    g = hk.transform(lambda x: nxhk.SqueezeExcitation(64, 16)(x))
    params = nxhk.state_dict_to_params(g.init(key, x), se.state_dict(), "squeeze_excitation")
    apply = jax.jit(lambda p, x: g.apply(p, None, x))
    rows.append(_row("SqueezeExcitation", "Haiku", "hk.transform: se(x)", apply, (params, x), ref_se))

    print(
        f"noxton {noxton.__version__}: jax {jax.__version__}, dm-haiku {hk.__version__}, "
        f"equinox {eqx.__version__}, backend {jax.default_backend()}"
    )
    print("Both front ends run one implementation; references are plain NumPy in float64.\n")
    header = (
        "layer",
        "front end",
        "call",
        "output",
        "weights",
        "max |diff| vs NumPy",
        "first call (ms)",
        "jitted median (ms)",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    ok = True
    for layer, front, call, out_shape, w_shape, diff, first, med in rows:
        ok &= diff <= TOLERANCE
        print(f"| {layer} | {front} | `{call}` | {out_shape} | {w_shape} | {diff:.2e} | {first:.1f} | {med:.3f} |")
    print(f"\n{'All' if ok else 'NOT all'} differences within {TOLERANCE:g} (float32).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
