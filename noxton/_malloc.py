"""glibc's ``malloc`` held where XLA's CPU runtime runs at its best, without asking users to set anything.

XLA's CPU kernels (its YNNPACK fusions) allocate their intermediate buffers with ``malloc`` in the
runtime's worker threads, a few MiB per chunk of scores, and free them at the end of each call. glibc
gives freed memory at the top of a thread's heap back to the kernel (``madvise(MADV_DONTNEED)``) once
it exceeds ``M_TRIM_THRESHOLD``, and serves blocks above ``M_MMAP_THRESHOLD`` with a fresh ``mmap``:
either way the next call faults every page in again. Both thresholds start at 128 KiB and rise only
after the process frees a large ``mmap``-ed block (to that block's size, and twice it for trimming; at
most 32 MiB), so the same program ran at one of two speeds depending on what the process had freed
before. Measured with ``strace -f -e trace=madvise`` and medians of 5 calls: noxton's forward at
B=1, L=S=512, E=256, H=8 returned 4-5 blocks of 5.9 MiB per call and took 11.7-14.5 ms, against
5.4-7.5 ms with the thresholds below; torch took 5.7 ms.

A third pattern comes from the thread that frees. A worker thread's arena grows in heaps of at most
64 MiB; a block that does not fit in its heap goes to a new heap, and when that block is freed (a
call's result, freed by Python on the main thread) the new heap is empty and glibc unmaps it, unless
the padding it keeps at the top of a heap (``M_TOP_PAD``, 128 KiB) covers a heap. So each call mapped a
fresh heap and faulted the block in again. Measured with ``strace -f -e trace=mmap,munmap`` on
``noxton.nn.SqueezeExcitation`` at (32, 256, 28, 28), ``jax.vmap``-ed and jitted beside torch's block,
whose 24.5 MiB result took a new heap each call in some processes: there it faulted 6273 pages per call
and took 6.4-6.9 ms against 1.9-2.3 ms in the others (torch 1.8-1.9 ms); see ``M_TOP_PAD`` below.

``tune_malloc`` (run once when ``noxton`` is imported) sets the two thresholds to the values glibc
itself reaches after freeing one 32 MiB block (``M_MMAP_THRESHOLD`` 32 MiB, ``M_TRIM_THRESHOLD``
64 MiB), so every process starts where the fast ones ended up, and the top padding to a thread heap's
size (64 MiB), so that an emptied heap stays mapped for the next call. It is process-wide: each
thread's heaps, once used, stay mapped and keep their freed memory for reuse instead of returning it,
and the main heap keeps up to 64 MiB at its top. Blocks of 32 MiB or more (the temporaries of a large call,
such as the 50 MiB that XLA packs the intermediates of the layer's forward at B=8, L=512, E=1024 into)
still get a fresh ``mmap`` whenever no heap has room for them: glibc allows no higher threshold, and turning
``mmap`` off (``M_MMAP_MAX`` 0) would keep every large block a program frees, a torch checkpoint's tensors among
them, in the heap. XLA's own flag for splitting those temporaries is left to the user, since XLA then logs a
warning for every larger intermediate: docs/differences.md ("The process's allocator") gives its figures, its
cost and how to set it.

It does nothing off glibc, where the user has chosen the allocator's thresholds (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``), or when
``NOXTON_KEEP_MALLOC`` is set to anything but ``0``.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

#: ``mallopt`` parameters (``<malloc.h>``).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
#: glibc's ceiling for its dynamic ``mmap`` threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``), and
#: the trim threshold it sets beside it (twice it).
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
#: The padding glibc keeps at the top of a heap: a thread heap's size on 64-bit (``HEAP_MAX_SIZE``, twice the
#: largest ``mmap`` threshold). glibc unmaps an emptied heap only where the heap before it offers more than the
#: padding (its free top and the room it may still grow; ``heap_trim`` in ``malloc/arena.c``), never at this size,
#: so a thread's heaps stay mapped for the next call's blocks.
TOP_PAD = 2 * MMAP_THRESHOLD
#: Environment variables through which a user sets glibc's thresholds themselves.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- present in glibc only (musl has a mallopt that does nothing)
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc(environ: Mapping[str, str] | None = None, libc=None) -> bool:
    """Set glibc's ``mmap`` and trim thresholds and its top padding as the module docstring says; ``True`` if they
    were set."""
    environ = os.environ if environ is None else environ
    if environ.get("NOXTON_KEEP_MALLOC", "0") != "0":
        return False
    if any(name in environ for name in USER_SETTINGS) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _glibc() if libc is None else libc
    if libc is None:
        return False
    # mallopt returns 1 on success; set the mmap threshold first: glibc keeps it at most half a heap.
    done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    return libc.mallopt(M_TOP_PAD, TOP_PAD) == 1 and done
