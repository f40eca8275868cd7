"""``import noxton`` sets glibc's malloc thresholds and top padding (``noxton._malloc``), and leaves the user's choice
alone."""

import os
import subprocess
import sys

import pytest

from noxton import _malloc

# Where glibc puts a 16 MiB block after ``import noxton``: in the main heap (below the 32 MiB mmap
# threshold noxton sets) or a fresh mmap (glibc's own 128 KiB threshold in a fresh process).
PROBE = """
import ctypes
import noxton
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(16 << 20)
heap = [line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
lo, hi = (int(v, 16) for v in heap[0].split()[0].split("-")) if heap else (0, 0)
print("heap" if lo <= p < hi else "mmap")
"""


# A thread allocates three 24 MiB blocks: the third does not fit in its arena's first heap (64 MiB) and takes
# a heap of its own. The main thread frees it, as Python frees a jitted call's result that a worker thread of
# XLA allocated: is that heap still mapped, for the next call's block, or unmapped (faulted in again next time)?
HEAP_PROBE = """
import ctypes
import threading
import noxton
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = []
thread = threading.Thread(target=lambda: blocks.extend(libc.malloc(24 << 20) for _ in range(3)))
thread.start()
thread.join()
libc.free(blocks[-1])
maps = [[int(v, 16) for v in line.split()[0].split("-")] for line in open("/proc/self/maps")]
print("kept" if any(lo <= blocks[-1] < hi for lo, hi in maps) else "unmapped")
"""


def _run(probe, unset=(), **env) -> subprocess.CompletedProcess:
    """``probe`` in a fresh Python, without the user's allocator settings (nor the variables in ``unset``)."""
    unset = (*_malloc.USER_SETTINGS, "NOXTON_KEEP_MALLOC", "GLIBC_TUNABLES", *unset)
    base = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True, check=True, timeout=300
    )


def _probe(probe=PROBE, **env):
    return _run(probe, **env).stdout.strip()


@pytest.mark.skipif(_malloc._glibc() is None, reason="glibc only")
def test_import_raises_the_mmap_threshold():
    assert _probe() == "heap"
    assert _probe(NOXTON_KEEP_MALLOC="1") == "mmap"
    assert _probe(MALLOC_TRIM_THRESHOLD_="131072") == "mmap"


@pytest.mark.skipif(_malloc._glibc() is None, reason="glibc only")
def test_import_keeps_a_thread_heap_that_another_thread_emptied():
    assert _probe(HEAP_PROBE) == "kept"
    # noxton's two thresholds alone, set by the user, with glibc's own top padding: the heap goes
    thresholds = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
    assert _probe(HEAP_PROBE, **thresholds) == "unmapped"


# A program whose intermediate (a @ a) is 64 MiB, compiled after ``import noxton``: the process's XLA settings are
# the user's. (With ``--xla_multiheap_size_constraint_per_heap`` under 64 MiB, XLA logged a warning per buffer.)
COMPILE_PROBE = """
import os
import noxton
import jax
import jax.numpy as jnp
a = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
jax.jit(lambda a: (a @ a) @ a).lower(a).compile()
print(os.environ.get("XLA_FLAGS"))
"""


def test_import_leaves_xla_flags_and_its_log_alone():
    out = _run(COMPILE_PROBE, unset=("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL"))
    assert out.stdout.strip() == "None"
    assert "heap_simulator" not in out.stderr, out.stderr[:2000]


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize(
    ("environ", "tuned"),
    [
        ({}, True),
        ({"NOXTON_KEEP_MALLOC": "0"}, True),
        ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, True),
        ({"NOXTON_KEEP_MALLOC": "1"}, False),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, False),
        ({"MALLOC_TOP_PAD_": "0"}, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, False),
    ],
)
def test_tune_malloc_respects_the_environment(environ, tuned):
    libc = FakeLibc()
    assert _malloc.tune_malloc(environ, libc) is tuned
    expected = [
        (_malloc.M_MMAP_THRESHOLD, 32 * 2**20),
        (_malloc.M_TRIM_THRESHOLD, 64 * 2**20),
        (_malloc.M_TOP_PAD, 64 * 2**20),
    ]
    assert libc.calls == (expected if tuned else [])
