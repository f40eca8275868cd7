"""Memory-efficient attention: blockwise, with an online softmax, in plain JAX.

Never holds an ``L x S`` array of scores: queries are processed ``block_q`` at a
time (a sequential ``lax.map``) and, for each query block, keys ``block_k`` at a
time (a ``lax.scan``) with a running maximum, normaliser and weighted sum (the
online softmax of Milakov & Gimelshein, 2018, as in FlashAttention). The
key-padding and causal masks are generated block by block from indices; an
explicit additive ``attn_mask`` is read block by block; key blocks that the
causal mask hides entirely are skipped. The backward pass is a custom VJP that
recomputes each block from ``q``, ``k``, ``v`` and the saved log-sum-exp
(FlashAttention-2's backward; the CPU's whole-key pass computes its softmax again
instead), so training is memory-efficient too. On the CPU,
with no dropout and up to ``WHOLE_KEYS_MAX`` keys, both passes take every key at
once instead, in chunks of rows and queries (``_forward_whole_keys``,
``_backward_whole_keys``).

Block sizes follow the number of scores a block holds over every batch row and
head (``block_sizes``); under ``jax.vmap`` the mapped axis is folded into the
batch rows first (``_fold_vmapped_rows``), so the Equinox front end, batched
with ``jax.vmap``, gets the blocks that the batched Haiku call gets.

Shapes inside the kernel: ``N`` flattened batch, ``H`` heads, ``L``/``S`` query
and key lengths padded to whole blocks, ``D`` head size.

Semantics are those of [`dense_attention`][noxton.functional.dense_attention]: additive
masks, ``-inf`` rows give zeros with finite gradients, dropout on the
normalised weights. Dropout here draws one key per ``(query block, key block)``
pair with ``jax.random.fold_in``, so its pattern differs from the dense path's
(same distribution, not the same bits).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from noxton.functional._checks import dot_precision, finite_shift, softmax_dtype
from noxton.functional._masks import Masks


def cpu_info(field: str, path: str = "/proc/cpuinfo") -> str:
    """The first ``field`` of ``/proc/cpuinfo`` (``"vendor_id"``, ``"model name"``, ``"flags"``), or ``""`` where
    that file cannot be read or has no such field; ``path`` reads another file of that format (the tests')."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The host CPU's vendor as ``/proc/cpuinfo`` names it (``"GenuineIntel"``, ``"AuthenticAMD"``), or ``""``
    where that file cannot be read: one of the two static facts that the CPU's tile and chunk rules below are keyed
    on (the other is ``has_avx512``). They were measured on 2-core x86 machines, an AMD EPYC and an Intel Xeon with
    AVX-512 (jaxlib 0.10's YNNPACK fusions on both), then the forward's again on an AMD EPYC with AVX-512; where
    the faster choice on one was the slower on another, the rule names them."""
    return cpu_info("vendor_id")


def has_avx512(path: str = "/proc/cpuinfo") -> bool:
    """The host CPU has AVX-512 (``avx512f`` among the ``flags`` of ``/proc/cpuinfo``)."""
    return "avx512f" in cpu_info("flags", path).split()


INTEL = cpu_vendor() == "GenuineIntel"
#: The forward's whole-key rules below (``NORMALISE_AFTER``, ``LONG_ROW_CHUNK_Q``, ``NARROW_CHUNK_SCORES``,
#: ``ONE_CHUNK_SCORES``, ``ALL_ROWS_QUERIES``) hold on CPUs with AVX-512; the backward's budget (``CHUNK_SCORES_VJP``)
#: and the key loop's tiles stay the Intel Xeon's, and the backward's one chunk (``ONE_CHUNK_SCORES_VJP``) takes
#: both. They were measured first on the Intel Xeon; on a 2-core AMD EPYC with AVX-512 (2026-12-05, jaxlib 0.10.2)
#: they were the faster forward too, and level or faster forward and backward (one point 3% slower), while the
#: backward's Intel values (its budget and one chunk together) were slower there at 4 of 6 points.
#: The layer (``noxton.nn.MultiheadAttention`` under ``jax.vmap``, jitted), ratios to torch's MHA in one process,
#: the rules off (as without AVX-512) / on, eqx.nn beside, with ``python -m benchmarks.tiles B,E,H L,... MODE
#: --avx512-rules off,rule --reps 9``; forward at (B, E, L): (1, 256, 512) 1.43 / 1.13 (eqx.nn 1.41); (1, 256,
#: 1024) 1.17 / 1.03 (1.16); (1, 256, 2048) 1.17 / 1.04 (2.44); (8, 256, 256) 1.10 / 0.78 (1.49); (1, 1024, 256),
#: H=16, 1.10 / 0.94 (1.01); forward and backward: (1, 256, 512) 0.98 / 0.92; (1, 256, 1024) 0.96 / 0.94. The
#: same comparison in a scratch script (medians of 5-9), forward: (1, 256, 4096) 1.15 / 1.02 (2.47); (8, 256,
#: 1024) 1.14 / 1.09 (3.04); (1, 1024, 2048) 1.06 / 0.99 (1.53); level at (1, 256, 256), (8, 256, 512), (1, 512,
#: 1024), (8, 512, 512) and (8, 512, 1024); forward and backward: (1, 256, 2048) 0.95 / 0.93; (8, 256, 256) 1.07
#: / 0.99; (1, 1024, 256) 0.99 / 0.93; (8, 256, 512) 0.96 / 0.99; with the backward's Intel values as well, in
#: the order (1, 256, 512), (1, 256, 1024), (1, 256, 2048), (8, 256, 256), (1, 1024, 256), (8, 256, 512): 0.96,
#: 0.99, 1.00, 1.08, 0.90, 1.01, against the forward rules alone 0.97, 0.94, 0.93, 0.99, 0.93, 0.99.
AVX512 = has_avx512()


#: Target number of scores in one block, batch rows and heads together (32 MiB in
#: float32), with at most ``MAX_BLOCK_Q`` queries and ``MAX_BLOCK_K`` keys.
#:
#: The caps keep one block's temporaries (its scores and their exponentials) under
#: glibc's 32 MiB ``mmap`` ceiling when the batch is small: XLA's CPU client takes a
#: program's temporaries from ``malloc``, glibc serves an allocation of 32 MiB or more
#: with a fresh ``mmap``, and the program then faults its pages in again on every call.
#: At batch 1, H=8 the former 512 x 1024 blocks held 2 x 16 MiB and faulted 37-48 MiB per
#: call at L=1024-4096; 256 x 512 blocks fault none. Measured on a 2-core x86 CPU,
#: ratios to torch's MHA in one process, medians of 5-9 interleaved runs
#: (``python -m benchmarks.tiles 1,256,8 1024,2048 fwd 23:512:1024,23:256:512``, and the
#: same with ``fwd_bwd``, ``1,1024,16`` and ``8,512,8``):
#:
#: | B, E, H, L, mode      | 512 x 1024 | 256 x 512 | 128 x 1024 | 128 x 512 |
#: |-----------------------|------------|-----------|------------|-----------|
#: | 1, 256, 8, 1024 fwd   | 2.03x      | 1.09x     | 1.18x      | 1.51x     |
#: | 1, 256, 8, 2048 fwd   | 1.73x      | 1.20x     | 1.32x      | 1.62x     |
#: | 1, 256, 8, 4096 fwd   | 1.47x      | 1.13x     | 1.35x      |           |
#: | 1, 1024, 16, 2048 fwd | 1.30x      | 1.10x     |            |           |
#: | 1, 256, 8, 1024 f+b   | 1.50x      | 0.93x     |            | 1.17x     |
#:
#: At B=8, E=512, H=8 (64 rows) the budget still gives 256 x 512 at L=512 and 128 x 1024
#: became 256 x 512 at L >= 1024; there the program's other temporaries (projections,
#: transposes) pass 32 MiB whatever the blocks, and thinner blocks (64 or 32 queries)
#: measured 15-45% slower, so the budget stays at 2**23.
#:
#: That was the AMD EPYC. On the Intel Xeon (``INTEL``), where the CPU runs this key loop past
#: ``WHOLE_KEYS_MAX`` keys, 512 x 1024 blocks were faster than 256 x 512 at every length measured, with
#: the pages faulted per call within 20% of each other (the same command, 2026-12-04, medians of 2-3):
#: B=1, E=256, H=8, forward, L=10240: 1.21 against 0.96 s (torch 0.50); L=16384: 3.07 against 2.38 s
#: (torch 1.25; 128 x 1024: 3.47, 512 x 2048 with 2**24 scores: 2.32); forward and backward at L=16384:
#: 7.97 against 7.04 s (torch 3.94).
BLOCK_SCORES = 2**23
MAX_BLOCK_Q = 512 if INTEL else 256
MAX_BLOCK_K = 1024 if INTEL else 512
#: Fixed block sizes for every call (tests shrink them); ``None``: chosen per call by
#: ``block_sizes``.
DEFAULT_BLOCK_Q: int | None = None
DEFAULT_BLOCK_K: int | None = None


class _Config(NamedTuple):
    """Static facts about one call: block sizes and how to generate its masks."""

    block_q: int
    block_k: int
    causal: bool
    src_len: int  # keys before any were appended (the causal mask covers only these)
    total_len: int  # keys after appending, before padding to whole blocks
    scale: float = 1.0  # multiplies q @ k^T in the softmax dtype
    precision: Any = None  # of every product, forward and backward: ``dot_precision`` of the inputs

    @property
    def padded(self) -> bool:
        """The key axis is padded to whole blocks (columns ``>= total_len`` are hidden)."""
        return self.total_len % self.block_k != 0


def _balanced(length: int, target: int) -> int:
    """The block size that splits ``length`` into equal blocks of at most ``target`` (least padding)."""
    blocks = -(-length // max(1, target))
    return -(-length // blocks)


def block_sizes(rows: int, tgt_len: int, total_len: int, block_q=None, block_k=None) -> tuple[int, int]:
    """``(block_q, block_k)`` for ``rows`` (batch x heads) rows of ``tgt_len`` queries and ``total_len`` keys.

    Explicit sizes (arguments, else ``DEFAULT_BLOCK_Q``/``DEFAULT_BLOCK_K``) are used
    as given, clipped to the lengths. Otherwise keys are split into equal blocks of
    at most ``MAX_BLOCK_K``, and queries into equal blocks of at most ``MAX_BLOCK_Q``
    sized so that one block of scores holds about ``BLOCK_SCORES`` elements. Equal
    blocks keep the padding of a ragged last block under one row per block.
    """
    bq = DEFAULT_BLOCK_Q if block_q is None else block_q
    bk = DEFAULT_BLOCK_K if block_k is None else block_k
    if bk is None:
        bk = _balanced(total_len, MAX_BLOCK_K)
    bk = max(1, min(bk, total_len))
    if bq is None:
        bq = _balanced(tgt_len, min(MAX_BLOCK_Q, max(8, BLOCK_SCORES // (rows * bk))))
    return max(1, min(bq, tgt_len)), bk


def _pad_to(x, axis: int, size: int, value=0.0):
    if x is None or x.shape[axis] == size:
        return x
    pad = size - x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _block_bias(cfg: _Config, kp, am, i, j, keys_first: bool = False):
    """Masks for block ``(i, j)``: additive ``[N|1, H|1, bq, bk]`` and bool ``hide`` ``[bq, bk]`` (each or ``None``).

    With ``keys_first`` both come as ``[..., bk, bq]``, for the backward pass's
    transposed scores.
    """
    bq, bk = cfg.block_q, cfg.block_k
    bias = None
    if am is not None:
        bias = lax.dynamic_slice_in_dim(lax.dynamic_slice_in_dim(am, i * bq, bq, axis=2), j * bk, bk, axis=3)
        if keys_first:
            bias = jnp.swapaxes(bias, 2, 3)
    if kp is not None:
        b = lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=1)
        b = b[:, None, :, None] if keys_first else b[:, None, None, :]
        bias = b if bias is None else bias + b
    hide = None
    if cfg.causal or cfg.padded:
        shape, q_axis, k_axis = ((bk, bq), 1, 0) if keys_first else ((bq, bk), 0, 1)
        cols = j * bk + lax.broadcasted_iota(jnp.int32, shape, k_axis)
        if cfg.padded:
            hide = cols >= cfg.total_len
        if cfg.causal:
            rows = i * bq + lax.broadcasted_iota(jnp.int32, shape, q_axis)
            c = (cols > rows) & (cols < cfg.src_len)
            hide = c if hide is None else hide | c
    return bias, hide


def _when_visible(cfg: _Config, i, j, compute, skip, *operands):
    """``compute(*operands)``, or ``skip(*operands)`` when the causal mask hides all of block ``(i, j)``.

    Key block ``j`` is wholly hidden from query block ``i`` when its first key
    comes after the block's last query and it holds no appended key (those stay
    visible). Skipping such blocks halves causal attention's work. The predicate
    depends only on loop indices, never on batched data, so under ``jax.vmap`` the
    ``lax.cond`` stays a real branch.
    """
    if not cfg.causal:
        return compute(*operands)
    visible = (j * cfg.block_k <= (i + 1) * cfg.block_q - 1) | ((j + 1) * cfg.block_k > cfg.src_len)
    if isinstance(visible, (bool, np.bool_)):
        return compute(*operands) if visible else skip(*operands)
    return lax.cond(visible, compute, skip, *operands)


def _product(cfg: _Config, spec: str, a, b, sdtype):
    """``einsum(spec, a, b)`` accumulated in the softmax dtype, at the call's precision (``cfg.precision``)."""
    return jnp.einsum(spec, a, b, preferred_element_type=sdtype, precision=cfg.precision)


def _scaled(cfg: _Config, x, sdtype):
    """``x`` times the call's ``cfg.scale`` in the softmax dtype: the scores from ``q @ k^T``, and in the backward
    the gradient of ``q @ k^T`` from that of the scores."""
    return x if cfg.scale == 1.0 else x * jnp.asarray(cfg.scale, sdtype)


#: The key loop's forward takes each block's row maximum before the scale (``_scores_and_max``) where it
#: is the same number, bit for bit: with no additive mask and a positive, finite scale, since rounding is monotone
#: (``-inf`` for a row all hidden either way). The maximum then reads the product's output and the scale is applied
#: again inside the kernel that exponentiates the scores; taken after the scale, XLA's CPU backend wrote the scaled
#: scores out for the maximum and the exponential to read, one more pass over every block. Measured on the 2-core
#: Intel Xeon, the layer (``noxton.nn.MultiheadAttention``, ``auto``, which takes the key loop past ``WHOLE_KEYS_MAX``
#: keys) at B=1, E=256, H=8 with ``python -m benchmarks.tiles 1,256,8 10240,16384 fwd --row-max after,before --peers
#: torch --reps 3`` (and the same with ``fwd_bwd`` at 16384), 2026-12-05, ms, after the scale against before it
#: (torch beside): forward at L=10240 1084.0 / 955.4 (601.3); L=16384 2710.1 / 2385.2 (1525.8); forward and backward
#: at L=16384 8180.3 / 7809.9 (4762.8; the backward takes the saved log-sum-exp, not a maximum). The attention core
#: alone (``blockwise_attention`` jitted, L = S = 16384, 8 heads of 32): 2655 / 2379 ms, and 2296 with no scale at
#: all. The whole-key pass keeps the maximum after the scale: before it, its chunks were 6-11% slower in the layer's
#: forward at B=1, E=256, L = 512, 1024 and 2048 and at B=8, L=512 (3% faster at L=4096), and the fused kernel's
#: rounding moved by about an ulp; the dense path's softmax was level either way (B=8, L=512, H=8, D=64).
MAX_BEFORE_SCALE = True


def _masked_scores(cfg: _Config, s, bias, hide, sdtype):
    """The product ``s`` scaled, then ``bias`` added and ``-inf`` where ``hide`` (each ``None``: none)."""
    s = _scaled(cfg, s, sdtype)
    if bias is not None:
        s = s + bias
    if hide is not None:
        s = jnp.where(hide[None, None], -jnp.inf, s)
    return s


def _scores(spec, a, b, cfg, kp, am, i, j, sdtype, keys_first=False):
    """The block's masked scores ``einsum(spec, a, b)``: ``[..., bq, bk]`` (``[..., bk, bq]`` with ``keys_first``)."""
    bias, hide = _block_bias(cfg, kp, am, i, j, keys_first)
    return _masked_scores(cfg, _product(cfg, spec, a, b, sdtype), bias, hide, sdtype)


def _scores_and_max(spec, a, b, cfg, kp, am, i, j, sdtype):
    """``_scores`` and their maximum over the keys (the last axis), taken before the scale where that gives the
    same number (see ``MAX_BEFORE_SCALE``)."""
    s = _product(cfg, spec, a, b, sdtype)
    bias, hide = _block_bias(cfg, kp, am, i, j)
    if MAX_BEFORE_SCALE and bias is None and 0.0 < cfg.scale < math.inf:
        s = _masked_scores(cfg._replace(scale=1.0), s, None, hide, sdtype)  # hidden keys only, not yet scaled
        return _scaled(cfg, s, sdtype), _scaled(cfg, jnp.max(s, axis=-1), sdtype)
    s = _masked_scores(cfg, s, bias, hide, sdtype)
    return s, jnp.max(s, axis=-1)


def _dropout_keep(dropout: float, key, i, j, shape):
    return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, i), j), 1.0 - dropout, shape)


