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
and the main heap keeps up to 64 MiB at its top. It does nothing off glibc, where the user has chosen
the allocator's thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or
a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``), or when ``NOXTON_KEEP_MALLOC`` is set to anything but
``0``.

Blocks of 32 MiB or more are a fresh ``mmap`` on every call whatever the thresholds: glibc takes no higher
``mmap`` threshold, and turning ``mmap`` off (``M_MMAP_MAX`` 0) would keep every large block a program
frees, a torch checkpoint's tensors among them, in the heap for good. XLA packs a compiled program's
intermediates into one temporary buffer per call, 40 MiB for the layer's forward at B=8, L=512, E=512
(90 MiB for its gradient), so past a few MiB of activations every call faulted its temporaries in again.
Where the thresholds were set, ``cap_xla_temporaries`` then caps each of those buffers below the
threshold with XLA's own flag for it (``--xla_multiheap_size_constraint_per_heap``, added to
``XLA_FLAGS``): a program's intermediates come in several buffers of at most 30 MiB (one buffer larger
than that stays whole), which glibc serves from the heaps and keeps. Measured on the 2-core Intel Xeon,
``python -m benchmarks --only-grid --grid-points "8,512,512,8;8,512,1024,16;8,512,256,8;1,2048,1024,16"
--grid-contenders eqx --grid-repeats 9``, twice with the cap and twice with ``XLA_FLAGS=
--xla_multiheap_size_constraint_per_heap=-1`` (none), alternating, 2026-12-05; the layer's time over
torch's in the same run, without / with: forward at B=8, L=512, E=512 1.32, 1.23 / 1.18, 1.16; at B=8,
L=512, E=1024 1.20, 1.19 / 1.07, 1.07; forward and backward at B=8, L=512, E=512 1.16, 1.19 / 1.09, 1.09;
within the runs' spread at B=8, L=512, E=256 (forward and backward 1.18, 1.24 / 1.22, 1.20) and B=1,
L=2048, E=1024 (forward 1.34, 1.30 / 1.33, 1.29). XLA reads its flags when JAX starts its first backend,
so the cap applies when ``noxton`` is imported before the process's first JAX computation; only where JAX
runs on the CPU alone (no ``JAX_PLATFORMS`` other than ``cpu``, no GPU or TPU plugin installed) and on a
jaxlib known to take the flag (``TEMP_FLAG_JAXLIB``); and it is left alone where ``XLA_FLAGS`` already
sets it.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import sys
from collections.abc import Mapping, MutableMapping

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
#: XLA's flag that splits a compiled program's temporary buffer into buffers of at most this many bytes (one
#: intermediate larger than that gets a buffer of its own), and the cap noxton gives it: below ``MMAP_THRESHOLD``.
TEMP_FLAG = "xla_multiheap_size_constraint_per_heap"
TEMP_CAP = 30 * 2**20
#: The newest jaxlib (major, minor) whose XLA is known to take ``TEMP_FLAG``: XLA aborts the process on an unknown
#: flag in ``XLA_FLAGS``, so a later jaxlib gets no cap until it is checked. Checked: the flag's name is in
#: jaxlib 0.4.38's ``xla_extension.so``, 0.10.2's and 0.12.0.1's ``libjax_common.so``, and tox runs the tests on
#: 0.4.38, 0.10.2 and the newest release.
TEMP_FLAG_JAXLIB = (0, 12)
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


def _accelerator_possible(environ: Mapping[str, str]) -> bool:
    """JAX may run on something other than the CPU here: a platform asked for, or a GPU or TPU plugin installed."""
    import jax

    # JAX_PLATFORMS as JAX read it at import, unless the environment given says otherwise (the tests' fakes)
    platforms = environ["JAX_PLATFORMS"] if "JAX_PLATFORMS" in environ else getattr(jax.config, "jax_platforms", None)
    if platforms:
        return any(name.strip() not in ("", "cpu") for name in platforms.split(","))
    return _accelerator_plugins()


def _accelerator_plugins() -> bool:
    """A PJRT plugin (JAX's CUDA and ROCm ones, found as JAX finds them) or ``libtpu`` is installed."""
    if importlib.metadata.entry_points(group="jax_plugins") or importlib.util.find_spec("libtpu") is not None:
        return True
    spec = importlib.util.find_spec("jax_plugins")
    return spec is not None and any(pkgutil.iter_modules(spec.submodule_search_locations or []))


def _jaxlib_takes_the_flag(version: str | None = None) -> bool:
    """``jaxlib``'s (major, minor) is at most ``TEMP_FLAG_JAXLIB``."""
    if version is None:
        try:
            version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            return False
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2]) <= TEMP_FLAG_JAXLIB


def _backend_started() -> bool:
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else bool(getattr(xla_bridge, "_backends", None))


def cap_xla_temporaries(environ: MutableMapping[str, str] | None = None) -> bool:
    """Add ``--xla_multiheap_size_constraint_per_heap`` (``TEMP_CAP``) to ``XLA_FLAGS`` as the module docstring
    says; ``True`` if it was added."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if TEMP_FLAG in flags or not _jaxlib_takes_the_flag() or _accelerator_possible(environ) or _backend_started():
        return False
    environ["XLA_FLAGS"] = f"{flags} --{TEMP_FLAG}={TEMP_CAP}".strip()
    return True
