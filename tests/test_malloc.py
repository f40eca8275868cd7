"""``import noxton`` sets glibc's malloc thresholds (``noxton._malloc``), and leaves the user's choice alone."""

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


def _probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in (*_malloc.USER_SETTINGS, "NOXTON_KEEP_MALLOC")}
    base.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, check=True, timeout=300
    )
    return out.stdout.strip()


@pytest.mark.skipif(_malloc._glibc() is None, reason="glibc only")
def test_import_raises_the_mmap_threshold():
    assert _probe() == "heap"
    assert _probe(NOXTON_KEEP_MALLOC="1") == "mmap"
    assert _probe(MALLOC_TRIM_THRESHOLD_="131072") == "mmap"


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
    expected = [(_malloc.M_MMAP_THRESHOLD, 32 * 2**20), (_malloc.M_TRIM_THRESHOLD, 64 * 2**20)]
    assert libc.calls == (expected if tuned else [])