def _forward(cfg: _Config, dropout, q, k, v, kp, am, key):
    """Returns ``out [N, H, L, D]`` and ``lse [N, H, L]`` (``inf`` on fully masked rows)."""
    bq, bk = cfg.block_q, cfg.block_k
    sdtype = softmax_dtype(q.dtype)
    n, h, lq, _ = q.shape
    nq, nk = lq // bq, k.shape[2] // bk
    dv = v.shape[-1]
    # Keys as [N, H, D, S]: a plain (q, d) x (d, k) product per block, no per-block transpose.
    kt = jnp.swapaxes(k, 2, 3)
    # Without masks or padding every row has a finite maximum: skip the -inf guards.
    finite = kp is None and am is None and not cfg.causal and not cfg.padded

    def q_block(i):
        q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=2)

        def update(carry, j):
            m, l, acc = carry
            k_blk = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=3)
            v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
            s, s_max = _scores_and_max("nhqd,nhdk->nhqk", q_blk, k_blk, cfg, kp, am, i, j, sdtype)
            m_new = jnp.maximum(m, s_max)
            m_safe = m_new if finite else finite_shift(m_new, sdtype)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + jnp.sum(p, axis=-1)
            if dropout is not None:
                keep = _dropout_keep(dropout, key, i, j, p.shape)
                p = jnp.where(keep, p * jnp.asarray(1.0 / (1.0 - dropout), sdtype), 0.0).astype(sdtype)
            pv = _product(cfg, "nhqk,nhkd->nhqd", p.astype(v.dtype), v_blk, sdtype)
            acc = alpha[..., None] * acc + pv
            return m_new, l, acc

        def step(carry, j):
            return _when_visible(cfg, i, j, lambda c: update(c, j), lambda c: c, carry), None

        init = (
            jnp.full((n, h, bq), -jnp.inf, sdtype),
            jnp.zeros((n, h, bq), sdtype),
            jnp.zeros((n, h, bq, dv), sdtype),
        )
        if nk == 1:
            (m, l, acc), _ = step(init, 0)
        else:
            (m, l, acc), _ = lax.scan(step, init, jnp.arange(nk, dtype=jnp.int32))
        empty = l == 0
        l_safe = jnp.where(empty, 1.0, l).astype(sdtype)
        out = acc / l_safe[..., None]
        lse = jnp.where(empty, jnp.inf, finite_shift(m, sdtype) + jnp.log(l_safe)).astype(sdtype)
        return out, lse

    if nq == 1:
        out, lse = q_block(0)
        return out, lse
    outs, lses = lax.map(q_block, jnp.arange(nq, dtype=jnp.int32))
    out = jnp.moveaxis(outs, 0, 2).reshape(n, h, lq, dv)
    lse = jnp.moveaxis(lses, 0, 2).reshape(n, h, lq)
    return out, lse


