"""Multi-head attention maths: pure functions, no parameters, no Haiku.

Glossary of shapes: ``*B`` leading batch dimensions (possibly none), ``L``
target length, ``S`` source length, ``S'`` source length after appended keys,
``E`` embed_dim, ``H`` heads, ``D = E // H`` head size.

Parameters are passed as a mapping keyed by torch's ``state_dict`` names
(``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``,
``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj.weight``,
``out_proj.bias``), in torch's ``(out, in)`` layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from noxton.functional._blockwise import INTEL, blockwise_attention
from noxton.functional._checks import (
    check_array,
    check_bool,
    check_dropout_key,
    check_heads,
    check_positive_int,
    check_probability,
    dot_precision,
    finite_shift,
    lift,
    softmax_dtype,
)
from noxton.functional._fused import fused_attention
from noxton.functional._masks import Masks, canonical_masks
from noxton.functional._vmapped import vmapped_size

IMPLEMENTATIONS = ("auto", "dense", "fused", "blockwise")

#: ``auto`` goes blockwise from this many scores (elements of ``[*B, H, L, S']``,
#: 256 MiB in float32) on every backend: beyond it the dense path is memory-bound.
LARGE_SCORES = 2**26

#: On CPU, ``auto`` also goes blockwise (need_weights=False, no dropout) from this many
#: scores per batch element ``H * L * S'``: measured faster than both the dense path and
#: ``jax.nn.dot_product_attention`` from there (docs/performance.md); below it a
#: single dense block is cheaper than the kernel's bookkeeping. Checked again with
#: the blockwise tiles of 256 x 512 (2-core x86 CPU, Equinox front end under jax.vmap,
#: jitted, forward, medians of 31 interleaved runs, the contenders ``noxton_eqx_dense``
#: and ``noxton_eqx_blockwise`` of ``benchmarks/contenders.py``, as
#: ``python -m benchmarks --only-grid --grid-sizes 16,32,64,128,256`` times them):
#: below the boundary the two paths are within 6% either way (B=1, E=256, H=8, L=16-48;
#: B=8, E=512, H=8, L=16); from it blockwise is faster: 1.1 against 1.4 ms at B=1,
#: L=64; 2.6 against 3.2 ms at L=128; 5.3 against 7.6 ms at L=256; 11.2 against 14.2 ms
#: at B=8, E=512, L=64. Dense past L=512 at H=8 also holds 32 MiB or more of scores,
#: which glibc serves with fresh pages on every call (see ``_blockwise.BLOCK_SCORES``).
CPU_BLOCKWISE_MIN_SCORES = 2**15


def check_implementation(implementation) -> str:
    """Validate the ``implementation`` keyword."""
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {', '.join(repr(i) for i in IMPLEMENTATIONS)}, got {implementation!r}."
        )
    return implementation


def select_implementation(
    implementation: str,
    *,
    need_weights: bool,
    dropout_p: float,
    batch: int,
    num_heads: int,
    tgt_len: int,
    src_len: int,
    dtype,
    backend: str | None = None,
) -> str:
    """The attention path ``multi_head_attention`` runs: ``"dense"``, ``"fused"`` or ``"blockwise"``.

    A pure function of static facts: the call's options, its shapes, the input
    dtype and the backend (``jax.default_backend()`` unless given). The one place
    that states the ``"auto"`` rule.

    Every path keeps the precision contract: scores and softmax in float32, or in
    float64 for float64 inputs. A forced path is returned as given, after checking
    that it can honour the call: only ``"dense"`` materialises the weights that
    ``need_weights=True`` returns, ``"fused"`` has no dropout, and ``"fused"``
    cannot take float64 inputs (``jax.nn.dot_product_attention`` runs its softmax
    in float32). Each mismatch raises a ``ValueError`` that names the path to use
    (as torch's ``sdpa_kernel`` raises when the forced kernel cannot run) rather
    than silently running another path or a lower precision.

    ``"auto"`` chooses, from static facts only; ``batch`` is the number of
    examples the call runs: the product of its leading batch dimensions times the
    sizes of the ``jax.vmap`` axes that map it (``multi_head_attention`` counts
    both), so the batched Haiku call and the vmapped Equinox call of the same
    shapes take the same path:

    1. ``need_weights=True``: dense (on the CPU, without dropout, in blocks of queries past
       ``DENSE_CHUNK_SCORES`` scores: see ``dense_attention``).
    2. ``batch * H * L * S' >= LARGE_SCORES``: blockwise, on every backend and in
       every dtype. ``jax.nn.dot_product_attention`` (the fused path) runs XLA's
       composition, which holds the scores too, unless cuDNN is named (see
       ``fused_attention``); no GPU has measured a cuDNN choice yet.
    3. CPU, no dropout, ``H * L * S' >= CPU_BLOCKWISE_MIN_SCORES``: blockwise
       (measured faster than dense and than ``jax.nn.dot_product_attention``).
       Up to 8192 keys its forward makes one pass over all keys in chunks of
       rows and queries of about 8 MiB of scores, which XLA fuses into one
       kernel per chunk up to 1024 keys (``_blockwise.FUSED_KEYS_MAX``); on CPUs
       with AVX-512 a call of up to 256 queries and 16 MiB of scores is one chunk, from
       257 to 512 keys a chunk takes every head of whole examples and 64 or 128
       queries (up to 16 MiB of scores), and past 1024 keys a chunk takes up to
       1024 queries, up to 32 MiB of scores (``_blockwise.forward_chunks``). Its
       backward takes chunks a quarter that size (half on Intel CPUs), and a
       call of up to 256 queries as one chunk up to 8 MiB of scores on Intel
       CPUs, 4 MiB with AVX-512 (``_blockwise.backward_chunks``); past 8192
       keys both loop over key blocks in tiles that ``block_sizes`` keeps
       under glibc's 32 MiB ``mmap`` ceiling at small batch, so that no call
       faults its scores in afresh.
    4. GPU/TPU, no dropout, float16/bfloat16/float32 inputs: fused.
    5. Otherwise (dropout, or float64 inputs off the CPU) dense: ``"auto"`` never
       trades precision for speed.
    """
    implementation = check_implementation(implementation)
    if need_weights and implementation in ("fused", "blockwise"):
        raise ValueError(
            f"implementation={implementation!r} cannot return attention weights: pass need_weights=False, "
            "or implementation='dense' (or 'auto') to get them."
        )
    if dropout_p > 0.0 and implementation == "fused":
        raise ValueError(
            f"implementation='fused' has no dropout (jax.nn.dot_product_attention has none), got dropout={dropout_p}: "
            "use implementation='blockwise' or 'dense', or inference mode."
        )
    wide = jnp.dtype(dtype).itemsize > 4
    if wide and implementation == "fused":
        raise ValueError(
            f"implementation='fused' cannot keep {jnp.dtype(dtype)} precision (jax.nn.dot_product_attention runs its "
            "softmax in float32): use implementation='dense' or 'blockwise' (or 'auto'), which compute in float64."
        )
    if implementation != "auto":
        return implementation
    if need_weights:
        return "dense"
    backend = jax.default_backend() if backend is None else backend
    per_example = num_heads * tgt_len * src_len
    if batch * per_example >= LARGE_SCORES:
        return "blockwise"
    if dropout_p > 0.0:
        return "dense"
    if backend == "cpu":
        return "blockwise" if per_example >= CPU_BLOCKWISE_MIN_SCORES else "dense"
    return "dense" if wide else "fused"


#: On the CPU, a product with fewer rows than this (``x``'s rows times the axes ``jax.vmap`` maps) is taken
#: weight first, ``W @ x.T``; from it, ``x @ W.T``. Jitted alone, the two forms took the same time at every
#: size; in the layer they did not. My reading, not confirmed inside XLA: the weight-first output is laid out
#: features first, so each head that attention reads next is a contiguous block of it, and XLA packs the small
#: ``x`` rather than the whole weight. Measured on a 2-core x86 CPU with ``noxton.nn.MultiheadAttention`` under
#: ``jax.vmap``, jitted, forward, medians of 21 interleaved runs (ms, weight first below 256 rows against below
#: 1024, eqx.nn beside), with ``python -m benchmarks.tiles B,E,H L,... fwd --weight-first-rows 256,1024,2048
#: --peers torch,eqx --reps 21`` (0 turns the rule off) on 2026-12-04: (B, E, L) = (1, 512, 256): 6.7 / 5.2
#: (eqx.nn 4.6); (1, 512, 384): 9.9 / 7.7 (7.5); (1, 512, 512): 14.0 / 11.6 (11.5); (1, 1024, 384): 25.4 / 23.4
#: (22.6); (1, 1024, 512): 34.0 / 32.6 (30.8); (1, 256, 512): 6.1 / 5.6 (4.7); (8, 512, 32): 5.7 / 4.7 (3.6);
#: (8, 512, 64): 10.2 / 8.3 (7.0); (8, 1024, 32): 18.5 / 13.8 (11.8); (8, 1024, 64): 29.6 / 25.4 (24.3); level
#: at (1, 256, 256), (1, 512, 768), (1, 1024, 768), (8, 256, 32) and (8, 256, 64); slower at 768 rows with E=256
#: and 512 (8, 256, 96): 5.2 / 6.0; (8, 512, 96): 14.1 / 14.9. At 1024 rows weight first (a limit of 2048) was
#: no better than input first, which the limits 256 and 1024 both compile, so that these give the spread of one
#: program compiled twice in one run: (8, 512, 128): 18.6 against 19.1 and 20.7; (8, 256, 128): 7.1 against 6.9
#: and 6.9; (1, 512, 1024): 29.0 against 29.3 and 26.0. Below 256 rows the run of ``--weight-first-rows 0,256``
#: gave, at B=1, E=1024 and L=16, 64 and 128, 4.0 / 2.3, 7.0 / 5.2 and 12.9 / 9.8 ms (eqx.nn 2.2, 5.3, 9.6); a
#: decoding step of 8 rows at E=512, 1.13 / 0.87. Forward and backward were level at each of these points within
#: 4% (B, E, L = 1, 512, 256: 17.0 / 16.5 ms; 1, 1024, 256: 48.8 / 49.7; 8, 512, 64: 20.3 / 20.6), as was a
#: ``TransformerEncoderLayer`` forward (1, 512, 512: 23.0 / 22.6; 8, 512, 64: 20.8 / 19.4). Those were Intel's
#: figures (a Xeon with AVX-512). On a 2-core AMD EPYC with AVX-512 (2026-12-05, jaxlib 0.10.2) input first was the
#: faster forward from 512 rows, so there the limit is 512. The same command with ``--weight-first-rows 1024,512
#: --settle 1 --reps 13-15``, one process per line, ms, weight first (1024) / input first (512), torch and eqx.nn
#: beside: (B, E, L) = (1, 256, 512): 6.3 / 4.6 (4.4, 5.1), 4.5 / 4.1 (3.8, 4.4), 4.5 / 4.4 (3.9, 4.6), 4.9 / 4.5
#: (4.4, 4.8); (1, 512, 512): 11.5 / 11.8 (11.6, 11.9), 11.1 / 10.6 (9.9, 10.1), 11.6 / 11.0 (10.7, 10.5); (8, 256,
#: 64): 2.8 / 2.1 (2.2, 2.5), 2.4 / 2.2 (2.2, 2.4); (8, 512, 64): 7.7 / 6.4 (6.8, 7.0), 7.2 / 6.3 (6.8, 6.7). Forward
#: and backward, level: (1, 256, 512) 12.9 / 13.0 and 12.8 / 13.1; (1, 512, 512) 32.4 / 30.8 and 32.5 / 33.7; (8,
#: 512, 64) 18.7 / 18.4 and 20.2 / 22.1. At 384 rows the forward was level or input first faster ((1, 256, 384) 4.2
#: / 3.2, (1, 512, 384) 7.5 / 7.5, (1, 1024, 384) 23.2 / 23.7, one run each), and at 256 and 128 rows weight first
#: was level or faster ((1, 256, 128) 1.2 / 1.3, (1, 512, 128) 2.4 / 2.9 ms), so the AMD limit stays at 512. Other
#: CPUs (without AVX-512 among them) take it unmeasured.
CPU_WEIGHT_FIRST_ROWS = 1024 if INTEL else 512


def _few_cpu_rows(x, axis: int = -1, limit: int | None = None) -> bool:
    """On the CPU, ``x`` has fewer than ``limit`` (``CPU_WEIGHT_FIRST_ROWS``) rows, those of the ``jax.vmap`` axes
    that map it counted (its features on ``axis``)."""
    rows = math.prod(x.shape) // x.shape[axis] * vmapped_size(x)
    return rows < (CPU_WEIGHT_FIRST_ROWS if limit is None else limit) and jax.default_backend() == "cpu"


def _linear(x, weight, bias, *, axis: int = -1):
    """torch's ``F.linear`` over ``x``'s feature axis ``axis`` (-1; -3 for a 1x1 convolution's channels).

    ``x @ W.T + b`` in the ``(out, in)`` layout, accumulated and biased in float32 (float64 for
    float64), then rounded once to ``x``'s dtype, as torch's ``addmm``: two roundings (the product,
    then the sum) are measurably less exact than torch in float16/bfloat16. The features are
    contracted in place, without moving ``axis`` last (which would transpose a feature map twice);
    on the CPU a product of fewer than ``CPU_WEIGHT_FIRST_ROWS`` rows runs weight first. float32 is
    multiplied in float32 on every backend (``dot_precision``).
    """
    acc = softmax_dtype(x.dtype)
    weight = weight.astype(x.dtype)
    axis = axis % x.ndim
    precision = dot_precision(x.dtype)
    if _few_cpu_rows(x, axis):  # [out, *rest]
        y = lax.dot_general(weight, x, (((1,), (axis,)), ((), ())), precision=precision, preferred_element_type=acc)
        y = jnp.moveaxis(y, 0, axis)
    else:  # [*rest, out]
        y = lax.dot_general(x, weight, (((axis,), (1,)), ((), ())), precision=precision, preferred_element_type=acc)
        y = jnp.moveaxis(y, -1, axis)
    if bias is not None:
        bias = bias.astype(x.dtype).astype(acc)
        y = y + lift(bias.reshape(-1, *(1,) * (x.ndim - 1 - axis)), y.ndim)
    return y.astype(x.dtype)


def split_heads(x, num_heads: int, *, heads_first: bool = False):
    """``[*B, S, E]`` as ``[*B, S, H, D]``, or ``[*B, H, S, D]`` with ``heads_first`` (a decoding cache's layout)."""
    x = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
    return jnp.swapaxes(x, -3, -2) if heads_first else x


def _split_in_proj(params):
    """The query, key and value projections' ``(weight, bias)`` pairs (biases ``None`` without ``in_proj_bias``)."""
    b = params.get("in_proj_bias")
    bs = jnp.split(b, 3, axis=0) if b is not None else (None, None, None)
    if "in_proj_weight" in params:
        ws = jnp.split(params["in_proj_weight"], 3, axis=0)
    else:
        ws = params["q_proj_weight"], params["k_proj_weight"], params["v_proj_weight"]
    return tuple(zip(ws, bs, strict=True))


#: Self-attention's in-projection is one ``(3E, E)`` product, except on the CPU from ``CPU_PACKED_ROWS`` rows
#: (at most ``CPU_WEIGHT_FIRST_ROWS``, from which ``_linear`` takes them input first), where it is three ``(E, E)``
#: products. On the Intel Xeon the two limits are one: from it the packed product's gradient took up to 22%
#: longer, and was at most 2% faster. Measured on the 2-core Intel Xeon with
#: ``noxton.nn.MultiheadAttention`` under ``jax.vmap``, jitted, medians of 9-11 interleaved rounds in one process,
#: packed against three products, ms (eqx.nn beside), with ``python -m benchmarks.tiles B,E,H L,... MODE
#: --in-projection packed,rule``, 2026-12-04. Forward and backward at (B, E, L) = (8, 512, 256): 94.2 / 77.0
#: (eqx.nn 88.0), and in another run 94.4 / 88.5 (88.3); level within 2% at (8, 256, 256), (8, 1024, 256),
#: (8, 512, 512), (1, 256, 2048), (8, 256, 128) and (8, 1024, 128) (107.4 / 109.3). The forward was level
#: or faster: (8, 256, 256) 7.93 / 7.86; (8, 512, 256) 21.4 / 20.7; (8, 512, 512) 81.5 / 80.0; (8, 1024,
#: 128) 33.9 / 34.7. Below that many rows, where the products run weight first, the packed one was the
#: faster: (1, 512, 256) forward and backward 9.40 / 10.07, forward 3.49 / 3.58; (8, 512, 64) 12.95 / 13.45.
#: So on Intel the limit is ``CPU_WEIGHT_FIRST_ROWS``. On the 2-core AMD EPYC with AVX-512 (jaxlib 0.10.2, whose
#: products are YNNPACK fusions) three products were the faster forward from 256 rows, weight first as well, so
#: there the packed product stops at 256 rows (``CPU_PACKED_ROWS``). ``python -m benchmarks.tiles 1,E,H 128,256,384
#: MODE --set 'CPU_PACKED_ROWS=512;CPU_PACKED_ROWS=256' --settle 1 --peers torch,eqx --reps 15`` (and ``8,E,H
#: 16,32,48``), 2026-12-05, forward, ratios to torch, packed / three (eqx.nn): (B, E, L) = (1, 256, 256) 1.49 /
#: 1.26 (1.26); (1, 256, 384) 1.63 / 1.33 (1.50); (1, 512, 256) 1.27 / 1.10 (1.10); (1, 512, 384) 1.19 / 1.05
#: (1.07); (1, 1024, 256) 1.02 / 0.94 (0.96); (8, 512, 32) 1.45 / 1.16 (1.00); (8, 512, 48) 1.15 / 0.99 (0.96);
#: level within the noise at (8, 256, 32), (8, 1024, 32) and (1, 1024, 384); one run slower, (8, 256, 48) 1.21 /
#: 1.59, which a second run (medians of 21, one process, eqx.nn = 1) reversed: 1.20 / 1.09. The same second kind of
#: run at (1, 256, 256), (1, 256, 384), (1, 512, 256), (1, 512, 384), (1, 1024, 256), (2, 512, 128) and (4, 512,
#: 64): 1.13 / 0.96, 1.09 / 0.99, 1.07 / 0.99, 1.03 / 0.95, 1.12 / 0.98, 1.14 / 1.06 and 1.21 / 1.08 of eqx.nn.
#: At 128 rows the packed product was level or faster ((1, 1024, 128) 1.00 / 1.09, (8, 1024, 16) 1.03 / 1.11 of
#: eqx.nn), and forward and backward were level at every point above (within 5%, either way).
CPU_PACKED_ROWS = CPU_WEIGHT_FIRST_ROWS if INTEL else 256

#: Three products slice ``in_proj_weight`` into three ``(E, E)`` weights, and XLA copies each slice into a buffer of
#: its own on every call (``wrapped_slice`` in the compiled program): the whole weight's bytes of temporaries. From
#: ``PACKED_WEIGHT_BYTES`` (32 MiB, glibc's ``mmap`` ceiling: see ``noxton._malloc``) the in-projection is packed
#: at every size, so that no call copies the weight and faults it in afresh. From E = 2048 in float32 (48 MiB), on
#: the 2-core AMD EPYC, forward, ms, three products / packed (eqx.nn, with three weights of its own): (B, E, H, L) =
#: (1, 2048, 16, 128) 40.6 / 23.1 (23.1); (1, 2048, 16, 256) 67.3 / 50.6 (48.8); (1, 2048, 16, 512) 108.7 / 103.6
#: (107.6); (1, 2048, 16, 1024) 233.8 / 227.9 (292.2); forward and backward 141.7 / 141.0 (129.9) at L=256, 311.6 /
#: 289.1 (282.7) at L=512, 693.2 / 703.8 (762.7) at L=1024. Medians of 9-15 interleaved rounds in one process per
#: point, ``noxton.nn.MultiheadAttention`` under ``jax.vmap`` and ``eqx.filter_jit``, 2026-12-05, the variants set
#: as ``benchmarks.tiles --set`` sets them (``PACKED_WEIGHT_BYTES=2**40`` for three products; at L=128, below
#: ``CPU_PACKED_ROWS``, ``_packed_in_projection`` returning False). Jitted alone, three products from slices took
#: 0.63 against 0.51 ms packed at E=256, 128 rows, 5.2 against 4.2 at E=1024 and 47.7 against 34.0 at E=2048, 256
#: rows.
PACKED_WEIGHT_BYTES = 2**25


def _packed_in_projection(x, weight) -> bool:
    """Self-attention projects ``x`` with one ``(3E, E)`` product rather than three (see ``_in_projection``)."""
    if jax.default_backend() != "cpu" or weight.size * weight.dtype.itemsize >= PACKED_WEIGHT_BYTES:
        return True
    return _few_cpu_rows(x, limit=min(CPU_PACKED_ROWS, CPU_WEIGHT_FIRST_ROWS))


def _in_projection(query, key, value, params):
    packed = params.get("in_proj_weight")
    if packed is not None and query is key and key is value and _packed_in_projection(query, packed):
        return tuple(jnp.split(_linear(query, packed, params.get("in_proj_bias")), 3, axis=-1))
    (wq, bq), (wk, bk), (wv, bv) = _split_in_proj(params)
    return _linear(query, wq, bq), _linear(key, wk, bk), _linear(value, wv, bv)


def masked_softmax(scores, axis: int = -1):
    """Softmax that gives zeros, with finite gradients, on rows that are all ``-inf``."""
    m = jnp.max(scores, axis=axis, keepdims=True)
    m = lax.stop_gradient(finite_shift(m, scores.dtype))
    e = jnp.exp(scores - m)
    d = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(d == 0, 1.0, d).astype(e.dtype)


def head_mean(weights):
    """``jnp.mean(weights, axis=-3)``: the weights averaged over heads, as torch's ``mean(dim=1)``.

    Taken as a product with ``1 / H``, which XLA's CPU backend runs as a product, and whose gradient is a
    broadcast. ``jnp.mean`` over this middle axis it runs as one YNNPACK reduction, which took 8.9 ms on
    ``[1, 8, 512, 512]`` float32 against 0.24 ms for the product (jitted alone, medians of 15; equal to the last
    bit there, as ``1 / H`` is exact for a power of two; within one rounding otherwise), and 11.9 of the 15.8 ms
    of the layer's forward with ``need_weights=True`` at B=1, L=S=512, E=256, H=8 (a ``jax.profiler`` trace). The
    heads' sum as elementwise adds ran as fast forward (0.10 ms), but its gradient pads every head's slice to the
    whole array: the layer's forward and backward there took 54.8 ms, against 17.6 with the product and 18.4 with
    ``jnp.mean`` (torch: 15.4). 2-core AMD EPYC with AVX-512, jax 0.10.2, 2026-12-06.
    """
    heads = weights.shape[-3]
    share = jnp.full((heads,), 1.0 / heads, weights.dtype)
    return jnp.einsum("h,...hls->...ls", share, weights, precision=lax.Precision.HIGHEST)


#: On the CPU, ``dense_attention`` computes weights that it returns (``need_weights=True``, no dropout) a block of
#: queries at a time once a call holds more than ``DENSE_CHUNK_SCORES`` scores (elements of ``[*B, H, L, S']``, the
#: ``jax.vmap`` axes that map it counted): each block's scores, weights and output are written into the results in
#: place, so the temporaries stay near this many scores (8 MiB in float32), under glibc's 32 MiB ``mmap`` ceiling
#: (``noxton._malloc``), rather than holding every score twice. The rows are those of the unchunked call, computed
#: by the same operations. Measured on the 2-core AMD EPYC with AVX-512 (jax 0.10.2), ``noxton.nn.MultiheadAttention``
#: under ``jax.vmap``, with ``python -m benchmarks.tiles B,E,H L fwd_w --set 'DENSE_CHUNK_SCORES=2**40;
#: DENSE_CHUNK_SCORES=2**21;DENSE_CHUNK_SCORES=2**22;DENSE_CHUNK_SCORES=2**23' --settle 1 --peers torch --reps 7``
#: (9 at B=1), 2026-12-06, ms, one block / 2**21 / 2**22 / 2**23 (torch; MiB faulted per call where any): (B, E, H,
#: L) = (1, 256, 8, 2048) 152.1 (306 MiB) / 68.5 / 71.3 / 57.5 (145.0, 256 MiB); (1, 256, 8, 1024) 20.6 / 22.6 /
#: 19.6 / 20.7 (42.7, 64 MiB); (8, 512, 8, 512) 151.6 (202 MiB) / 117.4 (48 MiB) / 110.0 (58 MiB) / 122.6 (92 MiB)
#: (128.9, 128 MiB). The budgets differ within this VM's noise (at (1, 256, 8, 512), one block under every budget,
#: the same program took 5.4 and 6.7 ms in one run); 2**21 is the blockwise pass's ``CHUNK_SCORES``. Before this
#: rule, ``head_mean`` and the heads-first products of ``dense_attention``, the forward with ``need_weights=True``
#: took 3.6x torch's time at (1, 256, 8, 512), 3.3x at L=1024, 4.1x at L=2048 and 4.1x at L=4096 (1.53 s), and
#: 1.34x at (8, 512, 8, 512); with them 1.45x, 0.78x, 0.74x, 0.90x and 1.07x (a scratch script, one process per
#: version, each library in blocks of its own calls, torch beside with ``need_weights=True``, 2026-12-06). Forward
#: and backward (a loss of the output and the weights): 1.90x torch at (1, 256, 8, 2048) before, 0.95x after.
DENSE_CHUNK_SCORES = 2**21
#: The fewest queries in a block, whatever the budget gives: a floor on the loop's steps (L / 8), not a measured
#: value. Only calls of 2**18 or more scores per query reach it (B=8 at H=16 from 2048 keys, at H=8 from 4096), where
#: one block of every query would hold gigabytes of scores.
DENSE_CHUNK_MIN_Q = 8


def _dense_chunk(rows: int, tgt_len: int, src_len: int) -> int | None:
    """Queries per block of ``dense_attention``'s weights (see ``DENSE_CHUNK_SCORES``) for ``rows`` rows of
    scores per query (the examples times the heads), or ``None`` for one block."""
    if jax.default_backend() != "cpu" or rows * tgt_len * src_len <= DENSE_CHUNK_SCORES:
        return None
    c = max(DENSE_CHUNK_MIN_Q, DENSE_CHUNK_SCORES // (rows * src_len))
    return c if c < tgt_len else None


def dense_attention(
    q,
    k,
    v,
    masks: Masks,
    *,
    dropout_p: float,
    dropout_key,
    need_weights: bool,
    scale: float = 1.0,
    kv_heads_first: bool = False,
    average_weights: bool = False,
):
    """Scaled dot-product attention over heads, materialising the ``[*B, H, L, S']`` scores (on the CPU, for
    weights of more than ``DENSE_CHUNK_SCORES`` scores, a block of queries at a time).

    Args:
        q: ``[*B, L, H, D]``.
        k: ``[*B, S', H, D]`` (``[*B, H, S', D]`` with ``kv_heads_first``).
        v: likewise.
        masks: canonical masks for ``S'`` keys.
        scale: multiplies ``q @ k^T`` in the scores' dtype, before the masks are added
            (``1/sqrt(D)`` for scaled dot-product attention).
        kv_heads_first: ``k`` and ``v`` are laid out heads first, as a decoding cache keeps them, so that
            the contractions read them in place.
        average_weights: return the weights averaged over heads, ``[*B, L, S']``, as ``head_mean`` averages
            them (torch's ``average_attn_weights``).

    Returns:
        ``([*B, L, H, D] in the scores' dtype, weights or None)``: with ``need_weights``, ``[*B, H, L, S']``,
        or ``[*B, L, S']`` with ``average_weights``. On the CPU, without dropout, weights of more than
        ``DENSE_CHUNK_SCORES`` scores are computed a block of queries at a time.
    """
    sdtype = softmax_dtype(q.dtype)
    precision = dot_precision(q.dtype)  # the inputs': the weights' product below takes v widened to sdtype
    # Both products run heads first, as plain batched products over [*B, H]: with the heads in the middle
    # of q's and v's layout, XLA's CPU backend took the weights' product as v^T @ weights^T and transposed
    # the whole [*B, H, L, S'] weights for it (2 of 15.8 ms at B=1, L=S=512, E=256, H=8, need_weights=True;
    # 0.76 ms of 5.9 once ``head_mean`` had taken the rest: a ``jax.profiler`` trace, 2-core AMD EPYC, jax 0.10.2).
    q = jnp.swapaxes(q, -3, -2)  # [*B, H, L, D]
    if not kv_heads_first:
        k, v = jnp.swapaxes(k, -3, -2), jnp.swapaxes(v, -3, -2)  # [*B, H, S', D]
    v = v.astype(sdtype)
    tgt_len, src_len = q.shape[-2], k.shape[-2]
    mask = masks.dense(tgt_len, src_len, sdtype)
    if mask is not None:
        mask = lift(mask, q.ndim)

    def block(qb, mb):  # the queries qb [*B, H, c, D] and their mask rows mb
        scores = jnp.einsum("...hld,...hsd->...hls", qb, k, precision=precision, preferred_element_type=sdtype)
        if scale != 1.0:
            scores = scores * jnp.asarray(scale, sdtype)
        if mb is not None:
            weights = masked_softmax(scores + mb)
        else:  # every row has a key: no all -inf row to guard (the guard's select keeps XLA from fusing)
            weights = jax.nn.softmax(scores, axis=-1)
        if dropout_p > 0.0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_p, weights.shape)
            weights = jnp.where(keep, weights / (1.0 - dropout_p), 0.0).astype(sdtype)
        return jnp.einsum("...hls,...hsd->...hld", weights, v, precision=precision), weights

    def returned(weights):  # the weights as the caller asked for them
        return head_mean(weights) if average_weights else weights

    rows = math.prod(q.shape[:-2]) * vmapped_size(q, k, v, mask)
    c = _dense_chunk(rows, tgt_len, src_len) if need_weights and dropout_p == 0.0 else None
    if c is None:
        out, weights = block(q, mask)
        return jnp.swapaxes(out, -3, -2), (returned(weights) if need_weights else None)

    # Blocks of c queries from i * c; dynamic slices and updates clamp their start to L - c, so the last block
    # overlaps the one before it and rewrites those rows alike.
    def rows_of(x, start):
        return lax.dynamic_slice_in_dim(x, start, c, axis=x.ndim - 2)

    def step(i, carry):
        out, weights = carry
        start = i * c
        mb = mask if mask is None or mask.shape[-2] == 1 else rows_of(mask, start)
        ob, wb = block(rows_of(q, start), mb)
        out = lax.dynamic_update_slice_in_dim(out, ob, start, axis=out.ndim - 2)
        weights = lax.dynamic_update_slice_in_dim(weights, returned(wb), start, axis=weights.ndim - 2)
        return out, weights

    w_shape = (*q.shape[:-3], tgt_len, src_len) if average_weights else (*q.shape[:-1], src_len)
    init = (jnp.zeros(q.shape[:-1] + v.shape[-1:], sdtype), jnp.zeros(w_shape, sdtype))
    out, weights = lax.fori_loop(0, -(-tgt_len // c), step, init)
    return jnp.swapaxes(out, -3, -2), weights


def _expected(params, name):
    if name not in params:
        raise ValueError(f"`params` must contain {name!r}; got keys {sorted(params)}.")
    return params[name]


def multi_head_attention(
    query,
    key,
    value,
    params: Mapping[str, jax.Array],
    *,
    num_heads: int,
    add_zero_attn: bool = False,
    key_padding_mask=None,
    need_weights: bool = True,
    attn_mask=None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    dropout_key=None,
    implementation: str = "auto",
):
    """torch's ``F.multi_head_attention_forward`` for ``[*B, L, E]`` inputs.

    Args:
        query: ``[*B, L, E]``.
        key: ``[*B, S, kdim]``.
        value: ``[*B, S, vdim]``.
        params: torch ``state_dict``-named parameters (see the module docstring).
        num_heads: ``H``; ``E`` must be divisible by it.
        add_zero_attn: append a zero key and value after the projections.
        key_padding_mask: ``[*B, S]``, bool (True = ignore) or float (added).
        need_weights: also return attention weights.
        attn_mask: ``(L, S)``, ``(H, L, S)`` or ``[*B, H, L, S]``, bool or float.
        average_attn_weights: average the returned weights over heads.
        is_causal: without ``attn_mask``, hide key ``j`` from query ``i`` when
            ``j > i``; with ``attn_mask``, that mask is used as given (torch's hint).
        dropout_p: dropout probability on the attention weights.
        dropout_key: PRNG key, required when ``dropout_p > 0``.
        implementation: ``"auto"`` (default), ``"dense"``, ``"fused"`` or
            ``"blockwise"``; see [`select_implementation`][noxton.functional.select_implementation] for the rule. All
            give the same results to float32 rounding, except that dropout draws
            a different (equally distributed) pattern on the blockwise path.
            ``"fused"``/``"blockwise"`` with ``need_weights=True``, ``"fused"``
            with dropout, and ``"fused"`` with float64 inputs raise ``ValueError``.

    Returns:
        ``(out [*B, L, E], weights)``, weights ``None`` unless ``need_weights``,
        ``[*B, L, S']`` averaged or ``[*B, H, L, S']`` per head, where ``S'``
        counts the appended keys.
    """
    num_heads = check_positive_int("num_heads", num_heads)
    need_weights = check_bool("need_weights", need_weights)
    average_attn_weights = check_bool("average_attn_weights", average_attn_weights)
    add_zero_attn = check_bool("add_zero_attn", add_zero_attn)
    dropout_p = check_probability("dropout", dropout_p)
    implementation = check_implementation(implementation)
    dropout_key = check_dropout_key(dropout_p, dropout_key, "functional")

    out_w = _expected(params, "out_proj.weight")
    embed_dim = out_w.shape[0]
    query = check_array("query", query, min_rank=2, layout="(..., L, E)")
    key = check_array("key", key, min_rank=2, layout="(..., S, kdim)")
    value = check_array("value", value, min_rank=2, layout="(..., S, vdim)")
    if "in_proj_weight" in params:
        kdim = vdim = params["in_proj_weight"].shape[1]
    else:
        kdim = _expected(params, "k_proj_weight").shape[1]
        vdim = _expected(params, "v_proj_weight").shape[1]
    if query.shape[-1] != embed_dim:
        raise ValueError(f"`query` must have embed_dim={embed_dim} features in its last axis, got shape {query.shape}.")
    if key.shape[-1] != kdim:
        raise ValueError(f"`key` must have kdim={kdim} features in its last axis, got shape {key.shape}.")
    if value.shape[-1] != vdim:
        raise ValueError(f"`value` must have vdim={vdim} features in its last axis, got shape {value.shape}.")
    batch_shape = query.shape[:-2]
    for name, x in (("key", key), ("value", value)):
        if x.shape[:-2] != batch_shape:
            raise ValueError(
                f"`{name}` must have the same leading batch shape as `query` {batch_shape}, got shape {x.shape}."
            )
        if x.dtype != query.dtype:
            raise TypeError(f"`{name}` must have the same dtype as `query` ({query.dtype}), got {x.dtype}.")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"`key` and `value` must have the same sequence length S, got key {key.shape} and value {value.shape}."
        )
    check_heads(embed_dim, num_heads)

    q, k, v = _in_projection(query, key, value, params)
    return attend_projected(
        q,
        k,
        v,
        params,
        num_heads=num_heads,
        add_zero_attn=add_zero_attn,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
        dropout_p=dropout_p,
        dropout_key=dropout_key,
        implementation=implementation,
    )


def attend_projected(
    q,
    k,
    v,
    params: Mapping[str, jax.Array],
    *,
    num_heads: int,
    add_zero_attn: bool,
    key_padding_mask,
    need_weights: bool,
    attn_mask,
    average_attn_weights: bool,
    is_causal: bool,
    dropout_p: float,
    dropout_key,
    implementation: str,
    kv_heads_first: bool = False,
):
    """The rest of ``multi_head_attention`` from the projected ``q`` ``[*B, L, E]``, ``k`` and ``v``
    ``[*B, S, E]`` (``[*B, H, S, D]`` with ``kv_heads_first``, as a decoding cache keeps them) on validated
    options: the appended keys, the masks, the attention path and the output projection. The cached
    decoding of ``noxton.functional._decoding`` runs it too."""
    batch_shape, embed_dim = q.shape[:-2], q.shape[-1]
    tgt_len, src_len = q.shape[-2], k.shape[-2]
    head_dim = embed_dim // num_heads
    dtype = q.dtype
    sdtype = softmax_dtype(dtype)
    out_w = params["out_proj.weight"]
    # one appended key (bias_k/bias_v, or zeros) in the keys' layout
    one = (*batch_shape, num_heads, 1, head_dim) if kv_heads_first else (*batch_shape, 1, embed_dim)

    def appended(x):
        x = x.reshape(num_heads, 1, head_dim) if kv_heads_first else x.reshape(1, embed_dim)
        return jnp.broadcast_to(x.astype(dtype), one)

    extra = 0
    if "bias_k" in params:
        k = jnp.concatenate([k, appended(params["bias_k"])], axis=-2)
        v = jnp.concatenate([v, appended(params["bias_v"])], axis=-2)
        extra += 1
    if add_zero_attn:
        zeros = jnp.zeros(one, dtype)
        k = jnp.concatenate([k, zeros], axis=-2)
        v = jnp.concatenate([v, zeros], axis=-2)
        extra += 1
    masks = canonical_masks(
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        is_causal=is_causal,
        batch_shape=batch_shape,
        num_heads=num_heads,
        tgt_len=tgt_len,
        src_len=src_len,
        extra=extra,
        dtype=sdtype,
    )

    def heads(x):  # [*B, S, E] -> [*B, S, H, D]
        return split_heads(x, num_heads)

    def kv_heads(x):  # the keys or values as [*B, S', H, D]
        return jnp.swapaxes(x, -3, -2) if kv_heads_first else heads(x)

    batch = math.prod(batch_shape)
    if implementation == "auto" and not need_weights:
        # Examples mapped by jax.vmap count too: the Equinox layer sees one at a time.
        batch *= vmapped_size(q, k, v, masks.key_padding, masks.attn, dropout_key if dropout_p > 0.0 else None)
    path = select_implementation(
        implementation,
        need_weights=need_weights,
        dropout_p=dropout_p,
        batch=batch,
        num_heads=num_heads,
        tgt_len=tgt_len,
        src_len=src_len + extra,
        dtype=dtype,
    )
    # The 1/sqrt(D) scale multiplies the float32 (float64) scores, as torch's SDPA kernels
    # do: scaling q in float16/bfloat16 would round it once more (1/sqrt(D) is not a
    # power of two for D = 2, 8, 32, 128, ...).
    scale = math.sqrt(1.0 / head_dim)
    q = heads(q)
    weights = None
    if path == "blockwise":
        attn = blockwise_attention(
            q, kv_heads(k), kv_heads(v), masks, dropout_p=dropout_p, dropout_key=dropout_key, scale=scale
        )
    elif path == "fused":
        attn = fused_attention(q, kv_heads(k), kv_heads(v), masks, scale=scale)
    else:
        attn, weights = dense_attention(
            q,
            k if kv_heads_first else heads(k),
            v if kv_heads_first else heads(v),
            masks,
            dropout_p=dropout_p,
            dropout_key=dropout_key,
            need_weights=need_weights,
            scale=scale,
            kv_heads_first=kv_heads_first,
            average_weights=average_attn_weights,
        )
    attn = attn.astype(dtype).reshape(*batch_shape, tgt_len, embed_dim)
    out = _linear(attn, out_w, params.get("out_proj.bias"))
    if weights is not None:  # averaged over heads by dense_attention where asked
        weights = weights.astype(dtype)
    return out, weights