#: The CPU's forward has no key loop (``_forward_whole_keys``), with no dropout, no forced block
#: sizes and at most ``WHOLE_KEYS_MAX`` keys: it runs chunks of ``(examples, heads, queries)``
#: against all keys, one matrix product, the softmax and the second product, writing each query's
#: output once. Up to ``FUSED_KEYS_MAX`` keys, XLA's CPU backend (jaxlib 0.10: its YNNPACK fusions)
#: runs a chunk as one fused kernel that never writes the chunk's scores out; the online softmax's
#: running maximum and sum across key blocks keeps it from fusing. Past it the chunk is not fused,
#: but one pass over the keys still beats the key loop's rescaled accumulators. Measured on a 2-core
#: x86 CPU (AMD EPYC), the attention core against torch's ``F.scaled_dot_product_attention`` in one
#: process, medians of 11 interleaved runs; the layers with
#: ``python -m benchmarks --only-grid --grid-points B,L,E,H --grid-contenders eqx``:
#:
#: | N x H, L = S, D  | key blocks (before)        | whole keys                        |
#: |------------------|----------------------------|-----------------------------------|
#: | 8 x 8, 512, 32   | 60-76 ms (2.3-2.9x torch)  | 8 rows x 512 queries: 1.00x       |
#: | 1 x 8, 1024, 32  | 16-20 ms (1.5-1.9x)        | 2 rows x 1024: 1.06x              |
#: | 1 x 16, 512, 64  | 17-18 ms (1.7x)            | 8 rows x 512: 1.35x               |
#: | 1 x 8, 2048, 32  | 1.62x                      | 2 rows x 512: 1.12x (1 x 512: 1.15x) |
#: | 1 x 16, 2048, 64 | 1.35x                      | 1 row x 512: 0.98x (1 x 1024: 1.05x) |
#: | 1 x 8, 4096, 32  | 1.47x                      | 1 row x 256: 1.09x (1 x 512: 1.24x) |
#: | 1 x 8, 8192, 32  | 1.42x                      | 1 row x 256: 1.26x (1 x 128: 1.44x) |
#:
#: The layer at B=8, E=256, H=8, L=512 went from 1.74x to 1.03x torch's time (eqx.nn: 1.14x), at
#: E=512 from 1.20x to 1.06x.
FUSED_KEYS_MAX = 1024
#: Scores per chunk of ``_forward_whole_keys``: whole rows (an example's heads first) while they fit,
#: else a row's queries split. Up to ``FUSED_KEYS_MAX`` keys a chunk takes all of a row's queries
#: (measured on the AMD EPYC at 8 x 8 x 512: 8 rows of 512 queries, 24.6 ms, against 64 rows of 64 queries,
#: 43 ms, and 16 rows of 256, 32 ms; on the Intel Xeon the 64 rows of 64 queries were the faster, see
#: ``ALL_ROWS_QUERIES``); past it at most ``LONG_CHUNK_Q`` (the table above).
CHUNK_SCORES = 2**21
LONG_CHUNK_Q = 256
#: Past this many keys (a chunk of ``LONG_CHUNK_Q`` queries would exceed ``CHUNK_SCORES``) the forward
#: keeps the key loop: thinner query chunks read all keys for too few queries (measured at 65536 keys,
#: 1 x 32 chunks: 145 s per call, about twice torch's time).
WHOLE_KEYS_MAX = CHUNK_SCORES // LONG_CHUNK_Q
#: Scores per chunk of ``_backward_whole_keys``, a quarter of the forward's (half on Intel): each chunk holds four
#: score-sized arrays (``s``, ``p``, ``dp``, ``ds``), and with 2**21 the gradient's temporaries reached
#: 33 MiB at B=1, L=S=512, E=256, H=8, over glibc's 32 MiB ``mmap`` ceiling, so every call faulted
#: them in afresh (20 MiB with 2**19). The layer's gradient (``jax.grad`` of the jitted, vmapped
#: ``noxton.nn.MultiheadAttention``), medians of 11 interleaved rounds in one process, one compiled
#: variant per value of this constant, E=256, H=8, in the table below. The command that measures it:
#: ``python -m benchmarks.tiles 1,256,8 512,1024 fwd_bwd --chunk-scores 21,20,19,18 --peers torch
#: --reps 11``; its run of 2026-12-03 gave, at L=512, 35.6, 24.4, 20.6 and 20.0 ms against torch's
#: 22.7 (35 MiB faulted per call at 2**21, none below), and at L=1024 64.6, 68.4, 52.8 and 63.0
#: against 53.3:
#:
#: | B, L=S   | 2**21    | 2**20    | 2**19    | 2**18    | torch    |
#: |----------|----------|----------|----------|----------|----------|
#: | 1, 512   | 50.8 ms  | 33.1 ms  | 28.8 ms  | 29.5 ms  | 27.5 ms  |
#: | 8, 512   | 238 ms   | 265 ms   | 239 ms   | 217 ms   | 189 ms   |
#: | 1, 1024  | 71.8 ms  | 67.8 ms  | 64.5 ms  | 67.8 ms  | 61.3 ms  |
#: | 8, 256   | 90.6 ms  | 82.9 ms  | 84.3 ms  | 88.3 ms  | 69.4 ms  |
#: | 1, 2048  | 270 ms   | 274 ms   | 289 ms   | 278 ms   | 197 ms   |
#:
#: That was the AMD EPYC. On the Intel Xeon (``INTEL``) 2**20 was faster than 2**19 at 19 of 20 points
#: (B in {1, 8}, E/H in {256/8, 512/8, 1024/16}, L from 64 to 2048; the same command, medians of 7-11,
#: 2026-12-04), by 2-20%, and level at the 20th; in ms, 2**19 / 2**20 (torch, eqx.nn): B=1, E=256, L=256
#: 5.5 / 4.7 (4.0, 7.0); L=512 13.6 / 11.7 (9.2, 15.2); L=1024 39.2 / 37.2 (25.7, 87.0); L=2048 132.6 /
#: 130.1 (79.7, 448.5; 2**20 faulted 37 MiB per call there and was still faster); B=1, E=512, L=256 10.4 /
#: 9.8 (9.8, 12.8); B=1, E=1024, L=256 32.6 / 29.5 (28.2, 28.4); B=8, E=256, L=64 5.5 / 5.1 (6.4, 4.8);
#: L=512 110.3 / 105.3 (77.5, 176.0); B=8, E=512, L=128 35.2 / 28.2 (31.1, 26.9); L=256 90.2 / 90.9
#: (67.4, 77.5), the level one. 2**21 faulted 34 MiB per call at B=1, L=512 there too (21.8 ms).
CHUNK_SCORES_VJP = 2**20 if INTEL else 2**19
#: With ``NORMALISE_AFTER`` (with AVX-512, ``AVX512``), ``_forward_whole_keys`` divides by the softmax's sum after
#: the second product (``(P @ V) / l``, a scale of ``[queries, D]`` rather than of ``[queries, keys]``, as
#: torch's CPU flash kernel does), except for chunks of ``NORMALISED_FIRST``'s ``(queries, keys)``; without
#: it, and for those, it takes ``(P / l) @ V``. Both round alike: ``P`` or ``P / l`` is rounded once to
#: the values' dtype. Measured on the 2-core Intel Xeon (AVX-512; jaxlib 0.10, whose
#: YNNPACK fusion runs each chunk as one kernel), forward, medians of 7-11 interleaved rounds in one
#: process, ms, ``(P / l) @ V`` against ``(P @ V) / l``. The chunk alone, at (rows, queries, keys, D):
#: (64, 128, 128, 32) 1.33 / 0.86; (32, 256, 256, 64) 3.36 / 2.22; (128, 128, 128, 64) 3.66 / 2.30;
#: (8, 256, 256, 32) 0.83 / 0.69; (2, 1024, 1024, 32) 2.62 / 2.12; (4, 256, 2048, 32) 2.71 / 2.39; and
#: the one shape where dividing first was as fast or faster, (8, 512, 512, 32) 2.21 / 2.26 and (8, 512,
#: 512, 64) 3.05 / 3.22; in the layer at B=1, E=256, L=512 (those 8 x 512 x 512 chunks), 3.5 / 3.8-4.5.
#: The layer, ``noxton.nn.MultiheadAttention`` under ``jax.vmap``, jitted, with ``python -m benchmarks.tiles
#: B,E,H L,... fwd --normalise before,rule --peers torch,eqx --reps 11`` on 2026-12-04 (before / rule,
#: eqx.nn and torch beside), at (B, E, L): (8, 256, 128) 5.5 / 4.2 (eqx.nn 5.2, torch 3.4); (8, 256, 256)
#: 11.5 / 9.1 (11.5, 8.2); (8, 512, 256) 30.7 / 24.8 (29.4, 20.1); (8, 1024, 128) 34.1 / 30.0 (35.8,
#: 30.5); (1, 1024, 256) 12.0 / 8.9 (10.8, 9.6); (1, 256, 1024) 12.7 / 10.6 (11.5, 7.9); level within the
#: run's noise (up to 20% between identical programs there) at the other 24 points of B in {1, 8},
#: E/H in {256/8, 512/8, 1024/16}, L in {64, ..., 1024}. Forward and backward were level or up to 7%
#: faster, measured while the gradient's forward still wrote the log-sum-exp (see ``_backward_whole_keys``). On the
#: AMD EPYC, dividing after was slower at a chunk of 8 x 256 x 256, D=64 (2.72 against 2.22 ms, with the
#: all-masked-row guard of then), so CPUs without AVX-512 keep dividing first. Whether that EPYC had AVX-512 is not
#: recorded, and it was not at hand to measure this rule again. On an AMD EPYC with AVX-512 (2026-12-05), this rule
#: alone, the same command with ``--peers torch --reps 9-11``, before / rule: (8, 256, 128) 1.30 / 1.00; (8, 256,
#: 256) 1.40 / 0.88; (8, 512, 256) 1.12 / 0.92; (1, 1024, 256), H=16, 1.24 / 0.84; (1, 256, 1024) 1.33 / 1.07.
NORMALISE_AFTER = AVX512
NORMALISED_FIRST = frozenset({(512, 512)})
#: With AVX-512 (``AVX512``), ``forward_chunks`` gives the forward's chunks past ``FUSED_KEYS_MAX`` keys up to
#: ``LONG_ROW_CHUNK_Q`` queries each (one row, when a row has that many; fewer queries, as many rows as ``CHUNK_SCORES``
#: holds), rather than ``LONG_CHUNK_Q`` queries (past 8192 keys a chunk of 1024 queries holds 2**23 scores, 32 MiB in
#: float32); and a call of at most ``ONE_CHUNK_MAX_Q`` queries and ``ONE_CHUNK_SCORES`` scores in all runs as one chunk
#: (16 MiB of float32 scores), with no loop over chunks. Measured on the 2-core Intel Xeon, the attention core alone
#: (``_forward_whole_keys`` jitted, ``[N, H, L, D]`` inputs, L = S) against torch's ``F.scaled_dot_product_attention``
#: in one process, medians of 13 interleaved rounds, 2026-12-04, ms, the former chunks against these (torch beside), at
#: (N, H, L, D): (1, 8, 2048, 32) 1 x 4 x 256 40.7 against 1 x 1 x 1024 30.7 (torch 20.6; 1 x 1 x 512 33.1); (1, 16,
#: 2048, 64) 111.5 / 92.6 (64.9); (8, 8, 2048, 32) 296.9 / 225.4 (146.9); (1, 8, 4096, 32) 1 x 2 x 256 143.7 / 124.3
#: (72.1; 1 x 1 x 512 128.9); (1, 16, 4096, 64) 432.5 / 376.7 (240.7); (1, 8, 8192, 32) 1 x 1 x 256 598.9 / 519.4
#: (291.9; 1 x 1 x 512 541.5). One chunk: (8, 8, 256, 32) 4 x 8 x 256 3.89 and 4.25 / 8 x 8 x 256 2.89 and 3.15 (torch
#: 3.02); (8, 8, 256, 64) 6.34 / 4.84 (4.68); (4, 16, 256, 64) 6.46 / 5.00 (4.92); but at 512 queries one chunk of all
#: rows was slower, (1, 16, 512, 64) 1 x 8 x 512 7.63 against 1 x 16 x 512 8.04, as two chunks of half the rows were at
#: (8, 8, 512, 64) (30.7 against 33.0), so ``ONE_CHUNK_MAX_Q`` stops at 256. Up to ``FUSED_KEYS_MAX`` keys, chunks of
#: one row of all queries rather than two were level at D = 64 ((1, 16, 1024, 64) 24.8 against 25.0), but faster at D <=
#: ``NARROW_HEAD`` from 768 keys, so there the chunks hold ``NARROW_CHUNK_SCORES``: (1, 8, 768, 32) 1 x 2 x 768 5.39
#: against 1 x 1 x 768 4.73 (torch 2.70); (8, 8, 768, 32) 45.6 / 40.6 (22.4); (1, 8, 1024, 32) 8.74 / 8.14 (4.67); (8,
#: 8, 1024, 32) 71.2 / 67.3 (42.3). At 512 keys the larger chunk was still the faster, (1, 8, 512, 32) 1 x 8 x 512 2.49
#: against 1 x 4 x 512 3.06, so that rule starts past half of ``FUSED_KEYS_MAX``, in keys and in queries (it was
#: measured with as many queries as keys). CPUs without AVX-512 keep ``whole_key_chunks``'s (``None`` and 0 turn these
#: off). The command that measures the layer with and without them: ``python -m benchmarks.tiles B,E,H L,... fwd
#: --chunk-rule former,rule``.
LONG_ROW_CHUNK_Q: int | None = 1024 if AVX512 else None
#: Off Intel, a long row of ``LONG_ROW_CHUNK_Q`` holds at most ``LONG_ROW_MAX_SCORES`` scores (0: no limit): 1024
#: queries up to 2048 keys, 512 at 4096 and 256 at 8192, so that XLA's temporaries stay under glibc's 32 MiB ``mmap``
#: ceiling (``noxton._malloc``) wherever the activations leave room. With 1024 queries at B=1, L = S = 8192, E=256, H=8
#: they were 57.1 MiB (``compiled.memory_analysis()``, the layer under ``jax.vmap``), and 26.0 MiB with 256; at B=1,
#: L=4096, E=512 41.3 against 26.1 with 512, and at B=2, L=4096, E=256 40.6 against 25.1. Over the ceiling, the calls
#: fault their temporaries in afresh whenever no heap has room for them, in some calls and processes and not others.
#: Measured on the 2-core AMD EPYC with AVX-512 with ``python -m benchmarks.tiles B,E,H L MODE --set
#: 'LONG_ROW_CHUNK_Q=1024;LONG_ROW_CHUNK_Q=512'`` (or ``=256``) ``--settle 1 --peers torch --reps 3-7``, before this
#: limit existed (with it, 1024 queries take ``LONG_ROW_MAX_SCORES=0`` in the same group), 2026-12-05, ms,
#: 1024 queries / the limit's (torch; MiB faulted per call where there were any): forward at (B, E, L) = (1, 256, 8192)
#: 577.0 / 588.4 (543.9) and 589.3 / 580.9 (537.0), level; in another run 1024 queries faulted 61 MiB per call and took
#: 673.9 (542.7), in a third 256 queries (the budget alone) took 587.1 (536.2), and with ``--set
#: 'LONG_ROW_MAX_SCORES=0;LONG_ROW_MAX_SCORES=2**21' --reps 7`` 619.6 / 618.8 (546.8). Forward and backward there 2436.2
#: (99 MiB) / 2075.7 (75 MiB) (2062.9), and 2023.0 (99 MiB) / 2068.8 (75 MiB) (1984.4). Forward at (1, 512, 4096) 288.0
#: (41 MiB) / 277.5 (274.8), 277.2 / 274.5 (269.4), 274.2 / 273.8 (264.8), 286.2 (41 MiB) / 280.1 (274.8) and 275.3 /
#: 276.8 (271.7), and once 283.2 (43 MiB) / 387.1 (269.1), one of the two speeds of docs/differences.md ("Timing beside
#: torch in one process"); (2, 256, 4096) 309.6 (41 MiB) / 298.4 (283.0) and 320.3 / 332.8 (287.2); level at (1, 256,
#: 4096) (152.0 / 155.3 and 152.3 / 150.3), and at (1, 1024, 4096), H=16 (644.7 / 651.0) and (8, 256, 4096) (1232.1 /
#: 1241.6), where both fault (their activations alone pass the ceiling). On the Intel Xeon the attention core alone ran
#: 1024 queries faster than 256 at 8192 keys (figures above), and it was not at hand to measure the layer, so there the
#: limit is off.
LONG_ROW_MAX_SCORES = 0 if INTEL else 2**21
NARROW_CHUNK_SCORES = 2**20 if AVX512 else 0
NARROW_HEAD = 32
ONE_CHUNK_SCORES = 2**22 if AVX512 else 0
ONE_CHUNK_MAX_Q = 256
#: With AVX-512 (``AVX512``), from a quarter to half of ``FUSED_KEYS_MAX`` keys (257 to 512) with at least as many
#: queries (measured at L = S) and head sizes up to ``ALL_ROWS_MAX_HEAD`` (measured at 32 and 64), ``forward_chunks``
#: takes chunks of every head of whole examples (all of them, up to ``ALL_ROWS_MAX_SCORES`` scores, the most measured:
#: 16 MiB of float32) and ``ALL_ROWS_CHUNK_Q`` queries, half as many where a row's keys times the head size reach
#: ``ALL_ROWS_WIDE_ROW`` (512 keys at D = 64), when such a chunk holds at least ``ALL_ROWS_QUERIES`` queries in all.
#: Below that many the fused chunk ran on about one core (process time over wall time 1.4, against 1.8 from 4096); my
#: reading, not confirmed inside XLA, of why these chunks beat one example's heads: ``k`` and ``v`` are then sliced by
#: example only, not again by head at each step. The attention core alone (``_forward_whole_keys`` jitted, as for
#: ``LONG_ROW_CHUNK_Q``), medians of 15 interleaved rounds, 2026-12-04, ms, the former chunks against these (other sizes
#: tried beside), at (N, H, L, D): (8, 8, 512, 64) 1 x 8 x 512 35.5 against 8 x 8 x 64 31.9 (8 x 8 x 128 40.1; 8 x 8 x
#: 32 42.2); (8, 16, 512, 64) 65.7 / 56.2 (8 x 16 x 32 61.0; 8 x 16 x 128 74.9); (8, 8, 512, 32) 22.2 / 17.3 (8 x 8 x 64
#: 21.3); (4, 8, 512, 32) 11.8 / 9.5; (8, 8, 384, 64) 21.3 / 15.8 (8 x 8 x 64 17.9); (4, 16, 384, 64) 20.9 / 15.7. Below
#: 4096 queries per chunk the rule's chunks were slower: (4, 8, 512, 64) 16.4 against 4 x 8 x 64 21.9; (2, 16, 512, 64)
#: 17.6 / 22.1; (2, 8, 512, 64) 8.9 / 10.6; (1, 16, 512, 64) 9.5 / 11.3 (with 128 queries, which 512 keys at D = 64
#: halve, these were 17.7, 18.7, 8.6 and 9.0). At 256 keys the former 2 x 16 x 256 was level ((8, 16, 256, 64) 15.2
#: against 8 x 16 x 128 15.1); from 768 keys the former chunks were faster ((8, 8, 768, 64) 66.9 against 8 x 8 x 64
#: 72.1). The layer, ``python -m benchmarks.tiles B,E,H L,... fwd --chunk-rule former,rule --peers torch,eqx --reps 11``
#: (at these shapes only this rule differs between the two), 2026-12-04, ms, former / rule (torch, eqx.nn): B=8, E=256,
#: L=384 22.7 / 17.5 (16.7, 33.9); L=512 34.1 / 27.7 (26.2, 39.3); E=512, L=384 47.7 / 40.5 (41.0, 71.8); L=512 76.7 /
#: 70.7 (57.9, 101.3); E=1024, H=16, L=512 206.5 / 195.5 (174.3, 293.8); B=4, E=256, L=512 18.6 / 14.5 (14.0, 18.9).
#: Forward and backward (the gradient's forward takes these chunks) were level within 6% in-process at B=8, L=512, E=512
#: and 256, and B=8, E=512, L=384. The same chunks in the backward were 8-18% faster in the core at D = 32 but slower in
#: the layer's gradient (B=8, E=256, L=512: 125.0 against 112.2 ms; L=384: 86.5 against 74.0), so ``backward_chunks``
#: keeps its own. 0 turns the rule off (CPUs without AVX-512).
ALL_ROWS_QUERIES = 4096 if AVX512 else 0
ALL_ROWS_CHUNK_Q = 128
ALL_ROWS_WIDE_ROW = 2**15
ALL_ROWS_MAX_SCORES = 2**22
ALL_ROWS_MAX_HEAD = 64
#: The backward's ``ONE_CHUNK_SCORES`` (``backward_chunks``), a half of the forward's, as its chunks hold four
#: score-sized arrays. Measured on the 2-core Intel Xeon: the backward alone (``_backward_whole_keys`` jitted,
#: medians of 9) at (8, 16, 128, 64), chunks of 4 x 16 x 128 (``CHUNK_SCORES_VJP``) against one of 8 x 16 x 128:
#: 14.5 against 13.3 ms; the layer's gradient at B=8, E=1024, H=16, L=128 (``python -m benchmarks.tiles
#: 8,1024,16 128 fwd_bwd --chunk-scores 20,21``, medians of 7, twice): 108.4 against 102.8 ms and 103.2 against
#: 97.6 (eqx.nn 102.0 and 96.9). With 2**22, at (8, 8, 256, 64), one chunk of 8 x 8 x 256 took 38.2 ms
#: against 26.5 for 2 x 8 x 256.
#:
#: On the AMD EPYC with AVX-512 (``AVX512``), a half of that: one chunk of 2**21 scores at D = 64 held 36 MiB of
#: temporaries, over glibc's 32 MiB ``mmap`` ceiling, so every call faulted them in afresh. The layer's gradient,
#: ``python -m benchmarks.tiles B,E,H L fwd_bwd --set 'ONE_CHUNK_SCORES_VJP=0;ONE_CHUNK_SCORES_VJP=2**21' --settle 1
#: --peers torch,eqx --reps 9`` on 2026-12-05, ms, no rule / one chunk (torch, eqx.nn): B=1, E=1024, H=16, L=256
#: 42.8 / 40.4 (45.3, 40.2); B=8, E=512, L=128 40.5 / 38.9 (44.3, 38.8); B=4, E=1024, H=16, L=128 73.2 / 71.4
#: (83.1, 70.7); B=8, E=256, L=128 13.8 / 13.9 (15.5, 14.2); B=8, E=256, L=96 9.8 / 9.9 (11.3, 9.1); and at 2**21
#: scores, B=8, E=1024, H=16, L=128, 139.3 / 143.5 (159.6, 138.0), 36 MiB faulted per call. A scratch script timing
#: each variant in blocks of 3 calls (medians of 5-7 rounds; two compilations of one program differed by up to 4%)
#: gave the one chunk 0.92-1.00 of the time without it at those points and at (B, E, L) = (8, 256, 256) and (8,
#: 1024, 128) (there 0.95-0.96 with 2**21, against the tiles tool's 1.03). Without AVX-512 (the AMD EPYC of
#: ``CHUNK_SCORES_VJP``'s table) it is not measured, and off.
ONE_CHUNK_SCORES_VJP = 2**21 if INTEL else 2**20 if AVX512 else 0


#: Without a gradient (``_attention_core``'s primal), the whole-key pass writes each chunk's output over its own
#: queries, in one ``[N, H, L, D]`` buffer carried through the loop, rather than stacking the chunks' outputs and
#: moving them into place: one activation fewer is live (the queries, the keys, the values and the output were four),
#: and no copy puts the output in place. The gradient's forward keeps the queries (the backward needs them). XLA's
#: temporaries of the layer's forward (``compiled.memory_analysis()``, ``noxton.nn.MultiheadAttention`` under
#: ``jax.vmap``, jitted), MiB, stacked / over the queries: (B, E, H, L) = (8, 512, 8, 512) 40.0 / 25.0; (1, 1024, 16,
#: 2048) 40.0 / 25.3; (8, 256, 8, 1024) 40.0 / 24.4; (8, 256, 8, 512) 20.0 / 13.0. Under 32 MiB glibc serves them from
#: its heaps, where they stay (``noxton._malloc``); over it, with a fresh ``mmap`` whenever no heap has room, and a
#: call that faults 40 MiB in took 84-89 ms at (8, 512, 8, 512) against 72-76 for one that did not. In processes that
#: ran that point alone (no torch, 8 calls each, 2026-12-05, AMD EPYC), the calls faulted 40-44 MiB in 2 to 5 of 8
#: stacked, and at most 31 MiB in 2 of 8 over the queries. Times were level: medians of 10 alternating calls in one
#: process, ms, stacked / over the queries, 79.2 / 83.7 and 75.1 / 78.0 at (8, 512, 8, 512), 196.6 / 192.5 at (1,
#: 1024, 16, 2048), 94.9 / 92.0 at (8, 256, 8, 1024); and ``python -m benchmarks.tiles B,E,H L fwd --set
#: 'OUTPUT_OVER_QUERIES=False;OUTPUT_OVER_QUERIES=True' --settle 1 --reps 9``: 73.5 / 74.8 and 72.7 / 71.1, 243.1 /
#: 245.9, 91.5 / 90.6; (1, 256, 8, 512) 3.9 / 4.8, 5.2 / 4.9 and 4.6 / 4.1; (1, 256, 8, 2048) 38.0 / 38.5; (8, 256, 8,
#: 128) 4.1 / 4.0.
OUTPUT_OVER_QUERIES = True


#: The values that turn every chunk rule above off, so that ``whole_key_chunks`` alone sets the chunks (as on a
#: CPU neither Intel nor with AVX-512): what the tiles tool's ``--chunk-rule former`` and the tests patch.
CHUNK_RULES_OFF = {
    "LONG_ROW_CHUNK_Q": None,
    "NARROW_CHUNK_SCORES": 0,
    "ONE_CHUNK_SCORES": 0,
    "ONE_CHUNK_SCORES_VJP": 0,
    "ALL_ROWS_QUERIES": 0,
}
#: The forward's rules that ``AVX512`` turns on, as CPUs without AVX-512 take them (the chunk rules above but the
#: backward's, and dividing first): what the tiles tool's ``--avx512-rules off`` patches.
AVX512_RULES_OFF = {
    "NORMALISE_AFTER": False,
    **{name: off for name, off in CHUNK_RULES_OFF.items() if name != "ONE_CHUNK_SCORES_VJP"},
}


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, max(1, at_most)) + 1) if n % d == 0)


def whole_key_chunks(
    n: int, h: int, lq: int, sk: int, budget: int | None = None, max_q: int | None = None
) -> tuple[int, int, int]:
    """``(examples, heads, queries)`` per chunk of about ``budget`` scores (``CHUNK_SCORES`` by default;
    ``_backward_whole_keys`` takes ``CHUNK_SCORES_VJP``): ``[n, h, lq]`` queries, ``sk`` keys, a row's
    queries split in chunks of at most ``max_q`` (by default all of them up to ``FUSED_KEYS_MAX`` keys,
    ``LONG_CHUNK_Q`` past it)."""
    if max_q is None:
        max_q = lq if sk <= FUSED_KEYS_MAX else LONG_CHUNK_Q
    c = _balanced(lq, max_q)
    budget = CHUNK_SCORES if budget is None else budget
    rows = budget // (c * sk)
    if rows < 1:
        return 1, 1, _balanced(lq, max(8, budget // sk))
    hb = _largest_divisor(h, rows)
    nb = _largest_divisor(n, rows // hb) if hb == h else 1
    return nb, hb, c


def _one_chunk(n: int, h: int, lq: int, sk: int, limit: int) -> bool:
    """A call small enough to run as one chunk: at most ``ONE_CHUNK_MAX_Q`` queries, ``FUSED_KEYS_MAX`` keys and
    ``limit`` scores in all (``limit`` 0: the rule is off)."""
    return bool(limit) and sk <= FUSED_KEYS_MAX and lq <= ONE_CHUNK_MAX_Q and n * h * lq * sk <= limit


def forward_chunks(n: int, h: int, lq: int, sk: int, d: int) -> tuple[int, int, int]:
    """The chunks of ``_forward_whole_keys`` for head size ``d``: ``whole_key_chunks`` with ``CHUNK_SCORES``,
    except on CPUs with AVX-512 (``LONG_ROW_CHUNK_Q`` and its ``LONG_ROW_MAX_SCORES``, ``NARROW_CHUNK_SCORES``,
    ``ONE_CHUNK_SCORES`` and ``ALL_ROWS_QUERIES``, which say why; ``AVX512``)."""
    if sk > FUSED_KEYS_MAX and LONG_ROW_CHUNK_Q:
        max_q = LONG_ROW_CHUNK_Q
        if LONG_ROW_MAX_SCORES:
            max_q = min(max_q, max(LONG_CHUNK_Q, LONG_ROW_MAX_SCORES // sk))
        c = _balanced(lq, max_q)
        return whole_key_chunks(n, h, lq, sk, max(CHUNK_SCORES, c * sk), c)
    # measured with as many queries as keys: from half of FUSED_KEYS_MAX each
    if NARROW_CHUNK_SCORES and d <= NARROW_HEAD and sk <= FUSED_KEYS_MAX < 2 * min(sk, lq):
        return whole_key_chunks(n, h, lq, sk, NARROW_CHUNK_SCORES)
    if _one_chunk(n, h, lq, sk, ONE_CHUNK_SCORES):
        return n, h, lq
    if ALL_ROWS_QUERIES and FUSED_KEYS_MAX // 4 < sk <= min(lq, FUSED_KEYS_MAX // 2) and d <= ALL_ROWS_MAX_HEAD:
        max_q = ALL_ROWS_CHUNK_Q // (2 if sk * d >= ALL_ROWS_WIDE_ROW else 1)
        nb, hb, c = whole_key_chunks(n, h, lq, sk, ALL_ROWS_MAX_SCORES, max_q)
        if hb == h and nb * h * c >= ALL_ROWS_QUERIES:  # every head of whole examples
            return nb, hb, c
    return whole_key_chunks(n, h, lq, sk)


def backward_chunks(n: int, h: int, lq: int, sk: int) -> tuple[int, int, int]:
    """The chunks of ``_backward_whole_keys``: ``whole_key_chunks`` with ``CHUNK_SCORES_VJP``, except that on
    Intel CPUs (``INTEL``) and CPUs with AVX-512 (``AVX512``) a call of at most ``ONE_CHUNK_MAX_Q`` queries and
    ``ONE_CHUNK_SCORES_VJP`` scores is one chunk."""
    if _one_chunk(n, h, lq, sk, ONE_CHUNK_SCORES_VJP):
        return n, h, lq
    return whole_key_chunks(n, h, lq, sk, CHUNK_SCORES_VJP)


def _chunk_part(chunks, x, a, b, i=None):
    """Chunk ``(a, b, i)``'s examples and heads of ``x`` (an axis of size 1 broadcasts), and its queries on axis 2."""
    nb, hb, c = chunks
    if x.shape[0] > 1:
        x = lax.dynamic_slice_in_dim(x, a * nb, nb, axis=0)
    if x.ndim > 2 and x.shape[1] > 1:
        x = lax.dynamic_slice_in_dim(x, b * hb, hb, axis=1)
    if i is not None:
        x = lax.dynamic_slice_in_dim(x, i * c, c, axis=2)
    return x


def _chunk_scores(cfg: _Config, chunks, a_c, b_c, kp, am, a, b, i, sdtype, keys_first=False):
    """The masked scores of chunk ``(a, b, i)``: ``[rows, c, S]`` from queries ``a_c`` ``[rows, c, D]`` and keys
    ``b_c`` ``[rows, D, S]``, ``einsum("rxd,rdy->rxy")``, or with ``keys_first`` ``[rows, S, c]`` from keys
    ``[rows, S, D]`` and queries ``[rows, c, D]``, ``einsum("rxd,ryd->rxy")``."""
    nb, hb, _ = chunks
    # 3-d products over the folded rows: the form XLA's CPU backend fuses with the softmax
    s = _product(cfg, "rxd,ryd->rxy" if keys_first else "rxd,rdy->rxy", a_c, b_c, sdtype)
    # the key loop's masks, as one block of c queries and all keys
    part = functools.partial(_chunk_part, chunks)
    kp_c = None if kp is None else part(kp, a, b)
    bias, hide = _block_bias(cfg, kp_c, None if am is None else part(am, a, b), i, 0, keys_first)
    if bias is None and hide is None:
        return _scaled(cfg, s, sdtype)
    # masked as the key loop's [N, H, ...] blocks are: the chunk's rows seen as its examples and heads
    s = _masked_scores(cfg, s.reshape(nb, hb, *s.shape[1:]), bias, hide, sdtype)
    return s.reshape(nb * hb, *s.shape[2:])


def _masked(cfg: _Config, kp, am) -> bool:
    """Some key may be hidden (a mask, the causal rule or padded keys), so a row may have no visible key."""
    return kp is not None or am is not None or cfg.causal or cfg.padded


def _chunk_exp(s, axis: int, masked: bool):
    """``(m, exp(s - m), its sum)`` over the keys' ``axis`` of a chunk's scores, ``m`` the row maximum.

    With ``masked``, ``m`` is kept finite, so that a row whose every key is masked gives ``exp(-inf) = 0``:
    a floor rather than ``finite_shift``'s select, which keeps XLA from fusing the chunk. Unmasked, every
    row has a key and no floor is needed; the floor alone kept XLA from fusing the maximum into the product
    at 8 rows x 256 queries x 256 keys, D=64 (its chunk moved 22 MiB in 8 kernels against 12 MiB in 5,
    2.22 against 1.99 ms). The forward and the backward of the whole-key pass share it, so that the
    backward's weights are the forward's.
    """
    m = jnp.max(s, axis=axis, keepdims=True)
    if masked:
        m = jnp.maximum(m, jnp.finfo(s.dtype).min)
    p = jnp.exp(s - m)
    return m, p, jnp.sum(p, axis=axis, keepdims=True)


def _unchunk(counts, chunks, n, h, lq, x):
    """``[chunks, nb, hb, c, ...] -> [N, H, L, ...]``: the chunks' results in place."""
    nb, hb, c = chunks
    x = x.reshape(*counts, nb, hb, c, *x.shape[4:])
    x = jnp.transpose(x, (0, 3, 1, 4, 2, 5, *range(6, x.ndim)))  # [N/nb, nb, H/hb, hb, L/c, c, ...]
    return x.reshape(n, h, lq, *x.shape[6:])


def _forward_whole_keys(cfg: _Config, chunks: tuple[int, int, int], q, k, v, kp, am, in_place: bool = False):
    """``_forward`` with one block of keys and no dropout: ``out [N, H, L, D]`` and ``lse [N, H, L]``.

    ``chunks`` is ``forward_chunks``'s ``(examples, heads, queries)``; ``q`` (and ``am``) are padded
    to whole query chunks, the keys are not padded. With ``in_place`` (where ``out`` has ``q``'s shape and
    dtype), each chunk's output overwrites its own queries in one ``[N, H, L, D]`` buffer, and ``lse`` is
    ``None``: see ``OUTPUT_OVER_QUERIES``.
    """
    sdtype = softmax_dtype(q.dtype)
    n, h, lq, d = q.shape
    sk, dv = k.shape[2], v.shape[-1]
    nb, hb, c = chunks
    rows = nb * hb
    counts = (n // nb, h // hb, lq // c)
    kt = jnp.swapaxes(k, 2, 3)  # [N, H, D, S]: a plain (q, d) x (d, k) product per row
    tiny = jnp.finfo(sdtype).tiny
    masked = _masked(cfg, kp, am)
    after = NORMALISE_AFTER and (c, sk) not in NORMALISED_FIRST
    part = functools.partial(_chunk_part, chunks)

    def place(idx):  # chunk ``idx``'s numbers among the examples', heads' and queries' chunks
        a, rest = jnp.divmod(idx, counts[1] * counts[2])
        return (a, *jnp.divmod(rest, counts[2]))

    def chunk(idx, queries=q):
        a, b, i = place(idx)
        qc = part(queries, a, b, i).reshape(rows, c, d)
        s = _chunk_scores(cfg, chunks, qc, part(kt, a, b).reshape(rows, d, sk), kp, am, a, b, i, sdtype)
        m, p, l = _chunk_exp(s, -1, masked)
        vc = part(v, a, b).reshape(rows, sk, dv)
        if after:  # the unnormalised weights' product, then its [c, D] rows scaled
            out = _product(cfg, "rqk,rkd->rqd", p.astype(v.dtype), vc, sdtype)
            out = out * (1.0 / jnp.maximum(l, tiny))
        else:
            w = p * (1.0 / jnp.maximum(l, tiny))
            out = _product(cfg, "rqk,rkd->rqd", w.astype(v.dtype), vc, sdtype)
        lse = jnp.where(l == 0, jnp.inf, m + jnp.log(jnp.maximum(l, tiny)))
        return out.reshape(nb, hb, c, dv), lse.reshape(nb, hb, c)

    total = counts[0] * counts[1] * counts[2]
    if total == 1:
        return chunk(jnp.int32(0))
    if in_place:

        def into(idx, buf):
            a, b, i = place(idx)
            out, _ = chunk(idx, buf)
            return lax.dynamic_update_slice(buf, out.astype(buf.dtype), (a * nb, b * hb, i * c, 0))

        return lax.fori_loop(0, total, into, q), None
    outs, lses = lax.map(chunk, jnp.arange(total, dtype=jnp.int32))
    return _unchunk(counts, chunks, n, h, lq, outs), _unchunk(counts, chunks, n, h, lq, lses)


def _backward_whole_keys(cfg: _Config, chunks: tuple[int, int, int], q, k, v, kp, am, out, dout):
    """``_backward`` with one block of keys, no dropout and no gradient for the masks: ``dq, dk, dv``.

    Chunks of ``(examples, heads)`` run one after another; within one, its query chunks accumulate
    ``dk`` and ``dv`` over all keys (one step when a chunk holds every query, the common case up to
    ``FUSED_KEYS_MAX`` keys). Each step recomputes its scores, keys first as in ``_backward``, and no product
    takes a transposed left operand (which XLA's CPU backend runs about 2x slower): ``dq`` comes out
    transposed, ``[D, queries]``, from ``k^T @ dS^T``. Measured at 8 x 8 rows, L = S = 512, D = 32 (the
    backward alone, medians of 9): 56 ms, against 79 ms with ``dS^T``'s transposed product for ``dq`` and 80
    ms for the key loop. The scores ``K @ Q^T`` and ``dP^T = V @ dO^T`` read ``Q`` and ``dO`` as they are, a
    transposed right operand, rather than transposed copies of both made before the loop: the backward alone
    (Intel Xeon, medians of 7 rounds in one process, copies against none), at (N, H, L, D) = (8, 16, 128, 64):
    21.9 against 12.4 ms; (8, 8, 256, 64): 23.8 / 20.2; (8, 8, 512, 64): 76.7 / 66.3; level at (8, 8, 128,
    32), (1, 8, 512, 32) and (1, 8, 1024, 32).

    Unlike ``_backward`` (FlashAttention-2's backward) it takes no log-sum-exp from the forward: each step
    computes the softmax again from its scores, as ``_forward_whole_keys`` does. With the log-sum-exp as its
    second output, XLA's CPU backend ran the forward's chunk as separate kernels (the scores written out, then
    scaled, then exponentiated) instead of one fused kernel. The gradient of the attention core alone
    (``jax.vmap`` of ``blockwise_attention``, jitted, medians of 5 rounds in one process, Intel Xeon), the
    log-sum-exp saved against computed again, at (B, L, H, D) = (8, 128, 16, 64): 34.7 against 30.4 ms;
    (8, 256, 8, 64): 47.8 / 40.2; (8, 128, 8, 32): 5.1 / 4.3; level at (1, 256, 8, 32), (1, 512, 8, 32),
    (8, 64, 8, 64) and (1, 1024, 8, 32) (30.4 / 31.5).
    """
    sdtype = softmax_dtype(q.dtype)
    n, h, lq, d = q.shape
    sk, dv = k.shape[2], v.shape[-1]
    nb, hb, c = chunks
    rows = nb * hb
    counts = (n // nb, h // hb, lq // c)
    delta = jnp.sum(dout.astype(sdtype) * out.astype(sdtype), axis=-1)  # [N, H, L]
    dout = dout.astype(sdtype)
    kt = jnp.swapaxes(k, 2, 3)  # [N, H, D, S]
    tiny = jnp.finfo(sdtype).tiny
    masked = _masked(cfg, kp, am)
    part = functools.partial(_chunk_part, chunks)

    def row_chunk(idx):
        a, b = jnp.divmod(idx, counts[1])
        kc = part(k, a, b).reshape(rows, sk, d)
        ktc = part(kt, a, b).reshape(rows, d, sk).astype(sdtype)
        vc = part(v, a, b).reshape(rows, sk, dv).astype(sdtype)

        def q_chunk(carry, i):
            dk, dv_ = carry
            qc = part(q, a, b, i).reshape(rows, c, d).astype(sdtype)
            doc = part(dout, a, b, i).reshape(rows, c, dv)
            delta_c = part(delta, a, b, i).reshape(rows, 1, c)
            st = _chunk_scores(cfg, chunks, kc, qc, kp, am, a, b, i, sdtype, keys_first=True)  # [rows, S, c]
            _, pt, l = _chunk_exp(st, 1, masked)  # the forward's softmax again: 0 where masked, on masked rows
            pt = pt * (1.0 / jnp.maximum(l, tiny))
            dpt = _product(cfg, "rkd,rqd->rkq", vc, doc, sdtype)
            dst = pt * (dpt - delta_c)
            dst = _scaled(cfg, dst, sdtype)  # d(q @ k^T)
            dq_t = _product(cfg, "rdk,rkq->rdq", ktc, dst, sdtype)
            dk = dk + _product(cfg, "rkq,rqd->rkd", dst, qc, sdtype)
            dv_ = dv_ + _product(cfg, "rkq,rqd->rkd", pt, doc, sdtype)
            return (dk, dv_), dq_t.reshape(nb, hb, d, c)

        init = (jnp.zeros((rows, sk, d), sdtype), jnp.zeros((rows, sk, dv), sdtype))
        if counts[2] == 1:
            (dk, dv_), dq = q_chunk(init, jnp.int32(0))
            dq = dq[None]
        else:
            (dk, dv_), dq = lax.scan(q_chunk, init, jnp.arange(counts[2], dtype=jnp.int32))
        dq = jnp.transpose(dq, (1, 2, 0, 4, 3)).reshape(nb, hb, lq, d)  # [L/c, nb, hb, D, c] -> [nb, hb, L, D]
        return dq, dk.reshape(nb, hb, sk, d), dv_.reshape(nb, hb, sk, dv)

    if counts[0] * counts[1] == 1:
        return row_chunk(jnp.int32(0))
    dqs, dks, dvs = lax.map(row_chunk, jnp.arange(counts[0] * counts[1], dtype=jnp.int32))
    whole = (counts[0], counts[1], 1)
    return (
        _unchunk(whole, (nb, hb, lq), n, h, lq, dqs),
        _unchunk(whole, (nb, hb, sk), n, h, sk, dks),
        _unchunk(whole, (nb, hb, sk), n, h, sk, dvs),
    )


def _backward(cfg: _Config, dropout, q, k, v, kp, am, key, out, lse, dout, need_dkp, need_dam):
    bq, bk = cfg.block_q, cfg.block_k
    sdtype = softmax_dtype(q.dtype)
    n, h, lq, d = q.shape
    nq, nk = lq // bq, k.shape[2] // bk
    delta = jnp.sum(dout.astype(sdtype) * out.astype(sdtype), axis=-1)  # [N, H, L]
    dout = dout.astype(sdtype)

    def k_block(dq, j):
        k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
        v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)

        def update(carry, i):
            # Everything in [keys, queries] layout: then dV += P^T dO and dK += dS^T Q are
            # plain products (a transposed left operand runs about 2x slower on CPU).
            dk, dv = carry
            q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=2)
            do_blk = lax.dynamic_slice_in_dim(dout, i * bq, bq, axis=2)
            lse_blk = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=2)
            dl_blk = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=2)
            st = _scores("nhkd,nhqd->nhkq", k_blk, q_blk, cfg, kp, am, i, j, sdtype, keys_first=True)
            pt = jnp.exp(st - lse_blk[..., None, :])  # 0 where masked and on fully masked rows (lse = inf)
            dpt = _product(cfg, "nhkd,nhqd->nhkq", v_blk.astype(sdtype), do_blk, sdtype)
            if dropout is not None:
                keep = jnp.swapaxes(_dropout_keep(dropout, key, i, j, (n, h, bq, bk)), 2, 3)
                scale = jnp.asarray(1.0 / (1.0 - dropout), sdtype)
                pt_used = jnp.where(keep, pt * scale, 0.0).astype(sdtype)
                dpt = jnp.where(keep, dpt * scale, 0.0).astype(sdtype)
            else:
                pt_used = pt
            dv = dv + _product(cfg, "nhkq,nhqd->nhkd", pt_used, do_blk, sdtype)
            dst = pt * (dpt - dl_blk[..., None, :])  # d(scores): the masks' gradients
            dst_qk = _scaled(cfg, dst, sdtype)  # d(q @ k^T)
            dk = dk + _product(cfg, "nhkq,nhqd->nhkd", dst_qk, q_blk.astype(sdtype), sdtype)
            dq_blk = _product(cfg, "nhkq,nhkd->nhqd", dst_qk, k_blk.astype(sdtype), sdtype)
            dkp_blk = jnp.sum(dst, axis=(1, 3)) if need_dkp else None
            dam_blk = None
            if need_dam:
                dam_blk = jnp.swapaxes(dst, 2, 3)
                if am.shape[0] == 1:
                    dam_blk = jnp.sum(dam_blk, axis=0, keepdims=True)
                if am.shape[1] == 1:
                    dam_blk = jnp.sum(dam_blk, axis=1, keepdims=True)
            return (dk, dv), (dq_blk, dkp_blk, dam_blk)

        def skip(carry, i):
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(update, carry, i)[1])
            return carry, zeros

        def step(carry, i):
            return _when_visible(cfg, i, j, update, skip, carry, i)

        init = (
            jnp.zeros((n, h, bk, d), sdtype),
            jnp.zeros((n, h, bk, v.shape[-1]), sdtype),
        )
        (dk, dv), (dq_blks, dkp_blks, dam_blks) = lax.scan(step, init, jnp.arange(nq, dtype=jnp.int32))
        dq = dq + jnp.moveaxis(dq_blks, 0, 2).reshape(n, h, lq, d)
        dkp = jnp.sum(dkp_blks, axis=0) if need_dkp else None  # [N, bk]
        dam = None
        if need_dam:  # [nq, Nm, Hm, bq, bk] -> [Nm, Hm, L, bk]
            dam = jnp.moveaxis(dam_blks, 0, 2).reshape(am.shape[0], am.shape[1], lq, bk)
        return dq, (dk, dv, dkp, dam)

    dq0 = jnp.zeros((n, h, lq, d), sdtype)
    dq, (dks, dvs, dkps, dams) = lax.scan(k_block, dq0, jnp.arange(nk, dtype=jnp.int32))
    s_len = k.shape[2]
    dk = jnp.moveaxis(dks, 0, 2).reshape(n, h, s_len, d)
    dv = jnp.moveaxis(dvs, 0, 2).reshape(n, h, s_len, v.shape[-1])
    # None exactly when not needed (a scan carries None leaves as None).
    dkp = None if dkps is None else jnp.moveaxis(dkps, 0, 1).reshape(n, s_len)
    dam = None if dams is None else jnp.moveaxis(dams, 0, 3).reshape(am.shape[0], am.shape[1], lq, s_len)
    return dq, dk, dv, dkp, dam


class _Static(NamedTuple):
    """What a call fixes before the kernel sees shapes: the causal rule and any forced block sizes."""

    causal: bool
    src_len: int
    block_q: int | None
    block_k: int | None
    scale: float = 1.0
    precision: Any = None  # decided where the call is traced, so that the backward rule, traced later, keeps it


def _plan(static: _Static, q, k) -> _Config:
    """Block sizes for these (possibly vmap-folded) shapes ``q [N, H, L, D]``, ``k [N, H, S', D]``."""
    n, h, tgt_len, _ = q.shape
    total_len = k.shape[2]
    bq, bk = block_sizes(n * h, tgt_len, total_len, static.block_q, static.block_k)
    return _Config(bq, bk, static.causal, static.src_len, total_len, static.scale, static.precision)


def _whole_blocks(cfg: _Config, q, k, v, kp, am):
    lq = -(-q.shape[2] // cfg.block_q) * cfg.block_q
    sk = -(-cfg.total_len // cfg.block_k) * cfg.block_k
    am = None if am is None else _pad_to(_pad_to(am, 2, lq), 3, sk)
    return lq, _pad_to(q, 2, lq), _pad_to(k, 2, sk), _pad_to(v, 2, sk), _pad_to(kp, 1, sk), am


def _fold_vmapped_rows(impl, *, am_index: int, key_index: int, need_dam: bool = False):
    """``impl`` (arrays with rows ``N`` first) whose ``jax.vmap`` folds the mapped axis into those rows.

    Block sizes are chosen from the number of rows the kernel really runs. Under
    plain ``jax.vmap`` (how the Equinox front end batches) the kernel would see one
    example's rows and choose blocks ``B`` times too large for the cache; folding
    the mapped axis into ``N`` lets it choose for all of them. Arrays that are not
    mapped are broadcast along the axis first, except an unmapped ``attn_mask`` with
    one row, which broadcasts as it is. Calls that cannot be folded (a dropout key,
    a per-row mask that is not mapped, or a gradient for an unmapped mask) are
    vmapped as usual.
    """

    def call(*args):
        f = jax.custom_batching.custom_vmap(impl)

        @f.def_vmap
        def rule(axis_size, in_batched, *args):
            am, am_mapped = args[am_index], in_batched[am_index]
            rows = args[0].shape[1] if in_batched[0] else args[0].shape[0]
            foldable = args[key_index] is None and (
                am is None
                or (am_mapped and am.shape[1] == rows)
                or (not am_mapped and am.shape[0] == 1 and not need_dam)
            )
            if not foldable:
                outs = jax.vmap(impl, in_axes=tuple(0 if b else None for b in in_batched))(*args)
                return outs, jax.tree.map(lambda _: True, outs)
            folded = []
            for i, (x, mapped) in enumerate(zip(args, in_batched, strict=False)):
                if x is not None and i != key_index and (mapped or i != am_index):
                    if not mapped:
                        x = jnp.broadcast_to(x, (axis_size, *x.shape))
                    x = x.reshape(axis_size * x.shape[1], *x.shape[2:])
                folded.append(x)
            outs = jax.tree.map(lambda y: y.reshape(axis_size, -1, *y.shape[1:]), call(*folded))
            return outs, jax.tree.map(lambda _: True, outs)

        return f(*args)

    return call


def _whole_keys(static: _Static, dropout, total_len: int) -> bool:
    """The forward runs ``_forward_whole_keys``: on the CPU (where it was measured, and where its chunks
    are sized for the caches), with no dropout, no forced block sizes and at most ``WHOLE_KEYS_MAX`` keys."""
    forced = (static.block_q, static.block_k, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K) != (None,) * 4
    cpu = jax.default_backend() == "cpu"
    return cpu and dropout is None and not forced and total_len <= WHOLE_KEYS_MAX


def _padded_forward(static: _Static, dropout, q, k, v, kp, am, key, primal: bool = False):
    """``_forward`` on shapes that need not be whole blocks: pads, runs, and cuts back to ``L``: ``(out, lse)``.
    With ``primal`` (no gradient, so no ``lse`` wanted: ``(out, None)``), the whole-key pass writes its output
    over the queries where it can and ``OUTPUT_OVER_QUERIES`` is on."""

    def impl(q, k, v, kp, am, key):
        cfg = _plan(static, q, k)
        n, h, tgt_len, _ = q.shape
        if _whole_keys(static, dropout, cfg.total_len):
            chunks = forward_chunks(n, h, tgt_len, cfg.total_len, q.shape[-1])
            cfg = cfg._replace(block_q=chunks[2], block_k=cfg.total_len)
            over_q = primal and OUTPUT_OVER_QUERIES and v.shape[-1] == q.shape[-1] and q.dtype == softmax_dtype(q.dtype)
            _, q, k, v, kp, am = _whole_blocks(cfg, q, k, v, kp, am)
            out, lse = _forward_whole_keys(cfg, chunks, q, k, v, kp, am, in_place=over_q)
        else:
            _, q, k, v, kp, am = _whole_blocks(cfg, q, k, v, kp, am)
            out, lse = _forward(cfg, dropout, q, k, v, kp, am, key)
        if primal:  # the same outputs whichever pass ran, so that a vmapped call folds its rows alike
            return out[:, :, :tgt_len]
        assert lse is not None  # only the pass over the queries leaves it out
        return out[:, :, :tgt_len], lse[:, :, :tgt_len]

    outs = _fold_vmapped_rows(impl, am_index=4, key_index=5)(q, k, v, kp, am, key)
    return (outs, None) if primal else outs


def _padded_backward(static: _Static, dropout, need_dkp, need_dam, q, k, v, kp, am, key, out, lse, dout):
    """``_backward`` on shapes that need not be whole blocks (padded query rows get ``lse = inf``: no weight), or
    ``_backward_whole_keys`` when ``lse`` is ``None``."""

    def impl(q, k, v, kp, am, key, out, lse, dout):
        cfg = _plan(static, q, k)
        n, h, tgt_len, _ = q.shape
        src_len = k.shape[2]
        if lse is None:  # the whole-key backward (``_core_fwd`` chose it)
            chunks = backward_chunks(n, h, tgt_len, cfg.total_len)
            cfg = cfg._replace(block_q=chunks[2], block_k=cfg.total_len)
            lq, q, k, v, kp, am = _whole_blocks(cfg, q, k, v, kp, am)
            out, dout = _pad_to(out, 2, lq), _pad_to(dout, 2, lq)  # padded rows: dout = 0, no gradient
            dq, dk, dv = _backward_whole_keys(cfg, chunks, q, k, v, kp, am, out, dout)
            return dq[:, :, :tgt_len], dk, dv, None, None
        lq, q, k, v, kp, am_p = _whole_blocks(cfg, q, k, v, kp, am)
        out, dout = _pad_to(out, 2, lq), _pad_to(dout, 2, lq)
        lse = _pad_to(lse, 2, lq, jnp.inf)
        dq, dk, dv, dkp, dam = _backward(cfg, dropout, q, k, v, kp, am_p, key, out, lse, dout, need_dkp, need_dam)
        dkp = None if dkp is None else dkp[:, :src_len]
        dam = None if dam is None else dam[:, :, :tgt_len, :src_len]
        return dq[:, :, :tgt_len], dk[:, :, :src_len], dv[:, :, :src_len], dkp, dam

    fold = _fold_vmapped_rows(impl, am_index=4, key_index=5, need_dam=need_dam)
    return fold(q, k, v, kp, am, key, out, lse, dout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention_core(static, dropout, q, k, v, kp, am, key):
    out, _ = _padded_forward(static, dropout, q, k, v, kp, am, key, primal=True)
    return out


def _value(x):
    return jax.tree.map(lambda p: p.value, x)


def _perturbed(x):
    return any(p.perturbed for p in jax.tree.leaves(x))


def _core_fwd(static, dropout, q, k, v, kp, am, key):
    flags = (_perturbed(kp), _perturbed(am))
    q, k, v, kp, am, key = (_value(x) for x in (q, k, v, kp, am, key))
    out, lse = _padded_forward(static, dropout, q, k, v, kp, am, key)
    if _whole_keys(static, dropout, k.shape[2]) and not any(flags):
        # the backward takes every key at once and computes the softmax again: as a second output of the
        # forward, the log-sum-exp split its fused chunk into separate kernels (see _backward_whole_keys)
        lse = None
    return out, (q, k, v, kp, am, key, out, lse, flags)


def _core_bwd(static, dropout, res, dout):
    q, k, v, kp, am, key, out, lse, (need_dkp, need_dam) = res
    if isinstance(dout, SymbolicZero):
        dout = jnp.zeros(dout.shape, dout.dtype)  # pyright: ignore[reportArgumentType]  (attributes forwarded to its aval)
    dq, dk, dv, dkp, dam = _padded_backward(static, dropout, need_dkp, need_dam, q, k, v, kp, am, key, out, lse, dout)
    if kp is not None and dkp is None:
        dkp = jnp.zeros_like(kp)
    if am is not None and dam is None:
        dam = jnp.zeros_like(am)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dkp, dam, None


_attention_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


def blockwise_attention(
    q,
    k,
    v,
    masks: Masks,
    *,
    dropout_p: float = 0.0,
    dropout_key=None,
    block_q: int | None = None,
    block_k: int | None = None,
    scale: float = 1.0,
):
    """Attention without an ``L x S`` score matrix, same contract as ``dense_attention``.

    Args:
        q: ``[*B, L, H, D]``.
        k: ``[*B, S', H, D]``.
        v: ``[*B, S', H, D]``.
        masks: canonical masks for ``S'`` keys (see [`Masks`][noxton.functional.Masks]).
        dropout_p: dropout probability on the normalised weights.
        dropout_key: PRNG key, required when ``dropout_p > 0``.
        block_q: queries per block (clipped to ``L``); ``None``: chosen by ``block_sizes``
            (about ``BLOCK_SCORES`` scores per block, over every batch row and head,
            those of a ``jax.vmap`` included).
        block_k: keys per block (clipped to ``S'``); ``None``: at most ``MAX_BLOCK_K``. With neither
            given, no dropout and at most ``WHOLE_KEYS_MAX`` keys, the CPU takes all keys at once, in
            chunks of rows and queries (``forward_chunks``, ``backward_chunks``), forward and backward (the
            backward keeps the blocks when the masks need a gradient).
        scale: multiplies ``q @ k^T`` in the softmax dtype, before the masks are added.

    Returns:
        ``[*B, L, H, D]`` in the softmax dtype (float32, or float64 for float64 inputs).
    """
    batch_shape = q.shape[:-3]
    tgt_len, heads = q.shape[-3:-1]
    total_len = k.shape[-3]
    n = math.prod(batch_shape)
    sdtype = softmax_dtype(q.dtype)

    def to_nhld(x):
        return jnp.transpose(x.reshape(n, x.shape[-3], heads, x.shape[-1]), (0, 2, 1, 3))

    kp = None
    if masks.key_padding is not None:
        kp = masks.key_padding.astype(sdtype).reshape(n, total_len)
    am = None
    if masks.attn is not None:
        a = masks.attn.astype(sdtype)
        if a.ndim == 2:
            am = a.reshape(1, 1, tgt_len, total_len)
        elif a.ndim == 3:
            am = a.reshape(1, heads, tgt_len, total_len)
        else:
            am = a.reshape(n, heads, tgt_len, total_len)
    static = _Static(bool(masks.causal), int(masks.src_len), block_q, block_k, float(scale), dot_precision(q.dtype))
    dropout = float(dropout_p) if dropout_p > 0.0 else None  # static: the dropout probability, or None
    key = dropout_key if dropout is not None else None
    out = _attention_core(static, dropout, to_nhld(q), to_nhld(k), to_nhld(v), kp, am, key)
    out = jnp.transpose(jnp.asarray(out), (0, 2, 1, 3))
    return out.reshape(*batch_shape, tgt_len, heads, v.shape[-1])
